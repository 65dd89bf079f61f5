#!/usr/bin/env node
// Prints the markdown tables of bench/RESULTS.md from the JSON the benchmarks wrote, so
// that no figure is copied by hand:
//   node bench/tables.js [dir]     (default bench/results)
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

const dir = process.argv[2] ?? new URL('./results/', import.meta.url).pathname;
const load = (f) => (existsSync(join(dir, f)) ? JSON.parse(readFileSync(join(dir, f), 'utf8')) : null);
const f1 = (x) => x.toFixed(1);
const at = (r) => `${r.date}${r.commit ? `, commit \`${r.commit}\`` : ''}`;
const METHODS = ['della', 'della_linear', 'dare_ties', 'ties', 'task_arithmetic'];

const kernels = load('kernels.json');
if (kernels) {
  console.log(`### Kernels: ${kernels.rows} × ${kernels.cols}, ${kernels.threads} threads, ${at(kernels)}\n`);
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
  console.log(`### End to end (${f}): ${f1(e[0].parametersPerModel / 1e6)} M parameters per model, K = ${e[0].experts}, ${e[0].dtype}, ${e[0].threads} threads, ${at(e[0])}\n`);
  console.log('| method | input | read inputs once | merge (best of 2) | ratio to the floor | M parameters/s | peak private memory | peak RSS |');
  console.log('|---|---|---|---|---|---|---|---|');
  for (const r of e) {
    console.log(`| ${r.method} | ${(r.inputBytes / 1e9).toFixed(2)} GB | ${r.readOnceSeconds.toFixed(2)} s | ${r.mergeSeconds.toFixed(2)} s | ${f1(r.ratioToReadOnce)}× | ${f1(r.mParamsPerSecond)} | ${(r.peakAnonBytes / 2 ** 20).toFixed(0)} MiB | ${r.peakRssBytes === undefined ? 'not measured' : `${(r.peakRssBytes / 2 ** 20).toFixed(0)} MiB`} |`);
  }
  console.log();
}

// Tensors written slab by slab against staged whole (step 86): the same models, each
// e2e-<name>-whole.json (DELLA_SLAB_BYTES=2^32: nothing slabbed) beside e2e-<name>-slabs.json.
for (const f of readdirSync(dir).filter((x) => /^e2e-.+-whole\.json$/.test(x)).sort()) {
  const whole = [load(f)].flat(), slabs = [load(f.replace(/-whole\.json$/, '-slabs.json'))].flat().filter(Boolean);
  if (slabs.length === 0) continue;
  const w0 = whole[0];
  const vocab = w0.vocab ? `, embedding and lm_head [${w0.vocab}, 4096]` : '';
  console.log(`### Slab by slab against staged whole (${f.replace(/-whole\.json$/, '')}): ${f1(w0.parametersPerModel / 1e6)} M parameters per model${vocab}, K = ${w0.experts}, ${w0.dtype}, ${w0.threads} threads, ${at(w0)}\n`);
  console.log('| method | read inputs once | staged whole: merge | peak private | slab by slab: merge | peak private | M parameters/s, whole → slabs |');
  console.log('|---|---|---|---|---|---|---|');
  for (const w of whole) {
    const s = slabs.find((x) => x.method === w.method);
    if (!s) continue;
    const mib = (b) => `${(b / 2 ** 20).toFixed(0)} MiB`;
    console.log(`| ${w.method} | ${w.readOnceSeconds.toFixed(2)} s, ${s.readOnceSeconds.toFixed(2)} s | ${w.mergeSeconds.toFixed(2)} s | ${mib(w.peakAnonBytes)} | ${s.mergeSeconds.toFixed(2)} s | ${mib(s.peakAnonBytes)} | ${f1(w.mParamsPerSecond)} → ${f1(s.mParamsPerSecond)} |`);
  }
  console.log();
}

const peer = load('peer.json');
if (peer) {
  console.log(`### Against the PyTorch peer: ${peer.rows} × ${peer.cols} ${peer.dtype}, ${peer.threads} threads, torch ${peer.peer.torch}, ${at(peer)}\n`);
  console.log('| method | K | peer M/s | ours M/s | speedup |');
  console.log('|---|---|---|---|---|');
  for (const r of peer.results) {
    console.log(`| ${r.method} | ${r.K} | ${r.peerMparamsPerSecond.toFixed(2)} | ${f1(r.oursMparamsPerSecond)} | ${f1(r.speedup)}× |`);
  }
  console.log();
}

// Every end-to-end run from a fresh clone (bench/results/fresh-clone-<commit>/e2e-1b*.json),
// oldest first, and per method how many met the CPU speed issue's target.
const cloneDirs = existsSync(dir) ? readdirSync(dir).filter((d) => /^fresh-clone-[0-9a-f]+$/.test(d)) : [];
const runs = [];
for (const d of cloneDirs) {
  for (const f of readdirSync(join(dir, d)).filter((x) => /^e2e-1b.*\.json$/.test(x))) {
    const e = JSON.parse(readFileSync(join(dir, d, f), 'utf8'));
    const rows = Array.isArray(e) ? e : [e];
    runs.push({ commit: rows[0].commit ?? d.slice('fresh-clone-'.length), date: rows[0].date, rows });
  }
}
if (runs.length) {
  runs.sort((a, b) => a.date.localeCompare(b.date));
  const TARGETS = { della: 200, ties: 300, dare_ties: 300 };
  const RUN_METHODS = ['della', 'ties', 'dare_ties', 'task_arithmetic'];
  console.log('### End to end from fresh clones, 1 B parameters per model, K = 3 BF16 (M parameters/s; task arithmetic as its ratio to reading the inputs once)\n');
  console.log(`| date (UTC) | commit | read inputs once | ${RUN_METHODS.join(' | ')} | peak private memory |`);
  console.log(`|---|---|---|${RUN_METHODS.map(() => '---').join('|')}|---|`);
  for (const run of runs) {
    const cell = (m) => {
      const r = run.rows.find((x) => x.method === m);
      if (!r) return '–';
      return m === 'task_arithmetic' ? `${f1(r.ratioToReadOnce)}×` : f1(r.mParamsPerSecond);
    };
    const peak = Math.max(...run.rows.map((r) => r.peakAnonBytes)) / 2 ** 20;
    console.log(`| ${run.date.slice(0, 16).replace('T', ' ')} | \`${run.commit}\` | ${run.rows[0].readOnceSeconds.toFixed(2)} s | ${RUN_METHODS.map(cell).join(' | ')} | ${peak.toFixed(0)} MiB |`);
  }
  console.log();
  const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const h = s.length >> 1; return s.length % 2 ? s[h] : (s[h - 1] + s[h]) / 2; };
  for (const m of RUN_METHODS) {
    const got = runs.map((run) => run.rows.find((x) => x.method === m)).filter(Boolean);
    if (!got.length) continue;
    const v = got.map((r) => (m === 'task_arithmetic' ? r.ratioToReadOnce : r.mParamsPerSecond));
    const met = m === 'task_arithmetic' ? v.filter((x) => x <= 2).length : v.filter((x) => x >= TARGETS[m]).length;
    const unit = m === 'task_arithmetic' ? '×' : ' M/s';
    const target = m === 'task_arithmetic' ? '≤ 2× the read' : `≥ ${TARGETS[m]} M/s`;
    console.log(`- ${m}: ${got.length} run${got.length === 1 ? "" : "s"}, ${f1(Math.min(...v))}–${f1(Math.max(...v))}${unit}, median ${f1(median(v))}${unit}; ${target} in ${met} of ${got.length}`);
  }
  console.log();
}
