/**
 * raw: the image is the bytes of the disk. The node is the protocol's own
 * (nothing to translate); a raw image whose format was probed, opened for
 * writing, gets the probed-raw guard.
 */
import fs from 'node:fs/promises';
import type { FormatEntry } from '../entry.js';
import { ProbedRawDriver } from '../probed-raw.js';
import { VdiskError } from '../../errors.js';

export const rawFormat: FormatEntry = {
  name: 'raw',
  magic: null,
  capabilities: { backing: false, remote: true },
  async open(ctx) {
    const driver = await ctx.protocol.open(ctx.location, { readOnly: ctx.readOnly, allowBlockDevice: ctx.allowBlockDevice, http: ctx.http });
    if (!ctx.probed || ctx.readOnly) return { driver, backing: null };
    return {
      driver: new ProbedRawDriver(driver, ctx.shown, ctx.probeHead),
      backing: null,
      warnings: ['format probed as raw; writes that would make its first sector probe as another format are refused (EPERM). Give -f raw to lift the restriction'],
    };
  },
  create: {
    backing: false,
    parseOptions(list) {
      if (list.length) throw new VdiskError('ERR_USAGE', 'raw images take no -o options');
      return {};
    },
    validate(options, size) {
      if (Object.keys(options).length) throw new VdiskError('ERR_USAGE', 'raw images take no options');
      if (!Number.isSafeInteger(size) || size < 0) throw new VdiskError('ERR_USAGE', `bad size ${size}`);
    },
    async create(path, size) {
      const fh = await fs.open(path, 'wx');
      try {
        await fh.truncate(size);
      } finally {
        await fh.close();
      }
    },
  },
};
