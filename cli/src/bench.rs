//! The `bench` program: calls/s and latency against whatever server consumes the queue.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rpc_driver::{CallRequest, Client, ClientOptions, ConnectError, ReplyMode, Runtime};
use clap::Parser;
use futures_channel::oneshot;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::{host_port, seconds, BrokerArgs, RuntimeArgs};
use crate::cpu::process_cpu_time;
use crate::latency::{Latencies, Percentiles, Timeline};
use crate::payload::{resident_kib, CurveFigures, Workload};
use crate::plot::{write_svg, RunLabel};

/// Measures calls/s, latency and CPU per call against the server consuming the queue.
///
/// Exits 1 when a call failed or got a wrong answer. Logs: RUST_LOG=info.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(version, args_override_self = true)]
pub struct BenchArgs {
    /// The broker and the request queue.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The runtime's threads.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Calls to make in all.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20_000,
        allow_negative_numbers = true
    )]
    pub calls: u64,
    /// Calls in flight at once (0 counts as 1).
    #[arg(
        long,
        value_name = "C",
        default_value_t = 64,
        allow_negative_numbers = true
    )]
    pub concurrency: u64,
    /// Where replies come back.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = ReplyModeArg::Exclusive)]
    pub reply_mode: ReplyModeArg,
    /// Each call asks for fib(n).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 30,
        allow_negative_numbers = true
    )]
    pub n: u32,
    /// The server's process id, to report its CPU time per call too (Linux).
    #[arg(long, value_name = "PID", allow_negative_numbers = true)]
    pub server_pid: Option<u32>,
    /// Seconds each call may take.
    #[arg(
        long,
        value_name = "SECS",
        default_value = "30",
        value_parser = seconds,
        allow_negative_numbers = true
    )]
    pub timeout: Duration,
    /// One JSON line instead of a table (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// Write the latency distribution and calls/s over time to FILE, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Serve this process's metrics (the client's) in Prometheus text format at
    /// http://HOST:PORT/metrics while the bench runs.
    #[arg(long, value_name = "HOST:PORT", value_parser = host_port)]
    pub metrics_addr: Option<SocketAddr>,
    /// Each call sends BYTES of body and expects them back: for a server started with
    /// `--echo`. Reports MB/s each way.
    #[arg(long, value_name = "BYTES", allow_negative_numbers = true)]
    pub payload: Option<usize>,
    /// Client connections the calls in flight are spread over (0 counts as 1).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub connections: usize,
    /// Publish requests without `mandatory`: a request to a queue that does not exist then
    /// ends `TimedOut` instead of `NotRouted` (to measure what the flag costs the broker).
    #[arg(long)]
    pub no_mandatory: bool,
    /// Send requests without a per-message `expiration`: a request can then wait in the queue
    /// after its caller gave up and run late (to measure what it costs the broker).
    #[arg(long)]
    pub no_expiration: bool,
    /// Send requests without the `x-rpc-deadline` header: the server then only has the
    /// `expiration` to drop requests whose caller gave up (to measure what it costs the broker).
    #[arg(long)]
    pub no_deadline_header: bool,
}

/// How often the progress bar moves.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// A bar on stderr (shown only on a terminal) for `calls` calls.
fn progress_bar(calls: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(calls), ProgressDrawTarget::stderr());
    // The template is a constant that parses; keep the default style if it ever did not.
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {pos}/{len} calls, {per_sec}, ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// `--reply-mode`: the client's [`ReplyMode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplyModeArg {
    /// An exclusive, server-named reply queue per connection.
    Exclusive,
    /// RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`).
    Direct,
}

impl From<ReplyModeArg> for ReplyMode {
    fn from(mode: ReplyModeArg) -> Self {
        match mode {
            ReplyModeArg::Exclusive => ReplyMode::ExclusiveQueue,
            ReplyModeArg::Direct => ReplyMode::DirectReplyTo,
        }
    }
}

impl ReplyModeArg {
    /// The flag's spelling, as the report prints it.
    pub fn name(self) -> &'static str {
        match self {
            ReplyModeArg::Exclusive => "exclusive",
            ReplyModeArg::Direct => "direct",
        }
    }
}

impl BenchArgs {
    /// The client's options: the broker and reply mode the flags say.
    pub fn options(&self) -> Result<ClientOptions, ConnectError> {
        let mut options = ClientOptions::from_uris(&self.broker.uris)?;
        options.rpc.reply_mode = self.reply_mode.into();
        options.rpc.mandatory = !self.no_mandatory;
        options.rpc.expiration = !self.no_expiration;
        options.rpc.deadline_header = !self.no_deadline_header;
        Ok(options)
    }

    /// The per-request settings the run used, as members to append to the `--json` object
    /// (after every other field: scripts read the earlier ones in their order).
    pub fn request_json_members(&self) -> String {
        format!(
            ",\"mandatory\":{},\"expiration\":{},\"deadline_header\":{}",
            !self.no_mandatory, !self.no_expiration, !self.no_deadline_header
        )
    }
}

/// What a run measured, as the bench prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Calls made (the warm-up call not counted).
    pub calls: u64,
    /// Calls in flight at once.
    pub concurrency: u64,
    /// Where replies came back.
    pub reply_mode: ReplyModeArg,
    /// Calls per second over the run.
    pub calls_per_sec: f64,
    /// The calls' latencies.
    pub latency: Percentiles,
    /// The mean latency, in µs.
    pub mean_us: f64,
    /// Calls that failed or got a wrong answer.
    pub errors: u64,
    /// This process's CPU time per call, in µs.
    pub client_cpu_us_per_call: f64,
    /// The server's CPU time per call, in µs, when `--server-pid` was given.
    pub server_cpu_us_per_call: Option<f64>,
    /// How long the run took.
    pub elapsed: Duration,
}

impl Report {
    /// The `--json` line. The fields up to `server_cpu_us_per_call` are the ones scripts
    /// (`scripts/bench.sh`, summaries of its output) read, in this order: new fields go after
    /// them, and none is renamed.
    pub fn json(&self) -> String {
        let p = &self.latency;
        let server = self
            .server_cpu_us_per_call
            .map_or("null".to_owned(), |v| format!("{v:.1}"));
        format!(
            "{{\"calls\":{},\"concurrency\":{},\"reply_mode\":\"{}\",\"calls_per_sec\":{:.0},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"errors\":{},\"client_cpu_us_per_call\":{:.1},\"server_cpu_us_per_call\":{server},\"p90_us\":{},\"p999_us\":{},\"mean_us\":{:.1},\"elapsed_s\":{:.3}}}",
            self.calls,
            self.concurrency,
            self.reply_mode.name(),
            self.calls_per_sec,
            p.p50,
            p.p99,
            p.max,
            self.errors,
            self.client_cpu_us_per_call,
            p.p90,
            p.p999,
            self.mean_us,
            self.elapsed.as_secs_f64(),
        )
    }

    /// The table a person reads, a line per figure.
    pub fn table(&self) -> String {
        let p = &self.latency;
        let mut out = format!(
            "calls        {}\nconcurrency  {}\nreply mode   {}\ncalls/s      {:.0}\nmean         {:.0} µs\n",
            self.calls,
            self.concurrency,
            self.reply_mode.name(),
            self.calls_per_sec,
            self.mean_us
        );
        for (name, us) in [
            ("p50", p.p50),
            ("p90", p.p90),
            ("p99", p.p99),
            ("p99.9", p.p999),
            ("max", p.max),
        ] {
            out.push_str(&format!("{name:<12} {us} µs\n"));
        }
        out.push_str(&format!("errors       {}\n", self.errors));
        out.push_str(&format!(
            "client CPU   {:.1} µs/call\n",
            self.client_cpu_us_per_call
        ));
        if let Some(s) = self.server_cpu_us_per_call {
            out.push_str(&format!("server CPU   {s:.1} µs/call\n"));
        }
        out
    }
}

/// One call as a calling task keeps it until the run ends: how long it took and when it ended
/// after the start, in µs (u32: 71 minutes, longer counts as that).
#[derive(Debug, Clone, Copy)]
struct CallSample {
    took_us: u32,
    ended_us: u32,
}

impl CallSample {
    fn new(took: Duration, ended: Duration) -> Self {
        let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        Self {
            took_us: us(took),
            ended_us: us(ended),
        }
    }
}

/// The `bench` program on runtime `R`, given its command line ([`BenchArgs`], parsed by
/// [`with_args`](crate::with_args) before the runtime exists): makes one warm-up call, then
/// `--calls` calls from `--concurrency` tasks, and prints the figures. Exit codes: 0 when every
/// call got the right answer, 1 otherwise (2 for a bad command line, from `with_args`).
pub async fn bench_main<R: Runtime>(args: BenchArgs) -> ExitCode {
    crate::logging::init();
    let options = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: --uri: {e}");
            return ExitCode::from(2);
        }
    };
    // Before the client exists, so that its first metrics reach the recorder.
    if let Some(addr) = args.metrics_addr {
        if let Err(code) = crate::prometheus::serve_or_exit_code("bench", addr) {
            return code;
        }
    }
    let (calls, n, timeout) = (args.calls, args.n, args.timeout);
    let concurrency = args.concurrency.max(1);
    let queue = args.broker.queue.clone();
    let work = Workload::new(args.payload, n);
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        let client = match Client::<R>::connect_with(options.clone()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bench: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Warm up: the first call waits for the queue's consumer count.
        if let Err(e) = client
            .call_with(CallRequest::new(queue.clone(), work.body.clone(), timeout))
            .await
        {
            eprintln!("bench: warm-up call failed: {e}");
            return ExitCode::FAILURE;
        }
        clients.push(client);
    }
    let reply_bytes = Arc::new(AtomicU64::new(0));
    let idle_memory = resident_kib();
    let next = Arc::new(AtomicU64::new(0));
    let ended = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let progress = (!args.json && std::io::stderr().is_terminal()).then(|| progress_bar(calls));
    // Without a bar, the calls share no counter for it.
    let count_ended = progress.is_some();
    let cpu_start = process_cpu_time(None);
    let server_cpu_start = args.server_pid.map(|p| process_cpu_time(Some(p)));
    let started = Instant::now();
    let mut joins = Vec::new();
    for task in 0..concurrency {
        let (tx, rx) = oneshot::channel::<Vec<CallSample>>();
        joins.push(rx);
        // Task i calls through connection i mod N.
        let client = clients[usize::try_from(task).unwrap_or(0) % clients.len()].clone();
        let (next, ended, errors, queue, work, reply_bytes) = (
            next.clone(),
            ended.clone(),
            errors.clone(),
            queue.clone(),
            work.clone(),
            reply_bytes.clone(),
        );
        let body = work.body.clone();
        R::spawn(async move {
            // 8 bytes per call, not a histogram per task: at 4096 calls in flight a histogram
            // each (~190 KiB resident) would be most of the client's memory.
            let mut samples = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let t = Instant::now();
                let result = client
                    .call_with(CallRequest::new(queue.clone(), body.clone(), timeout))
                    .await;
                if let Ok(r) = &result {
                    reply_bytes.fetch_add(r.body.len() as u64, Ordering::Relaxed);
                }
                let ok = matches!(&result, Ok(r) if work.is_right(&r.body));
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let now = Instant::now();
                samples.push(CallSample::new(now - t, now - started));
                if count_ended {
                    ended.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = tx.send(samples);
        });
    }
    if let Some(bar) = &progress {
        let (bar, ended) = (bar.clone(), ended.clone());
        R::spawn(async move {
            while !bar.is_finished() {
                bar.set_position(ended.load(Ordering::Relaxed));
                R::sleep_until(Instant::now() + PROGRESS_EVERY).await;
            }
        });
    }
    let mut samples = Vec::with_capacity(joins.len());
    for rx in joins {
        samples.push(rx.await.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    // Before the histogram exists: what the calls in flight held, not what the report needs.
    let after_memory = resident_kib();
    let mut latencies = Latencies::new();
    let mut timeline = Timeline::default();
    for sample in samples.iter().flatten() {
        latencies.record(Duration::from_micros(sample.took_us.into()));
        timeline.record(Duration::from_micros(sample.ended_us.into()));
    }
    let cpu = process_cpu_time(None).saturating_sub(cpu_start);
    let server_cpu = args
        .server_pid
        .zip(server_cpu_start)
        .map(|(p, s)| process_cpu_time(Some(p)).saturating_sub(s));
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    for client in clients {
        client.close().await;
    }
    let done = latencies.len() as f64;
    let report = Report {
        calls: latencies.len(),
        concurrency,
        reply_mode: args.reply_mode,
        calls_per_sec: done / elapsed.as_secs_f64(),
        latency: latencies.percentiles(),
        mean_us: latencies.mean(),
        errors: errors.load(Ordering::Relaxed),
        client_cpu_us_per_call: cpu.as_secs_f64() * 1e6 / done.max(1.0),
        server_cpu_us_per_call: server_cpu.map(|c| c.as_secs_f64() * 1e6 / done.max(1.0)),
        elapsed,
    };
    let mb_per_sec = |bytes: f64| bytes / 1e6 / elapsed.as_secs_f64();
    let curve = CurveFigures {
        payload_bytes: work.body.len(),
        connections: args.connections.max(1),
        request_mb_per_sec: mb_per_sec(work.body.len() as f64 * done),
        reply_mb_per_sec: mb_per_sec(reply_bytes.load(Ordering::Relaxed) as f64),
        idle: idle_memory,
        after: after_memory,
    };
    if args.json {
        // The curve's fields, then the request settings, go after the report's (scripts read
        // those in their order).
        let line = report.json();
        let object = line.strip_suffix('}').unwrap_or(&line);
        println!(
            "{object}{}{}}}",
            curve.json_members(),
            args.request_json_members()
        );
    } else {
        print!("{}", report.table());
        if args.payload.is_some() {
            println!("payload      {} bytes", curve.payload_bytes);
            println!(
                "MB/s         {:.1} out, {:.1} back",
                curve.request_mb_per_sec, curve.reply_mb_per_sec
            );
        }
        if curve.connections > 1 {
            println!("connections  {}", curve.connections);
        }
    }
    let (errors, rate, mode_name) = (report.errors, report.calls_per_sec, args.reply_mode.name());
    if let Some(path) = &args.plot {
        let label = RunLabel {
            text: format!(
                "{} calls, concurrency {concurrency}, {mode_name} replies, {rate:.0} calls/s",
                latencies.len()
            ),
            run: elapsed,
        };
        if let Err(e) = write_svg(path, &label, &latencies, &timeline) {
            eprintln!("bench: --plot {e}");
            return ExitCode::FAILURE;
        }
    }
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        BenchArgs::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
    }

    #[test]
    fn flags_as_scripts_bench_sh_gives_them() {
        let args = parse(&[
            "--queue",
            "bench-q",
            "--calls",
            "2000",
            "--concurrency",
            "64",
            "--reply-mode",
            "direct",
            "--server-pid",
            "4242",
            "--json",
            "--n",
            "20",
            "--timeout",
            "5",
            "--plot",
            "out.svg",
            "--metrics-addr",
            "127.0.0.1:9101",
            "--payload",
            "1000000",
            "--connections",
            "4",
            "--no-mandatory",
            "--no-expiration",
            "--no-deadline-header",
        ])
        .expect("parses");
        let rpc = args.options().expect("valid").rpc;
        assert_eq!(
            (rpc.mandatory, rpc.expiration, rpc.deadline_header),
            (false, false, false)
        );
        assert_eq!(
            args.request_json_members(),
            r#","mandatory":false,"expiration":false,"deadline_header":false"#
        );
        assert_eq!(args.payload, Some(1_000_000));
        assert_eq!(args.connections, 4);
        assert_eq!(args.broker.queue, "bench-q");
        assert_eq!((args.calls, args.concurrency, args.n), (2000, 64, 20));
        assert_eq!(args.server_pid, Some(4242));
        assert_eq!(args.timeout, Duration::from_secs(5));
        assert!(args.json);
        assert_eq!(args.plot, Some(PathBuf::from("out.svg")));
        assert_eq!(
            args.metrics_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 9101)))
        );
        assert_eq!(
            args.options().expect("valid").rpc.reply_mode,
            ReplyMode::DirectReplyTo
        );
    }

    fn report() -> Report {
        Report {
            calls: 20_000,
            concurrency: 64,
            reply_mode: ReplyModeArg::Direct,
            calls_per_sec: 15_210.6,
            latency: Percentiles {
                p50: 3_500,
                p90: 5_000,
                p99: 12_000,
                p999: 20_000,
                max: 25_000,
            },
            mean_us: 3_700.25,
            errors: 0,
            client_cpu_us_per_call: 10.04,
            server_cpu_us_per_call: Some(7.0),
            elapsed: Duration::from_millis(1_315),
        }
    }

    #[test]
    fn json_keeps_the_fields_scripts_read_first_and_adds_after() {
        assert_eq!(
            report().json(),
            concat!(
                r#"{"calls":20000,"concurrency":64,"reply_mode":"direct","calls_per_sec":15211,"#,
                r#""p50_us":3500,"p99_us":12000,"max_us":25000,"errors":0,"#,
                r#""client_cpu_us_per_call":10.0,"server_cpu_us_per_call":7.0,"#,
                r#""p90_us":5000,"p999_us":20000,"mean_us":3700.2,"elapsed_s":1.315}"#
            )
        );
        let without_server = Report {
            server_cpu_us_per_call: None,
            ..report()
        };
        assert!(without_server
            .json()
            .contains(r#""server_cpu_us_per_call":null,"#));
    }

    #[test]
    fn table_has_every_percentile() {
        let table = report().table();
        for line in [
            "calls/s      15211\n",
            "p50          3500 µs\n",
            "p90          5000 µs\n",
            "p99          12000 µs\n",
            "p99.9        20000 µs\n",
            "max          25000 µs\n",
            "server CPU   7.0 µs/call\n",
        ] {
            assert!(table.contains(line), "{line:?} in\n{table}");
        }
    }

    #[test]
    fn defaults() {
        let args = parse(&[]).expect("parses");
        assert_eq!((args.calls, args.concurrency, args.n), (20_000, 64, 30));
        assert_eq!(args.reply_mode, ReplyModeArg::Exclusive);
        assert_eq!(args.timeout, Duration::from_secs(30));
        assert_eq!(args.server_pid, None);
        assert!(!args.json);
        assert_eq!((args.plot.as_ref(), args.metrics_addr), (None, None));
        assert_eq!((args.payload, args.connections), (None, 1));
        let rpc = args.options().expect("valid").rpc;
        assert_eq!(
            (rpc.mandatory, rpc.expiration, rpc.deadline_header),
            (true, true, true),
            "every request guard on unless switched off"
        );
        assert_eq!(
            args.request_json_members(),
            r#","mandatory":true,"expiration":true,"deadline_header":true"#
        );
    }

    #[test]
    fn bad_flags_are_refused_by_name() {
        for (args, flag) in [
            (&["--reply-mode", "fanout"][..], "--reply-mode"),
            (&["--server-pid", "me"], "--server-pid"),
            (&["--calls", "-5"], "--calls"),
            (&["--timeout", "-1"], "--timeout"),
            (&["--n", "x"], "--n"),
            (&["--plot"], "--plot"),
            (&["--metrics-addr", "nowhere"], "--metrics-addr"),
            (&["--payload", "-1"], "--payload"),
            (&["--connections", "many"], "--connections"),
        ] {
            let e = parse(args).expect_err("refused");
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(flag), "{args:?}: {e}");
        }
    }
}
