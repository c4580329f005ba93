//! Unit tests of the frame decoder and encoders. Property tests (round trips over generated
//! methods, arbitrary bytes, chunking) live in `core/tests/proptest_*.rs`.

use amq_protocol::frame::{gen_frame, AMQPFrame};
use amq_protocol::protocol::{basic, connection, queue};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::*;

fn encode_with_amq_protocol(frame: &AMQPFrame) -> Vec<u8> {
    let ctx = gen_frame(frame)(WriteContext::from(Vec::new())).expect("gen_frame into a Vec");
    ctx.into_inner().0
}

fn start_frame() -> Vec<u8> {
    let mut caps = FieldTable::default();
    caps.insert("publisher_confirms".into(), AMQPValue::Boolean(true));
    let mut props = FieldTable::default();
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    encode_with_amq_protocol(&AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: props,
            mechanisms: LongString::from("PLAIN AMQPLAIN"),
            locales: LongString::from("en_US"),
        })),
    ))
}

/// A frame built by hand: type, channel, payload, correct size and end octet.
fn raw(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    out
}

fn decode_all(decoder: &FrameDecoder, bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = decoder.decode(&mut buf)? {
        frames.push(frame);
    }
    assert!(buf.len() < 8 || frames.is_empty(), "a whole frame was left");
    Ok(frames)
}

fn decode_one(bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
    FrameDecoder::new().decode(&mut BytesMut::from(bytes))
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

#[test]
fn decodes_a_method() {
    let bytes = start_frame();
    let mut buf = BytesMut::from(&bytes[..]);
    match FrameDecoder::new().decode(&mut buf) {
        Ok(Some(Frame::Method { channel, method })) => {
            assert_eq!(channel, ChannelId(0));
            let AMQPClass::Connection(connection::AMQPMethod::Start(start)) = *method else {
                panic!("{method:?}");
            };
            assert_eq!(start.mechanisms.as_bytes(), b"PLAIN AMQPLAIN");
            assert!(start.server_properties.contains_key("capabilities"));
        }
        other => panic!("{other:?}"),
    }
    assert!(buf.is_empty());
}

#[test]
fn decodes_header_and_zero_copy_body() {
    let props = BasicProperties::default().with_correlation_id("7".into());
    let mut bytes = Vec::new();
    encode_content(ChannelId(3), &props, b"hello", 4096, &mut bytes).expect("encode");
    let mut buf = BytesMut::from(&bytes[..]);
    let decoder = FrameDecoder::new();
    match decoder.decode(&mut buf) {
        Ok(Some(Frame::Header { channel, header })) => {
            assert_eq!(channel, ChannelId(3));
            assert_eq!(header.class_id, BASIC_CLASS_ID);
            assert_eq!(header.body_size, 5);
            assert_eq!(header.properties, props);
        }
        other => panic!("{other:?}"),
    }
    let body_start = buf.as_ptr();
    match decoder.decode(&mut buf) {
        Ok(Some(Frame::Body { channel, payload })) => {
            assert_eq!(channel, ChannelId(3));
            assert_eq!(&payload[..], b"hello");
            // The payload is a slice of the read buffer, past the 7-byte frame header.
            assert_eq!(payload.as_ptr(), body_start.wrapping_add(7));
        }
        other => panic!("{other:?}"),
    }
    assert!(buf.is_empty());
}

#[test]
fn decodes_heartbeat() {
    let mut bytes = Vec::new();
    encode_heartbeat(&mut bytes);
    assert_eq!(bytes, [8, 0, 0, 0, 0, 0, 0, 0xCE]);
    assert_eq!(decode_one(&bytes), Ok(Some(Frame::Heartbeat)));
}

#[test]
fn decodes_back_to_back_frames_one_at_a_time() {
    let mut bytes = start_frame();
    encode_heartbeat(&mut bytes);
    bytes.extend(start_frame());
    let frames = decode_all(&FrameDecoder::new(), &bytes).expect("decode");
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[1], Frame::Heartbeat);
    assert_eq!(frames[0], frames[2]);
}

#[test]
fn every_prefix_is_incomplete_and_left_untouched() {
    let bytes = start_frame();
    let decoder = FrameDecoder::new();
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(decoder.decode(&mut buf), Ok(None), "cut at {cut}");
        assert_eq!(&buf[..], &bytes[..cut]);
    }
}

#[test]
fn incomplete_frame_reserves_only_its_own_size() {
    let mut buf = BytesMut::from(&[FRAME_BODY, 0, 1, 0, 0, 0x13, 0x88][..]); // 5000 bytes
    assert_eq!(FrameDecoder::new().decode(&mut buf), Ok(None));
    assert!(buf.capacity() >= 5008);
    assert!(buf.capacity() <= 2 * 8192);
}

#[test]
fn frame_max_bounds_the_whole_frame() {
    let mut decoder = FrameDecoder::new();
    assert_eq!(decoder.frame_max(), PRE_TUNE_FRAME_MAX);
    decoder.set_frame_max(4096);
    assert_eq!(decoder.frame_max(), 4096);
    let fits = raw(FRAME_BODY, 1, &[0; 4088]);
    assert!(matches!(
        decoder.decode(&mut BytesMut::from(&fits[..])),
        Ok(Some(Frame::Body { .. }))
    ));
    let too_big = raw(FRAME_BODY, 1, &[0; 4089]);
    assert_eq!(
        decoder.decode(&mut BytesMut::from(&too_big[..7])),
        Err(FrameError::FrameTooLarge {
            size: 4089,
            frame_max: 4096
        })
    );
}

#[test]
fn sizes_near_u32_max_are_too_large_without_overflow() {
    let mut decoder = FrameDecoder::new();
    decoder.set_frame_max(u32::MAX);
    for size in [u32::MAX, u32::MAX - 7] {
        let mut header = vec![FRAME_METHOD, 0, 0];
        header.extend_from_slice(&size.to_be_bytes());
        assert_eq!(
            decoder.decode(&mut BytesMut::from(&header[..])),
            Err(FrameError::FrameTooLarge {
                size,
                frame_max: u32::MAX
            })
        );
    }
}

#[test]
fn bad_frame_end() {
    let mut bytes = raw(FRAME_BODY, 1, b"abc");
    *bytes.last_mut().expect("end octet") = 0xCD;
    assert_eq!(decode_one(&bytes), Err(FrameError::BadFrameEnd(0xCD)));
}

#[test]
fn unknown_frame_type() {
    for kind in [0, 4, 5, 7, 9, 0xCE, 0xFF] {
        assert_eq!(
            decode_one(&raw(kind, 0, b"")),
            Err(FrameError::UnknownFrameType(kind)),
            "{kind}"
        );
    }
}

#[test]
fn heartbeat_must_be_empty_on_channel_zero() {
    assert_eq!(
        decode_one(&raw(FRAME_HEARTBEAT, 1, b"")),
        Err(FrameError::BadHeartbeat)
    );
    assert_eq!(
        decode_one(&raw(FRAME_HEARTBEAT, 0, b"x")),
        Err(FrameError::BadHeartbeat)
    );
}

#[test]
fn content_on_channel_zero() {
    assert_eq!(
        decode_one(&raw(FRAME_BODY, 0, b"x")),
        Err(FrameError::ContentOnChannelZero)
    );
    let mut header = Vec::new();
    encode_content(
        ChannelId(0),
        &BasicProperties::default(),
        b"",
        4096,
        &mut header,
    )
    .expect("encode");
    assert_eq!(decode_one(&header), Err(FrameError::ContentOnChannelZero));
}

#[test]
fn protocol_header_from_the_server_is_a_version_rejection() {
    let decoder = FrameDecoder::new();
    let header = b"AMQP\x00\x01\x00\x00"; // AMQP 1.0
    for cut in 1..8 {
        assert_eq!(
            decoder.decode(&mut BytesMut::from(&header[..cut])),
            Ok(None),
            "{cut}"
        );
    }
    assert_eq!(
        decoder.decode(&mut BytesMut::from(&header[..])),
        Err(FrameError::ProtocolVersionRejected {
            major: 1,
            minor: 0,
            revision: 0
        })
    );
    // 'A' followed by anything but "MQP" is no header, whatever its length.
    for bytes in [&b"AX"[..], b"AMQX", b"AMQ\x00\x00\x00\x00\x00"] {
        assert_eq!(
            decoder.decode(&mut BytesMut::from(bytes)),
            Err(FrameError::UnknownFrameType(b'A')),
            "{bytes:?}"
        );
    }
}

#[test]
fn malformed_payloads_name_their_class() {
    let cases: [(&[u8], &str); 5] = [
        (&[0, 10, 0, 99], "connection method"),
        (&[0, 20, 0, 99], "channel method"),
        (&[0, 50, 0, 10, 0], "queue method"),
        (&[0, 60, 0, 60], "basic method"),
        (&[0, 77, 0, 10], "method of an unknown class"),
    ];
    for (payload, what) in cases {
        assert_eq!(
            decode_one(&raw(FRAME_METHOD, 1, payload)),
            Err(FrameError::Syntax { what }),
            "{payload:?}"
        );
    }
    assert_eq!(
        decode_one(&raw(FRAME_METHOD, 1, &[])),
        Err(FrameError::Syntax {
            what: "method of an unknown class"
        })
    );
    assert_eq!(
        decode_one(&raw(FRAME_HEADER, 1, &[0, 60, 0])),
        Err(FrameError::Syntax {
            what: "content header"
        })
    );
    assert_eq!(method_name(&[0, 40]), "exchange method");
    assert_eq!(method_name(&[0, 85]), "confirm method");
    assert_eq!(method_name(&[0, 90]), "tx method");
}

#[test]
fn trailing_bytes_after_a_method_are_a_syntax_error() {
    let mut bytes = Vec::new();
    let close_ok = AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {}));
    encode_method(ChannelId(0), &close_ok, 4096, &mut bytes).expect("encode");
    let payload = &bytes[7..bytes.len() - 1];
    let mut longer = payload.to_vec();
    longer.push(0);
    assert!(decode_one(&raw(FRAME_METHOD, 0, payload)).is_ok());
    assert_eq!(
        decode_one(&raw(FRAME_METHOD, 0, &longer)),
        Err(FrameError::Syntax {
            what: "connection method"
        })
    );
}

#[test]
fn deep_tables_are_rejected_before_parsing() {
    // connection.start-ok whose client properties nest 5,000 tables.
    let mut table = 0u32.to_be_bytes().to_vec();
    for _ in 0..5_000 {
        let mut entry = vec![1, b'k', b'F'];
        entry.extend_from_slice(&table);
        let mut wrapped = (entry.len() as u32).to_be_bytes().to_vec();
        wrapped.extend_from_slice(&entry);
        table = wrapped;
    }
    let mut payload = vec![0, 10, 0, 11];
    payload.extend_from_slice(&table);
    let mut decoder = FrameDecoder::new();
    decoder.set_frame_max(1 << 20);
    assert_eq!(
        decoder.decode(&mut BytesMut::from(&raw(FRAME_METHOD, 0, &payload)[..])),
        Err(FrameError::TableTooDeep)
    );
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

#[test]
fn protocol_header_bytes() {
    let mut out = Vec::new();
    encode_protocol_header(&mut out);
    assert_eq!(out, b"AMQP\x00\x00\x09\x01");
}

#[test]
fn method_round_trips_through_amq_protocol() {
    let declare = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: "rpc_queue".into(),
        passive: false,
        durable: true,
        exclusive: false,
        auto_delete: true,
        nowait: false,
        arguments: FieldTable::default(),
    }));
    let mut out = vec![0xAA]; // appends, never overwrites
    encode_method(ChannelId(5), &declare, 4096, &mut out).expect("encode");
    assert_eq!(out[0], 0xAA);
    assert_eq!(
        &out[1..],
        &encode_with_amq_protocol(&AMQPFrame::Method(5, declare.clone()))[..]
    );
    assert_eq!(
        decode_one(&out[1..]),
        Ok(Some(Frame::Method {
            channel: ChannelId(5),
            method: Box::new(declare)
        }))
    );
}

#[test]
fn method_larger_than_frame_max_is_refused_and_leaves_out_intact() {
    let mut args = FieldTable::default();
    args.insert(
        "x-big".into(),
        AMQPValue::LongString(LongString::from(vec![b'x'; 5000])),
    );
    let consume = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: "q".into(),
        consumer_tag: ShortString::from("c"),
        no_local: false,
        no_ack: false,
        exclusive: false,
        nowait: false,
        arguments: args,
    }));
    let mut out = vec![1, 2, 3];
    assert_eq!(
        encode_method(ChannelId(1), &consume, 4096, &mut out),
        Err(FrameTooLargeToSend)
    );
    assert_eq!(out, [1, 2, 3]);
    encode_method(ChannelId(1), &consume, 8192, &mut out).expect("fits in 8192");
}

#[test]
fn content_body_is_split_at_frame_max_minus_8() {
    let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let mut out = Vec::new();
    encode_content(
        ChannelId(2),
        &BasicProperties::default(),
        &body,
        4096,
        &mut out,
    )
    .expect("encode");
    let mut decoder = FrameDecoder::new();
    decoder.set_frame_max(4096);
    let frames = decode_all(&decoder, &out).expect("decode");
    let sizes: Vec<usize> = frames
        .iter()
        .map(|f| match f {
            Frame::Header { header, .. } => {
                assert_eq!(header.body_size, 10_000);
                0
            }
            Frame::Body { payload, .. } => payload.len(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sizes, [0, 4088, 4088, 1824]);
    let joined: Vec<u8> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Body { payload, .. } => Some(payload.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(joined, body);
}

#[test]
fn empty_body_is_a_header_alone() {
    let mut out = Vec::new();
    encode_content(
        ChannelId(2),
        &BasicProperties::default(),
        b"",
        4096,
        &mut out,
    )
    .expect("encode");
    // type, channel, size, class, weight, body size, flags, end.
    assert_eq!(out.len(), 7 + 2 + 2 + 8 + 2 + 1);
    assert!(matches!(
        decode_all(&FrameDecoder::new(), &out).expect("decode")[..],
        [Frame::Header { .. }]
    ));
}

#[test]
fn properties_larger_than_frame_max_are_refused() {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-big".into(),
        AMQPValue::LongString(LongString::from(vec![b'x'; 5000])),
    );
    let props = BasicProperties::default().with_headers(headers);
    let mut out = vec![9];
    assert_eq!(
        encode_content(ChannelId(1), &props, b"body", 4096, &mut out),
        Err(FrameTooLargeToSend)
    );
    assert_eq!(out, [9]);
}
