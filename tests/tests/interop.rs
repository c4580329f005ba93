//! Interop with RabbitMQ tutorial 6's own programs (pika 1.x, in `tests/interop/`): their
//! client against our server, and our client against their server, with the request queue
//! declared the way either tutorial version does (a classic non-durable queue in the old one, a
//! durable quorum queue in the new one). Every case runs on tokio and on smol.
//!
//! Needs python3 with pika 1.x; `scripts/ensure-rabbitmq.sh` installs it.

use std::process::Command;
use std::time::Duration;

use amqp_rpc_cli::{fib, fib_handler};
use amqp_rpc_driver::{QueueKind, ReplyMode};
use e2e_tests::broker::{declare_queue, uri, QueueGuard};
use e2e_tests::calls::{call, concurrent_calls, connect, expect_fib, CALL_TIMEOUT};
use e2e_tests::e2e_tests;
use e2e_tests::process::{interop_script, python, ChildProcess};
use e2e_tests::rt::{blocking, TestRuntime};
use e2e_tests::servers::{server_options, TestServer};

e2e_tests! {
    pika_client_our_server_classic,
    pika_client_our_server_quorum,
    pika_client_our_server_existing_quorum,
    our_client_pika_server_classic,
    our_client_pika_server_quorum,
}

/// How long a pika program may take to start and connect (Python starts slowly on a busy box).
const PIKA_LIMIT: Duration = Duration::from_secs(20);

/// The tutorial's client asks for fib(n) on `queue`; returns what it printed.
async fn pika_call<R: TestRuntime>(queue: &str, n: u32) -> String {
    let mut command = Command::new(python());
    command
        .arg(interop_script("rpc_client.py"))
        .arg(n.to_string())
        .args(["--url", &uri(), "--queue", queue, "--timeout", "10"]);
    let mut client = ChildProcess::spawn("rpc_client.py", command);
    let status = client.wait_exit::<R>(PIKA_LIMIT).await;
    assert!(
        status.success(),
        "rpc_client.py {n} failed: {status}\n{}",
        client.output()
    );
    client.stdout().trim().to_owned()
}

/// Checks that `queue` is a queue of `kind`: a declare with the same arguments succeeds and
/// one with the other kind's is refused (406 PRECONDITION_FAILED).
async fn assert_queue_kind(queue: &str, kind: QueueKind) {
    let other = match kind {
        QueueKind::Classic => QueueKind::Quorum,
        QueueKind::Quorum => QueueKind::Classic,
    };
    let name = queue.to_owned();
    let (same, different) =
        blocking(move || (declare_queue(&name, kind), declare_queue(&name, other))).await;
    assert!(same.is_ok(), "{queue} is not {kind:?}: {same:?}");
    assert!(different.is_err(), "{queue} is also {other:?}?");
}

/// The tutorial's client against our server, which declares its queue as `declare_as` (or
/// finds it declared as `existing`).
async fn pika_client_our_server<R: TestRuntime>(
    declare_as: QueueKind,
    existing: Option<QueueKind>,
) {
    let queue = QueueGuard::new("pika-client");
    if let Some(kind) = existing {
        let name = queue.name().to_owned();
        blocking(move || declare_queue(&name, kind))
            .await
            .expect("declare");
    }
    let mut options = server_options(queue.name());
    options.rpc.declare_as = declare_as;
    let server = TestServer::start::<R, _, _>(options, fib_handler).await;
    assert_queue_kind(queue.name(), existing.unwrap_or(declare_as)).await;
    for n in [30, 186] {
        let printed = pika_call::<R>(queue.name(), n).await;
        assert_eq!(printed, fib(n).expect("n <= 186").to_string(), "fib({n})");
    }
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_ok, 2);
}

/// Old tutorial: our server declares a classic non-durable queue.
async fn pika_client_our_server_classic<R: TestRuntime>() {
    pika_client_our_server::<R>(QueueKind::Classic, None).await
}

/// New tutorial: our server declares a durable quorum queue.
async fn pika_client_our_server_quorum<R: TestRuntime>() {
    pika_client_our_server::<R>(QueueKind::Quorum, None).await
}

/// Someone else declared a quorum queue: our server (told to declare a classic one) serves it
/// as it is.
async fn pika_client_our_server_existing_quorum<R: TestRuntime>() {
    pika_client_our_server::<R>(QueueKind::Classic, Some(QueueKind::Quorum)).await
}

/// Our client, in both reply modes, against the tutorial's server, which declares `rpc_queue`
/// as `declare` (`classic` or `quorum`).
async fn our_client_pika_server<R: TestRuntime>(declare: &str, kind: QueueKind) {
    let queue = QueueGuard::new("pika-server");
    let mut command = Command::new(python());
    command.arg(interop_script("rpc_server.py")).args([
        "--url",
        &uri(),
        "--queue",
        queue.name(),
        "--declare",
        declare,
    ]);
    let mut server = ChildProcess::spawn("rpc_server.py", command);
    server
        .wait_line::<R>("Awaiting RPC requests", PIKA_LIMIT)
        .await;
    assert_queue_kind(queue.name(), kind).await;
    for mode in [ReplyMode::ExclusiveQueue, ReplyMode::DirectReplyTo] {
        let client = connect::<R>(mode).await;
        for n in [0, 1, 30, 186] {
            expect_fib(
                call(&client, queue.name(), n.to_string(), CALL_TIMEOUT).await,
                n,
            );
        }
        concurrent_calls(&client, queue.name(), 50).await;
        client.close().await;
    }
    // Stop the server before the guard deletes its queue.
    server.kill();
}

async fn our_client_pika_server_classic<R: TestRuntime>() {
    our_client_pika_server::<R>("classic", QueueKind::Classic).await
}

async fn our_client_pika_server_quorum<R: TestRuntime>() {
    our_client_pika_server::<R>("quorum", QueueKind::Quorum).await
}
