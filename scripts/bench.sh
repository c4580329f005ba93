#!/usr/bin/env bash
# The bench against the real broker (127.0.0.1:5672); the single command behind the README's
# performance tables. Every run starts its own server on a queue of its own, runs a bounded
# number of calls (each run under a time limit), and prints one JSON line; the modes that
# compare print markdown tables of the medians at the end.
#
#   scripts/bench.sh [compare]   ours (tokio, smol) vs amqprs 2.x (bench/amqprs), interleaved,
#                                medians of ROUNDS: C=1/prefetch 1, C=64/prefetch 1,
#                                C=64/prefetch 64; calls/s, p50, p99, client, server and broker
#                                CPU per call
#   scripts/bench.sh before REV  ours (tokio) built at git revision REV vs ours now vs amqprs,
#                                interleaved as compare does: what a change cost or saved;
#                                also C=4096/prefetch 64 for the client's memory per call in
#                                flight
#   scripts/bench.sh features    broker CPU per call of each protocol choice at C=64/prefetch
#                                64 (mandatory, expiration, x-rpc-deadline, direct reply-to,
#                                multiple acks), switched one at a time on the amqprs programs,
#                                plus ours in both reply modes and with each of mandatory,
#                                expiration and x-rpc-deadline switched off (then all three)
#   scripts/bench.sh syscalls    syscalls and socket writes/reads per call on the client and
#                                the server (strace -c, and perf stat's syscall tracepoints
#                                where they can be read), ours (tokio) and amqprs
#   scripts/bench.sh runtimes    ours (tokio) on a current-thread runtime (--threads 0, the
#                                default) vs a multi-thread one (--threads 1 and 2), client
#                                and server alike, interleaved, medians of ROUNDS
#   scripts/bench.sh timeline    where a call's time goes at C=1/prefetch 1, ours (tokio) and
#                                amqprs: each side's turnaround (socket read to socket write)
#                                and the broker's two legs, from perf's syscall tracepoints
#   scripts/bench.sh copies      bytes each program copies per body byte (memcpy/memmove of 4 KiB
#                                and more, counted by bench/copies/memcpy_count.c under
#                                LD_PRELOAD), echo of 100 kB, 1 MB and 16 MB, ours and amqprs
#   scripts/bench.sh matrix      the former default: both transports x both reply modes x
#                                C=1/64 x prefetch 64/1, one run each
#   scripts/bench.sh all         compare, features, syscalls, runtimes, timeline and copies
#   scripts/bench.sh curves      payload, concurrency and fan-out curves with SVG plots
#                                (scripts/bench-curves.sh all)
#
# Environment: ROUNDS (3), CALLS (20000: calls per run at C=64/prefetch 64; the slower settings
# run a fraction of it), RUN_TIMEOUT (120 s per run), BENCH_OUT (target/bench: JSON lines and
# tables are kept there too).
#
# Broker CPU is the run time of the main node's beam.smp (the sum of its threads'
# /proc/<pid>/task/*/schedstat, in ns; /proc/<pid>/stat's utime+stime count 10 ms ticks) across the
# client's whole run (connect and warm-up included: < 1% of a run), divided by the calls. The
# broker is shared: anything else it does in that window is counted too, hence the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-compare}"
rounds="${ROUNDS:-3}"
calls="${CALLS:-20000}"
run_timeout="${RUN_TIMEOUT:-120}"
out_dir="${BENCH_OUT:-target/bench}"
mkdir -p "$out_dir"
bash scripts/ensure-rabbitmq.sh >/dev/null

# Builds, then copies the programs aside: a rebuild during the runs changes nothing measured.
cargo build --release -q -p transport-tokio --bin server --bin bench
cargo build --release -q -p transport-smol --bin smol-server --bin smol-bench
bins=$(mktemp -d)
work=$(mktemp -d)
trap 'rm -rf "$bins" "$work"' EXIT
target="${CARGO_TARGET_DIR:-target}/release"
cp "$target/server" "$target/bench" "$target/smol-server" "$target/smol-bench" "$bins/"
if [ "$mode" = before ]; then
  # The earlier revision in a worktree and a target dir of their own (kept between runs, so a
  # second run of the same REV does not rebuild).
  rev=$(git rev-parse --verify "${2:?usage: scripts/bench.sh before REV}^{commit}")
  before_src="target/bench-before/src-${rev:0:12}"
  [ -d "$before_src" ] || git worktree add -q --detach "$before_src" "$rev"
  (cd "$before_src" && CARGO_TARGET_DIR="$PWD/../target" cargo build --release -q -p transport-tokio --bin server --bin bench)
  cp target/bench-before/target/release/server "$bins/before-server"
  cp target/bench-before/target/release/bench "$bins/before-bench"
fi
if [ "$mode" != matrix ]; then
  (cd bench/amqprs && cargo build --release -q --locked)
  cp bench/amqprs/target/release/amqprs-server bench/amqprs/target/release/amqprs-bench "$bins/"
fi

# shellcheck source=scripts/lib/cpu.sh
source scripts/lib/cpu.sh # (the working directory is the repository root)
broker=$(broker_pid)

# Each implementation: the server and client commands (the client gets --queue, --calls,
# --concurrency, --server-pid and --json appended).
server_cmd() { # impl prefetch extra-server-flags
  case $1 in
    tokio) echo "$bins/server --prefetch $2 --workers $2 $3" ;;
    tokio-before) echo "$bins/before-server --prefetch $2 --workers $2 $3" ;;
    smol) echo "$bins/smol-server --prefetch $2 --workers $2 $3" ;;
    amqprs | amqprs-plain) echo "$bins/amqprs-server --prefetch $2 --workers $2 $3" ;;
  esac
}
client_cmd() { # impl extra-client-flags
  case $1 in
    tokio) echo "$bins/bench $2" ;;
    tokio-before) echo "$bins/before-bench $2" ;;
    smol) echo "$bins/smol-bench $2" ;;
    # amqprs sending what ours sends per request (mandatory, expiration, x-rpc-deadline) ...
    amqprs) echo "$bins/amqprs-bench --like-ours $2" ;;
    # ... and as the tutorial does (none of the three).
    amqprs-plain) echo "$bins/amqprs-bench $2" ;;
  esac
}

# Starts a server on $queue (the caller's) and waits until it consumes; sets $server (the
# caller's) to its pid. Variables after the flags go into its environment.
#   start_server IMPL PREFETCH EXTRA_SERVER_FLAGS [NAME=VALUE...]
start_server() {
  local ready="$work/ready.$RANDOM"
  # shellcheck disable=SC2046 # the command is a word list
  env "${@:4}" $(server_cmd "$1" "$2" "$3") --queue "$queue" >"$ready" 2>/dev/null &
  server=$!
  for _ in $(seq 100); do grep -q Awaiting "$ready" 2>/dev/null && break; sleep 0.1; done
}

# Stops a process gracefully (SIGINT) and waits for it.
stop() {
  kill -INT "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# Stops $server and deletes $queue.
stop_server() {
  stop "$server"
  rabbitmqctl -q delete_queue "$queue" >/dev/null 2>&1 || true
}

# One run: prints the client's JSON line with the run's facts and the broker's CPU added.
#   run LABEL IMPL CONCURRENCY PREFETCH CALLS [SERVER_FLAGS] [CLIENT_FLAGS]
run() {
  local label=$1 impl=$2 c=$3 prefetch=$4 n=$5 sflags=${6:-} cflags=${7:-}
  local queue="bench-$impl-$$-$RANDOM" server line b0 b1
  start_server "$impl" "$prefetch" "$sflags"
  b0=$(cpu_ns "$broker")
  # shellcheck disable=SC2086
  line=$(timeout "$run_timeout" $(client_cmd "$impl" "$cflags") --queue "$queue" --calls "$n" \
    --concurrency "$c" --server-pid "$server" --json || echo '{"failed":true}')
  b1=$(cpu_ns "$broker")
  stop_server
  local broker_us
  broker_us=$(awk -v d=$((b1 - b0)) -v n="$n" 'BEGIN { printf "%.1f", d / 1e3 / n }')
  echo "{\"label\":\"$label\",\"impl\":\"$impl\",\"prefetch\":$prefetch,\"load\":\"$(cut -d' ' -f1 /proc/loadavg)\",\"broker_cpu_us_per_call\":$broker_us,${line#\{}"
}

# The settings of the README's table: label concurrency prefetch calls.
settings=(
  "c1-p1 1 1 $((calls / 8))"
  "c64-p1 64 1 $((calls / 4))"
  "c64-p64 64 64 $calls"
)

compare() {
  interleave compare tokio amqprs smol amqprs-plain
}

# `before REV`: ours at REV against ours now and amqprs, as compare runs them, and at C=4096
# as well: the client's memory per call in flight, (peak - idle resident memory) / C.
before() {
  settings+=("c4096-p64 4096 64 $((calls + calls / 40))")
  interleave before tokio-before tokio amqprs
}

# Every setting of the table for each implementation, ROUNDS times, then the summary.
#   interleave NAME IMPL...
interleave() {
  local name=$1
  shift
  local impls=("$@") n=$#
  local results="$out_dir/$name.jsonl"
  : >"$results"
  for round in $(seq "$rounds"); do
    for s in "${settings[@]}"; do
      # shellcheck disable=SC2086
      set -- $s
      # Interleaved, so that a noisy moment hits each implementation alike, and each round
      # starts with the next one: a run right after another behaves differently from one
      # after a pause (A/B runs in a fixed order moved C=1's p50 by 10-15% towards the first).
      local i
      for i in $(seq 0 $((n - 1))); do
        run "$1" "${impls[$(((i + round) % n))]}" "$2" "$3" "$4" | tee -a "$results"
      done
    done
    echo "$name: round $round of $rounds done" >&2
  done
  python3 bench/summarize.py "$name" "$results" | tee "$out_dir/$name.md"
}

features() {
  local results="$out_dir/features.jsonl" n=$calls
  # label|impl|server flags|client flags: one choice switched at a time, on amqprs, then ours.
  local specs=(
    "amqprs: none of the per-request options (tutorial)|amqprs-plain||"
    "amqprs: + mandatory|amqprs-plain||--mandatory"
    "amqprs: + expiration|amqprs-plain||--expiration"
    "amqprs: + x-rpc-deadline header|amqprs-plain||--deadline-header"
    "amqprs: + all three (as ours)|amqprs-plain||--like-ours"
    "amqprs: direct reply-to instead of a reply queue|amqprs-plain||--reply-mode direct"
    "amqprs: server acks with multiple=true per batch|amqprs-plain|--multiple-ack|"
    "ours (tokio): exclusive reply queue|tokio||"
    "ours (tokio): direct reply-to|tokio||--reply-mode direct"
    # Ours with each per-request option switched off (ClientConfig), then all three.
    "ours (tokio): without mandatory|tokio||--no-mandatory"
    "ours (tokio): without expiration|tokio||--no-expiration"
    "ours (tokio): without x-rpc-deadline header|tokio||--no-deadline-header"
    "ours (tokio): without all three|tokio||--no-mandatory --no-expiration --no-deadline-header"
  )
  : >"$results"
  for round in $(seq "$rounds"); do
    # Round 1 in the order above (the table's), each later one starting one further on (see
    # compare).
    local i label impl sflags cflags
    for i in $(seq 0 $((${#specs[@]} - 1))); do
      IFS='|' read -r label impl sflags cflags <<<"${specs[$(((i + round - 1) % ${#specs[@]}))]}"
      run "$label" "$impl" 64 64 "$n" "$sflags" "$cflags" | tee -a "$results"
    done
    echo "features: round $round of $rounds done" >&2
  done
  python3 bench/summarize.py features "$results" | tee "$out_dir/features.md"
}

# Syscalls per call on both sides for a fixed number of calls, counted twice: by strace -c
# (every syscall by name; it slows both sides, which changes how much each read or write
# batches) and, where the kernel lets perf read the syscall tracepoints, by perf stat (no
# slowdown: the counts of an ordinary run). The client runs under the counter; the server is
# attached to once it is ready.
syscalls() {
  if ! command -v strace >/dev/null && [ "$(id -u)" = 0 ]; then
    timeout 300 apt-get update -qq >/dev/null || true
    timeout 300 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null || true
  fi
  local results="$out_dir/syscalls.jsonl" tools=()
  command -v strace >/dev/null && tools+=(strace)
  local events=raw_syscalls:sys_enter
  for e in sendto sendmsg writev write recvfrom read epoll_wait futex; do
    events="$events,syscalls:sys_enter_$e"
  done
  perf stat -x, -o /dev/null -e "$events" true 2>/dev/null && tools+=(perf)
  : >"$results"
  for tool in "${tools[@]}"; do
    for s in "c1-p1 1 1 $((calls / 10))" "c64-p64 64 64 $((calls / 2))"; do
      # shellcheck disable=SC2086
      set -- $s
      for impl in tokio amqprs; do
        local queue="bench-syscalls-$impl-$$-$RANDOM" server tracer
        local counter=(strace -c -f -q -o)
        [ "$tool" = perf ] && counter=(perf stat -x, -e "$events" -o)
        start_server "$impl" "$3" ""
        "${counter[@]}" "$work/server.count" -p "$server" &
        tracer=$!
        sleep 0.5
        # shellcheck disable=SC2046
        timeout "$run_timeout" "${counter[@]}" "$work/client.count" \
          $(client_cmd "$impl" "") --queue "$queue" --calls "$4" --concurrency "$2" --json >/dev/null || true
        stop "$tracer"
        stop_server
        python3 bench/summarize.py "$tool" "$1" "$impl" "$4" "$work/client.count" "$work/server.count" | tee -a "$results"
      done
    done
  done
  python3 bench/summarize.py syscalls "$results" | tee "$out_dir/syscalls.md"
}

# Current-thread vs multi-thread tokio (issue #14, item 3: "measure both"), the same
# `--threads` on the server and the client.
runtimes() {
  local results="$out_dir/runtimes.jsonl"
  : >"$results"
  for round in $(seq "$rounds"); do
    for s in "${settings[@]}"; do
      # shellcheck disable=SC2086
      set -- $s
      local i threads
      for i in 0 1 2; do
        threads=$(((i + round) % 3)) # each round starts with the next (see compare)
        run "$1 threads=$threads" tokio "$2" "$3" "$4" "--threads $threads" "--threads $threads" | tee -a "$results"
      done
    done
    echo "runtimes: round $round of $rounds done" >&2
  done
  python3 bench/summarize.py runtimes "$results" | tee "$out_dir/runtimes.md"
}

# Where the time of one call goes at C=1: perf records the syscall tracepoints of the server
# (attached) and of the client (run under it), and summarize.py walks each call from the
# client's send to the server's wake-up, read and send, and back. What lies between one side's
# send and the other's wake-up is the broker's leg (its processes, plus the kernel's wake-up
# of the reader).
timeline() {
  if ! perf stat -e syscalls:sys_enter_sendto -o /dev/null true 2>/dev/null; then
    echo "timeline: perf cannot read the syscall tracepoints here; skipped" >&2
    return 0
  fi
  local results="$out_dir/timeline.jsonl" n=$((calls / 10))
  local events=syscalls:sys_enter_sendto,syscalls:sys_exit_recvfrom,syscalls:sys_exit_epoll_wait
  : >"$results"
  for round in $(seq "$rounds"); do
    local order=(tokio amqprs)
    [ $((round % 2)) = 0 ] && order=(amqprs tokio) # each round starts with the other (see compare)
    for impl in "${order[@]}"; do
      local queue="bench-timeline-$impl-$$-$RANDOM" server tracer
      start_server "$impl" 1 ""
      # A warm-up run, then the traced one.
      # shellcheck disable=SC2046
      timeout "$run_timeout" $(client_cmd "$impl" "") --queue "$queue" --calls 300 --concurrency 1 --json >/dev/null || true
      perf record -q -o "$work/server.perf" -e "$events" -p "$server" 2>/dev/null &
      tracer=$!
      sleep 0.5
      # shellcheck disable=SC2046
      timeout "$run_timeout" perf record -q -o "$work/client.perf" -e "$events" -- \
        $(client_cmd "$impl" "") --queue "$queue" --calls "$n" --concurrency 1 --json >"$work/client.json" 2>/dev/null || true
      stop "$tracer"
      stop_server
      { perf script -i "$work/server.perf" -F pid,time,event 2>/dev/null | sed 's/^/server /'
        perf script -i "$work/client.perf" -F pid,time,event 2>/dev/null | sed 's/^/client /'
      } >"$work/events.txt"
      python3 bench/summarize.py walk "$impl" "$work/events.txt" "$work/client.json" | tee -a "$results"
    done
    echo "timeline: round $round of $rounds done" >&2
  done
  python3 bench/summarize.py timeline "$results" | tee "$out_dir/timeline.md"
}

# Copies per body byte: each program runs under a preloaded counter of its memcpy/memmove
# calls of 4 KiB and more (body bytes; the kernel's socket copies are not counted), against
# the echo server. A call moves its body out and back, so each program sends it once and
# receives it once: copies per byte each way = bytes copied / (calls x body x 2). The bench
# programs' own work is counted too (amqprs's bench copies each request's payload once).
copies() {
  local results="$out_dir/copies.jsonl" lib="$work/memcpy_count.so"
  gcc -O2 -shared -fPIC -o "$lib" bench/copies/memcpy_count.c -ldl
  : >"$results"
  for size in 100000 1000000 16000000; do
    local n=200
    [ "$size" = 16000000 ] && n=20
    for impl in tokio amqprs; do
      local queue="bench-copies-$impl-$$-$RANDOM" server counts="$work/copies.$RANDOM"
      start_server "$impl" 4 --echo MEMCPY_COUNT_OUT="$counts" LD_PRELOAD="$lib"
      # shellcheck disable=SC2046
      MEMCPY_COUNT_OUT="$counts" LD_PRELOAD="$lib" timeout "$run_timeout" $(client_cmd "$impl" "--payload $size") \
        --queue "$queue" --calls "$n" --concurrency 4 --json >"$work/client.json" 2>/dev/null || true
      stop_server
      python3 bench/summarize.py copied "$impl" "$size" "$n" "$counts" "$work/client.json" | tee -a "$results"
    done
  done
  python3 bench/summarize.py copies "$results" | tee "$out_dir/copies.md"
}

# The former default: both transports x both reply modes, one run each.
matrix() {
  for t in tokio smol; do
    for reply in exclusive direct; do
      run "matrix" "$t" 1 64 $((calls / 5)) "" "--reply-mode $reply"
      run "matrix" "$t" 64 64 "$calls" "" "--reply-mode $reply"
    done
    run "matrix" "$t" 64 1 $((calls / 2))
  done
}

echo "bench: mode $mode, $rounds rounds, load $(cut -d' ' -f1-3 /proc/loadavg), broker pid $broker" >&2
case $mode in
  compare) compare ;;
  before) before ;;
  features) features ;;
  syscalls) syscalls ;;
  runtimes) runtimes ;;
  timeline) timeline ;;
  copies) copies ;;
  matrix) matrix ;;
  all) compare; features; syscalls; runtimes; timeline; copies ;;
  curves) bash scripts/bench-curves.sh all ;;
  *) echo "usage: scripts/bench.sh [compare|before REV|features|syscalls|runtimes|timeline|copies|matrix|all|curves]" >&2; exit 2 ;;
esac
