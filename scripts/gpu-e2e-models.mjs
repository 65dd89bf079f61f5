#!/usr/bin/env node
// Writes a Llama-shaped BF16 base model and three experts (random weights, never zeros,
// no NaN or infinity) plus recipes for della, dare_ties, ties and breadcrumbs with an l2
// rescale, for the end-to-end GPU check (scripts/gpu-check.sh).
//   node scripts/gpu-e2e-models.mjs DIR [--hidden 2048] [--layers 8] [--inter 5632] [--vocab 32000]
import { randomFillSync } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { saveModel } from '../dist/index.js';

const args = process.argv.slice(2);
const dir = resolve(args[0] ?? 'gpu-e2e');
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? Number(args[i + 1]) : dflt;
};
const H = opt('hidden', 2048), L = opt('layers', 8), I = opt('inter', 5632), V = opt('vocab', 32000);

const specs = [['model.embed_tokens.weight', [V, H]]];
for (let l = 0; l < L; l++) {
  const p = `model.layers.${l}.`;
  specs.push(
    [`${p}self_attn.q_proj.weight`, [H, H]], [`${p}self_attn.k_proj.weight`, [H / 4, H]],
    [`${p}self_attn.v_proj.weight`, [H / 4, H]], [`${p}self_attn.o_proj.weight`, [H, H]],
    [`${p}mlp.gate_proj.weight`, [I, H]], [`${p}mlp.up_proj.weight`, [I, H]], [`${p}mlp.down_proj.weight`, [H, I]],
    [`${p}input_layernorm.weight`, [H]], [`${p}post_attention_layernorm.weight`, [H]],
  );
}
specs.push(['model.norm.weight', [H]], ['lm_head.weight', [V, H]]);

// bf16 with a random sign, exponent 2^-12 .. 2^-5 and mantissa: finite and non-zero.
function baseTensor(numel) {
  const a = new Uint16Array(numel);
  randomFillSync(a);
  for (let i = 0; i < numel; i++) {
    const r = a[i];
    a[i] = (r & 0x807f) | ((0x73 + ((r >> 7) & 7)) << 7);
  }
  return a;
}
// An expert: the base with a random few mantissa bits changed (a small delta).
function expertTensor(base) {
  const noise = new Uint16Array(base.length);
  randomFillSync(noise);
  const a = new Uint16Array(base.length);
  for (let i = 0; i < base.length; i++) a[i] = base[i] ^ (noise[i] & 0x000f);
  return a;
}

const t0 = performance.now();
const bases = specs.map(([name, shape]) => ({ name, dtype: 'BF16', shape, data: baseTensor(shape.reduce((x, y) => x * y, 1)) }));
const params = bases.reduce((a, t) => a + t.data.length, 0);
saveModel(join(dir, 'base'), bases, { shardSize: 2e9 });
writeFileSync(join(dir, 'base', 'config.json'), '{"model_type": "llama"}\n');
const experts = [];
for (let k = 0; k < 3; k++) {
  const d = join(dir, `expert${k}`);
  mkdirSync(d, { recursive: true });
  saveModel(d, bases.map((t) => ({ ...t, data: expertTensor(t.data) })), { shardSize: 2e9 });
  experts.push(d);
}
const models = (params) => experts.map((m, k) => ({ model: m, parameters: { weight: 1 - 0.2 * k, ...params } }));
const recipes = {
  della: { merge_method: 'della', models: models({ density: 0.4, epsilon: 0.15 }), parameters: { lambda: 1.0 } },
  dare_ties: { merge_method: 'dare_ties', models: models({ density: 0.4 }) },
  ties: { merge_method: 'ties', models: models({ density: 0.4 }) },
  breadcrumbs_l2: { merge_method: 'breadcrumbs', models: models({ density: 0.6, gamma: 0.01 }), parameters: { rescale: 'l2' } },
};
for (const [name, r] of Object.entries(recipes)) {
  writeFileSync(join(dir, `${name}.json`), JSON.stringify({ base_model: join(dir, 'base'), dtype: 'bfloat16', seed: 11, ...r }, null, 2));
}
console.log(JSON.stringify({ dir, parameters: params, bytesPerModel: params * 2, seconds: (performance.now() - t0) / 1000, recipes: Object.keys(recipes) }));
