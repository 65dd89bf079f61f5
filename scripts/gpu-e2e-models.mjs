#!/usr/bin/env node
// Writes a Llama-shaped BF16 base model and three experts (random weights, never zeros,
// no NaN or infinity) plus recipes for della, dare_ties, ties and breadcrumbs with an l2
// rescale, for the end-to-end GPU check (scripts/gpu-check.sh).
//   node scripts/gpu-e2e-models.mjs DIR [--hidden 2048] [--layers 8] [--inter 5632] [--vocab 32000]
// The four models are written by four worker threads, tensor by tensor into their shard
// files (memory: about two of the largest tensors a worker), from a seeded generator:
// the same arguments give the same bytes, so GPU runs on different days merge the same
// models. Device time is scarce: the check's 1.56 B-parameter set (12.5 GB) took most of
// a minute with one thread copying whole shards in memory.
import { closeSync, mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { Worker, isMainThread, workerData } from 'node:worker_threads';
import { INDEX_FILE, indexJson, layoutShards } from '../dist/checkpoint/writer.js';

const SHARD_SIZE = 2e9;

function tensorSpecs({ H, L, I, V }) {
  const specs = [['model.embed_tokens.weight', [V, H]]];
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}.`;
    specs.push(
      [`${p}self_attn.q_proj.weight`, [H, H]], [`${p}self_attn.k_proj.weight`, [H / 4, H]],
      [`${p}self_attn.v_proj.weight`, [H / 4, H]], [`${p}self_attn.o_proj.weight`, [H, H]],
      [`${p}mlp.gate_proj.weight`, [I, H]], [`${p}mlp.up_proj.weight`, [I, H]], [`${p}mlp.down_proj.weight`, [H, I]],
      [`${p}input_layernorm.weight`, [H]], [`${p}post_attention_layernorm.weight`, [H]],
    );
  }
  specs.push(['model.norm.weight', [H]], ['lm_head.weight', [V, H]]);
  return specs.map(([name, shape], index) => ({ name, shape, index, numel: shape.reduce((a, b) => a * b, 1) }));
}

// xorshift32, seeded per tensor and stream (0: the base, k + 1: expert k's noise).
function seedOf(tensor, stream) {
  let x = Math.imul(tensor + 1, 0x9e3779b1) ^ Math.imul(stream + 1, 0x85ebca77);
  x ^= x >>> 15;
  return (Math.imul(x, 0x2c1b3c6d) >>> 0) || 1;
}

// bf16 with a random sign, exponent 2^-12 .. 2^-5 and mantissa: finite and non-zero.
function baseTensor(t) {
  const a = new Uint16Array(t.numel);
  let x = seedOf(t.index, 0);
  for (let i = 0; i < a.length; i += 2) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    const lo = x & 0xffff, hi = x >>> 16;
    a[i] = (lo & 0x807f) | ((0x73 + ((lo >> 7) & 7)) << 7);
    if (i + 1 < a.length) a[i + 1] = (hi & 0x807f) | ((0x73 + ((hi >> 7) & 7)) << 7);
  }
  return a;
}

// An expert: the base with its four lowest mantissa bits flipped at random (a small
// delta), eight elements from each 32-bit draw.
function expertTensor(t, k, base) {
  const a = new Uint16Array(t.numel);
  let x = seedOf(t.index, k + 1);
  for (let i = 0; i < a.length; i += 8) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    const end = Math.min(i + 8, a.length);
    for (let j = i, r = x; j < end; j++, r >>>= 4) a[j] = base[j] ^ (r & 0xf);
  }
  return a;
}

function writeAll(fd, bytes, position) {
  for (let done = 0; done < bytes.length;) done += writeSync(fd, bytes, done, bytes.length - done, position + done);
}

// One model (model -1: the base; k: expert k), shard file by shard file.
function writeModel(dir, dims, model) {
  const specs = tensorSpecs(dims);
  const byName = new Map(specs.map((t) => [t.name, t]));
  const layouts = layoutShards(specs.map((t) => ({ name: t.name, dtype: 'BF16', shape: t.shape, byteLength: 2 * t.numel })), SHARD_SIZE);
  const out = join(dir, model < 0 ? 'base' : `expert${model}`);
  mkdirSync(out, { recursive: true });
  for (const l of layouts) {
    const fd = openSync(join(out, l.fileName), 'w');
    try {
      writeAll(fd, l.header, 0);
      for (const placed of l.tensors) {
        const t = byName.get(placed.name);
        const base = baseTensor(t);
        const data = model < 0 ? base : expertTensor(t, model, base);
        writeAll(fd, new Uint8Array(data.buffer), l.header.length + placed.begin);
      }
    } finally {
      closeSync(fd);
    }
  }
  if (layouts.length > 1) writeFileSync(join(out, INDEX_FILE), indexJson(layouts));
}

if (!isMainThread) {
  writeModel(workerData.dir, workerData.dims, workerData.model);
} else {
  const args = process.argv.slice(2);
  const dir = resolve(args[0] ?? 'gpu-e2e');
  const opt = (name, dflt) => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 ? Number(args[i + 1]) : dflt;
  };
  const dims = { H: opt('hidden', 2048), L: opt('layers', 8), I: opt('inter', 5632), V: opt('vocab', 32000) };
  const t0 = performance.now();
  const params = tensorSpecs(dims).reduce((a, t) => a + t.numel, 0);
  const K = 3;
  await Promise.all([-1, ...Array.from({ length: K }, (_, k) => k)].map((model) => new Promise((done, fail) => {
    const w = new Worker(new URL(import.meta.url), { workerData: { dir, dims, model } });
    w.on('error', fail);
    w.on('exit', (code) => (code === 0 ? done() : fail(new Error(`the writer of model ${model} exited with ${code}`))));
  })));
  writeFileSync(join(dir, 'base', 'config.json'), '{"model_type": "llama"}\n');
  const experts = Array.from({ length: K }, (_, k) => join(dir, `expert${k}`));
  const models = (p) => experts.map((m, k) => ({ model: m, parameters: { weight: 1 - 0.2 * k, ...p } }));
  const recipes = {
    della: { merge_method: 'della', models: models({ density: 0.4, epsilon: 0.15 }), parameters: { lambda: 1.0 } },
    dare_ties: { merge_method: 'dare_ties', models: models({ density: 0.4 }) },
    ties: { merge_method: 'ties', models: models({ density: 0.4 }) },
    breadcrumbs_l2: { merge_method: 'breadcrumbs', models: models({ density: 0.6, gamma: 0.01 }), parameters: { rescale: 'l2' } },
  };
  for (const [name, r] of Object.entries(recipes)) {
    writeFileSync(join(dir, `${name}.json`), JSON.stringify({ base_model: join(dir, 'base'), dtype: 'bfloat16', seed: 11, ...r }, null, 2));
  }
  console.log(JSON.stringify({ dir, parameters: params, bytesPerModel: params * 2, seconds: (performance.now() - t0) / 1000, recipes: Object.keys(recipes) }));
}
