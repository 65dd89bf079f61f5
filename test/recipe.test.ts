/**
 * Recipe parsing, validation and per-tensor resolution (SPEC §7). parseRecipe gets a
 * fake resolver so nothing touches the filesystem except the loadRecipe tests.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DellaError } from '../lib/errors.js';
import {
  layerCount,
  layerIndex,
  loadRecipe,
  parseRecipe,
  resolveTensorParams,
  validateParam,
  type Recipe,
} from '../lib/recipe/index.js';
import { resolveHubId } from '../lib/recipe/hub.js';

const resolvePath = (m: string): string => '/models/' + m;
const parse = (text: string): Recipe => parseRecipe(text, { resolvePath });

/** A minimal recipe around the given models/parameters YAML fragments. */
function recipe(opts: { method?: string; models?: string; params?: string; extra?: string } = {}): string {
  const models = opts.models ?? '  - model: a\n  - model: b\n';
  return (
    `merge_method: ${opts.method ?? 'della'}\nbase_model: base\nmodels:\n${models}` +
    (opts.params !== undefined ? `parameters:\n${opts.params}` : '') +
    (opts.extra ?? '')
  );
}

function refuse(text: string, ...fragments: string[]): DellaError {
  let err: unknown;
  try {
    parse(text);
  } catch (e) {
    err = e;
  }
  expect(err, `expected an error for:\n${text}`).toBeInstanceOf(DellaError);
  const e = err as DellaError;
  expect(e.code).toBe('E_RECIPE');
  for (const f of fragments) expect(e.message).toContain(f);
  return e;
}

const DELLA_YAML = `
models:
  - model: ./experts/math        # local path
    parameters:
      weight: 1.0
      density: 0.5
      epsilon: 0.1
  - model: ./experts/code
    parameters:
      weight: [0, 0.5, 1]
      density:
        - filter: mlp
          value: 0.6
        - value: 0.4
  - model: ./base
merge_method: della
base_model: ./base
parameters:
  lambda: 1.1
  normalize: true
  int8_mask: true
dtype: bfloat16
out_dtype: float16
tokenizer_source: base
seed: 42
`;

const DELLA_OBJECT = {
  models: [
    { model: './experts/math', parameters: { weight: 1.0, density: 0.5, epsilon: 0.1 } },
    {
      model: './experts/code',
      parameters: { weight: [0, 0.5, 1], density: [{ filter: 'mlp', value: 0.6 }, { value: 0.4 }] },
    },
    { model: './base' },
  ],
  merge_method: 'della',
  base_model: './base',
  parameters: { lambda: 1.1, normalize: true, int8_mask: true },
  dtype: 'bfloat16',
  out_dtype: 'float16',
  tokenizer_source: 'base',
  seed: 42,
};

const LINEAR_YAML = `
merge_method: della_linear
base_model: {model: base}
models:
  - model: m1
    parameters: {weight: 0.7, window_size: 0.2}
  - m2
parameters:
  density: [0.4, 0.8]
  epsilon: 0.05
  rescale: false
dtype: fp32
`;

const LINEAR_OBJECT = {
  merge_method: 'della_linear',
  base_model: { model: 'base' },
  models: [{ model: 'm1', parameters: { weight: 0.7, window_size: 0.2 } }, 'm2'],
  parameters: { density: [0.4, 0.8], epsilon: 0.05, rescale: false },
  dtype: 'fp32',
};

describe('parseRecipe: layout', () => {
  it('parses the della example into the documented Recipe', () => {
    const r = parse(DELLA_YAML);
    expect(r.source).toBeNull();
    expect(r.mergeMethod).toBe('della');
    expect(r.baseModel).toEqual({ model: './base', path: '/models/./base' });
    expect(r.models.map((m) => m.model)).toEqual(['./experts/math', './experts/code']);
    expect(r.models[0]).toEqual({
      model: './experts/math',
      path: '/models/./experts/math',
      parameters: { weight: 1, density: 0.5, epsilon: 0.1 },
    });
    expect(r.models[1].parameters).toEqual({
      weight: [0, 0.5, 1],
      density: [{ filter: 'mlp', value: 0.6 }, { value: 0.4 }],
    });
    expect(r.parameters).toEqual({ lambda: 1.1, normalize: true });
    expect(r.dtype).toBe('BF16');
    expect(r.outDtype).toBe('F16');
    expect(r.tokenizerSource).toBe('base');
    expect(r.seed).toBe(42);
    expect(r.warnings).toHaveLength(1);
    expect(r.warnings[0]).toContain('int8_mask');
    expect(r.document).toEqual(DELLA_OBJECT);
  });

  it('gives equal Recipes for YAML and JSON (della and della_linear)', () => {
    expect(parse(JSON.stringify(DELLA_OBJECT))).toEqual(parse(DELLA_YAML));
    expect(parse(JSON.stringify(DELLA_OBJECT, null, 2))).toEqual(parse(DELLA_YAML));
    const lin = parse(LINEAR_YAML);
    expect(parse(JSON.stringify(LINEAR_OBJECT))).toEqual(lin);
    expect(lin.mergeMethod).toBe('della_linear');
    expect(lin.baseModel.model).toBe('base');
    expect(lin.models.map((m) => m.model)).toEqual(['m1', 'm2']);
    expect(lin.models[0].parameters).toEqual({ weight: 0.7, epsilon: 0.1 });
    expect(lin.models[1].parameters).toEqual({});
    expect(lin.dtype).toBe('F32');
    expect(lin.outDtype).toBeNull();
  });

  it('skips the base model listed among models, by string or by resolved path', () => {
    const r = parse(recipe({ models: '  - model: base\n  - model: a\n  - model: ./base\n' }));
    expect(r.models.map((m) => m.model)).toEqual(['a', './base']);
    const same = parseRecipe(recipe({ models: '  - model: ./base\n  - model: a\n' }), {
      resolvePath: (m) => '/m/' + m.replace(/^\.\//, ''),
    });
    expect(same.models.map((m) => m.model)).toEqual(['a']);
    const warned = parse(recipe({ models: '  - model: base\n    parameters: {weight: 3}\n  - model: a\n' }));
    expect(warned.models).toHaveLength(1);
    expect(warned.warnings.join('\n')).toContain('is the base model; its parameters are ignored');
  });

  it('keeps the source and the parsed document', () => {
    const r = parseRecipe(recipe(), { resolvePath, source: '/tmp/r.yml' });
    expect(r.source).toBe('/tmp/r.yml');
    expect(r.document).toMatchObject({ merge_method: 'della', base_model: 'base' });
  });

  it('maps dtype names', () => {
    const cases: Array<[string, string]> = [
      ['bfloat16', 'BF16'], ['bf16', 'BF16'], ['BF16', 'BF16'],
      ['float16', 'F16'], ['fp16', 'F16'], ['half', 'F16'], ['F16', 'F16'],
      ['float32', 'F32'], ['fp32', 'F32'], ['float', 'F32'], ['F32', 'F32'],
      ['float64', 'F64'], ['fp64', 'F64'], ['double', 'F64'], ['F64', 'F64'],
    ];
    for (const [name, dt] of cases) {
      expect(parse(recipe({ extra: `dtype: ${name}\nout_dtype: ${name}\n` })).dtype).toBe(dt);
      expect(parse(recipe({ extra: `out_dtype: ${name}\n` })).outDtype).toBe(dt);
    }
  });

  it('accepts seeds in [0, 2^53) and tokenizer_source naming a model', () => {
    expect(parse(recipe()).seed).toBe(0);
    expect(parse(recipe({ extra: 'seed: 0\n' })).seed).toBe(0);
    expect(parse(recipe({ extra: `seed: ${2 ** 53 - 1}\n` })).seed).toBe(2 ** 53 - 1);
    expect(parse(recipe({ extra: 'tokenizer_source: b\n' })).tokenizerSource).toBe('b');
    expect(parse(recipe({ extra: 'tokenizer_source: base\n' })).tokenizerSource).toBe('base');
    expect(parse(recipe({ extra: 'name: my-merge\n' })).tokenizerSource).toBeNull();
  });
});

describe('layers', () => {
  it('finds the layer index as a dotted path component', () => {
    expect(layerIndex('model.layers.12.mlp.up_proj.weight')).toBe(12);
    expect(layerIndex('layers.0.attention.wq.weight')).toBe(0);
    expect(layerIndex('transformer.h.3.attn.c_attn.weight')).toBe(3);
    expect(layerIndex('blocks.7.norm.weight')).toBe(7);
    expect(layerIndex('bert.encoder.layer.5.output.dense.weight')).toBe(5);
    expect(layerIndex('encoder.block.2.layer.1.weight')).toBe(2);
    expect(layerIndex('model.embed_tokens.weight')).toBeNull();
    expect(layerIndex('model.norm.weight')).toBeNull();
    expect(layerIndex('model.sublayers.3.weight')).toBeNull();
    expect(layerIndex('xh.3.weight')).toBeNull();
    expect(layerIndex('model.layers.x.weight')).toBeNull();
  });

  it('counts layers as 1 + the largest index', () => {
    expect(layerCount(['model.embed_tokens.weight', 'model.layers.0.a', 'model.layers.31.b', 'model.layers.4.c'])).toBe(32);
    expect(layerCount(['model.layers.0.a'])).toBe(1);
    expect(layerCount(['lm_head.weight', 'model.norm.weight'])).toBe(0);
    expect(layerCount([])).toBe(0);
    expect(layerCount(new Set(['h.2.x']))).toBe(3);
  });
});

describe('resolveTensorParams', () => {
  it('fills defaults from SPEC §7 and the method table', () => {
    const r = parse(recipe());
    expect(resolveTensorParams(r, 'model.layers.0.mlp.weight', 4)).toEqual({
      experts: [
        { weight: 1, density: 1, epsilon: 0.15, gamma: 0.01 },
        { weight: 1, density: 1, epsilon: 0.15, gamma: 0.01 },
      ],
      lambda: 1,
      normalize: true,
      consensus: 'sum',
      rescale: 'inverse',
      t: 0.5,
    });
    const lin = resolveTensorParams(parse(recipe({ method: 'della_linear' })), 'x', 0);
    expect([lin.normalize, lin.consensus, lin.rescale]).toEqual([false, 'none', 'inverse']);
    const ta = resolveTensorParams(parse(recipe({ method: 'task_arithmetic' })), 'x', 0);
    expect([ta.normalize, ta.consensus, ta.rescale]).toEqual([false, 'none', 'none']);
    const dt = resolveTensorParams(parse(recipe({ method: 'dare_ties' })), 'x', 0);
    expect([dt.normalize, dt.consensus, dt.rescale]).toEqual([false, 'sum', 'inverse']);
  });

  it('sets global knobs: lambda, normalize, consensus, rescale', () => {
    const r = parse(recipe({ params: '  lambda: -0.5\n  normalize: false\n  consensus: count\n  rescale: false\n' }));
    const p = resolveTensorParams(r, 'w', 0);
    expect([p.lambda, p.normalize, p.consensus, p.rescale]).toEqual([-0.5, false, 'count', 'none']);
    expect(resolveTensorParams(parse(recipe({ params: '  consensus: null\n' })), 'w', 0).consensus).toBe('none');
    expect(resolveTensorParams(parse(recipe({ params: '  consensus: false\n' })), 'w', 0).consensus).toBe('none');
    expect(resolveTensorParams(parse(recipe({ params: '  rescale: inverse\n' })), 'w', 0).rescale).toBe('inverse');
    expect(resolveTensorParams(parse(recipe({ method: 'dare_linear', params: '  rescale: true\n' })), 'w', 0).rescale).toBe(
      'inverse',
    );
  });

  it('lets per-model values override global ones, which override defaults', () => {
    const r = parse(
      recipe({
        models: '  - model: a\n    parameters: {weight: 0.3, density: 0.6}\n  - model: b\n',
        params: '  weight: 0.5\n  density: 0.8\n  epsilon: 0.1\n',
      }),
    );
    const p = resolveTensorParams(r, 'model.layers.1.x', 2);
    expect(p.experts[0]).toEqual({ weight: 0.3, density: 0.6, epsilon: 0.1, gamma: 0.01 });
    expect(p.experts[1]).toEqual({ weight: 0.5, density: 0.8, epsilon: 0.1, gamma: 0.01 });
  });

  it('reads gradients at the layer position, t = 0 outside the layers, t = 1 when L = 1', () => {
    const r = parse(recipe({ models: '  - model: a\n    parameters: {weight: [0, 0.5, 1]}\n  - model: b\n    parameters: {weight: [2]}\n' }));
    const w = (name: string, L: number): number => resolveTensorParams(r, name, L).experts[0].weight;
    expect([0, 1, 2, 3, 4].map((i) => w(`model.layers.${i}.mlp.weight`, 5))).toEqual([0, 0.25, 0.5, 0.75, 1]);
    expect(w('model.embed_tokens.weight', 5)).toBe(0);
    expect(w('lm_head.weight', 5)).toBe(0);
    expect(w('model.layers.0.mlp.weight', 1)).toBe(1);
    expect(w('model.norm.weight', 1)).toBe(0);
    // beyond the last layer clamps to the last entry
    expect(w('model.layers.9.mlp.weight', 5)).toBe(1);
    // a one-entry gradient is constant
    for (const n of ['model.layers.0.x', 'model.layers.4.x', 'model.norm.weight']) {
      expect(resolveTensorParams(r, n, 5).experts[1].weight).toBe(2);
    }
  });

  it('interpolates in binary64 as a + (b - a)(s - i)', () => {
    const g = [0.1, 0.7, 0.2, 0.9];
    const r = parse(recipe({ params: `  weight: [${g.join(', ')}]\n  lambda: [1, 3]\n` }));
    const L = 7;
    for (let li = 0; li < L; li++) {
      const t = li / (L - 1);
      const s = t * (g.length - 1);
      const i = Math.floor(s);
      const want = i >= g.length - 1 ? g[g.length - 1] : g[i] + (g[i + 1] - g[i]) * (s - i);
      const p = resolveTensorParams(r, `transformer.h.${li}.attn.weight`, L);
      expect(p.experts[0].weight).toBe(want);
      expect(p.experts[1].weight).toBe(want);
      expect(p.lambda).toBe(1 + 2 * t);
    }
  });

  it('picks the first matching filter and falls through to global, then default', () => {
    const r = parse(
      recipe({
        models:
          '  - model: a\n    parameters:\n      density:\n        - {filter: mlp, value: 0.6}\n        - {filter: up_proj, value: 0.9}\n' +
          '  - model: b\n    parameters:\n      density:\n        - {filter: attn, value: 0.7}\n        - {value: 0.5}\n',
        params: '  density:\n    - {filter: self_attn, value: 0.3}\n  epsilon: 0.05\n',
      }),
    );
    const d = (name: string): number[] => resolveTensorParams(r, name, 2).experts.map((e) => e.density);
    expect(d('model.layers.0.mlp.up_proj.weight')).toEqual([0.6, 0.5]);
    expect(d('model.layers.0.self_attn.q_proj.weight')).toEqual([0.3, 0.7]);
    expect(d('model.norm.weight')).toEqual([1, 0.5]);
  });

  it('reads a gradient inside a filter entry', () => {
    const r = parse(
      recipe({ params: '  weight:\n    - filter: mlp\n      value: [0, 1]\n    - value: 5\n' }),
    );
    expect(resolveTensorParams(r, 'model.layers.3.mlp.w', 5).experts[0].weight).toBe(0.75);
    expect(resolveTensorParams(r, 'model.layers.3.attn.w', 5).experts[0].weight).toBe(5);
  });

  it('checks density +- epsilon per tensor when it depends on the tensor', () => {
    const r = parse(recipe({ models: '  - model: a\n    parameters: {density: [0.5, 0.1]}\n  - model: b\n' }));
    expect(resolveTensorParams(r, 'model.layers.0.x', 3).experts[0].density).toBe(0.5);
    expect(() => resolveTensorParams(r, 'model.layers.2.mlp.weight', 3)).toThrow(
      /model "a": density 0\.1 and epsilon 0\.15 .*tensor "model\.layers\.2\.mlp\.weight"/,
    );
    try {
      resolveTensorParams(r, 'model.layers.2.mlp.weight', 3);
    } catch (e) {
      expect((e as DellaError).code).toBe('E_RECIPE');
    }
    // density 1 leaves the delta unchanged: epsilon is not checked
    const full = parse(recipe({ params: '  density: 1\n  epsilon: 0.5\n' }));
    expect(resolveTensorParams(full, 'w', 0).experts[0]).toMatchObject({ density: 1, epsilon: 0.5 });
    // epsilon does not matter for dare
    const dare = parse(recipe({ method: 'dare_ties', params: '  density: 0.05\n' }));
    expect(resolveTensorParams(dare, 'w', 0).experts[0].density).toBe(0.05);
  });
});

describe('aliases', () => {
  it('rewrites window_size = 2 epsilon and drop_rate = 1 - density everywhere', () => {
    const r = parse(
      recipe({
        models:
          '  - model: a\n    parameters: {window_size: 0.2, drop_rate: 0.3}\n' +
          '  - model: b\n    parameters:\n      drop_rate: [0.5, 0.25]\n      window_size:\n        - {filter: mlp, value: [0.1, 0.3]}\n',
        params: '  drop_rate: 0.4\n',
      }),
    );
    expect(r.models[0].parameters).toEqual({ epsilon: 0.1, density: 1 - 0.3 });
    expect(r.models[1].parameters).toEqual({
      density: [0.5, 0.75],
      epsilon: [{ filter: 'mlp', value: [0.05, 0.15] }],
    });
    expect(r.parameters).toEqual({ density: 1 - 0.4 });
  });

  it('refuses an alias together with its target', () => {
    refuse(recipe({ models: '  - model: a\n    parameters: {density: 0.5, drop_rate: 0.5}\n' }), 'model "a"', '"density"', '"drop_rate"');
    refuse(recipe({ params: '  window_size: 0.1\n  epsilon: 0.1\n' }), 'global parameters', '"window_size"', '"epsilon"');
  });

  it('refuses an alias whose target the method does not use', () => {
    refuse(recipe({ method: 'dare_ties', params: '  window_size: 0.1\n' }), 'parameter "window_size"', 'is not used by merge_method "dare_ties"');
  });

  it('refuses out-of-range alias values, naming the alias', () => {
    refuse(recipe({ params: '  drop_rate: 1\n' }), 'parameter "drop_rate"', 'in [0, 1)', 'got 1');
    refuse(recipe({ params: '  window_size: -0.2\n' }), 'parameter "window_size"', '>= 0', 'got -0.2');
  });
});

describe('refusals', () => {
  it('unknown top-level key, with a suggestion', () => {
    refuse(recipe({ extra: 'merge_methd: della\n' }), 'unknown key "merge_methd" at the top level (did you mean "merge_method"?)');
    refuse(recipe({ extra: 'base_modle: x\n' }), 'did you mean "base_model"?');
  });

  it('slices', () => {
    refuse(recipe({ extra: 'slices:\n  - sources: []\n' }), 'slices', 'not supported', 'models');
  });

  it('mergekit keys della-merge has no use for say why, not "unknown key"', () => {
    refuse(recipe({ extra: 'chat_template: chatml\n' }), '"chat_template" is not supported', 'copied from tokenizer_source or the base model');
    refuse(recipe({ extra: 'modules: {}\n' }), '"modules" is not supported', 'per-module');
    refuse(recipe({ extra: 'normalize: true\n' }), '"normalize" is a parameter, not a top-level key: put it under "parameters:"');
    refuse(recipe({ extra: 'density: 0.5\n' }), '"density" is a parameter, not a top-level key');
    refuse(recipe({ params: '  dtype: float16\n' }), 'global parameters: "dtype" is a top-level key, not a parameter');
    refuse(recipe({ models: '  - model: a\n    parameters: {out_dtype: float16}\n' }), 'model "a": "out_dtype" is a top-level key');
    refuse(recipe({ extra: 'tokenizer_source: union\n' }), '"union", mergekit\'s merged vocabulary, is not supported');
    refuse(recipe({ extra: 'tokenizer: {source: base, tokens: {}}\n' }), 'tokenizer.tokens is not supported');
    refuse(recipe({ extra: 'tokenizer: {source: a}\ntokenizer_source: a\n' }), 'give the tokenizer source once');
    refuse(recipe({ extra: 'tokenizer: base\n' }), 'tokenizer must be a mapping {source: ...}, got "base"');
    refuse(recipe({ extra: 'tokenizer: {source: c}\n' }), 'tokenizer.source "c" must be "base" or one of the models');
    refuse(recipe({ models: '  - model: {model: a, lora: l}\n' }), 'models[0].model names a LoRA adapter ("lora")', 'merge_and_unload');
    refuse(`${recipe()}---\nfoo: 1\n`, 'a recipe file holds one YAML document, and this one holds several');
  });

  it('mergekit\'s other spellings: tokenizer: {source}, booleans as 1.0 or yes, torch dtypes', () => {
    expect(parse(recipe({ extra: 'tokenizer: {source: a}\n' })).tokenizerSource).toBe('a');
    expect(parse(recipe({ extra: 'tokenizer: {source: base}\n' })).tokenizerSource).toBe('base');
    for (const [v, want] of [['1.0', true], ['0.0', false], ['1', true], ['yes', true], ['Off', false], ['TRUE', true], ['no', false]] as const) {
      expect(resolveTensorParams(parse(recipe({ params: `  normalize: ${v}\n` })), 'w', 0).normalize, v).toBe(want);
    }
    for (const v of ['2', '0.5', 'y', 'n', 'nope']) refuse(recipe({ params: `  normalize: ${v}\n` }), 'parameter "normalize"', 'true or false');
    expect(resolveTensorParams(parse(recipe({ params: '  rescale: off\n' })), 'w', 0).rescale).toBe('none');
    expect(resolveTensorParams(parse(recipe({ params: '  rescale: 1.0\n' })), 'w', 0).rescale).toBe('inverse');
    expect(parse(recipe({ extra: 'dtype: torch.bfloat16\nout_dtype: torch.float16\n' }))).toMatchObject({ dtype: 'BF16', outDtype: 'F16' });
  });

  it('merge_method: missing, unknown with a suggestion', () => {
    refuse('base_model: b\nmodels: [a]\n', 'merge_method is missing');
    refuse(recipe({ method: 'dela' }), 'unknown merge_method "dela"', '(did you mean "della"?)');
    refuse(recipe({ method: 'dare-ties' }), 'did you mean "dare_ties"?');
    refuse(recipe({ method: 'brekadcrumbs' }), 'did you mean "breadcrumbs"?');
  });

  it('missing base_model, empty or missing models, no expert besides the base', () => {
    refuse('merge_method: della\nmodels: [a]\n', 'base_model is missing');
    refuse('merge_method: della\nbase_model: b\nmodels: []\n', 'models must be a non-empty list');
    refuse('merge_method: della\nbase_model: b\n', 'models must be a non-empty list');
    refuse('merge_method: della\nbase_model: b\nmodels: [b]\n', 'no expert besides the base model "b"');
    refuse('merge_method: della\nbase_model: b\nmodels: [{model: a, paramters: {}}]\n', 'models[0]', 'unknown key "paramters"', 'did you mean "parameters"?');
    refuse('merge_method: della\nbase_model: b\nmodels: [{parameters: {}}]\n', 'models[0] has no "model"');
    refuse('merge_method: della\nbase_model: 3\nmodels: [a]\n', 'base_model must be a model path');
  });

  it('unknown parameter, with a suggestion', () => {
    refuse(recipe({ models: '  - model: a\n    parameters: {densty: 0.5}\n' }), 'model "a"', 'unknown parameter "densty"', 'did you mean "density"?');
    refuse(recipe({ params: '  lamda: 2\n' }), 'global parameters', 'unknown parameter "lamda"', 'did you mean "lambda"?');
    refuse(recipe({ params: '  constructor: 2\n' }), 'unknown parameter "constructor"');
    refuse('{"merge_method": "della", "__proto__": {"x": 1}}', 'unknown key "__proto__"');
  });

  it('a parameter the method does not use', () => {
    refuse(recipe({ params: '  gamma: 0.1\n' }), 'parameter "gamma" is not used by merge_method "della"');
    refuse(recipe({ models: '  - model: a\n    parameters: {gamma: 0.1}\n' }), 'model "a"', 'parameter "gamma" is not used by merge_method "della"');
    refuse(recipe({ method: 'dare_ties', models: '  - model: a\n    parameters: {epsilon: 0.1}\n' }), 'parameter "epsilon" is not used by merge_method "dare_ties"');
    refuse(recipe({ method: 'task_arithmetic', params: '  density: 0.5\n' }), 'parameter "density" is not used by merge_method "task_arithmetic"');
    refuse(recipe({ params: '  t: 0.5\n' }), 'parameter "t" is not used by merge_method "della"');
    refuse(recipe({ method: 'task_arithmetic', params: '  rescale: true\n' }), 'parameter "rescale" is not used by merge_method "task_arithmetic"');
  });

  it('a global-only parameter given per model', () => {
    for (const p of ['lambda: 1', 'normalize: true', 'rescale: true', 'consensus: sum', 'int8_mask: true']) {
      const name = p.split(':')[0];
      refuse(recipe({ models: `  - model: ./x/a\n    parameters: {${p}}\n` }), 'model "./x/a"', `parameter "${name}"`, 'global');
    }
  });

  it('density outside (0, 1]', () => {
    refuse(recipe({ models: '  - model: a\n    parameters: {density: 0}\n' }), 'model "a"', 'parameter "density"', 'in (0, 1]', 'got 0');
    refuse(recipe({ models: '  - model: a\n    parameters: {density: 1.5}\n' }), 'model "a"', 'parameter "density"', 'got 1.5');
    refuse(recipe({ params: '  density: [0.5, -0.1]\n' }), 'global parameters', '"density" (gradient entry 2)', 'got -0.1');
    refuse(recipe({ params: '  density:\n    - {filter: mlp, value: 2}\n' }), '"density" (filter entry 1)', 'got 2');
  });

  it('epsilon pushing density +- epsilon outside (0, 1]', () => {
    refuse(recipe({ models: '  - model: a\n    parameters: {density: 0.1}\n' }), 'model "a"', 'density 0.1', 'epsilon 0.15', 'density - epsilon > 0');
    refuse(recipe({ models: '  - model: a\n    parameters: {density: 0.9, epsilon: 0.2}\n' }), 'model "a"', 'density 0.9', 'epsilon 0.2', 'density + epsilon <= 1');
    refuse(recipe({ params: '  density: 0.5\n  epsilon: 0.5\n' }), 'model "a"', 'density 0.5', 'epsilon 0.5');
    refuse(recipe({ models: '  - model: a\n    parameters: {epsilon: -0.1}\n' }), 'model "a"', 'parameter "epsilon"', '>= 0', 'got -0.1');
    // the same values are fine for a method without epsilon
    expect(parse(recipe({ method: 'dare_linear', models: '  - model: a\n    parameters: {density: 0.1}\n' })).models).toHaveLength(1);
  });

  it('gamma outside [0, 1)', () => {
    refuse(recipe({ params: '  gamma: -0.1\n' }), 'parameter "gamma" is not used by merge_method "della"');
    refuse(recipe({ method: 'breadcrumbs', params: '  gamma: -0.1\n' }), 'parameter "gamma" must be in [0, 1), got -0.1');
    expect(() => validateParam('gamma', -0.1, 'model "a"')).toThrow(/model "a": parameter "gamma" must be in \[0, 1\), got -0\.1/);
    expect(() => validateParam('gamma', 1)).toThrow(/got 1$/);
    expect(() => validateParam('gamma', [0.1, -0.5])).toThrow(/gradient entry 2/);
    expect(validateParam('gamma', 0)).toBe(0);
    expect(validateParam('gamma', [{ filter: 'mlp', value: 0.5 }])).toEqual([{ filter: 'mlp', value: 0.5 }]);
    expect(validateParam('drop_rate', 0.25)).toBe(0.75);
    expect(() => validateParam('gama', 0.1)).toThrow(/did you mean "gamma"/);
  });

  it('non-finite or non-numeric weight', () => {
    refuse(recipe({ models: '  - model: a\n    parameters: {weight: .nan}\n' }), 'model "a"', 'parameter "weight"', 'finite number', 'got NaN');
    refuse(recipe({ models: '  - model: a\n    parameters: {weight: .inf}\n' }), 'got Infinity');
    refuse(recipe({ models: '  - model: a\n    parameters: {weight: -.inf}\n' }), 'got -Infinity');
    refuse(recipe({ models: '  - model: a\n    parameters: {weight: "1.0"}\n' }), 'parameter "weight"', 'got "1.0"');
    refuse(recipe({ models: '  - model: a\n    parameters: {weight: [1, x]}\n' }), '(gradient entry 2)', 'got "x"');
    refuse(recipe({ models: '  - model: a\n    parameters: {weight: []}\n' }), 'empty list');
    refuse(recipe({ models: '  - model: a\n    parameters: {weight: {value: 1}}\n' }), 'must be a scalar, a gradient');
    refuse(recipe({ params: '  lambda: .nan\n' }), 'parameter "lambda"', 'got NaN');
  });

  it('bad knob values', () => {
    refuse(recipe({ params: '  normalize: 2\n' }), 'parameter "normalize"', 'true or false', 'got 2'); // (1 and 0 are mergekit's true and false)
    refuse(recipe({ params: '  normalize: [true]\n' }), 'parameter "normalize"', 'cannot be a gradient');
    refuse(recipe({ params: '  consensus: majority\n' }), 'parameter "consensus"', 'got "majority"');
    refuse(recipe({ params: '  rescale: l3\n' }), 'parameter "rescale"', 'must be true, false, "inverse", "l1", "l2" or "linf"');
    refuse(recipe({ params: '  rescale: 2\n' }), 'parameter "rescale"', 'got 2');
    refuse(recipe({ params: '  density:\n    - {filtr: mlp, value: 0.5}\n' }), 'unknown key "filtr"', 'did you mean "filter"?');
    refuse(recipe({ params: '  density:\n    - {filter: mlp}\n' }), 'has no "value"');
    refuse(recipe({ params: '  density:\n    - {filter: mlp, value: 0.5}\n    - 0.5\n' }), '(filter entry 2)');
  });

  it('bad dtype', () => {
    refuse(recipe({ extra: 'dtype: float8\n' }), 'dtype "float8"', 'bfloat16');
    refuse(recipe({ extra: 'out_dtype: int8\n' }), 'out_dtype "int8"');
    refuse(recipe({ extra: 'dtype: 16\n' }), 'dtype 16');
    refuse(recipe({ extra: 'dtype: constructor\n' }), 'dtype "constructor"');
  });

  it('bad seed', () => {
    refuse(recipe({ extra: 'seed: -1\n' }), 'seed', 'got -1');
    refuse(recipe({ extra: 'seed: 1.5\n' }), 'seed', 'got 1.5');
    refuse(recipe({ extra: `seed: ${2 ** 53}\n` }), 'seed', '[0, 2^53)');
    refuse(recipe({ extra: 'seed: "42"\n' }), 'seed', 'got "42"');
  });

  it('bad tokenizer_source', () => {
    refuse(recipe({ extra: 'tokenizer_source: union\n' }), 'tokenizer_source "union"', '"base"', '"a"');
  });

  it('text that is not a recipe', () => {
    refuse('{"merge_method": "della",\n "models": [}', 'invalid JSON');
    refuse('models: [a\n', 'invalid YAML');
    refuse('- a\n- b\n', 'must be a mapping');
    refuse('', 'must be a mapping');
    refuse('merge_method: della\nmerge_method: della\n', 'invalid YAML');
    // JSON.parse keeps the last of two equal keys; a recipe refuses them, as in YAML.
    refuse('{"merge_method": "della", "base_model": "b", "models": [{"model": "a"}], "merge_method": "ties"}', 'invalid JSON', 'key "merge_method" appears twice');
    refuse('{"merge_method": "della", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 0.5, "density": 0.2}}]}', 'key "density" appears twice');
    // the same key in different objects, and keys inside strings, are fine
    expect(parse(String.raw`{"merge_method": "della", "base_model": "b", "models": [{"model": "a\",\"model"}, {"model": "c"}], "parameters": {"density": 0.6}}`).models).toHaveLength(2);
  });

  it("YAML merge keys (<<: *anchor), as mergekit's PyYAML reads them", () => {
    const r = parse(recipe({ models: '  - model: a\n    parameters: &p {weight: 0.7, density: 0.5}\n  - model: b\n    parameters:\n      <<: *p\n      density: 0.3\n' }));
    expect(r.models.map((m) => m.parameters)).toEqual([{ weight: 0.7, density: 0.5 }, { weight: 0.7, density: 0.3 }]);
    refuse(recipe({ models: '  - model: a\n    parameters:\n      <<: 5\n' }), 'not valid YAML', 'Merge sources must be maps');
  });

  it('a weight or lambda beyond float32 range (it would be infinite in the kernels)', () => {
    refuse(recipe({ models: '  - model: a\n    parameters: {weight: 1e39}\n' }), 'model "a"', 'parameter "weight"', 'within float32 range', 'got 1e+39');
    refuse(recipe({ params: '  lambda: -1e39\n' }), 'parameter "lambda"', 'within float32 range');
    expect(parse(recipe({ params: '  lambda: 3e38\n' })).parameters.lambda).toBe(3e38);
  });

  it('a "*" filter matches every tensor, as in mergekit', () => {
    const r = parse(recipe({ models: '  - model: a\n    parameters:\n      density:\n        - {filter: "*", value: 0.3}\n  - model: b\n', params: '  density: 0.9\n  epsilon: 0.05\n' }));
    expect(resolveTensorParams(r, 'model.layers.0.mlp.up_proj.weight', 2).experts.map((e) => e.density)).toEqual([0.3, 0.9]);
  });
});

describe('loadRecipe', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'della-recipe-'));
    for (const d of ['recipes/experts/math', 'recipes/base', 'cwd/base', 'abs']) mkdirSync(path.join(dir, d), { recursive: true });
    writeFileSync(path.join(dir, 'abs', 'm.safetensors'), '');
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('resolves against cwd first, then the recipe directory; absolute paths as is', async () => {
    const abs = path.join(dir, 'abs', 'm.safetensors');
    const file = path.join(dir, 'recipes', 'r.yaml');
    writeFileSync(file, recipe({ models: `  - model: ./experts/math\n  - model: ${abs}\n` }).replace('base_model: base', 'base_model: ./base'));
    const r = await loadRecipe('../recipes/r.yaml', { cwd: path.join(dir, 'cwd') });
    expect(r.source).toBe(file);
    expect(r.baseModel.path).toBe(path.join(dir, 'cwd', 'base'));
    expect(r.models.map((m) => m.path)).toEqual([path.join(dir, 'recipes', 'experts', 'math'), abs]);
  });

  /** The E_RECIPE that loading a recipe of one expert, `model`, from recipes/ with cwd/ as the working directory gives. */
  async function refusedModel(model: string): Promise<DellaError> {
    const file = path.join(dir, 'recipes', 'refused.yaml');
    writeFileSync(file, recipe({ models: `  - model: ${model}\n` }).replace('base_model: base', 'base_model: ./base'));
    const err = await loadRecipe(file, { cwd: path.join(dir, 'cwd') }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DellaError);
    expect((err as DellaError).code).toBe('E_RECIPE');
    return err as DellaError;
  }

  it('names the model and both places looked when a path is missing', async () => {
    const msg = (await refusedModel('./experts/nope')).message;
    expect(msg).toContain('model "./experts/nope" not found');
    expect(msg).toContain(path.join(dir, 'cwd', 'experts', 'nope'));
    expect(msg).toContain(path.join(dir, 'recipes', 'experts', 'nope'));
  });

  it('looks a hub id up in the local cache and says where it looked', async () => {
    const err = await refusedModel('mistralai/Mistral-7B-v0.1@main');
    expect(err.message).toContain('"mistralai/Mistral-7B-v0.1@main"');
    expect(err.message).toContain('not in the Hugging Face cache (della-merge never downloads)');
    expect(err.message).toContain(path.join(dir, 'cwd', 'mistralai'));
    expect(err.message).toContain('models--mistralai--Mistral-7B-v0.1');
    expect(err.message).toContain('"huggingface-cli download mistralai/Mistral-7B-v0.1 --revision main"');
  });

  it('a local directory named with a revision says it has none', async () => {
    expect((await refusedModel('./base@main')).message).toMatch(/: model "\.\/base@main" not found: .*; \S+base exists, but a local directory has no revisions: name it without "@main"$/);
  });

  it('a missing "model+lora" says "+lora" may be a LoRA adapter (mergekit\'s form), which is not applied', async () => {
    const err = await refusedModel('./base+./adapters/math');
    expect(err.message).toContain('model "./base+./adapters/math" not found: ');
    expect(err.message).toContain('. If "+./adapters/math" names a LoRA adapter (mergekit\'s model+lora), della-merge does not apply adapters: merge the adapter into its model first');
    // mergekit's usual form, hub ids on both sides
    expect((await refusedModel('mistralai/Mistral-7B-v0.1+someone/lora')).message).toContain('If "+someone/lora" names a LoRA adapter');
  });

  it('a hub revision or ref cannot lead out of the cache with ".."', () => {
    const cache = path.join(dir, 'hub-cache');
    const repo = path.join(cache, 'models--acme--m');
    mkdirSync(path.join(repo, 'snapshots', 'abc'), { recursive: true });
    mkdirSync(path.join(repo, 'refs'), { recursive: true });
    mkdirSync(path.join(dir, 'elsewhere'), { recursive: true });
    const env = { HF_HUB_CACHE: cache };
    expect(resolveHubId('acme/m@abc', env)).toEqual({ path: path.join(repo, 'snapshots', 'abc') });
    expect(resolveHubId('acme/m@../../../elsewhere', env)).toBeNull(); // used to resolve to dir/elsewhere
    writeFileSync(path.join(repo, 'refs', 'main'), '../../../elsewhere\n');
    expect(resolveHubId('acme/m', env)).not.toHaveProperty('path'); // the ref's commit leads out: not used
  });

  it('refuses an unreadable recipe file', async () => {
    const err = (await loadRecipe(path.join(dir, 'nope.yaml')).catch((e: unknown) => e)) as DellaError;
    expect(err.code).toBe('E_RECIPE');
    expect(err.message).toContain('nope.yaml');
  });
});
