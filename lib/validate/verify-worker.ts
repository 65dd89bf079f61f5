/**
 * A worker thread of verifyMerge: it opens the output and the recipe's models itself,
 * plans the merge as the main thread did, and checks the tensors it is sent (those whose
 * rows need passes over the whole tensor: most of a TIES verify's time), one at a time.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { DellaError } from '../errors.js';
import { openInput } from '../checkpoint/model.js';
import { openModels } from '../merge/build.js';
import { planMerge } from '../merge/plan.js';
import type { Recipe } from '../recipe/index.js';
import { checkTensor, type TensorCheck } from './verify.js';

export interface VerifyWorkerData {
  out: string;
  /** checked by the main thread (structured-cloned: a plain copy) */
  recipe: Recipe;
  seed: number;
  samples: number;
}

/** From the main thread: a tensor to check, or the end. */
export type VerifyWorkerRequest = { name: string } | { finish: true };

/** To the main thread. */
export type VerifyWorkerReply =
  | { name: string; check: TensorCheck }
  | { name: string; error: { code: string | null; message: string } }
  | { changes: string[] };

const port = parentPort!;
const { out, recipe, seed, samples } = workerData as VerifyWorkerData;
const models = openModels(recipe);
let merged: ReturnType<typeof openInput> | null = null;
try {
  merged = openInput(out);
} catch (e) {
  models.close();
  throw e;
}
const plan = planMerge(recipe, models.base, models.experts);
const planned = new Map(plan.tensors.map((t) => [t.name, t]));

port.on('message', (m: VerifyWorkerRequest) => {
  if ('finish' in m) {
    // A file that changed while this worker read it: the main thread reports it.
    const changes = [merged!, models.base, ...models.experts].map((c) => c.changed()).filter((c): c is string => c !== null);
    merged!.close();
    models.close();
    port.postMessage({ changes } satisfies VerifyWorkerReply);
    port.close();
    return;
  }
  try {
    const t = planned.get(m.name);
    if (!t) throw new Error(`tensor "${m.name}" is not in the worker's plan`);
    port.postMessage({ name: m.name, check: checkTensor(t, merged!, plan.method.kind, models, seed, samples, plan) } satisfies VerifyWorkerReply);
  } catch (e) {
    const code = e instanceof DellaError ? e.code : null;
    port.postMessage({ name: m.name, error: { code, message: e instanceof Error ? e.message : String(e) } } satisfies VerifyWorkerReply);
  }
});
