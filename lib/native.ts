/**
 * The one file that loads and types the native addon. node-gyp-build looks in
 * build/Release first (a local build), then prebuilds/<platform>-<arch>/.
 */
import { createRequire } from 'node:module';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DellaError } from './errors.js';
import type { Bytes } from './util/bytes.js';
import type { BatchSpec, DotStats, DotTaskSpec, MergeTaskStats } from './merge/task.js';

export interface NativeMappedFile {
  readonly size: number;
  /** Whether a read went past the end of the file, cut short since it was mapped: such
   * reads see zeros instead of killing the process with SIGBUS (native/src/io/map_guard.h). */
  readonly faulted: boolean;
  /** A zero-copy view of [offset, offset + length), at most 4 GiB; keeps the map alive. */
  view(offset: number, length: number): Uint8Array;
  advise(offset: number, length: number, how: 'willneed' | 'dontneed' | 'sequential'): void;
  close(): void;
}

/** A tensor's bytes in a MappedFile, handed to the kernels without a JS buffer. */
export interface NativeSlice {
  map: NativeMappedFile;
  offset: number;
  length: number;
}

/** A new file written by byte ranges off the JS thread (O_DIRECT where possible). */
export interface NativeOutputFile {
  readonly size: number;
  /** whether writes go around the page cache (O_DIRECT) */
  readonly direct: boolean;
  /** Writes `bytes` at `offset`; `bytes` must stay unchanged until the promise settles.
   * Every byte of the file is written exactly once, in any order. */
  write(offset: number, bytes: Bytes): Promise<void>;
  /** After every write has settled; throws if part of the file was never written. */
  close(): void;
}

/** A CUDA device as the plugin describes it. */
export interface CudaDevice {
  index: number;
  name: string;
  /** CUDA devices visible to the process */
  count: number;
  computeCapability: string;
  totalMemory: number;
  freeMemory: number;
  multiprocessors: number;
  /** e.g. 13000 for CUDA 13.0 */
  runtimeVersion: number;
  /** the driver's CUDA version, 0 without a driver */
  driverVersion: number;
}

/** What cudaInfo() reports: never throws. */
export interface CudaInfo {
  /** where the plugin is looked for: beside the addon, or $DELLA_CUDA_PLUGIN */
  plugin: string;
  pluginExists: boolean;
  loaded: boolean;
  ok: boolean;
  /** why the device cannot be used: E_NO_PLUGIN, E_NO_DEVICE, E_OUT_OF_MEMORY or E_CUDA */
  code: string | null;
  error: string | null;
  device: CudaDevice | null;
}

export interface NativeAddon {
  MappedFile: {
    /** Maps an existing file read-only. */
    /** copyOnWrite: views may be written to (private copies of their pages); else read-only */
    new (path: string, copyOnWrite?: boolean): NativeMappedFile;
  };
  OutputFile: {
    /** Creates a new file of `size` bytes (reserved on disk; it must not exist). With
     * `direct` false, writes always go through the page cache. */
    new (path: string, size: number, direct: boolean): NativeOutputFile;
  };
  /** `bytes` of memory aligned to the file block (4096 bytes), freed when collected
   * (a DataView beyond 4 GiB). */
  allocStaging(bytes: number): Bytes;
  /** on: `dir` is removed when this environment is torn down (a Worker terminated); off: no longer */
  removeAtTeardown(dir: string, on: boolean): void;
  mergeBatch(batch: BatchSpec): Promise<MergeTaskStats[]>;
  dotBatch(batch: { threads: number; tasks: DotTaskSpec[] }): Promise<DotStats[]>;
  philoxBlock(c0: number, c1: number, c2: number, c3: number, k0: number, k1: number): number[];
  /** XXH64 (seed 0) of the bytes, as 16 hex digits: the digest a merge records per tensor. */
  xxh64(bytes: Bytes | NativeSlice): string;
  cpuFeatures(): string[];
  /** The CPU kernel paths this machine selects at run time, in words. */
  kernelPaths(): string[];
  /** Loads the CUDA plugin (once) and probes `device`; allocates nothing. */
  cudaInfo(device: number): CudaInfo;
  /** Opens `device` with a device memory budget in bytes (0: the plugin's default) and
   * keeps it open for mergeBatch; throws an Error with `cudaCode` when it cannot. */
  cudaOpen(options: { device: number; memory: number }): CudaDevice;
  /** cudaOpen on a worker thread (absent from addons built before it). */
  cudaOpenAsync?(options: { device: number; memory: number }): Promise<CudaDevice>;
  hardwareThreads: number;
  abiVersion: number;
}

export const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/**
 * The addon interface this code needs: addon.cc's abiVersion, bumped whenever what the
 * addon takes or returns changes. 2: merge statistics carry outNonfinite, which an older
 * addon would leave out, silently turning the overflow check off. 3: input maps are
 * guarded against files cut short (an older addon dies of SIGBUS) and say so (faulted).
 * 4: MappedFile's copyOnWrite (an older addon maps read-only: a write to a view crashes).
 * 5: staging over 4 GiB as a DataView, written and hashed as one (an older addon
 * refuses such staging); xxh64 of a map slice.
 */
export const ADDON_ABI_VERSION = 5;

let cached: NativeAddon | undefined;
let loadedFrom: string | undefined;

/** The file the addon was (or would be) loaded from, or why none was found. */
export function nativeLocation(): { path: string | null; error: string | null } {
  const require = createRequire(import.meta.url);
  if (process.env.DELLA_NATIVE_PATH) return { path: resolve(process.env.DELLA_NATIVE_PATH), error: null };
  if (loadedFrom) return { path: loadedFrom, error: null };
  try {
    const load = require('node-gyp-build') as { path(dir: string): string };
    return { path: load.path(packageRoot), error: null };
  } catch (e) {
    return { path: null, error: (e as Error).message.split('\n')[0] };
  }
}

export function loadNative(): NativeAddon {
  if (cached) return cached;
  const require = createRequire(import.meta.url);
  try {
    // DELLA_NATIVE_PATH picks a specific build (the sanitizer build of test:asan).
    const explicit = process.env.DELLA_NATIVE_PATH;
    const load = require('node-gyp-build') as (dir: string) => unknown;
    const addon = (explicit ? require(resolve(explicit)) : load(packageRoot)) as NativeAddon;
    loadedFrom = explicit ? resolve(explicit) : (load as unknown as { path(dir: string): string }).path(packageRoot);
    if (addon.abiVersion !== ADDON_ABI_VERSION) {
      throw new DellaError(
        'E_NATIVE',
        `the della-merge native addon at ${loadedFrom} was built from another version (its interface ${String(addon.abiVersion)}, ` +
          `this code needs ${ADDON_ABI_VERSION}): run "npm rebuild della-merge", or "npm run build:native" in a checkout.`,
      );
    }
    cached = addon;
  } catch (e) {
    if (e instanceof DellaError) throw e;
    const reason = e instanceof Error ? e.message.split('\n')[0] : String(e);
    const explicit = process.env.DELLA_NATIVE_PATH;
    if (explicit) {
      throw new DellaError('E_NATIVE', `the della-merge native addon DELLA_NATIVE_PATH names (${resolve(explicit)}) could not be loaded (${reason}); ` +
        'unset DELLA_NATIVE_PATH to load the installed one', { cause: e });
    }
    throw new DellaError(
      'E_NATIVE',
      `the della-merge native addon could not be loaded (${reason}). ` +
        `No prebuilt binary fits ${process.platform}-${process.arch} and no local build was found: ` +
        `run "npm rebuild della-merge" (needs CMake and a C++17 compiler) or "npm run build:native" in a checkout.`,
      { cause: e },
    );
  }
  return cached;
}
