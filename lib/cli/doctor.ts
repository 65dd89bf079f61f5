/** `della-merge doctor`: what this installation runs on, and what to do when it cannot. */
import { existsSync, readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { loadNative, nativeLocation, type CudaInfo, type NativeAddon } from '../native.js';
import { formatBytes } from '../util/size.js';

export interface DoctorReport {
  ok: boolean;
  version: string;
  node: string;
  napi: string | undefined;
  platform: string;
  glibc: string | null;
  binary: { path: string | null; kind: 'prebuilt' | 'local build' | 'explicit' | 'none'; loads: boolean; error: string | null };
  cpu: { threads: number | null; features: string[]; kernels: string };
  cuda: {
    /** the plugin file, when present (beside the addon, or $DELLA_CUDA_PLUGIN) */
    plugin: string | null;
    /** where the addon looks for it */
    pluginPath: string | null;
    /** the plugin loads and finds a usable GPU (device 0) */
    available: boolean;
    /** the NVIDIA driver, from /proc/driver/nvidia/version */
    driver: string | null;
    /** device 0, when available */
    device: {
      name: string; computeCapability: string; totalMemory: number; freeMemory: number; count: number;
      /** the plugin's CUDA runtime and the CUDA version the driver supports, e.g. "13.0" */
      runtime: string; driverCuda: string;
    } | null;
    /** why CUDA cannot be used (the loader's or the CUDA runtime's reason), or what it found */
    note: string;
  };
  advice: string[];
}

/** 13000 -> "13.0", as CUDA numbers its versions (1000 major + 10 minor). */
function cudaVersion(v: number): string {
  return `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}`;
}

export function doctor(version: string): DoctorReport {
  const advice: string[] = [];
  const report = (process.report?.getReport() ?? {}) as { header?: { glibcVersionRuntime?: string } };
  const glibc = report.header?.glibcVersionRuntime ?? null;
  const loc = nativeLocation();
  const kind = process.env.DELLA_NATIVE_PATH ? 'explicit' : !loc.path ? 'none' : loc.path.includes(`${join('prebuilds')}`) ? 'prebuilt' : 'local build';
  let loads = false, error = loc.error, threads: number | null = null, features: string[] = [], kernels: string[] = [];
  let native: NativeAddon | null = null;
  try {
    native = loadNative();
    loads = true;
    threads = native.hardwareThreads;
    features = native.cpuFeatures();
    kernels = native.kernelPaths();
  } catch (e) {
    error = (e as Error).message;
  }
  if (!loc.path) {
    advice.push(`No prebuilt binary fits ${process.platform}-${process.arch}: install CMake (>= 3.18) and a C++17 compiler, then run "npm rebuild della-merge".`);
  } else if (!loads) {
    if (kind === 'explicit') {
      advice.push(`DELLA_NATIVE_PATH names ${loc.path}, which does not load: point it at a built della_merge.node, or unset it to use the package's own binary.`);
    } else if (error && /GLIBC_[\d.]+' not found/.test(error)) {
      advice.push(`The binary needs a newer glibc than this system's ${glibc ?? '(unknown)'}: build from source with "npm rebuild della-merge" (needs CMake and a C++17 compiler).`);
    } else {
      advice.push(`The binary at ${loc.path} does not load: rebuild it with "npm rebuild della-merge".`);
    }
  }
  const driverFile = '/proc/driver/nvidia/version';
  const driver = existsSync(driverFile) ? (readFileSync(driverFile, 'utf8').split('\n')[0].trim() || 'present') : null;
  let info: CudaInfo | null = null;
  try {
    info = native && typeof native.cudaInfo === 'function' ? native.cudaInfo(0) : null;
  } catch (e) {
    info = null;
    error = error ?? (e as Error).message;
  }
  const plugin = info?.pluginExists ? info.plugin : null;
  const d = info?.device ?? null;
  const cudaNote = !info
    ? 'this binary has no CUDA support: merges run on the CPU'
    : info.ok && d
      ? `--device cuda can use ${d.count} GPU(s); cuda:0 is ${d.name} (compute ${d.computeCapability}, ${formatBytes(d.totalMemory)}, ${formatBytes(d.freeMemory)} free); ` +
        `CUDA runtime ${cudaVersion(d.runtimeVersion)}, driver for CUDA ${cudaVersion(d.driverVersion)}`
      : `--device cuda is unavailable: ${info.error ?? 'unknown reason'}; merges run on the CPU`;
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
      kernels: kernels.join(', ') || 'unknown (the binary does not load)',
    },
    cuda: {
      plugin,
      pluginPath: info?.plugin ?? null,
      available: Boolean(info?.ok),
      driver,
      device: d
        ? {
          name: d.name, computeCapability: d.computeCapability, totalMemory: d.totalMemory, freeMemory: d.freeMemory, count: d.count,
          runtime: cudaVersion(d.runtimeVersion), driverCuda: cudaVersion(d.driverVersion),
        }
        : null,
      note: cudaNote,
    },
    advice,
  };
}

export function doctorLines(r: DoctorReport): string[] {
  return [
    `della-merge ${r.version} on ${r.platform}, Node.js ${r.node} (N-API ${r.napi ?? '?'}), glibc ${r.glibc ?? 'n/a'}`,
    `binary   ${r.binary.path ?? 'none found'} (${r.binary.kind}) ${r.binary.loads ? 'loads' : `does not load${r.binary.error ? `: ${r.binary.error}` : ''}`}`,
    r.cpu.threads === null
      ? `cpu      ${availableParallelism()} cores (Node.js's count); SIMD and kernels unknown (the binary does not load)`
      : `cpu      ${r.cpu.threads} threads; SIMD ${r.cpu.features.join(', ') || 'none detected'}; kernels: ${r.cpu.kernels}`,
    `cuda     plugin ${r.cuda.plugin ?? `not present${r.cuda.pluginPath ? ` (looked for ${r.cuda.pluginPath})` : ''}`}; ` +
      `driver ${r.cuda.driver ?? 'not found'}; ${r.cuda.note}`,
    ...r.advice.map((a) => `fix      ${a}`),
    r.ok ? 'ok       ready to merge' : 'FAILED   see the fix above',
  ];
}

