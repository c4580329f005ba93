//! What a running client and server tell about their calls: counters and in-flight gauges read
//! through the driver API while they run (`Client::stats`, `ServerHandle::stats`).
//! `cargo test -p e2e-tests --test observability`.

use std::time::Duration;

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{Client, ReplyMode, Server, ServerHandle, ServerOptions};
use e2e_tests::broker::QueueGuard;
use e2e_tests::calls::{call, connect, expect_fib, CALL_TIMEOUT};
use e2e_tests::e2e_tests;
use e2e_tests::rt::{sleep, spawn, timeout, within, TestRuntime};
use e2e_tests::servers::{fib_held, server_options, Counter, Hold, TestServer};

e2e_tests! {
    stats_and_gauges_readable_while_running,
    ready_says_when_the_server_consumes,
}

/// How long a published snapshot may take to show a change: the driver task publishes on its
/// next wake-up, which follows the change at once; this bounds a loaded machine.
const SHOWS_WITHIN: Duration = Duration::from_secs(5);

/// Waits until `check` holds (polling every 10 ms), at most [`SHOWS_WITHIN`]; `what` names it
/// in the failure, with `state` describing what was seen last.
async fn until<R: TestRuntime>(
    what: &str,
    mut check: impl FnMut() -> bool,
    state: impl Fn() -> String,
) {
    let seen = timeout::<R, _>(SHOWS_WITHIN, async {
        while !check() {
            sleep::<R>(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        seen.is_some(),
        "{what}: not seen within {SHOWS_WITHIN:?}; last: {}",
        state()
    );
}

fn describe<R: TestRuntime>(client: &Client<R>, server: &ServerHandle) -> String {
    format!(
        "client {:?} in flight {}, server {:?} in flight {}",
        client.stats(),
        client.in_flight(),
        server.stats(),
        server.in_flight()
    )
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// A call held in its handler shows as in flight on both sides and as received on the server;
/// once answered it shows as answered and replied, gauges back to zero; a call whose caller
/// gives up shows as cancelled.
async fn stats_and_gauges_readable_while_running<R: TestRuntime>() {
    let queue = QueueGuard::new("obs-stats");
    let hold = Hold::up_to(Duration::from_secs(20));
    let started = Counter::default();
    let server = TestServer::start::<R, _, _>(
        server_options(queue.name()),
        fib_held::<R>(hold.clone(), started.clone()),
    )
    .await;
    let handle = server.handle();
    let client = connect::<R>(ReplyMode::default()).await;
    let state = || describe(&client, &handle);

    // One call held in the handler.
    let held = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(async move { call(&client, &queue, "10", CALL_TIMEOUT).await })
    };
    started.wait_for::<R>(1, SHOWS_WITHIN).await;
    until::<R>(
        "one call in flight on both sides",
        || client.in_flight() == 1 && handle.in_flight() == 1,
        state,
    )
    .await;
    assert_eq!(client.stats().calls_started, 1, "{}", state());
    assert_eq!(client.stats().requests_sent, 1, "{}", state());
    assert_eq!(handle.stats().received, 1, "{}", state());
    assert_eq!(handle.stats().replied_ok, 0, "{}", state());

    hold.release();
    expect_fib(
        within::<R, _>(CALL_TIMEOUT, "held call", held.join()).await,
        10,
    );
    until::<R>(
        "the call answered on both sides, nothing in flight",
        || {
            client.stats().calls_answered == 1
                && client.in_flight() == 0
                && handle.stats().replied_ok == 1
                && handle.in_flight() == 0
        },
        state,
    )
    .await;

    // A caller that gives up: its call is cancelled.
    hold.hold_again();
    let gave_up =
        timeout::<R, _>(Duration::from_millis(300), client.call(queue.name(), "11")).await;
    assert!(gave_up.is_none(), "the held call was answered: {gave_up:?}");
    until::<R>(
        "the abandoned call counted as cancelled",
        || client.stats().calls_cancelled == 1 && client.in_flight() == 0,
        state,
    )
    .await;
    hold.release();

    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.received, 2);
}

/// `ServerHandle::ready` resolves `true` once the server consumes (a call made then is
/// answered), stays `true`, and resolves `false` for a server that never consumed because its
/// first connect failed.
async fn ready_says_when_the_server_consumes<R: TestRuntime>() {
    let queue = QueueGuard::new("obs-ready");
    let server = Server::<R>::new(server_options(queue.name()));
    let handle = server.handle();
    let serving = spawn::<R, _>(server.serve(fib_handler));
    assert!(
        within::<R, _>(CALL_TIMEOUT, "ready", handle.ready()).await,
        "the server ended before consuming"
    );
    let client = connect::<R>(ReplyMode::default()).await;
    expect_fib(call(&client, queue.name(), "12", CALL_TIMEOUT).await, 12);
    assert!(handle.ready().await, "ready once, ready for good");
    client.close().await;
    handle.shutdown().await;
    within::<R, _>(CALL_TIMEOUT, "shutdown", serving.join())
        .await
        .expect("the server failed");

    // Nothing listens on port 1: the first connect fails and `ready` says so.
    let options = ServerOptions::from_uri("amqp://guest:guest@127.0.0.1:1/%2f", queue.name())
        .expect("the URI parses");
    let server = Server::<R>::new(options);
    let handle = server.handle();
    let serving = spawn::<R, _>(server.serve(fib_handler));
    assert!(
        !within::<R, _>(CALL_TIMEOUT, "ready of a failed server", handle.ready()).await,
        "ready although the server never connected"
    );
    assert!(within::<R, _>(CALL_TIMEOUT, "failed serve", serving.join())
        .await
        .is_err());
}
