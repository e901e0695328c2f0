import { readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { ERROR_TABLE, VdiskError, codeOf, errnoOf, type ErrorCode } from '../src/errors.js';

const E = constants.errno as Record<string, number>;

/** docs/ERRORS.md's table: code -> the errno name of its second column. */
function documentedErrnos(): Map<string, string> {
  const doc = readFileSync(new URL('../docs/ERRORS.md', import.meta.url), 'utf8');
  const rows = new Map<string, string>();
  for (const m of doc.matchAll(/^\| `(\w+)` \| (\w+) \|/gm)) rows.set(m[1]!, m[2]!);
  return rows;
}

describe('error table', () => {
  it.each(Object.keys(ERROR_TABLE) as ErrorCode[])('%s has a code, the errno the docs name, and a message', (code) => {
    const err = new VdiskError(code);
    expect(err.code).toBe(code);
    expect(codeOf(err)).toBe(code);
    // The errno the FUSE export answers with is the one docs/ERRORS.md promises ...
    const name = documentedErrnos().get(code);
    expect(name, `docs/ERRORS.md has no row for ${code}`).toBeDefined();
    expect(E[name!], `${name} is not an errno name`).toBeTypeOf('number');
    expect(err.errno, `${code}: errno ${err.errno}, docs say ${name} (${E[name!]})`).toBe(E[name!]);
    // ... and a code named like an errno answers that errno (ENOTSUP is EOPNOTSUPP on Linux).
    if (code in E) expect(err.errno).toBe(E[code]);
    expect(err.message).toBe(ERROR_TABLE[code].message);
    expect(err.message.length).toBeGreaterThan(3);
    expect(errnoOf(err)).toBe(err.errno);
  });

  it('maps Node system errors by code and anything else to EIO', () => {
    expect(errnoOf(Object.assign(new Error('x'), { code: 'ENOSPC' }))).toBe(constants.errno.ENOSPC);
    expect(errnoOf(new Error('plain'))).toBe(constants.errno.EIO);
    expect(errnoOf(new VdiskError('ENOTSUP'))).toBe(constants.errno.EOPNOTSUPP);
  });
});

describe('docs/ERRORS.md', () => {
  it('lists every code of the table with its errno, and no code the table lacks', () => {
    const rows = documentedErrnos();
    const fromTable = new Map(Object.entries(ERROR_TABLE).map(([code, e]) => [code, Object.keys(E).find((n) => E[n] === e.errno && n !== 'ENOTSUP')]));
    expect(Object.fromEntries(rows)).toEqual(Object.fromEntries(fromTable));
  });
});
