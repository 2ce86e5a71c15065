#!/usr/bin/env bash
# UDP packets per second through Fulcrum and nginx `stream`, side by side in
# one run, on loopback: two echo backends (udpbench echo), the same
# ping-pong load (udpbench load) against each: direct, nginx, Fulcrum.
#
#   bench/udp.sh [--flows 64] [--seconds 5] [--size 64] [--workers 2] [--rounds 2]
#
# Needs nginx with the stream module (apt-get install -y nginx libnginx-mod-stream).
set -euo pipefail
cd "$(dirname "$0")/.."

flows=64 seconds=5 size=64 workers=2 rounds=2
while [ $# -gt 0 ]; do
  case "$1" in
    --flows) flows=$2; shift 2;; --seconds) seconds=$2; shift 2;; --size) size=$2; shift 2;;
    --workers) workers=$2; shift 2;; --rounds) rounds=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
command -v nginx >/dev/null && [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || {
  echo "needs nginx and libnginx-mod-stream (apt-get install -y nginx libnginx-mod-stream)" >&2; exit 2; }

cargo build --release -q -p fulcrum -p udpbench
bin=target/release
dir=$(mktemp -d /tmp/fulcrum-udpbench-XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
b1=$(free_port); b2=$(free_port); nport=$(free_port); fport=$(free_port)

$bin/udpbench echo --listen 127.0.0.1:$b1 & pids+=($!)
$bin/udpbench echo --listen 127.0.0.1:$b2 & pids+=($!)

cat > "$dir/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log;
events { worker_connections 65536; }
stream {
  upstream echo { server 127.0.0.1:$b1; server 127.0.0.1:$b2; }
  server { listen 127.0.0.1:$nport udp reuseport; proxy_pass echo; proxy_timeout 30s; }
}
CONF
nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' & pids+=($!)

cat > "$dir/fulcrum.toml" <<CONF
[runtime]
workers = $workers

[[frontend]]
name = "udp"
listen = "127.0.0.1:$fport"
protocol = "udp"
pool = "echo"

[[pool]]
name = "echo"
balancer = "stock:round-robin"
backends = [ { address = "127.0.0.1:$b1" }, { address = "127.0.0.1:$b2" } ]
CONF
FULCRUM_LOG=warn $bin/fulcrum run -c "$dir/fulcrum.toml" >/dev/null & pids+=($!)
sleep 1

echo "UDP ping-pong, $flows flows, $size-byte datagrams, ${seconds}s, $workers workers, $rounds rounds"
for round in $(seq 1 "$rounds"); do
  for variant in direct nginx fulcrum; do
    case $variant in direct) port=$b1;; nginx) port=$nport;; fulcrum) port=$fport;; esac
    printf 'round %s  %-8s ' "$round" "$variant"
    $bin/udpbench load --target 127.0.0.1:$port --flows "$flows" --seconds "$seconds" --size "$size"
  done
done
