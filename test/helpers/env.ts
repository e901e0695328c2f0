/**
 * What the FUSE tests need from the machine. A missing piece fails the test
 * with a message that says what to install or how to run; nothing is skipped.
 */
import fs from 'node:fs';
import { execFileSync } from 'node:child_process';

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
