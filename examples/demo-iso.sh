#!/usr/bin/env bash
# The vdisk demo: stream a remote ISO lazily. It builds a small ISO9660 image
# (genisoimage), serves it with nginx on 127.0.0.1, puts a copy-on-read qcow2
# overlay on top of the URL, mounts it as one file, lists and reads the ISO's
# files from that file (isoinfo), and shows how few bytes crossed the network.
# Everything lives in a temporary directory and is removed at the end.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
vdisk() { node "$here/dist/cli/main.js" "$@"; }
# shellcheck source=scripts/lib/serve.sh
. "$here/scripts/lib/serve.sh"
for tool in genisoimage isoinfo nginx curl; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is missing (bash scripts/setup.sh installs it)" >&2; exit 1; }
done
work="$(mktemp -d /var/tmp/vdisk-demo.XXXXXX)"
server=""
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then vdisk unmount --lazy "$work/demo.iso" 2>/dev/null || kill -INT "$server"; wait "$server" || true; fi
  nginx_stop
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build a 60 MiB ISO holding a few files"
mkdir -p "$work/iso/docs" "$work/iso/data"
printf 'Hello from inside an ISO served over HTTP.\nOnly the blocks you read cross the network.\n' > "$work/iso/README.TXT"
for i in 1 2 3; do seq 1 2000 | sed "s/^/chapter $i line /" > "$work/iso/docs/chapter$i.txt"; done
head -c $((60 * 1024 * 1024)) /dev/urandom > "$work/iso/data/payload.bin"
mkdir -p "$work/www"
genisoimage -quiet -R -J -V VDISK_DEMO -o "$work/www/demo.iso" "$work/iso"
iso_size=$(stat -c %s "$work/www/demo.iso")
echo "demo.iso: $iso_size bytes"

step "serve it with nginx on 127.0.0.1"
nginx_start "$work/www" "$work"
url="http://127.0.0.1:$nginx_port/demo.iso"
echo "serving $url"

step "a local qcow2 overlay on the remote ISO"
vdisk create -f qcow2 -b "$url" -F raw "$work/cache.qcow2"

step "mount it with copy-on-read: the mounted file is the ISO"
touch "$work/demo.iso"
node "$here/dist/cli/main.js" mount --copy-on-read --stats "$work/cache.qcow2" "$work/demo.iso" 2> "$work/vdisk.log" &
server=$!
wait_serving "$work/vdisk.log" "$server"
cat "$work/vdisk.log"

step "list the ISO's files from the mounted file"
isoinfo -R -f -i "$work/demo.iso"
step "read one file"
isoinfo -R -x /README.TXT -i "$work/demo.iso"
first=$(nginx_bytes_served "$work")
printf '\nbytes the server sent: %s of %s (%s%%)\n' "$first" "$iso_size" "$(awk -v a="$first" -v b="$iso_size" 'BEGIN { printf "%.2f", 100 * a / b }')"

step "read it all again: already copied blocks come from the overlay"
isoinfo -R -f -i "$work/demo.iso" >/dev/null
isoinfo -R -x /README.TXT -i "$work/demo.iso" >/dev/null
echo "bytes the server sent now: $(nginx_bytes_served "$work") (unchanged: nothing fetched twice)"
echo "overlay on disk: $(du -h "$work/cache.qcow2" | cut -f1)"

step "unmount"
vdisk unmount "$work/demo.iso"
wait "$server"
server=""
tail -2 "$work/vdisk.log"
