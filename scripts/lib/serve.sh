# Shell helpers shared by the demos and the HTTP benchmark (sourced, not run).

# nginx_start ROOT WORK [WORKERS]: serve ROOT with nginx on a free port of
# 127.0.0.1, its files under WORK. Sets nginx_pid and nginx_port and returns
# once it answers. Each line of WORK/access.log starts with the body bytes sent.
nginx_start() {
  local root=$1 work=$2 workers=${3:-1}
  nginx_port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
  cat > "$work/nginx.conf" <<CONF
user root;
worker_processes $workers;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 256; }
http {
  log_format body '\$body_bytes_sent \$request_method "\$http_range"';
  access_log $work/access.log body;
  client_body_temp_path $work/tmp-body;
  proxy_temp_path $work/tmp-proxy;
  fastcgi_temp_path $work/tmp-fastcgi;
  uwsgi_temp_path $work/tmp-uwsgi;
  scgi_temp_path $work/tmp-scgi;
  keepalive_requests 1000000;
  sendfile on;
  server { listen 127.0.0.1:$nginx_port; root $root; }
}
CONF
  nginx -c "$work/nginx.conf" -p "$work" &
  nginx_pid=$!
  curl -sfI --retry 50 --retry-connrefused --retry-delay 0 "http://127.0.0.1:$nginx_port/" -o /dev/null || true
  kill -0 "$nginx_pid" 2>/dev/null || { cat "$work/nginx-error.log" >&2; return 1; }
}

# nginx_bytes_served WORK: body bytes nginx has sent so far.
nginx_bytes_served() { awk '{ n += $1 } END { printf "%.0f\n", n }' "$1/access.log"; }

# nginx_stop: stop the nginx nginx_start started (for EXIT traps; never fails).
nginx_stop() {
  [ -n "${nginx_pid:-}" ] && kill -QUIT "$nginx_pid" 2>/dev/null && wait "$nginx_pid" 2>/dev/null
  nginx_pid=""
  return 0
}

# wait_serving LOG PID: until `vdisk mount` (PID, stderr in LOG) says it serves; its log on failure.
wait_serving() {
  until grep -q 'vdisk: serving' "$1"; do
    kill -0 "$2" 2>/dev/null || { cat "$1" >&2; return 1; }
    sleep 0.1
  done
}
