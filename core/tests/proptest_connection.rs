//! Property tests of the connection machine: the same server byte stream fed whole, byte by byte
//! and in random chunks yields the same events and the same client bytes; publisher confirms
//! settle each publish exactly as a simple model says; arbitrary bytes after a handshake never
//! panic and end with exactly one `Event::Closed`.

use std::time::Instant;

use amq_protocol::types::{AMQPValue, FieldTable};
use amqp_rpc_core::types::BasicProperties;
use amqp_rpc_core::{ChannelId, Connection, ConnectionConfig, ConsumeOptions, DeliveryTag, Event};
use amqp_rpc_sim::frames::{self, method};
use proptest::collection::vec;
use proptest::prelude::*;

const CASES: u32 = 256;
const FRAME_MAX: u32 = 4096;

/// Something the broker sends after the handshake.
#[derive(Debug, Clone)]
enum Action {
    Deliver {
        tag: u64,
        body: Vec<u8>,
        headers: bool,
    },
    Return(Vec<u8>),
    Ack(u64, bool),
    Nack(u64, bool),
    Heartbeat,
    Blocked,
    Unblocked,
    Flow(bool),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (1u64..100, vec(any::<u8>(), 0..9000), any::<bool>())
            .prop_map(|(tag, body, headers)| Action::Deliver { tag, body, headers }),
        1 => vec(any::<u8>(), 0..100).prop_map(Action::Return),
        2 => (0u64..8, any::<bool>()).prop_map(|(t, m)| Action::Ack(t, m)),
        1 => (0u64..8, any::<bool>()).prop_map(|(t, m)| Action::Nack(t, m)),
        1 => Just(Action::Heartbeat),
        1 => Just(Action::Blocked),
        1 => Just(Action::Unblocked),
        1 => any::<bool>().prop_map(Action::Flow),
    ]
}

fn encode(action: &Action) -> Vec<u8> {
    match action {
        Action::Deliver { tag, body, headers } => {
            let mut props = BasicProperties::default().with_correlation_id("x".into());
            if *headers {
                let mut h = FieldTable::default();
                h.insert("k".into(), AMQPValue::LongInt(7));
                props = props.with_headers(h);
            }
            let mut out = method(1, frames::deliver("c", *tag, false, "", "q"));
            out.extend(frames::content(
                1,
                &props,
                body.len() as u64,
                body,
                FRAME_MAX,
            ));
            out
        }
        Action::Return(body) => {
            let mut out = method(1, frames::basic_return(312, "NO_ROUTE", "", "q"));
            out.extend(frames::content(
                1,
                &BasicProperties::default(),
                body.len() as u64,
                body,
                FRAME_MAX,
            ));
            out
        }
        Action::Ack(tag, multiple) => method(1, frames::ack(*tag, *multiple)),
        Action::Nack(tag, multiple) => method(1, frames::nack(*tag, *multiple)),
        Action::Heartbeat => frames::heartbeat(),
        Action::Blocked => method(0, frames::blocked("low on memory")),
        Action::Unblocked => method(0, frames::unblocked()),
        Action::Flow(active) => method(1, frames::flow(*active)),
    }
}

/// The handshake as the broker sends it.
fn handshake_stream() -> Vec<u8> {
    let mut out = method(0, frames::start("PLAIN AMQPLAIN"));
    out.extend(method(0, frames::tune(2047, FRAME_MAX, 30)));
    out.extend(method(0, frames::open_ok()));
    out
}

/// What follows: channel 1 opened, in confirm mode, consuming as "c", then `actions`.
fn session_stream(actions: &[Action], tail: &[u8]) -> Vec<u8> {
    let mut out = method(1, frames::channel_open_ok());
    out.extend(method(1, frames::select_ok()));
    out.extend(method(1, frames::consume_ok("c")));
    for a in actions {
        out.extend(encode(a));
    }
    out.extend_from_slice(tail);
    out
}

/// How a stream is cut into `handle_input` calls.
#[derive(Debug, Clone)]
enum Split {
    Whole,
    ByteByByte,
    At(Vec<prop::sample::Index>),
}

fn feed(
    conn: &mut Connection,
    now: Instant,
    stream: &[u8],
    split: &Split,
    events: &mut Vec<Event>,
) {
    let mut cuts: Vec<usize> = match split {
        Split::Whole => vec![],
        Split::ByteByByte => (1..stream.len()).collect(),
        Split::At(idx) => idx.iter().map(|i| i.index(stream.len() + 1)).collect(),
    };
    cuts.push(stream.len());
    cuts.sort_unstable();
    let mut from = 0;
    for to in cuts {
        conn.handle_input(now, &stream[from..to]);
        from = to;
        while let Some(e) = conn.poll_event() {
            events.push(e);
        }
    }
}

/// Runs the client through `handshake` and `session` split by `split`; returns its events and
/// every byte it sent.
fn run(handshake: &[u8], session: &[u8], split: &Split, publishes: usize) -> (Vec<Event>, Vec<u8>) {
    let now = amqp_rpc_sim::t0();
    let mut conn = Connection::new(
        {
            let mut c = ConnectionConfig::default();
            c.max_body_size = 5000;
            c
        },
        now,
    );
    let mut events = Vec::new();
    let mut sent = Vec::new();
    feed(&mut conn, now, handshake, split, &mut events);
    assert_eq!(events, vec![Event::Connected]);
    let ch = conn.open_channel().expect("open");
    conn.confirm_select(ch).expect("select");
    conn.consume(
        ch,
        "q",
        "c",
        ConsumeOptions::default(),
        FieldTable::default(),
    )
    .expect("consume");
    for _ in 0..publishes {
        conn.publish(ch, "", "q", true, &BasicProperties::default(), b"p")
            .expect("publish");
    }
    feed(&mut conn, now, session, split, &mut events);
    conn.poll_transmit(now, &mut sent);
    (events, sent)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn chunking_does_not_change_events(
        actions in vec(action(), 0..10),
        tail in prop_oneof![3 => Just(vec![]), 1 => vec(any::<u8>(), 1..40)],
        cuts in vec(any::<prop::sample::Index>(), 1..40),
        publishes in 0usize..6,
    ) {
        let handshake = handshake_stream();
        let session = session_stream(&actions, &tail);
        let whole = run(&handshake, &session, &Split::Whole, publishes);
        let random = run(&handshake, &session, &Split::At(cuts), publishes);
        prop_assert_eq!(&random, &whole);
        let bytewise = run(&handshake, &session, &Split::ByteByByte, publishes);
        prop_assert_eq!(&bytewise, &whole);
        // And the bodies are the ones sent, whole and in order: multi-frame ones (up to 9,000
        // bytes in 4,096-byte frames) are copied from the input as they arrive; those above
        // max_body_size (5,000) are skipped and reported instead.
        let sent: Vec<&[u8]> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver { body, .. } | Action::Return(body) => Some(&body[..]),
                _ => None,
            })
            .filter(|body| body.len() <= 5000)
            .collect();
        let skipped = actions
            .iter()
            .filter(|a| matches!(a, Action::Deliver { body, .. } if body.len() > 5000))
            .count();
        prop_assert_eq!(
            whole.0.iter().filter(|e| matches!(e, Event::ContentTooLarge { .. })).count(),
            skipped
        );
        let received: Vec<&[u8]> = whole
            .0
            .iter()
            .filter_map(|e| match e {
                Event::Delivery(d) => Some(&d.body[..]),
                Event::Returned(r) => Some(&r.body[..]),
                _ => None,
            })
            .collect();
        prop_assert_eq!(received, sent);
        // Without a garbage tail the connection stays open.
        if tail.is_empty() {
            prop_assert!(!whole.0.iter().any(|e| matches!(e, Event::Closed(_))), "{:?}", whole.0);
        }
    }

    #[test]
    fn confirms_match_the_model(
        publishes in 1u64..20,
        confirms in vec((0u64..24, any::<bool>(), any::<bool>()), 0..30),
    ) {
        let actions: Vec<Action> = confirms
            .iter()
            .map(|&(tag, multiple, ack)| if ack { Action::Ack(tag, multiple) } else { Action::Nack(tag, multiple) })
            .collect();
        let (events, _) = run(
            &handshake_stream(),
            &session_stream(&actions, &[]),
            &Split::Whole,
            publishes as usize,
        );
        // The model: a set of unsettled sequence numbers. `multiple` settles every number up to
        // the tag; tag 0 with `multiple` settles all of them (spec §1.8.3.13, basic.ack).
        let mut unsettled: std::collections::BTreeSet<u64> = (1..=publishes).collect();
        let mut expected = Vec::new();
        for (tag, multiple, acked) in confirms {
            let settled: Vec<u64> = if multiple {
                unsettled.iter().copied().filter(|&s| s <= tag || tag == 0).collect()
            } else {
                unsettled.get(&tag).copied().into_iter().collect()
            };
            for s in settled {
                unsettled.remove(&s);
                expected.push(Event::PublishConfirmed { channel: ChannelId(1), seq: DeliveryTag(s), acked });
            }
        }
        let got: Vec<Event> = events
            .into_iter()
            .filter(|e| matches!(e, Event::PublishConfirmed { .. }))
            .collect();
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn arbitrary_bytes_after_the_handshake_end_in_one_close(
        prefix in vec(action(), 0..4),
        garbage in vec(any::<u8>(), 0..2000),
        cuts in vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let session = session_stream(&prefix, &garbage);
        let (mut events, _) = run(&handshake_stream(), &session, &Split::At(cuts), 2);
        let closed = events.iter().filter(|e| matches!(e, Event::Closed(_))).count();
        prop_assert!(closed <= 1);
        if closed == 1 {
            prop_assert!(matches!(events.pop(), Some(Event::Closed(_))), "Closed must be last");
        }
    }
}
