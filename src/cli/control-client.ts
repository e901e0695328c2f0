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

/** Send one request; the first answer line. An `error` answer is thrown with the mount's code. */
export async function ask(sock: net.Socket, req: ControlRequest): Promise<ControlReply> {
  sock.write(`${JSON.stringify(req)}\n`);
  let buf = '';
  for await (const chunk of sock) {
    buf += (chunk as Buffer).toString();
    if (buf.includes('\n')) break;
  }
  sock.destroy();
  const nl = buf.indexOf('\n');
  if (nl < 0) throw new VdiskError('EIO', 'the mount closed its control socket without an answer');
  const reply = JSON.parse(buf.slice(0, nl)) as ControlReply;
  // Any code the mount reports (it may be a system one, not in our table) is passed on as it is.
  if (reply.type === 'error') throw Object.assign(new Error(reply.message ?? 'error'), { code: reply.code ?? 'EIO' });
  return reply;
}
