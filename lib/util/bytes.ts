/**
 * Tensor bytes of any size. Node 20's Uint8Array holds at most 4 GiB, and a model's
 * largest tensor can be more (a 256k-token vocabulary's embedding in float32), so bytes
 * over 4 GiB are a DataView, which has no such limit. But N-API makes external memory
 * (a file's map) into a Buffer, so a map is viewed at most 4 GiB at a time: a mapped
 * tensor over 4 GiB is read in windows, or copied. These helpers take either kind.
 */
import type { NativeSlice } from '../native.js';

export type Bytes = Uint8Array | DataView;

/** The most bytes one Uint8Array holds (Node 20's buffer.constants.MAX_LENGTH). */
export const MAX_UINT8ARRAY = 2 ** 32;

/** Window size for work done a Uint8Array at a time. */
const WINDOW = 2 ** 30;

/** `length` bytes of `buffer` from `offset`: a Uint8Array up to 4 GiB, else a DataView. */
export function bytesOf(buffer: ArrayBufferLike, offset: number, length: number): Bytes {
  return length > MAX_UINT8ARRAY ? new DataView(buffer, offset, length) : new Uint8Array(buffer, offset, length);
}

/** Bytes [begin, end) of `b` (no copy). */
export function subBytes(b: ArrayBufferView, begin: number, end: number): Bytes {
  return bytesOf(b.buffer, b.byteOffset + begin, end - begin);
}

/** `b` as one Uint8Array, which bytes under 4 GiB always fit. */
export function uint8(b: ArrayBufferView, what: string): Uint8Array {
  if (b instanceof Uint8Array) return b;
  if (b.byteLength > MAX_UINT8ARRAY) {
    throw new RangeError(`${what} is ${b.byteLength} bytes, more than the 4 GiB one Uint8Array holds`);
  }
  return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
}

/** `b` as consecutive Uint8Arrays of at most `size` bytes (none when it is empty). */
export function* windows(b: ArrayBufferView, size = WINDOW): Generator<Uint8Array> {
  for (let at = 0; at < b.byteLength; at += size) {
    yield new Uint8Array(b.buffer, b.byteOffset + at, Math.min(size, b.byteLength - at));
  }
}

/** The first byte index where `a` and `b` differ, or -1 when they are equal (lengths too). */
export function firstDifference(a: ArrayBufferView, b: ArrayBufferView): number {
  const n = Math.min(a.byteLength, b.byteLength);
  for (let at = 0; at < n; at += WINDOW) {
    const len = Math.min(WINDOW, n - at);
    const x = Buffer.from(a.buffer, a.byteOffset + at, len), y = Buffer.from(b.buffer, b.byteOffset + at, len);
    if (!x.equals(y)) {
      let j = 0;
      while (x[j] === y[j]) j++;
      return at + j;
    }
  }
  return a.byteLength === b.byteLength ? -1 : n;
}

/** Copies `src` into `dst`, of the same length. */
export function copyBytes(dst: ArrayBufferView, src: ArrayBufferView): void {
  if (dst.byteLength !== src.byteLength) throw new RangeError(`copy of ${src.byteLength} bytes into ${dst.byteLength}`);
  for (let at = 0; at < src.byteLength; at += WINDOW) {
    const len = Math.min(WINDOW, src.byteLength - at);
    new Uint8Array(dst.buffer, dst.byteOffset + at, len).set(new Uint8Array(src.buffer, src.byteOffset + at, len));
  }
}

/** Bytes [begin, end) of a mapped file's slice: a view up to 4 GiB, else a copy. */
export function sliceBytes(s: NativeSlice, begin = 0, end = s.length): Bytes {
  if (end - begin <= MAX_UINT8ARRAY) return end === begin ? new Uint8Array(0) : s.map.view(s.offset + begin, end - begin);
  const copy = allocBytes(end - begin);
  for (let at = begin; at < end; at += WINDOW) {
    const len = Math.min(WINDOW, end - at);
    new Uint8Array(copy.buffer, at - begin, len).set(s.map.view(s.offset + at, len));
  }
  return copy;
}

/** A slice's bytes as Uint8Arrays of at most `size` bytes each, zero-copy. */
export function* sliceWindows(s: NativeSlice, size = WINDOW): Generator<Uint8Array> {
  for (let at = 0; at < s.length; at += size) yield s.map.view(s.offset + at, Math.min(size, s.length - at));
}

/** `n` zeroed bytes in fresh memory. */
export function allocBytes(n: number): Bytes {
  return bytesOf(new ArrayBuffer(n), 0, n);
}
