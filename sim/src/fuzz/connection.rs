//! Arbitrary server bytes fed to a client `Connection` after a valid handshake, in virtual time.
//!
//! Input layout: the first byte seeds a small PRNG that chooses how the rest is chunked, when
//! virtual time jumps forward (heartbeats, peer-dead and close timeouts) and when the
//! application issues a command between chunks; the rest is what the server sends. An even
//! first byte starts after the scripted prefix below; an odd one starts right after the
//! protocol header, so the rest is fed to the handshake. Checked: no panic; every byte the
//! client sends decodes as a valid frame within the negotiated frame_max; nothing follows
//! `Event::Closed`, which comes exactly once, at the latest when the stream ends.
//!
//! Scripted prefix: handshake (PLAIN, frame_max 131072, heartbeat 10 s), channel 1 open in
//! confirm mode with consumer "c" on queue "q" and three publishes in flight (seq 1..=3),
//! channel 2 opening with a queue.declare pipelined behind its channel.open.

use std::time::{Duration, Instant};

use amq_protocol::types::FieldTable;
use amqp_rpc_core::codec::FrameDecoder;
use amqp_rpc_core::types::BasicProperties;
use amqp_rpc_core::{
    ChannelId, Connection, ConnectionConfig, ConsumeOptions, DeliveryTag, Event, QueueOptions,
};
use bytes::BytesMut;

use crate::frames::{self, method};
use crate::{t0, xorshift};

/// Runs the `connection` scenario on one fuzz input.
pub fn connection(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let mut h = Harness::new(seed & 1 == 0);
    let mut rng = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rest = stream;
    while !rest.is_empty() {
        let r = xorshift(&mut rng);
        // Mostly small chunks (frame boundaries fall anywhere), sometimes everything at once.
        let n = if r.is_multiple_of(16) {
            rest.len()
        } else {
            1 + (r >> 8) as usize % 96
        }
        .min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        h.conn.handle_input(h.now, chunk);
        h.drain();
        match (r >> 20) % 8 {
            0 | 1 => {
                // 0 to 25 s: crosses the 5 s send and 20 s peer-dead heartbeat deadlines.
                h.now += Duration::from_millis((r >> 24) % 25_000);
                h.conn.handle_timeout(h.now);
            }
            2 => h.command(r >> 24),
            _ => {}
        }
        h.drain();
    }
    h.conn.handle_eof(h.now);
    h.drain();
    assert!(h.conn.is_closed(), "not closed after EOF");
    assert_eq!(h.conn.poll_timeout(), None);
    assert_eq!(h.closed_events, 1, "Event::Closed must come exactly once");
}

struct Harness {
    conn: Connection,
    now: Instant,
    /// Decodes what the client sends, to check it is well-formed.
    check: FrameDecoder,
    sent: BytesMut,
    closed_events: usize,
}

impl Harness {
    fn new(scripted_prefix: bool) -> Self {
        let now = t0();
        let mut config = ConnectionConfig::default();
        config.heartbeat = Duration::from_secs(10);
        // Small enough that a fuzzed header announcing a large body is skipped cheaply.
        config.max_body_size = 1 << 20;
        let mut conn = Connection::new(config, now);
        let mut header = Vec::new();
        conn.poll_transmit(now, &mut header);
        assert_eq!(&header[..], b"AMQP\x00\x00\x09\x01");
        let mut h = Harness {
            conn,
            now,
            check: FrameDecoder::new(),
            sent: BytesMut::new(),
            closed_events: 0,
        };
        if !scripted_prefix {
            return h;
        }
        // RabbitMQ's defaults but a 10 s heartbeat, and no server properties.
        let mut server = method(
            0,
            frames::start_with_properties("PLAIN AMQPLAIN", FieldTable::default()),
        );
        server.extend(method(0, frames::tune(2047, 131_072, 10)));
        server.extend(method(0, frames::open_ok()));
        h.conn.handle_input(now, &server);
        assert_eq!(h.conn.poll_event(), Some(Event::Connected));
        h.drain();

        let ch1 = h.conn.open_channel().expect("open channel 1");
        assert_eq!(ch1, ChannelId(1));
        h.conn.confirm_select(ch1).expect("confirm.select");
        h.conn
            .consume(
                ch1,
                "q",
                "c",
                ConsumeOptions::default(),
                FieldTable::default(),
            )
            .expect("consume");
        for _ in 0..3 {
            h.conn
                .publish(ch1, "", "q", true, &BasicProperties::default(), b"hi")
                .expect("publish");
        }
        let ch2 = h.conn.open_channel().expect("open channel 2");
        h.conn
            .declare_queue(ch2, "", QueueOptions::default(), FieldTable::default())
            .expect("declare");
        let mut server = method(1, frames::channel_open_ok());
        server.extend(method(1, frames::select_ok()));
        server.extend(method(1, frames::consume_ok("c")));
        h.conn.handle_input(now, &server);
        h.drain();
        assert!(h.conn.is_open());
        h
    }

    /// Takes every event and every byte the client wants to send, checking both.
    fn drain(&mut self) {
        while let Some(event) = self.conn.poll_event() {
            assert_eq!(self.closed_events, 0, "event after Closed: {event:?}");
            if let Event::Closed(_) = event {
                self.closed_events += 1;
            }
        }
        let mut out = Vec::new();
        self.conn.poll_transmit(self.now, &mut out);
        self.sent.extend_from_slice(&out);
        self.check.set_frame_max(self.conn.tune().frame_max);
        loop {
            match self.check.decode(&mut self.sent) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => panic!("the client sent an invalid frame: {e}"),
            }
        }
    }

    /// Something the application might do between two reads. Errors are fine; panics are not.
    fn command(&mut self, r: u64) {
        let ch = ChannelId(1 + (r % 3) as u16);
        let tag = DeliveryTag((r >> 4) % 8);
        let now = self.now;
        let c = &mut self.conn;
        let _ = match (r >> 8) % 10 {
            0 | 1 => c
                .publish(ch, "", "q", true, &BasicProperties::default(), &[7; 300])
                .map(drop),
            2 => c.ack(ch, tag, r & 1 == 1),
            3 => c.nack(ch, tag, r & 1 == 1, r & 2 == 2),
            4 => c.open_channel().map(drop),
            5 => c.close_channel(ch),
            6 => c.qos(ch, 1, false).map(drop),
            7 => c.cancel(ch, "c").map(drop),
            8 => c.confirm_select(ch).map(drop),
            _ => c.close(now),
        };
    }
}
