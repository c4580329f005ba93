//! RPC over RabbitMQ on smol (async-io), with no tokio anywhere in the dependency tree.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use transport_smol::Client;
//! smol::block_on(async {
//!     let client = Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//!     let reply = client.call("rpc_queue", "30").await?;
//!     assert_eq!(&reply[..], b"832040");
//!     Ok(())
//! })
//! # }
//! ```
//!
//! The types are the runtime-neutral ones of `amqp-rpc-driver`, bound to [`Smol`]; the tokio
//! transport binds the same types to tokio, so code moves between them unchanged.
//!
//! # Features
//!
//! - `cli` (default): builds the programs `smol-server`, `smol-client` and `smol-bench` (the crate
//!   `amqp-rpc-cli`, with clap and tracing-subscriber). A library user needs none of it:
//!
//! ```toml
//! transport-smol = { version = "0.1", default-features = false }
//! ```
#![deny(missing_docs)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// Typed JSON payloads: `Client::call_json`, `Server::serve_json` and their pieces.
#[cfg(feature = "json")]
pub use amqp_rpc_driver::json;
/// AMQP field types, for a [`Response`]'s headers and content type.
pub use amqp_rpc_driver::types;
pub use amqp_rpc_driver::{
    AddressFailure, Addresses, Backoff, CallError, CallRequest, ClientConfig, ClientOptions,
    ConnectError, ConnectOptions, ConnectionError, ConnectionState, Credentials,
    CredentialsProvider, HandlerError, HandshakeStage, QueueKind, ReplyMode, Request, Response,
    RpcError, RpcReply, ServerConfig, ServerHandle, ServerOptions, ServerReport, TlsConfig,
    TlsError, Verify, DEFAULT_URI,
};

/// The smol runtime, as the driver sees it. Tasks go to smol's global executor, so these types
/// work from `smol::block_on` or any other executor.
#[derive(Debug, Clone, Copy)]
pub struct Smol;

/// A TCP stream on smol's reactor that reads only once it was told the socket is readable.
/// smol's own stream tries a `read` each time it is polled, and the driver loop polls the socket
/// at every turn, also when a command woke it: one `read` returning `EAGAIN` per turn. This one
/// remembers that the last read found nothing (or did not fill the buffer) and asks the reactor
/// first, which costs no system call while no readiness event arrived.
#[derive(Debug)]
pub struct TcpStream {
    inner: smol::Async<std::net::TcpStream>,
    /// The last read would have blocked: wait for the reactor's readiness event before reading.
    wait_readable: bool,
}

impl smol::io::AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.wait_readable {
            // No system call until the reactor delivered an event (async-io's `poll_readable`).
            smol::ready!(this.inner.poll_readable(cx))?;
            this.wait_readable = false;
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                // It read, found nothing, and registered for the next readiness event.
                this.wait_readable = true;
                Poll::Pending
            }
            // A read that did not fill the buffer took all the kernel had: the next one would
            // find nothing (as tokio assumes too). The reactor's registration is level-triggered
            // when it is armed again, so bytes that arrive meanwhile still wake us.
            Poll::Ready(Ok(n)) if n > 0 && n < buf.len() => {
                this.wait_readable = true;
                Poll::Ready(Ok(n))
            }
            ready => ready,
        }
    }
}

impl smol::io::AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// A resettable smol timer that resolves to `()`.
#[derive(Debug)]
pub struct Sleep(smol::Timer);

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

impl amqp_rpc_driver::Runtime for Smol {
    type Tcp = TcpStream;
    type Stream = amqp_rpc_driver::Stream<Self::Tcp>;
    type Sleep = Sleep;

    fn resolve(
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>> {
        let host = host.to_owned();
        // A (host, port) pair, never "{host}:{port}": that string is wrong for IPv6.
        Box::pin(async move { smol::net::resolve((host.as_str(), port)).await })
    }

    fn connect(address: SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<Self::Tcp>> + Send>> {
        Box::pin(async move {
            let stream = smol::Async::<std::net::TcpStream>::connect(address).await?;
            // Requests and replies are small: send each batch at once.
            stream.get_ref().set_nodelay(true)?;
            Ok(TcpStream {
                inner: stream,
                wait_readable: false,
            })
        })
    }

    fn sleep_until(deadline: Instant) -> Self::Sleep {
        Sleep(smol::Timer::at(deadline))
    }

    fn reset(mut sleep: Pin<&mut Self::Sleep>, deadline: Instant) {
        sleep.0.set_at(deadline);
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(future: F) {
        smol::spawn(future).detach();
    }

    fn spawn_blocking<F: FnOnce() + Send + 'static>(f: F) {
        smol::unblock(f).detach();
    }
}

/// An RPC client on smol.
pub type Client = amqp_rpc_driver::Client<Smol>;
/// An RPC server on smol.
pub type Server = amqp_rpc_driver::Server<Smol>;

/// Runs a program's main future to completion with `smol::block_on`, its spawned tasks on
/// `threads` executor threads (smol's `SMOL_THREADS`; 0 keeps smol's default of one): what the
/// programs' `--threads` asks for, as `transport_tokio::run_program` on tokio. Call it first
/// thing in `main`: smol reads the variable once, at its first spawn, and setting the
/// environment is only sound while no other thread exists.
pub fn run_program(
    threads: usize,
    program: impl Future<Output = std::process::ExitCode>,
) -> std::process::ExitCode {
    if threads > 0 {
        std::env::set_var("SMOL_THREADS", threads.to_string());
    }
    smol::block_on(program)
}

/// Resolves on Ctrl-C or SIGTERM, for graceful shutdown.
pub async fn shutdown_signal() {
    use async_signal::{Signal, Signals};
    use futures_util::StreamExt;
    match Signals::new([Signal::Int, Signal::Term]) {
        Ok(mut signals) => {
            let _ = signals.next().await;
        }
        // Without signal handling there is nothing to wait for but the process's end.
        Err(_) => std::future::pending().await,
    }
}
