#!/usr/bin/env bash
# Install everything vdisk needs on a fresh Debian machine, idempotently:
# system packages (only those missing), npm dependencies, the native addon
# and the TypeScript build. Run as root (apt-get, and FUSE mounts need it).
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (apt-get install and FUSE mounts need it)" >&2
    exit 1
  fi
}

# Debian packages: the FUSE library and tools, the native build chain, and the
# real tools the tests and the demo drive (qemu-img, fio, nginx, genisoimage/isoinfo, curl, openssl,
# losetup from mount for the block-device test).
# qemu-block-extra is qemu's curl module: qemu-img on an http(s) backing needs it,
# and --no-install-recommends would otherwise drop it.
packages=(libfuse3-dev fuse3 pkg-config make g++ python3 qemu-utils qemu-block-extra fio ca-certificates nginx-light genisoimage curl openssl mount)
command -v node >/dev/null 2>&1 || packages+=(nodejs npm)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -e /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
  [ -e /dev/fuse ] || echo "setup: warning: /dev/fuse is missing; mounts will fail (in a container: --device /dev/fuse)" >&2
fi

# npm dependencies (and, through the package's install script, the native addon).
# npm ci installs exactly the committed lock (which lists every platform's
# optional packages), so every machine gets the same tree and the clone stays clean.
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
# Rebuild the addon when any of its sources (or binding.gyp) is newer than it.
addon=build/Release/vdisk_fuse.node
if [ ! -f "$addon" ] || [ -n "$(find native binding.gyp -newer "$addon" -print -quit)" ]; then
  npm run --silent build:native >/dev/null
fi
npm run --silent build
echo "setup: ready (node $(node --version), $(pkg-config --modversion fuse3 | sed 's/^/libfuse /'), $(qemu-img --version | head -1))"
