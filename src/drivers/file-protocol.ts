/** The `file` protocol: local paths (regular files; block devices at the top of a chain). */
import fs from 'node:fs/promises';
import { FileDriver } from './file.js';
import { readFileHead } from './regular-file.js';
import type { ProtocolEntry } from './entry.js';

export const fileProtocol: ProtocolEntry = {
  name: 'file',
  schemes: [],
  remote: false,
  identity: (location) => fs.realpath(location),
  readHead: (location, bytes, allowBlockDevice) => readFileHead(location, bytes, allowBlockDevice),
  open: (location, o) => FileDriver.open(location, { readOnly: o.readOnly, ...(o.growable ? { growable: true } : {}), allowBlockDevice: Boolean(o.allowBlockDevice) }),
};
