#!/usr/bin/env bash
# Side-by-side benchmark: the same 1 GiB raw image served through a vdisk mount
# and through qemu-storage-daemon's FUSE export, measured by the same dd and fio
# commands in one run. Prints each figure (median of RUNS runs) and vdisk/qemu.
#
#   sudo bash bench/raw-vs-qemu.sh            # RUNS=4 SIZE_MB=1024 FIO_SECONDS=10 by default
#
# Not a test: numbers depend on the machine. The image sits in the host page
# cache for both, and the mounted file's own page cache is dropped before each
# read, so the figures compare the FUSE servers, not the disk.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
RUNS=${RUNS:-4}
SIZE_MB=${SIZE_MB:-1024}
FIO_SECONDS=${FIO_SECONDS:-10}

[ "$(id -u)" -eq 0 ] || { echo "bench: run as root" >&2; exit 1; }
need=()
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
command -v fio >/dev/null || need+=(fio)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -f "$here/dist/cli/main.js" ] || bash "$here/scripts/setup.sh"

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

wait_mounted() { # mountpoint pid
  for _ in $(seq 200); do
    grep -q " $1 fuse" /proc/mounts && return 0
    kill -0 "$2" 2>/dev/null || { echo "bench: server died" >&2; return 1; }
    sleep 0.05
  done
  echo "bench: $1 never mounted" >&2; return 1
}

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

dd_rate() { # prints MB/s from dd's last line
  LC_ALL=C dd "$@" 2>&1 | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s,") { r = $(i+1); u = $(i+2) } } END {
    if (u == "GB/s") r *= 1000; else if (u == "kB/s") r /= 1000; printf "%.0f\n", r }'
}
fio_iops() { # mountpoint iodepth rw
  fio --name=b --filename="$1" --rw="$3" --bs=4k --ioengine=libaio --iodepth="$2" --direct=1 \
    --time_based --runtime="$FIO_SECONDS" --size="${SIZE_MB}M" --randrepeat=0 --output-format=json 2>/dev/null |
    node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s.slice(s.indexOf("{"))).jobs[0];const r=j.read.iops||j.write.iops;console.log(Math.round(r))})'
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

median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# Alternate which server goes first: the first reads after the images are written
# are measurably slower on this kind of VM, whoever does them.
for run in $(seq "$RUNS"); do
  if [ $((run % 2)) -eq 1 ]; then
    measure vdisk start_vdisk "$run"
    measure qemu start_qemu "$run"
  else
    measure qemu start_qemu "$run"
    measure vdisk start_vdisk "$run"
  fi
done

printf '\n%-34s %12s %12s %8s\n' "raw, ${SIZE_MB} MiB (median of $RUNS)" vdisk qemu-fuse ratio
for metric in "seqread:dd read bs=1M (MB/s)" "seqwrite:dd write bs=1M+fsync (MB/s)" "randread1:fio 4k randread QD1 (IOPS)" "randread16:fio 4k randread QD16 (IOPS)"; do
  key=${metric%%:*}; label=${metric#*:}
  v=(); q=()
  for run in $(seq "$RUNS"); do v+=("${results[vdisk,$key,$run]}"); q+=("${results[qemu,$key,$run]}"); done
  mv=$(median "${v[@]}"); mq=$(median "${q[@]}")
  printf '%-34s %12s %12s %8s\n' "$label" "$mv" "$mq" "$(awk -v a="$mv" -v b="$mq" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
done
