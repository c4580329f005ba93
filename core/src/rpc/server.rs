//! The RPC server machine: consumes a request queue with a prefetch window, hands requests out
//! one at a time, replies and acknowledges.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::Instant;

use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::Bytes;

use super::decide::{decide, Decision, DropReason, HandlerOutcome, RequestFacts};
use super::{UnixMillis, DEADLINE_HEADER, ERROR_HEADER, REJECTED_HEADER};
use crate::connection::{
    BasicProperties, Connection, ConnectionConfig, ConsumeOptions, Delivery, Event, QueueOptions,
    Reply,
};
use crate::error::{ConnectionError, UsageError};
use crate::ids::{ChannelId, DeliveryTag, ReplyCode, RequestId};

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
pub struct ServerConfig {
    /// The request queue.
    pub queue: String,
    /// How many unacknowledged requests the broker may push to us (`basic.qos`); size it to the
    /// number of requests the application runs at once.
    pub prefetch: u16,
    /// What to declare when the queue does not exist. An existing queue is served as it is,
    /// whatever its type.
    pub declare_as: QueueKind,
}

impl ServerConfig {
    /// Serves `queue` with prefetch 1, as the tutorial does.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            prefetch: 1,
            declare_as: QueueKind::Classic,
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

/// One request taken off the prefetch buffer. Answer it with [`RpcServer::reply`].
#[derive(Debug)]
pub struct Request {
    /// Request body.
    pub body: Bytes,
    /// Request properties.
    pub properties: BasicProperties,
    /// The reply handle. Dropping it unanswered is reported ([`ServerEvent::Abandoned`]) and the
    /// request is given back to the broker.
    pub token: ReplyToken,
}

/// The handle that answers a request. Must be passed to [`RpcServer::reply`]; when dropped
/// instead, the server learns of it, counts it and gives the request back to the broker.
#[derive(Debug)]
#[must_use = "a request must be answered with RpcServer::reply"]
pub struct ReplyToken {
    facts: TokenFacts,
    on_drop: Option<mpsc::Sender<TokenFacts>>,
}

/// What a token carries: enough to reply and settle the delivery.
#[derive(Debug, Clone)]
struct TokenFacts {
    /// The consumer incarnation the delivery belongs to: a tag from an older channel must not be
    /// acked on a newer one (RabbitMQ closes the channel with 406 for an unknown tag).
    epoch: u64,
    channel: ChannelId,
    delivery_tag: DeliveryTag,
    redelivered: bool,
    reply_to: ShortString,
    correlation_id: Option<ShortString>,
}

impl Drop for ReplyToken {
    fn drop(&mut self) {
        if let Some(tx) = self.on_drop.take() {
            // The server may be gone already; then nobody needs to know.
            let _ = tx.send(self.facts.clone());
        }
    }
}

/// What the server has to say.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// Consuming the request queue (again, after a reconnect or a cancel).
    Ready,
    /// A reply handle was dropped unanswered; the request went back to the broker
    /// (requeued once, then dropped, so that a request that kills its handler cannot loop).
    Abandoned {
        /// Whether it was requeued.
        requeued: bool,
    },
    /// The connection closed. Requests in flight cannot be acked any more; the broker
    /// redelivers them. [`RpcServer::reconnect`] starts over.
    Disconnected(ConnectionError),
    /// [`RpcServer::shutdown`] finished: the consumer is cancelled, every request answered, the
    /// connection closed.
    Stopped,
}

/// Counters for what the server did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Deliveries received.
    pub received: u64,
    /// Successful replies sent.
    pub replied_ok: u64,
    /// Error replies sent (rejected or failed).
    pub replied_error: u64,
    /// Requests acked and dropped because they had no `reply_to`.
    pub dropped_no_reply_to: u64,
    /// Requests acked and dropped because their deadline passed in the prefetch buffer.
    pub dropped_expired: u64,
    /// Reply handles dropped unanswered.
    pub abandoned: u64,
    /// Replies for requests from a channel that is gone (the broker redelivers those).
    pub stale_replies: u64,
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
    buffer: VecDeque<Delivery>,
    in_flight: usize,
    abandoned_tx: mpsc::Sender<TokenFacts>,
    abandoned_rx: mpsc::Receiver<TokenFacts>,
    events: VecDeque<ServerEvent>,
    stats: ServerStats,
    setup_request: Option<RequestId>,
}

impl RpcServer {
    /// A server that starts connecting at `now`.
    pub fn new(config: ServerConfig, conn_config: ConnectionConfig, now: Instant) -> Self {
        let (abandoned_tx, abandoned_rx) = mpsc::channel();
        Self {
            conn: Connection::new(conn_config.clone(), now),
            conn_config,
            config,
            phase: Phase::Connecting,
            epoch: 0,
            buffer: VecDeque::new(),
            in_flight: 0,
            abandoned_tx,
            abandoned_rx,
            events: VecDeque::new(),
            stats: ServerStats::default(),
            setup_request: None,
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
    }

    /// Appends frames ready to send to `buf`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> usize {
        self.collect_abandoned(now);
        self.conn.poll_transmit(now, buf)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// When [`RpcServer::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    /// Takes the next request to run off the prefetch buffer. Call it after every input, as
    /// long as workers are free (deliveries raise no event of their own). Requests without
    /// `reply_to`, or whose deadline (`wall` is the wall clock now) has passed, are acked and
    /// dropped on the way, never returned.
    pub fn poll_request(&mut self, now: Instant, wall: UnixMillis) -> Option<Request> {
        self.collect_abandoned(now);
        while let Some(delivery) = self.buffer.pop_front() {
            let reply_to = delivery.properties.reply_to().clone();
            let facts = RequestFacts {
                has_reply_to: reply_to.as_ref().is_some_and(|r| !r.as_str().is_empty()),
                deadline_passed: deadline(&delivery.properties).is_some_and(|d| d <= wall),
                redelivered: delivery.redelivered,
            };
            match decide(facts, HandlerOutcome::NotRun) {
                Decision::Run => {
                    self.in_flight += 1;
                    let facts = TokenFacts {
                        epoch: self.epoch,
                        channel: delivery.channel,
                        delivery_tag: delivery.delivery_tag,
                        redelivered: delivery.redelivered,
                        reply_to: reply_to.unwrap_or_default(),
                        correlation_id: delivery.properties.correlation_id().clone(),
                    };
                    return Some(Request {
                        body: delivery.body,
                        properties: delivery.properties,
                        token: ReplyToken {
                            facts,
                            on_drop: Some(self.abandoned_tx.clone()),
                        },
                    });
                }
                Decision::AckAndDrop(reason) => {
                    match reason {
                        DropReason::NoReplyTo => self.stats.dropped_no_reply_to += 1,
                        DropReason::Expired => self.stats.dropped_expired += 1,
                    }
                    // Fails only when the channel is gone; then the broker requeues it anyway.
                    let _ = self
                        .conn
                        .ack(delivery.channel, delivery.delivery_tag, false);
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
    /// correlation id, then acks it. A token from a channel that has since closed is counted
    /// and ignored: the broker has already requeued that request.
    pub fn reply(
        &mut self,
        now: Instant,
        mut token: ReplyToken,
        result: Result<Bytes, HandlerError>,
    ) {
        token.on_drop = None;
        let facts = token.facts.clone();
        drop(token);
        self.in_flight = self.in_flight.saturating_sub(1);
        if facts.epoch != self.epoch || !self.conn.is_channel_usable(facts.channel) {
            self.stats.stale_replies += 1;
        } else {
            let request_facts = RequestFacts {
                has_reply_to: true,
                deadline_passed: false,
                redelivered: facts.redelivered,
            };
            if decide(request_facts, HandlerOutcome::Answered) == Decision::ReplyThenAck {
                let (properties, body) = reply_message(&facts, result);
                if properties.headers().is_some() {
                    self.stats.replied_error += 1;
                } else {
                    self.stats.replied_ok += 1;
                }
                // Either fails only when the channel or connection is going away; the broker
                // then requeues the request and another server answers it.
                let _ = self.conn.publish(
                    facts.channel,
                    "",
                    facts.reply_to.as_str(),
                    false,
                    &properties,
                    &body,
                );
                let _ = self.conn.ack(facts.channel, facts.delivery_tag, false);
            }
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
        self.give_back_buffer();
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

    // -----------------------------------------------------------------------------------------
    // Connection events
    // -----------------------------------------------------------------------------------------

    fn pump(&mut self, now: Instant) {
        while let Some(event) = self.conn.poll_event() {
            self.on_event(now, event);
        }
        self.collect_abandoned(now);
    }

    fn on_event(&mut self, now: Instant, event: Event) {
        match event {
            Event::Connected => self.check_queue(),
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
                self.buffer.clear();
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
                    self.buffer.push_back(delivery);
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
                match properties
                    .reply_to()
                    .clone()
                    .filter(|r| !r.as_str().is_empty())
                {
                    Some(reply_to) => {
                        let facts = TokenFacts {
                            epoch: self.epoch,
                            channel,
                            delivery_tag,
                            redelivered: false,
                            reply_to,
                            correlation_id: properties.correlation_id().clone(),
                        };
                        self.in_flight += 1;
                        let token = ReplyToken {
                            facts,
                            on_drop: None,
                        };
                        let message =
                            format!("request body of {body_size} bytes exceeds the server's limit");
                        let error = HandlerError::Rejected {
                            code: "request_too_large".into(),
                            message,
                        };
                        self.reply(now, token, Err(error));
                    }
                    None => {
                        self.stats.dropped_no_reply_to += 1;
                        let _ = self.conn.ack(channel, delivery_tag, false);
                    }
                }
            }
            // The broker cancelled us: the queue was deleted (or its node went away). Declare
            // it again and consume on the same channel, unless we are shutting down anyway.
            Event::ConsumerCancelled { .. } if !matches!(self.phase, Phase::Draining { .. }) => {
                self.check_queue_on(self.serving_channel());
            }
            Event::Closed(error) => {
                self.buffer.clear();
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

    /// Reports reply handles dropped unanswered and gives their requests back.
    fn collect_abandoned(&mut self, now: Instant) {
        let mut any = false;
        while let Ok(facts) = self.abandoned_rx.try_recv() {
            any = true;
            self.in_flight = self.in_flight.saturating_sub(1);
            self.stats.abandoned += 1;
            let request_facts = RequestFacts {
                has_reply_to: true,
                deadline_passed: false,
                redelivered: facts.redelivered,
            };
            let Decision::Reject { requeue } = decide(request_facts, HandlerOutcome::Abandoned)
            else {
                continue;
            };
            let requeued = if facts.epoch == self.epoch {
                let _ = self.conn.reject(facts.channel, facts.delivery_tag, requeue);
                requeue
            } else {
                // Its channel is gone, and the broker requeued everything unacked on it.
                true
            };
            self.events.push_back(ServerEvent::Abandoned { requeued });
        }
        if any {
            self.maybe_finish_shutdown(now);
        }
    }

    fn give_back_buffer(&mut self) {
        let facts = RequestFacts {
            has_reply_to: true,
            deadline_passed: false,
            redelivered: false,
        };
        let Decision::Reject { requeue } = decide(facts, HandlerOutcome::ShuttingDown) else {
            return;
        };
        for delivery in std::mem::take(&mut self.buffer) {
            let _ = self
                .conn
                .reject(delivery.channel, delivery.delivery_tag, requeue);
        }
    }

    fn maybe_finish_shutdown(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Draining { .. }) && self.in_flight == 0 {
            if self.conn.is_closed() {
                self.phase = Phase::Stopped;
                self.events.push_back(ServerEvent::Stopped);
            } else {
                // Fails only when already closing; Closed then ends the shutdown.
                let _ = self.conn.close(now);
                self.pump(now);
            }
        }
    }
}

/// The caller's deadline from the request's header, if it has one.
fn deadline(properties: &BasicProperties) -> Option<UnixMillis> {
    let value = properties
        .headers()
        .as_ref()?
        .inner()
        .get(DEADLINE_HEADER)?;
    let ms = match value {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok()?,
        AMQPValue::Timestamp(v) => *v,
        AMQPValue::LongInt(v) => u64::try_from(*v).ok()?,
        AMQPValue::LongUInt(v) => u64::from(*v),
        _ => return None,
    };
    Some(UnixMillis(ms))
}

/// The reply's properties and body: the result, or an error reply in the documented format.
fn reply_message(
    facts: &TokenFacts,
    result: Result<Bytes, HandlerError>,
) -> (BasicProperties, Bytes) {
    let mut properties = BasicProperties::default();
    if let Some(id) = &facts.correlation_id {
        properties = properties.with_correlation_id(id.clone());
    }
    match result {
        Ok(body) => (properties, body),
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
