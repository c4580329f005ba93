//! Bad bytes from the server: each is a typed `FrameError` (or a protocol error), reported as the
//! last event, answered with a `connection.close` carrying its reply code (501, 502, 505, ...),
//! and never a panic, a hang or an allocation the header asked for.

use std::time::Duration;

use amq_protocol::types::FieldTable;
use amqp_rpc_core::codec::MAX_TABLE_DEPTH;
use amqp_rpc_core::types::BasicProperties;
use amqp_rpc_core::{
    ChannelId, ConnectionConfig, ConnectionError, ConsumeOptions, Event, FrameError, ReplyCode,
};
use amqp_rpc_sim::{frames, HandshakeScript, Sim};

/// A connection with channel 1 open and consuming as "c"; frame_max 4096.
fn consuming() -> Sim {
    let (mut sim, _) = Sim::connected_with(
        ConnectionConfig::default(),
        HandshakeScript {
            frame_max: 4096,
            ..HandshakeScript::default()
        },
    );
    let ch = sim.open_channel();
    sim.consume(ch, "q", "c");
    sim
}

/// A connection that sent start-ok and waits for tune: the pre-tune frame_max applies.
fn awaiting_tune() -> Sim {
    let mut sim = Sim::new(ConnectionConfig::default());
    sim.pump();
    sim.broker.send(0, frames::start("PLAIN"));
    sim.pump();
    sim.broker.expect_method();
    sim
}

/// Feeds `bytes` and checks the outcome: `expected` as the last event and a connection.close
/// with its reply code.
fn assert_frame_error(sim: &mut Sim, bytes: &[u8], expected: FrameError) {
    sim.broker.send_raw(bytes);
    sim.pump();
    let code = expected.reply_code();
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::Frame(expected))]
    );
    let (sent, _) = sim.broker.expect_connection_close();
    assert_eq!(sent, code.0);
    assert!(sim.client.error().is_some());
}

#[test]
fn reply_codes() {
    assert_eq!(
        FrameError::FrameTooLarge {
            size: 0,
            frame_max: 0
        }
        .reply_code(),
        ReplyCode::FRAME_ERROR
    );
    assert_eq!(FrameError::BadFrameEnd(0).reply_code().0, 501);
    assert_eq!(FrameError::UnknownFrameType(4).reply_code().0, 501);
    assert_eq!(FrameError::BadHeartbeat.reply_code().0, 501);
    assert_eq!(FrameError::TableTooDeep.reply_code().0, 502);
    assert_eq!(FrameError::Syntax { what: "x" }.reply_code().0, 502);
    assert_eq!(FrameError::ContentOnChannelZero.reply_code().0, 505);
    assert_eq!(FrameError::Unexpected { what: "x" }.reply_code().0, 505);
}

#[test]
fn frame_above_pre_tune_frame_max_is_rejected_from_its_header() {
    // 8185 + 8 = 8193 bytes: one too many. Only the 7-byte header is sent: the error must not
    // wait for (or buffer) the payload.
    let mut sim = awaiting_tune();
    assert_frame_error(
        &mut sim,
        &frames::raw_header(1, 0, 8185),
        FrameError::FrameTooLarge {
            size: 8185,
            frame_max: 8192,
        },
    );
    // Exactly 8192 is fine: the client waits for the rest.
    let mut sim = awaiting_tune();
    sim.broker.send_raw(&frames::raw_header(1, 0, 8184));
    sim.pump();
    assert!(sim.events.is_empty());
    assert!(!sim.client.is_closed());
}

#[test]
fn frame_above_negotiated_frame_max_is_rejected() {
    let mut sim = consuming();
    sim.broker.send_raw(&frames::raw_header(3, 1, 4088));
    sim.pump();
    assert!(sim.events.is_empty());
    let mut sim = consuming();
    assert_frame_error(
        &mut sim,
        &frames::raw_header(3, 1, 4089),
        FrameError::FrameTooLarge {
            size: 4089,
            frame_max: 4096,
        },
    );
}

#[test]
fn sizes_near_u32_max_do_not_overflow() {
    for size in [u32::MAX, u32::MAX - 7, u32::MAX - 8, 1 << 31] {
        let mut sim = awaiting_tune();
        assert_frame_error(
            &mut sim,
            &frames::raw_header(1, 0, size),
            FrameError::FrameTooLarge {
                size,
                frame_max: 8192,
            },
        );
        let mut sim = consuming();
        assert_frame_error(
            &mut sim,
            &frames::raw_header(3, 1, size),
            FrameError::FrameTooLarge {
                size,
                frame_max: 4096,
            },
        );
    }
}

#[test]
fn bad_frame_end() {
    let mut sim = consuming();
    let mut bytes = frames::heartbeat();
    *bytes.last_mut().expect("frame end") = 0;
    assert_frame_error(&mut sim, &bytes, FrameError::BadFrameEnd(0));
}

#[test]
fn unknown_frame_types() {
    for kind in [0u8, 4, 9, 0xCE, 0xFF] {
        let mut sim = consuming();
        assert_frame_error(
            &mut sim,
            &frames::raw(kind, 0, b""),
            FrameError::UnknownFrameType(kind),
        );
    }
    // 'A' starts a protocol header only if "MQP" follows (found by the fuzzer: "A!" hung the
    // connection, which decoded the same bad frame forever).
    let mut sim = consuming();
    assert_frame_error(&mut sim, b"A!", FrameError::UnknownFrameType(b'A'));
}

#[test]
fn bad_heartbeats() {
    let mut sim = consuming();
    assert_frame_error(&mut sim, &frames::raw(8, 1, b""), FrameError::BadHeartbeat);
    let mut sim = consuming();
    assert_frame_error(&mut sim, &frames::raw(8, 0, b"x"), FrameError::BadHeartbeat);
}

#[test]
fn content_on_channel_zero() {
    let mut sim = consuming();
    let header = frames::header_payload_with_table(0, &0u32.to_be_bytes());
    assert_frame_error(
        &mut sim,
        &frames::raw(2, 0, &header),
        FrameError::ContentOnChannelZero,
    );
    let mut sim = consuming();
    assert_frame_error(
        &mut sim,
        &frames::raw(3, 0, b"body"),
        FrameError::ContentOnChannelZero,
    );
}

#[test]
fn tables_nested_10_000_deep_are_a_typed_error() {
    // In a content header, after the handshake: 502 and a close.
    let mut sim = consuming();
    let mut bytes = frames::method(1, frames::deliver("c", 1, false, "", "q"));
    bytes.extend(frames::raw(
        2,
        1,
        &frames::header_payload_with_table(0, &frames::nested_table(10_000)),
    ));
    // 10,000 levels take 80 kB: raise the frame limit so that depth, not size, is what fails.
    let (mut sim_big, _) = Sim::connected_with(
        {
            let mut c = ConnectionConfig::default();
            c.frame_max = 1 << 20;
            c
        },
        HandshakeScript {
            frame_max: 1 << 20,
            ..HandshakeScript::default()
        },
    );
    sim_big.open_channel();
    sim_big
        .client
        .consume(
            ChannelId(1),
            "q",
            "c",
            ConsumeOptions::default(),
            FieldTable::default(),
        )
        .expect("consume");
    sim_big.pump();
    sim_big.broker.expect_method();
    sim_big.broker.send(1, frames::consume_ok("c"));
    sim_big.pump();
    sim_big.take_events();
    assert_frame_error(&mut sim_big, &bytes, FrameError::TableTooDeep);

    // Just past the limit, in a small frame.
    let mut bytes = frames::method(1, frames::deliver("c", 1, false, "", "q"));
    bytes.extend(frames::raw(
        2,
        1,
        &frames::header_payload_with_table(0, &frames::nested_table(MAX_TABLE_DEPTH)),
    ));
    assert_frame_error(&mut sim, &bytes, FrameError::TableTooDeep);
}

#[test]
fn tables_just_below_the_depth_limit_are_delivered() {
    let mut sim = consuming();
    let mut bytes = frames::method(1, frames::deliver("c", 1, false, "", "q"));
    bytes.extend(frames::raw(
        2,
        1,
        &frames::header_payload_with_table(0, &frames::nested_table(MAX_TABLE_DEPTH - 1)),
    ));
    sim.broker.send_raw(&bytes);
    sim.pump();
    assert!(matches!(sim.take_events()[..], [Event::Delivery(_)]));
}

#[test]
fn deep_server_properties_in_connection_start() {
    // Before the handshake the server may not speak AMQP: the error is reported, no close sent.
    let mut sim = Sim::new(ConnectionConfig::default());
    sim.pump();
    let mut payload = vec![0, 10, 0, 10, 0, 9];
    payload.extend(frames::nested_table(1_000));
    payload.extend_from_slice(&5u32.to_be_bytes());
    payload.extend_from_slice(b"PLAIN");
    payload.extend_from_slice(&5u32.to_be_bytes());
    payload.extend_from_slice(b"en_US");
    sim.broker.send_raw(&frames::raw(1, 0, &payload));
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::Frame(
            FrameError::TableTooDeep
        ))]
    );
    assert!(sim.client.is_closed());
    assert_eq!(sim.broker.pending_frames(), 0);
}

#[test]
fn malformed_methods_are_syntax_errors() {
    // basic method 999 does not exist.
    let mut sim = consuming();
    assert_frame_error(
        &mut sim,
        &frames::raw(1, 1, &[0, 60, 3, 231]),
        FrameError::Syntax {
            what: "basic method",
        },
    );
    // A truncated basic.deliver.
    let mut sim = consuming();
    assert_frame_error(
        &mut sim,
        &frames::raw(1, 1, &[0, 60, 0, 60, 5, b'a']),
        FrameError::Syntax {
            what: "basic method",
        },
    );
    // A consumer tag that is not UTF-8.
    let mut sim = consuming();
    let mut payload = vec![0, 60, 0, 60, 2, 0xC3, 0x28];
    payload.extend_from_slice(&1u64.to_be_bytes());
    payload.extend_from_slice(&[0, 0, 0]);
    assert_frame_error(
        &mut sim,
        &frames::raw(1, 1, &payload),
        FrameError::Syntax {
            what: "basic method",
        },
    );
    // Trailing bytes after a complete method.
    let mut sim = consuming();
    let mut bytes = frames::method(0, frames::blocked("x"));
    bytes.truncate(bytes.len() - 1);
    // Patch the size: one extra payload byte, then the frame end.
    let size = u32::from_be_bytes([bytes[3], bytes[4], bytes[5], bytes[6]]) + 1;
    bytes[3..7].copy_from_slice(&size.to_be_bytes());
    bytes.extend_from_slice(&[0, 0xCE]);
    assert_frame_error(
        &mut sim,
        &bytes,
        FrameError::Syntax {
            what: "connection method",
        },
    );
    // An unknown class.
    let mut sim = consuming();
    assert_frame_error(
        &mut sim,
        &frames::raw(1, 1, &[0, 99, 0, 10]),
        FrameError::Syntax {
            what: "method of an unknown class",
        },
    );
}

#[test]
fn content_out_of_order_is_an_unexpected_frame() {
    let deliver = frames::method(1, frames::deliver("c", 1, false, "", "q"));
    let header = frames::content(1, &BasicProperties::default(), 10, &[], 4096);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (header.clone(), "content header without a content method"),
        (
            frames::raw(3, 1, b"body"),
            "content body without a content method",
        ),
        (
            [deliver.clone(), frames::raw(3, 1, b"body")].concat(),
            "content body before content header",
        ),
        (
            [deliver.clone(), header.clone(), deliver.clone()].concat(),
            "method frame in the middle of content",
        ),
        (
            [deliver.clone(), header.clone(), header.clone()].concat(),
            "second content header",
        ),
        (
            [deliver.clone(), header.clone(), frames::raw(3, 1, &[0; 11])].concat(),
            "content body longer than announced",
        ),
    ];
    for (bytes, what) in cases {
        let mut sim = consuming();
        assert_frame_error(&mut sim, &bytes, FrameError::Unexpected { what });
    }
}

#[test]
fn frames_on_a_channel_that_is_not_open() {
    let mut sim = consuming();
    sim.broker.send(7, frames::channel_open_ok());
    sim.pump();
    assert!(matches!(
        sim.take_events()[..],
        [Event::Closed(ConnectionError::Protocol {
            code: ReplyCode::CHANNEL_ERROR,
            ..
        })]
    ));
    assert_eq!(sim.broker.expect_connection_close().0, 504);
}

#[test]
fn input_after_a_frame_error_is_ignored_until_eof() {
    let mut sim = consuming();
    // The size is checked first: that is what keeps a huge claim from being buffered.
    assert_frame_error(
        &mut sim,
        &[0xFF; 64],
        FrameError::FrameTooLarge {
            size: u32::MAX,
            frame_max: 4096,
        },
    );
    // The stream is out of step: even a well-formed close-ok is not trusted.
    sim.broker.send(0, frames::close_ok());
    sim.broker.send_raw(&[0xAB; 100_000]);
    sim.pump();
    assert!(sim.events.is_empty());
    assert!(!sim.client.is_closed());
    sim.eof();
    assert!(sim.client.is_closed());
    assert!(sim.events.is_empty(), "Closed was already reported");
}

#[test]
fn close_timeout_ends_a_connection_after_a_frame_error() {
    let mut sim = consuming();
    assert_frame_error(
        &mut sim,
        &frames::raw(4, 0, b""),
        FrameError::UnknownFrameType(4),
    );
    sim.advance(Duration::from_secs(5));
    assert!(sim.client.is_closed());
    assert_eq!(sim.client.poll_timeout(), None);
    assert!(sim.events.is_empty());
}

#[test]
fn frame_error_during_application_close_sends_one_close() {
    let mut sim = consuming();
    sim.client.close(sim.now).expect("close");
    sim.pump();
    assert_eq!(sim.broker.expect_connection_close().0, 200);
    sim.broker.send_raw(&frames::raw(4, 0, b""));
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::Frame(
            FrameError::UnknownFrameType(4)
        ))]
    );
    // A peer sends one connection.close (spec §1.4.2.9).
    assert_eq!(sim.broker.pending_frames(), 0);
    sim.advance(Duration::from_secs(5));
    assert!(sim.client.is_closed());
}
