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
