/**
 * What the FUSE tests need from the machine. A missing piece fails the test
 * with a message that says what to install or how to run; nothing is skipped.
 */
import fs from 'node:fs';
import { execFileSync } from 'node:child_process';
import { afterAll, beforeAll } from 'vitest';
import { tmpdir } from './vdisk.js';

export function requireFuseRoot(): void {
  if (process.getuid?.() !== 0) throw new Error('FUSE tests mount filesystems and set readahead: run them as root (sudo npm test)');
  try {
    fs.accessSync('/dev/fuse', fs.constants.R_OK | fs.constants.W_OK);
  } catch {
    throw new Error('FUSE tests need /dev/fuse (modprobe fuse; in a container: --device /dev/fuse --cap-add SYS_ADMIN)');
  }
  if (!fs.existsSync(new URL('../../build/Release/vdisk_fuse.node', import.meta.url))) {
    throw new Error('the native addon is not built: npm run build:native (needs libfuse3-dev)');
  }
  if (!fs.existsSync(new URL('../../dist/cli/main.js', import.meta.url))) throw new Error('dist/ is missing: npm run build');
}

export function requireTool(tool: string, debianPackage: string): void {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
  } catch {
    throw new Error(`${tool} is missing: apt-get install ${debianPackage} (scripts/setup.sh does)`);
  }
}

export interface ScratchOptions {
  /** Mounts: root and /dev/fuse (the default). */
  fuse?: boolean;
  /** Commands the tests run, with the Debian package that has each. */
  tools?: Record<string, string>;
}

/**
 * The set-up most test files share: check the machine before the tests, make
 * a scratch directory for them (handed to `ready`) and remove it after them.
 * Hooks a file adds later run after this one, and their afterAll before its.
 */
export function useScratchDir(options: ScratchOptions, ready: (dir: string) => void): void {
  let dir: string | undefined;
  beforeAll(() => {
    if (options.fuse !== false) requireFuseRoot();
    for (const [tool, pkg] of Object.entries(options.tools ?? {})) requireTool(tool, pkg);
    dir = tmpdir();
    ready(dir);
  });
  afterAll(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });
}
