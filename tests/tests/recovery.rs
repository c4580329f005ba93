//! Recovery behaviour against the real broker, on tokio and on smol: idempotent calls sent
//! again after a connection loss, the reply path re-armed before any publish (direct reply-to
//! consumed again, an exclusive queue declared again under a new name), the connection state an
//! application watches, and the policy for a failed first connect.
//!
//! The fault cases under load are in `faults.rs` and `node_faults.rs`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{
    Backoff, CallError, CallRequest, Client, ConnectionState, ReplyMode, Request, RpcError,
};
use e2e_tests::broker::{unique_name, Node, QueueGuard};
use e2e_tests::calls::{call, connect_with, expect_fib, CALL_TIMEOUT};
use e2e_tests::e2e_tests;
use e2e_tests::faults::Proxy;
use e2e_tests::ledger::{Class, Ledger};
use e2e_tests::proxy::FaultMode;
use e2e_tests::rig::{is_connected, is_reconnecting, BUDGET};
use e2e_tests::rt::{blocking, sleep, spawn, within, TestRuntime};
use e2e_tests::servers::{
    fault_client_options, fault_server_options, fib_held, Counter, Hold, TestServer,
};
use e2e_tests::states::StateLog;

e2e_tests! {
    idempotent_calls_resent_after_connection_loss,
    direct_reply_to_rearmed_after_reconnect,
    exclusive_reply_queue_renamed_after_reconnect,
    state_reports_reconnect_attempts,
    first_connect_retried_when_asked,
    close_while_reconnecting_returns_promptly,
    idempotent_call_resent_past_deadline_may_have_run,
}

/// "Promptly", on a small busy machine.
const PROMPT: Duration = Duration::from_secs(2);

/// A call marked idempotent that was in flight when the connection died is sent again after
/// the reconnect (its deadline allows) and gets its answer; one that is not ends with
/// `ConnectionLost { sent: true }` at once. The server ran each idempotent request twice. In
/// both reply modes.
async fn idempotent_calls_resent_after_connection_loss<R: TestRuntime>() {
    const EACH: usize = 4;
    let node = Node::main();
    let queue = QueueGuard::new("idempotent");
    let (hold, started) = (Hold::up_to(Duration::from_secs(30)), Counter::default());
    let options = fault_server_options(node.uri(), queue.name(), &unique_name("server"), 16);
    let server =
        TestServer::start::<R, _, _>(options, fib_held::<R>(hold.clone(), started.clone())).await;

    let mut ran = 0;
    for mode in [ReplyMode::ExclusiveQueue, ReplyMode::DirectReplyTo] {
        let name = unique_name("client");
        let client = connect_with::<R>(fault_client_options(node.uri(), mode, &name)).await;
        let ledger = Ledger::new(BUDGET);
        let calls: Vec<_> = (0..2 * EACH)
            .map(|i| {
                let (ledger, client, queue) =
                    (ledger.clone(), client.clone(), queue.name().to_owned());
                let n = 20 + i as u32;
                let idempotent = i % 2 == 0;
                let task = spawn::<R, _>(async move {
                    let mut request =
                        CallRequest::new(queue, n.to_string(), Duration::from_secs(20));
                    request.idempotent = idempotent;
                    ledger.call(&client, request, n).await
                });
                (idempotent, task)
            })
            .collect();
        ran += 2 * EACH;
        started.wait_for::<R>(ran, Duration::from_secs(10)).await;

        let ctl = node.clone();
        blocking(move || ctl.close_connection_named(&name))
            .await
            .expect("close the client's connection");
        // The held copies answer into the old, dead reply path; the resent ones are answered.
        hold.release();
        for (idempotent, task) in calls {
            let class = within::<R, _>(Duration::from_secs(15), "a call", task.join()).await;
            let expected = if idempotent {
                Class::Ok
            } else {
                Class::ConnectionLost
            };
            assert_eq!(class, expected, "{mode:?}, idempotent: {idempotent}");
        }
        ran += EACH;
        started.wait_for::<R>(ran, Duration::from_secs(5)).await;
        ledger
            .check::<R>(&[Class::ConnectionLost], Duration::from_secs(5))
            .await;
        client.close().await;
        hold.hold_again();
    }
    hold.release();
    let report = server.stop::<R>().await;
    assert_eq!(started.get(), ran, "each idempotent request ran twice");
    assert_eq!(report.stats.replied_error, 0);
}

/// With direct reply-to, the reply pseudo-queue must be consumed again on the new connection
/// before the first publish, or the broker closes the channel (406 PRECONDITION_FAILED) and
/// the calls sent on it are lost. Calls made while the client reconnects go out right after
/// the re-arm: every one gets its answer, and the connection does not flap.
async fn direct_reply_to_rearmed_after_reconnect<R: TestRuntime>() {
    const CALLS: u32 = 50;
    let node = Node::main();
    let queue = QueueGuard::new("direct-rearm");
    let options = fault_server_options(node.uri(), queue.name(), &unique_name("server"), 16);
    let server = TestServer::start::<R, _, _>(options, fib_handler).await;
    let proxy = Proxy::start();
    let options = proxy.redirect(fault_client_options(
        node.uri(),
        ReplyMode::DirectReplyTo,
        &unique_name("client"),
    ));
    let client = connect_with::<R>(options).await;
    let states = StateLog::watch(&client);
    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);

    for round in 0..3 {
        let reset = Instant::now();
        proxy.reset_all();
        states
            .wait_for::<R>(reset, "Reconnecting", is_reconnecting, PROMPT)
            .await;
        // Made while reconnecting: they wait, then go out right after the re-arm.
        let ledger = Ledger::new(BUDGET);
        let calls: Vec<_> = (0..CALLS)
            .map(|n| {
                let (ledger, client, queue) =
                    (ledger.clone(), client.clone(), queue.name().to_owned());
                spawn::<R, _>(async move {
                    let request = CallRequest::new(queue, n.to_string(), Duration::from_secs(10));
                    ledger.call(&client, request, n).await
                })
            })
            .collect();
        for task in calls {
            within::<R, _>(Duration::from_secs(15), "a call", task.join()).await;
        }
        // No error at all: a 406 would have ended calls with ConnectionLost.
        let summary = ledger.check::<R>(&[], Duration::from_secs(5)).await;
        assert_eq!(summary.count(Class::Ok), u64::from(CALLS), "round {round}");
        let after: Vec<_> = states
            .changes()
            .into_iter()
            .filter(|(at, _)| *at >= reset)
            .map(|(_, s)| s)
            .collect();
        assert_eq!(
            after,
            [
                ConnectionState::Reconnecting { attempt: 1 },
                ConnectionState::Connected
            ],
            "one reconnect, no channel trouble after it (round {round})"
        );
    }
    client.close().await;
    server.stop::<R>().await;
}

/// With an exclusive reply queue, a reconnect declares a new server-named queue (the old one
/// went with the old connection) and replies come back through it.
async fn exclusive_reply_queue_renamed_after_reconnect<R: TestRuntime>() {
    let node = Node::main();
    let queue = QueueGuard::new("exclusive-rename");
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    let handler = move |request: Request| {
        let reply_to = request
            .properties
            .reply_to()
            .as_ref()
            .map(|q| q.to_string())
            .unwrap_or_default();
        record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(reply_to);
        fib_handler(request)
    };
    let options = fault_server_options(node.uri(), queue.name(), &unique_name("server"), 1);
    let server = TestServer::start::<R, _, _>(options, handler).await;
    let name = unique_name("client");
    let client = connect_with::<R>(fault_client_options(
        node.uri(),
        ReplyMode::ExclusiveQueue,
        &name,
    ))
    .await;
    let states = StateLog::watch(&client);
    let last_reply_to = || {
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last()
            .cloned()
            .unwrap_or_default()
    };

    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);
    let first = last_reply_to();
    assert!(
        first.starts_with("amq.gen-"),
        "a server-named queue: {first}"
    );
    let status = {
        let (node, first) = (node.clone(), first.clone());
        blocking(move || node.queue_status(&first)).await
    };
    assert!(held_by_another_connection(&status), "{status:?}");

    let closed = Instant::now();
    let ctl = node.clone();
    blocking(move || ctl.close_connection_named(&name))
        .await
        .expect("close the client's connection");
    states
        .wait_for::<R>(closed, "Connected", is_connected, Duration::from_secs(10))
        .await;
    expect_fib(call(&client, queue.name(), "31", CALL_TIMEOUT).await, 31);
    let second = last_reply_to();
    assert!(
        second.starts_with("amq.gen-"),
        "a server-named queue: {second}"
    );
    assert_ne!(first, second, "a new reply queue after the reconnect");
    let (old, new) = {
        let (node, first, second) = (node.clone(), first.clone(), second.clone());
        blocking(move || (node.queue_status(&first), node.queue_status(&second))).await
    };
    assert_eq!(old.expect("status"), None, "the old reply queue is gone");
    assert!(held_by_another_connection(&new), "{new:?}");
    client.close().await;
    server.stop::<R>().await;
}

/// Whether a passive declare found an exclusive queue of another connection: RabbitMQ refuses
/// it with 405 RESOURCE_LOCKED (a queue that does not exist is a 404).
fn held_by_another_connection<T>(status: &Result<T, String>) -> bool {
    matches!(status, Err(e) if e.contains("405") && e.contains("RESOURCE_LOCKED"))
}

/// `Client::watch_state` reports each reconnect attempt in order (`Reconnecting { attempt }`
/// from 1, one more per failed attempt) and `Connected` once the reply path is armed again;
/// `Client::state` is current.
async fn state_reports_reconnect_attempts<R: TestRuntime>() {
    let node = Node::main();
    let queue = QueueGuard::new("states");
    let options = fault_server_options(node.uri(), queue.name(), &unique_name("server"), 1);
    let server = TestServer::start::<R, _, _>(options, fib_handler).await;
    let proxy = Proxy::start();
    let mut options = proxy.redirect(fault_client_options(
        node.uri(),
        ReplyMode::default(),
        &unique_name("client"),
    ));
    // Attempts into the black hole fail fast: the handshake gets 300 ms.
    options.connect[0].connect_timeout = Duration::from_millis(300);
    options.connect[0].connection.handshake_timeout = Duration::from_millis(300);
    options.backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
        ..Backoff::default()
    };
    let client = connect_with::<R>(options).await;
    assert_eq!(client.state(), ConnectionState::Connected);
    let states = StateLog::watch(&client);

    proxy.set_mode(FaultMode::StallBoth);
    let cut = Instant::now();
    proxy.reset_all();
    states
        .wait_for::<R>(
            cut,
            "Reconnecting { attempt: 3 }",
            |s| *s == ConnectionState::Reconnecting { attempt: 3 },
            Duration::from_secs(10),
        )
        .await;
    assert!(is_reconnecting(&client.state()), "{:?}", client.state());
    proxy.set_mode(FaultMode::Pass);
    states
        .wait_for::<R>(cut, "Connected", is_connected, Duration::from_secs(10))
        .await;
    assert_eq!(client.state(), ConnectionState::Connected);
    let seen = states.states();
    let attempts = seen.len() - 1;
    let expected: Vec<_> = (1..=attempts)
        .map(|attempt| ConnectionState::Reconnecting {
            attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
        })
        .chain([ConnectionState::Connected])
        .collect();
    assert_eq!(seen, expected);
    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);
    client.close().await;
    assert_eq!(client.state(), ConnectionState::Closed);
    server.stop::<R>().await;
}

/// The policy for a failed first connect is explicit: by default `Client::connect` fails at
/// once (see `rpc.rs`, `unreachable_broker`); with `retry_first_connect` it retries with the
/// backoff until the broker answers.
async fn first_connect_retried_when_asked<R: TestRuntime>() {
    let node = Node::main();
    let proxy = Proxy::start();
    proxy.set_mode(FaultMode::StallBoth);
    let make_options = |retry: bool| {
        let mut options = proxy.redirect(fault_client_options(
            node.uri(),
            ReplyMode::default(),
            &unique_name("client"),
        ));
        options.connect[0].connect_timeout = Duration::from_millis(300);
        options.connect[0].connection.handshake_timeout = Duration::from_millis(300);
        options.retry_first_connect = retry;
        options
    };

    let started = Instant::now();
    let result = within::<R, _>(
        Duration::from_secs(5),
        "a first connect without retry",
        Client::<R>::connect_with(make_options(false)),
    )
    .await;
    assert!(result.is_err(), "connected through a black hole?");
    assert!(started.elapsed() < PROMPT, "{:?}", started.elapsed());

    let connecting = spawn::<R, _>(Client::<R>::connect_with(make_options(true)));
    sleep::<R>(Duration::from_secs(1)).await;
    proxy.set_mode(FaultMode::Pass);
    let client = within::<R, _>(
        Duration::from_secs(10),
        "a retried first connect",
        connecting.join(),
    )
    .await
    .expect("connects once the broker answers");
    assert_eq!(client.state(), ConnectionState::Connected);
    client.close().await;
}

/// An idempotent call whose first copy reached a server, and whose resend then waits for a
/// reconnect that does not come before its deadline, may have run: it must end with
/// `TimedOut` (`may_have_run`), not `Expired` ("never ran").
async fn idempotent_call_resent_past_deadline_may_have_run<R: TestRuntime>() {
    let node = Node::main();
    let queue = QueueGuard::new("idempotent-deadline");
    let (hold, started) = (Hold::up_to(Duration::from_secs(30)), Counter::default());
    let options = fault_server_options(node.uri(), queue.name(), &unique_name("server"), 4);
    let server =
        TestServer::start::<R, _, _>(options, fib_held::<R>(hold.clone(), started.clone())).await;
    let proxy = Proxy::start();
    let client = connect_with::<R>(proxy.redirect(fault_client_options(
        node.uri(),
        ReplyMode::default(),
        &unique_name("client"),
    )))
    .await;
    let pending = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(async move {
            let mut request = CallRequest::new(queue, "30", Duration::from_secs(2));
            request.idempotent = true;
            client.call_with(request).await
        })
    };
    // The server runs it; then the network dies and stays dead past the deadline.
    started.wait_for::<R>(1, Duration::from_secs(10)).await;
    proxy.set_mode(FaultMode::StallBoth);
    proxy.reset_all();
    let result = within::<R, _>(Duration::from_secs(5), "the call", pending.join()).await;
    hold.release();
    proxy.set_mode(FaultMode::Pass);
    client.close().await;
    server.stop::<R>().await;
    let error = result.expect_err("no reply can come");
    assert!(error.may_have_run(), "the server ran it, yet: {error:?}");
    assert_eq!(error, CallError::Rpc(RpcError::TimedOut));
}

/// Closing a client, or shutting a server down, while it waits to reconnect returns at once:
/// not after the backoff delay (up to `Backoff::max`, 10 s by default). A call waiting to be
/// sent ends with `ConnectionLost { sent: false }`.
async fn close_while_reconnecting_returns_promptly<R: TestRuntime>() {
    let node = Node::main();
    let queue = QueueGuard::new("close-reconnecting");
    let long_wait = Backoff {
        initial: Duration::from_secs(8),
        jitter: 0.0,
        ..Backoff::default()
    };
    let proxy = Proxy::start();
    let mut options = fault_server_options(node.uri(), queue.name(), &unique_name("server"), 1);
    let address = proxy.local_addr();
    options.connect[0].host = address.ip().to_string();
    options.connect[0].port = address.port();
    options.backoff = long_wait;
    let server = TestServer::start::<R, _, _>(options, fib_handler).await;
    let mut options = proxy.redirect(fault_client_options(
        node.uri(),
        ReplyMode::default(),
        &unique_name("client"),
    ));
    options.backoff = long_wait;
    let client = connect_with::<R>(options).await;
    let states = StateLog::watch(&client);
    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);

    let cut = Instant::now();
    proxy.reset_all();
    states
        .wait_for::<R>(cut, "Reconnecting", is_reconnecting, PROMPT)
        .await;
    let waiting = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(async move {
            client
                .call_with(CallRequest::new(queue, "31", Duration::from_secs(30)))
                .await
        })
    };
    sleep::<R>(Duration::from_millis(200)).await;
    let closing = Instant::now();
    within::<R, _>(2 * PROMPT, "closing the client", client.close()).await;
    let took = closing.elapsed();
    assert!(took < PROMPT, "closing while reconnecting took {took:?}");
    assert_eq!(client.state(), ConnectionState::Closed);
    let result = within::<R, _>(PROMPT, "the waiting call", waiting.join()).await;
    assert_eq!(
        result.map(|r| r.body),
        Err(CallError::Rpc(RpcError::ConnectionLost { sent: false }))
    );

    let stopping = Instant::now();
    within::<R, _>(2 * PROMPT, "stopping the server", server.stop::<R>()).await;
    let took = stopping.elapsed();
    assert!(took < PROMPT, "stopping while reconnecting took {took:?}");
}
