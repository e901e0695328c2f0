/**
 * qcow2's entry in the driver registry: recognised by its magic, opened on a
 * host-file node of its protocol (growable: clusters are allocated at its
 * end), standing on the backing file its header records.
 */
import { BlockNode } from '../../block/node.js';
import type { FormatEntry } from '../entry.js';
import { Qcow2Driver } from './index.js';
import { featureNames, QCOW2_MAGIC } from './header.js';
import { createQcow2, validateCreateOptions, type Qcow2CreateOptions } from './create.js';
import { parseQcow2Options, QCOW2_CREATE_HELP } from './create-options.js';

const magic = Buffer.alloc(4);
magic.writeUInt32BE(QCOW2_MAGIC, 0);

export const qcow2Format: FormatEntry = {
  name: 'qcow2',
  magic,
  capabilities: { backing: true, remote: false },
  async open(ctx) {
    const fileDrv = await ctx.protocol.open(ctx.location, { readOnly: ctx.readOnly, growable: true, allowBlockDevice: ctx.allowBlockDevice, http: ctx.http });
    const fileNode = new BlockNode(fileDrv, { name: ctx.shown });
    let drv: Qcow2Driver;
    try {
      drv = await Qcow2Driver.open(fileNode, ctx.readOnly ? { readOnly: true } : { readOnly: false, ...(ctx.l2CacheBytes ? { l2CacheBytes: ctx.l2CacheBytes } : {}) });
    } catch (err) {
      await fileNode.close();
      throw err;
    }
    const h = drv.header;
    return {
      driver: drv,
      backing: h.backingFile === null ? null : { name: h.backingFile, format: h.backingFormat },
      copyOnReadDefault: drv.copyOnReadDefault,
      warnings: drv.warnings,
    };
  },
  describe(driver) {
    const drv = driver as Qcow2Driver;
    const h = drv.header;
    return {
      clusterSize: drv.clusterSize,
      ...(h.backingFile !== null ? { backingFile: { name: h.backingFile, format: h.backingFormat } } : {}),
      specific: {
        compat: h.version === 2 ? '0.10' : '1.1',
        'refcount-bits': 2 ** h.refcountOrder,
        'extended-l2': drv.extendedL2,
        'lazy-refcounts': featureNames(h).includes('lazy-refcounts'),
        corrupt: featureNames(h).includes('corrupt'),
        'compression-type': h.compressionType === 0 ? 'zlib' : 'zstd',
        features: featureNames(h),
        snapshots: h.nbSnapshots,
      },
    };
  },
  create: {
    backing: true,
    optionsHelp: QCOW2_CREATE_HELP,
    parseOptions: (list) => parseQcow2Options(list),
    validate(options, size) {
      validateCreateOptions({ ...(options as Omit<Qcow2CreateOptions, 'size'>), size });
    },
    create: (path, size, options, backing) =>
      createQcow2(path, { ...(options as Omit<Qcow2CreateOptions, 'size'>), size, ...(backing ? { backingFile: backing.name, backingFormat: backing.format } : {}) }, false),
  },
};
