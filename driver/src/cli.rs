//! The `server`, `client` and `bench` programs, written once for every runtime: each transport's
//! `src/bin/*.rs` calls these with its runtime.

use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rpc_core::rpc::{CallRequest, HandlerError, QueueKind, ReplyMode};
use bytes::Bytes;
use futures_channel::oneshot;

use crate::client::{CallError, Client, ClientOptions};
use crate::options::DEFAULT_URI;
use crate::server::{Request, Server, ServerOptions};
use crate::{RpcError, Runtime};

/// How long the `server` program lets a graceful shutdown take before it exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The largest n whose Fibonacci number fits in a u128 (fib(186) ≈ 3.3 × 10^38).
pub const FIB_MAX: u32 = 186;

/// fib(n), iteratively in u128; `None` for n above 186, the largest n whose result fits.
pub fn fib(n: u32) -> Option<u128> {
    if n > FIB_MAX {
        return None;
    }
    let (mut a, mut b) = (0u128, 1u128);
    for _ in 0..n {
        // For n = 186 the last step computes fib(187), which overflows u128; it is never
        // returned (only `a` is), so saturating is enough to avoid the overflow.
        let next = a.saturating_add(b);
        a = b;
        b = next;
    }
    Some(a)
}

/// The Fibonacci service: the body is a decimal `n` (surrounding whitespace allowed) with
/// 0 ≤ n ≤ 186; the reply is fib(n) in decimal. Anything else is refused with an
/// `invalid_request` error reply.
pub async fn fib_handler(request: Request) -> Result<Bytes, HandlerError> {
    let invalid = |message: String| HandlerError::Rejected {
        code: "invalid_request".into(),
        message,
    };
    // A number up to 186 needs 3 digits; anything long is refused without being parsed or
    // quoted back in full.
    if request.body.len() > 64 {
        return Err(invalid(format!(
            "expected a number from 0 to {FIB_MAX}, got {} bytes",
            request.body.len()
        )));
    }
    let text = std::str::from_utf8(&request.body)
        .map_err(|_| invalid("request is not UTF-8".into()))?
        .trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(format!(
            "expected a number from 0 to {FIB_MAX}, got {text:?}"
        )));
    }
    let n: u32 = text
        .parse()
        .map_err(|_| invalid(format!("{text} is out of range 0..={FIB_MAX}")))?;
    match fib(n) {
        Some(value) => Ok(Bytes::from(value.to_string())),
        None => Err(invalid(format!("{n} is out of range 0..={FIB_MAX}"))),
    }
}

/// Command-line flags: `--name value` pairs and positional arguments.
struct Args {
    flags: Vec<(String, Option<String>)>,
    positional: Vec<String>,
}

impl Args {
    fn parse(boolean: &[&str]) -> Self {
        let mut flags = Vec::new();
        let mut positional = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            if arg == "--" {
                positional.extend(it.by_ref());
                break;
            }
            if let Some(name) = arg.strip_prefix("--") {
                if let Some((k, v)) = name.split_once('=') {
                    flags.push((k.to_owned(), Some(v.to_owned())));
                } else if boolean.contains(&name) {
                    flags.push((name.to_owned(), None));
                } else {
                    flags.push((name.to_owned(), it.next()));
                }
            } else {
                positional.push(arg);
            }
        }
        Self { flags, positional }
    }

    fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(k, _)| k == name)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: not a number: {v}")),
        }
    }

    /// Every `--uri` (each may be a comma-separated list of a cluster's nodes), else `AMQP_URL`
    /// (one URI or a list), else [`DEFAULT_URI`].
    fn uris(&self) -> Vec<String> {
        let given: Vec<String> = self
            .flags
            .iter()
            .filter(|(k, _)| k == "uri")
            .filter_map(|(_, v)| v.clone())
            .collect();
        if !given.is_empty() {
            return given;
        }
        vec![std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_URI.to_owned())]
    }

    fn unknown(&self, known: &[&str]) -> Option<String> {
        self.flags
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
            .map(|(k, _)| format!("unknown flag --{k}"))
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// CPU time (user + system) this process has used, from /proc (Linux); zero elsewhere.
pub fn process_cpu_time(pid: Option<u32>) -> Duration {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let Ok(stat) = std::fs::read_to_string(path) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // Linux reports them in USER_HZ, 100 on every architecture we build for.
    Duration::from_millis(ticks * 10)
}

/// `server [--uri U]... [--queue Q] [--prefetch N] [--workers N] [--quorum]`: the Fibonacci
/// service. `--uri` may be repeated or take a comma-separated list (the nodes of a cluster).
///
/// The server uses the request queue it finds, of either type; when it is missing, it declares
/// it classic by default: on a single broker a quorum queue replicates nothing and still writes
/// every request to disk, and older versions of the tutorial declare it classic too. `--quorum`
/// declares it durable with `x-queue-type: quorum`, as newer versions of the tutorial do:
/// replicated on a majority of a cluster's nodes, what servers on several nodes should share,
/// so that the queue and the requests in it survive the loss of a node.
///
/// Stops gracefully when `shutdown` resolves (Ctrl-C or SIGTERM).
pub async fn server_main<R: Runtime>(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ExitCode {
    init_logging();
    let args = Args::parse(&["quorum"]);
    if let Some(e) = args.unknown(&["uri", "queue", "prefetch", "workers", "quorum"]) {
        eprintln!("server: {e}\nusage: server [--uri U]... [--queue Q] [--prefetch N] [--workers N] [--quorum]");
        return ExitCode::from(2);
    }
    let parsed = (|| -> Result<ServerOptions, String> {
        let mut options =
            ServerOptions::from_uris(args.uris(), args.value("queue").unwrap_or("rpc_queue"))
                .map_err(|e| e.to_string())?;
        options.workers = args.number("workers", 1usize)?.max(1);
        let default_prefetch = u16::try_from(options.workers).unwrap_or(u16::MAX);
        options.rpc.prefetch = args.number("prefetch", default_prefetch)?.max(1);
        options.rpc.declare_as = if args.has("quorum") {
            QueueKind::Quorum
        } else {
            QueueKind::Classic
        };
        Ok(options)
    })();
    let options = match parsed {
        Ok(o) => o,
        Err(e) => {
            eprintln!("server: {e}");
            return ExitCode::from(2);
        }
    };
    let server = Server::<R>::new(options).on_ready(|| {
        println!(" [x] Awaiting RPC requests");
    });
    let handle = server.handle();
    R::spawn(async move {
        shutdown.await;
        eprintln!("server: shutting down (cancel, drain, close)");
        handle.shutdown().await;
        // A handler that never finishes must not keep the process alive forever.
        R::sleep_until(Instant::now() + SHUTDOWN_GRACE).await;
        eprintln!("server: requests still running after {SHUTDOWN_GRACE:?}; exiting anyway");
        std::process::exit(1);
    });
    let started = Instant::now();
    match server.serve(fib_handler).await {
        Ok(report) => {
            let s = report.stats;
            let handled = s.replied_ok + s.replied_error;
            let cpu = process_cpu_time(None);
            let per_call = if handled > 0 {
                cpu.as_secs_f64() * 1e6 / handled as f64
            } else {
                0.0
            };
            eprintln!(
                "server: stopped after {:.1?}: {} replies ({} errors), {} dropped, CPU {:.2?} ({per_call:.1} µs per request)",
                started.elapsed(),
                handled,
                s.replied_error,
                s.dropped_expired + s.dropped_no_reply_to,
                cpu
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `client N [--uri U]... [--queue Q] [--timeout SECS]`: asks the server for fib(N), as the
/// tutorial's client does. Exits 1 with one line on stderr when the call fails.
pub async fn client_main<R: Runtime>() -> ExitCode {
    init_logging();
    let args = Args::parse(&[]);
    if let Some(e) = args.unknown(&["uri", "queue", "timeout"]) {
        eprintln!("client: {e}\nusage: client N [--uri U]... [--queue Q] [--timeout SECS]");
        return ExitCode::from(2);
    }
    let n = args
        .positional
        .first()
        .cloned()
        .unwrap_or_else(|| "30".to_owned());
    let timeout = match args
        .number("timeout", 10.0f64)
        .and_then(|t| seconds("timeout", t))
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("client: {e}");
            return ExitCode::from(2);
        }
    };
    let queue = args.value("queue").unwrap_or("rpc_queue").to_owned();
    let mut options = match ClientOptions::from_uris(args.uris()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("client: {e}");
            return ExitCode::from(2);
        }
    };
    for address in options.connect.iter_mut() {
        address.connect_timeout = address.connect_timeout.min(timeout);
        address.connection.handshake_timeout = address.connect_timeout;
    }
    let client = match Client::<R>::connect_with(options).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("client: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(" [x] Requesting fib({n})");
    let result = client
        .call_with(CallRequest::new(queue.clone(), n.clone(), timeout))
        .await;
    client.close().await;
    match result {
        Ok(reply) => {
            println!(" [.] Got {}", String::from_utf8_lossy(&reply.body));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let line = match &e {
                CallError::Rpc(RpcError::NotRouted) => {
                    format!("no queue named {queue:?}: is the server running?")
                }
                CallError::Rpc(RpcError::NoServers) => format!("no server is consuming {queue:?}"),
                CallError::Rpc(RpcError::TimedOut) => format!("no reply within {timeout:?}"),
                CallError::Rpc(RpcError::Rejected { message, .. }) => {
                    format!("server refused the request: {message}")
                }
                CallError::Rpc(RpcError::Remote { code, message }) => {
                    format!("server error ({code}): {message}")
                }
                other => other.to_string(),
            };
            eprintln!("client: {line}");
            ExitCode::FAILURE
        }
    }
}

/// `bench [--uri U]... [--queue Q] [--calls N] [--concurrency C] [--reply-mode exclusive|direct]
/// [--n 30] [--server-pid PID] [--json]`: measures calls/s and latency against whatever server
/// consumes the queue.
pub async fn bench_main<R: Runtime>() -> ExitCode {
    init_logging();
    let args = Args::parse(&["json"]);
    if let Some(e) = args.unknown(&[
        "uri",
        "queue",
        "calls",
        "concurrency",
        "reply-mode",
        "n",
        "server-pid",
        "json",
        "timeout",
    ]) {
        eprintln!("bench: {e}");
        return ExitCode::from(2);
    }
    let config = (|| -> Result<_, String> {
        let calls: u64 = args.number("calls", 20_000)?;
        let concurrency: u64 = args.number("concurrency", 64)?;
        let n: u32 = args.number("n", 30)?;
        let server_pid: Option<u32> = args
            .value("server-pid")
            .map(|p| p.parse().map_err(|_| "--server-pid: not a pid".to_owned()))
            .transpose()?;
        let timeout = seconds("timeout", args.number("timeout", 30.0)?)?;
        let mode = match args.value("reply-mode").unwrap_or("exclusive") {
            "exclusive" => ReplyMode::ExclusiveQueue,
            "direct" => ReplyMode::DirectReplyTo,
            other => return Err(format!("--reply-mode: exclusive or direct, not {other}")),
        };
        Ok((calls, concurrency.max(1), n, server_pid, timeout, mode))
    })();
    let (calls, concurrency, n, server_pid, timeout, mode) = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let queue = args.value("queue").unwrap_or("rpc_queue").to_owned();
    let mut options = match ClientOptions::from_uris(args.uris()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    options.rpc.reply_mode = mode;
    let expected = fib(n).map(|v| v.to_string());
    let client = match Client::<R>::connect_with(options).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Warm up: the first call waits for the queue's consumer count.
    if let Err(e) = client
        .call_with(CallRequest::new(queue.clone(), n.to_string(), timeout))
        .await
    {
        eprintln!("bench: warm-up call failed: {e}");
        return ExitCode::FAILURE;
    }
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let cpu_start = process_cpu_time(None);
    let server_cpu_start = server_pid.map(|p| process_cpu_time(Some(p)));
    let started = Instant::now();
    let mut joins = Vec::new();
    for _ in 0..concurrency {
        let (tx, rx) = oneshot::channel::<Vec<u32>>();
        joins.push(rx);
        let (client, next, errors, queue, expected) = (
            client.clone(),
            next.clone(),
            errors.clone(),
            queue.clone(),
            expected.clone(),
        );
        let body = Bytes::from(n.to_string());
        R::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let t = Instant::now();
                let result = client
                    .call_with(CallRequest::new(queue.clone(), body.clone(), timeout))
                    .await;
                let ok = matches!((&result, &expected), (Ok(r), Some(e)) if r.body == e.as_bytes());
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            let _ = tx.send(latencies);
        });
    }
    let mut latencies = Vec::with_capacity(usize::try_from(calls).unwrap_or(0));
    for rx in joins {
        latencies.extend(rx.await.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu_time(None).saturating_sub(cpu_start);
    let server_cpu = server_pid
        .zip(server_cpu_start)
        .map(|(p, s)| process_cpu_time(Some(p)).saturating_sub(s));
    client.close().await;
    latencies.sort_unstable();
    let pct = |p: f64| -> u32 {
        if latencies.is_empty() {
            return 0;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i.min(latencies.len() - 1)]
    };
    let done = latencies.len() as f64;
    let rate = done / elapsed.as_secs_f64();
    let cpu_per_call = cpu.as_secs_f64() * 1e6 / done.max(1.0);
    let server_cpu_per_call = server_cpu.map(|c| c.as_secs_f64() * 1e6 / done.max(1.0));
    let errors = errors.load(Ordering::Relaxed);
    let mode_name = match mode {
        ReplyMode::DirectReplyTo => "direct",
        ReplyMode::ExclusiveQueue => "exclusive",
    };
    if args.has("json") {
        let server = server_cpu_per_call.map_or("null".to_owned(), |v| format!("{v:.1}"));
        println!(
            "{{\"calls\":{},\"concurrency\":{concurrency},\"reply_mode\":\"{mode_name}\",\"calls_per_sec\":{rate:.0},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"errors\":{errors},\"client_cpu_us_per_call\":{cpu_per_call:.1},\"server_cpu_us_per_call\":{server}}}",
            latencies.len(),
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    } else {
        println!("calls        {}", latencies.len());
        println!("concurrency  {concurrency}");
        println!("reply mode   {mode_name}");
        println!("calls/s      {rate:.0}");
        println!("p50          {} µs", pct(0.5));
        println!("p99          {} µs", pct(0.99));
        println!("max          {} µs", pct(1.0));
        println!("errors       {errors}");
        println!("client CPU   {cpu_per_call:.1} µs/call");
        if let Some(s) = server_cpu_per_call {
            println!("server CPU   {s:.1} µs/call");
        }
    }
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A positive, finite number of seconds that a `Duration` holds, for flag `--{flag}`.
fn seconds(flag: &str, value: f64) -> Result<Duration, String> {
    match Duration::try_from_secs_f64(value) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!(
            "--{flag}: a positive number of seconds, not {value}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_flags_refuse_what_a_duration_cannot_hold() {
        for bad in [-1.0, 0.0, f64::NAN, f64::INFINITY, -f64::INFINITY, 1e30] {
            let e = seconds("timeout", bad).expect_err("refused");
            assert!(e.contains("--timeout"), "{e}");
        }
        assert_eq!(seconds("timeout", 0.5), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn fib_values() {
        assert_eq!(fib(0), Some(0));
        assert_eq!(fib(1), Some(1));
        assert_eq!(fib(30), Some(832_040));
        assert_eq!(
            fib(186),
            Some(332_825_110_087_067_562_321_196_029_789_634_457_848)
        );
        assert_eq!(fib(187), None);
    }

    fn run(body: &[u8]) -> Result<Bytes, HandlerError> {
        let request = Request {
            body: Bytes::copy_from_slice(body),
            properties: Default::default(),
            deadline: None,
        };
        futures_util::FutureExt::now_or_never(fib_handler(request))
            .expect("fib_handler never waits")
    }

    #[test]
    fn fib_handler_accepts_numbers_and_rejects_the_rest() {
        assert_eq!(run(b"30"), Ok(Bytes::from_static(b"832040")));
        assert_eq!(run(b" 7\n"), Ok(Bytes::from_static(b"13")));
        for bad in [
            &b""[..],
            b"-1",
            b"abc",
            b"187",
            b"99999999999999999999999",
            b"3.5",
            b"\xff\xfe",
            &[b'1'; 100][..],
        ] {
            assert!(
                matches!(run(bad), Err(HandlerError::Rejected { .. })),
                "{bad:?}"
            );
        }
    }
}
