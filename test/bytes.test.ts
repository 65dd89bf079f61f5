// lib/util/bytes.ts: the helpers that let tensors over 4 GiB be DataViews. Small inputs
// here, both kinds (test/huge-tensor.test.ts runs them on a real 4 GiB tensor).
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openCheckpoint, saveModel } from '../lib/index.js';
import { tensorRange, tensorWindows } from '../lib/checkpoint/model.js';
import { tempDir } from './helpers/models.js';
import { allocBytes, bytesOf, copyBytes, firstDifference, MAX_UINT8ARRAY, subBytes, uint8, windows } from '../lib/util/bytes.js';

const ramp = (n: number, at = 0) => Uint8Array.from({ length: n }, (_, i) => (i + at) & 255);

describe('byte helpers', () => {
  it('views: a Uint8Array up to 4 GiB, a DataView beyond; sub-ranges of either', () => {
    const buf = new ArrayBuffer(64);
    expect(bytesOf(buf, 8, 16)).toBeInstanceOf(Uint8Array);
    const big = new ArrayBuffer(MAX_UINT8ARRAY + 8); // untouched pages: no memory
    const v = bytesOf(big, 4, MAX_UINT8ARRAY + 1);
    expect([v.constructor.name, v.byteOffset, v.byteLength]).toEqual(['DataView', 4, MAX_UINT8ARRAY + 1]);
    const s = subBytes(v, MAX_UINT8ARRAY - 2, MAX_UINT8ARRAY + 1);
    expect([s.constructor.name, s.byteOffset, s.byteLength]).toEqual(['Uint8Array', MAX_UINT8ARRAY + 2, 3]);
    expect(() => uint8(v, 'tensor "x"')).toThrow('tensor "x" is 4294967297 bytes, more than the 4 GiB one Uint8Array holds');
    const dv = new DataView(buf, 3, 10);
    expect(uint8(dv, 'x')).toEqual(new Uint8Array(buf, 3, 10));
  });

  it('windows, copies and comparisons across window edges, of Uint8Arrays and DataViews', () => {
    const a = ramp(1000, 0);
    const d = new DataView(new ArrayBuffer(1003), 3, 1000);
    copyBytes(d, a);
    expect([...windows(d, 256)].map((w) => w.byteLength)).toEqual([256, 256, 256, 232]);
    expect(Buffer.concat([...windows(d, 256)])).toEqual(Buffer.from(a));
    expect([...windows(new Uint8Array(0))]).toEqual([]);
    expect(firstDifference(a, d)).toBe(-1);
    for (const at of [0, 255, 256, 999]) {
      const b = ramp(1000);
      b[at] ^= 1;
      expect(firstDifference(d, b)).toBe(at);
    }
    expect(firstDifference(a, ramp(999))).toBe(999); // a shorter one differs where it ends
    expect(() => copyBytes(d, ramp(999))).toThrow('copy of 999 bytes into 1000');
    const z = allocBytes(5);
    expect([z.constructor.name, [...(z as Uint8Array)]]).toEqual(['Uint8Array', [0, 0, 0, 0, 0]]);
  });

  it("a checkpoint tensor's ranges and windows stay inside it", () => {
    const d = tempDir('della-bytes-');
    saveModel(join(d, 'm'), [{ name: 'a', dtype: 'F32', shape: [2], data: new Float32Array([1, 2]) }, { name: 'b', dtype: 'F32', shape: [2], data: new Float32Array([3, 4]) }]);
    const c = openCheckpoint(join(d, 'm'));
    try {
      expect([...(tensorRange(c, 'b', 4, 8) as Uint8Array)]).toEqual([0, 0, 0x80, 0x40]);
      expect(() => tensorRange(c, 'a', 0, 16)).toThrow('bytes [0, 16) are outside tensor "a" (8 bytes)'); // not b's bytes
      expect(() => tensorRange(c, 'a', 6, 4)).toThrow('outside');
      expect([...tensorWindows(c, 'b', 3)].map((w) => w.length)).toEqual([3, 3, 2]);
    } finally {
      c.close();
    }
  });
});
