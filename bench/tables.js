#!/usr/bin/env node
// Prints the markdown tables of bench/RESULTS.md from the JSON the benchmarks wrote, so
// that no figure is copied by hand:
//   node bench/tables.js [dir]     (default bench/results)
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

const dir = process.argv[2] ?? new URL('./results/', import.meta.url).pathname;
const load = (f) => (existsSync(join(dir, f)) ? JSON.parse(readFileSync(join(dir, f), 'utf8')) : null);
const f1 = (x) => x.toFixed(1);
const METHODS = ['della', 'della_linear', 'dare_ties', 'ties', 'task_arithmetic'];

const kernels = load('kernels.json');
if (kernels) {
  console.log(`### Kernels: ${kernels.rows} × ${kernels.cols}, ${kernels.threads} threads, ${kernels.date}\n`);
  console.log(`| dtype | K | ${METHODS.map((m) => `${m} M/s (×memcpy)`).join(' | ')} | memcpy GB/s |`);
  console.log(`|---|---|${METHODS.map(() => '---').join('|')}|---|`);
  const keys = [...new Set(kernels.results.map((r) => `${r.dtype}|${r.K}`))];
  for (const key of keys) {
    const [dtype, K] = key.split('|');
    const rows = kernels.results.filter((r) => r.dtype === dtype && String(r.K) === K);
    const cell = (m) => {
      const r = rows.find((x) => x.method === m);
      return r ? `${f1(r.mparamsPerSecond)} (${f1(r.ratioToMemcpy)}×)` : '–';
    };
    console.log(`| ${dtype} | ${K} | ${METHODS.map(cell).join(' | ')} | ${f1(rows[0].memcpyGbPerSecond)} |`);
  }
  console.log();
}

const scaling = [1, 2].map((t) => load(`kernels-quick-t${t}.json`)).filter(Boolean);
if (scaling.length) {
  console.log('### Thread scaling, K = 3, BF16 (M parameters/s)\n');
  console.log(`| threads | ${METHODS.join(' | ')} | memcpy GB/s |`);
  console.log(`|---|${METHODS.map(() => '---').join('|')}|---|`);
  for (const s of scaling) {
    const cell = (m) => f1(s.results.find((r) => r.method === m)?.mparamsPerSecond ?? NaN);
    console.log(`| ${s.threads} | ${METHODS.map(cell).join(' | ')} | ${f1(s.results[0].memcpyGbPerSecond)} |`);
  }
  console.log();
}

for (const f of ['e2e-1b.json', 'e2e.json']) {
  let e = load(f);
  if (!e) continue;
  e = Array.isArray(e) ? e : [e];
  console.log(`### End to end (${f}): ${f1(e[0].parametersPerModel / 1e6)} M parameters per model, K = ${e[0].experts}, ${e[0].dtype}, ${e[0].threads} threads, ${e[0].date}\n`);
  console.log('| method | input | read inputs once | merge (best of 2) | ratio to the floor | M parameters/s | peak private memory | peak RSS |');
  console.log('|---|---|---|---|---|---|---|---|');
  for (const r of e) {
    console.log(`| ${r.method} | ${(r.inputBytes / 1e9).toFixed(2)} GB | ${r.readOnceSeconds.toFixed(2)} s | ${r.mergeSeconds.toFixed(2)} s | ${f1(r.ratioToReadOnce)}× | ${f1(r.mParamsPerSecond)} | ${(r.peakAnonBytes / 2 ** 20).toFixed(0)} MiB | ${r.peakRssBytes === undefined ? 'not measured' : `${(r.peakRssBytes / 2 ** 20).toFixed(0)} MiB`} |`);
  }
  console.log();
}

const peer = load('peer.json');
if (peer) {
  console.log(`### Against the PyTorch peer: ${peer.rows} × ${peer.cols} ${peer.dtype}, ${peer.threads} threads, torch ${peer.peer.torch}, ${peer.date}\n`);
  console.log('| method | K | peer M/s | ours M/s | speedup |');
  console.log('|---|---|---|---|---|');
  for (const r of peer.results) {
    console.log(`| ${r.method} | ${r.K} | ${r.peerMparamsPerSecond.toFixed(2)} | ${f1(r.oursMparamsPerSecond)} | ${f1(r.speedup)}× |`);
  }
  console.log();
}
