/** Philox4x32-10 (Salmon et al. 2011) and the SPEC §3 uniform, in plain integer JS. */

/** High and low 32 bits of the 64-bit product of two uint32s, exactly. */
function mulhilo(a: number, b: number): [number, number] {
  const lo = Math.imul(a, b) >>> 0;
  const a0 = a & 0xffff, a1 = a >>> 16, b0 = b & 0xffff, b1 = b >>> 16;
  const p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1; // each < 2^32: exact
  const mid = (p00 >>> 16) + (p01 & 0xffff) + (p10 & 0xffff);
  const hi = (p11 + Math.floor(p01 / 65536) + Math.floor(p10 / 65536) + Math.floor(mid / 65536)) >>> 0;
  return [hi, lo];
}

export function philox4x32_10(
  c0: number, c1: number, c2: number, c3: number, k0: number, k1: number,
): [number, number, number, number] {
  c0 >>>= 0; c1 >>>= 0; c2 >>>= 0; c3 >>>= 0; k0 >>>= 0; k1 >>>= 0;
  for (let round = 0; round < 10; round++) {
    if (round > 0) {
      k0 = (k0 + 0x9e3779b9) >>> 0;
      k1 = (k1 + 0xbb67ae85) >>> 0;
    }
    const [hi0, lo0] = mulhilo(0xd2511f53, c0);
    const [hi1, lo1] = mulhilo(0xcd9e8d57, c2);
    const n0 = (hi1 ^ c1 ^ k0) >>> 0;
    const n2 = (hi0 ^ c3 ^ k1) >>> 0;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
  }
  return [c0, c1, c2, c3];
}

/** x = f32(w >>> 8) · 2^-24, exact in binary64 too. */
export function uniformFromWord(w: number): number {
  return (w >>> 8) * 2 ** -24;
}

/** Splits a seed in [0, 2^53) into the Philox key (low word, high word). */
export function seedKey(seed: number): [number, number] {
  return [seed % 2 ** 32 >>> 0, Math.floor(seed / 2 ** 32) >>> 0];
}

/** The uniform of flat element i (SPEC §3). */
export function elementUniform(seed: number, tensorId: number, expert: number, i: number): number {
  const g = Math.floor(i / 4);
  const [k0, k1] = seedKey(seed);
  const block = philox4x32_10(g % 2 ** 32 >>> 0, Math.floor(g / 2 ** 32) >>> 0, tensorId, expert, k0, k1);
  return uniformFromWord(block[i % 4]);
}
