//! Drives the RPC client machine over a plain blocking `std::net::TcpStream`: the whole
//! "runtime" is this loop. Makes one call to the Fibonacci server and prints the answer.
//!
//! ```text
//! cargo run -p transport-tokio --bin server &      # any server on rpc_queue
//! cargo run -p amqp-rpc-core --example blocking_call -- 30
//! ```
//!
//! `AMQP_ADDR` (default `127.0.0.1:5672`) picks the broker; the user is guest/guest.
//! `AMQP_TLS=1` speaks TLS (amqps, port 5671) through rustls's blocking `StreamOwned`, the
//! server verified against the platform's roots or the PEM file `AMQP_CACERT`, by the host
//! part of `AMQP_ADDR`:
//!
//! ```text
//! AMQP_TLS=1 AMQP_ADDR=localhost:5671 AMQP_CACERT=/tmp/rabbit-tls/certs/ca.pem \
//!     cargo run -p amqp-rpc-core --example blocking_call -- 30
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqp_rpc_core::rpc::{
    CallRequest, ClientConfig, ClientEvent, CorrelationKey, RpcClient, UnixMillis,
};
use amqp_rpc_core::ConnectionConfig;

// The core never reads a clock; its driver does.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

#[allow(clippy::disallowed_methods)]
fn wall() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    UnixMillis(u64::try_from(ms).unwrap_or(u64::MAX))
}

fn main() -> ExitCode {
    let n = std::env::args().nth(1).unwrap_or_else(|| "30".to_owned());
    let addr = std::env::var("AMQP_ADDR").unwrap_or_else(|_| "127.0.0.1:5672".to_owned());
    match run(&addr, &n) {
        Ok(answer) => {
            println!("fib({n}) = {answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("blocking_call: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The byte stream: TCP, or TLS over it. The machine sees the same bytes either way.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn connect(addr: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        if std::env::var("AMQP_TLS").map_or(true, |v| v != "1") {
            return Ok(Stream::Plain(tcp));
        }
        let mut roots = rustls::RootCertStore::empty();
        let certs = match std::env::var("AMQP_CACERT") {
            Ok(path) => {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::CertificateDer::pem_file_iter(path)?
                    .collect::<Result<Vec<_>, _>>()?
            }
            Err(_) => rustls_native_certs::load_native_certs().certs,
        };
        roots.add_parsable_certificates(certs);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // The host part of host:port ([v6]:port too) is the name verified and sent as SNI.
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let name = rustls::pki_types::ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        )?;
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
        Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

fn run(addr: &str, n: &str) -> Result<String, Box<dyn std::error::Error>> {
    let mut stream = Stream::connect(addr)?;
    let mut client = RpcClient::new(
        ClientConfig::default(),
        ConnectionConfig::default(),
        CorrelationKey::random(),
        now(),
    );
    let mut answer: Option<Result<String, String>> = None;
    let (mut out, mut input) = (Vec::new(), vec![0u8; 64 * 1024]);
    loop {
        // 1. Drain events.
        while let Some(event) = client.poll_event() {
            match event {
                ClientEvent::Ready if answer.is_none() => {
                    let request =
                        CallRequest::new("rpc_queue", n.to_owned(), Duration::from_secs(10));
                    client.call(now(), wall(), request)?;
                }
                ClientEvent::CallEnded { result, .. } => {
                    answer = Some(
                        result
                            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
                            .map_err(|e| e.to_string()),
                    );
                    client.close(now());
                }
                ClientEvent::Disconnected(e) => return Err(e.into()),
                _ => {}
            }
        }
        // 2. Send everything that is ready, in one write.
        out.clear();
        client.handle_transmitted(now());
        client.poll_transmit(now(), &mut out);
        stream.write_all(&out)?;
        stream.flush()?;
        if client.is_finished() {
            break;
        }
        // 3. Wait for bytes, but no longer than the next timer.
        let wait = client
            .poll_timeout()
            .map(|t| t.saturating_duration_since(now()));
        stream
            .tcp()
            .set_read_timeout(wait.map(|w| w.max(Duration::from_millis(1))))?;
        match stream.read(&mut input) {
            Ok(0) => client.handle_eof(now()),
            Ok(k) => client.handle_input(now(), &input[..k]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                client.handle_timeout(now())
            }
            Err(_) => client.handle_eof(now()),
        }
    }
    answer
        .unwrap_or_else(|| Err("connection closed before the call ended".into()))
        .map_err(Into::into)
}
