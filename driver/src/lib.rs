//! The runtime-neutral half of the transports: one driver loop that runs any
//! [`amqp_rpc_core::Machine`] over any async byte stream, and the [`Client`] and [`Server`]
//! built on it. `transport-tokio` and `transport-smol` supply a [`Runtime`] and re-export these
//! types, so both have the same API by construction and no driving code is written twice.

mod cli;
mod client;
mod io_loop;
mod options;
mod reconnect;
mod server;
mod state;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Instant;

use futures_io::{AsyncRead, AsyncWrite};

pub use amqp_rpc_core::rpc::{CallRequest, HandlerError, QueueKind, ReplyMode, RpcReply};
pub use amqp_rpc_core::{ConnectionError, RpcError, UsageError};
pub use cli::{bench_main, client_main, fib, fib_handler, server_main};
pub use client::{CallError, Client, ClientOptions};
pub use options::{ConnectError, ConnectOptions, DEFAULT_URI};
pub use reconnect::Backoff;
pub use server::{Request, Server, ServerHandle, ServerOptions, ServerReport};
pub use state::ConnectionState;

/// What a transport supplies: sockets, timers and tasks of one async runtime.
pub trait Runtime: Send + Sync + 'static {
    /// A connected TCP stream (TCP_NODELAY set).
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// A resettable timer.
    type Sleep: Future<Output = ()> + Send + 'static;

    /// Connects to `host:port` with TCP_NODELAY on.
    fn connect(
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Self::Stream>> + Send>>;
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
