/**
 * verifyMerge's worker threads, from the main thread's side: the tensors given are sent,
 * in plan order, to whichever worker is free (verify-worker.ts), and their checks come
 * back as promises. Only the reference's whole-tensor passes are worth a thread: the
 * rest of verify is native hashing and a few rows.
 *
 * Workers are a speed-up, never a new way to fail: when one cannot start, cannot open
 * the files, plans differently or stops, every check not yet back comes back as null,
 * and the main thread does it itself, as with one thread.
 */
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { DellaError, type ErrorCode } from '../errors.js';
import { packageRoot } from '../native.js';
import type { TensorCheck } from './verify.js';
import type { VerifyWorkerData, VerifyWorkerReply, VerifyWorkerRequest } from './verify-worker.js';

/** The compiled worker (the CLI's bundle and the tests' TypeScript both run it from dist/). */
const WORKER_FILE = join(packageRoot, 'dist', 'validate', 'verify-worker.js');

interface Pending {
  promise: Promise<TensorCheck | null>;
  resolve(check: TensorCheck | null): void;
  reject(e: Error): void;
}

export class VerifyPool {
  private readonly workers = new Set<Worker>();
  private readonly queue: string[];
  private readonly pending = new Map<string, Pending>();
  /** per worker, once finish() asked it: where its changes go */
  private readonly finishing = new Map<Worker, (changes: string[]) => void>();
  private failed = false;

  constructor(data: VerifyWorkerData, names: readonly string[], threads: number) {
    this.queue = [...names];
    for (const name of names) {
      let resolve!: (c: TensorCheck | null) => void, reject!: (e: Error) => void;
      const promise = new Promise<TensorCheck | null>((res, rej) => { resolve = res; reject = rej; });
      promise.catch(() => {}); // awaited in plan order; never an unhandled rejection meanwhile
      this.pending.set(name, { promise, resolve, reject });
    }
    try {
      for (let i = 0; i < Math.min(threads, names.length); i++) this.start(data);
    } catch {
      this.fail(); // no thread, or a recipe that cannot be cloned to one
    }
  }

  has(name: string): boolean {
    return this.pending.has(name);
  }

  /** The check of a tensor given to the pool; null when the main thread must do it. */
  check(name: string): Promise<TensorCheck | null> {
    return this.pending.get(name)!.promise;
  }

  /** Ends the workers once every check is back: the files they saw change, if any. */
  async finish(): Promise<string[]> {
    const changes = await Promise.all([...this.workers].map((w) => new Promise<string[]>((resolve) => {
      this.finishing.set(w, resolve);
      w.postMessage({ finish: true } satisfies VerifyWorkerRequest);
    })));
    return [...new Set(changes.flat())];
  }

  /** Stops every worker (after finish(), or to abandon the check). */
  async terminate(): Promise<void> {
    const workers = [...this.workers];
    this.workers.clear();
    await Promise.all(workers.map((w) => w.terminate()));
  }

  private start(data: VerifyWorkerData): void {
    const w = new Worker(WORKER_FILE, { workerData: data });
    this.workers.add(w);
    const next = () => {
      const name = this.queue.shift();
      if (name !== undefined) w.postMessage({ name } satisfies VerifyWorkerRequest);
    };
    w.on('message', (m: VerifyWorkerReply) => {
      if ('unable' in m) return this.fail();
      if ('changes' in m) {
        this.workers.delete(w); // done: its exit is no failure
        return this.finishing.get(w)?.(m.changes);
      }
      const p = this.pending.get(m.name)!;
      // checkTensor threw in the worker: what it would have thrown here
      if ('error' in m) p.reject(m.error.code ? new DellaError(m.error.code as ErrorCode, m.error.message) : new Error(m.error.message));
      else p.resolve(m.check);
      next();
    });
    w.on('error', () => this.fail());
    w.on('exit', () => {
      if (!this.workers.has(w)) return; // finished, or terminated
      this.workers.delete(w);
      this.finishing.get(w)?.([]); // stopped before it said what changed: the main thread's own check of the files stands
      this.fail();
    });
    next();
  }

  /** No more work for the workers: the main thread checks whatever is not back. */
  private fail(): void {
    if (this.failed) return;
    this.failed = true;
    this.queue.length = 0;
    for (const p of this.pending.values()) p.resolve(null); // no-op for the checks already back
    for (const w of this.workers) {
      this.finishing.get(w)?.([]);
      this.finishing.delete(w);
    }
    void this.terminate();
  }
}
