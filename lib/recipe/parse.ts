/**
 * Recipe text -> validated Recipe (SPEC §7). Every problem is a DellaError('E_RECIPE')
 * raised here, before any tensor is read, naming the model, parameter and value.
 */
import { lstatSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import * as path from 'node:path';
import { parseDocument } from 'yaml';
import { DellaError } from '../errors.js';
import { jsonForMessage } from '../util/show.js';
import { checkOptions } from '../util/options.js';
import { METHODS, type MethodSpec } from '../merge/methods.js';
import { resolveHubId } from './hub.js';
import {
  ALIASES,
  aliasOf,
  DEFAULTS,
  GLOBAL_ONLY_PARAMS,
  NUMERIC_PARAMS,
  PER_MODEL_PARAMS,
  densityEpsilonProblem,
  didYouMean,
  fmt,
  nearest,
  recipeError,
} from './params.js';
import type { OutDType, ParamScalar, ParamValue, ParseOptions, Recipe, RecipeModel } from './types.js';

const TOP_LEVEL_KEYS = [
  'models',
  'base_model',
  'merge_method',
  'parameters',
  'dtype',
  'out_dtype',
  'tokenizer_source',
  'tokenizer',
  'seed',
  'name',
] as const;

/** mergekit top-level keys della-merge has no use for, and why (an unknown key would be refused without it). */
const UNSUPPORTED_TOP_LEVEL: Readonly<Record<string, string>> = {
  slices: 'list the models under "models" (della-merge merges whole models)',
  modules: 'mergekit\'s per-module configurations; list the models under "models" (della-merge merges whole models)',
  chat_template: 'della-merge writes no chat template of its own: the tokenizer files, with any template in them, are copied from tokenizer_source or the base model; set a template in the output\'s tokenizer_config.json afterwards',
};

const DTYPE_NAMES: Readonly<Record<string, OutDType>> = {
  bfloat16: 'BF16', bf16: 'BF16',
  float16: 'F16', fp16: 'F16', half: 'F16', f16: 'F16',
  float32: 'F32', fp32: 'F32', float: 'F32', f32: 'F32',
  float64: 'F64', fp64: 'F64', double: 'F64', f64: 'F64',
};

type Dict = Record<string, unknown>;

function isDict(v: unknown): v is Dict {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function has(o: Dict, k: string): boolean {
  return Object.prototype.hasOwnProperty.call(o, k);
}

// ---------------------------------------------------------------- document

function parseText(text: string): { document: unknown; warnings: string[] } {
  const src = text.charCodeAt(0) === 0xfeff ? text.slice(1) : text;
  let jsonError: string | null = null;
  if (src.trimStart().startsWith('{')) {
    let document: unknown;
    try {
      document = JSON.parse(src);
    } catch (e) {
      // flow-style YAML also starts with '{': fall back, but keep JSON's more exact message
      jsonError = (e as Error).message;
    }
    if (jsonError === null) {
      const twice = duplicateJsonKey(src);
      if (twice !== null) {
        throw recipeError(`recipe is not valid: invalid JSON: key ${JSON.stringify(twice)} appears twice in one object (JSON.parse would keep the last silently)`);
      }
      return { document, warnings: [] };
    }
  }
  // merge: YAML 1.1's `<<: *anchor` merge keys, which mergekit's PyYAML reads.
  const doc = parseDocument(src, { prettyErrors: true, uniqueKeys: true, merge: true });
  if (doc.errors.length > 0) {
    const first = doc.errors[0];
    const msg = jsonError !== null ? `invalid JSON: ${jsonError}`
      : first.code === 'MULTIPLE_DOCS' ? 'a recipe file holds one YAML document, and this one holds several (separated by "---")'
      : `invalid YAML: ${first.message}`;
    throw recipeError(`recipe is not valid: ${msg.trim()}`);
  }
  const warnings = doc.warnings.map((w) => `YAML: ${w.message}`);
  let document: unknown;
  try {
    document = doc.toJS({ maxAliasCount: 1000 });
  } catch (e) {
    throw recipeError(`recipe is not valid YAML: ${(e as Error).message}`);
  }
  return { document, warnings };
}

/**
 * The first key written twice in one object of a valid JSON text, or null: YAML recipes
 * refuse duplicate keys, and a JSON recipe must not quietly mean something else. A scan,
 * not a recursive parse, so no nesting depth overflows it.
 */
function duplicateJsonKey(src: string): string | null {
  const open: Array<Set<string> | null> = []; // per container: an object's keys, or null for an array
  let keyNext = false;
  for (let i = 0; i < src.length; i++) {
    const c = src[i];
    if (c === '"') {
      let j = i + 1;
      while (src[j] !== '"') j += src[j] === '\\' ? 2 : 1;
      const keys = open[open.length - 1];
      if (keys && keyNext) {
        const key = JSON.parse(src.slice(i, j + 1)) as string;
        if (keys.has(key)) return key;
        keys.add(key);
      }
      keyNext = false;
      i = j;
    } else if (c === '{' || c === '[') {
      open.push(c === '{' ? new Set() : null);
      keyNext = c === '{';
    } else if (c === '}' || c === ']') {
      open.pop();
    } else if (c === ',') {
      keyNext = open[open.length - 1] instanceof Set;
    }
  }
  return null;
}

// ---------------------------------------------------------------- values

interface Ctx {
  /** 'model "x"' or 'global parameters' */
  where: string;
  /** the key as written (maybe an alias) */
  key: string;
  /** the canonical name */
  name: string;
}

function describe(ctx: Ctx, entry: string): string {
  const alias = aliasOf(ctx.key);
  const aliasNote = alias ? ` (${alias.relation})` : '';
  return `${ctx.where}: parameter "${ctx.key}"${aliasNote}${entry}`;
}

/** Checks one scalar and returns it in canonical form (alias converted, consensus spelled out). */
function checkScalar(ctx: Ctx, v: unknown, entry: string): ParamScalar {
  const bad = (rule: string): never => {
    throw recipeError(`${describe(ctx, entry)} must be ${rule}, got ${fmt(v)}`);
  };
  const finite = (): number => {
    if (typeof v !== 'number' || !Number.isFinite(v)) bad('a finite number');
    return v as number;
  };
  switch (ctx.key) {
    case 'weight':
    case 'lambda': {
      // The kernels use f32(value) (SPEC §5): beyond fp32's range it is infinite.
      const x = finite();
      if (!Number.isFinite(Math.fround(x))) bad('within float32 range (magnitude below 3.4e38)');
      return x;
    }
    case 'density': {
      const x = finite();
      if (!(x > 0 && x <= 1)) bad('in (0, 1]');
      return x;
    }
    case 'drop_rate': {
      const x = finite();
      if (!(x >= 0 && x < 1)) bad('in [0, 1)');
      return ALIASES.drop_rate.toTarget(x);
    }
    case 'epsilon': {
      const x = finite();
      if (!(x >= 0)) bad('>= 0');
      return x;
    }
    case 'window_size': {
      const x = finite();
      if (!(x >= 0)) bad('>= 0');
      return ALIASES.window_size.toTarget(x);
    }
    case 'gamma': {
      const x = finite();
      if (!(x >= 0 && x < 1)) bad('in [0, 1)');
      return x;
    }
    case 't': {
      const x = finite();
      if (!(x >= 0 && x <= 1)) bad('in [0, 1]');
      return x;
    }
    case 'normalize': {
      const b = pyBool(v);
      if (b === undefined) bad('true or false');
      return b as boolean;
    }
    case 'consensus':
      if (v === null || v === false) return 'none';
      if (v === 'sum' || v === 'count' || v === 'none') return v;
      return bad('"sum", "count" or "none"');
    case 'rescale':
      if (v === 'inverse' || v === 'none' || v === 'l1' || v === 'l2' || v === 'linf') return v;
      return pyBool(v) ?? bad('true, false, "inverse", "l1", "l2" or "linf"');
    default:
      // unreachable: names are checked before values
      throw recipeError(`${describe(ctx, entry)} is not a known parameter`);
  }
}

/**
 * A boolean as mergekit reads one: true or false; 1 or 0 (it stores its boolean
 * parameters as floats, and writes normalize: 1.0 when it saves a config); PyYAML's
 * YAML 1.1 words (yes, no, on, off, in its three spellings), which YAML 1.2 reads as
 * strings. Else undefined.
 */
function pyBool(v: unknown): boolean | undefined {
  if (typeof v === 'boolean') return v;
  if (v === 1 || v === 0) return v === 1;
  if (typeof v === 'string' && /^(?:yes|Yes|YES|on|On|ON|true|True|TRUE)$/.test(v)) return true;
  if (typeof v === 'string' && /^(?:no|No|NO|off|Off|OFF|false|False|FALSE)$/.test(v)) return false;
  return undefined;
}

function checkGradient(ctx: Ctx, list: unknown[], entry: string): number[] {
  if (!NUMERIC_PARAMS.includes(ctx.name)) {
    throw recipeError(`${describe(ctx, entry)} cannot be a gradient (a list of numbers); it takes one value, got ${fmt(list)}`);
  }
  if (list.length === 0) throw recipeError(`${describe(ctx, entry)} is an empty gradient; give at least one number`);
  return list.map((x, i) => checkScalar(ctx, x, `${entry} (gradient entry ${i + 1})`) as number);
}

function checkValue(ctx: Ctx, raw: unknown): ParamValue {
  if (Array.isArray(raw)) {
    if (raw.length === 0) {
      throw recipeError(`${describe(ctx, '')} is an empty list; give a value, a gradient or a list of {filter, value} entries`);
    }
    if (!raw.some(isDict)) return checkGradient(ctx, raw, '');
    return raw.map((e, i) => {
      const entry = ` (filter entry ${i + 1})`;
      if (!isDict(e)) {
        throw recipeError(`${describe(ctx, entry)} must be a {filter, value} object like the other entries, got ${fmt(e)}`);
      }
      for (const k of Object.keys(e)) {
        if (k !== 'filter' && k !== 'value') {
          throw recipeError(`${describe(ctx, entry)} has unknown key "${k}"${didYouMean(k, ['filter', 'value'])}`);
        }
      }
      if (!has(e, 'value')) throw recipeError(`${describe(ctx, entry)} has no "value"`);
      let filter: string | undefined;
      if (e.filter !== undefined && e.filter !== null) {
        if (typeof e.filter !== 'string') {
          throw recipeError(`${describe(ctx, entry)} has a filter that is not a string: ${fmt(e.filter)}`);
        }
        filter = e.filter;
      }
      const v = e.value;
      let value: ParamScalar | number[];
      if (Array.isArray(v)) value = checkGradient(ctx, v, entry);
      else if (isDict(v)) {
        throw recipeError(`${describe(ctx, entry)} value must be a scalar or a gradient (list of numbers), got ${fmt(v)}`);
      } else value = checkScalar(ctx, v, entry);
      return filter === undefined ? { value } : { filter, value };
    });
  }
  if (isDict(raw)) {
    throw recipeError(
      `${describe(ctx, '')} must be a scalar, a gradient (list of numbers) or a list of {filter, value} entries, got ${fmt(raw)}`,
    );
  }
  return checkScalar(ctx, raw, '');
}

/**
 * Validates one parameter value as a recipe would give it (alias rewritten), without a
 * method: for callers that build parameters outside a recipe file.
 */
export function validateParam(name: string, value: unknown, where = 'parameters'): ParamValue {
  const alias = aliasOf(name);
  const canonical = alias ? alias.target : name;
  if (!ALL_PARAM_NAMES.includes(name) || canonical === 'int8_mask') {
    throw recipeError(`${where}: unknown parameter "${name}"${didYouMean(name, ALL_PARAM_NAMES)}`);
  }
  return checkValue({ where, key: name, name: canonical }, value);
}

// ---------------------------------------------------------------- sections

const ALL_PARAM_NAMES = [...PER_MODEL_PARAMS, ...GLOBAL_ONLY_PARAMS, ...Object.keys(ALIASES)];

function usable(method: MethodSpec, scope: 'model' | 'global'): string[] {
  const names = [...method.modelParams, ...(scope === 'global' ? [...method.globalParams, 'int8_mask'] : [])];
  for (const [alias, a] of Object.entries(ALIASES)) if (names.includes(a.target)) names.push(alias);
  return names;
}

function parseSection(
  raw: unknown,
  where: string,
  scope: 'model' | 'global',
  method: MethodSpec,
  warnings: string[],
): Record<string, ParamValue> {
  if (raw === undefined || raw === null) return {};
  if (!isDict(raw)) throw recipeError(`${where}: parameters must be a mapping of name: value, got ${fmt(raw)}`);
  const out: Record<string, ParamValue> = {};
  const from: Record<string, string> = {};
  const valid = usable(method, scope);
  for (const [key, value] of Object.entries(raw)) {
    const alias = aliasOf(key);
    const name = alias ? alias.target : key;
    if (!ALL_PARAM_NAMES.includes(key) && (TOP_LEVEL_KEYS as readonly string[]).includes(key)) {
      throw recipeError(`${where}: "${key}" is a top-level key, not a parameter: move it out of "parameters:"`);
    }
    if (!ALL_PARAM_NAMES.includes(key)) {
      // prefer a name valid here; a known name elsewhere only when strictly closer
      const a = nearest(key, valid);
      const b = nearest(key, ALL_PARAM_NAMES);
      const pick = b && (!a || b.distance < a.distance) ? b : a;
      const hint = pick ? ` (did you mean "${pick.name}"?)` : '';
      throw recipeError(`${where}: unknown parameter "${key}"${hint}`);
    }
    if (scope === 'model' && GLOBAL_ONLY_PARAMS.includes(name)) {
      throw recipeError(`${where}: parameter "${key}" is global-only; set it in the top-level parameters, not per model`);
    }
    if (name === 'int8_mask') {
      warnings.push(`parameter "int8_mask" has no effect in della-merge (a mergekit memory option); ignored`);
      continue;
    }
    if (!valid.includes(key)) {
      throw recipeError(`${where}: parameter "${key}" is not used by merge_method "${method.name}"`);
    }
    if (has(from, name)) {
      throw recipeError(`${where}: both "${from[name]}" and "${key}" are given; they set the same parameter (${name}), give only one`);
    }
    from[name] = key;
    out[name] = checkValue({ where, key, name }, value);
  }
  return out;
}

// ---------------------------------------------------------------- top level

const LORA_ADVICE = 'merge the adapter into its model first (e.g. with peft\'s merge_and_unload) and name that directory';

function modelString(raw: unknown, what: string): string {
  if (typeof raw === 'string') {
    if (raw.trim() === '') throw recipeError(`${what} is an empty string`);
    return raw;
  }
  if (isDict(raw)) {
    for (const k of Object.keys(raw)) {
      if (k === 'lora') throw recipeError(`${what} names a LoRA adapter ("lora"), which della-merge does not apply: ${LORA_ADVICE}`);
      if (k !== 'model') throw recipeError(`${what} has unknown key "${k}"${didYouMean(k, ['model'])}`);
    }
    if (!has(raw, 'model')) throw recipeError(`${what} has no "model"`);
    return modelString(raw.model, what);
  }
  throw recipeError(`${what} must be a model path (string), got ${fmt(raw)}`);
}

/**
 * The tokenizer source and the key it was given as: tokenizer_source, or mergekit's newer form
 * `tokenizer: {source: ...}` (the same choice; its other keys build a new vocabulary,
 * which della-merge does not).
 */
function tokenizerSourceOf(doc: Dict): { source: unknown; key: string } {
  if (doc.tokenizer === undefined || doc.tokenizer === null) return { source: doc.tokenizer_source, key: 'tokenizer_source' };
  if (doc.tokenizer_source !== undefined && doc.tokenizer_source !== null) {
    throw recipeError('give the tokenizer source once: "tokenizer_source" or "tokenizer: {source: ...}", not both');
  }
  if (!isDict(doc.tokenizer)) throw recipeError(`tokenizer must be a mapping {source: ...}, got ${fmt(doc.tokenizer)}`);
  for (const k of Object.keys(doc.tokenizer)) {
    if (k !== 'source') {
      throw recipeError(`tokenizer.${k} is not supported: della-merge copies one model's tokenizer files (tokenizer: {source: ...}) and builds no vocabulary; the models' vocabularies must match`);
    }
  }
  return { source: doc.tokenizer.source, key: 'tokenizer.source' };
}

function parseDtype(raw: unknown, key: string): OutDType | null {
  if (raw === undefined || raw === null) return null;
  // mergekit takes torch's names too ("torch.bfloat16")
  const name = typeof raw === 'string' ? raw.toLowerCase().replace(/^torch\./, '') : '';
  const t = has(DTYPE_NAMES, name) ? DTYPE_NAMES[name] : undefined;
  if (t === undefined) {
    throw recipeError(`${key} ${fmt(raw)} is not a supported dtype; use one of ${Object.keys(DTYPE_NAMES).join(', ')}`);
  }
  return t;
}

function parseSeed(raw: unknown): number {
  if (raw === undefined || raw === null) return 0;
  if (typeof raw !== 'number' || !Number.isSafeInteger(raw) || raw < 0) {
    throw recipeError(`seed must be an integer in [0, 2^53), got ${fmt(raw)}`);
  }
  return raw;
}

function parseMethod(raw: unknown): MethodSpec {
  if (raw === undefined || raw === null) {
    throw recipeError(`merge_method is missing; use one of ${Object.keys(METHODS).join(', ')}`);
  }
  if (typeof raw !== 'string') throw recipeError(`merge_method must be a string, got ${fmt(raw)}`);
  if (!has(METHODS as Dict, raw)) {
    throw recipeError(`unknown merge_method "${raw}"${didYouMean(raw, Object.keys(METHODS))}; known: ${Object.keys(METHODS).join(', ')}`);
  }
  return METHODS[raw];
}

type Found = { param: ParamValue; level: 'per model' | 'global' } | { param: number; level: 'default' };

function effective(own: Record<string, ParamValue>, global: Record<string, ParamValue>, name: 'density' | 'epsilon'): Found {
  if (has(own, name)) return { param: own[name], level: 'per model' };
  if (has(global, name)) return { param: global[name], level: 'global' };
  return { param: DEFAULTS[name], level: 'default' };
}

/** A Recipe as parseRecipe and loadRecipe make it, told apart from a recipe document
 * (mergekit's snake_case keys) that happens to carry such keys too. */
export function isParsedRecipe(v: unknown): v is Recipe {
  if (v === null || typeof v !== 'object') return false;
  const r = v as Partial<Recipe> & Record<string, unknown>;
  return typeof r.mergeMethod === 'string' && typeof r.baseModel?.path === 'string' && Array.isArray(r.models) &&
    (r.warnings === undefined || Array.isArray(r.warnings)) && !('merge_method' in r) && !('base_model' in r);
}

/**
 * What keeps an object that looks like a parsed Recipe (its camelCase keys, none of a
 * document's) from being one, or null. Without it a Recipe with a field set wrong was
 * read as a recipe document, and refused for keys a document does not have.
 */
export function brokenRecipeProblem(v: unknown): string | null {
  if (v === null || typeof v !== 'object' || Array.isArray(v) || isParsedRecipe(v)) return null;
  const r = v as Record<string, unknown>;
  // A parsed Recipe's own fields (document, warnings) tell it from a document written in
  // camelCase by mistake, which is refused as a document ("did you mean merge_method").
  if (!('mergeMethod' in r || 'baseModel' in r) || !('document' in r || 'warnings' in r) || 'merge_method' in r || 'base_model' in r) return null;
  const base = r.baseModel as { path?: unknown } | null | undefined;
  const bad = typeof r.mergeMethod !== 'string' ? ['mergeMethod', 'a method name string', r.mergeMethod]
    : base === null || typeof base !== 'object' || typeof base.path !== 'string' ? ['baseModel', 'an object with a path string', r.baseModel]
    : !Array.isArray(r.models) ? ['models', 'an array', r.models]
    : ['warnings', 'an array of strings', r.warnings];
  return `the Recipe object's ${bad[0]} must be ${bad[1]}, got ${fmt(bad[2])} (a Recipe from loadRecipe or parseRecipe may be changed, but keeps its fields' kinds)`;
}

/** For functions that take a parsed Recipe: a path or a document is a clear error. */
export function expectRecipe(v: unknown, where: string): Recipe {
  if (isParsedRecipe(v)) return checkedRecipe(v);
  const broken = brokenRecipeProblem(v);
  if (broken) throw new DellaError('E_ARGS', `${where}: ${broken}`);
  throw new DellaError('E_ARGS', `${where} takes a parsed Recipe (from loadRecipe(path) or parseRecipe(text)), got ${typeof v === 'string' ? `the string ${JSON.stringify(v)}` : fmt(v)}`);
}

/** The fields of a Recipe that say what a merge does. */
const recipeFields = (r: Recipe) =>
  jsonForMessage([r.mergeMethod, r.baseModel, r.models, r.parameters, r.dtype, r.outDtype, r.tokenizerSource, r.seed]);

/** What parseRecipe made of each document: a Recipe (or a copy of one) whose fields
 * still match is unchanged, and used as it is. */
const parsedFields = new WeakMap<object, string>();

/**
 * A Recipe object given to the API, checked as a recipe file is. The API exports the
 * type, so one may be changed after parsing or built by hand, and a wrong value would
 * otherwise reach the kernels (a TypeError, or a density of 5 merged as given). One
 * whose fields are what parseRecipe made of its document is returned as it is; any
 * other is parsed again from its fields, and the re-parsed one is returned, with a
 * document (recorded beside the output) that says what runs.
 */
export function checkedRecipe(r: Recipe): Recipe {
  const doc = r.document;
  if (doc !== null && typeof doc === 'object' && parsedFields.get(doc) === recipeFields(r)) return Array.isArray(r.warnings) ? r : { ...r, warnings: [] };
  const models: unknown = Array.isArray(r.models)
    ? r.models.map((m) => (isDict(m) ? { model: m.model, parameters: m.parameters ?? {} } : m))
    : r.models;
  const document: Record<string, unknown> = { merge_method: r.mergeMethod, base_model: r.baseModel.model, models };
  if (r.parameters !== undefined) document.parameters = r.parameters;
  if (r.dtype !== null && r.dtype !== undefined) document.dtype = r.dtype;
  if (r.outDtype !== null && r.outDtype !== undefined) document.out_dtype = r.outDtype;
  const names = Array.isArray(r.models) ? r.models.map((m) => (isDict(m) ? m.model : m)) : [];
  const written = isDict(doc) && Array.isArray(doc.models) ? doc.models.map((e) => (isDict(e) ? e.model : e)) : [];
  const tok = r.tokenizerSource;
  // A tokenizer_source naming the base as the document listed it among the models (which
  // Recipe.models leaves out) is the base.
  const listedBase = typeof tok === 'string' && tok !== r.baseModel.model && !names.includes(tok) && written.includes(tok);
  if (tok !== null && tok !== undefined) document.tokenizer_source = listedBase ? 'base' : tok;
  if (r.seed !== undefined) document.seed = r.seed;
  // Model strings keep the locations they were resolved to.
  const paths = new Map<unknown, string>([[r.baseModel.model, r.baseModel.path]]);
  if (Array.isArray(r.models)) for (const m of r.models) if (isDict(m) && typeof m.path === 'string') paths.set(m.model, m.path);
  const again = recipeFromDocument(document, [], { source: r.source ?? undefined, resolvePath: (m: string) => paths.get(m) ?? m });
  // Its file no longer says what runs: the record is the document above.
  return { ...again, source: null, warnings: [...new Set([...(Array.isArray(r.warnings) ? r.warnings : []), ...again.warnings])] };
}

export function parseRecipe(text: string, options: ParseOptions = {}): Recipe {
  if (typeof text !== 'string') throw new DellaError('E_ARGS', `parseRecipe(text) takes the recipe's YAML or JSON text, got ${fmt(text)}`);
  checkOptions(options, 'parseRecipe(text, options)', { source: 'string', resolvePath: 'function' });
  const { document, warnings } = parseText(text);
  return recipeFromDocument(document, warnings, options);
}

/** A recipe document (YAML's or JSON's data) checked and resolved. */
function recipeFromDocument(document: unknown, warnings: string[], options: ParseOptions): Recipe {
  const resolvePath = options.resolvePath ?? ((m: string) => m);
  if (!isDict(document)) {
    throw recipeError(`a recipe must be a mapping with models, base_model and merge_method, got ${fmt(document)}`);
  }
  const doc = document;

  for (const key of Object.keys(doc)) {
    if (has(UNSUPPORTED_TOP_LEVEL, key)) throw recipeError(`"${key}" is not supported: ${UNSUPPORTED_TOP_LEVEL[key]}`);
    if (ALL_PARAM_NAMES.includes(key)) {
      throw recipeError(`"${key}" is a parameter, not a top-level key: put it under "parameters:" (or a model's "parameters:")`);
    }
    if (!(TOP_LEVEL_KEYS as readonly string[]).includes(key)) {
      throw recipeError(`unknown key "${key}" at the top level${didYouMean(key, TOP_LEVEL_KEYS)}`);
    }
  }

  const method = parseMethod(doc.merge_method);

  if (!Array.isArray(doc.models) || doc.models.length === 0) {
    throw recipeError(`models must be a non-empty list of {model, parameters} entries, got ${fmt(doc.models)}`);
  }
  const noBase = doc.base_model === undefined || doc.base_model === null;
  if (noBase && method.kind !== 'linear') {
    throw recipeError(`base_model is missing: merge_method "${method.name}" ${method.kind === 'slerp' ? 'interpolates from the base model (t = 0) to the other model' : 'merges deltas from a base model'}`);
  }
  // linear needs no base: the first model then supplies tensor names and copied tensors
  const entries = doc.models as unknown[];
  const firstModel = (): string => {
    const e = entries[0];
    return modelString(isDict(e) ? e.model : e, 'models[0]');
  };
  const baseName = noBase ? firstModel() : modelString(doc.base_model, 'base_model');
  const baseModel = { model: baseName, path: resolvePath(baseName) };

  const globalParams = parseSection(doc.parameters, 'global parameters', 'global', method, warnings);

  const models: RecipeModel[] = [];
  const listed: string[] = [];
  doc.models.forEach((entry: unknown, i: number) => {
    const what = `models[${i}]`;
    let name: string;
    let rawParams: unknown;
    if (typeof entry === 'string') {
      name = modelString(entry, what);
    } else if (isDict(entry)) {
      for (const k of Object.keys(entry)) {
        if (k !== 'model' && k !== 'parameters') {
          throw recipeError(`${what}: unknown key "${k}"${didYouMean(k, ['model', 'parameters'])}`);
        }
      }
      if (!has(entry, 'model')) throw recipeError(`${what} has no "model"`);
      name = modelString(entry.model, `${what}.model`);
      rawParams = entry.parameters;
    } else {
      throw recipeError(`${what} must be {model, parameters} or a model path, got ${fmt(entry)}`);
    }
    listed.push(name);
    const resolved = resolvePath(name);
    if (method.kind !== 'linear' && (name === baseName || resolved === baseModel.path)) {
      // mergekit lets the base appear among models; it is not an expert
      if (isDict(rawParams) && Object.keys(rawParams).length > 0) {
        warnings.push(`${what} ("${name}") is the base model; its parameters are ignored`);
      }
      return;
    }
    const parameters = parseSection(rawParams, `model "${name}"`, 'model', method, warnings);
    models.push({ model: name, path: resolved, parameters });
  });
  if (models.length === 0) {
    throw recipeError(`models lists no expert besides the base model "${baseName}"`);
  }
  if (method.kind === 'slerp') {
    if (models.length !== 1) {
      throw recipeError(`slerp interpolates between two models: the base model and one other, but models lists ${models.length} besides the base (${models.map((m) => `"${m.model}"`).join(', ')})`);
    }
    if (!has(globalParams, 't')) throw recipeError('slerp needs the global parameter "t" (0 gives the base model, 1 the other)');
  }
  if (method.sparsifier === 'magnitude' || method.sparsifier === 'breadcrumbs') {
    const r = globalParams.rescale;
    const values = Array.isArray(r) ? r.map((e) => (typeof e === 'object' ? e.value : e)) : [r];
    if (values.includes('inverse')) {
      throw recipeError(`global parameters: rescale "inverse" (1/(1 - p)) needs a keep probability, which merge_method "${method.name}" does not have; use true (l1), "l1", "l2", "linf" or false`);
    }
  }

  if (method.sparsifier === 'magprune') {
    for (const m of models) {
      const d = effective(m.parameters, globalParams, 'density');
      const e = effective(m.parameters, globalParams, 'epsilon');
      // lists depend on the tensor: resolveTensorParams checks those
      if (typeof d.param !== 'number' || typeof e.param !== 'number') continue;
      const problem = densityEpsilonProblem(d.param, e.param);
      if (problem) {
        throw recipeError(`model "${m.model}": ${problem} (density ${d.level}, epsilon ${e.level})`);
      }
    }
  }

  const { source: tok, key: tokKey } = tokenizerSourceOf(doc);
  let tokenizerSource: string | null = null;
  if (tok !== undefined && tok !== null) {
    if (typeof tok !== 'string' || (tok !== 'base' && tok !== baseName && !listed.includes(tok))) {
      const union = tok === 'union' ? ' ("union", mergekit\'s merged vocabulary, is not supported: the models\' vocabularies must match)' : '';
      throw recipeError(
        `${tokKey} ${fmt(tok)} must be "base" or one of the models as written: ${[baseName, ...listed.filter((n) => n !== baseName)].map((n) => `"${n}"`).join(', ')}${union}`,
      );
    }
    tokenizerSource = tok;
  }

  const recipe: Recipe = {
    source: options.source ?? null,
    mergeMethod: method.name,
    baseModel,
    models,
    parameters: globalParams,
    dtype: parseDtype(doc.dtype, 'dtype'),
    outDtype: parseDtype(doc.out_dtype, 'out_dtype'),
    tokenizerSource,
    seed: parseSeed(doc.seed),
    warnings,
    document,
  };
  parsedFields.set(doc, recipeFields(recipe));
  return recipe;
}

// ---------------------------------------------------------------- files

/** mergekit resolves against the working directory; the recipe's own directory is a fallback. */
export function makeResolver(recipeFile: string, cwd: string): (model: string) => string {
  const recipeDir = path.dirname(recipeFile);
  // There, even if it cannot be read (a link loop, no permission): opening it says why.
  const present = (p: string) => {
    try {
      lstatSync(p);
      return true;
    } catch {
      return false;
    }
  };
  return (model) => {
    if (path.isAbsolute(model)) {
      if (present(model)) return model;
      throw recipeError(`model "${model}" not found: ${model} does not exist`);
    }
    const inCwd = path.resolve(cwd, model);
    if (present(inCwd)) return inCwd;
    const inRecipeDir = path.resolve(recipeDir, model);
    if (present(inRecipeDir)) return inRecipeDir;
    const looked =
      inCwd === inRecipeDir
        ? `${inCwd} does not exist`
        : `neither ${inCwd} (working directory) nor ${inRecipeDir} (recipe directory) exists`;
    const hub = resolveHubId(model);
    if (hub && 'path' in hub) return hub.path;
    // mergekit's "model+lora" names a model and a LoRA adapter to apply to it
    const plus = model.indexOf('+');
    const lora = plus > 0 && plus < model.length - 1
      ? `. If "+${model.slice(plus + 1)}" names a LoRA adapter (mergekit's model+lora), della-merge does not apply adapters: ${LORA_ADVICE}`
      : '';
    // mergekit drops a revision from a local directory's name; here that is said, not done
    const at = model.lastIndexOf('@');
    const local = at > 0 ? [cwd, recipeDir].map((d) => path.resolve(d, model.slice(0, at))).find(present) : undefined;
    if (local !== undefined) {
      throw recipeError(`model "${model}" not found: ${looked}; ${local} exists, but a local directory has no revisions: name it without "@${model.slice(at + 1)}"`);
    }
    if (hub) {
      throw recipeError(
        `model "${model}" is not a local path and not in the Hugging Face cache (della-merge never downloads): ` +
          `looked for ${[inCwd, inRecipeDir].filter((p, i, a) => a.indexOf(p) === i).join(', ')} and ${hub.looked.join(', ')}. ` +
          `Download it first (e.g. "huggingface-cli download ${model.split('@')[0]}${model.includes('@') ? ` --revision ${model.slice(model.indexOf('@') + 1)}` : ''}") or give a local path${lora}`,
      );
    }
    throw recipeError(`model "${model}" not found: ${looked}${lora}`);
  };
}

export async function loadRecipe(file: string, options: { cwd?: string } = {}): Promise<Recipe> {
  if (typeof file !== 'string' || file === '') throw new DellaError('E_ARGS', `loadRecipe(file) takes a recipe file path, got ${fmt(file)}`);
  checkOptions(options, 'loadRecipe(file, options)', { cwd: 'string' });
  const cwd = options.cwd ?? process.cwd();
  const source = path.resolve(cwd, file);
  let text: string;
  try {
    text = await readFile(source, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new DellaError('E_RECIPE', `cannot read recipe ${source}: ${code ?? (e as Error).message}`, { cause: e });
  }
  try {
    return parseRecipe(text, { source, resolvePath: makeResolver(source, cwd) });
  } catch (e) {
    if (e instanceof DellaError) throw new DellaError(e.code, `${source}: ${e.message}`, { cause: e.cause });
    throw e;
  }
}
