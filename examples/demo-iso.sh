#!/usr/bin/env bash
# The vdisk demo: stream a remote ISO lazily. It builds a small ISO9660 image
# (genisoimage), serves it with nginx on 127.0.0.1, puts a copy-on-read qcow2
# overlay on top of the URL, mounts it as one file, lists and reads the ISO's
# files from that file (isoinfo), and shows how few bytes crossed the network.
# Everything lives in a temporary directory and is removed at the end.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
vdisk() { node "$here/dist/cli/main.js" "$@"; }
for tool in genisoimage isoinfo nginx curl; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is missing (bash scripts/setup.sh installs it)" >&2; exit 1; }
done
work="$(mktemp -d /var/tmp/vdisk-demo.XXXXXX)"
server=""
nginx_pid=""
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then vdisk unmount --lazy "$work/demo.iso" 2>/dev/null || kill -INT "$server"; wait "$server" || true; fi
  [ -n "$nginx_pid" ] && kill -QUIT "$nginx_pid" 2>/dev/null && wait "$nginx_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
bytes_served() { awk '{ n += $2 } END { printf "%.0f\n", n }' "$work/access.log"; }

step "build a 64 MiB ISO holding a few files"
mkdir -p "$work/iso/docs" "$work/iso/data"
printf 'Hello from inside an ISO served over HTTP.\nOnly the blocks you read cross the network.\n' > "$work/iso/README.TXT"
for i in 1 2 3; do seq 1 2000 | sed "s/^/chapter $i line /" > "$work/iso/docs/chapter$i.txt"; done
head -c $((60 * 1024 * 1024)) /dev/urandom > "$work/iso/data/payload.bin"
mkdir -p "$work/www"
genisoimage -quiet -R -J -V VDISK_DEMO -o "$work/www/demo.iso" "$work/iso"
iso_size=$(stat -c %s "$work/www/demo.iso")
echo "demo.iso: $iso_size bytes"

step "serve it with nginx on 127.0.0.1"
port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
cat > "$work/nginx.conf" <<CONF
user root;
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 64; }
http {
  log_format body '\$request_method \$body_bytes_sent "\$http_range"';
  access_log $work/access.log body;
  client_body_temp_path $work/tmp-body;
  proxy_temp_path $work/tmp-proxy;
  fastcgi_temp_path $work/tmp-fastcgi;
  uwsgi_temp_path $work/tmp-uwsgi;
  scgi_temp_path $work/tmp-scgi;
  server { listen 127.0.0.1:$port; root $work/www; }
}
CONF
nginx -c "$work/nginx.conf" -p "$work" &
nginx_pid=$!
url="http://127.0.0.1:$port/demo.iso"
curl -sfI --retry 50 --retry-connrefused --retry-delay 0 "$url" >/dev/null
echo "serving $url"

step "a local qcow2 overlay on the remote ISO"
vdisk create -f qcow2 -b "$url" -F raw "$work/cache.qcow2"

step "mount it with copy-on-read: the mounted file is the ISO"
touch "$work/demo.iso"
node "$here/dist/cli/main.js" mount --copy-on-read --stats "$work/cache.qcow2" "$work/demo.iso" 2> "$work/vdisk.log" &
server=$!
until grep -q 'vdisk: serving' "$work/vdisk.log"; do
  kill -0 "$server" 2>/dev/null || { cat "$work/vdisk.log"; exit 1; }
  sleep 0.1
done
cat "$work/vdisk.log"

step "list the ISO's files from the mounted file"
isoinfo -R -f -i "$work/demo.iso"
step "read one file"
isoinfo -R -x /README.TXT -i "$work/demo.iso"
first=$(bytes_served)
printf '\nbytes the server sent: %s of %s (%s%%)\n' "$first" "$iso_size" "$(awk -v a="$first" -v b="$iso_size" 'BEGIN { printf "%.2f", 100 * a / b }')"

step "read it all again: already copied blocks come from the overlay"
isoinfo -R -f -i "$work/demo.iso" >/dev/null
isoinfo -R -x /README.TXT -i "$work/demo.iso" >/dev/null
echo "bytes the server sent now: $(bytes_served) (unchanged: nothing fetched twice)"
echo "overlay on disk: $(du -h "$work/cache.qcow2" | cut -f1)"

step "unmount"
vdisk unmount "$work/demo.iso"
wait "$server"
server=""
tail -2 "$work/vdisk.log"
