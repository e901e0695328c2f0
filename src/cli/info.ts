/** `vdisk info`: what an image is, and what it stands on. */
import type { Argv } from 'yargs';
import { FORMAT_NAMES } from '../drivers/registry.js';
import { imageOpenOptions, withHttpOptions, type HttpArgs } from './http-options.js';
import { confineFromArgs, withConfineOptions, type ConfineArgs } from './confine-options.js';
import { openImage } from '../drivers/chain.js';
import { chainOf } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { formatEntry } from '../drivers/registry.js';
import { displayName } from '../drivers/http/url.js';
import { formatSize } from './util.js';

export interface InfoArgs {
  file: string;
  format?: string;
  'backing-format'?: string;
  output: 'human' | 'json';
  'backing-chain': boolean;
}

export function infoOptions(y: Argv): Argv<InfoArgs & HttpArgs & ConfineArgs> {
  return withConfineOptions(withHttpOptions(y))
    .positional('file', { type: 'string', demandOption: true })
    .option('format', { alias: 'f', type: 'string', choices: FORMAT_NAMES, describe: 'image format (probed when absent)' })
    .option('backing-format', { alias: 'F', type: 'string', choices: FORMAT_NAMES, describe: 'format of a backing file the image does not name' })
    .option('output', { choices: ['human', 'json'] as const, default: 'human' as const })
    .option('backing-chain', { type: 'boolean', default: false, describe: 'describe every image of the chain' }) as unknown as Argv<InfoArgs & HttpArgs & ConfineArgs>;
}

export interface ImageInfo {
  filename: string;
  format: string;
  'virtual-size': number;
  'actual-size': number;
  'cluster-size'?: number;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'full-backing-filename'?: string;
  'format-specific'?: { type: string; data: Record<string, unknown> };
  /** With --backing-chain: the nodes under this one and their roles (a format's host file, the backing image). */
  children?: Array<{ role: string; filename: string; format: string }>;
}

export async function describeNode(node: BlockNode): Promise<ImageInfo> {
  const info: ImageInfo = {
    filename: node.name,
    format: node.driver.formatName,
    'virtual-size': node.size(),
    'actual-size': await node.allocatedBytes(),
  };
  const d = formatEntry(node.driver.formatName)?.describe?.(node.driver);
  if (d?.clusterSize) info['cluster-size'] = d.clusterSize;
  if (d?.backingFile) {
    // A URL may carry credentials or a signed query: never show those.
    info['backing-filename'] = displayName(d.backingFile.name);
    if (d.backingFile.format) info['backing-filename-format'] = d.backingFile.format;
    if (node.backing) info['full-backing-filename'] = node.backing.name;
  }
  if (d?.specific) info['format-specific'] = { type: node.driver.formatName, data: d.specific };
  return info;
}

/** The child links of `node`, named as messages name nodes (no URL secrets). */
function childrenOf(node: BlockNode): NonNullable<ImageInfo['children']> {
  return node.children().map((c) => ({ role: c.role, filename: displayName(c.node.name), format: c.node.driver.formatName }));
}

function human(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${formatSize(info['virtual-size'])} (${info['virtual-size']} bytes)`,
    `disk size: ${formatSize(info['actual-size'])}`,
  ];
  if (info['cluster-size']) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info['backing-filename']) lines.push(`backing file: ${info['backing-filename']}${info['full-backing-filename'] ? ` (actual path: ${info['full-backing-filename']})` : ''}`);
  if (info['backing-filename-format']) lines.push(`backing file format: ${info['backing-filename-format']}`);
  const fs = info['format-specific']?.data;
  if (fs) {
    lines.push('Format specific information:');
    for (const [k, v] of Object.entries(fs)) lines.push(`    ${k}: ${Array.isArray(v) ? v.join(', ') || '-' : String(v)}`);
  }
  return lines.join('\n');
}

export async function runInfo(args: InfoArgs & HttpArgs & ConfineArgs): Promise<void> {
  const node = await openImage(args.file, { ...imageOpenOptions(args), ...confineFromArgs(args), readOnly: true });
  try {
    const nodes = args['backing-chain'] ? chainOf(node) : [node];
    const infos = await Promise.all(nodes.map(describeNode));
    if (args['backing-chain']) nodes.forEach((n, i) => (infos[i]!.children = childrenOf(n)));
    if (args.output === 'json') {
      process.stdout.write(`${JSON.stringify(args['backing-chain'] ? infos : infos[0], null, 2)}\n`);
    } else {
      process.stdout.write(`${infos.map(human).join('\n\n')}\n`);
    }
  } finally {
    await node.close();
  }
}
