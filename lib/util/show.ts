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
