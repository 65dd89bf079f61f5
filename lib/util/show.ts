/**
 * JSON.stringify for messages about untrusted values. A value nested too deeply to
 * render (a hostile file's 10,000 brackets overflow the stack) shows as [...] or {...},
 * so the message names the problem instead of the process crashing.
 */
export function jsonForMessage(v: unknown, replacer?: (key: string, x: unknown) => unknown): string {
  if (typeof v === 'number' && !Number.isFinite(v)) return String(v); // NaN, not JSON's null
  try {
    const s = JSON.stringify(v, replacer as (this: unknown, key: string, value: unknown) => unknown);
    if (s !== undefined) return s;
  } catch {
    // too deep to render, or a cycle
  }
  return Array.isArray(v) ? '[...]' : v !== null && typeof v === 'object' ? '{...}' : String(v);
}

/** An untrusted value for a message, cut to 60 characters. */
export function showShort(v: unknown): string {
  if (v === undefined) return 'nothing';
  const s = jsonForMessage(v);
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

/**
 * A bad argument for a message, without serializing what it holds: a tensor set or a
 * typed array passed by mistake may hold gigabytes.
 */
export function showArg(v: unknown): string {
  if (typeof v === 'function') return 'a function';
  if (v === null || typeof v !== 'object') return showShort(v);
  if (Array.isArray(v)) {
    const plain = v.length <= 16 && [...v].every((x) => x === null || typeof x !== 'object');
    return plain ? showShort(v) : `an array of ${v.length}`;
  }
  if (ArrayBuffer.isView(v)) return `a ${Object.prototype.toString.call(v).slice(8, -1)}`;
  if (v instanceof Map) return 'a Map';
  const keys = Object.keys(v);
  return keys.length === 0 ? 'an empty object' : `an object with keys ${showShort(keys.slice(0, 4)).replace(/]$/, keys.length > 4 ? ',...]' : ']')}`;
}

/**
 * The width of a table column: the longest of `texts`, at least `min`. Not
 * Math.max(...texts): a checkpoint of 150k tensors passes more arguments than a call takes.
 */
export function columnWidth(texts: readonly string[], min: number): number {
  let w = min;
  for (const t of texts) if (t.length > w) w = t.length;
  return w;
}
