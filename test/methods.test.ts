/**
 * What each method of SPEC §6 means, checked on small hand-made models, plus the
 * mergekit-style recipes and refusals of the methods issue.
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { layerCount, layerIndex, merge, openCheckpoint, parseRecipe, resolveTensorParams, saveModel } from '../lib/index.js';
import { makeModels, tempDir, writeRecipe } from './helpers/models.js';
import { rng, testSeed } from './helpers/random.js';

const root = resolve(import.meta.dirname, '..');
const seed = testSeed();

function cli(args: string[], env: NodeJS.ProcessEnv = {}) {
  const r = spawnSync(process.execPath, [join(root, 'bin/della-merge.js'), ...args], { encoding: 'utf8', env: { ...process.env, ...env } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function f32Model(dir: string, values: Record<string, number[]>, shape = (n: number) => [n]) {
  saveModel(dir, Object.entries(values).map(([name, v]) => ({ name, dtype: 'F32', shape: shape(v.length), data: new Float32Array(v) })));
  return dir;
}

function values(dir: string, name: string): number[] {
  const c = openCheckpoint(dir);
  const v = Array.from(c.array(name) as Float32Array);
  c.close();
  return v;
}

describe(`methods (DELLA_TEST_SEED=${seed})`, () => {
  it('slerp: t = 0 gives the base, t = 1 the other model, exactly', async () => {
    const dir = tempDir();
    const a = f32Model(join(dir, 'a'), { w: [0.5, -1, 2, 0.25] });
    const b = f32Model(join(dir, 'b'), { w: [1, 0.5, -0.75, 3] });
    for (const [t, want] of [[0, [0.5, -1, 2, 0.25]], [1, [1, 0.5, -0.75, 3]]] as const) {
      await merge({ merge_method: 'slerp', base_model: a, models: [{ model: a }, { model: b }], parameters: { t } }, { out: join(dir, `t${t}`) });
      expect(values(join(dir, `t${t}`), 'w')).toEqual(want);
    }
    const half = await merge({ merge_method: 'slerp', base_model: a, models: [{ model: b }], parameters: { t: 0.5 } }, { out: join(dir, 'half') });
    const [c0, c1] = half.tensorReports[0].parameters!.coefficients!;
    expect(c0).toBeCloseTo(c1, 12); // symmetric at t = 0.5
    expect(c0).toBeGreaterThan(0.5); // and more than a lerp: the arc bulges outward
  });

  it('linear: a normalized weighted average of the models (the base only if listed)', async () => {
    const dir = tempDir();
    const a = f32Model(join(dir, 'a'), { w: [1, 2, 3, 4] });
    const b = f32Model(join(dir, 'b'), { w: [3, 2, 1, 0] });
    await merge({ merge_method: 'linear', models: [{ model: a, parameters: { weight: 1 } }, { model: b, parameters: { weight: 3 } }] }, { out: join(dir, 'o') });
    expect(values(join(dir, 'o'), 'w')).toEqual([2.5, 2, 1.5, 1]);
    await merge({ merge_method: 'linear', base_model: a, models: [{ model: b }], parameters: { normalize: false } }, { out: join(dir, 'o2') });
    expect(values(join(dir, 'o2'), 'w')).toEqual([3, 2, 1, 0]);
  });

  it('ties keeps floor(density · N) of each delta, by magnitude, ties broken by index', async () => {
    const dir = tempDir();
    const base = f32Model(join(dir, 'base'), { w: [0, 0, 0, 0, 0, 0, 0, 0] });
    const e = f32Model(join(dir, 'e'), { w: [1, -5, 3, 3, 0.5, -3, 2, 0] });
    const report = await merge({ merge_method: 'ties', base_model: base, models: [{ model: e, parameters: { density: 0.5, weight: 1 } }] }, { out: join(dir, 'o') });
    // top 4 by |delta|: -5, then the three 3s (indices 2, 3, 5); sign election keeps them all
    expect(values(join(dir, 'o'), 'w')).toEqual([0, -5, 3, 3, 0, -3, 0, 0]);
    expect(report.tensorReports[0].keptFraction).toEqual([0.5]);
    const three = await merge({ merge_method: 'ties', base_model: base, models: [{ model: e, parameters: { density: 0.375 } }] }, { out: join(dir, 'o3') });
    expect(values(join(dir, 'o3'), 'w')).toEqual([0, -5, 3, 3, 0, 0, 0, 0]); // of the equal 3s, the lower indices win
    expect(three.tensorReports[0].keptFraction).toEqual([0.375]);
  });

  it('breadcrumbs drops the largest gamma and the smallest of each delta', async () => {
    const dir = tempDir();
    const base = f32Model(join(dir, 'base'), { w: Array(10).fill(0) });
    const e = f32Model(join(dir, 'e'), { w: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] });
    await merge({ merge_method: 'breadcrumbs', base_model: base, models: [{ model: e, parameters: { density: 0.5, gamma: 0.2 } }] }, { out: join(dir, 'o') });
    // N = 10, target 5, top 2, bottom 3: ranks 3..7 survive
    expect(values(join(dir, 'o'), 'w')).toEqual([0, 0, 0, 4, 5, 6, 7, 8, 0, 0]);
  });

  it('ties with l1 rescale matches the dropped mass', async () => {
    const dir = tempDir();
    const base = f32Model(join(dir, 'base'), { w: [0, 0, 0, 0] });
    const e = f32Model(join(dir, 'e'), { w: [4, 2, 1, 1] });
    await merge({ merge_method: 'ties', base_model: base, models: [{ model: e, parameters: { density: 0.5 } }], parameters: { rescale: true } }, { out: join(dir, 'o') });
    expect(values(join(dir, 'o'), 'w')).toEqual([Math.fround(4 * Math.fround(8 / 6)), Math.fround(2 * Math.fround(8 / 6)), 0, 0]);
  });

  it('warns when a density keeps nothing of a small tensor', async () => {
    const dir = tempDir();
    const base = f32Model(join(dir, 'base'), { w: [0, 0, 0] });
    const e = f32Model(join(dir, 'e'), { w: [1, 2, 3] });
    const report = await merge({ merge_method: 'ties', base_model: base, models: [{ model: e, parameters: { density: 0.2 } }] }, { out: join(dir, 'o') });
    expect(report.warnings.join('\n')).toMatch(/floor\(density × size\) = 0 drops every delta there \(first: "w", 3 elements\)/);
    expect(values(join(dir, 'o'), 'w')).toEqual([0, 0, 0]);
  });

  it('warns, once for all tensors, of a weight or lambda that is 0 in float32 (1e-50 was silent)', async () => {
    const dir = tempDir();
    const base = f32Model(join(dir, 'base'), { v: [1, 1], w: [0, 0, 0] });
    const e = f32Model(join(dir, 'e'), { v: [2, 2], w: [1, 2, 3] });
    const tiny = await merge({ merge_method: 'task_arithmetic', base_model: base, models: [{ model: e, parameters: { weight: 1e-50 } }] }, { out: join(dir, 'o1') });
    expect(tiny.warnings).toContain(`weight 1e-50 (0 in float32) for ${e} on 2 tensor(s) (first: "v"): it contributes nothing there`);
    expect(values(join(dir, 'o1'), 'w')).toEqual([0, 0, 0]);
    const still = await merge({ merge_method: 'task_arithmetic', base_model: base, models: [{ model: e }], parameters: { lambda: 0 } }, { out: join(dir, 'o2') });
    expect(still.warnings).toContain(`lambda 0 on 2 tensor(s) (first: "v"): the merged changes there are all zero, so they keep the base model's values`);
    expect(values(join(dir, 'o2'), 'v')).toEqual([1, 1]);
  });

  it('warns of a filter that matches no merged tensor (a typo fell through silently)', async () => {
    const dir = tempDir();
    const base = f32Model(join(dir, 'base'), { 'mlp.w': [0, 0], 'attn.w': [0, 0], other: [0, 0] });
    const e = f32Model(join(dir, 'e'), { 'mlp.w': [1, 2], 'attn.w': [1, 2], other: [1, 2] });
    const report = await merge({
      merge_method: 'task_arithmetic', base_model: base,
      models: [{ model: e, parameters: { weight: [{ filter: 'mpl', value: 0.5 }, { filter: 'attn', value: 2 }, { value: 1 }] } }],
      parameters: { lambda: [{ filter: '*', value: 1 }], normalize: [{ filter: 'mlp', value: false }, { filter: 'nowhere', value: true }] },
    }, { out: join(dir, 'o') });
    const filters = report.warnings.filter((w) => w.startsWith('filter '));
    expect(filters).toEqual([
      `filter "nowhere" of parameter "normalize" matches none of the 3 merged tensors' names, so its value is never used (a filter matches names containing it)`,
      `filter "mpl" of ${e}'s parameter "weight" matches none of the 3 merged tensors' names, so its value is never used (a filter matches names containing it)`,
    ]);
    expect(values(join(dir, 'o'), 'mlp.w')).toEqual([1, 2]); // the typo's 0.5 was not used
  });
});

describe('mergekit recipes in their documented style', () => {
  // The TIES example of mergekit's README, with local names for its models.
  const ties = `
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
`;
  const recipe = parseRecipe(ties, { resolvePath: (m) => `/models/${m}` });
  const L = 5; // layers 0..4: t = i / 4

  it('resolves gradients and filters per layer as SPEC §7 says', () => {
    const at = (name: string) => resolveTensorParams(recipe, name, L);
    const l0 = at('model.layers.0.mlp.up_proj.weight');
    expect(l0.experts.map((e) => e.density)).toEqual([1, 0.5, 0.33]);
    expect(l0.experts.map((e) => e.weight)).toEqual([1, 0, 0.5]);
    const l2 = at('model.layers.2.self_attn.q_proj.weight'); // t = 0.5
    expect(l2.experts[0].density).toBeCloseTo(0.7, 15); // s = 1: exactly the middle entry
    expect(l2.experts[1].weight).toBeCloseTo(0.3 + (0.7 - 0.3) * 0.5, 15); // s = 1.5
    expect(l2.experts[2].weight).toBe(0); // no "mlp" in the name: the fallback entry
    const l4 = at('model.layers.4.mlp.down_proj.weight'); // t = 1
    expect(l4.experts.map((e) => e.density)).toEqual([0.1, 0.5, 0.33]);
    expect(l4.experts.map((e) => e.weight)).toEqual([1, 1, 0.5]);
    const emb = at('model.embed_tokens.weight'); // outside the layers: t = 0
    expect(emb.experts.map((e) => e.weight)).toEqual([1, 0, 0]);
    expect(l0.normalize).toBe(true);
    expect(l0.rescale).toBe('none');
    expect(recipe.dtype).toBe('F16');
    expect(recipe.warnings.join()).toMatch(/int8_mask/);
  });

  it('a layer index needs the dot after it (SPEC §7): a name ending in ".N" is outside the layers', () => {
    expect(layerIndex('model.blocks.7')).toBeNull();
    expect(layerIndex('model.h.7.attn.weight')).toBe(7);
    expect(layerCount(['model.layers.0.w', 'model.layers.3.w', 'model.blocks.7'])).toBe(4);
  });

  it('slerp refuses a tensor that no entry of its t filter list matches', () => {
    const r = parseRecipe('merge_method: slerp\nbase_model: a\nmodels: [a, b]\nparameters:\n  t: [{filter: mlp, value: 0.3}]\n');
    expect(resolveTensorParams(r, 'model.layers.0.mlp.w', 2).t).toBe(0.3);
    expect(() => resolveTensorParams(r, 'model.norm.weight', 2)).toThrow(/"t" has no value for tensor "model.norm.weight"/);
  });

  it('a one-layer model reads gradients at t = 1', () => {
    expect(resolveTensorParams(recipe, 'model.layers.0.mlp.up_proj.weight', 1).experts[0].density).toBe(0.1);
  });

  it('the DELLA paper setting (drop rate 0.3, window 0.14, lambda 1.1)', () => {
    const r = parseRecipe(`
merge_method: della
base_model: meta-llama/Llama-2-13b-hf
models:
  - model: WizardLMTeam/WizardLM-13B-V1.2
    parameters: { weight: 1.0 }
  - model: vanillaOVO/WizardMath-13B-V1.0
    parameters: { weight: 1.0 }
  - model: layoric/llama-2-13b-code-alpaca
    parameters: { weight: 1.0 }
parameters:
  drop_rate: 0.3
  window_size: 0.14
  lambda: 1.1
`, { resolvePath: (m) => m });
    const p = resolveTensorParams(r, 'model.layers.3.mlp.up_proj.weight', 40);
    expect(p.experts.map((e) => e.density)).toEqual([0.7, 0.7, 0.7]);
    expect(p.experts[0].epsilon).toBeCloseTo(0.07, 15);
    expect(p.lambda).toBe(1.1);
    expect(p.consensus).toBe('sum');
    expect(p.rescale).toBe('inverse');
  });
});

describe('refusals of the methods issue', () => {
  const base = 'merge_method: {m}\nbase_model: b\nmodels:\n  - model: e\n    parameters: {p}\n  - model: f\nparameters: {g}\n';
  const cases: Array<[string, string, string, string, RegExp]> = [
    ['ties', '{density: 0.5}', '{rescale: inverse}', 'inverse rescale without a keep probability', /rescale "inverse" .* needs a keep probability/],
    ['slerp', '{}', '{}', 'slerp with two models besides the base', /slerp interpolates between two models/],
    ['breadcrumbs', '{gamma: -0.1}', '{}', 'negative gamma', /gamma.* must be in \[0, 1\)/],
    ['ties', '{epsilon: 0.1}', '{}', 'epsilon for ties', /parameter "epsilon" is not used by merge_method "ties"/],
    ['linear', '{density: 0.5}', '{}', 'density for linear', /parameter "density" is not used by merge_method "linear"/],
    ['task_arithmetic', '{weight: .nan}', '{}', 'NaN weight', /weight.* must be a finite number/],
    ['della', '{density: 0.5, epsilon: 0.6}', '{}', 'a window outside (0, 1]', /epsilon/],
    ['ties', '{density: 0}', '{}', 'density 0', /density.* must be in \(0, 1\]/],
    ['ties', '{}', '{lambda: .inf}', 'infinite lambda', /lambda.* must be a finite number/],
    ['della', '{lambda: 2}', '{}', 'lambda per model', /"lambda" is global-only/],
  ];
  for (const [m, p, g, label, message] of cases) {
    it(label, () => {
      const text = base.replace('{m}', m).replace('{p}', p).replace('{g}', g);
      expect(() => parseRecipe(text, { resolvePath: (x) => x })).toThrow(message);
    });
  }
  it('slerp without t', () => {
    expect(() => parseRecipe('merge_method: slerp\nbase_model: a\nmodels: [a, b]\n')).toThrow(/slerp needs the global parameter "t"/);
  });
  it('an unknown method with a suggestion, through the CLI, leaves no output', () => {
    const dir = tempDir();
    const r = cli(['run', writeRecipe(join(dir, 'r.yaml'), { merge_method: 'breadcrumb', base_model: dir, models: [{ model: dir }] }), '--out', join(dir, 'o')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/did you mean "breadcrumbs"/);
    expect(existsSync(join(dir, 'o'))).toBe(false);
  });
});

describe('Hugging Face hub ids from the local cache', () => {
  it('resolves org/name and org/name@revision through refs and snapshots, offline', async () => {
    const dir = tempDir();
    const models = makeModels(rng(seed), join(dir, 'src'), { dtype: 'BF16', experts: 1 }); // the base sharded, with an index
    expect(existsSync(join(models.base, 'model.safetensors.index.json'))).toBe(true);
    const cache = join(dir, 'hub');
    // As huggingface_hub lays a repository out: the files in blobs/, and each snapshot's
    // files links to them (snapshots/REV/FILE -> ../../blobs/HASH).
    const put = (id: string, from: string, refs: Record<string, string>) => {
      const repo = join(cache, `models--${id.replace('/', '--')}`);
      mkdirSync(join(repo, 'blobs'), { recursive: true });
      for (const [ref, commit] of Object.entries(refs)) {
        mkdirSync(join(repo, 'refs'), { recursive: true });
        writeFileSync(join(repo, 'refs', ref), `${commit}\n`);
        mkdirSync(join(repo, 'snapshots', commit), { recursive: true });
        for (const file of readdirSync(from)) {
          const blob = `${commit.slice(0, 8)}-${file}`;
          copyFileSync(join(from, file), join(repo, 'blobs', blob));
          symlinkSync(join('..', '..', 'blobs', blob), join(repo, 'snapshots', commit, file));
        }
      }
    };
    put('acme/base-7b', models.base, { main: 'a'.repeat(40) });
    put('acme/expert-7b', models.experts[0], { main: 'b'.repeat(40), v2: 'c'.repeat(40) });
    const recipe = writeRecipe(join(dir, 'r.yaml'), {
      merge_method: 'della', base_model: 'acme/base-7b',
      models: [{ model: 'acme/expert-7b@v2', parameters: { density: 0.5, epsilon: 0.1 } }],
    });
    const ok = cli(['run', recipe, '--out', join(dir, 'o'), '-q'], { HF_HUB_CACHE: cache });
    expect(ok.code, ok.stderr).toBe(0);
    expect(readme(join(dir, 'o'))).toContain('base_model: "acme/base-7b"');
    const missing = cli(['run', writeRecipe(join(dir, 'm.yaml'), { merge_method: 'della', base_model: 'acme/base-7b', models: [{ model: 'acme/missing' }] }), '--out', join(dir, 'o2')], { HF_HUB_CACHE: cache });
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain(join(cache, 'models--acme--missing', 'snapshots', 'main'));
    expect(missing.stderr).toMatch(/never downloads/);
    expect(existsSync(join(dir, 'o2'))).toBe(false);
  });
});

describe('run --dry-run', () => {
  it('prints the plan without writing, per tensor and in totals', () => {
    const dir = tempDir();
    const models = makeModels(rng(seed + 1), dir, { dtype: 'BF16', experts: 2 });
    const recipe = writeRecipe(join(dir, 'r.yaml'), {
      merge_method: 'della', base_model: models.base,
      models: models.experts.map((m) => ({ model: m, parameters: { density: [0.3, 0.6], epsilon: 0.1 } })),
    });
    const r = cli(['run', recipe, '--dry-run']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/model\.layers\.0\.mlp\.down_proj\.weight +merge +BF16 +\[\d+, \d+\] +weight=\[1, 1\] density=\[0\.3, 0\.3\] epsilon=\[0\.1, 0\.1\] lambda=1/);
    expect(r.stdout).toMatch(/model\.position_ids +copy +I64/);
    expect(r.stdout).toMatch(/totals +\d+ tensors \(\d+ merged, 1 copied\), [\d,]+ parameters .* would read .* and write/);
    const j = JSON.parse(cli(['run', recipe, '--dry-run', '--json']).stdout);
    expect(j.tensors.find((t: { name: string }) => t.name === 'model.norm.weight').parameters.experts[0].density).toBe(0.3);
    expect(existsSync(join(dir, 'merged'))).toBe(false);
    // The run's options are checked and planned too: --seed, --part (that part's tensors).
    const whole = j.tensors.length;
    const p = JSON.parse(cli(['run', recipe, '--dry-run', '--json', '--seed', '77', '--part', '1/2']).stdout);
    expect([p.seed, p.part]).toEqual([77, '1/2']);
    expect(p.tensors.length).toBeLessThan(whole);
    expect(p.totals.tensors).toBe(p.tensors.length);
    for (const [args, message] of [
      [['--seed', 'abc'], /--seed must be an integer/], [['--threads', '0'], /--threads must be an integer from 1/],
      [['--part', '9/2'], /part 9\/2 is not valid/], [['--shard-size', '-5'], /--shard-size/],
      [['--part', '1/2', '--verify'], /--verify checks a whole merge/], [['--report', join(recipe, 'r.json')], /is not a directory/],
      [['--out', dir], /already exists \(pass --overwrite/], [['--out', dir, '--overwrite'], /an input of this merge/],
    ] as Array<[string[], RegExp]>) {
      const bad = cli(['run', recipe, '--dry-run', ...args]);
      expect(bad.code, args.join(' ')).not.toBe(0);
      expect(bad.stderr).toMatch(message);
      expect(bad.stderr).not.toMatch(/ambiguous/);
    }
  });
});

function readme(dir: string): string {
  return spawnSync('cat', [join(dir, 'README.md')], { encoding: 'utf8' }).stdout;
}
