#!/usr/bin/env node
// Writes a base model and two experts that each hold one BF16 tensor over 4 GiB (by
// default [65537, 32768]: a 64k-token embedding, 4 GiB + 64 KiB) plus recipes for della
// and ties, for the GPU check's run across the 4 GiB line (scripts/gpu-check.sh, 4e).
//   node scripts/gpu-huge-model.mjs DIR [--rows 65537] [--cols 32768]
// The files are sparse: holes read as zeros, and a few rows are random (the first two,
// the three around element 2^31, where a 32-bit byte or element offset would wrap, and
// the last), so that writing them takes no time and no disk.
import { closeSync, ftruncateSync, mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join, resolve } from 'node:path';

const args = process.argv.slice(2);
const dir = args[0];
const opt = (name, fallback) => {
  const i = args.indexOf(name);
  return i < 0 ? fallback : Number(args[i + 1]);
};
const rows = opt('--rows', 65537), cols = opt('--cols', 32768);
if (!dir || !(Number.isSafeInteger(rows) && rows > 0) || !(Number.isSafeInteger(cols) && cols > 0)) {
  console.error('usage: node scripts/gpu-huge-model.mjs DIR [--rows N] [--cols N]');
  process.exit(2);
}
const bytes = rows * cols * 2;
const line = Math.floor(2 ** 31 / cols);
const dense = [...new Set([0, 1, line - 1, line, line + 1, rows - 1])].filter((r) => r >= 0 && r < rows);

// xorshift32; bf16 with a random sign, exponent 2^-12 .. 2^-5 and mantissa (finite, non-zero).
function rowBytes(seed) {
  let x = seed >>> 0 || 1;
  const b = Buffer.alloc(cols * 2);
  for (let i = 0; i < cols; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b.writeUInt16LE(((x & 1) << 15) | ((115 + ((x >>> 1) & 7)) << 7) | ((x >>> 4) & 0x7f), 2 * i);
  }
  return b;
}

function model(name, stream) {
  const d = join(dir, name);
  mkdirSync(d, { recursive: true });
  const json = Buffer.from(JSON.stringify({
    'model.embed_tokens.weight': { dtype: 'BF16', shape: [rows, cols], data_offsets: [0, bytes] },
    'model.norm.weight': { dtype: 'BF16', shape: [cols], data_offsets: [bytes, bytes + 2 * cols] },
  }));
  const head = Buffer.alloc(8 + json.length);
  head.writeBigUInt64LE(BigInt(json.length));
  json.copy(head, 8);
  const fd = openSync(join(d, 'model.safetensors'), 'w');
  writeSync(fd, head, 0, head.length, 0);
  ftruncateSync(fd, head.length + bytes + 2 * cols);
  for (const r of dense) writeSync(fd, rowBytes(Math.imul(r + 1, 0x9e3779b1) ^ stream), 0, 2 * cols, head.length + r * cols * 2);
  writeSync(fd, rowBytes(0x51ed ^ stream), 0, 2 * cols, head.length + bytes);
  closeSync(fd);
  return d;
}

const base = model('base', 1);
const experts = [model('expert1', 2), model('expert2', 3)];
const recipe = (method, parameters) => ({
  merge_method: method, base_model: resolve(base),
  models: experts.map((e) => ({ model: resolve(e), parameters: { weight: 0.5, ...parameters } })),
  seed: 7,
});
writeFileSync(join(dir, 'della.json'), JSON.stringify(recipe('della', { density: 0.5, epsilon: 0.1 }), null, 2));
writeFileSync(join(dir, 'ties.json'), JSON.stringify(recipe('ties', { density: 0.5 }), null, 2));
console.log(JSON.stringify({ rows, cols, tensorBytes: bytes, denseRows: dense }));
