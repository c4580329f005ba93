//! `e2e-server --transport tokio|smol --queue Q [--slow-ms N] [--prefetch N] [--quorum]
//! [--name CONNECTION_NAME]`: the Fibonacci server for tests that need one in a process of its own
//! (to kill it with SIGKILL mid-request).
//!
//! Prints `ready` when it consumes its queue (after every reconnect), and `handling <body>` when
//! a request starts, before waiting `--slow-ms` and answering. Exits when its stdin closes, so
//! that it never outlives the test that started it. Uses `AMQP_URL` or the default URI.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{QueueKind, Request, Server};
use e2e_tests::rt::{sleep, Smol, TestRuntime, Tokio};
use e2e_tests::servers::{server_options, HandlerFuture};

struct Args {
    transport: String,
    queue: String,
    slow: Duration,
    prefetch: u16,
    quorum: bool,
    name: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        transport: "tokio".into(),
        queue: String::new(),
        slow: Duration::ZERO,
        prefetch: 1,
        quorum: false,
        name: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--transport" => args.transport = value()?,
            "--queue" => args.queue = value()?,
            "--slow-ms" => {
                let v = value()?;
                args.slow = Duration::from_millis(v.parse().map_err(|_| format!("--slow-ms {v}"))?)
            }
            "--prefetch" => {
                let v = value()?;
                args.prefetch = v.parse().map_err(|_| format!("--prefetch {v}"))?
            }
            "--name" => args.name = Some(value()?),
            "--quorum" => args.quorum = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.queue.is_empty() {
        return Err("--queue is required".into());
    }
    Ok(args)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn serve<R: TestRuntime>(args: Args) -> ExitCode {
    let mut options = server_options(&args.queue);
    options.rpc.prefetch = args.prefetch.max(1);
    options.workers = usize::from(options.rpc.prefetch);
    options.rpc.declare_as = if args.quorum {
        QueueKind::Quorum
    } else {
        QueueKind::Classic
    };
    for address in options.connect.iter_mut() {
        address.connection.connection_name = args.name.clone();
    }
    let slow = args.slow;
    let handler = move |request: Request| -> HandlerFuture {
        say(&format!(
            "handling {}",
            String::from_utf8_lossy(&request.body[..request.body.len().min(64)])
        ));
        Box::pin(async move {
            if !slow.is_zero() {
                sleep::<R>(slow).await;
            }
            fib_handler(request).await
        })
    };
    let server = Server::<R>::new(options).on_ready(|| say("ready"));
    match server.serve(handler).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("e2e-server: {e}");
            return ExitCode::from(2);
        }
    };
    // Never outlive the test: it holds our stdin open and its end closes it.
    e2e_tests::process::exit_when_stdin_closes();
    match args.transport.as_str() {
        "tokio" => Tokio::block_on(serve::<Tokio>(args)),
        "smol" => Smol::block_on(serve::<Smol>(args)),
        other => {
            eprintln!("e2e-server: --transport tokio or smol, not {other}");
            ExitCode::from(2)
        }
    }
}
