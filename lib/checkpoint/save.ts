/**
 * Writes safetensors checkpoints from tensors held in memory: used by the demo, the
 * tests' fixtures and API users who build small models. Large merges go through
 * OutputDirectory instead, which never holds a tensor in JS.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { DellaError } from '../errors.js';
import { DTYPE_SIZES } from './safetensors.js';
import { indexJson, INDEX_FILE, layoutShards } from './writer.js';

export interface InMemoryTensor {
  name: string;
  dtype: string;
  shape: number[];
  data: ArrayBufferView;
}

function bytesOf(t: InMemoryTensor): Uint8Array {
  const numel = t.shape.reduce((a, b) => a * b, 1);
  const size = DTYPE_SIZES[t.dtype];
  if (size === undefined) throw new DellaError('E_ARGS', `tensor "${t.name}": unknown dtype ${t.dtype}`);
  const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
  if (bytes.length !== numel * size) {
    throw new DellaError('E_ARGS', `tensor "${t.name}": ${bytes.length} bytes given, shape [${t.shape.join(', ')}] of ${t.dtype} needs ${numel * size}`);
  }
  return bytes;
}

/**
 * Saves a model directory: model.safetensors, or shards of at most `shardSize` data
 * bytes plus model.safetensors.index.json. Returns the file names written.
 */
export function saveModel(dir: string, tensors: readonly InMemoryTensor[], options: { shardSize?: number } = {}): string[] {
  mkdirSync(dir, { recursive: true });
  const byName = new Map<string, Uint8Array>();
  for (const t of tensors) {
    if (byName.has(t.name)) throw new DellaError('E_ARGS', `tensor "${t.name}" is given twice`);
    byName.set(t.name, bytesOf(t));
  }
  const layouts = layoutShards(
    tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, byteLength: byName.get(t.name)!.length })),
    options.shardSize ?? Number.MAX_SAFE_INTEGER,
  );
  for (const l of layouts) {
    const file = new Uint8Array(l.fileSize);
    file.set(l.header, 0);
    for (const t of l.tensors) file.set(byName.get(t.name)!, l.header.length + t.begin);
    writeFileSync(join(dir, l.fileName), file);
  }
  const files = layouts.map((l) => l.fileName);
  if (layouts.length > 1) {
    writeFileSync(join(dir, INDEX_FILE), indexJson(layouts));
    files.push(INDEX_FILE);
  }
  return files;
}
