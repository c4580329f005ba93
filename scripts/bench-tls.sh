#!/usr/bin/env bash
# The cost of TLS: the bench (tokio, direct reply-to) against the TLS node of
# scripts/tls-node.sh, over plain AMQP (port 5674) and over amqps (5671) on the same node, at
# concurrency 1 and 64, three runs each; prints one JSON line per run and then the medians.
# Server and client use the same scheme, so an amqps call pays TLS on both of its legs.
#   scripts/bench-tls.sh                 # 20,000 calls per run at concurrency 64, 4,000 at 1
#   CALLS=50000 scripts/bench-tls.sh     # longer runs
set -euo pipefail
cd "$(dirname "$0")/.."
calls="${CALLS:-20000}"
certs=/tmp/rabbit-tls/certs
bash scripts/tls-node.sh start >/dev/null

cargo build --release -q -p transport-tokio --bin server --bin bench
bin_root=$(mktemp -d)
results=$(mktemp)
trap 'rm -rf "$bin_root" "$results"' EXIT
cp target/release/server target/release/bench "$bin_root/"

declare -A uris=(
  [plain]="amqp://guest:guest@127.0.0.1:5674/%2f"
  [tls]="amqps://guest:guest@localhost:5671/%2f?cacertfile=$certs/ca.pem"
)

run() { # scheme concurrency calls
  local scheme=$1 c=$2 n=$3 queue="bench-tls-$1-$$" uri=${uris[$1]}
  "$bin_root/server" --uri "$uri" --queue "$queue" --prefetch 64 --workers 64 >/dev/null 2>&1 &
  local server=$!
  sleep 0.5
  local line
  line=$("$bin_root/bench" --uri "$uri" --queue "$queue" --calls "$n" --concurrency "$c" \
    --reply-mode direct --server-pid "$server" --json)
  kill -INT "$server"
  wait "$server" 2>/dev/null || true
  rabbitmqctl -q -n rabbit-tls@localhost delete_queue "$queue" >/dev/null 2>&1 || true
  echo "{\"scheme\":\"$scheme\",${line#\{}" | tee -a "$results"
}

for round in 1 2 3; do
  for scheme in plain tls; do
    run "$scheme" 1 $((calls / 5))
    run "$scheme" 64 "$calls"
  done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for scheme in ("plain", "tls"):
    for c in (1, 64):
        rs = [r for r in rows if r["scheme"] == scheme and r["concurrency"] == c]
        m = {k: statistics.median(r[k] for r in rs) for k in
             ("calls_per_sec", "p50_us", "p99_us", "client_cpu_us_per_call", "server_cpu_us_per_call")}
        med[scheme, c] = m
        print(f"median {scheme:5} C={c:<2} calls/s {m['calls_per_sec']:>7.0f}  p50 {m['p50_us']:>6.0f} us"
              f"  p99 {m['p99_us']:>6.0f} us  client CPU {m['client_cpu_us_per_call']:.1f} us/call"
              f"  server CPU {m['server_cpu_us_per_call']:.1f} us/call")
for c in (1, 64):
    p, t = med["plain", c], med["tls", c]
    print(f"TLS cost C={c}: p50 +{t['p50_us'] - p['p50_us']:.0f} us, "
          f"client CPU +{t['client_cpu_us_per_call'] - p['client_cpu_us_per_call']:.1f} us/call, "
          f"server CPU +{t['server_cpu_us_per_call'] - p['server_cpu_us_per_call']:.1f} us/call, "
          f"throughput {100 * (t['calls_per_sec'] / p['calls_per_sec'] - 1):+.0f}%")
PY
