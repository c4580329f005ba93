//! The server settles a request only once its reply is safe (issue 20), against the real
//! RabbitMQ, on both runtimes: a request the server drops without running never stalls a
//! prefetch-1 server. `cargo test -p e2e-tests --test server_safety`.
//!
//! Requests no client of ours would send (no `reply_to`, a deadline long past) are published
//! by [`raw_publish`], a few lines of blocking driver over the core's connection machine.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqp_rpc_cli::fib_handler;
use amqp_rpc_core::types::{AMQPValue, BasicProperties, FieldTable, ShortString};
use amqp_rpc_core::{Connection, ConnectionConfig, ConnectionError, Event};
use e2e_tests::broker::connection_pids;
use e2e_tests::broker::QueueGuard;
use e2e_tests::calls::{call, connect, expect_fib, CALL_TIMEOUT};
use e2e_tests::e2e_tests;
use e2e_tests::rt::{blocking, spawn, within, TestRuntime};
use e2e_tests::servers::{fault_server_options, server_options, TestServer};

e2e_tests! {
    prefetch_one_survives_a_request_without_reply_to,
    prefetch_one_survives_a_request_past_its_deadline,
    two_workers_at_prefetch_one_survive_a_request_without_reply_to,
    forged_direct_reply_to_harms_no_innocent_call,
    handler_past_handler_timeout_gets_a_typed_error_reply,
}

/// How long 20 calls to a healthy server may take, all told. Well below half the default
/// heartbeat (60 s), whose frames woke the server's loop and so sent the ack held back: on
/// the fault suite's 1 s heartbeat the stall lasted half a second, and no test saw it.
const TWENTY_CALLS: Duration = Duration::from_secs(10);

/// Publishes `messages` to `queue` through the default exchange on a connection of its own,
/// then closes it. Blocking; bounded by 10 s.
fn raw_publish(queue: &str, messages: &[(BasicProperties, &[u8])]) -> Result<(), String> {
    // The core never reads a clock; this driver does.
    #[allow(clippy::disallowed_methods)]
    fn now() -> Instant {
        Instant::now()
    }
    let limit = now() + Duration::from_secs(10);
    let mut stream = TcpStream::connect("127.0.0.1:5672").map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut conn = Connection::new(ConnectionConfig::default(), now());
    let mut buf = Vec::new();
    let mut read = vec![0u8; 64 * 1024];
    let mut channel = None;
    let mut published = false;
    // A channel error for a publish comes back within a round trip or two.
    let mut close_at = None;
    while now() < limit {
        if close_at.is_some_and(|at| now() >= at) {
            close_at = None;
            conn.close(now()).map_err(|e| e.to_string())?;
        }
        buf.clear();
        conn.poll_transmit(now(), &mut buf);
        stream.write_all(&buf).map_err(|e| e.to_string())?;
        if conn.is_closed() {
            return match conn.error() {
                Some(ConnectionError::ClosedByApplication) if published && close_at.is_none() => {
                    Ok(())
                }
                error => Err(format!("closed: {error:?}")),
            };
        }
        match stream.read(&mut read) {
            Ok(0) => return Err("the broker closed the socket".into()),
            Ok(n) => conn.handle_input(now(), &read[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                conn.handle_timeout(now())
            }
            Err(e) => return Err(e.to_string()),
        }
        while let Some(event) = conn.poll_event() {
            match event {
                Event::Connected => channel = Some(conn.open_channel().map_err(|e| e.to_string())?),
                Event::ChannelOpened(c) if Some(c) == channel && !published => {
                    for (properties, body) in messages {
                        conn.publish(c, "", queue, false, properties, body)
                            .map_err(|e| e.to_string())?;
                    }
                    published = true;
                    close_at = Some(now() + Duration::from_millis(200));
                }
                Event::ChannelClosed(error) => return Err(error.to_string()),
                _ => {}
            }
        }
    }
    Err("raw publish timed out".into())
}

/// The wall clock, in milliseconds since the epoch.
fn wall_ms() -> i64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// One request the server must drop without running, then 20 good calls, against a server
/// with `workers` workers at prefetch 1: all 20 are answered promptly, and the drop is counted.
async fn dropped_request_then_twenty<R: TestRuntime>(
    what: &str,
    bad: BasicProperties,
    workers: usize,
) -> amqp_rpc_driver::ServerStats {
    let queue = QueueGuard::new(what);
    let mut options = server_options(queue.name());
    options.workers = workers;
    assert_eq!(options.rpc.prefetch, 1);
    let server = TestServer::start::<R, _, _>(options, fib_handler).await;
    let client = connect::<R>(Default::default()).await;
    // Warm: the client knows the queue has a consumer.
    expect_fib(call(&client, queue.name(), "1", CALL_TIMEOUT).await, 1);
    let target = queue.name().to_owned();
    blocking(move || raw_publish(&target, &[(bad, b"5")]))
        .await
        .expect("raw publish");
    within::<R, _>(TWENTY_CALLS, "20 calls after the dropped request", async {
        for n in 0..20u32 {
            expect_fib(
                call(&client, queue.name(), n.to_string(), CALL_TIMEOUT).await,
                n,
            );
        }
    })
    .await;
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_ok, 21, "{:?}", report.stats);
    report.stats
}

/// Issue 20 item 1: a request without `reply_to` is acked in the turn that dropped it; at
/// prefetch 1 the broker then delivers the next request (before: 0 of 20 answered, forever).
async fn prefetch_one_survives_a_request_without_reply_to<R: TestRuntime>() {
    let bad = BasicProperties::default().with_correlation_id(ShortString::from("no-reply-to"));
    let stats = dropped_request_then_twenty::<R>("drop-no-reply-to", bad, 1).await;
    assert_eq!(stats.dropped_no_reply_to, 1);
}

/// The same with two workers: the prefetch window, not the workers, is what stalled.
async fn two_workers_at_prefetch_one_survive_a_request_without_reply_to<R: TestRuntime>() {
    let bad = BasicProperties::default().with_correlation_id(ShortString::from("no-reply-to"));
    let stats = dropped_request_then_twenty::<R>("drop-no-reply-to-2w", bad, 2).await;
    assert_eq!(stats.dropped_no_reply_to, 1);
}

/// The same for a request whose `x-rpc-deadline` passed a minute ago.
async fn prefetch_one_survives_a_request_past_its_deadline<R: TestRuntime>() {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(amqp_rpc_core::rpc::DEADLINE_HEADER),
        AMQPValue::LongLongInt(wall_ms() - 60_000),
    );
    // A queue that does not exist: nothing is ever published to it.
    let bad = BasicProperties::default()
        .with_reply_to(ShortString::from("drop-expired-nowhere"))
        .with_correlation_id(ShortString::from("expired"))
        .with_headers(headers);
    let stats = dropped_request_then_twenty::<R>("drop-expired", bad, 1).await;
    assert_eq!(stats.dropped_expired, 1);
}

/// Issue 20 item 2: requests whose `reply_to` is a forged direct reply-to name among 64 good
/// calls in flight. RabbitMQ 3.10.8 closes the connection of whoever publishes to such a name
/// (541 INTERNAL_ERROR, measured: `amq.rabbitmq.reply-to.x.y`); before, that was the server's,
/// every request in flight went back to the queue and innocent callers timed out. The server
/// drops them unanswered (counted), keeps its connection, and every good call is answered.
async fn forged_direct_reply_to_harms_no_innocent_call<R: TestRuntime>() {
    let queue = QueueGuard::new("forged-reply-to");
    let name = format!("{}-server", queue.name());
    let options = fault_server_options(&e2e_tests::broker::uri(), queue.name(), &name, 16);
    let mut server = TestServer::start::<R, _, _>(options, fib_handler).await;
    let pids = connection_pids(&name).expect("rabbitmqctl");
    let client = connect::<R>(Default::default()).await;
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
    let forged: Vec<(BasicProperties, &[u8])> = ["x.y", "g2Q.abc", "Zm9v.bar"]
        .iter()
        .map(|suffix| {
            let properties = BasicProperties::default()
                .with_reply_to(ShortString::from(format!("amq.rabbitmq.reply-to.{suffix}")))
                .with_correlation_id(ShortString::from(format!("forged-{suffix}")));
            (properties, &b"5"[..])
        })
        .collect();
    let target = queue.name().to_owned();
    blocking(move || raw_publish(&target, &forged))
        .await
        .expect("raw publish");
    within::<R, _>(TWENTY_CALLS, "the 64 good calls", async {
        for task in good {
            let (n, result) = task.join().await;
            expect_fib(result, n);
        }
    })
    .await;
    assert_eq!(
        server.times_ready_again(),
        0,
        "the server never reconnected"
    );
    assert_eq!(connection_pids(&name).expect("rabbitmqctl"), pids);
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.dropped_bad_reply_to, 3, "{:?}", report.stats);
    assert_eq!(report.stats.replied_ok, 65);
}

/// Issue 20 item 3: `ServerConfig::handler_timeout` ends a runaway handler with the error
/// reply `handler_timeout` long before the caller's deadline, and frees its worker.
async fn handler_past_handler_timeout_gets_a_typed_error_reply<R: TestRuntime>() {
    let queue = QueueGuard::new("handler-timeout");
    let mut options = server_options(queue.name());
    options.rpc.handler_timeout = Some(Duration::from_millis(500));
    let server =
        TestServer::start::<R, _, _>(options, |request: amqp_rpc_driver::Request| async move {
            if &request.body[..] == b"runaway" {
                e2e_tests::rt::sleep::<R>(Duration::from_secs(60)).await;
            }
            fib_handler(request).await
        })
        .await;
    let client = connect::<R>(Default::default()).await;
    let started = Instant::now();
    let result = call(&client, queue.name(), "runaway", Duration::from_secs(30)).await;
    match result {
        Err(amqp_rpc_driver::CallError::Rpc(amqp_rpc_driver::RpcError::Remote {
            ref code,
            ..
        })) => assert_eq!(code, "handler_timeout"),
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    expect_fib(call(&client, queue.name(), "10", CALL_TIMEOUT).await, 10);
    client.close().await;
    let report = server.stop::<R>().await;
    assert_eq!(report.stats.replied_error, 1);
}
