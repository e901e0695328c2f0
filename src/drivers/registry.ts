/**
 * The driver registry: every image format and every protocol vdisk opens,
 * each declared once (entry.ts says what a declaration holds). Chain assembly
 * (chain.ts), probing and the CLI's -f/-F/-O choices read this list; adding a
 * format is its folder and one line here.
 */
import type { FormatEntry, ProtocolEntry } from './entry.js';
import { FOREIGN_MAGICS, matchMagic, type Magic } from '../block/probe.js';
import { VdiskError } from '../errors.js';
import { rawFormat } from './raw/format.js';
import { qcow2Format } from './qcow2/format.js';
import { fileProtocol } from './file-protocol.js';
import { httpProtocol } from './http/protocol.js';
import { URL_SCHEME } from './http/url.js';

export const FORMATS: readonly FormatEntry[] = [rawFormat, qcow2Format];

/** Plain paths go to the protocol without schemes; a URL to the one that serves its scheme. */
export const PROTOCOLS: readonly ProtocolEntry[] = [fileProtocol, httpProtocol];

/** Format names, for -f/-F/-O choices and messages. */
export const FORMAT_NAMES: readonly string[] = FORMATS.map((f) => f.name);

export function formatEntry(name: string): FormatEntry | undefined {
  return FORMATS.find((f) => f.name === name);
}

/** The entry for `name`, or ERR_IMAGE_FORMAT naming what is supported. */
export function requireFormat(name: string, shown: string): FormatEntry {
  const entry = formatEntry(name);
  if (!entry) throw new VdiskError('ERR_IMAGE_FORMAT', `${shown}: format '${name}' is not supported (supported: ${FORMAT_NAMES.join(', ')})`);
  return entry;
}


/** The protocol a location belongs to: by URL scheme; anything else is a host path. */
export function protocolFor(location: string): ProtocolEntry {
  const scheme = URL_SCHEME.exec(location)?.[1]?.toLowerCase();
  if (scheme) {
    const p = PROTOCOLS.find((e) => e.schemes.includes(scheme));
    if (p) return p;
  }
  return PROTOCOLS.find((e) => e.schemes.length === 0)!;
}

const MAGICS: readonly Magic[] = [...FORMATS.flatMap((f) => (f.magic ? [{ format: f.name, magic: f.magic }] : [])), ...FOREIGN_MAGICS];

/** The format an image's first bytes name, opened by vdisk or not; 'raw' when none matches. */
export function probeHead(head: Buffer): string {
  return matchMagic(head, MAGICS);
}
