/**
 * The method table of SPEC §6: which sparsifier each method uses and its defaults for
 * consensus, normalize and rescale, plus the parameters a recipe may give it.
 * The native kernels and lib/reference both take the resolved values, never a name.
 */
export type SparsifierName = 'none' | 'magprune' | 'random' | 'magnitude' | 'breadcrumbs';
export type ConsensusName = 'sum' | 'count' | 'none';
/** `true` in a recipe is resolved per sparsifier (inverse or l1); here it is concrete. */
export type RescaleName = 'none' | 'inverse' | 'l1' | 'l2' | 'linf';

export interface MethodSpec {
  name: string;
  /** delta: base + fuse(sparsified deltas); linear: weighted average; slerp: two models */
  kind: 'delta' | 'linear' | 'slerp';
  sparsifier: SparsifierName;
  consensus: ConsensusName;
  normalize: boolean;
  /** the recipe's default for `rescale` (false | true) before resolution */
  rescale: boolean;
  /** per-model parameters this method reads */
  modelParams: readonly string[];
  /** global-only parameters this method reads */
  globalParams: readonly string[];
  paper: string;
}

const TA_GLOBAL = ['lambda', 'normalize', 'rescale', 'consensus'] as const;

export const METHODS: Readonly<Record<string, MethodSpec>> = {
  task_arithmetic: {
    name: 'task_arithmetic', kind: 'delta', sparsifier: 'none', consensus: 'none', normalize: false, rescale: false,
    // no rescale: with nothing dropped there is nothing to rescale (SPEC §6 has none)
    modelParams: ['weight'], globalParams: ['lambda', 'normalize', 'consensus'],
    paper: 'Editing Models with Task Arithmetic (Ilharco et al., 2023), arXiv:2212.04089',
  },
  ties: {
    name: 'ties', kind: 'delta', sparsifier: 'magnitude', consensus: 'sum', normalize: true, rescale: false,
    modelParams: ['weight', 'density'], globalParams: TA_GLOBAL,
    paper: 'TIES-Merging (Yadav et al., 2023), arXiv:2306.01708',
  },
  dare_ties: {
    name: 'dare_ties', kind: 'delta', sparsifier: 'random', consensus: 'sum', normalize: false, rescale: true,
    modelParams: ['weight', 'density'], globalParams: TA_GLOBAL,
    paper: 'Language Models are Super Mario (Yu et al., 2024), arXiv:2311.03099',
  },
  dare_linear: {
    name: 'dare_linear', kind: 'delta', sparsifier: 'random', consensus: 'none', normalize: false, rescale: true,
    modelParams: ['weight', 'density'], globalParams: TA_GLOBAL,
    paper: 'Language Models are Super Mario (Yu et al., 2024), arXiv:2311.03099',
  },
  breadcrumbs: {
    name: 'breadcrumbs', kind: 'delta', sparsifier: 'breadcrumbs', consensus: 'none', normalize: false, rescale: false,
    modelParams: ['weight', 'density', 'gamma'], globalParams: TA_GLOBAL,
    paper: 'Model Breadcrumbs (Davari & Belilovsky, 2024), arXiv:2312.06795',
  },
  breadcrumbs_ties: {
    name: 'breadcrumbs_ties', kind: 'delta', sparsifier: 'breadcrumbs', consensus: 'sum', normalize: false, rescale: false,
    modelParams: ['weight', 'density', 'gamma'], globalParams: TA_GLOBAL,
    paper: 'Model Breadcrumbs (Davari & Belilovsky, 2024), arXiv:2312.06795',
  },
  della: {
    name: 'della', kind: 'delta', sparsifier: 'magprune', consensus: 'sum', normalize: true, rescale: true,
    modelParams: ['weight', 'density', 'epsilon'], globalParams: TA_GLOBAL,
    paper: 'DELLA-Merging (Deep, Bhardwaj & Poria, 2024), arXiv:2406.11617',
  },
  della_linear: {
    name: 'della_linear', kind: 'delta', sparsifier: 'magprune', consensus: 'none', normalize: false, rescale: true,
    modelParams: ['weight', 'density', 'epsilon'], globalParams: TA_GLOBAL,
    paper: 'DELLA-Merging (Deep, Bhardwaj & Poria, 2024), arXiv:2406.11617',
  },
  linear: {
    name: 'linear', kind: 'linear', sparsifier: 'none', consensus: 'none', normalize: true, rescale: false,
    modelParams: ['weight'], globalParams: ['normalize'],
    paper: 'Model soups (Wortsman et al., 2022), arXiv:2203.05482',
  },
  slerp: {
    name: 'slerp', kind: 'slerp', sparsifier: 'none', consensus: 'none', normalize: false, rescale: false,
    modelParams: [], globalParams: ['t'],
    paper: 'spherical linear interpolation (Shoemake, 1985), as in mergekit',
  },
};

/** Methods that read a base model (all of the table above). */
export function methodNames(): string[] {
  return Object.keys(METHODS);
}

/** Concrete rescale for a sparsifier given the recipe's value. */
export function resolveRescale(sparsifier: SparsifierName, value: boolean | RescaleName): RescaleName {
  if (value === false || sparsifier === 'none') return 'none';
  if (value === true) return sparsifier === 'magprune' || sparsifier === 'random' ? 'inverse' : 'l1';
  return value;
}
