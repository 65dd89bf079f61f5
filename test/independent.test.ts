// Independent cross-check: the della-merge CLI against test/independent/spec_merge.py, a
// numpy implementation written only from SPEC.md. Both must produce identical bytes.
//
//   DELLA_TEST_SEED=N   reproduce a run (the seed is printed and named in every assertion)
//   DELLA_TEST_CASES=N  recipes per method x dtype (default 2)
import { describe, it, expect, beforeAll } from 'vitest';
import { spawnSync } from 'node:child_process';
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

function buildModels(rng: Rng, dir: string, dtype: FloatDtype, nExperts: number) {
  const specs = tensorSpecs(rng, dtype);
  const base: Model = new Map();
  const baseVals = new Map<string, Float32Array>();
  for (const s of specs) {
    const n = numel(s.shape);
    if (s.dtype === 'I64') {
      base.set(s.name, { dtype: 'I64', shape: s.shape, data: encode('I64', Array.from({ length: n }, (_, i) => i * 7 - 3)) });
      continue;
    }
    const v = baseValues(rng, n, s.scale);
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
    const grow = rng() < 0.4;
    if (eDtype !== dtype) notes.push(`expert${k} stored as ${eDtype}`);
    if (grow) notes.push(`expert${k} has larger embeddings`);
    const m: Model = new Map();
    for (const s of specs) {
      const td = s.dtype === dtype ? eDtype : s.dtype;
      m.set(s.name, expertTensor(rng, s, base.get(s.name)!, baseVals.get(s.name)!, td, grow && !!s.embed));
    }
    writeSafetensors(path.join(eDir, 'model.safetensors'), m);
    experts.push(eDir);
  }
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

function run(cmd: string, args: string[]): { ok: boolean; out: string } {
  const r = spawnSync(cmd, args, { cwd: ROOT, encoding: 'utf8', maxBuffer: 64 << 20 });
  return { ok: r.status === 0, out: `${r.error ? r.error.message : ''}${r.stdout ?? ''}${r.stderr ?? ''}`.trim() };
}

// ---------------------------------------------------------------- tests

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
      it(`${method} ${dtype}`, () => {
        for (let c = 0; c < CASES; c++) {
          const caseSeed = (SEED + Math.imul(idx * CASES + c + 1, 0x9e3779b9)) >>> 0;
          const rng = makeRng(caseSeed);
          const tag = `[DELLA_TEST_SEED=${SEED} ${method} ${dtype} case ${c}]`;
          const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'della-indep-'));
          let keep = true;
          try {
            const { baseDir, experts, notes } = buildModels(rng, dir, dtype, rng.int(1, 3));
            const recipe = makeRecipe(rng, method, dtype, baseDir, experts);
            const recipePath = path.join(dir, 'recipe.json');
            fs.writeFileSync(recipePath, JSON.stringify(recipe, null, 2));
            const ctx = `${tag} (files kept in ${dir}; ${notes.join(', ') || 'plain experts'})\nrecipe: ${JSON.stringify(recipe)}`;

            const outDir = path.join(dir, 'out');
            const cli = run('node', [CLI, 'run', recipePath, '--out', outDir, '--threads', '2', '--shard-size', '100000', '--quiet']);
            expect(cli.ok, `${ctx}\nCLI failed:\n${cli.out}`).toBe(true);
            const pyOut = path.join(dir, 'spec.safetensors');
            const py = run('python3', [PY_SCRIPT, recipePath, pyOut]);
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
            keep = false;
          } finally {
            if (!keep) fs.rmSync(dir, { recursive: true, force: true });
          }
        }
      });
    }
  }
});
