#!/usr/bin/env node
// Thin launcher: the CLI is compiled from lib/cli.ts into dist/.
import { main } from '../dist/cli.js';

// A reader that stops early (della-merge inspect ... | head) is not an error.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (err) => {
    if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw err;
  });
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err) => {
    process.stderr.write(`della-merge: internal error: ${err && err.stack ? err.stack : err}\n`);
    process.exitCode = 70;
  },
);
