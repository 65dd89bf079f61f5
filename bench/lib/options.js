// The options bench/kernels.js and bench/peer/run.js both take, and what they select.
// No imports: the peer reads them before it knows whether it will run at all.
/** The parseArgs options both benchmarks take. */
export const OPTIONS = { threads: { type: 'string' }, rows: { type: 'string' }, cols: { type: 'string' }, quick: { type: 'boolean' } };

/** The tensor size, thread count and timing rule those options select. */
export function settings(values, native) {
  const rows = Number(values.rows ?? 4096), cols = Number(values.cols ?? 4096);
  const quick = Boolean(values.quick);
  return {
    threads: Number(values.threads ?? native.hardwareThreads), rows, cols, numel: rows * cols, quick,
    minSeconds: quick ? 0.5 : 1.5,
  };
}
