/**
 * Where the kernels run: `cpu` (the default) or `cuda[:N]`, through the CUDA plugin the
 * addon loads on request. The device is opened before anything is written, so a
 * machine without the plugin, a driver or a GPU fails with one message and leaves
 * nothing behind.
 */
import { DellaError } from '../errors.js';
import type { CudaDevice, NativeAddon } from '../native.js';
import { formatBytes } from '../util/size.js';

export type DeviceSpec = { kind: 'cpu' } | { kind: 'cuda'; index: number };

/** Parses `cpu`, `cuda` or `cuda:N`. */
export function parseDevice(text: string | undefined): DeviceSpec {
  if (text === undefined || text === 'cpu') return { kind: 'cpu' };
  const m = /^cuda(?::(\d{1,4}))?$/.exec(text.trim());
  if (!m) throw new DellaError('E_ARGS', `device "${text}" is not one of cpu, cuda, cuda:N (N = 0, 1, ...)`);
  return { kind: 'cuda', index: m[1] === undefined ? 0 : Number(m[1]) };
}

export function deviceName(d: DeviceSpec): string {
  return d.kind === 'cpu' ? 'cpu' : `cuda:${d.index}`;
}

/** What the kernels need to run on a GPU: the device and its memory budget (0: default). */
export interface CudaTarget {
  device: number;
  memory: number;
  info: CudaDevice;
}

/**
 * Opens the device of `spec` (a no-op for the CPU). Throws DellaError E_CUDA with the
 * loader's or the CUDA runtime's reason when it cannot be used.
 */
export function openDevice(native: NativeAddon, spec: DeviceSpec, gpuMemory: number | undefined): CudaTarget | null {
  if (spec.kind === 'cpu') {
    if (gpuMemory !== undefined) throw new DellaError('E_ARGS', 'a GPU memory budget needs a CUDA device (--device cuda)');
    return null;
  }
  if (gpuMemory !== undefined && !(Number.isSafeInteger(gpuMemory) && gpuMemory > 0)) {
    throw new DellaError('E_ARGS', `the GPU memory budget must be a positive number of bytes, got ${gpuMemory}`);
  }
  if (typeof native.cudaOpen !== 'function') {
    throw new DellaError('E_CUDA', `--device ${deviceName(spec)}: this native addon has no CUDA support; rebuild it ("npm rebuild della-merge")`);
  }
  try {
    const info = native.cudaOpen({ device: spec.index, memory: gpuMemory ?? 0 });
    return { device: spec.index, memory: gpuMemory ?? 0, info };
  } catch (e) {
    throw cudaError(e, spec);
  }
}

/**
 * A native CUDA failure as a DellaError naming the device and the reason: opening
 * (no plugin, driver or GPU; a budget over the free memory) or merging (out of memory).
 */
export function cudaError(e: unknown, spec: DeviceSpec | number, merging = false): DellaError {
  const name = typeof spec === 'number' ? `cuda:${spec}` : deviceName(spec);
  const code = (e as { cudaCode?: string } | null)?.cudaCode;
  const message = e instanceof Error ? e.message : String(e);
  const unavailable = code === 'E_NO_PLUGIN' || code === 'E_NO_DEVICE';
  const text = unavailable
    ? `--device ${name} is unavailable: ${message}`
    : merging
      ? `--device ${name}: the GPU merge failed: ${message}`
      : `--device ${name}: ${message}`;
  return new DellaError('E_CUDA', text, { cause: e });
}

export function describeDevice(t: CudaTarget | null): string {
  if (!t) return 'cpu';
  return `cuda:${t.device} (${t.info.name}, ${formatBytes(t.info.totalMemory)})`;
}
