//! RPC over RabbitMQ on tokio.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use transport_tokio::Client;
//! let client = Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let reply = client.call("rpc_queue", "30").await?;
//! assert_eq!(&reply[..], b"832040");
//! # Ok(()) }
//! ```
//!
//! The types are the runtime-neutral ones of `amqp-rpc-driver`, bound to [`Tokio`]; the smol
//! transport binds the same types to its runtime, so code moves between them unchanged.
//!
//! # Features
//!
//! - `cli` (default): builds the programs `server`, `client` and `bench` (the crate
//!   `amqp-rpc-cli`, with clap and tracing-subscriber). A library user needs none of it:
//!
//! ```toml
//! transport-tokio = { version = "0.1", default-features = false }
//! ```
#![deny(missing_docs)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Instant;

use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

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

/// The tokio runtime, as the driver sees it. Tasks go to the ambient runtime, so use these types
/// from inside one (`#[tokio::main]`).
#[derive(Debug, Clone, Copy)]
pub struct Tokio;

impl amqp_rpc_driver::Runtime for Tokio {
    type Tcp = Compat<tokio::net::TcpStream>;
    type Stream = amqp_rpc_driver::Stream<Self::Tcp>;
    type Sleep = tokio::time::Sleep;

    fn resolve(
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>> {
        let host = host.to_owned();
        // A (host, port) pair, never "{host}:{port}": that string is wrong for IPv6.
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }

    fn connect(address: SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<Self::Tcp>> + Send>> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(address).await?;
            // Requests and replies are small: send each batch at once rather than wait for
            // Nagle's algorithm to fill a segment.
            stream.set_nodelay(true)?;
            Ok(stream.compat())
        })
    }

    fn sleep_until(deadline: Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline.into())
    }

    fn reset(sleep: Pin<&mut Self::Sleep>, deadline: Instant) {
        sleep.reset(deadline.into());
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(future: F) {
        tokio::spawn(future);
    }

    fn spawn_blocking<F: FnOnce() + Send + 'static>(f: F) {
        tokio::task::spawn_blocking(f);
    }
}

/// An RPC client on tokio.
pub type Client = amqp_rpc_driver::Client<Tokio>;
/// An RPC server on tokio.
pub type Server = amqp_rpc_driver::Server<Tokio>;

/// Runs a program's main future on the runtime its `--threads` asks for: 0 a current-thread
/// runtime, N a multi-thread one with N workers, as
/// `transport_smol::run_program` on smol. Exits 1 when the runtime cannot be built.
pub fn run_program(
    threads: usize,
    program: impl Future<Output = std::process::ExitCode>,
) -> std::process::ExitCode {
    let runtime = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    match runtime {
        Ok(runtime) => runtime.block_on(program),
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM, for graceful shutdown.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
