//! The RPC client machine: calls out, replies matched by correlation id, every call ended
//! exactly once.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::Bytes;

use super::{UnixMillis, DEADLINE_HEADER, DIRECT_REPLY_TO, ERROR_HEADER, REJECTED_HEADER};
use crate::connection::{
    BasicProperties, Connection, ConnectionConfig, ConsumeOptions, Delivery, Event, QueueOptions,
    Reply, Returned,
};
use crate::error::{ConnectionError, RpcError, UsageError};
use crate::ids::{ChannelId, ReplyCode, RequestId};

/// Identifies one call from [`RpcClient::call`] to its [`ClientEvent::CallEnded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u64);

/// Where replies come back (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyMode {
    /// RabbitMQ's direct reply-to pseudo-queue: no queue to declare, nothing left behind.
    DirectReplyTo,
    /// An exclusive, server-named queue declared per connection. The default: once the broker is
    /// the bottleneck it sustains more calls per second than direct reply-to (see the README's
    /// figures).
    #[default]
    ExclusiveQueue,
}

/// RPC client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where replies come back.
    pub reply_mode: ReplyMode,
    /// Most calls in flight (sent or waiting to be sent); [`RpcClient::call`] refuses more with
    /// [`UsageError::TooManyCalls`].
    pub max_in_flight: usize,
    /// How often the consumer count of a request queue is refreshed (a passive `queue.declare`
    /// on a channel of its own), for [`RpcError::NoServers`]; `None` turns the check off.
    ///
    /// The first call to a queue waits for the first count. After that calls go out at once
    /// while the last count was above zero, and a count older than this interval is refreshed
    /// in the background by the next call. While the count is zero and fresh, calls fail with
    /// `NoServers` at once; while it is zero and stale, calls wait for the refresh. Only calls
    /// through the default exchange (routing key = queue name) are checked.
    pub server_check: Option<Duration>,
    /// Outbound bytes the connection may hold before new requests wait (backpressure when the
    /// network or broker is slower than the callers).
    pub outbound_high_water: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            reply_mode: ReplyMode::default(),
            max_in_flight: 4096,
            server_check: Some(Duration::from_secs(1)),
            outbound_high_water: 4 * 1024 * 1024,
        }
    }
}

/// One call to make.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// Exchange to publish to; empty for the default exchange.
    pub exchange: String,
    /// Routing key; with the default exchange, the request queue's name.
    pub routing_key: String,
    /// Request body.
    pub body: Bytes,
    /// How long the caller waits for the reply, from [`RpcClient::call`].
    pub timeout: Duration,
    /// Extra properties (content type, headers...). `reply_to`, `correlation_id` and
    /// `expiration` are set by the client; an `expiration` here lowers the one it computes.
    pub properties: BasicProperties,
    /// Whether running the request twice is harmless: such a call is sent again after a
    /// connection loss, instead of ending with `ConnectionLost`, while its deadline allows.
    pub idempotent: bool,
}

impl CallRequest {
    /// A call to `queue` through the default exchange.
    pub fn new(queue: impl Into<String>, body: impl Into<Bytes>, timeout: Duration) -> Self {
        Self {
            exchange: String::new(),
            routing_key: queue.into(),
            body: body.into(),
            timeout,
            properties: BasicProperties::default(),
            idempotent: false,
        }
    }
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcReply {
    /// Reply body.
    pub body: Bytes,
    /// Reply properties.
    pub properties: BasicProperties,
}

/// What the client has to say.
// Made once per call and handed straight to the caller: boxing the reply would cost an
// allocation per call to save a short-lived move (as for `ContentProgress` in the connection).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The reply path is armed: calls go out from now on.
    Ready,
    /// A call ended. Every call ends exactly once.
    CallEnded {
        /// The call.
        call: CallId,
        /// Its outcome.
        result: Result<RpcReply, RpcError>,
    },
    /// The broker blocked the connection (resource alarm): new requests wait.
    Blocked {
        /// The broker's reason.
        reason: String,
    },
    /// The alarm cleared.
    Unblocked,
    /// The connection closed. Calls that were sent have ended; calls not yet sent wait for
    /// [`RpcClient::reconnect`] until their deadline, or end at [`RpcClient::abandon`].
    Disconnected(ConnectionError),
}

/// Counters for what the client saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Calls accepted by [`RpcClient::call`].
    pub calls_started: u64,
    /// Calls ended with a reply (including error replies).
    pub calls_answered: u64,
    /// Calls ended with an error other than an error reply.
    pub calls_failed: u64,
    /// Requests published (a resent idempotent call counts twice).
    pub requests_sent: u64,
    /// Replies for calls that already ended with a reply (the server ran the request twice).
    pub replies_duplicate: u64,
    /// Replies for calls that already ended otherwise (timed out, connection lost).
    pub replies_late: u64,
    /// Replies whose correlation id this client never issued.
    pub replies_unknown: u64,
}

/// A call that has not ended.
#[derive(Debug)]
struct Call {
    request: CallRequest,
    deadline: Instant,
    wall_deadline: UnixMillis,
    sent: bool,
    /// Whether it was ever published (an idempotent call waiting to be sent again was): a
    /// server may have run it, whatever happens next.
    published: bool,
}

/// How a call ended, remembered for a while to tell duplicate replies from late ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Answered,
    Otherwise,
}

/// Longest timeout a call may have; longer ones are cut to it (about 100 years).
const MAX_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Largest `expiration` RabbitMQ accepts, in milliseconds (`?MAX_EXPIRY_TIMER`, 2^32 - 1).
const MAX_EXPIRATION_MS: u128 = 4_294_967_295;

/// How many ended calls are remembered for that purpose.
const RECENT_ENDED: usize = 4096;

/// What the client knows of a request queue's consumers.
#[derive(Debug, Clone, Copy, Default)]
struct QueueStatus {
    consumers: Consumers,
    checked_at: Option<Instant>,
}

/// The answer of the last passive declare of a request queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Consumers {
    /// Not asked yet.
    #[default]
    Unasked,
    /// The queue's consumer count.
    Count(u32),
    /// The queue does not exist (404).
    Absent,
    /// The broker refused to say (403, 405...): calls go out, and the mandatory flag still
    /// catches a queue that is missing.
    Unknown,
}

/// The reply path's progress on the current connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for the connection handshake.
    Connecting,
    /// Channel opened; declare and/or consume in flight. `reply_queue` is the exclusive
    /// queue's server-chosen name once declared.
    Arming {
        channel: ChannelId,
        reply_queue: Option<ShortString>,
    },
    /// Replies are consumed; requests may go out.
    Ready {
        channel: ChannelId,
        reply_to: ShortString,
    },
    /// The connection closed.
    Disconnected,
    /// [`RpcClient::close`] was called.
    ShutDown,
}

/// The RPC client machine. Owns its [`Connection`]; drive it like one.
#[derive(Debug)]
pub struct RpcClient {
    conn: Connection,
    conn_config: ConnectionConfig,
    config: ClientConfig,
    phase: Phase,
    id_prefix: String,
    next_call: u64,
    calls: HashMap<CallId, Call>,
    /// Every pending call by deadline, for `poll_timeout` and `expire`.
    deadlines: BTreeSet<(Instant, CallId)>,
    /// Calls waiting to be sent, oldest first.
    held: VecDeque<CallId>,
    recent: HashMap<CallId, Ended>,
    recent_order: VecDeque<CallId>,
    probe: Probe,
    events: VecDeque<ClientEvent>,
    stats: ClientStats,
    /// Reply-path channels lost in a row before the path was armed.
    arm_failures: u32,
}

/// Reply-path channel losses in a row, before it was armed, after which the client gives the
/// connection up.
const MAX_ARM_FAILURES: u32 = 3;

/// The consumer-count checker: its own channel (a passive declare of a missing queue closes the
/// channel with 404), one passive declare at a time so that a failure names its queue.
#[derive(Debug, Default)]
struct Probe {
    channel: Option<ChannelId>,
    in_flight: Option<(RequestId, String)>,
    queues: HashMap<String, QueueStatus>,
}

/// Bound on distinct request queues whose status is remembered.
const MAX_PROBED_QUEUES: usize = 1024;

impl RpcClient {
    /// A client that starts connecting at `now`. `id_prefix` makes its correlation ids unique
    /// among the clients sharing a server (use a random UUID); it is cut to 200 bytes.
    pub fn new(
        config: ClientConfig,
        conn_config: ConnectionConfig,
        id_prefix: &str,
        now: Instant,
    ) -> Self {
        let mut id_prefix = id_prefix.to_owned();
        // Correlation ids are short strings: prefix, '.', and at most 20 digits.
        while id_prefix.len() > 200 {
            id_prefix.pop();
        }
        Self {
            conn: Connection::new(conn_config.clone(), now),
            conn_config,
            config,
            phase: Phase::Connecting,
            id_prefix,
            next_call: 0,
            calls: HashMap::new(),
            deadlines: BTreeSet::new(),
            held: VecDeque::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            probe: Probe::default(),
            events: VecDeque::new(),
            stats: ClientStats::default(),
            arm_failures: 0,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Inputs and outputs: the Connection's, plus call deadlines.
    // -----------------------------------------------------------------------------------------

    /// Feeds bytes read from the socket.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        self.conn.handle_input(now, bytes);
        self.pump(now);
    }

    /// The byte stream ended.
    pub fn handle_eof(&mut self, now: Instant) {
        self.conn.handle_eof(now);
        self.pump(now);
    }

    /// Runs due timers: the connection's, and call deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.conn.handle_timeout(now);
        self.pump(now);
        self.expire(now);
    }

    /// Appends frames ready to send to `buf`; see [`Connection::poll_transmit`].
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> usize {
        let n = self.conn.poll_transmit(now, buf);
        if !self.held.is_empty() {
            // The driver is taking bytes, so outbound room is free now (whether or not the
            // connection had any left): requests held for backpressure may go. Checking only
            // when `n > 0` stalled them once the connection's buffer ran dry.
            self.flush_held(now);
            return n + self.conn.poll_transmit(now, buf);
        }
        n
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When [`RpcClient::handle_timeout`] must run next: the earliest of the connection's timer
    /// and every call's deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let calls = self.deadlines.first().map(|(at, _)| *at);
        match (self.conn.poll_timeout(), calls) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Getters
    // -----------------------------------------------------------------------------------------

    /// The connection (for its state and negotiated values).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Whether requests go out now (reply path armed, connection open).
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready { .. })
    }

    /// Calls that have not ended.
    pub fn in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Whether everything is done: the connection closed after [`RpcClient::close`], and no
    /// call is left.
    pub fn is_finished(&self) -> bool {
        self.conn.is_closed() && self.calls.is_empty() && self.phase == Phase::ShutDown
    }

    // -----------------------------------------------------------------------------------------
    // Commands
    // -----------------------------------------------------------------------------------------

    /// Starts a call. Returns its id at once; [`ClientEvent::CallEnded`] follows exactly once,
    /// at the latest at `now + request.timeout`. `wall` is the wall clock now, for the
    /// deadline header. Calls made before the client is ready wait, within their deadline.
    pub fn call(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        request: CallRequest,
    ) -> Result<CallId, UsageError> {
        if self.phase == Phase::ShutDown {
            return Err(UsageError::ShutDown);
        }
        if self.calls.len() >= self.config.max_in_flight {
            return Err(UsageError::TooManyCalls {
                limit: self.config.max_in_flight,
            });
        }
        for (field, value) in [
            ("exchange", &request.exchange),
            ("routing key", &request.routing_key),
        ] {
            if value.len() > 255 {
                return Err(UsageError::NameTooLong {
                    field,
                    len: value.len(),
                });
            }
        }
        self.next_call += 1;
        let id = CallId(self.next_call);
        // `Instant + Duration` panics on overflow: a timeout beyond any representable instant
        // is capped. (Falling back to `now` is unreachable on real clocks; the call would
        // then end `Expired`, never panic.)
        let timeout = request.timeout.min(MAX_TIMEOUT);
        let deadline = now.checked_add(timeout).unwrap_or(now);
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let call = Call {
            deadline,
            wall_deadline: UnixMillis(wall.0.saturating_add(timeout_ms)),
            request,
            sent: false,
            published: false,
        };
        self.deadlines.insert((call.deadline, id));
        self.calls.insert(id, call);
        self.stats.calls_started += 1;
        self.held.push_back(id);
        self.flush_held(now);
        Ok(id)
    }

    /// Replaces a closed connection with a new one starting its handshake at `now` (the driver
    /// has opened a new socket). Calls waiting to be sent go out once the reply path is armed
    /// again.
    pub fn reconnect(&mut self, now: Instant) -> Result<(), UsageError> {
        if self.phase == Phase::ShutDown {
            return Err(UsageError::ShutDown);
        }
        if !self.conn.is_closed() {
            return Err(UsageError::Closing);
        }
        self.conn = Connection::new(self.conn_config.clone(), now);
        self.phase = Phase::Connecting;
        self.arm_failures = 0;
        self.probe.channel = None;
        self.probe.in_flight = None;
        Ok(())
    }

    /// Ends every call still waiting to be sent with `ConnectionLost { sent: false }`: the driver
    /// will not reconnect.
    pub fn abandon(&mut self) {
        for id in std::mem::take(&mut self.held) {
            let sent = self.calls.get(&id).is_some_and(|c| c.published);
            self.end(id, Err(RpcError::ConnectionLost { sent }));
        }
    }

    /// Closes the client: every call not answered yet ends (`ConnectionLost`), then the
    /// connection closes cleanly.
    pub fn close(&mut self, now: Instant) {
        if self.phase == Phase::ShutDown {
            return;
        }
        self.phase = Phase::ShutDown;
        self.abandon();
        // In id order: events must not depend on hash order (runs replay exactly).
        let mut sent: Vec<CallId> = self.calls.keys().copied().collect();
        sent.sort();
        for id in sent {
            self.end(id, Err(RpcError::ConnectionLost { sent: true }));
        }
        // An error here means the connection is closed or closing already: nothing to do.
        let _ = self.conn.close(now);
        self.pump(now);
    }

    // -----------------------------------------------------------------------------------------
    // Connection events
    // -----------------------------------------------------------------------------------------

    fn pump(&mut self, now: Instant) {
        while let Some(event) = self.conn.poll_event() {
            self.on_event(now, event);
        }
        self.flush_held(now);
    }

    fn on_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Connected => self.arm(),
            Event::Completed {
                channel,
                request,
                reply,
            } => self.on_completed(now, channel, request, reply),
            Event::Failed { request, error } => {
                if let Some((_, queue)) = self.probe.in_flight.take_if(|(r, _)| *r == request) {
                    // 404: the queue does not exist, so a publish to it would come back.
                    let consumers = if error.code == ReplyCode::NOT_FOUND {
                        Consumers::Absent
                    } else {
                        Consumers::Unknown
                    };
                    self.set_queue_status(
                        &queue,
                        QueueStatus {
                            consumers,
                            checked_at: Some(now),
                        },
                    );
                }
            }
            Event::ChannelClosed(error) => {
                if self.probe.channel == Some(error.channel) {
                    self.probe.channel = None;
                } else if self.rpc_channel() == Some(error.channel) {
                    // The reply path is gone with its channel: calls sent on it may have run.
                    self.lose_sent_calls(now);
                    self.phase = Phase::Connecting;
                    self.arm_failures += 1;
                    if self.arm_failures > MAX_ARM_FAILURES {
                        // The broker keeps refusing the reply path (a permission, a policy):
                        // give the connection up, so that the driver reconnects with backoff
                        // instead of this loop spinning.
                        let _ = self.conn.close(now);
                    } else {
                        self.arm();
                    }
                }
            }
            Event::Delivery(delivery) => self.on_reply(delivery),
            Event::Returned(returned) => self.on_returned(returned),
            Event::ContentTooLarge { .. } => {
                // A reply too large to buffer: its call ends at its deadline. (Replies are
                // consumed no-ack, so there is nothing to reject.)
            }
            Event::Blocked { reason } => self.events.push_back(ClientEvent::Blocked { reason }),
            Event::Unblocked => self.events.push_back(ClientEvent::Unblocked),
            Event::Closed(error) => {
                self.lose_sent_calls(now);
                self.probe.channel = None;
                self.probe.in_flight = None;
                if self.phase == Phase::ShutDown {
                    self.abandon();
                } else {
                    self.phase = Phase::Disconnected;
                    self.events.push_back(ClientEvent::Disconnected(error));
                }
            }
            _ => {}
        }
    }

    /// Sets up the reply path on a fresh channel: consume direct reply-to, or declare an
    /// exclusive queue and consume it. Pipelined behind `channel.open`.
    fn arm(&mut self) {
        let result = (|| -> Result<ChannelId, UsageError> {
            let channel = self.conn.open_channel()?;
            let no_ack = ConsumeOptions {
                no_ack: true,
                exclusive: false,
            };
            match self.config.reply_mode {
                // RabbitMQ requires direct reply-to to be consumed in no-ack mode, on the channel
                // that publishes, before the first publish (RabbitMQ "Direct Reply-to").
                ReplyMode::DirectReplyTo => {
                    self.conn.consume(
                        channel,
                        DIRECT_REPLY_TO,
                        "",
                        no_ack,
                        FieldTable::default(),
                    )?;
                }
                ReplyMode::ExclusiveQueue => {
                    let options = QueueOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueOptions::default()
                    };
                    self.conn
                        .declare_queue(channel, "", options, FieldTable::default())?;
                }
            }
            Ok(channel)
        })();
        // An error means the connection is closing; its Closed event is on its way.
        if let Ok(channel) = result {
            self.phase = Phase::Arming {
                channel,
                reply_queue: None,
            };
        }
    }

    fn rpc_channel(&self) -> Option<ChannelId> {
        match &self.phase {
            Phase::Arming { channel, .. } | Phase::Ready { channel, .. } => Some(*channel),
            _ => None,
        }
    }

    fn on_completed(&mut self, now: Instant, channel: ChannelId, request: RequestId, reply: Reply) {
        if self
            .probe
            .in_flight
            .as_ref()
            .is_some_and(|(r, _)| *r == request)
        {
            if let (Some((_, queue)), Reply::QueueDeclared { consumer_count, .. }) =
                (self.probe.in_flight.take(), &reply)
            {
                self.set_queue_status(
                    &queue,
                    QueueStatus {
                        consumers: Consumers::Count(*consumer_count),
                        checked_at: Some(now),
                    },
                );
            }
            return;
        }
        if self.rpc_channel() != Some(channel) {
            return;
        }
        match reply {
            Reply::QueueDeclared { queue, .. } => {
                let no_ack = ConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                };
                // Fails only when the connection is closing; its Closed event follows.
                let _ = self
                    .conn
                    .consume(channel, &queue, "", no_ack, FieldTable::default());
                // The server named the queue, so the name is a valid short string.
                let reply_queue = ShortString::try_new(queue).ok();
                self.phase = Phase::Arming {
                    channel,
                    reply_queue,
                };
            }
            Reply::ConsumeOk { .. } => {
                let reply_to = match (&self.phase, self.config.reply_mode) {
                    (_, ReplyMode::DirectReplyTo) => ShortString::from(DIRECT_REPLY_TO),
                    (
                        Phase::Arming {
                            reply_queue: Some(q),
                            ..
                        },
                        ReplyMode::ExclusiveQueue,
                    ) => q.clone(),
                    _ => return,
                };
                self.phase = Phase::Ready { channel, reply_to };
                self.arm_failures = 0;
                self.events.push_back(ClientEvent::Ready);
            }
            _ => {}
        }
    }

    fn on_reply(&mut self, delivery: Delivery) {
        let Some(id) = self.parse_correlation_id(delivery.properties.correlation_id().as_ref())
        else {
            self.stats.replies_unknown += 1;
            return;
        };
        if !self.calls.get(&id).is_some_and(|c| c.sent) {
            match self.recent.get(&id) {
                Some(Ended::Answered) => self.stats.replies_duplicate += 1,
                Some(Ended::Otherwise) => self.stats.replies_late += 1,
                None if self.calls.contains_key(&id) || id.0 > self.next_call => {
                    self.stats.replies_unknown += 1
                }
                None => self.stats.replies_late += 1,
            }
            return;
        }
        let result = match error_reply(&delivery.properties) {
            None => Ok(RpcReply {
                body: delivery.body,
                properties: delivery.properties,
            }),
            Some((code, rejected)) => {
                let message = String::from_utf8_lossy(&delivery.body).into_owned();
                Err(if rejected {
                    RpcError::Rejected { code, message }
                } else {
                    RpcError::Remote { code, message }
                })
            }
        };
        self.end(id, result);
    }

    fn on_returned(&mut self, returned: Returned) {
        let Some(id) = self.parse_correlation_id(returned.properties.correlation_id().as_ref())
        else {
            return;
        };
        if self.calls.get(&id).is_some_and(|c| c.sent) {
            self.end(id, Err(RpcError::NotRouted));
        }
    }

    fn parse_correlation_id(&self, id: Option<&ShortString>) -> Option<CallId> {
        let rest = id?
            .as_str()
            .strip_prefix(self.id_prefix.as_str())?
            .strip_prefix('.')?;
        rest.parse().ok().map(CallId)
    }

    // -----------------------------------------------------------------------------------------
    // Sending and ending calls
    // -----------------------------------------------------------------------------------------

    /// Sends every held call that may go now, fails those that cannot succeed, keeps the rest.
    fn flush_held(&mut self, now: Instant) {
        if self.held.is_empty() {
            return;
        }
        let mut keep = VecDeque::with_capacity(self.held.len());
        while let Some(id) = self.held.pop_front() {
            match self.gate(now, id) {
                Gate::Send => self.send(now, id),
                Gate::Wait => keep.push_back(id),
                Gate::Fail(error) => self.end(id, Err(error)),
                Gate::Gone => {}
            }
        }
        self.held = keep;
    }

    fn gate(&mut self, now: Instant, id: CallId) -> Gate {
        let Some(call) = self.calls.get(&id) else {
            return Gate::Gone;
        };
        // No budget left (a zero timeout, or bytes handled after the deadline but before the
        // timer): publishing now could only make the call "may have run" for nothing.
        if call.deadline <= now {
            // A call published before (an idempotent one waiting to be sent again) may have
            // run.
            return Gate::Fail(if call.published {
                RpcError::TimedOut
            } else {
                RpcError::Expired
            });
        }
        if !self.is_ready()
            || self.conn.is_blocked()
            || self.conn.outbound_len() >= self.config.outbound_high_water
        {
            return Gate::Wait;
        }
        let (Some(interval), true) = (self.config.server_check, call.request.exchange.is_empty())
        else {
            return Gate::Send;
        };
        let queue = call.request.routing_key.clone();
        let status = self.probe.queues.get(&queue).copied();
        let fresh = status
            .and_then(|s| s.checked_at)
            .is_some_and(|at| now < at + interval);
        if !fresh {
            self.start_probe(&queue);
        }
        match status.map(|s| s.consumers) {
            Some(Consumers::Count(n)) if n > 0 => Gate::Send,
            Some(Consumers::Count(_)) if fresh => Gate::Fail(RpcError::NoServers),
            Some(Consumers::Absent) if fresh => Gate::Fail(RpcError::NotRouted),
            Some(Consumers::Unknown) if fresh => Gate::Send,
            _ => Gate::Wait,
        }
    }

    fn start_probe(&mut self, queue: &str) {
        if self.probe.in_flight.is_some() || !self.conn.is_open() {
            return;
        }
        let channel = match self.probe.channel {
            Some(c) if self.conn.is_channel_usable(c) => c,
            _ => match self.conn.open_channel() {
                Ok(c) => {
                    self.probe.channel = Some(c);
                    c
                }
                Err(_) => return,
            },
        };
        let passive = QueueOptions {
            passive: true,
            ..QueueOptions::default()
        };
        if let Ok(request) = self
            .conn
            .declare_queue(channel, queue, passive, FieldTable::default())
        {
            self.probe.in_flight = Some((request, queue.to_owned()));
        }
    }

    fn set_queue_status(&mut self, queue: &str, status: QueueStatus) {
        if self.probe.queues.len() >= MAX_PROBED_QUEUES && !self.probe.queues.contains_key(queue) {
            self.probe.queues.clear();
        }
        self.probe.queues.insert(queue.to_owned(), status);
    }

    fn send(&mut self, now: Instant, id: CallId) {
        let Phase::Ready { channel, reply_to } = &self.phase else {
            return;
        };
        let (channel, reply_to) = (*channel, reply_to.clone());
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        // RabbitMQ refuses an expiration above 2^32 - 1 ms with a channel error (its
        // `check_expiry`), which would end every call in flight: cap it there.
        let remaining_ms = call
            .deadline
            .saturating_duration_since(now)
            .as_millis()
            .clamp(1, MAX_EXPIRATION_MS);
        let mut properties = call.request.properties.clone();
        // `expiration`: the broker discards the request if nobody takes it within the caller's
        // remaining budget (RabbitMQ "Time-To-Live and Expiration", per-message TTL).
        let expiration = match properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u128>().ok())
        {
            Some(theirs) => theirs.min(remaining_ms),
            None => remaining_ms,
        };
        let mut headers = properties.headers().clone().unwrap_or_default();
        let deadline = i64::try_from(call.wall_deadline.0).unwrap_or(i64::MAX);
        headers.insert(
            ShortString::from(DEADLINE_HEADER),
            AMQPValue::LongLongInt(deadline),
        );
        // The prefix is at most 200 bytes and a u64 at most 20 digits: this fits a short string.
        let correlation_id = ShortString::from(format!("{}.{}", self.id_prefix, id.0));
        properties = properties
            .with_reply_to(reply_to)
            .with_correlation_id(correlation_id)
            .with_expiration(ShortString::from(expiration.to_string()))
            .with_headers(headers);
        let request = &call.request;
        match self.conn.publish(
            channel,
            &request.exchange,
            &request.routing_key,
            true,
            &properties,
            &request.body,
        ) {
            Ok(_) => {
                call.sent = true;
                call.published = true;
                self.stats.requests_sent += 1;
            }
            // The body is above the broker's limit or a header does not fit in a frame:
            // nothing was sent.
            Err(UsageError::FrameTooLarge | UsageError::MessageTooLarge { .. }) => self.end(
                id,
                Err(RpcError::Rejected {
                    code: "request_too_large".into(),
                    message: "request properties do not fit in a frame".into(),
                }),
            ),
            // The connection is going away; the call waits for the next one.
            Err(_) => self.held.push_back(id),
        }
    }

    /// Calls sent on a connection or channel that is gone: idempotent ones wait to be sent
    /// again (deadline permitting), the others end with `ConnectionLost { sent: true }`.
    fn lose_sent_calls(&mut self, now: Instant) {
        let mut sent: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.sent)
            .map(|(id, _)| *id)
            .collect();
        sent.sort();
        for id in sent {
            match self.calls.get_mut(&id) {
                Some(call) if call.request.idempotent && call.deadline > now => {
                    call.sent = false;
                    self.held.push_back(id);
                }
                _ => self.end(id, Err(RpcError::ConnectionLost { sent: true })),
            }
        }
    }

    /// Ends calls whose deadline is `now` or earlier.
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            let sent = self.calls.get(&id).is_some_and(|c| c.published);
            self.end(
                id,
                Err(if sent {
                    RpcError::TimedOut
                } else {
                    RpcError::Expired
                }),
            );
        }
    }

    /// Ends a call: the one place a `CallEnded` event is made, so each call ends once.
    fn end(&mut self, id: CallId, result: Result<RpcReply, RpcError>) {
        let Some(call) = self.calls.remove(&id) else {
            return;
        };
        self.deadlines.remove(&(call.deadline, id));
        let answered = matches!(
            result,
            Ok(_) | Err(RpcError::Remote { .. } | RpcError::Rejected { .. })
        );
        if answered {
            self.stats.calls_answered += 1;
        } else {
            self.stats.calls_failed += 1;
        }
        self.recent.insert(
            id,
            if answered {
                Ended::Answered
            } else {
                Ended::Otherwise
            },
        );
        self.recent_order.push_back(id);
        if self.recent_order.len() > RECENT_ENDED {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
        self.events
            .push_back(ClientEvent::CallEnded { call: id, result });
    }
}

/// What may happen to a held call now.
enum Gate {
    Send,
    Wait,
    Fail(RpcError),
    Gone,
}

/// The error code and rejected flag of an error reply, or `None` for a successful reply.
fn error_reply(properties: &BasicProperties) -> Option<(String, bool)> {
    let headers = properties.headers().as_ref()?;
    let code = match headers.inner().get(ERROR_HEADER)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => format!("{other:?}"),
    };
    let rejected = matches!(
        headers.inner().get(REJECTED_HEADER),
        Some(AMQPValue::Boolean(true))
    );
    Some((code, rejected))
}
