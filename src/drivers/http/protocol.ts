/** The `http` protocol: images at http(s) URLs, read-only, through range requests. */
import type { ProtocolEntry } from '../entry.js';
import { HttpDriver } from './index.js';

export const httpProtocol: ProtocolEntry = {
  name: 'http',
  schemes: ['http:', 'https:'],
  remote: true,
  // The URL itself: two spellings of one resource are not worth a request to tell apart.
  identity: async (location) => location,
  open: (location, o) => HttpDriver.open(location, o.http ?? {}),
};
