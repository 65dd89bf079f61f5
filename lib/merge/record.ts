/** The record a merge leaves beside its output (seed and each tensor's digest), read by verify and assemble. */
import { createHash } from 'node:crypto';
import { loadNative } from '../native.js';
import { windows, type Bytes } from '../util/bytes.js';
import { tensorWindows, type Checkpoint } from '../checkpoint/model.js';

export const RUN_FILE = 'della_merge_run.json';

export interface RunRecord {
  tool: 'della-merge';
  version: string;
  method: string;
  seed: number;
  /** XXH64 (seed 0, 16 hex digits) of each output tensor's bytes, as written */
  xxh64: Record<string, string>;
}

/**
 * How a record's tensor digests were made. Records written before version 0.1.0's
 * switch to XXH64 hold SHA-256 digests (`sha256`); verify still reads them.
 */
export type DigestAlgorithm = 'xxh64' | 'sha256';

export const DIGEST_LABEL: Record<DigestAlgorithm, string> = { xxh64: 'XXH64', sha256: 'SHA-256' };

/** The tensor digests a run or part record holds, or null when it holds none. */
export function recordedDigests(record: object): { algorithm: DigestAlgorithm; digests: Record<string, string> } | null {
  for (const algorithm of ['xxh64', 'sha256'] as const) {
    const d = (record as Record<string, unknown>)[algorithm];
    if (d && typeof d === 'object' && !Array.isArray(d)) return { algorithm, digests: d as Record<string, string> };
  }
  return null;
}

/** The digest of a tensor's bytes. XXH64 (native, about 9 GB/s on one core here) is what
 * merges record: it catches bytes changed after the merge, and SHA-256 cost a fifth of a
 * fast merge's CPU time. */
export function tensorDigest(algorithm: DigestAlgorithm, bytes: Bytes): string {
  return algorithm === 'xxh64' ? loadNative().xxh64(bytes) : sha256(windows(bytes));
}

/** tensorDigest of a checkpoint's tensor, of any size: XXH64 straight from its map. */
export function storedDigest(algorithm: DigestAlgorithm, c: Checkpoint, name: string): string {
  return algorithm === 'xxh64' ? loadNative().xxh64(c.slice(name)) : sha256(tensorWindows(c, name));
}

/** SHA-256 of bytes given a window at a time (one Uint8Array holds at most 4 GiB). */
function sha256(parts: Iterable<Uint8Array>): string {
  const h = createHash('sha256');
  for (const w of parts) h.update(w);
  return h.digest('hex');
}

/** Digests by tensor name, in name order (so that records of the same merge are byte-identical). */
export function sortedDigests(digests: Record<string, string>): Record<string, string> {
  return Object.fromEntries(Object.entries(digests).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}
