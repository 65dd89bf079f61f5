#!/usr/bin/env node
// prebuildify calls node-gyp ("rebuild --target=.. --arch=.. --release ..."); this shim
// answers as node-gyp by running cmake-js, which builds for Node-API from
// node-api-headers (offline). DELLA_PORTABLE links the C++ runtime statically so the
// binary needs only the system's C library, and never uses -march=native.
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const args = process.argv.slice(2);
const arch = (args.find((a) => a.startsWith('--arch=')) ?? `--arch=${process.arch}`).slice('--arch='.length);
const debug = args.includes('--debug');
const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
// Another architecture than this machine's: linux-arm64 from x86-64 is cross-compiled
// with Debian's aarch64 compiler (scripts/aarch64-toolchain.cmake); its plugin needs nvcc
// with arm64 runtime libraries on PATH (CUDA12_TARGET=arm64 scripts/cuda12-toolkit.sh).
const cross = arch !== process.arch;
if (cross && !(process.platform === 'linux' && process.arch === 'x64' && arch === 'arm64')) {
  console.error(`prebuild-shim: cannot build for ${process.platform}-${arch} on ${process.platform}-${process.arch}`);
  process.exit(1);
}
// The CUDA plugin is left out unless DELLA_PREBUILD_CUDA=1: it needs nvcc, takes minutes
// to compile, and prebuildify copies only the .node. With it, the plugin is built too and
// copied into prebuilds/<platform>-<arch>/ beside the .node, where the addon looks for it.
const cuda = process.env.DELLA_PREBUILD_CUDA === '1';
const r = spawnSync(process.execPath, [cmakeJs, 'rebuild', '--out', 'build', '--arch', arch, '--CDDELLA_PORTABLE=ON',
  `--CDDELLA_CUDA=${cuda ? 'ON' : 'OFF'}`,
  ...(cross ? [`--CDCMAKE_TOOLCHAIN_FILE=${resolve(root, 'scripts', 'aarch64-toolchain.cmake')}`] : []),
  ...(debug ? ['--debug'] : [])], {
  cwd: root,
  stdio: 'inherit',
});
if (r.status === 0 && cuda) {
  const plugin = resolve(root, 'build', debug ? 'Debug' : 'Release', 'della_merge_cuda.so');
  if (!existsSync(plugin)) {
    console.error('prebuild-shim: DELLA_PREBUILD_CUDA=1 but no CUDA plugin was built (is nvcc >= 12 on PATH?)');
    process.exit(1);
  }
  const dir = resolve(root, 'prebuilds', `${process.platform}-${arch}`);
  mkdirSync(dir, { recursive: true });
  copyFileSync(plugin, resolve(dir, 'della_merge_cuda.so'));
}
process.exit(r.status ?? 1);
