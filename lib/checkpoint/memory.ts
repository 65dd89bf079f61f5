/** Tensors held in memory (typed arrays, Buffers) seen through the Checkpoint interface. */
import { DellaError } from '../errors.js';
import type { Checkpoint, CheckpointTensor, TensorArray } from './model.js';
import { DTYPE_SIZES } from './safetensors.js';

export interface MemoryTensor {
  dtype: string;
  shape: number[];
  /** little-endian element bytes (F16/BF16 as raw 16-bit patterns) */
  data: ArrayBufferView;
}

export type TensorSet = Record<string, MemoryTensor> | Map<string, MemoryTensor>;

export function memoryCheckpoint(label: string, set: TensorSet): Checkpoint {
  const entries = set instanceof Map ? [...set] : Object.entries(set);
  const tensors = new Map<string, CheckpointTensor>();
  const data = new Map<string, Uint8Array>();
  for (const [name, t] of entries) {
    const where = `${label}: tensor "${name}"`;
    const size = DTYPE_SIZES[t?.dtype];
    if (size === undefined) throw new DellaError('E_ARGS', `${where}: unknown dtype ${JSON.stringify(t?.dtype)}`);
    if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new DellaError('E_ARGS', `${where}: shape must be a list of non-negative integers, got ${JSON.stringify(t.shape)}`);
    }
    if (!ArrayBuffer.isView(t.data)) throw new DellaError('E_ARGS', `${where}: data must be a typed array, DataView or Buffer`);
    const numel = t.shape.reduce((a, b) => a * b, 1);
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    if (bytes.length !== numel * size) {
      throw new DellaError('E_ARGS', `${where}: ${bytes.length} bytes given, shape [${t.shape.join(', ')}] of ${t.dtype} needs ${numel * size}`);
    }
    tensors.set(name, { name, dtype: t.dtype, shape: [...t.shape], numel, begin: 0, end: bytes.length, file: label, offset: 0, byteLength: bytes.length });
    data.set(name, bytes);
  }
  const get = (name: string): Uint8Array => {
    const b = data.get(name);
    if (!b) throw new DellaError('E_ARGS', `${label}: no tensor named "${name}"`);
    return b;
  };
  const names = [...tensors.keys()].sort();
  return {
    path: label,
    dir: null,
    files: [],
    tensors,
    names,
    metadata: new Map(),
    totalBytes: [...data.values()].reduce((a, b) => a + b.length, 0),
    bytes: get,
    slice: get,
    array(name): TensorArray {
      const b = get(name);
      return new Uint8Array(b) as TensorArray; // a copy: callers own what they are given
    },
    prefetch() {},
    release() {},
    close() {},
    changed: () => null,
  };
}
