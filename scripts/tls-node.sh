#!/usr/bin/env bash
# A RabbitMQ node with TLS, for the amqps tests; the main broker on 5672 is left alone.
#
#   scripts/tls-node.sh start    make the certificates (once), start the node (if not running),
#                                wait until it has booted, create its users
#   scripts/tls-node.sh stop     stop it (idempotent); data and certificates stay
#   scripts/tls-node.sh clean    stop it and delete its data, logs and certificates
#   scripts/tls-node.sh status   exit 0 if it answers on its plain AMQP port
#
# Node rabbit-tls@localhost: plain AMQP on 127.0.0.1:5674 and [::1]:5674, AMQP over TLS on
# 127.0.0.1:5671 and [::1]:5671, distribution on 127.0.0.1:25674, data, logs and
# certificates under /tmp/rabbit-tls. TLS as RabbitMQ's "TLS Support" guide sets it up for
# client certificates: `verify_peer` with `fail_if_no_peer_cert = false` (a client may come
# without one and log in with a password), `ssl_cert_login_from = common_name` and the
# rabbitmq_auth_mechanism_ssl plugin, so that the certificate's CN is the user of SASL
# EXTERNAL. Offered mechanisms: PLAIN AMQPLAIN EXTERNAL.
#
# Certificates in /tmp/rabbit-tls/certs (PEM, made with openssl):
#   ca.pem                       the test CA
#   server.pem, server.key       for localhost, 127.0.0.1 and ::1, signed by the CA
#   client.pem, client.key       CN=tls-client (a user of the node, no password), by the CA
#   expired.pem, expired.key     CN=tls-client, by the CA, expired in 2020
#   other-ca.pem                 another CA, which signed neither the server nor...
#   other-client.pem, .key       CN=tls-client, signed by the other CA
# Same OS user (and so Erlang cookie) as the main node: `rabbitmqctl -n rabbit-tls@localhost`
# works from root.
set -euo pipefail

NODE=rabbit-tls@localhost
HOST=127.0.0.1
PORT=${RABBIT_TLS_PLAIN_PORT:-5674}
TLS_PORT=${RABBIT_TLS_PORT:-5671}
DIST_PORT=${RABBIT_TLS_DIST_PORT:-25674}
BASE=${RABBIT_TLS_BASE:-/tmp/rabbit-tls}
CERTS=$BASE/certs
STARTUP_TIMEOUT=${RABBITMQ_STARTUP_TIMEOUT:-120}
CERT_USER=tls-client

log() { echo "tls-node: $*"; }

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

# As scripts/second-node.sh: the real scripts, as the main node's user, with our env file.
RMQ_USER=rabbitmq
RMQ_BIN=/usr/lib/rabbitmq/bin
run_rmq() {
    local script=$1
    shift
    local exe="$RMQ_BIN/$script"
    [ -x "$exe" ] || exe=$(command -v "$script" || echo "/usr/sbin/$script")
    if [ "$(id -u)" = 0 ] && id -u "$RMQ_USER" >/dev/null 2>&1; then
        (cd "$BASE" && runuser -u "$RMQ_USER" -- env RABBITMQ_CONF_ENV_FILE="$BASE/rabbitmq-env.conf" "$exe" "$@")
    else
        (cd "$BASE" && env RABBITMQ_CONF_ENV_FILE="$BASE/rabbitmq-env.conf" "$exe" "$@")
    fi
}

# sign NAME CA_PREFIX SUBJECT EXTENSIONS [openssl ca dates]: NAME.key and NAME.pem.
sign() {
    local name=$1 ca=$2 subject=$3 ext=$4
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$CERTS/$name.key" -out "$CERTS/$name.csr" -subj "$subject" 2>/dev/null
    printf '%s\n' "$ext" >"$CERTS/$name.ext"
    openssl x509 -req -in "$CERTS/$name.csr" -CA "$CERTS/$ca.pem" -CAkey "$CERTS/$ca.key" \
        -CAcreateserial -days 3650 -sha256 -extfile "$CERTS/$name.ext" \
        -out "$CERTS/$name.pem" 2>/dev/null
}

make_ca() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$CERTS/$1.key" -out "$CERTS/$1.pem" -days 3650 -subj "/CN=$2" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        2>/dev/null
}

# openssl makes the certificates; a fresh Debian machine may lack it.
need_openssl() {
    command -v openssl >/dev/null 2>&1 && return 0
    log "installing openssl"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl
    else
        sudo apt-get update -qq && sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl
    fi
}

make_certs() {
    [ -f "$CERTS/done" ] && return 0
    need_openssl
    log "making certificates in $CERTS"
    rm -rf "$CERTS"
    mkdir -p "$CERTS"
    local client_ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
    make_ca ca "amqp-rpc test CA"
    make_ca other-ca "amqp-rpc other CA"
    sign server ca "/CN=localhost" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
    sign client ca "/CN=$CERT_USER" "$client_ext"
    sign other-client other-ca "/CN=$CERT_USER" "$client_ext"
    # An expired certificate: `openssl ca` is the one openssl 3.0 command that takes dates.
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$CERTS/expired.key" -out "$CERTS/expired.csr" -subj "/CN=$CERT_USER" 2>/dev/null
    mkdir -p "$CERTS/ca-db"
    : >"$CERTS/ca-db/index.txt"
    cat >"$CERTS/ca-db/openssl.cnf" <<CNF
[ca]
default_ca = test
[test]
database = $CERTS/ca-db/index.txt
new_certs_dir = $CERTS/ca-db
serial = $CERTS/ca-db/serial
default_md = sha256
policy = any
x509_extensions = client
unique_subject = no
[any]
commonName = supplied
[client]
$client_ext
CNF
    echo 01 >"$CERTS/ca-db/serial"
    openssl ca -batch -config "$CERTS/ca-db/openssl.cnf" -cert "$CERTS/ca.pem" \
        -keyfile "$CERTS/ca.key" -in "$CERTS/expired.csr" -out "$CERTS/expired.pem" \
        -startdate 20200101000000Z -enddate 20200102000000Z -notext 2>/dev/null
    rm -f "$CERTS"/*.csr "$CERTS"/*.ext
    touch "$CERTS/done"
}

write_config() {
    mkdir -p "$BASE/mnesia" "$BASE/log"
    make_certs
    # No NODE_IP_ADDRESS/NODE_PORT: they would replace the listeners of rabbitmq.conf.
    cat >"$BASE/rabbitmq-env.conf" <<CONF
NODENAME=$NODE
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
listeners.tcp.1 = $HOST:$PORT
listeners.tcp.2 = ::1:$PORT
listeners.ssl.1 = $HOST:$TLS_PORT
listeners.ssl.2 = ::1:$TLS_PORT
ssl_options.cacertfile = $CERTS/ca.pem
ssl_options.certfile = $CERTS/server.pem
ssl_options.keyfile = $CERTS/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
ssl_cert_login_from = common_name
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
loopback_users.guest = true
CONF
    echo '[].' >"$BASE/advanced.config"
    echo '[rabbitmq_auth_mechanism_ssl].' >"$BASE/enabled_plugins"
    if id -u "$RMQ_USER" >/dev/null 2>&1; then chown -R "$RMQ_USER:" "$BASE"; fi
}

await_node() {
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until run_rmq rabbitmqctl -q -n "$NODE" await_startup --timeout 10 >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$NODE did not boot within ${STARTUP_TIMEOUT}s; logs in $BASE/log"
            return 1
        fi
        sleep 0.5
    done
    for port in "$PORT" "$TLS_PORT"; do
        until port_open "$port"; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                log "$NODE booted but nothing answers on $HOST:$port; logs in $BASE/log"
                return 1
            fi
            sleep 0.2
        done
    done
}

# The certificate's user: no password, so it can log in with EXTERNAL only.
add_users() {
    if ! run_rmq rabbitmqctl -q -n "$NODE" list_users | grep -q "^$CERT_USER\b"; then
        run_rmq rabbitmqctl -q -n "$NODE" add_user "$CERT_USER" "unused-$RANDOM$RANDOM" >/dev/null
        run_rmq rabbitmqctl -q -n "$NODE" clear_password "$CERT_USER" >/dev/null
    fi
    run_rmq rabbitmqctl -q -n "$NODE" set_permissions -p / "$CERT_USER" '.*' '.*' '.*' >/dev/null
}

start() {
    if port_open "$PORT" && port_open "$TLS_PORT"; then
        log "already up on $HOST:$PORT and $HOST:$TLS_PORT (TLS)"
        return 0
    fi
    write_config
    log "starting $NODE on $HOST:$PORT and $HOST:$TLS_PORT (TLS)"
    run_rmq rabbitmq-server -detached
    await_node
    add_users
    log "up on $HOST:$PORT and $HOST:$TLS_PORT (TLS)"
}

stop() {
    if [ ! -f "$BASE/rabbitmq-env.conf" ] && ! port_open "$PORT"; then
        log "not running"
        return 0
    fi
    [ -f "$BASE/rabbitmq-env.conf" ] || write_config
    log "stopping $NODE"
    run_rmq rabbitmqctl -q -n "$NODE" stop --idempotent >/dev/null
    local deadline=$((SECONDS + 30))
    while port_open "$PORT"; do
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
    if port_open "$PORT"; then log "up on $HOST:$PORT"; else
        log "down"
        exit 1
    fi
    ;;
*)
    echo "usage: $0 start|stop|clean|status" >&2
    exit 2
    ;;
esac
