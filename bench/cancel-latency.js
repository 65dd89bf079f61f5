#!/usr/bin/env node
// How soon Ctrl-C ends `della-merge run`: SIGINT is sent --after milliseconds into the
// merge of RECIPE (pick a moment inside a large tensor), and the time from the signal to
// the process's exit is measured, --runs times. Prints a table and writes
// bench/out/cancel-latency.json. With DELLA_SLAB_BYTES=4294967296 in the environment
// every tensor is staged whole (as before step 87), so its merge cannot stop inside one.
//   node bench/cancel-latency.js RECIPE [--after 1000,1500] [--runs 2]
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { provenance } from './lib/provenance.js';

const { values, positionals } = parseArgs({ allowPositionals: true, options: { after: { type: 'string' }, runs: { type: 'string' } } });
if (positionals.length !== 1) {
  console.error('usage: node bench/cancel-latency.js RECIPE [--after MS[,MS...]] [--runs N]');
  process.exit(2);
}
const recipe = positionals[0];
const afters = (values.after ?? '1000,1500').split(',').map(Number);
const runs = Number(values.runs ?? 2);
const root = new URL('..', import.meta.url).pathname;
const parent = mkdtempSync(join(tmpdir(), 'della-cancel-'));

function once(after) {
  return new Promise((resolve) => {
    const out = join(parent, 'out');
    rmSync(out, { recursive: true, force: true });
    const child = spawn(process.execPath, [join(root, 'bin/della-merge.js'), 'run', recipe, '--out', out], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '', sent = 0;
    child.stderr.on('data', (d) => { err += d; });
    const timer = setTimeout(() => { sent = performance.now(); child.kill('SIGINT'); }, after);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ after, exitCode: code, secondsToExit: sent ? (performance.now() - sent) / 1000 : null, message: err.trim().split(/\r|\n/).pop() });
    });
  });
}

const rows = [];
console.log(`della-merge run ${recipe}: SIGINT after ${afters.join(', ')} ms, ${runs} runs each; slabs: ${process.env.DELLA_SLAB_BYTES ?? 'default'}`);
console.log('after (ms)   exit   seconds from SIGINT to exit');
for (let i = 0; i < runs; i++) {
  for (const after of afters) {
    const r = await once(after);
    rows.push(r);
    console.log(`${String(after).padStart(10)}   ${String(r.exitCode).padStart(4)}   ${r.secondsToExit === null ? 'finished before the signal' : r.secondsToExit.toFixed(2)}`);
  }
}
rmSync(parent, { recursive: true, force: true });
mkdirSync(new URL('./out/', import.meta.url), { recursive: true });
writeFileSync(new URL('./out/cancel-latency.json', import.meta.url), `${JSON.stringify({ ...provenance(), recipe, slabBytes: process.env.DELLA_SLAB_BYTES ?? null, rows }, null, 2)}\n`);
