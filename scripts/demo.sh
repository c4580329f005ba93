#!/usr/bin/env bash
# Quick start: make sure RabbitMQ runs (installing it when absent), start the Fibonacci server,
# call it, and stop the server. `scripts/demo.sh 35` asks for fib(35); TRANSPORT=smol uses the
# smol transport.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-30}"
transport="${TRANSPORT:-tokio}"
# The smol transport's programs carry a prefix (smol-server, smol-client) so that both packages'
# bins can sit side by side in target/.
prefix=""
[ "$transport" = smol ] && prefix="smol-"

bash scripts/ensure-rabbitmq.sh
cargo build --release -q -p "transport-$transport" --bin "${prefix}server" --bin "${prefix}client"
bin_dir="${CARGO_TARGET_DIR:-target}/release"

trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
"$bin_dir/${prefix}server" &
server=$!
# Wait for the server to consume before calling (the client would fail fast otherwise).
for _ in $(seq 50); do
  if rabbitmqctl -q list_queues name consumers 2>/dev/null | awk '$1=="rpc_queue" && $2>0 {f=1} END {exit !f}'; then
    break
  fi
  sleep 0.2
done
"$bin_dir/${prefix}client" "$n"
