#!/usr/bin/env node
// della-merge beside a PyTorch peer: the same [rows, cols] tensor merges (the same input
// bytes) through mergekit's formulas in PyTorch (bench/peer/mergekit_torch.py) and
// through our kernels, with the same thread count, in the same run. Prints method, K,
// dtype, both throughputs and the speedup (ours / peer); writes bench/out/peer.json.
// Without a python3 that imports torch it prints one "skipped: ..." line and exits 0:
// a measuring aid, not a test dependency.
//   node bench/peer/run.js [--threads N] [--rows R] [--cols C] [--quick] [--python PATH]
// --quick: K = 3 only, shorter timing. The interpreter is --python, else
// $DELLA_PEER_PYTHON, else the first of `python3` on PATH and /usr/bin/python3 (where
// Debian's python3-torch installs) that imports torch.
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { OPTIONS, settings } from '../lib/options.js';
import { provenance } from '../lib/provenance.js';

const { values } = parseArgs({ options: { ...OPTIONS, python: { type: 'string' } } });

// Find the interpreter first: without one, nothing else (not even the addon) is needed.
function probe(python) {
  const r = spawnSync(python, ['-c', 'import torch, platform; print(torch.__version__, platform.python_version())'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) return undefined;
  const [torchVersion, pythonVersion] = r.stdout.trim().split(/\s+/);
  return { python, torchVersion, pythonVersion };
}
const chosen = values.python ?? process.env.DELLA_PEER_PYTHON;
const candidates = chosen ? [chosen] : ['python3', '/usr/bin/python3'];
const peer = candidates.reduce((found, p) => found ?? probe(p), undefined);
if (!peer) {
  console.log(`bench/peer skipped: no Python with torch (tried ${candidates.join(', ')}); on Debian: apt-get install python3-torch`);
  process.exit(0);
}

const { loadNative } = await import('../../dist/native.js');
const { METHODS, SIZE, fill, time, mergeTask } = await import('../lib/kernel-timer.js');

const native = loadNative();
const { threads, rows, cols, numel, quick, minSeconds } = settings(values, native);
const KS = quick ? [3] : [1, 2, 3, 4];
const dtype = 'BF16';
const names = Object.keys(METHODS);

console.log(`della-merge vs the PyTorch peer: ${rows} x ${cols} ${dtype} tensor, ${threads} thread(s), ${cpus()[0]?.model ?? 'unknown CPU'}`);
console.log(`peer: mergekit formulas in torch ${peer.torchVersion}, Python ${peer.pythonVersion} (${peer.python})`);

// The same inputs for both sides: written once for the peer, kept in memory for ours.
const base = fill(dtype, numel, 1);
const experts = [2, 3, 4, 5].slice(0, Math.max(...KS)).map((s) => fill(dtype, numel, s, base.values).bytes);
const dir = mkdtempSync(join(tmpdir(), 'della-peer-'));
let peerReport;
try {
  writeFileSync(join(dir, 'base.bin'), base.bytes);
  experts.forEach((bytes, k) => writeFileSync(join(dir, `expert${k}.bin`), bytes));
  const script = new URL('./mergekit_torch.py', import.meta.url).pathname;
  const out = join(dir, 'peer.json');
  const args = [script, '--rows', String(rows), '--cols', String(cols), '--ks', KS.join(','), '--methods', names.join(','),
    '--dtype', 'bf16', '--threads', String(threads), '--min-seconds', String(minSeconds), '--inputs', dir, '--out', out];
  // libgomp's default spin-waiting collapses torch's throughput when the cores are
  // shared (100x on this 2-core VM with another job running); passive waiting costs
  // nothing measurable on tensors this large. An explicit setting wins.
  const env = { ...process.env, OMP_WAIT_POLICY: process.env.OMP_WAIT_POLICY ?? 'PASSIVE' };
  const r = spawnSync(peer.python, args, { stdio: ['ignore', 'inherit', 'inherit'], env });
  if (r.status === 0) {
    peerReport = JSON.parse(readFileSync(out, 'utf8'));
    peerReport.ompWaitPolicy = env.OMP_WAIT_POLICY;
  } else console.error(`the PyTorch peer failed (${r.error?.message ?? `exit status ${r.status ?? r.signal}`})`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
if (!peerReport) process.exit(1);

const out = new Uint8Array(numel * SIZE[dtype]);
const results = [];
console.log('method            K   dtype   peer M/s    ours M/s    speedup');
for (const K of KS) {
  for (const name of names) {
    const task = mergeTask({ name, dtype, rows, cols, base: base.bytes, experts, out, K });
    const s = await time(() => native.mergeBatch({ threads, merges: [task], copies: [] }), minSeconds);
    const p = peerReport.results.find((x) => x.method === name && x.K === K);
    const row = {
      method: name, K, dtype, threads, peerSeconds: p.seconds, peerMparamsPerSecond: p.mparamsPerSecond,
      oursSeconds: s, oursMparamsPerSecond: numel / s / 1e6, speedup: p.seconds / s,
    };
    results.push(row);
    console.log(`${name.padEnd(17)} ${K}   ${dtype.padEnd(5)} ${row.peerMparamsPerSecond.toFixed(2).padStart(10)}  ${row.oursMparamsPerSecond.toFixed(1).padStart(10)}  ${row.speedup.toFixed(1).padStart(8)}x`);
  }
}
mkdirSync(new URL('../out/', import.meta.url), { recursive: true });
const file = new URL('../out/peer.json', import.meta.url);
writeFileSync(file, `${JSON.stringify({
  ...provenance(), threads, rows, cols, dtype,
  peer: { ...peerReport, results: undefined }, results,
}, null, 2)}\n`);
console.log(`wrote ${file.pathname}`);
