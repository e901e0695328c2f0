/**
 * What every request-layer entry does around its work: validate at the edge,
 * then count the request in flight and track its range (begin), and undo both
 * (end). One place, so drain, serialisation and the notifier see every request.
 * Plain functions, no closures: the 4k path allocates nothing here but the
 * tracked request itself.
 */
import type { BlockNode } from './node.js';
import type { RequestKind, TrackedRequest } from './tracked-requests.js';
import { iovBytes } from './iov.js';
import { VdiskError } from '../errors.js';

export function checkRequest(node: BlockNode, offset: number, bytes: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
    throw new VdiskError('EINVAL', `bad request offset=${offset} bytes=${bytes}`);
  }
  const size = node.size();
  if (node.driver.growable) return; // a host file under a format driver: past the end reads zero, writes grow it
  if (offset > size || bytes > size - offset) {
    throw new VdiskError('EINVAL', `request offset=${offset} bytes=${bytes} is beyond the end of ${node.name} (size ${size})`);
  }
}

export function checkWritable(node: BlockNode): void {
  if (node.readOnly) throw new VdiskError('EROFS', `${node.name} is read-only`);
}

export function checkIov(iov: readonly Buffer[], bytes: number): void {
  if (iovBytes(iov) !== bytes) throw new VdiskError('EINVAL', `buffer list holds ${iovBytes(iov)} bytes, request is ${bytes}`);
}

/** Count the request in flight (drain waits for it) and track [offset, offset+bytes). */
export function beginRequest(node: BlockNode, offset: number, bytes: number, kind: RequestKind): TrackedRequest {
  node.incInFlight();
  return node.tracker.begin(offset, bytes, kind);
}

export function endRequest(node: BlockNode, req: TrackedRequest): void {
  node.tracker.end(req);
  node.decInFlight();
}
