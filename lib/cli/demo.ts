/** della-merge demo: three small experts merged with DELLA, and what DELLA did. */
import { existsSync, mkdtempSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { DellaError, ioError } from '../errors.js';
import { openCheckpoint } from '../checkpoint/model.js';
import { TEMP_MARK } from '../checkpoint/writer.js';
import { loadRecipe } from '../recipe/index.js';
import { runMerge, selectDevice, type MergeReport } from '../merge/run.js';
import { loadNative } from '../native.js';
import { writeDemoModels, DEMO_EXPERTS, DEMO_RECIPE_MARK } from '../demo.js';
import { bf16ToF32 } from '../reference/dtypes.js';
import { deviceOptions, intOption, out, parse, summary, usageError, withSignals } from './common.js';
import { createProgress } from './progress.js';
import { DEMO_USAGE } from './usage.js';
import { nearestExisting } from '../util/fs.js';

/** Per expert: how much of its change survived, and how aligned the merged change is with it. */
function demoAnalysis(baseDir: string, expertDirs: string[], mergedDir: string, report: MergeReport): string[] {
  const base = openCheckpoint(baseDir);
  const merged = openCheckpoint(mergedDir);
  const experts = expertDirs.map((d) => openCheckpoint(d));
  try {
    const dot = new Array(experts.length).fill(0), ee = new Array(experts.length).fill(0);
    let mm = 0;
    for (const name of base.names) {
      if (base.tensors.get(name)!.dtype !== 'BF16') continue;
      const b = base.array(name) as Uint16Array, m = merged.array(name) as Uint16Array;
      const es = experts.map((e) => e.array(name) as Uint16Array);
      for (let i = 0; i < b.length; i++) {
        const bv = bf16ToF32(b[i]);
        const md = bf16ToF32(m[i]) - bv;
        mm += md * md;
        es.forEach((e, k) => {
          const ed = bf16ToF32(e[i]) - bv;
          dot[k] += md * ed;
          ee[k] += ed * ed;
        });
      }
    }
    const kept = experts.map((_, k) => {
      let s = 0, n = 0;
      for (const t of report.tensorReports) {
        if (t.keptFraction) {
          const numel = t.shape.reduce((a, b) => a * b, 1);
          s += t.keptFraction[k] * numel;
          n += numel;
        }
      }
      return n > 0 ? s / n : 1;
    });
    return [
      'what DELLA did, per expert (MAGPRUNE keeps ~density of each delta, favouring large magnitudes):',
      ...DEMO_EXPERTS.map((skill, k) =>
        `  ${skill.padEnd(5)} kept ${(kept[k] * 100).toFixed(1)}% of its delta; cosine(merged delta, its delta) = ${(dot[k] / Math.sqrt(mm * ee[k])).toFixed(3)}`),
    ];
  } finally {
    base.close();
    merged.close();
    experts.forEach((e) => e.close());
  }
}

function makeTempDir(): string {
  try {
    return mkdtempSync(join(tmpdir(), 'della-merge-demo-'));
  } catch (e) {
    throw ioError(`cannot create a demo directory in ${tmpdir()}`, e);
  }
}

/** Only a new or empty directory, or an earlier demo's, is written into; checked before any file is. */
function checkDemoDir(dir: string): void {
  const refuse = (why: string) => new DellaError('E_OUTPUT', `${why}; give an empty or new directory`);
  if (!existsSync(dir)) {
    // A path under a file (afile/sub) cannot be created: name the file.
    const up = nearestExisting(dir);
    if (!statSync(up).isDirectory()) throw refuse(`${dir}: ${up} is not a directory`);
    return;
  }
  if (!statSync(dir).isDirectory()) throw refuse(`${dir} exists and is not a directory`);
  let entries: string[];
  try {
    entries = readdirSync(dir);
  } catch (e) {
    throw ioError(`cannot read the directory ${dir}`, e);
  }
  if (entries.length > 0 && !isEarlierDemo(dir, entries)) throw refuse(`${dir} exists and is not an earlier demo's directory`);
}

/** What the demo writes (its models, with the recipe it wrote, and the merge), the
 * merge its summary suggests next (merged-again), and what an interrupted merge left;
 * nothing else. Anything more is the user's, which rerunning the demo would replace. */
function isEarlierDemo(dir: string, entries: string[]): boolean {
  const ours = (e: string) => e === 'models' || e === 'merged' || e === 'merged-again' || (e.startsWith('.') && e.includes(TEMP_MARK));
  if (!entries.every(ours)) return false;
  try {
    return readFileSync(join(dir, 'models', 'recipe.yaml'), 'utf8').startsWith(DEMO_RECIPE_MARK);
  } catch {
    return false;
  }
}

export async function cmdDemo(args: string[]): Promise<number> {
  const { values, positionals } = parse('demo', args, {
    out: { type: 'string', short: 'o' }, threads: { type: 'string', short: 'j' },
    device: { type: 'string' }, 'gpu-memory': { type: 'string' },
  });
  if (values.help) return out(DEMO_USAGE), 0;
  if (positionals.length > 0) throw usageError(`demo takes no positional arguments, got "${positionals[0]}"`, 'demo');
  const threads = intOption(values.threads as string | undefined, 'threads', 1, 1024);
  const { device, gpuMemory } = deviceOptions(values);
  if (device !== undefined) selectDevice({ device, gpuMemory }, loadNative()); // before any file is written
  const dir = values.out ? resolve(values.out as string) : makeTempDir();
  if (values.out) checkDemoDir(dir);
  const models = writeDemoModels(join(dir, 'models'));
  out(`della-merge demo`);
  out(`models   ${models.dir}: a base model (BF16, ${models.layers} layers, ${(models.parameters / 1e6).toFixed(2)} M parameters, 2 shards)`);
  out(`         and 3 experts fine-tuned from it: ${DEMO_EXPERTS.join(', ')}`);
  out(`recipe   ${models.recipeFile} (della, density 0.4, epsilon 0.15, lambda 1, seed 42)`);
  const recipe = await loadRecipe(models.recipeFile);
  const progress = createProgress(process.stderr, 'auto');
  const mergedDir = join(dir, 'merged');
  const report = await withSignals((signal) => runMerge(recipe, {
    out: mergedDir, threads, overwrite: true, signal, device, gpuMemory, onProgress: (e) => progress.update(e),
  }).finally(() => progress.end()));
  summary(report).forEach(out);
  demoAnalysis(models.baseDir, models.expertDirs, mergedDir, report).forEach(out);
  out(`next     della-merge inspect ${mergedDir}`);
  out(`         della-merge run ${models.recipeFile} --out ${join(dir, 'merged-again')} --threads 1   # same bytes`);
  return 0;
}
