//! The bench client on amqprs 2.x, for the side-by-side table of scripts/bench.sh:
//! `amqprs-bench [--queue Q] [--calls N] [--concurrency C] [--reply-mode exclusive|direct]
//! [--n 30] [--server-pid PID] [--json] [--timeout SECS] [--mandatory] [--expiration]
//! [--deadline-header] [--like-ours] [--current-thread] [--payload BYTES] [--connections N]`.
//!
//! `--payload BYTES`: each call sends BYTES of body (the pattern ours sends: byte i is i mod
//! 251) and expects them back from `amqprs-server --echo`; `--connections N` spreads the C
//! tasks over N connections (task i on connection i mod N), each with its own reply path.
//!
//! It measures what our `bench` measures and prints the same JSON line (same fields). Calls:
//! C tasks, each calling in a loop until N calls were started; a call publishes fib(n)'s
//! request to the default exchange with `reply_to` and a `correlation_id`, and waits for the
//! reply with that id.
//!
//! As ours: an exclusive server-named reply queue consumed with `no_ack` (requests published
//! on a channel of their own) or direct reply-to (`amq.rabbitmq.reply-to`, consumed and
//! published on one channel, as RabbitMQ requires). With `--like-ours` (or each switch alone)
//! every request also carries what ours sends per request: `mandatory` (a returned request
//! ends its call at once), a per-message `expiration` (the call's remaining budget in ms) and
//! the `x-rpc-deadline` header (the caller's absolute deadline, Unix ms).
//!
//! Unlike ours: correlation ids are `<counter>` (ours: a keyed MAC, 0.23 µs more per call);
//! no reconnects, no cancellation, no consumer-count check before a call, no passive exchange
//! check.
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, Channel, ConsumerMessage, QueueDeclareArguments,
};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use amqprs_comparison::{fib, process_cpu_time, resident_kib, runtime, Args};
use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

/// Where each call in flight waits: correlation id -> the caller's reply slot (`None`: the
/// broker returned the request as unroutable).
type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Option<Vec<u8>>>>>>;

/// What each request carries besides `reply_to` and `correlation_id`.
#[derive(Clone, Copy)]
struct PerRequest {
    mandatory: bool,
    expiration: bool,
    deadline_header: bool,
}

const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

fn main() -> ExitCode {
    let switches = [
        "json",
        "mandatory",
        "expiration",
        "deadline-header",
        "like-ours",
        "current-thread",
    ];
    let args = match Args::parse(&switches).and_then(|a| {
        let mut known = vec![
            "queue",
            "calls",
            "concurrency",
            "reply-mode",
            "n",
            "server-pid",
            "timeout",
            "host",
            "port",
            "payload",
            "connections",
        ];
        known.extend(switches);
        a.check(&known)?;
        Ok(a)
    }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("amqprs-bench: {e}");
            return ExitCode::from(2);
        }
    };
    runtime(args.has("current-thread")).block_on(async move {
        match bench(&args).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("amqprs-bench: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn bench(args: &Args) -> Result<ExitCode, String> {
    let queue = args.value("queue").unwrap_or("rpc_queue").to_owned();
    let calls: u64 = args.number("calls", 20_000)?;
    let concurrency: u64 = args.number("concurrency", 64u64)?.max(1);
    let n: u32 = args.number("n", 30)?;
    let server_pid: Option<u32> = args
        .value("server-pid")
        .map(|p| p.parse().map_err(|_| "--server-pid: not a pid".to_owned()))
        .transpose()?;
    let timeout = Duration::from_secs_f64(args.number("timeout", 30.0f64)?);
    let direct = match args.value("reply-mode").unwrap_or("exclusive") {
        "exclusive" => false,
        "direct" => true,
        other => return Err(format!("--reply-mode: exclusive or direct, not {other}")),
    };
    let all = args.has("like-ours");
    let per_request = PerRequest {
        mandatory: all || args.has("mandatory"),
        expiration: all || args.has("expiration"),
        deadline_header: all || args.has("deadline-header"),
    };

    let payload: Option<usize> = args
        .value("payload")
        .map(|p| p.parse().map_err(|_| "--payload: not a number".to_owned()))
        .transpose()?;
    let connections: usize = args.number("connections", 1usize)?.max(1);
    let (expected, body) = match payload {
        Some(len) => {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            (Some(body.clone()), body)
        }
        None => (
            fib(n).map(|v| v.to_string().into_bytes()),
            n.to_string().into_bytes(),
        ),
    };
    let next_id = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    let mut open = Vec::new();
    for _ in 0..connections {
        let (connection, reply_channel, caller) =
            connect(args, &queue, direct, per_request, timeout, next_id.clone()).await?;
        // Warm up: the first call also proves the server is there.
        if caller.call(body.clone()).await != expected {
            return Err("warm-up call failed".into());
        }
        // Dropping a channel closes it: the reply channel lives as long as its connection.
        open.push((connection, reply_channel));
        callers.push(caller);
    }
    let idle_memory = resident_kib();
    let reply_bytes = Arc::new(AtomicU64::new(0));

    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let cpu_start = process_cpu_time(None);
    let server_cpu_start = server_pid.map(|p| process_cpu_time(Some(p)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let caller = callers[usize::try_from(task).unwrap_or(0) % callers.len()].clone();
        let (next, errors, body, expected, reply_bytes) = (
            next.clone(),
            errors.clone(),
            body.clone(),
            expected.clone(),
            reply_bytes.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let t = Instant::now();
                let reply = caller.call(body.clone()).await;
                if let Some(r) = &reply {
                    reply_bytes.fetch_add(r.len() as u64, Ordering::Relaxed);
                }
                if reply.is_none() || reply != expected {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(usize::try_from(calls).unwrap_or(0));
    for task in tasks {
        latencies.extend(task.await.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu_time(None).saturating_sub(cpu_start);
    let server_cpu = server_pid
        .zip(server_cpu_start)
        .map(|(p, s)| process_cpu_time(Some(p)).saturating_sub(s));
    let after_memory = resident_kib();
    for (connection, _reply_channel) in open {
        let _ = connection.close().await;
    }
    let mb_per_sec = |bytes: f64| bytes / 1e6 / elapsed.as_secs_f64();
    let request_mb = mb_per_sec(body.len() as f64 * latencies.len() as f64);
    let reply_mb = mb_per_sec(reply_bytes.load(Ordering::Relaxed) as f64);
    let curve = format!(
        ",\"payload_bytes\":{},\"connections\":{connections},\"request_mb_per_sec\":{request_mb:.2},\"reply_mb_per_sec\":{reply_mb:.2},\"rss_idle_kib\":{},\"rss_peak_kib\":{}",
        body.len(),
        idle_memory.now_kib,
        after_memory.peak_kib
    );
    report(
        args,
        latencies,
        elapsed,
        cpu,
        server_cpu,
        errors.load(Ordering::Relaxed),
        direct,
        &curve,
    )
}

/// Prints the figures (the JSON line with `--json`) and the exit code they make.
#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    mut latencies: Vec<u32>,
    elapsed: Duration,
    cpu: Duration,
    server_cpu: Option<Duration>,
    errors: u64,
    direct: bool,
    curve: &str,
) -> Result<ExitCode, String> {
    latencies.sort_unstable();
    let pct = |p: f64| -> u32 {
        if latencies.is_empty() {
            return 0;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i.min(latencies.len() - 1)]
    };
    let concurrency: u64 = args.number("concurrency", 64u64)?.max(1);
    let done = latencies.len() as f64;
    let rate = done / elapsed.as_secs_f64();
    let cpu_per_call = cpu.as_secs_f64() * 1e6 / done.max(1.0);
    let server = server_cpu.map_or("null".to_owned(), |c| {
        format!("{:.1}", c.as_secs_f64() * 1e6 / done.max(1.0))
    });
    let mode = if direct { "direct" } else { "exclusive" };
    if args.has("json") {
        println!(
            "{{\"calls\":{},\"concurrency\":{concurrency},\"reply_mode\":\"{mode}\",\"calls_per_sec\":{rate:.0},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"errors\":{errors},\"client_cpu_us_per_call\":{cpu_per_call:.1},\"server_cpu_us_per_call\":{server}{curve}}}",
            latencies.len(),
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    } else {
        println!("calls        {}", latencies.len());
        println!("concurrency  {concurrency}");
        println!("reply mode   {mode}");
        println!("calls/s      {rate:.0}");
        println!("p50          {} µs", pct(0.5));
        println!("p99          {} µs", pct(0.99));
        println!("errors       {errors}");
        println!("client CPU   {cpu_per_call:.1} µs/call");
        println!("server CPU   {server} µs/call");
        println!("figures      {curve}");
    }
    Ok(if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Opens one connection with its reply path and publishing channel: a caller on it, and the
/// reply channel to keep open.
async fn connect(
    args: &Args,
    queue: &str,
    direct: bool,
    per_request: PerRequest,
    timeout: Duration,
    next_id: Arc<AtomicU64>,
) -> Result<(Connection, Channel, Caller), String> {
    let connection = Connection::open(&args.connection("amqprs-bench")?)
        .await
        .map_err(|e| e.to_string())?;
    let pending: Pending = Arc::default();
    let reply_channel = connection
        .open_channel(None)
        .await
        .map_err(|e| e.to_string())?;
    let (reply_to, publish_channel) = if direct {
        (DIRECT_REPLY_TO.to_owned(), reply_channel.clone())
    } else {
        let (name, ..) = reply_channel
            .queue_declare(QueueDeclareArguments::exclusive_server_named())
            .await
            .map_err(|e| e.to_string())?
            .ok_or("queue.declare-ok missing")?;
        let publish = connection
            .open_channel(None)
            .await
            .map_err(|e| e.to_string())?;
        (name, publish)
    };
    publish_channel
        .register_callback(Returns(pending.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let (_tag, replies) = reply_channel
        .basic_consume_rx(
            BasicConsumeArguments::new(&reply_to, "")
                .auto_ack(true)
                .exclusive(!direct)
                .finish(),
        )
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(route_replies(replies, pending.clone()));
    let caller = Caller {
        channel: publish_channel,
        pending,
        queue: queue.to_owned(),
        reply_to,
        per_request,
        next_id,
        timeout,
    };
    Ok((connection, reply_channel, caller))
}

/// What one call needs; cloned into each calling task.
#[derive(Clone)]
struct Caller {
    channel: Channel,
    pending: Pending,
    queue: String,
    reply_to: String,
    per_request: PerRequest,
    next_id: Arc<AtomicU64>,
    timeout: Duration,
}

impl Caller {
    /// One call: the reply's body, `None` when it was returned, lost or late.
    async fn call(&self, body: Vec<u8>) -> Option<Vec<u8>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().ok()?.insert(id.clone(), tx);
        let mut properties = BasicProperties::default();
        properties
            .with_correlation_id(&id)
            .with_reply_to(&self.reply_to);
        if self.per_request.expiration {
            properties.with_expiration(&self.timeout.as_millis().to_string());
        }
        if self.per_request.deadline_header {
            let deadline = SystemTime::now()
                .checked_add(self.timeout)
                .and_then(|d| d.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let mut headers = FieldTable::new();
            headers.insert("x-rpc-deadline".try_into().ok()?, FieldValue::l(deadline));
            properties.with_headers(headers);
        }
        let publish = BasicPublishArguments::new("", &self.queue)
            .mandatory(self.per_request.mandatory)
            .finish();
        if self
            .channel
            .basic_publish(properties.finish(), body, publish)
            .await
            .is_err()
        {
            self.forget(&id);
            return None;
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(reply)) => reply,
            _ => {
                self.forget(&id);
                None
            }
        }
    }

    fn forget(&self, id: &str) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(id);
        }
    }
}

/// Hands each reply to the call waiting for its correlation id; drops the others.
async fn route_replies(mut replies: mpsc::UnboundedReceiver<ConsumerMessage>, pending: Pending) {
    while let Some(message) = replies.recv().await {
        let (Some(properties), Some(body)) = (message.basic_properties, message.content) else {
            continue;
        };
        let Some(id) = properties.correlation_id() else {
            continue;
        };
        let waiter = pending.lock().ok().and_then(|mut p| p.remove(id.as_str()));
        if let Some(waiter) = waiter {
            let _ = waiter.send(Some(body));
        }
    }
}

/// Ends a call at once when the broker returns its request (`mandatory`, no queue bound).
struct Returns(Pending);

#[async_trait]
impl ChannelCallback for Returns {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        eprintln!("amqprs-bench: channel closed by the broker: {close}");
        Ok(())
    }
    async fn cancel(
        &mut self,
        _channel: &Channel,
        _cancel: Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _channel: &Channel, _ack: Ack) {}
    async fn publish_nack(&mut self, _channel: &Channel, _nack: Nack) {}
    async fn publish_return(
        &mut self,
        _channel: &Channel,
        _ret: Return,
        properties: BasicProperties,
        _content: Vec<u8>,
    ) {
        let waiter = properties
            .correlation_id()
            .and_then(|id| self.0.lock().ok()?.remove(id.as_str()));
        if let Some(waiter) = waiter {
            let _ = waiter.send(None);
        }
    }
}
