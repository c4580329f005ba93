//! The async RPC server: one driver task owns the connection; each request runs in a task of
//! its own (or on the blocking pool, with [`Server::serve_blocking`]), at most `workers` at
//! once. No handler ever runs on the driver task: one that blocks would stop the heartbeats
//! and every other request.

use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rpc_core::rpc::{
    HandlerError, ReplyToken, Response, RpcServer, ServerConfig, ServerEvent, ServerStats,
    DEADLINE_EXCEEDED, HANDLER_PANICKED, HANDLER_TIMEOUT,
};
use amqp_rpc_core::types::BasicProperties;
use amqp_rpc_core::ConnectionError;
use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_util::future::{self, select, Either};
use futures_util::{FutureExt, SinkExt};
use tracing::Instrument;

use crate::addresses::Addresses;
use crate::client::wall_now;
use crate::io_loop::Handler;
use crate::options::ConnectError;
use crate::reconnect::{run_session, Backoff, Session};
use crate::stats::{Publisher, Shared, Snapshot};
use crate::Runtime;
use crate::{metrics, telemetry};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Broker addresses (one, or the nodes of a cluster) and their connection settings.
    pub connect: Addresses,
    /// Queue, prefetch, and the queue type to declare when it is missing.
    pub rpc: ServerConfig,
    /// Most requests handled at once.
    pub workers: usize,
    /// How to reconnect after the connection is lost ([`Backoff::server`] by default).
    pub backoff: Backoff,
}

impl ServerOptions {
    /// Options for serving `queue` on the broker at `uri` (or a comma-separated list of URIs),
    /// with one worker and prefetch 1 as in the tutorial.
    pub fn from_uri(uri: &str, queue: &str) -> Result<Self, ConnectError> {
        Self::from_uris([uri], queue)
    }

    /// Options for serving `queue` on the brokers at `uris`, e.g. the nodes of a cluster (see
    /// [`Addresses::from_uris`]; each may be a comma-separated list), with one worker and
    /// prefetch 1.
    pub fn from_uris<S: AsRef<str>>(
        uris: impl IntoIterator<Item = S>,
        queue: &str,
    ) -> Result<Self, ConnectError> {
        Ok(Self {
            connect: Addresses::from_uris(uris)?,
            rpc: ServerConfig::new(queue),
            workers: 1,
            backoff: Backoff::server(),
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
    /// When the caller gives up (see [`amqp_rpc_core::rpc::Request::deadline`]). A handler
    /// still running then is abandoned: its caller gets the error reply `deadline_exceeded`.
    pub deadline: Option<Instant>,
}

/// A handler's answer, boxed so that async and blocking handlers share one worker path.
type Answer = Pin<Box<dyn Future<Output = Result<Response, HandlerError>> + Send>>;
/// A handler as the workers run it.
pub(crate) type Run = Arc<dyn Fn(Request) -> Answer + Send + Sync>;

/// What [`Server::serve`] returns once shut down.
#[derive(Debug, Clone, Copy)]
pub struct ServerReport {
    /// The machine's counters, summed over every connection it had (they survive reconnects).
    pub stats: ServerStats,
}

// `Done` is the hot variant and `Shutdown` happens once: boxing the answer to shrink the enum
// would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Command {
    Done {
        token: ReplyToken,
        result: Result<Response, HandlerError>,
    },
    Shutdown,
}

/// Stops a running server gracefully (cancel the consumer, finish requests in flight, close),
/// and reads its counters while it serves.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    commands: mpsc::Sender<Command>,
    stats: Arc<Shared<ServerStats>>,
    ready: FirstReady,
}

/// Resolves once the server first consumes: `Ok(())`, or `Err(Canceled)` when it ended before.
type FirstReady = future::Shared<oneshot::Receiver<()>>;

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

    /// The server's counters so far, summed over every connection it had (what
    /// [`ServerReport::stats`] says at the end). Up to date as of the driver task's last
    /// wake-up; reading never waits for it.
    pub fn stats(&self) -> ServerStats {
        self.stats.get().stats
    }

    /// Requests handed to the handler and not answered yet (a gauge, at most
    /// [`ServerOptions::workers`]).
    pub fn in_flight(&self) -> usize {
        self.stats.get().in_flight
    }

    /// Waits until the server consumes its queue for the first time: `true` then, at once if
    /// it already did; `false` when it ended without ever consuming (its first connect failed,
    /// or it was shut down first). Calls made after `true` find a consumer (barring a later
    /// connection loss). For every later re-consume after a reconnect, see [`Server::on_ready`].
    pub async fn ready(&self) -> bool {
        self.ready.clone().await.is_ok()
    }
}

/// An RPC server.
pub struct Server<R: Runtime> {
    options: ServerOptions,
    commands: mpsc::Sender<Command>,
    receiver: mpsc::Receiver<Command>,
    on_ready: Option<Box<dyn FnMut() + Send>>,
    first_ready: oneshot::Sender<()>,
    ready: FirstReady,
    stats: Arc<Shared<ServerStats>>,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> Server<R> {
    /// A server with these options; nothing happens until [`Server::serve`].
    pub fn new(options: ServerOptions) -> Self {
        let (commands, receiver) = mpsc::channel(1024);
        let (first_ready, ready) = oneshot::channel();
        Self {
            options,
            commands,
            receiver,
            on_ready: None,
            first_ready,
            ready: ready.shared(),
            stats: Shared::new(),
            _runtime: PhantomData,
        }
    }

    /// A handle that shuts the server down.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            commands: self.commands.clone(),
            stats: Arc::clone(&self.stats),
            ready: self.ready.clone(),
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
    ///
    /// Each request runs in a task of its own, never on the task that owns the connection. A
    /// handler that panics (in its future, or in the call that makes it) answers
    /// `handler_panicked`; one still running at the request's deadline is dropped and answers
    /// `deadline_exceeded`. A handler that blocks its thread still holds up the runtime's
    /// worker it runs on: use [`Server::serve_blocking`] for blocking code.
    ///
    /// A handler answers anything that becomes a [`Response`]: bytes (`Bytes`, `Vec<u8>`,
    /// `String`, `&'static str`) for a bare reply, or a `Response` to also set the reply's
    /// content type, content encoding and headers. The reply's correlation id and error
    /// headers (`x-rpc-error`, `x-rpc-rejected`) are the server's: a handler cannot set them
    /// (see [`Response`]); an error reply is an `Err(HandlerError)`.
    pub async fn serve<H, F, T>(self, handler: H) -> Result<ServerReport, ConnectError>
    where
        H: Fn(Request) -> F + Send + Sync + 'static,
        F: Future<Output = Result<T, HandlerError>> + Send + 'static,
        T: Into<Response>,
    {
        let run: Run = Arc::new(move |request| -> Answer {
            Box::pin(handler(request).map(|result| result.map(Into::into)))
        });
        self.run(run).await
    }

    /// Like [`Server::serve`], for a blocking handler: each request runs on the runtime's pool
    /// of blocking threads ([`Runtime::spawn_blocking`]), so that a handler that computes or
    /// sleeps for a long time delays neither heartbeats nor other requests. A handler still
    /// running at the request's deadline cannot be stopped: its caller gets
    /// `deadline_exceeded` and its worker slot is freed at once, and its result is discarded
    /// when it ends.
    pub async fn serve_blocking<H, T>(self, handler: H) -> Result<ServerReport, ConnectError>
    where
        H: Fn(Request) -> Result<T, HandlerError> + Send + Sync + 'static,
        T: Into<Response>,
    {
        let handler = Arc::new(handler);
        let run: Run = Arc::new(move |request| -> Answer {
            let handler = Arc::clone(&handler);
            let (tx, rx) = oneshot::channel();
            R::spawn_blocking(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| handler(request)))
                    .map_or_else(|_| Err(panicked()), |result| result.map(Into::into));
                // The receiver is gone when the request was abandoned at its deadline.
                let _ = tx.send(result);
            });
            // A pool that drops the closure without running it (shutting down) loses the
            // sender: answer as a failure rather than hang.
            Box::pin(rx.map(|r| r.unwrap_or_else(|_| Err(panicked()))))
        });
        self.run(run).await
    }

    /// Runs the server's loop in a task of its own, and waits for its report. The loop is never
    /// the future the caller's runtime blocks on: on a current-thread tokio runtime, a handler's
    /// answer that wakes a spawned task just queues it, whereas waking the `block_on` future
    /// costs the runtime a poll of its I/O driver (an `epoll_wait`) per turn. Dropping the
    /// returned future stops the loop, as before.
    pub(crate) async fn run(self, run: Run) -> Result<ServerReport, ConnectError> {
        let (report, receiver) = oneshot::channel();
        let (session, abort) = futures_util::future::abortable(self.session(run));
        R::spawn(async move {
            if let Ok(result) = session.await {
                let _ = report.send(result);
            }
        });
        let _stop_on_drop = AbortOnDrop(abort);
        // The task ended without a report only when the runtime dropped it (shutting down).
        receiver.await.unwrap_or(Err(ConnectError::Connection(
            ConnectionError::ConnectionLost,
        )))
    }

    async fn session(self, run: Run) -> Result<ServerReport, ConnectError> {
        let Server {
            options,
            commands,
            mut receiver,
            on_ready,
            first_ready,
            stats,
            ..
        } = self;
        let rotation = options.connect.rotation();
        let config = rotation.current().connection_config();
        let mut machine = RpcServer::new(options.rpc.clone(), config.clone(), Instant::now());
        let mut workers = Workers::<R> {
            run,
            done: commands,
            limit: options.workers.max(1),
            on_ready,
            first_ready: Some(first_ready),
            ever_ready: false,
            was_ready: false,
            last_error: None,
            stopped: false,
            stats: Publisher::new(stats),
            queue: options.rpc.queue.clone(),
            handler_timeout: options.rpc.handler_timeout,
            _runtime: PhantomData,
        };
        run_session::<R, _, _>(
            rotation,
            config,
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

/// Stops the server's loop when the future waiting for it is dropped.
struct AbortOnDrop(futures_util::future::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The error a panicking handler answers with.
fn panicked() -> HandlerError {
    HandlerError::Failed {
        code: HANDLER_PANICKED.into(),
        message: "the handler panicked".into(),
    }
}

/// Runs one request to its answer: the handler, caught if it panics, bounded by the request's
/// deadline.
async fn answer<R: Runtime>(
    run: Run,
    request: Request,
    handler_timeout: Option<Duration>,
) -> Result<Response, HandlerError> {
    // The handler's own limit, when it comes before the caller's deadline.
    let limit = handler_timeout.and_then(|t| Instant::now().checked_add(t));
    let (deadline, code, message) = match (request.deadline, limit) {
        (Some(d), Some(l)) if l < d => (Some(l), HANDLER_TIMEOUT, HANDLER_TIMEOUT_MESSAGE),
        (None, Some(l)) => (Some(l), HANDLER_TIMEOUT, HANDLER_TIMEOUT_MESSAGE),
        (d, _) => (d, DEADLINE_EXCEEDED, DEADLINE_EXCEEDED_MESSAGE),
    };
    // The call that makes the future may panic too, before any future exists.
    let work = match std::panic::catch_unwind(AssertUnwindSafe(|| run(request))) {
        Ok(future) => AssertUnwindSafe(future)
            .catch_unwind()
            .map(|r| r.unwrap_or_else(|_| Err(panicked())))
            .left_future(),
        Err(_) => futures_util::future::ready(Err(panicked())).right_future(),
    };
    let Some(deadline) = deadline else {
        return work.await;
    };
    match select(work, Box::pin(R::sleep_until(deadline))).await {
        Either::Left((result, _)) => result,
        // Dropping the handler's future cancels it; its caller has given up by now, and the
        // worker slot is needed more than the answer.
        Either::Right(_) => Err(HandlerError::Failed {
            code: code.into(),
            message: message.into(),
        }),
    }
}

const DEADLINE_EXCEEDED_MESSAGE: &str = "the handler was still running at the caller's deadline";
const HANDLER_TIMEOUT_MESSAGE: &str =
    "the handler was still running at the server's handler_timeout";

/// The driver task's side: spawning handlers and collecting their results.
struct Workers<R: Runtime> {
    run: Run,
    done: mpsc::Sender<Command>,
    limit: usize,
    on_ready: Option<Box<dyn FnMut() + Send>>,
    /// Resolves [`ServerHandle::ready`] at the first `Ready`.
    first_ready: Option<oneshot::Sender<()>>,
    ever_ready: bool,
    was_ready: bool,
    last_error: Option<ConnectionError>,
    stopped: bool,
    stats: Publisher<ServerStats>,
    /// The queue served, for the requests' spans.
    queue: String,
    /// [`ServerConfig::handler_timeout`].
    handler_timeout: Option<Duration>,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> Handler<RpcServer> for Workers<R> {
    type Command = Command;

    fn on_wake(&mut self, machine: &mut RpcServer, now: Instant) {
        while let Some(event) = machine.poll_event() {
            match event {
                ServerEvent::Ready => {
                    self.ever_ready = true;
                    self.was_ready = true;
                    if let Some(tx) = self.first_ready.take() {
                        let _ = tx.send(());
                    }
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
                ServerEvent::ReplyRefused {
                    correlation_id,
                    error,
                } => tracing::warn!(
                    %error,
                    correlation_id = correlation_id.as_deref().unwrap_or(""),
                    "the broker refused a reply even alone in flight; its request was acked \
                     without a reply so that it cannot loop"
                ),
                ServerEvent::AckTimedOut(error) => tracing::warn!(
                    %error,
                    "the broker closed the consuming channel: a request stayed unacknowledged \
                     past its consumer_timeout, and every request on the channel is \
                     redelivered; raise the broker's consumer_timeout above the slowest \
                     handler, or set ServerConfig::handler_timeout below it"
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
            let span = telemetry::request_span(&self.queue, &request.properties);
            if let Some(timestamp) = *request.properties.timestamp() {
                metrics::queue_wait(timestamp, wall.0);
            }
            let view = Request {
                body: request.body,
                properties: request.properties,
                deadline: request.deadline,
            };
            let run = Arc::clone(&self.run);
            let handler_timeout = self.handler_timeout;
            let mut done = self.done.clone();
            R::spawn(async move {
                let started = Instant::now();
                let result = answer::<R>(run, view, handler_timeout)
                    .instrument(span.clone())
                    .await;
                let outcome = telemetry::request_answered(&span, &result);
                metrics::request_answered(outcome, started.elapsed());
                // If the server is gone, the token drops here and the request goes back.
                let _ = done.send(Command::Done { token, result }).await;
            });
        }
        let now = Snapshot {
            stats: machine.stats(),
            in_flight: machine.in_flight(),
        };
        if let Some(before) = self.stats.publish(now) {
            metrics::server_changed(&before, &now);
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

impl<R: Runtime> Session<RpcServer> for Workers<R> {
    fn take_was_ready(&mut self) -> bool {
        std::mem::take(&mut self.was_ready)
    }

    fn ever_ready(&self) -> bool {
        self.ever_ready
    }

    fn last_error(&self) -> Option<&ConnectionError> {
        self.last_error.as_ref()
    }

    fn on_reconnecting(&mut self, attempt: u32, delay: Duration) {
        tracing::info!(attempt, ?delay, "reconnecting");
        metrics::reconnecting("server");
    }
}
