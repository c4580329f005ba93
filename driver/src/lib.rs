//! The runtime-neutral half of the transports: one driver loop that runs any
//! [`amqp_rpc_core::Machine`] over any async byte stream, and the [`Client`] and [`Server`]
//! built on it. `transport-tokio` and `transport-smol` supply a [`Runtime`] and re-export these
//! types, so both have the same API by construction and no driving code is written twice.
#![deny(missing_docs)]

mod addresses;
mod client;
mod io_loop;
#[cfg(feature = "json")]
pub mod json;
pub mod metrics;
mod options;
mod reconnect;
mod server;
mod state;
mod stats;
mod telemetry;
mod tls;
#[cfg(feature = "otel")]
mod trace_context;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Instant;

use futures_io::{AsyncRead, AsyncWrite};

pub use addresses::{AddressFailure, Addresses};
pub use amqp_rpc_core::rpc::{
    CallRequest, ClientConfig, ClientStats, HandlerError, QueueKind, ReplyMode, Response, RpcReply,
    ServerConfig, ServerStats,
};
/// AMQP field types, for a [`Response`]'s headers and content type.
pub use amqp_rpc_core::types;
pub use amqp_rpc_core::{ConnectionError, Credentials, HandshakeStage, RpcError, UsageError};
pub use client::{CallError, Client, ClientOptions};
pub use options::{
    ConnectError, ConnectOptions, CredentialsProvider, AMQPS_PORT, AMQP_PORT, DEFAULT_URI,
};
pub use reconnect::Backoff;
/// The TLS library, for callers who build their own [`rustls::ClientConfig`]
/// ([`TlsConfig::client_config`]).
pub use rustls;
pub use server::{Request, Server, ServerHandle, ServerOptions, ServerReport};
pub use state::ConnectionState;
pub use tls::{Stream, TlsConfig, TlsError, Verify};

/// What a transport supplies: name resolution, sockets, timers and tasks of one async runtime.
/// TLS is not the transport's business: the driver runs it over [`Runtime::Tcp`].
pub trait Runtime: Send + Sync + 'static {
    /// A connected TCP stream (TCP_NODELAY set).
    type Tcp: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What the driver loop reads and writes: always `amqp_rpc_driver::Stream<Self::Tcp>`
    /// (plain TCP or TLS over it); the bounds only let the driver make and inspect one.
    type Stream: AsyncRead
        + AsyncWrite
        + Unpin
        + Send
        + 'static
        + From<Stream<Self::Tcp>>
        + AsMut<Stream<Self::Tcp>>;
    /// A resettable timer.
    type Sleep: Future<Output = ()> + Send + 'static;

    /// Every address `host` resolves to, in the resolver's order (an IP address resolves to
    /// itself; an IPv6 address comes without brackets).
    fn resolve(
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;
    /// Connects to `address` with TCP_NODELAY on.
    fn connect(address: SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<Self::Tcp>> + Send>>;
    /// A timer that fires at `deadline`.
    fn sleep_until(deadline: Instant) -> Self::Sleep;
    /// Moves a timer to a new deadline.
    fn reset(sleep: Pin<&mut Self::Sleep>, deadline: Instant);
    /// Runs a task in the background.
    fn spawn<F: Future<Output = ()> + Send + 'static>(future: F);
    /// Runs blocking code on the runtime's pool of blocking threads, never on a thread that
    /// runs tasks (for [`Server::serve_blocking`]). By default, on a thread of its own; the
    /// transports use their runtime's pool, which reuses threads.
    fn spawn_blocking<F: FnOnce() + Send + 'static>(f: F) {
        std::thread::spawn(f);
    }
}
