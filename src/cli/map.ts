/** `vdisk map`: which ranges hold data, read as zero, and which node holds them (like `qemu-img map`). */
import type { Argv } from 'yargs';
import { FORMAT_NAMES } from '../drivers/registry.js';
import { imageOpenOptions, withHttpOptions, type HttpArgs } from './http-options.js';
import { confineFromArgs, withConfineOptions, type ConfineArgs } from './confine-options.js';
import { blockStatusAbove } from '../block/block-status.js';
import type { BlockNode } from '../block/node.js';
import { openImage } from '../drivers/chain.js';

export interface MapArgs {
  file: string;
  format?: string;
  'backing-format'?: string;
  output: 'human' | 'json';
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

export function mapOptions(y: Argv): Argv<MapArgs & HttpArgs & ConfineArgs> {
  return withConfineOptions(withHttpOptions(y))
    .positional('file', { type: 'string', demandOption: true })
    .option('format', { alias: 'f', type: 'string', choices: FORMAT_NAMES })
    .option('backing-format', { alias: 'F', type: 'string', choices: FORMAT_NAMES, describe: 'format of a backing file the image does not name' })
    .option('output', { choices: ['human', 'json'] as const, default: 'human' as const }) as unknown as Argv<MapArgs & HttpArgs & ConfineArgs>;
}

function depthOf(top: BlockNode, node: BlockNode | null): number {
  let depth = 0;
  for (let n: BlockNode | null = top; n; n = n.backing, depth++) if (n === node) return depth;
  return depth - 1; // nothing in the chain has it: the bottom's depth, as qemu-img map
}

/** Block status above the chain for the whole disk, adjacent equal ranges merged. */
export async function mapImage(top: BlockNode): Promise<MapEntry[]> {
  const size = top.size();
  const out: MapEntry[] = [];
  for (let pos = 0; pos < size; ) {
    const st = await blockStatusAbove(top, pos, size - pos);
    const e: MapEntry = { start: pos, length: st.bytes, depth: depthOf(top, st.node), present: st.allocated, zero: st.zero, data: st.data };
    if (st.data && st.hostOffset !== undefined) e.offset = st.hostOffset;
    const last = out[out.length - 1];
    const contiguous = last && last.depth === e.depth && last.present === e.present && last.zero === e.zero && last.data === e.data &&
      (last.offset === undefined) === (e.offset === undefined) && (last.offset === undefined || last.offset + last.length === e.offset);
    if (last && contiguous) last.length += e.length;
    else out.push(e);
    pos += st.bytes;
  }
  return out;
}

export async function runMap(args: MapArgs & HttpArgs & ConfineArgs): Promise<void> {
  const node = await openImage(args.file, { ...imageOpenOptions(args), ...confineFromArgs(args), readOnly: true });
  try {
    const entries = await mapImage(node);
    if (args.output === 'json') {
      process.stdout.write(`[${entries.map((e) => JSON.stringify(e)).join(',\n')}]\n`);
      return;
    }
    const hex = (n: number) => `0x${n.toString(16)}`;
    const chain: string[] = [];
    for (let n: BlockNode | null = node; n; n = n.backing) chain.push(n.name);
    process.stdout.write(`${'Offset'.padEnd(20)}${'Length'.padEnd(20)}${'Mapped to'.padEnd(20)}File\n`);
    for (const e of entries) {
      if (!e.data) continue;
      process.stdout.write(`${hex(e.start).padEnd(20)}${hex(e.length).padEnd(20)}${(e.offset === undefined ? '-' : hex(e.offset)).padEnd(20)}${chain[e.depth] ?? args.file}\n`);
    }
  } finally {
    await node.close();
  }
}
