/** Tensors held in memory (typed arrays, Buffers) seen through the Checkpoint interface. */
import { isSharedArrayBuffer } from 'node:util/types';
import { DellaError } from '../errors.js';
import { showArg } from '../util/show.js';
import type { Checkpoint, CheckpointTensor, TensorArray } from './model.js';
import { DTYPE_SIZES } from './safetensors.js';
import { allocBytes, bytesOf, copyBytes, MAX_UINT8ARRAY, type Bytes } from '../util/bytes.js';

export interface MemoryTensor {
  dtype: string;
  shape: number[];
  /** little-endian element bytes (F16/BF16 as raw 16-bit patterns) */
  data: ArrayBufferView;
}

export type TensorSet = Record<string, MemoryTensor> | Map<string, MemoryTensor>;

/**
 * The bytes of a typed array, DataView or Buffer over the same memory (a DataView when
 * over 4 GiB, more than one Uint8Array holds); null when its ArrayBuffer is detached
 * (transferred), or the view is out of bounds of a shrunk resizable one. (Node 20 has
 * no ArrayBuffer.prototype.detached; a detached buffer reads as 0 bytes, and viewing it
 * throws.)
 */
function viewBytes(data: ArrayBufferView): Bytes | null {
  try {
    return bytesOf(data.buffer, data.byteOffset, data.byteLength);
  } catch {
    return null;
  }
}

function dimensionsOk(shape: unknown[]): boolean {
  for (let i = 0; i < shape.length; i++) {
    const d = shape[i];
    if (!Number.isSafeInteger(d) || (d as number) < 0) return false;
  }
  return true;
}

/**
 * Checks the {dtype, shape, data} of a tensor given in memory (a tensor set's, or
 * saveModel's); `where` names it in the messages. Returns the dtype, a copy of the shape
 * and the bytes, a view of the caller's memory.
 */
export function checkTensorData(where: string, t: { dtype?: unknown; shape?: unknown; data?: unknown }): { dtype: string; shape: number[]; bytes: Bytes } {
  const { dtype, shape, data } = t;
  if (typeof dtype !== 'string' || !Object.hasOwn(DTYPE_SIZES, dtype)) {
    throw new DellaError('E_ARGS', `${where}: unknown dtype ${showArg(dtype)} (known: ${Object.keys(DTYPE_SIZES).join(', ')})`);
  }
  // By index: every() skips the holes of a sparse array ([, 1] would pass, and be
  // written as "[,1]"), and Array.from would build a hole-filled 2^32 - 1 first.
  if (!Array.isArray(shape) || !dimensionsOk(shape)) {
    throw new DellaError('E_ARGS', `${where}: shape must be a list of non-negative integers, got ${showArg(shape)}`);
  }
  if (!ArrayBuffer.isView(data)) {
    throw new DellaError('E_ARGS', `${where}: data must be a typed array, DataView or Buffer, got ${data === null ? 'null' : typeof data}`);
  }
  const bytes = viewBytes(data);
  if (bytes === null) throw new DellaError('E_ARGS', `${where}: data's ArrayBuffer is detached (transferred), so its bytes cannot be read`);
  const numel = (shape as number[]).reduce((a, b) => a * b, 1);
  const size = DTYPE_SIZES[dtype];
  if (bytes.byteLength !== numel * size) {
    throw new DellaError('E_ARGS', `${where}: ${bytes.byteLength} bytes given, shape [${shape.join(', ')}] of ${dtype} needs ${numel * size}`);
  }
  return { dtype, shape: [...(shape as number[])], bytes };
}

/** Whether `set` has the documented shape of a tensor set: a plain object or a Map. */
export function isTensorSet(set: unknown): set is TensorSet {
  return set instanceof Map || (set !== null && typeof set === 'object' && !Array.isArray(set) && !ArrayBuffer.isView(set));
}

export function memoryCheckpoint(label: string, set: TensorSet): Checkpoint {
  if (!isTensorSet(set)) {
    throw new DellaError('E_ARGS', `${label}: a tensor set must be an object or Map from tensor names to {dtype, shape, data}, got ${showArg(set)}`);
  }
  const entries: Array<[unknown, MemoryTensor]> = set instanceof Map ? [...set] : Object.entries(set);
  const tensors = new Map<string, CheckpointTensor>();
  const data = new Map<string, Bytes>();
  for (const [name, t] of entries) {
    if (typeof name !== 'string') {
      throw new DellaError('E_ARGS', `${label}: tensor names must be strings, got ${showArg(name)} (a Map key)`);
    }
    const where = `${label}: tensor ${JSON.stringify(name)}`;
    if (t === null || typeof t !== 'object') {
      throw new DellaError('E_ARGS', `${where}: must be an object {dtype, shape, data}, got ${showArg(t)}`);
    }
    const { dtype, shape, bytes: given } = checkTensorData(where, t);
    // The native addon takes only plain ArrayBuffers: shared or resizable memory is
    // copied into one (which also keeps another thread's writes out of the merge).
    const buffer = given.buffer as ArrayBufferLike & { resizable?: boolean };
    let bytes = given;
    if (isSharedArrayBuffer(buffer) || buffer.resizable === true) {
      bytes = allocBytes(given.byteLength);
      copyBytes(bytes, given);
    }
    const numel = shape.reduce((a, b) => a * b, 1);
    tensors.set(name, { name, dtype, shape, numel, begin: 0, end: bytes.byteLength, file: label, offset: 0, byteLength: bytes.byteLength });
    data.set(name, bytes);
  }
  const get = (name: string): Bytes => {
    const b = data.get(name);
    if (!b) throw new DellaError('E_ARGS', `${label}: no tensor named "${name}"`);
    // a detached buffer reads as 0 bytes (and the addon would say only that); a DataView
    // (data over 4 GiB) throws instead
    const want = tensors.get(name)!.byteLength;
    if ((want > 0 && b.buffer.byteLength === 0) || b.byteLength !== want) {
      throw new DellaError('E_ARGS', `${label}: tensor ${JSON.stringify(name)}: its data's ArrayBuffer was detached (transferred) during the merge, so its bytes cannot be read`);
    }
    return b;
  };
  const small = (name: string): Uint8Array => {
    const b = get(name);
    if (b.byteLength > MAX_UINT8ARRAY) {
      throw new DellaError('E_ARGS', `${label}: tensor ${JSON.stringify(name)} is ${b.byteLength} bytes, more than the 4 GiB one Uint8Array holds in Node.js: read it with data(${JSON.stringify(name)})`);
    }
    return b as Uint8Array;
  };
  const names = Object.freeze([...tensors.keys()].sort());
  return {
    path: label,
    dir: null,
    files: [],
    tensors,
    names,
    metadata: new Map(),
    totalBytes: [...data.values()].reduce((a, b) => a + b.byteLength, 0),
    bytes: small,
    data: get,
    slice: get,
    array(name): TensorArray {
      return new Uint8Array(small(name)) as TensorArray; // a copy: callers own what they are given
    },
    prefetch() {},
    release() {},
    close() {},
    changed: () => null,
  };
}
