//! The AMQP 0-9-1 client connection machine.
//!
//! [`Connection`] owns the handshake, heartbeats, channels and the close handshake. It never
//! touches a socket or a clock: bytes and time come in through `handle_*`, bytes and events go
//! out through `poll_*`. See the crate docs for the driving contract.

mod channel;
mod config;
mod confirms;
mod content;
mod handshake;
mod heartbeat;

pub use config::{ConnectionConfig, Credentials, SaslMechanism, Tune};

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{
    basic, channel as chan, confirm, connection, exchange, queue, AMQPClass,
};
use amq_protocol::types::{FieldTable, ShortString};
use bytes::{Bytes, BytesMut};

use crate::codec::{self, Frame, FrameDecoder, FRAME_MIN_SIZE};
use crate::error::{ChannelError, ConnectionError, FrameError, UsageError};
use crate::ids::{ChannelId, DeliveryTag, ReplyCode, RequestId};
use crate::timers::TimerTable;
use amq_protocol::protocol::BasicProperties;

use channel::{Channel, ChannelStep, Expect, Violation};
use confirms::Confirms;
use handshake::HandshakeStep;
use heartbeat::Heartbeat;

/// Something that happened on the connection. Drain them with [`Connection::poll_event`] after
/// every input or command.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The handshake finished; commands are accepted from now on.
    Connected,
    /// `channel.open-ok` arrived.
    ChannelOpened(ChannelId),
    /// A channel closed. `error.code` is 200 and `error.initiator` is `Client` after a normal
    /// [`Connection::close_channel`]; anything else is a soft error.
    ChannelClosed(ChannelError),
    /// A synchronous request finished.
    Completed {
        /// The request, as returned by the command.
        request: RequestId,
        /// The channel it ran on.
        channel: ChannelId,
        /// The server's answer.
        reply: Reply,
    },
    /// A synchronous request failed because its channel closed first.
    Failed {
        /// The request, as returned by the command.
        request: RequestId,
        /// Why its channel closed.
        error: ChannelError,
    },
    /// A message from a consumer (`basic.deliver` with its content).
    Delivery(Delivery),
    /// A mandatory publish that no queue took (`basic.return` with its content).
    Returned(Returned),
    /// The broker settled a publish on a channel in confirm mode. A `basic.ack` or `basic.nack`
    /// with `multiple` set yields one event per publish it settles.
    PublishConfirmed {
        /// The channel in confirm mode.
        channel: ChannelId,
        /// The publish sequence number [`Connection::publish`] returned.
        seq: DeliveryTag,
        /// `true` for `basic.ack`, `false` for `basic.nack` (the broker lost it).
        acked: bool,
    },
    /// The broker cancelled a consumer (its queue was deleted, or it failed over).
    ConsumerCancelled {
        /// The consumer's channel.
        channel: ChannelId,
        /// The consumer's tag.
        consumer_tag: String,
    },
    /// A delivery or return whose body exceeds [`ConnectionConfig::max_body_size`]. Its body
    /// is skipped as it arrives, never buffered; reject the delivery if it needs settling.
    ContentTooLarge {
        /// The channel it arrived on.
        channel: ChannelId,
        /// The delivery tag, for a delivery (returns have none).
        delivery_tag: Option<DeliveryTag>,
        /// The size the header announced.
        body_size: u64,
        /// The message's properties (they arrived; only the body is skipped), so that an RPC
        /// server can still answer the caller.
        properties: Box<BasicProperties>,
    },
    /// The broker asked to pause (`false`) or resume (`true`) publishing on a channel.
    Flow {
        /// The channel.
        channel: ChannelId,
        /// Whether publishing may go on.
        active: bool,
    },
    /// The broker stopped reading from this connection (a resource alarm, RabbitMQ
    /// "Blocked Connection Notifications"). Publishes will wait in the socket.
    Blocked {
        /// The broker's reason, e.g. "low on memory".
        reason: String,
    },
    /// The resource alarm cleared.
    Unblocked,
    /// The connection is closed; always the last event. [`ConnectionError::ClosedByApplication`]
    /// after [`Connection::close`].
    Closed(ConnectionError),
}

/// The answer to a synchronous request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// `basic.qos-ok`.
    QosOk,
    /// `queue.declare-ok`.
    QueueDeclared {
        /// The queue's name (server-generated when the request named none).
        queue: String,
        /// Messages ready in the queue.
        message_count: u32,
        /// Consumers on the queue.
        consumer_count: u32,
    },
    /// `exchange.declare-ok` to a passive declare: the exchange exists.
    ExchangeExists,
    /// `queue.delete-ok`.
    QueueDeleted {
        /// Messages deleted with the queue.
        message_count: u32,
    },
    /// `basic.consume-ok`.
    ConsumeOk {
        /// The consumer's tag (server-generated when the request named none).
        consumer_tag: String,
    },
    /// `basic.cancel-ok`.
    CancelOk {
        /// The cancelled consumer's tag.
        consumer_tag: String,
    },
    /// `confirm.select-ok`: publishes on the channel are now confirmed.
    ConfirmSelected,
}

/// A message delivered to a consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The channel it arrived on; acks go back on the same channel.
    pub channel: ChannelId,
    /// The consumer it is for.
    pub consumer_tag: String,
    /// Its tag, for ack/nack/reject.
    pub delivery_tag: DeliveryTag,
    /// Whether the broker delivered it before (to this or another consumer).
    pub redelivered: bool,
    /// The exchange it was published to (empty for the default exchange).
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Bytes,
}

/// A mandatory message that could not be routed.
#[derive(Debug, Clone, PartialEq)]
pub struct Returned {
    /// The channel it was published on.
    pub channel: ChannelId,
    /// Why (312 NO_ROUTE when no queue is bound).
    pub reply_code: ReplyCode,
    /// The broker's text.
    pub reply_text: String,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Bytes,
}

/// Flags of `queue.declare` (spec §1.7.2.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// Only check that the queue exists (404 on the channel when it does not).
    pub passive: bool,
    /// Survive a broker restart.
    pub durable: bool,
    /// Used by this connection only, deleted when it closes.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
}

/// Flags of `basic.consume` (spec §1.8.3.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumeOptions {
    /// The broker considers messages acknowledged once sent.
    pub no_ack: bool,
    /// No other consumer may consume the queue.
    pub exclusive: bool,
}

/// Connection life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshake(HandshakeStep),
    Open,
    /// `connection.close` sent; waiting for close-ok until [`Timer::Close`]. `reported` says
    /// whether [`Event::Closed`] went out already (it has when the close is an error of ours).
    Closing {
        reported: bool,
    },
    Closed,
}

/// The connection's timers. When several are due at once, `handle_timeout` serves the first in
/// this order, and that one ends the others (all but `SendHeartbeat` close the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Our `connection.close` waits no longer for close-ok.
    Close,
    /// The handshake must be done by then.
    Handshake,
    /// Nothing was read for two heartbeat intervals.
    PeerDead,
    /// Nothing was written for half a heartbeat interval.
    SendHeartbeat,
}

/// A client connection: the handshake, heartbeats, channels and the close handshake.
#[derive(Debug)]
pub struct Connection {
    config: ConnectionConfig,
    state: State,
    decoder: FrameDecoder,
    read_buf: BytesMut,
    outbound: Vec<u8>,
    events: VecDeque<Event>,
    channels: BTreeMap<ChannelId, Channel>,
    next_channel: u16,
    next_request: u64,
    tune: Tune,
    heartbeat: Heartbeat,
    timers: TimerTable<Timer>,
    blocked: bool,
    error: Option<ConnectionError>,
    server_properties: FieldTable,
}

impl Connection {
    /// A connection that starts the handshake at `now`: the protocol header is ready to send.
    pub fn new(mut config: ConnectionConfig, now: Instant) -> Self {
        config.frame_max = config.frame_max.max(FRAME_MIN_SIZE);
        let mut outbound = Vec::with_capacity(4096);
        codec::encode_protocol_header(&mut outbound);
        let tune = Tune {
            channel_max: config.channel_max,
            frame_max: codec::PRE_TUNE_FRAME_MAX,
            heartbeat: std::time::Duration::ZERO,
        };
        let mut timers = TimerTable::new();
        timers.set(
            Timer::Handshake,
            config::deadline_after(now, config.handshake_timeout),
        );
        Self {
            timers,
            config,
            state: State::Handshake(HandshakeStep::AwaitStart),
            decoder: FrameDecoder::new(),
            read_buf: BytesMut::with_capacity(8192),
            outbound,
            events: VecDeque::new(),
            channels: BTreeMap::new(),
            next_channel: 0,
            next_request: 0,
            tune,
            heartbeat: Heartbeat::default(),
            blocked: false,
            error: None,
            server_properties: FieldTable::default(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Inputs
    // -----------------------------------------------------------------------------------------

    /// Feeds bytes read from the socket. Any split of the stream is fine: incomplete frames
    /// wait in an internal buffer, which never holds more than one frame_max plus `bytes`.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        // After a frame error the stream has lost its frame boundaries: no later byte can be
        // trusted, so we wait for EOF or the close timeout instead of reading on.
        if self.state == State::Closed
            || bytes.is_empty()
            || matches!(self.error, Some(ConnectionError::Frame(_)))
        {
            return;
        }
        if let Some(at) = self.heartbeat.dead_at(now) {
            self.timers.extend(Timer::PeerDead, at);
        }
        self.read_buf.extend_from_slice(bytes);
        while self.state != State::Closed {
            match self.decoder.decode(&mut self.read_buf) {
                Ok(Some(frame)) => self.handle_frame(now, frame),
                Ok(None) => break,
                Err(error) => {
                    let code = error.reply_code();
                    let text = error.to_string();
                    self.fail(now, ConnectionError::Frame(error), Some((code, text)));
                    // The decoder does not consume a bad frame: decoding again would meet the
                    // same error forever.
                    self.read_buf.clear();
                    break;
                }
            }
        }
    }

    /// The byte stream ended (EOF, or any read or write error).
    pub fn handle_eof(&mut self, now: Instant) {
        let _ = now;
        match self.state {
            State::Closed => {}
            State::Closing { reported, .. } => self.finish_close(reported),
            // A server that drops the socket right after start-ok refused our login: that is
            // what RabbitMQ does for clients without `authentication_failure_close`.
            State::Handshake(HandshakeStep::AwaitTune) => self.fail(
                now,
                ConnectionError::AuthenticationFailed {
                    reason: String::new(),
                },
                None,
            ),
            _ => self.fail(now, ConnectionError::ConnectionLost, None),
        }
    }

    /// Runs the timers that are due at `now` (see [`Connection::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.timers.take_due(&Timer::Close, now) {
            let reported = matches!(self.state, State::Closing { reported: true });
            self.finish_close(reported);
        } else if self.timers.take_due(&Timer::Handshake, now) {
            self.fail(now, ConnectionError::HandshakeTimedOut, None);
        } else if self.timers.take_due(&Timer::PeerDead, now) {
            self.fail(now, ConnectionError::HeartbeatTimedOut, None);
        } else if self.timers.take_due(&Timer::SendHeartbeat, now) {
            codec::encode_heartbeat(&mut self.outbound);
            // Counted as written now, so the timer does not fire again while the frame waits
            // for the driver to take it.
            if let Some(at) = self.heartbeat.send_at(now) {
                self.timers.set(Timer::SendHeartbeat, at);
            }
        }
    }

    /// Restarts the send-heartbeat timer after a write at `now`.
    fn wrote(&mut self, now: Instant) {
        if let Some(at) = self.heartbeat.send_at(now) {
            self.timers.extend(Timer::SendHeartbeat, at);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Outputs
    // -----------------------------------------------------------------------------------------

    /// Appends every whole frame that is ready to `buf`; returns how many bytes it added.
    /// Call it when the driver's write buffer is empty: bytes the driver has not taken stay
    /// here, where [`Connection::outbound_len`] shows them.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> usize {
        let n = self.outbound.len();
        if n == 0 {
            return 0;
        }
        if buf.is_empty() {
            std::mem::swap(buf, &mut self.outbound);
        } else {
            buf.append(&mut self.outbound);
        }
        self.wrote(now);
        n
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Connection::handle_timeout`] must be called next; `None` when no timer runs.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next(None)
    }

    // -----------------------------------------------------------------------------------------
    // Getters
    // -----------------------------------------------------------------------------------------

    /// Whether the handshake finished and the connection is not closing.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the connection is fully closed. The driver may drop the socket once this is
    /// true and [`Connection::poll_transmit`] has nothing left.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Why the connection closed, once it has.
    pub fn error(&self) -> Option<&ConnectionError> {
        self.error.as_ref()
    }

    /// The negotiated limits (before tune: the pre-tune frame_max and no heartbeat).
    pub fn tune(&self) -> Tune {
        self.tune
    }

    /// The server's properties from `connection.start` (product, version, capabilities).
    pub fn server_properties(&self) -> &FieldTable {
        &self.server_properties
    }

    /// Whether the broker has blocked this connection (see [`Event::Blocked`]).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Bytes queued for sending that the driver has not taken yet.
    pub fn outbound_len(&self) -> usize {
        self.outbound.len()
    }

    /// Whether `channel` is open or opening (commands may be sent on it).
    pub fn is_channel_usable(&self, channel: ChannelId) -> bool {
        self.channels
            .get(&channel)
            .is_some_and(Channel::accepts_commands)
    }

    // -----------------------------------------------------------------------------------------
    // Commands
    // -----------------------------------------------------------------------------------------

    /// Opens a channel. Commands may be sent on it at once (AMQP pipelines them behind
    /// `channel.open`); [`Event::ChannelOpened`] follows.
    pub fn open_channel(&mut self) -> Result<ChannelId, UsageError> {
        self.check_open()?;
        let max = self.tune.channel_max.max(1);
        // Numbers go round rather than reusing the lowest free one, so that a late frame for a
        // channel that just closed cannot land on its successor.
        for _ in 0..max {
            self.next_channel = if self.next_channel >= max {
                1
            } else {
                self.next_channel + 1
            };
            let id = ChannelId(self.next_channel);
            if !self.channels.contains_key(&id) {
                self.send_method(
                    id,
                    AMQPClass::Channel(chan::AMQPMethod::Open(chan::Open {})),
                )?;
                self.channels.insert(id, Channel::new(id));
                return Ok(id);
            }
        }
        Err(UsageError::NoFreeChannel)
    }

    /// Closes a channel normally (reply code 200). [`Event::ChannelClosed`] follows.
    pub fn close_channel(&mut self, channel: ChannelId) -> Result<(), UsageError> {
        self.channel_for_command(channel)?;
        let close = chan::Close {
            reply_code: ReplyCode::REPLY_SUCCESS.0,
            reply_text: ShortString::from("bye"),
            class_id: 0,
            method_id: 0,
        };
        self.send_method(channel, AMQPClass::Channel(chan::AMQPMethod::Close(close)))?;
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.start_close();
        }
        Ok(())
    }

    /// Sets the consumer prefetch window of `channel` (spec §1.8.3.1; RabbitMQ applies it per
    /// consumer unless `global`).
    pub fn qos(
        &mut self,
        channel: ChannelId,
        prefetch_count: u16,
        global: bool,
    ) -> Result<RequestId, UsageError> {
        let method = basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count,
            global,
        });
        self.request(channel, AMQPClass::Basic(method), Expect::QosOk)
    }

    /// Declares a queue; an empty `name` asks the server for one. Replies
    /// [`Reply::QueueDeclared`] with the message and consumer counts.
    pub fn declare_queue(
        &mut self,
        channel: ChannelId,
        name: &str,
        options: QueueOptions,
        arguments: FieldTable,
    ) -> Result<RequestId, UsageError> {
        let method = queue::AMQPMethod::Declare(queue::Declare {
            queue: short("queue name", name)?,
            passive: options.passive,
            durable: options.durable,
            exclusive: options.exclusive,
            auto_delete: options.auto_delete,
            nowait: false,
            arguments,
        });
        self.request(channel, AMQPClass::Queue(method), Expect::DeclareOk)
    }

    /// Asks whether an exchange exists (a passive `exchange.declare`, spec §1.5.2.1 `passive`).
    /// Replies [`Reply::ExchangeExists`]; a missing exchange closes the channel with 404
    /// NOT_FOUND, reported as [`Event::Failed`] and [`Event::ChannelClosed`].
    pub fn check_exchange(
        &mut self,
        channel: ChannelId,
        name: &str,
    ) -> Result<RequestId, UsageError> {
        let method = exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: short("exchange name", name)?,
            // Ignored by a passive declare; "direct" is the type every broker knows.
            kind: ShortString::from("direct"),
            passive: true,
            durable: false,
            auto_delete: false,
            internal: false,
            nowait: false,
            arguments: FieldTable::default(),
        });
        self.request(
            channel,
            AMQPClass::Exchange(method),
            Expect::ExchangeDeclareOk,
        )
    }

    /// Deletes a queue. Replies [`Reply::QueueDeleted`].
    pub fn delete_queue(
        &mut self,
        channel: ChannelId,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<RequestId, UsageError> {
        let method = queue::AMQPMethod::Delete(queue::Delete {
            queue: short("queue name", name)?,
            if_unused,
            if_empty,
            nowait: false,
        });
        self.request(channel, AMQPClass::Queue(method), Expect::DeleteOk)
    }

    /// Starts a consumer; an empty `consumer_tag` asks the server for one. Replies
    /// [`Reply::ConsumeOk`]; deliveries follow as [`Event::Delivery`].
    pub fn consume(
        &mut self,
        channel: ChannelId,
        queue: &str,
        consumer_tag: &str,
        options: ConsumeOptions,
        arguments: FieldTable,
    ) -> Result<RequestId, UsageError> {
        let method = basic::AMQPMethod::Consume(basic::Consume {
            queue: short("queue name", queue)?,
            consumer_tag: short("consumer tag", consumer_tag)?,
            no_local: false,
            no_ack: options.no_ack,
            exclusive: options.exclusive,
            nowait: false,
            arguments,
        });
        self.request(channel, AMQPClass::Basic(method), Expect::ConsumeOk)
    }

    /// Cancels a consumer. Replies [`Reply::CancelOk`]; deliveries already sent still arrive.
    pub fn cancel(
        &mut self,
        channel: ChannelId,
        consumer_tag: &str,
    ) -> Result<RequestId, UsageError> {
        let method = basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: short("consumer tag", consumer_tag)?,
            nowait: false,
        });
        self.request(channel, AMQPClass::Basic(method), Expect::CancelOk)
    }

    /// Puts `channel` in confirm mode (RabbitMQ "Publisher Confirms"). Publishes sent after this
    /// call are numbered from 1 and settled by [`Event::PublishConfirmed`].
    pub fn confirm_select(&mut self, channel: ChannelId) -> Result<RequestId, UsageError> {
        let method = confirm::AMQPMethod::Select(confirm::Select { nowait: false });
        let request = self.request(channel, AMQPClass::Confirm(method), Expect::SelectOk)?;
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.confirms.get_or_insert_with(Confirms::default);
        }
        Ok(request)
    }

    /// Publishes a message: method, header and body frames (split at frame_max − 8) go out
    /// together. On a channel in confirm mode, returns the publish's sequence number.
    pub fn publish(
        &mut self,
        channel: ChannelId,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Result<Option<DeliveryTag>, UsageError> {
        self.channel_for_command(channel)?;
        let size = u64::try_from(body.len()).unwrap_or(u64::MAX);
        if size > self.config.max_message_size {
            return Err(UsageError::MessageTooLarge {
                size,
                limit: self.config.max_message_size,
            });
        }
        let method = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: short("exchange", exchange)?,
            routing_key: short("routing key", routing_key)?,
            mandatory,
            immediate: false,
        }));
        let start = self.outbound.len();
        let frame_max = self.tune.frame_max;
        codec::encode_method(channel, &method, frame_max, &mut self.outbound)
            .and_then(|()| {
                codec::encode_content(channel, properties, body, frame_max, &mut self.outbound)
            })
            .map_err(|_| {
                self.outbound.truncate(start);
                UsageError::FrameTooLarge
            })?;
        Ok(self
            .channels
            .get_mut(&channel)
            .and_then(|ch| ch.confirms.as_mut())
            .map(Confirms::next))
    }

    /// Acknowledges a delivery (or every unacknowledged one up to it, with `multiple`).
    pub fn ack(
        &mut self,
        channel: ChannelId,
        delivery_tag: DeliveryTag,
        multiple: bool,
    ) -> Result<(), UsageError> {
        let method = basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: delivery_tag.0,
            multiple,
        });
        self.async_command(channel, AMQPClass::Basic(method))
    }

    /// Negatively acknowledges a delivery, requeueing it or not (RabbitMQ extension).
    pub fn nack(
        &mut self,
        channel: ChannelId,
        delivery_tag: DeliveryTag,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), UsageError> {
        let method = basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: delivery_tag.0,
            multiple,
            requeue,
        });
        self.async_command(channel, AMQPClass::Basic(method))
    }

    /// Rejects one delivery, requeueing it or not.
    pub fn reject(
        &mut self,
        channel: ChannelId,
        delivery_tag: DeliveryTag,
        requeue: bool,
    ) -> Result<(), UsageError> {
        let method = basic::AMQPMethod::Reject(basic::Reject {
            delivery_tag: delivery_tag.0,
            requeue,
        });
        self.async_command(channel, AMQPClass::Basic(method))
    }

    /// Starts a clean close (reply code 200). [`Event::Closed`] with
    /// [`ConnectionError::ClosedByApplication`] follows once the server answers, or after
    /// [`ConnectionConfig::close_timeout`].
    pub fn close(&mut self, now: Instant) -> Result<(), UsageError> {
        match self.state {
            State::Closed => {
                return Err(UsageError::ConnectionClosed(
                    self.error
                        .clone()
                        .unwrap_or(ConnectionError::ClosedByApplication),
                ))
            }
            State::Closing { .. } => return Err(UsageError::Closing),
            // Before `connection.start` nothing can be said: just stop.
            State::Handshake(HandshakeStep::AwaitStart) => {
                self.error = Some(ConnectionError::ClosedByApplication);
                self.channels.clear();
                self.enter_closed();
                self.events
                    .push_back(Event::Closed(ConnectionError::ClosedByApplication));
                return Ok(());
            }
            State::Handshake(_) | State::Open => {}
        }
        self.error = Some(ConnectionError::ClosedByApplication);
        self.send_connection_close(
            now,
            ReplyCode::REPLY_SUCCESS,
            "closed by application",
            false,
        );
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Frame handling
    // -----------------------------------------------------------------------------------------

    fn handle_frame(&mut self, now: Instant, frame: Frame) {
        match frame {
            Frame::Heartbeat => {}
            Frame::Method { channel, method } if channel.is_zero() => {
                self.handle_connection_method(now, *method)
            }
            Frame::Method { channel, method } => {
                self.on_channel(now, channel, |ch| ch.on_method(*method))
            }
            Frame::Header { channel, header } => {
                let max = self.config.max_body_size;
                self.on_channel(now, channel, |ch| {
                    ch.on_header(header.body_size, header.properties, max)
                })
            }
            Frame::Body { channel, payload } => {
                self.on_channel(now, channel, |ch| ch.on_body(payload))
            }
        }
    }

    /// Hands a frame on a non-zero channel to its [`Channel`], after the checks every such
    /// frame needs, and applies what the channel says happened.
    fn on_channel(
        &mut self,
        now: Instant,
        channel: ChannelId,
        f: impl FnOnce(&mut Channel) -> ChannelStep,
    ) {
        match self.state {
            State::Open => {}
            // While closing, everything but close/close-ok on channel 0 is discarded
            // (spec §1.4.2.9).
            State::Closing { .. } | State::Closed => return,
            State::Handshake(_) => {
                return self.protocol_error(
                    now,
                    ReplyCode::UNEXPECTED_FRAME,
                    "channel frame before connection.open-ok",
                )
            }
        }
        let Some(ch) = self.channels.get_mut(&channel) else {
            return self.protocol_error(
                now,
                ReplyCode::CHANNEL_ERROR,
                format!("frame on {channel}, which is not open"),
            );
        };
        let step = f(ch);
        self.apply_channel_step(now, channel, step);
    }

    /// Applies what a frame did to a channel: sends, events, or a hard error.
    fn apply_channel_step(&mut self, now: Instant, channel: ChannelId, step: ChannelStep) {
        match step {
            ChannelStep::Nothing => {}
            ChannelStep::Report(event) => self.events.push_back(event),
            ChannelStep::ReportAll(events) => self.events.extend(events),
            ChannelStep::Answer { method, event } => {
                self.send_method_unchecked(channel, method);
                self.events.push_back(event);
            }
            ChannelStep::Closed { error, close_ok } => {
                if close_ok {
                    self.send_method_unchecked(
                        channel,
                        AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
                    );
                }
                self.close_channel_state(channel, error);
            }
            ChannelStep::Violation(Violation::Protocol { code, text }) => {
                self.protocol_error(now, code, text)
            }
            ChannelStep::Violation(Violation::Frame(error)) => self.frame_error(now, error),
        }
    }

    // One arm per (state, method) pair the handshake and an open connection allow: one table.
    fn handle_connection_method(&mut self, now: Instant, method: AMQPClass) {
        use connection::AMQPMethod as M;
        let AMQPClass::Connection(method) = method else {
            return self.protocol_error(
                now,
                ReplyCode::COMMAND_INVALID,
                "non-connection method on channel 0",
            );
        };
        if let State::Closing { reported, .. } = self.state {
            return self.on_connection_method_while_closing(now, method, reported);
        }
        match (self.state, method) {
            (State::Handshake(HandshakeStep::AwaitStart), M::Start(start)) => {
                self.on_start(now, start)
            }
            (State::Handshake(HandshakeStep::AwaitTune), M::Secure(_)) => {
                // PLAIN and AMQPLAIN send everything in start-ok; a challenge means the server
                // wants a mechanism we did not pick.
                self.protocol_error(now, ReplyCode::NOT_ALLOWED, "unexpected SASL challenge")
            }
            (State::Handshake(HandshakeStep::AwaitTune), M::Tune(tune)) => self.on_tune(now, tune),
            (State::Handshake(HandshakeStep::AwaitOpenOk), M::OpenOk(_)) => {
                self.state = State::Open;
                self.timers.clear(&Timer::Handshake);
                self.events.push_back(Event::Connected);
            }
            (_, M::Close(close)) => {
                self.send_method_unchecked(
                    ChannelId::CONNECTION,
                    AMQPClass::Connection(M::CloseOk(connection::CloseOk {})),
                );
                let code = ReplyCode(close.reply_code);
                let text = close.reply_text.to_string();
                // RabbitMQ reports a failed login as 403 ACCESS_REFUSED during the handshake
                // when the client advertises `authentication_failure_close`.
                let error = match self.state {
                    State::Handshake(HandshakeStep::AwaitTune)
                        if code == ReplyCode::ACCESS_REFUSED =>
                    {
                        ConnectionError::AuthenticationFailed { reason: text }
                    }
                    _ => ConnectionError::ClosedByServer { code, text },
                };
                self.fail(now, error, None);
            }
            (State::Open, M::Blocked(blocked)) => {
                self.blocked = true;
                self.events.push_back(Event::Blocked {
                    reason: blocked.reason.to_string(),
                });
            }
            (State::Open, M::Unblocked(_)) => {
                self.blocked = false;
                self.events.push_back(Event::Unblocked);
            }
            (State::Open, M::UpdateSecretOk(_)) => {}
            (_, _) => self.protocol_error(
                now,
                ReplyCode::UNEXPECTED_FRAME,
                "unexpected connection method",
            ),
        }
    }

    /// While our `connection.close` is on its way, only close and close-ok matter
    /// (spec §1.4.2.9).
    fn on_connection_method_while_closing(
        &mut self,
        now: Instant,
        method: connection::AMQPMethod,
        reported: bool,
    ) {
        use connection::AMQPMethod as M;
        match method {
            M::CloseOk(_) => self.finish_close(reported),
            M::Close(close) => {
                self.send_method_unchecked(
                    ChannelId::CONNECTION,
                    AMQPClass::Connection(M::CloseOk(connection::CloseOk {})),
                );
                if !reported {
                    self.report_closed(ConnectionError::ClosedByServer {
                        code: ReplyCode(close.reply_code),
                        text: close.reply_text.to_string(),
                    });
                }
                self.enter_closed();
            }
            // Blocked while our close was on its way: the broker stopped reading, so it
            // will not see the close, and waiting out the close timeout for a close-ok that
            // cannot come helps nobody (RabbitMQ "Blocked Connection Notifications").
            M::Blocked(_) => self.timers.set(Timer::Close, now),
            _ => {}
        }
    }

    fn on_start(&mut self, now: Instant, start: connection::Start) {
        if (start.version_major, start.version_minor) != (0, 9) {
            return self.fail(
                now,
                ConnectionError::Protocol {
                    code: ReplyCode::FRAME_ERROR,
                    reason: format!(
                        "server speaks AMQP {}-{}",
                        start.version_major, start.version_minor
                    ),
                },
                None,
            );
        }
        // The server speaks AMQP 0-9-1 now that it sent start: from here on a failure is
        // explained to it with a connection.close.
        self.state = State::Handshake(HandshakeStep::AwaitTune);
        let mechanism = match handshake::choose_mechanism(
            start.mechanisms.as_bytes(),
            &self.config.auth_mechanisms,
        ) {
            Ok(m) => m,
            Err(e) => {
                // The credentials never left.
                let text = e.to_string();
                return self.fail(now, e, Some((ReplyCode::ACCESS_REFUSED, text)));
            }
        };
        self.server_properties = start.server_properties;
        let start_ok = handshake::start_ok(&self.config, mechanism);
        let method = AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok));
        if self.send_method(ChannelId::CONNECTION, method).is_err() {
            // Credentials and connection name so long that start-ok exceeds the pre-tune frame
            // size: say so now rather than let the handshake time out.
            let reason =
                "credentials or connection name too long for connection.start-ok".to_owned();
            self.fail(
                now,
                ConnectionError::Protocol {
                    code: ReplyCode::FRAME_ERROR,
                    reason: reason.clone(),
                },
                Some((ReplyCode::FRAME_ERROR, reason)),
            );
        }
    }

    fn on_tune(&mut self, now: Instant, tune: connection::Tune) {
        let negotiated = Tune::negotiate(
            &self.config,
            tune.channel_max,
            tune.frame_max,
            tune.heartbeat,
        );
        if negotiated.frame_max < FRAME_MIN_SIZE {
            return self.protocol_error(
                now,
                ReplyCode::SYNTAX_ERROR,
                format!("server frame_max {} is below 4096", tune.frame_max),
            );
        }
        self.tune = negotiated;
        let heartbeat_secs = u16::try_from(negotiated.heartbeat.as_secs()).unwrap_or(u16::MAX);
        let tune_ok = connection::TuneOk {
            channel_max: negotiated.channel_max,
            frame_max: negotiated.frame_max,
            heartbeat: heartbeat_secs,
        };
        self.send_method_unchecked(
            ChannelId::CONNECTION,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
        );
        self.decoder.set_frame_max(negotiated.frame_max);
        self.heartbeat = Heartbeat::new(negotiated.heartbeat);
        if let Some(at) = self.heartbeat.send_at(now) {
            self.timers.set(Timer::SendHeartbeat, at);
        }
        if let Some(at) = self.heartbeat.dead_at(now) {
            self.timers.set(Timer::PeerDead, at);
        }
        let vhost = match ShortString::try_new(self.config.vhost.clone()) {
            Ok(v) => v,
            Err(_) => {
                let reason = format!(
                    "vhost name is {} bytes; at most 255",
                    self.config.vhost.len()
                );
                return self.fail(
                    now,
                    ConnectionError::Protocol {
                        code: ReplyCode::NOT_ALLOWED,
                        reason: reason.clone(),
                    },
                    Some((ReplyCode::NOT_ALLOWED, reason)),
                );
            }
        };
        self.send_method_unchecked(
            ChannelId::CONNECTION,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: vhost,
            })),
        );
        self.state = State::Handshake(HandshakeStep::AwaitOpenOk);
    }

    /// Forgets a channel, failing every request still waiting on it.
    fn close_channel_state(&mut self, channel: ChannelId, error: ChannelError) {
        let Some(ch) = self.channels.remove(&channel) else {
            return;
        };
        for request in ch.waiting_requests() {
            self.events.push_back(Event::Failed {
                request,
                error: error.clone(),
            });
        }
        self.events.push_back(Event::ChannelClosed(error));
    }

    // -----------------------------------------------------------------------------------------
    // Sending
    // -----------------------------------------------------------------------------------------

    fn check_open(&self) -> Result<(), UsageError> {
        match self.state {
            State::Open => Ok(()),
            State::Handshake(_) => Err(UsageError::NotConnected),
            State::Closing { .. } | State::Closed => Err(match &self.error {
                Some(e)
                    if *e != ConnectionError::ClosedByApplication
                        || self.state == State::Closed =>
                {
                    UsageError::ConnectionClosed(e.clone())
                }
                _ => UsageError::Closing,
            }),
        }
    }

    fn channel_for_command(&self, channel: ChannelId) -> Result<(), UsageError> {
        self.check_open()?;
        if self.is_channel_usable(channel) {
            Ok(())
        } else {
            Err(UsageError::ChannelNotOpen(channel))
        }
    }

    /// Sends a synchronous method and queues its expected reply.
    fn request(
        &mut self,
        channel: ChannelId,
        method: AMQPClass,
        expect: fn(RequestId) -> Expect,
    ) -> Result<RequestId, UsageError> {
        self.channel_for_command(channel)?;
        self.send_method(channel, method)?;
        self.next_request += 1;
        let request = RequestId(self.next_request);
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.expect(expect(request));
        }
        Ok(request)
    }

    fn async_command(&mut self, channel: ChannelId, method: AMQPClass) -> Result<(), UsageError> {
        self.channel_for_command(channel)?;
        self.send_method(channel, method)
    }

    fn send_method(&mut self, channel: ChannelId, method: AMQPClass) -> Result<(), UsageError> {
        codec::encode_method(channel, &method, self.tune.frame_max, &mut self.outbound)
            .map_err(|_| UsageError::FrameTooLarge)
    }

    /// Sends a method we built ourselves from bounded fields, which always fits in 4096 bytes.
    fn send_method_unchecked(&mut self, channel: ChannelId, method: AMQPClass) {
        // Our own control methods are far below FRAME_MIN_SIZE; the only large one, start-ok,
        // is bounded by the credentials and connection name the application chose, and the
        // pre-tune limit applies to it like to anything else. A failure leaves `outbound`
        // untouched; the server then times the handshake out, which is the best we can do.
        let _ = codec::encode_method(channel, &method, self.tune.frame_max, &mut self.outbound);
    }

    // -----------------------------------------------------------------------------------------
    // Failure and close
    // -----------------------------------------------------------------------------------------

    fn frame_error(&mut self, now: Instant, error: FrameError) {
        let code = error.reply_code();
        let text = error.to_string();
        self.fail(now, ConnectionError::Frame(error), Some((code, text)));
    }

    fn protocol_error(&mut self, now: Instant, code: ReplyCode, reason: impl Into<String>) {
        let reason = reason.into();
        self.fail(
            now,
            ConnectionError::Protocol {
                code,
                reason: reason.clone(),
            },
            Some((code, reason)),
        );
    }

    /// Ends the connection with a hard error: it becomes sticky, [`Event::Closed`] is queued as
    /// the last event, and with `close` we tell the server why and wait briefly for close-ok.
    fn fail(&mut self, now: Instant, error: ConnectionError, close: Option<(ReplyCode, String)>) {
        if matches!(
            self.state,
            State::Closed | State::Closing { reported: true, .. }
        ) {
            return;
        }
        self.error = Some(error.clone());
        self.report_closed(error);
        match (self.state, close) {
            // The application's connection.close is already out, and a peer sends one close
            // only (spec §1.4.2.9): keep waiting for its close-ok, now reported.
            (State::Closing { .. }, Some(_)) => self.state = State::Closing { reported: true },
            // Before connection.start the server would not understand a close.
            (state, Some((code, text))) if state != State::Handshake(HandshakeStep::AwaitStart) => {
                self.send_connection_close(now, code, &text, true)
            }
            _ => self.enter_closed(),
        }
    }

    fn send_connection_close(&mut self, now: Instant, code: ReplyCode, text: &str, reported: bool) {
        // A short string holds 255 bytes (spec §4.2.5.3). The text may quote the server (the
        // mechanisms it offered), so cut it on a character boundary: `String::truncate` panics
        // inside a character.
        let mut end = text.len().min(255);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let close = connection::Close {
            reply_code: code.0,
            reply_text: ShortString::try_new(&text[..end]).unwrap_or_default(),
            class_id: 0,
            method_id: 0,
        };
        self.send_method_unchecked(
            ChannelId::CONNECTION,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)),
        );
        // A blocked connection is one the broker has stopped reading (RabbitMQ "Blocked
        // Connection Notifications"): it would not see our close before the timeout, so we do
        // not wait for its close-ok.
        let wait = if self.blocked {
            Duration::ZERO
        } else {
            self.config.close_timeout
        };
        // Only the close timer runs now: no heartbeat is sent or awaited while closing.
        self.timers.clear_all();
        self.timers
            .set(Timer::Close, config::deadline_after(now, wait));
        self.state = State::Closing { reported };
    }

    fn finish_close(&mut self, reported: bool) {
        if !reported {
            let error = self
                .error
                .clone()
                .unwrap_or(ConnectionError::ClosedByApplication);
            self.report_closed(error);
        }
        self.enter_closed();
    }

    fn enter_closed(&mut self) {
        self.state = State::Closed;
        self.timers.clear_all();
    }

    /// Queues [`Event::Closed`]; every channel goes with the connection.
    fn report_closed(&mut self, error: ConnectionError) {
        self.channels.clear();
        self.blocked = false;
        self.events.push_back(Event::Closed(error));
    }
}

/// A short-string field from the application: at most 255 bytes (spec §4.2.5.3).
fn short(field: &'static str, value: &str) -> Result<ShortString, UsageError> {
    ShortString::try_new(value).map_err(|_| UsageError::NameTooLong {
        field,
        len: value.len(),
    })
}
