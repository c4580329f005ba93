//! `--metrics-addr`: the driver's metrics (see `amqp_rpc_driver::metrics`) in Prometheus text
//! format, served over HTTP at `/metrics`.
//!
//! The recorder is metrics-exporter-prometheus's, built without its HTTP listener (that one is
//! hyper on a tokio runtime, and the programs also run on smol). Std threads answer the scrapes
//! instead: one accepts, and each connection has a thread of its own, at most
//! [`MAX_CONNECTIONS`] at once (the next ones are closed at once with a 503), each bounded in
//! size ([`MAX_REQUEST_HEAD`]) and in total time ([`CONNECTION_DEADLINE`], not per read: a
//! slowloris that trickles a byte a second is closed at the deadline too). So one client cannot
//! hold the endpoint: a slow or idle connection delays no other scrape; only more than the bound
//! of them at once can turn a scrape away (a 503, for the deadline at most); memory stays
//! bounded all along.
//!
//! Why not a maintained HTTP server crate: a scrape is one small GET every few seconds, and
//! these bounds take about a hundred lines here; hyper (what the exporter's own listener uses)
//! would bring a tokio runtime into the smol programs, and any server crate a dependency tree
//! larger than this file, for no feature the endpoint needs (no keep-alive, no TLS, no routing).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The bounds, in seconds, of the `_seconds` histograms' buckets: from 10 µs (a handler that
/// computes a little) to 30 s (the programs' default call timeout). With buckets set the exporter
/// writes real Prometheus histograms, which add up across processes, rather than summaries.
pub const SECONDS_BUCKETS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// The most of a request's head (request line and headers) read before answering 431.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// The most connections served at once; the next ones are closed as soon as accepted. Above
/// what a few Prometheus servers scraping at once need, far below a process's descriptors.
pub const MAX_CONNECTIONS: usize = 32;

/// How long one connection may last in all, from its accept to the last byte of the answer:
/// a scrape of the local process takes milliseconds, so a peer still sending its request (or
/// reading the answer) after this is stuck or hostile, and is closed.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(2);

/// How often the recorder's upkeep runs (it drains the histograms' buffers).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the process's global `metrics` recorder and serves it at
/// `http://addr/metrics` from a thread of its own. Returns the address it listens on (the port
/// chosen when `addr`'s is 0).
///
/// Fails when `addr` cannot be bound, or when a recorder is already installed.
pub fn serve_metrics(addr: SocketAddr) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let handle = install_recorder()?;
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            upkeep.run_upkeep();
        })?;
    respond(listener, Arc::new(move || handle.render()))?;
    Ok(local)
}

/// What renders the metrics page (the recorder's handle; a fixed text in the tests).
type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Answers the scrapes that reach `listener`, for ever: a thread accepts, and each connection
/// is answered on a thread of its own, at most [`MAX_CONNECTIONS`] at once, each within
/// [`CONNECTION_DEADLINE`] in all. So a peer that trickles its request or never sends one
/// holds one slot for two seconds at most, and delays no other scrape.
fn respond(listener: TcpListener, render: Render) -> io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    // A failed accept (the peer gone already, out of file descriptors) ends one
                    // scrape, not the endpoint; the pause keeps a lasting failure from spinning.
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let Some(slot) = Slot::take(&open) else {
                    refuse(stream);
                    continue;
                };
                let render = Arc::clone(&render);
                // Should the thread not start, the closure (stream and slot) is dropped: the
                // connection is closed and its slot freed.
                let _ = std::thread::Builder::new()
                    .name("metrics-scrape".into())
                    .stack_size(SCRAPE_STACK)
                    .spawn(move || {
                        let _slot = slot;
                        let _ = answer(stream, &*render);
                    });
            }
        })?;
    Ok(())
}

/// A scrape thread's stack: rendering builds its text on the heap.
const SCRAPE_STACK: usize = 256 * 1024;

/// One of the [`MAX_CONNECTIONS`] connections served at once; freed when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A slot, if fewer than [`MAX_CONNECTIONS`] are taken.
    fn take(open: &Arc<AtomicUsize>) -> Option<Slot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_CONNECTIONS).then_some(n + 1)
        })
        .ok()?;
        Some(Slot(Arc::clone(open)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Closes a connection over the bound at once, with a 503 if the socket takes it without
/// waiting (a fresh connection's send buffer is empty, so it does).
fn refuse(stream: TcpStream) {
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&stream).write(&status(503, "Service Unavailable"));
    }
}

/// [`serve_metrics`] for a program: says where on stderr, or why not and returns exit code 1.
pub fn serve_or_exit_code(program: &str, addr: SocketAddr) -> Result<SocketAddr, ExitCode> {
    match serve_metrics(addr) {
        Ok(local) => {
            eprintln!("{program}: metrics on http://{local}/metrics");
            Ok(local)
        }
        Err(e) => {
            eprintln!("{program}: --metrics-addr {addr}: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// Builds the recorder with [`SECONDS_BUCKETS`] and installs it globally.
fn install_recorder() -> io::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .map_err(io::Error::other)?
        .install_recorder()
        .map_err(io::Error::other)
}

/// Reads one request from `stream` and writes its answer, then closes the connection
/// (HTTP/1.0: no keep-alive, no chunking), all within [`CONNECTION_DEADLINE`].
fn answer(stream: TcpStream, render: &dyn Fn() -> String) -> io::Result<()> {
    let mut stream = Deadline {
        stream,
        at: Instant::now() + CONNECTION_DEADLINE,
    };
    let head = read_head(&mut stream);
    stream.write_all(&response(head.as_deref().map_err(|e| *e), render))?;
    stream.flush()
}

/// A connection whose every read and write ends by `at`: each waits at most the time left
/// (a socket timeout is per call, so a byte every second would otherwise last for ever).
struct Deadline {
    stream: TcpStream,
    at: Instant,
}

impl Deadline {
    /// The time left, or `TimedOut` once there is none (a zero socket timeout is an error).
    fn left(&self) -> io::Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// What [`read_head`] found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// More than [`MAX_REQUEST_HEAD`] bytes without the blank line that ends the head.
    TooLarge,
    /// The peer closed, timed out or failed before the head ended.
    Incomplete,
}

/// Reads a request's head, up to and including the blank line that ends it, at most
/// [`MAX_REQUEST_HEAD`] bytes. A body (a GET has none) is left unread.
pub fn read_head(stream: &mut impl Read) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = find_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() >= MAX_REQUEST_HEAD {
            return Err(HeadError::TooLarge);
        }
        let room = (MAX_REQUEST_HEAD - head.len()).min(buf.len());
        match stream.read(&mut buf[..room]) {
            Ok(0) | Err(_) => return Err(HeadError::Incomplete),
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
}

/// Where the head ends: after the first blank line (`\r\n\r\n`, or `\n\n` from a lax client).
fn find_end(head: &[u8]) -> Option<usize> {
    let crlf = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = head.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The whole HTTP/1.0 response to a request with `head`: the metrics (rendered by `render`,
/// only when asked for) for `GET /metrics`, an error status otherwise.
pub fn response(head: Result<&[u8], HeadError>, render: impl FnOnce() -> String) -> Vec<u8> {
    let head = match head {
        Ok(head) => head,
        Err(HeadError::TooLarge) => return status(431, "Request Header Fields Too Large"),
        Err(HeadError::Incomplete) => return status(400, "Bad Request"),
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut words = line.trim_ascii().split(|&b| b == b' ');
    let (method, target) = (words.next().unwrap_or_default(), words.next());
    let Some(target) = target else {
        return status(400, "Bad Request");
    };
    // A query string (`/metrics?x=1`) asks for the same page.
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if path != b"/metrics" {
        return status(404, "Not Found");
    }
    let with_body = match method {
        b"GET" => true,
        b"HEAD" => false,
        _ => return status(405, "Method Not Allowed"),
    };
    let body = render();
    let mut out = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// A response with `code`, its reason as the body.
fn status(code: u16, reason: &str) -> Vec<u8> {
    format!(
        "HTTP/1.0 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reason}\n",
        reason.len() + 1
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_to(request: &[u8]) -> String {
        let head = read_head(&mut &request[..]);
        String::from_utf8(response(head.as_deref().map_err(|e| *e), || {
            "m_total 3\n".to_owned()
        }))
        .expect("utf-8")
    }

    #[test]
    fn get_metrics_is_the_rendered_text() {
        let out = answer_to(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
        assert!(
            out.contains("Content-Type: text/plain; version=0.0.4"),
            "{out}"
        );
        assert!(out.contains("Content-Length: 10\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nm_total 3\n"), "{out}");
        assert!(answer_to(b"GET /metrics?name=x HTTP/1.0\n\n").starts_with("HTTP/1.0 200"));
    }

    #[test]
    fn head_has_no_body() {
        let out = answer_to(b"HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "{out}");
    }

    #[test]
    fn other_paths_methods_and_garbage_are_refused_without_rendering() {
        for (request, code) in [
            (&b"GET / HTTP/1.0\r\n\r\n"[..], "404"),
            (b"GET /metricsx HTTP/1.0\r\n\r\n", "404"),
            (b"POST /metrics HTTP/1.0\r\n\r\n", "405"),
            (b"GET\r\n\r\n", "400"),
            (b"GET /metrics HTTP/1.0\r\n", "400"),
            (b"", "400"),
        ] {
            let head = read_head(&mut &request[..]);
            let out = response(head.as_deref().map_err(|e| *e), || {
                panic!("rendered for {request:?}")
            });
            let out = String::from_utf8(out).expect("utf-8");
            assert!(
                out.starts_with(&format!("HTTP/1.0 {code} ")),
                "{request:?}: {out}"
            );
        }
    }

    #[test]
    fn a_head_without_end_is_read_up_to_the_bound() {
        // An endless header: the reader stops at the bound, not at the end of the input.
        let endless = std::io::repeat(b'a');
        let mut limited = endless.take(10 * MAX_REQUEST_HEAD as u64);
        assert_eq!(read_head(&mut limited), Err(HeadError::TooLarge));
        assert_eq!(
            limited.limit(),
            10 * MAX_REQUEST_HEAD as u64 - MAX_REQUEST_HEAD as u64
        );
        assert!(answer_to(&vec![b'a'; MAX_REQUEST_HEAD + 1]).starts_with("HTTP/1.0 431 "));
    }

    /// How long a test scrape waits for its answer before it gives up.
    const SCRAPE_LIMIT: Duration = Duration::from_secs(5);

    /// A responder on a port of its own, its page a fixed text.
    fn responder() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a test port");
        let addr = listener.local_addr().expect("its address");
        respond(listener, Arc::new(|| "m_total 3\n".to_owned())).expect("spawn the responder");
        addr
    }

    /// One scrape: the status line, or why none came within [`SCRAPE_LIMIT`]; how long it took.
    fn scrape(addr: SocketAddr) -> (Result<String, String>, Duration) {
        let started = Instant::now();
        let status = (|| {
            let mut stream =
                TcpStream::connect_timeout(&addr, SCRAPE_LIMIT).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(SCRAPE_LIMIT))
                .map_err(|e| e.to_string())?;
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            stream.read_to_end(&mut out).map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out);
            Ok(text.lines().next().unwrap_or_default().to_owned())
        })();
        (status, started.elapsed())
    }

    /// A slowloris: sends `GET /metrics` (never the blank line) a byte `every`, at most
    /// `bytes` of it; returns how long after its connect the responder closed it (it answered
    /// or hung up), `None` if it was still open after the last byte and one more period.
    fn trickle(
        addr: SocketAddr,
        every: Duration,
        bytes: usize,
    ) -> std::thread::JoinHandle<Option<Duration>> {
        let mut stream = TcpStream::connect(addr).expect("connect the slowloris");
        let started = Instant::now();
        stream.set_read_timeout(Some(every)).expect("set a timeout");
        std::thread::spawn(move || {
            for byte in b"GET /metrics HTTP/1.0\r\nHost: slow\r\nX-Slow: "
                .iter()
                .cycle()
                .take(bytes)
            {
                if stream.write_all(&[*byte]).is_err() {
                    return Some(started.elapsed());
                }
                // Waits out the period, unless the responder answers or closes first.
                let mut sink = [0u8; 64];
                match stream.read(&mut sink) {
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    _ => return Some(started.elapsed()),
                }
            }
            None
        })
    }

    #[test]
    fn a_slowloris_does_not_delay_a_concurrent_scrape() {
        let addr = responder();
        let slow = trickle(addr, Duration::from_millis(500), 12);
        std::thread::sleep(Duration::from_millis(100));
        let mut took = Vec::new();
        for _ in 0..5 {
            let (status, elapsed) = scrape(addr);
            assert_eq!(
                status.as_deref(),
                Ok("HTTP/1.0 200 OK"),
                "after {elapsed:?}"
            );
            took.push(elapsed);
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!("scrapes beside a slowloris (a byte every 500 ms) took {took:?}");
        let slowest = took.iter().max().copied().unwrap_or_default();
        assert!(slowest < Duration::from_secs(1), "{took:?}");
        let _ = slow.join();
    }

    #[test]
    fn idle_connections_do_not_delay_a_scrape() {
        let addr = responder();
        let idle: Vec<TcpStream> = (0..20)
            .map(|_| TcpStream::connect(addr).expect("connect an idle peer"))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let (status, elapsed) = scrape(addr);
        eprintln!("a scrape beside 20 idle connections took {elapsed:?}");
        assert_eq!(
            status.as_deref(),
            Ok("HTTP/1.0 200 OK"),
            "after {elapsed:?}"
        );
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
        drop(idle);
    }

    #[test]
    fn connections_over_the_bound_are_closed_at_once() {
        let addr = responder();
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).expect("connect an idle peer"))
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let mut over = TcpStream::connect(addr).expect("connect one more");
        over.set_read_timeout(Some(SCRAPE_LIMIT))
            .expect("set a timeout");
        let mut out = Vec::new();
        // An answer (503), an end or a reset all close it; a timeout means it was kept waiting.
        let ended = over.read_to_end(&mut out);
        let elapsed = started.elapsed();
        assert!(
            !matches!(&ended, Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
            "{ended:?} after {elapsed:?}"
        );
        assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
        if !out.is_empty() {
            assert!(
                out.starts_with(b"HTTP/1.0 503 "),
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
        // Their slots are free again once they go.
        drop(idle);
        std::thread::sleep(Duration::from_millis(200));
        let (status, elapsed) = scrape(addr);
        assert_eq!(
            status.as_deref(),
            Ok("HTTP/1.0 200 OK"),
            "after {elapsed:?}"
        );
    }

    #[test]
    fn a_connection_is_closed_at_its_total_deadline() {
        let addr = responder();
        // A byte every 200 ms, for up to 5 s: never the 2 s of silence a per-read timeout needs.
        let closed = trickle(addr, Duration::from_millis(200), 25)
            .join()
            .expect("the slowloris thread");
        let closed = closed.expect("still open after 5 s");
        assert!(
            closed >= CONNECTION_DEADLINE - Duration::from_millis(50)
                && closed < CONNECTION_DEADLINE + Duration::from_millis(500),
            "closed after {closed:?}"
        );
    }

    #[test]
    fn buckets_are_increasing() {
        assert!(SECONDS_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
