//! The RPC client machine: calls out, replies matched by correlation id, every call ended
//! exactly once.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::Bytes;

use super::correlation::{CallId, CorrelationKey};
use super::isolation::{Admission, Isolation};
use super::probe::{Probe, QueueUpdate, Target, Verdict};
use super::{UnixMillis, DEADLINE_HEADER, DIRECT_REPLY_TO, ERROR_HEADER, REJECTED_HEADER};
use crate::connection::{
    Connection, ConnectionConfig, ConsumeOptions, Delivery, Event, QueueOptions, Reply, Returned,
};
use crate::error::{ChannelError, ConnectionError, Initiator, RpcError, UsageError};
use crate::ids::{ChannelId, DeliveryTag, ReplyCode, RequestId};
use crate::timers::TimerTable;
use crate::types::BasicProperties;

/// Where replies come back (ARCHITECTURE §5).
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
#[non_exhaustive]
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
    ///
    /// Needs a channel of its own: off on a connection whose `channel_max` leaves none for it
    /// (below 3 in exclusive-queue mode, below 2 with direct reply-to).
    pub server_check: Option<Duration>,
    /// Outbound bytes the connection may hold before new requests wait (backpressure when the
    /// network or broker is slower than the callers).
    pub outbound_high_water: usize,
    /// How often the existence of an exchange other than the default one is checked (a passive
    /// `exchange.declare` on the checker's channel) before calls are published to it; `None`
    /// turns the check off.
    ///
    /// RabbitMQ answers a publish to a missing exchange by closing the publishing channel with
    /// 404, which would also drop the requests published after it on that channel. With the
    /// check on, such a call ends alone with [`RpcError::Refused`] and the broker's words
    /// before it is published. With the check off (or off for want of a channel, as
    /// [`server_check`](Self::server_check)), the publisher confirms still end that call alone
    /// with `Refused`, and the calls published after it on the channel are sent again.
    pub exchange_check: Option<Duration>,
    /// Whether each request is published `mandatory` (on by default).
    ///
    /// Backs the README's guarantee "the queue does not exist: `NotRouted`, never ran": the
    /// broker returns a mandatory message no queue takes (AMQP 0-9-1 `basic.publish`'s
    /// `mandatory` bit, answered by `basic.return`) and the call ends at once. Off, the broker
    /// drops such a request silently and the call ends `TimedOut` at its deadline instead.
    /// With [`server_check`](Self::server_check) on, a missing queue is still found by the
    /// check (default exchange only), but a queue deleted or unbound between two checks is
    /// not. Saves the broker a few µs per call.
    pub mandatory: bool,
    /// Whether each request carries a per-message `expiration` of the caller's remaining
    /// budget (on by default; RabbitMQ "Time-To-Live and Expiration").
    ///
    /// Backs, with the deadline header, "no server runs a request after its caller gave up":
    /// the broker discards a request still queued when its caller's timeout passes. Off, such
    /// a request can sit in the queue after its caller gave up and be run late (its reply is
    /// then dropped as late) unless the server that takes it finds its
    /// [`deadline_header`](Self::deadline_header) passed. An `expiration` the caller sets in
    /// [`CallRequest::properties`] is still sent (lowered to the remaining budget). Saves the
    /// broker a few µs per call.
    pub expiration: bool,
    /// Whether each request carries the absolute deadline in the [`DEADLINE_HEADER`]
    /// header (on by default).
    ///
    /// Backs, with `expiration`, "no server runs a request after its caller gave up" across
    /// the time a request spends queued and then in the server's prefetch buffer, and gives
    /// the handler the deadline. Off, the server only has the `expiration` (counted from
    /// when it received the request), so a request that waited in the queue can be started
    /// after its caller gave up. Saves the broker a few µs per call (one header table less to
    /// carry).
    pub deadline_header: bool,
    /// How long after the client's own reconnect a request queue that had servers, and now
    /// reads zero consumers (or is missing: a non-durable queue gone with a broker restart), is
    /// looked at again every 250 ms instead of failing calls with `NoServers` (or
    /// `NotRouted`): calls wait for the servers, within their deadline. Whatever took the
    /// client's connection (a broker restart, a network cut) most likely took its servers'
    /// too, and a server comes back a little after a client (it declares its queue again and
    /// consumes). 5 s by default, which covers a server's reconnect with its default backoff
    /// (at most 1 s between attempts); `Duration::ZERO` believes the count at once.
    ///
    /// The grace covers `NotRouted` as well as `NoServers`, by choice: a non-durable classic
    /// queue that vanished with a restart is declared again by its server moments later, and
    /// a caller is better served by waiting (within its deadline) than by a failure that a
    /// call a second later would not get. Outside the grace a missing queue is `NotRouted` at
    /// once, as before: no server has declared it.
    pub reconnect_grace: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            reply_mode: ReplyMode::default(),
            max_in_flight: 4096,
            server_check: Some(Duration::from_secs(1)),
            outbound_high_water: 4 * 1024 * 1024,
            exchange_check: Some(Duration::from_secs(1)),
            mandatory: true,
            expiration: true,
            deadline_header: true,
            reconnect_grace: Duration::from_secs(5),
        }
    }
}

/// One call to make.
#[derive(Debug, Clone)]
#[non_exhaustive]
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
#[non_exhaustive]
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
    /// Replies whose correlation id this client never issued (or forged ones).
    pub replies_unknown: u64,
    /// Calls cancelled by [`RpcClient::cancel`] (their callers gave up) before they ended.
    pub calls_cancelled: u64,
    /// Times the broker cancelled the reply consumer or closed its channel and the client armed
    /// a new reply path.
    pub reply_path_rearmed: u64,
    /// Replies (or returned requests) whose body was above
    /// [`ConnectionConfig::max_body_size`], skipped unread; a pending call ends
    /// [`RpcError::ReplyTooLarge`] (or `NotRouted` for a return).
    pub replies_too_large: u64,
    /// Requests the broker nacked (the call ended [`RpcError::QueueFull`]).
    pub requests_nacked: u64,
}

/// A call that has not ended.
#[derive(Debug)]
struct Call {
    /// Boxed: the map of calls keeps its entries inline and runs up to half empty after it
    /// grows, so an inline request (400 bytes, mostly `BasicProperties`) cost up to twice
    /// that per call in flight.
    request: Box<CallRequest>,
    deadline: Instant,
    wall_deadline: UnixMillis,
    sent: bool,
    /// Whether it was ever published (an idempotent call waiting to be sent again was): a
    /// server may have run it, whatever happens next.
    published: bool,
    /// Times a channel it was sent on was lost (the connection lived). An idempotent call is
    /// sent again at most [`MAX_CHANNEL_RESENDS`] times this way, so that a request the broker
    /// refuses for a reason no check foresaw cannot close channels in a loop.
    channel_losses: u32,
}

/// Resends of an idempotent call after channel (not connection) losses.
const MAX_CHANNEL_RESENDS: u32 = 2;

/// Resends of a call whose publish the broker discarded because an earlier publish on the same
/// channel was refused (the call is innocent, and did not run); beyond it the call ends
/// `ConnectionLost { sent: false }`. Bounds a stream of refused publishes from keeping an
/// innocent call going round.
const MAX_DISCARD_RESENDS: u32 = 8;

/// A publish on the publishing channel (in confirm mode) the broker has not confirmed yet.
/// Kept in publish order, so in ascending `seq` order: a confirm settles the front entry in the
/// common case, and finding any other is a binary search. One slot per publish in flight,
/// nothing allocated per call.
#[derive(Debug, Clone, Copy)]
struct Unconfirmed {
    seq: DeliveryTag,
    call: CallId,
    /// Whether the call had been published before this publish (an idempotent call sent
    /// again): if this publish is discarded, the call may still have run from the earlier one.
    published_before: bool,
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
///
/// Channels: the reply path (the reply consumer) has a channel of its own; requests are
/// published on another one, so that a publish the broker refuses (which closes its channel)
/// cannot take the reply path down. Direct reply-to is the exception: RabbitMQ requires its
/// requests to be published on the consuming channel (RabbitMQ "Direct Reply-to"), so there
/// the two are one. A third channel runs the passive declares of the server and exchange
/// checks, whose 404s close it.
///
/// Publisher confirms (RabbitMQ "Publisher Confirms"): the publishing channel is in confirm
/// mode, so the client knows which requests the broker took. A `basic.nack` ends its call
/// [`RpcError::QueueFull`] at once. When the broker refuses a publish by closing the publishing
/// channel, the refused call alone ends [`RpcError::Refused`] (never ran), the calls the broker
/// discarded after it are sent again, and the calls it took go on waiting for their replies
/// (in exclusive-queue mode, where the reply path is another channel). With direct reply-to
/// the reply path dies with the channel: the calls the broker took end
/// [`RpcError::ReplyPathLost`] (may have run; idempotent ones are sent again), the others as
/// above. See `settle_unconfirmed` for why the culprit is told by the broker's words.
///
/// A request the publishing channel has not accepted the like of (a larger body than any it
/// settled, an exchange it settled no publish to: the first request on every channel is one)
/// goes out alone, when nothing else is unconfirmed, and later requests wait for its confirm:
/// a refusal then loses no other call's confirm or `basic.nack` (see `isolation.rs`).
///
/// Few channels (the broker's or the URI's `channel_max`): the client never needs more than
/// the broker allows. Below three channels (two with direct reply-to) the checks are off on
/// that connection (no [`RpcError::NoServers`]; a missing exchange is still found, by the
/// broker's refusal, and ends that call alone); at one channel, exclusive-queue mode also
/// publishes on the reply path's channel and keeps the isolation of direct reply-to.
#[derive(Debug)]
pub struct RpcClient {
    conn: Connection,
    conn_config: ConnectionConfig,
    config: ClientConfig,
    phase: Phase,
    /// The publishing channel in [`ReplyMode::ExclusiveQueue`] mode, unless it is shared with
    /// the reply path (`shared`).
    publisher: Option<ChannelId>,
    /// Publishes go on the reply path's channel: always with direct reply-to (RabbitMQ requires
    /// it), and in exclusive-queue mode when the broker allows a single channel.
    shared: bool,
    /// The server and exchange checks are off on this connection: the broker allows too few
    /// channels to give their passive declares (whose 404 closes a channel) one of their own.
    probe_off: bool,
    /// Publishes on the publishing channel not confirmed yet, in publish order.
    unconfirmed: VecDeque<Unconfirmed>,
    /// What the publishing channel accepted, and which request is in flight alone on it.
    isolation: Isolation,
    ids: CorrelationKey,
    next_call: u64,
    calls: HashMap<CallId, Call>,
    /// Every pending call's deadline, and the second looks at zero consumer counts.
    timers: TimerTable<Timer>,
    /// Calls waiting to be sent, oldest first.
    held: VecDeque<CallId>,
    recent: HashMap<CallId, Ended>,
    recent_order: VecDeque<CallId>,
    probe: Probe,
    events: VecDeque<ClientEvent>,
    stats: ClientStats,
    /// Reply-path channels lost in a row before the path was armed.
    arm_failures: u32,
    /// Why the reply path's channel closed last while it was being armed: the broker's words,
    /// for the error the connection ends with when the client gives up.
    arm_error: Option<ChannelError>,
}

/// The client's timers (its connection keeps its own).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A call's deadline: it ends `TimedOut` (sent) or `Expired` (never sent).
    Call(CallId),
    /// The second look at this request queue's zero consumer count
    /// (see `QueueStatus::confirming`).
    Recheck(String),
}

/// Reply-path channel losses in a row, before it was armed, after which the client gives the
/// connection up.
const MAX_ARM_FAILURES: u32 = 3;

impl RpcClient {
    /// A client that starts connecting at `now`. `ids` keys its correlation ids: draw it from a
    /// good random source, once per client (see [`CorrelationKey`]).
    pub fn new(
        config: ClientConfig,
        conn_config: ConnectionConfig,
        ids: CorrelationKey,
        now: Instant,
    ) -> Self {
        Self {
            conn: Connection::new(conn_config.clone(), now),
            conn_config,
            config,
            phase: Phase::Connecting,
            publisher: None,
            shared: false,
            probe_off: false,
            unconfirmed: VecDeque::new(),
            isolation: Isolation::default(),
            ids,
            next_call: 0,
            calls: HashMap::new(),
            timers: TimerTable::new(),
            held: VecDeque::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            probe: Probe::default(),
            events: VecDeque::new(),
            stats: ClientStats::default(),
            arm_failures: 0,
            arm_error: None,
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
        let mut waiting = Vec::new();
        while let Some((timer, at)) = self.timers.pop_due(now) {
            match timer {
                Timer::Call(id) => self.expire(id),
                Timer::Recheck(queue) if self.may_probe() => {
                    self.probe.start(&mut self.conn, Target::Queue(queue))
                }
                // A recheck waits while another passive declare is under way (one at a time).
                Timer::Recheck(queue) => waiting.push((queue, at)),
            }
        }
        for (queue, at) in waiting {
            self.timers.set(Timer::Recheck(queue), at);
        }
    }

    /// The driver has written every byte [`RpcClient::poll_transmit`] gave it (its write buffer
    /// is empty): calls held back for room ([`ClientConfig::outbound_high_water`]) go out now,
    /// without waiting for input. Call it before every `poll_transmit` on an empty write
    /// buffer, and drain events after it: a held call whose deadline passed ends here.
    pub fn handle_transmitted(&mut self, now: Instant) {
        self.flush_held(now);
    }

    /// Appends frames ready to send to `buf`; see [`Connection::poll_transmit`]. Only drains.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> usize {
        self.conn.poll_transmit(now, buf)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When [`RpcClient::handle_timeout`] must run next: the earliest of the connection's timer
    /// and every call's deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // A recheck that cannot run yet must not wake the driver.
        let may_probe = self.may_probe();
        self.timers.next_where(self.conn.poll_timeout(), |timer| {
            may_probe || matches!(timer, Timer::Call(_))
        })
    }

    // -----------------------------------------------------------------------------------------
    // Getters
    // -----------------------------------------------------------------------------------------

    /// The connection (for its state and negotiated values).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Whether requests go out now (reply path armed, publishing channel open).
    pub fn is_ready(&self) -> bool {
        self.publish_channel().is_some()
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
    // Long because every refusal must happen before anything is queued: checks, then one insert.
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
        // What the broker would refuse by closing the publishing channel, taking the calls
        // published after this one along, is refused here instead.
        let size = u64::try_from(request.body.len()).unwrap_or(u64::MAX);
        if size > self.conn_config.max_message_size {
            return Err(UsageError::MessageTooLarge {
                size,
                limit: self.conn_config.max_message_size,
            });
        }
        // RabbitMQ checks `user_id` against the authenticated user (RabbitMQ "Validated User-ID");
        // with a mechanism that names no user here (EXTERNAL), the broker alone can tell.
        let user = self.conn_config.credentials.username();
        if let Some(user_id) = request.properties.user_id() {
            if !user.is_empty() && user_id.as_str() != user {
                return Err(UsageError::UserIdMismatch {
                    user_id: user_id.to_string(),
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
            request: Box::new(request),
            sent: false,
            published: false,
            channel_losses: 0,
        };
        self.timers.set(Timer::Call(id), call.deadline);
        self.calls.insert(id, call);
        self.stats.calls_started += 1;
        self.held.push_back(id);
        self.flush_held(now);
        Ok(id)
    }

    /// Cancels a call whose caller gave up (dropped its future): its slot is free at once, no
    /// [`ClientEvent::CallEnded`] follows, and a reply that arrives later is counted as late
    /// ([`ClientStats::replies_late`]), never delivered. Returns whether the call was pending.
    pub fn cancel(&mut self, call: CallId) -> bool {
        if self.calls.remove(&call).is_none() {
            return false;
        }
        self.timers.clear(&Timer::Call(call));
        // A held call leaves `held` at the next flush (`Gate::Gone`).
        self.stats.calls_cancelled += 1;
        self.remember(call, Ended::Otherwise);
        true
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
        self.publisher = None;
        self.unconfirmed.clear();
        self.isolation.reset();
        self.arm_failures = 0;
        self.arm_error = None;
        self.probe.forget_connection();
        Ok(())
    }

    /// [`RpcClient::reconnect`] to another broker: `conn_config` (its credentials, vhost,
    /// heartbeat...) replaces the settings given at creation, for this connection and the next
    /// ones. A driver with an address list calls it when it moves to another cluster node.
    pub fn reconnect_to(
        &mut self,
        now: Instant,
        conn_config: ConnectionConfig,
    ) -> Result<(), UsageError> {
        let previous = std::mem::replace(&mut self.conn_config, conn_config);
        let result = self.reconnect(now);
        if result.is_err() {
            self.conn_config = previous;
        }
        result
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

    // One arm per connection event the client reacts to: it reads best as one table.
    fn on_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Connected => {
                self.count_channels();
                self.open_publisher();
                self.arm();
            }
            Event::Completed {
                channel,
                request,
                reply,
            } => self.on_completed(now, channel, request, reply),
            Event::Failed { request, error } => {
                if let Some(target) = self.probe.take_answered(request) {
                    let update = self.probe.on_refused(now, target, error);
                    self.apply_queue_update(update);
                }
            }
            Event::ChannelClosed(error) => self.on_channel_closed(now, error),
            // The broker cancelled the reply consumer (RabbitMQ "Consumer Cancel Notification":
            // its queue was deleted, or the queue's node went away). Its channel lives: arm the
            // path again on it.
            Event::ConsumerCancelled { channel, .. } if self.rpc_channel() == Some(channel) => {
                self.lose_reply_path(now);
                self.stats.reply_path_rearmed += 1;
                self.arm_on(channel);
            }
            Event::Delivery(delivery) => self.on_reply(delivery),
            Event::Returned(returned) => self.on_returned(returned),
            Event::PublishConfirmed {
                channel,
                seq,
                acked,
            } if self.confirm_channel() == Some(channel) => self.on_confirmed(seq, acked),
            // A reply (or a returned request) too large to buffer: its body is skipped as it
            // arrives. Replies are consumed no-ack, so there is nothing to reject.
            Event::ContentTooLarge {
                delivery_tag,
                body_size,
                properties,
                ..
            } => self.on_too_large(delivery_tag.is_none(), body_size, &properties),
            Event::Blocked { reason } => self.events.push_back(ClientEvent::Blocked { reason }),
            Event::Unblocked => self.events.push_back(ClientEvent::Unblocked),
            Event::Closed(error) => {
                self.lose_sent_calls(
                    now,
                    |_| true,
                    RpcError::ConnectionLost { sent: true },
                    false,
                );
                self.probe.forget_connection();
                self.publisher = None;
                self.unconfirmed.clear();
                self.isolation.reset();
                // The client gave the connection up because the broker kept refusing the reply
                // path: say so in the broker's words, not as a close of our own.
                let error = match (self.arm_error.take(), error) {
                    (Some(refused), ConnectionError::ClosedByApplication)
                        if self.phase != Phase::ShutDown =>
                    {
                        ConnectionError::ReplyPathRefused {
                            code: refused.code,
                            text: refused.text,
                        }
                    }
                    (_, error) => error,
                };
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

    fn on_channel_closed(&mut self, now: Instant, error: ChannelError) {
        if self.probe.on_channel_closed(error.channel) {
            // The probe's own channel: its next look opens another.
            return;
        }
        let publishing = self.confirm_channel() == Some(error.channel);
        if publishing {
            self.settle_unconfirmed(&error);
        }
        if self.rpc_channel() == Some(error.channel) {
            // The reply path is gone with its channel (and, with direct reply-to, the
            // publishing channel too): calls sent may have run.
            let armed = matches!(self.phase, Phase::Ready { .. });
            self.lose_reply_path(now);
            self.phase = Phase::Connecting;
            if armed {
                self.stats.reply_path_rearmed += 1;
                self.arm_failures = 0;
            } else {
                self.arm_failures += 1;
                self.arm_error = Some(error);
            }
            if self.arm_failures > MAX_ARM_FAILURES {
                // The broker keeps refusing the reply path (a permission, a policy): give the
                // connection up, so that the driver reconnects with backoff instead of this
                // loop spinning. `arm_error` names the refusal.
                let _ = self.conn.close(now);
            } else {
                self.arm();
            }
        } else if publishing {
            // The reply path is intact: calls whose publish the broker took (confirmed, or
            // maybe taken, see `settle_unconfirmed`) go on waiting for their replies there.
            self.publisher = None;
            self.open_publisher();
        }
    }

    /// The publishing channel closed: sorts the publishes the broker had not confirmed.
    ///
    /// RabbitMQ handles a channel's publishes in order, and a publish it refuses (406 body
    /// above `max_message_size`, 404 no such exchange, 403 access refused) closes the channel
    /// at once with `channel.close` naming the reason (AMQP 0-9-1 §1.2 "soft errors"); what the
    /// client had sent after it is discarded unread. Confirms, though, are not in order with
    /// the publishes' handling: a publish to a queue is confirmed once the queue has it, which
    /// can be after the channel handled (and refused) a later publish. So the unconfirmed
    /// publishes fall in three groups, in publish order:
    ///
    /// - before the culprit: handled, maybe enqueued, its confirm lost with the channel. It
    ///   may run: the call keeps waiting for its reply (on the reply path, when that lives),
    ///   and ends `TimedOut` at its deadline only if it was truly lost (or nacked). A culprit
    ///   the channel had not accepted the like of went out alone (`isolation.rs`), so this
    ///   group is empty unless an exchange was deleted after a publish to it was confirmed;
    /// - the culprit: ends [`RpcError::Refused`] with the broker's code and text. Never ran;
    /// - after it: discarded by the broker, never ran. Innocent: sent again on the next
    ///   publishing channel within its deadline, at most [`MAX_DISCARD_RESENDS`] times.
    ///
    /// The culprit is found by the broker's words, never guessed from the position (the first
    /// unconfirmed publish may be an innocent one whose confirm was late): the size in
    /// "message size N is larger than configured max size M" names the body size, and the
    /// exchange in "no exchange 'X'" or "access to exchange 'X'" names the exchange. A close
    /// whose culprit is not found this way (the broker's words are unknown, or an operator
    /// closed the channel) leaves every unconfirmed publish in the first group.
    fn settle_unconfirmed(&mut self, error: &ChannelError) {
        self.isolation.reset();
        let unconfirmed = std::mem::take(&mut self.unconfirmed);
        let Some(culprit) = self.culprit(error, &unconfirmed) else {
            return;
        };
        for (i, entry) in unconfirmed.iter().enumerate() {
            match i.cmp(&culprit) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => self.end(
                    entry.call,
                    Err(RpcError::Refused {
                        code: error.code,
                        text: error.text.clone(),
                    }),
                ),
                std::cmp::Ordering::Greater => self.resend_discarded(*entry),
            }
        }
    }

    /// The position in `unconfirmed` of the publish whose refusal closed the channel, if the
    /// broker's words name it; see [`RpcClient::settle_unconfirmed`].
    fn culprit(
        &mut self,
        error: &ChannelError,
        unconfirmed: &VecDeque<Unconfirmed>,
    ) -> Option<usize> {
        if error.initiator != Initiator::Server {
            return None;
        }
        let calls = &self.calls;
        let position = |matches: &dyn Fn(&CallRequest) -> bool| {
            unconfirmed.iter().position(|entry| {
                calls
                    .get(&entry.call)
                    .is_some_and(|call| call.sent && matches(&call.request))
            })
        };
        match error.code {
            ReplyCode(406) => {
                let (size, limit) = size_refusal(&error.text)?;
                let found = position(&|request| request.body.len() as u64 == size);
                // The broker's limit is lower than the one configured: later calls above it
                // are refused before sending, instead of closing the channel again.
                if found.is_some() && limit < self.conn_config.max_message_size {
                    self.conn_config.max_message_size = limit;
                }
                found
            }
            ReplyCode(403) | ReplyCode(404) => {
                let exchange = quoted_exchange(&error.text)?;
                position(&|request| {
                    request.exchange == exchange
                        || (request.exchange.is_empty() && exchange == "amq.default")
                })
            }
            _ => None,
        }
    }

    /// A publish the broker discarded (it came after a refused one on the same channel): the
    /// call did not run from it, and goes out again.
    fn resend_discarded(&mut self, entry: Unconfirmed) {
        let Some(call) = self.calls.get_mut(&entry.call) else {
            return;
        };
        if !call.sent {
            return;
        }
        call.sent = false;
        call.published = entry.published_before;
        if call.channel_losses < MAX_DISCARD_RESENDS {
            call.channel_losses += 1;
            self.held.push_back(entry.call);
        } else {
            let sent = call.published;
            self.end(entry.call, Err(RpcError::ConnectionLost { sent }));
        }
    }

    /// The broker confirmed (`acked`) or refused a publish on the publishing channel.
    fn on_confirmed(&mut self, seq: DeliveryTag, acked: bool) {
        self.isolation.settled(seq);
        // Confirms come mostly in publish order (and with `multiple` always in order).
        let index = match self.unconfirmed.front() {
            Some(front) if front.seq == seq => 0,
            _ => match self.unconfirmed.binary_search_by_key(&seq, |u| u.seq) {
                Ok(index) => index,
                Err(_) => return,
            },
        };
        let Some(entry) = self.unconfirmed.remove(index) else {
            return;
        };
        // An ack means the broker has the request (a return, for an unroutable one, came
        // before it and ended the call): the call waits for its reply. A nack means it
        // refused it (RabbitMQ: a `reject-publish` queue at its length limit).
        if !acked && self.calls.get(&entry.call).is_some_and(|c| c.sent) {
            self.stats.requests_nacked += 1;
            self.end(entry.call, Err(RpcError::QueueFull));
        }
    }

    /// A message too large to buffer arrived: a reply (`returned` false) or a returned request.
    fn on_too_large(&mut self, returned: bool, size: u64, properties: &BasicProperties) {
        self.stats.replies_too_large += 1;
        let Some(id) = self.parse_correlation_id(properties.correlation_id().as_ref()) else {
            return;
        };
        if returned {
            // A returned request of any size was not routed: never ran.
            if self.calls.get(&id).is_some_and(|c| c.sent) {
                self.end(id, Err(RpcError::NotRouted));
            }
        } else if self.calls.get(&id).is_some_and(|c| c.published) {
            let limit = self.conn_config.max_body_size;
            self.end(id, Err(RpcError::ReplyTooLarge { size, limit }));
        }
    }

    /// Counts the channels the broker allows (AMQP 0-9-1 `connection.tune`'s `channel_max`,
    /// 0 meaning no limit but the 16-bit channel number): the reply path needs one, a
    /// separate publishing channel (exclusive-queue mode) one, the checks' passive declares
    /// one. With fewer, the client shares rather than hang on a channel it cannot open:
    ///
    /// - the checks go first: without a channel of their own their 404s would close a
    ///   channel calls depend on, so [`ClientConfig::server_check`] and
    ///   [`ClientConfig::exchange_check`] are off on this connection (no `NoServers`; a call
    ///   to a missing exchange still ends alone, `Refused`, by the publisher confirms);
    /// - then, at a single channel, exclusive-queue mode publishes on the reply path's
    ///   channel, as direct reply-to always does: a refused publish then also loses the reply
    ///   path, and the calls waiting on it end as with direct reply-to.
    fn count_channels(&mut self) {
        let channel_max = match self.conn.tune().channel_max {
            0 => u16::MAX,
            n => n,
        };
        self.shared = self.config.reply_mode == ReplyMode::DirectReplyTo || channel_max < 2;
        let needed = if self.shared { 2 } else { 3 };
        self.probe_off = channel_max < needed;
    }

    /// Opens the publishing channel of [`ReplyMode::ExclusiveQueue`] mode, in confirm mode
    /// (pipelined behind `channel.open`).
    fn open_publisher(&mut self) {
        if self.shared || self.phase == Phase::ShutDown {
            return;
        }
        // Fails only when the connection is closing; its Closed event follows.
        self.publisher = self.conn.open_channel().ok();
        if let Some(channel) = self.publisher {
            let _ = self.conn.confirm_select(channel);
        }
    }

    /// The channel requests are published on (in confirm mode), open or not yet.
    fn confirm_channel(&self) -> Option<ChannelId> {
        if self.shared {
            self.rpc_channel()
        } else {
            self.publisher
        }
    }

    /// The channel requests go out on now, if any.
    fn publish_channel(&self) -> Option<ChannelId> {
        let Phase::Ready { .. } = &self.phase else {
            return None;
        };
        let channel = self.confirm_channel()?;
        self.conn.is_channel_usable(channel).then_some(channel)
    }

    /// Sets up the reply path on a fresh channel. Pipelined behind `channel.open`.
    fn arm(&mut self) {
        // An error means the connection is closing; its Closed event is on its way.
        if let Ok(channel) = self.conn.open_channel() {
            if self.shared {
                // Requests go out on this channel too: confirm them (before anything else, so
                // that every publish on it is numbered).
                let _ = self.conn.confirm_select(channel);
            }
            self.arm_on(channel);
        }
    }

    /// Sets up the reply path on `channel`: consume direct reply-to, or declare an exclusive
    /// queue and consume it.
    fn arm_on(&mut self, channel: ChannelId) {
        let no_ack = ConsumeOptions {
            no_ack: true,
            exclusive: false,
        };
        let sent = match self.config.reply_mode {
            // RabbitMQ requires direct reply-to to be consumed in no-ack mode, on the channel
            // that publishes, before the first publish (RabbitMQ "Direct Reply-to").
            ReplyMode::DirectReplyTo => {
                self.conn
                    .consume(channel, DIRECT_REPLY_TO, "", no_ack, FieldTable::default())
            }
            ReplyMode::ExclusiveQueue => {
                let options = QueueOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueOptions::default()
                };
                self.conn
                    .declare_queue(channel, "", options, FieldTable::default())
            }
        };
        // An error means the channel or connection is closing; its event is on its way.
        if sent.is_ok() {
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

    // Probe answers and the reply path's setup steps share this entry; split, each would re-match.
    fn on_completed(&mut self, now: Instant, channel: ChannelId, request: RequestId, reply: Reply) {
        if let Some(target) = self.probe.take_answered(request) {
            let update = self.probe.on_answer(now, target, reply);
            return self.apply_queue_update(update);
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
                self.arm_error = None;
                self.probe.on_ready(now, self.config.reconnect_grace);
                self.events.push_back(ClientEvent::Ready);
            }
            _ => {}
        }
    }

    /// Follows a change of a request queue's status in the timer table: a planned second look
    /// is off, and a new one may be due.
    fn apply_queue_update(&mut self, update: Option<QueueUpdate>) {
        let Some(update) = update else {
            return;
        };
        if update.forgot_others {
            self.timers
                .clear_where(|timer| matches!(timer, Timer::Recheck(_)));
        }
        let recheck = Timer::Recheck(update.queue);
        self.timers.clear(&recheck);
        if let Some(at) = update.recheck_at {
            self.timers.set(recheck, at);
        }
    }

    fn on_reply(&mut self, delivery: Delivery) {
        let Some(id) = self.parse_correlation_id(delivery.properties.correlation_id().as_ref())
        else {
            self.stats.replies_unknown += 1;
            return;
        };
        // A call waiting to be sent again still takes a reply to an earlier publish: the
        // request is the same, and idempotent.
        if !self.calls.get(&id).is_some_and(|c| c.published) {
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
        self.ids.verify(id?.as_str())
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
                Gate::Send => {
                    self.send(now, id);
                }
                Gate::SendAlone { exchange, body } => {
                    if let Some(seq) = self.send(now, id) {
                        self.isolation.sent_alone(seq, exchange, body);
                    }
                }
                Gate::Wait => keep.push_back(id),
                Gate::Hold => {
                    // First in, first out: nothing behind it overtakes it (see `isolation`).
                    keep.push_back(id);
                    keep.append(&mut self.held);
                }
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
        // The broker refused a body this size before (and told its limit, see `culprit`):
        // sending it again would close the publishing channel again.
        let size = call.request.body.len() as u64;
        let limit = self.conn_config.max_message_size;
        if size > limit {
            return Gate::Fail(RpcError::Refused {
                code: ReplyCode(406),
                text: format!(
                    "message size {size} is larger than the broker's max size {limit} \
                     (it refused an earlier message above it)"
                ),
            });
        }
        // Whether it goes out pipelined, alone, or waits for the publishes in flight to be
        // settled (see `isolation.rs`); decided here, and applied only if the checks below let
        // it go.
        let admission =
            match self
                .isolation
                .admit(&call.request.exchange, size, !self.unconfirmed.is_empty())
            {
                Admission::Pipelined => Gate::Send,
                Admission::Alone => Gate::SendAlone {
                    exchange: call.request.exchange.clone(),
                    body: size,
                },
                Admission::Hold => Gate::Hold,
            };
        // The server or exchange check (`ClientConfig::server_check`, `exchange_check`).
        let checked = if self.probe_off {
            Gate::Send
        } else if !call.request.exchange.is_empty() {
            match self.config.exchange_check {
                Some(interval) => {
                    let exchange = call.request.exchange.clone();
                    self.probe
                        .exchange_verdict(&mut self.conn, now, &exchange, interval)
                        .into()
                }
                None => Gate::Send,
            }
        } else {
            match self.config.server_check {
                Some(interval) => {
                    let queue = call.request.routing_key.clone();
                    self.probe
                        .queue_verdict(&mut self.conn, now, &queue, interval)
                        .into()
                }
                None => Gate::Send,
            }
        };
        match checked {
            Gate::Send => admission,
            other => other,
        }
    }

    /// Whether a passive declare may start: one at a time, on an open connection.
    fn may_probe(&self) -> bool {
        self.probe.is_idle() && self.conn.is_open()
    }

    /// Publishes call `id`'s request; its sequence number on the publishing channel, if it went
    /// out in confirm mode.
    // Long because the request's properties are built field by field, as the wire format has them.
    fn send(&mut self, now: Instant, id: CallId) -> Option<DeliveryTag> {
        let (Some(channel), Phase::Ready { reply_to, .. }) = (self.publish_channel(), &self.phase)
        else {
            return None;
        };
        let reply_to = reply_to.clone();
        let correlation_id = self.ids.issue(id);
        let call = self.calls.get_mut(&id)?;
        // RabbitMQ refuses an expiration above 2^32 - 1 ms with a channel error (its
        // `check_expiry`), which would end every call in flight: cap it there.
        // Rounded up: a budget cut to the millisecond below would let the server give up
        // (and answer `deadline_exceeded`) a fraction of a millisecond before the caller does,
        // and the caller would then see the server's error instead of its own `TimedOut`.
        let remaining_ms = call
            .deadline
            .saturating_duration_since(now)
            .as_micros()
            .div_ceil(1000)
            .clamp(1, MAX_EXPIRATION_MS);
        let mut properties = call
            .request
            .properties
            .clone()
            .with_reply_to(reply_to)
            .with_correlation_id(correlation_id);
        // `expiration`: the broker discards the request if nobody takes it within the caller's
        // remaining budget (RabbitMQ "Time-To-Live and Expiration", per-message TTL). Switched
        // off, only a caller's own `expiration` is sent, still capped as above: an unparsable
        // or too large one would make the broker close the publishing channel.
        let theirs = properties
            .expiration()
            .as_ref()
            .map(|e| e.as_str().parse::<u128>().ok());
        let expiration = match theirs {
            Some(Some(theirs)) => Some(theirs.min(remaining_ms)),
            Some(None) => Some(remaining_ms),
            None => self.config.expiration.then_some(remaining_ms),
        };
        if let Some(expiration) = expiration {
            properties = properties.with_expiration(ShortString::from(expiration.to_string()));
        }
        if self.config.deadline_header {
            let mut headers = properties.headers().clone().unwrap_or_default();
            let deadline = i64::try_from(call.wall_deadline.0).unwrap_or(i64::MAX);
            headers.insert(
                ShortString::from(DEADLINE_HEADER),
                AMQPValue::LongLongInt(deadline),
            );
            properties = properties.with_headers(headers);
        }
        let request = &call.request;
        match self.conn.publish(
            channel,
            &request.exchange,
            &request.routing_key,
            self.config.mandatory,
            &properties,
            &request.body,
        ) {
            Ok(seq) => {
                let published_before = call.published;
                call.sent = true;
                call.published = true;
                self.stats.requests_sent += 1;
                if let Some(seq) = seq {
                    self.unconfirmed.push_back(Unconfirmed {
                        seq,
                        call: id,
                        published_before,
                    });
                }
                seq
            }
            // The body is above the broker's limit or a header does not fit in a frame:
            // nothing was sent.
            Err(UsageError::FrameTooLarge | UsageError::MessageTooLarge { .. }) => {
                self.end(
                    id,
                    Err(RpcError::Rejected {
                        code: "request_too_large".into(),
                        message: "request properties do not fit in a frame".into(),
                    }),
                );
                None
            }
            // The connection is going away; the call waits for the next one.
            Err(_) => {
                self.held.push_back(id);
                None
            }
        }
    }

    /// The reply path was lost (its consumer cancelled or its channel closed): calls sent
    /// cannot get their replies. Idempotent ones are sent again on the next path.
    fn lose_reply_path(&mut self, now: Instant) {
        self.lose_sent_calls(now, |_| true, RpcError::ReplyPathLost, true);
    }

    /// Calls sent (and `taken` by the loss) that cannot be answered any more: idempotent ones
    /// wait to be sent again (deadline permitting, and at most [`MAX_CHANNEL_RESENDS`] times for
    /// a channel loss), the others end with `error`.
    fn lose_sent_calls(
        &mut self,
        now: Instant,
        taken: impl Fn(&Call) -> bool,
        error: RpcError,
        channel_loss: bool,
    ) {
        let mut lost: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.sent && taken(c))
            .map(|(id, _)| *id)
            .collect();
        // In id order: events must not depend on hash order (runs replay exactly).
        lost.sort();
        for id in lost {
            match self.calls.get_mut(&id) {
                Some(call)
                    if call.request.idempotent
                        && call.deadline > now
                        && (!channel_loss || call.channel_losses < MAX_CHANNEL_RESENDS) =>
                {
                    call.sent = false;
                    call.channel_losses += u32::from(channel_loss);
                    self.held.push_back(id);
                }
                _ => self.end(id, Err(error.clone())),
            }
        }
    }

    /// Ends a call whose deadline passed.
    fn expire(&mut self, id: CallId) {
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

    /// Ends a call: the one place a `CallEnded` event is made, so each call ends once.
    fn end(&mut self, id: CallId, result: Result<RpcReply, RpcError>) {
        if self.calls.remove(&id).is_none() {
            return;
        }
        self.timers.clear(&Timer::Call(id));
        let answered = matches!(
            result,
            Ok(_) | Err(RpcError::Remote { .. } | RpcError::Rejected { .. })
        );
        if answered {
            self.stats.calls_answered += 1;
        } else {
            self.stats.calls_failed += 1;
        }
        self.remember(
            id,
            if answered {
                Ended::Answered
            } else {
                Ended::Otherwise
            },
        );
        self.events
            .push_back(ClientEvent::CallEnded { call: id, result });
    }

    /// Remembers how a call ended, for a while, to tell duplicate replies from late ones.
    fn remember(&mut self, id: CallId, ended: Ended) {
        self.recent.insert(id, ended);
        self.recent_order.push_back(id);
        if self.recent_order.len() > RECENT_ENDED {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }
}

/// What may happen to a held call now.
enum Gate {
    /// Publish it, pipelined.
    Send,
    /// Publish it alone (see `isolation.rs`).
    SendAlone {
        exchange: String,
        body: u64,
    },
    /// Not yet.
    Wait,
    /// Not yet, and nothing behind it goes first.
    Hold,
    Fail(RpcError),
    Gone,
}

impl From<Verdict> for Gate {
    fn from(verdict: Verdict) -> Self {
        match verdict {
            Verdict::Send => Gate::Send,
            Verdict::Wait => Gate::Wait,
            Verdict::Fail(error) => Gate::Fail(error),
        }
    }
}

/// The body size and the limit in RabbitMQ's refusal of a message above `max_message_size`:
/// "PRECONDITION_FAILED - message size N is larger than configured max size M"
/// (`rabbit_channel:check_msg_size`).
fn size_refusal(text: &str) -> Option<(u64, u64)> {
    let number_after = |marker: &str| -> Option<u64> {
        let rest = &text[text.find(marker)? + marker.len()..];
        let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
        digits.parse().ok()
    };
    Some((number_after("message size ")?, number_after("max size ")?))
}

/// The exchange a RabbitMQ refusal names: "NOT_FOUND - no exchange 'X' in vhost '/'" or
/// "ACCESS_REFUSED - access to exchange 'X' in vhost '/' refused for user 'U'".
fn quoted_exchange(text: &str) -> Option<&str> {
    let marker = ["no exchange '", "access to exchange '"]
        .into_iter()
        .find(|m| text.contains(m))?;
    let rest = &text[text.find(marker)? + marker.len()..];
    // The name ends at the quote before " in vhost" (a name may itself hold quotes).
    let end = rest.rfind("' in vhost").or_else(|| rest.rfind('\''))?;
    Some(&rest[..end])
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
