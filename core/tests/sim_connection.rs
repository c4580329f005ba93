//! The connection machine against a scripted broker, in virtual time: the handshake and its
//! failures, heartbeats both ways, channel and connection errors, flow control, deliveries,
//! returns and publisher confirms.

use std::time::Duration;

use amq_protocol::protocol::{basic, channel, confirm, connection, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use amqp_rpc_core::types::BasicProperties;
use amqp_rpc_core::{
    ChannelError, ChannelId, ConnectionConfig, ConnectionError, ConsumeOptions, Credentials,
    DeliveryTag, Event, HandshakeStage, Initiator, QueueOptions, Reply, ReplyCode, UsageError,
};
use amqp_rpc_sim::{frames, Chunking, HandshakeScript, Sim};

fn config() -> ConnectionConfig {
    ConnectionConfig::default()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

trait EventText {
    fn to_string_lossy(&self) -> String;
}

impl EventText for Event {
    fn to_string_lossy(&self) -> String {
        match self {
            Event::Closed(e) => e.to_string(),
            other => format!("{other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

#[test]
fn handshake_negotiates_and_advertises() {
    let mut cfg = config();
    cfg.credentials = Credentials::new("alice", "pw");
    cfg.vhost = "rpc".into();
    cfg.heartbeat = secs(30);
    cfg.connection_name = Some("fib-client".into());
    let (sim, t) = Sim::connected_with(cfg, HandshakeScript::default());
    assert_eq!(t.start_ok.mechanism.as_str(), "PLAIN");
    assert_eq!(t.start_ok.response.as_bytes(), b"\0alice\0pw");
    assert_eq!(t.start_ok.locale.as_str(), "en_US");
    let props = t.start_ok.client_properties.inner();
    assert_eq!(
        props.get("connection_name"),
        Some(&AMQPValue::LongString("fib-client".into()))
    );
    let Some(AMQPValue::FieldTable(caps)) = props.get("capabilities") else {
        panic!("no capabilities in {props:?}");
    };
    for cap in [
        "publisher_confirms",
        "consumer_cancel_notify",
        "basic.nack",
        "connection.blocked",
        "authentication_failure_close",
    ] {
        assert_eq!(
            caps.inner().get(cap),
            Some(&AMQPValue::Boolean(true)),
            "{cap}"
        );
    }
    // Server proposes 2047 / 131072 / 60 s; we asked 2047 / 131072 / 30 s.
    assert_eq!(t.tune_ok.channel_max, 2047);
    assert_eq!(t.tune_ok.frame_max, 131_072);
    assert_eq!(t.tune_ok.heartbeat, 30);
    assert_eq!(t.open.virtual_host.as_str(), "rpc");
    let tune = sim.client.tune();
    assert_eq!(tune.frame_max, 131_072);
    assert_eq!(tune.heartbeat, secs(30));
    assert!(sim
        .client
        .server_properties()
        .inner()
        .contains_key("capabilities"));
}

#[test]
fn handshake_takes_the_lower_server_limits() {
    let script = HandshakeScript {
        channel_max: 16,
        frame_max: 4096,
        heartbeat: 5,
        ..HandshakeScript::default()
    };
    let (sim, t) = Sim::connected_with(config(), script);
    assert_eq!(
        (
            t.tune_ok.channel_max,
            t.tune_ok.frame_max,
            t.tune_ok.heartbeat
        ),
        (16, 4096, 5)
    );
    assert_eq!(sim.client.tune().channel_max, 16);
}

#[test]
fn handshake_uses_amqplain_when_plain_is_not_offered() {
    let script = HandshakeScript {
        mechanisms: "EXTERNAL AMQPLAIN".into(),
        ..HandshakeScript::default()
    };
    let (_, t) = Sim::connected_with(config(), script);
    assert_eq!(t.start_ok.mechanism.as_str(), "AMQPLAIN");
    assert_eq!(
        t.start_ok.response.as_bytes(),
        b"\x05LOGINS\x00\x00\x00\x05guest\x08PASSWORDS\x00\x00\x00\x05guest"
    );
}

#[test]
fn handshake_survives_every_chunking() {
    for chunking in [
        Chunking::Whole,
        Chunking::ByteByByte,
        Chunking::Random(7),
        Chunking::Random(0xDEAD_BEEF),
    ] {
        let mut sim = Sim::new(config());
        sim.chunking = chunking;
        sim.handshake(&HandshakeScript::default());
        assert_eq!(sim.next_event(), Some(Event::Connected), "{chunking:?}");
    }
}

#[test]
fn commands_before_connected_are_refused() {
    let mut sim = Sim::new(config());
    assert_eq!(sim.client.open_channel(), Err(UsageError::NotConnected));
}

#[test]
fn wrong_credentials_close_with_403() {
    let mut sim = Sim::new({
        let mut c = config();
        c.credentials = Credentials::new("guest", "wrong");
        c
    });
    sim.pump();
    sim.broker.send(0, frames::start("PLAIN AMQPLAIN"));
    sim.pump();
    let _start_ok = sim.broker.expect_method();
    // What RabbitMQ sends to a client with `authentication_failure_close`.
    let text = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN";
    sim.broker.send(0, frames::close(403, text));
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::AuthenticationFailed {
            reason: text.into()
        })]
    );
    // We answer the close and are done.
    assert!(matches!(
        sim.broker.expect_method(),
        (0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))
    ));
    assert!(sim.client.is_closed());
    assert_eq!(
        sim.client.open_channel(),
        Err(UsageError::ConnectionClosed(
            ConnectionError::AuthenticationFailed {
                reason: text.into()
            }
        ))
    );
}

#[test]
fn socket_closed_after_start_ok_is_an_authentication_failure() {
    let mut sim = Sim::new(config());
    sim.pump();
    sim.broker.send(0, frames::start("PLAIN"));
    sim.pump();
    sim.eof();
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::AuthenticationFailed {
            reason: String::new()
        })]
    );
}

#[test]
fn no_common_mechanism_is_reported_and_no_credentials_leave() {
    let mut sim = Sim::new(config());
    sim.pump();
    sim.broker.send(0, frames::start("EXTERNAL SCRAM-SHA-256"));
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::NoCommonMechanism {
            offered: "EXTERNAL SCRAM-SHA-256".into(),
            asked: "PLAIN AMQPLAIN".into(),
        })]
    );
    // No start-ok (no credentials); the client says why it leaves.
    let (code, text) = sim.broker.expect_connection_close();
    assert_eq!(code, 403);
    assert!(text.contains("EXTERNAL SCRAM-SHA-256"), "{text}");
    assert_eq!(sim.broker.pending_frames(), 0);
}

/// Issue 21 case 6: a 70 KB credential was blamed on the server ("server violated the
/// protocol (501)"). It is our limit: the error says so, with the lengths and the limit, never
/// the values; nothing but the close leaves.
#[test]
fn start_ok_too_large_for_the_pre_tune_frame_is_a_clear_error() {
    let mut sim = Sim::new({
        let mut c = config();
        c.credentials = Credentials::new("user", "p".repeat(70_000));
        c
    });
    sim.pump();
    sim.broker.send(0, frames::start("PLAIN AMQPLAIN"));
    sim.pump();
    match sim.take_events().as_slice() {
        [Event::Closed(
            e @ ConnectionError::CredentialsTooLong {
                username,
                password,
                limit,
                ..
            },
        )] => {
            assert_eq!((*username, *password, *limit), (4, 70_000, 4096));
            let text = e.to_string();
            assert!(
                text.contains("70000") && text.contains("4096") && !text.contains("ppppp"),
                "{text}"
            );
            assert!(!text.contains("server violated"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    // No start-ok went out, only the close.
    let (code, _) = sim.broker.expect_connection_close();
    assert_eq!(code, 501);
}

/// The same check without a connection, so that a driver can refuse such credentials before
/// it opens a socket.
#[test]
fn credentials_that_cannot_fit_are_refused_before_connecting() {
    let mut c = config();
    assert_eq!(c.check_credentials_fit(), Ok(()));
    c.credentials = Credentials::new("u".repeat(300), "p".repeat(4_000));
    match c.check_credentials_fit() {
        Err(e @ ConnectionError::CredentialsTooLong { .. }) => {
            assert!(!e.to_string().contains("uuuuu"), "{e}");
            assert!(!e.to_string().contains("ppppp"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // A password just short enough fits.
    c.credentials = Credentials::new("u", "p".repeat(3_500));
    assert_eq!(c.check_credentials_fit(), Ok(()));
}

#[test]
fn long_non_ascii_mechanism_list_does_not_panic() {
    // The offered list is a long string from the server; the close text that quotes it must
    // be cut to a short string (255 bytes) on a character boundary.
    let offered = "É".repeat(400);
    let mut sim = Sim::new(config());
    sim.pump();
    sim.broker.send(0, frames::start(&offered));
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::NoCommonMechanism {
            offered,
            asked: "PLAIN AMQPLAIN".into(),
        })]
    );
    let (code, text) = sim.broker.expect_connection_close();
    assert_eq!(code, 403);
    assert!(text.len() <= 255);
}

/// Issue 21 case 7: the stage says what was seen. Not one byte after the protocol header is
/// what a broker out of sockets does (the kernel accepts, RabbitMQ never reads).
#[test]
fn handshake_times_out_when_the_server_is_silent() {
    let mut sim = Sim::new({
        let mut c = config();
        c.handshake_timeout = secs(10);
        c
    });
    sim.pump();
    sim.advance(Duration::from_millis(9_999));
    assert!(sim.events.is_empty());
    sim.advance(Duration::from_millis(1));
    let events = sim.take_events();
    assert_eq!(
        events,
        vec![Event::Closed(ConnectionError::HandshakeTimedOut {
            stage: HandshakeStage::NoReply,
            after: secs(10)
        })]
    );
    let text = events[0].to_string_lossy();
    assert!(
        text.contains("no reply to the AMQP protocol header within 10s")
            && text.contains("file descriptors"),
        "{text}"
    );
    assert!(sim.client.is_closed());
    assert_eq!(sim.client.poll_timeout(), None);
}

#[test]
fn handshake_times_out_with_half_a_start_frame() {
    let mut sim = Sim::new({
        let mut c = config();
        c.handshake_timeout = secs(10);
        c
    });
    sim.pump();
    sim.broker.send_raw(b"\x01\x00\x00");
    sim.pump();
    sim.advance(secs(10));
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::HandshakeTimedOut {
            stage: HandshakeStage::PartialStart,
            after: secs(10)
        })]
    );
}

#[test]
fn handshake_times_out_when_the_server_stalls_after_start_ok() {
    let mut sim = Sim::new({
        let mut c = config();
        c.handshake_timeout = secs(10);
        c
    });
    sim.pump();
    sim.broker.send(0, frames::start("PLAIN"));
    sim.pump();
    sim.advance(secs(10));
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::HandshakeTimedOut {
            stage: HandshakeStage::AwaitingTune,
            after: secs(10)
        })]
    );
}

#[test]
fn handshake_times_out_when_the_server_stalls_after_tune() {
    let mut sim = Sim::new({
        let mut c = config();
        c.handshake_timeout = secs(10);
        c
    });
    sim.pump();
    sim.broker.send(0, frames::start("PLAIN"));
    sim.broker.send(0, frames::tune(2047, 131_072, 60));
    sim.pump();
    sim.advance(secs(10));
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::HandshakeTimedOut {
            stage: HandshakeStage::AwaitingOpenOk,
            after: secs(10)
        })]
    );
}

#[test]
fn server_speaking_another_protocol_version_is_reported() {
    let mut sim = Sim::new(config());
    sim.pump();
    sim.broker.send_raw(b"AMQP\x00\x00\x08\x00");
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::Frame(
            amqp_rpc_core::FrameError::ProtocolVersionRejected {
                major: 0,
                minor: 8,
                revision: 0
            }
        ))]
    );
    // It does not speak 0-9-1: no close is sent.
    assert_eq!(sim.broker.pending_frames(), 0);
}

// ---------------------------------------------------------------------------------------------
// Heartbeats
// ---------------------------------------------------------------------------------------------

fn heartbeat_sim(heartbeat: u16) -> Sim {
    let script = HandshakeScript {
        heartbeat,
        ..HandshakeScript::default()
    };
    Sim::connected_with(config(), script).0
}

#[test]
fn heartbeats_flow_both_ways_and_keep_the_connection() {
    let mut sim = heartbeat_sim(10);
    // An idle client sends a heartbeat after half an interval of write silence.
    sim.advance(Duration::from_millis(4_999));
    assert_eq!(sim.broker.heartbeats_received, 0);
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.broker.heartbeats_received, 1);
    // A server that sends its own heartbeats keeps the connection alive indefinitely.
    for _ in 0..60 {
        sim.advance(secs(5));
        sim.broker.send_heartbeat();
        sim.pump();
    }
    assert!(sim.client.is_open());
    assert!(sim.events.is_empty(), "{:?}", sim.events);
    // 5 min of idle writing at one heartbeat per 5 s.
    assert_eq!(sim.broker.heartbeats_received, 61);
}

#[test]
fn writing_traffic_replaces_heartbeats() {
    let mut sim = heartbeat_sim(10);
    let ch = sim.open_channel();
    for _ in 0..20 {
        sim.advance(secs(4));
        sim.client
            .publish(ch, "", "q", false, &BasicProperties::default(), b"x")
            .expect("publish");
        sim.broker.send_heartbeat();
        sim.pump();
        sim.broker.expect_publish();
    }
    assert_eq!(sim.broker.heartbeats_received, 0);
}

#[test]
fn silent_peer_is_declared_dead_after_two_intervals() {
    let mut sim = heartbeat_sim(10);
    // Our heartbeats go out, but nothing comes back.
    sim.advance(Duration::from_millis(19_999));
    assert!(sim.events.is_empty());
    assert_eq!(sim.broker.heartbeats_received, 3);
    sim.advance(Duration::from_millis(1));
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::HeartbeatTimedOut)]
    );
    assert!(sim.client.is_closed());
}

#[test]
fn any_frame_counts_as_a_sign_of_life() {
    let mut sim = heartbeat_sim(10);
    sim.advance(secs(15));
    sim.broker.send(0, frames::blocked("low on memory"));
    sim.pump();
    sim.advance(secs(15));
    assert!(sim.client.is_open());
    sim.advance(secs(5));
    assert_eq!(
        sim.take_events().last(),
        Some(&Event::Closed(ConnectionError::HeartbeatTimedOut))
    );
}

#[test]
fn heartbeats_off_means_no_timer() {
    let (sim, _) = Sim::connected_with(
        {
            let mut c = config();
            c.heartbeat = Duration::ZERO;
            c
        },
        HandshakeScript {
            heartbeat: 0,
            ..HandshakeScript::default()
        },
    );
    assert_eq!(sim.client.poll_timeout(), None);
}

// ---------------------------------------------------------------------------------------------
// Channels
// ---------------------------------------------------------------------------------------------

#[test]
fn declare_consume_and_qos_complete_in_order() {
    let mut sim = Sim::connected(config());
    let ch = sim.open_channel();
    let qos = sim.client.qos(ch, 1, false).expect("qos");
    let declare = sim
        .client
        .declare_queue(
            ch,
            "rpc_queue",
            QueueOptions::default(),
            FieldTable::default(),
        )
        .expect("declare");
    let consume = sim
        .client
        .consume(
            ch,
            "rpc_queue",
            "",
            ConsumeOptions::default(),
            FieldTable::default(),
        )
        .expect("consume");
    sim.pump();
    assert!(matches!(
        sim.broker.expect_method(),
        (1, AMQPClass::Basic(basic::AMQPMethod::Qos(q))) if q.prefetch_count == 1
    ));
    assert!(matches!(
        sim.broker.expect_method(),
        (1, AMQPClass::Queue(queue::AMQPMethod::Declare(d))) if d.queue.as_str() == "rpc_queue"
    ));
    assert!(matches!(
        sim.broker.expect_method(),
        (1, AMQPClass::Basic(basic::AMQPMethod::Consume(c))) if c.consumer_tag.as_str().is_empty()
    ));
    sim.broker.send(1, frames::qos_ok());
    sim.broker.send(1, frames::declare_ok("rpc_queue", 3, 0));
    sim.broker.send(1, frames::consume_ok("amq.ctag-1"));
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![
            Event::Completed {
                request: qos,
                channel: ch,
                reply: Reply::QosOk
            },
            Event::Completed {
                request: declare,
                channel: ch,
                reply: Reply::QueueDeclared {
                    queue: "rpc_queue".into(),
                    message_count: 3,
                    consumer_count: 0
                }
            },
            Event::Completed {
                request: consume,
                channel: ch,
                reply: Reply::ConsumeOk {
                    consumer_tag: "amq.ctag-1".into()
                }
            },
        ]
    );
}

#[test]
fn commands_pipeline_behind_channel_open() {
    let mut sim = Sim::connected(config());
    let ch = sim.client.open_channel().expect("open");
    let declare = sim
        .client
        .declare_queue(ch, "", QueueOptions::default(), FieldTable::default())
        .expect("declare before open-ok");
    sim.pump();
    sim.broker.expect_method();
    sim.broker.expect_method();
    sim.broker.send(ch.0, frames::channel_open_ok());
    sim.broker.send(ch.0, frames::declare_ok("amq.gen-1", 0, 0));
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![
            Event::ChannelOpened(ch),
            Event::Completed {
                request: declare,
                channel: ch,
                reply: Reply::QueueDeclared {
                    queue: "amq.gen-1".into(),
                    message_count: 0,
                    consumer_count: 0
                }
            }
        ]
    );
}

#[test]
fn channel_error_fails_its_requests_and_spares_the_connection() {
    let mut sim = Sim::connected(config());
    let ch = sim.open_channel();
    let declare = sim
        .client
        .declare_queue(
            ch,
            "rpc_queue",
            {
                let mut c = QueueOptions::default();
                c.durable = true;
                c
            },
            FieldTable::default(),
        )
        .expect("declare");
    sim.pump();
    sim.broker.expect_method();
    let text = "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'rpc_queue'";
    sim.broker
        .send(ch.0, frames::channel_close(406, text, 50, 10));
    sim.pump();
    let error = ChannelError {
        channel: ch,
        initiator: Initiator::Server,
        code: ReplyCode::PRECONDITION_FAILED,
        text: text.into(),
    };
    assert_eq!(
        sim.take_events(),
        vec![
            Event::Failed {
                request: declare,
                error: error.clone()
            },
            Event::ChannelClosed(error)
        ]
    );
    assert!(matches!(
        sim.broker.expect_method(),
        (1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))
    ));
    assert_eq!(
        sim.client
            .publish(ch, "", "q", false, &BasicProperties::default(), b""),
        Err(UsageError::ChannelNotOpen(ch))
    );
    // The connection lives; the next channel takes a fresh number.
    assert!(sim.client.is_open());
    let next = sim.open_channel();
    assert_ne!(next, ch);
}

#[test]
fn client_closes_a_channel() {
    let mut sim = Sim::connected(config());
    let ch = sim.open_channel();
    sim.client.close_channel(ch).expect("close");
    assert!(!sim.client.is_channel_usable(ch));
    sim.pump();
    assert!(matches!(
        sim.broker.expect_method(),
        (1, AMQPClass::Channel(channel::AMQPMethod::Close(c))) if c.reply_code == 200
    ));
    // A delivery already in flight is discarded while the channel closes (spec §1.5.2.5).
    sim.broker.send_content(
        ch.0,
        frames::deliver("c", 1, false, "", "q"),
        &BasicProperties::default(),
        b"late",
    );
    sim.broker.send(ch.0, frames::channel_close_ok());
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![Event::ChannelClosed(ChannelError {
            channel: ch,
            initiator: Initiator::Client,
            code: ReplyCode::REPLY_SUCCESS,
            text: "closed by application".into()
        })]
    );
    assert!(sim.client.is_open());
}

#[test]
fn server_flow_and_consumer_cancel_are_answered() {
    let mut sim = Sim::connected(config());
    let ch = sim.open_channel();
    sim.broker.send(ch.0, frames::flow(false));
    sim.broker.send(ch.0, frames::cancel("amq.ctag-1", false));
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![
            Event::Flow {
                channel: ch,
                active: false
            },
            Event::ConsumerCancelled {
                channel: ch,
                consumer_tag: "amq.ctag-1".into()
            }
        ]
    );
    assert!(matches!(
        sim.broker.expect_method(),
        (1, AMQPClass::Channel(channel::AMQPMethod::FlowOk(f))) if !f.active
    ));
    assert!(matches!(
        sim.broker.expect_method(),
        (1, AMQPClass::Basic(basic::AMQPMethod::CancelOk(c))) if c.consumer_tag.as_str() == "amq.ctag-1"
    ));
}

#[test]
fn channel_numbers_go_round_and_run_out() {
    let script = HandshakeScript {
        channel_max: 3,
        ..HandshakeScript::default()
    };
    let (mut sim, _) = Sim::connected_with(config(), script);
    let ids: Vec<_> = (0..3).map(|_| sim.open_channel()).collect();
    assert_eq!(ids, vec![ChannelId(1), ChannelId(2), ChannelId(3)]);
    assert_eq!(sim.client.open_channel(), Err(UsageError::NoFreeChannel));
}

// ---------------------------------------------------------------------------------------------
// Content: deliveries, returns, confirms
// ---------------------------------------------------------------------------------------------

fn consuming(chunking: Chunking, cfg: ConnectionConfig) -> (Sim, ChannelId) {
    let mut sim = Sim::connected_with(
        cfg,
        HandshakeScript {
            frame_max: 4096,
            ..HandshakeScript::default()
        },
    )
    .0;
    sim.chunking = chunking;
    let ch = sim.open_channel();
    sim.consume(ch, "q", "c");
    (sim, ch)
}

#[test]
fn deliveries_are_reassembled_whatever_the_chunking() {
    let mut headers = FieldTable::default();
    headers.insert("x-n".into(), AMQPValue::LongInt(30));
    let props = BasicProperties::default()
        .with_correlation_id("abc".into())
        .with_reply_to("amq.rabbitmq.reply-to.g1h".into())
        .with_headers(headers);
    // frame_max 4096: 10,000 bytes travel in three body frames.
    let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    for chunking in [Chunking::Whole, Chunking::ByteByByte, Chunking::Random(99)] {
        let (mut sim, ch) = consuming(chunking, config());
        sim.broker
            .send_content(ch.0, frames::deliver("c", 1, false, "", "q"), &props, &big);
        sim.broker.send_content(
            ch.0,
            frames::deliver("c", 2, true, "ex", "rk"),
            &BasicProperties::default(),
            b"",
        );
        sim.pump();
        let events = sim.take_events();
        assert_eq!(events.len(), 2, "{chunking:?}: {events:?}");
        let Event::Delivery(d) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(d.channel, ch);
        assert_eq!(d.consumer_tag, "c");
        assert_eq!(d.delivery_tag, DeliveryTag(1));
        assert_eq!(d.properties, props);
        assert_eq!(&d.body[..], &big[..], "{chunking:?}");
        let Event::Delivery(d) = &events[1] else {
            panic!("{events:?}")
        };
        assert!(d.redelivered);
        assert_eq!((d.exchange.as_str(), d.routing_key.as_str()), ("ex", "rk"));
        assert!(d.body.is_empty());
        // Acks go back on the delivery's channel.
        sim.client.ack(ch, DeliveryTag(2), true).expect("ack");
        sim.pump();
        assert!(matches!(
            sim.broker.expect_method(),
            (1, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) if a.delivery_tag == 2 && a.multiple
        ));
    }
}

#[test]
fn oversized_content_is_skipped_and_reported() {
    let mut cfg = config();
    cfg.max_body_size = 1000;
    let (mut sim, ch) = consuming(Chunking::Random(5), cfg);
    sim.broker.send_content(
        ch.0,
        frames::deliver("c", 1, false, "", "q"),
        &BasicProperties::default(),
        &[1; 5000],
    );
    // A header announcing u64::MAX bytes, with no body yet: nothing may be sized for it.
    sim.broker
        .send(ch.0, frames::deliver("c", 2, false, "", "q"));
    sim.broker.send_raw(&frames::content(
        ch.0,
        &BasicProperties::default(),
        u64::MAX,
        &[],
        4096,
    ));
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![
            Event::ContentTooLarge {
                channel: ch,
                delivery_tag: Some(DeliveryTag(1)),
                body_size: 5000,
                properties: Box::default(),
            },
            Event::ContentTooLarge {
                channel: ch,
                delivery_tag: Some(DeliveryTag(2)),
                body_size: u64::MAX,
                properties: Box::default(),
            }
        ]
    );
    assert!(sim.client.is_open());
    // The connection lives and the client may reject the delivery.
    sim.client
        .reject(ch, DeliveryTag(1), false)
        .expect("reject");
    sim.pump();
    assert!(matches!(
        sim.broker.expect_method(),
        (1, AMQPClass::Basic(basic::AMQPMethod::Reject(r))) if r.delivery_tag == 1 && !r.requeue
    ));
}

#[test]
fn content_after_a_skipped_body_is_delivered() {
    let mut cfg = config();
    cfg.max_body_size = 100;
    let (mut sim, ch) = consuming(Chunking::Whole, cfg);
    sim.broker.send_content(
        ch.0,
        frames::deliver("c", 1, false, "", "q"),
        &BasicProperties::default(),
        &[1; 101],
    );
    sim.broker.send_content(
        ch.0,
        frames::deliver("c", 2, false, "", "q"),
        &BasicProperties::default(),
        &[2; 100],
    );
    sim.pump();
    let events = sim.take_events();
    assert!(matches!(
        events[..],
        [
            Event::ContentTooLarge {
                body_size: 101,
                ..
            },
            Event::Delivery(ref d)
        ] if d.delivery_tag == DeliveryTag(2) && d.body.len() == 100
    ));
}

#[test]
fn mandatory_publish_comes_back_as_returned() {
    let mut sim = Sim::connected(config());
    let ch = sim.open_channel();
    let props = BasicProperties::default().with_correlation_id("id-1".into());
    assert_eq!(
        sim.client
            .publish(ch, "", "rpc_queue", true, &props, b"30")
            .expect("publish"),
        None
    );
    sim.pump();
    let (c, publish, p, body) = sim.broker.expect_publish();
    assert_eq!(c, ch.0);
    assert!(publish.mandatory);
    assert_eq!(publish.routing_key.as_str(), "rpc_queue");
    assert_eq!(p, props);
    assert_eq!(body, b"30");
    sim.broker.send_content(
        ch.0,
        frames::basic_return(312, "NO_ROUTE", "", "rpc_queue"),
        &p,
        &body,
    );
    sim.pump();
    let events = sim.take_events();
    let [Event::Returned(r)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(r.channel, ch);
    assert_eq!(r.reply_code, ReplyCode::NO_ROUTE);
    assert_eq!(r.reply_text, "NO_ROUTE");
    assert_eq!(r.routing_key, "rpc_queue");
    assert_eq!(r.properties, props);
    assert_eq!(&r.body[..], b"30");
}

#[test]
fn large_publish_is_split_at_frame_max() {
    let (mut sim, _) = Sim::connected_with(
        config(),
        HandshakeScript {
            frame_max: 4096,
            ..HandshakeScript::default()
        },
    );
    let ch = sim.open_channel();
    let body = vec![9u8; 3 * 4088 + 1];
    sim.client
        .publish(ch, "", "q", false, &BasicProperties::default(), &body)
        .expect("publish");
    sim.pump();
    // The broker checks every frame against frame_max 4096; four body frames arrive.
    let (_, _, _, got) = sim.broker.expect_publish();
    assert_eq!(got, body);
}

#[test]
fn confirms_with_multiple_settle_every_publish_up_to_the_tag() {
    let mut sim = Sim::connected(config());
    let ch = sim.open_channel();
    let select = sim.client.confirm_select(ch).expect("select");
    let seqs: Vec<_> = (0..6)
        .map(|_| {
            sim.client
                .publish(ch, "", "q", false, &BasicProperties::default(), b"m")
                .expect("publish")
        })
        .collect();
    assert_eq!(
        seqs,
        (1..=6).map(|n| Some(DeliveryTag(n))).collect::<Vec<_>>()
    );
    sim.pump();
    assert!(matches!(
        sim.broker.expect_method(),
        (1, AMQPClass::Confirm(confirm::AMQPMethod::Select(_)))
    ));
    sim.broker.send(ch.0, frames::select_ok());
    sim.broker.send(ch.0, frames::ack(3, true));
    sim.broker.send(ch.0, frames::nack(5, false));
    sim.broker.send(ch.0, frames::ack(4, false));
    // A duplicate or stale confirm settles nothing.
    sim.broker.send(ch.0, frames::ack(2, false));
    sim.broker.send(ch.0, frames::nack(6, true));
    sim.pump();
    let confirm = |n, acked| Event::PublishConfirmed {
        channel: ch,
        seq: DeliveryTag(n),
        acked,
    };
    assert_eq!(
        sim.take_events(),
        vec![
            Event::Completed {
                request: select,
                channel: ch,
                reply: Reply::ConfirmSelected
            },
            confirm(1, true),
            confirm(2, true),
            confirm(3, true),
            confirm(5, false),
            confirm(4, true),
            confirm(6, false),
        ]
    );
}

#[test]
fn confirm_on_a_channel_without_confirm_mode_is_a_protocol_error() {
    let mut sim = Sim::connected(config());
    let ch = sim.open_channel();
    sim.broker.send(ch.0, frames::ack(1, false));
    sim.pump();
    assert!(matches!(
        sim.take_events()[..],
        [Event::Closed(ConnectionError::Protocol {
            code: ReplyCode::COMMAND_INVALID,
            ..
        })]
    ));
    assert_eq!(sim.broker.expect_connection_close().0, 503);
}

// ---------------------------------------------------------------------------------------------
// Connection-level flow and close
// ---------------------------------------------------------------------------------------------

#[test]
fn blocked_and_unblocked() {
    let mut sim = Sim::connected(config());
    sim.broker.send(0, frames::blocked("low on memory"));
    sim.pump();
    assert!(sim.client.is_blocked());
    sim.broker.send(0, frames::unblocked());
    sim.pump();
    assert!(!sim.client.is_blocked());
    assert_eq!(
        sim.take_events(),
        vec![
            Event::Blocked {
                reason: "low on memory".into()
            },
            Event::Unblocked
        ]
    );
}

/// Blocked after our close went out: the broker reads nothing any more, so the close ends at
/// once instead of after the close timeout.
#[test]
fn blocked_while_closing_ends_the_close_at_once() {
    let mut sim = Sim::connected(config());
    let now = sim.now;
    sim.client.close(now).expect("open");
    sim.pump();
    sim.broker.send(0, frames::blocked("low on memory"));
    sim.pump();
    assert_eq!(
        sim.client.poll_timeout(),
        Some(now),
        "still waiting for close-ok"
    );
    sim.advance(Duration::from_millis(1));
    assert!(sim.client.is_closed());
}

/// Durations too large for an `Instant` mean "never", not a panic.
#[test]
fn duration_max_timeouts_do_not_panic() {
    let mut sim = Sim::connected({
        let mut c = config();
        c.close_timeout = Duration::MAX;
        c.handshake_timeout = Duration::MAX;
        c.heartbeat = Duration::MAX;
        c
    });
    let now = sim.now;
    sim.client.close(now).expect("open");
    sim.pump();
    assert!(!sim.client.is_closed());
}

#[test]
fn broker_initiated_close_is_answered_and_sticky() {
    let mut sim = Sim::connected(config());
    let ch = sim.open_channel();
    let declare = sim
        .client
        .declare_queue(ch, "q", QueueOptions::default(), FieldTable::default())
        .expect("declare");
    let _ = declare;
    sim.pump();
    sim.broker.expect_method();
    let text = "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'";
    sim.broker.send(0, frames::close(320, text));
    sim.pump();
    let error = ConnectionError::ClosedByServer {
        code: ReplyCode::CONNECTION_FORCED,
        text: text.into(),
    };
    assert_eq!(sim.take_events(), vec![Event::Closed(error.clone())]);
    assert!(matches!(
        sim.broker.expect_method(),
        (0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))
    ));
    assert!(sim.client.is_closed());
    assert_eq!(sim.client.error(), Some(&error));
    assert_eq!(
        sim.client.open_channel(),
        Err(UsageError::ConnectionClosed(error.clone()))
    );
    assert_eq!(
        sim.client
            .publish(ch, "", "q", false, &BasicProperties::default(), b""),
        Err(UsageError::ConnectionClosed(error.clone()))
    );
    assert_eq!(
        sim.client.close(sim.now),
        Err(UsageError::ConnectionClosed(error))
    );
    // Nothing follows Closed, whatever arrives.
    sim.broker.send_heartbeat();
    sim.pump();
    sim.eof();
    assert!(sim.events.is_empty());
}

#[test]
fn application_close_waits_for_close_ok() {
    let mut sim = Sim::connected(config());
    sim.client.close(sim.now).expect("close");
    assert_eq!(sim.client.open_channel(), Err(UsageError::Closing));
    assert_eq!(sim.client.close(sim.now), Err(UsageError::Closing));
    sim.pump();
    assert_eq!(sim.broker.expect_connection_close().0, 200);
    assert!(sim.events.is_empty());
    sim.broker.send(0, frames::close_ok());
    sim.pump();
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::ClosedByApplication)]
    );
    assert!(sim.client.is_closed());
}

#[test]
fn application_close_gives_up_after_close_timeout() {
    let mut sim = Sim::connected({
        let mut c = config();
        c.close_timeout = secs(5);
        c
    });
    sim.client.close(sim.now).expect("close");
    sim.pump();
    sim.advance(Duration::from_millis(4_999));
    assert!(sim.events.is_empty());
    sim.advance(Duration::from_millis(1));
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::ClosedByApplication)]
    );
}

#[test]
fn closes_that_cross_end_the_connection() {
    let mut sim = Sim::connected(config());
    sim.client.close(sim.now).expect("close");
    sim.pump();
    sim.broker.expect_connection_close();
    sim.broker.send(0, frames::close(320, "shutdown"));
    sim.pump();
    assert!(matches!(
        sim.broker.expect_method(),
        (0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))
    ));
    assert!(sim.client.is_closed());
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::ClosedByServer {
            code: ReplyCode::CONNECTION_FORCED,
            text: "shutdown".into()
        })]
    );
}

#[test]
fn eof_while_open_is_connection_lost() {
    let mut sim = Sim::connected(config());
    sim.eof();
    assert_eq!(
        sim.take_events(),
        vec![Event::Closed(ConnectionError::ConnectionLost)]
    );
    assert!(sim.client.is_closed());
}

#[test]
fn closing_a_channel_mid_delivery_discards_the_rest() {
    let (mut sim, ch) = consuming(Chunking::Whole, config());
    // Method and header arrive, the body is still on its way when the application closes.
    sim.broker
        .send(ch.0, frames::deliver("c", 1, false, "", "q"));
    let content = frames::content(ch.0, &BasicProperties::default(), 10, &[5; 10], 4096);
    let body_at = content.len() - 18; // one body frame: 7 + 10 + 1 bytes
    sim.broker.send_raw(&content[..body_at]);
    sim.pump();
    sim.client.close_channel(ch).expect("close");
    sim.pump();
    sim.broker.expect_method();
    sim.broker.send_raw(&content[body_at..]);
    sim.broker.send(ch.0, frames::channel_close_ok());
    sim.pump();
    assert!(matches!(
        sim.take_events()[..],
        [Event::ChannelClosed(ChannelError {
            initiator: Initiator::Client,
            ..
        })]
    ));
    assert!(sim.client.is_open());
}
