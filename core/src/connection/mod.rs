//! The AMQP 0-9-1 client connection machine.
//!
//! [`Connection`] owns the handshake, heartbeats, channels and the close handshake
//! (ARCHITECTURE §3 gives the reading order of this folder). It never touches a socket or a
//! clock: bytes and time come in through `handle_*`, bytes and events go out through `poll_*`.
//! See the crate docs for the driving contract.

mod channel;
mod commands;
mod config;
mod confirms;
mod content;
mod event;
mod handshake;
mod heartbeat;

pub use commands::{ConsumeOptions, QueueOptions};
pub use config::{ConnectionConfig, Credentials, SaslMechanism, Tune};
pub use event::{Delivery, Event, Reply, Returned};

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{channel as chan, connection, AMQPClass};
use amq_protocol::types::{FieldTable, ShortString};
use bytes::BytesMut;

use crate::codec::{self, Frame, FrameDecoder, FRAME_MIN_SIZE};
use crate::error::{ChannelError, ConnectionError, FrameError, HandshakeStage, UsageError};
use crate::ids::{ChannelId, ReplyCode};
use crate::timers::TimerTable;

use channel::{Channel, ChannelStep, Violation};
use handshake::HandshakeStep;
use heartbeat::Heartbeat;

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

/// A body frame whose payload is copied from the input into its message as it arrives.
#[derive(Debug, Clone, Copy)]
struct BodyStream {
    channel: ChannelId,
    /// Payload bytes still to come; the frame-end octet follows them.
    remaining: usize,
}

/// A client connection: the handshake, heartbeats, channels and the close handshake.
#[derive(Debug)]
pub struct Connection {
    config: ConnectionConfig,
    state: State,
    decoder: FrameDecoder,
    read_buf: BytesMut,
    /// The body frame whose payload is being copied straight from the input into its
    /// message's buffer, if any (see [`Connection::handle_input`]).
    body_stream: Option<BodyStream>,
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
            body_stream: None,
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
        if !self.reading() || bytes.is_empty() {
            return;
        }
        if let Some(at) = self.heartbeat.dead_at(now) {
            self.timers.extend(Timer::PeerDead, at);
        }
        // The payload of a body frame of a message that spans several frames is copied
        // straight from the input into the message's buffer: one copy per byte, where the
        // read buffer and the join after it took two (and, for frames larger than a read,
        // a move of the buffered part each time the read buffer grew). Every other frame, and
        // a body frame that arrives while older bytes wait in the read buffer, is decoded from
        // the read buffer.
        let mut input = bytes;
        while !input.is_empty() && self.reading() {
            if self.body_stream.is_some() {
                input = self.stream_body(now, input);
                continue;
            }
            if self.read_buf.is_empty() {
                if let Some(stream) = self.start_body_stream(input) {
                    self.body_stream = Some(stream);
                    input = &input[codec::FRAME_HEADER_LEN..];
                    continue;
                }
            }
            self.read_buf.extend_from_slice(input);
            input = &[];
            self.decode_buffered(now);
        }
    }

    /// Whether input is still taken: not after the close, nor after a frame error.
    fn reading(&self) -> bool {
        self.state != State::Closed && !matches!(self.error, Some(ConnectionError::Frame(_)))
    }

    /// Decodes the frames waiting in the read buffer; a body frame that may stream (see
    /// [`Connection::start_body_stream`]) is taken off it that way.
    fn decode_buffered(&mut self, now: Instant) {
        while self.reading() && self.body_stream.is_none() {
            let head: Option<[u8; codec::FRAME_HEADER_LEN]> = self
                .read_buf
                .get(..codec::FRAME_HEADER_LEN)
                .and_then(|h| h.try_into().ok());
            if let Some(stream) = head.and_then(|h| self.start_body_stream(&h)) {
                self.body_stream = Some(stream);
                let mut buffered = std::mem::take(&mut self.read_buf);
                let rest = self
                    .stream_body(now, &buffered[codec::FRAME_HEADER_LEN..])
                    .len();
                let consumed = buffered.len() - rest;
                bytes::Buf::advance(&mut buffered, consumed);
                self.read_buf = buffered;
                continue;
            }
            match self.decoder.decode(&mut self.read_buf) {
                Ok(Some(frame)) => self.handle_frame(now, frame),
                Ok(None) => break,
                Err(error) => {
                    self.broken_framing(now, error);
                    break;
                }
            }
        }
        if !self.reading() {
            self.read_buf.clear();
        }
    }

    /// A body frame starts with `header`: whether its payload may stream into its message.
    /// Only on an open connection, for a channel that is open and receiving a message that
    /// spans several frames, and for a frame the decoder would accept; anything else is
    /// decoded from the read buffer as usual, which reports what is wrong with it.
    fn start_body_stream(&mut self, header: &[u8]) -> Option<BodyStream> {
        if self.state != State::Open {
            return None;
        }
        let (channel, size) = self.decoder.body_frame_start(header)?;
        let ch = self.channels.get_mut(&channel)?;
        ch.start_streamed_body(size).then_some(BodyStream {
            channel,
            remaining: size,
        })
    }

    /// Takes what `input` holds of the streaming body frame (its payload, then its frame-end
    /// octet) and returns the rest of `input`.
    fn stream_body<'a>(&mut self, now: Instant, input: &'a [u8]) -> &'a [u8] {
        let Some(stream) = self.body_stream.as_mut() else {
            return input;
        };
        let channel = stream.channel;
        let n = stream.remaining.min(input.len());
        stream.remaining -= n;
        let payload_done = stream.remaining == 0;
        if n > 0 {
            // A channel closed meanwhile takes nothing; the bytes are still the frame's.
            if let Some(ch) = self.channels.get_mut(&channel) {
                ch.streamed_body(&input[..n]);
            }
        }
        let input = &input[n..];
        if !payload_done {
            return input;
        }
        let Some((&end, rest)) = input.split_first() else {
            return input;
        };
        self.body_stream = None;
        if end != codec::FRAME_END {
            self.broken_framing(now, FrameError::BadFrameEnd(end));
            return &[];
        }
        // As for any channel frame: discarded once the connection is closing (§1.4.2.9).
        if self.state == State::Open {
            if let Some(ch) = self.channels.get_mut(&channel) {
                let step = ch.end_streamed_body();
                self.apply_channel_step(now, channel, step);
            }
        }
        rest
    }

    /// Bytes that break the framing: the connection fails and no later byte is read.
    fn broken_framing(&mut self, now: Instant, error: FrameError) {
        self.frame_error(now, error);
        // The decoder does not consume a bad frame: decoding again would meet the same error.
        self.read_buf.clear();
        self.body_stream = None;
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
            let stage = match self.state {
                // Bytes of a frame not yet whole wait in `read_buf`.
                State::Handshake(HandshakeStep::AwaitStart) if self.read_buf.is_empty() => {
                    HandshakeStage::NoReply
                }
                State::Handshake(HandshakeStep::AwaitStart) => HandshakeStage::PartialStart,
                State::Handshake(HandshakeStep::AwaitTune) => HandshakeStage::AwaitingTune,
                _ => HandshakeStage::AwaitingOpenOk,
            };
            let after = self.config.handshake_timeout;
            self.fail(
                now,
                ConnectionError::HandshakeTimedOut { stage, after },
                None,
            );
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

    // -----------------------------------------------------------------------------------------
    // Sending
    // -----------------------------------------------------------------------------------------

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
