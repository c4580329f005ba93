//! A tiny in-memory AMQP 0-9-1 broker for simulation tests: it speaks the server side of the
//! protocol to any number of client connections, routes through the default exchange, delivers
//! to consumers within their prefetch, returns unroutable mandatory messages, tracks unacked
//! deliveries per channel and requeues them (redelivered) when their channel or connection dies.
//!
//! It emulates the RabbitMQ behaviours the RPC machines rely on:
//! - direct reply-to: consuming `amq.rabbitmq.reply-to` needs `no_ack` (else 406); publishing
//!   with that `reply_to` needs such a consumer on the same channel (else 406), and the broker
//!   rewrites `reply_to` to an address naming the channel; a reply to an address whose channel
//!   is gone is dropped;
//! - exclusive, server-named (`amq.gen-N`), auto-delete queues, deleted with their connection
//!   or last consumer; a passive declare of a missing queue closes the channel with 404;
//! - an ack, nack or reject of an unknown delivery tag closes the channel with 406, and is
//!   recorded in [`Broker::violations`] (the tests assert there are none);
//! - per-message TTL (`expiration`) for messages waiting in a queue.
//!
//! Deterministic: no clock, no randomness; time comes in through [`Broker::feed`] and
//! [`Broker::tick`]. Heartbeats are tuned off.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use amq_protocol::frame::{parsing::parse_frame, AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::{
    basic, channel, confirm, connection, exchange, queue, AMQPClass, BasicProperties,
};
use amq_protocol::types::ShortString;

use crate::frames;

/// Identifies one client connection to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Where direct reply-to addresses start (RabbitMQ "Direct Reply-to").
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
const FRAME_MAX: u32 = 131_072;

/// A message in a queue or in flight to a consumer.
#[derive(Debug, Clone)]
pub struct Message {
    /// The exchange it was published to (`""`: the default exchange).
    pub exchange: String,
    /// Its routing key (the queue name, through the default exchange).
    pub routing_key: String,
    /// Its properties as published (`reply_to` rewritten for direct reply-to).
    pub properties: BasicProperties,
    /// Its body.
    pub body: Vec<u8>,
    /// Whether it was delivered before and requeued.
    pub redelivered: bool,
    /// From the `expiration` property, when it entered its queue.
    expires_at: Option<Instant>,
    /// Order of arrival in its queue: a requeued message goes back to its place (RabbitMQ
    /// "Negative Acknowledgement and Requeuing": "its original position in its queue").
    seq: u64,
}

#[derive(Debug, Default)]
struct Queue {
    messages: VecDeque<Message>,
    /// Owning connection of an exclusive queue.
    owner: Option<ConnId>,
    auto_delete: bool,
    /// (connection, channel, consumer tag), served round robin from `next`.
    consumers: Vec<(ConnId, u16, String)>,
    next: usize,
    /// `x-max-length` with `x-overflow: reject-publish` ([`Broker::limit_queue`]): a publish
    /// to the full queue is refused, nacked on a channel in confirm mode, dropped otherwise.
    max_length: Option<usize>,
}

/// Where a publish went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routing {
    Routed,
    Unroutable,
    /// A queue with `reject-publish` overflow was full.
    Refused,
    /// A direct reply-to address of two parts that names no live channel (see
    /// [`Broker::crash_on_dead_direct_reply_to`]); routed nowhere.
    DeadDirectAddress,
}

#[derive(Debug)]
struct Consumer {
    queue: String,
    no_ack: bool,
}

#[derive(Debug)]
struct PendingPublish {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    header: Option<(u64, BasicProperties)>,
    body: Vec<u8>,
}

#[derive(Debug, Default)]
struct Chan {
    next_tag: u64,
    prefetch: u16,
    /// Delivery tag -> (queue, message), for deliveries that need an ack.
    unacked: BTreeMap<u64, (String, Message)>,
    consumers: BTreeMap<String, Consumer>,
    /// Consumer tag of this channel's direct reply-to consumer.
    direct_reply: Option<String>,
    publish: Option<PendingPublish>,
    /// We sent `channel.close` and wait for close-ok; everything else is discarded.
    closing: bool,
    /// Confirm mode (`confirm.select`): the sequence number of the last publish.
    confirm: Option<u64>,
    /// Confirms held back by [`Broker::hold_confirms`]: (sequence number, acked).
    held_confirms: Vec<(u64, bool)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    AwaitHeader,
    AwaitStartOk,
    AwaitTuneOk,
    Open,
    /// We sent `connection.close`; waiting for close-ok.
    Closing,
    /// Gone: the client sees EOF once it has read what is left in `out`.
    Dead,
}

#[derive(Debug)]
struct Conn {
    state: ConnState,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    channels: BTreeMap<u16, Chan>,
    /// Fault: die right after routing the next completed publish, dropping what follows.
    die_after_publish: bool,
    /// Publisher confirms are held back until [`Broker::release_confirms`] (RabbitMQ confirms
    /// a publish once its queues have it, which can be after later publishes were handled).
    hold_confirms: bool,
}

/// The broker.
#[derive(Debug)]
pub struct Broker {
    conns: BTreeMap<ConnId, Conn>,
    queues: BTreeMap<String, Queue>,
    next_conn: u64,
    next_name: u64,
    next_seq: u64,
    now: Option<Instant>,
    /// Protocol misuse by a client (a double ack, garbage frames...). Tests assert it is empty.
    pub violations: Vec<String>,
    /// Messages that were returned to a mandatory publisher.
    pub returned: u64,
    /// Messages dropped because nothing could take them (unroutable non-mandatory, dead direct
    /// reply-to address, TTL).
    pub dropped: u64,
    /// Acks received, per connection: (channel, delivery tag).
    pub acks: Vec<(ConnId, u16, u64)>,
    /// The `channel_max` offered to connections that start their handshake from now on
    /// (RabbitMQ's default: 2047).
    pub channel_max: u16,
    /// The largest message body accepted (RabbitMQ's `max_message_size`: 128 MiB on 3.x,
    /// 16 MiB on 4.x); a larger publish closes its channel with 406 PRECONDITION_FAILED.
    pub max_message_size: u64,
    /// Publisher confirms sent: (connection, channel, sequence number, acked).
    pub confirms: Vec<(ConnId, u16, u64, bool)>,
    /// RabbitMQ 3.10's reaction to a publish to `amq.rabbitmq.reply-to.<a>.<b>` whose `<a>`
    /// names no live channel (undecodable, or the pid of no channel): its channel process
    /// crashes and the broker closes the publisher's connection with 541 INTERNAL_ERROR
    /// (measured on 3.10.8, `tests/tests/server_safety.rs`). Off by default: such a publish is
    /// then dropped as unroutable.
    pub crash_on_dead_direct_reply_to: bool,
}

impl Default for Broker {
    fn default() -> Self {
        Self::new()
    }
}

impl Broker {
    /// A broker with no connection and no queue.
    pub fn new() -> Self {
        Self {
            conns: BTreeMap::new(),
            queues: BTreeMap::new(),
            next_conn: 0,
            next_name: 0,
            next_seq: 0,
            now: None,
            violations: Vec::new(),
            returned: 0,
            dropped: 0,
            acks: Vec::new(),
            channel_max: 2047,
            max_message_size: 128 * 1024 * 1024,
            crash_on_dead_direct_reply_to: false,
            confirms: Vec::new(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Connections
    // -----------------------------------------------------------------------------------------

    /// Accepts a new client connection; it expects the protocol header first.
    pub fn connect(&mut self) -> ConnId {
        self.next_conn += 1;
        let id = ConnId(self.next_conn);
        self.conns.insert(
            id,
            Conn {
                state: ConnState::AwaitHeader,
                inbuf: Vec::new(),
                out: Vec::new(),
                channels: BTreeMap::new(),
                die_after_publish: false,
                hold_confirms: false,
            },
        );
        id
    }

    /// Bytes from the client.
    pub fn feed(&mut self, id: ConnId, now: Instant, bytes: &[u8]) {
        self.now = Some(now);
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.state == ConnState::Dead {
            return;
        }
        conn.inbuf.extend_from_slice(bytes);
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            if conn.state == ConnState::Dead {
                conn.inbuf.clear();
                break;
            }
            let Some(len) = frame_len(&conn.inbuf) else {
                break;
            };
            let raw: Vec<u8> = conn.inbuf.drain(..len).collect();
            match parse_frame(&raw[..]) {
                Ok(([], frame)) => self.on_frame(id, frame),
                _ => {
                    self.violations
                        .push(format!("{id:?}: unparsable frame {raw:02x?}"));
                    self.kill(id);
                    break;
                }
            }
        }
        self.dispatch();
    }

    /// Bytes for the client.
    pub fn take_output(&mut self, id: ConnId) -> Vec<u8> {
        self.conns
            .get_mut(&id)
            .map(|c| std::mem::take(&mut c.out))
            .unwrap_or_default()
    }

    /// Whether the connection is gone (the client should see EOF once it read its output).
    pub fn is_dead(&self, id: ConnId) -> bool {
        self.conns
            .get(&id)
            .is_none_or(|c| c.state == ConnState::Dead)
    }

    /// The network fails: the connection is gone without a close handshake.
    pub fn drop_connection(&mut self, id: ConnId) {
        self.kill(id);
        if let Some(c) = self.conns.get_mut(&id) {
            c.out.clear();
        }
        self.dispatch();
    }

    /// The broker closes the connection (e.g. 320 CONNECTION_FORCED, as `rabbitmqctl
    /// close_connection` does). Its resources go at once.
    pub fn close_connection(&mut self, id: ConnId, code: u16, text: &str) {
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        if !matches!(conn.state, ConnState::Open) {
            return;
        }
        self.send_method(
            id,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: code,
                reply_text: short(text),
                class_id: 0,
                method_id: 0,
            })),
        );
        self.release_connection(id);
        if let Some(c) = self.conns.get_mut(&id) {
            c.state = ConnState::Closing;
        }
        self.dispatch();
    }

    /// The broker closes one channel (a soft error), requeueing its unacked deliveries.
    pub fn close_channel(&mut self, id: ConnId, ch: u16, code: u16, text: &str) {
        self.channel_error(id, ch, code, text);
        self.dispatch();
    }

    /// A resource alarm: `connection.blocked` to the client (RabbitMQ "Blocked Connection
    /// Notifications"). The broker keeps reading here; the client is expected to hold back.
    pub fn block(&mut self, id: ConnId, reason: &str) {
        self.send_method(
            id,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                reason: short(reason),
            })),
        );
    }

    /// The alarm cleared: `connection.unblocked`.
    pub fn unblock(&mut self, id: ConnId) {
        self.send_method(
            id,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
        );
    }

    /// Fault: the connection dies right after the broker routed its next publish; whatever the
    /// client sent after that publish in the same write is lost (a server killed between its
    /// reply and its ack).
    pub fn die_after_next_publish(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.die_after_publish = true;
        }
    }

    /// Fault: publisher confirms to `id` are held back until [`Broker::release_confirms`]; a
    /// channel that closes meanwhile never sends its held ones.
    pub fn hold_confirms(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.hold_confirms = true;
        }
    }

    /// Sends the confirms held back for `id`, channel by channel, and stops holding them.
    pub fn release_confirms(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.hold_confirms = false;
        let held: Vec<(u16, Vec<(u64, bool)>)> = conn
            .channels
            .iter_mut()
            .filter(|(_, c)| !c.closing)
            .map(|(ch, c)| (*ch, std::mem::take(&mut c.held_confirms)))
            .collect();
        for (ch, confirms) in held {
            for (seq, acked) in confirms {
                self.send_confirm(id, ch, seq, acked);
            }
        }
    }

    /// Channels of `id` that are open (not closing), in number order.
    pub fn open_channels(&self, id: ConnId) -> Vec<u16> {
        self.channels_where(id, |_| true)
    }

    /// Channels of `id` that have a consumer (for a client: its reply channel).
    pub fn consumer_channels(&self, id: ConnId) -> Vec<u16> {
        self.channels_where(id, |ch| {
            !ch.consumers.is_empty() || ch.direct_reply.is_some()
        })
    }

    /// The numbers of `id`'s open channels that `keep` accepts.
    fn channels_where(&self, id: ConnId, keep: impl Fn(&Chan) -> bool) -> Vec<u16> {
        self.conns.get(&id).map_or_else(Vec::new, |c| {
            c.channels
                .iter()
                .filter(|(_, ch)| !ch.closing && keep(ch))
                .map(|(n, _)| *n)
                .collect()
        })
    }

    /// Where replies to connection `id` can be sent now: its direct reply-to addresses and the
    /// exclusive queues it consumes.
    pub fn reply_addresses(&self, id: ConnId) -> Vec<String> {
        let Some(conn) = self.conns.get(&id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (n, ch) in &conn.channels {
            if ch.closing {
                continue;
            }
            if ch.direct_reply.is_some() {
                out.push(direct_address(id, *n));
            }
            for c in ch.consumers.values() {
                if self
                    .queues
                    .get(&c.queue)
                    .is_some_and(|q| q.owner == Some(id))
                {
                    out.push(c.queue.clone());
                }
            }
        }
        out
    }

    /// Deliveries on `id` not acked yet.
    pub fn unacked(&self, id: ConnId) -> usize {
        self.conns
            .get(&id)
            .map_or(0, |c| c.channels.values().map(|ch| ch.unacked.len()).sum())
    }

    // -----------------------------------------------------------------------------------------
    // Queues and publishing from the test
    // -----------------------------------------------------------------------------------------

    /// Declares a plain queue from the test side.
    pub fn declare(&mut self, name: &str) {
        self.queues.entry(name.to_owned()).or_default();
    }

    /// Declares `name` (if needed) with `x-max-length` `max_length` and `x-overflow`
    /// `reject-publish`: a publish to it while it holds `max_length` messages is refused
    /// (RabbitMQ "Queue Length Limit").
    pub fn limit_queue(&mut self, name: &str, max_length: usize) {
        self.queues.entry(name.to_owned()).or_default().max_length = Some(max_length);
    }

    /// Deletes a queue; its consumers are cancelled (basic.cancel to their channels).
    pub fn delete(&mut self, name: &str) {
        let Some(q) = self.queues.remove(name) else {
            return;
        };
        for (conn, ch, tag) in q.consumers {
            let live = self
                .conns
                .get_mut(&conn)
                .and_then(|c| c.channels.get_mut(&ch))
                .map(|c| c.consumers.remove(&tag).is_some())
                .unwrap_or(false);
            if live {
                self.send_method(
                    conn,
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                        consumer_tag: short(&tag),
                        nowait: true,
                    })),
                );
            }
        }
    }

    /// Fails the test if any client misused the protocol (see [`Broker::violations`]).
    pub fn assert_no_violations(&self) {
        assert!(
            self.violations.is_empty(),
            "protocol violations: {:?}",
            self.violations
        );
    }

    /// Whether a queue of that name exists.
    pub fn queue_exists(&self, name: &str) -> bool {
        self.queues.contains_key(name)
    }

    /// Messages ready in a queue (not delivered).
    pub fn queue_len(&self, name: &str) -> usize {
        self.queues.get(name).map_or(0, |q| q.messages.len())
    }

    /// Consumers on a queue.
    pub fn consumer_count(&self, name: &str) -> usize {
        self.queues.get(name).map_or(0, |q| q.consumers.len())
    }

    /// Takes the first ready message off a queue (a test acting as a consumer).
    pub fn take(&mut self, name: &str) -> Option<Message> {
        self.queues.get_mut(name)?.messages.pop_front()
    }

    /// Publishes through the default exchange from the test side (a reply injected by hand).
    /// Returns whether it was routed.
    pub fn publish(&mut self, routing_key: &str, properties: BasicProperties, body: &[u8]) -> bool {
        let routing = self.route(Message {
            exchange: String::new(),
            routing_key: routing_key.to_owned(),
            properties,
            body: body.to_vec(),
            redelivered: false,
            expires_at: None,
            seq: 0,
        });
        self.dispatch();
        routing == Routing::Routed
    }

    /// Advances the broker's clock: messages past their TTL leave their queues.
    pub fn tick(&mut self, now: Instant) {
        self.now = Some(now);
        self.dispatch();
    }

    // -----------------------------------------------------------------------------------------
    // Frames from clients
    // -----------------------------------------------------------------------------------------

    fn on_frame(&mut self, id: ConnId, frame: AMQPFrame) {
        let Some(state) = self.conns.get(&id).map(|c| c.state) else {
            return;
        };
        match (state, frame) {
            (ConnState::AwaitHeader, AMQPFrame::ProtocolHeader(_)) => {
                self.send_method(id, 0, frames::start("PLAIN AMQPLAIN"));
                self.set_state(id, ConnState::AwaitStartOk);
            }
            (
                ConnState::AwaitStartOk,
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(_))),
            ) => {
                self.send_method(
                    id,
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                        channel_max: self.channel_max,
                        frame_max: FRAME_MAX,
                        heartbeat: 0,
                    })),
                );
                self.set_state(id, ConnState::AwaitTuneOk);
            }
            (
                ConnState::AwaitTuneOk,
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(_))),
            ) => {}
            (
                ConnState::AwaitTuneOk,
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Open(_))),
            ) => {
                self.send_method(
                    id,
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
                );
                self.set_state(id, ConnState::Open);
            }
            (ConnState::Closing, AMQPFrame::Method(0, AMQPClass::Connection(m))) => match m {
                connection::AMQPMethod::CloseOk(_) => self.set_state(id, ConnState::Dead),
                connection::AMQPMethod::Close(_) => {
                    self.send_method(
                        id,
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    );
                    self.set_state(id, ConnState::Dead);
                }
                _ => {}
            },
            (ConnState::Closing, _) => {}
            (ConnState::Open, AMQPFrame::Heartbeat) => {}
            (ConnState::Open, AMQPFrame::Method(0, AMQPClass::Connection(m))) => match m {
                connection::AMQPMethod::Close(_) => {
                    self.send_method(
                        id,
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    );
                    self.release_connection(id);
                    self.set_state(id, ConnState::Dead);
                }
                other => self.connection_error(id, 503, &format!("unexpected {other:?}")),
            },
            (ConnState::Open, AMQPFrame::Method(ch, method)) if ch != 0 => {
                self.on_channel_method(id, ch, method)
            }
            (ConnState::Open, AMQPFrame::Header(ch, header)) => self.on_header(id, ch, header),
            (ConnState::Open, AMQPFrame::Body(ch, body)) => self.on_body(id, ch, body),
            (state, frame) => {
                self.violations
                    .push(format!("{id:?}: unexpected frame in {state:?}: {frame:?}"));
                self.connection_error(id, 505, "unexpected frame");
            }
        }
    }

    fn on_channel_method(&mut self, id: ConnId, ch: u16, method: AMQPClass) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let state = conn
            .channels
            .get(&ch)
            .map(|c| (c.closing, c.publish.is_some()));
        match state {
            Some((true, _)) => {
                // We closed it: only close-ok (or a crossing close) matters now.
                match method {
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                        conn.channels.remove(&ch);
                    }
                    AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                        self.send_method(id, ch, channel_close_ok());
                    }
                    _ => {}
                }
                return;
            }
            Some((false, true)) => {
                self.violations
                    .push(format!("{id:?}: method inside content on {ch}"));
                return self.connection_error(id, 505, "method inside content");
            }
            _ => {}
        }
        let open = state.is_some();
        match method {
            AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                if open {
                    return self.connection_error(id, 504, "channel already open");
                }
                // RabbitMQ closes the connection for a channel number above the negotiated
                // channel_max (530 NOT_ALLOWED).
                if ch > self.channel_max {
                    self.violations
                        .push(format!("{id:?}: channel {ch} above channel_max"));
                    return self.connection_error(id, 530, "channel number above channel_max");
                }
                if let Some(c) = self.conns.get_mut(&id) {
                    c.channels.insert(ch, Chan::default());
                }
                self.send_method(
                    id,
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                );
            }
            _ if !open => {
                self.violations
                    .push(format!("{id:?}: method on unopened channel {ch}"));
                self.connection_error(id, 504, "channel not open");
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                self.release_channel(id, ch);
                if let Some(c) = self.conns.get_mut(&id) {
                    c.channels.remove(&ch);
                }
                self.send_method(id, ch, channel_close_ok());
            }
            AMQPClass::Basic(basic::AMQPMethod::Qos(qos)) => {
                if let Some(c) = self.chan(id, ch) {
                    c.prefetch = qos.prefetch_count;
                }
                self.send_method(
                    id,
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => self.on_declare(id, ch, d),
            // Only the default exchange and the `amq.*` ones exist; a passive declare of any
            // other gets RabbitMQ's 404.
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(d)) => {
                let name = d.exchange.to_string();
                if name.is_empty() || name.starts_with("amq.") {
                    self.send_method(
                        id,
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                } else {
                    let text = format!("NOT_FOUND - no exchange '{name}' in vhost '/'");
                    self.channel_error(id, ch, 404, &text);
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => self.on_consume(id, ch, c),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                if let Some(c) = self.chan(id, ch) {
                    c.confirm.get_or_insert(0);
                }
                if !select.nowait {
                    self.send_method(id, ch, frames::select_ok());
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => {
                let tag = c.consumer_tag.to_string();
                self.remove_consumer(id, ch, &tag);
                if !c.nowait {
                    self.send_method(
                        id,
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        })),
                    );
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => {
                if let Some(c) = self.chan(id, ch) {
                    c.publish = Some(PendingPublish {
                        exchange: p.exchange.to_string(),
                        routing_key: p.routing_key.to_string(),
                        mandatory: p.mandatory,
                        header: None,
                        body: Vec::new(),
                    });
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                self.acks.push((id, ch, a.delivery_tag));
                self.settle(id, ch, a.delivery_tag, a.multiple, Settle::Ack)
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(n)) => self.settle(
                id,
                ch,
                n.delivery_tag,
                n.multiple,
                Settle::Reject { requeue: n.requeue },
            ),
            AMQPClass::Basic(basic::AMQPMethod::Reject(r)) => self.settle(
                id,
                ch,
                r.delivery_tag,
                false,
                Settle::Reject { requeue: r.requeue },
            ),
            other => {
                self.violations
                    .push(format!("{id:?}: unsupported method on {ch}: {other:?}"));
                self.channel_error(id, ch, 540, "not implemented by the test broker");
            }
        }
    }

    fn on_declare(&mut self, id: ConnId, ch: u16, d: queue::Declare) {
        let mut name = d.queue.to_string();
        if let Some(q) = self.queues.get(&name) {
            if q.owner.is_some_and(|o| o != id) {
                return self.channel_error(id, ch, 405, "exclusive queue of another connection");
            }
        } else if d.passive {
            return self.channel_error(id, ch, 404, &format!("no queue '{name}'"));
        } else {
            if name.is_empty() {
                self.next_name += 1;
                name = format!("amq.gen-{}", self.next_name);
            }
            self.queues.insert(
                name.clone(),
                Queue {
                    owner: d.exclusive.then_some(id),
                    auto_delete: d.auto_delete,
                    ..Queue::default()
                },
            );
        }
        let q = &self.queues[&name];
        let ok = queue::DeclareOk {
            queue: short(&name),
            message_count: q.messages.len() as u32,
            consumer_count: q.consumers.len() as u32,
        };
        if !d.nowait {
            self.send_method(id, ch, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)));
        }
    }

    fn on_consume(&mut self, id: ConnId, ch: u16, c: basic::Consume) {
        let queue = c.queue.to_string();
        let mut tag = c.consumer_tag.to_string();
        if tag.is_empty() {
            self.next_name += 1;
            tag = format!("amq.ctag-{}", self.next_name);
        }
        if queue == DIRECT_REPLY_TO {
            if !c.no_ack {
                return self.channel_error(id, ch, 406, "reply consumer cannot acknowledge");
            }
            let Some(chan) = self.chan(id, ch) else {
                return;
            };
            if chan.direct_reply.is_some() {
                return self.channel_error(id, ch, 406, "reply consumer already set");
            }
            chan.direct_reply = Some(tag.clone());
        } else {
            match self.queues.get(&queue) {
                None => return self.channel_error(id, ch, 404, &format!("no queue '{queue}'")),
                Some(q) if q.owner.is_some_and(|o| o != id) => {
                    return self.channel_error(id, ch, 405, "exclusive queue of another connection")
                }
                Some(_) => {}
            }
            let Some(chan) = self.chan(id, ch) else {
                return;
            };
            if chan.consumers.contains_key(&tag) {
                return self.connection_error(id, 530, "duplicate consumer tag");
            }
            chan.consumers.insert(
                tag.clone(),
                Consumer {
                    queue: queue.clone(),
                    no_ack: c.no_ack,
                },
            );
            if let Some(q) = self.queues.get_mut(&queue) {
                q.consumers.push((id, ch, tag.clone()));
            }
        }
        if !c.nowait {
            self.send_method(
                id,
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                })),
            );
        }
    }

    fn on_header(&mut self, id: ConnId, ch: u16, header: AMQPContentHeader) {
        let Some(chan) = self.chan(id, ch) else {
            return;
        };
        if chan.closing {
            return;
        }
        match chan.publish.as_mut() {
            Some(p) if p.header.is_none() => {
                p.header = Some((header.body_size, header.properties));
            }
            _ => {
                self.violations
                    .push(format!("{id:?}: stray content header on {ch}"));
                return self.connection_error(id, 505, "content header without publish");
            }
        }
        self.maybe_finish_publish(id, ch);
    }

    fn on_body(&mut self, id: ConnId, ch: u16, body: Vec<u8>) {
        let Some(chan) = self.chan(id, ch) else {
            return;
        };
        if chan.closing {
            return;
        }
        match chan.publish.as_mut() {
            Some(p) if p.header.is_some() => p.body.extend_from_slice(&body),
            _ => {
                self.violations.push(format!("{id:?}: stray body on {ch}"));
                return self.connection_error(id, 505, "body without header");
            }
        }
        self.maybe_finish_publish(id, ch);
    }

    fn maybe_finish_publish(&mut self, id: ConnId, ch: u16) {
        let Some(chan) = self.chan(id, ch) else {
            return;
        };
        let done = chan.publish.as_ref().is_some_and(|p| {
            p.header
                .as_ref()
                .is_some_and(|(size, _)| p.body.len() as u64 >= *size)
        });
        if !done {
            return;
        }
        let Some(p) = chan.publish.take() else {
            return;
        };
        let direct_reply = chan.direct_reply.is_some();
        let (size, mut properties) = p.header.expect("checked above");
        if p.body.len() as u64 != size {
            self.violations
                .push(format!("{id:?}: body longer than announced on {ch}"));
            return self.connection_error(id, 501, "body too long");
        }
        // RabbitMQ checks the announced body size against `max_message_size` and closes the
        // channel (rabbit_channel's `check_msg_size`).
        if size > self.max_message_size {
            let text = format!(
                "PRECONDITION_FAILED - message size {size} is larger than configured max size {}",
                self.max_message_size
            );
            return self.channel_error(id, ch, 406, &text);
        }
        // RabbitMQ validates per-message TTL: a non-negative integer of at most 2^32 - 1 ms
        // (`check_expiry`, `?MAX_EXPIRY_TIMER`), else PRECONDITION_FAILED on the channel.
        if let Some(e) = properties.expiration() {
            if e.as_str()
                .parse::<u64>()
                .map_or(true, |ms| ms > u64::from(u32::MAX))
            {
                self.violations.push(format!(
                    "{id:?}: invalid expiration {:?} on {ch}",
                    e.as_str()
                ));
                return self.channel_error(id, ch, 406, "invalid expiration");
            }
        }
        if !p.exchange.is_empty() {
            return self.channel_error(id, ch, 404, &format!("no exchange '{}'", p.exchange));
        }
        if properties
            .reply_to()
            .as_ref()
            .is_some_and(|r| r.as_str() == DIRECT_REPLY_TO)
        {
            if !direct_reply {
                return self.channel_error(id, ch, 406, "fast reply consumer does not exist");
            }
            properties = properties.with_reply_to(short(&direct_address(id, ch)));
        }
        let message = Message {
            exchange: p.exchange.clone(),
            routing_key: p.routing_key.clone(),
            properties: properties.clone(),
            body: p.body.clone(),
            redelivered: false,
            expires_at: None,
            seq: 0,
        };
        let mut routing = self.route(message);
        if routing == Routing::DeadDirectAddress {
            if self.crash_on_dead_direct_reply_to {
                return self.connection_error(id, 541, "INTERNAL_ERROR");
            }
            routing = Routing::Unroutable;
        }
        let routed = routing == Routing::Routed;
        if routing == Routing::Unroutable && p.mandatory {
            self.returned += 1;
            self.send_method(
                id,
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: 312,
                    reply_text: short("NO_ROUTE"),
                    exchange: short(&p.exchange),
                    routing_key: short(&p.routing_key),
                })),
            );
            self.send_content(id, ch, &properties, &p.body);
        } else if !routed {
            self.dropped += 1;
        }
        // In confirm mode every publish is confirmed, after its return if it had one; a
        // publish a full `reject-publish` queue refused is nacked (RabbitMQ "Publisher
        // Confirms", "Queue Length Limit").
        let seq = self.chan(id, ch).and_then(|c| {
            let seq = c.confirm.as_mut()?;
            *seq += 1;
            Some(*seq)
        });
        if let Some(seq) = seq {
            let acked = routing != Routing::Refused;
            if self.conns.get(&id).is_some_and(|c| c.hold_confirms) {
                if let Some(c) = self.chan(id, ch) {
                    c.held_confirms.push((seq, acked));
                }
            } else {
                self.send_confirm(id, ch, seq, acked);
            }
        }
        if self.conns.get(&id).is_some_and(|c| c.die_after_publish) {
            self.kill(id);
            if let Some(c) = self.conns.get_mut(&id) {
                c.out.clear();
                c.inbuf.clear();
            }
        }
    }

    fn send_confirm(&mut self, id: ConnId, ch: u16, seq: u64, acked: bool) {
        self.confirms.push((id, ch, seq, acked));
        let method = if acked {
            frames::ack(seq, false)
        } else {
            frames::nack(seq, false)
        };
        self.send_method(id, ch, method);
    }

    /// Puts a message where its routing key says.
    fn route(&mut self, mut message: Message) -> Routing {
        if let Some(address) = direct_address_parts(&message.routing_key) {
            let Some((conn, ch)) = address else {
                return Routing::DeadDirectAddress;
            };
            // A direct reply goes straight to the consumer, never through a queue.
            let tag = self
                .conns
                .get(&conn)
                .filter(|c| c.state == ConnState::Open)
                .and_then(|c| c.channels.get(&ch))
                .filter(|c| !c.closing)
                .and_then(|c| c.direct_reply.clone());
            let Some(tag) = tag else {
                return Routing::DeadDirectAddress;
            };
            self.deliver(conn, ch, &tag, None, message);
            return Routing::Routed;
        }
        let now = self.now;
        self.next_seq += 1;
        message.seq = self.next_seq;
        let Some(q) = self.queues.get_mut(&message.routing_key) else {
            return Routing::Unroutable;
        };
        if q.max_length.is_some_and(|max| q.messages.len() >= max) {
            return Routing::Refused;
        }
        message.expires_at = message
            .properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok())
            .zip(now)
            .map(|(ms, now)| now + Duration::from_millis(ms));
        q.messages.push_back(message);
        Routing::Routed
    }

    // -----------------------------------------------------------------------------------------
    // Delivery and settlement
    // -----------------------------------------------------------------------------------------

    /// Hands ready messages to consumers with room in their prefetch window, round robin.
    fn dispatch(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            while let Some(q) = self.queues.get_mut(&name) {
                // TTL: expired messages at the head are dropped (RabbitMQ drops at the head).
                while let (Some(m), Some(now)) = (q.messages.front(), now) {
                    if m.expires_at.is_some_and(|at| at <= now) {
                        q.messages.pop_front();
                        self.dropped += 1;
                    } else {
                        break;
                    }
                }
                if q.messages.is_empty() || q.consumers.is_empty() {
                    break;
                }
                let n = q.consumers.len();
                let mut target = None;
                for i in 0..n {
                    let k = (q.next + i) % n;
                    let (conn, ch, tag) = &q.consumers[k];
                    let room = self
                        .conns
                        .get(conn)
                        .filter(|c| c.state == ConnState::Open)
                        .and_then(|c| c.channels.get(ch))
                        .is_some_and(|c| {
                            !c.closing
                                && (c.prefetch == 0 || c.unacked.len() < usize::from(c.prefetch))
                        });
                    if room {
                        target = Some((k, *conn, *ch, tag.clone()));
                        break;
                    }
                }
                let Some((k, conn, ch, tag)) = target else {
                    break;
                };
                q.next = k + 1;
                let message = q.messages.pop_front().expect("checked non-empty");
                self.deliver(conn, ch, &tag, Some(name.clone()), message);
            }
        }
    }

    /// Sends `basic.deliver` with content; tracks it for an ack unless the consumer is no-ack
    /// (`queue` is `None` for direct reply-to, which is always no-ack).
    fn deliver(&mut self, id: ConnId, ch: u16, tag: &str, queue: Option<String>, message: Message) {
        let Some(chan) = self.chan(id, ch) else {
            return;
        };
        chan.next_tag += 1;
        let delivery_tag = chan.next_tag;
        let no_ack = match &queue {
            None => true,
            Some(_) => chan.consumers.get(tag).is_none_or(|c| c.no_ack),
        };
        if let (false, Some(q)) = (no_ack, &queue) {
            chan.unacked
                .insert(delivery_tag, (q.clone(), message.clone()));
        }
        self.send_method(
            id,
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: short(tag),
                delivery_tag,
                redelivered: message.redelivered,
                exchange: short(&message.exchange),
                routing_key: short(&message.routing_key),
            })),
        );
        self.send_content(id, ch, &message.properties, &message.body);
    }

    fn settle(&mut self, id: ConnId, ch: u16, tag: u64, multiple: bool, how: Settle) {
        let Some(chan) = self.chan(id, ch) else {
            return;
        };
        // RabbitMQ looks the named tag up even with `multiple` (rabbit_channel collect_acks):
        // a multiple ack naming a tag it no longer holds is an unknown tag too.
        let named_unknown = tag != 0 && !chan.unacked.contains_key(&tag);
        let tags: Vec<u64> = if named_unknown {
            Vec::new()
        } else if multiple {
            chan.unacked
                .range(..=if tag == 0 { u64::MAX } else { tag })
                .map(|(t, _)| *t)
                .collect()
        } else if chan.unacked.contains_key(&tag) {
            vec![tag]
        } else {
            Vec::new()
        };
        if tags.is_empty() {
            // RabbitMQ: PRECONDITION_FAILED - unknown delivery tag.
            self.violations.push(format!(
                "{id:?}: {how:?} of unknown delivery tag {tag} on channel {ch}"
            ));
            return self.channel_error(id, ch, 406, &format!("unknown delivery tag {tag}"));
        }
        let mut requeue = Vec::new();
        for t in tags {
            if let Some((queue, message)) = chan.unacked.remove(&t) {
                if how == (Settle::Reject { requeue: true }) {
                    requeue.push((queue, message));
                }
            }
        }
        self.requeue(requeue);
    }

    /// Puts messages back at the head of their queues, in their original order, flagged
    /// redelivered.
    fn requeue(&mut self, messages: Vec<(String, Message)>) {
        for (queue, mut message) in messages {
            message.redelivered = true;
            if let Some(q) = self.queues.get_mut(&queue) {
                let at = q.messages.partition_point(|m| m.seq < message.seq);
                q.messages.insert(at, message);
            } else {
                self.dropped += 1;
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Teardown
    // -----------------------------------------------------------------------------------------

    fn remove_consumer(&mut self, id: ConnId, ch: u16, tag: &str) {
        let Some(chan) = self.chan(id, ch) else {
            return;
        };
        if chan.direct_reply.as_deref() == Some(tag) {
            chan.direct_reply = None;
            return;
        }
        let Some(consumer) = chan.consumers.remove(tag) else {
            return;
        };
        let Some(q) = self.queues.get_mut(&consumer.queue) else {
            return;
        };
        q.consumers
            .retain(|(c, h, t)| !(*c == id && *h == ch && t == tag));
        if q.auto_delete && q.consumers.is_empty() {
            self.queues.remove(&consumer.queue);
        }
    }

    /// Cancels a channel's consumers and requeues its unacked deliveries.
    fn release_channel(&mut self, id: ConnId, ch: u16) {
        let Some(chan) = self.chan(id, ch) else {
            return;
        };
        let tags: Vec<String> = chan.consumers.keys().cloned().collect();
        chan.direct_reply = None;
        chan.publish = None;
        chan.held_confirms.clear();
        let unacked: Vec<(String, Message)> =
            std::mem::take(&mut chan.unacked).into_values().collect();
        for tag in tags {
            self.remove_consumer(id, ch, &tag);
        }
        self.requeue(unacked);
    }

    fn release_connection(&mut self, id: ConnId) {
        let channels: Vec<u16> = self
            .conns
            .get(&id)
            .map(|c| c.channels.keys().copied().collect())
            .unwrap_or_default();
        for ch in channels {
            self.release_channel(id, ch);
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.channels.clear();
        }
        self.queues.retain(|_, q| q.owner != Some(id));
    }

    fn kill(&mut self, id: ConnId) {
        self.release_connection(id);
        self.set_state(id, ConnState::Dead);
    }

    fn channel_error(&mut self, id: ConnId, ch: u16, code: u16, text: &str) {
        if self.chan(id, ch).is_none_or(|c| c.closing) {
            return;
        }
        self.release_channel(id, ch);
        if let Some(c) = self.chan(id, ch) {
            c.closing = true;
        }
        self.send_method(
            id,
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: code,
                reply_text: short(text),
                class_id: 0,
                method_id: 0,
            })),
        );
    }

    fn connection_error(&mut self, id: ConnId, code: u16, text: &str) {
        if self
            .conns
            .get(&id)
            .is_some_and(|c| c.state == ConnState::Open)
        {
            self.close_connection(id, code, text);
        } else {
            self.kill(id);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Output
    // -----------------------------------------------------------------------------------------

    fn chan(&mut self, id: ConnId, ch: u16) -> Option<&mut Chan> {
        self.conns.get_mut(&id)?.channels.get_mut(&ch)
    }

    fn set_state(&mut self, id: ConnId, state: ConnState) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.state = state;
        }
    }

    fn send_method(&mut self, id: ConnId, ch: u16, method: AMQPClass) {
        self.send_bytes(id, &frames::method(ch, method));
    }

    fn send_content(&mut self, id: ConnId, ch: u16, properties: &BasicProperties, body: &[u8]) {
        let size = body.len() as u64;
        self.send_bytes(id, &frames::content(ch, properties, size, body, FRAME_MAX));
    }

    fn send_bytes(&mut self, id: ConnId, bytes: &[u8]) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.state == ConnState::Dead {
            return;
        }
        conn.out.extend_from_slice(bytes);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Reject { requeue: bool },
}

fn channel_close_ok() -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))
}

fn short(s: &str) -> ShortString {
    ShortString::try_new(s).expect("test strings are short")
}

/// The node name in the pids of [`direct_address`].
const SIM_NODE: &[u8] = b"sim@broker";

/// The direct reply-to address of a channel, shaped as RabbitMQ 3.10 shapes it:
/// `amq.rabbitmq.reply-to.<base64 of the channel's pid>.<key>`, the pid in the Erlang external
/// term format (`NEW_PID_EXT` on node `sim@broker`, id = connection, serial = channel).
fn direct_address(id: ConnId, ch: u16) -> String {
    let mut term = vec![131, 88, 118];
    term.extend_from_slice(&(SIM_NODE.len() as u16).to_be_bytes());
    term.extend_from_slice(SIM_NODE);
    term.extend_from_slice(&(id.0 as u32).to_be_bytes());
    term.extend_from_slice(&u32::from(ch).to_be_bytes());
    term.extend_from_slice(&0u32.to_be_bytes());
    format!("{DIRECT_REPLY_TO}.{}.k{ch}", base64_encode(&term))
}

/// `None`: not a direct address the broker decodes (routed as a queue name, to nowhere);
/// `Some(None)`: one it tries to decode and cannot (a dead or forged address); else the
/// connection and channel. RabbitMQ splits the suffix at dots, empty parts not counted
/// (Erlang's `string:tokens`), and decodes only a suffix of exactly two parts.
fn direct_address_parts(key: &str) -> Option<Option<(ConnId, u16)>> {
    let rest = key.strip_prefix(DIRECT_REPLY_TO)?.strip_prefix('.')?;
    let mut parts = rest.split('.').filter(|p| !p.is_empty());
    let (Some(pid), Some(_), None) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let decode = || {
        let term = base64_decode(pid)?;
        let rest = term.strip_prefix(&[131, 88, 118][..])?;
        let rest = rest.strip_prefix(&(SIM_NODE.len() as u16).to_be_bytes()[..])?;
        let rest = rest.strip_prefix(SIM_NODE)?;
        let [a, b, c, d, e, f, g, h, 0, 0, 0, 0] = *rest else {
            return None;
        };
        let ch = u16::try_from(u32::from_be_bytes([e, f, g, h])).ok()?;
        Some((ConnId(u32::from_be_bytes([a, b, c, d]).into()), ch))
    };
    Some(decode())
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, &b| (n << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::new();
    for chunk in text.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | BASE64.iter().position(|&b| b == c)? as u32;
        }
        n <<= 6 * pad;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

/// Length of the first whole frame in `buf` (8 for the protocol header), if it is all there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    if buf.first() == Some(&b'A') {
        return (buf.len() >= 8).then_some(8);
    }
    if buf.len() < 7 {
        return None;
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    (buf.len() >= size + 8).then_some(size + 8)
}
