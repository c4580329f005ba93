#!/usr/bin/env bash
# A second RabbitMQ node for fault tests that must not disturb the main broker on 5672.
#
#   scripts/second-node.sh start    start it (if not running) and wait until it has booted
#   scripts/second-node.sh stop     stop it (idempotent); its data stays for the next start
#   scripts/second-node.sh clean    stop it and delete its data and logs
#   scripts/second-node.sh status   exit 0 if it answers on its AMQP port
#
# Node rabbit-fault@localhost, AMQP on 127.0.0.1:5673, distribution on 127.0.0.1:25673, no
# plugins (so no management listener), data and logs under /tmp/rabbit-fault. It runs as the
# same OS user as the main node and so shares its Erlang cookie:
#   rabbitmqctl -n rabbit-fault@localhost close_all_connections test
# works from root, as it does for the main node.
set -euo pipefail

NODE=rabbit-fault@localhost
HOST=127.0.0.1
PORT=${RABBIT_FAULT_PORT:-5673}
DIST_PORT=${RABBIT_FAULT_DIST_PORT:-25673}
BASE=${RABBIT_FAULT_BASE:-/tmp/rabbit-fault}
STARTUP_TIMEOUT=${RABBITMQ_STARTUP_TIMEOUT:-120}

log() { echo "second-node: $*"; }

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null; }

# The node and the CLI must run as the main node's user, whose home holds the Erlang cookie.
# Debian's /usr/sbin wrappers switch from root to `rabbitmq` themselves, but they pass the
# environment along only by accident of su; call the real scripts explicitly instead.
RMQ_USER=rabbitmq
RMQ_BIN=/usr/lib/rabbitmq/bin
run_rmq() {
    local script=$1
    shift
    local exe="$RMQ_BIN/$script"
    [ -x "$exe" ] || exe=$(command -v "$script" || echo "/usr/sbin/$script")
    if [ "$(id -u)" = 0 ] && id -u "$RMQ_USER" >/dev/null 2>&1; then
        # cd: the node must be able to read its working directory.
        (cd "$BASE" && runuser -u "$RMQ_USER" -- env RABBITMQ_CONF_ENV_FILE="$BASE/rabbitmq-env.conf" "$exe" "$@")
    else
        (cd "$BASE" && env RABBITMQ_CONF_ENV_FILE="$BASE/rabbitmq-env.conf" "$exe" "$@")
    fi
}

write_config() {
    mkdir -p "$BASE/mnesia" "$BASE/log"
    # Everything the node needs is in its own env file, so nothing of the main node's
    # /etc/rabbitmq/rabbitmq-env.conf (NODENAME, ports) leaks into it.
    cat >"$BASE/rabbitmq-env.conf" <<CONF
NODENAME=$NODE
NODE_IP_ADDRESS=$HOST
NODE_PORT=$PORT
DIST_PORT=$DIST_PORT
MNESIA_BASE=$BASE/mnesia
LOG_BASE=$BASE/log
PID_FILE=$BASE/pid
CONFIG_FILE=$BASE/rabbitmq.conf
ADVANCED_CONFIG_FILE=$BASE/advanced.config
ENABLED_PLUGINS_FILE=$BASE/enabled_plugins
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
CONF
    cat >"$BASE/rabbitmq.conf" <<CONF
listeners.tcp.local = $HOST:$PORT
loopback_users.guest = true
CONF
    echo '[].' >"$BASE/advanced.config"
    echo '[].' >"$BASE/enabled_plugins"
    if id -u "$RMQ_USER" >/dev/null 2>&1; then chown -R "$RMQ_USER:" "$BASE"; fi
}

await_node() {
    # await_startup fails at once while the VM has not yet registered with epmd: retry.
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until run_rmq rabbitmqctl -q -n "$NODE" await_startup --timeout 10 >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$NODE did not boot within ${STARTUP_TIMEOUT}s; logs in $BASE/log"
            return 1
        fi
        sleep 0.5
    done
    until port_open; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$NODE booted but nothing answers on $HOST:$PORT; logs in $BASE/log"
            return 1
        fi
        sleep 0.2
    done
}

start() {
    if port_open; then
        log "already up on $HOST:$PORT"
        return 0
    fi
    write_config
    log "starting $NODE on $HOST:$PORT"
    run_rmq rabbitmq-server -detached
    await_node
    log "up on $HOST:$PORT"
}

stop() {
    if [ ! -f "$BASE/rabbitmq-env.conf" ] && ! port_open; then
        log "not running"
        return 0
    fi
    [ -f "$BASE/rabbitmq-env.conf" ] || write_config
    log "stopping $NODE"
    # --idempotent: a node that is not running is success. `stop` waits for the VM to exit.
    run_rmq rabbitmqctl -q -n "$NODE" stop --idempotent >/dev/null
    local deadline=$((SECONDS + 30))
    while port_open; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$NODE still answers on $HOST:$PORT after stop"
            return 1
        fi
        sleep 0.2
    done
    log "stopped"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
clean)
    stop
    rm -rf "$BASE"
    log "removed $BASE"
    ;;
status)
    if port_open; then log "up on $HOST:$PORT"; else
        log "down"
        exit 1
    fi
    ;;
*)
    echo "usage: $0 start|stop|clean|status" >&2
    exit 2
    ;;
esac
