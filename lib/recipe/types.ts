/**
 * A validated recipe (SPEC §7) and the per-tensor parameters resolved from it.
 */
export type OutDType = 'F32' | 'F16' | 'BF16' | 'F64';

export type ParamScalar = number | boolean | string;
/** a scalar, a gradient (numbers across the layers) or a filter list */
export type ParamValue = ParamScalar | number[] | Array<{ filter?: string; value: ParamScalar | number[] }>;

export interface RecipeModel {
  /** as written in the recipe */
  model: string;
  /** resolved location on disk */
  path: string;
  /** aliases already rewritten */
  parameters: Record<string, ParamValue>;
}

export interface Recipe {
  /** recipe file path, if any */
  source: string | null;
  /** a key of METHODS */
  mergeMethod: string;
  baseModel: { model: string; path: string };
  /** experts only (base excluded), in recipe order; expert index k = position here */
  models: RecipeModel[];
  /** global, aliases already rewritten */
  parameters: Record<string, ParamValue>;
  dtype: OutDType | null;
  outDtype: OutDType | null;
  /** 'base' or a model string as written */
  tokenizerSource: string | null;
  seed: number;
  warnings: string[];
  /** the parsed document as written (for saving beside the output) */
  document: unknown;
}

export interface ParseOptions {
  source?: string;
  /** maps a model string to its location; the default keeps it as written */
  resolvePath?: (model: string) => string;
}

export interface ExpertParams {
  weight: number;
  density: number;
  epsilon: number;
  gamma: number;
}

export interface TensorParams {
  /** per expert, in Recipe.models order */
  experts: ExpertParams[];
  lambda: number;
  normalize: boolean;
  consensus: 'sum' | 'count' | 'none';
  rescale: 'none' | 'inverse' | 'l1' | 'l2' | 'linf';
  /** slerp's interpolation position (0: base model, 1: the other) */
  t: number;
}
