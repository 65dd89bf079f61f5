/**
 * The built-in demo: a small Llama-shaped base model (sharded, BF16, with config and
 * tokenizer files) and three experts fine-tuned from it in different places, written
 * to disk, with a DELLA recipe that merges them.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify as yamlStringify } from 'yaml';
import { saveModel, type InMemoryTensor } from './checkpoint/save.js';
import { ioError, isDellaError } from './errors.js';
import { f32ToBf16 } from './reference/dtypes.js';
import { makeDirs } from './util/fs.js';

export const DEMO_EXPERTS = ['math', 'code', 'chat'] as const;
/** The first words of the recipe the demo writes: how a rerun knows its own directory. */
export const DEMO_RECIPE_MARK = '# della-merge demo:';

export interface DemoModels {
  dir: string;
  baseDir: string;
  expertDirs: string[];
  recipeFile: string;
  parameters: number;
  layers: number;
}

const LAYERS = 4;
const HIDDEN = 256;
const FFN = 688;
const VOCAB = 1024;

function shapes(): Array<[string, number[]]> {
  const s: Array<[string, number[]]> = [['model.embed_tokens.weight', [VOCAB, HIDDEN]]];
  for (let l = 0; l < LAYERS; l++) {
    const p = `model.layers.${l}`;
    s.push(
      [`${p}.input_layernorm.weight`, [HIDDEN]],
      [`${p}.self_attn.q_proj.weight`, [HIDDEN, HIDDEN]],
      [`${p}.self_attn.k_proj.weight`, [HIDDEN, HIDDEN]],
      [`${p}.self_attn.v_proj.weight`, [HIDDEN, HIDDEN]],
      [`${p}.self_attn.o_proj.weight`, [HIDDEN, HIDDEN]],
      [`${p}.post_attention_layernorm.weight`, [HIDDEN]],
      [`${p}.mlp.gate_proj.weight`, [FFN, HIDDEN]],
      [`${p}.mlp.up_proj.weight`, [FFN, HIDDEN]],
      [`${p}.mlp.down_proj.weight`, [HIDDEN, FFN]],
    );
  }
  s.push(['model.norm.weight', [HIDDEN]], ['lm_head.weight', [VOCAB, HIDDEN]]);
  return s;
}

/** Deterministic normal-ish numbers (xorshift + sum of uniforms). */
function generator(seed: number): () => number {
  let x = seed >>> 0 || 1;
  const u = () => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x / 4294967296;
  };
  return () => u() + u() + u() - 1.5;
}

function bf16(values: Float32Array): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = f32ToBf16(values[i]);
  return out;
}

/** One file-system step; its failure (disk full, read-only, ...) is E_IO naming `what`, not a crash. */
function io<T>(what: string, step: () => T): T {
  try {
    return step();
  } catch (e) {
    throw isDellaError(e) ? e : ioError(what, e);
  }
}

function writeText(file: string, text: string): void {
  io(`cannot write ${file}`, () => writeFileSync(file, text));
}

export function writeDemoModels(dir: string): DemoModels {
  io(`cannot create ${dir}`, () => makeDirs(dir));
  const g = generator(20240617);
  const base = new Map<string, Float32Array>();
  let parameters = 0;
  for (const [name, shape] of shapes()) {
    const n = shape.reduce((a, b) => a * b, 1);
    const v = new Float32Array(n);
    const norm = name.endsWith('norm.weight');
    for (let i = 0; i < n; i++) v[i] = norm ? 1 + 0.05 * g() : 0.04 * g();
    base.set(name, v);
    parameters += n;
  }
  const modelTensors = (values: Map<string, Float32Array>): InMemoryTensor[] => [
    ...[...values].map(([name, v]) => ({ name, dtype: 'BF16', shape: shapes().find(([n]) => n === name)![1], data: bf16(v) })),
    // Integer buffers are copied from the base, never merged.
    { name: 'model.rotary_emb.position_ids', dtype: 'I64', shape: [1, 64], data: BigInt64Array.from({ length: 64 }, (_, i) => BigInt(i)) },
  ];
  const baseDir = join(dir, 'base');
  io(`cannot write the demo model ${baseDir}`, () => saveModel(baseDir, modelTensors(base), { shardSize: 4_000_000 }));
  writeText(join(baseDir, 'config.json'), `${JSON.stringify({
    architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: HIDDEN, intermediate_size: FFN,
    num_hidden_layers: LAYERS, num_attention_heads: 4, num_key_value_heads: 4, vocab_size: VOCAB,
    torch_dtype: 'bfloat16', tie_word_embeddings: false,
  }, null, 2)}\n`);
  writeText(join(baseDir, 'tokenizer_config.json'), `${JSON.stringify({ model_max_length: 2048, tokenizer_class: 'PreTrainedTokenizerFast' }, null, 2)}\n`);

  // Each expert moves every weight a little and its own "skill" rows (every third
  // row, offset by expert) a lot, the way fine-tunes concentrate their changes.
  const expertDirs = DEMO_EXPERTS.map((skill, k) => {
    const values = new Map<string, Float32Array>();
    for (const [name, v] of base) {
      const shape = shapes().find(([n]) => n === name)![1];
      const row = shape.length >= 2 ? shape[shape.length - 1] : v.length;
      const e = new Float32Array(v.length);
      for (let i = 0; i < v.length; i++) {
        const strong = Math.floor(i / row) % 3 === k;
        e[i] = v[i] + (strong ? 0.012 : 0.002) * g();
      }
      values.set(name, e);
    }
    const d = join(dir, `expert-${skill}`);
    io(`cannot write the demo model ${d}`, () => saveModel(d, modelTensors(values)));
    return d;
  });

  const recipe = {
    merge_method: 'della',
    base_model: baseDir,
    models: expertDirs.map((model) => ({ model, parameters: { weight: 1.0, density: 0.4, epsilon: 0.15 } })),
    parameters: { lambda: 1.0, normalize: true },
    dtype: 'bfloat16',
    seed: 42,
  };
  const recipeFile = join(dir, 'recipe.yaml');
  writeText(recipeFile, `${DEMO_RECIPE_MARK} DELLA over three experts of a small Llama-shaped model\n${yamlStringify(recipe)}`);
  return { dir, baseDir, expertDirs, recipeFile, parameters, layers: LAYERS };
}
