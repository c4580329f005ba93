#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this machine, for the cluster suite (tests/tests/cluster.rs) and
# for trying the README's "Cluster" section by hand. It leaves the main broker (5672) and the
# fault suite's second node (5673) alone.
#
#   scripts/cluster.sh start          start the three nodes (those not running), join them into
#                                     one cluster and wait until all three are running members
#   scripts/cluster.sh stop           stop the three nodes (idempotent); their data stays
#   scripts/cluster.sh clean          stop them and delete their data and logs
#   scripts/cluster.sh status         exit 0 if all three are running members of one cluster
#   scripts/cluster.sh kill NODE      kill -9 the node's VM (NODE: c1, c2, c3 or rabbit-c1@localhost)
#   scripts/cluster.sh start NODE     start one node again (it rejoins the cluster by itself)
#
# Nodes rabbit-c1@localhost, rabbit-c2@localhost, rabbit-c3@localhost; AMQP on
# 127.0.0.1:5681/5682/5683, distribution on 127.0.0.1:25681/25682/25683; no plugins; data and
# logs under /tmp/rabbit-cluster/<node>. They run as the OS user rabbitmq, like the main node and
# scripts/second-node.sh, so all share one Erlang cookie (a requirement for clustering:
# https://www.rabbitmq.com/clustering.html#erlang-cookie) and `rabbitmqctl -n rabbit-c1@localhost`
# works from root. Each VM runs with one scheduler (+S 1) and no busy-waiting schedulers: three
# brokers share two cores with the tests.
set -euo pipefail

HOST=127.0.0.1
ROOT=${RABBIT_CLUSTER_BASE:-/tmp/rabbit-cluster}
STARTUP_TIMEOUT=${RABBITMQ_STARTUP_TIMEOUT:-120}
NODES=(c1 c2 c3)
# The node the others join.
SEED=c1

log() { echo "cluster: $*"; }

node_name() { echo "rabbit-$1@localhost"; }
amqp_port() { echo $((5680 + ${1#c})); }
dist_port() { echo $((25680 + ${1#c})); }
base() { echo "$ROOT/$1"; }

# c1, rabbit-c1 or rabbit-c1@localhost -> c1.
short() {
    local n=${1#rabbit-}
    n=${n%@localhost}
    case "$n" in
    c1 | c2 | c3) echo "$n" ;;
    *)
        echo "cluster: unknown node $1 (c1, c2 or c3)" >&2
        exit 2
        ;;
    esac
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$(amqp_port "$1")" 2>/dev/null; }

# As scripts/second-node.sh: run the real scripts as the rabbitmq user with the node's own env
# file, so nothing of /etc/rabbitmq/rabbitmq-env.conf (NODENAME, ports) leaks in.
RMQ_USER=rabbitmq
RMQ_BIN=/usr/lib/rabbitmq/bin
run_rmq() {
    local node=$1 script=$2
    shift 2
    local exe="$RMQ_BIN/$script" dir
    dir=$(base "$node")
    [ -x "$exe" ] || exe=$(command -v "$script" || echo "/usr/sbin/$script")
    if [ "$(id -u)" = 0 ] && id -u "$RMQ_USER" >/dev/null 2>&1; then
        (cd "$dir" && runuser -u "$RMQ_USER" -- env RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" "$exe" "$@")
    else
        (cd "$dir" && env RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" "$exe" "$@")
    fi
}

ctl() {
    local node=$1
    shift
    run_rmq "$node" rabbitmqctl -q -n "$(node_name "$node")" "$@"
}

write_config() {
    local node=$1 dir
    dir=$(base "$node")
    mkdir -p "$dir/mnesia" "$dir/log"
    cat >"$dir/rabbitmq-env.conf" <<CONF
NODENAME=$(node_name "$node")
NODE_IP_ADDRESS=$HOST
NODE_PORT=$(amqp_port "$node")
DIST_PORT=$(dist_port "$node")
MNESIA_BASE=$dir/mnesia
LOG_BASE=$dir/log
PID_FILE=$dir/pid
CONFIG_FILE=$dir/rabbitmq.conf
ADVANCED_CONFIG_FILE=$dir/advanced.config
ENABLED_PLUGINS_FILE=$dir/enabled_plugins
SERVER_ADDITIONAL_ERL_ARGS="+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none"
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
CONF
    cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.local = $HOST:$(amqp_port "$node")
loopback_users.guest = true
CONF
    echo '[].' >"$dir/advanced.config"
    echo '[].' >"$dir/enabled_plugins"
    if id -u "$RMQ_USER" >/dev/null 2>&1; then chown -R "$RMQ_USER:" "$dir"; fi
}

# Waits (bounded) until the node has booted and answers on its AMQP port.
await_node() {
    local node=$1 deadline=$((SECONDS + STARTUP_TIMEOUT))
    until ctl "$node" await_startup --timeout 10 >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$(node_name "$node") did not boot within ${STARTUP_TIMEOUT}s; logs in $(base "$node")/log"
            return 1
        fi
        sleep 0.5
    done
    until port_open "$node"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$(node_name "$node") booted but nothing answers on port $(amqp_port "$node")"
            return 1
        fi
        sleep 0.2
    done
}

start_node() {
    local node=$1
    if port_open "$node"; then
        return 0
    fi
    write_config "$node"
    log "starting $(node_name "$node") on $HOST:$(amqp_port "$node")"
    run_rmq "$node" rabbitmq-server -detached
    await_node "$node"
}

# Running members as the seed sees them (one node name a line).
running_members() {
    ctl "$SEED" cluster_status --formatter json 2>/dev/null |
        grep -o '"running_nodes":\[[^]]*\]' | grep -o 'rabbit-c[0-9]@localhost' || true
}

all_running() {
    [ "$(running_members | sort -u | wc -l)" -eq "${#NODES[@]}" ]
}

# Joins `node` to the seed's cluster unless it already belongs to it (its data survives stop
# and kill, so a restarted node rejoins by itself).
join() {
    local node=$1
    if ctl "$SEED" cluster_status --formatter json 2>/dev/null | grep -q "\"$(node_name "$node")\""; then
        return 0
    fi
    log "joining $(node_name "$node") to $(node_name "$SEED")"
    ctl "$node" stop_app
    ctl "$node" join_cluster "$(node_name "$SEED")"
    ctl "$node" start_app
    await_node "$node"
}

all_ports_open() {
    local n
    for n in "${NODES[@]}"; do port_open "$n" || return 1; done
}

await_cluster() {
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until all_running; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "not all nodes are running members after ${STARTUP_TIMEOUT}s: $(running_members | tr '\n' ' ')"
            return 1
        fi
        sleep 0.5
    done
}

start_all() {
    if all_ports_open && all_running; then
        log "already up: ${NODES[*]} on ports 5681-5683"
        return 0
    fi
    # The seed first: a node that was stopped last must not wait for the others (they boot in
    # any order, each waiting for its peers, up to RabbitMQ's own bounded retries).
    local n
    for n in "${NODES[@]}"; do
        if ! port_open "$n"; then
            write_config "$n"
            log "starting $(node_name "$n") on $HOST:$(amqp_port "$n")"
            run_rmq "$n" rabbitmq-server -detached
        fi
    done
    for n in "${NODES[@]}"; do await_node "$n"; done
    for n in "${NODES[@]}"; do [ "$n" = "$SEED" ] || join "$n"; done
    await_cluster
    log "up: ${NODES[*]} running members, AMQP on 5681-5683"
}

stop_node() {
    local node=$1
    if [ ! -f "$(base "$node")/rabbitmq-env.conf" ]; then
        return 0
    fi
    log "stopping $(node_name "$node")"
    ctl "$node" stop --idempotent >/dev/null || true
    local deadline=$((SECONDS + 30))
    while port_open "$node"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$(node_name "$node") still answers after stop"
            return 1
        fi
        sleep 0.2
    done
}

kill_node() {
    local node=$1 pid
    pid=$(cat "$(base "$node")/pid" 2>/dev/null || true)
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        # The pid file is written once the VM runs; fall back to the VM whose arguments name it.
        pid=$(pgrep -f -- "-sname $(node_name "$node")" | head -1 || true)
    fi
    if [ -z "$pid" ]; then
        log "$(node_name "$node") is not running"
        return 0
    fi
    log "kill -9 $(node_name "$node") (pid $pid)"
    kill -9 "$pid"
    local deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null || port_open "$node"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$(node_name "$node") still alive 10 s after kill -9"
            return 1
        fi
        sleep 0.1
    done
}

case "${1:-}" in
start)
    if [ -n "${2:-}" ]; then
        n=$(short "$2")
        start_node "$n"
        await_cluster
        log "$(node_name "$n") up and a running member"
    else
        start_all
    fi
    ;;
stop)
    # The seed last: it is the one the others rejoin through.
    for n in c3 c2 c1; do stop_node "$n"; done
    log "stopped"
    ;;
clean)
    for n in c3 c2 c1; do stop_node "$n"; done
    rm -rf "$ROOT"
    log "removed $ROOT"
    ;;
status)
    if all_running; then log "up: $(running_members | tr '\n' ' ')"; else
        log "not all running: $(running_members | tr '\n' ' ')"
        exit 1
    fi
    ;;
kill)
    [ -n "${2:-}" ] || {
        echo "usage: $0 kill c1|c2|c3" >&2
        exit 2
    }
    kill_node "$(short "$2")"
    ;;
*)
    echo "usage: $0 start [NODE]|stop|clean|status|kill NODE" >&2
    exit 2
    ;;
esac
