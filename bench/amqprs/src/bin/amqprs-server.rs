//! RabbitMQ tutorial 6's Fibonacci server on amqprs 2.x, for the side-by-side bench:
//! `amqprs-server [--queue Q] [--prefetch N] [--workers N] [--multiple-ack] [--current-thread]
//! [--echo]`. `--echo` replies with each request's body instead of fib(n) (for
//! `amqprs-bench --payload`).
//!
//! As ours: a non-durable classic request queue, `basic.qos(prefetch)`, manual acks, each
//! request's reply published to the default exchange with the request's `correlation_id`, the
//! request acked after its reply was handed to the connection, at most `workers` handlers at
//! once. Unlike ours: no deadline check (`expiration`, `x-rpc-deadline`), no error replies, no
//! drain on shutdown.
//!
//! `--multiple-ack` acks with `multiple=true`: a single acker task acks, per batch of finished
//! requests it finds waiting, the highest delivery tag below which every request has finished
//! (AMQP 0-9-1 §1.8.3.13 basic.ack, "multiple"), so no request is acked before its reply.
use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    QueueDeclareArguments,
};
use amqprs::connection::Connection;
use amqprs::BasicProperties;
use amqprs_comparison::{fib, process_cpu_time, runtime, Args};
use tokio::sync::{mpsc, Semaphore};

fn main() -> ExitCode {
    let args = match Args::parse(&["multiple-ack", "current-thread", "echo"]).and_then(|a| {
        a.check(&[
            "queue",
            "prefetch",
            "workers",
            "multiple-ack",
            "current-thread",
            "echo",
            "host",
            "port",
        ])?;
        Ok(a)
    }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("amqprs-server: {e}");
            return ExitCode::from(2);
        }
    };
    runtime(args.has("current-thread")).block_on(serve(args))
}

async fn serve(args: Args) -> ExitCode {
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("amqprs-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), String> {
    let queue = args.value("queue").unwrap_or("rpc_queue").to_owned();
    let workers: usize = args.number("workers", 1usize)?.max(1);
    let prefetch: u16 = args.number("prefetch", u16::try_from(workers).unwrap_or(u16::MAX))?;
    let connection = Connection::open(&args.connection("amqprs-server")?)
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection
        .open_channel(None)
        .await
        .map_err(|e| e.to_string())?;
    channel
        .queue_declare(QueueDeclareArguments::new(&queue))
        .await
        .map_err(|e| e.to_string())?;
    channel
        .basic_qos(BasicQosArguments::new(0, prefetch, false))
        .await
        .map_err(|e| e.to_string())?;
    let (_tag, mut deliveries) = channel
        .basic_consume_rx(
            BasicConsumeArguments::new(&queue, "")
                .manual_ack(true)
                .finish(),
        )
        .await
        .map_err(|e| e.to_string())?;
    println!(" [x] Awaiting RPC requests");

    let acks = Arc::new(AtomicU64::new(0));
    let acker = args.has("multiple-ack").then(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(ack_batches(channel.clone(), rx, acks.clone()));
        tx
    });
    let slots = Arc::new(Semaphore::new(workers));
    let handled = Arc::new(AtomicU64::new(0));
    let echo = args.has("echo");
    let started = std::time::Instant::now();
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            m = deliveries.recv() => m,
            () = &mut stop => None,
        };
        let Some(message) = message else { break };
        let (Some(deliver), Some(properties), Some(body)) =
            (message.deliver, message.basic_properties, message.content)
        else {
            continue;
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (channel, acker, handled, acks) = (
            channel.clone(),
            acker.clone(),
            handled.clone(),
            acks.clone(),
        );
        tokio::spawn(async move {
            let tag = deliver.delivery_tag();
            let reply = if echo {
                body
            } else {
                std::str::from_utf8(&body)
                    .ok()
                    .and_then(|t| t.trim().parse::<u32>().ok())
                    .and_then(fib)
                    .map_or_else(
                        || "error: expected a number from 0 to 186".to_owned(),
                        |v| v.to_string(),
                    )
                    .into_bytes()
            };
            if let Some(reply_to) = properties.reply_to() {
                let mut reply_properties = BasicProperties::default();
                if let Some(id) = properties.correlation_id() {
                    reply_properties.with_correlation_id(id);
                }
                let _ = channel
                    .basic_publish(
                        reply_properties.finish(),
                        reply,
                        BasicPublishArguments::new("", reply_to),
                    )
                    .await;
            }
            match acker {
                Some(acker) => {
                    let _ = acker.send(tag);
                }
                None => {
                    let _ = channel.basic_ack(BasicAckArguments::new(tag, false)).await;
                    acks.fetch_add(1, Ordering::Relaxed);
                }
            }
            handled.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    let n = handled.load(Ordering::Relaxed);
    let cpu = process_cpu_time(None);
    eprintln!(
        "amqprs-server: stopped after {:.1?}: {n} replies, {} basic.ack, CPU {cpu:.2?} ({:.1} µs per request)",
        started.elapsed(),
        acks.load(Ordering::Relaxed),
        cpu.as_secs_f64() * 1e6 / n.max(1) as f64
    );
    let _ = channel.close().await;
    let _ = connection.close().await;
    Ok(())
}

/// Acks finished requests with `multiple=true`: per wake-up (after one yield, so that the
/// handlers ready to run finish first), everything that finished since the last one, up to the
/// first delivery tag still being handled.
async fn ack_batches(
    channel: Channel,
    mut finished: mpsc::UnboundedReceiver<u64>,
    acks: Arc<AtomicU64>,
) {
    // Delivery tags start at 1 on each channel (AMQP 0-9-1 §1.8.3.13).
    let mut next_unacked = 1u64;
    let mut done = BTreeSet::new();
    while let Some(tag) = finished.recv().await {
        done.insert(tag);
        // Let the other handlers that are ready finish first: their tags join this batch.
        tokio::task::yield_now().await;
        while let Ok(tag) = finished.try_recv() {
            done.insert(tag);
        }
        let before = next_unacked;
        while done.remove(&next_unacked) {
            next_unacked += 1;
        }
        if next_unacked > before {
            let _ = channel
                .basic_ack(BasicAckArguments::new(next_unacked - 1, true))
                .await;
            acks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
