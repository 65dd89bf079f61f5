/** The della-merge command as a user runs it: exit codes, messages, files. */
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync, truncateSync, copyFileSync, mkdirSync, statSync, utimesSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { merge, saveModel } from '../lib/index.js';
import { copyExtras } from '../lib/checkpoint/extras.js';
import { writeDemoModels } from '../lib/demo.js';
import { isDellaError, type DellaError } from '../lib/errors.js';
import { formatBytes } from '../lib/util/size.js';
import { verifyThreads } from '../lib/cli.js';
import { availableParallelism } from 'node:os';
import { makeModels, tempDir, writeRecipe } from './helpers/models.js';
import { rng, testSeed } from './helpers/random.js';

const root = resolve(import.meta.dirname, '..');
const seed = testSeed();

function cli(args: string[], cwd = root, env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, [join(root, 'bin/della-merge.js'), ...args], {
    cwd, encoding: 'utf8', env: { ...process.env, NO_COLOR: '1', ...env },
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function dellaRecipe(models: { base: string; experts: string[] }, extra: Record<string, unknown> = {}) {
  return {
    merge_method: 'della',
    base_model: models.base,
    models: models.experts.map((m, k) => ({ model: m, parameters: { weight: 1 - 0.2 * k, density: 0.5, epsilon: 0.1 } })),
    parameters: { lambda: 1.1 },
    dtype: 'bfloat16',
    seed: 7,
    ...extra,
  };
}

describe('sizes in progress lines', () => {
  it('are whole bytes below 1 kB (a tiny merge\'s rate is a fraction) and three digits above', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(979.436705953573)).toBe('979 B');
    expect(formatBytes(999.6)).toBe('1000 B');
    expect(formatBytes(1500)).toBe('1.50 kB');
    expect(formatBytes(2.5e9)).toBe('2.50 GB');
  });
});

describe('run --verify\'s worker threads', () => {
  it('are run\'s --threads, at most one a core; left to verify without --threads', () => {
    const cores = availableParallelism();
    expect(verifyThreads(undefined)).toBeUndefined();
    expect(verifyThreads(1)).toBe(1);
    expect(verifyThreads(cores)).toBe(cores);
    expect(verifyThreads(cores + 5)).toBe(cores);
  });
});

describe(`della-merge CLI (DELLA_TEST_SEED=${seed})`, () => {
  it('the launcher runs the bundled CLI while it is current, else dist/cli.js', () => {
    const dir = tempDir();
    mkdirSync(join(dir, 'bin'));
    mkdirSync(join(dir, 'dist'));
    copyFileSync(join(root, 'bin/della-merge.js'), join(dir, 'bin/della-merge.js'));
    const stub = (name: string) => writeFileSync(join(dir, 'dist', name), `export async function main() { console.log('${name}'); return 0; }\n`);
    const run = () => spawnSync(process.execPath, [join(dir, 'bin/della-merge.js')], { encoding: 'utf8' }).stdout.trim();
    stub('cli.js');
    expect(run()).toBe('cli.js'); // no bundle
    stub('cli.bundle.js');
    utimesSync(join(dir, 'dist/cli.js'), 1000, 1000);
    utimesSync(join(dir, 'dist/cli.bundle.js'), 2000, 2000);
    expect(run()).toBe('cli.bundle.js');
    utimesSync(join(dir, 'dist/cli.js'), 3000, 3000); // TypeScript rebuilt without a new bundle
    expect(run()).toBe('cli.js');
    // This checkout's bundle is current (npm test builds it) and runs on its own.
    expect(statSync(join(root, 'dist/cli.bundle.js')).mtimeMs).toBeGreaterThanOrEqual(statSync(join(root, 'dist/cli.js')).mtimeMs);
    const version = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version;
    const bundled = spawnSync(process.execPath, ['--input-type=module', '-e', `const { main } = await import(${JSON.stringify(join(root, 'dist/cli.bundle.js'))}); process.exitCode = await main(['--version']);`], { encoding: 'utf8' });
    expect(bundled.stdout.trim(), bundled.stderr).toBe(version);
  });

  it('a reader of its output that leaves early or a full standard output never stops a merge half-way', () => {
    const dir = tempDir();
    const m = makeModels(rng(seed + 31), dir, { dtype: 'F32', experts: 2 });
    const recipe = writeRecipe(join(dir, 'r.yaml'), dellaRecipe(m));
    const bin = join(root, 'bin/della-merge.js');
    const sh = (script: string) => spawnSync('bash', ['-c', script], { cwd: dir, encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' } });
    // stderr's reader gone (progress lines): it exited 0 at once, and its exit hook
    // removed the unfinished output
    const gone = sh(`"${process.execPath}" "${bin}" run r.yaml --out a 2>&1 | true; echo "rc=\${PIPESTATUS[0]}"`);
    expect(gone.stdout.trim()).toBe('rc=0');
    expect(existsSync(join(dir, 'a', 'della_merge_run.json'))).toBe(true);
    // a full disk behind stdout: the merge completes, and the lost summary is said (it was a stack trace)
    const full = sh(`"${process.execPath}" "${bin}" run r.yaml --out b > /dev/full; echo "rc=$?"`);
    expect(full.stdout.trim()).toBe('rc=1');
    expect(full.stderr).toMatch(/^della-merge: could not write to standard output \(ENOSPC\)$/m);
    expect(full.stderr).not.toMatch(/at |internal error/);
    expect(existsSync(join(dir, 'b', 'della_merge_run.json'))).toBe(true);
    const inspect = sh(`"${process.execPath}" "${bin}" inspect b > /dev/full; echo "rc=$?"`);
    expect(inspect.stdout.trim()).toBe('rc=1');
    expect(inspect.stderr.trim()).toBe('della-merge: could not write to standard output (ENOSPC)');
    // a reader that stops early is no error
    const head = sh(`"${process.execPath}" "${bin}" inspect b | head -1; echo "rc=\${PIPESTATUS[0]}"`);
    expect(head.stdout).toMatch(/^tensor .*\nrc=0\n$/);
    expect(head.stderr).toBe('');
  });

  it('demo builds three experts, merges them with DELLA and explains the result', () => {
    const dir = tempDir();
    const r = cli(['demo', '--out', dir]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('what DELLA did');
    expect(r.stdout).toMatch(/math +kept 4\d\.\d% of its delta/);
    expect(readdirSync(join(dir, 'merged'))).toContain('model.safetensors');
    expect(cli(['demo', '--out', dir]).code).toBe(0); // an earlier demo's directory is reused
    // ...also after the next step its summary suggests
    expect(r.stdout).toContain(`--out ${join(dir, 'merged-again')}`);
    expect(cli(['run', join(dir, 'models', 'recipe.yaml'), '--out', join(dir, 'merged-again'), '-q']).code).toBe(0);
    expect(cli(['demo', '--out', dir]).code).toBe(0);
    const mine = tempDir();
    writeFileSync(join(mine, 'notes.txt'), 'keep');
    const refused = cli(['demo', '--out', mine]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/is not an earlier demo's directory/);
    expect(readdirSync(mine)).toEqual(['notes.txt']);
    // A project that merely has a models/recipe.yaml (and a merged/) was taken for a demo:
    // its recipe replaced and merged/ deleted.
    const project = tempDir();
    mkdirSync(join(project, 'models'));
    mkdirSync(join(project, 'merged'));
    writeFileSync(join(project, 'models', 'recipe.yaml'), 'merge_method: ties\n');
    writeFileSync(join(project, 'merged', 'important.txt'), 'keep');
    const notDemo = cli(['demo', '--out', project]);
    expect(notDemo.code).toBe(1);
    expect(notDemo.stderr).toMatch(/is not an earlier demo's directory/);
    expect(readFileSync(join(project, 'models', 'recipe.yaml'), 'utf8')).toBe('merge_method: ties\n');
    expect(readdirSync(join(project, 'merged'))).toEqual(['important.txt']);
  });

  it('DELLA_PROFILE=1 says where the main thread spent the merge phase, and changes no byte', () => {
    const dir = tempDir();
    const models = makeModels(rng(seed + 7), dir, { dtype: 'BF16', experts: 2 });
    const recipe = writeRecipe(join(dir, 'recipe.yaml'), dellaRecipe(models));
    const plain = cli(['run', recipe, '--out', join(dir, 'plain'), '--quiet']);
    expect(plain.code, plain.stderr).toBe(0);
    expect(plain.stderr).not.toMatch(/della profile/);
    const profiled = cli(['run', recipe, '--out', join(dir, 'profiled'), '--quiet'], root, { DELLA_PROFILE: '1' });
    expect(profiled.code, profiled.stderr).toBe(0);
    const line = profiled.stderr.split('\n').find((l) => l.startsWith('della profile: cpu, '));
    expect(line, profiled.stderr).toBeDefined();
    expect(line).toMatch(/^della profile: cpu, [1-9]\d* batches, \d+\.\d{3} s on the main thread: .*waiting for the kernels \d+\.\d{3} s.*, other \d+\.\d{3} s$/);
    for (const f of readdirSync(join(dir, 'plain'))) {
      if (!f.endsWith('.safetensors')) continue;
      expect(readFileSync(join(dir, 'profiled', f)).equals(readFileSync(join(dir, 'plain', f))), f).toBe(true);
    }
  });

  it('run writes files equal to the reference backend\'s, and the same bytes for 1 and 2 threads', async () => {
    const dir = tempDir();
    const models = makeModels(rng(seed), dir, { dtype: 'BF16', experts: 3 });
    const recipe = writeRecipe(join(dir, 'recipe.yaml'), dellaRecipe(models));
    const report = join(dir, 'report.json');
    const one = cli(['run', recipe, '--out', join(dir, 'one'), '--threads', '1', '--shard-size', '800', '--report', report]);
    expect(one.code, one.stderr).toBe(0);
    expect(one.stdout).toMatch(/merged +della: \d+ tensors merged, 1 copied/);
    const two = cli(['run', recipe, '--out', join(dir, 'two'), '--threads', '2', '--shard-size', '800', '--quiet']);
    expect(two.code, two.stderr).toBe(0);
    await merge(recipe, { out: join(dir, 'ref'), backend: 'reference', shardSize: 800 });
    const files = readdirSync(join(dir, 'ref')).sort();
    expect(readdirSync(join(dir, 'one')).sort()).toEqual(files);
    expect(files.filter((f) => f.endsWith('.safetensors')).length).toBeGreaterThan(1);
    for (const f of files) {
      const want = readFileSync(join(dir, 'ref', f));
      expect(readFileSync(join(dir, 'one', f)).equals(want), `${f} (DELLA_TEST_SEED=${seed})`).toBe(true);
      expect(readFileSync(join(dir, 'two', f)).equals(want), `${f} threads=2 (DELLA_TEST_SEED=${seed})`).toBe(true);
    }
    const rep = JSON.parse(readFileSync(report, 'utf8'));
    expect(rep.method).toBe('della');
    expect(rep.tensors.copied).toBe(1);
    expect(rep.bytes.read).toBeGreaterThan(0);
    expect(rep.seconds).toBeGreaterThan(0);
    // The phases cover the run: each non-negative, together within a millisecond of it.
    const phases = Object.values(rep.phases) as number[];
    expect(Object.keys(rep.phases)).toEqual(['device', 'setup', 'merge', 'flush', 'finish']);
    expect(phases.every((x) => x >= 0)).toBe(true);
    expect(rep.phases.merge).toBeGreaterThan(0);
    expect(Math.abs(phases.reduce((a, b) => a + b, 0) - rep.seconds)).toBeLessThan(1e-3);
    expect(rep.threads).toBe(1);
    expect(rep.tensorReports[0].parameters.density).toEqual([0.5, 0.5, 0.5]);
    expect(Array.isArray(rep.warnings)).toBe(true);
  });

  it('--seed overrides the recipe and changes the result; --json prints the report', () => {
    const dir = tempDir();
    const models = makeModels(rng(seed + 1), dir, { dtype: 'F16', experts: 2 });
    const recipe = writeRecipe(join(dir, 'recipe.json'), dellaRecipe(models));
    const a = cli(['run', recipe, '--out', join(dir, 'a'), '--json']);
    expect(a.code, a.stderr).toBe(0);
    expect(JSON.parse(a.stdout).seed).toBe(7);
    const b = cli(['run', recipe, '--out', join(dir, 'b'), '--seed', '8', '--json']);
    expect(JSON.parse(b.stdout).seed).toBe(8);
    expect(readFileSync(join(dir, 'a', 'model.safetensors')).equals(readFileSync(join(dir, 'b', 'model.safetensors')))).toBe(false);
  });

  it('inspect lists tensors, dtypes, shapes, sizes and totals', () => {
    const dir = tempDir();
    const models = makeModels(rng(seed + 2), dir, { dtype: 'BF16', experts: 1 });
    const r = cli(['inspect', models.base]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/model\.position_ids +I64 +\[2, 3\] +48 B/);
    expect(r.stdout).toMatch(/\d+ tensors, [\d,]+ parameters, .* in \d+ file\(s\); dtypes: BF16 ×\d+, I64 ×1/);
    const j = cli(['inspect', models.base, '--json']);
    const doc = JSON.parse(j.stdout);
    expect(doc.tensors.find((t: { name: string }) => t.name === 'model.position_ids')).toMatchObject({ dtype: 'I64', shape: [2, 3], bytes: 48 });
    saveModel(join(dir, 'empty'), []);
    expect(cli(['inspect', join(dir, 'empty')]).stdout).toMatch(/0 tensors, 0 parameters, .*; dtypes: none\n/);
  });

  it('help and version', () => {
    expect(cli(['--help']).stdout).toContain('della-merge run RECIPE --out DIR');
    expect(cli(['help', 'run']).stdout).toContain('--shard-size SIZE');
    expect(cli(['help', 'help'])).toMatchObject({ code: 0, stdout: expect.stringContaining('della-merge help [COMMAND]') });
    expect(cli(['--help', 'verify']).stdout).toBe(cli(['help', 'verify']).stdout);
    expect(cli(['help', '--help'])).toMatchObject({ code: 0, stdout: expect.stringContaining('della-merge help [COMMAND]') }); // it was "no help for
    expect(cli(['run', '--help']).code).toBe(0);
    expect(cli(['--version']).stdout.trim()).toMatch(/^\d+\.\d+\.\d+/);
  });

  describe('bad input: one clear message, a non-zero exit, no output', () => {
    const dir = tempDir();
    const models = makeModels(rng(seed + 3), dir, { dtype: 'BF16', experts: 2 });
    const good = writeRecipe(join(dir, 'good.yaml'), dellaRecipe(models));
    const cases: Array<[string, () => string[], number, RegExp]> = [
      ['unknown command', () => ['merge'], 2, /unknown command "merge"/],
      ['run without recipe', () => ['run', '--out', join(dir, 'o')], 2, /run needs a RECIPE/],
      ['run without --out', () => ['run', good], 2, /run needs --out DIR/],
      ['unknown option', () => ['run', good, '--out', join(dir, 'o'), '--fast'], 2, /unknown option --fast for run; a file whose name starts with "-" goes after "--", as in: della-merge run -- --fast$/m],
      ['misspelt option', () => ['run', good, '--out', join(dir, 'o'), '--thread', '2'], 2, /unknown option --thread for run \(did you mean --threads\?\)$/m],
      ['unknown short option', () => ['verify', join(dir, 'o'), '-r', good, '-z'], 2, /unknown option -z for verify; /],
      ['bad --threads', () => ['run', good, '--out', join(dir, 'o'), '--threads', '0'], 2, /--threads must be an integer from 1 to 1024, got "0"/],
      ['bad --seed', () => ['run', good, '--out', join(dir, 'o'), '--seed=-3'], 2, /--seed must be an integer/],
      ['fractional --seed', () => ['run', good, '--out', join(dir, 'o'), '--seed', '1.5'], 2, /--seed must be an integer/],
      ['bad --shard-size', () => ['run', good, '--out', join(dir, 'o'), '--shard-size', '5 lightyears'], 2, /--shard-size "5 lightyears" is not a size/],
      ['missing recipe file', () => ['run', join(dir, 'nope.yaml'), '--out', join(dir, 'o')], 1, /nope\.yaml/],
      ['unknown method', () => ['run', writeRecipe(join(dir, 'm.yaml'), dellaRecipe(models, { merge_method: 'dela' })), '--out', join(dir, 'o')], 1, /did you mean "della"/],
      ['density out of range', () => ['run', writeRecipe(join(dir, 'd.yaml'), { ...dellaRecipe(models), parameters: { density: 1.5 } }), '--out', join(dir, 'o')], 1, /density/],
      ['missing model', () => ['run', writeRecipe(join(dir, 'mm.yaml'), dellaRecipe({ base: models.base, experts: [join(dir, 'ghost')] })), '--out', join(dir, 'o')], 1, /ghost/],
      ['inspect a missing path', () => ['inspect', join(dir, 'ghost')], 1, /ghost: no such file or directory/],
      ['an option given twice', () => ['run', good, '--out', join(dir, 'o'), '--out', join(dir, 'p')], 2, /^della-merge: --out is given more than once\n/],
      ['a --shard-size too large', () => ['run', good, '--out', join(dir, 'o'), '--shard-size', '99999999999999999999'], 2, /--shard-size "99999999999999999999" is too large/],
      ['help for no command', () => ['help', 'constructor'], 2, /no help for "constructor"/],
      // (each was ignored: doctor said all was well of a path it never looked at)
      ['doctor given a path', () => ['doctor', '/no/such/path'], 2, /^della-merge: doctor takes no positional arguments, got "\/no\/such\/path"\n/],
      ['--version given more', () => ['--version', 'extra'], 2, /^della-merge: --version takes no arguments, got "extra"\n/],
      ['help given two commands', () => ['help', 'run', 'extra'], 2, /^della-merge: help takes one COMMAND, got "run" "extra"\n/],
      // found while planning, it names the recipe file as a parse error does
      ['a density gradient too low for epsilon at some tensor', () => ['run', writeRecipe(join(dir, 'g.yaml'), {
        ...dellaRecipe(models), models: models.experts.map((m) => ({ model: m, parameters: { density: [0.05, 0.9], epsilon: 0.1 } })),
      }), '--out', join(dir, 'o')], 1, /^della-merge: \S*g\.yaml: model .*density 0\.05 and epsilon 0\.1 give keep probabilities/],
      // --report is checked before merging, so a bad one leaves no output behind.
      ['--report naming a directory', () => ['run', good, '--out', join(dir, 'o'), '--report', dir], 1, /--report .* is a directory; give a file name/],
      ['--report under a file', () => ['run', good, '--out', join(dir, 'o'), '--report', join(good, 'r.json')], 1, /good\.yaml is not a directory/],
      ['--report naming the output', () => ['run', good, '--out', join(dir, 'o'), '--report', join(dir, 'o')], 1, /--report .* is the output directory; give a file name/],
      // It used to replace what it named: the merged weights, the recipe, a model's shard.
      ['--report naming a file the merge writes', () => ['run', good, '--out', join(dir, 'o'), '--report', join(dir, 'o', 'model.safetensors')], 1,
        /^della-merge: --report .*\/o\/model\.safetensors is a file the merge writes into .*\/o; give another name\n$/],
      ['--report naming the recipe', () => ['run', good, '--out', join(dir, 'o'), '--report', good], 1,
        /^della-merge: --report (\S*)good\.yaml would replace \1good\.yaml, an input of this merge; give another path\n$/],
      ['--report naming a model file', () => ['run', good, '--out', join(dir, 'o'), '--report', join(models.base, readdirSync(models.base).find((f) => f.endsWith('.safetensors'))!)], 1,
        /^della-merge: --report .*\.safetensors would replace the files of .*, an input of this merge; give another path\n$/],
      ['--report adding a weight file to a model', () => ['run', good, '--out', join(dir, 'o'), '--report', join(models.base, 'pytorch_model.safetensors')], 1,
        /^della-merge: --report .*pytorch_model\.safetensors would add to the files of .*, an input of this merge; give another path\n$/],
      // --dry-run checks it as a merge would (it passed)
      ['--dry-run --report naming the recipe', () => ['run', good, '--dry-run', '--report', good], 1,
        /^della-merge: --report (\S*)good\.yaml would replace \1good\.yaml, an input of this merge; give another path\n$/],
    ];
    for (const [label, args, code, message] of cases) {
      it(label, () => {
        const r = cli(args());
        expect(r.code, r.stderr).toBe(code);
        expect(r.stderr).toMatch(message);
        expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
        expect(existsSync(join(dir, 'o'))).toBe(false);
      });
    }

    it('a truncated shard is named, and nothing is written', () => {
      const broken = join(dir, 'broken');
      mkdirSync(broken);
      for (const f of readdirSync(models.experts[0])) copyFileSync(join(models.experts[0], f), join(broken, f));
      const shard = readdirSync(broken).find((f) => f.endsWith('.safetensors'))!;
      truncateSync(join(broken, shard), 100);
      const recipe = writeRecipe(join(dir, 'b.yaml'), dellaRecipe({ base: models.base, experts: [broken] }));
      const r = cli(['run', recipe, '--out', join(dir, 'o')]);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(join(broken, shard));
      expect(existsSync(join(dir, 'o'))).toBe(false);
    });

    it.skipIf(!existsSync('/dev/full'))('a report that cannot be written after the merge is E_IO, exit 1, saying the merge is done', () => {
      const out = join(dir, 'report-full');
      const r = cli(['run', good, '--out', out, '--report', '/dev/full']);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(/the merge into .*report-full is complete, but cannot write the report \/dev\/full: no space left on device/);
      expect(r.stderr).not.toMatch(/\n\s+at /);
      expect(r.stdout).not.toMatch(/^merged /m); // no summary that looks like success
      expect(existsSync(join(out, 'della_merge_run.json'))).toBe(true);
    });

    it('--report in directories that do not exist yet makes them (as job scripts name reports/part-$i.json)', () => {
      const report = join(dir, 'reports', 'deeper', 'r.json');
      const r = cli(['run', good, '--out', join(dir, 'report-made'), '--report', report, '-q']);
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(readFileSync(report, 'utf8')).method).toBe('della');
    });

    it('--report may name a new file beside an input; flags may repeat; a recorded recipe reruns into its own output', () => {
      const report = join(models.base, 'merge-report.json');
      try {
        const r = cli(['run', good, '--out', join(dir, 'beside'), '--report', report, '-q', '-q']);
        expect(r.code, r.stderr).toBe(0);
        expect(JSON.parse(readFileSync(report, 'utf8')).method).toBe('della');
      } finally {
        rmSync(report, { force: true });
      }
      const again = cli(['run', join(dir, 'beside', 'della_merge_recipe.yaml'), '--out', join(dir, 'beside'), '--overwrite', '-q']);
      expect(again.code, again.stderr).toBe(0);
      expect(existsSync(join(dir, 'beside', 'della_merge_recipe.yaml'))).toBe(true);
    });

    it('--report may name a file inside a new output directory', () => {
      const out = join(dir, 'report-inside');
      const r = cli(['run', good, '--out', out, '--report', join(out, 'report.json'), '-q']);
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(readFileSync(join(out, 'report.json'), 'utf8')).method).toBe('della');
    });

    it('copying config and tokenizer files: a write failure is E_IO naming the file', () => {
      const err = (() => {
        try {
          copyExtras(models.base, join(dir, 'no-such-dir'), ['config.json']);
        } catch (e) {
          return e;
        }
      })();
      expect(isDellaError(err), String(err)).toBe(true);
      expect((err as DellaError).code).toBe('E_IO');
      expect((err as Error).message).toContain(`cannot copy ${join(models.base, 'config.json')} into ${join(dir, 'no-such-dir')}: `);
    });

    it('demo --out naming a file, or a path under one, is refused naming it; the file is kept', () => {
      const file = join(dir, 'afile');
      writeFileSync(file, 'mine');
      const a = cli(['demo', '--out', file]);
      expect(a.code, a.stderr).toBe(1);
      expect(a.stderr).toMatch(/afile exists and is not a directory/);
      const b = cli(['demo', '--out', join(file, 'sub')]);
      expect(b.code, b.stderr).toBe(1);
      expect(b.stderr).toMatch(/afile\/sub: .*afile is not a directory/);
      for (const r of [a, b]) expect(r.stderr).not.toMatch(/\n\s+at /);
      expect(readFileSync(file, 'utf8')).toBe('mine');
      // The demo's own writes fail the same way, naming the path.
      expect(() => writeDemoModels(join(file, 'models'))).toThrow(expect.objectContaining({ code: 'E_IO', message: expect.stringMatching(/cannot create .*afile\/models: /) }));
    });

    it('an existing output is kept unless --overwrite', () => {
      const out = join(dir, 'exists');
      mkdirSync(out);
      writeFileSync(join(out, 'keep.txt'), 'mine');
      const r = cli(['run', good, '--out', out]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/already exists \(pass --overwrite, or overwrite: true in the API, to replace it\)/);
      expect(readFileSync(join(out, 'keep.txt'), 'utf8')).toBe('mine');
      expect(cli(['run', good, '--out', out, '--overwrite', '-q']).code).toBe(0);
      expect(existsSync(join(out, 'keep.txt'))).toBe(false);
      expect(readdirSync(dir).filter((f) => f.includes('della-tmp'))).toEqual([]);
    });
  });
});

