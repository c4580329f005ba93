//! The fault suite, second-node half: faults that hit a whole node, so they run on a RabbitMQ
//! node of their own (`rabbit-fault@localhost` on port 5673, see `scripts/second-node.sh`) and
//! never disturb the tests running beside them on the main broker.
//!
//! This test binary starts the node on first use (about 12 s, unless it is already up) and a
//! watchdog stops it when the binary exits, if it started it (`E2E_KEEP_SECOND_NODE=1` keeps it
//! running for the next run). The cases take the node in turn ([`node::exclusive`]): one stops
//! the node's application, another raises a memory alarm, and neither may run beside the
//! other. Each case puts the node back as it found it, also when it fails (guards that drop).
//!
//! Case 3 (`stop_app`/`start_app` under load) and case 8 (memory alarm under load), plus closing
//! while blocked. Every case runs on tokio and on smol, checked by the "nothing lost" ledger.

use std::time::{Duration, Instant};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use amqp_rpc_driver::{
    CallError, CallRequest, ClientOptions, ConnectionState, QueueKind, ReplyMode, RpcError,
    ServerOptions,
};
use e2e_tests::broker::{unique_name, QueueGuard};
use e2e_tests::calls::connect_with;
use e2e_tests::ledger::{assert_queue_drained, Class, LoadSpec};
use e2e_tests::node::{self, AppStopped, MemoryAlarm};
use e2e_tests::rig::{
    is_blocked, is_connected, is_reconnecting, Rig, Service, SlowFib, RECOVERY_LIMIT,
};
use e2e_tests::rt::{blocking, sleep, spawn, within, TestRuntime};
use e2e_tests::servers::{fault_connect_settings, fault_server_options};
use e2e_tests::servers::{fib_held, Counter, Hold, TestServer, FAULT_HEARTBEAT};

/// Like [`e2e_tests!`](e2e_tests::e2e_tests), one `#[test]` per transport per case, each
/// holding the node for itself ([`node::exclusive`]) from before its runtime starts: waiting
/// for the node, and starting it, do not count against the case's time limit.
macro_rules! node_tests {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[test]
                fn tokio() {
                    let (_lease, _) = e2e_tests::node::exclusive();
                    e2e_tests::rt::run::<e2e_tests::rt::Tokio, _>(
                        stringify!($case),
                        super::$case::<e2e_tests::rt::Tokio>,
                    );
                }

                #[test]
                fn smol() {
                    let (_lease, _) = e2e_tests::node::exclusive();
                    e2e_tests::rt::run::<e2e_tests::rt::Smol, _>(
                        stringify!($case),
                        super::$case::<e2e_tests::rt::Smol>,
                    );
                }
            }
        )*
    };
}

node_tests! {
    case_03_broker_restart_under_load,
    broker_restart_with_default_backoff_fails_no_call,
    case_08_memory_alarm_blocks_then_resumes,
    close_while_blocked_returns_promptly,
}

/// "Promptly", on a small busy machine.
const PROMPT: Duration = Duration::from_secs(2);

/// 3. `rabbitmqctl stop_app` / `start_app` under load (8 callers): the client and the server
///    lose their connections and retry with backoff while the node is down (attempts refused,
///    the state says which attempt); calls made meanwhile wait, bounded by their deadline; once
///    the node is back, the server declares its queue again (a non-durable queue does not
///    survive the restart) and consumes with its prefetch, the client re-arms its reply path,
///    and calls succeed again.
async fn case_03_broker_restart_under_load<R: TestRuntime>() {
    let node = node::second_node();
    let mut rig = Rig::<R>::start(node, "restart", SlowFib, None).await;
    let load = rig.load(LoadSpec::default());
    rig.warm_up().await;

    let down = Instant::now();
    let stopped = {
        let node = node.clone();
        blocking(move || AppStopped::stop(&node))
            .await
            .expect("stop_app")
    };
    rig.states
        .wait_for::<R>(down, "Reconnecting", is_reconnecting, PROMPT)
        .await;
    // Down a while longer: calls made now wait, reconnect attempts are refused.
    sleep::<R>(Duration::from_secs(1)).await;
    blocking(move || stopped.start()).await.expect("start_app");
    let up = Instant::now();
    rig.server_mut().wait_ready_again::<R>(RECOVERY_LIMIT).await;
    // The client may be back before `start_app` returns.
    rig.states
        .wait_for::<R>(down, "Connected", is_connected, RECOVERY_LIMIT)
        .await;
    rig.recovered_since(up).await;

    let (node_for_ctl, queue) = (node.clone(), rig.queue.name().to_owned());
    let prefetch = blocking(move || node_for_ctl.consumer_prefetch(&queue))
        .await
        .expect("list consumers");
    assert_eq!(
        prefetch,
        vec![4],
        "the server consumes again with its prefetch"
    );
    let attempts: Vec<u32> = rig
        .states
        .states()
        .into_iter()
        .filter_map(|s| match s {
            ConnectionState::Reconnecting { attempt } => Some(attempt),
            _ => None,
        })
        .collect();
    assert!(
        attempts.len() >= 2 && attempts.windows(2).all(|w| w[1] == w[0] + 1),
        "refused attempts are counted: {attempts:?}"
    );
    let waited = rig.ledger.ends(Class::Expired);
    let (summary, _) = rig.finish(load, Class::RECOVERY).await;
    assert!(
        summary.count(Class::ConnectionLost) + summary.count(Class::Expired) >= 1,
        "the restart hit calls: {summary}"
    );
    for end in waited {
        let took = end.ended - end.started;
        assert!(
            took >= end.timeout,
            "a call made while reconnecting ended Expired early, after {took:?}"
        );
    }
}

/// Issue 20 case 4: after a broker restart the client was back before the server, and calls
/// made meanwhile failed `NoServers` (quorum queue: 260,384 in ~1.6 s) or `NotRouted` (classic
/// queue, until the server declared it again); the server's backoff grew to 10 s. With the
/// default backoffs of client and server (only the heartbeat is the fault suite's), 8 callers
/// on a classic and on a quorum queue through `stop_app` / `start_app`: no call ends
/// `NoServers` or `NotRouted`; those in flight at the stop may end `ConnectionLost`, every
/// other call is answered.
async fn broker_restart_with_default_backoff_fails_no_call<R: TestRuntime>() {
    const CALLERS: usize = 8;
    const CALL_TIMEOUT: Duration = Duration::from_secs(25);
    let node = node::second_node();
    let queues = [
        (QueueGuard::on(node, "restart-classic"), QueueKind::Classic),
        (QueueGuard::on(node, "restart-quorum"), QueueKind::Quorum),
    ];
    let mut servers = Vec::new();
    for (queue, kind) in &queues {
        let defaults = ServerOptions::from_uri(node.uri(), queue.name()).expect("uri");
        let mut options = fault_server_options(node.uri(), queue.name(), &unique_name("s"), 4);
        options.rpc.declare_as = *kind;
        options.backoff = defaults.backoff;
        servers.push(TestServer::start::<R, _, _>(options, amqp_rpc_cli::fib_handler).await);
    }
    let mut options = ClientOptions::from_uri(node.uri()).expect("uri");
    fault_connect_settings(&mut options.connect[0], &unique_name("client"));
    options.rpc.reply_mode = ReplyMode::default();
    let client = connect_with::<R>(options).await;
    let states = e2e_tests::states::StateLog::watch(&client);

    let stop = Arc::new(AtomicBool::new(false));
    let ends: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let (client, stop, ends) = (client.clone(), stop.clone(), ends.clone());
            let queue = queues[i % 2].0.name().to_owned();
            spawn::<R, _>(async move {
                // Bounded by count and by the stop flag.
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let result = client
                        .call_with(CallRequest::new(queue.as_str(), "20", CALL_TIMEOUT))
                        .await;
                    let class = match result {
                        Ok(reply) if reply.body.as_ref() == b"6765" => "ok".to_owned(),
                        Ok(reply) => format!("wrong {:?}", reply.body),
                        Err(CallError::Rpc(RpcError::ConnectionLost { sent })) => {
                            format!("ConnectionLost(sent={sent})")
                        }
                        Err(e) => format!("{e:?}"),
                    };
                    *ends
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry(class)
                        .or_default() += 1;
                }
            })
        })
        .collect();
    sleep::<R>(Duration::from_secs(1)).await;

    let down = Instant::now();
    let stopped = {
        let node = node.clone();
        blocking(move || AppStopped::stop(&node))
            .await
            .expect("stop_app")
    };
    // Down long enough for the backoffs to grow (the default client backoff to seconds).
    sleep::<R>(Duration::from_secs(4)).await;
    blocking(move || stopped.start()).await.expect("start_app");
    let up = Instant::now();
    for server in &mut servers {
        server.wait_ready_again::<R>(RECOVERY_LIMIT).await;
    }
    let servers_back = up.elapsed();
    states
        .wait_for::<R>(down, "Connected", is_connected, RECOVERY_LIMIT)
        .await;
    // Calls made while everything reconnected end; then a while of normal service.
    sleep::<R>(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        within::<R, _>(CALL_TIMEOUT + PROMPT, "a caller", caller.join()).await;
    }
    let ends = ends.lock().unwrap_or_else(PoisonError::into_inner).clone();
    eprintln!("restart: servers back {servers_back:?} after start_app; ends {ends:?}");
    for (class, count) in &ends {
        assert!(
            class == "ok" || class.starts_with("ConnectionLost"),
            "{count} calls ended {class}; all: {ends:?}"
        );
    }
    assert!(ends.get("ok").copied().unwrap_or(0) > 100, "{ends:?}");
    client.close().await;
    for server in servers {
        server.stop::<R>().await;
    }
}

/// 8. A memory alarm under load (`rabbitmqctl set_vm_memory_high_watermark`): the broker
///    blocks the connection (at its first publish during the alarm) and the client says so
///    (`Blocked`); publishes wait, bounded by their deadlines (`Expired`, never sent; calls
///    sent just before the block, and those whose replies the blocked server holds, end
///    `TimedOut`); the connection is not declared dead for
///    it, though the block lasts longer than two heartbeats; when the alarm clears the client is
///    `Connected` again and calls succeed.
async fn case_08_memory_alarm_blocks_then_resumes<R: TestRuntime>() {
    let node = node::second_node();
    let rig = Rig::<R>::start(node, "alarm", SlowFib, None).await;
    // Calls shorter than the block, so that some are made, wait and expire during it.
    let spec = LoadSpec {
        timeout: Duration::from_secs(1),
        ..LoadSpec::default()
    };
    let load = rig.load(spec);
    rig.warm_up().await;

    let raised = Instant::now();
    let alarm = {
        let node = node.clone();
        blocking(move || MemoryAlarm::raise(&node))
            .await
            .expect("raise the memory alarm")
    };
    let (_, blocked) = rig
        .states
        .wait_for::<R>(raised, "Blocked", is_blocked, Duration::from_secs(10))
        .await;
    assert!(
        matches!(&blocked, ConnectionState::Blocked { reason } if !reason.is_empty()),
        "{blocked:?}"
    );
    // Longer than two heartbeat intervals and than a call's timeout.
    sleep::<R>(4 * FAULT_HEARTBEAT).await;
    assert!(
        !rig.states.states().iter().any(is_reconnecting),
        "a blocked connection is not a dead one: {:?}",
        rig.states.states()
    );
    let clearing = Instant::now();
    blocking(move || alarm.clear())
        .await
        .expect("clear the memory alarm");
    rig.states
        .wait_for::<R>(clearing, "Connected", is_connected, Duration::from_secs(10))
        .await;
    rig.recovered_since(clearing).await;

    let waited = rig.ledger.ends(Class::Expired);
    let (summary, _) = rig.finish(load, &[Class::TimedOut, Class::Expired]).await;
    assert!(
        waited.iter().any(|e| e.started >= raised),
        "calls made while blocked waited and expired: {summary}"
    );
    for end in waited {
        let took = end.ended - end.started;
        assert!(took >= end.timeout, "Expired early, after {took:?}");
    }
}

/// Closing a client, and stopping a server, while the broker blocks their connections returns
/// promptly: within 2 s, not after the close timeout. RabbitMQ blocks a connection when it
/// publishes during an alarm, and from then on reads nothing from it, so a close-ok would never
/// come. A call waiting to be sent ends at once with `ConnectionLost { sent: false }` (never
/// ran), calls sent with `ConnectionLost { sent: true }`.
async fn close_while_blocked_returns_promptly<R: TestRuntime>() {
    const TIMEOUT: Duration = Duration::from_secs(8);
    let node = node::second_node();
    let (hold, started) = (Hold::up_to(Duration::from_secs(30)), Counter::default());
    let service = HeldFib {
        hold: hold.clone(),
        started: started.clone(),
    };
    let mut rig = Rig::<R>::start(node, "close-blocked", service, None).await;
    let call = |n: u32| {
        let (ledger, client, queue) = (
            rig.ledger.clone(),
            rig.client.clone(),
            rig.queue.name().to_owned(),
        );
        spawn::<R, _>(async move {
            let request = CallRequest::new(queue, n.to_string(), TIMEOUT);
            ledger.call(&client, request, n).await
        })
    };
    // A request the server holds until the alarm is up; its reply then blocks the server.
    let held_by_server = call(10);
    started.wait_for::<R>(1, Duration::from_secs(10)).await;

    let raised = Instant::now();
    let alarm = {
        let node = node.clone();
        blocking(move || MemoryAlarm::raise(&node))
            .await
            .expect("raise the memory alarm")
    };
    // The first publish during the alarm gets the client blocked.
    let sent_while_blocked = call(11);
    rig.states
        .wait_for::<R>(raised, "Blocked", is_blocked, Duration::from_secs(10))
        .await;
    hold.release();
    // A call made now waits behind the block, unsent.
    let unsent = call(12);
    sleep::<R>(Duration::from_millis(300)).await;

    let closing = Instant::now();
    within::<R, _>(2 * PROMPT, "closing the blocked client", rig.client.close()).await;
    let took = closing.elapsed();
    assert!(took < PROMPT, "closing the blocked client took {took:?}");
    let ends = within::<R, _>(PROMPT, "the calls", async {
        [
            held_by_server.join().await,
            sent_while_blocked.join().await,
            unsent.join().await,
        ]
    })
    .await;
    assert_eq!(
        ends,
        [
            Class::ConnectionLost,
            Class::ConnectionLost,
            Class::ConnectionLostUnsent
        ]
    );

    let server = rig.server.take().expect("the rig has a server");
    let stopping = Instant::now();
    within::<R, _>(
        2 * PROMPT,
        "stopping the blocked server",
        server.stop::<R>(),
    )
    .await;
    let took = stopping.elapsed();
    assert!(took < PROMPT, "stopping the blocked server took {took:?}");

    blocking(move || alarm.clear())
        .await
        .expect("clear the memory alarm");
    rig.ledger
        .check::<R>(
            &[Class::ConnectionLost, Class::ConnectionLostUnsent],
            Duration::from_secs(5),
        )
        .await;
    // A request that reached the queue and was never answered expires by its TTL.
    assert_queue_drained::<R>(node, rig.queue.name(), TIMEOUT + PROMPT).await;
}

/// fib, each request held until released; counted.
struct HeldFib {
    hold: Hold,
    started: Counter,
}

impl Service for HeldFib {
    fn workers(&self) -> u16 {
        4
    }

    async fn start<R: TestRuntime>(&self, options: ServerOptions) -> TestServer {
        let handler = fib_held::<R>(self.hold.clone(), self.started.clone());
        TestServer::start::<R, _, _>(options, handler).await
    }
}
