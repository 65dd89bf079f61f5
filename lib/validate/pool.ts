/**
 * verifyMerge's worker threads, from the main thread's side: the tensors given are sent,
 * in plan order, to whichever worker is free (verify-worker.ts), and their checks come
 * back as promises. Only the reference's whole-tensor passes are worth a thread: the
 * rest of verify is native hashing and a few rows.
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
  promise: Promise<TensorCheck>;
  resolve(check: TensorCheck): void;
  reject(e: Error): void;
}

export class VerifyPool {
  private readonly workers: Worker[] = [];
  private readonly queue: string[];
  private readonly pending = new Map<string, Pending>();
  private readonly finished = new Map<Worker, (changes: string[]) => void>();
  private closing = false;

  constructor(data: VerifyWorkerData, names: readonly string[], threads: number) {
    this.queue = [...names];
    for (const name of names) {
      let resolve!: (c: TensorCheck) => void, reject!: (e: Error) => void;
      const promise = new Promise<TensorCheck>((res, rej) => { resolve = res; reject = rej; });
      promise.catch(() => {}); // awaited in plan order; never an unhandled rejection meanwhile
      this.pending.set(name, { promise, resolve, reject });
    }
    for (let i = 0; i < Math.min(threads, names.length); i++) this.start(data);
  }

  has(name: string): boolean {
    return this.pending.has(name);
  }

  /** The check of a tensor given to the pool. */
  check(name: string): Promise<TensorCheck> {
    return this.pending.get(name)!.promise;
  }

  /** Ends the workers once every check is back: the files they saw change, if any. */
  async finish(): Promise<string[]> {
    const changes = await Promise.all(this.workers.map((w) => new Promise<string[]>((resolve) => {
      this.finished.set(w, resolve);
      w.postMessage({ finish: true } satisfies VerifyWorkerRequest);
    })));
    this.closing = true;
    return [...new Set(changes.flat())];
  }

  /** Stops every worker (after finish(), or to abandon the check). */
  async terminate(): Promise<void> {
    this.closing = true;
    await Promise.all(this.workers.map((w) => w.terminate()));
  }

  private start(data: VerifyWorkerData): void {
    const w = new Worker(WORKER_FILE, { workerData: data });
    this.workers.push(w);
    const next = () => {
      const name = this.queue.shift();
      if (name !== undefined) w.postMessage({ name } satisfies VerifyWorkerRequest);
    };
    w.on('message', (m: VerifyWorkerReply) => {
      if ('changes' in m) {
        this.finished.get(w)?.(m.changes);
        return;
      }
      const p = this.pending.get(m.name)!;
      if ('check' in m) p.resolve(m.check);
      else p.reject(m.error.code ? new DellaError(m.error.code as ErrorCode, m.error.message) : new Error(m.error.message));
      next();
    });
    w.on('error', (e) => this.fail(e));
    w.on('exit', (code) => {
      if (!this.closing) this.fail(new Error(`a verify worker thread stopped (exit code ${code}) before its checks were done`));
    });
    next();
  }

  /** A worker that cannot go on fails every check not yet back. */
  private fail(e: Error): void {
    for (const p of this.pending.values()) p.reject(e);
    for (const resolve of this.finished.values()) resolve([]);
  }
}
