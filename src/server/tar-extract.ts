/**
 * A small, hostile-input-safe tar reader for adapter uploads: ustar with pax `path` records and GNU
 * long names, optionally gzip-compressed. Only regular files and directories are accepted; links,
 * devices, absolute paths and `..` are refused, and entry count and total size are bounded.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import { SoppuError } from '../errors/soppu-error.js';

export interface TarLimits {
  readonly maxEntries: number;
  readonly maxTotalBytes: number;
}

export interface TarFile {
  readonly name: string;
  readonly data: Uint8Array;
}

const BLOCK = 512;

/** Parses a tar (or tar.gz, detected by magic bytes) archive into its regular files. */
export function parseTar(archive: Uint8Array, limits: TarLimits, label = 'upload'): TarFile[] {
  const bad = (why: string): SoppuError => new SoppuError('VALIDATION', `Input validation error: ${label}: ${why}`, { field: 'body' });
  let bytes = archive;
  if (bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b) {
    try {
      bytes = gunzipSync(bytes, { maxOutputLength: limits.maxTotalBytes + 1024 * BLOCK });
    } catch (e) {
      throw bad(`gzip stream is corrupt or larger than ${limits.maxTotalBytes} bytes (${(e as Error).message})`);
    }
  }
  const files: TarFile[] = [];
  const decoder = new TextDecoder('utf-8', { fatal: false });
  const field = (header: Uint8Array, start: number, length: number): string => {
    const slice = header.subarray(start, start + length);
    const end = slice.indexOf(0);
    return decoder.decode(end === -1 ? slice : slice.subarray(0, end));
  };
  let offset = 0;
  let totalBytes = 0;
  let entries = 0;
  let pendingName: string | null = null;
  while (offset + BLOCK <= bytes.length) {
    const header = bytes.subarray(offset, offset + BLOCK);
    if (header.every((b) => b === 0)) break; // end-of-archive marker
    entries += 1;
    if (entries > limits.maxEntries) throw bad(`more than ${limits.maxEntries} entries`);
    const checksumText = field(header, 148, 8).trim();
    let sum = 0;
    for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : (header[i] as number);
    if (!/^[0-7]+$/.test(checksumText) || parseInt(checksumText, 8) !== sum) throw bad(`entry #${entries} has a bad header checksum (not a tar archive?)`);
    const sizeText = field(header, 124, 12).trim();
    if (!/^[0-7]*$/.test(sizeText)) throw bad(`entry #${entries} has a malformed size field`);
    const size = sizeText === '' ? 0 : parseInt(sizeText, 8);
    const dataStart = offset + BLOCK;
    if (dataStart + size > bytes.length) throw bad(`entry #${entries} (${size} bytes) runs past the end of the archive`);
    const data = bytes.subarray(dataStart, dataStart + size);
    offset = dataStart + Math.ceil(size / BLOCK) * BLOCK;
    const type = String.fromCharCode(header[156] as number);
    const magic = field(header, 257, 6);
    const prefix = magic.startsWith('ustar') ? field(header, 345, 155) : '';
    let name = pendingName ?? (prefix ? `${prefix}/${field(header, 0, 100)}` : field(header, 0, 100));
    if (type === 'x') {
      pendingName = parsePaxPath(decoder.decode(data)) ?? pendingName;
      continue;
    }
    if (type === 'L') {
      pendingName = decoder.decode(data).replace(/\0+$/, '');
      continue;
    }
    if (type === 'g') continue;
    pendingName = null;
    if (type === '5') continue;
    if (type !== '0' && type !== '\0' && type !== '7') throw bad(`entry '${name}' is not a regular file (type '${type}'); links and devices are refused`);
    name = name.replace(/^\.\//, '');
    // eslint-disable-next-line no-control-regex
    if (/[\u0000-\u001f\u007f]/.test(name)) throw bad(`entry ${JSON.stringify(name)} has a control character in its name`);
    const parts = name.split('/').filter((p) => p !== '' && p !== '.');
    if (name.startsWith('/') || parts.some((p) => p === '..') || parts.length === 0) throw bad(`entry '${name}' has an absolute or escaping path`);
    totalBytes += size;
    if (totalBytes > limits.maxTotalBytes) throw bad(`unpacked size exceeds ${limits.maxTotalBytes} bytes`);
    files.push({ name: parts.join('/'), data });
  }
  if (files.length === 0) throw bad('archive holds no files');
  return files;
}

function parsePaxPath(text: string): string | null {
  // records: "<len> key=value\n"
  for (const line of text.split('\n')) {
    const match = /^\d+ path=(.*)$/.exec(line);
    if (match?.[1] !== undefined) return match[1];
  }
  return null;
}

/** Write errors the archive's own names cause (a file where a folder must go, a name too long). */
const NAME_ERRORS = new Set(['EEXIST', 'ENOTDIR', 'EISDIR', 'ENAMETOOLONG', 'EINVAL', 'EILSEQ']);

/**
 * Writes `files` under `dir` and returns the folder that holds adapter_config.json (the archive may
 * wrap the adapter in one top-level folder). Throws VALIDATION naming the entry when an entry is
 * also another entry's folder (`a` and `a/adapter_config.json`) or its name cannot be written, and
 * FILE_IO naming it for other write failures; nothing is written in the first case.
 */
export function writeAdapterFiles(files: readonly TarFile[], dir: string, label = 'upload'): string {
  const bad = (why: string): SoppuError => new SoppuError('VALIDATION', `Input validation error: ${label}: ${why}`, { field: 'body' });
  const configs = files.filter((f) => f.name === 'adapter_config.json' || f.name.endsWith('/adapter_config.json'));
  if (configs.length !== 1) throw bad(`expected exactly one adapter_config.json in the archive, found ${configs.length}`);
  // checked up front so a clash fails before anything is written, whichever entry comes first
  const names = new Set(files.map((f) => f.name));
  for (const file of files) {
    for (let end = file.name.indexOf('/'); end !== -1; end = file.name.indexOf('/', end + 1)) {
      const folder = file.name.slice(0, end);
      if (names.has(folder)) throw bad(`entry '${folder}' is a file but also the folder of entry '${file.name}'`);
    }
  }
  for (const file of files) {
    const target = path.join(dir, file.name);
    try {
      mkdirSync(path.dirname(target), { recursive: true });
      writeFileSync(target, file.data);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      const why = `cannot write entry '${file.name}': ${err.code ?? err.message}`;
      if (err.code !== undefined && NAME_ERRORS.has(err.code)) throw bad(why);
      throw new SoppuError('FILE_IO', `${label}: ${why} (${err.message})`, { file: file.name }, { cause: e });
    }
  }
  return path.join(dir, path.dirname((configs[0] as TarFile).name));
}
