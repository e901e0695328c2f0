#!/usr/bin/env bash
# Side-by-side benchmark: the same 1 GiB raw image served through a vdisk mount
# and through qemu-storage-daemon's FUSE export, measured by the same dd and fio
# commands in one run. Prints each figure (median of RUNS runs) and vdisk/qemu.
#
#   sudo bash bench/raw-vs-qemu.sh            # RUNS=4 SIZE_MB=1024 FIO_SECONDS=10 by default
#
# Not a test: numbers depend on the machine. The image sits in the host page
# cache for both and every measurement starts on a fresh mount, so the figures
# compare the FUSE servers, not the disk.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
RUNS=${RUNS:-4}
SIZE_MB=${SIZE_MB:-1024}
FIO_SECONDS=${FIO_SECONDS:-10}

bench_prepare qemu-storage-daemon:qemu-system-common fio:fio

work="$(mktemp -d /var/tmp/vdisk-bench.XXXXXX)"
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  grep -q " $work/" /proc/mounts && umount -l "$work"/mnt-* 2>/dev/null || true
  rm -rf "$work" /dev/shm/vdisk-bench-src
}
trap cleanup EXIT

img="$work/disk.img"
echo "bench: ${SIZE_MB} MiB raw image of random data, $RUNS runs, fio ${FIO_SECONDS}s per run"
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom > /dev/shm/vdisk-bench-src
cp /dev/shm/vdisk-bench-src "$img"

start_vdisk() {
  touch "$1"
  node "$here/dist/cli/main.js" mount "$img" "$1" 2>"$work/vdisk.log" &
  server=$!
  wait_mounted "$1" "$server"
}

start_qemu() {
  touch "$1"
  qemu-storage-daemon \
    --blockdev node-name=file0,driver=file,filename="$img",cache.direct=off,aio=threads \
    --blockdev node-name=fmt0,driver=raw,file=file0 \
    --export type=fuse,id=exp0,node-name=fmt0,mountpoint="$1",writable=on >"$work/qsd.log" 2>&1 &
  server=$!
  wait_mounted "$1" "$server"
}

stop_server() {
  kill -INT "$server"
  wait "$server" 2>/dev/null || true
  server=""
}

declare -A results
measure() { # name start_fn run
  local name=$1 start=$2 run=$3 mnt="$work/mnt-$1"
  # Same start for both servers: no writeback in progress, the image in the host page cache.
  sync
  cat "$img" >/dev/null
  $start "$mnt"
  results[$name,seqread,$run]=$(dd_rate if="$mnt" of=/dev/null bs=1M)
  results[$name,seqwrite,$run]=$(dd_rate if=/dev/shm/vdisk-bench-src of="$mnt" bs=1M conv=notrunc,fsync)
  results[$name,randread1,$run]=$(fio_iops "$mnt" 1 randread)
  results[$name,randread16,$run]=$(fio_iops "$mnt" 16 randread)
  stop_server
  echo "bench: $name run $run: seqread ${results[$name,seqread,$run]} MB/s, seqwrite ${results[$name,seqwrite,$run]} MB/s, randread QD1 ${results[$name,randread1,$run]} IOPS, QD16 ${results[$name,randread16,$run]} IOPS"
}

alternate_runs

printf '\n%-42s %12s %12s %8s\n' "raw, ${SIZE_MB} MiB (median of $RUNS)" vdisk qemu-fuse ratio
print_rows "seqread:dd read bs=1M (MB/s)" "seqwrite:dd write bs=1M+fsync (MB/s)" "randread1:fio 4k randread QD1 (IOPS)" "randread16:fio 4k randread QD16 (IOPS)"
