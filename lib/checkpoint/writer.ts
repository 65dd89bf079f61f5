/**
 * The output side of SPEC §8: lays tensors out in shards, creates the shard files
 * (reserved on disk) with their headers, and writes byte ranges of tensors straight to
 * their final offsets, off the JS thread. All of it happens in a temporary sibling
 * directory that is renamed into place only when complete; any failure removes it.
 */
import { accessSync, constants, existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join, resolve } from 'node:path';
import { DellaError, ioError } from '../errors.js';
import { loadNative, type NativeOutputFile } from '../native.js';
import { DTYPE_SIZES, encodeHeader } from './safetensors.js';
import { isWithin, makeDirs, nearestExisting, removeEmptyDirs } from '../util/fs.js';
import type { Bytes } from '../util/bytes.js';
import { INDEX_FILE, SINGLE_FILE } from './model.js';

export interface OutputTensor {
  name: string;
  dtype: string;
  shape: number[];
  byteLength: number;
}

export interface ShardLayout {
  fileName: string;
  /** in file order, with offsets relative to the data section */
  tensors: Array<OutputTensor & { begin: number; end: number }>;
  header: Uint8Array;
  fileSize: number;
  dataBytes: number;
}

export const DEFAULT_SHARD_SIZE = 5_000_000_000;

/**
 * Fills shards in name order up to `shardSize` data bytes (a larger tensor gets a shard
 * of its own). Inside a shard, wider dtypes come first so every tensor is aligned to
 * its element size (headers are padded to 8 bytes).
 */
export function layoutShards(tensors: readonly OutputTensor[], shardSize: number): ShardLayout[] {
  const sorted = [...tensors].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const groups: OutputTensor[][] = [];
  let current: OutputTensor[] = [];
  let bytes = 0;
  for (const t of sorted) {
    if (current.length > 0 && bytes + t.byteLength > shardSize) {
      groups.push(current);
      current = [];
      bytes = 0;
    }
    current.push(t);
    bytes += t.byteLength;
  }
  if (current.length > 0 || groups.length === 0) groups.push(current);
  const n = groups.length;
  const pad = (i: number) => String(i).padStart(5, '0');
  return groups.map((group, i) => {
    const ordered = [...group].sort((a, b) => (DTYPE_SIZES[b.dtype] ?? 1) - (DTYPE_SIZES[a.dtype] ?? 1));
    let offset = 0;
    const placed = ordered.map((t) => {
      const begin = offset;
      offset += t.byteLength;
      return { ...t, begin, end: offset };
    });
    const header = encodeHeader(placed, { format: 'pt' });
    return {
      fileName: n === 1 ? SINGLE_FILE : `model-${pad(i + 1)}-of-${pad(n)}.safetensors`,
      tensors: placed,
      header,
      fileSize: header.length + offset,
      dataBytes: offset,
    };
  });
}

function outputError(message: string, cause?: unknown): DellaError {
  return new DellaError('E_OUTPUT', message, { cause });
}

// Temporary directories still open; removed if the process exits without finishing
// them (a second Ctrl-C, process.exit from elsewhere).
const live = new Set<string>();
let exitHookInstalled = false;

function track(tmp: string): void {
  live.add(tmp);
  loadNative().removeAtTeardown(tmp, true); // a Worker's terminate() runs no 'exit' handler
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const dir of live) rmSync(dir, { recursive: true, force: true });
    });
  }
}

function untrack(tmp: string): void {
  if (live.delete(tmp)) loadNative().removeAtTeardown(tmp, false);
}

export class OutputDirectory {
  readonly target: string;
  readonly tmp: string;
  private readonly overwrite: boolean;
  private files: NativeOutputFile[] = [];
  private done = false;

  /** the outermost parent directory create() made, removed again (if empty) by abort() */
  private readonly madeParent: string | undefined;

  private constructor(target: string, tmp: string, overwrite: boolean, madeParent: string | undefined) {
    this.target = target;
    this.tmp = tmp;
    this.overwrite = overwrite;
    this.madeParent = madeParent;
  }

  /**
   * Temporary directories of earlier runs into this target whose process is gone (killed
   * with SIGKILL, or the machine went down): nothing removes them, and each may hold a
   * model's worth of reserved shards. Reported, not removed: on a shared file system the
   * process may be another machine's.
   */
  leftovers(): string[] {
    const mark = `.${basename(this.target)}${TEMP_MARK}`;
    const parent = dirname(this.target);
    let names: string[];
    try {
      names = readdirSync(parent);
    } catch {
      return [];
    }
    return names.filter((n) => {
      if (!n.startsWith(mark) || join(parent, n) === this.tmp) return false;
      const pid = Number(/^(\d+)-[0-9a-f]+$/.exec(n.slice(mark.length))?.[1]);
      if (!Number.isSafeInteger(pid) || pid <= 0) return false;
      try {
        process.kill(pid, 0);
        return false; // running (or another user's): perhaps a run writing it now
      } catch (e) {
        return (e as NodeJS.ErrnoException).code === 'ESRCH';
      }
    }).map((n) => join(parent, n));
  }

  /** Whether create() would accept the target (for --dry-run); returns its full path. */
  static check(target: string, options: { overwrite?: boolean; inputs?: readonly string[] } = {}): string {
    const full = resolve(target);
    checkTarget(full, options.overwrite ?? false);
    checkNotInput(full, options.inputs ?? []);
    // Where it would be made (what run --dry-run --out promises to check): before any work.
    const parent = nearestExisting(dirname(full));
    if (!statSync(parent).isDirectory()) throw outputError(`cannot create ${full}: ${parent} is not a directory`);
    try {
      accessSync(parent, constants.W_OK);
    } catch (e) {
      throw ioError(`cannot create ${full}: ${parent} is not writable`, e);
    }
    return full;
  }

  /** Checks the target and makes the temporary sibling directory. `inputs`: files and
   * directories the merge reads, which the target must not be or hold. */
  static create(target: string, options: { overwrite?: boolean; inputs?: readonly string[] } = {}): OutputDirectory {
    const full = OutputDirectory.check(target, options);
    const overwrite = options.overwrite ?? false;
    const parent = dirname(full);
    let madeParent: string | undefined;
    if (!existsSync(parent)) {
      try {
        madeParent = makeDirs(parent);
      } catch (e) {
        throw ioError(`cannot create ${parent}`, e);
      }
    }
    const tmp = join(parent, `.${basename(full)}${TEMP_MARK}${process.pid}-${randomBytes(4).toString('hex')}`);
    try {
      mkdirSync(tmp);
    } catch (e) {
      if (madeParent) removeEmptyDirs(parent, madeParent);
      throw ioError(`cannot create a temporary output directory in ${parent}`, e);
    }
    track(tmp);
    return new OutputDirectory(full, tmp, overwrite, madeParent);
  }

  /**
   * Creates every shard file (reserved on disk) and starts writing its header; returns
   * where each tensor goes. Writes use O_DIRECT where the file system allows it, unless
   * DELLA_DIRECT_IO=0.
   */
  createShards(layouts: readonly ShardLayout[]): ShardFiles {
    const native = loadNative();
    const direct = process.env.DELLA_DIRECT_IO !== '0';
    const files = new ShardFiles();
    for (const layout of layouts) {
      const name = join(this.tmp, layout.fileName);
      let file: NativeOutputFile;
      try {
        file = new native.OutputFile(name, layout.fileSize, direct);
      } catch (e) {
        throw ioError(`cannot create ${layout.fileName} (${layout.fileSize} bytes) in ${this.tmp}`, e);
      }
      this.files.push(file);
      files.add(layout, file);
    }
    return files;
  }

  /** Writes a small file (index, model card, recipe) into the temporary directory. */
  writeFile(name: string, content: string | Uint8Array): void {
    try {
      writeFileSync(join(this.tmp, name), content);
    } catch (e) {
      throw ioError(`cannot write ${name} in ${this.tmp}`, e);
    }
  }

  path(name: string): string {
    return join(this.tmp, name);
  }

  /** Moves the finished directory into place (replacing the target only with overwrite). */
  commit(): void {
    for (const f of this.files) f.close();
    this.files = [];
    checkTarget(this.target, this.overwrite);
    let old: string | null = null;
    try {
      if (existsSync(this.target)) {
        old = `${this.tmp}.old`;
        renameSync(this.target, old);
      }
      renameSync(this.tmp, this.target);
    } catch (e) {
      if (old && !existsSync(this.target)) renameSync(old, this.target);
      throw ioError(`cannot move the finished output into ${this.target}`, e);
    }
    this.done = true;
    untrack(this.tmp);
    if (old) rmSync(old, { recursive: true, force: true });
  }

  /** Removes the temporary directory; safe to call more than once and after commit. */
  abort(): void {
    for (const f of this.files) {
      try {
        f.close();
      } catch {
        // an unfinished file: removed with the directory below
      }
    }
    this.files = [];
    if (!this.done) {
      rmSync(this.tmp, { recursive: true, force: true });
      if (this.madeParent) removeEmptyDirs(dirname(this.tmp), this.madeParent);
    }
    untrack(this.tmp);
    this.done = true;
  }
}

/** Where each tensor of the output goes, and the writes still in flight. */
export class ShardFiles {
  private readonly at = new Map<string, { file: NativeOutputFile; offset: number; length: number }>();
  private readonly inFlight = new Set<Promise<void>>();
  private failure: unknown = null;

  add(layout: ShardLayout, file: NativeOutputFile): void {
    for (const t of layout.tensors) {
      this.at.set(t.name, { file, offset: layout.header.length + t.begin, length: t.byteLength });
    }
    this.write(file, 0, layout.header, layout.fileName);
  }

  /** The file and absolute offset of a tensor. */
  place(name: string): { file: NativeOutputFile; offset: number; length: number } {
    const p = this.at.get(name);
    if (!p) throw new Error(`no output place for tensor "${name}"`);
    return p;
  }

  /**
   * Starts writing `bytes` at `offset` of `file`; `then` runs when it has settled (to
   * reuse the memory). A failure is thrown by the next check() or finish().
   */
  write(file: NativeOutputFile, offset: number, bytes: Bytes, what: string, then?: () => void): void {
    const p = file.write(offset, bytes).then(
      () => {},
      (e: unknown) => { this.failure ??= ioError(`cannot write ${what}`, e); },
    ).finally(() => {
      this.inFlight.delete(p);
      then?.();
    });
    this.inFlight.add(p);
  }

  /** Throws the first failed write, if any. */
  check(): void {
    if (this.failure) throw this.failure;
  }

  /** Waits for every write in flight; throws the first failure. */
  async finish(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.all([...this.inFlight]);
    this.check();
  }
}

/** An output that is or holds an input would, with --overwrite, delete that input. */
function checkNotInput(full: string, inputs: readonly string[]): void {
  if (!existsSync(full)) return;
  for (const input of inputs) {
    if (isWithin(input, full)) {
      throw outputError(`${full} holds ${input}, an input of this merge: replacing it would delete that input; choose another output directory`);
    }
  }
}

function checkTarget(full: string, overwrite: boolean): void {
  if (!existsSync(full)) return;
  if (!statSync(full).isDirectory()) throw outputError(`${full} exists and is not a directory`);
  if (!overwrite) throw outputError(`${full} already exists (pass --overwrite, or overwrite: true in the API, to replace it)`);
}

export function indexJson(layouts: readonly ShardLayout[]): string {
  const weightMap: Record<string, string> = Object.create(null); // a tensor may be named __proto__
  const entries: Array<[string, string]> = [];
  let total = 0;
  for (const l of layouts) {
    total += l.dataBytes;
    for (const t of l.tensors) entries.push([t.name, l.fileName]);
  }
  entries.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  for (const [name, file] of entries) weightMap[name] = file;
  return `${JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2)}\n`;
}

export { INDEX_FILE };

/** In the name of a file or directory while it is written aside (.OUT.della-tmp-PID-RANDOM for an
 * output; saveModel's and --report's files too), before it is renamed into place. */
export const TEMP_MARK = '.della-tmp-';

/** The names layoutShards gives shards. */
export const SHARD_NAME = /^model-\d{5,}-of-\d{5,}\.safetensors$/;
