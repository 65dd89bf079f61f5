#!/usr/bin/env node
// prebuildify calls node-gyp ("rebuild --target=.. --arch=.. --release ..."); this shim
// answers as node-gyp by running cmake-js, which builds for Node-API from
// node-api-headers (offline). DELLA_PORTABLE links the C++ runtime statically so the
// binary needs only the system's C library, and never uses -march=native.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const args = process.argv.slice(2);
const arch = (args.find((a) => a.startsWith('--arch=')) ?? `--arch=${process.arch}`).slice('--arch='.length);
const debug = args.includes('--debug');
const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
const r = spawnSync(process.execPath, [cmakeJs, 'rebuild', '--out', 'build', '--arch', arch, '--CDDELLA_PORTABLE=ON', ...(debug ? ['--debug'] : [])], {
  cwd: root,
  stdio: 'inherit',
});
process.exit(r.status ?? 1);
