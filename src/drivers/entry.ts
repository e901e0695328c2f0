/**
 * What a format or a protocol declares to the driver registry (registry.ts):
 * how it is recognised, how it opens, what `vdisk create` can make of it, and
 * what it can do. Chain assembly (chain.ts) and the CLI read only these
 * declarations, never a format's name.
 */
import type { BlockDriver } from '../block/driver.js';
import type { BlockNode } from '../block/node.js';
import type { HttpOptions } from './http/index.js';

/** How a protocol opens the bytes at a location. */
export interface ProtocolOpenOptions {
  readOnly: boolean;
  /** Writes past the end grow the file (a format's host file). */
  growable?: boolean;
  /** Block devices are for the image the user named only, never a backing file. */
  allowBlockDevice?: boolean;
  http?: HttpOptions;
}

export interface ProtocolEntry {
  /** As messages and `info` name it: 'file', 'http'. */
  readonly name: string;
  /** URL schemes it serves, lower case with the colon ('https:'); empty: plain host paths. */
  readonly schemes: readonly string[];
  /**
   * Remote storage: never probed, opened read-only (writes need a local
   * overlay), and a backing file there needs its format recorded or given.
   */
  readonly remote: boolean;
  /** What identifies the storage behind a location, for loop detection (realpath for files). */
  identity(location: string): Promise<string>;
  /** The first `bytes` bytes, for probing; absent: never probed. */
  readHead?(location: string, bytes: number, allowBlockDevice: boolean): Promise<Buffer>;
  open(location: string, options: ProtocolOpenOptions): Promise<BlockDriver>;
}

/** What a format's open() is given. */
export interface FormatOpenContext {
  /** The location as the protocol takes it (a path or a URL). */
  location: string;
  /** The location as messages may show it (no URL secrets). */
  shown: string;
  protocol: ProtocolEntry;
  readOnly: boolean;
  allowBlockDevice: boolean;
  /** The format came from probing the image's first bytes, not from the user or an overlay. */
  probed: boolean;
  l2CacheBytes?: number;
  http?: HttpOptions;
  /** The registry's probe (for the probed-raw guard, which must know every magic). */
  probeHead(head: Buffer): string;
}

export interface OpenedFormat {
  driver: BlockDriver;
  /** The backing file the image records (resolved and opened by chain.ts), or null. */
  backing: { name: string; format: string | null } | null;
  /** The image asks for copy-on-read by default. */
  copyOnReadDefault?: boolean;
  /** Messages worth showing the user, unprefixed. */
  warnings?: string[];
}

export interface FormatCreateSpec {
  /** Help text for `vdisk create -o`; absent: the format takes no -o options. */
  optionsHelp?: string;
  /** The image can record a backing file (-b/-F). */
  backing: boolean;
  /** Parse `vdisk create -o` options (ERR_USAGE on a bad one). */
  parseOptions(list: string[]): Record<string, unknown>;
  /** Check parsed options against the size (0: not known yet), before anything is written. */
  validate(options: Record<string, unknown>, size: number): void;
  /** Write a new image of `size` at `path` (a fresh temporary file). */
  create(path: string, size: number, options: Record<string, unknown>, backing: { name: string; format: string } | null): Promise<void>;
}

/** What `vdisk info` shows of an open image beyond its size (qemu-img info's fields). */
export interface FormatDescription {
  clusterSize?: number;
  /** The backing file as the image records it (chain.ts resolves it). */
  backingFile?: { name: string; format: string | null };
  /** qemu-img's format-specific data. */
  specific?: Record<string, unknown>;
}

export interface FormatEntry {
  /** As users write it after -f/-F/-O. */
  readonly name: string;
  /** The magic bytes at offset 0 that name it; null: never probed (raw is what matches nothing). */
  readonly magic: Buffer | null;
  readonly capabilities: {
    /** Can stand on a backing file. */
    backing: boolean;
    /** Can be read over a remote protocol (read-only, no host file of its own to grow). */
    remote: boolean;
  };
  open(ctx: FormatOpenContext): Promise<OpenedFormat>;
  /** What `vdisk info` shows of a driver this entry opened; absent: nothing beyond the size. */
  describe?(driver: BlockDriver): FormatDescription;
  create: FormatCreateSpec;
}

/** Re-exported for formats that open a host-file node under them. */
export type { BlockNode };
