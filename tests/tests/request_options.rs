//! The request options a client may switch off (`ClientConfig::mandatory`, `expiration`,
//! `deadline_header`), on the real broker: off, the request reaches the server without them and
//! is answered; without `mandatory` (and without the queue check) a call to a missing queue is
//! no longer `NotRouted` but ends `TimedOut` at its deadline, as the README says.
//! `cargo test -p e2e-tests --test request_options`.

use std::time::Duration;

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{CallError, ReplyMode, Request, RpcError};
use e2e_tests::broker::QueueGuard;
use e2e_tests::calls::{call, connect, connect_with, CALL_TIMEOUT};
use e2e_tests::e2e_tests;
use e2e_tests::rt::TestRuntime;
use e2e_tests::servers::{client_options, server_options, TestServer};

e2e_tests! {
    requests_without_the_options_are_answered,
    without_mandatory_a_missing_queue_times_out,
}

/// The `x-rpc-deadline` header (ARCHITECTURE §5).
const DEADLINE_HEADER: &str = "x-rpc-deadline";

/// Off, each option is absent from the request the server receives; the call is answered. On
/// (the default), both are there.
async fn requests_without_the_options_are_answered<R: TestRuntime>() {
    let queue = QueueGuard::new("request-options");
    let server = TestServer::start::<R, _, _>(server_options(queue.name()), |request: Request| {
        let carries_expiration = request.properties.expiration().is_some();
        let carries_deadline = request
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key(DEADLINE_HEADER));
        async move {
            let answer = fib_handler(request).await?;
            // The fib reply, then what the request carried: "<fib> <expiration> <deadline>".
            Ok(format!(
                "{} {carries_expiration} {carries_deadline}",
                String::from_utf8_lossy(&answer)
            )
            .into())
        }
    })
    .await;

    let default = connect::<R>(ReplyMode::default()).await;
    let reply = call(&default, queue.name(), "10", CALL_TIMEOUT).await;
    assert_eq!(
        reply.as_deref().ok(),
        Some(&b"55 true true"[..]),
        "{reply:?}"
    );
    default.close().await;

    let mut options = client_options(ReplyMode::default());
    options.rpc.mandatory = false;
    options.rpc.expiration = false;
    options.rpc.deadline_header = false;
    let bare = connect_with::<R>(options).await;
    let reply = call(&bare, queue.name(), "10", CALL_TIMEOUT).await;
    assert_eq!(
        reply.as_deref().ok(),
        Some(&b"55 false false"[..]),
        "{reply:?}"
    );
    bare.close().await;
    server.stop::<R>().await;
}

/// Without `mandatory` and without the queue check, the broker drops a request to a queue that
/// does not exist: nobody can tell the caller, whose call ends `TimedOut` (may have run, as far
/// as it can know). With the defaults the same call is `NotRouted` at once.
async fn without_mandatory_a_missing_queue_times_out<R: TestRuntime>() {
    let missing = format!("request-options-missing-{}", uuid::Uuid::new_v4());
    let mut options = client_options(ReplyMode::default());
    options.rpc.mandatory = false;
    options.rpc.server_check = None;
    let client = connect_with::<R>(options).await;
    let result = call(&client, &missing, "10", Duration::from_millis(500)).await;
    assert!(
        matches!(result, Err(CallError::Rpc(RpcError::TimedOut))),
        "{result:?}"
    );
    client.close().await;

    let default = connect::<R>(ReplyMode::default()).await;
    let result = call(&default, &missing, "10", CALL_TIMEOUT).await;
    assert!(
        matches!(result, Err(CallError::Rpc(RpcError::NotRouted))),
        "{result:?}"
    );
    default.close().await;
}
