#!/usr/bin/env node
// One end-to-end comparison of scripts/gpu-check.sh, from the CPU's and the GPU's
// --report files: prints five lines, the summary note, the CPU's and the GPU's seconds
// with their phases, the e2e.json record, and the device the GPU run names. A report that is missing or unreadable
// gives null (or ?) in its fields, as a failed run should.
//   node scripts/gpu-e2e-row.mjs CPU.json GPU.json RECIPE OUTPUT EQUAL H2D_GBPS
import { readFileSync } from 'node:fs';

const [cpuFile, gpuFile, recipe, output, equal, h2dArg] = process.argv.slice(2);
const load = (f) => {
  try {
    return JSON.parse(readFileSync(f, 'utf8'));
  } catch {
    return null;
  }
};
const cpu = load(cpuFile), gpu = load(gpuFile);
const h2d = h2dArg ? Number(h2dArg) : null;
const read = gpu?.bytes?.read ?? null;
const ratio = (num, den, digits) => (num != null && den ? (num / den).toFixed(digits) : 'null');
const gbs = ratio(read, gpu?.seconds * 1e9, 2);
const mgbs = ratio(read, gpu?.phases?.merge * 1e9, 2);
const floor = ratio(read, h2d * 1e9, 3);
const phases = (r) =>
  r ? `${r.seconds.toFixed(3)} s (${Object.entries(r.phases ?? {}).map(([k, v]) => `${k} ${v.toFixed(3)}`).join(', ')})` : '?';

// The target: at least 70% of the pinned host-to-device bandwidth end to end.
const pct = (v) => (v !== 'null' && h2d ? ` (${Math.round((100 * Number(v)) / h2d)}%)` : '');
console.log(`e2e ${recipe} to ${output}: equal=${equal}; read ${read} bytes: gpu ${gbs} GB/s overall${pct(gbs)}, ${mgbs} GB/s ` +
  `in the merge phase${pct(mgbs)}, vs pinned H2D ${h2dArg || '?'} GB/s (floor ${floor} s)`);
console.log(`     cpu ${phases(cpu)}`);
console.log(`     gpu ${phases(gpu)}`);
const record = {
  recipe, output, equal: equal === 'true', cpu_seconds: cpu?.seconds ?? null, gpu_seconds: gpu?.seconds ?? null,
  gpu_merge_phase_seconds: gpu?.phases?.merge ?? null, bytes_read: read, bytes_written: gpu?.bytes?.written ?? null,
  gpu_read_GBps: gbs === 'null' ? null : Number(gbs), gpu_merge_phase_read_GBps: mgbs === 'null' ? null : Number(mgbs),
  h2d_floor_seconds: floor === 'null' ? null : Number(floor), cpu_phases: cpu?.phases ?? null, gpu_phases: gpu?.phases ?? null,
};
console.log(JSON.stringify(record));
console.log(gpu?.device ?? '?');
