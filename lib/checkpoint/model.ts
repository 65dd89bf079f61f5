/**
 * Opens a checkpoint (SPEC §8): a .safetensors file, a directory with
 * model.safetensors, a sharded directory with model.safetensors.index.json, or a
 * directory of *.safetensors shards. Files are memory-mapped by the addon and every
 * header is validated before any tensor is touched.
 */
import { existsSync, readdirSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { basename, dirname, isAbsolute, join, relative, resolve, sep } from 'node:path';
import { DellaError } from '../errors.js';
import { jsonForMessage } from '../util/show.js';
import { loadNative, type NativeMappedFile, type NativeSlice } from '../native.js';
import { MAX_UINT8ARRAY, sliceBytes, sliceWindows, subBytes, uint8, windows, type Bytes } from '../util/bytes.js';
import { parseHeader, readHeaderLength, type SafetensorsHeader, type TensorInfo } from './safetensors.js';

export const INDEX_FILE = 'model.safetensors.index.json';
export const SINGLE_FILE = 'model.safetensors';

export interface CheckpointTensor extends TensorInfo {
  /** absolute path of the file holding it */
  file: string;
  /** absolute byte offset of its data in that file */
  offset: number;
  byteLength: number;
}

export interface Checkpoint {
  /** the path as opened, resolved */
  path: string;
  /** the directory holding config and tokenizer files, or null for a lone file */
  dir: string | null;
  files: string[];
  /** tensors by name */
  tensors: ReadonlyMap<string, CheckpointTensor>;
  /** tensor names, sorted (frozen: the checkpoint's own list) */
  readonly names: readonly string[];
  /** __metadata__ of each file, by file path */
  metadata: ReadonlyMap<string, Record<string, string> | null>;
  totalBytes: number;
  /** Zero-copy bytes of a tensor, up to 4 GiB (the most one Uint8Array holds in
   * Node 20); data() reads larger ones. */
  bytes(name: string): Uint8Array;
  /** Bytes of a tensor of any size: zero-copy up to 4 GiB; beyond, a DataView over a
   * copy from a file (Node 20 views at most 4 GiB of a file's map at once), or over the
   * tensor's own memory when it was given in memory. */
  data(name: string): Bytes;
  /** The tensor's bytes for the native kernels: a slice of its file's map (no JS
   * buffer, see input_field in the binding), or the bytes themselves when in memory. */
  slice(name: string): Bytes | NativeSlice;
  /**
   * The tensor as a typed array of its element type (F16/BF16 as Uint16Array raw bits,
   * F8 types as Uint8Array). Zero-copy when the data is aligned to its element size,
   * as in files written by safetensors or della-merge; otherwise a copy. Up to 2^32
   * elements (Node 20's longest typed array).
   */
  array(name: string): TensorArray;
  /** Hints the kernel to read a tensor ahead of use. */
  prefetch(name: string): void;
  /**
   * Drops this process's page mappings of a tensor that is no longer needed (the page
   * cache keeps the bytes; a later read maps them again). A merge releases each batch's
   * inputs, so its resident memory does not grow to the models' size and the mappings
   * are not all torn down at once when the maps close.
   */
  release(name: string): void;
  /** Releases the maps once every view handed out is collected. */
  close(): void;
  /** A description of the first file whose size or modification time changed since it
   * was opened, or whose map could not be read (cut short meanwhile, or an I/O error),
   * else null. */
  changed(): string | null;
}

export type TensorArray =
  | Float64Array | Float32Array | Uint16Array | Int16Array | Uint8Array | Int8Array
  | Int32Array | Uint32Array | BigInt64Array | BigUint64Array;

const ARRAY_TYPES: Record<string, { new (b: ArrayBufferLike, o: number, n: number): TensorArray; BYTES_PER_ELEMENT: number }> = {
  F64: Float64Array, F32: Float32Array, F16: Uint16Array, BF16: Uint16Array, I64: BigInt64Array, U64: BigUint64Array,
  I32: Int32Array, U32: Uint32Array, I16: Int16Array, U16: Uint16Array, I8: Int8Array, U8: Uint8Array, BOOL: Uint8Array,
  F8_E4M3: Uint8Array, F8_E5M2: Uint8Array, F8_E8M0: Uint8Array, C64: Float32Array,
};

interface OpenFile {
  map: NativeMappedFile;
  /** views of the map, made on first use; tensors are subarrays of them (a new external
   * buffer per tensor would count gigabytes against the JS heap's GC budget): one view
   * of the whole file up to 2 GiB, else window k covers [k GiB, k GiB + 2 GiB) */
  windows?: Map<number, Uint8Array>;
  /** views of tensors over 1 GiB in files over 2 GiB, by offset: one each, however often
   * asked for (verify views a tensor's rows, windows and whole) */
  own?: Map<number, Uint8Array>;
  header: SafetensorsHeader;
  size: number;
  mtimeMs: number;
}

/** Windows of files over 2 GiB: a model's file often holds more than the 4 GiB one
 * Uint8Array can view. */
const WINDOW = 2 ** 30;

function view(f: OpenFile, offset: number, length: number): Uint8Array {
  if (length === 0) return new Uint8Array(0);
  const size = f.map.size;
  if (size > 2 * WINDOW && length > WINDOW) { // its own view
    f.own ??= new Map();
    let v = f.own.get(offset);
    if (v?.byteLength !== length) {
      v = f.map.view(offset, length);
      f.own.set(offset, v);
    }
    return v;
  }
  // The window holding the tensor's start holds its end too (the whole file up to 2 GiB).
  const k = size <= 2 * WINDOW ? 0 : Math.floor(offset / WINDOW);
  f.windows ??= new Map();
  let w = f.windows.get(k);
  if (!w) {
    w = f.map.view(k * WINDOW, Math.min(2 * WINDOW, size - k * WINDOW));
    f.windows.set(k, w);
  }
  return w.subarray(offset - k * WINDOW, offset - k * WINDOW + length);
}

/** An fs error's reason for a message: its code (EACCES, ELOOP), else its message. */
function errno(e: unknown): string {
  return (e as NodeJS.ErrnoException).code ?? (e as Error).message;
}

function checkpointError(message: string): DellaError {
  return new DellaError('E_CHECKPOINT', message);
}

function openFile(file: string, copyOnWrite: boolean): OpenFile {
  const native = loadNative();
  let map: NativeMappedFile;
  let st;
  try {
    st = statSync(file);
  } catch (e) {
    throw checkpointError(`${file}: cannot be read: ${(e as Error).message.replace(`${file}: `, '')}`);
  }
  // Opening a FIFO would wait for a writer forever; a directory cannot be mapped.
  if (!st.isFile()) throw checkpointError(`${file}: not a regular file`);
  try {
    map = new native.MappedFile(file, copyOnWrite);
  } catch (e) {
    throw checkpointError(`${file}: cannot be read: ${(e as Error).message.replace(`${file}: `, '')}`);
  }
  try {
    const headerLength = readHeaderLength(uint8(map.view(0, Math.min(8, map.size)), file), map.size, file);
    const header = parseHeader(uint8(map.view(8, headerLength), `${file}'s header`), headerLength, map.size, file);
    return { map, header, size: st.size, mtimeMs: st.mtimeMs };
  } catch (e) {
    map.close();
    throw e;
  }
}

/** Resolves a weight_map entry, refusing anything that leads outside `dir`. */
function shardPath(dir: string, name: unknown, indexFile: string): string {
  if (typeof name !== 'string' || name === '') {
    throw checkpointError(`${indexFile}: weight_map values must be non-empty file names, got ${jsonForMessage(name)}`);
  }
  if (isAbsolute(name)) throw checkpointError(`${indexFile}: weight_map names "${name}", an absolute path; shards must be inside ${dir}`);
  const full = resolve(dir, name);
  const rel = relative(dir, full);
  if (rel === '') throw checkpointError(`${indexFile}: weight_map names "${name}", the model directory itself, not a shard file in it`);
  if (rel === '..' || rel.startsWith(`..${sep}`) || isAbsolute(rel)) {
    throw checkpointError(`${indexFile}: weight_map names "${name}", which is outside the model directory ${dir}`);
  }
  if (!existsSync(full)) throw checkpointError(`${indexFile}: weight_map names "${name}", which does not exist in ${dir}`);
  const real = realpathSync(full);
  const realDir = realpathSync(dir);
  const inside = (d: string): boolean => real.startsWith(d + sep);
  // The Hugging Face cache keeps a snapshot's files as links into its repository's
  // blobs/ (models--org--name/snapshots/REV/FILE -> ../../blobs/HASH).
  const hfBlobs = basename(dirname(realDir)) === 'snapshots' ? join(dirname(dirname(realDir)), 'blobs') : null;
  if (!inside(realDir) && !(hfBlobs && inside(hfBlobs))) {
    throw checkpointError(`${indexFile}: weight_map names "${name}", a link leading outside the model directory ${dir}`);
  }
  return full;
}

function readIndex(dir: string): { files: string[]; weightMap: Map<string, string> } {
  const indexFile = join(dir, INDEX_FILE);
  let st;
  try {
    st = statSync(indexFile);
  } catch (e) {
    throw checkpointError(`${indexFile}: cannot be read (${errno(e)})`); // a broken link
  }
  if (!st.isFile()) throw checkpointError(`${indexFile}: not a regular file`); // a FIFO would block
  let text: string;
  try {
    text = readFileSync(indexFile, 'utf8');
  } catch (e) {
    throw checkpointError(`${indexFile}: cannot be read (${errno(e)})`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw checkpointError(`${indexFile}: not valid JSON (${(e as Error).message})`);
  }
  const wm = (doc as { weight_map?: unknown } | null)?.weight_map;
  if (typeof wm !== 'object' || wm === null || Array.isArray(wm)) {
    throw checkpointError(`${indexFile}: has no "weight_map" object`);
  }
  const weightMap = new Map<string, string>();
  const files = new Set<string>();
  for (const [tensor, file] of Object.entries(wm as Record<string, unknown>)) {
    const full = shardPath(dir, file, indexFile);
    weightMap.set(tensor, full);
    files.add(full);
  }
  return { files: [...files].sort(), weightMap };
}

function locate(path: string): { dir: string | null; files: string[]; weightMap: Map<string, string> | null } {
  let st;
  try {
    st = statSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw checkpointError(`${path}: ${code === 'ENOENT' || code === 'ENOTDIR' ? 'no such file or directory' : `cannot be read (${errno(e)})`}`);
  }
  if (st.isFile()) return { dir: null, files: [path], weightMap: null };
  if (!st.isDirectory()) throw checkpointError(`${path}: not a file or directory`);
  let entries: string[];
  try {
    entries = readdirSync(path);
  } catch (e) {
    throw checkpointError(`${path}: the directory cannot be read (${errno(e)})`);
  }
  const hasIndex = entries.includes(INDEX_FILE), hasSingle = entries.includes(SINGLE_FILE);
  // Two models in one place: transformers loads model.safetensors, mergekit the index.
  if (hasIndex && hasSingle) {
    throw checkpointError(`${path}: holds both ${SINGLE_FILE} and ${INDEX_FILE}, so which of them is the model is ambiguous ` +
      `(transformers loads the first, mergekit the second); remove the one that is not`);
  }
  if (hasIndex) {
    const { files, weightMap } = readIndex(path);
    return { dir: path, files, weightMap };
  }
  if (hasSingle) return { dir: path, files: [join(path, SINGLE_FILE)], weightMap: null };
  const shards = entries.filter((f) => f.endsWith('.safetensors')).sort();
  if (shards.length === 0) {
    throw checkpointError(`${path}: no ${SINGLE_FILE}, ${INDEX_FILE} or *.safetensors files in this directory`);
  }
  return { dir: path, files: shards.map((f) => join(path, f)), weightMap: null };
}

/**
 * Opens a checkpoint (a .safetensors file, or a model directory) for reading its tensors
 * without copying them. Its views may be written to: a write changes a private copy of
 * the page, never the file.
 */
export function openCheckpoint(path: string): Checkpoint {
  return openMapped(path, true);
}

/** openCheckpoint for della-merge's own reads (merge inputs, outputs checked): read-only maps. */
export function openInput(path: string): Checkpoint {
  return openMapped(path, false);
}

function openMapped(path: string, copyOnWrite: boolean): Checkpoint {
  if (typeof path !== 'string' || path === '') throw new DellaError('E_ARGS', `openCheckpoint(path) takes a file or directory path, got ${jsonForMessage(path)}`);
  const full = resolve(path);
  const where = locate(full);
  const opened = new Map<string, OpenFile>();
  const tensors = new Map<string, CheckpointTensor>();
  try {
    for (const file of where.files) {
      const f = openFile(file, copyOnWrite);
      opened.set(file, f);
      for (const t of f.header.tensors) {
        if (where.weightMap && where.weightMap.get(t.name) !== file) continue;
        const prior = tensors.get(t.name);
        if (prior) {
          throw checkpointError(`${full}: tensor "${t.name}" is in both ${basename(prior.file)} and ${basename(file)}`);
        }
        tensors.set(t.name, { ...t, file, offset: f.header.dataOffset + t.begin, byteLength: t.end - t.begin });
      }
    }
    if (where.weightMap) {
      for (const [name, file] of where.weightMap) {
        if (!tensors.has(name)) {
          throw checkpointError(`${join(full, INDEX_FILE)}: weight_map puts "${name}" in ${basename(file)}, which has no such tensor`);
        }
      }
    }
  } catch (e) {
    for (const f of opened.values()) f.map.close();
    throw e;
  }
  const names = Object.freeze([...tensors.keys()].sort());
  let totalBytes = 0;
  for (const t of tensors.values()) totalBytes += t.byteLength;
  let closed = false;
  const get = (name: string): CheckpointTensor => {
    if (closed) throw new DellaError('E_ARGS', `${full}: the checkpoint is closed`);
    const t = tensors.get(name);
    if (!t) throw new DellaError('E_ARGS', `${full}: no tensor named "${name}"`);
    return t;
  };
  const data = (name: string): Bytes => {
    const t = get(name);
    if (t.byteLength <= MAX_UINT8ARRAY) return view(opened.get(t.file)!, t.offset, t.byteLength);
    return sliceBytes({ map: opened.get(t.file)!.map, offset: t.offset, length: t.byteLength });
  };
  return {
    path: full,
    dir: where.dir,
    files: where.files,
    tensors,
    names,
    metadata: new Map([...opened].map(([file, f]) => [file, f.header.metadata])),
    totalBytes,
    bytes(name) {
      const t = get(name);
      if (t.byteLength > MAX_UINT8ARRAY) {
        throw new DellaError('E_ARGS', `${full}: tensor "${name}" is ${t.byteLength} bytes, more than the 4 GiB one Uint8Array holds in Node.js: read it with data("${name}") (a DataView over a copy)`);
      }
      return view(opened.get(t.file)!, t.offset, t.byteLength);
    },
    data,
    slice(name) {
      const t = get(name);
      return { map: opened.get(t.file)!.map, offset: t.offset, length: t.byteLength };
    },
    array(name) {
      const t = get(name);
      const Ctor = ARRAY_TYPES[t.dtype];
      const length = t.byteLength / Ctor.BYTES_PER_ELEMENT;
      if (length > MAX_UINT8ARRAY) {
        throw new DellaError('E_ARGS', `${full}: tensor "${name}" has ${length} elements, more than the 2^32 one typed array holds in Node.js: read it with data("${name}") (a DataView)`);
      }
      // Over 4 GiB, data() is a copy (in aligned memory); else a view, copied when the
      // tensor is not aligned to its element size (maps are page-aligned).
      let b: ArrayBufferView = data(name);
      if (b instanceof Uint8Array && t.offset % Ctor.BYTES_PER_ELEMENT !== 0) b = b.slice();
      return new Ctor(b.buffer, b.byteOffset, length);
    },
    prefetch(name) {
      const t = get(name);
      if (t.byteLength > 0) opened.get(t.file)!.map.advise(t.offset, t.byteLength, 'willneed');
    },
    release(name) {
      const t = get(name);
      if (t.byteLength > 0) opened.get(t.file)!.map.advise(t.offset, t.byteLength, 'dontneed');
    },
    close() {
      closed = true;
      for (const f of opened.values()) f.map.close();
    },
    changed() {
      for (const [file, f] of opened) {
        let now;
        try {
          now = statSync(file);
        } catch {
          return `${file} was removed while it was being read`;
        }
        if (now.size !== f.size) return `${file} changed size while it was being read (${f.size} → ${now.size} bytes)`;
        if (now.mtimeMs !== f.mtimeMs) return `${file} was modified while it was being read`;
        // A read of the map faulted (SIGBUS) and saw zeros (map_guard.h): the file was cut
        // short and grown back, or the device failed to read it.
        if (f.map.faulted) return `${file} could not be read in full while it was being read (cut short, or an I/O error)`;
      }
      return null;
    },
  };
}

/** A tensor's bytes as Uint8Arrays of at most `size` bytes, zero-copy whatever its size. */
export function tensorWindows(c: Checkpoint, name: string, size?: number): Generator<Uint8Array> {
  const s = c.slice(name);
  if (!ArrayBuffer.isView(s) && s.length > MAX_UINT8ARRAY) return sliceWindows(s, size);
  return windows(c.data(name), size);
}

/** Bytes [begin, end) of a tensor: zero-copy up to 4 GiB (beyond, a copy). */
export function tensorRange(c: Checkpoint, name: string, begin: number, end: number): Bytes {
  const s = c.slice(name);
  const length = ArrayBuffer.isView(s) ? s.byteLength : s.length;
  if (!(begin >= 0 && begin <= end && end <= length)) throw new RangeError(`bytes [${begin}, ${end}) are outside tensor "${name}" (${length} bytes)`);
  return !ArrayBuffer.isView(s) && length > MAX_UINT8ARRAY ? sliceBytes(s, begin, end) : subBytes(c.data(name), begin, end);
}

/** The first change among the checkpoints' files since they were opened (Checkpoint.changed), else null. */
export function firstChange(checkpoints: Iterable<Checkpoint>): string | null {
  for (const c of checkpoints) {
    const change = c.changed();
    if (change) return change;
  }
  return null;
}

/** Shown by `inspect`: the directory a file belongs to, for messages. */
export function describeLocation(c: Checkpoint): string {
  return c.dir ?? dirname(c.path);
}
