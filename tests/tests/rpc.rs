//! The end-to-end suite against a real RabbitMQ. Every case is written once, generic over the
//! runtime, and [`e2e_tests!`] runs it on tokio and on smol as `case::tokio` and `case::smol`:
//! `cargo test -p e2e-tests --test rpc` (add `-- smol` to run one half, `-- case` for one case).
//!
//! Each case uses queues of its own (unique names, deleted at the end) so that cases run in
//! parallel, and bounds every wait.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{
    Backoff, CallError, CallRequest, Client, ConnectError, ConnectionError, QueueKind, ReplyMode,
    Request, RpcError,
};
use bytes::Bytes;
use e2e_tests::broker::{
    close_connection_named, declare_queue, queue_status, unique_name, uri_with_password, Node,
    QueueGuard, ReplyPath,
};
use e2e_tests::calls::{
    call, concurrent_calls, connect, connect_with, expect_fib, CALL_TIMEOUT, CONNECT_LIMIT,
};
use e2e_tests::e2e_tests;
use e2e_tests::process::ChildProcess;
use e2e_tests::rt::{blocking, sleep, spawn, within, TestRuntime};
use e2e_tests::servers::{client_options, fib_held, server_options, Counter, Hold, TestServer};

e2e_tests! {
    round_trip,
    thousand_concurrent_calls,
    direct_reply_to,
    exclusive_reply_queue,
    unknown_queue_not_routed,
    no_consumer_no_servers,
    no_consumer_times_out_at_deadline,
    invalid_input_gets_error_replies,
    server_killed_mid_request,
    server_connection_closed_mid_request,
    broker_closes_client_connection,
    server_reconnects_after_broker_closes_it,
    graceful_shutdown_finishes_requests_in_flight,
    client_close_ends_pending_calls,
    wrong_password,
    unreachable_broker,
    body_over_server_limit_gets_error_reply,
    server_replies_on_a_channel_of_its_own,
}

/// "Quickly": a fail-fast outcome comes well within this.
const PROMPT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// A call gets fib(n) back, for the smallest, a typical and the largest n, and with the
/// whitespace the tutorial's client may send.
async fn round_trip<R: TestRuntime>() {
    let queue = QueueGuard::new("round-trip");
    let server = TestServer::start::<R, _, _>(server_options(queue.name()), fib_handler).await;
    let client = connect::<R>(ReplyMode::default()).await;
    for n in [0, 1, 30, 186] {
        expect_fib(
            call(&client, queue.name(), n.to_string(), CALL_TIMEOUT).await,
            n,
        );
    }
    expect_fib(call(&client, queue.name(), " 7\n", CALL_TIMEOUT).await, 7);
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_ok, 5);
}

/// 1,000 calls in flight at once from one client (a task each) all get their own answer.
async fn thousand_concurrent_calls<R: TestRuntime>() {
    let queue = QueueGuard::new("thousand");
    let mut options = server_options(queue.name());
    options.rpc.prefetch = 100;
    options.workers = 100;
    let server = TestServer::start::<R, _, _>(options, fib_handler).await;
    let client = connect::<R>(ReplyMode::default()).await;
    concurrent_calls(&client, queue.name(), 1000).await;
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_ok, 1000);
    assert_eq!(report.stats.replied_error, 0);
}

/// 200 calls in `mode`, then what the server and the broker saw of the reply path: the
/// `reply_to` of every request, and the queues the client's connection owns and consumes.
async fn reply_mode_case<R: TestRuntime>(mode: ReplyMode) {
    let queue = QueueGuard::new("reply-mode");
    let mut options = server_options(queue.name());
    options.rpc.prefetch = 20;
    options.workers = 20;
    let reply_tos = Arc::new(Mutex::new(BTreeSet::new()));
    let handler = {
        let reply_tos = Arc::clone(&reply_tos);
        move |request: Request| {
            let reply_to = request
                .properties
                .reply_to()
                .as_ref()
                .map(|r| r.to_string());
            reply_tos
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(reply_to);
            fib_handler(request)
        }
    };
    let server = TestServer::start::<R, _, _>(options, handler).await;
    let name = unique_name("reply-mode-client");
    let mut options = client_options(mode);
    options.connect[0].connection.connection_name = Some(name.clone());
    let client = connect_with::<R>(options).await;
    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);
    concurrent_calls(&client, queue.name(), 200).await;

    // One reply address for all calls.
    let reply_tos: Vec<_> =
        std::mem::take(&mut *reply_tos.lock().unwrap_or_else(PoisonError::into_inner))
            .into_iter()
            .collect();
    let [Some(reply_to)] = reply_tos.as_slice() else {
        panic!("{mode:?}: expected one reply_to for every request, saw {reply_tos:?}");
    };
    let path = blocking(move || Node::main().reply_path_of(&name))
        .await
        .expect("list the client's queues and consumers");
    match mode {
        ReplyMode::DirectReplyTo => {
            // RabbitMQ names the pseudo-queue per channel: amq.rabbitmq.reply-to.<encoded>.
            assert!(
                reply_to.starts_with("amq.rabbitmq.reply-to."),
                "direct reply-to requests carry reply_to {reply_to}"
            );
            assert_eq!(
                path,
                ReplyPath {
                    exclusive_queues: vec![],
                    consumed_queues: vec![]
                },
                "direct reply-to owns and consumes no queue"
            );
        }
        ReplyMode::ExclusiveQueue => {
            // A server-named queue (amq.gen-…), exclusive to the client's connection, which
            // consumes it once; the requests name it.
            assert!(reply_to.starts_with("amq.gen-"), "reply_to {reply_to}");
            assert_eq!(
                path,
                ReplyPath {
                    exclusive_queues: vec![reply_to.clone()],
                    consumed_queues: vec![reply_to.clone()]
                },
                "exclusive mode: one exclusive queue, consumed by the client"
            );
        }
    }
    client.close().await;
    server.stop::<R>().await;
}

/// Replies through RabbitMQ's direct reply-to pseudo-queue.
async fn direct_reply_to<R: TestRuntime>() {
    reply_mode_case::<R>(ReplyMode::DirectReplyTo).await
}

/// Replies through an exclusive, server-named queue.
async fn exclusive_reply_queue<R: TestRuntime>() {
    reply_mode_case::<R>(ReplyMode::ExclusiveQueue).await
}

/// A call to a queue that does not exist ends with `NotRouted` at once (never ran), whether
/// the consumer-count check finds the queue missing or the mandatory publish comes back.
async fn unknown_queue_not_routed<R: TestRuntime>() {
    for server_check in [Some(Duration::from_secs(1)), None] {
        let mut options = client_options(ReplyMode::default());
        options.rpc.server_check = server_check;
        let client = connect_with::<R>(options).await;
        let missing = unique_name("missing");
        let started = Instant::now();
        let result = call(&client, &missing, "30", CALL_TIMEOUT).await;
        let took = started.elapsed();
        assert_eq!(
            result,
            Err(CallError::Rpc(RpcError::NotRouted)),
            "server_check {server_check:?}"
        );
        assert!(!result.expect_err("NotRouted").may_have_run());
        assert!(
            took < PROMPT,
            "NotRouted took {took:?} (server_check {server_check:?})"
        );
        client.close().await;
    }
}

/// A call to a queue nobody consumes ends with `NoServers` at once (never ran, never sent).
async fn no_consumer_no_servers<R: TestRuntime>() {
    let queue = QueueGuard::new("no-consumer");
    let name = queue.name().to_owned();
    blocking(move || declare_queue(&name, QueueKind::Classic))
        .await
        .expect("declare");
    let client = connect::<R>(ReplyMode::default()).await;
    let started = Instant::now();
    let result = call(&client, queue.name(), "30", CALL_TIMEOUT).await;
    let took = started.elapsed();
    assert_eq!(result, Err(CallError::Rpc(RpcError::NoServers)));
    assert!(took < PROMPT, "NoServers took {took:?}");
    client.close().await;
    // Never sent: nothing waits in the queue.
    let name = queue.name().to_owned();
    let status = blocking(move || queue_status(&name)).await.expect("status");
    assert_eq!(status.map(|s| s.messages), Some(0));
}

/// Without the consumer-count check, a call to a queue nobody consumes ends with `TimedOut` at
/// its deadline: not before, and not much after. The request carries its deadline as
/// `expiration`, so the broker drops it from the queue too.
async fn no_consumer_times_out_at_deadline<R: TestRuntime>() {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    // Generous: this is a correctness bound on a small, busy machine, not a latency target.
    const SLACK: Duration = Duration::from_millis(500);
    let queue = QueueGuard::new("deadline");
    let name = queue.name().to_owned();
    blocking(move || declare_queue(&name, QueueKind::Classic))
        .await
        .expect("declare");
    let mut options = client_options(ReplyMode::default());
    options.rpc.server_check = None;
    let client = connect_with::<R>(options).await;
    let started = Instant::now();
    let result = call(&client, queue.name(), "30", TIMEOUT).await;
    let took = started.elapsed();
    assert_eq!(result, Err(CallError::Rpc(RpcError::TimedOut)));
    assert!(took >= TIMEOUT, "TimedOut early, after {took:?}");
    assert!(took <= TIMEOUT + SLACK, "TimedOut late, after {took:?}");
    client.close().await;
    // The broker expires the request (per-message TTL from `expiration`).
    let name = queue.name().to_owned();
    within::<R, _>(
        Duration::from_secs(5),
        "the broker expiring the request",
        async {
            loop {
                let name = name.clone();
                let status = blocking(move || queue_status(&name)).await.expect("status");
                if status.map(|s| s.messages) == Some(0) {
                    break;
                }
                sleep::<R>(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
}

/// Every invalid body gets an `invalid_request` error reply (refused before running, so not
/// "may have run"), and the server goes on serving after each.
async fn invalid_input_gets_error_replies<R: TestRuntime>() {
    let queue = QueueGuard::new("invalid");
    let server = TestServer::start::<R, _, _>(server_options(queue.name()), fib_handler).await;
    let client = connect::<R>(ReplyMode::default()).await;
    let huge = Bytes::from(vec![b'7'; 2 * 1024 * 1024]);
    let bad: Vec<(&str, Bytes)> = vec![
        ("not a number", Bytes::from_static(b"thirty")),
        ("negative", Bytes::from_static(b"-1")),
        ("too large", Bytes::from_static(b"187")),
        (
            "far too large",
            Bytes::from_static(b"99999999999999999999999"),
        ),
        ("empty", Bytes::new()),
        ("fraction", Bytes::from_static(b"3.5")),
        ("not UTF-8", Bytes::from_static(b"\xff\xfe")),
        ("huge (2 MiB)", huge),
    ];
    for (what, body) in &bad {
        match call(&client, queue.name(), body.clone(), CALL_TIMEOUT).await {
            Err(CallError::Rpc(RpcError::Rejected { code, message })) => {
                assert_eq!(code, "invalid_request", "{what}");
                assert!(!message.is_empty(), "{what}: empty message");
                assert!(message.len() < 200, "{what}: message quotes the input");
            }
            other => panic!("{what}: expected an invalid_request error reply, got {other:?}"),
        }
        // The server is still there and still right.
        expect_fib(call(&client, queue.name(), "10", CALL_TIMEOUT).await, 10);
    }
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_error, bad.len() as u64);
    assert_eq!(report.stats.replied_ok, bad.len() as u64);
}

/// A server process killed with SIGKILL while it runs a request (before its reply and ack):
/// the broker redelivers the request to a second server, and the caller gets one correct
/// answer.
async fn server_killed_mid_request<R: TestRuntime>() {
    let queue = QueueGuard::new("killed");
    let mut first = ChildProcess::spawn(
        "e2e-server",
        e2e_server(R::NAME, queue.name(), &["--slow-ms", "30000"]),
    );
    first.wait_line::<R>("ready", Duration::from_secs(15)).await;
    let client = connect::<R>(ReplyMode::default()).await;
    let pending = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(async move {
            let request = CallRequest::new(queue, "30", Duration::from_secs(30));
            client.call_with(request).await.map(|r| r.body)
        })
    };
    first
        .wait_line::<R>("handling 30", Duration::from_secs(10))
        .await;
    first.kill();

    let started = Counter::default();
    let second = TestServer::start::<R, _, _>(
        server_options(queue.name()),
        fib_held::<R>(Hold::none(), started.clone()),
    )
    .await;
    let reply = within::<R, _>(
        Duration::from_secs(20),
        "the redelivered call",
        pending.join(),
    )
    .await;
    expect_fib(reply, 30);
    client.close().await;
    let report = second.stop::<R>().await;
    assert_eq!(started.get(), 1, "the second server ran the request once");
    assert_eq!(report.stats.replied_ok, 1);
}

/// The same with the server's connection closed by the broker (`rabbitmqctl close_connection`)
/// while its handler runs: the request goes to the second server, the caller gets one correct
/// answer, and the first server's late answer goes nowhere.
async fn server_connection_closed_mid_request<R: TestRuntime>() {
    let queue = QueueGuard::new("server-closed");
    let name = unique_name("server-conn");
    let mut options = server_options(queue.name());
    options.backoff = Backoff::never();
    options.connect[0].connection.connection_name = Some(name.clone());
    let (hold, first_started) = (Hold::up_to(Duration::from_secs(30)), Counter::default());
    let first =
        TestServer::start::<R, _, _>(options, fib_held::<R>(hold.clone(), first_started.clone()))
            .await;
    let client = connect::<R>(ReplyMode::default()).await;
    let pending = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(async move {
            let request = CallRequest::new(queue, "30", Duration::from_secs(30));
            client.call_with(request).await.map(|r| r.body)
        })
    };
    first_started
        .wait_for::<R>(1, Duration::from_secs(10))
        .await;
    let second_started = Counter::default();
    let second = TestServer::start::<R, _, _>(
        server_options(queue.name()),
        fib_held::<R>(Hold::none(), second_started.clone()),
    )
    .await;
    blocking(move || close_connection_named(&name))
        .await
        .expect("close the first server's connection");
    let reply = within::<R, _>(
        Duration::from_secs(20),
        "the redelivered call",
        pending.join(),
    )
    .await;
    expect_fib(reply, 30);
    // The first server does not reconnect (Backoff::never): it stops by itself, and says why.
    match first.wait_stopped::<R>(Duration::from_secs(10)).await {
        Err(ConnectError::Connection(ConnectionError::ClosedByServer { code, .. })) => {
            assert_eq!(code.0, 320)
        }
        other => panic!("first server should end with the broker's close, got {other:?}"),
    }
    hold.release();
    client.close().await;
    let report = second.stop::<R>().await;
    assert_eq!(second_started.get(), 1);
    assert_eq!(report.stats.replied_ok, 1);
}

/// The broker closing the client's connection ends every call in flight promptly with
/// `ConnectionLost { sent: true }` (they may have run), not at their deadline; the client then
/// reconnects by itself and serves new calls. In both reply modes.
async fn broker_closes_client_connection<R: TestRuntime>() {
    const CALLS: usize = 5;
    let slow_queue = QueueGuard::new("slow");
    let fast_queue = QueueGuard::new("fast");
    let mut options = server_options(slow_queue.name());
    options.rpc.prefetch = 2 * CALLS as u16;
    options.workers = 2 * CALLS;
    let (hold, started) = (Hold::up_to(Duration::from_secs(60)), Counter::default());
    let slow =
        TestServer::start::<R, _, _>(options, fib_held::<R>(hold.clone(), started.clone())).await;
    let fast = TestServer::start::<R, _, _>(server_options(fast_queue.name()), fib_handler).await;

    for (round, mode) in [ReplyMode::ExclusiveQueue, ReplyMode::DirectReplyTo]
        .into_iter()
        .enumerate()
    {
        let name = unique_name("client-conn");
        let mut options = client_options(mode);
        options.connect[0].connection.connection_name = Some(name.clone());
        let client = connect_with::<R>(options).await;
        let pending: Vec<_> = (0..CALLS)
            .map(|_| {
                let (client, queue) = (client.clone(), slow_queue.name().to_owned());
                spawn::<R, _>(async move {
                    let request = CallRequest::new(queue, "30", Duration::from_secs(60));
                    client.call_with(request).await
                })
            })
            .collect();
        started
            .wait_for::<R>((round + 1) * CALLS, Duration::from_secs(10))
            .await;

        blocking(move || close_connection_named(&name))
            .await
            .expect("close the client's connection");
        let closed = Instant::now();
        for task in pending {
            let result = within::<R, _>(PROMPT, "a call ending after the close", task.join()).await;
            assert_eq!(
                result,
                Err(CallError::Rpc(RpcError::ConnectionLost { sent: true })),
                "{mode:?}"
            );
        }
        assert!(closed.elapsed() < PROMPT);

        // The client reconnects (default backoff) and works again.
        expect_fib(
            call(&client, fast_queue.name(), "30", Duration::from_secs(15)).await,
            30,
        );
        client.close().await;
    }
    hold.release();
    fast.stop::<R>().await;
    slow.stop::<R>().await;
}

/// A server whose connection the broker closes reconnects by itself (default backoff),
/// consumes its queue again and answers.
async fn server_reconnects_after_broker_closes_it<R: TestRuntime>() {
    let queue = QueueGuard::new("server-reconnects");
    let name = unique_name("server-conn");
    let mut options = server_options(queue.name());
    options.connect[0].connection.connection_name = Some(name.clone());
    let mut server = TestServer::start::<R, _, _>(options, fib_handler).await;
    let client = connect::<R>(ReplyMode::default()).await;
    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);
    blocking(move || close_connection_named(&name))
        .await
        .expect("close the server's connection");
    server.wait_ready_again::<R>(Duration::from_secs(10)).await;
    expect_fib(call(&client, queue.name(), "31", CALL_TIMEOUT).await, 31);
    client.close().await;
    let report = server.stop::<R>().await;
    // The counters span reconnects.
    assert_eq!(report.stats.replied_ok, 2);
}

/// A graceful server shutdown stops taking requests, finishes the one in flight (its caller
/// gets the answer) and then stops; a call after that finds no server.
async fn graceful_shutdown_finishes_requests_in_flight<R: TestRuntime>() {
    let queue = QueueGuard::new("graceful");
    let (hold, started) = (Hold::up_to(Duration::from_secs(30)), Counter::default());
    let server = TestServer::start::<R, _, _>(
        server_options(queue.name()),
        fib_held::<R>(hold.clone(), started.clone()),
    )
    .await;
    let client = connect::<R>(ReplyMode::default()).await;
    let pending = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(async move {
            let request = CallRequest::new(queue, "30", Duration::from_secs(30));
            client.call_with(request).await.map(|r| r.body)
        })
    };
    started.wait_for::<R>(1, Duration::from_secs(10)).await;
    let stopping = spawn::<R, _>(server.stop::<R>());
    // The shutdown cancels the consumer first (the broker lists no consumer of the queue)
    // while the request is still held; only then may the handler finish.
    let name = queue.name().to_owned();
    within::<R, _>(
        Duration::from_secs(10),
        "the shutdown cancelling the consumer",
        async {
            loop {
                let name = name.clone();
                let status = blocking(move || queue_status(&name)).await.expect("status");
                if status.map(|s| s.consumers) == Some(0) {
                    break;
                }
                sleep::<R>(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    assert_eq!(started.get(), 1, "the request is still held");
    hold.release();
    let reply = within::<R, _>(
        Duration::from_secs(10),
        "the call in flight",
        pending.join(),
    )
    .await;
    expect_fib(reply, 30);
    let report = within::<R, _>(Duration::from_secs(20), "the shutdown", stopping.join()).await;
    assert_eq!(report.stats.replied_ok, 1);
    // Nobody consumes the queue any more. The client last saw a consumer, so calls go out (and
    // time out at their deadline) until its count is stale and refreshed in the background (the
    // `server_check` interval, 1 s); from then on calls fail fast with NoServers.
    let timeout = Duration::from_millis(1000);
    let mut timed_out = 0;
    loop {
        let started = Instant::now();
        match call(&client, queue.name(), "30", timeout).await {
            Err(CallError::Rpc(RpcError::NoServers)) => {
                assert!(started.elapsed() < PROMPT);
                break;
            }
            Err(CallError::Rpc(RpcError::TimedOut)) => {
                let took = started.elapsed();
                assert!(took >= timeout && took < timeout + PROMPT, "{took:?}");
                timed_out += 1;
                assert!(timed_out <= 2, "still no NoServers after {timed_out} calls");
            }
            other => panic!("expected NoServers or TimedOut, got {other:?}"),
        }
    }
    client.close().await;
}

/// Closing the client ends its calls in flight at once with `ConnectionLost` (they were sent,
/// so they may have run); later calls fail with `Closed` without being sent.
async fn client_close_ends_pending_calls<R: TestRuntime>() {
    let queue = QueueGuard::new("client-close");
    let (hold, started) = (Hold::up_to(Duration::from_secs(30)), Counter::default());
    let server = TestServer::start::<R, _, _>(
        server_options(queue.name()),
        fib_held::<R>(hold.clone(), started.clone()),
    )
    .await;
    let client = connect::<R>(ReplyMode::default()).await;
    let pending = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(async move {
            let request = CallRequest::new(queue, "30", Duration::from_secs(30));
            client.call_with(request).await
        })
    };
    started.wait_for::<R>(1, Duration::from_secs(10)).await;
    within::<R, _>(PROMPT, "client close", client.close()).await;
    let result = within::<R, _>(PROMPT, "the pending call", pending.join()).await;
    assert_eq!(
        result,
        Err(CallError::Rpc(RpcError::ConnectionLost { sent: true }))
    );
    let after = within::<R, _>(PROMPT, "a call after close", client.call(queue.name(), "1")).await;
    assert_eq!(after, Err(CallError::Closed));
    hold.release();
    server.stop::<R>().await;
}

/// A wrong password fails the client's connect and the server's start promptly, with an
/// error that says so and does not show the password.
async fn wrong_password<R: TestRuntime>() {
    const PASSWORD: &str = "not-the-password-e2e";
    let uri = uri_with_password(PASSWORD);
    let started = Instant::now();
    let result = within::<R, _>(
        CONNECT_LIMIT,
        "connect with a wrong password",
        Client::<R>::connect(&uri),
    )
    .await;
    let took = started.elapsed();
    let error = match result {
        Err(e @ ConnectError::Connection(ConnectionError::AuthenticationFailed { .. })) => e,
        Err(other) => panic!("expected AuthenticationFailed, got {other:?}"),
        Ok(_) => panic!("connected with a wrong password"),
    };
    let message = error.to_string();
    assert!(
        message.contains("authentication failed"),
        "unclear message: {message}"
    );
    assert!(!message.contains(PASSWORD), "message shows the password");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    let queue = QueueGuard::new("wrong-password");
    let mut options = server_options(queue.name());
    options.connect = amqp_rpc_driver::ConnectOptions::from_uri(&uri)
        .expect("uri")
        .into();
    match TestServer::try_start::<R, _, _>(options, fib_handler).await {
        Err(ConnectError::Connection(ConnectionError::AuthenticationFailed { .. })) => {}
        Err(other) => panic!("server: expected AuthenticationFailed, got {other:?}"),
        Ok(_) => panic!("server started with a wrong password"),
    }
}

/// Nothing listening at the broker's address: connecting fails at once, saying where.
async fn unreachable_broker<R: TestRuntime>() {
    // Port 1 (tcpmux) is not served here: the connect is refused.
    let uri = "amqp://guest:guest@127.0.0.1:1/%2f";
    let started = Instant::now();
    let result = within::<R, _>(CONNECT_LIMIT, "connect", Client::<R>::connect(uri)).await;
    match result {
        Err(e @ ConnectError::Io { .. }) => {
            assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        }
        Err(other) => panic!("expected an I/O error, got {other:?}"),
        Ok(_) => panic!("connected to port 1?"),
    }
    assert!(started.elapsed() < PROMPT);
}

/// A request body larger than the server accepts (`ConnectionConfig::max_body_size`, 16 MiB by
/// default) is "huge" input too: the caller should get an error reply at once, not wait for its
/// deadline and then be told the request may have run.
async fn body_over_server_limit_gets_error_reply<R: TestRuntime>() {
    let queue = QueueGuard::new("over-limit");
    let mut options = server_options(queue.name());
    options.connect[0].connection.max_body_size = 1024 * 1024;
    let server = TestServer::start::<R, _, _>(options, fib_handler).await;
    let client = connect::<R>(ReplyMode::default()).await;
    let body = vec![b'7'; 2 * 1024 * 1024];
    let started = Instant::now();
    match call(&client, queue.name(), body, Duration::from_secs(5)).await {
        Err(CallError::Rpc(RpcError::Rejected { .. } | RpcError::Remote { .. })) => {}
        other => panic!(
            "expected an error reply, got {other:?} after {:?}",
            started.elapsed()
        ),
    }
    assert!(started.elapsed() < PROMPT);
    expect_fib(call(&client, queue.name(), "10", CALL_TIMEOUT).await, 10);
    client.close().await;
    server.stop::<R>().await;
}

/// The `e2e-server` bin on `transport`, serving `queue`.
fn e2e_server(transport: &str, queue: &str, extra: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-server"));
    command
        .args(["--transport", transport, "--queue", queue])
        .args(extra);
    command
}

/// The server consumes and acks on one channel and publishes its replies on another, so that
/// RabbitMQ routes a reply while it handles the ack after it (see the server's
/// `RpcServer::publisher`): the broker lists two channels for its connection, one consuming.
async fn server_replies_on_a_channel_of_its_own<R: TestRuntime>() {
    let queue = QueueGuard::new("reply-channel");
    let name = unique_name("reply-channel-server");
    let mut options = server_options(queue.name());
    options.connect[0].connection.connection_name = Some(name.clone());
    let server = TestServer::start::<R, _, _>(options, fib_handler).await;
    let client = connect::<R>(ReplyMode::default()).await;
    concurrent_calls(&client, queue.name(), 50).await;
    let channels = blocking(move || Node::main().channels_of(&name))
        .await
        .expect("list the server's channels");
    assert_eq!(
        channels.len(),
        2,
        "consumer and reply channels: {channels:?}"
    );
    let consumers: Vec<u32> = channels.iter().map(|(_, c)| *c).collect();
    assert!(
        consumers.contains(&1) && consumers.contains(&0),
        "one channel consumes, the other publishes: {channels:?}"
    );
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_ok, 50);
}
