/** `vdisk create -f qcow2 -o ...`: the options, parsed and checked before anything is written. */
import { VdiskError } from '../../errors.js';
import { parseInteger, parseSize } from '../../number-text.js';
import type { Qcow2CreateOptions } from './create.js';

export const QCOW2_CREATE_HELP = 'qcow2: cluster_size=64k,compat=1.1|0.10,extended_l2=on,refcount_bits=16,lazy_refcounts=on,preallocation=metadata,copy_on_read=on';

function onOff(key: string, v: string): boolean {
  if (['on', 'true', 'yes', '1'].includes(v)) return true;
  if (['off', 'false', 'no', '0'].includes(v)) return false;
  throw new VdiskError('ERR_USAGE', `-o ${key}= takes on or off, not '${v}'`);
}

export function parseQcow2Options(list: string[]): Omit<Qcow2CreateOptions, 'size'> {
  const out: Omit<Qcow2CreateOptions, 'size'> = {};
  for (const item of list.flatMap((s) => s.split(',')).filter(Boolean)) {
    const [key, value = ''] = item.split('=', 2) as [string, string?];
    switch (key) {
      case 'cluster_size':
        out.clusterSize = parseSize(value, '-o cluster_size=');
        break;
      case 'compat':
        if (value === '0.10' || value === 'v2') out.compat = '0.10';
        else if (value === '1.1' || value === 'v3') out.compat = '1.1';
        else throw new VdiskError('ERR_USAGE', `-o compat= takes 0.10 or 1.1, not '${value}'`);
        break;
      case 'extended_l2':
        out.extendedL2 = onOff(key, value);
        break;
      case 'refcount_bits':
        out.refcountBits = parseInteger(value, '-o refcount_bits=', { min: 1, max: 64 });
        break;
      case 'lazy_refcounts':
        out.lazyRefcounts = onOff(key, value);
        break;
      case 'copy_on_read':
        out.copyOnRead = onOff(key, value);
        break;
      case 'preallocation':
        if (value !== 'off' && value !== 'metadata') throw new VdiskError('ERR_USAGE', `-o preallocation= takes off or metadata, not '${value}'`);
        out.preallocation = value;
        break;
      default:
        throw new VdiskError('ERR_USAGE', `unknown -o option '${key}'`);
    }
  }
  return out;
}
