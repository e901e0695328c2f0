/**
 * The client side of a mount's control socket (src/export/control.ts) for the
 * job commands: find the mount serving an image or a mountpoint, or every
 * mount of the user, and ask one question.
 */
import fs from 'node:fs/promises';
import type net from 'node:net';
import path from 'node:path';
import { connectControl, connectSocket, controlDir, type ControlRequest } from '../export/control.js';
import { ensurePrivateDir } from '../export/private-dir.js';
import { mountinfoPath } from '../export/mountpoint.js';
import type { JobInfo } from '../jobs/job.js';
import { VdiskError } from '../errors.js';
import { displayName } from '../drivers/http/url.js';

/**
 * The mount serving `target`, an image or a mountpoint; null when none does.
 * The image's real path is tried first, then the mountpoint's path as
 * mountinfo shows it (its last component not followed, as mount does).
 */
export async function connectTarget(target: string): Promise<net.Socket | null> {
  let real: string | null = null;
  try {
    real = await fs.realpath(target);
  } catch {
    throw new VdiskError('ERR_IMAGE_NOT_FOUND', `not found: ${displayName(target)}`);
  }
  const byImage = await connectControl(real);
  if (byImage) return byImage;
  const mp = await mountinfoPath(target);
  return mp === real ? null : connectControl(mp);
}

/** Every control socket of the user, whoever serves it (each mount listens under two names). */
export async function connectAll(): Promise<{ path: string; sock: net.Socket }[]> {
  const dir = controlDir();
  if (!(await ensurePrivateDir(dir, { create: false }))) return [];
  const out: { path: string; sock: net.Socket }[] = [];
  for (const name of (await fs.readdir(dir)).filter((n) => n.endsWith('.sock')).sort()) {
    const sock = await connectSocket(path.join(dir, name));
    if (sock) out.push({ path: path.join(dir, name), sock });
  }
  return out;
}

export interface ControlReply {
  type: string;
  code?: string;
  message?: string;
  jobs?: JobInfo[];
  job?: JobInfo;
  pid?: number;
}

/** The newline-delimited JSON messages a mount sends on its control socket, in order. */
export async function* controlMessages<T>(sock: net.Socket): AsyncGenerator<T> {
  let buf = '';
  for await (const chunk of sock) {
    buf += (chunk as Buffer).toString();
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      yield JSON.parse(buf.slice(0, nl)) as T;
      buf = buf.slice(nl + 1);
    }
  }
}

/**
 * A mount's `error` message as an error to throw. Any code the mount reports
 * (it may be a system one, not in our table) is passed on as it is.
 */
export function mountError(msg: { code?: string; message?: string }): Error {
  return Object.assign(new Error(msg.message ?? 'error'), { code: msg.code ?? 'EIO' });
}

/** Send one request; the first answer line. An `error` answer is thrown with the mount's code. */
export async function ask(sock: net.Socket, req: ControlRequest): Promise<ControlReply> {
  sock.write(`${JSON.stringify(req)}\n`);
  try {
    for await (const reply of controlMessages<ControlReply>(sock)) {
      if (reply.type === 'error') throw mountError(reply);
      return reply;
    }
  } finally {
    sock.destroy();
  }
  throw new VdiskError('EIO', 'the mount closed its control socket without an answer');
}
