#!/usr/bin/env node
// Thin launcher: the CLI is compiled from lib/cli.ts into dist/, and bundled into one
// module (scripts/bundle-cli.mjs), which loads faster. The bundle is used only while it
// is at least as new as dist/cli.js, so a TypeScript rebuild without it is never shadowed.
import { statSync } from 'node:fs';

const mtime = (name) => {
  try {
    return statSync(new URL(`../dist/${name}`, import.meta.url)).mtimeMs;
  } catch {
    return -1;
  }
};
const plain = mtime('cli.js');
const { main } = await import(plain >= 0 && mtime('cli.bundle.js') >= plain ? '../dist/cli.bundle.js' : '../dist/cli.js');

// Standard output or error going away (a reader that stops early: inspect ... | head)
// or failing (a full disk) must not stop a merge half-way, as exiting here did: later
// writes to that stream are dropped, and the command finishes as it would. A failed
// standard output is reported at the end (its text did not arrive); a pipe whose reader
// left early is not.
let lostStdout = null;
process.stdout.on('error', (err) => {
  if (err.code !== 'EPIPE' && lostStdout === null) lostStdout = err;
});
process.stderr.on('error', () => {});
// (at exit: the error of the last write arrives after the command has returned)
process.on('exit', () => {
  if (lostStdout !== null && !process.exitCode) {
    process.stderr.write(`della-merge: could not write to standard output (${lostStdout.code ?? lostStdout.message})\n`);
    process.exitCode = 1;
  }
});

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => {
    process.stderr.write(`della-merge: internal error: ${err && err.stack ? err.stack : err}\n`);
    process.exitCode = 70;
  },
);
