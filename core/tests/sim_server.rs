//! Simulation of the RPC server's rules against the in-memory broker, in virtual time: what
//! happens to a reply that cannot be published, to a request that keeps killing its server, to
//! requests under clock skew, and to replies that finish after the server's channel was re-armed.

// In a test an unwrap is an assertion.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use amqp_rpc_core::rpc::{
    CallId, CallRequest, DropReason, HandlerError, ReplyMode, Request, Response, RpcClient,
    RpcReply, RpcServer, ServerConfig, ServerEvent, UnixMillis, ERROR_HEADER, REJECTED_HEADER,
    REPLY_TOO_LARGE,
};
use amqp_rpc_core::types::{AMQPValue, BasicProperties, FieldTable, ShortString};
use amqp_rpc_core::{ConnectionConfig, RpcError};
use bytes::Bytes;

use amqp_rpc_sim::broker::Broker;
use amqp_rpc_sim::rpc::*;

const Q: &str = "rpc";

/// One client, one server, one broker, one virtual clock; the server's wall clock may be skewed
/// from the client's.
struct Sim {
    base: Instant,
    now: Instant,
    broker: Broker,
    client: Wire<RpcClient>,
    server: Wire<RpcServer>,
    /// Added to the client's wall clock to give the server's (negative: the server is behind).
    skew_ms: i64,
    ended: Vec<(CallId, Result<RpcReply, RpcError>)>,
    server_events: Vec<ServerEvent>,
}

impl Sim {
    fn new(config: ServerConfig, conn: ConnectionConfig) -> Self {
        let base = base_instant();
        let mut broker = Broker::new();
        broker.declare(Q);
        let client = Wire::new(
            RpcClient::new(
                client_config(ReplyMode::DirectReplyTo),
                conn_config(),
                sim_key(),
                base,
            ),
            &mut broker,
        );
        let server = Wire::new(RpcServer::new(config, conn, base), &mut broker);
        let mut sim = Self {
            base,
            now: base,
            broker,
            client,
            server,
            skew_ms: 0,
            ended: Vec::new(),
            server_events: Vec::new(),
        };
        sim.settle();
        assert!(sim.server.m.is_serving());
        sim
    }

    fn default() -> Self {
        Self::new(ServerConfig::new(Q), conn_config())
    }

    fn collect(&mut self) {
        collect_call_ends(&mut self.client.m, &mut self.ended);
        self.server_events.extend(server_events(&mut self.server.m));
        self.broker.assert_no_violations();
    }

    fn settle(&mut self) {
        let now = self.now;
        let mut broker = std::mem::take(&mut self.broker);
        settle(&mut broker, now, &mut [&mut self.client, &mut self.server]);
        self.broker = broker;
        self.collect();
    }

    fn advance(&mut self, d: Duration) {
        let to = self.now + d;
        let mut now = self.now;
        let mut broker = std::mem::take(&mut self.broker);
        advance(
            &mut broker,
            &mut now,
            to,
            &mut [&mut self.client, &mut self.server],
            |_, _| {},
        );
        self.broker = broker;
        self.now = now;
        self.collect();
    }

    fn call(&mut self, body: &str, timeout_ms: u64) -> CallId {
        let request = CallRequest::new(Q, body.to_owned(), Duration::from_millis(timeout_ms));
        let wall = wall(self.base, self.now);
        let id = self.client.m.call(self.now, wall, request).unwrap();
        self.settle();
        id
    }

    fn server_wall(&self) -> UnixMillis {
        let client = wall(self.base, self.now).0;
        UnixMillis(client.checked_add_signed(self.skew_ms).unwrap())
    }

    fn take(&mut self) -> Option<Request> {
        let (now, wall) = (self.now, self.server_wall());
        let r = self.server.m.poll_request(now, wall);
        self.settle();
        r
    }

    fn reply(&mut self, req: Request, result: Result<Bytes, HandlerError>) {
        self.reply_with(req, result.map(Response::from));
    }

    fn reply_with(&mut self, req: Request, result: Result<Response, HandlerError>) {
        let now = self.now;
        self.server.m.reply(now, req.token, result);
        self.settle();
    }

    fn result(&self, id: CallId) -> Option<&Result<RpcReply, RpcError>> {
        self.ended.iter().find(|(c, _)| *c == id).map(|(_, r)| r)
    }

    fn ok(&self, id: CallId) -> &[u8] {
        match self.result(id) {
            Some(Ok(reply)) => &reply.body,
            other => panic!("{id:?}: expected a reply, got {other:?}"),
        }
    }

    fn remote_code(&self, id: CallId) -> &str {
        match self.result(id) {
            Some(Err(RpcError::Remote { code, .. })) => code,
            other => panic!("{id:?}: expected a remote error, got {other:?}"),
        }
    }

    fn server_channel(&self) -> u16 {
        let chans = self.broker.consumer_channels(self.server.conn);
        assert_eq!(chans.len(), 1, "one consumer channel: {chans:?}");
        chans[0]
    }

    fn dropped(&self) -> Vec<(DropReason, Option<String>)> {
        self.server_events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Dropped {
                    reason,
                    correlation_id,
                } => Some((*reason, correlation_id.clone())),
                _ => None,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Case 3: replies that cannot be published, and poison messages
// ---------------------------------------------------------------------------------------------

/// A reply body above the broker's `max_message_size` is never published as it is (the broker
/// would close the channel and requeue the request, forever): the caller gets a
/// `reply_too_large` error reply at once, the request is acked once, the channel stays up and
/// another request in flight is answered normally.
#[test]
fn oversized_reply_body_becomes_reply_too_large() {
    let mut conn = conn_config();
    conn.max_message_size = 1000;
    let mut sim = Sim::new(
        {
            let mut c = ServerConfig::new(Q);
            c.prefetch = 2;
            c
        },
        conn,
    );
    let channel = sim.server_channel();
    let big = sim.call("big", 5000);
    let small = sim.call("small", 5000);
    let big_req = sim.take().unwrap();
    let small_req = sim.take().unwrap();
    sim.reply(big_req, Ok(Bytes::from(vec![b'x'; 2000])));
    assert_eq!(sim.remote_code(big), REPLY_TOO_LARGE, "told at once");
    sim.reply(small_req, Ok(Bytes::from("fine")));
    assert_eq!(sim.ok(small), b"fine");
    assert_eq!(sim.server_channel(), channel, "the channel never closed");
    assert_eq!(sim.broker.unacked(sim.server.conn), 0, "both acked");
    assert_eq!(sim.broker.queue_len(Q), 0, "nothing requeued");
    let stats = sim.server.m.stats();
    assert_eq!(stats.replies_too_large, 1);
    assert_eq!(stats.replied_error, 1);
    assert_eq!(stats.replied_ok, 1);
    assert!(sim
        .server_events
        .iter()
        .any(|e| matches!(e, ServerEvent::ReplyTooLarge { .. })));
}

/// An error reply whose header does not fit in frame_max (a handler's huge error code) is
/// replaced by a `reply_too_large` error reply instead of being acked without a reply.
#[test]
fn oversized_reply_header_becomes_reply_too_large() {
    let mut sim = Sim::default();
    let id = sim.call("x", 5000);
    let req = sim.take().unwrap();
    let code = "c".repeat(200_000);
    sim.reply(
        req,
        Err(HandlerError::Failed {
            code,
            message: "m".into(),
        }),
    );
    assert_eq!(sim.remote_code(id), REPLY_TOO_LARGE);
    assert_eq!(sim.broker.unacked(sim.server.conn), 0);
    assert_eq!(sim.broker.queue_len(Q), 0);
    assert_eq!(sim.server.m.stats().replies_too_large, 1);
}

// ---------------------------------------------------------------------------------------------
// Reply properties set by a handler
// ---------------------------------------------------------------------------------------------

/// A handler's content type, content encoding and headers reach the caller with the body, but
/// the protocol's properties stay the server's: the reply keeps the request's correlation id
/// (a [`Response`] has no field for it), and error headers a handler puts on a successful
/// reply are dropped, so that the caller does not read it as an error reply.
#[test]
fn reply_properties_reach_the_caller_but_not_the_protocol_ones() {
    let mut sim = Sim::default();
    let id = sim.call("q", 5000);
    let req = sim.take().unwrap();
    let sent = req.properties.correlation_id().clone();
    let response = Response::new("{\"n\":1}")
        .with_content_type(ShortString::from("application/json"))
        .with_content_encoding(ShortString::from("identity"))
        .with_header(
            ShortString::from("x-app"),
            AMQPValue::LongString("v1".into()),
        )
        .with_header(
            ShortString::from(ERROR_HEADER),
            AMQPValue::LongString("forged".into()),
        )
        .with_header(ShortString::from(REJECTED_HEADER), AMQPValue::Boolean(true));
    sim.reply_with(req, Ok(response));
    let reply = match sim.result(id) {
        Some(Ok(reply)) => reply.clone(),
        other => panic!("expected a reply, got {other:?}"),
    };
    assert_eq!(&reply.body[..], b"{\"n\":1}");
    let props = &reply.properties;
    assert_eq!(
        props.content_type().as_ref().map(ShortString::as_str),
        Some("application/json")
    );
    assert_eq!(
        props.content_encoding().as_ref().map(ShortString::as_str),
        Some("identity")
    );
    assert_eq!(
        props.correlation_id(),
        &sent,
        "the request's correlation id"
    );
    let headers = props.headers().as_ref().unwrap().inner();
    assert_eq!(
        headers.get("x-app"),
        Some(&AMQPValue::LongString("v1".into()))
    );
    assert!(!headers.contains_key(ERROR_HEADER));
    assert!(!headers.contains_key(REJECTED_HEADER));
    let stats = sim.server.m.stats();
    assert_eq!((stats.replied_ok, stats.replied_error), (1, 0));
}

/// A reply given as bytes goes out as before: no content type, no headers.
#[test]
fn a_bytes_reply_carries_no_extra_properties() {
    let mut sim = Sim::default();
    let id = sim.call("q", 5000);
    let req = sim.take().unwrap();
    sim.reply(req, Ok(Bytes::from("plain")));
    let reply = match sim.result(id) {
        Some(Ok(reply)) => reply.clone(),
        other => panic!("expected a reply, got {other:?}"),
    };
    assert_eq!(&reply.body[..], b"plain");
    assert_eq!(reply.properties.content_type(), &None);
    assert_eq!(reply.properties.headers(), &None);
}

fn with_delivery_count(count: i64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-delivery-count"),
        AMQPValue::LongLongInt(count),
    );
    BasicProperties::default()
        .with_reply_to(ShortString::from("replies"))
        .with_correlation_id(ShortString::from(format!("poison-{count}")))
        .with_headers(headers)
}

/// On a quorum queue the broker counts deliveries (`x-delivery-count`): a request delivered
/// more than `max_deliveries` times is rejected without requeue (dead-lettered where the queue
/// has a DLX), never run; one under the limit runs.
#[test]
fn request_over_the_broker_delivery_count_is_rejected() {
    let mut sim = Sim::default();
    // The 6th delivery (5 before it) of a request, with max_deliveries 5.
    assert!(sim.broker.publish(Q, with_delivery_count(5), b"poison"));
    sim.settle();
    assert!(sim.take().is_none(), "not run");
    assert_eq!(sim.broker.unacked(sim.server.conn), 0, "settled");
    assert_eq!(sim.broker.queue_len(Q), 0, "not requeued");
    assert_eq!(sim.server.m.stats().dropped_too_many_deliveries, 1);
    assert_eq!(
        sim.dropped(),
        vec![(
            DropReason::TooManyDeliveries { deliveries: 6 },
            Some("poison-5".to_owned())
        )]
    );
    // The 5th delivery still runs.
    assert!(sim.broker.publish(Q, with_delivery_count(4), b"ok"));
    sim.settle();
    let req = sim.take().expect("runs");
    sim.reply(req, Ok(Bytes::from("done")));
    assert_eq!(sim.broker.unacked(sim.server.conn), 0);
}

/// On a classic queue the broker only says "redelivered": the server counts itself the
/// deliveries whose channel died while a handler had them, so a request that kills the channel
/// each time (say, with a reply the broker refuses) runs `max_deliveries` times and is then
/// rejected without requeue, instead of circling forever.
#[test]
fn request_whose_channel_keeps_dying_is_rejected_after_max_deliveries() {
    let mut sim = Sim::new(
        {
            let mut c = ServerConfig::new(Q);
            c.max_deliveries = 3;
            c
        },
        conn_config(),
    );
    let id = sim.call("poison", 60_000);
    for run in 1..=3 {
        let req = sim.take().unwrap_or_else(|| panic!("run {run}"));
        let channel = sim.server_channel();
        sim.broker
            .close_channel(sim.server.conn, channel, 406, "PRECONDITION_FAILED");
        sim.settle();
        assert!(sim.server.m.is_serving(), "re-armed after run {run}");
        // The handler ends after its channel died: the token is stale.
        let now = sim.now;
        sim.server.m.abandon(now, req.token);
        sim.settle();
    }
    assert!(sim.take().is_none(), "the 4th delivery is not run");
    assert_eq!(sim.broker.queue_len(Q), 0, "rejected without requeue");
    assert_eq!(sim.broker.unacked(sim.server.conn), 0);
    assert_eq!(sim.server.m.stats().dropped_too_many_deliveries, 1);
    assert!(matches!(
        sim.dropped()[..],
        [(DropReason::TooManyDeliveries { deliveries: 4 }, _)]
    ));
    assert!(sim.result(id).is_none(), "its caller times out");
}

/// A reply handle dropped unanswered gives the request back until `max_deliveries`, then it is
/// rejected for good.
#[test]
fn abandoned_request_is_requeued_until_max_deliveries() {
    let mut sim = Sim::new(
        {
            let mut c = ServerConfig::new(Q);
            c.max_deliveries = 3;
            c
        },
        conn_config(),
    );
    sim.call("x", 60_000);
    for _ in 0..3 {
        let req = sim.take().expect("delivered");
        let now = sim.now;
        sim.server.m.abandon(now, req.token);
        sim.settle();
    }
    assert!(sim.take().is_none());
    let abandoned: Vec<_> = sim
        .server_events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Abandoned { requeued } => Some(*requeued),
            _ => None,
        })
        .collect();
    assert_eq!(abandoned, vec![true, true, false]);
    assert_eq!(sim.broker.queue_len(Q), 0);
    assert_eq!(sim.broker.unacked(sim.server.conn), 0);
}

// ---------------------------------------------------------------------------------------------
// Case 10: clock skew
// ---------------------------------------------------------------------------------------------

/// The server's clock runs 1.5 s ahead of the caller's, within the tolerance: by the caller's
/// absolute deadline the 1 s call has expired on arrival, but its relative budget
/// (`expiration`) has not, so it runs and is answered.
#[test]
fn server_clock_ahead_within_tolerance_still_runs_requests() {
    let mut sim = Sim::default();
    sim.skew_ms = 1500;
    let id = sim.call("x", 1000);
    sim.advance(Duration::from_millis(100));
    let req = sim.take().expect("run, not dropped as expired");
    assert!(req.deadline.is_some_and(|d| d > sim.now));
    sim.reply(req, Ok(Bytes::from("y")));
    assert_eq!(sim.ok(id), b"y");
    assert_eq!(sim.server.m.stats().dropped_expired, 0);
}

/// The tolerance is the server's to set: with 20 s, a server 10 s ahead still runs requests.
#[test]
fn clock_skew_tolerance_is_configurable() {
    let mut sim = Sim::new(
        {
            let mut c = ServerConfig::new(Q);
            c.clock_skew_tolerance = Duration::from_secs(20);
            c
        },
        conn_config(),
    );
    sim.skew_ms = 10_000;
    let id = sim.call("x", 1000);
    let req = sim.take().expect("run");
    sim.reply(req, Ok(Bytes::from("y")));
    assert_eq!(sim.ok(id), b"y");
}

/// The server's clock runs 10 s behind the caller's: by the absolute deadline a request that
/// waited 2 s in the prefetch buffer still has 9 s, but its relative budget of 1 s ran out, so
/// it is dropped, counted and reported with its correlation id, never run.
#[test]
fn server_clock_behind_drops_requests_by_their_relative_budget() {
    let mut sim = Sim::new(
        {
            let mut c = ServerConfig::new(Q);
            c.prefetch = 2;
            c
        },
        conn_config(),
    );
    sim.skew_ms = -10_000;
    let slow = sim.call("slow", 5000);
    let quick = sim.call("quick", 1000);
    let first = sim.take().unwrap();
    sim.advance(Duration::from_secs(2));
    assert_eq!(sim.result(quick), Some(&Err(RpcError::TimedOut)));
    sim.reply(first, Ok(Bytes::from("s")));
    assert_eq!(sim.ok(slow), b"s");
    assert!(sim.take().is_none(), "the expired request is not run");
    assert_eq!(sim.server.m.stats().dropped_expired, 1);
    let dropped = sim.dropped();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].0, DropReason::Expired);
    assert!(dropped[0].1.is_some(), "reported with its correlation id");
    assert_eq!(sim.broker.unacked(sim.server.conn), 0);
}

/// The handler's deadline is the request's: the earlier of the relative budget and the
/// absolute deadline plus the tolerance.
#[test]
fn request_deadline_combines_both_budgets() {
    let mut sim = Sim::default();
    let id = sim.call("x", 10_000);
    let req = sim.take().unwrap();
    // No skew: the relative budget (10 s from arrival) is the earlier.
    assert_eq!(req.deadline, Some(sim.now + Duration::from_secs(10)));
    sim.reply(req, Ok(Bytes::new()));
    assert!(sim.result(id).is_some());
    // Server 5 s ahead (beyond the 2 s tolerance): the absolute deadline is the earlier.
    sim.skew_ms = 5000;
    sim.call("y", 10_000);
    let req = sim.take().unwrap();
    assert_eq!(req.deadline, Some(sim.now + Duration::from_secs(7)));
    sim.reply(req, Ok(Bytes::new()));
}

// ---------------------------------------------------------------------------------------------
// Case 11: replies after a re-arm
// ---------------------------------------------------------------------------------------------

/// The server's channel closes while a handler runs; the server re-arms on a new channel and
/// the broker requeues the request. When the handler finishes, its reply still goes out (on
/// the new channel: a reply does not depend on the delivery's channel) and its caller hears at
/// once; only the ack is void. The redelivered copy runs again and its reply is a duplicate the
/// client drops.
#[test]
fn reply_after_channel_rearm_reaches_the_caller_at_once() {
    let mut sim = Sim::default();
    let id = sim.call("x", 60_000);
    let old = sim.take().unwrap();
    let channel = sim.server_channel();
    sim.broker
        .close_channel(sim.server.conn, channel, 406, "PRECONDITION_FAILED");
    sim.settle();
    assert!(sim.server.m.is_serving());
    sim.reply(old, Ok(Bytes::from("first")));
    assert_eq!(sim.ok(id), b"first", "told at once, not at its timeout");
    assert_eq!(sim.server.m.stats().stale_replies, 1);
    // The redelivered copy waited for the first run and is answered from its reply.
    assert!(sim.take().is_none(), "not run twice");
    assert_eq!(sim.server.m.stats().reply_cache_hits, 1);
    assert_eq!(sim.ok(id), b"first", "ended once");
    assert_eq!(sim.client.m.stats().calls_answered, 1);
    assert_eq!(sim.broker.unacked(sim.server.conn), 0);
    assert_eq!(sim.broker.queue_len(Q), 0);
}

/// The same after a reconnect of the server's connection.
#[test]
fn reply_after_reconnect_reaches_the_caller_at_once() {
    let mut sim = Sim::default();
    let id = sim.call("x", 60_000);
    let old = sim.take().unwrap();
    sim.broker
        .close_connection(sim.server.conn, 320, "CONNECTION_FORCED");
    sim.settle();
    // Disconnected: no channel is usable yet.
    let now = sim.now;
    sim.server.m.reconnect(now).unwrap();
    sim.server.redial(&mut sim.broker);
    sim.settle();
    assert!(sim.server.m.is_serving());
    sim.reply(old, Ok(Bytes::from("first")));
    assert_eq!(sim.ok(id), b"first");
    assert!(sim.take().is_none(), "answered from the first run's reply");
    assert_eq!(sim.server.m.stats().reply_cache_hits, 1);
    assert_eq!(sim.broker.unacked(sim.server.conn), 0);
    assert_eq!(sim.broker.queue_len(Q), 0);
}

/// A handler that finishes while the server has no connection at all: the reply cannot go
/// out; it is counted, and the redelivered copy answers the caller after the reconnect.
#[test]
fn reply_without_any_usable_channel_is_counted_lost() {
    let mut sim = Sim::default();
    let id = sim.call("x", 60_000);
    let old = sim.take().unwrap();
    sim.broker.drop_connection(sim.server.conn);
    sim.settle();
    sim.reply(old, Ok(Bytes::from("lost")));
    let stats = sim.server.m.stats();
    assert_eq!((stats.stale_replies, stats.stale_replies_lost), (1, 1));
    assert!(sim.result(id).is_none());
    let now = sim.now;
    sim.server.m.reconnect(now).unwrap();
    sim.server.redial(&mut sim.broker);
    sim.settle();
    let again = sim.take().expect("redelivered");
    sim.reply(again, Ok(Bytes::from("again")));
    assert_eq!(sim.ok(id), b"again");
}

// ---------------------------------------------------------------------------------------------
// Acks coalesced with `multiple` (AMQP 0-9-1 §1.8.3.13)
// ---------------------------------------------------------------------------------------------

impl Sim {
    /// Answers without moving bytes, so that several answers share one turn of the driver.
    fn reply_in_turn(&mut self, req: Request, body: &str) {
        let now = self.now;
        self.server.m.reply(
            now,
            req.token,
            Ok::<_, HandlerError>(Bytes::from(body.to_owned())),
        );
    }

    fn prefetch(prefetch: u16) -> Self {
        let mut config = ServerConfig::new(Q);
        config.prefetch = prefetch;
        Self::new(config, conn_config())
    }

    /// Ack frames the server's connection sent so far.
    fn ack_frames(&self) -> usize {
        let conn = self.server.conn;
        self.broker
            .acks
            .iter()
            .filter(|(c, _, _)| *c == conn)
            .count()
    }
}

/// Requests answered in one turn are acked by one `basic.ack` with `multiple` set, naming the
/// highest tag, after every reply of the turn.
#[test]
fn requests_answered_in_one_turn_are_acked_with_one_frame() {
    let mut sim = Sim::prefetch(4);
    let ids: Vec<CallId> = (0..4).map(|i| sim.call(&i.to_string(), 60_000)).collect();
    let reqs: Vec<Request> = (0..4).map(|_| sim.take().unwrap()).collect();
    let before = sim.ack_frames();
    for (i, req) in reqs.into_iter().enumerate() {
        sim.reply_in_turn(req, &format!("r{i}"));
    }
    sim.settle();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(sim.ok(*id), format!("r{i}").as_bytes());
    }
    assert_eq!(sim.broker.unacked(sim.server.conn), 0, "all four acked");
    assert_eq!(sim.ack_frames() - before, 1, "one ack frame for the turn");
}

/// A multiple ack covers every tag up to the one it names, so it must never reach past a
/// request whose handler still runs: requests answered out of order are acked, but the one
/// still running stays unacked (and is acked once when it is answered).
#[test]
fn out_of_order_answers_never_ack_a_running_request() {
    let mut sim = Sim::prefetch(4);
    let ids: Vec<CallId> = (0..4).map(|i| sim.call(&i.to_string(), 60_000)).collect();
    let mut reqs: Vec<Option<Request>> = (0..4).map(|_| sim.take()).collect();
    // The second runs on; the others finish, the last two first.
    for i in [3, 2, 0] {
        let req = reqs[i].take().unwrap();
        sim.reply_in_turn(req, &format!("r{i}"));
    }
    sim.settle();
    for i in [0, 2, 3] {
        assert_eq!(sim.ok(ids[i]), format!("r{i}").as_bytes());
    }
    assert!(sim.result(ids[1]).is_none());
    assert_eq!(
        sim.broker.unacked(sim.server.conn),
        1,
        "the running request is not acked"
    );
    assert_eq!(sim.server.m.in_flight(), 1);
    let req = reqs[1].take().unwrap();
    sim.reply(req, Ok(Bytes::from("r1")));
    assert_eq!(sim.ok(ids[1]), b"r1");
    assert_eq!(sim.broker.unacked(sim.server.conn), 0);
    assert_eq!(sim.broker.queue_len(Q), 0, "nothing requeued");
}

/// The channel closes while acks wait for the end of the turn: they are void (the broker
/// requeued those requests) and never sent on the channel opened next, where their tags would
/// be unknown (a 406). The replies went out on the reply channel, which stays open: the
/// callers hear at once. The requests run again and their second replies are duplicates.
#[test]
fn channel_loss_with_acks_waiting_requeues_the_requests() {
    let mut sim = Sim::prefetch(2);
    let ids: Vec<CallId> = (0..2).map(|i| sim.call(&i.to_string(), 60_000)).collect();
    let reqs: Vec<Request> = (0..2).map(|_| sim.take().unwrap()).collect();
    let channel = sim.server_channel();
    for (i, req) in reqs.into_iter().enumerate() {
        sim.reply_in_turn(req, &format!("first{i}"));
    }
    // The broker closes the consuming channel, and the server reads that before its next turn.
    sim.broker
        .close_channel(sim.server.conn, channel, 406, "PRECONDITION_FAILED");
    let out = sim.broker.take_output(sim.server.conn);
    let now = sim.now;
    sim.server.m.handle_input(now, &out);
    sim.settle();
    assert!(sim.server.m.is_serving());
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(sim.ok(*id), format!("first{i}").as_bytes(), "told at once");
    }
    // Redelivered on the new channel: answered again from the reply cache, not run; the
    // client drops the duplicates.
    assert!(sim.take().is_none(), "not run again");
    assert_eq!(sim.server.m.stats().reply_cache_hits, 2);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(sim.ok(*id), format!("first{i}").as_bytes(), "ended once");
    }
    assert_eq!(sim.client.m.stats().calls_answered, 2);
    assert_eq!(sim.broker.unacked(sim.server.conn), 0);
    assert_eq!(sim.broker.queue_len(Q), 0);
}

/// A shutdown in the turn that answered the last requests sends their acks before the
/// connection's close: nothing goes back to the queue.
#[test]
fn shutdown_sends_the_acks_waiting_before_closing() {
    let mut sim = Sim::prefetch(2);
    let ids: Vec<CallId> = (0..2).map(|i| sim.call(&i.to_string(), 60_000)).collect();
    let reqs: Vec<Request> = (0..2).map(|_| sim.take().unwrap()).collect();
    let now = sim.now;
    sim.server.m.shutdown(now);
    for (i, req) in reqs.into_iter().enumerate() {
        sim.reply_in_turn(req, &format!("r{i}"));
    }
    sim.settle();
    assert!(sim.server.m.is_stopped());
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(sim.ok(*id), format!("r{i}").as_bytes());
    }
    assert_eq!(
        sim.broker.queue_len(Q),
        0,
        "acked before the close, not requeued"
    );
}

// ---------------------------------------------------------------------------------------------
// The reply channel
// ---------------------------------------------------------------------------------------------

/// Replies go out on a channel of their own (see `RpcServer::publisher`). When the
/// broker closes that channel (say, a 403 on publishing), replies go on the consuming channel
/// from then on, and no new channel is opened for each reply.
#[test]
fn a_reply_channel_closed_by_the_broker_falls_back_to_the_consuming_channel() {
    let mut sim = Sim::default();
    let consuming = sim.server_channel();
    let open = sim.broker.open_channels(sim.server.conn);
    assert_eq!(
        open.len(),
        2,
        "the consuming channel and the reply channel: {open:?}"
    );
    let publisher = open.into_iter().find(|c| *c != consuming).unwrap();
    let id = sim.call("a", 60_000);
    let req = sim.take().unwrap();
    sim.reply(req, Ok(Bytes::from("one")));
    assert_eq!(sim.ok(id), b"one");

    sim.broker
        .close_channel(sim.server.conn, publisher, 403, "ACCESS_REFUSED");
    sim.settle();
    assert_eq!(sim.broker.open_channels(sim.server.conn), vec![consuming]);
    let ids: Vec<CallId> = (0..3).map(|i| sim.call(&i.to_string(), 60_000)).collect();
    for (i, id) in ids.into_iter().enumerate() {
        let req = sim.take().unwrap();
        sim.reply(req, Ok(Bytes::from(format!("r{i}"))));
        assert_eq!(sim.ok(id), format!("r{i}").as_bytes());
    }
    assert_eq!(sim.broker.open_channels(sim.server.conn), vec![consuming]);
    assert_eq!(sim.broker.unacked(sim.server.conn), 0);
    assert_eq!(sim.broker.queue_len(Q), 0);
}

/// Under a broker's `channel_max` of 1 there is no room for a reply channel: the server
/// consumes on its one channel and replies there, as it must (RabbitMQ closes the connection
/// for a channel number above `channel_max`).
#[test]
fn a_channel_max_of_one_replies_on_the_consuming_channel() {
    let base = base_instant();
    let mut broker = Broker::new();
    broker.channel_max = 1;
    broker.declare(Q);
    broker.declare("replies");
    let mut server = Wire::new(
        RpcServer::new(ServerConfig::new(Q), conn_config(), base),
        &mut broker,
    );
    settle(&mut broker, base, &mut [&mut server]);
    assert!(server.m.is_serving());
    assert_eq!(broker.open_channels(server.conn), vec![1]);
    for i in 0..3 {
        let properties = BasicProperties::default()
            .with_reply_to(ShortString::from("replies"))
            .with_correlation_id(ShortString::from(format!("c{i}")));
        assert!(broker.publish(Q, properties, b"x"));
        settle(&mut broker, base, &mut [&mut server]);
        let req = server.m.poll_request(base, wall(base, base)).unwrap();
        server.m.reply(
            base,
            req.token,
            Ok::<_, HandlerError>(Bytes::from(format!("r{i}"))),
        );
        settle(&mut broker, base, &mut [&mut server]);
        let reply = broker.take("replies").expect("the reply was routed");
        assert_eq!(reply.body, format!("r{i}").as_bytes());
    }
    assert_eq!(broker.unacked(server.conn), 0);
    broker.assert_no_violations();
}

// ---------------------------------------------------------------------------------------------
// Issue 20 item 1: every settle decision reaches the wire in the turn that made it
// ---------------------------------------------------------------------------------------------

/// A server driven the way `driver/src/io_loop.rs` drives it, without a client: requests are
/// published straight to the broker. One turn is the handler's `on_wake` (which takes
/// requests with `poll_request` while workers are free), then `poll_transmit`; a turn runs only when something wakes the loop (bytes from the broker, or
/// a handler's answer), as in the driver.
struct Driven {
    now: Instant,
    broker: Broker,
    server: Wire<RpcServer>,
    workers: usize,
    running: VecDeque<Request>,
}

const REPLIES: &str = "replies";

impl Driven {
    fn new(prefetch: u16, workers: usize) -> Self {
        let now = base_instant();
        let mut broker = Broker::new();
        broker.declare(Q);
        broker.declare(REPLIES);
        let mut config = ServerConfig::new(Q);
        config.prefetch = prefetch;
        let server = Wire::new(RpcServer::new(config, conn_config(), now), &mut broker);
        let mut d = Self {
            now,
            broker,
            server,
            workers,
            running: VecDeque::new(),
        };
        // The protocol header goes first, before any input.
        d.turn();
        d.run(100);
        assert!(d.server.m.is_serving());
        d
    }

    fn turn(&mut self) {
        let now = self.now;
        let wall = wall(base_instant(), now);
        while self.server.m.in_flight() < self.workers {
            match self.server.m.poll_request(now, wall) {
                Some(r) => self.running.push_back(r),
                None => break,
            }
        }
        let _ = server_events(&mut self.server.m);
        let mut buf = Vec::new();
        if self.server.m.poll_transmit(now, &mut buf) > 0 {
            self.broker.feed(self.server.conn, now, &buf);
        }
    }

    /// Runs up to `wakes` wakes, 5 ms apart: bytes from the broker first, else one handler's answer (the
    /// request's body echoed). Returns when nothing can wake the loop any more.
    fn run(&mut self, wakes: usize) {
        for _ in 0..wakes {
            let out = self.broker.take_output(self.server.conn);
            if !out.is_empty() {
                let now = self.now;
                self.server.m.handle_input(now, &out);
            } else if let Some(req) = self.running.pop_front() {
                let now = self.now;
                let body = req.body.clone();
                self.server
                    .m
                    .reply(now, req.token, Ok::<_, HandlerError>(body));
            } else {
                return;
            }
            // A turn takes a while: a request whose budget is a millisecond expires on the way.
            self.now += Duration::from_millis(5);
            self.turn();
        }
        panic!("still busy after {wakes} wakes");
    }

    fn publish(&mut self, properties: BasicProperties, body: &str) {
        assert!(self.broker.publish(Q, properties, body.as_bytes()));
    }

    fn good(&mut self, i: usize) {
        let properties = BasicProperties::default()
            .with_reply_to(ShortString::from(REPLIES))
            .with_correlation_id(ShortString::from(format!("c{i}")));
        self.publish(properties, &format!("r{i}"));
    }

    fn answered(&mut self) -> usize {
        std::iter::from_fn(|| self.broker.take(REPLIES)).count()
    }
}

/// One request the server drops without running, then 20 good ones, at prefetch 1: each drop
/// is acked in the turn that decided it, so the broker delivers the next request and all 20
/// are answered, with one worker or two.
fn a_dropped_request_does_not_stall_prefetch_one(bad: BasicProperties, reason: DropReason) {
    for workers in [1, 2] {
        let mut d = Driven::new(1, workers);
        d.publish(bad.clone(), "bad");
        for i in 0..20 {
            d.good(i);
        }
        d.run(1000);
        assert_eq!(d.answered(), 20, "{reason:?}, {workers} workers");
        assert_eq!(d.broker.queue_len(Q), 0);
        assert_eq!(d.broker.unacked(d.server.conn), 0);
        let stats = d.server.m.stats();
        let dropped =
            stats.dropped_no_reply_to + stats.dropped_expired + stats.dropped_too_many_deliveries;
        assert_eq!(dropped, 1, "{reason:?}");
        d.broker.assert_no_violations();
    }
}

#[test]
fn prefetch_one_survives_a_request_without_reply_to() {
    let bad = BasicProperties::default().with_correlation_id(ShortString::from("bad"));
    a_dropped_request_does_not_stall_prefetch_one(bad, DropReason::NoReplyTo);
}

#[test]
fn prefetch_one_survives_a_request_expired_by_its_deadline_header() {
    // A minute before the simulation's wall clock starts.
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(amqp_rpc_core::rpc::DEADLINE_HEADER),
        AMQPValue::LongLongInt(i64::try_from(WALL0).unwrap() - 60_000),
    );
    let bad = BasicProperties::default()
        .with_reply_to(ShortString::from(REPLIES))
        .with_correlation_id(ShortString::from("bad"))
        .with_headers(headers);
    a_dropped_request_does_not_stall_prefetch_one(bad, DropReason::Expired);
}

#[test]
fn prefetch_one_survives_a_request_expired_by_its_expiration() {
    let bad = BasicProperties::default()
        .with_reply_to(ShortString::from(REPLIES))
        .with_correlation_id(ShortString::from("bad"))
        .with_expiration(ShortString::from("1"));
    a_dropped_request_does_not_stall_prefetch_one(bad, DropReason::Expired);
}

#[test]
fn prefetch_one_survives_a_request_delivered_too_often() {
    let bad = with_delivery_count(10).with_reply_to(ShortString::from(REPLIES));
    a_dropped_request_does_not_stall_prefetch_one(
        bad,
        DropReason::TooManyDeliveries { deliveries: 11 },
    );
}

// ---------------------------------------------------------------------------------------------
// Issue 20 item 2: a request is acked only once its reply is confirmed
// ---------------------------------------------------------------------------------------------

impl Sim {
    /// The reply channel: the server's open channel that is not the consuming one.
    fn publisher_channel(&self) -> u16 {
        let consuming = self.server_channel();
        let open = self.broker.open_channels(self.server.conn);
        let others: Vec<u16> = open.into_iter().filter(|c| *c != consuming).collect();
        assert_eq!(others.len(), 1, "one reply channel: {others:?}");
        others[0]
    }

    /// Requests the broker delivered to the server so far.
    fn received(&self) -> u64 {
        self.server.m.stats().received
    }
}

/// The broker routes the reply at once but holds its confirm: the request stays unacked until
/// the confirm comes, then is acked.
#[test]
fn the_ack_waits_for_the_replys_confirm() {
    let mut sim = Sim::prefetch(2);
    let conn = sim.server.conn;
    sim.broker.hold_confirms(conn);
    let ids: Vec<CallId> = (0..2).map(|i| sim.call(&i.to_string(), 60_000)).collect();
    for i in 0..2 {
        let req = sim.take().unwrap();
        sim.reply(req, Ok(Bytes::from(format!("r{i}"))));
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(sim.ok(*id), format!("r{i}").as_bytes(), "routed at once");
    }
    assert_eq!(sim.broker.unacked(conn), 2, "no ack before the confirm");
    assert_eq!(sim.server.m.stats().replied_ok, 0, "counted when confirmed");
    sim.broker.release_confirms(conn);
    sim.settle();
    assert_eq!(sim.broker.unacked(conn), 0);
    assert_eq!(sim.server.m.stats().replied_ok, 2);
    assert_eq!(sim.broker.queue_len(Q), 0);
}

/// The reply channel dies while its confirms are held: neither request is acked; both replies
/// are published again on a fresh reply channel, one at a time, and acked once confirmed.
/// Nothing is requeued and no handler runs twice.
#[test]
fn a_reply_channel_death_never_acks_an_unconfirmed_reply() {
    let mut sim = Sim::prefetch(2);
    let conn = sim.server.conn;
    let publisher = sim.publisher_channel();
    sim.broker.hold_confirms(conn);
    let ids: Vec<CallId> = (0..2).map(|i| sim.call(&i.to_string(), 60_000)).collect();
    for i in 0..2 {
        let req = sim.take().unwrap();
        sim.reply(req, Ok(Bytes::from(format!("r{i}"))));
    }
    assert_eq!(sim.broker.unacked(conn), 2);
    // The held confirms die with the channel.
    sim.broker
        .close_channel(conn, publisher, 541, "INTERNAL_ERROR");
    sim.settle();
    assert_eq!(
        sim.broker.unacked(conn),
        2,
        "no ack for a reply the broker never confirmed"
    );
    // One at a time on the fresh channel: one republished, its confirm held.
    assert_eq!(sim.server.m.stats().replies_republished, 1);
    sim.broker.release_confirms(conn);
    sim.settle();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(sim.ok(*id), format!("r{i}").as_bytes());
    }
    assert_eq!(sim.broker.unacked(conn), 0, "acked once confirmed");
    assert_eq!(sim.broker.queue_len(Q), 0, "nothing requeued");
    assert_eq!(sim.received(), 2, "no redelivery");
    let stats = sim.server.m.stats();
    assert_eq!(stats.replied_ok, 2);
    assert_eq!(stats.replies_republished, 2);
    assert_ne!(sim.publisher_channel(), publisher, "a fresh reply channel");
}

/// The broker's `max_message_size` is lower than the server was told (1000 bytes, the server's
/// connection at the default 128 MiB): a 2000-byte reply among three good ones, all published
/// in one turn, makes the broker close the reply channel (406). No request is acked while its
/// reply is unconfirmed; the server reads the broker's limit from its words, and the oversized
/// reply becomes `reply_too_large` for its caller at once; the good replies behind it are
/// published again; nothing is requeued, no handler runs twice, and later oversized replies
/// become `reply_too_large` before they are published.
#[test]
fn a_reply_the_broker_refuses_for_its_size_becomes_reply_too_large() {
    let mut sim = Sim::prefetch(4);
    sim.broker.max_message_size = 1000;
    let conn = sim.server.conn;
    let ids: Vec<CallId> = (0..4).map(|i| sim.call(&i.to_string(), 60_000)).collect();
    let reqs: Vec<Request> = (0..4).map(|_| sim.take().unwrap()).collect();
    for (i, req) in reqs.into_iter().enumerate() {
        let body = if i == 1 {
            vec![b'x'; 2000]
        } else {
            format!("r{i}").into_bytes()
        };
        let now = sim.now;
        sim.server
            .m
            .reply(now, req.token, Ok::<_, HandlerError>(Bytes::from(body)));
    }
    sim.settle();
    assert_eq!(sim.remote_code(ids[1]), REPLY_TOO_LARGE);
    for i in [0, 2, 3] {
        assert_eq!(sim.ok(ids[i]), format!("r{i}").as_bytes());
    }
    assert_eq!(sim.broker.unacked(conn), 0);
    assert_eq!(sim.broker.queue_len(Q), 0, "nothing requeued");
    assert_eq!(sim.received(), 4, "no redelivery");
    let stats = sim.server.m.stats();
    assert_eq!(
        (
            stats.replied_ok,
            stats.replied_error,
            stats.replies_too_large
        ),
        (3, 1, 1),
        "{stats:?}"
    );
    // The limit is known now: the next oversized reply never reaches the broker.
    let publisher = sim.publisher_channel();
    let id = sim.call("big", 60_000);
    let req = sim.take().unwrap();
    sim.reply(req, Ok(Bytes::from(vec![b'y'; 1500])));
    assert_eq!(sim.remote_code(id), REPLY_TOO_LARGE);
    assert_eq!(sim.publisher_channel(), publisher, "the channel stayed up");
    assert_eq!(sim.server.m.stats().replies_too_large, 2);
}

/// A reply the broker refuses again when it is alone in flight, and not for its size, is the
/// culprit: its request is acked without a reply (reported, counted) so that it cannot circle,
/// and the server goes back to pipelining.
#[test]
fn a_culprit_refused_when_alone_is_settled_and_reported() {
    let mut sim = Sim::prefetch(2);
    let conn = sim.server.conn;
    let id = sim.call("a", 60_000);
    let req = sim.take().unwrap();
    sim.broker.hold_confirms(conn);
    sim.reply(req, Ok(Bytes::from("a")));
    // Twice: once pipelined (published again, alone), once alone (the culprit).
    for _ in 0..2 {
        let publisher = sim.publisher_channel();
        sim.broker
            .close_channel(conn, publisher, 406, "PRECONDITION_FAILED - refused");
        sim.settle();
    }
    sim.broker.release_confirms(conn);
    sim.settle();
    assert_eq!(sim.ok(id), b"a", "the first publish was routed");
    let stats = sim.server.m.stats();
    assert_eq!(stats.replies_refused, 1, "{stats:?}");
    assert_eq!(sim.broker.unacked(conn), 0, "settled, not requeued");
    assert_eq!(sim.broker.queue_len(Q), 0);
    assert!(sim.server_events.iter().any(|e| matches!(
        e,
        ServerEvent::ReplyRefused { error, .. } if error.code.0 == 406
    )));
    // Pipelining again on a fresh channel.
    let ids: Vec<CallId> = (0..2).map(|i| sim.call(&i.to_string(), 60_000)).collect();
    let reqs: Vec<Request> = (0..2).map(|_| sim.take().unwrap()).collect();
    for (i, req) in reqs.into_iter().enumerate() {
        sim.reply_in_turn(req, &format!("r{i}"));
    }
    sim.settle();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(sim.ok(*id), format!("r{i}").as_bytes());
    }
    assert_eq!(sim.broker.unacked(conn), 0);
}

/// A request whose `reply_to` is a forged direct reply-to name (`amq.rabbitmq.reply-to.x.y`)
/// among good calls. RabbitMQ 3.10 closes the whole connection (541) of whoever publishes to
/// such a name; the server recognises that it names no pid and drops the request (acked,
/// counted) instead of answering: the good calls are answered, the connection never closes.
#[test]
fn a_forged_direct_reply_to_is_dropped_not_answered() {
    let mut sim = Sim::prefetch(4);
    sim.broker.crash_on_dead_direct_reply_to = true;
    let conn = sim.server.conn;
    let mut ids = vec![sim.call("0", 60_000)];
    let forged = BasicProperties::default()
        .with_reply_to(ShortString::from("amq.rabbitmq.reply-to.x.y"))
        .with_correlation_id(ShortString::from("forged"));
    assert!(sim.broker.publish(Q, forged, b"f"));
    ids.extend((1..3).map(|i| sim.call(&i.to_string(), 60_000)));
    let reqs: Vec<Request> = std::iter::from_fn(|| sim.take()).collect();
    assert_eq!(reqs.len(), 3, "the forged one never runs");
    for req in reqs {
        let body = req.body.clone();
        sim.reply(req, Ok(body));
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(sim.ok(*id), i.to_string().as_bytes());
    }
    assert!(!sim.broker.is_dead(conn), "the connection stayed up");
    assert_eq!(sim.server.m.stats().dropped_bad_reply_to, 1);
    assert_eq!(
        sim.dropped(),
        [(DropReason::BadReplyTo, Some("forged".into()))]
    );
    assert_eq!(sim.broker.unacked(conn), 0);
    assert_eq!(sim.broker.queue_len(Q), 0);
}

// ---------------------------------------------------------------------------------------------
// Issue 20 item 3: a request whose reply went out is not run again
// ---------------------------------------------------------------------------------------------

/// The broker closes the consuming channel while a handler runs (as it does past its
/// `consumer_timeout`, 406): the request is redelivered at once, while the first run still
/// goes on. The redelivery waits for that run; its reply (published as a stale reply, since its
/// ack is void) is then cached and answers the redelivery too, which is acked once confirmed.
/// The handler ran once; the caller had one answer; nothing is left in the queue.
#[test]
fn a_redelivery_of_a_running_request_is_answered_from_its_reply() {
    let mut sim = Sim::prefetch(2);
    let conn = sim.server.conn;
    let id = sim.call("slow", 60_000);
    let req = sim.take().unwrap();
    let channel = sim.server_channel();
    sim.broker.close_channel(
        conn,
        channel,
        406,
        "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value \
         used: 5000 ms. This timeout value can be configured, see consumers doc guide to learn \
         more",
    );
    sim.settle();
    assert!(sim.server.m.is_serving());
    assert!(sim
        .server_events
        .iter()
        .any(|e| matches!(e, ServerEvent::AckTimedOut(error) if error.code.0 == 406)));
    assert!(
        sim.take().is_none(),
        "the redelivery does not run beside the first run"
    );
    sim.reply(req, Ok(Bytes::from("done")));
    assert_eq!(sim.ok(id), b"done");
    assert!(sim.take().is_none(), "never run twice");
    let stats = sim.server.m.stats();
    assert_eq!(stats.reply_cache_hits, 1, "{stats:?}");
    assert_eq!(stats.replied_ok, 1);
    assert_eq!(sim.broker.unacked(conn), 0, "the redelivery is acked");
    assert_eq!(sim.broker.queue_len(Q), 0);
    assert_eq!(sim.client.m.stats().calls_answered, 1);
}

/// The reply was confirmed but its ack lost with the consuming channel: the redelivered
/// request is answered again from the reply cache, without running.
#[test]
fn a_redelivery_after_the_reply_is_answered_from_the_cache() {
    let mut sim = Sim::prefetch(2);
    let conn = sim.server.conn;
    let id = sim.call("x", 60_000);
    let req = sim.take().unwrap();
    let channel = sim.server_channel();
    let now = sim.now;
    sim.server
        .m
        .reply(now, req.token, Ok::<_, HandlerError>(Bytes::from("once")));
    // The reply goes out and is confirmed; the channel closes before the ack leaves.
    let mut buf = Vec::new();
    sim.server.m.poll_transmit(now, &mut buf);
    sim.broker.feed(conn, now, &buf);
    let out = sim.broker.take_output(conn);
    sim.server.m.handle_input(now, &out);
    sim.broker.close_channel(
        conn,
        channel,
        406,
        "PRECONDITION_FAILED - unknown delivery tag 1",
    );
    let out = sim.broker.take_output(conn);
    sim.server.m.handle_input(now, &out);
    sim.settle();
    assert_eq!(sim.ok(id), b"once");
    assert!(sim.take().is_none(), "not run again");
    let stats = sim.server.m.stats();
    assert_eq!(
        (stats.reply_cache_hits, stats.replied_ok),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(sim.broker.unacked(conn), 0);
    assert_eq!(sim.broker.queue_len(Q), 0);
}

/// A shutdown whose last replies are never confirmed (the broker holds the confirms, as it
/// does for a connection it blocks) still finishes, at the connection's `close_timeout`: the
/// unconfirmed requests are not acked, so the broker requeues them rather than lose them.
#[test]
fn a_shutdown_stops_waiting_for_confirms_at_the_close_timeout() {
    let mut sim = Sim::prefetch(2);
    let conn = sim.server.conn;
    sim.broker.hold_confirms(conn);
    let ids: Vec<CallId> = (0..2).map(|i| sim.call(&i.to_string(), 60_000)).collect();
    for i in 0..2 {
        let req = sim.take().unwrap();
        sim.reply(req, Ok(Bytes::from(format!("r{i}"))));
    }
    let now = sim.now;
    sim.server.m.shutdown(now);
    sim.settle();
    assert!(!sim.server.m.is_stopped(), "waits for the confirms first");
    sim.advance(Duration::from_secs(6));
    assert!(sim.server.m.is_stopped(), "stopped at the close timeout");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(sim.ok(*id), format!("r{i}").as_bytes());
    }
    assert_eq!(sim.broker.queue_len(Q), 2, "unacked, so requeued");
}
