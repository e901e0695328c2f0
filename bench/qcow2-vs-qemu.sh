#!/usr/bin/env bash
# Side-by-side qcow2 benchmark: vdisk vs qemu-storage-daemon's FUSE export on the
# same images, same commands, one run. Prints medians of RUNS runs and vdisk/qemu.
#
#   sudo bash bench/qcow2-vs-qemu.sh        # RUNS=4 SIZE_MB=1024 FIO_SECONDS=10
#
# Rows: sequential read of a fully allocated image; sequential write into a new
# (allocating) image; fio 4k random read QD1/QD16 and random write QD16 on the
# allocated image; the time of a 1 GiB write-zeroes (fallocate -z) on a new image.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
RUNS=${RUNS:-4}
SIZE_MB=${SIZE_MB:-1024}
FIO_SECONDS=${FIO_SECONDS:-10}

bench_prepare qemu-storage-daemon:qemu-system-common fio:fio qemu-img:qemu-utils

work="$(mktemp -d /var/tmp/vdisk-bench.XXXXXX)"
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  for m in "$work"/mnt-*; do grep -q " $m " /proc/mounts && umount -l "$m"; done 2>/dev/null || true
  rm -rf "$work" /dev/shm/vdisk-bench-src
}
trap cleanup EXIT

echo "bench: qcow2, ${SIZE_MB} MiB of random data, $RUNS runs, fio ${FIO_SECONDS}s per run"
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom > /dev/shm/vdisk-bench-src
qemu-img convert -O qcow2 -f raw /dev/shm/vdisk-bench-src "$work/full.qcow2"

start_vdisk() { # image mountpoint
  touch "$2"
  node "$here/dist/cli/main.js" mount "$1" "$2" 2>>"$work/vdisk.log" &
  server=$!
  wait_mounted "$2" "$server"
}
start_qemu() {
  touch "$2"
  qemu-storage-daemon \
    --blockdev node-name=file0,driver=file,filename="$1",cache.direct=off,aio=threads \
    --blockdev node-name=fmt0,driver=qcow2,file=file0 \
    --export type=fuse,id=exp0,node-name=fmt0,mountpoint="$2",writable=on >>"$work/qsd.log" 2>&1 &
  server=$!
  wait_mounted "$2" "$server"
}
stop_server() { kill -INT "$server"; wait "$server" 2>/dev/null || true; server=""; }
ms_of() { local t0 t1; t0=$(date +%s%N); "$@"; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }

declare -A results
measure() { # name start_fn run
  local name=$1 start=$2 run=$3 mnt="$work/mnt-$1"
  cp --sparse=always "$work/full.qcow2" "$work/run.qcow2"
  sync; cat "$work/run.qcow2" >/dev/null
  $start "$work/run.qcow2" "$mnt"
  results[$name,seqread,$run]=$(dd_rate if="$mnt" of=/dev/null bs=1M)
  results[$name,randread1,$run]=$(fio_iops "$mnt" 1 randread)
  results[$name,randread16,$run]=$(fio_iops "$mnt" 16 randread)
  results[$name,randwrite16,$run]=$(fio_iops "$mnt" 16 randwrite)
  stop_server
  # Each measurement starts with nothing dirty: the random writes above leave writeback behind them.
  sync
  rm -f "$work/new.qcow2"; qemu-img create -q -f qcow2 "$work/new.qcow2" "${SIZE_MB}M"
  $start "$work/new.qcow2" "$mnt"
  results[$name,seqwrite,$run]=$(dd_rate if=/dev/shm/vdisk-bench-src of="$mnt" bs=1M conv=notrunc,fsync)
  stop_server
  rm -f "$work/new.qcow2"; qemu-img create -q -f qcow2 "$work/new.qcow2" "${SIZE_MB}M"
  $start "$work/new.qcow2" "$mnt"
  results[$name,zero1g,$run]=$(ms_of sh -c "fallocate -z -o 0 -l ${SIZE_MB}M $mnt && sync $mnt")
  stop_server
  echo "bench: $name run $run: seqread ${results[$name,seqread,$run]} MB/s, seqwrite ${results[$name,seqwrite,$run]} MB/s, randread QD1 ${results[$name,randread1,$run]}, QD16 ${results[$name,randread16,$run]}, randwrite QD16 ${results[$name,randwrite16,$run]} IOPS, write-zeroes ${results[$name,zero1g,$run]} ms"
}
alternate_runs

printf '\n%-42s %12s %12s %8s\n' "qcow2, ${SIZE_MB} MiB (median of $RUNS)" vdisk qemu-fuse ratio
print_rows "seqread:dd read bs=1M (MB/s)" "seqwrite:dd write bs=1M, allocating (MB/s)" "randread1:fio 4k randread QD1 (IOPS)" \
  "randread16:fio 4k randread QD16 (IOPS)" "randwrite16:fio 4k randwrite QD16 (IOPS)" "zero1g:fallocate -z ${SIZE_MB} MiB (ms, lower is better)"
