/**
 * Writes safetensors checkpoints from tensors held in memory: used by the demo, the
 * tests' fixtures and API users who build small models. Large merges go through
 * OutputDirectory instead, which never holds a tensor in JS.
 */
import { closeSync, existsSync, openSync, readdirSync, renameSync, rmSync, statSync, writeSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { DellaError, ioError } from '../errors.js';
import { makeDirs, removeEmptyDirs } from '../util/fs.js';
import { showArg } from '../util/show.js';
import { checkOptions } from '../util/options.js';
import { checkTensorData } from './memory.js';
import { MAX_HEADER_LENGTH } from './safetensors.js';
import { indexJson, INDEX_FILE, layoutShards, SHARD_NAME, TEMP_MARK } from './writer.js';
import { windows, type Bytes } from '../util/bytes.js';
import { SINGLE_FILE } from './model.js';

export interface InMemoryTensor {
  name: string;
  dtype: string;
  shape: number[];
  data: ArrayBufferView;
}

function argsError(message: string): DellaError {
  return new DellaError('E_ARGS', `saveModel: ${message}`);
}

interface CheckedTensor {
  name: string;
  dtype: string;
  shape: number[];
  /** a view of the caller's data, not a copy */
  bytes: Bytes;
}

/** Checks one entry of `tensors`. */
function checkTensor(t: unknown, i: number): CheckedTensor {
  if (t === null || typeof t !== 'object' || Array.isArray(t)) {
    throw argsError(`tensor ${i}: must be an object {name, dtype, shape, data}, got ${showArg(t)}`);
  }
  const { name } = t as Record<string, unknown>;
  if (typeof name !== 'string' || name === '') {
    throw argsError(`tensor ${i}: name must be a non-empty string, got ${showArg(name)}`);
  }
  const where = `tensor ${i} (${JSON.stringify(name)})`;
  if (name === '__metadata__') throw argsError(`${where}: the name "__metadata__" is reserved by the safetensors format`);
  return { name, ...checkTensorData(`saveModel: ${where}`, t) };
}

/**
 * Removes an earlier save's weight files that this one did not write: an index left
 * beside a new model.safetensors made readers take the old shards, and a
 * model.safetensors beside a new index is what transformers loads first.
 */
function removeStaleWeights(dir: string, written: readonly string[]): void {
  const ours = new Set(written);
  for (const name of readdirSync(dir)) {
    if (ours.has(name) || !(name === INDEX_FILE || name === SINGLE_FILE || SHARD_NAME.test(name))) continue;
    try {
      rmSync(join(dir, name), { force: true });
    } catch (e) {
      throw ioError(`saveModel: cannot remove ${join(dir, name)}, a weight file of an earlier save`, e);
    }
  }
}

/** Writes all of `bytes` at the file's current position (writeSync may write less). */
function writeAll(fd: number, bytes: Bytes): void {
  for (const w of windows(bytes)) {
    for (let off = 0; off < w.length;) off += writeSync(fd, w, off, w.length - off);
  }
}

/**
 * Saves a model directory: model.safetensors, or shards of at most `shardSize` data
 * bytes plus model.safetensors.index.json. Returns the file names written.
 * Every argument is checked before anything is written; a failed write removes the
 * files (and the directories) this call made and leaves an earlier save as it was (each
 * file is written aside and renamed into place). Saving over an earlier save replaces it:
 * the weight files of the other layout (an index and its shards, or model.safetensors)
 * are removed once the new ones are written, so that no reader finds the old weights.
 */
export function saveModel(dir: string, tensors: readonly InMemoryTensor[], options: { shardSize?: number } = {}): string[] {
  if (typeof dir !== 'string' || dir === '') throw argsError(`dir must be a non-empty path string, got ${showArg(dir)}`);
  if (!Array.isArray(tensors)) {
    throw argsError(`tensors must be an array of {name, dtype, shape, data}, got ${showArg(tensors)}`);
  }
  checkOptions(options, 'saveModel(dir, tensors, options)', { shardSize: 'checked' });
  const shardSize = options.shardSize ?? Number.MAX_SAFE_INTEGER;
  if (!(Number.isSafeInteger(shardSize) && shardSize > 0)) {
    throw argsError(`shardSize must be a positive integer number of bytes, got ${showArg(options.shardSize)}`);
  }
  const byName = new Map<string, CheckedTensor>();
  for (let i = 0; i < tensors.length; i++) { // not forEach: it skips the holes of a sparse array
    const t = checkTensor(tensors[i], i);
    if (byName.has(t.name)) throw argsError(`tensor ${i} (${JSON.stringify(t.name)}) is given twice`);
    byName.set(t.name, t);
  }
  const layouts = layoutShards(
    [...byName.values()].map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, byteLength: t.bytes.byteLength })),
    shardSize,
  );
  for (const l of layouts) {
    if (l.header.length - 8 > MAX_HEADER_LENGTH) {
      throw argsError(`the header of ${l.fileName} would be ${l.header.length - 8} bytes, over the safetensors limit of ${MAX_HEADER_LENGTH} (too many or too long names)`);
    }
  }

  let made: string | undefined;
  try {
    made = makeDirs(dir);
  } catch (e) {
    throw ioError(`saveModel: cannot create the directory ${dir}`, e);
  }
  // Each file is written under a temporary name and renamed into place once all are
  // written: an earlier save stays whole if this one fails, and views of it still mapped
  // (saving a model opened from this very directory) keep reading its old bytes. Written
  // over in place, its file was cut to 0 under them and the write failed with EFAULT.
  const staged: Array<{ tmp: string; path: string }> = [];
  const write = (fileName: string, pieces: readonly Bytes[]) => {
    const path = join(dir, fileName);
    const tmp = join(dir, `.${fileName}${TEMP_MARK}${process.pid}`);
    staged.push({ tmp, path });
    let fd: number | undefined;
    try {
      fd = openSync(tmp, 'w');
      for (const p of pieces) writeAll(fd, p);
      const f = fd;
      fd = undefined; // a failed close is not retried
      closeSync(f);
    } catch (e) {
      if (fd !== undefined) {
        try { closeSync(fd); } catch { /* already failing */ }
      }
      throw ioError(`saveModel: cannot write ${path}`, e);
    }
  };
  const targets = [...layouts.map((l) => l.fileName), ...(layouts.length > 1 ? [INDEX_FILE] : [])];
  const taken = targets.find((f) => statSync(join(dir, f), { throwIfNoEntry: false })?.isDirectory());
  if (taken) throw new DellaError('E_IO', `saveModel: cannot write ${join(dir, taken)}: it is a directory`);
  const placed: string[] = []; // new files renamed into place, removed again on a failure
  try {
    for (const l of layouts) write(l.fileName, [l.header, ...l.tensors.map((t) => byName.get(t.name)!.bytes)]);
    const files = layouts.map((l) => l.fileName);
    if (layouts.length > 1) {
      write(INDEX_FILE, [new TextEncoder().encode(indexJson(layouts))]);
      files.push(INDEX_FILE);
    }
    for (const { tmp, path } of staged) { // the index last
      try {
        const fresh = !existsSync(path);
        renameSync(tmp, path);
        if (fresh) placed.push(path);
      } catch (e) {
        throw ioError(`saveModel: cannot put ${path} in place`, e);
      }
    }
    removeStaleWeights(dir, files);
    return files;
  } catch (e) {
    // Leave nothing behind: the temporary files, then the directories this call made.
    for (const path of [...staged.map((f) => f.tmp), ...placed]) {
      try { rmSync(path, { force: true }); } catch { /* the write failure is the error to report */ }
    }
    if (made !== undefined) removeEmptyDirs(resolve(dir), resolve(made));
    throw e;
  }
}
