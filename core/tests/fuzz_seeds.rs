//! Writes the seed corpus of the cargo-fuzz targets in `fuzz/` from the scripted broker's frame
//! builders. The seeds are committed; regenerate them with
//! `cargo test -p amqp-rpc-core --test fuzz_seeds -- --ignored`.
//!
//! `frames` seeds: a selector byte (0: the pre-tune decoder, 1: frame_max 4096) and a stream.
//! `connection` seeds: a PRNG seed byte, then what the server sends. With an even first byte
//! the stream follows the target's scripted prefix (channel 1 in confirm mode with consumer "c"
//! and publishes 1..=3 in flight, channel 2 opening with a queue.declare behind it; frame_max
//! 131072, heartbeat 10 s); with an odd one it starts at the handshake.

mod support;

use std::path::Path;

use amq_protocol::types::{AMQPValue, FieldTable};
use amqp_rpc_core::BasicProperties;
use support::frames::{self, method};

const FRAME_MAX: u32 = 131_072;

fn rich_properties() -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("x-deadline".into(), AMQPValue::LongLongInt(1_700_000_000));
    headers.insert("x-error".into(), AMQPValue::LongString("bad input".into()));
    let mut inner = FieldTable::default();
    inner.insert("n".into(), AMQPValue::ShortShortInt(-1));
    headers.insert("nested".into(), AMQPValue::FieldTable(inner));
    headers.insert(
        "list".into(),
        AMQPValue::FieldArray(vec![AMQPValue::Boolean(true), AMQPValue::Double(0.5)].into()),
    );
    BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_correlation_id("req-1".into())
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_expiration("5000".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

fn deliver(tag: u64, body: &[u8], properties: &BasicProperties) -> Vec<u8> {
    let mut out = method(1, frames::deliver("c", tag, false, "", "q"));
    out.extend(frames::content(
        1,
        properties,
        body.len() as u64,
        body,
        FRAME_MAX,
    ));
    out
}

fn connection_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let plain = BasicProperties::default();
    let mut seeds = vec![
        ("deliver", deliver(1, b"10", &plain)),
        ("deliver-props", deliver(2, b"fib(30)", &rich_properties())),
        ("deliver-empty", deliver(3, b"", &plain)),
        ("ack-multiple", method(1, frames::ack(3, true))),
        ("ack-nack", {
            let mut v = method(1, frames::ack(1, false));
            v.extend(method(1, frames::nack(2, false)));
            v
        }),
        ("return", {
            let mut v = method(1, frames::basic_return(312, "NO_ROUTE", "", "rpc_queue"));
            v.extend(frames::content(1, &plain, 2, b"42", FRAME_MAX));
            v
        }),
        ("channel2-open-declare", {
            let mut v = method(2, frames::channel_open_ok());
            v.extend(method(2, frames::declare_ok("amq.gen-abc", 0, 0)));
            v
        }),
        (
            "channel-close",
            method(1, frames::channel_close(406, "PRECONDITION_FAILED", 60, 80)),
        ),
        (
            "connection-close",
            method(0, frames::close(320, "CONNECTION_FORCED")),
        ),
        ("blocked", {
            let mut v = method(0, frames::blocked("low on memory"));
            v.extend(method(0, frames::unblocked()));
            v
        }),
        (
            "heartbeats",
            [frames::heartbeat(), frames::heartbeat()].concat(),
        ),
        ("flow", method(1, frames::flow(false))),
        ("server-cancel", method(1, frames::cancel("c", false))),
        ("too-large", {
            // max_body_size is 1 MiB in the target: announced 2 MiB, two body frames.
            let mut v = method(1, frames::deliver("c", 4, false, "", "q"));
            v.extend(frames::content(1, &plain, 2 << 20, &[0; 64], 32));
            v
        }),
        ("close-ok", method(0, frames::close_ok())),
    ];
    let mut everything = Vec::new();
    for (_, bytes) in &seeds {
        everything.extend_from_slice(bytes);
    }
    seeds.push(("mixed", everything));
    seeds
}

/// Streams from the start of the handshake (odd first byte in the `connection` target).
fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let handshake = [
        method(0, frames::start("PLAIN AMQPLAIN")),
        method(0, frames::tune(2047, FRAME_MAX, 10)),
        method(0, frames::open_ok()),
    ]
    .concat();
    vec![
        ("handshake", handshake.clone()),
        ("handshake-then-blocked", {
            let mut v = handshake;
            v.extend(method(0, frames::blocked("low on memory")));
            v
        }),
        ("handshake-small-tune", {
            let mut v = method(0, frames::start("AMQPLAIN"));
            v.extend(method(0, frames::tune(0, 4096, 0)));
            v.extend(method(0, frames::open_ok()));
            v
        }),
        ("auth-refused", {
            let mut v = method(0, frames::start("PLAIN"));
            v.extend(method(0, frames::close(403, "ACCESS_REFUSED")));
            v
        }),
        ("no-mechanism", method(0, frames::start("EXTERNAL"))),
        (
            "long-mechanisms",
            method(0, frames::start(&"É".repeat(200))),
        ),
        ("version-rejected", b"AMQP\x00\x00\x08\x00".to_vec()),
    ]
}

fn frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let plain = BasicProperties::default();
    vec![
        ("start", method(0, frames::start("PLAIN AMQPLAIN"))),
        ("tune", method(0, frames::tune(2047, FRAME_MAX, 60))),
        ("open-ok", method(0, frames::open_ok())),
        ("heartbeat", frames::heartbeat()),
        ("deliver", deliver(7, b"hello", &rich_properties())),
        ("return", {
            let mut v = method(1, frames::basic_return(312, "NO_ROUTE", "", "q"));
            v.extend(frames::content(1, &plain, 3, b"abc", 4096));
            v
        }),
        ("ack", method(1, frames::ack(9, true))),
        ("close", method(0, frames::close(403, "ACCESS_REFUSED"))),
        (
            "declare-ok",
            method(1, frames::declare_ok("amq.gen-x", 1, 2)),
        ),
        ("protocol-header", b"AMQP\x00\x00\x09\x01".to_vec()),
    ]
}

#[test]
#[ignore = "writes the committed fuzz seed corpus"]
fn write_fuzz_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    // Each seed once with a first byte of `selector`; the ones named in `again` once more with
    // `other` (another chunking for `connection`, the tuned decoder for `frames`).
    for (target, seeds, selector, other, again) in [
        (
            "connection",
            connection_seeds(),
            6u8,
            200u8,
            &["mixed", "deliver-props"][..],
        ),
        ("connection", handshake_seeds(), 9, 9, &[][..]),
        ("frames", frame_seeds(), 0, 1, &["deliver", "return"][..]),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        for (name, bytes) in seeds {
            let mut variants = vec![selector];
            if again.contains(&name) {
                variants.push(other);
            }
            for first in variants {
                let mut data = vec![first];
                data.extend_from_slice(&bytes);
                std::fs::write(dir.join(format!("seed-{name}-{first}")), data).expect("write seed");
            }
        }
    }
}
