/**
 * Where a merge's main thread spends the merge phase, for DELLA_PROFILE=1 (or
 * DELLA_CUDA_PROFILE=1, which also turns on the CUDA plugin's own lines): printed to
 * stderr when the merge ends. The kernels run on other threads (or the GPU); this says
 * what the main thread did between them, and how long it waited for them. Waits can
 * overlap (the next batch waits for its output staging while this one is handed out),
 * so the parts can add up to more than the whole; `other` is then 0.
 */
export class MainThreadProfile {
  private readonly totals = new Map<string, number>();
  private readonly started = performance.now();
  batches = 0;

  constructor(readonly enabled: boolean) {}

  static fromEnv(env: NodeJS.ProcessEnv = process.env): MainThreadProfile {
    return new MainThreadProfile(env.DELLA_PROFILE === '1' || env.DELLA_CUDA_PROFILE === '1');
  }

  /** Runs fn, adding its time to `what`. */
  time<T>(what: string, fn: () => T): T {
    if (!this.enabled) return fn();
    const t0 = performance.now();
    try {
      return fn();
    } finally {
      this.add(what, performance.now() - t0);
    }
  }

  /** Awaits p, adding the wait to `what`. */
  async wait<T>(what: string, p: Promise<T> | T): Promise<T> {
    if (!this.enabled) return p;
    const t0 = performance.now();
    try {
      return await p;
    } finally {
      this.add(what, performance.now() - t0);
    }
  }

  add(what: string, ms: number): void {
    this.totals.set(what, (this.totals.get(what) ?? 0) + ms);
  }

  /** One line: the phase's seconds, then each part's, then what is left. */
  summary(label: string): string {
    const total = performance.now() - this.started;
    let accounted = 0;
    const parts: string[] = [];
    for (const [what, ms] of this.totals) {
      accounted += ms;
      parts.push(`${what} ${(ms / 1000).toFixed(3)} s`);
    }
    parts.push(`other ${(Math.max(0, total - accounted) / 1000).toFixed(3)} s`);
    return `della profile: ${label}, ${this.batches} batches, ${(total / 1000).toFixed(3)} s on the main thread: ${parts.join(', ')}`;
  }
}
