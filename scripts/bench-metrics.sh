#!/usr/bin/env bash
# The cost of the Prometheus recorder: the tokio bench at concurrency 64 against a server with
# prefetch 64, with `--metrics-addr` on both the server and the bench against without, runs
# interleaved, ROUNDS of each (default 3). Prints one JSON line per run (a "metrics" field
# first), then the medians of calls/s, p50, p99 and CPU per call for each setting.
#   scripts/bench-metrics.sh
#   ROUNDS=5 CALLS=50000 scripts/bench-metrics.sh
set -euo pipefail
cd "$(dirname "$0")/.."
calls="${CALLS:-20000}"
rounds="${ROUNDS:-3}"
bash scripts/ensure-rabbitmq.sh >/dev/null
cargo build --release -q -p transport-tokio --bin server --bin bench
bin_dir="${CARGO_TARGET_DIR:-target}/release"
out=$(mktemp)
trap 'rm -f "$out" "$out.err"' EXIT

run() { # on|off
  local queue="bench-metrics-$$" flags=()
  # Port 0: any free port; nobody scrapes, as between two scrapes of a real Prometheus.
  [ "$1" = on ] && flags=(--metrics-addr 127.0.0.1:0)
  "$bin_dir/server" --queue "$queue" --prefetch 64 --workers 64 "${flags[@]}" >/dev/null 2>&1 &
  local server=$!
  sleep 0.5
  local line status=0
  line=$("$bin_dir/bench" --queue "$queue" --calls "$calls" --concurrency 64 \
    --server-pid "$server" --json "${flags[@]}" 2>"$out.err") || status=$?
  kill -INT "$server"
  wait "$server" 2>/dev/null || true
  rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1 || true
  if [ "$status" != 0 ] || [ -z "$line" ]; then
    # A failed run (a call failed, the broker restarted) is left out of the medians.
    echo "bench-metrics: a run with metrics $1 failed (exit $status): $(tail -c 300 "$out.err") $line" >&2
    return 0
  fi
  echo "{\"metrics\":\"$1\",${line#\{}" | tee -a "$out"
}

for _ in $(seq "$rounds"); do
  run off
  run on
done

python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
keys = ["calls_per_sec", "p50_us", "p99_us", "client_cpu_us_per_call", "server_cpu_us_per_call"]
for setting in ["off", "on"]:
    mine = [r for r in runs if r["metrics"] == setting]
    if not mine:
        continue
    medians = {k: statistics.median(r[k] for r in mine) for k in keys}
    print(json.dumps({"metrics": setting, "runs": len(mine), "medians": medians}))
PY
