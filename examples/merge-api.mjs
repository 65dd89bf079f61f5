// The API from Node: merge a recipe with progress and cancellation, then read the
// result back with the checkpoint reader.
//   npx della-merge demo --out demo && node examples/merge-api.mjs
import { merge, openCheckpoint } from 'della-merge';

const controller = new AbortController();
process.once('SIGINT', () => controller.abort()); // Ctrl-C: no half-written output

const report = await merge('examples/della.yaml', {
  out: 'merged-api',
  overwrite: true,
  signal: controller.signal,
  onProgress: (e) => process.stderr.write(`\r${e.tensorsDone}/${e.tensorsTotal} tensors`),
});
process.stderr.write('\n');
console.log(`${report.method}: ${report.tensors.merged} tensors merged in ${report.seconds.toFixed(2)} s`);

const model = openCheckpoint('merged-api');
const name = 'model.layers.0.mlp.down_proj.weight';
const info = model.tensors.get(name);
const bits = model.array(name); // BF16 as raw Uint16Array bits, zero-copy
console.log(`${name}: ${info.dtype} [${info.shape}] first bits 0x${bits[0].toString(16)}`);
model.close();
