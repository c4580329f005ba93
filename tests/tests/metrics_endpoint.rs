//! The server program's `--metrics-addr`: the program (built here as the `cli-program` bin) runs
//! against the real broker, a client makes calls, and a plain TCP scrape of `/metrics` during
//! the run shows them in the Prometheus text: requests and deliveries counted, the handler
//! histogram's count, the in-flight gauge; and idle or slow connections do not delay a scrape.
//! `cargo test -p e2e-tests --test metrics_endpoint`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use amqp_rpc_driver::metrics::{
    SERVER_HANDLER_DURATION, SERVER_IN_FLIGHT, SERVER_RECEIVED, SERVER_REQUESTS,
};
use amqp_rpc_driver::ReplyMode;
use e2e_tests::broker::{uri, QueueGuard};
use e2e_tests::calls::{call, connect, expect_fib, CALL_TIMEOUT};
use e2e_tests::process::{cli_program, ChildProcess};
use e2e_tests::rt::{blocking, sleep, TestRuntime};

e2e_tests::e2e_tests!(scrape_shows_the_calls);

/// Calls made during the run.
const CALLS: u32 = 25;
/// How long a figure may take to show (the server publishes its stats on its next wake-up).
const SHOWS_WITHIN: Duration = Duration::from_secs(10);

async fn scrape_shows_the_calls<R: TestRuntime>() {
    let queue = QueueGuard::new("metrics-endpoint");
    let port = free_port();
    let mut command = cli_program(env!("CARGO_BIN_EXE_cli-program"), "server", R::NAME);
    command
        .args(["--uri", &uri(), "--queue", queue.name(), "--workers", "4"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let mut server = ChildProcess::spawn("server", command);
    server
        .wait_line::<R>("Awaiting RPC requests", Duration::from_secs(15))
        .await;

    // One client cannot hold the endpoint (issue 20 item 5): beside 20 idle connections and
    // one that sent half a request, a scrape is answered at once.
    let holders = blocking(move || hold(port)).await;
    let started = Instant::now();
    let first = blocking(move || scrape(port, "/metrics")).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}: {first}");
    drop(holders);

    // Served before any call, with the right content type.
    assert!(first.starts_with("HTTP/1.0 200 OK\r\n"), "{first}");
    assert!(
        first.contains("Content-Type: text/plain; version=0.0.4"),
        "{first}"
    );
    let other = blocking(move || scrape(port, "/")).await;
    assert!(other.starts_with("HTTP/1.0 404 "), "{other}");

    let client = connect::<R>(ReplyMode::default()).await;
    for n in 0..CALLS {
        expect_fib(
            call(&client, queue.name(), n.to_string(), CALL_TIMEOUT).await,
            n,
        );
    }

    let ok = format!("{SERVER_REQUESTS}{{outcome=\"ok\"}}");
    let handled = format!("{SERVER_HANDLER_DURATION}_count");
    let all_in_buckets = format!("{SERVER_HANDLER_DURATION}_bucket{{le=\"+Inf\"}}");
    let deadline = Instant::now() + SHOWS_WITHIN;
    let text = loop {
        let text = blocking(move || scrape(port, "/metrics")).await;
        if sample(&text, &ok) == Some(f64::from(CALLS)) || Instant::now() > deadline {
            break text;
        }
        sleep::<R>(Duration::from_millis(100)).await;
    };
    let context = format!("{text}\n{}", server.output());
    assert_eq!(sample(&text, &ok), Some(f64::from(CALLS)), "{context}");
    assert_eq!(
        sample(&text, SERVER_RECEIVED),
        Some(f64::from(CALLS)),
        "{context}"
    );
    assert_eq!(sample(&text, &handled), Some(f64::from(CALLS)), "{context}");
    assert_eq!(
        sample(&text, &all_in_buckets),
        Some(f64::from(CALLS)),
        "{context}"
    );
    // Every call answered: the gauge is there and back at zero.
    assert_eq!(sample(&text, SERVER_IN_FLIGHT), Some(0.0), "{context}");
    assert!(
        text.contains(&format!("# TYPE {SERVER_HANDLER_DURATION} histogram")),
        "{context}"
    );
    client.close().await;
}

/// A port nobody listens on now (the kernel's pick; free again once the probe closes).
fn free_port() -> u16 {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().expect("probe's address").port()
}

/// 20 idle connections to the endpoint, and one that sent half a request.
fn hold(port: u16) -> Vec<TcpStream> {
    let mut held: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect an idle peer"))
        .collect();
    let mut half = TcpStream::connect(("127.0.0.1", port)).expect("connect a slow peer");
    half.write_all(b"GET /metr").expect("send half a request");
    held.push(half);
    // Long enough for the endpoint to have accepted them all.
    std::thread::sleep(Duration::from_millis(200));
    held
}

/// One HTTP/1.0 GET of `path`: the whole response, head and body.
fn scrape(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to --metrics-addr");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set a timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    response
}

/// The value of the sample `series` (a name, with its labels as the exporter writes them).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}
