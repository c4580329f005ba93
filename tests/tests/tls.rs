//! TLS and authentication against a real RabbitMQ node with TLS (`rabbit-tls@localhost`,
//! `scripts/tls-node.sh`: TLS on 5671, plain AMQP on 5674, both on 127.0.0.1 and [::1],
//! `verify_peer` without `fail_if_no_peer_cert`, SASL PLAIN, AMQPLAIN and EXTERNAL). The main
//! broker on 5672 is not touched.
//!
//! This test binary starts the node on first use (about 20 s, unless it is already up) and a
//! watchdog stops it when the binary exits, if it started it (`E2E_KEEP_TLS_NODE=1` keeps it
//! running for the next run). Every case runs on tokio and on smol.

use std::io::Write;
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{
    CallError, CallRequest, Client, ClientOptions, ConnectError, ConnectionError, ReplyMode,
    RpcError, TlsError,
};
use e2e_tests::broker::{unique_name, Node, QueueGuard};
use e2e_tests::calls::{call, concurrent_calls, connect_with, expect_fib, CALL_TIMEOUT};
use e2e_tests::node::AppStopped;
use e2e_tests::rt::{blocking, sleep, spawn, within, TestRuntime};
use e2e_tests::servers::{
    client_options_at, fault_client_options, fault_server_options, fib_held, server_options_at,
    Counter, Hold, TestServer,
};

/// One `#[test]` per transport per case, like [`e2e_tests!`](e2e_tests::e2e_tests), after
/// [`share_node`]: the node is up and the log capture installed before any case's runtime
/// starts, and a case that restarts the node runs alone.
macro_rules! tls_tests {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[test]
                fn tokio() {
                    let _node = super::share_node(stringify!($case));
                    e2e_tests::rt::run::<e2e_tests::rt::Tokio, _>(
                        stringify!($case),
                        super::$case::<e2e_tests::rt::Tokio>,
                    );
                }

                #[test]
                fn smol() {
                    let _node = super::share_node(stringify!($case));
                    e2e_tests::rt::run::<e2e_tests::rt::Smol, _>(
                        stringify!($case),
                        super::$case::<e2e_tests::rt::Smol>,
                    );
                }
            }
        )*
    };
}

tls_tests! {
    rpc_with_plain_over_tls,
    rpc_with_external_and_no_password,
    external_on_a_plain_port_names_offered_and_asked,
    wrong_ca_is_unknown_ca,
    hostname_mismatch_is_refused,
    expired_client_certificate_is_refused,
    plain_amqp_to_the_tls_port_is_a_clear_error,
    tls_to_the_plain_port_is_a_clear_error,
    verify_none_connects_and_warns,
    tls_to_a_silent_port_times_out,
    ipv6_literals_connect,
    recovery_over_tls,
    broker_restart_over_tls,
}

/// The node's Erlang name.
const NODE_NAME: &str = "rabbit-tls@localhost";
/// Its plain AMQP URI (guest may log in: the tests connect from loopback).
const PLAIN_URI: &str = "amqp://guest:guest@127.0.0.1:5674/%2f";
/// Where `scripts/tls-node.sh` writes the certificates.
const CERTS: &str = "/tmp/rabbit-tls/certs";
/// The user of the client certificate's CN.
const CERT_USER: &str = "tls-client";
/// Serializes starting and stopping across processes.
const LOCK_FILE: &str = "/tmp/rabbit-tls.lock";
/// "Promptly" for a refused connect, on a small busy machine.
const PROMPT: Duration = Duration::from_secs(3);

/// `amqps://` to the node at `host_port` with the test CA and `query` appended.
fn tls_uri(userinfo: &str, host_port: &str, query: &str) -> String {
    format!("amqps://{userinfo}{host_port}/%2f?cacertfile={CERTS}/ca.pem{query}")
}

/// The node, for `rabbitmqctl` and queue clean-up (over its plain port).
fn node() -> Node {
    Node::new(PLAIN_URI, NODE_NAME)
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// PLAIN over TLS, the host an IP address verified against the certificate's IP SAN: a server
/// and a client over amqps, 64 calls at once answered.
async fn rpc_with_plain_over_tls<R: TestRuntime>() {
    let queue = QueueGuard::on(&node(), "tls-plain");
    let uri = tls_uri("guest:guest@", "127.0.0.1:5671", "&auth_mechanism=plain");
    let server =
        TestServer::start::<R, _, _>(server_options_at(&uri, queue.name()), fib_handler).await;
    let client = connect_with::<R>(client_options_at(&uri, ReplyMode::DirectReplyTo)).await;
    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);
    concurrent_calls(&client, queue.name(), 64).await;
    client.close().await;
    server.stop::<R>().await;
}

/// EXTERNAL: the client certificate is the login, no user name or password in the URI; the
/// broker shows the connection as the certificate's CN.
async fn rpc_with_external_and_no_password<R: TestRuntime>() {
    let queue = QueueGuard::on(&node(), "tls-external");
    let name = unique_name("external");
    let uri = tls_uri(
        "",
        "localhost:5671",
        &format!("&certfile={CERTS}/client.pem&keyfile={CERTS}/client.key&auth_mechanism=external"),
    );
    let server =
        TestServer::start::<R, _, _>(server_options_at(&uri, queue.name()), fib_handler).await;
    let mut options = client_options_at(&uri, ReplyMode::ExclusiveQueue);
    options.connect[0].connection.connection_name = Some(name.clone());
    let client = connect_with::<R>(options).await;
    expect_fib(call(&client, queue.name(), "40", CALL_TIMEOUT).await, 40);
    let users = blocking(move || {
        node().rabbitmqctl(&[
            "-q",
            "list_connections",
            "--no-table-headers",
            "user",
            "auth_mechanism",
            "ssl",
            "client_properties",
        ])
    })
    .await
    .expect("list_connections");
    let line = users
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("no connection named {name} in {users}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[..3], [CERT_USER, "EXTERNAL", "true"], "{line}");
    client.close().await;
    server.stop::<R>().await;
}

/// Asking for EXTERNAL where the broker does not offer it (its plain port: EXTERNAL needs
/// TLS): a typed error naming both lists, within the connect timeout (5 s), and no retry. Not
/// within [`PROMPT`]: we tell the broker why we leave (connection.close 403) and RabbitMQ
/// answers a close before tune only by closing the socket 3 s later (rabbit_reader's
/// SILENT_CLOSE_DELAY).
async fn external_on_a_plain_port_names_offered_and_asked<R: TestRuntime>() {
    let uri = "amqp://127.0.0.1:5674/%2f?auth_mechanism=external";
    match refused_within::<R>(uri, Duration::from_secs(5)).await {
        ConnectError::Connection(ConnectionError::NoCommonMechanism { offered, asked }) => {
            assert_eq!(asked, "EXTERNAL");
            assert!(
                offered.contains("PLAIN") && !offered.contains("EXTERNAL"),
                "{offered}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A CA that did not sign the server's certificate: UnknownCa, promptly.
async fn wrong_ca_is_unknown_ca<R: TestRuntime>() {
    let uri = format!("amqps://guest:guest@localhost:5671/%2f?cacertfile={CERTS}/other-ca.pem");
    let error = refused::<R>(&uri).await;
    assert!(
        matches!(
            error,
            ConnectError::Tls {
                error: TlsError::UnknownCa,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("trusted CA"), "{error}");
}

/// The certificate is for localhost, 127.0.0.1 and ::1: any other name is refused, whether it
/// comes from `server_name_indication` or is the host dialled.
async fn hostname_mismatch_is_refused<R: TestRuntime>() {
    let uri = tls_uri(
        "guest:guest@",
        "127.0.0.1:5671",
        "&server_name_indication=not-the-broker.example",
    );
    match refused::<R>(&uri).await {
        ConnectError::Tls {
            error: TlsError::HostnameMismatch { expected },
            ..
        } => assert_eq!(expected, "not-the-broker.example"),
        other => panic!("{other:?}"),
    }
    // 127.0.0.2 reaches the same listener (loopback), but is not in the certificate.
    let uri = tls_uri("guest:guest@", "127.0.0.2:5671", "");
    match refused::<R>(&uri).await {
        ConnectError::Tls {
            error: TlsError::HostnameMismatch { expected },
            ..
        } => assert_eq!(expected, "127.0.0.2"),
        // The node listens on 127.0.0.1 only: then the connect itself is refused, which
        // proves nothing about names.
        ConnectError::Io { .. } => {}
        other => panic!("{other:?}"),
    }
}

/// An expired client certificate: the broker refuses it, and we say so. With TLS 1.3 the
/// broker's verdict comes after our handshake ends, as an alert and a close; when our first
/// bytes reach its closed socket first, the TCP reset swallows the alert, and all we can say
/// is that it hung up on our certificate.
async fn expired_client_certificate_is_refused<R: TestRuntime>() {
    let uri = tls_uri(
        "guest:guest@",
        "localhost:5671",
        &format!("&certfile={CERTS}/expired.pem&keyfile={CERTS}/expired.key"),
    );
    let error = refused::<R>(&uri).await;
    assert!(
        matches!(
            error,
            ConnectError::Tls {
                error: TlsError::ClientCertificateExpired | TlsError::ClosedAfterClientCertificate,
                ..
            }
        ),
        "{error:?}"
    );
}

/// `amqp://` to the TLS port: the broker answers with a TLS alert; we say "use amqps" within
/// the connect timeout instead of waiting for it.
async fn plain_amqp_to_the_tls_port_is_a_clear_error<R: TestRuntime>() {
    let error = refused::<R>("amqp://guest:guest@127.0.0.1:5671/%2f").await;
    assert!(
        matches!(
            error,
            ConnectError::Tls {
                error: TlsError::ServerSpeaksTls,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("amqps://"), "{error}");
}

/// `amqps://` to the plain port: the broker answers our ClientHello with its AMQP header.
async fn tls_to_the_plain_port_is_a_clear_error<R: TestRuntime>() {
    let uri = tls_uri("guest:guest@", "127.0.0.1:5674", "");
    let error = refused::<R>(&uri).await;
    assert!(
        matches!(
            error,
            ConnectError::Tls {
                error: TlsError::NotTls,
                ..
            }
        ),
        "{error:?}"
    );
}

/// `verify=verify_none` spelt out: connects to a server whose CA we do not trust, and warns.
async fn verify_none_connects_and_warns<R: TestRuntime>() {
    let queue = QueueGuard::on(&node(), "tls-verify-none");
    // The other CA: verification would refuse this server.
    let uri = format!(
        "amqps://guest:guest@localhost:5671/%2f?verify=verify_none&cacertfile={CERTS}/other-ca.pem"
    );
    let before = captured_warnings();
    let server = TestServer::start::<R, _, _>(
        server_options_at(&tls_uri("guest:guest@", "localhost:5671", ""), queue.name()),
        fib_handler,
    )
    .await;
    let client = connect_with::<R>(client_options_at(&uri, ReplyMode::DirectReplyTo)).await;
    expect_fib(call(&client, queue.name(), "12", CALL_TIMEOUT).await, 12);
    assert!(
        captured_warnings() > before,
        "no verify_none warning was logged"
    );
    client.close().await;
    server.stop::<R>().await;
}

/// A port that accepts and never answers (the kernel completes the TCP handshake for a
/// listener nobody accepts on): the TLS handshake must not hang past `connection_timeout`.
async fn tls_to_a_silent_port_times_out<R: TestRuntime>() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("address").port();
    let uri = tls_uri(
        "guest:guest@",
        &format!("127.0.0.1:{port}"),
        "&connection_timeout=1000",
    );
    let mut options = ClientOptions::from_uri(&uri).expect("the URI parses");
    options.retry_first_connect = false;
    let started = Instant::now();
    let result = within::<R, _>(
        Duration::from_secs(5),
        "a connect to a silent port",
        Client::<R>::connect_with(options),
    )
    .await;
    match result {
        Err(ConnectError::TimedOut { after, .. }) => {
            assert_eq!(after, Duration::from_millis(1000));
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("connected to a silent port"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

/// Issue 10 case 6: an IPv6 literal in brackets, over plain AMQP and over TLS (verified
/// against the certificate's IP SAN ::1), really goes to ::1: the broker sees the connection
/// come from ::1 (amq-protocol's parser turned `[::1]` into `localhost`, which is 127.0.0.1).
async fn ipv6_literals_connect<R: TestRuntime>() {
    let queue = QueueGuard::on(&node(), "ipv6");
    let server =
        TestServer::start::<R, _, _>(server_options_at(PLAIN_URI, queue.name()), fib_handler).await;
    for uri in [
        "amqp://guest:guest@[::1]:5674/%2f".to_owned(),
        tls_uri("guest:guest@", "[::1]:5671", ""),
    ] {
        let name = unique_name("ipv6");
        let mut options = client_options_at(&uri, ReplyMode::DirectReplyTo);
        options.connect[0].connection.connection_name = Some(name.clone());
        let client = connect_with::<R>(options).await;
        expect_fib(call(&client, queue.name(), "20", CALL_TIMEOUT).await, 20);
        let listing = blocking(|| {
            node().rabbitmqctl(&[
                "-q",
                "list_connections",
                "--no-table-headers",
                "peer_host",
                "client_properties",
            ])
        })
        .await
        .expect("list_connections");
        let line = listing
            .lines()
            .find(|l| l.contains(&name))
            .unwrap_or_else(|| panic!("no connection named {name} in {listing}"));
        assert!(line.starts_with("::1"), "{uri}: {line}");
        client.close().await;
    }
    server.stop::<R>().await;
}

/// Recovery over TLS as over plain: the broker closes the client's connection while calls
/// run; the idempotent ones are sent again on the new TLS connection and answered.
async fn recovery_over_tls<R: TestRuntime>() {
    const CALLS: usize = 4;
    let queue = QueueGuard::on(&node(), "tls-recovery");
    let uri = tls_uri("guest:guest@", "localhost:5671", "");
    let mut options = server_options_at(&uri, queue.name());
    options.rpc.prefetch = 16;
    options.workers = 16;
    let (hold, started) = (Hold::up_to(Duration::from_secs(30)), Counter::default());
    let server =
        TestServer::start::<R, _, _>(options, fib_held::<R>(hold.clone(), started.clone())).await;
    let name = unique_name("tls-client");
    let client =
        connect_with::<R>(fault_client_options(&uri, ReplyMode::DirectReplyTo, &name)).await;
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let (client, queue) = (client.clone(), queue.name().to_owned());
            let n = 20 + i as u32;
            spawn::<R, _>(async move {
                let mut request = CallRequest::new(queue, n.to_string(), Duration::from_secs(20));
                request.idempotent = true;
                (n, client.call_with(request).await.map(|r| r.body))
            })
        })
        .collect();
    started.wait_for::<R>(CALLS, Duration::from_secs(10)).await;
    blocking(move || node().close_connection_named(&name))
        .await
        .expect("close the client's connection");
    hold.release();
    for task in calls {
        let (n, reply) = within::<R, _>(Duration::from_secs(20), "a call", task.join()).await;
        expect_fib(reply, n);
    }
    client.close().await;
    server.stop::<R>().await;
}

/// Recovery over TLS across a broker restart (`stop_app`/`start_app`): calls made while the
/// node is down wait, the client and the server reconnect with a new TLS handshake (the server
/// declares its queue again), and calls succeed again. Each call made during the outage ends
/// once, answered or with a typed error of the outage: `NotRouted` (the client was back before
/// the server had declared its queue again), `ReplyPathLost` or `ConnectionLost` (the node
/// went down under it), never with a wrong answer or a timeout.
async fn broker_restart_over_tls<R: TestRuntime>() {
    const CALLS: u32 = 8;
    let queue = QueueGuard::on(&node(), "tls-restart");
    let uri = tls_uri("guest:guest@", "localhost:5671", "");
    let mut server = TestServer::start::<R, _, _>(
        fault_server_options(&uri, queue.name(), &unique_name("tls-server"), 8),
        fib_handler,
    )
    .await;
    let client = connect_with::<R>(fault_client_options(
        &uri,
        ReplyMode::DirectReplyTo,
        &unique_name("tls-client"),
    ))
    .await;
    expect_fib(call(&client, queue.name(), "10", CALL_TIMEOUT).await, 10);

    let stopped = blocking(|| AppStopped::stop(&node()))
        .await
        .expect("stop_app");
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let (client, queue) = (client.clone(), queue.name().to_owned());
            let n = 30 + i;
            spawn::<R, _>(async move {
                let mut request = CallRequest::new(queue, n.to_string(), Duration::from_secs(40));
                request.idempotent = true;
                (n, client.call_with(request).await.map(|r| r.body))
            })
        })
        .collect();
    blocking(move || stopped.start()).await.expect("start_app");
    server.wait_ready_again::<R>(Duration::from_secs(30)).await;
    for task in calls {
        let (n, reply) = within::<R, _>(Duration::from_secs(45), "a call", task.join()).await;
        match reply {
            Err(CallError::Rpc(
                RpcError::NotRouted | RpcError::ReplyPathLost | RpcError::ConnectionLost { .. },
            )) => {}
            reply => expect_fib(reply, n),
        }
    }
    // The server may declare its queue while the booting node still clears transient queues
    // (the broker then cancels its consumer and it declares again): calls are routed again
    // within 15 s.
    let back = Instant::now();
    loop {
        match call(&client, queue.name(), "50", CALL_TIMEOUT).await {
            Err(CallError::Rpc(RpcError::NotRouted))
                if back.elapsed() < Duration::from_secs(15) =>
            {
                sleep::<R>(Duration::from_millis(300)).await;
            }
            reply => {
                expect_fib(reply, 50);
                break;
            }
        }
    }
    client.close().await;
    server.stop::<R>().await;
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Connects to `uri` (connect timeout 5 s, no retry) and returns the error, which must come
/// within [`PROMPT`]; the error's text must not contain the password.
async fn refused<R: TestRuntime>(uri: &str) -> ConnectError {
    refused_within::<R>(uri, PROMPT).await
}

/// [`refused`] with another bound than [`PROMPT`].
async fn refused_within<R: TestRuntime>(uri: &str, limit: Duration) -> ConnectError {
    let mut options = ClientOptions::from_uri(uri).expect("the URI parses");
    options.connect[0].connect_timeout = Duration::from_secs(5);
    options.connect[0].connection.handshake_timeout = Duration::from_secs(5);
    let started = Instant::now();
    let result = within::<R, _>(
        Duration::from_secs(8),
        "a refused connect",
        Client::<R>::connect_with(options),
    )
    .await;
    let error = match result {
        Ok(client) => {
            client.close().await;
            panic!("{uri}: connected");
        }
        Err(e) => e,
    };
    assert!(
        started.elapsed() < limit,
        "{uri}: refused only after {:?}: {error}",
        started.elapsed()
    );
    assert!(!format!("{error} {error:?}").contains("guest:guest"));
    error
}

/// Cases share the node; the one that restarts it takes it alone.
static NODE_USE: RwLock<()> = RwLock::new(());

/// The node up (see [`setup`]) and held for the case: shared, or alone for a restart. A case
/// that failed while holding it left the node running (its guard starts the app again), so a
/// poisoned lock is still usable.
fn share_node(case: &str) -> Box<dyn std::any::Any> {
    setup();
    if case == "broker_restart_over_tls" {
        Box::new(NODE_USE.write().unwrap_or_else(PoisonError::into_inner))
    } else {
        Box::new(NODE_USE.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The node up and the log capture installed, once per process.
fn setup() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        capture_logs();
        start_node();
    });
}

fn script() -> String {
    format!("{}/../scripts/tls-node.sh", env!("CARGO_MANIFEST_DIR"))
}

/// Starts the node through the script (under a lock, as `e2e_tests::node` does for the second
/// node), and leaves a watchdog that stops it at exit if this process started it.
fn start_node() {
    let started = Instant::now();
    let output = Command::new("flock")
        .args(["-o", LOCK_FILE, "bash", &script(), "start"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script()));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the TLS node did not start:\n{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    if said.contains("already up") {
        return;
    }
    eprintln!("e2e: started {NODE_NAME} in {:.1?}", started.elapsed());
    e2e_tests::process::stop_at_exit(NODE_NAME, &script(), LOCK_FILE, "E2E_KEEP_TLS_NODE");
}

/// How many `verify_none` warnings the driver logged so far.
fn captured_warnings() -> usize {
    LOG.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .matches("verify_none")
        .count()
}

/// Everything the driver logged at WARN and above, capped at 1 MiB.
static LOG: Mutex<String> = Mutex::new(String::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut log = LOG.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() < 1 << 20 {
            log.push_str(&String::from_utf8_lossy(buf));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process's log subscriber: the driver's warnings into [`LOG`] (installed before any
/// case's own `init_logging`, which then leaves it in place).
fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("amqp_rpc_driver=warn"))
        .with_writer(|| Capture)
        .with_ansi(false)
        .try_init();
}
