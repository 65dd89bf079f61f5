#!/usr/bin/env node
// npm install hook: use a prebuilt binary (prebuilds/) or an existing local build when
// one loads; otherwise build the addon from source with cmake-js.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);

function loads() {
  try {
    const addon = require('node-gyp-build')(root);
    return typeof addon.mergeBatch === 'function';
  } catch {
    return false;
  }
}

if (process.env.DELLA_FORCE_BUILD !== '1' && loads()) {
  process.exit(0);
}

let cmakeJs;
try {
  cmakeJs = require.resolve('cmake-js/bin/cmake-js');
} catch {
  console.error('della-merge: no prebuilt binary fits this platform and cmake-js is not installed to build one.');
  process.exit(1);
}
console.error('della-merge: no prebuilt binary for this platform; building the native addon from source (needs CMake and a C++17 compiler)...');
let r = spawnSync(process.execPath, [cmakeJs, 'compile', '--out', 'build'], { cwd: root, stdio: 'inherit' });
if (r.status !== 0) {
  // The CUDA plugin is optional: a broken or unsupported CUDA toolkit must not stop the
  // install. Build the CPU addon alone (merges then run on the CPU; doctor says why).
  console.error('della-merge: the build failed; retrying without the CUDA plugin (-DDELLA_CUDA=OFF)...');
  r = spawnSync(process.execPath, [cmakeJs, 'rebuild', '--out', 'build', '--CDDELLA_CUDA=OFF'], { cwd: root, stdio: 'inherit' });
  if (r.status === 0) console.error('della-merge: built without the CUDA plugin: --device cuda is unavailable on this installation.');
}
if (r.status !== 0) {
  console.error(
    'della-merge: building the native addon failed. Install CMake (>= 3.18) and a C++17 compiler ' +
      '(e.g. "apt-get install cmake g++"), then run "npm rebuild della-merge".',
  );
  process.exit(r.status ?? 1);
}
