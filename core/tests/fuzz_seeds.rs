//! Writes the seed corpus of the cargo-fuzz targets in `fuzz/` from the simulation harness's frame
//! builders. The seeds are committed; regenerate them with
//! `cargo test -p amqp-rpc-core --test fuzz_seeds -- --ignored`.
//!
//! Two more tests check, on every run, that the committed seeds are what the builders write and
//! that each corpus file passes its target's driver in `amqp_rpc_sim::fuzz`.
//!
//! `frames` seeds: a selector byte (0: the pre-tune decoder, 1: frame_max 4096) and a stream.
//! `connection` seeds: a PRNG seed byte, then what the server sends. With an even first byte
//! the stream follows the target's scripted prefix (channel 1 in confirm mode with consumer "c"
//! and publishes 1..=3 in flight, channel 2 opening with a queue.declare behind it; frame_max
//! 131072, heartbeat 10 s); with an odd one it starts at the handshake.

use std::path::{Path, PathBuf};

use amq_protocol::types::{AMQPValue, FieldTable};
use amqp_rpc_core::types::BasicProperties;
use amqp_rpc_sim::frames::{self, method};

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

/// The seed files: target, file name and contents.
fn seed_files() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut files = Vec::new();
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
        for (name, bytes) in seeds {
            let mut variants = vec![selector];
            if again.contains(&name) {
                variants.push(other);
            }
            for first in variants {
                let mut data = vec![first];
                data.extend_from_slice(&bytes);
                files.push((target, format!("seed-{name}-{first}"), data));
            }
        }
    }
    files
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[test]
#[ignore = "writes the committed fuzz seed corpus"]
fn write_fuzz_seeds() {
    for (target, name, data) in seed_files() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        std::fs::write(dir.join(name), data).expect("write seed");
    }
}

/// The committed seeds are exactly what `seed_files` writes: a change to the frame builders or
/// to a target's input layout shows here, and says to regenerate the corpus.
#[test]
fn committed_seeds_are_what_the_builders_write() {
    let files = seed_files();
    for (target, name, data) in &files {
        let path = corpus_dir(target).join(name);
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        assert!(
            committed == *data,
            "{path:?} differs from what the builders write; regenerate with \
             `cargo test -p amqp-rpc-core --test fuzz_seeds -- --ignored`"
        );
    }
    for target in ["connection", "frames"] {
        for entry in std::fs::read_dir(corpus_dir(target)).expect("read corpus dir") {
            let name = entry.expect("corpus entry").file_name();
            let name = name.to_string_lossy();
            if name.starts_with("seed-") {
                assert!(
                    files.iter().any(|(t, n, _)| *t == target && *n == name),
                    "{target}/{name} is committed but no builder writes it"
                );
            }
        }
    }
}

/// Every committed corpus file passes its target's scenario driver, so a fuzz regression on a
/// seed fails the ordinary test run, not only a fuzzing session.
#[test]
fn committed_corpus_passes_its_targets() {
    let mut run = 0;
    for (target, driver) in [
        ("connection", amqp_rpc_sim::fuzz::connection as fn(&[u8])),
        ("frames", amqp_rpc_sim::fuzz::frames),
    ] {
        for entry in std::fs::read_dir(corpus_dir(target)).expect("read corpus dir") {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            driver(&data);
            run += 1;
        }
    }
    // 25 connection seeds and 12 frames seeds are committed.
    assert!(run >= 37, "only {run} corpus files found");
}
