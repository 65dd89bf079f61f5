/**
 * Progress for long merges: a redrawn bar on a terminal, plain lines at every tenth
 * otherwise (logs, CI), nothing when quiet.
 */
import type { ProgressEvent } from '../merge/run.js';
import { formatBytes, formatDuration } from '../util/size.js';

export interface ProgressSink {
  update(e: ProgressEvent): void;
  /** clears a bar so the summary starts on a clean line */
  end(): void;
}

function describe(e: ProgressEvent): { pct: number; text: string } {
  const frac = e.bytesTotal > 0 ? e.bytesDone / e.bytesTotal : e.tensorsDone / Math.max(1, e.tensorsTotal);
  const rate = e.elapsedSeconds > 0 ? e.bytesDone / e.elapsedSeconds : 0;
  const eta = rate > 0 ? (e.bytesTotal - e.bytesDone) / rate : Infinity;
  const text = `${e.tensorsDone}/${e.tensorsTotal} tensors  ${formatBytes(e.bytesDone)}/${formatBytes(e.bytesTotal)}  ` +
    `${formatBytes(rate)}/s  ETA ${formatDuration(eta)}`;
  return { pct: Math.floor(frac * 100), text };
}

export function createProgress(stream: NodeJS.WriteStream, mode: 'auto' | 'plain' | 'none'): ProgressSink {
  if (mode === 'none') return { update() {}, end() {} };
  const tty = mode === 'auto' && stream.isTTY === true && process.env.TERM !== 'dumb';
  if (tty) {
    let last = 0;
    let drawn = false;
    return {
      update(e) {
        const now = Date.now();
        if (e.tensorsDone < e.tensorsTotal && now - last < 100) return;
        last = now;
        const { pct, text } = describe(e);
        const width = 24;
        const fill = Math.round((pct / 100) * width);
        const line = `[${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${String(pct).padStart(3)}%  ${text}`;
        const cols = stream.columns ?? 100;
        stream.write(`\r${line.slice(0, cols - 1)}\x1b[K`);
        drawn = true;
      },
      end() {
        if (drawn) stream.write('\r\x1b[K');
      },
    };
  }
  let nextStep = 10;
  return {
    update(e) {
      const { pct, text } = describe(e);
      if (pct >= nextStep || e.tensorsDone === e.tensorsTotal) {
        if (e.phase === 'finish') return;
        stream.write(`progress ${String(pct).padStart(3)}%  ${text}\n`);
        while (nextStep <= pct) nextStep += 10;
      }
    },
    end() {},
  };
}
