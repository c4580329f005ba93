//! The async RPC server: one driver task owns the connection; each request runs in a task of
//! its own, at most `workers` at once.

use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use amqp_rpc_core::connection::BasicProperties;
use amqp_rpc_core::rpc::{
    HandlerError, ReplyToken, RpcServer, ServerConfig, ServerEvent, ServerStats,
};
use amqp_rpc_core::ConnectionError;
use bytes::Bytes;
use futures_channel::mpsc;
use futures_util::{FutureExt, SinkExt};

use crate::client::wall_now;
use crate::io_loop::Handler;
use crate::options::{ConnectError, ConnectOptions};
use crate::reconnect::{run_session, Backoff, Session};
use crate::Runtime;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Broker and connection settings.
    pub connect: ConnectOptions,
    /// Queue, prefetch, and the queue type to declare when it is missing.
    pub rpc: ServerConfig,
    /// Most requests handled at once.
    pub workers: usize,
    /// How to reconnect after the connection is lost.
    pub backoff: Backoff,
}

impl ServerOptions {
    /// Options for serving `queue` on the broker at `uri`, with one worker and prefetch 1 as in
    /// the tutorial.
    pub fn from_uri(uri: &str, queue: &str) -> Result<Self, ConnectError> {
        Ok(Self {
            connect: ConnectOptions::from_uri(uri)?,
            rpc: ServerConfig::new(queue),
            workers: 1,
            backoff: Backoff::default(),
        })
    }
}

/// A request as a handler sees it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Request body.
    pub body: Bytes,
    /// Request properties (headers, content type...).
    pub properties: BasicProperties,
}

/// What [`Server::serve`] returns once shut down.
#[derive(Debug, Clone, Copy)]
pub struct ServerReport {
    /// The machine's counters, summed over every connection it had (they survive reconnects).
    pub stats: ServerStats,
}

enum Command {
    Done {
        token: ReplyToken,
        result: Result<Bytes, HandlerError>,
    },
    Shutdown,
}

/// Stops a running server gracefully: cancel the consumer, finish requests in flight, close.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Done { .. } => "Done",
            Command::Shutdown => "Shutdown",
        })
    }
}

impl ServerHandle {
    /// Starts the graceful shutdown; [`Server::serve`] returns when it is done.
    pub async fn shutdown(&self) {
        let _ = self.commands.clone().send(Command::Shutdown).await;
    }
}

/// An RPC server.
pub struct Server<R: Runtime> {
    options: ServerOptions,
    commands: mpsc::Sender<Command>,
    receiver: mpsc::Receiver<Command>,
    on_ready: Option<Box<dyn FnMut() + Send>>,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> Server<R> {
    /// A server with these options; nothing happens until [`Server::serve`].
    pub fn new(options: ServerOptions) -> Self {
        let (commands, receiver) = mpsc::channel(1024);
        Self {
            options,
            commands,
            receiver,
            on_ready: None,
            _runtime: PhantomData,
        }
    }

    /// A handle that shuts the server down.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            commands: self.commands.clone(),
        }
    }

    /// Runs `f` each time the server starts consuming (after connecting and after each
    /// reconnect).
    pub fn on_ready(mut self, f: impl FnMut() + Send + 'static) -> Self {
        self.on_ready = Some(Box::new(f));
        self
    }

    /// Connects and serves requests with `handler` until shut down. Fails at once when the first
    /// connect fails; later connection losses are retried with the backoff.
    pub async fn serve<H, F>(self, handler: H) -> Result<ServerReport, ConnectError>
    where
        H: Fn(Request) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
    {
        let Server {
            options,
            commands,
            mut receiver,
            on_ready,
            ..
        } = self;
        let mut machine = RpcServer::new(
            options.rpc.clone(),
            options.connect.connection.clone(),
            Instant::now(),
        );
        let mut workers = Workers::<R, H> {
            handler,
            done: commands,
            limit: options.workers.max(1),
            on_ready,
            ever_ready: false,
            was_ready: false,
            last_error: None,
            stopped: false,
            _runtime: PhantomData,
        };
        run_session::<R, _, _>(
            &options.connect,
            &options.backoff,
            &mut machine,
            &mut receiver,
            &mut workers,
        )
        .await?;
        Ok(ServerReport {
            stats: machine.stats(),
        })
    }
}

/// The driver task's side: spawning handlers and collecting their results.
struct Workers<R: Runtime, H> {
    handler: H,
    done: mpsc::Sender<Command>,
    limit: usize,
    on_ready: Option<Box<dyn FnMut() + Send>>,
    ever_ready: bool,
    was_ready: bool,
    last_error: Option<ConnectionError>,
    stopped: bool,
    _runtime: PhantomData<fn() -> R>,
}

impl<R, H, F> Handler<RpcServer> for Workers<R, H>
where
    R: Runtime,
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
{
    type Command = Command;

    fn on_wake(&mut self, machine: &mut RpcServer, now: Instant) {
        while let Some(event) = machine.poll_event() {
            match event {
                ServerEvent::Ready => {
                    self.ever_ready = true;
                    self.was_ready = true;
                    if let Some(f) = self.on_ready.as_mut() {
                        f();
                    }
                }
                ServerEvent::Abandoned { requeued } => {
                    tracing::warn!(requeued, "request abandoned by its handler")
                }
                ServerEvent::Dropped {
                    reason,
                    correlation_id,
                } => tracing::warn!(
                    ?reason,
                    correlation_id = correlation_id.as_deref().unwrap_or(""),
                    "request dropped without running"
                ),
                ServerEvent::ReplyTooLarge {
                    correlation_id,
                    error,
                } => tracing::warn!(
                    %error,
                    correlation_id = correlation_id.as_deref().unwrap_or(""),
                    "reply too large to publish; sent a reply_too_large error reply instead"
                ),
                ServerEvent::Disconnected(error) => {
                    tracing::warn!(%error, "connection lost");
                    self.last_error = Some(error);
                }
                ServerEvent::Stopped => self.stopped = true,
                _ => {}
            }
        }
        // Hand out requests while workers are free; the rest wait in the prefetch buffer.
        let wall = wall_now();
        while machine.in_flight() < self.limit {
            let Some(request) = machine.poll_request(now, wall) else {
                break;
            };
            let token = request.token;
            let view = Request {
                body: request.body,
                properties: request.properties,
            };
            // A panicking handler still answers: the caller learns the request failed instead of
            // waiting for its timeout.
            let mut run = Box::pin(AssertUnwindSafe((self.handler)(view)).catch_unwind().map(
                |r| {
                    r.unwrap_or_else(|_| {
                        Err(HandlerError::Failed {
                            code: "handler_panicked".into(),
                            message: "the handler panicked".into(),
                        })
                    })
                },
            ));
            // A handler that finishes without waiting (like fib) is answered right here, so its
            // reply leaves in this loop turn's write; only one that waits gets a task of its own.
            match (&mut run).now_or_never() {
                Some(result) => machine.reply(now, token, result),
                None => {
                    let mut done = self.done.clone();
                    R::spawn(async move {
                        let result = run.await;
                        // If the server is gone, the token drops here and the request goes back.
                        let _ = done.send(Command::Done { token, result }).await;
                    });
                }
            }
        }
    }

    fn on_command(&mut self, machine: &mut RpcServer, now: Instant, command: Command) {
        match command {
            Command::Done { token, result } => machine.reply(now, token, result),
            Command::Shutdown => {
                tracing::info!("shutting down: cancelling the consumer and draining");
                machine.shutdown(now);
            }
        }
    }

    fn on_handles_dropped(&mut self, _machine: &mut RpcServer, _now: Instant) {
        // `Workers` holds a sender itself, so this cannot happen while it lives.
    }

    /// Shut down: a backoff wait or a TCP connect in progress is abandoned at once.
    fn finished(&self, machine: &RpcServer) -> bool {
        self.stopped || machine.is_stopped()
    }
}

impl<R, H, F> Session<RpcServer> for Workers<R, H>
where
    R: Runtime,
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
{
    fn take_was_ready(&mut self) -> bool {
        std::mem::take(&mut self.was_ready)
    }

    fn ever_ready(&self) -> bool {
        self.ever_ready
    }

    fn last_error(&self) -> Option<&ConnectionError> {
        self.last_error.as_ref()
    }
}
