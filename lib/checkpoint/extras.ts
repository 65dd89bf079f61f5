/** The non-weight files of a model directory that a merged model needs beside it. */
import { copyFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ioError } from '../errors.js';

export const CONFIG_FILES = ['config.json', 'generation_config.json'];

export const TOKENIZER_FILES = [
  'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json', 'tokenizer.model',
  'spiece.model', 'vocab.json', 'vocab.txt', 'merges.txt', 'chat_template.jinja', 'chat_template.json',
  'preprocessor_config.json',
];

/** Copies the named files that exist in `fromDir` into `toDir`; returns the ones copied. */
export function copyExtras(fromDir: string | null, toDir: string, names: readonly string[]): string[] {
  if (!fromDir) return [];
  const copied: string[] = [];
  for (const name of names) {
    const src = join(fromDir, name);
    // A failure here (disk full, unreadable source) is the user's, not a bug: E_IO naming the file.
    try {
      if (!statSync(src, { throwIfNoEntry: false })?.isFile()) continue;
      copyFileSync(src, join(toDir, name));
    } catch (e) {
      throw ioError(`cannot copy ${src} into ${toDir}`, e);
    }
    copied.push(name);
  }
  return copied;
}
