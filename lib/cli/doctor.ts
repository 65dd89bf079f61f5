/** `della-merge doctor`: what this installation runs on, and what to do when it cannot. */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { loadNative, nativeLocation } from '../native.js';

export interface DoctorReport {
  ok: boolean;
  version: string;
  node: string;
  napi: string | undefined;
  platform: string;
  glibc: string | null;
  binary: { path: string | null; kind: 'prebuilt' | 'local build' | 'explicit' | 'none'; loads: boolean; error: string | null };
  cpu: { threads: number | null; features: string[]; kernels: string };
  cuda: { plugin: string | null; driver: string | null; note: string };
  advice: string[];
}

export function doctor(version: string): DoctorReport {
  const advice: string[] = [];
  const report = (process.report?.getReport() ?? {}) as { header?: { glibcVersionRuntime?: string } };
  const glibc = report.header?.glibcVersionRuntime ?? null;
  const loc = nativeLocation();
  const kind = process.env.DELLA_NATIVE_PATH ? 'explicit' : !loc.path ? 'none' : loc.path.includes(`${join('prebuilds')}`) ? 'prebuilt' : 'local build';
  let loads = false, error = loc.error, threads: number | null = null, features: string[] = [];
  try {
    const native = loadNative();
    loads = true;
    threads = native.hardwareThreads;
    features = native.cpuFeatures();
  } catch (e) {
    error = (e as Error).message;
  }
  if (!loc.path) {
    advice.push(`No prebuilt binary fits ${process.platform}-${process.arch}: install CMake (>= 3.18) and a C++17 compiler, then run "npm rebuild della-merge".`);
  } else if (!loads) {
    if (error && /GLIBC_[\d.]+' not found/.test(error)) {
      advice.push(`The binary needs a newer glibc than this system's ${glibc ?? '(unknown)'}: build from source with "npm rebuild della-merge" (needs CMake and a C++17 compiler).`);
    } else {
      advice.push(`The binary at ${loc.path} does not load: rebuild it with "npm rebuild della-merge".`);
    }
  }
  const dir = loc.path ? dirname(loc.path) : null;
  const plugin = dir && existsSync(join(dir, 'della_merge_cuda.so')) ? join(dir, 'della_merge_cuda.so') : null;
  const driverFile = '/proc/driver/nvidia/version';
  const driver = existsSync(driverFile) ? (readFileSync(driverFile, 'utf8').split('\n')[0].trim() || 'present') : null;
  return {
    ok: loads,
    version,
    node: process.version,
    napi: process.versions.napi,
    platform: `${process.platform}-${process.arch}`,
    glibc,
    binary: { path: loc.path, kind, loads, error: loads ? null : error },
    cpu: {
      threads,
      features,
      kernels: 'portable x86-64 C++ (no run-time SIMD dispatch yet)',
    },
    cuda: {
      plugin,
      driver,
      note: plugin ? 'CUDA plugin found' : 'this version has no CUDA plugin: merges run on the CPU',
    },
    advice,
  };
}

export function doctorLines(r: DoctorReport): string[] {
  return [
    `della-merge ${r.version} on ${r.platform}, Node.js ${r.node} (N-API ${r.napi ?? '?'}), glibc ${r.glibc ?? 'n/a'}`,
    `binary   ${r.binary.path ?? 'none found'} (${r.binary.kind}) ${r.binary.loads ? 'loads' : `does not load${r.binary.error ? `: ${r.binary.error}` : ''}`}`,
    `cpu      ${r.cpu.threads ?? '?'} threads; SIMD ${r.cpu.features.join(', ') || 'none detected'}; kernels: ${r.cpu.kernels}`,
    `cuda     plugin ${r.cuda.plugin ?? 'not present'}; driver ${r.cuda.driver ?? 'not found'} (${r.cuda.note})`,
    ...r.advice.map((a) => `fix      ${a}`),
    r.ok ? 'ok       ready to merge' : 'FAILED   see the fix above',
  ];
}

