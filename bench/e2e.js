#!/usr/bin/env node
// End-to-end merge benchmark: generates a base and K experts (BF16, Llama-shaped
// layers) of --params parameters each, then times `della-merge run` from page-cached
// files beside the time to read every input file once (the floor), and samples the
// merge process's peak private (anonymous) memory from /proc. Prints a table and writes
// bench/out/e2e.json.
//   node bench/e2e.js [--params 200e6] [--experts 3] [--method della[,ties,...]] [--threads N] [--keep DIR]
//                     [--device cuda[:N]] [--gpu-memory BYTES] [--out DIR] [--verify] [--vocab N]
// Several methods (comma-separated) are timed on the same generated models, each best
// of two runs. --device runs the merges on a GPU (the rows then also give the run's
// phases: opening the device is part of the time); --out DIR writes the merged model
// into a new directory under DIR (removed afterwards) instead of beside the models,
// e.g. --out /dev/shm to leave the disk's write speed out. --verify also times
// `della-merge verify` of each method's last merge (once, with its peak RSS). --vocab N
// adds an embedding and an lm_head of [N, 4096] (Llama-3's N = 128256: 1 GiB each), the
// tensors that decide peak memory when outputs are staged whole.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, readSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { saveModel } from '../dist/index.js';
import { provenance } from './lib/provenance.js';

const { values } = parseArgs({ options: {
  params: { type: 'string' }, experts: { type: 'string' }, method: { type: 'string' }, threads: { type: 'string' }, keep: { type: 'string' },
  device: { type: 'string' }, 'gpu-memory': { type: 'string' }, out: { type: 'string' }, verify: { type: 'boolean' },
  vocab: { type: 'string' },
} });
const device = values.device ?? 'cpu';
const target = Number(values.params ?? 200e6);
const K = Number(values.experts ?? 3);
const methods = (values.method ?? 'della').split(',').map((m) => m.trim()).filter(Boolean);
const hidden = 4096, ffn = 11008;
const root = new URL('..', import.meta.url).pathname;
const dir = values.keep ?? mkdtempSync(join(tmpdir(), 'della-e2e-'));

// Layers of 4 attention [h, h] and 3 MLP [ffn, h] matrices until the target is reached.
const perLayer = 4 * hidden * hidden + 3 * ffn * hidden;
const layers = Math.max(1, Math.round(target / perLayer));
const vocab = Number(values.vocab ?? 0);
const params = layers * perLayer + 2 * vocab * hidden;

function gen(seed, k) {
  let x = (seed * 2654435761) >>> 0 || 1;
  return (n, around) => {
    const out = new Uint16Array(n);
    for (let i = 0; i < n; i++) {
      x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
      // base: small bf16 values; experts: the base with the low mantissa bits nudged
      out[i] = around ? (around[i] + ((x >>> 29) - 4) * (k + 1)) & 0xffff : 0x3c00 + (x & 0x3ff) - (x & 0x8000 ? 0x800 : 0);
    }
    return out;
  };
}

function writeModels() {
  if (readdirSync(dir).includes('expert0')) return; // reuse with --keep
  const layerShapes = (l) => l === 'E'
    ? [['model.embed_tokens.weight', [vocab, hidden]], ['lm_head.weight', [vocab, hidden]]]
    : [
      ...['q_proj', 'k_proj', 'v_proj', 'o_proj'].map((p) => [`model.layers.${l}.self_attn.${p}.weight`, [hidden, hidden]]),
      ...['gate_proj', 'up_proj'].map((p) => [`model.layers.${l}.mlp.${p}.weight`, [ffn, hidden]]),
      [`model.layers.${l}.mlp.down_proj.weight`, [hidden, ffn]],
    ];
  for (const l of [...Array.from({ length: layers }, (_, i) => i), ...(vocab > 0 ? ['E'] : [])]) {
    const li = l === 'E' ? layers : l;
    for (const [name, shape] of layerShapes(l)) {
      const n = shape[0] * shape[1];
      const base = gen(li * 31 + name.length, -1)(n);
      const models = [base, ...Array.from({ length: K }, (_, k) => gen(li * 97 + k + 7, k)(n, base))];
      models.forEach((data, m) => {
        const d = join(dir, m === 0 ? 'base' : `expert${m - 1}`, `layer${l}`);
        mkdirSync(d, { recursive: true });
        saveModel(join(d, name.replace(/\./g, '_')), [{ name, dtype: 'BF16', shape, data }]);
      });
    }
  }
  // Gather every tensor file of a model into one directory of shards.
  for (const m of ['base', ...Array.from({ length: K }, (_, k) => `expert${k}`)]) {
    const shards = join(dir, m, 'shards');
    mkdirSync(shards, { recursive: true });
    for (const l of readdirSync(join(dir, m)).filter((x) => x.startsWith('layer'))) {
      for (const t of readdirSync(join(dir, m, l))) {
        writeFileSync(join(shards, `${l}-${t}.safetensors`), readFileSync(join(dir, m, l, t, 'model.safetensors')));
      }
      rmSync(join(dir, m, l), { recursive: true });
    }
  }
}

function inputFiles() {
  return ['base', ...Array.from({ length: K }, (_, k) => `expert${k}`)].flatMap((m) =>
    readdirSync(join(dir, m, 'shards')).map((f) => join(dir, m, 'shards', f)));
}

function readAll(files) {
  const buf = Buffer.alloc(64 << 20);
  let bytes = 0;
  const t = performance.now();
  for (const f of files) {
    const fd = openSync(f, 'r');
    let n;
    while ((n = readSync(fd, buf, 0, buf.length, null)) > 0) bytes += n;
    closeSync(fd);
  }
  return { seconds: (performance.now() - t) / 1000, bytes };
}

function runMerge(recipe, out, threads) {
  return runCli([join(root, 'bin/della-merge.js'), 'run', recipe, '--out', out, '--json', ...(threads ? ['--threads', threads] : []),
    ...(values.device ? ['--device', values.device] : []), ...(values['gpu-memory'] ? ['--gpu-memory', values['gpu-memory']] : [])]);
}

/** Runs the CLI with `args`, timing it and sampling its peak memory; resolves with its --json report. */
function runCli(args) {
  return new Promise((resolve, reject) => {
    const t = performance.now();
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let stdout = '', peakAnon = 0, peakRss = 0;
    child.stdout.on('data', (d) => { stdout += d; });
    const poll = setInterval(() => {
      try {
        const status = readFileSync(`/proc/${child.pid}/status`, 'utf8');
        const m = /RssAnon:\s+(\d+) kB/.exec(status);
        if (m) peakAnon = Math.max(peakAnon, Number(m[1]) * 1024);
        // All resident pages, the mapped input files' included.
        const h = /VmHWM:\s+(\d+) kB/.exec(status);
        if (h) peakRss = Math.max(peakRss, Number(h[1]) * 1024);
      } catch { /* exited */ }
    }, 20);
    child.on('exit', (code) => {
      clearInterval(poll);
      if (code !== 0) return reject(new Error(`della-merge ${args[1]} exited ${code}`));
      resolve({ seconds: (performance.now() - t) / 1000, peakAnon, peakRss, report: JSON.parse(stdout) });
    });
  });
}

mkdirSync(dir, { recursive: true });
console.log(`della-merge end-to-end benchmark: ${methods.join(', ')}, K = ${K}, BF16, ${(params / 1e6).toFixed(0)} M parameters per model (${layers} layers${vocab ? `, embedding and lm_head [${vocab}, ${hidden}]` : ''}), ${cpus().length} cores (${cpus()[0]?.model}), device ${device}`);
console.log(`models in ${dir}`);
writeModels();
// Flush the generated files to disk first: otherwise their writeback (8 GB at 1 B
// parameters) runs during the timed merges and slows them by a tenth or more.
spawnSync('sync', [], { stdio: 'ignore' });
const files = inputFiles();
readAll(files); // warm the page cache
const floor = [readAll(files), readAll(files)].sort((a, b) => a.seconds - b.seconds)[0];
const outParent = values.out ? mkdtempSync(join(values.out, 'della-e2e-')) : null;
const out = outParent ? join(outParent, 'merged') : join(dir, 'merged');
const rows = [];
console.log('method            read inputs once   merge (best of 2)   ratio   M params/s   peak private memory   peak RSS');
for (const method of methods) {
  const recipe = join(dir, `recipe-${method}.yaml`);
  const params_ = method === 'task_arithmetic' ? '{ weight: 1.0 }'
    : `{ weight: 1.0, density: 0.5${method.startsWith('della') ? ', epsilon: 0.1' : ''} }`;
  const models = Array.from({ length: K }, (_, k) => `  - model: ${join(dir, `expert${k}`, 'shards')}\n    parameters: ${params_}`).join('\n');
  writeFileSync(recipe, `merge_method: ${method}\nbase_model: ${join(dir, 'base', 'shards')}\nmodels:\n${models}\nseed: 1\n`);
  readAll(files); // the previous merge's output may have pushed inputs out of the page cache
  const runs = [];
  for (let i = 0; i < 2; i++) {
    // Untimed: the previous merge's output is removed (a merge into a new directory is
    // the usual case; replacing 2 GB with --overwrite adds its removal, 0.4-0.6 s on a
    // file system mounted with `discard`), and anything still being written back to
    // disk is flushed so that it does not overlap this merge.
    rmSync(out, { recursive: true, force: true });
    spawnSync('sync', [], { stdio: 'ignore' });
    runs.push(await runMerge(recipe, out, values.threads));
  }
  const best = runs.sort((a, b) => a.seconds - b.seconds)[0];
  const row = {
    ...provenance(), method, experts: K, dtype: 'BF16',
    parametersPerModel: params, vocab, slabBytes: process.env.DELLA_SLAB_BYTES ?? null, inputBytes: floor.bytes, readOnceSeconds: floor.seconds,
    mergeSeconds: best.seconds, mergeSecondsAll: runs.map((r) => r.seconds), ratioToReadOnce: best.seconds / floor.seconds,
    mParamsPerSecond: params / best.seconds / 1e6, peakAnonBytes: Math.max(...runs.map((r) => r.peakAnon)),
    peakRssBytes: Math.max(...runs.map((r) => r.peakRss)), threads: best.report.threads,
    device: best.report.device, phases: best.report.phases, outputDir: out,
  };
  rows.push(row);
  console.log(`${method.padEnd(17)} ${floor.seconds.toFixed(2).padStart(8)} s   ${best.seconds.toFixed(2).padStart(12)} s   ${row.ratioToReadOnce.toFixed(1).padStart(6)}x   ${row.mParamsPerSecond.toFixed(1).padStart(9)}   ${(row.peakAnonBytes / 2 ** 20).toFixed(0).padStart(8)} MiB   ${(row.peakRssBytes / 2 ** 20).toFixed(0).padStart(13)} MiB`);
  if (values.verify) {
    // The output of the last merge (the inputs are still page-cached: only the check is timed).
    const v = await runCli([join(root, 'bin/della-merge.js'), 'verify', out, '--recipe', recipe, '--json']);
    if (!v.report.ok) throw new Error(`verify of the ${method} merge failed: ${JSON.stringify(v.report.problems)}`);
    Object.assign(row, { verifySeconds: v.seconds, verifyPeakRssBytes: v.peakRss, verifyRowsChecked: v.report.rowsChecked });
    console.log(`${''.padEnd(17)} verify ${v.seconds.toFixed(2)} s (${(params / v.seconds / 1e6).toFixed(1)} M params/s), peak RSS ${(v.peakRss / 2 ** 20).toFixed(0)} MiB`);
  }
  if (device !== 'cpu') {
    const p = best.report.phases;
    console.log(`${''.padEnd(17)} on ${best.report.device}: device ${p.device.toFixed(2)} s, setup ${p.setup.toFixed(2)} s, merge ${p.merge.toFixed(2)} s (${(floor.bytes / p.merge / 1e9).toFixed(1)} GB/s of inputs), flush ${p.flush.toFixed(2)} s`);
  }
}
if (outParent) rmSync(outParent, { recursive: true, force: true });
mkdirSync(new URL('./out/', import.meta.url), { recursive: true });
writeFileSync(new URL('./out/e2e.json', import.meta.url), `${JSON.stringify(rows.length === 1 ? rows[0] : rows, null, 2)}\n`);
if (!values.keep) rmSync(dir, { recursive: true, force: true });
