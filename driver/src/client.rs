//! The async RPC client: a cheap, cloneable handle to one driver task that owns the
//! connection.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqp_rpc_core::rpc::{
    CallId, CallRequest, ClientConfig, ClientEvent, ClientStats, CorrelationKey, ReplyMode,
    RpcClient, RpcReply, UnixMillis,
};
use amqp_rpc_core::{ConnectionError, RpcError, UsageError};
use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_util::SinkExt;

use crate::addresses::Addresses;
use crate::io_loop::Handler;
use crate::options::ConnectError;
use crate::reconnect::{run_session, Backoff, Session};
use crate::state::{ConnectionState, StateCell};
use crate::stats::{Publisher, Shared, Snapshot};
use crate::Runtime;
use crate::{metrics, telemetry};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Broker addresses (one, or the nodes of a cluster) and their connection settings.
    pub connect: Addresses,
    /// RPC settings (reply mode, in-flight bound, server check, and whether each request is
    /// `mandatory` and carries an `expiration` and the deadline header: all three on by default,
    /// see the core's `ClientConfig` for what each guarantees), e.g.
    /// `options.rpc.mandatory = false`.
    pub rpc: ClientConfig,
    /// Timeout of [`Client::call`].
    pub default_timeout: Duration,
    /// How to reconnect after the connection is lost.
    pub backoff: Backoff,
    /// Whether a failed first connect is retried with `backoff` (`false`: [`Client::connect`]
    /// fails at once with a clear error, which is what a command-line tool wants).
    pub retry_first_connect: bool,
}

impl ClientOptions {
    /// Options for `uri` (or a comma-separated list of URIs, see [`Addresses::parse`]) with
    /// defaults for the rest.
    pub fn from_uri(uri: &str) -> Result<Self, ConnectError> {
        Self::from_uris([uri])
    }

    /// Options for the brokers at `uris`, e.g. the nodes of a cluster (see
    /// [`Addresses::from_uris`]), with defaults for the rest.
    pub fn from_uris<S: AsRef<str>>(
        uris: impl IntoIterator<Item = S>,
    ) -> Result<Self, ConnectError> {
        Ok(Self {
            connect: Addresses::from_uris(uris)?,
            rpc: ClientConfig::default(),
            default_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            retry_first_connect: false,
        })
    }
}

/// Why a call did not return a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallError {
    /// The call ran its course and ended without a reply (see [`RpcError::may_have_run`]).
    Rpc(RpcError),
    /// The client already has its limit of calls in flight. Never sent.
    TooManyCalls {
        /// The limit ([`ClientConfig::max_in_flight`]).
        limit: usize,
    },
    /// The client is closed. Never sent.
    Closed,
    /// The client has no connection to send the call on: the broker refuses it while the
    /// client retries (the call waited out its deadline in
    /// [`ConnectionState::Refused`]), or the client gave up reconnecting
    /// ([`ConnectionState::Failed`]). `error` is the broker's refusal with its reply code and
    /// words, or why the connection ended. Never sent.
    Unavailable {
        /// The broker's refusal, or why the connection ended.
        error: ConnectionError,
    },
    /// The request is malformed (a name longer than 255 bytes). Never sent.
    Invalid(UsageError),
    /// The request's payload could not be encoded (`Client::call_json` with a value that has
    /// no JSON form, e.g. a map whose keys are not strings). Never sent.
    Encode {
        /// Why, from the encoder.
        message: String,
    },
    /// A reply came, but not in the form the caller expects (`Client::call_json`): its content
    /// type says another format, or its body does not decode into the reply's type. The
    /// server ran the request.
    Decode {
        /// The reply's content type, if it had one.
        content_type: Option<String>,
        /// Why, from the decoder.
        message: String,
    },
}

impl CallError {
    /// Whether a server may have run the request.
    pub fn may_have_run(&self) -> bool {
        match self {
            CallError::Rpc(e) => e.may_have_run(),
            CallError::Decode { .. } => true,
            _ => false,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Rpc(e) => e.fmt(f),
            CallError::TooManyCalls { limit } => {
                write!(f, "too many calls in flight (limit {limit})")
            }
            CallError::Closed => f.write_str("client is closed"),
            CallError::Unavailable { error } => write!(f, "no connection to RabbitMQ: {error}"),
            CallError::Invalid(e) => write!(f, "invalid request: {e}"),
            CallError::Encode { message } => write!(f, "request not encodable: {message}"),
            CallError::Decode {
                content_type,
                message,
            } => write!(
                f,
                "reply not decodable (content type {}): {message}",
                content_type.as_deref().unwrap_or("none")
            ),
        }
    }
}

impl std::error::Error for CallError {}

impl From<RpcError> for CallError {
    fn from(e: RpcError) -> Self {
        CallError::Rpc(e)
    }
}

/// Names a call between a caller and the driver task, before the machine gives it a
/// [`CallId`]: the caller picks it, so that a caller that gives up can say which call it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct CallKey(u64);

// `Call` is the hot variant and `Close` happens once: boxing the request to shrink the enum
// would cost an allocation per call.
#[allow(clippy::large_enum_variant)]
enum Command {
    Call {
        key: CallKey,
        request: CallRequest,
        reply: oneshot::Sender<Result<RpcReply, CallError>>,
        /// The call's span: events and its outcome are recorded in it by the driver task.
        span: tracing::Span,
    },
    /// The caller dropped its future: the call is cancelled and its slot freed.
    Cancel {
        key: CallKey,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// Cancels its call when dropped before [`CancelOnDrop::disarm`]: dropping a call's future
/// (a `select!` with a timeout, a cancelled task) means the caller gave up.
struct CancelOnDrop {
    commands: mpsc::Sender<Command>,
    key: CallKey,
    armed: bool,
}

impl CancelOnDrop {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            // A fresh clone of the sender has a slot of its own in the channel (futures'
            // bounded mpsc: capacity is buffer + number of senders), so this succeeds unless
            // the driver is gone, and then there is nothing to cancel.
            let _ = self
                .commands
                .clone()
                .try_send(Command::Cancel { key: self.key });
        }
    }
}

/// An RPC client. Clone it freely: every clone talks to the same connection, and many tasks
/// may call at once.
pub struct Client<R: Runtime> {
    commands: mpsc::Sender<Command>,
    next_key: Arc<AtomicU64>,
    state: Arc<StateCell>,
    stats: Arc<Shared<ClientStats>>,
    default_timeout: Duration,
    reply_mode: ReplyMode,
    _runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> Clone for Client<R> {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
            next_key: Arc::clone(&self.next_key),
            state: Arc::clone(&self.state),
            stats: Arc::clone(&self.stats),
            default_timeout: self.default_timeout,
            reply_mode: self.reply_mode,
            _runtime: PhantomData,
        }
    }
}

impl<R: Runtime> fmt::Debug for Client<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("default_timeout", &self.default_timeout)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> Client<R> {
    /// Connects to the broker at `uri` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`, or a
    /// comma-separated list of a cluster's nodes) and arms the reply path. Fails promptly with a
    /// clear error when the broker is unreachable or refuses the credentials.
    pub async fn connect(uri: &str) -> Result<Self, ConnectError> {
        Self::connect_with(ClientOptions::from_uri(uri)?).await
    }

    /// Connects with explicit options.
    pub async fn connect_with(options: ClientOptions) -> Result<Self, ConnectError> {
        let (tx, rx) = mpsc::channel(1024);
        let (ready_tx, ready_rx) = oneshot::channel();
        let default_timeout = options.default_timeout;
        let reply_mode = options.rpc.reply_mode;
        let state = StateCell::new();
        let stats = Shared::new();
        R::spawn(run::<R>(
            options,
            rx,
            ready_tx,
            Arc::clone(&state),
            Publisher::new(Arc::clone(&stats)),
        ));
        match ready_rx.await {
            Ok(Ok(())) => Ok(Self {
                commands: tx,
                next_key: Arc::new(AtomicU64::new(0)),
                state,
                stats,
                default_timeout,
                reply_mode,
                _runtime: PhantomData,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnectError::Connection(ConnectionError::ConnectionLost)),
        }
    }

    /// Calls `queue` with `body` and the default timeout; returns the reply body.
    pub async fn call(&self, queue: &str, body: impl Into<Bytes>) -> Result<Bytes, CallError> {
        let request = CallRequest::new(queue, body, self.default_timeout);
        self.call_with(request).await.map(|reply| reply.body)
    }

    /// Makes a call with every option: exchange, routing key, timeout, properties, idempotence.
    ///
    /// Dropping the returned future before it completes cancels the call: its slot among the
    /// [`ClientConfig::max_in_flight`] is free at once, and a reply that comes later is dropped
    /// (counted as late). The request may still run on a server if it was already sent.
    ///
    /// The call runs in a span `rpc.call` (a child of the caller's current span), which records
    /// its outcome.
    pub async fn call_with(&self, mut request: CallRequest) -> Result<RpcReply, CallError> {
        let span = telemetry::call_span(&request.exchange, &request.routing_key, self.reply_mode);
        telemetry::inject(&span, &mut request.properties);
        let started = Instant::now();
        let (reply, rx) = oneshot::channel();
        let key = CallKey(self.next_key.fetch_add(1, Ordering::Relaxed));
        let mut guard = CancelOnDrop {
            commands: self.commands.clone(),
            key,
            armed: true,
        };
        guard
            .commands
            .send(Command::Call {
                key,
                request,
                reply,
                span: span.clone(),
            })
            .await
            .map_err(|_| {
                let closed = self.closed();
                telemetry::call_ended(&span, &Err(closed.clone()));
                closed
            })?;
        let result = match rx.await {
            Ok(result) => result,
            Err(_) => Err(self.closed()),
        };
        guard.disarm();
        metrics::call_duration(telemetry::call_outcome(&result), started);
        result
    }

    /// Why a call cannot be made now that the driver task is gone: the error reconnecting
    /// gave up with, else `Closed`.
    fn closed(&self) -> CallError {
        match self.state.get() {
            ConnectionState::Failed { error } => CallError::Unavailable { error },
            _ => CallError::Closed,
        }
    }

    /// The timeout of [`Client::call`] ([`ClientOptions::default_timeout`]).
    pub fn default_timeout(&self) -> Duration {
        self.default_timeout
    }

    /// The connection's state now.
    pub fn state(&self) -> ConnectionState {
        self.state.get()
    }

    /// Every later change of the connection's state (a subscriber more than 16 changes behind
    /// misses some; [`Client::state`] is always current).
    pub fn watch_state(&self) -> mpsc::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    /// The client's counters, summed over every connection it had: calls started, answered,
    /// failed and cancelled, requests sent, late, duplicate and unknown replies, reply paths
    /// re-armed. Up to date as of the driver task's last wake-up; reading never waits for it.
    pub fn stats(&self) -> ClientStats {
        self.stats.get().stats
    }

    /// Calls started and not ended yet (a gauge, as of the driver task's last wake-up). Calls
    /// still queued for the driver task are not counted.
    pub fn in_flight(&self) -> usize {
        self.stats.get().in_flight
    }

    /// Closes the connection cleanly. Calls still in flight end with `ConnectionLost`.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        let mut commands = self.commands.clone();
        if commands.send(Command::Close { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The wall clock, for the deadline header.
pub(crate) fn wall_now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    UnixMillis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// A call the driver task waits on: its caller's key, where its result goes, and its span.
type Pending = (
    CallKey,
    oneshot::Sender<Result<RpcReply, CallError>>,
    tracing::Span,
);

/// The driver task's side: callers waiting for their calls.
struct Callers {
    pending: HashMap<CallId, Pending>,
    /// The machine's id of each pending call, by the caller's key.
    keys: HashMap<CallKey, CallId>,
    ready: Option<oneshot::Sender<Result<(), ConnectError>>>,
    closing: Vec<oneshot::Sender<()>>,
    shutting_down: bool,
    last_error: Option<ConnectionError>,
    /// The broker's refusal while reconnecting, or the error reconnecting gave up with: calls
    /// that end unsent meanwhile end with it.
    refused: Option<ConnectionError>,
    /// Whether the reply path was armed since the last reconnect attempt (resets the backoff).
    was_ready: bool,
    retry_first_connect: bool,
    state: Arc<StateCell>,
    stats: Publisher<ClientStats>,
}

impl Session<RpcClient> for Callers {
    fn take_was_ready(&mut self) -> bool {
        std::mem::take(&mut self.was_ready)
    }

    fn ever_ready(&self) -> bool {
        self.ready.is_none()
    }

    fn retry_first_connect(&self) -> bool {
        self.retry_first_connect
    }

    fn last_error(&self) -> Option<&ConnectionError> {
        self.last_error.as_ref()
    }

    fn on_reconnecting(&mut self, attempt: u32, delay: Duration) {
        tracing::info!(attempt, ?delay, "reconnecting");
        metrics::reconnecting("client");
        self.refused = None;
        self.state.set(ConnectionState::Reconnecting { attempt });
    }

    fn on_refused(&mut self, attempt: u32, delay: Duration, error: &ConnectionError) {
        tracing::warn!(attempt, ?delay, %error, "the broker refused the connection; retrying");
        metrics::reconnecting("client");
        self.refused = Some(error.clone());
        self.state.set(ConnectionState::Refused {
            attempt,
            error: error.clone(),
        });
    }
}

impl Handler<RpcClient> for Callers {
    type Command = Command;

    fn on_wake(&mut self, machine: &mut RpcClient, _now: Instant) {
        while let Some(event) = machine.poll_event() {
            match event {
                ClientEvent::Ready => {
                    tracing::debug!("reply path armed");
                    self.was_ready = true;
                    self.refused = None;
                    self.state.set(ConnectionState::Connected);
                    if let Some(ready) = self.ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                }
                ClientEvent::CallEnded { call, result } => {
                    if let Some((key, tx, span)) = self.pending.remove(&call) {
                        self.keys.remove(&key);
                        let result = result.map_err(|e| match (e, &self.refused) {
                            // Never sent because the broker refuses us: say so.
                            (
                                RpcError::Expired | RpcError::ConnectionLost { sent: false },
                                Some(error),
                            ) => CallError::Unavailable {
                                error: error.clone(),
                            },
                            (e, _) => CallError::Rpc(e),
                        });
                        telemetry::call_ended(&span, &result);
                        // The caller may have given up (dropped its future); nothing to do then.
                        let _ = tx.send(result);
                    }
                }
                ClientEvent::Blocked { reason } => {
                    tracing::warn!(%reason, "broker blocked the connection");
                    self.state.set(ConnectionState::Blocked { reason });
                }
                ClientEvent::Unblocked => {
                    tracing::info!("broker unblocked the connection");
                    self.state.set(ConnectionState::Connected);
                }
                ClientEvent::Disconnected(error) => {
                    tracing::warn!(%error, "connection lost");
                    self.last_error = Some(error);
                }
                _ => {}
            }
        }
        let now = Snapshot {
            stats: machine.stats(),
            in_flight: machine.in_flight(),
        };
        if let Some(before) = self.stats.publish(now) {
            metrics::client_changed(&before, &now);
        }
    }

    fn on_command(&mut self, machine: &mut RpcClient, now: Instant, command: Command) {
        match command {
            Command::Call {
                key,
                request,
                reply,
                span,
            } => {
                let refused = match machine.call(now, wall_now(), request) {
                    Ok(id) => {
                        telemetry::call_queued(&span, id.0);
                        self.pending.insert(id, (key, reply, span));
                        self.keys.insert(key, id);
                        return;
                    }
                    Err(UsageError::TooManyCalls { limit }) => CallError::TooManyCalls { limit },
                    Err(UsageError::ShutDown) => CallError::Closed,
                    Err(e) => CallError::Invalid(e),
                };
                let refused = Err(refused);
                telemetry::call_ended(&span, &refused);
                let _ = reply.send(refused);
            }
            Command::Cancel { key } => {
                // Unknown when the call ended before the caller gave up: nothing to do then.
                if let Some(id) = self.keys.remove(&key) {
                    if let Some((_, _, span)) = self.pending.remove(&id) {
                        telemetry::call_cancelled(&span);
                    }
                    machine.cancel(id);
                }
            }
            Command::Close { done } => {
                self.closing.push(done);
                self.shutting_down = true;
                machine.close(now);
            }
        }
    }

    fn on_handles_dropped(&mut self, machine: &mut RpcClient, now: Instant) {
        self.shutting_down = true;
        machine.close(now);
    }

    /// Closed: a backoff wait or a TCP connect in progress is abandoned at once, so that
    /// `Client::close` returns promptly while reconnecting.
    fn finished(&self, _machine: &RpcClient) -> bool {
        self.shutting_down
    }
}

/// The driver task: connect, drive, and reconnect with backoff until closed.
async fn run<R: Runtime>(
    options: ClientOptions,
    mut commands: mpsc::Receiver<Command>,
    ready: oneshot::Sender<Result<(), ConnectError>>,
    state: Arc<StateCell>,
    stats: Publisher<ClientStats>,
) {
    let rotation = options.connect.rotation();
    let config = rotation.current().connection_config();
    let mut machine = RpcClient::new(
        options.rpc.clone(),
        config.clone(),
        CorrelationKey::random(),
        Instant::now(),
    );
    let mut callers = Callers {
        pending: HashMap::new(),
        keys: HashMap::new(),
        ready: Some(ready),
        closing: Vec::new(),
        shutting_down: false,
        last_error: None,
        refused: None,
        was_ready: false,
        retry_first_connect: options.retry_first_connect,
        state,
        stats,
    };
    let outcome = run_session::<R, _, _>(
        rotation,
        config,
        &options.backoff,
        &mut machine,
        &mut commands,
        &mut callers,
    )
    .await;
    match outcome {
        Ok(()) => callers.state.set(ConnectionState::Closed),
        Err(error) => {
            let gave_up = error.connection_error();
            callers.refused = Some(gave_up.clone());
            callers
                .state
                .set(ConnectionState::Failed { error: gave_up });
            if let Some(ready) = callers.ready.take() {
                let _ = ready.send(Err(error));
            }
        }
    }
    machine.abandon();
    machine.close(Instant::now());
    callers.on_wake(&mut machine, Instant::now());
    for (_, (_, tx, span)) in callers.pending.drain() {
        let closed = Err(match &callers.refused {
            Some(error) => CallError::Unavailable {
                error: error.clone(),
            },
            None => CallError::Closed,
        });
        telemetry::call_ended(&span, &closed);
        let _ = tx.send(closed);
    }
    for done in callers.closing.drain(..) {
        let _ = done.send(());
    }
}
