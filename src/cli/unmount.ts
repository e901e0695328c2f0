/** `vdisk unmount`: end a vdisk mount, also one whose process died. */
import { spawn } from 'node:child_process';
import type { Argv } from 'yargs';
import { VdiskError } from '../errors.js';
import { mountedPaths, mountinfoPath } from '../export/mountpoint.js';
import { MNT_DETACH, UMOUNT_NOFOLLOW, native } from '../native.js';

export interface UnmountArgs {
  mountpoint: string;
  lazy: boolean;
}

export function unmountOptions(y: Argv): Argv<UnmountArgs> {
  return y
    .positional('mountpoint', { type: 'string', demandOption: true, describe: 'the file a vdisk mount is on' })
    .option('lazy', { alias: 'z', type: 'boolean', default: false, describe: 'detach now even while files are open; the server exits once they close' }) as unknown as Argv<UnmountArgs>;
}

function fusermount(mountpoint: string, lazy: boolean): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('fusermount3', ['-u', ...(lazy ? ['-z'] : []), mountpoint], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', (err) => reject(new VdiskError('ENOENT', `cannot run fusermount3: ${err.message}`)));
    child.on('close', (code) => (code === 0 ? resolve() : reject(new VdiskError('EBUSY', stderr.trim() || `fusermount3 exited with ${code}`))));
  });
}

export async function runUnmount(args: UnmountArgs): Promise<void> {
  // Resolve the directory, not the file: a mount whose server died answers ENOTCONN to any
  // lookup, and a mount is on the file itself, never on what a symlink names (as vdisk mount).
  let real: string;
  try {
    real = await mountinfoPath(args.mountpoint);
  } catch (err) {
    // Another user's symlink on the way is refused as by mount; a missing directory is simply no mount.
    if ((err as { code?: string }).code === 'ERR_MOUNTPOINT' && /symlink/.test((err as Error).message)) throw err;
    throw new VdiskError('ERR_NOT_MOUNTED', `${args.mountpoint} does not exist`);
  }
  const fstype = (await mountedPaths()).get(real);
  if (fstype === undefined) throw new VdiskError('ERR_NOT_MOUNTED', `nothing is mounted on ${args.mountpoint}`);
  // vdisk mounts with subtype=vdisk: an sshfs or another FUSE filesystem there is not ours to end.
  if (fstype !== 'fuse.vdisk') throw new VdiskError('ERR_NOT_MOUNTED', `${args.mountpoint} is a ${fstype} mount, not vdisk's`);
  if (process.getuid?.() !== 0) return fusermount(real, args.lazy);
  try {
    await native().umount(real, (args.lazy ? MNT_DETACH : 0) | UMOUNT_NOFOLLOW);
  } catch (err) {
    if ((err as { code?: string }).code === 'EBUSY') {
      throw new VdiskError('EBUSY', `${args.mountpoint} is busy (a file is open on it); close it or use --lazy`);
    }
    throw err;
  }
}
