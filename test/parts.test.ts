/** A merge split into N parts and assembled is byte-identical to one run. */
import { spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, watch, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { makeModels, tempDir, writeRecipe } from './helpers/models.js';
import { rng, testSeed } from './helpers/random.js';
import { assemble } from '../lib/merge/parts.js';
import { tensorDigest } from '../lib/merge/record.js';
import { openCheckpoint } from '../lib/checkpoint/model.js';
import { saveModel, type InMemoryTensor } from '../lib/checkpoint/save.js';

const root = resolve(import.meta.dirname, '..');
const seed = testSeed();

function cli(args: string[]) {
  const r = spawnSync(process.execPath, [join(root, 'bin/della-merge.js'), ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function files(dir: string): Map<string, string> {
  return new Map(readdirSync(dir).sort().map((f) => [f, readFileSync(join(dir, f)).toString('hex')]));
}

/** Nothing assemble might have left in `dir`: the output `x` or a temporary directory. */
const leftovers = (dir: string) => readdirSync(dir).filter((f) => f === 'x' || f.includes('della-tmp'));

/**
 * Part directories written by hand: `parts[i]` are part i+1's tensors, with config.json
 * and README.md beside them.
 */
function handParts(dir: string, parts: InMemoryTensor[][]): string[] {
  const planned = parts.flat().map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, byteLength: t.data.byteLength }));
  return parts.map((tensors, i) => {
    const d = join(dir, `hand${i + 1}`);
    saveModel(d, tensors);
    writeFileSync(join(d, 'config.json'), '{"model_type": "llama"}\n');
    writeFileSync(join(d, 'README.md'), '# merged\n');
    // Object.fromEntries, not {}: keeps a tensor named "__proto__"
    const xxh64 = Object.fromEntries(tensors.map((t) => [t.name, tensorDigest('xxh64', new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength))]));
    const record = { tool: 'della-merge', version: '0.1.0', method: 'linear', seed: 0, xxh64, part: i + 1, of: parts.length, shardSize: 1e9, planned, planDigest: 'p' };
    writeFileSync(join(d, 'della_merge_part.json'), `${JSON.stringify(record, null, 2)}\n`);
    return d;
  });
}

const f32 = (name: string, n: number, v = 1): InMemoryTensor => ({ name, dtype: 'F32', shape: [n], data: new Float32Array(n).fill(v) });

describe(`run --part i/N and assemble (DELLA_TEST_SEED=${seed})`, () => {
  for (const [method, N] of [['della', 3], ['ties', 2], ['slerp', 4]] as const) {
    it(`${method}: ${N} parts assembled equal one run, byte for byte`, () => {
      const dir = tempDir();
      const m = makeModels(rng(seed ^ N), dir, { dtype: 'BF16', experts: method === 'slerp' ? 1 : 3, layers: 4 });
      const params = method === 'slerp' ? {} : method === 'ties' ? { density: 0.4 } : { density: 0.5, epsilon: 0.1 };
      const recipe = writeRecipe(join(dir, 'r.yaml'), {
        merge_method: method, base_model: m.base, models: m.experts.map((model) => ({ model, parameters: params })),
        ...(method === 'slerp' ? { parameters: { t: [0.1, 0.9] } } : {}), seed: 11,
      });
      const one = cli(['run', recipe, '--out', join(dir, 'one'), '--shard-size', '1500', '-q']);
      expect(one.code, one.stderr).toBe(0);
      const parts: string[] = [];
      const counts: number[] = [];
      // parts in any order, each with its own thread count
      for (const i of Array.from({ length: N }, (_, k) => N - k)) {
        const p = join(dir, `part${i}`);
        const r = cli(['run', recipe, '--out', p, '--part', `${i}/${N}`, '--shard-size', '1500', '--threads', String(1 + (i % 2)), '--json']);
        expect(r.code, r.stderr).toBe(0);
        counts.push(JSON.parse(r.stdout).tensors.total);
        parts.push(p);
      }
      const total = JSON.parse(cli(['run', recipe, '--dry-run', '--json']).stdout).totals.tensors;
      expect(counts.reduce((a, b) => a + b, 0)).toBe(total);
      expect(Math.min(...counts)).toBeGreaterThan(0);
      const a = cli(['assemble', '--out', join(dir, 'assembled'), ...parts]);
      expect(a.code, a.stderr).toBe(0);
      expect(a.stdout).toMatch(new RegExp(`assembled ${N} parts: ${total} tensors`));
      expect(files(join(dir, 'assembled'))).toEqual(files(join(dir, 'one')));
      expect(cli(['verify', join(dir, 'assembled'), '--recipe', recipe]).code).toBe(0);
    });
  }

  it('refuses a missing part, a part given twice, parts of different merges, and a bad --part', () => {
    const dir = tempDir();
    const m = makeModels(rng(seed + 9), dir, { dtype: 'F16', experts: 2 });
    const recipe = (s: number) => writeRecipe(join(dir, `r${s}.yaml`), { merge_method: 'della', base_model: m.base, models: m.experts.map((model) => ({ model })), seed: s });
    const r1 = recipe(1), r2 = recipe(2);
    for (const i of [1, 2]) expect(cli(['run', r1, '--out', join(dir, `a${i}`), '--part', `${i}/2`, '-q']).code).toBe(0);
    expect(cli(['run', r2, '--out', join(dir, 'b2'), '--part', '2/2', '-q']).code).toBe(0);
    const missing = cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1')]);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/parts 2\/2 are missing/);
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 'a1')]).stderr).toMatch(/part 1\/2 is given twice: .*a1 is named twice/);
    cpSync(join(dir, 'a1'), join(dir, 'c1'), { recursive: true }); // a copy of part 1 passed as another part
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 'c1')]).stderr).toMatch(/part 1\/2 is given twice: the part records \(della_merge_part\.json\) of \S*a1 and \S*c1 both say part 1\/2/);
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 'b2')]).stderr).toMatch(/b2 belongs to a different merge than \S*a1: its seed is 2, the other's 1/);
    // The experts swapped in one part's recipe: the same tensors and parameters planned,
    // other values merged (it assembled a mixed model).
    const swapped = writeRecipe(join(dir, 'swapped.yaml'), { merge_method: 'della', base_model: m.base, models: [...m.experts].reverse().map((model) => ({ model })), seed: 1 });
    expect(cli(['run', swapped, '--out', join(dir, 's2'), '--part', '2/2', '-q']).code).toBe(0);
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 's2')]).stderr).toMatch(/s2 belongs to a different merge than \S*a1: their recipes or input models differ/);
    // An expert changed on disk between the parts' runs (same name, same shapes).
    const copy = join(dir, 'e0-copy');
    cpSync(m.experts[0], copy, { recursive: true });
    const moved = writeRecipe(join(dir, 'moved.yaml'), { merge_method: 'della', base_model: m.base, models: [copy, m.experts[1]].map((model) => ({ model })), seed: 1 });
    expect(cli(['run', moved, '--out', join(dir, 'm1'), '--part', '1/2', '-q']).code).toBe(0);
    rmSync(copy, { recursive: true });
    cpSync(m.experts[1], copy, { recursive: true });
    expect(cli(['run', moved, '--out', join(dir, 'm2'), '--part', '2/2', '-q']).code).toBe(0);
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'm1'), join(dir, 'm2')]).stderr).toMatch(/m2 belongs to a different merge than \S*m1: their recipes or input models differ/);
    // A part of another split, and a record only reformatted (keys reordered): it was
    // refused as "a different merge" too.
    expect(cli(['run', r1, '--out', join(dir, 'c3'), '--part', '1/3', '-q']).code).toBe(0);
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 'c3')]).stderr).toMatch(/c3 belongs to a different merge than \S*a1: it is part 1 of 3, the other part 1 of 2/);
    const sortKeys = (v: unknown): unknown => Array.isArray(v) ? v.map(sortKeys)
      : v && typeof v === 'object' ? Object.fromEntries(Object.keys(v).sort().reverse().map((k) => [k, sortKeys((v as Record<string, unknown>)[k])])) : v;
    cpSync(join(dir, 'a2'), join(dir, 'a2r'), { recursive: true });
    const reformatted = join(dir, 'a2r', 'della_merge_part.json');
    writeFileSync(reformatted, JSON.stringify(sortKeys(JSON.parse(readFileSync(reformatted, 'utf8')))));
    const ok = cli(['assemble', '--out', join(dir, 'ok'), join(dir, 'a1'), join(dir, 'a2r')]);
    expect(ok.stderr).toBe('');
    expect(ok.code).toBe(0);
    // A part from a version that recorded SHA-256 digests cannot join one that records XXH64.
    const partFile = join(dir, 'a2', 'della_merge_part.json');
    const rec = JSON.parse(readFileSync(partFile, 'utf8'));
    writeFileSync(partFile, JSON.stringify({ ...rec, xxh64: undefined, sha256: rec.xxh64 }));
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 'a2')]).stderr).toMatch(/a2 was made by a della-merge version that records sha256 digests, .*a1 by one that records xxh64/);
    writeFileSync(partFile, JSON.stringify({ ...rec, xxh64: undefined }));
    expect(cli(['assemble', '--out', join(dir, 'x'), join(dir, 'a1'), join(dir, 'a2')]).stderr).toMatch(/della_merge_part\.json records no tensor digests/);
    expect(cli(['run', r1, '--out', join(dir, 'y'), '--part', '3/2']).stderr).toMatch(/part 3\/2 is not valid/);
    expect(cli(['run', r1, '--out', join(dir, 'y'), '--part', '1/9007199254740993']).stderr).toMatch(/part 1\/9007199254740993 is not valid: at most 65536 parts/);
    expect(cli(['run', r1, '--out', join(dir, 'y'), '--part', 'half']).stderr).toMatch(/--part takes i\/N/);
    expect(readdirSync(dir).filter((f) => f === 'x' || f === 'y' || f.includes('della-tmp'))).toEqual([]);
  });

  it('refuses a malformed part record with one message naming the file, exit 1, nothing left', () => {
    const dir = tempDir();
    const [a1, a2] = handParts(dir, [[f32('a', 4)], [f32('b', 2)]]);
    const file = join(a1, 'della_merge_part.json');
    const good = JSON.parse(readFileSync(file, 'utf8'));
    const cases: Array<[unknown, RegExp]> = [
      [null, /it holds null, not a JSON object/],
      [[1, 2], /it holds \[1,2\], not a JSON object/],
      [{ ...good, planned: undefined }, /"planned" is missing, not a list of tensors/],
      [{ ...good, planned: 'all' }, /"planned" is "all", not a list of tensors/],
      [{ ...good, planned: [null] }, /"planned"\[0\] null has no tensor name/],
      [{ ...good, planned: [{ ...good.planned[0], dtype: 'F33' }] }, /"planned"\[0\] .* has no known dtype/],
      [{ ...good, planned: [{ ...good.planned[0], shape: [-1] }] }, /"planned"\[0\] .* has no valid shape/],
      [{ ...good, planned: [{ ...good.planned[0], byteLength: 4 }] }, /"planned"\[0\] .*: "byteLength" is not 16/],
      [{ ...good, planned: [good.planned[0], good.planned[0]] }, /"planned" lists tensor "a" twice/],
      [{ ...good, part: 3 }, /"part" is 3 and "of" is 2, not i and N/],
      [{ ...good, of: undefined }, /"part" is 1 and "of" is missing/],
      [{ ...good, shardSize: 0 }, /"shardSize" is 0, not a positive integer/],
      [{ ...good, seed: 'x' }, /"seed" is "x"/],
      [{ ...good, version: 1 }, /"version" is 1, not a string/],
      [{ ...good, xxh64: { a: 7 } }, /the xxh64 digest of tensor "a" is 7, not a string/],
    ];
    for (const [record, message] of cases) {
      writeFileSync(file, JSON.stringify(record));
      const r = cli(['assemble', '--out', join(dir, 'x'), a1, a2]);
      expect(r.stderr).toMatch(new RegExp(`^della-merge: \\S*hand1/della_merge_part\\.json is not a valid part record: ${message.source}`));
      expect(r.code, r.stderr).toBe(1);
      expect(r.stdout).toBe('');
      expect(leftovers(dir)).toEqual([]);
    }
    // A FIFO in its place used to block assemble forever.
    rmSync(file);
    expect(spawnSync('mkfifo', [file]).status).toBe(0);
    const fifo = cli(['assemble', '--out', join(dir, 'x'), a1, a2]);
    expect(fifo.stderr).toBe(`della-merge: cannot read ${file}: not a regular file\n`);
    expect(fifo.code).toBe(1);
    expect(leftovers(dir)).toEqual([]);
    rmSync(file);
    writeFileSync(file, JSON.stringify(good));
    expect(cli(['assemble', '--out', join(dir, 'x'), a1, a2]).code).toBe(0);
  });

  it("checks each part's weights against its own record and the plan", () => {
    const dir = tempDir();
    const m = makeModels(rng(seed + 17), dir, { dtype: 'BF16', experts: 2, layers: 3 });
    const recipe = writeRecipe(join(dir, 'r.yaml'), { merge_method: 'ties', base_model: m.base, models: m.experts.map((model) => ({ model, parameters: { density: 0.5 } })), seed: 3 });
    const p = [1, 2, 3].map((i) => join(dir, `p${i}`));
    p.forEach((d, i) => expect(cli(['run', recipe, '--out', d, '--part', `${i + 1}/3`, '-q']).code).toBe(0));
    const run = (...dirs: string[]) => cli(['assemble', '--out', join(dir, 'x'), ...dirs]);
    const refused = (r: ReturnType<typeof cli>, message: RegExp) => {
      expect(r.stderr).toMatch(message);
      expect(r.stderr).not.toMatch(/internal error/);
      expect(r.code, r.stderr).toBe(1);
      expect(leftovers(dir)).toEqual([]);
    };
    // (a) a tensor of a part whose size differs from the plan: half its rows
    const short = join(dir, 'short');
    cpSync(p[0], short, { recursive: true });
    const c = openCheckpoint(short);
    const name = c.names.find((n) => c.tensors.get(n)!.shape[0] >= 2)!;
    const tensors = c.names.map((n) => {
      const t = c.tensors.get(n)!;
      const data = c.bytes(n).slice();
      if (n !== name) return { name: n, dtype: t.dtype, shape: t.shape, data };
      const rows = Math.floor(t.shape[0] / 2);
      return { name: n, dtype: t.dtype, shape: [rows, ...t.shape.slice(1)], data: data.subarray(0, (data.length / t.shape[0]) * rows) };
    });
    c.close();
    saveModel(short, tensors);
    refused(run(short, p[1], p[2]), new RegExp(`short: tensor "${name.replace(/\./g, '\\.')}" is BF16 \\[\\d+(, \\d+)*\\] \\(\\d+ bytes\\), but the merge planned BF16`));
    // (b) two parts' records swapped
    const [s1, s2] = [join(dir, 's1'), join(dir, 's2')];
    cpSync(p[0], s1, { recursive: true });
    cpSync(p[1], s2, { recursive: true });
    cpSync(join(p[1], 'della_merge_part.json'), join(s1, 'della_merge_part.json'));
    cpSync(join(p[0], 'della_merge_part.json'), join(s2, 'della_merge_part.json'));
    refused(run(s1, s2, p[2]), /s1: tensor ".*" is not recorded in \S*s1\/della_merge_part\.json: the part's weights and its record do not belong together/);
    // a record listing a tensor its part does not hold
    const extra = join(dir, 'extra');
    cpSync(p[0], extra, { recursive: true });
    const recFile = join(extra, 'della_merge_part.json');
    const rec = JSON.parse(readFileSync(recFile, 'utf8'));
    const other = Object.keys(JSON.parse(readFileSync(join(p[1], 'della_merge_part.json'), 'utf8')).xxh64)[0];
    writeFileSync(recFile, JSON.stringify({ ...rec, xxh64: { ...rec.xxh64, [other]: '0000000000000000' } }));
    refused(run(extra, p[1], p[2]), new RegExp(`extra/della_merge_part\\.json records 1 tensor\\(s\\) that \\S*extra does not hold \\(first: "${other.replace(/\./g, '\\.')}"\\)`));
    // a part whose planned tensors differ from the others'
    writeFileSync(recFile, JSON.stringify({ ...rec, planned: rec.planned.slice(1) }));
    const differs = run(extra, p[1], p[2]);
    expect(differs.stderr).toMatch(/belongs to a different merge than \S*extra: their recipes or input models differ/);
    expect(differs.code).toBe(2); // as for other parts of another merge
    // a byte of a part's weights flipped since its merge (it assembled; verify found it later)
    const flipped = join(dir, 'flipped');
    cpSync(p[1], flipped, { recursive: true });
    const weights = join(flipped, readdirSync(flipped).find((f) => f.endsWith('.safetensors'))!);
    const bytes = readFileSync(weights);
    bytes[bytes.length - 1] ^= 0x01; // the last tensor's last byte
    writeFileSync(weights, bytes);
    refused(run(p[0], flipped, p[2]), /flipped: tensor "[^"]+" is not what the part's merge wrote \(its xxh64 digest differs from the one in della_merge_part\.json\): rerun that part/);
    // the real parts still assemble
    expect(run(...p).code).toBe(0);
  });

  it("copies only the files a merge writes beside the weights: a part's logs/ and strays are left out", () => {
    const dir = tempDir();
    const [a1, a2] = handParts(dir, [[f32('a', 4)], [f32('b', 2)]]);
    mkdirSync(join(a1, 'logs'));
    writeFileSync(join(a1, 'logs', 'job.log'), 'log\n');
    writeFileSync(join(a1, 'slurm-1234.out'), 'out\n');
    mkdirSync(join(a1, 'tokenizer.json')); // a directory under a copied name: skipped, not EISDIR
    const r = cli(['assemble', '--out', join(dir, 'x'), a1, a2]);
    expect(r.code, r.stderr).toBe(0);
    expect(readdirSync(join(dir, 'x')).sort()).toEqual(['README.md', 'config.json', 'della_merge_run.json', 'model.safetensors']);
  });

  it('refuses an --out that is or holds a part, --overwrite or not, and keeps the parts', () => {
    const dir = tempDir();
    const parts = handParts(dir, [[f32('a', 4)], [f32('b', 2)]]);
    for (const out of [dir, parts[0]]) {
      const r = cli(['assemble', '--out', out, '--overwrite', ...parts]);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(/an input of this merge: replacing it would delete that input/);
      expect(existsSync(join(parts[0], 'della_merge_part.json'))).toBe(true);
    }
  });

  it('keeps a tensor named "__proto__" in the run record', () => {
    const dir = tempDir();
    const parts = handParts(dir, [[f32('__proto__', 4, 2)], [f32('w', 2), f32('constructor', 3)]]);
    const r = cli(['assemble', '--out', join(dir, 'x'), ...parts]);
    expect(r.code, r.stderr).toBe(0);
    const run = JSON.parse(readFileSync(join(dir, 'x', 'della_merge_run.json'), 'utf8'));
    expect(Object.keys(run.xxh64)).toEqual(['__proto__', 'constructor', 'w']);
    expect(Object.getOwnPropertyDescriptor(run.xxh64, '__proto__')?.value).toBe(tensorDigest('xxh64', new Uint8Array(new Float32Array(4).fill(2).buffer)));
  });

  it('a full disk while copying the files beside the weights is E_IO, with nothing left', async () => {
    const dir = tempDir();
    const parts = handParts(dir, [[f32('a', 4)], [f32('b', 2)]]);
    // A fresh module graph whose fs fails writes (or copies) of the output's config.json as a full disk would.
    vi.resetModules();
    vi.doMock('node:fs', async (importOriginal) => {
      const fs = await importOriginal<typeof import('node:fs')>();
      const full = (file: unknown) => {
        if (typeof file === 'string' && /della-tmp[^/]*\/config\.json$/.test(file)) {
          throw Object.assign(new Error(`ENOSPC: no space left on device, write '${file}'`), { code: 'ENOSPC' });
        }
      };
      const writeFileSync = (file: unknown, ...rest: unknown[]) => (full(file), (fs.writeFileSync as (...a: unknown[]) => void)(file, ...rest));
      const copyFileSync = (from: unknown, to: unknown, ...rest: unknown[]) => (full(to), (fs.copyFileSync as (...a: unknown[]) => void)(from, to, ...rest));
      return { ...fs, writeFileSync, copyFileSync, default: { ...fs, writeFileSync, copyFileSync } };
    });
    try {
      const { assemble: assembleOnFullDisk } = await import('../lib/merge/parts.js');
      const { isDellaError } = await import('../lib/errors.js');
      const e = await assembleOnFullDisk(parts, join(dir, 'x')).then(() => null, (x: unknown) => x);
      expect(isDellaError(e), String(e)).toBe(true);
      expect(e).toMatchObject({ code: 'E_IO', message: expect.stringMatching(/config\.json.*: no space left on device$/) });
    } finally {
      vi.doUnmock('node:fs');
      vi.resetModules();
    }
    expect(leftovers(dir)).toEqual([]);
  });

  it('assemble options of the wrong kind are E_ARGS before anything is written', async () => {
    const dir = tempDir();
    const parts = handParts(dir, [[f32('a', 16)], [f32('b', 16)]]);
    const out = join(dir, 'x');
    await expect(assemble(parts, out, { overwrite: 'yes' as unknown as boolean })).rejects.toMatchObject({ code: 'E_ARGS', message: 'options.overwrite must be true or false, got "yes"' });
    await expect(assemble(parts, out, { signal: 'stop' as unknown as AbortSignal })).rejects.toMatchObject({ code: 'E_ARGS', message: 'options.signal must be an AbortSignal, got "stop"' });
    await expect(assemble(parts, out, null as unknown as object)).rejects.toMatchObject({ code: 'E_ARGS', message: 'assemble(partDirs, out, options): options must be an object, got null' });
    expect(leftovers(dir)).toEqual([]);
    expect(existsSync(out)).toBe(false);
  });

  it('a cancelled assemble (AbortSignal) removes its unfinished output', async () => {
    const dir = tempDir();
    const parts = handParts(dir, [[f32('a', 1 << 16)], [f32('b', 1 << 16)]]);
    const controller = new AbortController();
    const assembling = assemble(parts, join(dir, 'x'), { signal: controller.signal });
    expect(readdirSync(dir).some((f) => f.includes('della-tmp'))).toBe(true); // midway: writing
    controller.abort();
    await expect(assembling).rejects.toMatchObject({ code: 'E_ABORTED' });
    expect(leftovers(dir)).toEqual([]);
  });

  it('a part cut short while assemble copies it is E_IO naming the file, with nothing left', async () => {
    const dir = tempDir();
    const parts = handParts(dir, [[f32('a', 1 << 16)], [f32('b', 1 << 16), f32('c', 1 << 16)]]);
    const victim = join(parts[1], 'model.safetensors');
    const size = statSync(victim).size;
    const assembling = assemble(parts, join(dir, 'x'));
    // Its copies are queued by now, read before or after the cut: either way refused.
    truncateSync(victim, 4096);
    await expect(assembling).rejects.toMatchObject({
      code: 'E_IO', message: `${victim} changed size while it was being read (${size} → 4096 bytes); nothing was assembled (rerun it on stable parts)`,
    });
    expect(leftovers(dir)).toEqual([]);
  });

  it('SIGINT during assemble exits 130 and leaves nothing behind', async () => {
    const dir = tempDir();
    // big enough (128 MB) that assemble is still writing when the signal lands
    const big = (name: string) => ({ name, dtype: 'U8', shape: [8 << 20], data: new Uint8Array(8 << 20).fill(name.length) });
    const parts = handParts(dir, [0, 1].map((p) => Array.from({ length: 8 }, (_, i) => big(`t${p}.${i}`))));
    for (let attempt = 0; ; attempt++) {
      const child = spawn(process.execPath, [join(root, 'bin/della-merge.js'), 'assemble', '--out', join(dir, 'x'), ...parts], { stdio: ['ignore', 'pipe', 'pipe'] });
      let sent = false; // once: a second SIGINT means "leave now"
      const watcher = watch(dir, (_, f) => {
        if (!sent && String(f).includes('della-tmp')) sent = child.kill('SIGINT');
      });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
      const code = await new Promise<number | null>((done) => child.on('exit', (c) => done(c)));
      watcher.close();
      if (code === 0 && attempt < 3) { // finished before the signal: try again
        rmSync(join(dir, 'x'), { recursive: true });
        continue;
      }
      expect(code, stderr).toBe(130);
      expect(stderr).toMatch(/SIGINT: stopping/);
      expect(stderr).toMatch(/della-merge: assemble was cancelled; nothing was written/);
      expect(existsSync(join(dir, 'x'))).toBe(false);
      expect(leftovers(dir)).toEqual([]);
      break;
    }
  });
});
