import { constants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { ERROR_TABLE, VdiskError, errnoOf, type ErrorCode } from '../src/errors.js';

describe('error table', () => {
  it.each(Object.keys(ERROR_TABLE) as ErrorCode[])('%s has a code, an errno and a message', (code) => {
    const err = new VdiskError(code);
    expect(err.code).toBe(code);
    expect(err.errno).toBeGreaterThan(0);
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
  it('lists every code of the table', async () => {
    const { readFileSync } = await import('node:fs');
    const doc = readFileSync(new URL('../docs/ERRORS.md', import.meta.url), 'utf8');
    for (const code of Object.keys(ERROR_TABLE)) expect(doc).toContain(`| \`${code}\` |`);
  });
});
