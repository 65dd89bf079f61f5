/**
 * A worker thread of verifyMerge: it opens the output and the recipe's models itself,
 * plans the merge as the main thread did, and checks the tensors it is sent (those whose
 * rows need passes over the whole tensor: most of a TIES verify's time), one at a time.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { DellaError } from '../errors.js';
import { openInput, type Checkpoint } from '../checkpoint/model.js';
import type { OpenedModels } from '../merge/build.js';
import { planMerge, type MergePlan } from '../merge/plan.js';
import type { Recipe } from '../recipe/index.js';
import { checkTensor, planFingerprint, type TensorCheck } from './verify.js';

export interface VerifyWorkerData {
  /** the files the main thread opened (resolved paths: the same files, whatever the working directory) */
  out: string;
  base: string;
  experts: string[];
  /** checked by the main thread (structured-cloned: a plain copy) */
  recipe: Recipe;
  /** of the main thread's plan: a worker whose plan differs checks nothing */
  fingerprint: string;
  seed: number;
  samples: number;
}

/** From the main thread: a tensor to check, or the end. */
export type VerifyWorkerRequest = { name: string } | { finish: true };

/** To the main thread: that the worker cannot check (the main thread then checks its tensors), a check, or the end. */
export type VerifyWorkerReply =
  | { unable: string }
  | { name: string; check: TensorCheck }
  | { name: string; error: { code: string | null; message: string } }
  | { changes: string[] };

const port = parentPort!;
const data = workerData as VerifyWorkerData;
const opened: Checkpoint[] = [];
let plan: MergePlan | null = null;
let models: OpenedModels | null = null;
try {
  const open = (path: string) => {
    const c = openInput(path);
    opened.push(c);
    return c;
  };
  open(data.out); // opened[0]
  models = { base: open(data.base), experts: data.experts.map(open), close: () => {} };
  plan = planMerge(data.recipe, models.base, models.experts);
  if (planFingerprint(plan) !== data.fingerprint) throw new Error('its plan differs from the main thread\'s');
} catch (e) {
  for (const c of opened) c.close();
  opened.length = 0;
  plan = null;
  port.postMessage({ unable: e instanceof Error ? e.message : String(e) } satisfies VerifyWorkerReply);
}
const planned = new Map((plan?.tensors ?? []).map((t) => [t.name, t]));

port.on('message', (m: VerifyWorkerRequest) => {
  if ('finish' in m) {
    // A file that changed while this worker read it: the main thread reports it.
    const changes = opened.map((c) => c.changed()).filter((c): c is string => c !== null);
    for (const c of opened) c.close();
    port.postMessage({ changes } satisfies VerifyWorkerReply);
    port.close();
    return;
  }
  try {
    const t = planned.get(m.name);
    if (!t || !plan || !models) throw new Error(`tensor "${m.name}" is not in the worker's plan`);
    port.postMessage({ name: m.name, check: checkTensor(t, opened[0], plan.method.kind, models, data.seed, data.samples, plan) } satisfies VerifyWorkerReply);
  } catch (e) {
    const code = e instanceof DellaError ? e.code : null;
    port.postMessage({ name: m.name, error: { code, message: e instanceof Error ? e.message : String(e) } } satisfies VerifyWorkerReply);
  }
});
