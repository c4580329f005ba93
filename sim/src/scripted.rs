//! The connection-level harness: a [`ScriptedBroker`] that decodes what the client sends and
//! answers what the test tells it to, and a [`Sim`] that pumps bytes both ways in virtual time.
//! [`Sim`] drives anything that implements [`SimClient`] (the connection here; the RPC machines
//! can implement it too).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use amq_protocol::frame::{parsing::parse_frame, AMQPFrame};
use amq_protocol::protocol::{basic, connection, AMQPClass};
use amq_protocol::types::FieldTable;
use amqp_rpc_core::types::BasicProperties;
use amqp_rpc_core::{ChannelId, Connection, ConnectionConfig, ConsumeOptions, Event, Machine};

use crate::{frames, t0, xorshift};

/// A machine the simulation can drive: the driving contract (events included), and which
/// event is the last one.
pub trait SimClient: Machine<Event: Debug> {
    /// Whether `event` must be the last one (the connection closed).
    fn is_final(event: &Self::Event) -> bool;
}

impl SimClient for Connection {
    fn is_final(event: &Event) -> bool {
        matches!(event, Event::Closed(_))
    }
}

// ---------------------------------------------------------------------------------------------
// Scripted broker
// ---------------------------------------------------------------------------------------------

/// The broker side of a simulation. It checks that the client's bytes are valid AMQP (decoded
/// with amq-protocol's parser, not ours), queues the decoded frames for the test to inspect,
/// and sends whatever the test scripts.
#[derive(Debug)]
pub struct ScriptedBroker {
    inbox: Vec<u8>,
    header_seen: bool,
    frames: VecDeque<AMQPFrame>,
    /// Heartbeat frames received from the client (kept out of the frame queue).
    pub heartbeats_received: usize,
    outbox: Vec<u8>,
    /// The frame_max the client's frames must respect and the broker's content is split at:
    /// 8192 before tune, then the value the client's tune-ok names.
    pub frame_max: u32,
}

impl Default for ScriptedBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl ScriptedBroker {
    /// A broker waiting for the protocol header.
    pub fn new() -> Self {
        Self {
            inbox: Vec::new(),
            header_seen: false,
            frames: VecDeque::new(),
            heartbeats_received: 0,
            outbox: Vec::new(),
            frame_max: 8192,
        }
    }

    /// Takes bytes from the client. Panics on anything that is not valid AMQP 0-9-1.
    pub fn receive(&mut self, bytes: &[u8]) {
        self.inbox.extend_from_slice(bytes);
        if !self.header_seen {
            if self.inbox.len() < 8 {
                return;
            }
            assert_eq!(
                &self.inbox[..8],
                b"AMQP\x00\x00\x09\x01",
                "client must open with the 0-9-1 protocol header"
            );
            self.inbox.drain(..8);
            self.header_seen = true;
        }
        loop {
            let (consumed, frame) = match parse_frame(&self.inbox[..]) {
                Ok((rest, frame)) => (self.inbox.len() - rest.len(), frame),
                Err(e) if e.is_incomplete() => return,
                Err(e) => panic!("client sent an invalid frame: {e:?}: {:02x?}", self.inbox),
            };
            assert!(
                consumed as u64 <= u64::from(self.frame_max),
                "client frame of {consumed} bytes exceeds frame_max {}",
                self.frame_max
            );
            self.inbox.drain(..consumed);
            match frame {
                AMQPFrame::Heartbeat => self.heartbeats_received += 1,
                other => self.frames.push_back(other),
            }
        }
    }

    /// Whether the client's protocol header arrived.
    pub fn header_seen(&self) -> bool {
        self.header_seen
    }

    /// The next frame the client sent (heartbeats excluded), if any.
    pub fn next_frame(&mut self) -> Option<AMQPFrame> {
        self.frames.pop_front()
    }

    /// Frames received and not inspected yet.
    pub fn pending_frames(&self) -> usize {
        self.frames.len()
    }

    /// The next frame, which must be a method: its channel and the method.
    pub fn expect_method(&mut self) -> (u16, AMQPClass) {
        match self.frames.pop_front() {
            Some(AMQPFrame::Method(channel, method)) => (channel, method),
            other => panic!("expected a method from the client, got {other:?}"),
        }
    }

    /// The next frame must be `connection.close`: its reply code and text.
    pub fn expect_connection_close(&mut self) -> (u16, String) {
        match self.expect_method() {
            (0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                (c.reply_code, c.reply_text.to_string())
            }
            other => panic!("expected connection.close, got {other:?}"),
        }
    }

    /// The next frames must be a `basic.publish` and its content: the method, the properties
    /// and the joined body.
    pub fn expect_publish(
        &mut self,
    ) -> (
        u16,
        amq_protocol::protocol::basic::Publish,
        BasicProperties,
        Vec<u8>,
    ) {
        use amq_protocol::protocol::basic;
        let (channel, publish) = match self.expect_method() {
            (c, AMQPClass::Basic(basic::AMQPMethod::Publish(p))) => (c, p),
            other => panic!("expected basic.publish, got {other:?}"),
        };
        let (size, properties) = match self.frames.pop_front() {
            Some(AMQPFrame::Header(c, h)) if c == channel => (h.body_size, h.properties),
            other => panic!("expected a content header, got {other:?}"),
        };
        let mut body = Vec::new();
        while (body.len() as u64) < size {
            match self.frames.pop_front() {
                Some(AMQPFrame::Body(c, b)) if c == channel => body.extend(b),
                other => panic!("expected a content body, got {other:?}"),
            }
        }
        assert_eq!(body.len() as u64, size, "body longer than its header said");
        (channel, publish, properties, body)
    }

    /// Queues a method frame for the client.
    pub fn send(&mut self, channel: u16, method: AMQPClass) {
        self.outbox.extend(frames::method(channel, method));
    }

    /// Queues a content-bearing method (deliver, return) with its header and body frames.
    pub fn send_content(
        &mut self,
        channel: u16,
        method: AMQPClass,
        properties: &BasicProperties,
        body: &[u8],
    ) {
        self.send(channel, method);
        self.outbox.extend(frames::content(
            channel,
            properties,
            body.len() as u64,
            body,
            self.frame_max,
        ));
    }

    /// Queues a heartbeat.
    pub fn send_heartbeat(&mut self) {
        self.outbox.extend(frames::heartbeat());
    }

    /// Queues arbitrary bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.outbox.extend_from_slice(bytes);
    }

    /// Takes everything queued for the client.
    pub fn take_outbox(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.outbox)
    }
}

// ---------------------------------------------------------------------------------------------
// Simulation
// ---------------------------------------------------------------------------------------------

/// How the bytes from the broker reach the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// Everything the broker queued, in one `handle_input`.
    Whole,
    /// One byte per `handle_input`.
    ByteByByte,
    /// Random chunk sizes from 1 to 64 bytes, from this xorshift state (non-zero).
    Random(u64),
}

/// What the broker answers during the standard handshake.
#[derive(Debug, Clone)]
pub struct HandshakeScript {
    /// The space-separated SASL mechanisms `connection.start` offers.
    pub mechanisms: String,
    /// Proposed channel_max.
    pub channel_max: u16,
    /// Proposed frame_max.
    pub frame_max: u32,
    /// Proposed heartbeat, seconds.
    pub heartbeat: u16,
}

impl Default for HandshakeScript {
    /// What RabbitMQ proposes by default.
    fn default() -> Self {
        Self {
            mechanisms: "PLAIN AMQPLAIN".into(),
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60,
        }
    }
}

/// What the client answered during the handshake.
#[derive(Debug, Clone)]
pub struct HandshakeTranscript {
    /// Its `connection.start-ok`.
    pub start_ok: connection::StartOk,
    /// Its `connection.tune-ok`.
    pub tune_ok: connection::TuneOk,
    /// Its `connection.open`.
    pub open: connection::Open,
}

/// A client machine and a scripted broker, connected by an in-memory pipe, in virtual time.
#[derive(Debug)]
pub struct Sim<M: SimClient = Connection> {
    /// The machine under test.
    pub client: M,
    /// The broker.
    pub broker: ScriptedBroker,
    /// Virtual now.
    pub now: Instant,
    /// When the simulation started.
    pub start: Instant,
    /// How broker bytes are chunked on their way to the client.
    pub chunking: Chunking,
    /// Events drained from the client and not taken yet.
    pub events: VecDeque<M::Event>,
    /// Every byte the broker sent, in order (to replay the same stream elsewhere).
    pub server_stream: Vec<u8>,
    closed_seen: bool,
}

impl Sim<Connection> {
    /// A fresh connection with `config` at virtual time zero; nothing sent yet.
    pub fn new(config: ConnectionConfig) -> Self {
        let start = t0();
        Sim::with_client(Connection::new(config, start), start)
    }

    /// A connection through the standard handshake; `Event::Connected` was taken.
    pub fn connected(config: ConnectionConfig) -> Self {
        Self::connected_with(config, HandshakeScript::default()).0
    }

    /// A connection through the handshake `script`; returns what the client answered.
    pub fn connected_with(
        config: ConnectionConfig,
        script: HandshakeScript,
    ) -> (Self, HandshakeTranscript) {
        let mut sim = Self::new(config);
        let transcript = sim.handshake(&script);
        assert_eq!(sim.next_event(), Some(Event::Connected));
        assert!(sim.client.is_open());
        (sim, transcript)
    }

    /// Opens a channel, answers its open-ok and takes `Event::ChannelOpened`.
    pub fn open_channel(&mut self) -> ChannelId {
        let ch = self.client.open_channel().expect("open_channel");
        self.pump();
        let (c, m) = self.broker.expect_method();
        assert_eq!(c, ch.0);
        assert!(
            matches!(
                m,
                AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Open(_))
            ),
            "{m:?}"
        );
        self.broker.send(ch.0, frames::channel_open_ok());
        self.pump();
        assert_eq!(self.next_event(), Some(Event::ChannelOpened(ch)));
        ch
    }

    /// Consumes `queue` as `tag` on `ch` (default options), answers the consume-ok and drops
    /// the events that follow.
    pub fn consume(&mut self, ch: ChannelId, queue: &str, tag: &str) {
        self.client
            .consume(
                ch,
                queue,
                tag,
                ConsumeOptions::default(),
                FieldTable::default(),
            )
            .expect("consume");
        self.pump();
        let (c, m) = self.broker.expect_method();
        assert_eq!(c, ch.0);
        assert!(
            matches!(m, AMQPClass::Basic(basic::AMQPMethod::Consume(_))),
            "{m:?}"
        );
        self.broker.send(ch.0, frames::consume_ok(tag));
        self.pump();
        self.take_events();
    }
}

impl<M: SimClient> Sim<M> {
    /// A simulation around `client`, created at `start`.
    pub fn with_client(client: M, start: Instant) -> Self {
        Self {
            client,
            broker: ScriptedBroker::new(),
            now: start,
            start,
            chunking: Chunking::Whole,
            events: VecDeque::new(),
            server_stream: Vec::new(),
            closed_seen: false,
        }
    }

    /// Moves bytes both ways until neither side has anything to say, draining the client's
    /// events after every input (the driving contract).
    pub fn pump(&mut self) {
        for _ in 0..1000 {
            let mut to_broker = Vec::new();
            self.client.poll_transmit(self.now, &mut to_broker);
            self.broker.receive(&to_broker);
            let to_client = self.broker.take_outbox();
            self.deliver(&to_client);
            if to_broker.is_empty() && to_client.is_empty() {
                return;
            }
        }
        panic!("the client and the broker keep talking");
    }

    /// Feeds `bytes` to the client with the configured chunking.
    fn deliver(&mut self, bytes: &[u8]) {
        self.server_stream.extend_from_slice(bytes);
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = match &mut self.chunking {
                Chunking::Whole => rest.len(),
                Chunking::ByteByByte => 1,
                Chunking::Random(state) => 1 + (xorshift(state) % 64) as usize,
            }
            .min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            self.client.handle_input(self.now, chunk);
            self.drain_events();
        }
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.client.poll_event() {
            assert!(!self.closed_seen, "event after the final one: {event:?}");
            self.closed_seen = M::is_final(&event);
            self.events.push_back(event);
        }
    }

    /// Moves virtual time forward by `d`, firing the client's timers at their deadlines in
    /// order and pumping after each.
    pub fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        for _ in 0..100_000 {
            match self.client.poll_timeout() {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.client.handle_timeout(self.now);
                    self.drain_events();
                    self.pump();
                }
                _ => {
                    self.now = target;
                    return;
                }
            }
        }
        panic!("the client's timer keeps firing without time passing");
    }

    /// The byte stream from the broker ends.
    pub fn eof(&mut self) {
        self.client.handle_eof(self.now);
        self.drain_events();
        self.pump();
    }

    /// Virtual time elapsed since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The oldest event not taken yet.
    pub fn next_event(&mut self) -> Option<M::Event> {
        self.events.pop_front()
    }

    /// Every event not taken yet.
    pub fn take_events(&mut self) -> Vec<M::Event> {
        self.events.drain(..).collect()
    }

    /// Whether the final event (`Event::Closed` for a connection) has been seen.
    pub fn closed_seen(&self) -> bool {
        self.closed_seen
    }

    /// Runs the broker's side of the standard handshake (spec §1.4.2): start, tune, open-ok.
    pub fn handshake(&mut self, script: &HandshakeScript) -> HandshakeTranscript {
        self.pump();
        assert!(self.broker.header_seen(), "no protocol header");
        self.broker.send(0, frames::start(&script.mechanisms));
        self.pump();
        let start_ok = match self.broker.expect_method() {
            (0, AMQPClass::Connection(connection::AMQPMethod::StartOk(s))) => s,
            other => panic!("expected start-ok, got {other:?}"),
        };
        self.broker.send(
            0,
            frames::tune(script.channel_max, script.frame_max, script.heartbeat),
        );
        self.pump();
        let tune_ok = match self.broker.expect_method() {
            (0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(t))) => t,
            other => panic!("expected tune-ok, got {other:?}"),
        };
        self.broker.frame_max = tune_ok.frame_max;
        let open = match self.broker.expect_method() {
            (0, AMQPClass::Connection(connection::AMQPMethod::Open(o))) => o,
            other => panic!("expected connection.open, got {other:?}"),
        };
        self.broker.send(0, frames::open_ok());
        self.pump();
        HandshakeTranscript {
            start_ok,
            tune_ok,
            open,
        }
    }
}
