#!/usr/bin/env node
// Kernel throughput: merges of one 4096 x 4096 tensor with K experts, per method and
// dtype, beside a memcpy of the same bytes (inputs + output) through the same thread
// pool in the same run. Prints a table and writes bench/out/kernels.json.
//   node bench/kernels.js [--threads N] [--rows R] [--cols C] [--quick]
import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { parseArgs } from 'node:util';
import { loadNative } from '../dist/native.js';
import { METHODS, SIZE, fill, time, mergeTask } from './lib/kernel-timer.js';
import { OPTIONS, settings } from './lib/options.js';
import { provenance } from './lib/provenance.js';

const { values } = parseArgs({ options: OPTIONS });
const native = loadNative();
const { threads, rows, cols, numel, quick, minSeconds } = settings(values, native);

const DTYPES = quick ? ['BF16'] : ['BF16', 'F16', 'F32'];
const KS = quick ? [3] : [1, 2, 3, 4];

const results = [];
console.log(`della-merge kernel benchmark: ${rows} x ${cols} tensor, ${threads} thread(s), ${cpus()[0]?.model ?? 'unknown CPU'}`);
console.log('method            dtype  K   M params/s   GB/s moved   memcpy GB/s   merge/memcpy');
for (const dtype of DTYPES) {
  const base = fill(dtype, numel, 1);
  const experts = [2, 3, 4, 5].map((s) => fill(dtype, numel, s, base.values).bytes);
  const out = new Uint8Array(numel * SIZE[dtype]);
  for (const K of KS) {
    const moved = (K + 2) * numel * SIZE[dtype];
    const src = new Uint8Array(moved), dst = new Uint8Array(moved);
    src.fill(1); dst.fill(2);
    const memcpy = await time(() => native.mergeBatch({ threads, merges: [], copies: [{ src, dst }] }), minSeconds);
    for (const name of Object.keys(METHODS)) {
      const task = mergeTask({ name, dtype, rows, cols, base: base.bytes, experts, out, K });
      const s = await time(() => native.mergeBatch({ threads, merges: [task], copies: [] }), minSeconds);
      const row = {
        method: name, dtype, K, threads, seconds: s, mparamsPerSecond: numel / s / 1e6, gbPerSecond: moved / s / 1e9,
        memcpySeconds: memcpy, memcpyGbPerSecond: moved / memcpy / 1e9, ratioToMemcpy: s / memcpy,
      };
      results.push(row);
      console.log(`${name.padEnd(17)} ${dtype.padEnd(5)} ${K}   ${row.mparamsPerSecond.toFixed(1).padStart(10)}   ${row.gbPerSecond.toFixed(2).padStart(10)}   ${row.memcpyGbPerSecond.toFixed(2).padStart(11)}   ${row.ratioToMemcpy.toFixed(1).padStart(10)}x`);
    }
  }
}
mkdirSync(new URL('./out/', import.meta.url), { recursive: true });
// The full default table is kernels.json; quick or thread-limited runs get their own file.
const file = new URL(quick || values.threads ? `./out/kernels${quick ? '-quick' : ''}-t${threads}.json` : './out/kernels.json', import.meta.url);
writeFileSync(file, `${JSON.stringify({ ...provenance(), threads, rows, cols, results }, null, 2)}\n`);
console.log(`wrote ${file.pathname}`);
