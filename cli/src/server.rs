//! The `server` program: the Fibonacci service.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use amqp_rpc_driver::{ConnectError, QueueKind, Runtime, Server, ServerOptions};
use clap::Parser;

use crate::args::{host_port, BrokerArgs, RuntimeArgs};
use crate::cpu::process_cpu_time;
use crate::fib::fib_handler;
use crate::payload::echo_handler;

/// How long the `server` program lets a graceful shutdown take before it exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The Fibonacci RPC server: answers fib(n) for the n in each request's body.
///
/// It uses the request queue it finds, of either type; when the queue is missing it declares it
/// classic, or quorum with --quorum. Stops gracefully on Ctrl-C or SIGTERM. Logs: RUST_LOG=info.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(version, args_override_self = true)]
pub struct ServerArgs {
    /// The broker and the request queue.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The runtime's threads.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Requests handled at once (0 counts as 1).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub workers: usize,
    /// Requests the broker delivers ahead of acknowledgements (basic.qos); default: --workers.
    /// 0 counts as 1.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub prefetch: Option<u16>,
    /// Declare a missing request queue durable with x-queue-type: quorum (replicated on a
    /// majority of a cluster's nodes) instead of classic.
    #[arg(long)]
    pub quorum: bool,
    /// Serve the driver's metrics in Prometheus text format at http://HOST:PORT/metrics
    /// (port 0: any free port, printed on stderr).
    #[arg(long, value_name = "HOST:PORT", value_parser = host_port)]
    pub metrics_addr: Option<SocketAddr>,
    /// Reply to each request with its own body instead of fib(n): the server for
    /// `bench --payload`.
    #[arg(long)]
    pub echo: bool,
}

impl ServerArgs {
    /// The server's options: the broker, queue, workers, prefetch and queue type the flags say.
    ///
    /// The queue is declared classic by default: on a single broker a quorum queue replicates
    /// nothing and still writes every request to disk, and older versions of the tutorial
    /// declare it classic too. `--quorum` declares it durable with `x-queue-type: quorum`, as
    /// newer versions of the tutorial do: what servers on several nodes of a cluster should
    /// share, so that the queue and the requests in it survive the loss of a node.
    pub fn options(&self) -> Result<ServerOptions, ConnectError> {
        let mut options = ServerOptions::from_uris(&self.broker.uris, &self.broker.queue)?;
        options.workers = self.workers.max(1);
        let default_prefetch = u16::try_from(options.workers).unwrap_or(u16::MAX);
        options.rpc.prefetch = self.prefetch.unwrap_or(default_prefetch).max(1);
        options.rpc.declare_as = if self.quorum {
            QueueKind::Quorum
        } else {
            QueueKind::Classic
        };
        Ok(options)
    }
}

/// The `server` program on runtime `R`, given its command line ([`ServerArgs`], parsed by
/// [`with_args`](crate::with_args) before the runtime exists): serves
/// [`fib_handler`] until `shutdown` resolves (Ctrl-C or SIGTERM), then stops gracefully and
/// prints what it did. Exit codes: 0 after a clean stop, 1 when serving failed, 2 for a bad
/// command line.
pub async fn server_main<R: Runtime>(
    args: ServerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ExitCode {
    crate::logging::init();
    let options = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("server: --uri: {e}");
            return ExitCode::from(2);
        }
    };
    // Before the server exists, so that its first metrics reach the recorder.
    if let Some(addr) = args.metrics_addr {
        if let Err(code) = crate::prometheus::serve_or_exit_code("server", addr) {
            return code;
        }
    }
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
    let served = if args.echo {
        server.serve(echo_handler).await
    } else {
        server.serve(fib_handler).await
    };
    match served {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServerArgs, clap::Error> {
        ServerArgs::try_parse_from(std::iter::once("server").chain(args.iter().copied()))
    }

    #[test]
    fn flags_set_the_options() {
        let args = parse(&[
            "--uri",
            "amqp://a:b@h1:5672/%2f",
            "--queue",
            "q",
            "--workers=8",
            "--prefetch",
            "32",
            "--quorum",
            "--echo",
        ])
        .expect("parses");
        assert!(args.echo);
        assert_eq!(args.broker.uris, ["amqp://a:b@h1:5672/%2f"]);
        let options = args.options().expect("valid");
        assert_eq!(options.workers, 8);
        assert_eq!(options.rpc.prefetch, 32);
        assert_eq!(options.rpc.declare_as, QueueKind::Quorum);
        assert_eq!(args.metrics_addr, None);
        let args = parse(&["--metrics-addr", "127.0.0.1:9100"]).expect("parses");
        assert_eq!(
            args.metrics_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 9100)))
        );
    }

    #[test]
    fn defaults_are_the_tutorials() {
        let options = parse(&["--uri", "amqp://h"])
            .expect("parses")
            .options()
            .expect("valid");
        assert_eq!(options.workers, 1);
        assert_eq!(options.rpc.prefetch, 1);
        assert_eq!(options.rpc.declare_as, QueueKind::Classic);
        // prefetch follows workers unless given; zeros count as one.
        let options = parse(&["--uri", "amqp://h", "--workers", "16"])
            .expect("parses")
            .options()
            .expect("valid");
        assert_eq!(options.rpc.prefetch, 16);
        let options = parse(&["--uri", "amqp://h", "--workers", "0", "--prefetch", "0"])
            .expect("parses")
            .options()
            .expect("valid");
        assert_eq!((options.workers, options.rpc.prefetch), (1, 1));
    }

    #[test]
    fn uri_repeats_and_the_last_of_other_flags_wins() {
        let args = parse(&[
            "--uri",
            "amqp://h1",
            "--uri",
            "amqp://h2,amqp://h3",
            "--queue",
            "a",
            "--queue",
            "b",
        ])
        .expect("parses");
        assert_eq!(args.broker.uris, ["amqp://h1", "amqp://h2,amqp://h3"]);
        assert_eq!(args.broker.queue, "b");
        assert_eq!(args.options().expect("valid").connect.len(), 3);
    }

    #[test]
    fn bad_flags_are_refused_by_name() {
        for (args, flag) in [
            (&["--workers", "many"][..], "--workers"),
            (&["--prefetch", "70000"], "--prefetch"),
            (&["--prefetch", "-1"], "--prefetch"),
            (&["--workers"], "--workers"),
            (&["--frobnicate"], "--frobnicate"),
            (&["--metrics-addr", "9100"], "--metrics-addr"),
        ] {
            let e = parse(args).expect_err("refused");
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(flag), "{args:?}: {e}");
        }
    }

    #[test]
    fn help_and_version_exit_zero() {
        for flag in ["--help", "--version"] {
            let e = parse(&[flag]).expect_err("not a run");
            assert_eq!(e.exit_code(), 0);
        }
        let help = parse(&["--help"]).expect_err("help").to_string();
        for flag in [
            "--uri",
            "--queue",
            "--workers",
            "--prefetch",
            "--quorum",
            "--metrics-addr",
        ] {
            assert!(help.contains(flag), "{flag} in {help}");
        }
    }
}
