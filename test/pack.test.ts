/**
 * The npm package as users get it: prebuilt binary (prebuildify through cmake-js),
 * npm pack, install into an empty project on a PATH without a compiler or CMake, run
 * the demo and import the API. Runs in a copy of the tree so the build of the suite is
 * left alone. Set DELLA_SKIP_PACK=1 to skip it (it takes a minute).
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tempDir } from './helpers/models.js';

const root = resolve(import.meta.dirname, '..');
// Asynchronous: the prebuild alone can take over a minute, and a worker blocked that long
// in spawnSync misses vitest's 60 s replies ("Timeout calling onTaskUpdate").
function npm(cwd: string, args: string[], env: NodeJS.ProcessEnv = process.env): Promise<{ status: number | null; stderr: string }> {
  return new Promise((done, fail) => {
    const child = spawn('npm', args, { cwd, env: { ...env, npm_config_yes: 'true' }, timeout: 300_000, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
    child.on('error', fail);
    child.on('close', (status) => done({ status, stderr }));
  });
}

describe.skipIf(process.env.DELLA_SKIP_PACK === '1')('npm pack with a prebuilt binary', () => {
  it('installs without a compiler or CMake, runs the demo, and imports', async () => {
    const work = tempDir('della-pack-');
    const src = join(work, 'src');
    const files = execFileSync('git', ['ls-files', '--cached', '--others', '--exclude-standard'], { cwd: root, encoding: 'utf8' })
      .split('\n').filter((f) => f && !f.startsWith('test/'));
    for (const f of files) {
      mkdirSync(dirname(join(src, f)), { recursive: true });
      cpSync(join(root, f), join(src, f));
    }
    symlinkSync(join(root, 'node_modules'), join(src, 'node_modules'));
    const pre = await npm(src, ['run', 'prebuilds']);
    expect(pre.status, pre.stderr).toBe(0);
    expect(readdirSync(join(src, 'prebuilds', `${process.platform}-${process.arch}`))).toEqual(['della-merge.glibc.node']);
    const pack = await npm(src, ['pack', '--pack-destination', work]);
    expect(pack.status, pack.stderr).toBe(0);
    const tarball = readdirSync(work).find((f) => f.endsWith('.tgz'))!;

    const app = join(work, 'app');
    mkdirSync(app);
    writeFileSync(join(app, 'package.json'), '{"name": "app", "version": "1.0.0", "type": "module", "private": true}\n');
    const install = await npm(app, ['install', join(work, tarball), '--no-audit', '--no-fund', '--prefer-offline']);
    expect(install.status, install.stderr).toBe(0);

    // A PATH holding node and nothing else: no compiler, no CMake, no make.
    const bin = join(work, 'bin');
    mkdirSync(bin);
    symlinkSync(process.execPath, join(bin, 'node'));
    // ...and none of the test suite's own overrides (test:asan sets these).
    const { DELLA_NATIVE_PATH: _a, LD_PRELOAD: _b, ASAN_OPTIONS: _c, UBSAN_OPTIONS: _d, ...clean } = process.env;
    void [_a, _b, _c, _d];
    const env = { ...clean, PATH: bin };
    for (const tool of ['cmake', 'g++', 'c++', 'make']) {
      expect(spawnSync(tool, ['--version'], { env }).error, `${tool} must not be reachable`).toBeTruthy();
    }
    const demo = spawnSync(join(bin, 'node'), [join(app, 'node_modules/.bin/della-merge'), 'demo', '--out', join(work, 'demo')], { cwd: app, env, encoding: 'utf8' });
    expect(demo.status, demo.stderr).toBe(0);
    expect(demo.stdout).toContain('what DELLA did');
    const doctor = spawnSync(join(bin, 'node'), [join(app, 'node_modules/.bin/della-merge'), 'doctor'], { cwd: app, env, encoding: 'utf8' });
    expect(doctor.stdout).toMatch(/della-merge\.glibc\.node \(prebuilt\) loads/);
    const imp = spawnSync(join(bin, 'node'), ['--input-type=module', '-e', "import { merge, mergeTensors, openCheckpoint } from 'della-merge'; console.log(typeof merge, typeof mergeTensors, typeof openCheckpoint)"], { cwd: app, env, encoding: 'utf8' });
    expect(imp.stdout.trim(), imp.stderr).toBe('function function function');
  }, 300_000); // compiling the addon from source took 115 s of the default 120 in a CI run beside the other files
});

describe('the prebuild shim', () => {
  it('refuses an architecture it cannot cross-compile for, naming it, before building anything', () => {
    // prebuildify calls it as node-gyp; linux-arm64 from x86-64 is the one cross target.
    const other = process.arch === 'x64' ? 'riscv64' : 'x64';
    const r = spawnSync(process.execPath, [join(root, 'scripts', 'prebuild-shim.js'), 'rebuild', `--arch=${other}`], { cwd: root, encoding: 'utf8' });
    expect(r.status).toBe(1);
    expect(r.stderr.trim().split('\n')).toEqual([`prebuild-shim: cannot build for ${process.platform}-${other} on ${process.platform}-${process.arch}`]);
  });
});
