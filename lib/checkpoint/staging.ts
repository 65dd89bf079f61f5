/**
 * Staging memory for output on its way to disk: block-aligned buffers that are reused
 * from one batch to the next, so that their pages stay resident. New memory is what
 * costs when writing a model out (every fresh page is zero-filled by the operating
 * system, and on virtual machines often faulted in by the host as well); reused
 * buffers cost nothing after their first use.
 *
 * The pool holds at most `budget` bytes (outstanding and idle together), except that a
 * request is always granted when nothing else is outstanding. A request that does not
 * fit waits until enough is released, which is what keeps the output writes from
 * falling behind the kernels without bound.
 */
import type { Bytes } from '../util/bytes.js';

export const STAGING_BLOCK = 4096;
const ROUND = 4 << 20;

export class StagingPool {
  private readonly alloc: (bytes: number) => Bytes;
  private readonly budget: number;
  private idle: Bytes[] = [];
  private outstanding = 0;
  private idleBytes = 0;
  private waiting: Array<() => void> = [];

  constructor(alloc: (bytes: number) => Bytes, budget: number) {
    this.alloc = alloc;
    this.budget = budget;
  }

  /** A buffer of at least `bytes` bytes whose first byte is block-aligned. */
  async acquire(bytes: number): Promise<Bytes> {
    for (;;) {
      const reused = this.takeIdle(bytes);
      if (reused) return reused;
      const size = Math.ceil(Math.max(bytes, 1) / ROUND) * ROUND;
      // Idle buffers too small for this request make room for it.
      while (this.idle.length > 0 && this.outstanding + this.idleBytes + size > this.budget) {
        this.idleBytes -= this.idle.shift()!.byteLength;
      }
      if (this.outstanding === 0 || this.outstanding + this.idleBytes + size <= this.budget) {
        this.outstanding += size;
        return this.alloc(size);
      }
      await new Promise<void>((resolve) => this.waiting.push(resolve));
    }
  }

  /** Gives a buffer from acquire() back, once nothing reads it any more. */
  release(buffer: Bytes): void {
    this.outstanding -= buffer.byteLength;
    this.idle.push(buffer);
    this.idle.sort((a, b) => a.byteLength - b.byteLength);
    this.idleBytes += buffer.byteLength;
    const wake = this.waiting;
    this.waiting = [];
    for (const w of wake) w();
  }

  /** Bytes held now: outstanding and idle. */
  get heldBytes(): number {
    return this.outstanding + this.idleBytes;
  }

  private takeIdle(bytes: number): Bytes | null {
    const i = this.idle.findIndex((b) => b.byteLength >= bytes);
    if (i < 0) return null;
    const [b] = this.idle.splice(i, 1);
    this.idleBytes -= b.byteLength;
    this.outstanding += b.byteLength;
    return b;
  }
}
