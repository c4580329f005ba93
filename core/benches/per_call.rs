//! The core's own CPU cost per call, no I/O: what the client and the server machines do with one
//! request and one reply, against amq-protocol's own encoder and parser on the same frames.
//! `cargo bench -p amqp-rpc-core --bench per_call` (`scripts/bench-core.sh` prints the medians).
//!
//! Each machine is connected through the simulation broker (handshake, reply path, consumer),
//! then the benchmark plays the broker itself: it feeds the machine the frames RabbitMQ would
//! send and reads what the machine writes, so the simulation's own costs are not measured.
//! Only the machines' stable entry points are used: `call`, `poll_request`, `reply`,
//! `handle_input`, `poll_event`, `poll_transmit`.
//!
//! - client: encode one request: `RpcClient::call` + `poll_transmit` (basic.publish + content
//!   header + body frames, with correlation id, reply_to, expiration, x-rpc-deadline).
//! - client: handle one reply: `handle_input` of the request's publisher confirm (basic.ack)
//!   and basic.deliver + header + body, then `poll_event` until the call's `CallEnded`.
//! - connection: decode one delivery: `Connection::handle_input` of the same three frames into
//!   `Event::Delivery`.
//! - server: one request: `handle_input` of a request's three frames, `poll_request`, `reply`,
//!   `poll_transmit` (the reply's three frames + basic.ack).
//! - amq-protocol: `parse_frame` over the same delivery bytes; `gen_frame` of the same request
//!   frames the client wrote.
//!
//! The parts timed inside a cycle are timed with `Instant` around each part (`iter_custom`);
//! building the next frames with amq-protocol (what the broker would send) is not timed.

// A benchmark's setup may unwrap: a failure is a broken benchmark, not a user's input. It
// reads the clock to time the parts of a cycle; the machines still get time as an argument.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    missing_docs
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, AMQPClass};
use amqp_rpc_core::rpc::{CallRequest, ClientEvent, ReplyMode, RpcClient, RpcServer, UnixMillis};
use amqp_rpc_core::types::BasicProperties;
use amqp_rpc_core::types::ShortString;
use amqp_rpc_core::{Connection, ConsumeOptions, Event};
use amqp_rpc_sim::broker::Broker;
use amqp_rpc_sim::frames;
use amqp_rpc_sim::rpc::{
    base_instant, client_config, conn_config, server_config, settle, sim_key, wall, Wire,
};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};

const Q: &str = "bench-rpc";
const FRAME_MAX: u32 = 131_072;
/// The request of the README's bench: fib(30).
const REQUEST_BODY: &[u8] = b"30";
const REPLY_BODY: &[u8] = b"832040";

/// Every frame in `bytes`, parsed by amq-protocol.
fn parse_all(mut bytes: &[u8]) -> Vec<AMQPFrame> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, frame) = parse_frame(bytes).expect("whole frames");
        out.push(frame);
        bytes = rest;
    }
    out
}

/// What a consumer's deliveries carry: its channel and consumer tag.
#[derive(Clone)]
struct Consumer {
    channel: u16,
    tag: String,
}

/// The consumer of the first basic.deliver among `frames`.
fn consumer_of(frames: &[AMQPFrame]) -> Consumer {
    frames
        .iter()
        .find_map(|f| match f {
            AMQPFrame::Method(channel, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                Some(Consumer {
                    channel: *channel,
                    tag: d.consumer_tag.to_string(),
                })
            }
            _ => None,
        })
        .expect("a basic.deliver")
}

/// The properties of the first content header among `frames`.
fn properties_of(frames: &[AMQPFrame]) -> BasicProperties {
    frames
        .iter()
        .find_map(|f| match f {
            AMQPFrame::Header(_, h) => Some(h.properties.clone()),
            _ => None,
        })
        .expect("a content header")
}

/// basic.deliver + content header + body, as RabbitMQ sends them (encoded by amq-protocol).
fn delivery(consumer: &Consumer, tag: u64, properties: &BasicProperties, body: &[u8]) -> Vec<u8> {
    let mut out = frames::method(
        consumer.channel,
        frames::deliver(&consumer.tag, tag, false, "", Q),
    );
    out.extend(frames::content(
        consumer.channel,
        properties,
        body.len() as u64,
        body,
        FRAME_MAX,
    ));
    out
}

/// A client and a server connected through the simulation broker, after a few calls.
struct Pair {
    now: Instant,
    wall: UnixMillis,
    client: RpcClient,
    server: RpcServer,
    /// The client's reply consumer.
    replies: Consumer,
    /// The server's request consumer.
    requests: Consumer,
    /// A request as the server received it (reply_to, expiration, deadline header...).
    request_properties: BasicProperties,
    /// The last delivery tag each consumer saw.
    reply_tag: u64,
    request_tag: u64,
    /// The publishing channel (in confirm mode) and the sequence number of its last publish:
    /// each reply comes after the broker's `basic.ack` of its request, as from RabbitMQ.
    publish_channel: u16,
    publish_seq: u64,
    /// The server's reply channel (in confirm mode) and the last sequence number published
    /// on it: each reply's confirm is fed back, as RabbitMQ sends it, before its ack is due.
    reply_channel: u16,
    reply_seq: u64,
}

impl Pair {
    fn new(mode: ReplyMode) -> Self {
        let base = base_instant();
        let now = base;
        let wall = wall(base, now);
        let mut broker = Broker::new();
        broker.declare(Q);
        let mut client = Wire::new(
            RpcClient::new(client_config(mode), conn_config(), sim_key(), base),
            &mut broker,
        );
        let mut server = Wire::new(
            RpcServer::new(server_config(Q, 64), conn_config(), base),
            &mut broker,
        );
        settle(&mut broker, now, &mut [&mut client, &mut server]);
        assert!(client.m.is_ready() && server.m.is_serving(), "sim setup");
        // Two calls through the simulation, so that every probe (the queue's consumer count)
        // and cache is warm ...
        for _ in 0..2 {
            let request = CallRequest::new(Q, REQUEST_BODY, Duration::from_secs(30));
            client.m.call(now, wall, request).unwrap();
            for _ in 0..10 {
                settle(&mut broker, now, &mut [&mut client, &mut server]);
                while let Some(request) = server.m.poll_request(now, wall) {
                    server
                        .m
                        .reply(now, request.token, Ok(Bytes::from_static(REPLY_BODY)));
                }
            }
            let ended = std::iter::from_fn(|| client.m.poll_event())
                .any(|e| matches!(e, ClientEvent::CallEnded { result: Ok(_), .. }));
            assert!(ended, "warm-up call answered");
        }
        // ... then one by hand, to see what each side receives.
        let mut last = None;
        for _ in 0..1 {
            let request = CallRequest::new(Q, REQUEST_BODY, Duration::from_secs(30));
            client.m.call(now, wall, request).unwrap();
            let mut buf = Vec::new();
            client.m.poll_transmit(now, &mut buf);
            broker.feed(client.conn, now, &buf);
            let to_server = broker.take_output(server.conn);
            server.m.handle_input(now, &to_server);
            let request = server.m.poll_request(now, wall).expect("a request");
            server
                .m
                .reply(now, request.token, Ok(Bytes::from_static(REPLY_BODY)));
            buf.clear();
            // The ack goes out at the end of the turn, after the reply.
            server.m.poll_transmit(now, &mut buf);
            broker.feed(server.conn, now, &buf);
            let to_client = broker.take_output(client.conn);
            client.m.handle_input(now, &to_client);
            // The reply's confirm: its request's ack goes out now.
            let confirm = broker.take_output(server.conn);
            server.m.handle_input(now, &confirm);
            let ended = std::iter::from_fn(|| client.m.poll_event())
                .any(|e| matches!(e, ClientEvent::CallEnded { result: Ok(_), .. }));
            assert!(ended, "warm-up call answered");
            last = Some((parse_all(&to_server), parse_all(&to_client)));
        }
        let (to_server, to_client) = last.unwrap();
        // Three requests so far on the publishing channel, each confirmed by the broker.
        let confirms: Vec<u16> = broker
            .confirms
            .iter()
            .filter(|&&(conn, _, _, acked)| conn == client.conn && acked)
            .map(|&(_, channel, _, _)| channel)
            .collect();
        let publish_channel = *confirms.last().expect("requests are confirmed");
        let publish_seq = confirms.len() as u64;
        let tag_of = |frames: &[AMQPFrame]| {
            frames
                .iter()
                .find_map(|f| match f {
                    AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                        Some(d.delivery_tag)
                    }
                    _ => None,
                })
                .unwrap()
        };
        let (reply_channel, reply_seq) = broker
            .confirms
            .iter()
            .rev()
            .find(|(c, ..)| *c == server.conn)
            .map(|(_, ch, seq, _)| (*ch, *seq))
            .expect("the server's replies are confirmed");
        Self {
            now,
            wall,
            reply_channel,
            reply_seq,
            replies: consumer_of(&to_client),
            requests: consumer_of(&to_server),
            request_properties: properties_of(&to_server),
            reply_tag: tag_of(&to_client),
            request_tag: tag_of(&to_server),
            publish_channel,
            publish_seq,
            client: client.m,
            server: server.m,
        }
    }

    /// One call's request, encoded by the client into `buf` (cleared first).
    fn send(&mut self, buf: &mut Vec<u8>) {
        buf.clear();
        let request = CallRequest::new(Q, REQUEST_BODY, Duration::from_secs(30));
        black_box(self.client.call(self.now, self.wall, request).unwrap());
        self.client.poll_transmit(self.now, buf);
    }

    /// What RabbitMQ would send the client for the request in `sent`: the publish's
    /// `basic.ack`, then the reply.
    fn reply_for(&mut self, sent: &[u8]) -> Vec<u8> {
        let request = properties_of(&parse_all(sent));
        let properties = BasicProperties::default()
            .with_correlation_id(request.correlation_id().clone().unwrap());
        self.publish_seq += 1;
        let mut out = frames::method(self.publish_channel, frames::ack(self.publish_seq, false));
        self.reply_tag += 1;
        out.extend(delivery(
            &self.replies,
            self.reply_tag,
            &properties,
            REPLY_BODY,
        ));
        out
    }

    /// Feeds the client a reply and reads events until the call ended.
    fn answer(&mut self, reply: &[u8]) {
        self.client.handle_input(self.now, reply);
        while let Some(event) = self.client.poll_event() {
            if let ClientEvent::CallEnded { result, .. } = event {
                black_box(result.unwrap());
                return;
            }
        }
        panic!("the reply ended no call");
    }

    /// The next request as RabbitMQ would deliver it to the server (a new correlation id, the
    /// next delivery tag).
    fn next_request(&mut self, n: u64) -> Vec<u8> {
        let properties = self
            .request_properties
            .clone()
            .with_correlation_id(ShortString::from(format!("bench.{n}")));
        self.request_tag += 1;
        delivery(&self.requests, self.request_tag, &properties, REQUEST_BODY)
    }

    /// The server's work for one request: decode, hand out, reply, read its confirm, ack,
    /// encode.
    fn serve(&mut self, request: &[u8], buf: &mut Vec<u8>) {
        self.server.handle_input(self.now, request);
        let request = self.server.poll_request(self.now, self.wall).unwrap();
        self.server
            .reply(self.now, request.token, Ok(Bytes::from_static(REPLY_BODY)));
        self.reply_seq += 1;
        let confirm = frames::method(self.reply_channel, frames::ack(self.reply_seq, false));
        self.server.handle_input(self.now, &confirm);
        buf.clear();
        self.server.poll_transmit(self.now, buf);
        black_box(&buf);
    }
}

/// A bare connection consuming a queue with no_ack, after the handshake.
fn consuming_connection() -> (Connection, Consumer, Instant) {
    let base = base_instant();
    let mut broker = Broker::new();
    broker.declare(Q);
    let mut conn = Wire::new(Connection::new(conn_config(), base), &mut broker);
    settle(&mut broker, base, &mut [&mut conn]);
    let channel = conn.m.open_channel().unwrap();
    settle(&mut broker, base, &mut [&mut conn]);
    let mut options = ConsumeOptions::default();
    options.no_ack = true;
    conn.m
        .consume(channel, Q, "", options, Default::default())
        .unwrap();
    settle(&mut broker, base, &mut [&mut conn]);
    broker.publish(Q, BasicProperties::default(), REPLY_BODY);
    settle(&mut broker, base, &mut [&mut conn]);
    let delivery = std::iter::from_fn(|| conn.m.poll_event())
        .find_map(|e| match e {
            Event::Delivery(d) => Some(d),
            _ => None,
        })
        .expect("the published message");
    let consumer = Consumer {
        channel: delivery.channel.0,
        tag: delivery.consumer_tag,
    };
    (conn.m, consumer, base)
}

fn per_call(c: &mut Criterion) {
    let mut group = c.benchmark_group("per call");
    for (mode, name) in [
        (ReplyMode::ExclusiveQueue, "exclusive"),
        (ReplyMode::DirectReplyTo, "direct"),
    ] {
        let mut pair = Pair::new(mode);
        let mut buf = Vec::with_capacity(4096);
        group.bench_function(format!("client: encode one request ({name})"), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    pair.send(&mut buf);
                    timed += t.elapsed();
                    let reply = pair.reply_for(&buf);
                    pair.answer(&reply);
                }
                timed
            })
        });
        group.bench_function(format!("client: handle one reply ({name})"), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    pair.send(&mut buf);
                    let reply = pair.reply_for(&buf);
                    let t = Instant::now();
                    pair.answer(&reply);
                    timed += t.elapsed();
                }
                timed
            })
        });
    }

    let mut pair = Pair::new(ReplyMode::ExclusiveQueue);
    let mut buf = Vec::with_capacity(4096);
    let mut n = 0u64;
    group.bench_function("server: one request (decode, reply, ack, encode)", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let request = pair.next_request(n);
                let t = Instant::now();
                pair.serve(&request, &mut buf);
                timed += t.elapsed();
            }
            timed
        })
    });

    let (mut conn, consumer, now) = consuming_connection();
    let properties = pair.request_properties.clone();
    let mut tag = 1u64;
    group.bench_function(
        "connection: decode one delivery into Event::Delivery",
        |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    tag += 1;
                    let bytes = delivery(&consumer, tag, &properties, REQUEST_BODY);
                    let t = Instant::now();
                    conn.handle_input(now, &bytes);
                    black_box(conn.poll_event().unwrap());
                    timed += t.elapsed();
                }
                timed
            })
        },
    );

    // amq-protocol alone on the same bytes: the request delivery the server decodes above and
    // the request frames the client wrote.
    let request_delivery = delivery(&consumer, 7, &properties, REQUEST_BODY);
    group.bench_function(
        "amq-protocol: parse_frame of one delivery (3 frames)",
        |b| b.iter(|| black_box(parse_all(black_box(&request_delivery)))),
    );
    pair.send(&mut buf);
    let request_frames = parse_all(&buf);
    let reply = pair.reply_for(&buf);
    pair.answer(&reply);
    let mut out = Vec::with_capacity(4096);
    group.bench_function("amq-protocol: gen_frame of one request (3 frames)", |b| {
        b.iter(|| {
            out.clear();
            let mut w = WriteContext::from(std::mem::take(&mut out));
            for frame in &request_frames {
                w = gen_frame(frame)(w).unwrap();
            }
            out = w.into_inner().0;
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the numbers of interest are microseconds, and the machine is shared.
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = per_call
}
criterion_main!(benches);
