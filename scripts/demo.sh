#!/usr/bin/env bash
# Quick start: make sure RabbitMQ runs (installing it when absent), start the Fibonacci server,
# call it, and stop the server. `scripts/demo.sh 35` asks for fib(35); TRANSPORT=smol uses the
# smol transport.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-30}"
transport="transport-${TRANSPORT:-tokio}"

bash scripts/ensure-rabbitmq.sh
cargo build --release -q -p "$transport" --bin server --bin client

# Each package's bins share a name, so build and run them through cargo's own path.
bin_dir=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$bin_dir"' EXIT
cp target/release/server target/release/client "$bin_dir/"

"$bin_dir/server" &
server=$!
# Wait for the server to consume before calling (the client would fail fast otherwise).
for _ in $(seq 50); do
  if rabbitmqctl -q list_queues name consumers 2>/dev/null | awk '$1=="rpc_queue" && $2>0 {f=1} END {exit !f}'; then
    break
  fi
  sleep 0.2
done
"$bin_dir/client" "$n"
