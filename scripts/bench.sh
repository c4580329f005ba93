#!/usr/bin/env bash
# Runs the bench against the real broker for both transports, both reply modes, at concurrency
# 1 and 64, with server prefetch 64 and 1 (the tutorial's setting), and prints one JSON line per
# run. Each run starts its own server (same transport as the client) on a queue of its own.
#   scripts/bench.sh                 # everything, 20,000 calls per run at concurrency 64
#   CALLS=50000 scripts/bench.sh     # longer runs
set -euo pipefail
cd "$(dirname "$0")/.."
calls="${CALLS:-20000}"
bash scripts/ensure-rabbitmq.sh >/dev/null

# The smol transport's programs are smol-server and smol-bench (no clash with tokio's in target/).
cargo build --release -q -p transport-tokio --bin server --bin bench
cargo build --release -q -p transport-smol --bin smol-server --bin smol-bench
bin_dir="${CARGO_TARGET_DIR:-target}/release"
prefix() { [ "$1" = smol ] && echo smol- || true; }

run() { # transport reply-mode concurrency prefetch calls
  local t=$1 mode=$2 c=$3 prefetch=$4 n=$5 queue="bench-$1-$$" p
  p=$(prefix "$1")
  "$bin_dir/${p}server" --queue "$queue" --prefetch "$prefetch" --workers "$prefetch" >/dev/null 2>&1 &
  local server=$!
  sleep 0.5
  local line
  line=$("$bin_dir/${p}bench" --queue "$queue" --calls "$n" --concurrency "$c" --reply-mode "$mode" \
    --server-pid "$server" --json)
  kill -INT "$server"
  wait "$server" 2>/dev/null || true
  rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1 || true
  echo "{\"transport\":\"$t\",\"prefetch\":$prefetch,${line#\{}"
}

for t in tokio smol; do
  for mode in exclusive direct; do
    run "$t" "$mode" 1 64 $((calls / 5))
    run "$t" "$mode" 64 64 "$calls"
  done
  run "$t" exclusive 64 1 $((calls / 2))
done
