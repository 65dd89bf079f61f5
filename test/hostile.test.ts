/**
 * Hostile or broken checkpoints and faults: every case gets one clear message naming
 * the file, a non-zero exit, no stack trace, and no output left behind.
 */
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, symlinkSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { merge, openCheckpoint, saveModel } from '../lib/index.js';
import { loadNative } from '../lib/native.js';
import { tempDir, writeRecipe } from './helpers/models.js';

const root = resolve(import.meta.dirname, '..');
const bin = join(root, 'bin/della-merge.js');

function cli(args: string[]) {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** The compiled module dist/`file`, as an import specifier for a child's script. */
const dist = (file: string) => JSON.stringify(pathToFileURL(join(root, 'dist', file)).href);

/** Runs an ES module script in a child Node (a SIGBUS there kills only the child); the
 * JSON it prints. */
function childJson(script: string): unknown {
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 60_000 });
  expect(r.signal, r.stderr).toBeNull();
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

/** A safetensors file from a header object (or raw header text) and data bytes. */
function rawFile(path: string, header: unknown, data: Uint8Array | number = 0, opts: { lengthOverride?: bigint } = {}) {
  const json = Buffer.isBuffer(header) ? header : Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(opts.lengthOverride ?? BigInt(json.length));
  const body = typeof data === 'number' ? Buffer.alloc(data, 1) : Buffer.from(data);
  writeFileSync(path, Buffer.concat([prefix, json, body]));
  return path;
}

/** A base and one expert of one 4-element tensor in `dir`, and a task_arithmetic recipe of them. */
function tinyRecipe(dir: string): string {
  saveModel(join(dir, 'base'), [{ name: 'w', dtype: 'F32', shape: [4], data: new Float32Array(4) }]);
  saveModel(join(dir, 'e'), [{ name: 'w', dtype: 'F32', shape: [4], data: new Float32Array(4).fill(0.5) }]);
  return writeRecipe(join(dir, 'r.yaml'), { merge_method: 'task_arithmetic', base_model: join(dir, 'base'), models: [{ model: join(dir, 'e') }] });
}

/** Runs `fn` on a tmpfs mounted (with `options`) at the new directory `mnt`; skips the
 * test where mounting is not allowed (not root). */
function onTmpfs(ctx: { skip(): void }, mnt: string, options: string, fn: (mnt: string) => void): void {
  mkdirSync(mnt);
  if (spawnSync('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', mnt]).status !== 0) return ctx.skip();
  try {
    fn(mnt);
  } finally {
    spawnSync('umount', ['-l', mnt]); // lazily: a map not yet collected keeps it busy
  }
}

const W = { dtype: 'F32', shape: [2, 2], data_offsets: [0, 16] };

describe('hostile checkpoints', () => {
  const dir = tempDir('della-hostile-');
  const good = join(dir, 'good');
  saveModel(good, [{ name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) }]);
  const base = good;
  const f = (name: string) => join(dir, name);
  const cases: Array<[string, () => string, RegExp]> = [
    ['an empty file', () => (writeFileSync(f('empty.safetensors'), ''), f('empty.safetensors')), /empty\.safetensors: .*(truncated|shorter|empty|8 bytes)/i],
    ['a 5-byte file', () => (writeFileSync(f('five.safetensors'), 'abcde'), f('five.safetensors')), /five\.safetensors/],
    ['a header length beyond the file', () => rawFile(f('long.safetensors'), { w: W }, 16, { lengthOverride: 10_000n }), /long\.safetensors: .*header/i],
    ['a header length over 100 MB', () => rawFile(f('huge.safetensors'), { w: W }, 16, { lengthOverride: 200_000_000n }), /huge\.safetensors: .*100/],
    ['a header length of 2^64 - 1', () => rawFile(f('max.safetensors'), { w: W }, 16, { lengthOverride: 0xffffffffffffffffn }), /max\.safetensors/],
    ['bytes that are not UTF-8', () => rawFile(f('utf.safetensors'), Buffer.from([0x7b, 0xff, 0xfe, 0x7d]), 0), /utf\.safetensors: .*UTF-8/i],
    ['a header that is not JSON', () => rawFile(f('notjson.safetensors'), '{"w": ', 0), /notjson\.safetensors: .*JSON/i],
    ['a JSON array header', () => rawFile(f('array.safetensors'), '[1, 2]', 0), /array\.safetensors: .*object/i],
    ['a JSON null header', () => rawFile(f('null.safetensors'), 'null', 0), /null\.safetensors: .*object/i],
    ['duplicate tensor names', () => rawFile(f('dup.safetensors'), `{"w": ${JSON.stringify(W)}, "w": ${JSON.stringify({ ...W, data_offsets: [16, 32] })}}`, 32), /dup\.safetensors: .*duplicate/i],
    ['an unknown dtype', () => rawFile(f('dtype.safetensors'), { w: { ...W, dtype: 'F128' } }, 16), /dtype\.safetensors: .*F128/],
    ['a negative dimension', () => rawFile(f('neg.safetensors'), { w: { ...W, shape: [-2, 2] } }, 16), /neg\.safetensors: .*shape/i],
    ['a fractional dimension', () => rawFile(f('frac.safetensors'), { w: { ...W, shape: [1.5, 2] } }, 16), /frac\.safetensors: .*shape/i],
    ['a string dimension', () => rawFile(f('str.safetensors'), { w: { ...W, shape: ['2', 2] } }, 16), /str\.safetensors: .*shape/i],
    ['an overflowing shape', () => rawFile(f('ovf.safetensors'), { w: { ...W, shape: [2 ** 40, 2 ** 40] } }, 16), /ovf\.safetensors: .*(overflow|large|safe)/i],
    ['offsets that run backwards', () => rawFile(f('back.safetensors'), { w: { ...W, data_offsets: [16, 0] } }, 16), /back\.safetensors: .*offsets/i],
    ['offsets past the end', () => rawFile(f('past.safetensors'), { w: { ...W, data_offsets: [0, 16] } }, 8), /past\.safetensors/],
    ['overlapping tensors', () => rawFile(f('overlap.safetensors'), { a: W, b: { ...W, data_offsets: [8, 24] } }, 24), /overlap\.safetensors: .*overlap/i],
    ['a gap between tensors', () => rawFile(f('gap.safetensors'), { a: W, b: { ...W, data_offsets: [20, 36] } }, 36), /gap\.safetensors: .*gap/i],
    ['a size that does not match the shape', () => rawFile(f('size.safetensors'), { w: { ...W, data_offsets: [0, 12] } }, 12), /size\.safetensors: .*(needs|bytes)/i],
    ['trailing bytes after the last tensor', () => rawFile(f('trail.safetensors'), { w: W }, 20), /trail\.safetensors/],
    ['non-integer offsets', () => rawFile(f('offs.safetensors'), { w: { ...W, data_offsets: [0, 16.5] } }, 16), /offs\.safetensors: .*offsets/i],
    ['a metadata value that is not a string', () => rawFile(f('meta.safetensors'), { __metadata__: { format: 1 }, w: W }, 16), /meta\.safetensors: .*metadata/i],
    ['a tensor entry that is not an object', () => rawFile(f('entry.safetensors'), { w: 7 }, 0), /entry\.safetensors/],
    ['a directory without weights', () => (mkdirSync(f('nodata'), { recursive: true }), f('nodata')), /nodata: no model\.safetensors/],
    ['an index that is not JSON', () => { mkdirSync(f('idx1'), { recursive: true }); writeFileSync(join(f('idx1'), 'model.safetensors.index.json'), '{oops'); return f('idx1'); }, /idx1.*index\.json: not valid JSON/],
    ['an index without weight_map', () => { mkdirSync(f('idx2'), { recursive: true }); writeFileSync(join(f('idx2'), 'model.safetensors.index.json'), '{"metadata": {}}'); return f('idx2'); }, /idx2.*has no "weight_map"/],
    ['an index naming the directory itself', () => { mkdirSync(f('idx9'), { recursive: true }); writeFileSync(join(f('idx9'), 'model.safetensors.index.json'), JSON.stringify({ weight_map: { w: '.' } })); return f('idx9'); }, /idx9.*weight_map names "\.", the model directory itself, not a shard file in it/],
    ['an index escaping with ../', () => { mkdirSync(f('idx3'), { recursive: true }); writeFileSync(join(f('idx3'), 'model.safetensors.index.json'), JSON.stringify({ weight_map: { w: '../good/model.safetensors' } })); return f('idx3'); }, /idx3.*outside the model directory/],
    ['an index naming an absolute path', () => { mkdirSync(f('idx4'), { recursive: true }); writeFileSync(join(f('idx4'), 'model.safetensors.index.json'), JSON.stringify({ weight_map: { w: join(good, 'model.safetensors') } })); return f('idx4'); }, /idx4.*absolute path/],
    ['an index through a symbolic link leading out', () => { mkdirSync(f('idx5'), { recursive: true }); symlinkSync(join(good, 'model.safetensors'), join(f('idx5'), 'shard.safetensors')); writeFileSync(join(f('idx5'), 'model.safetensors.index.json'), JSON.stringify({ weight_map: { w: 'shard.safetensors' } })); return f('idx5'); }, /idx5.*link leading outside/],
    ['an index naming a missing shard', () => { mkdirSync(f('idx6'), { recursive: true }); writeFileSync(join(f('idx6'), 'model.safetensors.index.json'), JSON.stringify({ weight_map: { w: 'gone.safetensors' } })); return f('idx6'); }, /idx6.*gone\.safetensors.*does not exist/],
    ['an index naming a tensor its shard lacks', () => { mkdirSync(f('idx7'), { recursive: true }); saveModel(join(f('idx7'), 'x'), [{ name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array(4) }]); writeFileSync(join(f('idx7'), 'model.safetensors.index.json'), JSON.stringify({ weight_map: { v: 'x/model.safetensors' } })); return f('idx7'); }, /idx7.*puts "v" in model\.safetensors, which has no such tensor/],
    ['a header nested 10,000 deep', () => rawFile(f('deep.safetensors'), `{"__metadata__":${'['.repeat(10_000)}${']'.repeat(10_000)}}`, 0), /deep\.safetensors: "__metadata__" must be an object of strings, got \[\.\.\.\]/],
    ['an index value nested 10,000 deep', () => { mkdirSync(f('idx8'), { recursive: true }); writeFileSync(join(f('idx8'), 'model.safetensors.index.json'), `{"weight_map":{"w":${'['.repeat(10_000)}${']'.repeat(10_000)}}}`); return f('idx8'); }, /idx8.*weight_map values must be non-empty file names, got \[\.\.\.\]/],
    // Opening a FIFO for reading would wait for a writer forever.
    ['a FIFO as model.safetensors', () => { mkdirSync(f('fifo1'), { recursive: true }); spawnSync('mkfifo', [join(f('fifo1'), 'model.safetensors')]); return f('fifo1'); }, /fifo1.model\.safetensors: not a regular file/],
    ['a FIFO as the index', () => { mkdirSync(f('fifo2'), { recursive: true }); spawnSync('mkfifo', [join(f('fifo2'), 'model.safetensors.index.json')]); return f('fifo2'); }, /fifo2.*index\.json: not a regular file/],
    ['a tensor in two shards', () => { mkdirSync(f('two'), { recursive: true }); saveModel(join(f('two'), 'a'), [{ name: 'w', dtype: 'F32', shape: [1], data: new Float32Array(1) }]); rmSync(join(f('two'), 'a'), { recursive: true }); rawFile(join(f('two'), 'a.safetensors'), { w: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, 4); rawFile(join(f('two'), 'b.safetensors'), { w: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, 4); return f('two'); }, /tensor "w" is in both a\.safetensors and b\.safetensors/],
    // transformers would load model.safetensors, mergekit the index: which one is meant?
    ['both model.safetensors and an index', () => { saveModel(f('both'), [{ name: 'v', dtype: 'F32', shape: [2, 2], data: new Float32Array(4) }, { name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array(4) }], { shardSize: 16 }); saveModel(join(f('both'), 'single'), [{ name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array(4) }]); spawnSync('mv', [join(f('both'), 'single', 'model.safetensors'), f('both')]); return f('both'); }, /both: holds both model\.safetensors and model\.safetensors\.index\.json, so which of them is the model is ambiguous/],
    // (it was silently ignored, the shards then found by their names)
    ['an index that is a broken link', () => { saveModel(f('blink'), [{ name: 'v', dtype: 'F32', shape: [2, 2], data: new Float32Array(4) }, { name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array(4) }], { shardSize: 16 }); rmSync(join(f('blink'), 'model.safetensors.index.json')); symlinkSync(join(dir, 'gone.json'), join(f('blink'), 'model.safetensors.index.json')); return f('blink'); }, /blink.model\.safetensors\.index\.json: cannot be read \(ENOENT\)/],
    // (it said "no such file or directory")
    ['a symbolic link loop', () => { symlinkSync(f('loop'), f('loop')); return f('loop'); }, /loop: cannot be read \(ELOOP\)/],
  ];
  for (const [label, make, message] of cases) {
    it(label, () => {
      const path = make();
      const inspect = cli(['inspect', path]);
      expect(inspect.code, inspect.stderr).toBe(1);
      expect(inspect.stderr).toMatch(message);
      expect(inspect.stderr).not.toMatch(/\n\s+at /);
      const out = join(dir, `out-${label.replace(/\W+/g, '-')}`);
      const recipe = writeRecipe(join(dir, `r-${label.replace(/\W+/g, '-')}.yaml`), { merge_method: 'della', base_model: base, models: [{ model: path }] });
      const run = cli(['run', recipe, '--out', out]);
      expect(run.code, run.stderr).toBe(1);
      expect(run.stderr).toMatch(message);
      expect(existsSync(out)).toBe(false);
    });
  }

  it('150,000 tensors: inspect and run --dry-run list them all (column widths overflowed the call stack)', () => {
    const N = 150_000;
    const header: Record<string, unknown> = {};
    for (let i = 0; i < N; i++) header[`t${i}`] = { dtype: 'F32', shape: [1], data_offsets: [4 * i, 4 * i + 4] };
    mkdirSync(f('many'), { recursive: true });
    mkdirSync(f('many-e'), { recursive: true });
    rawFile(join(f('many'), 'model.safetensors'), header, 4 * N);
    rawFile(join(f('many-e'), 'model.safetensors'), header, 4 * N);
    const big = (args: string[]) => spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8', timeout: 60_000, maxBuffer: 64 << 20 });
    const inspect = big(['inspect', f('many')]);
    expect(inspect.stderr).toBe('');
    expect(inspect.stdout).toMatch(/^150000 tensors, 150,000 parameters/m);
    const dry = big(['run', writeRecipe(f('many.yaml'), { merge_method: 'task_arithmetic', base_model: f('many'), models: [{ model: f('many-e') }] }), '--dry-run']);
    expect(dry.stderr).toBe('');
    expect(dry.stdout).toMatch(/^totals +150000 tensors \(150000 merged/m);
  });

  it('NaN or infinity in a tensor to be merged is an error by default, and --allow-nonfinite proceeds', () => {
    saveModel(f('nan'), [{ name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array([1, NaN, Infinity, 4]) }]);
    const recipe = writeRecipe(f('nan.yaml'), { merge_method: 'task_arithmetic', base_model: base, models: [{ model: f('nan') }] });
    const r = cli(['run', recipe, '--out', f('nan-out')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/tensor "w" of .*nan holds 2 non-finite value\(s\)/);
    expect(existsSync(f('nan-out'))).toBe(false);
    // Parents that --out made are removed with the unfinished output.
    const nested = cli(['run', recipe, '--out', f('nan-parent/deeper/nan-out')]);
    expect(nested.code).toBe(1);
    expect(existsSync(f('nan-parent'))).toBe(false);
    const ok = cli(['run', recipe, '--out', f('nan-out'), '--allow-nonfinite']);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/warning +tensor "w" .* merged anyway/);
    // slerp counts its inputs twice (the coefficients' pass and the merge): one warning,
    // naming the expert (this was an internal error, exit 70).
    const slerp = cli(['run', writeRecipe(f('nan-slerp.yaml'), { merge_method: 'slerp', base_model: base, models: [{ model: f('nan') }], parameters: { t: 0.5 } }),
      '--out', f('nan-slerp'), '--allow-nonfinite']);
    expect(slerp.code, slerp.stderr).toBe(0);
    expect(slerp.stdout.match(/warning/g)).toHaveLength(1);
    expect(slerp.stdout).toMatch(/warning +tensor "w" of \S*nan holds 2 non-finite value\(s\) \(NaN or infinity\); merged anyway/);
  });

  it('merged values that overflow the output dtype are an error by default, on every backend; --allow-nonfinite writes them', async () => {
    // float16: 60000 + 2 * 4000 and 64992 + 2 * 512 round to infinity (beyond 65504).
    saveModel(f('ovf-base'), [{ name: 'w', dtype: 'F16', shape: [2, 2], data: new Uint16Array([0x7b53, 0x7bef, 0x3c00, 0x4000]) }]);
    saveModel(f('ovf-expert'), [{ name: 'w', dtype: 'F16', shape: [2, 2], data: new Uint16Array([0x7bd0, 0x7bff, 0x3c00, 0x4000]) }]);
    const doc = { merge_method: 'task_arithmetic', base_model: f('ovf-base'), models: [{ model: f('ovf-expert'), parameters: { weight: 2 } }] };
    const recipe = writeRecipe(f('ovf.yaml'), doc);
    const message = /tensor "w": 2 merged value\(s\) overflowed F16 \(beyond ±65504\) to infinity or NaN, from finite inputs; refusing to write it \(store it wider with out_dtype/;
    const r = cli(['run', recipe, '--out', f('ovf-out')]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(message);
    expect(existsSync(f('ovf-out'))).toBe(false);
    for (const backend of ['native', 'reference'] as const) {
      const err = await merge(recipe, { out: f(`ovf-api-${backend}`), backend }).catch((e: unknown) => e);
      expect(err, backend).toMatchObject({ code: 'E_NONFINITE', message: expect.stringMatching(message) });
      expect(existsSync(f(`ovf-api-${backend}`))).toBe(false);
    }
    // Stored wider, the same merge is finite.
    const wide = cli(['run', writeRecipe(f('ovf-wide.yaml'), { ...doc, out_dtype: 'float32' }), '--out', f('ovf-wide')]);
    expect(wide.code, wide.stderr).toBe(0);
    expect(wide.stdout).not.toMatch(/warning/);
    const c = openCheckpoint(f('ovf-wide'));
    expect([...new Float32Array(c.array('w').slice().buffer)]).toEqual([68000, 66016, 1, 2]);
    c.close();
    const ok = cli(['run', recipe, '--out', f('ovf-out'), '--allow-nonfinite']);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/warning +tensor "w": 2 merged value\(s\) overflowed F16 .* written anyway/);
    const verify = cli(['verify', f('ovf-out'), '--recipe', recipe]);
    expect(verify.code).toBe(1);
    expect(verify.stdout + verify.stderr).toMatch(/2 non-finite value\(s\)/);
    // Beyond fp32's range no output dtype helps: the message does not suggest one.
    saveModel(f('ovf32-base'), [{ name: 'w', dtype: 'F32', shape: [4], data: new Float32Array([3e38, -3e38, 1, 2]) }]);
    saveModel(f('ovf32-x'), [{ name: 'w', dtype: 'F32', shape: [4], data: new Float32Array([3.4e38, -3.4e38, 1, 2]) }]);
    for (const outDtype of [undefined, 'bfloat16']) {
      const r32 = cli(['run', writeRecipe(f(`ovf32-${outDtype}.yaml`), {
        merge_method: 'task_arithmetic', base_model: f('ovf32-base'), models: [{ model: f('ovf32-x'), parameters: { weight: 10 } }], ...(outDtype ? { out_dtype: outDtype } : {}),
      }), '--out', f('ovf32-out')]);
      expect(r32.code, r32.stderr).toBe(1);
      expect(r32.stderr).toMatch(/2 merged value\(s\) overflowed the fp32 range \(beyond ±3\.4e38\) to infinity or NaN, from finite inputs; refusing to write it \(lower the weights or lambda, or pass --allow-nonfinite/);
      expect(existsSync(f('ovf32-out'))).toBe(false);
    }
  });

  it('an addon built from another version (another interface) is one clear E_NATIVE error, not a silently different merge', () => {
    const fake = f('old-addon.cjs');
    writeFileSync(fake, 'module.exports = { abiVersion: 1, hardwareThreads: 1 };\n');
    saveModel(f('abi-x'), [{ name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array([1, 2, 3, 5]) }]);
    const r = spawnSync(process.execPath, [bin, 'run', writeRecipe(f('abi.yaml'), { merge_method: 'task_arithmetic', base_model: base, models: [{ model: f('abi-x') }] }), '--out', f('abi-out')],
      { encoding: 'utf8', env: { ...process.env, DELLA_NATIVE_PATH: fake } });
    expect(r.status, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/native addon at .*old-addon\.cjs was built from another version \(its interface 1, this code needs \d+\): run "npm rebuild della-merge"/);
    expect(existsSync(f('abi-out'))).toBe(false);
    // a DELLA_NATIVE_PATH that leads nowhere is named (it said no prebuilt binary fits)
    const gone = spawnSync(process.execPath, [bin, 'inspect', base], { encoding: 'utf8', env: { ...process.env, DELLA_NATIVE_PATH: f('no-addon.node') } });
    expect(gone.status).toBe(1);
    expect(gone.stderr).toMatch(/^della-merge: the della-merge native addon DELLA_NATIVE_PATH names \(\S*no-addon\.node\) could not be loaded \(Cannot find module .*\); unset DELLA_NATIVE_PATH to load the installed one\n$/);
  });

  it('a model without one tensor of the base\'s (an empty index, another model) is refused, not merged as a copy', () => {
    mkdirSync(f('noweights'), { recursive: true });
    writeFileSync(join(f('noweights'), 'model.safetensors.index.json'), JSON.stringify({ weight_map: {} }));
    saveModel(f('other'), [{ name: 'v', dtype: 'F32', shape: [2, 2], data: new Float32Array(4) }]);
    for (const [model, message] of [[f('noweights'), /noweights\) holds no tensors/], [f('other'), /other\) has none of the base model's tensors \(its 1, first "v"/]] as const) {
      const recipe = writeRecipe(f(`r-${basename(model)}.yaml`), { merge_method: 'task_arithmetic', base_model: base, models: [{ model }] });
      const r = cli(['run', recipe, '--out', f(`out-${basename(model)}`)]);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(message);
      expect(existsSync(f(`out-${basename(model)}`))).toBe(false);
      const asBase = cli(['run', writeRecipe(f(`rb-${basename(model)}.yaml`), { merge_method: 'task_arithmetic', base_model: model, models: [{ model: base }] }), '--out', f('out-b')]);
      expect(asBase.code, asBase.stderr).toBe(1);
    }
  });

  it('an embedding larger than the base\'s in one dimension only (an extended vocabulary) is refused with SPEC §2\'s rule said', () => {
    const emb = 'model.embed_tokens.weight';
    saveModel(f('emb-base'), [{ name: emb, dtype: 'F32', shape: [4, 3], data: new Float32Array(12).fill(1) }]);
    saveModel(f('emb-vocab'), [{ name: emb, dtype: 'F32', shape: [5, 3], data: new Float32Array(15).fill(2) }]);
    saveModel(f('emb-both'), [{ name: emb, dtype: 'F32', shape: [5, 4], data: new Float32Array(20).fill(2) }]);
    const recipe = (method: string, model: string) => writeRecipe(f(`emb-${method}-${basename(model)}.yaml`), {
      merge_method: method, base_model: f('emb-base'), models: [{ model, parameters: method === 'slerp' ? {} : { weight: 1 } }], ...(method === 'slerp' ? { parameters: { t: 0.5 } } : {}),
    });
    const r = cli(['run', recipe('task_arithmetic', f('emb-vocab')), '--out', f('emb-out')]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/has shape \[4, 3\] in the base model \S*emb-base but \[5, 3\] in \S*emb-vocab; an embedding may be larger than the base's only in every dimension \(its leading block is then merged: SPEC §2\), and this one is the same size in dimension 1\n$/);
    expect(existsSync(f('emb-out'))).toBe(false);
    const s = cli(['run', recipe('slerp', f('emb-both')), '--out', f('emb-out')]);
    expect(s.code, s.stderr).toBe(1);
    expect(s.stderr).toMatch(/but \[5, 4\] in \S*emb-both; slerp needs equal shapes\n$/);
    // larger in every dimension: the leading block is merged
    const ok = cli(['run', recipe('task_arithmetic', f('emb-both')), '--out', f('emb-out')]);
    expect(ok.code, ok.stderr).toBe(0);
  });

  it('a shard whose name begins with ".." is inside the model directory', () => {
    mkdirSync(f('dots'), { recursive: true });
    rawFile(join(f('dots'), '..w.safetensors'), { w: W }, 16);
    writeFileSync(join(f('dots'), 'model.safetensors.index.json'), JSON.stringify({ weight_map: { w: '..w.safetensors' } }));
    const r = cli(['inspect', f('dots')]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^w +F32/m);
  });

  it('a tensor named __proto__ is kept in the index, the run record and verify', () => {
    const tensors = ['__proto__', 'w'].map((name) => ({ name, dtype: 'F32' as const, shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) }));
    saveModel(f('proto-base'), tensors);
    saveModel(f('proto-x'), tensors.map((t) => ({ ...t, data: new Float32Array([2, 1, 4, 3]) })));
    const recipe = writeRecipe(f('proto.yaml'), { merge_method: 'task_arithmetic', base_model: f('proto-base'), models: [{ model: f('proto-x') }] });
    const run = cli(['run', recipe, '--out', f('proto-out'), '--shard-size', '16', '-q']); // one tensor per shard: an index
    expect(run.code, run.stderr).toBe(0);
    const index = JSON.parse(readFileSync(join(f('proto-out'), 'model.safetensors.index.json'), 'utf8'));
    expect(Object.keys(index.weight_map)).toEqual(['__proto__', 'w']);
    expect(Object.keys(JSON.parse(readFileSync(join(f('proto-out'), 'della_merge_run.json'), 'utf8')).xxh64)).toEqual(['__proto__', 'w']);
    const verify = cli(['verify', f('proto-out'), '--recipe', recipe]);
    expect(verify.code, verify.stdout + verify.stderr).toBe(0);
  });

  it('a file over 4 GiB: tensors past 4 GiB read from JavaScript, one over 4 GiB refused clearly by bytes()', () => {
    // Sparse: a 4.5 GiB pad tensor, then w. Node 20 cannot view over 4 GiB at once, and
    // one such view aborted the process; verify and bytes() view such files in windows.
    const pad = 4.5 * 2 ** 30;
    const header = Buffer.from(JSON.stringify({
      pad: { dtype: 'U8', shape: [pad], data_offsets: [0, pad] },
      w: { dtype: 'F32', shape: [2, 2], data_offsets: [pad, pad + 16] },
    }));
    const file = f('big.safetensors');
    const fd = openSync(file, 'w');
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(header.length));
    writeSync(fd, Buffer.concat([prefix, header]), 0, 8 + header.length, 0);
    writeSync(fd, Buffer.from(new Float32Array([5, 6, 7, 8]).buffer), 0, 16, 8 + header.length + pad);
    closeSync(fd);
    const c = openCheckpoint(file);
    try {
      expect([...(c.array('w') as Float32Array)]).toEqual([5, 6, 7, 8]);
      expect(() => c.bytes('pad')).toThrow(/: tensor "pad" is 4831838208 bytes, more than the 4 GiB one Uint8Array holds in Node\.js: read it with data\("pad"\) \(a DataView over a copy\)$/);
    } finally {
      c.close();
      rmSync(file);
    }
  });

  it('an output that holds an input is refused, even with --overwrite, and the input stays', () => {
    mkdirSync(f('holder'), { recursive: true });
    saveModel(join(f('holder'), 'x'), [{ name: 'w', dtype: 'F32', shape: [2, 2], data: new Float32Array([4, 3, 2, 1]) }]);
    const recipe = writeRecipe(f('holder.yaml'), { merge_method: 'task_arithmetic', base_model: base, models: [{ model: join(f('holder'), 'x') }] });
    for (const out of [f('holder'), join(f('holder'), 'x')]) {
      const r = cli(['run', recipe, '--out', out, '--overwrite', '-q']);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(/holds .*holder.x.*an input of this merge: replacing it would delete that input/);
      expect(existsSync(join(f('holder'), 'x', 'model.safetensors'))).toBe(true);
    }
    // '/' holds every input (checked with --dry-run, which only checks the output); so
    // does a directory holding the recipe, which --overwrite used to delete.
    const root = cli(['run', recipe, '--out', '/', '--overwrite', '--dry-run']);
    expect(root.code, root.stderr).toBe(1);
    expect(root.stderr).toMatch(/^della-merge: \/ holds .*, an input of this merge: replacing it would delete that input/);
    mkdirSync(f('with-recipe'), { recursive: true });
    const inside = writeRecipe(join(f('with-recipe'), 'r.yaml'), { merge_method: 'task_arithmetic', base_model: base, models: [{ model: join(f('holder'), 'x') }] });
    const r = cli(['run', inside, '--out', f('with-recipe'), '--overwrite', '-q']);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(/with-recipe holds .*with-recipe\/r\.yaml, an input of this merge/);
    expect(existsSync(inside)).toBe(true);
  });
});

describe('faults leave nothing that looks finished', () => {
  it('an unfinished output of a killed run (SIGKILL leaves it) is named in a warning of the next run into that output', async () => {
    const dir = tempDir();
    const recipe = tinyRecipe(dir);
    const dead = join(dir, '.o.della-tmp-999999999-0a1b2c3d'); // above any pid_max
    const live = join(dir, `.o.della-tmp-${process.pid}-0a1b2c3d`); // perhaps a run writing it now
    const other = join(dir, '.p.della-tmp-999999999-0a1b2c3d'); // another output's
    for (const d of [dead, live, other]) mkdirSync(d);
    const report = await merge(recipe, { out: join(dir, 'o') });
    expect(report.warnings).toContain(`1 unfinished output(s) of earlier runs into ${join(dir, 'o')} whose process is gone (killed?) are still there, holding disk space: remove ${dead}`);
    expect(existsSync(dead) && existsSync(live) && existsSync(other)).toBe(true); // reported, not removed
  });

  function bigModels(dir: string) {
    const tensors = (salt: number) => Array.from({ length: 24 }, (_, i) => {
      const data = new Uint16Array(1 << 20);
      for (let j = 0; j < data.length; j++) data[j] = 0x3c00 | ((j * 2654435761 + i * 97 + salt * (j & 7)) & 0x3ff);
      return { name: `model.layers.${i}.mlp.up_proj.weight`, dtype: 'BF16', shape: [1024, 1024], data };
    });
    saveModel(join(dir, 'base'), tensors(0));
    saveModel(join(dir, 'e0'), tensors(1));
    return writeRecipe(join(dir, 'r.yaml'), { merge_method: 'della', base_model: join(dir, 'base'), models: [{ model: join(dir, 'e0'), parameters: { density: 0.5, epsilon: 0.1 } }] });
  }

  /** Starts a merge, sends `signal` at its first progress line, returns the exit code. */
  async function interruptMidway(signal: 'SIGINT' | 'SIGTERM' | 'SIGHUP') {
    const dir = tempDir();
    const recipe = bigModels(dir);
    const out = join(dir, 'merged');
    const child = spawn(process.execPath, [bin, 'run', recipe, '--out', out, '--threads', '1'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    const code = await new Promise<number | null>((done) => {
      child.stderr.on('data', (d: Buffer) => {
        stderr += d.toString();
        if (stderr.includes('progress') && !child.killed) child.kill(signal);
      });
      child.on('exit', (c) => done(c));
    });
    return { code, stderr, out, dir };
  }

  for (const [signal, exit] of [['SIGINT', 130], ['SIGTERM', 143], ['SIGHUP', 129]] as const) {
    it(`${signal} midway exits ${exit} and leaves nothing that looks finished`, async () => {
      const r = await interruptMidway(signal);
      expect(r.code, r.stderr).toBe(exit);
      if (signal !== 'SIGHUP') expect(r.stderr).toContain(`${signal}: stopping`); // after a hangup, no terminal to tell
      expect(existsSync(r.out)).toBe(false);
      expect(readdirSync(r.dir).filter((x) => x.includes('della-tmp'))).toEqual([]);
    });
  }

  it('SIGINT during run --verify stops the check alone: exit 130, the output, its summary and --report stay', async () => {
    const dir = tempDir();
    bigModels(dir);
    // TIES: verify passes over every element of the 24 tensors, on this thread (-j 1)
    const recipe = writeRecipe(join(dir, 'ties.yaml'), { merge_method: 'ties', base_model: join(dir, 'base'), models: [{ model: join(dir, 'e0'), parameters: { density: 0.5 } }] });
    const out = join(dir, 'merged'), reportFile = join(dir, 'report.json');
    const child = spawn(process.execPath, [bin, 'run', recipe, '--out', out, '--verify', '--report', reportFile, '-j', '1', '-q'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', stderr = '';
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    const code = await new Promise<number | null>((done) => {
      child.stdout.on('data', (d: Buffer) => {
        stdout += d.toString();
        if (/^files /m.test(stdout) && !child.killed) child.kill('SIGINT'); // the merge's summary is out: verify has begun
      });
      child.on('exit', (c) => done(c));
    });
    expect(code, stderr).toBe(130);
    expect(stderr).toContain(`the merge into ${out} is complete; not verifying it`);
    expect(stdout).toMatch(/^merged +ties: 24 tensors merged/m);
    expect(stdout).not.toMatch(/verified/);
    expect(readdirSync(out)).toContain('model.safetensors');
    const report = JSON.parse(readFileSync(reportFile, 'utf8'));
    expect(report.tensors.merged).toBe(24);
    expect(report.verify).toBeUndefined(); // unverified, and the report says so by having no verify part
  });

  it('an input modified during the merge is detected and reported', async () => {
    const dir = tempDir();
    const recipe = bigModels(dir);
    let touched = false;
    const err = await merge(recipe, {
      out: join(dir, 'merged'),
      onProgress: () => {
        if (!touched) {
          touched = true;
          utimesSync(join(dir, 'e0', 'model.safetensors'), new Date(), new Date(Date.now() + 5000));
        }
      },
    }).catch((e: Error) => e);
    expect(String(err)).toMatch(/e0\/model\.safetensors was modified while it was being read/);
    expect(existsSync(join(dir, 'merged'))).toBe(false);
    expect(readdirSync(dir).filter((x) => x.includes('della-tmp'))).toEqual([]);
  });

  /** Merges bigModels through the API in a child process (without the guard it dies of
   * SIGBUS), truncating the expert at the progress of batch `cutAt` (of three); with
   * `listenAt`, adds a process.on('SIGBUS') listener at that batch's progress first.
   * What the merge ended with. */
  function cutMidMerge(dir: string, out: string, cutAt: number, listenAt?: number) {
    const recipe = bigModels(dir);
    const victim = join(dir, 'e0', 'model.safetensors');
    const script = `
      import { truncateSync } from 'node:fs';
      import { merge } from ${dist('index.js')};
      let batches = 0, cut = false;
      const onProgress = () => {
        batches++;
        if (batches === ${listenAt ?? 0}) process.on('SIGBUS', () => {});
        if (batches === ${cutAt}) { truncateSync(${JSON.stringify(victim)}, 4096); cut = true; }
      };
      await merge(${JSON.stringify(recipe)}, { out: ${JSON.stringify(out)}, threads: 1, onProgress }).then(
        () => console.log(JSON.stringify({ cut, ok: true })),
        (e) => console.log(JSON.stringify({ cut, code: e.code, message: e.message })));
    `;
    return childJson(script) as { cut: boolean; code?: string; message?: string };
  }

  it('an input cut short during the merge stops it with a message, not SIGBUS, and leaves nothing behind', () => {
    // Cut at the first batch's progress, when the second is with the kernels and the
    // third not yet started, so that one reads past the cut whatever the timing.
    const dir = tempDir();
    const out = join(dir, 'merged');
    const seen = cutMidMerge(dir, out, 1);
    expect(seen).toMatchObject({ cut: true, code: 'E_IO' });
    expect(seen.message).toMatch(/e0\/model\.safetensors changed size while it was being read \(\d+ → 4096 bytes\); the merge is abandoned/);
    expect(existsSync(out)).toBe(false);
    expect(readdirSync(dir).filter((x) => x.includes('della-tmp'))).toEqual([]);
  });

  it('a SIGBUS listener added after the inputs were opened does not take the guard\'s faults', () => {
    // libuv's handler, installed by the listener at the first batch's progress, returns
    // without passing faults on: before the guard went back in front at each batch, the
    // third batch's read past the cut (made at the second's progress) hung the merge.
    const dir = tempDir();
    const out = join(dir, 'merged');
    const seen = cutMidMerge(dir, out, 2, 1);
    expect(seen).toMatchObject({ cut: true, code: 'E_IO' });
    expect(seen.message).toMatch(/e0\/model\.safetensors changed size while it was being read/);
    expect(existsSync(out)).toBe(false);
  });

  it('a map whose file is cut short reads zeros past the cut and says so, from JS and natively', () => {
    // In a child process: without the guard, the reads below kill it with SIGBUS. 1 MiB
    // cut at 5000 bytes leaves whole pages past the cut for pages of up to 64 KiB.
    const dir = tempDir();
    const file = join(dir, 'cut.bin');
    writeFileSync(file, Buffer.alloc(1 << 20, 0x5a));
    const script = `
      import { truncateSync } from 'node:fs';
      import { loadNative } from ${dist('native.js')};
      const native = loadNative();
      const map = new native.MappedFile(${JSON.stringify(file)});
      const view = map.view(0, map.size);
      const before = [map.faulted, view[1000000]];
      truncateSync(${JSON.stringify(file)}, 5000);
      const digest = native.xxh64(view); // natively: the first read past the cut
      let head = 0, tail = 0;
      for (let i = 0; i < view.length; i++) if (i < 5000) head += view[i] === 0x5a ? 1 : 0; else tail += view[i];
      map.close();
      console.log(JSON.stringify({ before, faulted: map.faulted, head, tail, digest }));
    `;
    const seen = childJson(script) as { before: [boolean, number]; faulted: boolean; head: number; tail: number; digest: string };
    const want = Buffer.alloc(1 << 20);
    want.fill(0x5a, 0, 5000);
    expect(seen).toEqual({ before: [false, 0x5a], faulted: true, head: 5000, tail: 0, digest: loadNative().xxh64(want) });
  });

  it('a checkpoint read past a cut, then grown back to its size and time, still reports the failed read', () => {
    const dir = tempDir();
    saveModel(join(dir, 'm'), [{ name: 'w', dtype: 'F32', shape: [1 << 18], data: new Float32Array(1 << 18).fill(1) }]);
    const file = join(dir, 'm', 'model.safetensors');
    utimesSync(file, 1e9, 1e9); // whole seconds: restored exactly below
    const script = `
      import { statSync, truncateSync, utimesSync } from 'node:fs';
      import { openCheckpoint } from ${dist('index.js')};
      const f = ${JSON.stringify(file)};
      const c = openCheckpoint(${JSON.stringify(join(dir, 'm'))});
      const size = statSync(f).size;
      truncateSync(f, 4096);
      const sum = c.bytes('w').reduce((a, b) => a + b, 0);
      truncateSync(f, size);
      utimesSync(f, 1e9, 1e9);
      console.log(JSON.stringify({ zerosRead: sum < 4096 * 255, changed: c.changed() }));
    `;
    expect(childJson(script)).toEqual({ zerosRead: true, changed: `${file} could not be read in full while it was being read (cut short, or an I/O error)` });
  });

  it('a read-only output location fails cleanly (a read-only bind mount where the machine permits)', () => {
    const dir = tempDir();
    saveModel(join(dir, 'base'), [{ name: 'w', dtype: 'F32', shape: [4], data: new Float32Array(4) }]);
    saveModel(join(dir, 'e'), [{ name: 'w', dtype: 'F32', shape: [4], data: new Float32Array(4).fill(1) }]);
    const recipe = writeRecipe(join(dir, 'r.yaml'), { merge_method: 'task_arithmetic', base_model: join(dir, 'base'), models: [{ model: join(dir, 'e') }] });
    const ro = join(dir, 'ro');
    mkdirSync(ro);
    const mounted = spawnSync('mount', ['--bind', ro, ro]).status === 0 && spawnSync('mount', ['-o', 'remount,bind,ro', ro]).status === 0;
    try {
      const target = mounted ? join(ro, 'merged') : join(dir, 'r.yaml', 'merged'); // else: a path under a file
      const r = cli(['run', recipe, '--out', target]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(mounted ? /read-only file system/i : /not a directory|ENOTDIR/i);
      expect(r.stderr).not.toMatch(/\n\s+at /);
      if (mounted) expect(readdirSync(ro)).toEqual([]);
      expect(readdirSync(dir).filter((x) => x.includes('della-tmp'))).toEqual([]);
    } finally {
      if (mounted) spawnSync('umount', [ro]);
    }
  });

  it('a full disk fails cleanly (a 1 MB tmpfs where the machine permits, else an unwritable path)', () => {
    const dir = tempDir();
    saveModel(join(dir, 'base'), [{ name: 'w', dtype: 'F32', shape: [512, 1024], data: new Float32Array(512 * 1024) }]);
    saveModel(join(dir, 'e'), [{ name: 'w', dtype: 'F32', shape: [512, 1024], data: new Float32Array(512 * 1024).fill(0.5) }]);
    const recipe = writeRecipe(join(dir, 'r.yaml'), { merge_method: 'task_arithmetic', base_model: join(dir, 'base'), models: [{ model: join(dir, 'e') }] });
    const mnt = join(dir, 'small');
    mkdirSync(mnt);
    const mounted = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', mnt]).status === 0;
    try {
      if (mounted) {
        const r = cli(['run', recipe, '--out', join(mnt, 'merged')]);
        expect(r.code).toBe(1);
        expect(r.stderr).toMatch(/no space left on device|No space left/i);
        expect(readdirSync(mnt)).toEqual([]);
      } else {
        writeFileSync(join(dir, 'file'), 'x');
        const r = cli(['run', recipe, '--out', join(dir, 'file', 'merged')]);
        expect(r.code).toBe(1);
        expect(r.stderr).toMatch(/file/);
      }
    } finally {
      if (mounted) spawnSync('umount', [mnt]);
    }
  });

  it('run --dry-run --out on a read-only disk is refused as the merge would be (it passed)', (ctx) => {
    const dir = tempDir();
    const recipe = tinyRecipe(dir);
    onTmpfs(ctx, join(dir, 'ro'), 'size=1m,ro', (mnt) => {
      for (const args of [['--dry-run'], []]) {
        const r = cli(['run', recipe, '--out', join(mnt, 'a', 'out'), ...args]);
        expect(r.code, args.join(' ')).toBe(1);
        expect(r.stderr).toMatch(/^della-merge: cannot create \S+ro\/a\/out: \S+ro is not writable: EROFS/);
      }
    });
  });

  it('a --report that does not fit on its disk leaves the earlier report whole (it left a cut JSON)', (ctx) => {
    const dir = tempDir();
    const recipe = tinyRecipe(dir);
    onTmpfs(ctx, join(dir, 'small'), 'size=8k', (mnt) => {
      writeFileSync(join(mnt, 'fill'), Buffer.alloc(4096));
      writeFileSync(join(mnt, 'report.json'), '{"old": true}\n');
      const r = cli(['run', recipe, '--out', join(dir, 'o'), '--report', join(mnt, 'report.json')]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/the merge into \S+ is complete, but cannot write the report \S+report\.json: no space left on device/);
      expect(readFileSync(join(mnt, 'report.json'), 'utf8')).toBe('{"old": true}\n');
      expect(readdirSync(mnt).sort()).toEqual(['fill', 'report.json']);
    });
  });
});
