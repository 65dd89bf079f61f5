#!/usr/bin/env node
// Reads the CSV of Nsight Systems' cuda_gpu_trace report (one row per copy, set and
// kernel on the GPU) and says how busy the GPU was between its first and last operation:
// the time covered by any operation, by uploads, kernels and downloads, and the longest
// gaps with nothing running. For the GPU check (scripts/gpu-check.sh), which profiles one
// end-to-end merge: it tells a pipeline that leaves the GPU idle (between batches, or
// waiting for the host's staging) from one the copies themselves bound.
//   node scripts/gpu-nsys-gaps.mjs TRACE.csv
import { readFileSync } from 'node:fs';

// RFC 4180 enough for nsys: fields may be quoted, with "" for a quote.
function parseLine(line) {
  const out = [];
  let cur = '', quoted = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quoted) {
      if (c === '"' && line[i + 1] === '"') { cur += '"'; i++; } else if (c === '"') quoted = false; else cur += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') { out.push(cur); cur = ''; } else cur += c;
  }
  out.push(cur);
  return out;
}

// Total length of the union of [start, end) intervals.
function covered(intervals) {
  const s = [...intervals].sort((a, b) => a[0] - b[0]);
  let total = 0, end = -Infinity, start = 0;
  for (const [a, b] of s) {
    if (a > end) { if (end > start) total += end - start; start = a; end = b; } else end = Math.max(end, b);
  }
  if (end > start) total += end - start;
  return total;
}

const file = process.argv[2];
if (!file) {
  console.error('usage: node scripts/gpu-nsys-gaps.mjs TRACE.csv');
  process.exit(2);
}
const lines = readFileSync(file, 'utf8').split(/\r?\n/).filter((l) => l.trim() !== '');
const headerAt = lines.findIndex((l) => /Start/.test(l) && /Duration/.test(l) && /Name/.test(l));
if (headerAt < 0) {
  console.error(`${file}: no header with Start, Duration and Name columns (not a cuda_gpu_trace CSV?)`);
  process.exit(1);
}
const header = parseLine(lines[headerAt]);
const col = (re) => header.findIndex((h) => re.test(h));
const iStart = col(/^Start/), iDur = col(/^Duration/), iName = col(/^Name$/);
if (iStart < 0 || iDur < 0 || iName < 0) {
  console.error(`${file}: missing Start, Duration or Name column in: ${lines[headerAt]}`);
  process.exit(1);
}
const ops = [];
for (const line of lines.slice(headerAt + 1)) {
  const f = parseLine(line);
  const start = Number(f[iStart]), dur = Number(f[iDur]);
  if (!Number.isFinite(start) || !Number.isFinite(dur)) continue;
  const name = f[iName] ?? '';
  const kind = /memcpy.*(HtoD|Host-to-Device)/i.test(name) ? 'up'
    : /memcpy.*(DtoH|Device-to-Host)/i.test(name) ? 'down'
      : /memset|memcpy/i.test(name) ? 'other' : 'kernel';
  ops.push({ start, end: start + dur, kind });
}
if (ops.length === 0) {
  console.error(`${file}: no GPU operations`);
  process.exit(1);
}
const first = ops.reduce((a, o) => Math.min(a, o.start), Infinity), last = ops.reduce((a, o) => Math.max(a, o.end), -Infinity);
const span = last - first;
const pct = (x) => `${((100 * x) / span).toFixed(1)}%`;
const ms = (ns) => `${(ns / 1e6).toFixed(ns < 1e6 ? 4 : 1)} ms`;
const of = (kind) => covered(ops.filter((o) => !kind || o.kind === kind).map((o) => [o.start, o.end]));
const busy = of();
// The idle gaps, longest first.
const sorted = [...ops].sort((a, b) => a.start - b.start);
const gaps = [];
let end = sorted[0].end;
for (const o of sorted) {
  if (o.start > end) gaps.push([end, o.start]);
  end = Math.max(end, o.end);
}
gaps.sort((a, b) => (b[1] - b[0]) - (a[1] - a[0]));
console.log(`GPU trace: ${ops.length} operations over ${ms(span)}; something running ${pct(busy)} (${ms(busy)}), ` +
  `uploads ${pct(of('up'))}, kernels ${pct(of('kernel'))}, downloads ${pct(of('down'))}; ` +
  `idle ${ms(span - busy)} in ${gaps.length} gaps`);
console.log(`longest gaps: ${gaps.slice(0, 5).map(([a, b]) => `${ms(b - a)} at +${ms(a - first)}`).join(', ') || 'none'}`);
