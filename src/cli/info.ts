/** `vdisk info`: what an image is, and what it stands on. */
import type { Argv } from 'yargs';
import { FORMAT_NAMES } from '../drivers/registry.js';
import { imageOpenOptions, withHttpOptions, type HttpArgs } from './http-options.js';
import { confineFromArgs, withConfineOptions, type ConfineArgs } from './confine-options.js';
import { openImage } from '../drivers/chain.js';
import { chainOf } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { Qcow2Driver } from '../drivers/qcow2/index.js';
import { featureNames } from '../drivers/qcow2/header.js';
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
}

export async function describeNode(node: BlockNode): Promise<ImageInfo> {
  const info: ImageInfo = {
    filename: node.name,
    format: node.driver.formatName,
    'virtual-size': node.size(),
    'actual-size': (await node.driver.allocatedBytes?.()) ?? node.size(),
  };
  if (node.driver instanceof Qcow2Driver) {
    const h = node.driver.header;
    info['cluster-size'] = node.driver.clusterSize;
    if (h.backingFile !== null) {
      // A URL may carry credentials or a signed query: never show those.
      info['backing-filename'] = displayName(h.backingFile);
      if (h.backingFormat) info['backing-filename-format'] = h.backingFormat;
      if (node.backing) info['full-backing-filename'] = node.backing.name;
    }
    info['format-specific'] = {
      type: 'qcow2',
      data: {
        compat: h.version === 2 ? '0.10' : '1.1',
        'refcount-bits': 2 ** h.refcountOrder,
        'extended-l2': node.driver.extendedL2,
        'lazy-refcounts': featureNames(h).includes('lazy-refcounts'),
        corrupt: featureNames(h).includes('corrupt'),
        'compression-type': h.compressionType === 0 ? 'zlib' : 'zstd',
        features: featureNames(h),
        snapshots: h.nbSnapshots,
      },
    };
  }
  return info;
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
    if (args.output === 'json') {
      process.stdout.write(`${JSON.stringify(args['backing-chain'] ? infos : infos[0], null, 2)}\n`);
    } else {
      process.stdout.write(`${infos.map(human).join('\n\n')}\n`);
    }
  } finally {
    await node.close();
  }
}
