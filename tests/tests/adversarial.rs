//! The promise under hostile brokers and careless callers, against the real RabbitMQ: one bad
//! call never harms another, and every call ends once, promptly, with a typed error that says
//! whether it may have run. `cargo test -p e2e-tests --test adversarial`.
//!
//! Each case makes the fault for real: an operator deleting the client's reply queue, calls the
//! broker refuses among good ones, callers that drop their futures by the thousand, a user the
//! broker will not let declare a reply queue.

use std::time::{Duration, Instant};

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{
    CallError, CallRequest, Client, ConnectError, ConnectionError, ConnectionState, ReplyMode,
    RpcError, UsageError,
};
use e2e_tests::broker::{Node, QueueGuard};
use e2e_tests::calls::{call, connect_with, expect_fib, CALL_TIMEOUT};
use e2e_tests::e2e_tests;
use e2e_tests::rt::{blocking, sleep, spawn, within, TestRuntime};
use e2e_tests::servers::{client_options, fib_held, server_options, Counter, Hold, TestServer};
use futures_channel::mpsc;
use futures_util::FutureExt;

e2e_tests! {
    operator_deletes_the_reply_queue,
    one_bad_call_among_many_exclusive,
    one_bad_call_among_many_direct,
    dropped_calls_free_their_slots,
    refused_reply_path_names_the_brokers_words,
    duration_max_options_do_not_panic,
}

/// "At once": a fail-fast outcome comes well within this, far below the calls' deadlines.
const PROMPT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// `rabbitmqctl delete_queue` of the client's exclusive reply queue: the broker cancels the
/// reply consumer. The call waiting for its reply ends at once as may-have-run (not at its
/// 60 s deadline), the client arms a new reply queue on the same connection, and the next call
/// succeeds.
async fn operator_deletes_the_reply_queue<R: TestRuntime>() {
    let queue = QueueGuard::new("reply-deleted");
    let hold = Hold::up_to(Duration::from_secs(30));
    let started = Counter::default();
    let mut options = server_options(queue.name());
    options.workers = 4;
    options.rpc.prefetch = 4;
    let server =
        TestServer::start::<R, _, _>(options, fib_held::<R>(hold.clone(), started.clone())).await;
    let name = e2e_tests::broker::unique_name("reply-deleted-client");
    let mut client_opts = client_options(ReplyMode::ExclusiveQueue);
    client_opts.connect[0].connection.connection_name = Some(name.clone());
    let client = connect_with::<R>(client_opts).await;
    let mut states = client.watch_state();

    let waiting = {
        let client = client.clone();
        let queue = queue.name().to_owned();
        spawn::<R, _>(async move {
            let request = CallRequest::new(queue, "20", Duration::from_secs(60));
            client.call_with(request).await
        })
    };
    started.wait_for::<R>(1, PROMPT).await;

    let connection = name.clone();
    let reply_queue = blocking(move || reply_queue_of(&Node::main(), &connection)).await;
    let node = Node::main();
    let doomed = reply_queue.clone();
    blocking(move || node.rabbitmqctl(&["delete_queue", &doomed]))
        .await
        .expect("rabbitmqctl delete_queue");

    // Promptly once the queue is gone (rabbitmqctl itself may take seconds on a busy machine),
    // not at the call's 60 s deadline.
    let result = within::<R, _>(PROMPT, "the waiting call ending", waiting.join()).await;
    assert_eq!(result, Err(CallError::Rpc(RpcError::ReplyPathLost)));
    assert!(result.is_err_and(|e| e.may_have_run()));

    hold.release();
    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);
    // A new reply queue, on the same connection: no reconnect.
    let name_again = name.clone();
    let new_queue = blocking(move || reply_queue_of(&Node::main(), &name_again)).await;
    assert_ne!(new_queue, reply_queue);
    assert!(
        !saw_reconnect(&mut states),
        "the client reconnected instead of re-arming its reply path"
    );
    client.close().await;
    server.stop::<R>().await;
}

/// 64 calls in flight and bad calls among them: to an exchange that does not exist (the broker
/// would close the channel with 404), with a `user_id` that is not ours (406), with a body
/// above `max_message_size` (406). The 64 get their right answers, each bad call alone ends
/// with a typed error that says it never ran, and the client never reconnects.
async fn one_bad_call_among_many<R: TestRuntime>(mode: ReplyMode) {
    let queue = QueueGuard::new("bad-among-many");
    let mut options = server_options(queue.name());
    options.workers = 64;
    options.rpc.prefetch = 64;
    let server = TestServer::start::<R, _, _>(options, fib_handler).await;
    let mut client_opts = client_options(mode);
    // The broker's own limit is 128 MiB; a deployment that lowers it tells the client too.
    client_opts.connect[0].connection.max_message_size = 64 * 1024;
    let client = connect_with::<R>(client_opts).await;
    let mut states = client.watch_state();
    // Warm: the request queue's consumer count is known.
    expect_fib(call(&client, queue.name(), "1", CALL_TIMEOUT).await, 1);

    let good: Vec<_> = (0..64u32)
        .map(|i| {
            let (client, queue) = (client.clone(), queue.name().to_owned());
            spawn::<R, _>(async move {
                let n = 20 + i % 60;
                let request = CallRequest::new(queue, n.to_string(), Duration::from_secs(30));
                (n, client.call_with(request).await.map(|r| r.body))
            })
        })
        .collect();
    let missing_exchange = format!("no-such-exchange-{}", uuid::Uuid::new_v4().simple());
    let mut bad_exchange = CallRequest::new(queue.name(), "5", Duration::from_secs(30));
    bad_exchange.exchange = missing_exchange.clone();
    let mut foreign_user = CallRequest::new(queue.name(), "5", Duration::from_secs(30));
    foreign_user.properties = foreign_user
        .properties
        .with_user_id("mallory".to_owned().into());
    let too_big = CallRequest::new(queue.name(), vec![b'7'; 65 * 1024], CALL_TIMEOUT);

    let refused = within::<R, _>(PROMPT, "bad exchange", client.call_with(bad_exchange)).await;
    match refused {
        Err(CallError::Rpc(RpcError::Refused { code, ref text })) => {
            assert_eq!(code.0, 404);
            assert!(text.contains(&missing_exchange), "{text}");
        }
        ref other => panic!("a call to a missing exchange ended with {other:?}"),
    }
    assert!(!refused.is_err_and(|e| e.may_have_run()));
    let foreign = within::<R, _>(PROMPT, "foreign user_id", client.call_with(foreign_user)).await;
    assert!(
        matches!(
            foreign,
            Err(CallError::Invalid(UsageError::UserIdMismatch { .. }))
        ),
        "{foreign:?}"
    );
    let big = within::<R, _>(PROMPT, "oversized body", client.call_with(too_big)).await;
    assert!(
        matches!(
            big,
            Err(CallError::Invalid(UsageError::MessageTooLarge { .. }))
        ),
        "{big:?}"
    );

    within::<R, _>(Duration::from_secs(40), "the 64 good calls", async {
        for task in good {
            let (n, reply) = task.join().await;
            expect_fib(reply, n);
        }
    })
    .await;
    assert!(!saw_reconnect(&mut states), "a bad call cost a reconnect");
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_ok, 65);
}

async fn one_bad_call_among_many_exclusive<R: TestRuntime>() {
    one_bad_call_among_many::<R>(ReplyMode::ExclusiveQueue).await
}

async fn one_bad_call_among_many_direct<R: TestRuntime>() {
    one_bad_call_among_many::<R>(ReplyMode::DirectReplyTo).await
}

/// 10,000 calls whose callers give up (drop the future) while the server holds them: each
/// frees its slot at once, so the client (4,096 slots) is never exhausted and the next call
/// succeeds at once.
async fn dropped_calls_free_their_slots<R: TestRuntime>() {
    // A server that takes requests and never answers in time: calls to it stay pending.
    let hole = QueueGuard::new("black-hole");
    let hold = Hold::up_to(Duration::from_secs(60));
    let mut hole_options = server_options(hole.name());
    hole_options.workers = 1;
    let hole_server = TestServer::start::<R, _, _>(
        hole_options,
        fib_held::<R>(hold.clone(), Counter::default()),
    )
    .await;
    let queue = QueueGuard::new("after-drops");
    let server = TestServer::start::<R, _, _>(server_options(queue.name()), fib_handler).await;
    let client = connect_with::<R>(client_options(ReplyMode::ExclusiveQueue)).await;

    for i in 0..10_000u32 {
        let request = CallRequest::new(hole.name(), "1", Duration::from_secs(60));
        // Polled once: the call is handed to the driver, then the caller gives up.
        let pending = client.call_with(request).now_or_never();
        assert!(
            pending.is_none(),
            "a call to the black hole ended: {pending:?}"
        );
        if i % 500 == 499 {
            // Let the driver task keep up (bounded: 20 pauses of 1 ms).
            sleep::<R>(Duration::from_millis(1)).await;
        }
    }
    let started = Instant::now();
    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);
    assert!(
        started.elapsed() < PROMPT,
        "the call after the drops waited {:?}",
        started.elapsed()
    );
    hold.release();
    client.close().await;
    server.stop::<R>().await;
    hole_server.stop::<R>().await;
}

/// A user the broker will not let declare a queue (configure permission `^$`): the exclusive
/// reply queue's `queue.declare` is refused with 403, and the connect error carries the
/// broker's code and words, never the password.
async fn refused_reply_path_names_the_brokers_words<R: TestRuntime>() {
    const USER: &str = "e2e-no-configure";
    const PASSWORD: &str = "e2e-s3cret-pw";
    blocking(|| {
        let node = Node::main();
        // Exists already when an earlier run made it: fine, the password is set again.
        let _ = node.rabbitmqctl(&["add_user", USER, PASSWORD]);
        node.rabbitmqctl(&["change_password", USER, PASSWORD])?;
        node.rabbitmqctl(&["set_permissions", "-p", "/", USER, "^$", ".*", ".*"])
    })
    .await
    .expect("creating the restricted user");
    let uri = format!("amqp://{USER}:{PASSWORD}@127.0.0.1:5672/%2f");
    let mut options = e2e_tests::servers::client_options_at(&uri, ReplyMode::ExclusiveQueue);
    options.retry_first_connect = false;
    let result = within::<R, _>(
        Duration::from_secs(10),
        "connecting as a user without configure permission",
        Client::<R>::connect_with(options),
    )
    .await;
    let error = match result {
        Err(e) => e,
        Ok(client) => {
            client.close().await;
            panic!("connected although the reply queue cannot be declared")
        }
    };
    match &error {
        ConnectError::Connection(ConnectionError::ReplyPathRefused { code, text }) => {
            assert_eq!(code.0, 403, "{error}");
            assert!(text.contains("ACCESS_REFUSED"), "{text}");
        }
        other => panic!("expected the broker's refusal of the reply path, got {other:?}"),
    }
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("403"), "{shown}");
    assert!(!shown.contains(PASSWORD), "the password leaked: {shown}");
}

/// Every duration option at `Duration::MAX` ("no limit"): the client and server connect and
/// answer, nothing panics.
async fn duration_max_options_do_not_panic<R: TestRuntime>() {
    let queue = QueueGuard::new("duration-max");
    let mut server_opts = server_options(queue.name());
    server_opts.connect[0].connect_timeout = Duration::MAX;
    server_opts.connect[0].connection.close_timeout = Duration::MAX;
    server_opts.backoff.max = Duration::MAX;
    let server = TestServer::start::<R, _, _>(server_opts, fib_handler).await;
    let mut options = client_options(ReplyMode::ExclusiveQueue);
    options.default_timeout = Duration::MAX;
    options.connect[0].connect_timeout = Duration::MAX;
    options.connect[0].connection.handshake_timeout = Duration::MAX;
    options.connect[0].connection.close_timeout = Duration::MAX;
    options.connect[0].connection.heartbeat = Duration::MAX;
    options.backoff.max = Duration::MAX;
    options.backoff.initial = Duration::MAX;
    options.rpc.server_check = Some(Duration::MAX);
    options.rpc.exchange_check = Some(Duration::MAX);
    let client = connect_with::<R>(options).await;
    let reply = within::<R, _>(CALL_TIMEOUT, "a call without deadline", async {
        client.call(queue.name(), "30").await
    })
    .await;
    expect_fib(reply, 30);
    within::<R, _>(CALL_TIMEOUT, "closing", client.close()).await;
    server.stop::<R>().await;
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The exclusive queue owned by the connection named `connection` (its reply queue), found by
/// the queue's owner pid (`rabbitmqctl list_queues name owner_pid`). Waits up to 5 s.
fn reply_queue_of(node: &Node, connection: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = node.connection_pids(connection).expect("list_connections");
        let listing = node
            .rabbitmqctl(&[
                "-q",
                "list_queues",
                "--no-table-headers",
                "name",
                "owner_pid",
            ])
            .expect("list_queues");
        let found = listing.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let (name, owner) = (fields.next()?, fields.next()?);
            pids.iter().any(|p| p == owner).then(|| name.to_owned())
        });
        if let Some(name) = found {
            return name;
        }
        assert!(
            Instant::now() < deadline,
            "no exclusive queue owned by {connection}: {listing}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether any state change seen so far was a reconnect.
fn saw_reconnect(states: &mut mpsc::Receiver<ConnectionState>) -> bool {
    let mut reconnected = false;
    while let Ok(state) = states.try_recv() {
        reconnected |= matches!(state, ConnectionState::Reconnecting { .. });
    }
    reconnected
}
