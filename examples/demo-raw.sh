#!/usr/bin/env bash
# The vdisk walk-through on a local demo image: create a raw disk, mount it as
# one file, write and read it with dd, zero and punch ranges with fallocate,
# watch `du` follow, then unmount. Everything lives in a temporary directory.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
vdisk() { node "$here/dist/cli/main.js" "$@"; }
# shellcheck source=scripts/lib/serve.sh
. "$here/scripts/lib/serve.sh"
work="$(mktemp -d /var/tmp/vdisk-demo.XXXXXX)"
server=""
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then vdisk unmount --lazy "$work/disk" 2>/dev/null || kill -INT "$server"; wait "$server" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "create a sparse 256 MiB raw image"
vdisk create "$work/disk.img" 256M
vdisk info "$work/disk.img"

step "mount it on an empty regular file"
touch "$work/disk"
node "$here/dist/cli/main.js" mount "$work/disk.img" "$work/disk" --stats 2> "$work/vdisk.log" &
server=$!
wait_serving "$work/vdisk.log" "$server"
cat "$work/vdisk.log"
ls -l "$work/disk"

step "write 64 MiB with dd, read it back, compare with the image file"
dd if=/dev/urandom of="$work/disk" bs=1M count=64 seek=16 conv=notrunc,fsync status=none
dd if="$work/disk" of=/dev/null bs=1M status=progress 2>&1 | tail -1
cmp "$work/disk" "$work/disk.img" && echo "mounted file and image are identical"
echo "du of the mounted file: $(du -h "$work/disk" | cut -f1) (data held in the image)"

step "fallocate -z: zero 8 MiB (write-zeroes); -p: punch 32 MiB (discard, frees space)"
fallocate -z -o 16M -l 8M "$work/disk"
fallocate -p -o 40M -l 32M "$work/disk"
cmp -n 8388608 "$work/disk" /dev/zero -i 16777216:0 && echo "zeroed range reads as zero"
echo "du of the mounted file after the punch: $(du -h "$work/disk" | cut -f1)"

step "block status: where the data is (vdisk map on the image)"
vdisk map "$work/disk.img"

step "a sparse copy out of the mount (cp finds the holes through SEEK_HOLE)"
cp --sparse=auto "$work/disk" "$work/copy.img"
echo "copy: $(du -h "$work/copy.img" | cut -f1) on disk for $(du -h --apparent-size "$work/copy.img" | cut -f1)"

step "unmount"
vdisk unmount "$work/disk"
wait "$server"
server=""
tail -2 "$work/vdisk.log"
