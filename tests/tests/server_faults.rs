//! The server under hostile handlers and broker limits, against the real RabbitMQ, on both
//! runtimes: replies too large to publish, handlers that block, overrun their deadline or
//! panic, and a connection replaced while a handler runs.
//! `cargo test -p e2e-tests --test server_faults`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{
    Backoff, CallError, CallRequest, HandlerError, QueueKind, Request, RpcError, Server,
    ServerHandle, ServerReport,
};
use bytes::Bytes;
use e2e_tests::broker::{
    close_connection_named, connection_pids, declare_queue, queue_status, rabbitmqctl, QueueGuard,
};
use e2e_tests::calls::{call, connect, expect_fib, CALL_TIMEOUT};
use e2e_tests::e2e_tests;
use e2e_tests::rt::{sleep, spawn, within, TestRuntime};
use e2e_tests::servers::{fault_server_options, TestServer, READY_LIMIT, STOP_LIMIT};
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;

e2e_tests! {
    oversized_reply_gets_reply_too_large,
    blocking_handler_delays_neither_heartbeats_nor_other_requests,
    handler_past_its_deadline_is_abandoned,
    panic_in_the_handler_call_becomes_an_error_reply,
    reply_after_reconnect_reaches_the_caller,
    quorum_request_delivered_too_often_is_rejected,
}

/// "Promptly": well within this.
const PROMPT: Duration = Duration::from_secs(2);

fn remote_code(result: &Result<Bytes, CallError>) -> &str {
    match result {
        Err(CallError::Rpc(RpcError::Remote { code, .. })) => code,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

/// Case 3: a handler answers with a body above the broker's `max_message_size` (set small in the
/// server's connection settings), or with an error whose header exceeds frame_max. Each caller
/// gets the typed error reply `reply_too_large` promptly; 32 calls in flight alongside are
/// answered; the server never loses its connection; nothing is left in the queue.
async fn oversized_reply_gets_reply_too_large<R: TestRuntime>() {
    let queue = QueueGuard::new("reply-too-large");
    let name = format!("{}-server", queue.name());
    let mut options = fault_server_options(&e2e_tests::broker::uri(), queue.name(), &name, 8);
    options.connect[0].connection.max_message_size = 64 * 1024;
    let mut server = TestServer::start::<R, _, _>(options, |request: Request| async move {
        match &request.body[..] {
            b"big" => Ok(Bytes::from(vec![b'x'; 100 * 1024])),
            b"big-code" => Err(HandlerError::Failed {
                code: "c".repeat(200 * 1024),
                message: "m".into(),
            }),
            _ => fib_handler(request).await,
        }
    })
    .await;
    let pids = connection_pids(&name).expect("rabbitmqctl");
    let client = connect::<R>(Default::default()).await;
    let others: Vec<_> = (0..32u32)
        .map(|n| {
            let (client, queue) = (client.clone(), queue.name().to_owned());
            spawn::<R, _>(
                async move { (n, call(&client, &queue, n.to_string(), CALL_TIMEOUT).await) },
            )
        })
        .collect();
    for body in ["big", "big-code"] {
        let started = Instant::now();
        let result = call(&client, queue.name(), body, CALL_TIMEOUT).await;
        assert_eq!(remote_code(&result), "reply_too_large", "{body}");
        assert!(
            started.elapsed() < PROMPT,
            "{body}: {:?}",
            started.elapsed()
        );
    }
    for task in others {
        let (n, result) = task.join().await;
        expect_fib(result, n);
    }
    assert_eq!(server.times_ready_again(), 0, "the server never re-armed");
    assert_eq!(
        connection_pids(&name).expect("rabbitmqctl"),
        pids,
        "same connection"
    );
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replies_too_large, 2);
    assert_eq!(report.stats.replied_ok, 32);
    let status = queue_status(queue.name()).expect("rabbitmqctl");
    assert_eq!(status.map(|s| s.messages), Some(0), "nothing requeued");
}

/// A server on [`Server::serve_blocking`], running on `R`, with its ready signal.
struct BlockingServer {
    handle: ServerHandle,
    ready: mpsc::UnboundedReceiver<()>,
    done: oneshot::Receiver<ServerReport>,
}

impl BlockingServer {
    async fn start<R: TestRuntime>(
        options: amqp_rpc_driver::ServerOptions,
        handler: impl Fn(Request) -> Result<Bytes, HandlerError> + Send + Sync + 'static,
    ) -> Self {
        let (ready_tx, mut ready) = mpsc::unbounded();
        let server = Server::<R>::new(options).on_ready(move || {
            let _ = ready_tx.unbounded_send(());
        });
        let handle = server.handle();
        let (done_tx, done) = oneshot::channel();
        R::spawn(async move {
            let report = server
                .serve_blocking(handler)
                .await
                .expect("serve_blocking");
            let _ = done_tx.send(report);
        });
        within::<R, _>(READY_LIMIT, "blocking server ready", ready.next()).await;
        Self {
            handle,
            ready,
            done,
        }
    }

    fn times_ready_again(&mut self) -> usize {
        std::iter::from_fn(|| self.ready.try_recv().ok()).count()
    }

    async fn stop<R: TestRuntime>(self) -> ServerReport {
        self.handle.shutdown().await;
        within::<R, _>(STOP_LIMIT, "blocking server stopping", self.done)
            .await
            .expect("server task dropped")
    }
}

/// Case 8: a handler blocks its thread for 10 s. With 1 s heartbeats the broker would close a
/// connection whose heartbeats stopped for 2 s; and every other request would wait. On
/// `serve_blocking` the connection stays up (same connection, never re-armed) and other
/// requests are answered at once meanwhile.
async fn blocking_handler_delays_neither_heartbeats_nor_other_requests<R: TestRuntime>() {
    let queue = QueueGuard::new("blocking-handler");
    let name = format!("{}-server", queue.name());
    let options = fault_server_options(&e2e_tests::broker::uri(), queue.name(), &name, 4);
    let mut server = BlockingServer::start::<R>(options, |request: Request| {
        if &request.body[..] == b"block" {
            std::thread::sleep(Duration::from_secs(10));
            return Ok(Bytes::from_static(b"unblocked"));
        }
        futures_util::FutureExt::now_or_never(fib_handler(request)).expect("fib never waits")
    })
    .await;
    let pids = connection_pids(&name).expect("rabbitmqctl");
    let client = connect::<R>(Default::default()).await;
    let blocker = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(async move { call(&client, &queue, "block", Duration::from_secs(30)).await })
    };
    // Through 5 s of the block, well past two missed heartbeats, calls are answered at once.
    sleep::<R>(Duration::from_millis(300)).await;
    let until = Instant::now() + Duration::from_secs(5);
    let mut answered = 0;
    while Instant::now() < until {
        let started = Instant::now();
        expect_fib(call(&client, queue.name(), "20", CALL_TIMEOUT).await, 20);
        assert!(
            started.elapsed() < PROMPT,
            "a call took {:?}",
            started.elapsed()
        );
        answered += 1;
        sleep::<R>(Duration::from_millis(250)).await;
    }
    assert!(answered >= 10, "{answered} calls");
    assert_eq!(
        blocker.join().await.expect("the blocking call"),
        Bytes::from_static(b"unblocked")
    );
    assert_eq!(
        server.times_ready_again(),
        0,
        "the server never reconnected"
    );
    assert_eq!(
        connection_pids(&name).expect("rabbitmqctl"),
        pids,
        "same connection"
    );
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_ok, answered + 1);
}

/// Case 8: a handler still running at its request's deadline is abandoned with the error reply
/// `deadline_exceeded` and its worker is freed: with one worker, the next request runs at once
/// instead of after the stuck handler's 60 s.
async fn handler_past_its_deadline_is_abandoned<R: TestRuntime>() {
    let queue = QueueGuard::new("handler-deadline");
    let name = format!("{}-server", queue.name());
    let options = fault_server_options(&e2e_tests::broker::uri(), queue.name(), &name, 1);
    let server = TestServer::start::<R, _, _>(options, |request: Request| async move {
        if &request.body[..] == b"stuck" {
            sleep::<R>(Duration::from_secs(60)).await;
        }
        fib_handler(request).await
    })
    .await;
    let client = connect::<R>(Default::default()).await;
    let stuck = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(
            async move { call(&client, &queue, "stuck", Duration::from_millis(1500)).await },
        )
    };
    sleep::<R>(Duration::from_millis(300)).await;
    let started = Instant::now();
    expect_fib(call(&client, queue.name(), "10", CALL_TIMEOUT).await, 10);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the next request waited {:?}",
        started.elapsed()
    );
    let stuck = stuck.join().await;
    assert!(
        matches!(stuck, Err(CallError::Rpc(RpcError::TimedOut))),
        "{stuck:?}"
    );
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_error, 1, "the deadline_exceeded reply");
    assert_eq!(report.stats.replied_ok, 1);
}

/// Case 8: a handler that panics in the call that makes its future (before any future exists)
/// answers `handler_panicked`, and the server keeps serving.
async fn panic_in_the_handler_call_becomes_an_error_reply<R: TestRuntime>() {
    let queue = QueueGuard::new("handler-call-panics");
    let name = format!("{}-server", queue.name());
    let options = fault_server_options(&e2e_tests::broker::uri(), queue.name(), &name, 2);
    let mut server = TestServer::start::<R, _, _>(options, |request: Request| {
        if &request.body[..] == b"boom" {
            panic!("the handler refuses to make a future");
        }
        fib_handler(request)
    })
    .await;
    let client = connect::<R>(Default::default()).await;
    let started = Instant::now();
    let result = call(&client, queue.name(), "boom", CALL_TIMEOUT).await;
    assert_eq!(remote_code(&result), "handler_panicked");
    assert!(started.elapsed() < PROMPT);
    expect_fib(call(&client, queue.name(), "12", CALL_TIMEOUT).await, 12);
    assert_eq!(server.times_ready_again(), 0);
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_ok, 1);
}

/// How long the first run of the request in [`reply_after_reconnect_reaches_the_caller`]
/// takes, in seconds.
const FIRST_RUN: u64 = 8;

/// Case 11: the server's connection is closed (`rabbitmqctl close_connection`) while a handler
/// runs. The server reconnects; the handler then finishes and its reply, whose ack is void,
/// still goes out on the new connection: the caller hears at once, not after the redelivered copy
/// ran again (14 s), and the redelivered copy is answered from that reply, not run again.
async fn reply_after_reconnect_reaches_the_caller<R: TestRuntime>() {
    let queue = QueueGuard::new("reply-after-reconnect");
    let name = format!("{}-server", queue.name());
    let options = fault_server_options(&e2e_tests::broker::uri(), queue.name(), &name, 2);
    let runs = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&runs);
    let mut server = TestServer::start::<R, _, _>(options, move |request: Request| {
        let run = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            // The first run outlives the close (rabbitmqctl takes seconds); the redelivered
            // copy would answer only a few seconds before the caller's timeout.
            let hold = if run == 0 { FIRST_RUN } else { 14 };
            sleep::<R>(Duration::from_secs(hold)).await;
            fib_handler(request).await
        }
    })
    .await;
    let client = connect::<R>(Default::default()).await;
    let started = Instant::now();
    let pending = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(async move {
            let request = CallRequest::new(queue, "25", Duration::from_secs(20));
            client.call_with(request).await.map(|r| r.body)
        })
    };
    within::<R, _>(PROMPT, "the handler starts", async {
        while runs.load(Ordering::SeqCst) == 0 {
            sleep::<R>(Duration::from_millis(10)).await;
        }
    })
    .await;
    let node = name.clone();
    e2e_tests::rt::blocking(move || close_connection_named(&node))
        .await
        .expect("rabbitmqctl close_connection");
    assert!(
        started.elapsed() < Duration::from_secs(FIRST_RUN - 1),
        "the close came after the first run ended ({:?}): the test proves nothing",
        started.elapsed()
    );
    server.wait_ready_again::<R>(READY_LIMIT).await;
    let reply = within::<R, _>(Duration::from_secs(25), "the call ends", pending.join()).await;
    expect_fib(reply, 25);
    assert!(
        started.elapsed() < Duration::from_secs(FIRST_RUN + 3),
        "answered after {:?}",
        started.elapsed()
    );
    // The redelivered copy reached this server while the first run went on: it waits for that
    // run's reply and is answered from it (the reply cache), so the handler ran once.
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the redelivery was answered from the first run's reply"
    );
    client.close().await;
    let report = server.stop::<R>().await;
    assert!(report.stats.stale_replies >= 1, "{:?}", report.stats);
}

/// Case 3: a request that keeps killing the servers that take it. On a quorum queue the broker
/// counts its deliveries (`x-delivery-count`): two servers in turn lose their connection while
/// running it (fresh processes, so only the broker's count can tell), and the third server, with
/// `max_deliveries` 2, rejects the third delivery without requeue instead of running it again.
async fn quorum_request_delivered_too_often_is_rejected<R: TestRuntime>() {
    let queue = QueueGuard::new("poison-quorum");
    declare_queue(queue.name(), QueueKind::Quorum).expect("declare the quorum queue");
    let runs = Arc::new(AtomicUsize::new(0));
    let start = |attempt: usize| {
        let name = format!("{}-server-{attempt}", queue.name());
        let mut options = fault_server_options(&e2e_tests::broker::uri(), queue.name(), &name, 1);
        options.rpc.max_deliveries = 2;
        options.backoff = Backoff::never();
        let seen = Arc::clone(&runs);
        let server = TestServer::start::<R, _, _>(options, move |request: Request| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move {
                sleep::<R>(Duration::from_secs(60)).await;
                fib_handler(request).await
            }
        });
        (name, server)
    };
    // The first server is up before the call: the client fails fast without one.
    let (name, first) = start(1);
    let mut server = Some((name, first.await));
    let client = connect::<R>(Default::default()).await;
    let pending = {
        let (client, queue) = (client.clone(), queue.name().to_owned());
        spawn::<R, _>(async move {
            let request = CallRequest::new(queue, "5", Duration::from_secs(60));
            client.call_with(request).await.map(|r| r.body)
        })
    };
    for attempt in 1..=2 {
        let (name, running) = match server.take() {
            Some(s) => s,
            None => {
                let (name, s) = start(attempt);
                (name, s.await)
            }
        };
        within::<R, _>(READY_LIMIT, "the handler starts", async {
            while runs.load(Ordering::SeqCst) < attempt {
                sleep::<R>(Duration::from_millis(10)).await;
            }
        })
        .await;
        e2e_tests::rt::blocking(move || close_connection_named(&name))
            .await
            .expect("rabbitmqctl close_connection");
        // No reconnect: the server is gone, and the broker requeues the request.
        let _ = running.wait_stopped::<R>(STOP_LIMIT).await;
    }
    let (_, third) = start(3);
    let third = third.await;
    // Ready and unacknowledged messages both count: 0 once the third server settled it.
    let name = queue.name().to_owned();
    within::<R, _>(
        Duration::from_secs(30),
        "the third server settles it",
        async {
            loop {
                let name = name.clone();
                let left = e2e_tests::rt::blocking(move || {
                    let listing = rabbitmqctl(&[
                        "-q",
                        "list_queues",
                        "--no-table-headers",
                        "name",
                        "messages",
                    ])
                    .ok()?;
                    listing
                        .lines()
                        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                })
                .await;
                if left == Some(0) {
                    break;
                }
                sleep::<R>(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    let report = third.stop::<R>().await;
    assert_eq!(
        report.stats.dropped_too_many_deliveries, 1,
        "{:?}",
        report.stats
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2, "never run a third time");
    assert_eq!(
        queue_status(queue.name())
            .expect("rabbitmqctl")
            .map(|s| s.messages),
        Some(0)
    );
    client.close().await;
    let ended = within::<R, _>(PROMPT, "the call ends at close", pending.join()).await;
    assert!(ended.is_err(), "{ended:?}");
}
