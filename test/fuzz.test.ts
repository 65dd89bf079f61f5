/**
 * Property-based tests: the safetensors header parser and the recipe parser, fed random
 * and mutated inputs, either accept them or throw a DellaError with a message naming
 * the file — never another exception, never a hang.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { DellaError } from '../lib/errors.js';
import { encodeHeader, parseHeader, readHeaderLength } from '../lib/checkpoint/safetensors.js';
import { parseRecipe } from '../lib/recipe/index.js';

const runs = Number(process.env.DELLA_FUZZ_RUNS ?? 300);

function parseFile(bytes: Uint8Array): void {
  const n = readHeaderLength(bytes.subarray(0, 8), bytes.length, 'f.safetensors');
  parseHeader(bytes.subarray(8, 8 + n), n, bytes.length, 'f.safetensors');
}

function cleanly(fn: () => void): void {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(DellaError);
    expect((e as DellaError).message.length).toBeGreaterThan(0);
  }
}

const tensorArb = fc.record({
  name: fc.string({ minLength: 1, maxLength: 12 }),
  dtype: fc.constantFrom('F32', 'F16', 'BF16', 'I64', 'U8', 'BOOL', 'F64'),
  shape: fc.array(fc.integer({ min: 0, max: 6 }), { maxLength: 3 }),
});

/** A valid file from random tensors (unique names), for mutation. */
function validFile(tensors: Array<{ name: string; dtype: string; shape: number[] }>): Uint8Array {
  const size: Record<string, number> = { F32: 4, F16: 2, BF16: 2, I64: 8, U8: 1, BOOL: 1, F64: 8 };
  const seen = new Set<string>();
  let off = 0;
  const placed = tensors.filter((t) => !seen.has(t.name) && t.name !== '__metadata__' && seen.add(t.name)).map((t) => {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * size[t.dtype];
    const p = { ...t, begin: off, end: off + bytes };
    off += bytes;
    return p;
  });
  const header = encodeHeader(placed, { format: 'pt' });
  const file = new Uint8Array(header.length + off);
  file.set(header);
  return file;
}

describe('safetensors header parser under fuzzing', () => {
  it('accepts every file it encodes', () => {
    fc.assert(fc.property(fc.array(tensorArb, { maxLength: 8 }), (ts) => {
      parseFile(validFile(ts));
    }), { numRuns: runs });
  });

  it('random bytes: a clean error or a valid parse', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 256 }), (bytes) => cleanly(() => parseFile(bytes))), { numRuns: runs });
  });

  it('mutated valid files: a clean error or a valid parse', () => {
    fc.assert(fc.property(
      fc.array(tensorArb, { minLength: 1, maxLength: 6 }),
      fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 }),
      fc.nat(),
      (ts, edits, cut) => {
        const file = validFile(ts);
        for (const [pos, value] of edits) file[pos % file.length] = value;
        const truncated = cut % 3 === 0 ? file.subarray(0, cut % (file.length + 1)) : file;
        cleanly(() => parseFile(truncated));
      },
    ), { numRuns: runs });
  });

  it('random JSON headers: a clean error or a valid parse', () => {
    fc.assert(fc.property(fc.json(), (json) => {
      const bytes = new TextEncoder().encode(json);
      const file = new Uint8Array(8 + bytes.length);
      new DataView(file.buffer).setBigUint64(0, BigInt(bytes.length), true);
      file.set(bytes, 8);
      cleanly(() => parseFile(file));
    }), { numRuns: runs });
  });
});

describe('recipe parser under fuzzing', () => {
  const opts = { resolvePath: (m: string) => `/models/${m}` };
  const valid = `merge_method: della
base_model: base
models:
  - model: a
    parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}
  - model: b
    parameters:
      density: [0.3, 0.6]
      weight: [{filter: mlp, value: 0.5}, {value: 1}]
parameters: {lambda: 1.1, normalize: true}
dtype: bfloat16
seed: 3
`;

  it('the seed recipe parses', () => {
    expect(parseRecipe(valid, opts).models.length).toBe(2);
  });

  it('random text: a clean error or a recipe', () => {
    fc.assert(fc.property(fc.string({ maxLength: 200 }), (text) => cleanly(() => { parseRecipe(text, opts); })), { numRuns: runs });
  });

  it('random JSON documents: a clean error or a recipe', () => {
    fc.assert(fc.property(fc.jsonValue(), (doc) => cleanly(() => { parseRecipe(JSON.stringify(doc), opts); })), { numRuns: runs });
  });

  it('mutated valid recipes: a clean error or a recipe', () => {
    fc.assert(fc.property(
      fc.array(fc.tuple(fc.nat(), fc.constantFrom(' ', ':', '-', '[', '{', '0', 'x', '\n', '"', '.', '1e999', 'null', '-1')), { minLength: 1, maxLength: 6 }),
      (edits) => {
        let text = valid;
        for (const [pos, s] of edits) {
          const p = pos % text.length;
          text = text.slice(0, p) + s + text.slice(p + 1);
        }
        cleanly(() => { parseRecipe(text, opts); });
      },
    ), { numRuns: runs });
  });

  it('random parameter values in the right places: a clean error or a recipe', () => {
    fc.assert(fc.property(fc.dictionary(fc.constantFrom('weight', 'density', 'epsilon', 'gamma', 'lambda', 'drop_rate', 'window_size', 'rescale', 'consensus', 'normalize', 't', 'x'), fc.jsonValue()), (params) => {
      const doc = { merge_method: 'della', base_model: 'b', models: [{ model: 'a', parameters: params }], parameters: params };
      cleanly(() => { parseRecipe(JSON.stringify(doc), opts); });
    }), { numRuns: runs });
  });
});
