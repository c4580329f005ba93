#!/usr/bin/env bash
# How cost grows with the work (issue #14 item 4), ours (tokio) against amqprs 2.x
# (bench/amqprs) in the same run, interleaved point by point; JSON lines, markdown tables and SVG
# plots (docs/perf/*.svg, written by bench/plot_curves.py: plain SVG text, no plotting library).
#
#   scripts/bench-curves.sh [all]   the four curves below
#   scripts/bench-curves.sh payload       echo of 100 B, 10 kB, 1 MB, 16 MB bodies at C=4,
#                                         prefetch 4: MB/s each way, p50, p99
#   scripts/bench-curves.sh concurrency   C = 1, 4, 16, ..., 4096 calls in flight against one
#                                         server (prefetch 64): calls/s, p99, client memory
#                                         per call in flight
#   scripts/bench-curves.sh servers       1, 2, 4 server processes on one queue, C=64
#   scripts/bench-curves.sh connections   the C=64 calls spread over 1, 4, 16, 64 client
#                                         connections
#   scripts/bench-curves.sh plot          only redraw the plots from BENCH_OUT's JSON lines
#
# Environment: ROUNDS (3: medians of 3), RUN_TIMEOUT (120 s per client run), BENCH_OUT
# (target/bench-curves: JSON lines and tables), PLOTS (docs/perf). Every run starts its own
# server(s) on a fresh queue and makes a bounded number of calls under the time limit.
#
# Client memory per call in flight: the bench reads its VmRSS once connected and warmed up
# (idle) and its VmHWM (peak) after the last call; (peak - idle) / C. It includes the bench's
# own latency samples (4 bytes per call), small beside a call in flight from C=16 up.
# Broker and server CPU: the sum of the threads' /proc/<pid>/task/*/schedstat run time across
# the client's run, per call (as scripts/bench.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-all}"
rounds="${ROUNDS:-3}"
run_timeout="${RUN_TIMEOUT:-120}"
out_dir="${BENCH_OUT:-target/bench-curves}"
plots="${PLOTS:-docs/perf}"
mkdir -p "$out_dir" "$plots"
results="$out_dir/curves.jsonl"

if [ "$mode" = plot ]; then
  python3 bench/plot_curves.py "$results" "$plots" | tee "$out_dir/curves.md"
  exit 0
fi

bash scripts/ensure-rabbitmq.sh >/dev/null
# Builds (niced: the machine is shared), then copies the programs aside: a rebuild during the
# runs changes nothing measured. The measured processes run at normal priority.
nice cargo build --release -q -p transport-tokio --bin server --bin bench
(cd bench/amqprs && nice cargo build --release -q --locked)
bins=$(mktemp -d)
work=$(mktemp -d)
servers=()
cleanup() {
  for pid in "${servers[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  rm -rf "$bins" "$work"
}
trap cleanup EXIT
target="${CARGO_TARGET_DIR:-target}/release"
cp "$target/server" "$target/bench" "$bins/"
cp bench/amqprs/target/release/amqprs-server bench/amqprs/target/release/amqprs-bench "$bins/"

# shellcheck source=scripts/lib/cpu.sh
source scripts/lib/cpu.sh # (the working directory is the repository root)
broker=$(broker_pid)
per_call() { # ns before, ns after, calls -> µs per call
  awk -v d=$(($2 - $1)) -v n="$3" 'BEGIN { printf "%.1f", d / 1e3 / n }'
}

# One run: SERVERS server processes of IMPL on a fresh queue, one client; prints the client's
# JSON line with the curve, the point, the load and the broker's and servers' CPU per call.
#   run CURVE X IMPL CONCURRENCY PREFETCH CALLS SERVERS [SERVER_FLAGS] [CLIENT_FLAGS]
run() {
  local curve=$1 x=$2 impl=$3 c=$4 prefetch=$5 n=$6 nservers=$7 sflags=${8:-} cflags=${9:-}
  local queue="curves-$impl-$$-$RANDOM" server_bin client_bin line b0 b1 s0 s1 i
  case $impl in
    ours) server_bin="$bins/server" client_bin="$bins/bench" ;;
    amqprs) server_bin="$bins/amqprs-server" client_bin="$bins/amqprs-bench" ;;
  esac
  servers=()
  for i in $(seq "$nservers"); do
    # shellcheck disable=SC2086 # flag lists
    "$server_bin" --queue "$queue" --prefetch "$prefetch" --workers "$prefetch" $sflags \
      >"$work/ready.$i" 2>/dev/null &
    servers+=($!)
  done
  for i in $(seq "$nservers"); do
    for _ in $(seq 100); do grep -q Awaiting "$work/ready.$i" 2>/dev/null && break; sleep 0.1; done
  done
  b0=$(cpu_ns "$broker")
  s0=$(cpu_ns "${servers[@]}")
  # shellcheck disable=SC2086
  line=$(timeout "$run_timeout" "$client_bin" --queue "$queue" --calls "$n" --concurrency "$c" \
    --json $cflags || true)
  [ -n "$line" ] || line='{"failed":true}'
  b1=$(cpu_ns "$broker")
  s1=$(cpu_ns "${servers[@]}")
  for pid in "${servers[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
  servers=()
  rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1 || true
  echo "{\"curve\":\"$curve\",\"x\":$x,\"impl\":\"$impl\",\"servers\":$nservers,\"prefetch\":$prefetch,\"load\":$(cut -d' ' -f1 /proc/loadavg),\"broker_cpu_us_per_call\":$(per_call "$b0" "$b1" "$n"),\"servers_cpu_us_per_call\":$(per_call "$s0" "$s1" "$n"),${line#\{}"
}

# Each curve: its points, both implementations at each point (interleaved: a noisy moment hits
# both), the first of the two alternating from round to round (a fixed order favours the first).
impls() { if [ $((round % 2)) = 1 ]; then echo ours amqprs; else echo amqprs ours; fi; }
payload() {
  local size calls
  for size in 100 10000 1000000 16000000; do
    case $size in
      16000000) calls=16 ;;
      1000000) calls=200 ;;
      *) calls=4000 ;;
    esac
    for impl in $(impls); do
      run payload "$size" "$impl" 4 4 "$calls" 1 --echo "--payload $size"
    done
  done
}
concurrency() {
  local c calls
  for c in 1 4 16 64 256 1024 4096; do
    case $c in
      1) calls=3000 ;;
      4096) calls=20480 ;;
      *) calls=10000 ;;
    esac
    for impl in $(impls); do run concurrency "$c" "$impl" "$c" 64 "$calls" 1; done
  done
}
fanout() {
  local k
  for k in 1 2 4; do
    for impl in $(impls); do run servers "$k" "$impl" 64 64 10000 "$k"; done
  done
}
connections() {
  local k
  for k in 1 4 16 64; do
    for impl in $(impls); do run connections "$k" "$impl" 64 64 10000 1 "" "--connections $k"; done
  done
}

echo "bench-curves: mode $mode, $rounds rounds, load $(cut -d' ' -f1-3 /proc/loadavg), broker pid $broker" >&2
[ "$mode" = all ] && : >"$results"
for round in $(seq "$rounds"); do
  case $mode in
    payload) payload ;;
    concurrency) concurrency ;;
    servers) fanout ;;
    connections) connections ;;
    all) payload; concurrency; fanout; connections ;;
    *) echo "usage: scripts/bench-curves.sh [all|payload|concurrency|servers|connections|plot]" >&2; exit 2 ;;
  esac | tee -a "$results"
  echo "bench-curves: round $round of $rounds done, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done
python3 bench/plot_curves.py "$results" "$plots" | tee "$out_dir/curves.md"
