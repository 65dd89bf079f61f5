/** The record a merge leaves beside its output (seed and each tensor's digest), read by verify and assemble. */
export const RUN_FILE = 'della_merge_run.json';

export interface RunRecord {
  tool: 'della-merge';
  version: string;
  method: string;
  seed: number;
  /** SHA-256 of each output tensor's bytes, as written */
  sha256: Record<string, string>;
}

