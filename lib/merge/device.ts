/**
 * Where the kernels run: `cpu` (the default) or `cuda[:N]`, through the CUDA plugin the
 * addon loads on request. A merge opens the device while it sets up (openDeviceAsync)
 * and waits for it before merging anything, so a machine without the plugin, a driver
 * or a GPU fails with one message, and the output it had begun is removed.
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

/** Checks the device arguments; null for the CPU, else what cudaOpen takes. */
function openRequest(native: NativeAddon, spec: DeviceSpec, gpuMemory: number | undefined): { device: number; memory: number } | null {
  if (spec.kind === 'cpu') {
    if (gpuMemory !== undefined) throw new DellaError('E_ARGS', "a GPU memory budget needs a CUDA device (--device cuda, or device: 'cuda' in the API)");
    return null;
  }
  if (gpuMemory !== undefined && !(Number.isSafeInteger(gpuMemory) && gpuMemory > 0)) {
    throw new DellaError('E_ARGS', `the GPU memory budget must be a positive number of bytes, got ${gpuMemory}`);
  }
  if (typeof native.cudaOpen !== 'function') {
    throw new DellaError('E_CUDA', `--device ${deviceName(spec)}: this native addon has no CUDA support; rebuild it ("npm rebuild della-merge")`);
  }
  return { device: spec.index, memory: gpuMemory ?? 0 };
}

/**
 * Opens the device of `spec` (a no-op for the CPU). Throws DellaError E_CUDA with the
 * loader's or the CUDA runtime's reason when it cannot be used.
 */
export function openDevice(native: NativeAddon, spec: DeviceSpec, gpuMemory: number | undefined): CudaTarget | null {
  const request = openRequest(native, spec, gpuMemory);
  if (!request) return null;
  try {
    return { ...request, info: native.cudaOpen(request) };
  } catch (e) {
    throw cudaError(e, spec);
  }
}

/**
 * Opens the device of `spec` on a worker thread, so that the caller can set up the rest
 * of its work meanwhile (CUDA's context takes about 0.3 s). Bad arguments throw at once;
 * a device that cannot be used rejects the promise with E_CUDA, as openDevice throws.
 */
export function openDeviceAsync(native: NativeAddon, spec: DeviceSpec, gpuMemory: number | undefined): Promise<CudaTarget | null> {
  const request = openRequest(native, spec, gpuMemory);
  if (!request) return Promise.resolve(null);
  if (typeof native.cudaOpenAsync !== 'function') return Promise.resolve().then(() => openDevice(native, spec, gpuMemory));
  return native.cudaOpenAsync(request).then(
    (info) => ({ ...request, info }),
    (e: unknown) => {
      throw cudaError(e, spec);
    },
  );
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
