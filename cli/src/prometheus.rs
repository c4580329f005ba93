//! `--metrics-addr`: the driver's metrics (see `amqp_rpc_driver::metrics`) in Prometheus text
//! format, served over HTTP at `/metrics`.
//!
//! The recorder is metrics-exporter-prometheus's, built without its HTTP listener (that one is
//! hyper on a tokio runtime, and the programs also run on smol). A std thread answers the
//! scrapes instead, one connection at a time: a scrape is a small GET every few seconds, and
//! each connection is bounded in size ([`MAX_REQUEST_HEAD`]) and time ([`IO_TIMEOUT`]), so a
//! stuck or hostile peer delays the next scrape by seconds at most and never grows memory.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

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

/// How long a scrape's connection may take to send its request or read the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

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
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let _ = answer(stream, &handle);
                    }
                    // A failed accept (the peer gone already, out of file descriptors) ends one
                    // scrape, not the endpoint; the pause keeps a lasting failure from spinning.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
    Ok(local)
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
/// (HTTP/1.0: no keep-alive, no chunking).
fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = read_head(&mut stream);
    stream.write_all(&response(head.as_deref().map_err(|e| *e), || {
        handle.render()
    }))?;
    stream.flush()
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

    #[test]
    fn buckets_are_increasing() {
        assert!(SECONDS_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
