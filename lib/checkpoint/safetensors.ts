/**
 * The safetensors container format (SPEC §8) as pure functions over bytes: reading and
 * validating a header, and encoding one for a file we write. No fs here so the rules can
 * be tested exhaustively and reused by the shard reader and writer alike.
 */
import { DellaError } from '../errors.js';
import { showShort as show } from '../util/show.js';

export const DTYPE_SIZES: Readonly<Record<string, number>> = Object.freeze({
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  U8: 1,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
  F8_E8M0: 1,
  C64: 8,
});

export const MERGEABLE_DTYPES: ReadonlySet<string> = new Set(['F32', 'F16', 'BF16', 'F64']);

export const MAX_HEADER_LENGTH = 100_000_000;

export interface TensorInfo {
  name: string;
  dtype: string;
  shape: number[];
  /** product of shape (1 for shape []) */
  numel: number;
  /** data_offsets[0], relative to the start of the data section */
  begin: number;
  /** data_offsets[1] */
  end: number;
}

export interface SafetensorsHeader {
  /** N, the JSON length from the 8-byte prefix */
  headerLength: number;
  /** 8 + N: where the data section starts in the file */
  dataOffset: number;
  /** sorted by begin */
  tensors: TensorInfo[];
  metadata: Record<string, string> | null;
}

const METADATA_KEY = '__metadata__';
const TENSOR_FIELDS = new Set(['dtype', 'shape', 'data_offsets']);

function fail(file: string, reason: string): never {
  throw new DellaError('E_CHECKPOINT', `${file}: ${reason}`);
}

function q(name: string): string {
  return JSON.stringify(name);
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function isSize(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Reads the 8-byte little-endian prefix. `prefix` holds at least the first 8 bytes of the
 * file (fewer -> truncated-file error). Validates: fileSize >= 8; N <= MAX_HEADER_LENGTH;
 * 8 + N <= fileSize. Returns N.
 */
export function readHeaderLength(prefix: Uint8Array, fileSize: number, file: string): number {
  if (fileSize < 8 || prefix.length < 8) {
    const have = Math.min(fileSize, prefix.length);
    fail(file, `file is truncated: ${have} bytes, but a safetensors file starts with an 8-byte header length`);
  }
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_LENGTH)) {
    fail(file, `header length ${n} exceeds the maximum of ${MAX_HEADER_LENGTH} bytes`);
  }
  const len = Number(n);
  if (8 + len > fileSize) {
    fail(file, `header length ${len} runs past the end of the file (${fileSize} bytes, so at most ${fileSize - 8})`);
  }
  return len;
}

interface Duplicate {
  key: string;
  /** the top-level key whose value holds the duplicate; null for the top level itself */
  owner: string | null;
}

/**
 * JSON.parse silently keeps the last of duplicate keys, so scan the (already valid) JSON
 * text for them: one linear pass that tracks only object nesting and key positions.
 */
function findDuplicateKey(s: string): Duplicate | null {
  const stack: Array<{ keys: Set<string> | null; owner: string | null }> = [];
  let expectKey = false;
  let lastTopKey: string | null = null;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x22 /* " */) {
      let j = i + 1;
      let hasEscape = false;
      for (;;) {
        const d = s.charCodeAt(j);
        if (d === 0x5c /* \ */) {
          hasEscape = true;
          j += 2;
        } else if (d === 0x22) {
          break;
        } else {
          j++;
        }
      }
      const top = stack[stack.length - 1];
      if (expectKey && top !== undefined && top.keys !== null) {
        // Escapes must be decoded: "a" and "\u0061" are the same key.
        const key: string = hasEscape ? (JSON.parse(s.slice(i, j + 1)) as string) : s.slice(i + 1, j);
        if (top.keys.has(key)) return { key, owner: top.owner };
        top.keys.add(key);
        if (stack.length === 1) lastTopKey = key;
        expectKey = false;
      }
      i = j;
      continue;
    }
    switch (c) {
      case 0x7b /* { */:
      case 0x5b /* [ */: {
        const owner = stack.length === 0 ? null : stack.length === 1 ? lastTopKey : stack[stack.length - 1].owner;
        stack.push({ keys: c === 0x7b ? new Set() : null, owner });
        expectKey = c === 0x7b;
        break;
      }
      case 0x7d /* } */:
      case 0x5d /* ] */:
        stack.pop();
        expectKey = false;
        break;
      case 0x2c /* , */: {
        const top = stack[stack.length - 1];
        expectKey = top !== undefined && top.keys !== null;
        break;
      }
      case 0x3a /* : */:
        expectKey = false;
        break;
      default:
        break;
    }
  }
  return null;
}

function parseMetadata(v: unknown, file: string): Record<string, string> {
  if (!isPlainObject(v)) fail(file, `"${METADATA_KEY}" must be an object of strings, got ${show(v)}`);
  for (const k of Object.keys(v)) {
    if (typeof v[k] !== 'string') {
      fail(file, `"${METADATA_KEY}" value for ${q(k)} must be a string, got ${show(v[k])}`);
    }
  }
  return v as Record<string, string>;
}

function parseTensor(name: string, v: unknown, dataSize: number, file: string): TensorInfo {
  const where = `tensor ${q(name)}`;
  if (!isPlainObject(v)) fail(file, `${where}: entry must be an object, got ${show(v)}`);
  for (const k of Object.keys(v)) {
    if (!TENSOR_FIELDS.has(k)) {
      fail(file, `${where}: unexpected field ${q(k)} (only dtype, shape and data_offsets are allowed)`);
    }
  }
  for (const k of TENSOR_FIELDS) {
    if (!Object.hasOwn(v, k)) fail(file, `${where}: missing field "${k}"`);
  }

  const dtype = v.dtype;
  if (typeof dtype !== 'string') fail(file, `${where}: dtype must be a string, got ${show(dtype)}`);
  if (!Object.hasOwn(DTYPE_SIZES, dtype)) {
    fail(file, `${where}: unknown dtype ${q(dtype)} (known: ${Object.keys(DTYPE_SIZES).join(', ')})`);
  }
  const size = DTYPE_SIZES[dtype];

  const rawShape = v.shape;
  if (!Array.isArray(rawShape)) fail(file, `${where}: shape must be an array, got ${show(rawShape)}`);
  const shape: number[] = new Array<number>(rawShape.length);
  let numel = 1;
  for (let d = 0; d < rawShape.length; d++) {
    const dim: unknown = rawShape[d];
    if (!isSize(dim)) {
      fail(file, `${where}: shape dimension ${d} must be a non-negative integer, got ${show(dim)}`);
    }
    shape[d] = dim + 0; // normalizes -0
    numel *= dim;
  }
  // Check after the loop: a zero dimension makes the product 0 wherever it appears.
  // Within the loop each partial product was exact until it first exceeded 2^53, and
  // rounding is monotonic, so an overflow is never hidden.
  if (numel > Number.MAX_SAFE_INTEGER || numel * size > Number.MAX_SAFE_INTEGER) {
    fail(file, `${where}: shape [${shape.join(', ')}] of ${dtype} is too large (byte size overflows)`);
  }

  const offs = v.data_offsets;
  if (!Array.isArray(offs) || offs.length !== 2) {
    fail(file, `${where}: data_offsets must be an array of 2 integers, got ${show(offs)}`);
  }
  const [b, e]: unknown[] = offs;
  if (!isSize(b) || !isSize(e)) {
    fail(file, `${where}: data_offsets must be non-negative integers, got ${show(offs)}`);
  }
  const begin = b + 0;
  const end = e + 0;
  if (begin > end) fail(file, `${where}: data_offsets [${begin}, ${end}] begin after they end`);
  if (end - begin !== numel * size) {
    fail(
      file,
      `${where}: data_offsets [${begin}, ${end}] hold ${end - begin} bytes but shape [${shape.join(', ')}] of ${dtype} needs ${numel * size}`,
    );
  }
  if (end > dataSize) {
    fail(
      file,
      `${where}: data_offsets [${begin}, ${end}] run past the end of the file (the data section holds ${dataSize} bytes)`,
    );
  }
  return { name, dtype, shape, numel, begin, end };
}

/** Parses and validates the JSON header. `json` = bytes [8, 8+N) of the file. */
export function parseHeader(
  json: Uint8Array,
  headerLength: number,
  fileSize: number,
  file: string,
): SafetensorsHeader {
  if (json.length !== headerLength) {
    fail(file, `header is truncated: read ${json.length} of ${headerLength} bytes`);
  }
  const dataOffset = 8 + headerLength;
  const dataSize = fileSize - dataOffset;
  if (dataSize < 0) {
    fail(file, `header length ${headerLength} runs past the end of the file (${fileSize} bytes)`);
  }

  let text: string;
  try {
    // ignoreBOM keeps a BOM in the text so JSON.parse rejects it, as other readers do.
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(json);
  } catch {
    fail(file, 'header is not valid UTF-8');
  }
  let root: unknown;
  try {
    root = JSON.parse(text);
  } catch (err) {
    fail(file, `header is not valid JSON (${(err as Error).message})`);
  }
  if (!isPlainObject(root)) {
    const kind = root === null ? 'null' : Array.isArray(root) ? 'an array' : `a ${typeof root}`;
    fail(file, `header must be a JSON object, got ${kind}`);
  }

  const dup = findDuplicateKey(text);
  if (dup !== null) {
    if (dup.owner === null) {
      fail(
        file,
        dup.key === METADATA_KEY
          ? `"${METADATA_KEY}" appears more than once in the header`
          : `duplicate tensor name ${q(dup.key)} in the header`,
      );
    }
    const inWhat = dup.owner === METADATA_KEY ? `"${METADATA_KEY}"` : `the entry for tensor ${q(dup.owner)}`;
    fail(file, `duplicate key ${q(dup.key)} in ${inWhat}`);
  }

  let metadata: Record<string, string> | null = null;
  const tensors: TensorInfo[] = [];
  for (const name of Object.keys(root)) {
    if (name === METADATA_KEY) {
      metadata = parseMetadata(root[name], file);
      continue;
    }
    if (name === '') fail(file, 'a tensor has an empty name');
    tensors.push(parseTensor(name, root[name], dataSize, file));
  }

  // Ties on begin put zero-size tensors first, so they only clash when truly inside another.
  tensors.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let pos = 0;
  let prev: TensorInfo | null = null;
  for (const t of tensors) {
    if (t.begin > pos) {
      fail(
        file,
        prev === null
          ? `gap of ${t.begin - pos} bytes at the start of the data section before tensor ${q(t.name)}`
          : `gap of ${t.begin - pos} bytes between tensor ${q(prev.name)} (ends at ${pos}) and tensor ${q(t.name)} (begins at ${t.begin})`,
      );
    }
    if (t.begin < pos && prev !== null) {
      fail(
        file,
        `tensor ${q(prev.name)} [${prev.begin}, ${prev.end}] overlaps tensor ${q(t.name)} [${t.begin}, ${t.end}]`,
      );
    }
    pos = t.end;
    prev = t;
  }
  if (pos !== dataSize) {
    // pos > dataSize cannot happen: parseTensor rejected every end past the data section.
    fail(
      file,
      prev === null
        ? `${dataSize} bytes of data but the header lists no tensors`
        : `${dataSize - pos} trailing bytes after the last tensor ${q(prev.name)} (ends at ${pos}, data section holds ${dataSize})`,
    );
  }

  return { headerLength, dataOffset, tensors, metadata };
}

/**
 * Builds the header bytes for a file we write: 8-byte LE length + JSON, padded with spaces
 * (0x20) so that 8 + N is a multiple of 8. Tensors are written in the order given, with
 * `begin/end` as given (the caller computed them contiguously). `metadata` goes under
 * "__metadata__" (first key). Returns the full prefix+JSON bytes.
 */
export function encodeHeader(
  tensors: ReadonlyArray<{ name: string; dtype: string; shape: readonly number[]; begin: number; end: number }>,
  metadata: Record<string, string> | null,
): Uint8Array {
  // Built by hand rather than JSON.stringify(object): JS objects move integer-like keys
  // (a tensor named "0") to the front, which would break "in the order given".
  const parts: string[] = [];
  if (metadata !== null) {
    const entries = Object.keys(metadata).map((k) => `${q(k)}:${q(metadata[k])}`);
    parts.push(`${q(METADATA_KEY)}:{${entries.join(',')}}`);
  }
  for (const t of tensors) {
    parts.push(
      `${q(t.name)}:{"dtype":${q(t.dtype)},"shape":[${t.shape.join(',')}],"data_offsets":[${t.begin},${t.end}]}`,
    );
  }
  const body = new TextEncoder().encode(`{${parts.join(',')}}`);
  const n = Math.ceil(body.length / 8) * 8; // 8 + n is a multiple of 8 exactly when n is
  const out = new Uint8Array(8 + n);
  new DataView(out.buffer).setBigUint64(0, BigInt(n), true);
  out.set(body, 8);
  out.fill(0x20, 8 + body.length);
  return out;
}
