//! The RPC server machine: consumes a request queue with a prefetch window, hands requests out
//! one at a time, replies and acknowledges.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::Bytes;

use super::acks::{Ack, AckWindow};
use super::outbox::{refused_size_limit, Outbox, Outgoing};
use super::policy::{decide, Decision, DropReason, HandlerOutcome, RequestFacts};
use super::reply_cache::{CachedReply, ReplyCache};
use super::reply_to::is_answerable;
use super::response::Response;
use super::{UnixMillis, DEADLINE_HEADER, ERROR_HEADER, REJECTED_HEADER};
use crate::connection::{
    Connection, ConnectionConfig, ConsumeOptions, Delivery, Event, QueueOptions, Reply,
};
use crate::error::{ChannelError, ConnectionError, UsageError};
use crate::ids::{ChannelId, DeliveryTag, ReplyCode, RequestId};
use crate::types::BasicProperties;

/// The type of queue to declare when the request queue does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    /// A non-durable classic queue, as the first versions of RabbitMQ's tutorial 6 declare it.
    #[default]
    Classic,
    /// A durable quorum queue, as the current tutorial declares it.
    Quorum,
}

/// RPC server settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The request queue.
    pub queue: String,
    /// How many unacknowledged requests the broker may push to us (`basic.qos`); size it to the
    /// number of requests the application runs at once.
    pub prefetch: u16,
    /// What to declare when the queue does not exist. An existing queue is served as it is,
    /// whatever its type.
    pub declare_as: QueueKind,
    /// How far the caller's clock may be from ours. The absolute deadline a request carries
    /// (`x-rpc-deadline`, the caller's wall clock) is trusted only this much: a request is
    /// dropped as expired when that deadline is more than this far behind our wall clock, or
    /// when its relative budget (`expiration`, counted from when the request reached us, which
    /// no clock skew affects) has run out. 2 s by default.
    pub clock_skew_tolerance: Duration,
    /// How many times a request may be delivered before it is taken for a poison message (one
    /// that kills the server, or the channel, each time it runs) and rejected without requeue,
    /// so that the broker dead-letters it where the queue has a dead-letter exchange instead of
    /// circling it forever. Deliveries are counted from the broker's `x-delivery-count` header
    /// (quorum queues) and, for any queue, from the deliveries this server saw end without an
    /// answer (its channel died, or the handler dropped the reply handle). 5 by default;
    /// 0 counts as 1.
    pub max_deliveries: u32,
    /// How many published replies are remembered, by request, so that a request redelivered
    /// after its reply went out (its ack was lost with its channel, say to the broker's
    /// `consumer_timeout`) is answered again from here instead of being run again (counted in
    /// [`ServerStats::reply_cache_hits`]). 1024 by default; 0 turns the cache off.
    pub reply_cache_entries: usize,
    /// How many body bytes the reply cache holds at most (the oldest replies go first);
    /// 16 MiB by default.
    pub reply_cache_bytes: usize,
    /// How long a handler may run before the driver ends it with the error reply
    /// [`HANDLER_TIMEOUT`] (it may have done part of its work). `None` by default: only the
    /// caller's deadline bounds a handler. Set it below the broker's `consumer_timeout`
    /// (RabbitMQ 3.10: 30 minutes) so that a runaway handler is answered before the broker
    /// closes the consuming channel and redelivers every request on it.
    pub handler_timeout: Option<Duration>,
}

impl ServerConfig {
    /// Serves `queue` with prefetch 1, as the tutorial does.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            prefetch: 1,
            declare_as: QueueKind::Classic,
            clock_skew_tolerance: Duration::from_secs(2),
            max_deliveries: 5,
            reply_cache_entries: 1024,
            reply_cache_bytes: 16 * 1024 * 1024,
            handler_timeout: None,
        }
    }
}

/// A handler's error: it becomes an error reply (see the wire format in [`crate::rpc`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// The request is invalid; it was refused before running.
    Rejected {
        /// Machine-readable code, e.g. `invalid_request`.
        code: String,
        /// Human-readable message.
        message: String,
    },
    /// The handler ran and failed.
    Failed {
        /// Machine-readable code, e.g. `handler_failed`.
        code: String,
        /// Human-readable message.
        message: String,
    },
}

/// Error code of the error replies made from a body that does not parse (the `From`
/// conversions of [`HandlerError`]).
pub const INVALID_REQUEST: &str = "invalid_request";
/// Error code of the error replies made from an I/O error (`From<std::io::Error>`).
pub const IO_ERROR: &str = "io_error";

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerError::Rejected { code, message } => write!(f, "rejected ({code}): {message}"),
            HandlerError::Failed { code, message } => write!(f, "failed ({code}): {message}"),
        }
    }
}

impl std::error::Error for HandlerError {}

/// A body that is not UTF-8 is invalid input: rejected, never ran.
impl From<std::str::Utf8Error> for HandlerError {
    fn from(e: std::str::Utf8Error) -> Self {
        HandlerError::Rejected {
            code: INVALID_REQUEST.into(),
            message: format!("the body is not UTF-8: {e}"),
        }
    }
}

/// A number that does not parse is invalid input: rejected, never ran.
impl From<std::num::ParseIntError> for HandlerError {
    fn from(e: std::num::ParseIntError) -> Self {
        HandlerError::Rejected {
            code: INVALID_REQUEST.into(),
            message: format!("not a valid integer: {e}"),
        }
    }
}

/// A number that does not parse is invalid input: rejected, never ran.
impl From<std::num::ParseFloatError> for HandlerError {
    fn from(e: std::num::ParseFloatError) -> Self {
        HandlerError::Rejected {
            code: INVALID_REQUEST.into(),
            message: format!("not a valid number: {e}"),
        }
    }
}

/// An I/O error happens while the handler runs: failed.
impl From<std::io::Error> for HandlerError {
    fn from(e: std::io::Error) -> Self {
        HandlerError::Failed {
            code: IO_ERROR.into(),
            message: e.to_string(),
        }
    }
}

/// One request taken off the prefetch buffer. Answer it with [`RpcServer::reply`].
#[derive(Debug)]
pub struct Request {
    /// Request body.
    pub body: Bytes,
    /// Request properties.
    pub properties: BasicProperties,
    /// When the caller gives up, on our clock: the earlier of its relative budget
    /// (`expiration`, counted from when the request reached us) and its absolute deadline
    /// (`x-rpc-deadline` plus [`ServerConfig::clock_skew_tolerance`]). `None` when the request
    /// carries neither. A driver abandons a handler still running at this instant.
    pub deadline: Option<Instant>,
    /// The reply handle: give it back to [`RpcServer::reply`], or to [`RpcServer::abandon`]
    /// when no answer will come.
    pub token: ReplyToken,
}

/// The handle that answers a request. Must be passed to [`RpcServer::reply`], or to
/// [`RpcServer::abandon`] when the handler gave up without an answer (the request goes back to
/// the broker). It is plain data that may cross threads; the server cannot see it dropped, so a
/// token dropped instead holds its worker slot ([`RpcServer::in_flight`]) until the connection
/// goes, when the broker requeues its request.
#[derive(Debug)]
#[must_use = "a request must be answered with RpcServer::reply or given up with RpcServer::abandon"]
pub struct ReplyToken {
    facts: TokenFacts,
}

/// What a token carries: enough to reply and settle the delivery.
#[derive(Debug, Clone)]
struct TokenFacts {
    /// The consumer incarnation the delivery belongs to: a tag from an older channel must not be
    /// acked on a newer one (RabbitMQ closes the channel with 406 for an unknown tag).
    epoch: u64,
    channel: ChannelId,
    delivery_tag: DeliveryTag,
    /// Which delivery of the request this is (see [`ServerConfig::max_deliveries`]).
    deliveries: u32,
    /// When the caller gives up, on our clock.
    deadline: Option<Instant>,
    reply_to: ShortString,
    correlation_id: Option<ShortString>,
}

/// What the server has to say.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// Consuming the request queue (again, after a reconnect or a cancel).
    Ready,
    /// A reply handle was given up ([`RpcServer::abandon`]); the request went back to the broker
    /// (requeued until [`ServerConfig::max_deliveries`], then rejected for good, so that a
    /// request that kills its handler cannot loop).
    Abandoned {
        /// Whether it was requeued.
        requeued: bool,
    },
    /// A request was settled without being run (see [`DropReason`]); it is counted in
    /// [`ServerStats`]. The caller of an expired one has given up already.
    Dropped {
        /// Why.
        reason: DropReason,
        /// The request's correlation id, for the logs.
        correlation_id: Option<String>,
    },
    /// A reply could not be published as it was (its body exceeds the broker's
    /// `max_message_size`, or its header the negotiated frame_max); the caller got an error
    /// reply with code [`REPLY_TOO_LARGE`] instead.
    ReplyTooLarge {
        /// The request's correlation id, for the logs.
        correlation_id: Option<String>,
        /// Why the reply could not be published.
        error: UsageError,
    },
    /// The broker refused a reply even when it was the only one in flight: it closed the reply
    /// channel for it (say, a forged direct reply-to address), or the `reply_too_large` error
    /// reply that replaced it. The request is acked without a reply, so that it cannot circle
    /// (counted in [`ServerStats::replies_refused`]); its caller times out.
    ReplyRefused {
        /// The request's correlation id, for the logs.
        correlation_id: Option<String>,
        /// The broker's words: the reply code and text it closed the reply channel with.
        error: ChannelError,
    },
    /// The broker closed the consuming channel because a delivery stayed unacked past its
    /// `consumer_timeout` (406, "delivery acknowledgement ... timed out"; RabbitMQ "Consumers",
    /// "Delivery Acknowledgement Timeout"): every request on it is redelivered. Raise the
    /// broker's `consumer_timeout` above the slowest handler, or set
    /// [`ServerConfig::handler_timeout`] below it.
    AckTimedOut(ChannelError),
    /// The connection closed. Requests in flight cannot be acked any more; the broker
    /// redelivers them. [`RpcServer::reconnect`] starts over.
    Disconnected(ConnectionError),
    /// [`RpcServer::shutdown`] finished: the consumer is cancelled, every request answered, the
    /// connection closed.
    Stopped,
}

/// Counters for what the server did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Deliveries received.
    pub received: u64,
    /// Successful replies sent.
    pub replied_ok: u64,
    /// Error replies sent (rejected or failed).
    pub replied_error: u64,
    /// Requests acked and dropped because they had no `reply_to`.
    pub dropped_no_reply_to: u64,
    /// Requests acked and dropped because their caller's budget ran out in the prefetch buffer.
    pub dropped_expired: u64,
    /// Requests acked and dropped because their `reply_to` is a direct reply-to name that
    /// names no channel ([`DropReason::BadReplyTo`]).
    pub dropped_bad_reply_to: u64,
    /// Requests rejected without requeue because they were delivered more often than
    /// [`ServerConfig::max_deliveries`].
    pub dropped_too_many_deliveries: u64,
    /// Replies too large to publish, replaced by a [`REPLY_TOO_LARGE`] error reply (counted in
    /// `replied_error` too).
    pub replies_too_large: u64,
    /// Reply handles dropped unanswered.
    pub abandoned: u64,
    /// Replies for requests from a channel that is gone: their ack is void (the broker has
    /// requeued the request already), but the reply itself is still published on the current
    /// channel, so that the caller hears at once (counted in `replied_ok`/`replied_error`).
    pub stale_replies: u64,
    /// Stale replies that could not be published because no channel was usable, and replies
    /// still unconfirmed when the connection closed (the caller then hears from the
    /// redelivered copy, or times out).
    pub stale_replies_lost: u64,
    /// Replies the broker refused even when alone in flight (see
    /// [`ServerEvent::ReplyRefused`]); their requests were acked without a reply.
    pub replies_refused: u64,
    /// Replies the broker nacked (`basic.nack`: it could not take them, RabbitMQ "Publisher
    /// Confirms"); their requests were requeued, to be run again.
    pub replies_nacked: u64,
    /// Replies published again on a fresh reply channel after the broker closed the one they
    /// were on before confirming them.
    pub replies_republished: u64,
    /// Redelivered requests answered from the reply cache instead of being run again (see
    /// [`ServerConfig::reply_cache_entries`]).
    pub reply_cache_hits: u64,
}

/// Error code of the error reply that replaces a reply too large to publish.
pub const REPLY_TOO_LARGE: &str = "reply_too_large";
/// Error code of the error reply sent for a request whose handler was still running at the
/// caller's deadline (sent by the driver; see [`Request::deadline`]).
pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
/// Error code of the error reply sent for a request whose handler ran longer than
/// [`ServerConfig::handler_timeout`] (sent by the driver; the handler may have run in part).
pub const HANDLER_TIMEOUT: &str = "handler_timeout";
/// Error code of the error reply sent when the handler panicked.
pub const HANDLER_PANICKED: &str = "handler_panicked";

/// Most requests remembered as "delivered to us and ended without an answer", to count their
/// deliveries on queues that have no `x-delivery-count` (classic queues); the oldest entry is
/// forgotten first. Entries are removed when the request is settled, so only requests whose
/// redelivery went to another server linger.
const MAX_REMEMBERED_DELIVERIES: usize = 4096;

/// How many times per connection the reply channel is opened again after the broker closed it
/// under unconfirmed replies; past that, replies go on the consuming channel (no confirms, the
/// order-based guarantee) until the next connection, rather than a channel per reply.
const MAX_REPLY_CHANNEL_DEATHS: u32 = 16;

/// Header RabbitMQ sets on deliveries from quorum queues: how many times the message was
/// delivered before and not acked (RabbitMQ "Quorum Queues", "Poison Message Handling").
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// A delivery waiting in the prefetch buffer.
#[derive(Debug)]
struct Buffered {
    delivery: Delivery,
    /// When it reached us: its `expiration` counts from here.
    received: Instant,
}

/// Identifies a request across its redeliveries: its reply address and correlation id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestKey {
    reply_to: ShortString,
    correlation_id: ShortString,
}

/// A request remembered in [`RpcServer::unsettled`].
#[derive(Debug, Clone, Copy)]
struct Remembered {
    deliveries: u32,
    seq: u64,
    /// A handler has it now (its token is out).
    running: bool,
}

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for the connection.
    Connecting,
    /// Passive declare sent: does the queue exist?
    Checking { channel: ChannelId },
    /// The queue was missing: declaring it on a fresh channel (the 404 closed the old one).
    Declaring { channel: ChannelId },
    /// qos and consume sent.
    Subscribing { channel: ChannelId },
    /// Consuming.
    Serving {
        channel: ChannelId,
        consumer_tag: String,
    },
    /// Shutting down: cancel sent (if we were consuming), waiting for requests in flight.
    Draining { channel: Option<ChannelId> },
    /// The connection closed; waiting for [`RpcServer::reconnect`].
    Disconnected,
    /// Shut down.
    Stopped,
}

/// The RPC server machine. Owns its [`Connection`]; drive it like one, and take requests with
/// [`RpcServer::poll_request`].
#[derive(Debug)]
pub struct RpcServer {
    conn: Connection,
    conn_config: ConnectionConfig,
    config: ServerConfig,
    phase: Phase,
    epoch: u64,
    buffer: VecDeque<Buffered>,
    in_flight: usize,
    /// Requests handed to a handler and not settled yet, with their delivery count: when the
    /// channel dies under them, their redelivery counts one more (see
    /// [`ServerConfig::max_deliveries`]).
    unsettled: HashMap<RequestKey, Remembered>,
    /// Stamps [`Remembered::seq`], to forget the oldest entry first.
    unsettled_seq: u64,
    /// Acks owed, sent coalesced at the end of the turn ([`RpcServer::poll_transmit`]).
    acks: AckWindow,
    /// Reused by [`RpcServer::flush_acks`].
    ack_scratch: Vec<Ack>,
    /// The channel replies are published on, apart from the one requests are consumed and
    /// acked on. RabbitMQ runs each channel in an Erlang process of its own and handles a
    /// channel's commands in order, so on the consuming channel the ack after a reply waits
    /// until the broker has routed that reply, and only then frees the prefetch slot for the
    /// next delivery. On two channels the reply is routed while the ack is handled: at
    /// prefetch 1, where that turnaround bounds the calls per second, 1.03x-1.23x the calls/s
    /// in four A/B runs at C=64 (README, Performance). The wire order is unchanged: a reply's
    /// frames, then its ack, and the broker's connection process hands each channel its
    /// commands in that order. Opened at each `Connected` (publishes may follow
    /// `channel.open` at once, AMQP 0-9-1 §2.2.5); `None` where `channel_max` leaves no room
    /// and, until the next connection, once the broker closed it (rather than opening channel
    /// after channel for a broker that refuses our replies): replies then go on the consuming
    /// channel.
    publisher: Option<ChannelId>,
    /// Replies on the reply channel waiting for their confirm, or for their turn (see
    /// `outbox.rs`): a request is acked only once the broker confirmed its reply.
    outbox: Outbox<TokenFacts>,
    /// How often the broker closed the reply channel on this connection under unconfirmed
    /// replies (bounded by [`MAX_REPLY_CHANNEL_DEATHS`]).
    publisher_deaths: u32,
    /// The broker's `max_message_size` as its refusal of a reply told it, when lower than the
    /// connection's [`ConnectionConfig::max_message_size`]: later replies above it become
    /// [`REPLY_TOO_LARGE`] error replies before they are published.
    reply_limit: Option<u64>,
    /// Replies published lately, by request (see [`ServerConfig::reply_cache_entries`]).
    cache: ReplyCache<RequestKey>,
    /// Redeliveries of requests whose handler still runs (the broker closed their channel
    /// under them): answered from the cache once that handler's reply is out, instead of
    /// running twice. Bounded by the prefetch window.
    parked: HashMap<RequestKey, Buffered>,
    events: VecDeque<ServerEvent>,
    stats: ServerStats,
    setup_request: Option<RequestId>,
    /// When a shutdown stops waiting for the broker's confirms of the last replies (see
    /// [`RpcServer::shutdown`]).
    drain_deadline: Option<Instant>,
}

impl RpcServer {
    /// A server that starts connecting at `now`.
    pub fn new(config: ServerConfig, conn_config: ConnectionConfig, now: Instant) -> Self {
        let cache = ReplyCache::new(config.reply_cache_entries, config.reply_cache_bytes);
        Self {
            conn: Connection::new(conn_config.clone(), now),
            conn_config,
            config,
            phase: Phase::Connecting,
            epoch: 0,
            buffer: VecDeque::new(),
            in_flight: 0,
            unsettled: HashMap::new(),
            unsettled_seq: 0,
            acks: AckWindow::default(),
            ack_scratch: Vec::new(),
            publisher: None,
            outbox: Outbox::default(),
            publisher_deaths: 0,
            reply_limit: None,
            cache,
            parked: HashMap::new(),
            events: VecDeque::new(),
            stats: ServerStats::default(),
            setup_request: None,
            drain_deadline: None,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Inputs and outputs
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

    /// Runs due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.conn.handle_timeout(now);
        self.pump(now);
        self.maybe_finish_shutdown(now);
    }

    /// Appends frames ready to send to `buf`. The acks owed go first, coalesced: one
    /// `basic.ack` with `multiple` for the leading run of answered deliveries (AMQP 0-9-1
    /// §1.8.3.13), after the replies they follow. Every settle decision made since the last
    /// call (a reply's, or a drop's in [`RpcServer::poll_request`]) leaves in this call: an
    /// ack held for a later turn would never leave at prefetch 1, where no later delivery
    /// comes to make one.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> usize {
        self.flush_acks();
        self.conn.poll_transmit(now, buf)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// When [`RpcServer::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let conn = self.conn.poll_timeout();
        match self.drain_deadline {
            Some(drain) if self.is_waiting_for_confirms() => {
                Some(conn.map_or(drain, |c| c.min(drain)))
            }
            _ => conn,
        }
    }

    /// Takes the next request to run off the prefetch buffer. Call it after every input, as
    /// long as workers are free (deliveries raise no event of their own). Requests without
    /// `reply_to`, whose caller has given up (`wall` is the wall clock now; see
    /// [`ServerConfig::clock_skew_tolerance`]), or delivered too often
    /// ([`ServerConfig::max_deliveries`]) are settled on the way, never returned; each raises
    /// [`ServerEvent::Dropped`].
    // One loop over the buffer that settles each dropped request on the way, read in order.
    pub fn poll_request(&mut self, now: Instant, wall: UnixMillis) -> Option<Request> {
        while let Some(Buffered { delivery, received }) = self.buffer.pop_front() {
            let reply_to = delivery
                .properties
                .reply_to()
                .clone()
                .filter(|r| !r.as_str().is_empty());
            let key = reply_to
                .clone()
                .zip(delivery.properties.correlation_id().clone())
                .map(|(reply_to, correlation_id)| RequestKey {
                    reply_to,
                    correlation_id,
                });
            if let Some(key) = key.as_ref().filter(|_| delivery.redelivered) {
                if self.unsettled.get(key).is_some_and(|r| r.running)
                    && self.parked.len() < usize::from(self.config.prefetch.max(1))
                {
                    self.parked
                        .insert(key.clone(), Buffered { delivery, received });
                    continue;
                }
                if self.answer_from_cache(key, &delivery) {
                    continue;
                }
            }
            let deliveries = self.deliveries(&delivery, key.as_ref());
            let deadline = self.deadline(&delivery.properties, received, now, Some(wall));
            let facts = RequestFacts {
                has_reply_to: reply_to.is_some(),
                answerable: reply_to.as_ref().is_none_or(|r| is_answerable(r.as_str())),
                expired: deadline.is_some_and(|d| d <= now),
                deliveries,
                max_deliveries: self.config.max_deliveries.max(1),
            };
            match decide(facts, HandlerOutcome::NotRun) {
                Decision::Run => {
                    self.in_flight += 1;
                    if let Some(key) = key {
                        self.remember(key, deliveries);
                    }
                    let facts = TokenFacts {
                        epoch: self.epoch,
                        channel: delivery.channel,
                        delivery_tag: delivery.delivery_tag,
                        deliveries,
                        deadline,
                        reply_to: reply_to.unwrap_or_default(),
                        correlation_id: delivery.properties.correlation_id().clone(),
                    };
                    return Some(Request {
                        body: delivery.body,
                        properties: delivery.properties,
                        deadline,
                        token: ReplyToken { facts },
                    });
                }
                Decision::Drop(reason) => {
                    // Each fails only when the channel is gone; then the broker requeues it.
                    match reason {
                        DropReason::NoReplyTo => {
                            self.stats.dropped_no_reply_to += 1;
                            self.ack(delivery.channel, delivery.delivery_tag);
                        }
                        DropReason::Expired => {
                            self.stats.dropped_expired += 1;
                            self.ack(delivery.channel, delivery.delivery_tag);
                        }
                        DropReason::BadReplyTo => {
                            self.stats.dropped_bad_reply_to += 1;
                            self.ack(delivery.channel, delivery.delivery_tag);
                        }
                        DropReason::TooManyDeliveries { .. } => {
                            self.stats.dropped_too_many_deliveries += 1;
                            self.reject(delivery.channel, delivery.delivery_tag, false);
                        }
                    }
                    if let Some(key) = &key {
                        self.unsettled.remove(key);
                    }
                    self.events.push_back(ServerEvent::Dropped {
                        reason,
                        correlation_id: correlation_id(&delivery.properties),
                    });
                }
                Decision::ReplyThenAck | Decision::Reject { .. } => {}
            }
        }
        None
    }

    // -----------------------------------------------------------------------------------------
    // Getters
    // -----------------------------------------------------------------------------------------

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Whether the server consumes the request queue now.
    pub fn is_serving(&self) -> bool {
        matches!(self.phase, Phase::Serving { .. })
    }

    /// Requests handed out and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Requests buffered, not handed out yet.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Counters.
    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    /// Whether [`RpcServer::shutdown`] has finished.
    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    // -----------------------------------------------------------------------------------------
    // Commands
    // -----------------------------------------------------------------------------------------

    /// Answers a request: publishes the reply (or error reply) to its `reply_to` with its
    /// correlation id, then acks it once the reply is safe: on the reply channel (in confirm
    /// mode) when the broker confirms the reply; a reply the broker nacks requeues the request
    /// instead ([`ServerStats::replies_nacked`]), and one whose channel closes before its
    /// confirm is published again on a fresh channel, never acked unconfirmed. Without a reply
    /// channel (`channel_max` 1, or the broker kept closing it) the reply goes on the
    /// consuming channel, ahead of the ack in that channel's order. A reply that cannot be
    /// published as it is (body above the broker's `max_message_size`, as configured in
    /// [`ConnectionConfig::max_message_size`] or as the broker's refusal of an earlier reply
    /// told it; header above frame_max) is replaced by an error reply [`REPLY_TOO_LARGE`]. A token from a channel that has since closed is counted stale: its
    /// ack is void (the broker has requeued that request), but the reply is still published
    /// on the current channel when one is usable, since it goes to `reply_to` through the
    /// default exchange and does not depend on the delivery's channel.
    ///
    /// A successful result is anything that becomes a [`Response`] (`Bytes`, `String`, ...);
    /// a `Response` also sets the reply's content type, content encoding and headers, but
    /// never its correlation id or error headers (see [`Response`]).
    pub fn reply(
        &mut self,
        now: Instant,
        token: ReplyToken,
        result: Result<impl Into<Response>, HandlerError>,
    ) {
        let result = result.map(Into::into);
        let ReplyToken { facts } = token;
        self.in_flight = self.in_flight.saturating_sub(1);
        let request_facts = self.token_request_facts(&facts, now);
        if decide(request_facts, HandlerOutcome::Answered) == Decision::ReplyThenAck {
            // Its handler is done: a redelivery (its channel may close before the reply is
            // confirmed) must not wait for it.
            self.stopped_running(&facts);
            if !self.is_current(&facts) {
                self.stats.stale_replies += 1;
            }
            let is_error = result.is_err();
            let (properties, body) = reply_message(&facts, result);
            self.send_reply(Outgoing {
                seq: None,
                facts,
                properties,
                body,
                is_error,
                is_fallback: false,
                from_cache: false,
            });
        }
        self.maybe_finish_shutdown(now);
    }

    /// Gives up a request without an answer (its handler failed to produce one): it is
    /// counted ([`ServerStats::abandoned`]), reported ([`ServerEvent::Abandoned`]) and given
    /// back to the broker, requeued unless it was delivered too often
    /// ([`ServerConfig::max_deliveries`]).
    pub fn abandon(&mut self, now: Instant, token: ReplyToken) {
        let ReplyToken { facts } = token;
        self.in_flight = self.in_flight.saturating_sub(1);
        self.stats.abandoned += 1;
        self.stopped_running(&facts);
        self.unpark(&facts);
        let request_facts = self.token_request_facts(&facts, now);
        if let Decision::Reject { requeue } = decide(request_facts, HandlerOutcome::Abandoned) {
            let requeued = if facts.epoch == self.epoch {
                self.reject(facts.channel, facts.delivery_tag, requeue);
                if !requeue {
                    self.forget(&facts);
                }
                // Requeued: still remembered, so that its next delivery counts one more.
                requeue
            } else {
                // Its channel is gone, and the broker requeued everything unacked on it.
                true
            };
            self.events.push_back(ServerEvent::Abandoned { requeued });
        }
        self.maybe_finish_shutdown(now);
    }

    /// Starts a graceful shutdown: cancel the consumer, give back buffered requests, let the
    /// ones in flight be answered, then close. [`ServerEvent::Stopped`] follows.
    pub fn shutdown(&mut self, now: Instant) {
        match std::mem::replace(&mut self.phase, Phase::Draining { channel: None }) {
            Phase::Serving {
                channel,
                consumer_tag,
            } => {
                // Fails only when the channel is going away, which also stops the consumer.
                let _ = self.conn.cancel(channel, &consumer_tag);
                self.phase = Phase::Draining {
                    channel: Some(channel),
                };
            }
            Phase::Stopped => self.phase = Phase::Stopped,
            Phase::Checking { channel }
            | Phase::Declaring { channel }
            | Phase::Subscribing { channel } => {
                self.phase = Phase::Draining {
                    channel: Some(channel),
                };
            }
            Phase::Connecting | Phase::Disconnected | Phase::Draining { .. } => {}
        }
        self.give_back_buffer(now);
        self.drain_deadline = now.checked_add(self.conn_config.close_timeout);
        self.maybe_finish_shutdown(now);
    }

    /// Replaces a closed connection with a new one starting its handshake at `now`.
    pub fn reconnect(&mut self, now: Instant) -> Result<(), UsageError> {
        if matches!(self.phase, Phase::Stopped | Phase::Draining { .. }) {
            return Err(UsageError::ShutDown);
        }
        if !self.conn.is_closed() {
            return Err(UsageError::Closing);
        }
        self.conn = Connection::new(self.conn_config.clone(), now);
        self.phase = Phase::Connecting;
        Ok(())
    }

    /// [`RpcServer::reconnect`] to another broker: `conn_config` (its credentials, vhost,
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

    // -----------------------------------------------------------------------------------------
    // Connection events
    // -----------------------------------------------------------------------------------------

    fn pump(&mut self, now: Instant) {
        while let Some(event) = self.conn.poll_event() {
            self.on_event(now, event);
        }
    }

    // One arm per connection event the server reacts to: it reads best as one table.
    fn on_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Connected => {
                // The consuming channel first: under a `channel_max` of 1 it gets the only one.
                self.check_queue();
                self.publisher_deaths = 0;
                self.open_publisher();
            }
            Event::ChannelClosed(error) if self.publisher == Some(error.channel) => {
                self.on_publisher_closed(error);
                self.maybe_finish_shutdown(now);
            }
            Event::PublishConfirmed {
                channel,
                seq,
                acked,
            } if self.publisher == Some(channel) => {
                self.on_confirm(seq, acked);
                self.maybe_finish_shutdown(now);
            }
            Event::Completed {
                channel,
                request,
                reply,
            } if Some(request) == self.setup_request => {
                self.setup_request = None;
                self.on_setup_reply(channel, reply);
            }
            Event::ChannelClosed(error) if Some(error.channel) == self.serving_channel() => {
                // Deliveries of a closed channel are requeued by the broker; our tags for them
                // are void.
                if error.code == ReplyCode::PRECONDITION_FAILED
                    && error.text.contains("acknowledgement")
                    && error.text.contains("timed out")
                {
                    self.events
                        .push_back(ServerEvent::AckTimedOut(error.clone()));
                }
                self.buffer.clear();
                self.parked.clear();
                self.acks.clear();
                self.epoch += 1;
                self.setup_request = None;
                match self.phase {
                    Phase::Checking { .. } if error.code == ReplyCode::NOT_FOUND => {
                        self.declare_queue()
                    }
                    Phase::Draining { .. } => self.phase = Phase::Draining { channel: None },
                    _ => self.check_queue(),
                }
                self.maybe_finish_shutdown(now);
            }
            Event::Delivery(delivery) => {
                self.stats.received += 1;
                if matches!(self.phase, Phase::Draining { .. }) {
                    // Arrived after we cancelled: never ran, let another server have it.
                    let _ = self
                        .conn
                        .reject(delivery.channel, delivery.delivery_tag, true);
                } else {
                    self.acks.delivered(delivery.channel, delivery.delivery_tag);
                    self.buffer.push_back(Buffered {
                        delivery,
                        received: now,
                    });
                }
            }
            Event::ContentTooLarge {
                channel,
                delivery_tag: Some(delivery_tag),
                body_size,
                properties,
            } => {
                // Too large to buffer, so it cannot run; but its caller can still learn why at
                // once (instead of at its deadline), and it is settled for good.
                self.stats.received += 1;
                self.acks.delivered(channel, delivery_tag);
                match properties
                    .reply_to()
                    .clone()
                    .filter(|r| !r.as_str().is_empty() && is_answerable(r.as_str()))
                {
                    Some(reply_to) => {
                        // The event carries no redelivered flag; the broker's count is all we
                        // have. No wall clock here: only the relative budget is known.
                        let facts = TokenFacts {
                            epoch: self.epoch,
                            channel,
                            delivery_tag,
                            deliveries: broker_deliveries(&properties).unwrap_or(1),
                            deadline: self.deadline(&properties, now, now, None),
                            reply_to,
                            correlation_id: properties.correlation_id().clone(),
                        };
                        self.in_flight += 1;
                        let token = ReplyToken { facts };
                        let message =
                            format!("request body of {body_size} bytes exceeds the server's limit");
                        let error = HandlerError::Rejected {
                            code: "request_too_large".into(),
                            message,
                        };
                        self.reply(now, token, Err::<Response, _>(error));
                    }
                    None => {
                        self.stats.dropped_no_reply_to += 1;
                        self.ack(channel, delivery_tag);
                    }
                }
            }
            // The broker cancelled us: the queue was deleted (or its node went away). Declare
            // it again and consume on the same channel, unless we are shutting down anyway.
            Event::ConsumerCancelled { .. } if !matches!(self.phase, Phase::Draining { .. }) => {
                self.check_queue_on(self.serving_channel());
            }
            Event::Closed(error) => {
                self.publisher = None;
                // Unconfirmed: their requests go back to the queue with the connection.
                let lost = self.outbox.drain().count();
                self.stats.stale_replies_lost += u64::try_from(lost).unwrap_or(u64::MAX);
                self.buffer.clear();
                self.parked.clear();
                self.acks.clear();
                self.epoch += 1;
                self.setup_request = None;
                match self.phase {
                    Phase::Draining { .. } | Phase::Stopped => {
                        if self.phase != Phase::Stopped {
                            self.phase = Phase::Stopped;
                            self.events.push_back(ServerEvent::Stopped);
                        }
                    }
                    _ => {
                        self.phase = Phase::Disconnected;
                        self.events.push_back(ServerEvent::Disconnected(error));
                    }
                }
            }
            // A shutdown waiting for confirms stops waiting (see `maybe_finish_shutdown`).
            Event::Blocked { .. } => self.maybe_finish_shutdown(now),
            _ => {}
        }
    }

    fn serving_channel(&self) -> Option<ChannelId> {
        match &self.phase {
            Phase::Checking { channel }
            | Phase::Declaring { channel }
            | Phase::Subscribing { channel }
            | Phase::Serving { channel, .. } => Some(*channel),
            Phase::Draining { channel } => *channel,
            Phase::Connecting | Phase::Disconnected | Phase::Stopped => None,
        }
    }

    /// Passive declare on a new channel: serve an existing queue whatever its type.
    fn check_queue(&mut self) {
        self.check_queue_on(None);
    }

    fn check_queue_on(&mut self, channel: Option<ChannelId>) {
        let channel = match channel.filter(|c| self.conn.is_channel_usable(*c)) {
            Some(c) => c,
            None => match self.conn.open_channel() {
                Ok(c) => c,
                Err(_) => return,
            },
        };
        let passive = QueueOptions {
            passive: true,
            ..QueueOptions::default()
        };
        if let Ok(r) =
            self.conn
                .declare_queue(channel, &self.config.queue, passive, FieldTable::default())
        {
            self.setup_request = Some(r);
            self.phase = Phase::Checking { channel };
        }
    }

    /// The queue is missing: declare it as configured, on a new channel.
    fn declare_queue(&mut self) {
        let Ok(channel) = self.conn.open_channel() else {
            return;
        };
        let (options, arguments) = match self.config.declare_as {
            QueueKind::Classic => (QueueOptions::default(), FieldTable::default()),
            QueueKind::Quorum => {
                let mut args = FieldTable::default();
                args.insert(
                    ShortString::from("x-queue-type"),
                    AMQPValue::LongString(LongString::from("quorum")),
                );
                (
                    QueueOptions {
                        durable: true,
                        ..QueueOptions::default()
                    },
                    args,
                )
            }
        };
        if let Ok(r) = self
            .conn
            .declare_queue(channel, &self.config.queue, options, arguments)
        {
            self.setup_request = Some(r);
            self.phase = Phase::Declaring { channel };
        }
    }

    fn on_setup_reply(&mut self, channel: ChannelId, reply: Reply) {
        match reply {
            // Shut down while checking or declaring the queue: do not subscribe (setting the
            // phase to `Subscribing` here would drop `Draining` and serve after shutdown).
            Reply::QueueDeclared { .. } if matches!(self.phase, Phase::Draining { .. }) => {}
            Reply::QueueDeclared { .. } => {
                let prefetch = self.config.prefetch.max(1);
                let consume = ConsumeOptions {
                    no_ack: false,
                    exclusive: false,
                };
                let sent = self.conn.qos(channel, prefetch, false).and_then(|_| {
                    self.conn.consume(
                        channel,
                        &self.config.queue,
                        "",
                        consume,
                        FieldTable::default(),
                    )
                });
                if let Ok(r) = sent {
                    self.setup_request = Some(r);
                    self.phase = Phase::Subscribing { channel };
                }
            }
            Reply::ConsumeOk { consumer_tag } => {
                if matches!(self.phase, Phase::Draining { .. }) {
                    // Shut down while subscribing: cancel what we just started.
                    let _ = self.conn.cancel(channel, &consumer_tag);
                    return;
                }
                self.phase = Phase::Serving {
                    channel,
                    consumer_tag,
                };
                self.events.push_back(ServerEvent::Ready);
            }
            _ => {}
        }
    }

    fn give_back_buffer(&mut self, now: Instant) {
        for Buffered { delivery, received } in std::mem::take(&mut self.buffer) {
            // No wall clock on this path: the relative budget alone tells whether it expired.
            let facts = RequestFacts {
                has_reply_to: delivery
                    .properties
                    .reply_to()
                    .as_ref()
                    .is_some_and(|r| !r.as_str().is_empty()),
                // Not answered on this path either way: given back.
                answerable: true,
                expired: self
                    .deadline(&delivery.properties, received, now, None)
                    .is_some_and(|d| d <= now),
                deliveries: self.deliveries(&delivery, None),
                max_deliveries: self.config.max_deliveries.max(1),
            };
            if let Decision::Reject { requeue } = decide(facts, HandlerOutcome::ShuttingDown) {
                self.reject(delivery.channel, delivery.delivery_tag, requeue);
            }
        }
    }

    /// Acks a delivery: at the next turn, coalesced, when the window tracks it; at once
    /// otherwise. Fails only when the channel is going away; the broker then requeues it.
    fn ack(&mut self, channel: ChannelId, tag: DeliveryTag) {
        if !self.acks.answered(channel, tag) {
            let _ = self.conn.ack(channel, tag, false);
        }
    }

    /// Rejects a delivery at once (a reject cannot be coalesced with acks).
    fn reject(&mut self, channel: ChannelId, tag: DeliveryTag, requeue: bool) {
        self.acks.settled(channel, tag);
        let _ = self.conn.reject(channel, tag, requeue);
    }

    /// Queues the acks owed (see [`RpcServer::poll_transmit`]).
    fn flush_acks(&mut self) {
        if !self.acks.has_acks() {
            return;
        }
        let mut acks = std::mem::take(&mut self.ack_scratch);
        self.acks.take_acks(&mut acks);
        for ack in acks.drain(..) {
            // Fails only when the channel is going away; the broker then requeues them.
            let _ = self.conn.ack(ack.channel, ack.delivery_tag, ack.multiple);
        }
        self.ack_scratch = acks;
    }

    /// The facts a reply token carries, as of `now`.
    fn token_request_facts(&self, facts: &TokenFacts, now: Instant) -> RequestFacts {
        RequestFacts {
            has_reply_to: !facts.reply_to.as_str().is_empty(),
            // Tokens are handed out for answerable requests only.
            answerable: true,
            expired: facts.deadline.is_some_and(|d| d <= now),
            deliveries: facts.deliveries,
            max_deliveries: self.config.max_deliveries.max(1),
        }
    }

    /// Which delivery of its request `delivery` is: the broker's count where it keeps one
    /// (quorum queues), at least 2 when it says it delivered it before, and our own count when
    /// we saw earlier deliveries of it end without an answer.
    fn deliveries(&self, delivery: &Delivery, key: Option<&RequestKey>) -> u32 {
        let flag = if delivery.redelivered { 2 } else { 1 };
        let ours = key
            .filter(|_| delivery.redelivered)
            .and_then(|k| self.unsettled.get(k))
            .map_or(0, |r| r.deliveries.saturating_add(1));
        broker_deliveries(&delivery.properties)
            .unwrap_or(0)
            .max(flag)
            .max(ours)
    }

    /// Remembers a request handed to a handler, until it is settled.
    fn remember(&mut self, key: RequestKey, deliveries: u32) {
        self.unsettled_seq += 1;
        let seq = self.unsettled_seq;
        self.unsettled.insert(
            key,
            Remembered {
                deliveries,
                seq,
                running: true,
            },
        );
        if self.unsettled.len() > MAX_REMEMBERED_DELIVERIES {
            // Rare (only requests whose redelivery went elsewhere linger), so a scan is fine.
            let oldest = self
                .unsettled
                .iter()
                .min_by_key(|(_, r)| r.seq)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.unsettled.remove(&oldest);
            }
        }
    }

    /// Forgets a request once it is settled for good.
    fn forget(&mut self, facts: &TokenFacts) {
        if let Some(correlation_id) = &facts.correlation_id {
            self.unsettled.remove(&RequestKey {
                reply_to: facts.reply_to.clone(),
                correlation_id: correlation_id.clone(),
            });
        }
    }

    /// When the caller of a request received at `received` gives up, on our clock (see
    /// [`remaining_budget`]).
    fn deadline(
        &self,
        properties: &BasicProperties,
        received: Instant,
        now: Instant,
        wall: Option<UnixMillis>,
    ) -> Option<Instant> {
        let waited = now.saturating_duration_since(received);
        let tolerance = self.config.clock_skew_tolerance;
        now.checked_add(remaining_budget(properties, waited, wall, tolerance)?)
    }

    /// The channel replies are published on, if one of their own is usable.
    fn publisher_channel(&self) -> Option<ChannelId> {
        self.publisher.filter(|c| self.conn.is_channel_usable(*c))
    }

    /// The channel a reply for a request of an older channel goes out on, if one is usable.
    fn reply_channel(&self) -> Option<ChannelId> {
        match &self.phase {
            Phase::Serving { channel, .. }
            | Phase::Draining {
                channel: Some(channel),
            } => Some(*channel).filter(|c| self.conn.is_channel_usable(*c)),
            _ => None,
        }
    }

    /// Whether the request of `facts` came on the consuming channel as it is now: only then
    /// can its delivery tag be acked.
    fn is_current(&self, facts: &TokenFacts) -> bool {
        facts.epoch == self.epoch && self.conn.is_channel_usable(facts.channel)
    }

    /// Publishes a reply: on the reply channel, confirm-gated (its request is acked when the
    /// broker confirms it), waiting its turn when the outbox is careful; without a reply
    /// channel, on the consuming channel, where the ack queued after it is handled after it
    /// (RabbitMQ handles a channel's commands in order, and a publish it refuses closes the
    /// channel before the ack is read, which voids the ack).
    fn send_reply(&mut self, mut reply: Outgoing<TokenFacts>) {
        if let Some(channel) = self.publisher_channel() {
            if !self.outbox.may_publish() {
                self.outbox.wait(reply);
                return;
            }
            match self.publish_now(channel, &mut reply) {
                Some(Some(seq)) => self.outbox.published(reply, seq),
                // Not in confirm mode after all (cannot happen: confirm.select went first).
                Some(None) => self.replied(reply),
                None => self.settle_unpublished(reply),
            }
            return;
        }
        let current = self.is_current(&reply.facts);
        let channel = if current {
            Some(reply.facts.channel)
        } else {
            self.reply_channel()
        };
        let Some(channel) = channel else {
            self.stats.stale_replies_lost += 1;
            return;
        };
        match self.publish_now(channel, &mut reply) {
            Some(_) => self.replied(reply),
            None => self.settle_unpublished(reply),
        }
    }

    /// Publishes `reply` on `channel`, its sequence number if the channel is in confirm mode. A
    /// reply too large to publish (body above the broker's `max_message_size`, as configured
    /// or as learned from a refusal; header above frame_max) is replaced by a
    /// [`REPLY_TOO_LARGE`] error reply first: publishing it would make the broker close the
    /// channel (406). `None` when nothing could be published.
    fn publish_now(
        &mut self,
        channel: ChannelId,
        reply: &mut Outgoing<TokenFacts>,
    ) -> Option<Option<DeliveryTag>> {
        // Twice at most: the replacement is a fallback, never replaced again.
        for _ in 0..2 {
            let size = u64::try_from(reply.body.len()).unwrap_or(u64::MAX);
            let result = match self.reply_limit {
                Some(limit) if size > limit => Err(UsageError::MessageTooLarge { size, limit }),
                _ => self.conn.publish(
                    channel,
                    "",
                    reply.facts.reply_to.as_str(),
                    false,
                    &reply.properties,
                    &reply.body,
                ),
            };
            match result {
                Ok(seq) => return Some(seq),
                Err(error @ (UsageError::FrameTooLarge | UsageError::MessageTooLarge { .. }))
                    if !reply.is_fallback =>
                {
                    self.replace_too_large(reply, error);
                }
                // A short error reply fits any frame_max >= 4096 and any sane size limit;
                // otherwise the channel is going away.
                Err(_) => return None,
            }
        }
        None
    }

    /// Replaces `reply` by a [`REPLY_TOO_LARGE`] error reply, counted and reported.
    fn replace_too_large(&mut self, reply: &mut Outgoing<TokenFacts>, error: UsageError) {
        self.stats.replies_too_large += 1;
        let message = match &error {
            UsageError::MessageTooLarge { size, limit } => format!(
                "the reply of {size} bytes exceeds the broker's max_message_size of {limit}"
            ),
            _ => "the reply's headers exceed the negotiated frame_max".to_owned(),
        };
        let fallback = Err(HandlerError::Failed {
            code: REPLY_TOO_LARGE.into(),
            message,
        });
        (reply.properties, reply.body) = reply_message(&reply.facts, fallback);
        reply.is_error = true;
        reply.is_fallback = true;
        self.events.push_back(ServerEvent::ReplyTooLarge {
            correlation_id: reply
                .facts
                .correlation_id
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            error,
        });
    }

    /// The reply is safe (confirmed, or ahead of the ack on the same channel): count it and
    /// ack its request, if its delivery tag is still good.
    fn replied(&mut self, reply: Outgoing<TokenFacts>) {
        self.settle_answered(&reply.facts);
        if reply.from_cache {
            return;
        }
        if reply.is_error {
            self.stats.replied_error += 1;
        } else {
            self.stats.replied_ok += 1;
        }
        let Outgoing {
            facts,
            properties,
            body,
            is_error,
            ..
        } = reply;
        let Some(correlation_id) = facts.correlation_id else {
            return;
        };
        let key = RequestKey {
            reply_to: facts.reply_to,
            correlation_id,
        };
        let cached = CachedReply {
            properties,
            body,
            is_error,
        };
        // Every reply goes in the cache: the key is moved in, cloned only for the rare parked
        // redelivery that waited for this reply.
        let parked = if self.parked.is_empty() {
            None
        } else {
            self.parked.remove(&key)
        };
        let Some(Buffered { delivery, received }) = parked else {
            self.cache.insert(key, cached);
            return;
        };
        self.cache.insert(key.clone(), cached);
        if !self.answer_from_cache(&key, &delivery) {
            self.buffer.push_front(Buffered { delivery, received });
        }
    }

    /// Answers a redelivered request from the reply cache, confirm-gated like any reply, if its
    /// reply is there; its handler does not run again.
    fn answer_from_cache(&mut self, key: &RequestKey, delivery: &Delivery) -> bool {
        let Some(cached) = self.cache.get(key) else {
            return false;
        };
        let reply = Outgoing {
            seq: None,
            facts: TokenFacts {
                epoch: self.epoch,
                channel: delivery.channel,
                delivery_tag: delivery.delivery_tag,
                deliveries: 1,
                deadline: None,
                reply_to: key.reply_to.clone(),
                correlation_id: Some(key.correlation_id.clone()),
            },
            properties: cached.properties.clone(),
            body: cached.body.clone(),
            is_error: cached.is_error,
            is_fallback: true,
            from_cache: true,
        };
        self.stats.reply_cache_hits += 1;
        self.send_reply(reply);
        true
    }

    /// The handler of `facts` is done with it (answered on a channel that is gone, or gave
    /// up): a redelivery of it may run.
    fn stopped_running(&mut self, facts: &TokenFacts) {
        if let Some(key) = request_key(facts) {
            if let Some(r) = self.unsettled.get_mut(&key) {
                r.running = false;
            }
        }
    }

    /// A parked redelivery of `facts`'s request whose handler ended without a reply in the
    /// cache runs after all.
    fn unpark(&mut self, facts: &TokenFacts) {
        if self.parked.is_empty() {
            return;
        }
        if let Some(parked) = request_key(facts).and_then(|k| self.parked.remove(&k)) {
            self.buffer.push_front(parked);
        }
    }

    /// No reply could be published (not even the short error reply): the request is acked
    /// all the same, since running it again would end the same way; its caller times out.
    fn settle_unpublished(&mut self, reply: Outgoing<TokenFacts>) {
        self.settle_answered(&reply.facts);
        self.unpark(&reply.facts);
    }

    fn settle_answered(&mut self, facts: &TokenFacts) {
        if self.is_current(facts) {
            // Queued now, sent at the end of the turn, coalesced.
            self.ack(facts.channel, facts.delivery_tag);
            self.forget(facts);
        }
    }

    /// Opens the reply channel and puts it in confirm mode, pipelined: replies may be published
    /// at once (AMQP 0-9-1 §2.2.5; a publish after `confirm.select` is numbered, RabbitMQ
    /// "Publisher Confirms").
    fn open_publisher(&mut self) {
        self.publisher = self.conn.open_channel().ok();
        if let Some(channel) = self.publisher {
            if self.conn.confirm_select(channel).is_err() {
                self.publisher = None;
            }
        }
    }

    /// Publishes the replies whose turn has come (all of them unless the outbox is careful).
    fn publish_waiting(&mut self) {
        let Some(channel) = self.publisher_channel() else {
            return;
        };
        while let Some(mut reply) = self.outbox.next_to_publish() {
            self.stats.replies_republished += 1;
            match self.publish_now(channel, &mut reply) {
                Some(Some(seq)) => self.outbox.published(reply, seq),
                Some(None) => self.replied(reply),
                None => self.settle_unpublished(reply),
            }
        }
    }

    /// The broker settled a reply: acked, its request is acked; nacked, its request is
    /// requeued (reject with requeue, once: it stays remembered, so its next delivery counts
    /// against [`ServerConfig::max_deliveries`]), and runs again.
    fn on_confirm(&mut self, seq: DeliveryTag, acked: bool) {
        let Some(reply) = self.outbox.confirmed(seq) else {
            return;
        };
        if acked {
            self.replied(reply);
        } else {
            self.stats.replies_nacked += 1;
            if self.is_current(&reply.facts) {
                self.reject(reply.facts.channel, reply.facts.delivery_tag, true);
            }
            self.unpark(&reply.facts);
        }
        self.publish_waiting();
    }

    /// The broker closed the reply channel. None of its unconfirmed replies is known to be
    /// safe, so none of their requests is acked: they are published again on a fresh channel,
    /// one at a time, so that the reply the broker refuses is named when it is alone in flight
    /// (see `outbox.rs`). A size refusal tells the broker's limit: later replies above it
    /// become [`REPLY_TOO_LARGE`] error replies before they are published.
    fn on_publisher_closed(&mut self, error: ChannelError) {
        self.publisher = None;
        if let Some(limit) = refused_size_limit(&error.text) {
            self.reply_limit = Some(self.reply_limit.map_or(limit, |l| l.min(limit)));
        }
        let ours = self.outbox.has_unconfirmed();
        if let Some(mut culprit) = self.outbox.channel_died() {
            if !culprit.is_fallback && refused_size_limit(&error.text).is_some() {
                let size = u64::try_from(culprit.body.len()).unwrap_or(u64::MAX);
                let limit = self.reply_limit.unwrap_or(0);
                self.replace_too_large(&mut culprit, UsageError::MessageTooLarge { size, limit });
                self.outbox.wait_first(culprit);
            } else {
                self.stats.replies_refused += 1;
                self.events.push_back(ServerEvent::ReplyRefused {
                    correlation_id: culprit
                        .facts
                        .correlation_id
                        .as_ref()
                        .map(|c| c.as_str().to_owned()),
                    error,
                });
                self.settle_unpublished(culprit);
            }
        }
        if !ours && !self.outbox.has_waiting() {
            // Nothing of ours in flight: the broker refuses this channel itself (a 403, an
            // operator). Replies go on the consuming channel until the next connection.
            return;
        }
        if self.publisher_deaths < MAX_REPLY_CHANNEL_DEATHS {
            self.publisher_deaths += 1;
            self.open_publisher();
        }
        if self.publisher.is_some() {
            self.publish_waiting();
        } else {
            // Rare, and bounded by the prefetch window: a Vec is fine here.
            let waiting: Vec<_> = self.outbox.drain().collect();
            for reply in waiting {
                self.send_reply(reply);
            }
        }
    }

    /// Shutting down, every handler done, and replies still waiting for their confirms.
    fn is_waiting_for_confirms(&self) -> bool {
        matches!(self.phase, Phase::Draining { .. })
            && self.in_flight == 0
            && !self.outbox.is_empty()
            && !self.conn.is_closed()
    }

    /// Finishes a shutdown once no handler runs and every reply was confirmed (so its request
    /// acked). It stops waiting for confirms at the connection's `close_timeout`, or at once
    /// while the broker blocks the connection (a resource alarm: RabbitMQ stops reading from a
    /// blocked publishing connection, so no confirm comes): the requests of the unconfirmed
    /// replies stay unacked and the broker requeues them when the connection closes. Their
    /// callers may then hear twice (a duplicate reply is dropped), never not at all.
    fn maybe_finish_shutdown(&mut self, now: Instant) {
        let confirms_settled = self.outbox.is_empty()
            || self.conn.is_blocked()
            || self.drain_deadline.is_some_and(|d| now >= d);
        if matches!(self.phase, Phase::Draining { .. }) && self.in_flight == 0 && confirms_settled {
            if self.conn.is_closed() {
                self.phase = Phase::Stopped;
                self.events.push_back(ServerEvent::Stopped);
            } else {
                // The acks owed go before the close: the broker requeues what is unacked then.
                self.flush_acks();
                // Fails only when already closing; Closed then ends the shutdown.
                let _ = self.conn.close(now);
                self.pump(now);
            }
        }
    }
}

/// The key of a request, if it has a correlation id.
fn request_key(facts: &TokenFacts) -> Option<RequestKey> {
    Some(RequestKey {
        reply_to: facts.reply_to.clone(),
        correlation_id: facts.correlation_id.clone()?,
    })
}

/// How long from now the caller still waits for a request that arrived `waited` ago: the
/// shorter of its relative budget (`expiration` counted from arrival; no clock skew affects it,
/// but it does not count the time the request waited in the queue) and its absolute deadline
/// (`x-rpc-deadline` against `wall`, our wall clock now, trusted up to `tolerance`). Without
/// `wall`, the relative budget alone; `None` when the request carries neither (or a value too
/// large to mean anything but "no limit").
fn remaining_budget(
    properties: &BasicProperties,
    waited: Duration,
    wall: Option<UnixMillis>,
    tolerance: Duration,
) -> Option<Duration> {
    let relative = expiration(properties).map(|budget| budget.saturating_sub(waited));
    let absolute = wall.zip(deadline_header(properties)).and_then(|(wall, d)| {
        if d >= wall {
            Duration::from_millis(d.0 - wall.0).checked_add(tolerance)
        } else {
            // Passed already when it is further behind than the tolerance.
            Some(tolerance.saturating_sub(Duration::from_millis(wall.0 - d.0)))
        }
    });
    match (relative, absolute) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The caller's absolute deadline from the request's `x-rpc-deadline` header, if it has one.
fn deadline_header(properties: &BasicProperties) -> Option<UnixMillis> {
    int_header(properties, DEADLINE_HEADER).map(UnixMillis)
}

/// The request's relative budget: its `expiration` (milliseconds as a decimal string,
/// RabbitMQ "Time-To-Live and Expiration").
fn expiration(properties: &BasicProperties) -> Option<Duration> {
    let ms = properties
        .expiration()
        .as_ref()?
        .as_str()
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_millis(ms))
}

/// Which delivery this is by the broker's count (`x-delivery-count` + 1), where it keeps one.
fn broker_deliveries(properties: &BasicProperties) -> Option<u32> {
    let count = int_header(properties, DELIVERY_COUNT_HEADER)?;
    Some(u32::try_from(count).unwrap_or(u32::MAX).saturating_add(1))
}

/// A non-negative integer header, whatever integer type the sender chose.
fn int_header(properties: &BasicProperties, name: &str) -> Option<u64> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        _ => None,
    }
}

/// A request's correlation id, for events and logs.
fn correlation_id(properties: &BasicProperties) -> Option<String> {
    properties
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_owned())
}

/// The reply's properties and body: the result, or an error reply in the documented format.
/// The correlation id and the error headers are the server's, whatever the handler set.
fn reply_message(
    facts: &TokenFacts,
    result: Result<Response, HandlerError>,
) -> (BasicProperties, Bytes) {
    let mut properties = BasicProperties::default();
    if let Some(id) = &facts.correlation_id {
        properties = properties.with_correlation_id(id.clone());
    }
    match result {
        Ok(response) => {
            let Response {
                body,
                content_type,
                content_encoding,
                headers,
            } = response;
            if let Some(content_type) = content_type {
                properties = properties.with_content_type(content_type);
            }
            if let Some(content_encoding) = content_encoding {
                properties = properties.with_content_encoding(content_encoding);
            }
            // A success reply with an error header would read as an error reply. FieldTable
            // has no remove: rebuild it in the rare case there is something to drop.
            let headers = if headers.contains_key(ERROR_HEADER)
                || headers.contains_key(REJECTED_HEADER)
            {
                let kept: std::collections::BTreeMap<_, _> = headers
                    .inner()
                    .iter()
                    .filter(|(name, _)| !matches!(name.as_str(), ERROR_HEADER | REJECTED_HEADER))
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect();
                FieldTable::from(kept)
            } else {
                headers
            };
            if !headers.inner().is_empty() {
                properties = properties.with_headers(headers);
            }
            (properties, body)
        }
        Err(error) => {
            let (code, message, rejected) = match error {
                HandlerError::Rejected { code, message } => (code, message, true),
                HandlerError::Failed { code, message } => (code, message, false),
            };
            let mut headers = FieldTable::default();
            headers.insert(
                ShortString::from(ERROR_HEADER),
                AMQPValue::LongString(LongString::from(code)),
            );
            headers.insert(
                ShortString::from(REJECTED_HEADER),
                AMQPValue::Boolean(rejected),
            );
            (properties.with_headers(headers), Bytes::from(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_errors_from_common_errors_say_whether_the_request_ran() {
        fn parse(body: &[u8]) -> Result<u32, HandlerError> {
            Ok(std::str::from_utf8(body)?.trim().parse::<u32>()?)
        }
        assert_eq!(parse(b" 7\n"), Ok(7));
        for bad in [&b"\xff"[..], b"seven", b"-1"] {
            match parse(bad) {
                Err(HandlerError::Rejected { code, .. }) => assert_eq!(code, INVALID_REQUEST),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let io: HandlerError = std::io::Error::other("disk gone").into();
        assert_eq!(
            io,
            HandlerError::Failed {
                code: IO_ERROR.into(),
                message: "disk gone".into()
            }
        );
        assert_eq!(io.to_string(), "failed (io_error): disk gone");
        let boxed: Box<dyn std::error::Error> = Box::new(io);
        assert_eq!(boxed.to_string(), "failed (io_error): disk gone");
    }

    fn properties(expiration: Option<&str>, deadline: Option<AMQPValue>) -> BasicProperties {
        let mut p = BasicProperties::default();
        if let Some(e) = expiration {
            p = p.with_expiration(ShortString::from(e));
        }
        if let Some(d) = deadline {
            let mut headers = FieldTable::default();
            headers.insert(ShortString::from(DEADLINE_HEADER), d);
            p = p.with_headers(headers);
        }
        p
    }

    /// Budgets from the network never panic, whatever their size or sign, and a malformed one
    /// counts as absent.
    #[test]
    fn deadline_from_hostile_values() {
        let tolerance = ServerConfig::new("q").clock_skew_tolerance;
        let budget =
            |p: &BasicProperties, wall| remaining_budget(p, Duration::ZERO, wall, tolerance);
        let wall = UnixMillis(1_704_067_200_000);
        let cases = [
            (
                Some("18446744073709551615"),
                Some(AMQPValue::LongLongInt(i64::MAX)),
            ),
            (Some("-1"), Some(AMQPValue::LongLongInt(i64::MIN))),
            (Some("abc"), Some(AMQPValue::Timestamp(u64::MAX))),
            (Some(""), Some(AMQPValue::LongString("soon".into()))),
            (None, Some(AMQPValue::LongLongInt(0))),
            (Some("0"), None),
        ];
        for (expiration, header) in cases {
            let p = properties(expiration, header.clone());
            for wall in [wall, UnixMillis(0), UnixMillis(u64::MAX)] {
                let _ = budget(&p, Some(wall));
            }
        }
        // A deadline in 1970: passed. An expiration of 0: passed at once.
        let old = properties(None, Some(AMQPValue::LongLongInt(0)));
        assert_eq!(budget(&old, Some(wall)), Some(Duration::ZERO));
        let zero = properties(Some("0"), None);
        assert_eq!(budget(&zero, Some(wall)), Some(Duration::ZERO));
        // Malformed values count as absent.
        let junk = properties(Some("abc"), Some(AMQPValue::LongString("soon".into())));
        assert_eq!(budget(&junk, Some(wall)), None);
    }
}
