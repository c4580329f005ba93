//! The server's reply safety against broker settings changed for the test, on the second node
//! (`e2e_tests::node`), on both runtimes (issue 20): a reply above the broker's
//! `max_message_size` that the server was not told about.
//! `cargo test -p e2e-tests --test server_node_safety`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{CallError, ReplyMode, Request, RpcError};
use bytes::Bytes;
use e2e_tests::broker::{Node, QueueGuard};
use e2e_tests::calls::{call, connect_with, expect_fib, CALL_TIMEOUT};
use e2e_tests::node;
use e2e_tests::rt::{sleep, spawn, within, TestRuntime};
use e2e_tests::servers::{client_options_at, fault_server_options, TestServer};

/// Like [`e2e_tests!`](e2e_tests::e2e_tests), holding the second node for itself
/// ([`node::exclusive`]) from before the runtime starts.
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
    reply_above_the_brokers_max_message_size_becomes_reply_too_large,
    handler_slower_than_consumer_timeout_runs_once,
}

/// "Promptly", on a small busy machine.
const PROMPT: Duration = Duration::from_secs(3);

/// RabbitMQ 3.10's default `max_message_size`.
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 134_217_728;

/// Sets the node's `max_message_size` for new channels; restores the default when dropped.
struct MaxMessageSize(Node);

impl MaxMessageSize {
    fn set(node: &Node, bytes: u64) -> Self {
        set_max_message_size(node, bytes);
        Self(node.clone())
    }
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        set_max_message_size(&self.0, DEFAULT_MAX_MESSAGE_SIZE);
    }
}

fn set_max_message_size(node: &Node, bytes: u64) {
    let expr = format!("application:set_env(rabbit, max_message_size, {bytes}).");
    let said = node
        .rabbitmqctl(&["eval", &expr])
        .expect("rabbitmqctl eval");
    assert!(said.contains("ok"), "{said}");
    let check = node
        .rabbitmqctl(&["eval", "application:get_env(rabbit, max_message_size)."])
        .expect("rabbitmqctl eval");
    assert!(check.contains(&bytes.to_string()), "{check}");
}

/// Issue 20 item 2: the broker's `max_message_size` is 1 MiB and the server was not told. A
/// 2 MB reply, among 64 calls in flight, makes the broker close the reply channel; before, its
/// request stood acked: the caller timed out after its deadline and the server counted
/// `replied_ok`. Now no request is acked before its reply is confirmed; the server reads the
/// limit from the broker's words: the caller gets `reply_too_large` promptly, the 64 are
/// answered, no request is requeued or run twice, and the next oversized reply becomes
/// `reply_too_large` without reaching the broker.
async fn reply_above_the_brokers_max_message_size_becomes_reply_too_large<R: TestRuntime>() {
    let node = node::second_node();
    let _limit = MaxMessageSize::set(node, 1024 * 1024);
    let queue = QueueGuard::on(node, "reply-over-max-size");
    let name = format!("{}-server", queue.name());
    let options = fault_server_options(node.uri(), queue.name(), &name, 16);
    let mut server = TestServer::start::<R, _, _>(options, |request: Request| async move {
        match &request.body[..] {
            b"big" => Ok(Bytes::from(vec![b'x'; 2_000_000])),
            _ => fib_handler(request).await,
        }
    })
    .await;
    let client = connect_with::<R>(client_options_at(node.uri(), ReplyMode::DirectReplyTo)).await;
    expect_fib(call(&client, queue.name(), "1", CALL_TIMEOUT).await, 1);
    let good: Vec<_> = (0..64u32)
        .map(|i| {
            let (client, queue) = (client.clone(), queue.name().to_owned());
            spawn::<R, _>(async move {
                let n = 10 + i % 20;
                (n, call(&client, &queue, n.to_string(), CALL_TIMEOUT).await)
            })
        })
        .collect();
    for round in 0..2 {
        let started = Instant::now();
        let result = call(&client, queue.name(), "big", CALL_TIMEOUT).await;
        match result {
            Err(CallError::Rpc(RpcError::Remote { ref code, .. })) => {
                assert_eq!(code, "reply_too_large", "round {round}")
            }
            other => panic!("round {round}: {other:?}"),
        }
        assert!(
            started.elapsed() < PROMPT,
            "round {round}: {:?}",
            started.elapsed()
        );
    }
    within::<R, _>(Duration::from_secs(20), "the 64 good calls", async {
        for task in good {
            let (n, result) = task.join().await;
            expect_fib(result, n);
        }
    })
    .await;
    assert_eq!(
        server.times_ready_again(),
        0,
        "the server never re-consumed"
    );
    client.close().await;
    let report = server.stop::<R>().await;
    let stats = report.stats;
    assert_eq!(stats.replies_too_large, 2, "{stats:?}");
    assert_eq!(stats.replied_ok, 65, "{stats:?}");
    assert_eq!(stats.received, 67, "no redelivery: {stats:?}");
    assert_eq!(stats.replies_refused, 0, "{stats:?}");
    let status = node.queue_status(queue.name()).expect("queue status");
    assert_eq!(status.map(|s| s.messages), Some(0), "nothing requeued");
}

/// Sets rabbit application settings on a node for new channels; restores them when dropped.
struct RabbitEnv {
    node: Node,
    restore: Vec<(&'static str, u64)>,
}

impl RabbitEnv {
    fn set(node: &Node, settings: &[(&'static str, u64, u64)]) -> Self {
        for (key, value, _) in settings {
            set_env(node, key, *value);
        }
        Self {
            node: node.clone(),
            restore: settings.iter().map(|(k, _, d)| (*k, *d)).collect(),
        }
    }
}

impl Drop for RabbitEnv {
    fn drop(&mut self) {
        for (key, value) in &self.restore {
            set_env(&self.node, key, *value);
        }
    }
}

fn set_env(node: &Node, key: &str, value: u64) {
    let expr = format!("application:set_env(rabbit, {key}, {value}).");
    let said = node
        .rabbitmqctl(&["eval", &expr])
        .expect("rabbitmqctl eval");
    assert!(said.contains("ok"), "{said}");
}

/// How long the slow handler of [`handler_slower_than_consumer_timeout_runs_once`] runs.
const SLOW: Duration = Duration::from_secs(8);

/// Issue 20 item 3: the broker's `consumer_timeout` is 5 s (checked every second:
/// `channel_tick_interval`, 60 s by default on 3.10, lowered too) and a handler takes 8 s. The
/// broker closes the consuming channel (406) and redelivers the request while the handler
/// runs; before, it ran again and again (5 times measured) and ended rejected as poison. Now
/// the redelivery waits for the first run, whose reply answers the caller at about 8 s and,
/// from the reply cache, the redelivery: the handler runs once and the queue ends empty.
async fn handler_slower_than_consumer_timeout_runs_once<R: TestRuntime>() {
    let node = node::second_node();
    let _env = RabbitEnv::set(
        node,
        &[
            ("consumer_timeout", 5000, 1_800_000),
            ("channel_tick_interval", 1000, 60_000),
        ],
    );
    let queue = QueueGuard::on(node, "slower-than-consumer-timeout");
    let name = format!("{}-server", queue.name());
    let options = fault_server_options(node.uri(), queue.name(), &name, 2);
    let runs = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&runs);
    let mut server = TestServer::start::<R, _, _>(options, move |request: Request| {
        let slow = &request.body[..] == b"slow";
        if slow {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        async move {
            if slow {
                sleep::<R>(SLOW).await;
                return Ok(Bytes::from_static(b"finally"));
            }
            fib_handler(request).await
        }
    })
    .await;
    let client = connect_with::<R>(client_options_at(node.uri(), ReplyMode::DirectReplyTo)).await;
    let started = Instant::now();
    let result = call(&client, queue.name(), "slow", Duration::from_secs(20)).await;
    assert_eq!(
        result.expect("the slow call"),
        Bytes::from_static(b"finally")
    );
    assert!(
        started.elapsed() < SLOW + PROMPT,
        "answered after {:?}",
        started.elapsed()
    );
    // The cached reply answers the redelivery within a round trip or two.
    sleep::<R>(Duration::from_secs(1)).await;
    expect_fib(call(&client, queue.name(), "10", CALL_TIMEOUT).await, 10);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert!(
        server.times_ready_again() <= 1,
        "the consuming channel closed once at most"
    );
    client.close().await;
    let report = server.stop::<R>().await;
    let stats = report.stats;
    assert_eq!(stats.dropped_too_many_deliveries, 0, "{stats:?}");
    // The broker did close the channel under the handler: else the test proves nothing.
    assert_eq!(stats.stale_replies, 1, "{stats:?}");
    assert_eq!(stats.reply_cache_hits, 1, "{stats:?}");
    let status = node.queue_status(queue.name()).expect("queue status");
    assert_eq!(
        status.map(|s| s.messages),
        Some(0),
        "nothing left: {stats:?}"
    );
}
