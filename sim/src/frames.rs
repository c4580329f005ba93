//! Server-side frame builders. Everything is encoded by amq-protocol's own `gen_frame` into a
//! growable `Vec` (never a fixed slice: cookie-factory can panic there), so the bytes the client
//! is tested on come from an encoder that is not ours.

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, confirm, connection, queue, AMQPClass};
use amq_protocol::types::{FieldTable, LongString, ShortString};
use amqp_rpc_core::types::BasicProperties;

/// Encodes one frame with amq-protocol.
pub fn encode(frame: &AMQPFrame) -> Vec<u8> {
    let ctx = gen_frame(frame)(WriteContext::from(Vec::new())).expect("gen_frame into a Vec");
    ctx.into_inner().0
}

/// A method frame.
pub fn method(channel: u16, method: AMQPClass) -> Vec<u8> {
    encode(&AMQPFrame::Method(channel, method))
}

/// A heartbeat frame.
pub fn heartbeat() -> Vec<u8> {
    encode(&AMQPFrame::Heartbeat)
}

/// A content header announcing `body_size`, then `body` split into frames of at most
/// `frame_max - 8` bytes (spec §4.2.6.2). `body_size` may differ from `body.len()` for tests of
/// bad or oversized content.
pub fn content(
    channel: u16,
    properties: &BasicProperties,
    body_size: u64,
    body: &[u8],
    frame_max: u32,
) -> Vec<u8> {
    let mut out = encode(&AMQPFrame::Header(
        channel,
        AMQPContentHeader {
            class_id: 60,
            body_size,
            properties: properties.clone(),
        },
    ));
    let chunk = (frame_max - 8) as usize;
    for piece in body.chunks(chunk) {
        out.extend(encode(&AMQPFrame::Body(channel, piece.to_vec())));
    }
    out
}

/// A frame built by hand: any type octet, any payload, a correct size and end octet.
pub fn raw(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
    out
}

/// Only a frame header claiming `size` payload bytes (what an attacker sends first).
pub fn raw_header(kind: u8, channel: u16, size: u32) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// Methods a broker sends.
// ---------------------------------------------------------------------------------------------

/// `connection.start` offering `mechanisms`, with RabbitMQ-like server properties.
pub fn start(mechanisms: &str) -> AMQPClass {
    start_with_properties(mechanisms, rabbitmq_properties())
}

/// `connection.start` with the given server properties.
pub fn start_with_properties(mechanisms: &str, server_properties: FieldTable) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties,
        mechanisms: LongString::from(mechanisms),
        locales: LongString::from("en_US"),
    }))
}

/// Server properties shaped like RabbitMQ's: a capabilities table inside the top one.
pub fn rabbitmq_properties() -> FieldTable {
    use amq_protocol::types::AMQPValue;
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "direct_reply_to",
    ] {
        caps.insert(ShortString::from(cap), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert("product".into(), AMQPValue::LongString("RabbitMQ".into()));
    props.insert("version".into(), AMQPValue::LongString("3.13.7".into()));
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    props
}

/// `connection.tune`.
pub fn tune(channel_max: u16, frame_max: u32, heartbeat: u16) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
        channel_max,
        frame_max,
        heartbeat,
    }))
}

/// `connection.open-ok`.
pub fn open_ok() -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {}))
}

/// `connection.close`.
pub fn close(code: u16, text: &str) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
        reply_code: code,
        reply_text: ShortString::from(text),
        class_id: 0,
        method_id: 0,
    }))
}

/// `connection.close-ok`.
pub fn close_ok() -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {}))
}

/// `connection.blocked`.
pub fn blocked(reason: &str) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
        reason: ShortString::from(reason),
    }))
}

/// `connection.unblocked`.
pub fn unblocked() -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {}))
}

/// `channel.open-ok`.
pub fn channel_open_ok() -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {}))
}

/// `channel.close`.
pub fn channel_close(code: u16, text: &str, class_id: u16, method_id: u16) -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
        reply_code: code,
        reply_text: ShortString::from(text),
        class_id,
        method_id,
    }))
}

/// `channel.close-ok`.
pub fn channel_close_ok() -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))
}

/// `channel.flow`.
pub fn flow(active: bool) -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active }))
}

/// `basic.qos-ok`.
pub fn qos_ok() -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {}))
}

/// `queue.declare-ok`.
pub fn declare_ok(queue: &str, message_count: u32, consumer_count: u32) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
        queue: ShortString::from(queue),
        message_count,
        consumer_count,
    }))
}

/// `queue.delete-ok`.
pub fn delete_ok(message_count: u32) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
        message_count,
    }))
}

/// `basic.consume-ok`.
pub fn consume_ok(consumer_tag: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
        consumer_tag: ShortString::from(consumer_tag),
    }))
}

/// `basic.cancel-ok`.
pub fn cancel_ok(consumer_tag: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
        consumer_tag: ShortString::from(consumer_tag),
    }))
}

/// `basic.cancel` from the broker (consumer_cancel_notify).
pub fn cancel(consumer_tag: &str, nowait: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
        consumer_tag: ShortString::from(consumer_tag),
        nowait,
    }))
}

/// `confirm.select-ok`.
pub fn select_ok() -> AMQPClass {
    AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {}))
}

/// `basic.deliver`.
pub fn deliver(
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
        consumer_tag: ShortString::from(consumer_tag),
        delivery_tag,
        redelivered,
        exchange: ShortString::from(exchange),
        routing_key: ShortString::from(routing_key),
    }))
}

/// `basic.return`.
pub fn basic_return(code: u16, text: &str, exchange: &str, routing_key: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
        reply_code: code,
        reply_text: ShortString::from(text),
        exchange: ShortString::from(exchange),
        routing_key: ShortString::from(routing_key),
    }))
}

/// `basic.ack` from the broker (a publisher confirm).
pub fn ack(delivery_tag: u64, multiple: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
        delivery_tag,
        multiple,
    }))
}

/// `basic.nack` from the broker (a publisher confirm: the message was lost).
pub fn nack(delivery_tag: u64, multiple: bool) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
        delivery_tag,
        multiple,
        requeue: false,
    }))
}

/// A field table (length prefix included) nesting `depth` tables: `{"k": {"k": ... {}}}`.
/// Built by hand: amq-protocol's own encoder recurses, like its parser.
pub fn nested_table(depth: usize) -> Vec<u8> {
    let mut table = 0u32.to_be_bytes().to_vec();
    for _ in 0..depth {
        let mut entry = vec![1, b'k', b'F'];
        entry.extend_from_slice(&table);
        let mut wrapped = (entry.len() as u32).to_be_bytes().to_vec();
        wrapped.extend_from_slice(&entry);
        table = wrapped;
    }
    table
}

/// A content-header frame payload whose `headers` property is `table` (raw bytes).
pub fn header_payload_with_table(body_size: u64, table: &[u8]) -> Vec<u8> {
    let mut payload = vec![0, 60, 0, 0];
    payload.extend_from_slice(&body_size.to_be_bytes());
    payload.extend_from_slice(&(1u16 << 13).to_be_bytes());
    payload.extend_from_slice(table);
    payload
}
