// Independent cross-check: the della-merge CLI against test/independent/spec_merge.py, a
// numpy implementation written only from SPEC.md and the README's "What a merge computes". Both must produce identical bytes.
//
//   DELLA_TEST_SEED=N   reproduce a run (the seed is printed and named in every assertion)
//   DELLA_TEST_CASES=N  recipes per method x dtype (default 2), for both the scalar-parameter
//                       recipes and those with gradients, filters and overrides
import { describe, it, expect, beforeAll } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const PY_SCRIPT = path.join(ROOT, 'test', 'independent', 'spec_merge.py');
const CLI = path.join(ROOT, 'bin', 'della-merge.js');

const probe = spawnSync('python3', ['-c', 'import numpy'], { encoding: 'utf8' });
const available = probe.status === 0;
const whyNot = available
  ? ''
  : `python3 with numpy is not available (${probe.error ? probe.error.message : (probe.stderr || '').trim()}); ` +
    'skipping the independent numpy cross-check of the CLI';
if (!available) console.warn(`[independent.test] ${whyNot}`);

const SEED = process.env.DELLA_TEST_SEED !== undefined
  ? Number(process.env.DELLA_TEST_SEED) >>> 0
  : Math.floor(Math.random() * 2 ** 32) >>> 0;
const CASES = Math.max(1, Number(process.env.DELLA_TEST_CASES ?? 2) | 0);
const EXT_CASES = CASES; // the gradient / filter / override recipes (models with 4-6 layers)
if (available) console.log(`[independent.test] DELLA_TEST_SEED=${SEED} (set it to reproduce)`);

// ---------------------------------------------------------------- random

type Rng = { (): number; int(lo: number, hi: number): number; normal(): number; pick<T>(a: readonly T[]): T };

function makeRng(seed: number): Rng {
  let s = seed >>> 0;
  const next = (): number => {
    // mulberry32
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const r = next as Rng;
  r.int = (lo, hi) => lo + Math.floor(next() * (hi - lo + 1));
  r.normal = () => {
    const u = 1 - next();
    const v = next();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  };
  r.pick = (a) => a[Math.floor(next() * a.length)];
  return r;
}

// ---------------------------------------------------------------- dtype codecs

const f32buf = new Float32Array(1);
const u32buf = new Uint32Array(f32buf.buffer);

function f32ToBf16(x: number): number {
  f32buf[0] = x;
  const b = u32buf[0];
  if ((b & 0x7fffffff) > 0x7f800000) return (b >>> 16) | 0x40;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

function f32ToF16(x: number): number {
  f32buf[0] = x;
  const b = u32buf[0];
  const sign = (b >>> 16) & 0x8000;
  const exp = (b >>> 23) & 0xff;
  let mant = b & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 112;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let h = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (h & 1))) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1))) h++;
  return sign | Math.min(h, 0x7c00);
}

function bf16ToF32(h: number): number {
  u32buf[0] = (h << 16) >>> 0;
  return f32buf[0];
}

function f16ToF32(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

const SIZE: Record<string, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, U8: 1, BOOL: 1 };

function encode(dtype: string, values: ArrayLike<number>): Buffer {
  const n = values.length;
  const buf = Buffer.alloc(n * SIZE[dtype]);
  for (let i = 0; i < n; i++) {
    const v = values[i];
    switch (dtype) {
      case 'F32': buf.writeFloatLE(v, i * 4); break;
      case 'F64': buf.writeDoubleLE(v, i * 8); break;
      case 'F16': buf.writeUInt16LE(f32ToF16(v), i * 2); break;
      case 'BF16': buf.writeUInt16LE(f32ToBf16(v), i * 2); break;
      case 'I64': buf.writeBigInt64LE(BigInt(Math.trunc(v)), i * 8); break;
      default: throw new Error(`encode: ${dtype}`);
    }
  }
  return buf;
}

function decodeAt(dtype: string, buf: Buffer, i: number): number | bigint {
  switch (dtype) {
    case 'F32': return buf.readFloatLE(i * 4);
    case 'F64': return buf.readDoubleLE(i * 8);
    case 'F16': return f16ToF32(buf.readUInt16LE(i * 2));
    case 'BF16': return bf16ToF32(buf.readUInt16LE(i * 2));
    case 'I64': return buf.readBigInt64LE(i * 8);
    default: return buf[i];
  }
}

function hexAt(dtype: string, buf: Buffer, i: number): string {
  const sz = SIZE[dtype] ?? 1;
  return Buffer.from(buf.subarray(i * sz, (i + 1) * sz)).reverse().toString('hex');
}

// ---------------------------------------------------------------- safetensors

type Tensor = { dtype: string; shape: number[]; data: Buffer };
type Model = Map<string, Tensor>;

function writeSafetensors(file: string, tensors: Model): void {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let off = 0;
  for (const [name, t] of tensors) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [off, off + t.data.length] };
    off += t.data.length;
  }
  let h = JSON.stringify(header);
  while (Buffer.byteLength(h) % 8) h += ' ';
  const hb = Buffer.from(h, 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hb.length));
  fs.writeFileSync(file, Buffer.concat([len, hb, ...[...tensors.values()].map((t) => t.data)]));
}

function readSafetensors(file: string): Model {
  const buf = fs.readFileSync(file);
  const hlen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + hlen).toString('utf8')) as Record<string, any>;
  const data = buf.subarray(8 + hlen);
  const out: Model = new Map();
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const [b, e] = info.data_offsets as [number, number];
    out.set(name, { dtype: info.dtype, shape: info.shape, data: Buffer.from(data.subarray(b, e)) });
  }
  return out;
}

function readModelDir(dir: string): Model {
  const index = path.join(dir, 'model.safetensors.index.json');
  if (fs.existsSync(index)) {
    const wm = JSON.parse(fs.readFileSync(index, 'utf8')).weight_map as Record<string, string>;
    const files = new Map<string, Model>();
    const out: Model = new Map();
    for (const [name, fn] of Object.entries(wm)) {
      if (!files.has(fn)) files.set(fn, readSafetensors(path.join(dir, fn)));
      const t = files.get(fn)!.get(name);
      if (!t) throw new Error(`${dir}: index names ${name} in ${fn}, which lacks it`);
      out.set(name, t);
    }
    for (const [fn, m] of files) for (const name of m.keys()) {
      if (wm[name] !== fn) throw new Error(`${dir}/${fn}: ${name} not in the index`);
    }
    return out;
  }
  return readSafetensors(path.join(dir, 'model.safetensors'));
}

// ---------------------------------------------------------------- models

const FLOAT_DTYPES = ['BF16', 'F16', 'F32'] as const;
type FloatDtype = (typeof FLOAT_DTYPES)[number];
const DTYPE_NAME: Record<FloatDtype, string> = { BF16: 'bfloat16', F16: 'float16', F32: 'float32' };

type Spec = { name: string; shape: number[]; dtype: string; scale: number; embed?: boolean };

function numel(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function tensorSpecs(rng: Rng, dtype: FloatDtype): Spec[] {
  const V = rng.int(5, 40);
  const H = rng.int(2, 24);
  return [
    { name: 'model.embed_tokens.weight', shape: [V, H], dtype, scale: 0.05, embed: true },
    { name: 'model.layers.0.mlp.down_proj.weight', shape: [rng.int(1, 12), rng.int(2, 300)], dtype, scale: 0.05 },
    { name: 'model.layers.1.mlp.down_proj.weight', shape: [2, 70000], dtype, scale: 0.02 },
    { name: 'model.layers.1.self_attn.qkv_proj.weight', shape: [3, rng.int(1, 4), rng.int(2, 17)], dtype, scale: 0.5 },
    { name: 'model.layers.0.post_attention_layernorm.weight', shape: [H], dtype, scale: 1 },
    { name: 'model.layers.1.mlp.gate_scale', shape: [rng.int(2, 40), 1], dtype, scale: 1 },
    { name: 'model.layers.0.self_attn.rotary_scale', shape: [rng.int(2, 9), rng.int(2, 9)], dtype: 'F64', scale: 0.3 },
    { name: 'model.norm.weight', shape: [H], dtype, scale: 2 },
    { name: 'lm_head.weight', shape: [V, H], dtype, scale: 0.05, embed: true },
    { name: 'model.position_ids', shape: [1, 16], dtype: 'I64', scale: 0 },
  ];
}

// A model with several layers (gradients vary across them), the other layer-name
// patterns (h.N., blocks.N., layer.N., block.N.), and tensors outside the layers.
function layeredSpecs(rng: Rng, dtype: FloatDtype): Spec[] {
  const nL = rng.int(4, 6);
  const V = rng.int(5, 30);
  const H = rng.int(2, 20);
  const specs: Spec[] = [{ name: 'model.embed_tokens.weight', shape: [V, H], dtype, scale: 0.05, embed: true }];
  for (let i = 0; i < nL; i++) {
    specs.push({ name: `model.layers.${i}.self_attn.q_proj.weight`, shape: [rng.int(1, 6), H], dtype, scale: 0.1 });
    specs.push({ name: `model.layers.${i}.mlp.down_proj.weight`, shape: [rng.int(1, 8), rng.int(2, 120)], dtype, scale: 0.05 });
    specs.push({ name: `model.layers.${i}.input_layernorm.weight`, shape: [H], dtype, scale: 1 });
  }
  const li = () => rng.int(0, nL - 1);
  specs.push(
    { name: `model.layers.${li()}.mlp.up_proj.weight`, shape: [2, rng.int(20000, 30000)], dtype, scale: 0.02 },
    { name: `model.layers.${li()}.self_attn.qkv_proj.weight`, shape: [3, rng.int(1, 4), rng.int(2, 17)], dtype, scale: 0.5 },
    { name: `model.layers.${li()}.mlp.gate_scale`, shape: [rng.int(2, 30), 1], dtype, scale: 1 },
    { name: `model.layers.${li()}.self_attn.rotary_scale`, shape: [rng.int(2, 9), rng.int(2, 9)], dtype: 'F64', scale: 0.3 },
    // other layer patterns; blocks.N may name one layer past the model.layers ones (then L grows)
    { name: `transformer.h.${li()}.attn.c_proj.bias`, shape: [H], dtype, scale: 0.2 },
    { name: `vision.blocks.${rng.int(0, nL)}.proj.weight`, shape: [rng.int(1, 5), rng.int(2, 9)], dtype, scale: 0.2 },
    { name: `encoder.layer.${li()}.dense.weight`, shape: [rng.int(2, 6), rng.int(2, 9)], dtype, scale: 0.2 },
    { name: `decoder.block.${li()}.ffn.weight`, shape: [rng.int(2, 6)], dtype, scale: 0.2 },
    // no layer index
    { name: 'model.norm.weight', shape: [H], dtype, scale: 2 },
    { name: 'lm_head.weight', shape: [V, H], dtype, scale: 0.05, embed: true },
    { name: 'model.position_ids', shape: [1, 16], dtype: 'I64', scale: 0 },
  );
  return specs;
}

function baseValues(rng: Rng, n: number, scale: number): Float32Array {
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const r = rng();
    v[i] = r < 0.05 ? 0 : r < 0.08 ? -0 : rng.normal() * scale;
  }
  return v;
}

const STEPS = [2 ** -4, 2 ** -6, 2 ** -8, 3 * 2 ** -7];

function expertTensor(rng: Rng, spec: Spec, base: Tensor, baseVals: Float32Array, dtype: string, grow: boolean): Tensor {
  if (spec.dtype === 'I64') {
    return { dtype: 'I64', shape: spec.shape, data: encode('I64', Array.from({ length: numel(spec.shape) }, () => rng.int(0, 99))) };
  }
  const shape = grow ? spec.shape.map((s) => s + rng.int(1, 3)) : spec.shape;
  const n = numel(shape);
  const vals = new Float32Array(n);
  const same = new Uint8Array(n);
  const cols = spec.shape[spec.shape.length - 1];
  const rows = spec.shape.length >= 2 ? numel(spec.shape) / cols : 1;
  const ecols = shape[shape.length - 1];
  for (let i = 0; i < n; i++) {
    // position in the base (leading sub-block), or -1 outside it
    let bi = i;
    if (grow) {
      const r = Math.floor(i / ecols);
      const c = i % ecols;
      bi = r < rows && c < cols ? r * cols + c : -1;
    }
    const b = bi >= 0 ? baseVals[bi] : rng.normal() * spec.scale;
    const r = rng();
    if (bi >= 0 && r < 0.2) { same[i] = 1; vals[i] = b; continue; }
    if (r < 0.23) { vals[i] = b === 0 ? (rng() < 0.5 ? -0 : 0) : b; continue; }
    if (r < 0.5) { vals[i] = b + (rng() < 0.5 ? -1 : 1) * rng.pick(STEPS) * spec.scale * 4; continue; }
    vals[i] = b + rng.normal() * spec.scale * 0.3;
  }
  const data = encode(dtype, vals);
  if (dtype === base.dtype) {
    const sz = SIZE[dtype];
    for (let i = 0; i < n; i++) {
      if (!same[i]) continue;
      let bi = i;
      if (grow) bi = Math.floor(i / ecols) * cols + (i % ecols);
      base.data.copy(data, i * sz, bi * sz, (bi + 1) * sz);
    }
  }
  return { dtype, shape, data };
}

type BuildOpts = {
  /** the layered model of layeredSpecs (gradients vary), else tensorSpecs */
  layered?: boolean;
  /** allow experts with larger embeddings (default true) */
  grow?: boolean;
  /** per tensor, sometimes an all-zero base, an expert equal to the base or unrelated to it */
  modes?: boolean;
};

function buildModels(rng: Rng, dir: string, dtype: FloatDtype, nExperts: number, opts: BuildOpts = {}) {
  const specs = opts.layered ? layeredSpecs(rng, dtype) : tensorSpecs(rng, dtype);
  const zeroBase = new Set<string>();
  if (opts.modes) for (const s of specs) if (s.dtype !== 'I64' && rng() < 0.06) zeroBase.add(s.name);
  const base: Model = new Map();
  const baseVals = new Map<string, Float32Array>();
  for (const s of specs) {
    const n = numel(s.shape);
    if (s.dtype === 'I64') {
      base.set(s.name, { dtype: 'I64', shape: s.shape, data: encode('I64', Array.from({ length: n }, (_, i) => i * 7 - 3)) });
      continue;
    }
    const v = zeroBase.has(s.name) ? new Float32Array(n) : baseValues(rng, n, s.scale);
    baseVals.set(s.name, v);
    base.set(s.name, { dtype: s.dtype, shape: s.shape, data: encode(s.dtype, v) });
  }
  // the base: two shards and an index
  const baseDir = path.join(dir, 'base');
  fs.mkdirSync(baseDir);
  const names = [...base.keys()];
  const cut = Math.ceil(names.length / 2);
  const shards = [names.slice(0, cut), names.slice(cut)];
  const weightMap: Record<string, string> = {};
  shards.forEach((ns, j) => {
    const fn = `model-0000${j + 1}-of-00002.safetensors`;
    writeSafetensors(path.join(baseDir, fn), new Map(ns.map((n) => [n, base.get(n)!])));
    for (const n of ns) weightMap[n] = fn;
  });
  fs.writeFileSync(path.join(baseDir, 'model.safetensors.index.json'),
    JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }, null, 2));

  const experts: string[] = [];
  const notes: string[] = [];
  for (let k = 0; k < nExperts; k++) {
    const eDir = path.join(dir, `expert${k}`);
    fs.mkdirSync(eDir);
    // sometimes an expert stored in another float dtype; sometimes a grown vocabulary
    const eDtype: FloatDtype = rng() < 0.2 ? rng.pick(FLOAT_DTYPES) : dtype;
    const grow = opts.grow !== false && rng() < 0.4;
    if (eDtype !== dtype) notes.push(`expert${k} stored as ${eDtype}`);
    if (grow) notes.push(`expert${k} has larger embeddings`);
    const m: Model = new Map();
    for (const s of specs) {
      const td = s.dtype === dtype ? eDtype : s.dtype;
      const mode = opts.modes && s.dtype !== 'I64' ? rng() : 1;
      if (mode < 0.07 && !(grow && s.embed)) {
        // the expert's tensor equals the base's (a zero delta; slerp's |cos| > 0.9995 branch)
        const b = base.get(s.name)!;
        m.set(s.name, { dtype: td, shape: s.shape, data: td === b.dtype ? Buffer.from(b.data) : encode(td, Array.from({ length: numel(s.shape) }, (_, i) => Number(decodeAt(b.dtype, b.data, i)))) });
      } else if (mode < 0.14) {
        // unrelated to the base (slerp far from the linear branch, cos of either sign)
        const sh = grow && s.embed ? s.shape.map((x) => x + rng.int(1, 3)) : s.shape;
        const vals = Float32Array.from({ length: numel(sh) }, () => rng.normal() * s.scale);
        m.set(s.name, { dtype: td, shape: sh, data: encode(td, vals) });
      } else {
        m.set(s.name, expertTensor(rng, s, base.get(s.name)!, baseVals.get(s.name)!, td, grow && !!s.embed));
      }
    }
    writeSafetensors(path.join(eDir, 'model.safetensors'), m);
    experts.push(eDir);
  }
  if (zeroBase.size) notes.push(`all-zero base: ${[...zeroBase].join(' ')}`);
  return { baseDir, experts, notes };
}

// ---------------------------------------------------------------- recipes

const METHODS = ['della', 'della_linear', 'dare_ties', 'dare_linear', 'task_arithmetic'] as const;
type Method = (typeof METHODS)[number];

function randomWeight(rng: Rng): number {
  return rng() < 0.2 ? -(0.05 + rng() * 0.9) : 0.05 + rng() * 1.45;
}

function randomDensity(rng: Rng, method: Method): { density: number; epsilon?: number } {
  const magprune = method === 'della' || method === 'della_linear';
  if (rng() < 0.08) return magprune ? { density: 1, epsilon: 0 } : { density: 1 };
  const d = 0.05 + rng() * 0.9;
  if (!magprune) return { density: d };
  const r = rng();
  const eps = r < 0.1 ? 0 : rng() * Math.min(d * 0.999, 1 - d);
  return { density: d, epsilon: eps };
}

function makeRecipe(rng: Rng, method: Method, dtype: FloatDtype, baseDir: string, experts: string[]) {
  const params: Record<string, unknown> = {};
  const globalDensity = method !== 'task_arithmetic' && rng() < 0.25;
  const globalWeight = rng() < 0.15;
  if (globalDensity) Object.assign(params, randomDensity(rng, method));
  if (globalWeight) params.weight = randomWeight(rng);
  const models: Array<Record<string, unknown>> = experts.map((e) => {
    const p: Record<string, unknown> = {};
    if (!globalWeight || rng() < 0.3) p.weight = randomWeight(rng);
    if (method !== 'task_arithmetic' && (!globalDensity || rng() < 0.3)) Object.assign(p, randomDensity(rng, method));
    return { model: e, parameters: p };
  });
  if (rng() < 0.2) models.splice(rng.int(0, models.length), 0, { model: baseDir });
  if (rng() < 0.6) params.lambda = 0.5 + rng() * 1.5;
  if (rng() < 0.35) params.normalize = rng() < 0.5;
  if (method !== 'task_arithmetic' && rng() < 0.35) params.rescale = rng() < 0.5;
  if (method !== 'task_arithmetic' && rng() < 0.35) params.consensus = rng.pick(['sum', 'count', 'none']);
  const recipe: Record<string, unknown> = { merge_method: method, base_model: baseDir, models, parameters: params };
  const r = rng();
  if (r < 0.8) recipe.dtype = DTYPE_NAME[dtype];
  else if (r < 0.9) recipe.dtype = DTYPE_NAME[rng.pick(FLOAT_DTYPES)];
  if (rng() < 0.3) recipe.out_dtype = DTYPE_NAME[rng.pick(FLOAT_DTYPES)];
  const s = rng();
  if (s < 0.35) recipe.seed = Math.floor(rng() * 2 ** 21) * 2 ** 32 + Math.floor(rng() * 2 ** 32); // >= 2^32 (mostly)
  else if (s < 0.9) recipe.seed = Math.floor(rng() * 2 ** 32);
  return recipe;
}

// ---------------------------------------------------------------- recipes with gradients, filters, overrides

const EXT_METHODS = ['ties', 'breadcrumbs', 'breadcrumbs_ties', 'linear', 'slerp', 'della', 'dare_ties'] as const;
type ExtMethod = (typeof EXT_METHODS)[number];

// substrings of the tensor names of layeredSpecs (and some that match nothing)
const FILTERS = ['mlp', 'self_attn', 'layers.2.', 'layers.3', 'norm', 'embed', 'proj', 'h.1.', 'blocks', 'layer.', 'lm_head', 'nomatch'];

/** A scalar, a gradient, or a filter list (whose values may be gradients) built from gen(). */
function shaped(rng: Rng, gen: () => number, catchAll = false): unknown {
  const gradient = () => Array.from({ length: rng.int(1, 5) }, gen);
  const r = rng();
  if (r < 0.35) return gen();
  if (r < 0.65) return gradient();
  const entries: Array<Record<string, unknown>> = [];
  const n = rng.int(1, 3);
  for (let j = 0; j < n; j++) entries.push({ filter: rng.pick(FILTERS), value: rng() < 0.4 ? gradient() : gen() });
  // a catch-all entry, else tensors that no filter names fall through to the global value / default
  if (catchAll || rng() < 0.5) entries.push({ value: rng() < 0.4 ? gradient() : gen() });
  return entries;
}

/** Every number inside a shaped value. */
function numbersOf(v: unknown): number[] {
  if (typeof v === 'number') return [v];
  if (Array.isArray(v)) return v.flatMap((e) => (e && typeof e === 'object' && !Array.isArray(e) ? numbersOf((e as { value: unknown }).value) : numbersOf(e)));
  return [];
}

/** Apply f to every number inside a shaped value (for the drop_rate / window_size aliases). */
function mapNumbers(v: unknown, f: (x: number) => number): unknown {
  if (typeof v === 'number') return f(v);
  if (Array.isArray(v)) {
    return v.map((e) => (e && typeof e === 'object' && !Array.isArray(e)
      ? { ...(e as object), value: mapNumbers((e as { value: unknown }).value, f) }
      : mapNumbers(e, f)));
  }
  return v;
}

/** A choice, or sometimes a filter list of choices (global lambda/normalize/rescale/consensus). */
function chosen<T>(rng: Rng, options: readonly T[]): unknown {
  if (rng() < 0.75) return rng.pick(options);
  const entries: Array<Record<string, unknown>> = [];
  const n = rng.int(1, 2);
  for (let j = 0; j < n; j++) entries.push({ filter: rng.pick(FILTERS), value: rng.pick(options) });
  if (rng() < 0.5) entries.push({ value: rng.pick(options) }); // else the method's default
  return entries;
}

function makeExtRecipe(rng: Rng, method: ExtMethod, dtype: FloatDtype, baseDir: string, experts: string[], linearBase: boolean) {
  const params: Record<string, unknown> = {};
  const recipe: Record<string, unknown> = { merge_method: method };
  const sparsified = method !== 'linear' && method !== 'slerp';
  const magprune = method === 'della';
  const breadcrumbs = method === 'breadcrumbs' || method === 'breadcrumbs_ties';

  if (method === 'slerp') {
    const t = () => { const r = rng(); return r < 0.12 ? 0 : r < 0.24 ? 1 : rng(); };
    // t has no default (SPEC §7 lists none; the CLI refuses a recipe without t), so a filter
    // list for t always ends with a catch-all entry
    params.t = shaped(rng, t, true);
    const models: Array<Record<string, unknown>> = [{ model: experts[0] }];
    const r = rng();
    if (r < 0.4) models.unshift({ model: baseDir });
    else if (r < 0.6) models.push({ model: baseDir });
    recipe.base_model = baseDir;
    recipe.models = models;
  } else if (method === 'linear') {
    const weight = () => (rng() < 0.1 ? -(0.05 + rng() * 0.5) : 0.05 + rng() * 1.95);
    if (rng() < 0.2) params.weight = shaped(rng, weight);
    const models: Array<Record<string, unknown>> = experts.map((e) => {
      const p: Record<string, unknown> = {};
      if (params.weight === undefined || rng() < 0.4) p.weight = shaped(rng, weight);
      return rng() < 0.15 ? { model: e } : { model: e, parameters: p };
    });
    if (rng() < 0.4) {
      const p: Record<string, unknown> = rng() < 0.7 ? { weight: shaped(rng, weight) } : {};
      models.splice(rng.int(0, models.length), 0, { model: baseDir, parameters: p });
    }
    if (models.length >= 2 && rng() < 0.12) {
      // weights that cancel (D = +0 + w - w + 0 … = 0, so D counts as 1)
      const w = 0.1 + rng();
      delete params.weight;
      models.forEach((m, j) => { m.parameters = { weight: j === 0 ? w : j === 1 ? -w : 0 }; });
    }
    if (linearBase) recipe.base_model = baseDir;
    recipe.models = models;
    if (rng() < 0.4) params.normalize = chosen(rng, [true, false]);
  } else {
    // density numbers first (della's epsilon must fit every one of them)
    const dens = (): number => {
      const r = rng();
      if (magprune) return 0.2 + rng() * 0.6;
      if (r < 0.04) return 0.0005; // floor(d N) = 0 for small tensors: a warning, everything dropped
      return 0.05 + rng() * 0.9;
    };
    const weight = () => randomWeight(rng);
    const gammaGen = () => (rng() < 0.2 ? 0.3 + rng() * 0.3 : rng() < 0.15 ? 0 : rng() * 0.2);
    const levels: Array<Record<string, unknown>> = [];
    const globalDensity = rng() < 0.3;
    if (globalDensity) levels.push(params);
    if (rng() < 0.2) params.weight = shaped(rng, weight);
    if (breadcrumbs && rng() < 0.3) params.gamma = shaped(rng, gammaGen);
    const models: Array<Record<string, unknown>> = experts.map(() => ({}));
    models.forEach((p) => {
      if (params.weight === undefined || rng() < 0.3) p.weight = shaped(rng, weight);
      if (!globalDensity || rng() < 0.4) levels.push(p);
      if (breadcrumbs && rng() < 0.6) p.gamma = shaped(rng, gammaGen);
    });
    const allDensities: number[] = [];
    for (const p of levels) {
      if (!magprune && rng() < 0.08) { p.density = 1; continue; }
      const d = shaped(rng, dens);
      allDensities.push(...numbersOf(d));
      if (rng() < 0.3) p.drop_rate = mapNumbers(d, (x) => 1 - x);
      else p.density = d;
    }
    if (magprune) {
      // epsilon small enough for every density number (and interpolations between them)
      const dmin = Math.min(0.8, ...allDensities);
      const dmax = Math.max(0.2, ...allDensities);
      const bound = 0.95 * Math.min(dmin, 1 - dmax);
      const epsGen = () => (rng() < 0.1 ? 0 : rng() * bound);
      for (const p of [params, ...models]) {
        if (rng() < 0.5) continue; // default epsilon 0.15 fits densities in [0.2, 0.8]
        const e = shaped(rng, epsGen);
        if (rng() < 0.3) p.window_size = mapNumbers(e, (x) => 2 * x);
        else p.epsilon = e;
      }
    }
    const entries: Array<Record<string, unknown>> = experts.map((e, k) => ({ model: e, parameters: models[k] }));
    if (rng() < 0.2) entries.splice(rng.int(0, entries.length), 0, { model: baseDir });
    recipe.base_model = baseDir;
    recipe.models = entries;
    if (rng() < 0.5) params.lambda = shaped(rng, () => 0.5 + rng() * 1.5);
    if (rng() < 0.4) params.normalize = chosen(rng, [true, false]);
    const norms = ['l1', 'l2', 'linf'];
    if (method === 'della' || method === 'dare_ties') {
      // these runs are about norm-matching rescale; sometimes the other choices
      params.rescale = chosen(rng, rng() < 0.75 ? norms : [true, false, 'inverse', ...norms]);
    } else if (rng() < 0.7) {
      params.rescale = chosen(rng, [true, false, ...norms]); // "inverse" is refused for these sparsifiers
    }
    if (rng() < 0.4) params.consensus = chosen(rng, ['sum', 'count', 'none']);
    const s = rng();
    if (s < 0.35) recipe.seed = Math.floor(rng() * 2 ** 21) * 2 ** 32 + Math.floor(rng() * 2 ** 32);
    else if (s < 0.9) recipe.seed = Math.floor(rng() * 2 ** 32);
  }
  recipe.parameters = params;
  const r = rng();
  if (r < 0.7) recipe.dtype = DTYPE_NAME[dtype];
  else if (r < 0.85) recipe.dtype = DTYPE_NAME[rng.pick(FLOAT_DTYPES)];
  if (rng() < 0.3) recipe.out_dtype = DTYPE_NAME[rng.pick(FLOAT_DTYPES)];
  return recipe;
}

// ---------------------------------------------------------------- comparison

function describeDiff(name: string, cli: Tensor, py: Tensor): string {
  const sz = SIZE[py.dtype] ?? 1;
  const n = Math.floor(py.data.length / sz);
  const diffs: number[] = [];
  for (let i = 0; i < n; i++) {
    if (cli.data.compare(py.data, i * sz, (i + 1) * sz, i * sz, (i + 1) * sz) !== 0) diffs.push(i);
  }
  const show = diffs.slice(0, 8).map((i) =>
    `  [${i}] cli=${decodeAt(cli.dtype, cli.data, i)} (0x${hexAt(cli.dtype, cli.data, i)}) ` +
    `spec=${decodeAt(py.dtype, py.data, i)} (0x${hexAt(py.dtype, py.data, i)})`);
  return `${name}: ${diffs.length} of ${n} elements differ\n${show.join('\n')}`;
}

// asynchronous, so that the test worker's event loop stays free while the CLI and python run
// (long synchronous tests make vitest's worker RPC time out when DELLA_TEST_CASES is raised)
function run(cmd: string, args: string[]): Promise<{ ok: boolean; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    const chunks: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => chunks.push(b));
    child.stderr.on('data', (b: Buffer) => chunks.push(b));
    let err = '';
    child.on('error', (e) => { err = `${e.message}\n`; });
    child.on('close', (code) => resolve({ ok: code === 0 && !err, out: `${err}${Buffer.concat(chunks).toString('utf8')}`.trim() }));
  });
}

// per test: vitest.config's 120 s covers the defaults; more cases get more time
const timeoutFor = (cases: number): number => Math.max(120_000, cases * 30_000);

// ---------------------------------------------------------------- tests

/** Run the CLI and spec_merge.py on one recipe and compare every tensor's bytes. */
async function crossCheck(dir: string, recipe: Record<string, unknown>, ctxHead: string): Promise<void> {
  const recipePath = path.join(dir, 'recipe.json');
  fs.writeFileSync(recipePath, JSON.stringify(recipe, null, 2));
  const ctx = `${ctxHead}\nrecipe: ${JSON.stringify(recipe)}`;

  const outDir = path.join(dir, 'out');
  const cli = await run('node', [CLI, 'run', recipePath, '--out', outDir, '--threads', '2', '--shard-size', '100000', '--quiet']);
  expect(cli.ok, `${ctx}\nCLI failed:\n${cli.out}`).toBe(true);
  const pyOut = path.join(dir, 'spec.safetensors');
  const py = await run('python3', [PY_SCRIPT, recipePath, pyOut]);
  expect(py.ok, `${ctx}\nspec_merge.py failed:\n${py.out}`).toBe(true);

  const got = readModelDir(outDir);
  const want = readSafetensors(pyOut);
  expect([...got.keys()].sort(), `${ctx}\ntensor names`).toEqual([...want.keys()].sort());
  const problems: string[] = [];
  for (const [name, w] of want) {
    const g = got.get(name)!;
    if (g.dtype !== w.dtype) { problems.push(`${name}: dtype cli=${g.dtype} spec=${w.dtype}`); continue; }
    if (JSON.stringify(g.shape) !== JSON.stringify(w.shape)) {
      problems.push(`${name}: shape cli=${JSON.stringify(g.shape)} spec=${JSON.stringify(w.shape)}`);
      continue;
    }
    if (g.data.length !== w.data.length) { problems.push(`${name}: byte length ${g.data.length} vs ${w.data.length}`); continue; }
    if (!g.data.equals(w.data)) problems.push(describeDiff(name, g, w));
  }
  expect(problems, `${ctx}\n${problems.join('\n')}`).toEqual([]);
}

describe.skipIf(!available)('independent numpy implementation of SPEC.md agrees byte for byte with the CLI', () => {
  beforeAll(() => {
    if (!fs.existsSync(path.join(ROOT, 'dist', 'cli.js'))) {
      const r = spawnSync('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: ROOT, encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`tsc failed:\n${r.stdout}${r.stderr}`);
    }
  }, 300_000);

  let testIndex = 0;
  for (const method of METHODS) {
    for (const dtype of FLOAT_DTYPES) {
      const idx = testIndex++;
      it(`${method} ${dtype}`, async () => {
        for (let c = 0; c < CASES; c++) {
          const caseSeed = (SEED + Math.imul(idx * CASES + c + 1, 0x9e3779b9)) >>> 0;
          const rng = makeRng(caseSeed);
          const tag = `[DELLA_TEST_SEED=${SEED} ${method} ${dtype} case ${c}]`;
          const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'della-indep-'));
          let keep = true;
          try {
            const { baseDir, experts, notes } = buildModels(rng, dir, dtype, rng.int(1, 3));
            const recipe = makeRecipe(rng, method, dtype, baseDir, experts);
            await crossCheck(dir, recipe, `${tag} (files kept in ${dir}; ${notes.join(', ') || 'plain experts'})`);
            keep = false;
          } finally {
            if (!keep) fs.rmSync(dir, { recursive: true, force: true });
          }
        }
      }, timeoutFor(CASES));
    }
  }

  // ties, breadcrumbs, breadcrumbs_ties, linear, slerp, and della / dare_ties with norm-matching
  // rescale, on models with 4-6 layers: parameters as gradients and filter lists (with the
  // drop_rate / window_size aliases), rescale / consensus / normalize / lambda overrides.
  for (const method of EXT_METHODS) {
    for (const dtype of FLOAT_DTYPES) {
      const idx = testIndex++;
      it(`${method} ${dtype} (gradients, filters, overrides)`, async () => {
        for (let c = 0; c < EXT_CASES; c++) {
          const caseSeed = (SEED + Math.imul(idx * 1000 + c + 1, 0x9e3779b9)) >>> 0;
          const rng = makeRng(caseSeed);
          const tag = `[DELLA_TEST_SEED=${SEED} ${method} ${dtype} (gradients, filters, overrides) case ${c}]`;
          const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'della-indep-'));
          let keep = true;
          try {
            const nExperts = method === 'slerp' ? 1 : rng.int(1, 3);
            // linear without a base takes its shapes from the first model: no grown embeddings
            // there; slerp needs equal shapes
            const noBaseLinear = method === 'linear' && rng() < 0.4;
            const grow = method !== 'slerp' && !noBaseLinear;
            const { baseDir, experts, notes } = buildModels(rng, dir, dtype, nExperts, { layered: true, grow, modes: true });
            const recipe = makeExtRecipe(rng, method, dtype, baseDir, experts, !noBaseLinear);
            await crossCheck(dir, recipe, `${tag} (files kept in ${dir}; ${notes.join(', ') || 'plain experts'})`);
            keep = false;
          } finally {
            if (!keep) fs.rmSync(dir, { recursive: true, force: true });
          }
        }
      }, timeoutFor(EXT_CASES));
    }
  }
});
