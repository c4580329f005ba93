//! The soak: load with a fault every so often, for a bounded time, then a report.
//!
//! ```text
//! cargo run --release -p e2e-tests --bin soak -- [--minutes 5] [--fault-every 30]
//!     [--transport tokio|smol] [--node second|main] [--callers 8] [--timeout-ms 5000]
//! ```
//!
//! It runs against the second RabbitMQ node by default (`scripts/second-node.sh`; started if
//! needed and stopped at the end if it started it), because one of its faults restarts the
//! node; `--node main` uses the main broker and skips that fault. A server runs in a process
//! of its own (this binary again, with `--serve`), so it can be killed; the client runs here,
//! through a fault-injecting proxy, with `--callers` callers calling in a loop. Every
//! `--fault-every` seconds it makes the next fault of the rotation:
//!
//! 1. `rabbitmqctl close_connection` on the client;
//! 2. the same on the server;
//! 3. SIGKILL the server process, start a new one;
//! 4. a TCP reset of the client's connection (proxy);
//! 5. a network black hole for 5 s (proxy, both directions);
//! 6. `rabbitmqctl stop_app`, 3 s, `start_app` (second node only).
//!
//! The report: calls started, answered, each error class, latency (p50, p99, max), the time
//! each fault took to recover from, RSS of the client process and of the server process at
//! start and at end, and the "nothing lost" check (every call ended once, in time, with the
//! right value or an allowed error). Exits 1 when that check fails or the service did not
//! recover from a fault.

use std::io::{Read, Write};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use amqp_rpc_driver::{fib_handler, ReplyMode, Server};
use e2e_tests::broker::{unique_name, Node, QueueGuard};
use e2e_tests::faults::Proxy;
use e2e_tests::ledger::{assert_queue_drained, rss_kib, Class, Ledger, Load, LoadSpec};
use e2e_tests::node::{second_node, AppStopped};
use e2e_tests::process::ChildProcess;
use e2e_tests::proxy::FaultMode;
use e2e_tests::rt::{blocking, sleep, timeout, Smol, TestRuntime, Tokio};
use e2e_tests::servers::{fault_client_options, fault_server_options};
use e2e_tests::states::StateLog;

/// How late after its deadline a call may end.
const BUDGET: Duration = Duration::from_secs(2);
/// How long the service may take to answer again after a fault.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Args {
    minutes: f64,
    fault_every: u64,
    transport: String,
    node: String,
    callers: usize,
    timeout: Duration,
    /// `--serve QUEUE NAME URI`: be the server process.
    serve: Option<(String, String, String)>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        minutes: 5.0,
        fault_every: 30,
        transport: "tokio".into(),
        node: "second".into(),
        callers: 8,
        timeout: Duration::from_secs(5),
        serve: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => {
                let v = value()?;
                args.minutes = v
                    .parse()
                    .ok()
                    .filter(|m: &f64| *m > 0.0 && m.is_finite())
                    .ok_or(format!("--minutes {v}"))?;
            }
            "--fault-every" => {
                let v = value()?;
                args.fault_every = v
                    .parse()
                    .ok()
                    .filter(|s| *s >= 5)
                    .ok_or(format!("--fault-every {v} (at least 5 seconds)"))?;
            }
            "--transport" => args.transport = value()?,
            "--node" => args.node = value()?,
            "--callers" => {
                let v = value()?;
                args.callers = v.parse().map_err(|_| format!("--callers {v}"))?;
            }
            "--timeout-ms" => {
                let v = value()?;
                args.timeout =
                    Duration::from_millis(v.parse().map_err(|_| format!("--timeout-ms {v}"))?);
            }
            "--serve" => args.serve = Some((value()?, value()?, value()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !["tokio", "smol"].contains(&args.transport.as_str()) {
        return Err(format!("--transport tokio or smol, not {}", args.transport));
    }
    if !["second", "main"].contains(&args.node.as_str()) {
        return Err(format!("--node second or main, not {}", args.node));
    }
    Ok(args)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The server process: serves `queue` until its stdin closes.
async fn serve<R: TestRuntime>(queue: String, name: String, uri: String) -> ExitCode {
    let options = fault_server_options(&uri, &queue, &name, 8);
    let server = Server::<R>::new(options).on_ready(|| say("ready"));
    match server.serve(fib_handler).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The faults of the rotation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    CloseClient,
    CloseServer,
    KillServer,
    Reset,
    BlackHole,
    RestartNode,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::CloseClient,
        Fault::CloseServer,
        Fault::KillServer,
        Fault::Reset,
        Fault::BlackHole,
        Fault::RestartNode,
    ];

    fn describe(self) -> &'static str {
        match self {
            Fault::CloseClient => "close_connection (client)",
            Fault::CloseServer => "close_connection (server)",
            Fault::KillServer => "kill -9 the server, start a new one",
            Fault::Reset => "TCP reset (client)",
            Fault::BlackHole => "black hole 5 s (client)",
            Fault::RestartNode => "stop_app, 3 s, start_app",
        }
    }
}

struct Soak {
    args: Args,
    node: Node,
    queue: String,
    server_name: String,
    server: ChildProcess,
    server_rss_start: Option<u64>,
}

impl Soak {
    fn start_server(&self) -> ChildProcess {
        start_server(&self.args, &self.queue, &self.server_name, self.node.uri())
    }
}

fn start_server(args: &Args, queue: &str, name: &str, uri: &str) -> ChildProcess {
    let exe = std::env::current_exe().expect("the path of this program");
    let mut command = Command::new(exe);
    command.args(["--transport", &args.transport, "--serve", queue, name, uri]);
    ChildProcess::spawn("soak server", command)
}

async fn run<R: TestRuntime>(args: Args) -> ExitCode {
    let node = if args.node == "second" {
        blocking(|| second_node().clone()).await
    } else {
        Node::main()
    };
    let queue = QueueGuard::on(&node, "soak");
    let server_name = unique_name("soak-server");
    let mut server = start_server(&args, queue.name(), &server_name, node.uri());
    server
        .wait_line::<R>("ready", Duration::from_secs(30))
        .await;
    let mut soak = Soak {
        server_rss_start: None,
        args: args.clone(),
        node: node.clone(),
        queue: queue.name().to_owned(),
        server_name,
        server,
    };

    let proxy = Proxy::start_to(node.uri());
    let client_name = unique_name("soak-client");
    let options = proxy.redirect(fault_client_options(
        node.uri(),
        ReplyMode::default(),
        &client_name,
    ));
    let client = match amqp_rpc_driver::Client::<R>::connect_with(options).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("soak: cannot connect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let states = StateLog::watch(&client);
    // Counts only: its memory must not grow with the calls, or the RSS figures would say
    // nothing about the client.
    let ledger = Ledger::counting(BUDGET);
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let spec = LoadSpec {
        callers: args.callers,
        timeout: args.timeout,
        pause: Duration::from_millis(1),
        max_calls: u64::MAX,
        max_time: total + Duration::from_secs(60),
        ..LoadSpec::default()
    };
    let started = Instant::now();
    let load = Load::start(&client, queue.name(), &ledger, spec);
    // Settle: the first calls pay for connection warm-up.
    ledger
        .wait_recovered::<R>(started, 100, RECOVERY_LIMIT)
        .await;
    let client_rss_start = rss_kib(None);
    soak.server_rss_start = rss_kib(Some(soak.server.id()));
    say(&format!(
        "soak: {:.1} min on {} against {} ({}), {} callers, timeout {:?}, a fault every {} s",
        args.minutes,
        R::NAME,
        node.uri(),
        node.name().unwrap_or("main node"),
        args.callers,
        args.timeout,
        args.fault_every
    ));

    let faults: Vec<Fault> = Fault::ALL
        .into_iter()
        .filter(|f| *f != Fault::RestartNode || node.name().is_some())
        .collect();
    let mut recoveries: Vec<(Fault, Duration)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut next = 0usize;
    let mut next_fault_at = started + Duration::from_secs(args.fault_every);
    loop {
        let now = Instant::now();
        if now >= started + total {
            break;
        }
        if now < next_fault_at {
            sleep::<R>(next_fault_at.min(started + total) - now).await;
            continue;
        }
        let fault = faults[next % faults.len()];
        next += 1;
        next_fault_at += Duration::from_secs(args.fault_every);
        let at = started.elapsed();
        let result = make_fault::<R>(&mut soak, fault, &client_name, &proxy).await;
        let ended = Instant::now();
        match result {
            Err(e) => {
                failures.push(format!("fault {} failed: {e}", fault.describe()));
                say(&format!(
                    "[{:>5.1}s] {}: FAILED: {e}",
                    at.as_secs_f64(),
                    fault.describe()
                ));
            }
            Ok(()) => {
                let recovered = timeout::<R, _>(
                    RECOVERY_LIMIT,
                    ledger.wait_recovered::<R>(ended, 20, RECOVERY_LIMIT),
                )
                .await;
                match recovered {
                    Some(took) => {
                        recoveries.push((fault, took));
                        say(&format!(
                            "[{:>5.1}s] {}: service back {:.2?} after the fault ended; client \
                             RSS {:.1} MiB; so far: {}",
                            at.as_secs_f64(),
                            fault.describe(),
                            took,
                            rss_kib(None).unwrap_or(0) as f64 / 1024.0,
                            ledger.summary()
                        ));
                    }
                    None => {
                        failures.push(format!("no recovery from {}", fault.describe()));
                        say(&format!(
                            "[{:>5.1}s] {}: NO RECOVERY within {RECOVERY_LIMIT:?}",
                            at.as_secs_f64(),
                            fault.describe()
                        ));
                    }
                }
            }
        }
    }

    load.stop::<R>(BUDGET).await;
    let client_rss_end = rss_kib(None);
    let server_rss_end = rss_kib(Some(soak.server.id()));
    let elapsed = started.elapsed();
    // The check panics with the details when something was lost: report that as a failure.
    let check = {
        let ledger = ledger.clone();
        let allowed = Class::RECOVERY;
        std::panic::AssertUnwindSafe(async move {
            ledger.check::<R>(allowed, Duration::from_secs(30)).await
        })
    };
    let checked = futures_util::FutureExt::catch_unwind(check).await;
    let drained = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
        assert_queue_drained::<R>(&node, queue.name(), Duration::from_secs(30)),
    ))
    .await
    .is_ok();
    client.close().await;
    let reconnects = states
        .states()
        .iter()
        .filter(|s| {
            matches!(
                s,
                amqp_rpc_driver::ConnectionState::Reconnecting { attempt: 1 }
            )
        })
        .count();

    let summary = ledger.summary();
    let percentile = |p: f64| ledger.ok_latency_quantile(p);
    let kib =
        |v: Option<u64>| v.map_or("?".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    say("");
    say("==== soak report ====");
    say(&format!(
        "duration            {:.1?} on {} against {}",
        elapsed,
        R::NAME,
        node.name().unwrap_or("the main node")
    ));
    say(&format!("calls started       {}", summary.started));
    say(&format!("calls ok            {}", summary.count(Class::Ok)));
    for (class, count) in &summary.classes {
        if *class != Class::Ok {
            say(&format!("  {:<18}{count}", format!("{class:?}")));
        }
    }
    say(&format!(
        "calls per second    {:.0}",
        summary.started as f64 / elapsed.as_secs_f64()
    ));
    say(&format!(
        "latency (ok)        p50 ≤ {:.1?}, p99 ≤ {:.1?}; max of all calls {:.2?}",
        percentile(0.5),
        percentile(0.99),
        summary.max_latency
    ));
    say(&format!(
        "faults              {} ({} reconnects of the client)",
        recoveries.len() + failures.len(),
        reconnects
    ));
    for fault in &faults {
        let took: Vec<_> = recoveries
            .iter()
            .filter(|(f, _)| f == fault)
            .map(|(_, t)| format!("{:.2}s", t.as_secs_f64()))
            .collect();
        if !took.is_empty() {
            say(&format!(
                "  {:<36}back after {}",
                fault.describe(),
                took.join(", ")
            ));
        }
    }
    say(&format!(
        "client RSS          {} at start, {} at end",
        kib(client_rss_start),
        kib(client_rss_end)
    ));
    say(&format!(
        "server RSS          {} at start (first process), {} at end (current process)",
        kib(soak.server_rss_start),
        kib(server_rss_end)
    ));
    let lost = match &checked {
        Ok(s) => format!("none lost ({} violations)", s.violations.len()),
        Err(_) => "CALLS LOST OR MIXED UP (see above)".to_owned(),
    };
    say(&format!("nothing lost        {lost}"));
    say(&format!(
        "queue drained       {}",
        if drained { "yes" } else { "NO" }
    ));
    for failure in &failures {
        say(&format!("failure             {failure}"));
    }
    drop(soak);
    if checked.is_ok() && drained && failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn make_fault<R: TestRuntime>(
    soak: &mut Soak,
    fault: Fault,
    client_name: &str,
    proxy: &Proxy,
) -> Result<(), String> {
    match fault {
        Fault::CloseClient => {
            let (node, name) = (soak.node.clone(), client_name.to_owned());
            blocking(move || node.close_connection_named(&name)).await
        }
        Fault::CloseServer => {
            let (node, name) = (soak.node.clone(), soak.server_name.clone());
            blocking(move || node.close_connection_named(&name)).await?;
            soak.server.wait_line::<R>("ready", RECOVERY_LIMIT).await;
            Ok(())
        }
        Fault::KillServer => {
            soak.server.kill();
            soak.server = soak.start_server();
            soak.server.wait_line::<R>("ready", RECOVERY_LIMIT).await;
            Ok(())
        }
        Fault::Reset => {
            proxy.reset_all();
            Ok(())
        }
        Fault::BlackHole => {
            proxy.set_mode(FaultMode::StallBoth);
            sleep::<R>(Duration::from_secs(5)).await;
            proxy.set_mode(FaultMode::Pass);
            Ok(())
        }
        Fault::RestartNode => {
            let node = soak.node.clone();
            let stopped = blocking(move || AppStopped::stop(&node)).await?;
            sleep::<R>(Duration::from_secs(3)).await;
            blocking(move || stopped.start()).await?;
            soak.server.wait_line::<R>("ready", RECOVERY_LIMIT).await;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some((queue, name, uri)) = args.serve.clone() {
        // The server process never outlives the soak: it holds our stdin open.
        std::thread::spawn(|| {
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
        return match args.transport.as_str() {
            "smol" => Smol::block_on(serve::<Smol>(queue, name, uri)),
            _ => Tokio::block_on(serve::<Tokio>(queue, name, uri)),
        };
    }
    match args.transport.as_str() {
        "smol" => Smol::block_on(run::<Smol>(args)),
        _ => Tokio::block_on(run::<Tokio>(args)),
    }
}
