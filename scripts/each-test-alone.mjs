#!/usr/bin/env node
/**
 * Run every test of the suite by itself (`vitest run FILE -t NAME`), one after
 * the other, and list those that fail alone: a test that passes only after
 * another one leans on state it did not make. Slow (one vitest start per test);
 * for a check before merging, not for CI.
 *
 *   node scripts/each-test-alone.mjs [FILE ...]    (default: every test file)
 *
 * Prints one line per test (ok / FAIL / NOT RUN) and exits 1 if any failed.
 * The build (dist/, the addon) must be in place: the tests run the CLI from dist/.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const vitest = ['node_modules/.bin/vitest'];
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'each-test-alone-'));
const listFile = path.join(work, 'list.json');
const list = spawnSync(vitest[0], ['list', `--json=${listFile}`, ...process.argv.slice(2)], { stdio: ['ignore', 'ignore', 'inherit'] });
if (list.status !== 0) {
  console.error('vitest list failed');
  process.exit(2);
}
const tests = JSON.parse(fs.readFileSync(listFile, 'utf8'));

/** vitest matches -t against the names of a test's suites and its own, joined by spaces. */
const escape = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

let failed = 0;
for (const [i, t] of tests.entries()) {
  const file = path.relative(process.cwd(), t.file);
  const pattern = `${escape(t.name.split(' > ').join(' '))}$`;
  const report = path.join(work, `r${i}.json`);
  const r = spawnSync(vitest[0], ['run', file, '-t', pattern, '--reporter=json', `--outputFile=${report}`], { encoding: 'utf8' });
  let passed = 0;
  let run = 0;
  try {
    const j = JSON.parse(fs.readFileSync(report, 'utf8'));
    passed = j.numPassedTests;
    run = j.numPassedTests + j.numFailedTests;
  } catch {
    /* no report: the file itself failed to load */
  }
  const verdict = r.status === 0 && passed >= 1 ? 'ok' : run === 0 && r.status === 0 ? 'NOT RUN' : 'FAIL';
  if (verdict !== 'ok') failed++;
  console.log(`${verdict.padEnd(7)} ${file} > ${t.name}${run > 1 ? ` (pattern matched ${run} tests)` : ''}`);
  if (verdict === 'FAIL') console.log((r.stdout + r.stderr).split('\n').filter((l) => /Error|expected|FAIL|AssertionError/.test(l)).slice(0, 8).map((l) => `        ${l}`).join('\n'));
}
fs.rmSync(work, { recursive: true, force: true });
console.log(`${tests.length - failed} of ${tests.length} tests pass alone`);
process.exit(failed ? 1 : 0);
