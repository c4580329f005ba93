//! The bench program (built here as the `cli-program` bin) against the server program, on the
//! real broker: its `--json` line has the old fields and the new percentiles in order, `--plot`
//! writes both charts, `--metrics-addr` serves, and with stderr not a terminal no progress bar
//! is drawn. `cargo test -p e2e-tests --test bench_program`.

use std::time::Duration;

use e2e_tests::broker::{uri, QueueGuard};
use e2e_tests::process::{cli_program, ChildProcess};
use e2e_tests::rt::TestRuntime;

e2e_tests::e2e_tests!(json_plot_and_metrics);

/// Calls the bench makes: enough for every percentile to be a different call.
const CALLS: u64 = 2_000;

fn program(which: &str, transport: &str) -> std::process::Command {
    cli_program(env!("CARGO_BIN_EXE_cli-program"), which, transport)
}

async fn json_plot_and_metrics<R: TestRuntime>() {
    let queue = QueueGuard::new("bench-program");
    let mut server_command = program("server", R::NAME);
    server_command.args(["--uri", &uri(), "--queue", queue.name(), "--workers", "8"]);
    let mut server = ChildProcess::spawn("server", server_command);
    server
        .wait_line::<R>("Awaiting RPC requests", Duration::from_secs(15))
        .await;

    let plot = std::env::temp_dir().join(format!(
        "bench-program-{}-{}.svg",
        R::NAME,
        std::process::id()
    ));
    let mut bench_command = program("bench", R::NAME);
    bench_command
        .args(["--uri", &uri(), "--queue", queue.name(), "--n", "20"])
        .args([
            "--calls",
            &CALLS.to_string(),
            "--concurrency",
            "8",
            "--json",
        ])
        .args(["--metrics-addr", "127.0.0.1:0", "--plot"])
        .arg(&plot);
    let mut bench = ChildProcess::spawn("bench", bench_command);
    let status = bench.wait_exit::<R>(Duration::from_secs(60)).await;
    let output = bench.output();
    assert!(status.success(), "{status:?}\n{output}");

    let line = bench.stdout();
    let line = line.trim();
    let prefix = format!(
        "{{\"calls\":{CALLS},\"concurrency\":8,\"reply_mode\":\"exclusive\",\"calls_per_sec\":"
    );
    assert!(line.starts_with(&prefix), "{line}");
    let field = |name: &str| -> f64 {
        let at = line
            .find(&format!("\"{name}\":"))
            .unwrap_or_else(|| panic!("{name} in {line}"));
        let rest = &line[at + name.len() + 3..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        rest[..end]
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e} in {line}"))
    };
    let order = [
        "p50_us",
        "p99_us",
        "max_us",
        "errors",
        "client_cpu_us_per_call",
        "server_cpu_us_per_call",
        "p90_us",
        "p999_us",
        "mean_us",
        "elapsed_s",
    ];
    let at: Vec<usize> = order
        .iter()
        .map(|name| line.find(&format!("\"{name}\":")).expect(name))
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "fields out of order: {line}"
    );
    assert_eq!(field("errors"), 0.0, "{line}");
    let (p50, p90, p99, p999, max) = (
        field("p50_us"),
        field("p90_us"),
        field("p99_us"),
        field("p999_us"),
        field("max_us"),
    );
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
        "{line}"
    );
    assert!(
        field("elapsed_s") > 0.0 && field("calls_per_sec") > 0.0,
        "{line}"
    );

    // Served while it ran; stderr (a pipe here) got no progress bar.
    assert!(
        output.contains("bench: metrics on http://127.0.0.1:"),
        "{output}"
    );
    assert!(
        !output.contains("calls, ") && !output.contains("ETA"),
        "{output}"
    );

    let svg = std::fs::read_to_string(&plot).expect("--plot wrote the file");
    let _ = std::fs::remove_file(&plot);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains(amqp_rpc_cli::plot::LATENCY_TITLE));
    assert!(svg.contains(amqp_rpc_cli::plot::RATE_TITLE));
    assert!(svg.contains(&format!("{CALLS} calls, concurrency 8")));
}
