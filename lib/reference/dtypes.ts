/**
 * Exact conversions between fp32 and the stored dtypes (SPEC §1), on bit patterns.
 * Every fp32 value here is a JS number that Math.fround leaves unchanged.
 */
import { DTYPE_CODE, inputView, type DTypeCode, type InputBytes } from '../merge/task.js';

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function f32Bits(v: number): number {
  f32[0] = v;
  return u32[0];
}

export function bitsF32(b: number): number {
  u32[0] = b >>> 0;
  return f32[0];
}

export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const man = h & 0x3ff;
  if (exp === 0x1f) return man ? NaN : sign * Infinity;
  if (exp === 0) return sign * man * 2 ** -24;
  return sign * (1 + man / 1024) * 2 ** (exp - 15);
}

/** fp32 -> IEEE half, round to nearest even, with subnormals. */
export function f32ToF16(v: number): number {
  return f32BitsToF16(f32Bits(v));
}

/** f32ToF16 on the fp32 bit pattern `x`. */
function f32BitsToF16(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const ax = x & 0x7fffffff;
  if (ax > 0x7f800000) return 0x7e00; // NaN: the canonical quiet NaN, whatever its sign
  if (ax >= 0x477ff000) return sign | 0x7c00;
  if (ax >= 0x38800000) {
    const r = ax - 0x38000000;
    return sign | ((r + 0xfff + ((r >>> 13) & 1)) >>> 13);
  }
  if (ax < 0x33000000) return sign;
  const e = ax >>> 23;
  const m = (ax & 0x7fffff) | 0x800000;
  const shift = 126 - e;
  let r = m >>> shift;
  const rem = m & ((1 << shift) - 1);
  const half = 1 << (shift - 1);
  if (rem > half || (rem === half && (r & 1))) r++;
  return sign | r;
}

export function bf16ToF32(h: number): number {
  return bitsF32((h & 0xffff) << 16);
}

/** fp32 -> bfloat16: upper 16 bits after round to nearest even. */
export function f32ToBf16(v: number): number {
  const x = f32Bits(v);
  if ((x & 0x7fffffff) > 0x7f800000) return 0x7fc0; // NaN: the canonical quiet NaN
  return Math.floor((x + 0x7fff + ((x >>> 16) & 1)) / 65536) & 0xffff;
}

export function dtypeSize(t: DTypeCode): number {
  return t === DTYPE_CODE.F64 ? 8 : t === DTYPE_CODE.F32 ? 4 : 2;
}

export function dataView(v: InputBytes): DataView {
  const b = inputView(v);
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** Element i of a little-endian tensor as fp32 (F64 rounds to nearest even). */
export function loadF32(dv: DataView, t: DTypeCode, i: number): number {
  switch (t) {
    case DTYPE_CODE.F32: return dv.getFloat32(4 * i, true);
    case DTYPE_CODE.F16: return f16ToF32(dv.getUint16(2 * i, true));
    case DTYPE_CODE.BF16: return bf16ToF32(dv.getUint16(2 * i, true));
    default: return Math.fround(dv.getFloat64(8 * i, true));
  }
}

export function storeF32(dv: DataView, t: DTypeCode, i: number, v: number): void {
  switch (t) {
    // NaN is stored as the dtype's canonical quiet NaN (positive, no payload): what a
    // JavaScript engine or a CPU makes of a NaN's sign and payload is not specified.
    case DTYPE_CODE.F32:
      if (Number.isNaN(v)) dv.setUint32(4 * i, 0x7fc00000, true);
      else dv.setFloat32(4 * i, v, true);
      break;
    case DTYPE_CODE.F16: dv.setUint16(2 * i, f32ToF16(v), true); break;
    case DTYPE_CODE.BF16: dv.setUint16(2 * i, f32ToBf16(v), true); break;
    default:
      if (Number.isNaN(v)) { dv.setUint32(8 * i, 0, true); dv.setUint32(8 * i + 4, 0x7ff80000, true); }
      else dv.setFloat64(8 * i, v, true);
      break;
  }
}

/**
 * Ranking key of SPEC §4: for a half-precision base, the 15-bit pattern of |v|
 * rounded to that dtype; otherwise the fp32 bit pattern of |v|.
 */
export function magnitudeKey(v: number, baseDtype: DTypeCode): number {
  const a = Math.abs(v);
  if (baseDtype === DTYPE_CODE.F16) return f32ToF16(a) & 0x7fff;
  if (baseDtype === DTYPE_CODE.BF16) return f32ToBf16(a) & 0x7fff;
  return Number.isNaN(a) ? 0x7fc00000 : f32Bits(a) & 0x7fffffff;
}

// Whole rows at a time, for the passes over every element of a large tensor (streamed.ts):
// the same conversions as loadF32 and magnitudeKey, element for element, on typed arrays.

export const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
let f16Values: Float32Array | null = null;

/**
 * Elements [from, from + n) of a little-endian tensor held in `bytes`, as fp32, into
 * `into` (what loadF32 gives for each). Typed arrays see the bytes directly when they
 * are aligned; otherwise the row is copied first.
 */
export function loadF32Row(bytes: ArrayBufferView, t: DTypeCode, from: number, n: number, into: Float32Array): void {
  const size = dtypeSize(t);
  if (from < 0 || (from + n) * size > bytes.byteLength) {
    throw new RangeError(`elements [${from}, ${from + n}) of ${bytes.byteLength} bytes of ${size}-byte values`);
  }
  if (!LITTLE_ENDIAN) {
    const dv = new DataView(bytes.buffer, bytes.byteOffset + from * size, n * size);
    for (let j = 0; j < n; j++) into[j] = loadF32(dv, t, j);
    return;
  }
  let buffer = bytes.buffer, at = bytes.byteOffset + from * size;
  if (at % size !== 0) {
    buffer = new Uint8Array(buffer, at, n * size).slice().buffer;
    at = 0;
  }
  switch (t) {
    case DTYPE_CODE.F32: into.set(new Float32Array(buffer, at, n)); break;
    case DTYPE_CODE.BF16: {
      const h = new Uint16Array(buffer, at, n), u = new Uint32Array(into.buffer, into.byteOffset, n);
      for (let j = 0; j < n; j++) u[j] = h[j] << 16;
      break;
    }
    case DTYPE_CODE.F16: {
      if (!f16Values) {
        f16Values = new Float32Array(65536);
        for (let h = 0; h < 65536; h++) f16Values[h] = f16ToF32(h);
      }
      const h = new Uint16Array(buffer, at, n), table = f16Values;
      for (let j = 0; j < n; j++) into[j] = table[h[j]];
      break;
    }
    default: into.set(new Float64Array(buffer, at, n)); break; // rounds to nearest even, as Math.fround
  }
}

/** magnitudeKey of each of the first n values of `v`, into `keys`. */
export function magnitudeKeys(v: Float32Array, baseDtype: DTypeCode, n: number, keys: Uint32Array): void {
  const bits = new Uint32Array(v.buffer, v.byteOffset, n);
  if (baseDtype === DTYPE_CODE.BF16) {
    for (let j = 0; j < n; j++) {
      const a = bits[j] & 0x7fffffff;
      keys[j] = a > 0x7f800000 ? 0x7fc0 : (a + 0x7fff + ((a >>> 16) & 1)) >>> 16;
    }
  } else if (baseDtype === DTYPE_CODE.F16) {
    for (let j = 0; j < n; j++) keys[j] = f32BitsToF16(bits[j] & 0x7fffffff) & 0x7fff;
  } else {
    for (let j = 0; j < n; j++) {
      const a = bits[j] & 0x7fffffff;
      keys[j] = a > 0x7f800000 ? 0x7fc00000 : a;
    }
  }
}
