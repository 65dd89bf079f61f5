/** FNV-1a 32-bit of the UTF-8 bytes of a tensor name: the Philox tensor id (SPEC §3). */
export function fnv1a32(bytes: Uint8Array): number {
  let h = 2166136261;
  for (const b of bytes) {
    h ^= b;
    h = Math.imul(h, 16777619) >>> 0;
  }
  return h >>> 0;
}

export function tensorId(name: string): number {
  return fnv1a32(new TextEncoder().encode(name));
}
