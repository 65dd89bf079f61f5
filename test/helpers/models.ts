/** Random model directories on disk for end-to-end tests. */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { saveModel, type InMemoryTensor } from '../../lib/checkpoint/save.js';
import { DTYPE_CODE, type FloatDType } from '../../lib/merge/task.js';
import { drawBaseAndExperts, tensorBytes } from './tensors.js';
import { int } from './random.js';

const madeDirs: string[] = [];

/** A fresh directory under the OS temp dir, removed after the test file (test/setup.ts). */
export function tempDir(prefix = 'della-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  madeDirs.push(dir);
  return dir;
}

/**
 * Removes every directory tempDir() made in this test file; DELLA_KEEP_TEST_DIRS=1 keeps
 * them for a look after a failure. Without this, each full test run left about 250 MB in
 * the temp dir.
 */
export function removeTempDirs(): void {
  if (process.env.DELLA_KEEP_TEST_DIRS === '1') return;
  for (const dir of madeDirs.splice(0)) rmSync(dir, { recursive: true, force: true });
}

export interface ModelSet {
  dir: string;
  base: string;
  experts: string[];
}

/**
 * A base and K experts sharing random Llama-like tensor names and shapes, in `dtype`,
 * the base sharded at `shardSize`, experts as single files or shards. Includes an I64
 * tensor (copied) and shapes with rows of length 1 and 1-D tensors; `shapes` names the
 * floating-point tensors instead.
 */
export function makeModels(
  r: () => number,
  dir: string,
  options: { dtype: FloatDType; experts: number; layers?: number; shardSize?: number; shapes?: Array<[string, number[]]> },
): ModelSet {
  const layers = options.shapes ? 0 : (options.layers ?? 3);
  const specs: Array<[string, number[]]> = options.shapes ?? [['model.embed_tokens.weight', [int(r, 8, 40), int(r, 4, 24)]]];
  for (let l = 0; l < layers; l++) {
    specs.push(
      [`model.layers.${l}.self_attn.q_proj.weight`, [int(r, 1, 24), int(r, 1, 40)]],
      [`model.layers.${l}.mlp.down_proj.weight`, [int(r, 1, 16), int(r, 1, 64)]],
      [`model.layers.${l}.input_layernorm.weight`, [int(r, 1, 50)]],
      [`model.layers.${l}.mlp.gate.bias`, [int(r, 1, 9), 1]],
    );
  }
  if (!options.shapes) specs.push(['model.norm.weight', [int(r, 1, 30)]], ['lm_head.weight', [int(r, 8, 40), int(r, 4, 24)]]);
  const K = options.experts;
  const models: InMemoryTensor[][] = Array.from({ length: K + 1 }, () => []);
  for (const [name, shape] of specs) {
    const numel = shape.reduce((a, b) => a * b, 1);
    const { base, experts } = drawBaseAndExperts(r, numel, K);
    [base, ...experts].forEach((values, m) => {
      models[m].push({ name, dtype: options.dtype, shape, data: tensorBytes(values, DTYPE_CODE[options.dtype]) });
    });
  }
  for (const m of models) {
    m.push({ name: 'model.position_ids', dtype: 'I64', shape: [2, 3], data: new BigInt64Array([0n, 1n, 2n, 3n, 4n, 5n]) });
  }
  const base = join(dir, 'base');
  saveModel(base, models[0], { shardSize: options.shardSize ?? 600 });
  writeFileSync(join(base, 'config.json'), '{"model_type": "llama"}\n');
  writeFileSync(join(base, 'tokenizer.json'), '{"version": "1.0"}\n');
  const experts = models.slice(1).map((tensors, k) => {
    const d = join(dir, `expert${k}`);
    mkdirSync(d, { recursive: true });
    saveModel(d, tensors, { shardSize: k % 2 === 0 ? undefined : 900 });
    return d;
  });
  return { dir, base, experts };
}

export function writeRecipe(file: string, doc: unknown): string {
  writeFileSync(file, file.endsWith('.json') ? JSON.stringify(doc, null, 2) : stringify(doc));
  return file;
}
