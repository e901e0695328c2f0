# Helpers shared by the benchmark scripts (sourced, not run).

# Install the Debian packages that provide the given commands, if any is missing.
# Usage: bench_need cmd:package [cmd:package ...]
bench_need() {
  local need=() pair
  for pair in "$@"; do command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}"); done
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# What every benchmark needs first: root (FUSE mounts), the peers' packages, a built vdisk.
# Usage: bench_prepare cmd:package [cmd:package ...]
bench_prepare() {
  [ "$(id -u)" -eq 0 ] || { echo "bench: run as root" >&2; exit 1; }
  bench_need "$@"
  [ -f "$here/dist/cli/main.js" ] || bash "$here/scripts/setup.sh"
}

# Wait until a FUSE mount shows at $1 while process $2 lives.
wait_mounted() {
  for _ in $(seq 200); do
    grep -q " $1 fuse" /proc/mounts && return 0
    kill -0 "$2" 2>/dev/null || { echo "bench: server died" >&2; return 1; }
    sleep 0.05
  done
  echo "bench: $1 never mounted" >&2
  return 1
}

# dd's rate in MB/s; a reader that hangs is stopped after DD_TIMEOUT seconds (default 300) and gets 0.
dd_rate() {
  # A timed-out dd is a result (0), not a failure that set -e would turn into an exit.
  { LC_ALL=C timeout "${DD_TIMEOUT:-300}" dd "$@" 2>&1 || true; } | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s,") { r = $(i+1); u = $(i+2) } } END {
    if (u == "GB/s") r *= 1000; else if (u == "kB/s") r /= 1000; printf "%.0f\n", r }'
}

# fio 4k IOPS: file iodepth rw (uses FIO_SECONDS, SIZE_MB)
fio_iops() {
  fio --name=b --filename="$1" --rw="$3" --bs=4k --ioengine=libaio --iodepth="$2" --direct=1 \
    --time_based --runtime="$FIO_SECONDS" --size="${SIZE_MB}M" --randrepeat=0 --output-format=json 2>/dev/null |
    node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s.slice(s.indexOf("{"))).jobs[0];console.log(Math.round(j.read.iops||j.write.iops))})'
}

median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# Run measure() for vdisk and qemu, RUNS times, alternating which goes first:
# the first reads after images are written are slower on this kind of VM, whoever does them.
alternate_runs() {
  for run in $(seq "$RUNS"); do
    if [ $((run % 2)) -eq 1 ]; then
      measure vdisk start_vdisk "$run"
      measure qemu start_qemu "$run"
    else
      measure qemu start_qemu "$run"
      measure vdisk start_vdisk "$run"
    fi
  done
}

# ratio A B: A/B with two decimals (0 when B is 0).
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

# Print one table row per "key:label": medians of results[vdisk|qemu,key,run] and their ratio.
print_rows() {
  local metric key label v q mv mq
  for metric in "$@"; do
    key=${metric%%:*}; label=${metric#*:}
    v=(); q=()
    for run in $(seq "$RUNS"); do v+=("${results[vdisk,$key,$run]}"); q+=("${results[qemu,$key,$run]}"); done
    mv=$(median "${v[@]}"); mq=$(median "${q[@]}")
    printf '%-42s %12s %12s %8s\n' "$label" "$mv" "$mq" "$(ratio "$mv" "$mq")"
  done
}
