#!/usr/bin/env node
// Thin launcher: the CLI is compiled from lib/cli.ts into dist/.
import { main } from '../dist/cli.js';

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => {
    process.stderr.write(`della-merge: internal error: ${err && err.stack ? err.stack : err}\n`);
    process.exitCode = 70;
  },
);
