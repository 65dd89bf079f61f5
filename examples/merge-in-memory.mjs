// Merge tensors that are already in memory (here: random typed arrays) and receive the
// merged tensors as an async iterator: no files in, no files out.
//   node examples/merge-in-memory.mjs
import { mergeTensors } from 'della-merge';

const shape = [64, 256];
const numel = shape[0] * shape[1];
const f32 = (fill) => ({ dtype: 'F32', shape, data: Float32Array.from({ length: numel }, fill) });
const base = { 'model.layers.0.mlp.up_proj.weight': f32(() => Math.random() * 0.02 - 0.01) };
const expert = (k) => ({
  'model.layers.0.mlp.up_proj.weight': f32((_, i) => base['model.layers.0.mlp.up_proj.weight'].data[i] + (Math.random() - 0.5) * 0.002 * (k + 1)),
});

const recipe = {
  merge_method: 'della',
  models: [{ parameters: { weight: 1, density: 0.5, epsilon: 0.1 } }, { parameters: { weight: 1, density: 0.5, epsilon: 0.1 } }],
  parameters: { lambda: 1.0 },
  seed: 7,
};

for await (const t of mergeTensors(recipe, { base, models: [expert(0), expert(1)] })) {
  const merged = new Float32Array(t.data.buffer, t.data.byteOffset, t.data.length / 4);
  const kept = t.report.keptFraction.map((f) => `${(f * 100).toFixed(0)}%`).join(', ');
  console.log(`${t.name} ${t.dtype} [${t.shape}]: kept ${kept} of each delta; first value ${merged[0].toFixed(6)}`);
}
