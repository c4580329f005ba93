//! Scale-out on a RabbitMQ cluster: address lists, a shared quorum request queue, and a node
//! lost (`kill -9`) under load with no call lost. On tokio and on smol.
//!
//! Two kinds of cases:
//! - address lists, against the main broker and closed ports (no cluster needed): a client
//!   whose every address is down fails in bounded time with an error naming each address;
//!   credentials differ per address;
//! - against the 3-node cluster of `scripts/cluster.sh` (nodes c1, c2, c3 on 5681–5683), which
//!   this binary starts on first use (about a minute) and stops at exit if it started it
//!   (`E2E_KEEP_CLUSTER=1` keeps it). These cases hold the cluster one at a time
//!   ([`cluster::exclusive`]) and restart any node they kill, also when they fail.
//!
//! Each kill case also measures (prints, never asserts) the rate of successful calls before the
//! kill, after it, and how long until the rate is back to 90 % of before:
//! `cargo test -p e2e-tests --release --test cluster -- --nocapture --test-threads 1`, lines
//! starting with `cluster-rate`. The quorum-vs-classic comparison is an ignored case:
//! `cargo test -p e2e-tests --release --test cluster -- --ignored --nocapture`.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use amqp_rpc_driver::{
    Addresses, Client, ClientOptions, ConnectError, QueueKind, ReplyMode, ServerOptions,
};
use e2e_tests::broker::{unique_name, QueueGuard};
use e2e_tests::calls::connect_with;
use e2e_tests::cluster::{self, Killed};
use e2e_tests::ledger::{assert_queue_drained, Class, Ledger, Load, LoadSpec, Summary};
use e2e_tests::rt::{blocking, sleep, spawn, within, TestRuntime};
use e2e_tests::servers::{
    client_options_at, fault_backoff, fault_connect_settings, fib_held, Counter, Hold, TestServer,
};

e2e_tests::e2e_tests! {
    every_address_down_fails_naming_each,
    credentials_differ_per_address,
}

/// Like [`e2e_tests!`](e2e_tests::e2e_tests), each case holding the cluster for itself from
/// before its runtime starts (starting the cluster does not count against the case's limit),
/// with attributes per transport: `case: [tokio's] [smol's]`.
macro_rules! cluster_tests {
    ($($case:ident: [$(#[$tokio:meta])*] [$(#[$smol:meta])*]),* $(,)?) => {
        $(
            mod $case {
                #[test]
                $(#[$tokio])*
                fn tokio() {
                    let _lease = e2e_tests::cluster::exclusive();
                    e2e_tests::rt::run::<e2e_tests::rt::Tokio, _>(
                        stringify!($case),
                        super::$case::<e2e_tests::rt::Tokio>,
                    );
                }

                #[test]
                $(#[$smol])*
                fn smol() {
                    let _lease = e2e_tests::cluster::exclusive();
                    e2e_tests::rt::run::<e2e_tests::rt::Smol, _>(
                        stringify!($case),
                        super::$case::<e2e_tests::rt::Smol>,
                    );
                }
            }
        )*
    };
}

// A kill case takes about 45 s, most of it the killed node booting again; CI runs the client
// node's case on both transports (each re-arms a different reply path) and the two others on
// one transport each. `--include-ignored` runs the full suite (the measurement too).
cluster_tests! {
    servers_on_two_nodes_share_one_quorum_queue: [] [],
    kill_the_clients_node_under_load: [] [],
    kill_a_servers_node_under_load: [#[ignore = "full cluster suite only (--include-ignored)"]] [],
    kill_the_quorum_leader_under_load: [] [#[ignore = "full cluster suite only (--include-ignored)"]],
    measure_quorum_vs_classic:
        [#[ignore = "a measurement (about a minute): --ignored --nocapture"]]
        [#[ignore = "a measurement (about a minute): --ignored --nocapture"]],
}

/// A password that must never appear in an error.
const SECRET: &str = "hunter2secret";

/// Ports nothing listens on: bound, then released.
fn closed_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("bound").port())
        .collect()
}

/// A client whose three addresses all refuse connections fails at once with
/// [`ConnectError::AllFailed`], one entry per address, each named, no password anywhere; with
/// `retry_first_connect` and a bounded backoff it fails the same way once the attempts are
/// spent, in bounded time. A server with the same list fails the same way.
async fn every_address_down_fails_naming_each<R: TestRuntime>() {
    let ports = closed_ports(3);
    let uris: Vec<String> = ports
        .iter()
        .map(|p| format!("amqp://guest:{SECRET}@127.0.0.1:{p}/%2f"))
        .collect();
    for retry in [false, true] {
        let mut options = ClientOptions::from_uris(&uris).expect("URIs parse");
        options.retry_first_connect = retry;
        options.backoff = amqp_rpc_driver::Backoff {
            max_attempts: Some(2),
            ..fault_backoff()
        };
        let started = Instant::now();
        let error = within::<R, _>(
            Duration::from_secs(10),
            "connecting to three closed ports",
            Client::<R>::connect_with(options),
        )
        .await
        .expect_err("nothing listens there");
        let text = error.to_string();
        let ConnectError::AllFailed(failures) = &error else {
            panic!("expected AllFailed, got {error:?}");
        };
        let mut named: Vec<&str> = failures.iter().map(|f| f.address.as_str()).collect();
        named.sort_unstable();
        let mut expected: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        expected.sort_unstable();
        assert_eq!(named, expected, "each address once: {text}");
        assert!(
            failures
                .iter()
                .all(|f| matches!(f.error, ConnectError::Io { .. })),
            "{error:?}"
        );
        for address in &expected {
            assert!(text.contains(address.as_str()), "{text}");
        }
        assert!(!text.contains(SECRET) && !format!("{error:?}").contains(SECRET));
        eprintln!(
            "retry_first_connect={retry}: failed after {:.2?}: {text}",
            started.elapsed()
        );
    }

    // A server too: `serve` ends at once with the same error.
    let mut options = ServerOptions::from_uris(&uris, "e2e-never-declared").expect("URIs parse");
    options.backoff = fault_backoff();
    let error = within::<R, _>(
        Duration::from_secs(10),
        "a server on three closed ports",
        TestServer::try_start::<R, _, _>(options, amqp_rpc_cli::fib_handler),
    )
    .await
    .expect_err("nothing listens there");
    assert!(
        matches!(&error, ConnectError::AllFailed(f) if f.len() == 3),
        "{error:?}"
    );
    assert!(!error.to_string().contains(SECRET));
}

/// The first address refuses its credentials, the second accepts its own: the client ends up
/// connected through the second, with the second's credentials (the same broker, so that only
/// the credentials differ). Only the bad address: the authentication error as it is.
async fn credentials_differ_per_address<R: TestRuntime>() {
    let good = e2e_tests::broker::uri();
    let bad = e2e_tests::broker::uri_with_password(SECRET);
    let addresses = Addresses::from_uris([&bad, &good])
        .expect("URIs parse")
        .in_given_order();
    let mut options = client_options_at(&good, ReplyMode::default());
    options.connect = addresses;
    let client = within::<R, _>(
        Duration::from_secs(10),
        "connecting with a bad then a good address",
        Client::<R>::connect_with(options),
    )
    .await
    .expect("the second address's credentials work");
    let queue = QueueGuard::new("per-address");
    let server = TestServer::start::<R, _, _>(
        e2e_tests::servers::server_options(queue.name()),
        amqp_rpc_cli::fib_handler,
    )
    .await;
    e2e_tests::calls::expect_fib(client.call(queue.name(), "20").await, 20);
    client.close().await;
    server.stop::<R>().await;

    let mut options = client_options_at(&good, ReplyMode::default());
    options.connect = Addresses::parse(&bad).expect("URI parses");
    let error = Client::<R>::connect_with(options)
        .await
        .expect_err("wrong password");
    assert!(
        matches!(
            error,
            ConnectError::Connection(amqp_rpc_driver::ConnectionError::AuthenticationFailed { .. })
        ),
        "{error:?}"
    );
    assert!(!error.to_string().contains(SECRET));
}

// ---------------------------------------------------------------------------------------------
// On the cluster.

/// How late after its deadline a call may end on a small loaded machine running three brokers.
const BUDGET: Duration = Duration::from_secs(3);
/// Heartbeat of the cluster cases: a killed node's sockets are closed by the kernel, so the
/// loss shows at once without heartbeats; the fault suite's 1 s would make three brokers, the
/// servers and the client on two loaded cores drop healthy connections.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long the rate is measured before a kill, and after the service recovered.
const BEFORE: Duration = Duration::from_secs(3);
const AFTER: Duration = Duration::from_secs(3);
/// Timeout of each call under load.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A server on the cluster, connected first to node `first` and then to the next ones.
struct ClusterServer {
    server: TestServer,
    name: String,
    handled: Counter,
}

async fn start_server<R: TestRuntime>(queue: &str, first: usize, kind: QueueKind) -> ClusterServer {
    let name = unique_name("server");
    let mut options = ServerOptions::from_uri(&cluster::uri(first), queue).expect("URI parses");
    options.connect = cluster::addresses_from(first);
    for address in options.connect.iter_mut() {
        fault_connect_settings(address, &name);
        address.connection.heartbeat = HEARTBEAT;
    }
    options.backoff = fault_backoff();
    options.rpc.declare_as = kind;
    options.rpc.prefetch = 16;
    options.workers = 16;
    let handled = Counter::default();
    let server =
        TestServer::start::<R, _, _>(options, fib_held::<R>(Hold::none(), handled.clone())).await;
    ClusterServer {
        server,
        name,
        handled,
    }
}

async fn start_client<R: TestRuntime>(first: usize, mode: ReplyMode) -> (Client<R>, String) {
    let name = unique_name("client");
    let mut options = client_options_at(&cluster::uri(first), mode);
    options.connect = cluster::addresses_from(first);
    for address in options.connect.iter_mut() {
        fault_connect_settings(address, &name);
        address.connection.heartbeat = HEARTBEAT;
    }
    options.backoff = fault_backoff();
    options.default_timeout = CALL_TIMEOUT;
    (connect_with::<R>(options).await, name)
}

/// The nodes the named connections are on now, as node `via` sees them (waits up to 10 s for
/// all of them to show).
async fn nodes_of(via: usize, names: &[&str]) -> Vec<usize> {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = cluster::connection_nodes(via, &names);
            match found {
                Ok(nodes) if nodes.iter().all(Option::is_some) => {
                    return nodes.into_iter().flatten().collect()
                }
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                other => panic!("connections {names:?}: {other:?}"),
            }
        }
    })
    .await
}

/// Two servers of one quorum queue, on c1 and c2, and a client on c3: every call is answered,
/// and both servers did work.
async fn servers_on_two_nodes_share_one_quorum_queue<R: TestRuntime>() {
    let queue = QueueGuard::on(&cluster::node(2), "cluster-spread");
    let a = start_server::<R>(queue.name(), 0, QueueKind::Quorum).await;
    let b = start_server::<R>(queue.name(), 1, QueueKind::Quorum).await;
    let (client, client_name) = start_client::<R>(2, ReplyMode::default()).await;
    assert_eq!(
        nodes_of(2, &[&a.name, &b.name, &client_name]).await,
        [0, 1, 2],
        "each on the first node of its list"
    );
    let ledger = Ledger::new(BUDGET);
    let load = Load::start(
        &client,
        queue.name(),
        &ledger,
        LoadSpec {
            callers: 16,
            timeout: CALL_TIMEOUT,
            pause: Duration::ZERO,
            max_calls: 25,
            max_time: Duration::from_secs(30),
            ..LoadSpec::default()
        },
    );
    within::<R, _>(Duration::from_secs(40), "400 calls", async {
        while ledger.summary().ended < 400 {
            sleep::<R>(Duration::from_millis(20)).await;
        }
    })
    .await;
    load.stop::<R>(BUDGET).await;
    let summary = ledger.check::<R>(&[], Duration::from_secs(10)).await;
    assert_eq!(summary.count(Class::Ok), 400, "{summary}");
    let (handled_a, handled_b) = (a.handled.get(), b.handled.get());
    eprintln!(
        "{} on {}: {summary}; server on c1 ran {handled_a}, server on c2 ran {handled_b}",
        queue.name(),
        R::NAME
    );
    assert!(
        handled_a > 0 && handled_b > 0,
        "both servers did work: {handled_a} and {handled_b}"
    );
    assert_eq!(handled_a + handled_b, 400);
    client.close().await;
    a.server.stop::<R>().await;
    b.server.stop::<R>().await;
}

/// Where everything is in a kill case (0-based node numbers), and which node dies.
#[derive(Debug, Clone, Copy)]
struct Topology {
    what: &'static str,
    /// The node the quorum queue is declared on (its first leader).
    leader: usize,
    servers: [usize; 2],
    client: usize,
    kill: usize,
}

/// Kill the client's node (c3): the client moves to c1 and re-arms its reply path there; calls
/// in flight end `ConnectionLost` (may have run) unless idempotent, which are sent again and
/// succeed. Exclusive reply queue on tokio, direct reply-to on smol, so that both reply paths
/// are re-armed on a new node.
async fn kill_the_clients_node_under_load<R: TestRuntime>() {
    let mode = if R::NAME == "tokio" {
        ReplyMode::ExclusiveQueue
    } else {
        ReplyMode::DirectReplyTo
    };
    kill_under_load::<R>(
        Topology {
            what: "kill-client-node",
            leader: 0,
            servers: [0, 1],
            client: 2,
            kill: 2,
        },
        mode,
    )
    .await;
}

/// Kill a server's node (c2, not the leader's): that server moves to c3 and consumes again;
/// the requests it held go back to the queue and the other server answers them.
async fn kill_a_servers_node_under_load<R: TestRuntime>() {
    kill_under_load::<R>(
        Topology {
            what: "kill-server-node",
            leader: 2,
            servers: [0, 1],
            client: 2,
            kill: 1,
        },
        ReplyMode::default(),
    )
    .await;
}

/// Kill the quorum queue's leader (c1, where neither the servers nor the client are): the
/// queue elects a new leader among the two others and goes on.
async fn kill_the_quorum_leader_under_load<R: TestRuntime>() {
    kill_under_load::<R>(
        Topology {
            what: "kill-quorum-leader",
            leader: 0,
            servers: [1, 2],
            client: 1,
            kill: 0,
        },
        ReplyMode::default(),
    )
    .await;
}

/// 64 callers (half of them idempotent) through one client, two servers on one quorum queue;
/// kill -9 one node; check that nothing was lost, that whoever was on the node moved to the
/// next of its list, and that the cluster reforms once the node is started again (a client
/// whose list starts with it connects there and is answered).
async fn kill_under_load<R: TestRuntime>(t: Topology, mode: ReplyMode) {
    let queue = QueueGuard::on(&cluster::node(t.client), t.what);
    {
        let (node, name) = (cluster::node(t.leader), queue.name().to_owned());
        blocking(move || node.declare_queue(&name, QueueKind::Quorum))
            .await
            .expect("declare the quorum queue");
    }
    let a = start_server::<R>(queue.name(), t.servers[0], QueueKind::Quorum).await;
    let b = start_server::<R>(queue.name(), t.servers[1], QueueKind::Quorum).await;
    let (client, client_name) = start_client::<R>(t.client, mode).await;
    if t.kill == t.leader {
        let (via, name) = (t.client, queue.name().to_owned());
        let leader = blocking(move || cluster::leader_of(via, &name))
            .await
            .expect("list queues");
        assert_eq!(leader, Some(t.kill), "the leader is where it was declared");
    }

    let (plain, retried) = (Ledger::new(BUDGET), Ledger::new(BUDGET));
    let spec = LoadSpec {
        callers: 32,
        timeout: CALL_TIMEOUT,
        pause: Duration::ZERO,
        max_calls: 100_000,
        max_time: Duration::from_secs(45),
        idempotent: false,
        pad: 0,
    };
    let loads = [
        Load::start(&client, queue.name(), &plain, spec.clone()),
        Load::start(
            &client,
            queue.name(),
            &retried,
            LoadSpec {
                idempotent: true,
                ..spec
            },
        ),
    ];
    let began = Instant::now();
    plain
        .wait_recovered::<R>(began, 50, Duration::from_secs(15))
        .await;
    // The "before" window.
    sleep::<R>(BEFORE).await;

    let killed = blocking(move || Killed::kill(t.kill))
        .await
        .expect("kill -9");
    let kill_at = Instant::now();
    plain
        .wait_recovered::<R>(kill_at, 200, Duration::from_secs(20))
        .await;
    retried
        .wait_recovered::<R>(kill_at, 200, Duration::from_secs(20))
        .await;
    // The "after" window.
    sleep::<R>(AFTER).await;
    for load in loads {
        load.stop::<R>(BUDGET).await;
    }
    // The node boots again (about 20 s) while the checks run.
    let restarted = spawn::<R, _>(blocking(move || killed.restart()));
    let summary = plain
        .check::<R>(Class::RECOVERY, Duration::from_secs(20))
        .await;
    // Idempotent calls are sent again after a connection loss: none ends "may have run"
    // (`ConnectionLost { sent: true }`) while its deadline allows a resend.
    let retried_summary = retried
        .check::<R>(
            &[
                Class::ConnectionLostUnsent,
                Class::TimedOut,
                Class::Expired,
                Class::NoServers,
                Class::NotRouted,
            ],
            Duration::from_secs(20),
        )
        .await;
    report_rates(t.what, R::NAME, &[&plain, &retried], kill_at);

    // Whoever was on the killed node moved to a live node (the next of its list, unless a
    // later reconnect moved it on; `Rotation`'s unit tests check the order).
    let next = (t.kill + 1) % cluster::SIZE;
    let was_on = [t.client, t.servers[0], t.servers[1]];
    let now_on = nodes_of(next, &[&client_name, &a.name, &b.name]).await;
    eprintln!(
        "client, server a, server b: on {was_on:?} before the kill, {now_on:?} after (0-based)"
    );
    assert!(
        now_on.iter().all(|&n| n != t.kill),
        "nobody is on the killed node: {now_on:?}"
    );
    let survivor = cluster::node(next);
    assert_queue_drained::<R>(&survivor, queue.name(), Duration::from_secs(10)).await;
    let (handled_a, handled_b) = (a.handled.get(), b.handled.get());
    let leader_now = if t.kill == t.leader {
        let name = queue.name().to_owned();
        blocking(move || cluster::leader_of(next, &name))
            .await
            .ok()
            .flatten()
            .map(cluster::node_name)
    } else {
        None
    };
    eprintln!(
        "{} on {} ({mode:?}): plain {summary}; idempotent {retried_summary}; servers ran \
         {handled_a} and {handled_b}; new leader {leader_now:?}",
        t.what,
        R::NAME,
    );
    assert!(handled_a > 0 && handled_b > 0, "both servers did work");

    // The cluster reforms: the node is back as a running member and serves a client whose
    // list starts with it.
    restarted.join().await.expect("restart the node");
    let (back, back_name) = start_client::<R>(t.kill, mode).await;
    assert_eq!(
        nodes_of(t.kill, &[&back_name]).await,
        [t.kill],
        "a client is back on the restarted node"
    );
    e2e_tests::calls::expect_fib(back.call(queue.name(), "30").await, 30);
    back.close().await;
    client.close().await;
    a.server.stop::<R>().await;
    b.server.stop::<R>().await;
    assert_queue_drained::<R>(&survivor, queue.name(), Duration::from_secs(5)).await;
}

/// Successful calls per second in `[from, to)`, by when they ended.
fn rate(ledgers: &[&Ledger], from: Instant, to: Instant) -> f64 {
    let n: usize = ledgers
        .iter()
        .map(|l| {
            l.ends(Class::Ok)
                .iter()
                .filter(|e| e.ended >= from && e.ended < to)
                .count()
        })
        .sum();
    n as f64 / to.saturating_duration_since(from).as_secs_f64().max(1e-3)
}

/// Prints, measured and not asserted: the rate of successful calls in the [`BEFORE`] window;
/// the longest time after the kill with no call succeeding; the seconds from the kill to the
/// end of the first 250-ms window whose rate is back to 90 % of before (windows every 50 ms);
/// and the rate in the [`AFTER`] window from then.
fn report_rates(what: &str, transport: &str, ledgers: &[&Ledger], kill_at: Instant) {
    let window = Duration::from_millis(250);
    let before = rate(ledgers, kill_at - BEFORE, kill_at);
    let back = (0..400u32)
        .map(|k| kill_at + Duration::from_millis(50) * k)
        .find(|start| rate(ledgers, *start, *start + window) >= 0.9 * before)
        .map(|start| start + window);
    let (recovered, after) = match back {
        Some(at) => (
            format!("{:.2}", (at - kill_at).as_secs_f64()),
            rate(ledgers, at, at + AFTER),
        ),
        None => ("never".to_owned(), 0.0),
    };
    let mut ends: Vec<Instant> = ledgers
        .iter()
        .flat_map(|l| l.ends(Class::Ok))
        .map(|e| e.ended)
        .filter(|at| *at >= kill_at)
        .collect();
    ends.sort_unstable();
    let outage = std::iter::once(kill_at)
        .chain(ends.iter().copied())
        .zip(ends.iter().copied())
        .map(|(a, b)| b - a)
        .max()
        .unwrap_or_default();
    eprintln!(
        "cluster-rate | {what} | {transport} | {before:.0} | {:.2} | {recovered} | {after:.0} |",
        outage.as_secs_f64()
    );
}

/// Quorum vs classic request queue at 64 callers on the cluster: servers on c1 and c2, the
/// client on c3, 15 s each after a warm-up. Prints the rates; checks only that nothing was lost.
async fn measure_quorum_vs_classic<R: TestRuntime>() {
    for kind in [QueueKind::Classic, QueueKind::Quorum] {
        // A classic queue lives on one node: declared through the client's node (c3), as a
        // tutorial client would find it, so that both servers fetch from a remote queue just as
        // they would from a quorum queue's leader elsewhere.
        let queue = QueueGuard::on(&cluster::node(2), "cluster-measure");
        {
            let (node, name) = (cluster::node(2), queue.name().to_owned());
            blocking(move || node.declare_queue(&name, kind))
                .await
                .expect("declare");
        }
        let a = start_server::<R>(queue.name(), 0, kind).await;
        let b = start_server::<R>(queue.name(), 1, kind).await;
        let (client, _) = start_client::<R>(2, ReplyMode::default()).await;
        let ledger = Ledger::counting(BUDGET);
        let load = Load::start(
            &client,
            queue.name(),
            &ledger,
            LoadSpec {
                callers: 64,
                timeout: CALL_TIMEOUT,
                pause: Duration::ZERO,
                max_calls: 1_000_000,
                max_time: Duration::from_secs(30),
                ..LoadSpec::default()
            },
        );
        sleep::<R>(Duration::from_secs(3)).await;
        let (at, oks) = (Instant::now(), ledger.summary().count(Class::Ok));
        sleep::<R>(Duration::from_secs(15)).await;
        let done = ledger.summary().count(Class::Ok) - oks;
        let per_sec = done as f64 / at.elapsed().as_secs_f64();
        let p99 = ledger.ok_latency_quantile(0.99);
        load.stop::<R>(BUDGET).await;
        let summary: Summary = ledger.check::<R>(&[], Duration::from_secs(20)).await;
        eprintln!(
            "cluster-queue | {kind:?} | {} | {per_sec:.0} calls/s | p99 {p99:.1?} | {summary}",
            R::NAME
        );
        client.close().await;
        a.server.stop::<R>().await;
        b.server.stop::<R>().await;
    }
}
