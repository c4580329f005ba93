//! Network faults made for real with the fault-injecting proxy between the client and the
//! broker: a TCP reset, a silent broker (heartbeats), a stall past a call's deadline. Every case
//! runs on tokio and on smol.

use std::time::{Duration, Instant};

use amqp_rpc_driver::{fib_handler, CallError, CallRequest, ReplyMode, RpcError};
use e2e_tests::broker::QueueGuard;
use e2e_tests::calls::{call, connect_with, expect_fib, CALL_TIMEOUT};
use e2e_tests::e2e_tests;
use e2e_tests::faults::Proxy;
use e2e_tests::proxy::FaultMode;
use e2e_tests::rt::{spawn, within, TestRuntime};
use e2e_tests::servers::{fib_held, server_options, Counter, Hold, TestServer};

e2e_tests! {
    connection_reset_ends_calls_and_client_recovers,
    silent_broker_detected_by_heartbeat,
    call_times_out_at_deadline_while_broker_stalls,
}

/// "Promptly", on a small busy machine.
const PROMPT: Duration = Duration::from_secs(2);

/// A TCP reset under the client ends its calls in flight at once with `ConnectionLost` (they
/// were sent, so they may have run); the client reconnects by itself and calls work again.
async fn connection_reset_ends_calls_and_client_recovers<R: TestRuntime>() {
    const CALLS: usize = 3;
    let queue = QueueGuard::new("reset");
    let mut options = server_options(queue.name());
    options.rpc.prefetch = CALLS as u16;
    options.workers = CALLS;
    let (hold, started) = (Hold::up_to(Duration::from_secs(60)), Counter::default());
    let server =
        TestServer::start::<R, _, _>(options, fib_held::<R>(hold.clone(), started.clone())).await;
    let proxy = Proxy::start();
    let client = connect_with::<R>(proxy.client_options(ReplyMode::default())).await;
    let pending: Vec<_> = (0..CALLS)
        .map(|_| {
            let (client, queue) = (client.clone(), queue.name().to_owned());
            spawn::<R, _>(async move {
                let request = CallRequest::new(queue, "30", Duration::from_secs(60));
                client.call_with(request).await
            })
        })
        .collect();
    started.wait_for::<R>(CALLS, Duration::from_secs(10)).await;

    proxy.reset_all();
    for task in pending {
        let result = within::<R, _>(PROMPT, "a call ending after the reset", task.join()).await;
        assert_eq!(
            result,
            Err(CallError::Rpc(RpcError::ConnectionLost { sent: true }))
        );
    }
    hold.release();
    expect_fib(
        call(&client, queue.name(), "30", Duration::from_secs(15)).await,
        30,
    );
    client.close().await;
    server.stop::<R>().await;
}

/// A broker that goes silent (every byte held both ways) is declared dead after two missed
/// heartbeat intervals: calls in flight end with `ConnectionLost` then, not at their deadline,
/// and the client reconnects once the network is back.
async fn silent_broker_detected_by_heartbeat<R: TestRuntime>() {
    const HEARTBEAT: Duration = Duration::from_secs(1);
    let queue = QueueGuard::new("silent");
    let server = TestServer::start::<R, _, _>(server_options(queue.name()), fib_handler).await;
    let proxy = Proxy::start();
    let mut options = proxy.client_options(ReplyMode::default());
    options.connect.connection.heartbeat = HEARTBEAT;
    let client = connect_with::<R>(options).await;
    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);

    proxy.set_mode(FaultMode::StallBoth);
    let stalled = Instant::now();
    let result = call(&client, queue.name(), "31", Duration::from_secs(30)).await;
    let took = stalled.elapsed();
    assert_eq!(
        result,
        Err(CallError::Rpc(RpcError::ConnectionLost { sent: true }))
    );
    // Dead after 2 intervals of read silence; the last read may be up to one interval old.
    assert!(
        took <= 2 * HEARTBEAT + PROMPT,
        "silence detected after {took:?}"
    );

    proxy.set_mode(FaultMode::Pass);
    expect_fib(
        call(&client, queue.name(), "32", Duration::from_secs(15)).await,
        32,
    );
    client.close().await;
    server.stop::<R>().await;
}

/// While the broker's bytes are held, a call still ends at its deadline with `TimedOut` (not
/// before, not much after); when they flow again the late reply is dropped, and the next call
/// gets its own answer.
async fn call_times_out_at_deadline_while_broker_stalls<R: TestRuntime>() {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    const SLACK: Duration = Duration::from_millis(500);
    let queue = QueueGuard::new("stall");
    let server = TestServer::start::<R, _, _>(server_options(queue.name()), fib_handler).await;
    let proxy = Proxy::start();
    let client = connect_with::<R>(proxy.client_options(ReplyMode::default())).await;
    expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);

    proxy.set_mode(FaultMode::StallDownstream);
    let started = Instant::now();
    let result = call(&client, queue.name(), "40", TIMEOUT).await;
    let took = started.elapsed();
    assert_eq!(result, Err(CallError::Rpc(RpcError::TimedOut)));
    assert!(took >= TIMEOUT, "TimedOut early, after {took:?}");
    assert!(took <= TIMEOUT + SLACK, "TimedOut late, after {took:?}");

    proxy.set_mode(FaultMode::Pass);
    expect_fib(call(&client, queue.name(), "41", CALL_TIMEOUT).await, 41);
    client.close().await;
    server.stop::<R>().await;
}
