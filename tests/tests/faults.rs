//! The fault suite, main broker half: cases 1, 2, 4–7 and 9–11 of the recovery issue, each
//! under load and each checked by the "nothing lost" [`Ledger`]: every call started ends exactly
//! once, with the right value or a typed error of a class the case allows, no later than its
//! deadline plus the recovery budget, and the request queue ends empty. Cases 3 and 8 (broker
//! restart, memory alarm) disturb a whole node, so they run on a node of their own, in
//! `node_faults.rs`.
//!
//! Faults here touch only the case's own connections, processes and queues (a connection name
//! of its own for `rabbitmqctl close_connection`, a proxy of its own), so the cases run in
//! parallel with each other and with the rest of the suite. Every case runs on tokio and on
//! smol.
//!
//! Clients and servers use a 1 s heartbeat so that a dead peer is found in about 2 s; in
//! production use RabbitMQ's recommended values (see `ConnectionConfig::heartbeat`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amqp_rpc_driver::CallRequest;
use e2e_tests::broker::{Node, QueueGuard};
use e2e_tests::e2e_tests;
use e2e_tests::faults::Proxy;
use e2e_tests::ledger::{assert_queue_drained, Class, Ledger, Load, LoadSpec};
use e2e_tests::memory::{self, Heap, Sampler};
use e2e_tests::process::ChildProcess;
use e2e_tests::proxy::FaultMode;
use e2e_tests::rig::{
    fault_client, is_connected, is_reconnecting, PaddedFib, Rig, SlowFib, AFTER, BUDGET,
    RECOVERY_LIMIT, WARM_UP,
};
use e2e_tests::rt::{blocking, sleep, spawn, TestRuntime};
use e2e_tests::servers::FAULT_HEARTBEAT;

/// Counts the bytes the heap holds, for case 7: unlike the RSS, the figure does not hide growth
/// in memory the allocator kept from earlier work.
#[global_allocator]
static HEAP: Heap = memory::heap();

e2e_tests! {
    case_01_broker_closes_client_connection,
    case_02_broker_closes_server_connection,
    case_04_network_black_hole,
    case_05_tcp_reset,
    case_06_replies_stalled_one_way,
    case_07_slow_uplink,
    case_09_server_killed_under_load,
    case_10_client_killed_with_calls_in_flight,
    case_11_request_queue_deleted,
}

/// "Promptly", on a small busy machine.
const PROMPT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// 1. `rabbitmqctl close_connection` on the client under load: the calls in flight end at once
///    with `ConnectionLost` (they may have run), the client reconnects by itself, and the calls
///    made meanwhile wait and then succeed.
async fn case_01_broker_closes_client_connection<R: TestRuntime>() {
    let rig = Rig::<R>::start(&Node::main(), "close-client", SlowFib, None).await;
    let load = rig.load(LoadSpec::default());
    rig.warm_up().await;
    let (name, node) = (rig.client_name.clone(), rig.node.clone());
    let fault = Instant::now();
    blocking(move || node.close_connection_named(&name))
        .await
        .expect("close the client's connection");
    let closed = Instant::now();
    rig.states
        .wait_for::<R>(fault, "Reconnecting", is_reconnecting, PROMPT)
        .await;
    rig.states
        .wait_for::<R>(fault, "Connected", is_connected, RECOVERY_LIMIT)
        .await;
    rig.ledger
        .wait_recovered::<R>(closed, AFTER, RECOVERY_LIMIT)
        .await;
    let lost = rig.ledger.ends(Class::ConnectionLost);
    let (summary, _) = rig.finish(load, &[Class::ConnectionLost]).await;
    assert!(
        !lost.is_empty(),
        "calls in flight at the close end with ConnectionLost: {summary}"
    );
    for end in lost {
        assert!(
            end.ended >= fault && end.ended <= closed + PROMPT,
            "a call ended with ConnectionLost {:?} after the close",
            end.ended.saturating_duration_since(closed)
        );
    }
}

/// 2. `rabbitmqctl close_connection` on the server under load: the server reconnects, declares
///    its queue again and consumes with its prefetch; its unacknowledged requests go back to
///    the queue and are answered, so every call gets its answer (or fails fast with
///    `NoServers` while no server consumes).
async fn case_02_broker_closes_server_connection<R: TestRuntime>() {
    let mut rig = Rig::<R>::start(&Node::main(), "close-server", SlowFib, None).await;
    let load = rig.load(LoadSpec::default());
    rig.warm_up().await;
    let (name, node) = (rig.server_name.clone(), rig.node.clone());
    blocking(move || node.close_connection_named(&name))
        .await
        .expect("close the server's connection");
    let closed = Instant::now();
    rig.server_mut().wait_ready_again::<R>(RECOVERY_LIMIT).await;
    rig.ledger
        .wait_recovered::<R>(closed, AFTER, RECOVERY_LIMIT)
        .await;
    let (node, queue) = (rig.node.clone(), rig.queue.name().to_owned());
    let prefetch = blocking(move || node.consumer_prefetch(&queue))
        .await
        .expect("list consumers");
    assert_eq!(prefetch, vec![4], "one consumer again, with its prefetch");
    rig.finish(load, &[Class::NoServers]).await;
}

/// 4. A network black hole (every byte held both ways by the proxy): the client finds the
///    dead peer after about 2 heartbeat intervals, ends its calls in flight with
///    `ConnectionLost` then (not at their deadline), keeps trying, and is back once the network
///    is.
async fn case_04_network_black_hole<R: TestRuntime>() {
    let proxy = Proxy::start();
    let rig = Rig::<R>::start(&Node::main(), "black-hole", SlowFib, Some(&proxy)).await;
    let spec = LoadSpec {
        timeout: Duration::from_secs(8),
        ..LoadSpec::default()
    };
    let load = rig.load(spec);
    rig.warm_up().await;

    proxy.set_mode(FaultMode::StallBoth);
    let stalled = Instant::now();
    let probe = {
        let (ledger, client, queue) = (
            rig.ledger.clone(),
            rig.client.clone(),
            rig.queue.name().to_owned(),
        );
        spawn::<R, _>(async move {
            let request = CallRequest::new(queue, "31", Duration::from_secs(30));
            ledger.call(&client, request, 31).await
        })
    };
    // Dead after 2 intervals of read silence; the last read may be up to one interval old.
    let detection = 2 * FAULT_HEARTBEAT + PROMPT;
    let (lost_at, _) = rig
        .states
        .wait_for::<R>(stalled, "Reconnecting", is_reconnecting, 2 * detection)
        .await;
    let took = lost_at - stalled;
    assert!(took <= detection, "dead peer found after {took:?}");
    assert_eq!(probe.join().await, Class::ConnectionLost);
    // Reconnect attempts go into the black hole too for a while.
    sleep::<R>(Duration::from_secs(1)).await;

    proxy.set_mode(FaultMode::Pass);
    let healed = Instant::now();
    rig.ledger
        .wait_recovered::<R>(healed, AFTER, RECOVERY_LIMIT)
        .await;
    let (summary, _) = rig
        .finish(
            load,
            &[Class::ConnectionLost, Class::TimedOut, Class::Expired],
        )
        .await;
    assert!(summary.count(Class::ConnectionLost) >= 1, "{summary}");
}

/// 5. A TCP reset under the client: the calls in flight end at once with `ConnectionLost`,
///    the client reconnects by itself and calls work again.
async fn case_05_tcp_reset<R: TestRuntime>() {
    let proxy = Proxy::start();
    let rig = Rig::<R>::start(&Node::main(), "reset", SlowFib, Some(&proxy)).await;
    let load = rig.load(LoadSpec::default());
    rig.warm_up().await;
    let reset = Instant::now();
    proxy.reset_all();
    rig.states
        .wait_for::<R>(reset, "Reconnecting", is_reconnecting, PROMPT)
        .await;
    rig.ledger
        .wait_recovered::<R>(reset, AFTER, RECOVERY_LIMIT)
        .await;
    let lost = rig.ledger.ends(Class::ConnectionLost);
    let (summary, _) = rig.finish(load, &[Class::ConnectionLost]).await;
    assert!(!lost.is_empty(), "{summary}");
    for end in lost {
        assert!(
            end.ended >= reset && end.ended <= reset + PROMPT,
            "a call ended with ConnectionLost {:?} after the reset",
            end.ended.saturating_duration_since(reset)
        );
    }
}

/// 6. Replies stalled in one direction only (broker to client held, client to broker flowing):
///    deadlines hold. Calls end with `TimedOut` at their deadline, not before and not much
///    after; when the replies flow again the late ones are dropped (no caller gets another's),
///    and new calls get their own answers. The heartbeat is longer than the stall here: this is
///    about deadlines, not dead peers (case 4).
async fn case_06_replies_stalled_one_way<R: TestRuntime>() {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    // Tight: a call ends by its deadline, give or take a busy machine's scheduling.
    const LATE: Duration = Duration::from_millis(500);
    let proxy = Proxy::start();
    let mut rig = Rig::<R>::start_with(&Node::main(), "stall", SlowFib, Some(&proxy), |client| {
        client.connect[0].connection.heartbeat = Duration::from_secs(10);
    })
    .await;
    rig.ledger = Ledger::new(LATE);
    let spec = LoadSpec {
        timeout: TIMEOUT,
        ..LoadSpec::default()
    };
    let load = rig.load(spec);
    rig.warm_up().await;

    proxy.set_mode(FaultMode::StallDownstream);
    let stalled = Instant::now();
    sleep::<R>(Duration::from_millis(2500)).await;
    proxy.set_mode(FaultMode::Pass);
    let healed = Instant::now();
    rig.ledger
        .wait_recovered::<R>(healed, AFTER, RECOVERY_LIMIT)
        .await;
    let timed_out = rig.ledger.ends(Class::TimedOut);
    // A stall of the replies alone ends calls by their deadline, never the connection.
    let states = rig.states.states();
    let (summary, _) = rig.finish(load, &[Class::TimedOut, Class::Expired]).await;
    assert!(
        timed_out.iter().any(|e| e.ended >= stalled),
        "calls time out during the stall: {summary}"
    );
    for end in timed_out {
        let took = end.ended - end.started;
        assert!(took >= end.timeout, "TimedOut early, after {took:?}");
    }
    assert!(
        !states.iter().any(is_reconnecting),
        "the connection survived the stall: {states:?}"
    );
}

/// 7. A slow uplink (client to broker throttled to 64 KiB/s) under more load than it carries:
///    memory stays bounded (outbound bytes stop at the high-water mark, calls in flight at the
///    in-flight limit), callers get backpressure (`TooManyCalls` at once, `Expired` for
///    requests held back, `TimedOut` for those sent), never a hang; when the link is back,
///    calls succeed again.
async fn case_07_slow_uplink<R: TestRuntime>() {
    // Enough in flight (48 × 256 KiB) to fill the kernel's socket buffers, so that the
    // high-water mark has to hold requests back.
    const BODY: usize = 256 * 1024;
    const HIGH_WATER: usize = 256 * 1024;
    const MAX_IN_FLIGHT: usize = 48;
    const CALLERS: usize = 56;
    // The proxy's buffer, one per direction.
    const PROXY_BUF: usize = 2 * e2e_tests::proxy::BUF_SIZE;
    // The RSS figures are of this process: the other transport's run of this case must not
    // allocate beside it.
    let _alone = SlowLinkLease::take::<R>().await;
    let proxy = Proxy::start();
    let rig = Rig::<R>::start_with(&Node::main(), "slow", PaddedFib, Some(&proxy), |client| {
        client.rpc.max_in_flight = MAX_IN_FLIGHT;
        client.rpc.outbound_high_water = HIGH_WATER;
    })
    .await;
    let spec = LoadSpec {
        callers: CALLERS,
        timeout: Duration::from_secs(2),
        pad: BODY,
        ..LoadSpec::default()
    };
    // The baseline: the live heap, sampled often, under the load on the fast link. (Not for
    // longer than the warm-up: the kernel's socket buffers grow with the traffic, and the
    // larger they are the fewer requests the slow link leaves to the high-water mark.)
    let sampler = Sampler::heap(&HEAP, Duration::from_millis(10));
    let warm = Instant::now();
    let load = rig.load(spec);
    rig.warm_up().await;
    sampler.sample_now();

    proxy.set_mode(FaultMode::SlowUpstream {
        bytes_per_sec: 64 * 1024,
    });
    let slowed = Instant::now();
    // Long enough to fill every buffer on the way: the proxy's, the kernel's, the client's.
    sleep::<R>(Duration::from_secs(6)).await;
    sampler.sample_now();
    let slow_end = Instant::now();
    let during = rig.ledger.summary();
    proxy.set_mode(FaultMode::Pass);
    let healed = Instant::now();
    rig.ledger
        .wait_recovered::<R>(healed, AFTER, RECOVERY_LIMIT)
        .await;
    let expired = rig.ledger.ends(Class::Expired);
    let (summary, _) = rig
        .finish(
            load,
            &[Class::TimedOut, Class::Expired, Class::TooManyCalls],
        )
        .await;
    let (baseline, slow) = (
        sampler.window(warm, slowed),
        sampler.window(slowed, slow_end),
    );
    eprintln!(
        "case 7 on {}: heap (KiB) on the fast link {baseline:?}, on the slow link {slow:?}",
        R::NAME
    );
    assert!(
        summary.count(Class::TooManyCalls) > 0,
        "{CALLERS} callers over a limit of {MAX_IN_FLIGHT} get backpressure: {summary}"
    );
    // On the fast link every caller already holds its body (56 × 256 KiB) and the server its
    // requests. What the slow link may add: the outbound bytes up to the high-water mark, and
    // the proxy's buffer (the kernel's socket buffers are not in this process). Buffering what
    // is offered instead (56 callers × 256 KiB every 2 s for 6 s, some 40 MiB, of which the
    // link carries 384 KiB) grows the process by tens of MiB. The slack is for the other case
    // running beside this one in the process.
    let allowed = ((HIGH_WATER + PROXY_BUF) / 1024 + 6 * 1024) as u64;
    if let Err(e) = memory::check_growth(baseline, slow, allowed) {
        panic!("memory under the slow link: {e} ({during})");
    }
    // Calls never sent: the high-water mark held their requests back instead of buffering
    // every one of them (at 64 KiB/s the link carries one 256 KiB request per 4 s).
    assert!(
        expired.iter().any(|e| e.started >= slowed),
        "requests held back at the high-water mark end Expired: {summary}"
    );
}

/// 9. An RPC server process killed with SIGKILL mid-request under load: its requests go back
///    to the queue and the other server answers them, so every call gets exactly one answer,
///    the right one; the killed server, restarted, takes its share again.
async fn case_09_server_killed_under_load<R: TestRuntime>() {
    let node = Node::main();
    let queue = QueueGuard::new("killed");
    let start = |what: &str| {
        ChildProcess::spawn(
            what,
            e2e_server(
                R::NAME,
                queue.name(),
                &["--slow-ms", "20", "--prefetch", "4"],
            ),
        )
    };
    let mut first = start("first e2e-server");
    let mut second = start("second e2e-server");
    first.wait_line::<R>("ready", Duration::from_secs(15)).await;
    second
        .wait_line::<R>("ready", Duration::from_secs(15))
        .await;
    let client = fault_client::<R>(&node, None).await;
    let ledger = Ledger::new(BUDGET);
    let spec = LoadSpec {
        timeout: Duration::from_secs(10),
        ..LoadSpec::default()
    };
    let load = Load::start(&client, queue.name(), &ledger, spec);
    ledger
        .wait_recovered::<R>(Instant::now(), WARM_UP, RECOVERY_LIMIT)
        .await;
    // Mid-request: it just took one.
    first
        .wait_line::<R>("handling", Duration::from_secs(10))
        .await;
    first.kill();
    let killed = Instant::now();
    ledger
        .wait_recovered::<R>(killed, AFTER, RECOVERY_LIMIT)
        .await;
    let mut restarted = start("restarted e2e-server");
    restarted
        .wait_line::<R>("ready", Duration::from_secs(15))
        .await;
    restarted
        .wait_line::<R>("handling", Duration::from_secs(10))
        .await;
    load.stop::<R>(BUDGET).await;
    // No error of any kind: redelivery hides the kill from the callers.
    let summary = ledger.check::<R>(&[], Duration::from_secs(20)).await;
    assert_queue_drained::<R>(&node, queue.name(), Duration::from_secs(10)).await;
    client.close().await;
    eprintln!("case 9 on {}: {summary}", R::NAME);
}

/// 10. A client process killed with calls in flight: the server is unaffected. It answers the
///     dead client's requests into the void, keeps its connection (no reconnect), and serves
///     the next client right away; nothing is left in the queue.
async fn case_10_client_killed_with_calls_in_flight<R: TestRuntime>() {
    let mut rig = Rig::<R>::start(&Node::main(), "client-killed", SlowFib, None).await;
    let mut victim = ChildProcess::spawn("e2e-client", {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-client"));
        command.args([
            "--transport",
            R::NAME,
            "--queue",
            rig.queue.name(),
            "--callers",
            "8",
            "--seconds",
            "60",
        ]);
        command
    });
    // Well under way: many calls answered, 8 in flight.
    for _ in 0..5 {
        victim.wait_line::<R>("ok", Duration::from_secs(15)).await;
    }
    victim.kill();
    let killed = Instant::now();
    let load = rig.load(LoadSpec::default());
    rig.ledger
        .wait_recovered::<R>(killed, AFTER, RECOVERY_LIMIT)
        .await;
    assert_eq!(
        rig.server_mut().times_ready_again(),
        0,
        "the server kept its connection and consumer"
    );
    let (_, report) = rig.finish(load, &[]).await;
    assert_eq!(report.stats.replied_error, 0);
}

/// 11. The request queue deleted under the server: the broker cancels its consumer
///     (`basic.cancel`), the server declares the queue again and consumes; calls whose
///     requests went down with the queue time out, calls made while it is missing fail fast
///     (`NotRouted`, `NoServers`), and then calls succeed again.
async fn case_11_request_queue_deleted<R: TestRuntime>() {
    let mut rig = Rig::<R>::start(&Node::main(), "deleted", SlowFib, None).await;
    let load = rig.load(LoadSpec::default());
    rig.warm_up().await;
    let (node, queue) = (rig.node.clone(), rig.queue.name().to_owned());
    blocking(move || node.delete_queue(&queue))
        .await
        .expect("delete the request queue");
    let deleted = Instant::now();
    rig.server_mut().wait_ready_again::<R>(RECOVERY_LIMIT).await;
    rig.ledger
        .wait_recovered::<R>(deleted, AFTER, RECOVERY_LIMIT)
        .await;
    rig.finish(
        load,
        &[
            Class::TimedOut,
            Class::NotRouted,
            Class::NoServers,
            Class::Expired,
        ],
    )
    .await;
}

/// One run of case 7 at a time in this process (it measures the process's memory).
struct SlowLinkLease;

static SLOW_LINK_BUSY: AtomicBool = AtomicBool::new(false);

impl SlowLinkLease {
    async fn take<R: TestRuntime>() -> Self {
        while SLOW_LINK_BUSY
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            sleep::<R>(Duration::from_millis(50)).await;
        }
        SlowLinkLease
    }
}

impl Drop for SlowLinkLease {
    fn drop(&mut self) {
        SLOW_LINK_BUSY.store(false, Ordering::SeqCst);
    }
}

/// The `e2e-server` bin on `transport`, serving `queue`.
fn e2e_server(transport: &str, queue: &str, extra: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-server"));
    command
        .args(["--transport", transport, "--queue", queue])
        .args(extra);
    command
}
