#!/usr/bin/env bash
# Make sure the things the end-to-end tests need are here, installing what is missing:
#   - a RabbitMQ broker answering on 127.0.0.1:5672 (guest/guest);
#   - python3 with pika 1.x (for the tutorial interop scripts in tests/interop/).
# Idempotent, and fast (well under a second or two) when everything is already there.
set -euo pipefail

HOST=127.0.0.1
PORT=${RABBITMQ_NODE_PORT:-5672}
STARTUP_TIMEOUT=${RABBITMQ_STARTUP_TIMEOUT:-120}

log() { echo "ensure-rabbitmq: $*"; }

# Root can write apt's lists; anyone else goes through sudo when it is there.
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        log "need root to run: $*"; return 1
    fi
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

port_open() {
    # bash's /dev/tcp: no client tools needed; `timeout` so a black-holed port cannot hang us.
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null
}

# --- RabbitMQ -------------------------------------------------------------------------------
if port_open; then
    log "RabbitMQ answers on $HOST:$PORT"
else
    if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
        log "installing rabbitmq-server"
        apt_install rabbitmq-server
    fi
    export PATH="$PATH:/usr/sbin:/sbin"
    # The package's postinst may already have started it.
    if ! port_open; then
        log "starting rabbitmq-server"
        # -detached returns at once; await_startup below waits for the node to boot.
        as_root rabbitmq-server -detached || true
    fi
    log "waiting for the node to boot (at most ${STARTUP_TIMEOUT}s)"
    # await_startup fails at once while the new VM has not yet registered with epmd: retry.
    deadline=$((SECONDS + STARTUP_TIMEOUT))
    until as_root rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1 && port_open; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "RabbitMQ did not come up on $HOST:$PORT within ${STARTUP_TIMEOUT}s"
            as_root rabbitmqctl status || true
            exit 1
        fi
        sleep 0.5
    done
    log "RabbitMQ is up on $HOST:$PORT"
fi

# --- python3 + pika 1.x ---------------------------------------------------------------------
pika_ok() { "$1" -c 'import sys, pika; sys.exit(0 if pika.__version__.startswith("1.") else 1)' 2>/dev/null; }

if ! command -v python3 >/dev/null 2>&1; then
    log "installing python3"
    apt_install python3 python3-pip
fi
if pika_ok python3; then
    log "python3 has pika 1.x"
else
    log "installing pika 1.x with pip"
    export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
    if ! python3 -m pip install -q 'pika>=1,<2' && ! python3 -m pip install -q --break-system-packages 'pika>=1,<2'; then
        log "pip failed; trying Debian's python3-pika"
        apt_install python3-pika
    fi
    if pika_ok python3; then
        log "python3 has pika 1.x"
    elif pika_ok /usr/bin/python3; then
        # Debian's package only reaches Debian's interpreter, not e.g. a pyenv one first on PATH.
        log "pika is importable by /usr/bin/python3 only: run the interop scripts with it"
    else
        log "could not make pika 1.x importable"
        exit 1
    fi
fi
