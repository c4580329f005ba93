//! Cross-runtime pairs: a server on one runtime (in a thread of its own) and a client on the
//! other, in both reply modes. They speak only through the broker, so this checks that both
//! transports put the same wire format on it; the server is shut down from the client's
//! runtime, which checks that the handles are runtime-neutral too.

use std::sync::mpsc;
use std::time::Duration;

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{CallError, ReplyMode, RpcError, ServerHandle};
use e2e_tests::broker::QueueGuard;
use e2e_tests::calls::{call, concurrent_calls, connect, expect_fib, CALL_TIMEOUT};
use e2e_tests::rt::{init_logging, within, Smol, TestRuntime, Tokio, CASE_LIMIT};
use e2e_tests::servers::{server_options, TestServer, READY_LIMIT};

#[test]
fn tokio_client_smol_server() {
    cross::<Smol, Tokio>();
}

#[test]
fn smol_client_tokio_server() {
    cross::<Tokio, Smol>();
}

/// Shuts the server down if the client side panics, so that it stops consuming before the
/// queue's guard deletes the queue.
struct StopOnDrop(ServerHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = futures_util::FutureExt::now_or_never(self.0.shutdown());
    }
}

/// Server on `S`, client on `C`.
fn cross<S: TestRuntime, C: TestRuntime>() {
    const CONCURRENT: u32 = 200;
    init_logging();
    let queue = QueueGuard::new(&format!("cross-{}-to-{}", C::NAME, S::NAME));
    let mut options = server_options(queue.name());
    options.rpc.prefetch = 20;
    options.workers = 20;
    let (handle_tx, handle_rx) = mpsc::channel();
    let server_thread = std::thread::spawn(move || {
        S::block_on(async move {
            let server = TestServer::start::<S, _, _>(options, fib_handler).await;
            let _ = handle_tx.send(server.handle());
            server.wait_stopped::<S>(CASE_LIMIT).await
        })
    });
    let handle = handle_rx
        .recv_timeout(READY_LIMIT + Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("server on {} did not start: {e}", S::NAME));
    let stop = StopOnDrop(handle);

    let what = format!("{} client against {} server", C::NAME, S::NAME);
    C::block_on(within::<C, _>(CASE_LIMIT, &what, async {
        for mode in [ReplyMode::ExclusiveQueue, ReplyMode::DirectReplyTo] {
            let client = connect::<C>(mode).await;
            expect_fib(call(&client, queue.name(), "30", CALL_TIMEOUT).await, 30);
            concurrent_calls(&client, queue.name(), CONCURRENT).await;
            match call(&client, queue.name(), "-5", CALL_TIMEOUT).await {
                Err(CallError::Rpc(RpcError::Rejected { code, .. })) => {
                    assert_eq!(code, "invalid_request")
                }
                other => panic!("{mode:?}: expected an error reply, got {other:?}"),
            }
            client.close().await;
        }
        // Shut down from the client's runtime.
        stop.0.shutdown().await;
    }));

    let report = server_thread
        .join()
        .unwrap_or_else(|_| panic!("server thread on {} panicked", S::NAME))
        .unwrap_or_else(|e| panic!("server on {} failed: {e}", S::NAME));
    assert_eq!(report.stats.replied_ok, 2 * (1 + u64::from(CONCURRENT)));
    assert_eq!(report.stats.replied_error, 2);
}
