//! The bench program's `--payload` against `server --echo`, on the real broker: a body split
//! over several frames comes back whole over two client connections, and a server that does
//! not echo makes the bench fail. `cargo test -p e2e-tests --test bench_payload`.

use std::time::Duration;

use e2e_tests::broker::{uri, QueueGuard};
use e2e_tests::process::{cli_program, ChildProcess};
use e2e_tests::rt::TestRuntime;

e2e_tests::e2e_tests!(echoed_payloads_are_checked);

/// Above the negotiated frame_max (128 KiB): the body travels as three body frames each way.
const PAYLOAD: usize = 300_000;

fn program(which: &str, transport: &str) -> std::process::Command {
    cli_program(env!("CARGO_BIN_EXE_cli-program"), which, transport)
}

async fn start_server<R: TestRuntime>(queue: &str, echo: bool) -> ChildProcess {
    let mut command = program("server", R::NAME);
    command.args(["--uri", &uri(), "--queue", queue, "--workers", "4"]);
    if echo {
        command.arg("--echo");
    }
    let mut server = ChildProcess::spawn("server", command);
    server
        .wait_line::<R>("Awaiting RPC requests", Duration::from_secs(15))
        .await;
    server
}

async fn bench<R: TestRuntime>(queue: &str) -> (bool, String, String) {
    let mut command = program("bench", R::NAME);
    command.args([
        "--uri",
        &uri(),
        "--queue",
        queue,
        "--json",
        "--timeout",
        "10",
    ]);
    command.args(["--calls", "40", "--concurrency", "4", "--connections", "2"]);
    command.args(["--payload", &PAYLOAD.to_string()]);
    let mut bench = ChildProcess::spawn("bench", command);
    let status = bench.wait_exit::<R>(Duration::from_secs(60)).await;
    (status.success(), bench.stdout(), bench.output())
}

async fn echoed_payloads_are_checked<R: TestRuntime>() {
    let queue = QueueGuard::new("bench-payload");
    let server = start_server::<R>(queue.name(), true).await;
    let (ok, line, output) = bench::<R>(queue.name()).await;
    drop(server);
    assert!(ok, "{output}");
    let line = line.trim();
    for member in [
        "\"calls\":40,",
        "\"errors\":0,",
        &format!("\"payload_bytes\":{PAYLOAD},"),
        "\"connections\":2,",
    ] {
        assert!(line.contains(member), "{member} in {line}");
    }
    // Every reply was as long as its request: the same MB/s each way.
    let field = |name: &str| -> String {
        let at = line.find(&format!("\"{name}\":")).expect(name) + name.len() + 3;
        let rest = &line[at..];
        rest[..rest.find([',', '}']).unwrap_or(rest.len())].to_owned()
    };
    assert_eq!(
        field("request_mb_per_sec"),
        field("reply_mb_per_sec"),
        "{line}"
    );
    assert!(field("rss_peak_kib").parse::<u64>().expect("a number") > 0);

    // The Fibonacci server refuses such a body: every call is counted as an error.
    let queue = QueueGuard::new("bench-payload-fib");
    let server = start_server::<R>(queue.name(), false).await;
    let (ok, line, output) = bench::<R>(queue.name()).await;
    drop(server);
    assert!(
        !ok,
        "a server that does not echo must fail the bench\n{output}"
    );
    assert!(
        line.is_empty() || line.contains("\"errors\":40,"),
        "{line}\n{output}"
    );
}
