//! `e2e-client --transport tokio|smol --queue Q [--callers N] [--timeout-ms T] [--seconds S]`:
//! a client process under load, for tests that kill a client with calls in flight.
//!
//! Its callers call `Q` in a loop (fib of varying n) for at most `--seconds` (default 60). It
//! prints `ok <count>` every 100 ms once calls succeed, and a summary at the end. Exits when its
//! stdin closes, so that it never outlives the test that started it. Uses `AMQP_URL` or the
//! default URI.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use amqp_rpc_driver::{Client, ReplyMode};
use e2e_tests::ledger::{Class, Ledger, Load, LoadSpec};
use e2e_tests::rt::{sleep, Smol, TestRuntime, Tokio};
use e2e_tests::servers::client_options;

struct Args {
    transport: String,
    queue: String,
    callers: usize,
    timeout: Duration,
    seconds: u64,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        transport: "tokio".into(),
        queue: String::new(),
        callers: 8,
        timeout: Duration::from_secs(10),
        seconds: 60,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|_| format!("{flag} {v}"));
        match flag.as_str() {
            "--transport" => args.transport = value()?,
            "--queue" => args.queue = value()?,
            "--callers" => args.callers = usize::try_from(number(value()?)?).unwrap_or(1),
            "--timeout-ms" => args.timeout = Duration::from_millis(number(value()?)?),
            "--seconds" => args.seconds = number(value()?)?,
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

async fn run<R: TestRuntime>(args: Args) -> ExitCode {
    let client = match Client::<R>::connect_with(client_options(ReplyMode::default())).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("e2e-client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ledger = Ledger::counting(Duration::from_secs(2));
    let spec = LoadSpec {
        callers: args.callers.max(1),
        timeout: args.timeout,
        max_time: Duration::from_secs(args.seconds),
        ..LoadSpec::default()
    };
    let load = Load::start(&client, &args.queue, &ledger, spec);
    let until = Instant::now() + Duration::from_secs(args.seconds);
    while Instant::now() < until {
        sleep::<R>(Duration::from_millis(100)).await;
        let ok = ledger.summary().count(Class::Ok);
        if ok > 0 {
            say(&format!("ok {ok}"));
        }
    }
    load.stop::<R>(Duration::from_secs(2)).await;
    client.close().await;
    say(&format!("summary {}", ledger.summary()));
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("e2e-client: {e}");
            return ExitCode::from(2);
        }
    };
    // Never outlive the test: it holds our stdin open and its end closes it.
    e2e_tests::process::exit_when_stdin_closes();
    match args.transport.as_str() {
        "tokio" => Tokio::block_on(run::<Tokio>(args)),
        "smol" => Smol::block_on(run::<Smol>(args)),
        other => {
            eprintln!("e2e-client: --transport tokio or smol, not {other}");
            ExitCode::from(2)
        }
    }
}
