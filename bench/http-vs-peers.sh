#!/usr/bin/env bash
# Side-by-side benchmark of a remote image read with copy-on-read, served by
# nginx on 127.0.0.1, in one run:
#   vdisk        qcow2 overlay on the URL, mounted with --copy-on-read (direct I/O, its default,
#                as qemu's FUSE export always is)
#   vdisk-pc     the same with --no-direct-io: the kernel page cache on the mounted file
#   nbdkit       curl plugin + cow filter (cow-on-read=true), exposed by nbdfuse
#   qemu         qemu-storage-daemon: http backing under a qcow2 overlay, copy-on-read filter, FUSE export
#   curl         curl -o /dev/null: the ceiling for fetching
#   curl-file    curl -o FILE: fetching and storing every byte, the least any copy-on-read
#                pass must do (it also hands every byte to its reader)
# For each: first and second full sequential read (dd bs=1M) in MB/s, and the
# bytes nginx sent during each pass. Medians of RUNS runs; ratios vs vdisk.
#
#   sudo bash bench/http-vs-peers.sh      # RUNS=4 SIZE_MB=1024 (each tool goes first once)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
# shellcheck source=scripts/lib/serve.sh
. "$here/scripts/lib/serve.sh"
RUNS=${RUNS:-4}
SIZE_MB=${SIZE_MB:-1024}
# qemu 7.2's curl driver sometimes stops answering (then its dd makes no progress): give up after this long.
DD_TIMEOUT=${DD_TIMEOUT:-120}

bench_prepare qemu-storage-daemon:qemu-system-common nbdkit:nbdkit nbdfuse:libnbd-bin nginx:nginx-light curl:curl
# qemu's http driver is a loadable module, packaged in qemu-block-extra.
[ -f /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ] || bench_need block-curl.so:qemu-block-extra
vdisk() { node "$here/dist/cli/main.js" "$@"; }

work="$(mktemp -d /var/tmp/vdisk-bench.XXXXXX)"
server=""
# Lazily unmount whatever is still mounted under $work (a peer that hung or was killed).
detach_mounts() { for m in "$work"/mnt-*; do grep -q " $m " /proc/mounts && umount -l "$m"; done 2>/dev/null || true; }
cleanup() {
  # A peer stuck on a request may not exit on a signal: it gets killed.
  [ -n "$server" ] && { kill -KILL "$server" 2>/dev/null; wait "$server" 2>/dev/null; } || true
  detach_mounts
  nginx_stop
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/www"
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom > "$work/www/disk.raw"
nginx_start "$work/www" "$work" 2
url="http://127.0.0.1:$nginx_port/disk.raw"
cat "$work/www/disk.raw" >/dev/null
# Reads right after a large write run slower on this kind of VM while writeback goes on:
# every measurement starts with nothing dirty (the image here, each overlay after its run).
sync
echo "bench: ${SIZE_MB} MiB image served by nginx at $url, $RUNS runs"

served() { nginx_bytes_served "$work"; }
wait_file() { # path pid: until the exported file answers stat with its size
  local size rc
  for _ in $(seq 400); do
    # A peer can hang on its very first request (qemu 7.2's curl driver does): stat in a child that can be killed.
    rc=0; size=$(timeout -s KILL 20 stat -c %s "$1" 2>/dev/null) || rc=$?
    [ "$rc" -eq 137 ] && { echo "bench: $1 does not answer" >&2; return 1; }
    [ "${size:-0}" -gt 0 ] && return 0
    kill -0 "$2" 2>/dev/null || { echo "bench: server died" >&2; return 1; }
    sleep 0.05
  done
  echo "bench: $1 never answered" >&2; return 1
}
file=""
start_vdisk() { # [mount options]; sets $file, the mounted file to read
  rm -f "$work/v.qcow2"; vdisk create -f qcow2 -b "$url" -F raw "$work/v.qcow2" >/dev/null
  touch "$work/mnt-vdisk"
  node "$here/dist/cli/main.js" mount --copy-on-read "$@" "$work/v.qcow2" "$work/mnt-vdisk" 2>>"$work/vdisk.log" &
  server=$!
  file="$work/mnt-vdisk"
  wait_file "$file" "$server"
}
# The same with the kernel page cache on the mounted file: the first pass costs one copy
# more, the second is served by the kernel without reaching vdisk.
start_vdisk-pc() { start_vdisk --no-direct-io; }
start_nbdkit() {
  mkdir -p "$work/mnt-nbd"
  nbdfuse "$work/mnt-nbd/disk" --command nbdkit -s curl url="$url" --filter=cow cow-on-read=true >>"$work/nbd.log" 2>&1 &
  server=$!
  file="$work/mnt-nbd/disk"
  wait_file "$file" "$server"
}
start_qemu() {
  rm -f "$work/q.qcow2"; qemu-img create -q -f qcow2 -b "$url" -F raw "$work/q.qcow2"
  touch "$work/mnt-qemu"
  qemu-storage-daemon \
    --blockdev node-name=remote,driver=http,url="$url",read-only=on \
    --blockdev node-name=f,driver=file,filename="$work/q.qcow2" \
    --blockdev node-name=q,driver=qcow2,file=f,backing=remote \
    --blockdev node-name=cor,driver=copy-on-read,file=q \
    --export type=fuse,id=e,node-name=cor,mountpoint="$work/mnt-qemu",writable=on >>"$work/qsd.log" 2>&1 &
  server=$!
  file="$work/mnt-qemu"
  wait_file "$file" "$server"
}
stop_server() { # name; a peer stuck on a request gets 10 s to exit, then is killed and its mount detached
  case "$1" in
    nbdkit) fusermount3 -u "$work/mnt-nbd" 2>/dev/null || umount -l "$work/mnt-nbd" ;;
    *) kill -INT "$server" 2>/dev/null ;;
  esac
  for _ in $(seq 200); do kill -0 "$server" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$server" 2>/dev/null; then
    echo "bench: $1 did not exit; killed" >&2
    kill -KILL "$server" 2>/dev/null
    detach_mounts
  fi
  wait "$server" 2>/dev/null || true
  server=""
}

declare -A results
declare -A hung
measure() { # name
  local name=$1 b0 b1 b2
  b0=$(served)
  if "start_$name"; then results[$name,first,$run]=$(dd_rate if="$file" of=/dev/null bs=1M); else results[$name,first,$run]=0; fi
  b1=$(served)
  results[$name,bytes1,$run]=$((b1 - b0))
  if [ "${results[$name,first,$run]}" = 0 ]; then
    # dd_rate gave up: the reader hung. No second pass; the run is left out of the medians.
    hung[$name]=$(( ${hung[$name]:-0} + 1 ))
    unset "results[$name,first,$run]" "results[$name,bytes1,$run]"
    stop_server "$name"
    echo "bench: $name run $run: the first pass hung (no progress for ${DD_TIMEOUT}s); left out"
    return
  fi
  dd if="$file" iflag=nocache count=0 status=none
  results[$name,second,$run]=$(dd_rate if="$file" of=/dev/null bs=1M)
  b2=$(served)
  results[$name,bytes2,$run]=$((b2 - b1))
  stop_server "$name"
  sync
  echo "bench: $name run $run: first ${results[$name,first,$run]} MB/s (served $((b1 - b0))), second ${results[$name,second,$run]} MB/s (served $((b2 - b1)))"
}

for run in $(seq "$RUNS"); do
  b0=$(served)
  results[curl,first,$run]=$(curl -s -o /dev/null -w '%{speed_download}' "$url" | awk '{ printf "%.0f\n", $1 / 1000000 }')
  results[curl,bytes1,$run]=$(( $(served) - b0 ))
  echo "bench: curl run $run: ${results[curl,first,$run]} MB/s"
  b0=$(served)
  results[curl-file,first,$run]=$(curl -s -o "$work/curl.raw" -w '%{speed_download}' "$url" | awk '{ printf "%.0f\n", $1 / 1000000 }')
  results[curl-file,bytes1,$run]=$(( $(served) - b0 ))
  rm -f "$work/curl.raw"; sync
  echo "bench: curl-file run $run: ${results[curl-file,first,$run]} MB/s"
  # Each run starts with a different tool: the first reads after the image is written are slower, whoever does them.
  tools=(vdisk nbdkit qemu vdisk-pc)
  k=$(( (run - 1) % ${#tools[@]} ))
  order=("${tools[@]:k}" "${tools[@]:0:k}")
  for name in "${order[@]}"; do measure "$name"; done
done

# Median over the runs that completed.
col() { local v=(); for run in $(seq "$RUNS"); do [ -n "${results[$1,$2,$run]:-}" ] && v+=("${results[$1,$2,$run]}"); done; [ ${#v[@]} -gt 0 ] && median "${v[@]}" || echo 0; }
size=$((SIZE_MB * 1024 * 1024))
printf '\n%-10s %14s %14s %16s %14s %14s %14s\n' "${SIZE_MB} MiB" "1st (MB/s)" "2nd (MB/s)" "served 1st (x)" "vdisk/this 1st" "vs curl 1st" "vs curl-file"
cv=$(col curl first)
cfv=$(col curl-file first)
vf=$(col vdisk first)
for name in vdisk vdisk-pc nbdkit qemu curl curl-file; do
  f=$(col "$name" first); s=$(col "$name" second); b=$(col "$name" bytes1)
  case "$name" in curl*) s=- ;; esac
  printf '%-10s %14s %14s %16s %14s %14s %14s\n' "$name" "$f" "$s" "$(awk -v a="$b" -v b="$size" 'BEGIN { printf "%.3f", a / b }')" \
    "$(ratio "$vf" "$f")" "$(ratio "$f" "$cv")" "$(ratio "$f" "$cfv")"
done
for name in vdisk vdisk-pc nbdkit qemu; do
  [ -n "${hung[$name]:-}" ] && echo "$name: ${hung[$name]} of $RUNS runs hung and are left out of its medians"
done
exit 0
