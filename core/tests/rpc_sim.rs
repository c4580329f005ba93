//! Simulation: RPC client(s) + RPC server(s) + the in-memory broker of `amqp_rpc_sim::broker`, in
//! virtual time, in both reply modes. One test per outcome of ARCHITECTURE §5 and per server duty.

// In a test an unwrap is an assertion.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use amqp_rpc_core::rpc::{
    CallId, CallRequest, ClientConfig, ClientEvent, HandlerError, ReplyMode, RpcClient, RpcReply,
    RpcServer, ServerEvent, DEADLINE_HEADER, DIRECT_REPLY_TO,
};
use amqp_rpc_core::types::{AMQPValue, BasicProperties, ShortString};
use amqp_rpc_core::{RpcError, UsageError};
use bytes::Bytes;

use amqp_rpc_sim::broker::Broker;
use amqp_rpc_sim::rpc::*;
use amqp_rpc_sim::xorshift;

const MODES: [ReplyMode; 2] = [ReplyMode::DirectReplyTo, ReplyMode::ExclusiveQueue];
const Q: &str = "rpc";

/// One client, any number of servers, one broker, one virtual clock.
struct Sim {
    base: Instant,
    now: Instant,
    broker: Broker,
    client: Wire<RpcClient>,
    servers: Vec<Wire<RpcServer>>,
    /// Every `CallEnded` seen, in order.
    ended: Vec<(CallId, Result<RpcReply, RpcError>)>,
    /// Other client events seen.
    other: Vec<ClientEvent>,
}

impl Sim {
    fn new(config: ClientConfig, servers: usize, prefetch: u16) -> Self {
        Self::with_connection(config, conn_config(), Broker::new(), servers, prefetch)
    }

    /// A simulation whose client has connection settings `conn`, on `broker`.
    fn with_connection(
        config: ClientConfig,
        conn: amqp_rpc_core::ConnectionConfig,
        mut broker: Broker,
        servers: usize,
        prefetch: u16,
    ) -> Self {
        let base = base_instant();
        // The queue exists before anyone serves it (as after a first server's declare).
        broker.declare(Q);
        let client = Wire::new(RpcClient::new(config, conn, sim_key(), base), &mut broker);
        let servers = (0..servers)
            .map(|_| {
                Wire::new(
                    RpcServer::new(server_config(Q, prefetch), conn_config(), base),
                    &mut broker,
                )
            })
            .collect();
        let mut sim = Self {
            base,
            now: base,
            broker,
            client,
            servers,
            ended: Vec::new(),
            other: Vec::new(),
        };
        sim.settle();
        sim
    }

    fn with_mode(mode: ReplyMode, servers: usize, prefetch: u16) -> Self {
        Self::new(client_config(mode), servers, prefetch)
    }

    fn wall(&self) -> amqp_rpc_core::rpc::UnixMillis {
        wall(self.base, self.now)
    }

    fn wires(&mut self) -> Vec<&mut dyn Step> {
        let mut wires: Vec<&mut dyn Step> = vec![&mut self.client];
        for s in &mut self.servers {
            wires.push(s);
        }
        wires
    }

    fn collect(&mut self) {
        let other = collect_call_ends(&mut self.client.m, &mut self.ended);
        self.other.extend(other);
        self.broker.assert_no_violations();
    }

    fn settle(&mut self) {
        let now = self.now;
        let mut broker = std::mem::take(&mut self.broker);
        settle(&mut broker, now, &mut self.wires());
        self.broker = broker;
        self.collect();
    }

    /// Advances virtual time by `d`, firing every timer at its exact instant.
    fn advance(&mut self, d: Duration) {
        let to = self.now + d;
        let mut now = self.now;
        let mut broker = std::mem::take(&mut self.broker);
        advance(&mut broker, &mut now, to, &mut self.wires(), |_, _| {});
        self.broker = broker;
        self.now = now;
        self.collect();
    }

    fn call(&mut self, body: &str, timeout_ms: u64) -> CallId {
        self.call_with(CallRequest::new(
            Q,
            body.to_owned(),
            Duration::from_millis(timeout_ms),
        ))
    }

    fn call_with(&mut self, request: CallRequest) -> CallId {
        let id = self
            .client
            .m
            .call(self.now, self.wall(), request)
            .expect("call accepted");
        self.settle();
        id
    }

    /// Server `i` takes its next request.
    fn take(&mut self, i: usize) -> Option<amqp_rpc_core::rpc::Request> {
        let (now, wall) = (self.now, self.wall());
        let r = self.servers[i].m.poll_request(now, wall);
        self.settle();
        r
    }

    fn reply(
        &mut self,
        i: usize,
        req: amqp_rpc_core::rpc::Request,
        result: Result<Bytes, HandlerError>,
    ) {
        let now = self.now;
        self.servers[i].m.reply(now, req.token, result);
        self.settle();
    }

    /// Takes and answers every request server `i` holds with "re:" + body.
    fn serve_all(&mut self, i: usize) -> usize {
        let mut n = 0;
        while let Some(req) = self.take(i) {
            let body = Bytes::from(format!("re:{}", String::from_utf8_lossy(&req.body)));
            self.reply(i, req, Ok(body));
            n += 1;
        }
        n
    }

    fn result(&self, id: CallId) -> &Result<RpcReply, RpcError> {
        &self
            .ended
            .iter()
            .find(|(c, _)| *c == id)
            .unwrap_or_else(|| panic!("{id:?} has not ended; ended: {:?}", self.ended))
            .1
    }

    fn is_pending(&self, id: CallId) -> bool {
        self.ended.iter().all(|(c, _)| *c != id)
    }

    fn reply_channel(&self) -> u16 {
        let chans = self.broker.consumer_channels(self.client.conn);
        assert_eq!(chans.len(), 1, "one reply channel: {chans:?}");
        chans[0]
    }
}

fn ok_body(r: &Result<RpcReply, RpcError>) -> &[u8] {
    match r {
        Ok(reply) => &reply.body,
        Err(e) => panic!("expected a reply, got {e:?}"),
    }
}

fn err(r: &Result<RpcReply, RpcError>) -> &RpcError {
    match r {
        Ok(reply) => panic!("expected an error, got {reply:?}"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// Ok, in both reply modes, with many calls in flight answered out of order by two servers,
/// input chunked at awkward sizes, and a call made before the client was ready.
#[test]
fn many_calls_in_flight_round_trip_in_both_modes() {
    for mode in MODES {
        for chunk in [None, Some(1), Some(7)] {
            let base = base_instant();
            let mut broker = Broker::new();
            broker.declare(Q);
            let mut servers: Vec<Wire<RpcServer>> = (0..2)
                .map(|_| {
                    let mut s = Wire::new(
                        RpcServer::new(server_config(Q, 10), conn_config(), base),
                        &mut broker,
                    );
                    s.chunk = chunk;
                    s
                })
                .collect();
            {
                let (a, b) = servers.split_at_mut(1);
                settle(&mut broker, base, &mut [&mut a[0], &mut b[0]]);
            }
            let mut client = Wire::new(
                RpcClient::new(client_config(mode), conn_config(), sim_key(), base),
                &mut broker,
            );
            client.chunk = chunk;
            // Called before the handshake: it waits for the reply path, which for direct
            // reply-to must be consumed before the first publish (the broker enforces it).
            let early = client
                .m
                .call(
                    base,
                    wall(base, base),
                    CallRequest::new(Q, "early", Duration::from_secs(5)),
                )
                .unwrap();
            let mut sim = Sim {
                base,
                now: base,
                broker,
                client,
                servers,
                ended: Vec::new(),
                other: Vec::new(),
            };
            sim.settle();
            assert!(sim.client.m.is_ready());
            assert!(sim.other.contains(&ClientEvent::Ready));
            let ids: Vec<CallId> = (0..40).map(|i| sim.call(&i.to_string(), 5000)).collect();
            assert_eq!(
                sim.client.m.in_flight(),
                41,
                "{:?} {:?}",
                &sim.ended[..3.min(sim.ended.len())],
                sim.other
            );
            // Server 1 answers its requests newest first, server 0 in order.
            let mut held = Vec::new();
            while let Some(r) = sim.take(1) {
                held.push(r);
            }
            while let Some(r) = held.pop() {
                let body = Bytes::from(format!("re:{}", String::from_utf8_lossy(&r.body)));
                sim.reply(1, r, Ok(body));
            }
            // Prefetch windows refill as requests are acked: serve until nothing is left.
            while sim.serve_all(0) + sim.serve_all(1) > 0 {}
            assert_eq!(ok_body(sim.result(early)), b"re:early");
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(ok_body(sim.result(*id)), format!("re:{i}").as_bytes());
            }
            let stats = sim.client.m.stats();
            assert_eq!(stats.calls_started, 41);
            assert_eq!(stats.calls_answered, 41);
            assert_eq!(stats.requests_sent, 41);
            assert_eq!(
                stats.replies_duplicate + stats.replies_late + stats.replies_unknown,
                0
            );
            assert_eq!(sim.client.m.in_flight(), 0);
            let served: u64 = sim.servers.iter().map(|s| s.m.stats().replied_ok).sum();
            assert_eq!(served, 41);
            assert_eq!(sim.broker.unacked(sim.servers[0].conn), 0);
        }
    }
}

/// Handler errors become error replies: `Remote` (ran, may have run) and `Rejected` (refused
/// before running, never ran).
#[test]
fn handler_errors_become_remote_and_rejected() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 5);
        let a = sim.call("boom", 1000);
        let b = sim.call("x", 1000);
        let ra = sim.take(0).unwrap();
        sim.reply(
            0,
            ra,
            Err(HandlerError::Failed {
                code: "handler_failed".into(),
                message: "division by zero".into(),
            }),
        );
        let rb = sim.take(0).unwrap();
        sim.reply(
            0,
            rb,
            Err(HandlerError::Rejected {
                code: "invalid_request".into(),
                message: "n must be a decimal integer".into(),
            }),
        );
        let ea = err(sim.result(a)).clone();
        assert_eq!(
            ea,
            RpcError::Remote {
                code: "handler_failed".into(),
                message: "division by zero".into()
            }
        );
        assert!(ea.may_have_run());
        let eb = err(sim.result(b)).clone();
        assert_eq!(
            eb,
            RpcError::Rejected {
                code: "invalid_request".into(),
                message: "n must be a decimal integer".into()
            }
        );
        assert!(!eb.may_have_run());
        assert_eq!(sim.client.m.stats().calls_answered, 2);
        assert_eq!(sim.servers[0].m.stats().replied_error, 2);
    }
}

/// The issue's simulation: a server dies after publishing its reply but before its ack. The
/// broker redelivers the request (redelivered = true), another server answers it again, and the
/// caller sees one answer; the second reply is dropped and counted as a duplicate.
#[test]
fn server_dies_between_reply_and_ack() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 2, 1);
        // Server 1 is busy with another request so that the first goes to server 0.
        let id = sim.call("41", 5000);
        let first = sim
            .servers
            .iter()
            .position(|s| s.m.buffered() == 1)
            .unwrap();
        let other = 1 - first;
        let req = sim.take(first).unwrap();
        assert!(!req.properties.correlation_id().is_none());
        let conn = sim.servers[first].conn;
        sim.broker.die_after_next_publish(conn);
        sim.reply(first, req, Ok(Bytes::from("42")));
        assert!(!sim.servers[first].up, "server connection died");
        assert_eq!(ok_body(sim.result(id)), b"42");
        // The request came back, redelivered, to the other server.
        let again = sim.take(other).expect("redelivered");
        assert!(
            sim.broker.acks.iter().all(|(c, _, _)| *c != conn),
            "never acked by the dead server"
        );
        sim.reply(other, again, Ok(Bytes::from("42")));
        assert_eq!(sim.ended.len(), 1, "one answer: {:?}", sim.ended);
        let stats = sim.client.m.stats();
        assert_eq!(stats.replies_duplicate, 1);
        assert_eq!(stats.calls_answered, 1);
        assert_eq!(sim.broker.queue_len(Q), 0);
        assert_eq!(sim.broker.unacked(sim.servers[other].conn), 0);
    }
}

/// Same fault, single server: it reconnects, gets the request again flagged redelivered, and
/// answers again; still one answer for the caller.
#[test]
fn server_dies_between_reply_and_ack_then_reconnects() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 1);
        let id = sim.call("41", 5000);
        let req = sim.take(0).unwrap();
        let conn = sim.servers[0].conn;
        sim.broker.die_after_next_publish(conn);
        sim.reply(0, req, Ok(Bytes::from("42")));
        let events = server_events(&mut sim.servers[0].m);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, ServerEvent::Disconnected(_))),
            "{events:?}"
        );
        let now = sim.now;
        sim.servers[0].m.reconnect(now).unwrap();
        sim.servers[0].redial(&mut sim.broker);
        sim.settle();
        assert!(sim.servers[0].m.is_serving());
        let again = sim.take(0).expect("redelivered");
        sim.reply(0, again, Ok(Bytes::from("42")));
        assert_eq!(ok_body(sim.result(id)), b"42");
        assert_eq!(sim.ended.len(), 1);
        assert_eq!(sim.client.m.stats().replies_duplicate, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Failures before a server could run the request
// ---------------------------------------------------------------------------------------------

/// A mandatory request no queue takes comes back (`basic.return`): `NotRouted`, never ran.
#[test]
fn unroutable_request_ends_not_routed() {
    for mode in MODES {
        let mut config = client_config(mode);
        config.server_check = None;
        let mut sim = Sim::new(config, 0, 1);
        let id = sim.call_with(CallRequest::new("nowhere", "x", Duration::from_secs(1)));
        let e = err(sim.result(id));
        assert_eq!(*e, RpcError::NotRouted);
        assert!(!e.may_have_run());
        assert_eq!(sim.broker.returned, 1);
        assert_eq!(sim.client.m.stats().requests_sent, 1);
    }
}

/// With the consumer-count check on, a missing queue is found by the passive declare (404)
/// and the call ends `NotRouted` without publishing.
#[test]
fn missing_queue_found_by_probe_ends_not_routed_unsent() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 0, 1);
        let id = sim.call_with(CallRequest::new("nowhere", "x", Duration::from_secs(1)));
        assert_eq!(*err(sim.result(id)), RpcError::NotRouted);
        assert_eq!(sim.client.m.stats().requests_sent, 0);
        // The probe's channel died with the 404; the reply path did not.
        assert!(sim.client.m.is_ready());
        assert_eq!(sim.broker.returned, 0);
    }
}

/// `NoServers`: the queue exists but nobody consumes it. The first call waits for the first
/// count (no virtual time passes) and fails fast; while that zero is fresh, calls fail at once;
/// once it is older than `server_check`, the next call waits for a refresh and goes out.
#[test]
fn no_servers_fails_fast_and_refreshes_after_the_interval() {
    for mode in MODES {
        let mut config = client_config(mode);
        config.server_check = Some(Duration::from_millis(500));
        let mut sim = Sim::new(config, 0, 1);
        let start = sim.now;
        let a = sim.call("a", 10_000);
        assert_eq!(sim.now, start, "no time passed");
        let e = err(sim.result(a)).clone();
        assert_eq!(e, RpcError::NoServers);
        assert!(!e.may_have_run());
        // A server comes up; the zero count is still fresh for 500 ms.
        let now = sim.now;
        sim.servers.push(Wire::new(
            RpcServer::new(server_config(Q, 1), conn_config(), now),
            &mut sim.broker,
        ));
        sim.settle();
        assert_eq!(sim.broker.consumer_count(Q), 1);
        sim.advance(Duration::from_millis(499));
        let b = sim.call("b", 10_000);
        assert_eq!(*err(sim.result(b)), RpcError::NoServers, "fresh zero");
        sim.advance(Duration::from_millis(1));
        let c = sim.call("c", 10_000);
        sim.serve_all(0);
        assert_eq!(ok_body(sim.result(c)), b"re:c");
        assert_eq!(sim.client.m.stats().requests_sent, 1);
        // The server goes away: a positive count lets calls out while it is fresh, and a
        // stale one is refreshed in the background by the next call.
        let conn = sim.servers[0].conn;
        sim.broker.drop_connection(conn);
        sim.settle();
        let d = sim.call("d", 300);
        assert!(sim.is_pending(d), "sent on a fresh positive count");
        sim.advance(Duration::from_millis(300));
        assert_eq!(*err(sim.result(d)), RpcError::TimedOut);
        sim.advance(Duration::from_millis(500));
        let e1 = sim.call("e", 300);
        assert!(
            sim.is_pending(e1),
            "stale positive count: sent, refresh in the background"
        );
        // The refreshed count is zero right after a positive one: looked at again before the
        // call fails (a quorum queue electing a leader reads zero for a moment).
        let f = sim.call("f", 1000);
        assert!(
            sim.is_pending(f),
            "a first zero after servers is checked again"
        );
        sim.advance(Duration::from_millis(250));
        assert_eq!(
            *err(sim.result(f)),
            RpcError::NoServers,
            "a second zero is believed"
        );
        assert_eq!(sim.client.m.stats().requests_sent, 3, "f never went out");
    }
}

/// A server that is away for a moment (its connection dropped, back within the recheck):
/// calls made while the consumer count reads zero wait for the second look instead of failing
/// with `NoServers`, and are answered. (A quorum queue electing a new leader reads zero the same
/// way while its servers are fine.)
#[test]
fn a_momentary_zero_consumer_count_does_not_fail_calls() {
    for mode in MODES {
        let mut config = client_config(mode);
        config.server_check = Some(Duration::from_millis(100));
        let mut sim = Sim::new(config, 1, 5);
        let first = sim.call("a", 1000);
        sim.serve_all(0);
        assert_eq!(ok_body(sim.result(first)), b"re:a");
        // The server's connection drops; the count the client holds goes stale.
        let conn = sim.servers[0].conn;
        sim.broker.drop_connection(conn);
        sim.settle();
        sim.advance(Duration::from_millis(150));
        // Stale positive: sent, and the background refresh reads zero.
        let sent = sim.call("b", 2000);
        let waiting = sim.call("c", 2000);
        assert!(
            sim.is_pending(waiting),
            "a first zero after servers must not fail calls"
        );
        // The server is back before the second look.
        let now = sim.now;
        assert_eq!(sim.servers[0].m.reconnect(now), Ok(()));
        sim.servers[0].redial(&mut sim.broker);
        sim.settle();
        sim.advance(Duration::from_millis(250));
        sim.serve_all(0);
        assert_eq!(ok_body(sim.result(sent)), b"re:b");
        assert_eq!(ok_body(sim.result(waiting)), b"re:c");
    }
}

/// Issue 20 case 4: after a broker restart the client was back before its server, and calls
/// failed `NotRouted` (the non-durable queue had vanished) or `NoServers` until the server had
/// reconnected. Within `reconnect_grace` of its own reconnect, the client looks again every
/// 250 ms and calls wait for the server, within their deadline; with no grace (the old rule)
/// the call fails at once.
#[test]
fn after_a_reconnect_calls_wait_for_servers_within_the_grace() {
    for (mode, grace) in MODES
        .into_iter()
        .flat_map(|m| [(m, Duration::from_secs(5)), (m, Duration::ZERO)])
    {
        let mut config = client_config(mode);
        config.server_check = Some(Duration::from_millis(100));
        config.reconnect_grace = grace;
        let mut sim = Sim::new(config, 1, 5);
        let first = sim.call("a", 1000);
        sim.serve_all(0);
        assert_eq!(ok_body(sim.result(first)), b"re:a");
        // The broker restarts: every connection drops and the non-durable queue is gone.
        let (client, server) = (sim.client.conn, sim.servers[0].conn);
        sim.broker.drop_connection(client);
        sim.broker.drop_connection(server);
        sim.broker.delete(Q);
        sim.settle();
        sim.advance(Duration::from_millis(150));
        // The client is back first.
        let now = sim.now;
        assert_eq!(sim.client.m.reconnect(now), Ok(()));
        sim.client.redial(&mut sim.broker);
        sim.settle();
        let waiting = sim.call("b", 10_000);
        sim.advance(Duration::from_millis(10));
        if grace.is_zero() {
            assert_eq!(*err(sim.result(waiting)), RpcError::NotRouted, "{mode:?}");
            continue;
        }
        sim.advance(Duration::from_secs(2));
        assert!(
            sim.is_pending(waiting),
            "{mode:?}: waits for the server, not {:?}",
            sim.ended
        );
        // The server is back 2 s later: it declares its queue and consumes again.
        let now = sim.now;
        assert_eq!(sim.servers[0].m.reconnect(now), Ok(()));
        sim.servers[0].redial(&mut sim.broker);
        sim.settle();
        sim.advance(Duration::from_millis(250));
        sim.serve_all(0);
        assert_eq!(ok_body(sim.result(waiting)), b"re:b", "{mode:?}");
        assert_eq!(sim.client.m.stats().requests_sent, 2);
    }
}

/// A call that cannot be sent before its deadline (the connection is down) ends `Expired`
/// exactly at its deadline: never sent, never ran.
#[test]
fn unsent_call_expires_at_its_deadline() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 1);
        let conn = sim.client.conn;
        sim.broker.drop_connection(conn);
        sim.settle();
        assert!(sim
            .other
            .iter()
            .any(|e| matches!(e, ClientEvent::Disconnected(_))));
        let id = sim.call("x", 200);
        sim.advance(Duration::from_millis(199));
        assert!(sim.is_pending(id));
        assert_eq!(
            sim.client.m.poll_timeout(),
            Some(sim.now + Duration::from_millis(1))
        );
        sim.advance(Duration::from_millis(1));
        let e = err(sim.result(id));
        assert_eq!(*e, RpcError::Expired);
        assert!(!e.may_have_run());
        assert_eq!(sim.client.m.stats().requests_sent, 0);
    }
}

/// A call with no time left is never published.
#[test]
fn zero_timeout_call_expires_unsent() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 1);
        let id = sim.call("x", 0);
        sim.advance(Duration::ZERO);
        assert_eq!(*err(sim.result(id)), RpcError::Expired);
        assert_eq!(sim.client.m.stats().requests_sent, 0);
        assert_eq!(sim.servers[0].m.buffered(), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------------------------

/// `TimedOut` fires exactly at the deadline in virtual time, not one tick later; the reply
/// that arrives after it is late: dropped and counted.
#[test]
fn timed_out_exactly_at_deadline_then_late_reply_dropped() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 1);
        let start = sim.now;
        let id = sim.call("x", 250);
        let req = sim.take(0).unwrap();
        assert_eq!(
            sim.client.m.poll_timeout(),
            Some(start + Duration::from_millis(250))
        );
        // One nanosecond before: nothing.
        sim.advance(Duration::from_millis(250) - Duration::from_nanos(1));
        assert!(sim.is_pending(id));
        sim.advance(Duration::from_nanos(1));
        assert_eq!(sim.now, start + Duration::from_millis(250));
        let e = err(sim.result(id));
        assert_eq!(*e, RpcError::TimedOut);
        assert!(e.may_have_run());
        // The server answers anyway.
        sim.reply(0, req, Ok(Bytes::from("late")));
        assert_eq!(sim.ended.len(), 1);
        assert_eq!(sim.client.m.stats().replies_late, 1);
    }
}

/// `expiration` carries the remaining budget and the absolute deadline header travels with the
/// request, also for a call that waited to be sent.
/// The expiration is the remaining budget rounded UP to the millisecond: rounded down, the
/// server's own deadline (arrival + expiration) could fall before the caller's, and a handler
/// still running would be answered `deadline_exceeded` just before the caller's `TimedOut`.
#[test]
fn expiration_never_ends_before_the_callers_deadline() {
    let mut sim = Sim::with_mode(ReplyMode::ExclusiveQueue, 1, 5);
    let _a = sim.call_with(CallRequest::new(Q, "a", Duration::from_micros(1_500_400)));
    let req = sim.take(0).unwrap();
    assert_eq!(
        req.properties.expiration().as_ref().unwrap().as_str(),
        "1501"
    );
}

#[test]
fn expiration_and_deadline_header_carry_the_budget() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 5);
        let wall0 = sim.wall().0;
        let _a = sim.call("a", 1500);
        let req = sim.take(0).unwrap();
        assert_eq!(
            req.properties.expiration().as_ref().unwrap().as_str(),
            "1500"
        );
        let header = req
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get(DEADLINE_HEADER)
            .cloned();
        assert_eq!(header, Some(AMQPValue::LongLongInt((wall0 + 1500) as i64)));
        assert!(req
            .properties
            .reply_to()
            .as_ref()
            .unwrap()
            .as_str()
            .starts_with(match mode {
                ReplyMode::DirectReplyTo => DIRECT_REPLY_TO,
                _ => "amq.gen-",
            }));
        // A caller's own, lower expiration wins.
        let _b = sim.call_with({
            let mut c = CallRequest::new(Q, "b", Duration::from_secs(2));
            c.properties = BasicProperties::default().with_expiration(ShortString::from("700"));
            c
        });
        let req = sim.take(0).unwrap();
        assert_eq!(
            req.properties.expiration().as_ref().unwrap().as_str(),
            "700"
        );
        // A call that waits 300 ms to be sent gets what is left.
        let conn = sim.client.conn;
        sim.broker.drop_connection(conn);
        sim.settle();
        let c = sim.call("c", 1000);
        sim.advance(Duration::from_millis(300));
        let now = sim.now;
        sim.client.m.reconnect(now).unwrap();
        sim.client.redial(&mut sim.broker);
        sim.settle();
        let req = sim.take(0).unwrap();
        assert_eq!(
            req.properties.expiration().as_ref().unwrap().as_str(),
            "700"
        );
        let header = req
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get(DEADLINE_HEADER)
            .cloned();
        assert_eq!(header, Some(AMQPValue::LongLongInt((wall0 + 1000) as i64)));
        sim.reply(0, req, Ok(Bytes::from("ok")));
        assert_eq!(ok_body(sim.result(c)), b"ok");
    }
}

/// The request's `x-rpc-deadline` header, if any.
fn deadline_header(req: &amqp_rpc_core::rpc::Request) -> Option<AMQPValue> {
    req.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(DEADLINE_HEADER).cloned())
}

/// `mandatory` off: a request no queue takes is dropped by the broker instead of returned, so
/// the call ends `TimedOut` at its deadline instead of `NotRouted` at once; calls that are
/// routed still work and still carry `expiration` and the deadline header.
#[test]
fn mandatory_off_unroutable_request_times_out_instead_of_not_routed() {
    for mode in MODES {
        let mut config = client_config(mode);
        config.server_check = None;
        config.mandatory = false;
        let mut sim = Sim::new(config, 1, 1);
        let lost = sim.call_with(CallRequest::new("nowhere", "x", Duration::from_secs(1)));
        assert_eq!(sim.broker.returned, 0, "not mandatory: nothing comes back");
        assert_eq!(sim.broker.dropped, 1);
        assert!(sim.ended.is_empty());
        let ok = sim.call("a", 1000);
        let req = sim.take(0).unwrap();
        assert_eq!(
            req.properties.expiration().as_ref().unwrap().as_str(),
            "1000"
        );
        assert!(deadline_header(&req).is_some());
        sim.reply(0, req, Ok(Bytes::from("ok")));
        assert_eq!(ok_body(sim.result(ok)), b"ok");
        sim.advance(Duration::from_secs(1));
        assert_eq!(*err(sim.result(lost)), RpcError::TimedOut);
    }
}

/// `expiration` off: the request carries no per-message TTL of the client's (a caller's own is
/// still sent, capped by the budget); the deadline header is still there and the call
/// round-trips.
#[test]
fn expiration_off_request_carries_no_expiration() {
    for mode in MODES {
        let mut config = client_config(mode);
        config.expiration = false;
        let mut sim = Sim::new(config, 1, 5);
        let wall0 = sim.wall().0;
        let a = sim.call("a", 1500);
        let req = sim.take(0).unwrap();
        assert_eq!(req.properties.expiration(), &None);
        assert_eq!(
            deadline_header(&req),
            Some(AMQPValue::LongLongInt((wall0 + 1500) as i64))
        );
        sim.reply(0, req, Ok(Bytes::from("ok")));
        assert_eq!(ok_body(sim.result(a)), b"ok");
        // A caller's own expiration is still sent, lowered to the remaining budget.
        let b = sim.call_with({
            let mut c = CallRequest::new(Q, "b", Duration::from_secs(2));
            c.properties = BasicProperties::default().with_expiration(ShortString::from("5000"));
            c
        });
        let req = sim.take(0).unwrap();
        assert_eq!(
            req.properties.expiration().as_ref().unwrap().as_str(),
            "2000"
        );
        sim.reply(0, req, Ok(Bytes::from("ok")));
        assert_eq!(ok_body(sim.result(b)), b"ok");
    }
}

/// `deadline_header` off: no `x-rpc-deadline` header (a caller's own headers are kept, and no
/// empty table is added); `expiration` still carries the budget and the call round-trips.
#[test]
fn deadline_header_off_request_carries_no_deadline_header() {
    for mode in MODES {
        let mut config = client_config(mode);
        config.deadline_header = false;
        let mut sim = Sim::new(config, 1, 5);
        let a = sim.call("a", 1500);
        let req = sim.take(0).unwrap();
        assert_eq!(req.properties.headers(), &None);
        assert_eq!(
            req.properties.expiration().as_ref().unwrap().as_str(),
            "1500"
        );
        sim.reply(0, req, Ok(Bytes::from("ok")));
        assert_eq!(ok_body(sim.result(a)), b"ok");
        let b = sim.call_with({
            let mut c = CallRequest::new(Q, "b", Duration::from_secs(2));
            let mut headers = amqp_rpc_core::types::FieldTable::default();
            headers.insert(ShortString::from("mine"), AMQPValue::Boolean(true));
            c.properties = BasicProperties::default().with_headers(headers);
            c
        });
        let req = sim.take(0).unwrap();
        let headers = req.properties.headers().as_ref().unwrap().inner();
        assert_eq!(headers.get("mine"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(deadline_header(&req), None);
        sim.reply(0, req, Ok(Bytes::from("ok")));
        assert_eq!(ok_body(sim.result(b)), b"ok");
    }
}

/// All three off (the tutorial's request): still a working call, and the server, with no
/// deadline to go by, runs it and replies.
#[test]
fn all_request_guards_off_still_round_trip() {
    for mode in MODES {
        let mut config = client_config(mode);
        (config.mandatory, config.expiration, config.deadline_header) = (false, false, false);
        let mut sim = Sim::new(config, 1, 5);
        let a = sim.call("a", 1500);
        let req = sim.take(0).unwrap();
        assert_eq!(req.properties.expiration(), &None);
        assert_eq!(req.properties.headers(), &None);
        sim.reply(0, req, Ok(Bytes::from("ok")));
        assert_eq!(ok_body(sim.result(a)), b"ok");
        assert_eq!(sim.servers[0].m.stats().replied_ok, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Losing the channel or the connection
// ---------------------------------------------------------------------------------------------

/// Losing the connection ends every sent call at once with `ConnectionLost { sent: true }`;
/// calls not sent wait for a reconnect, or end `ConnectionLost { sent: false }` at `abandon`.
#[test]
fn connection_loss_ends_sent_calls_at_once() {
    for mode in MODES {
        for forced in [false, true] {
            let mut sim = Sim::with_mode(mode, 1, 5);
            let a = sim.call("a", 5000);
            let b = sim.call("b", 5000);
            let conn = sim.client.conn;
            let at = sim.now;
            if forced {
                sim.broker.close_connection(conn, 320, "CONNECTION_FORCED");
            } else {
                sim.broker.drop_connection(conn);
            }
            sim.settle();
            assert_eq!(sim.now, at);
            for id in [a, b] {
                let e = err(sim.result(id));
                assert_eq!(*e, RpcError::ConnectionLost { sent: true });
                assert!(e.may_have_run());
            }
            let c = sim.call("c", 5000);
            let d = sim.call("d", 5000);
            assert!(sim.is_pending(c));
            sim.client.m.abandon();
            sim.collect();
            let e = err(sim.result(c));
            assert_eq!(*e, RpcError::ConnectionLost { sent: false });
            assert!(!e.may_have_run());
            assert_eq!(
                *err(sim.result(d)),
                RpcError::ConnectionLost { sent: false }
            );
            // The server answers a and b into the void: nobody hears them.
            sim.serve_all(0);
            assert_eq!(sim.ended.len(), 4);
            // Reconnect: the reply path is armed again and calls work.
            let now = sim.now;
            sim.client.m.reconnect(now).unwrap();
            sim.client.redial(&mut sim.broker);
            sim.settle();
            let e2 = sim.call("e", 5000);
            sim.serve_all(0);
            assert_eq!(ok_body(sim.result(e2)), b"re:e");
        }
    }
}

/// A call made while disconnected goes out after the reconnect.
#[test]
fn held_call_goes_out_after_reconnect() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 5);
        let conn = sim.client.conn;
        sim.broker.drop_connection(conn);
        sim.settle();
        let id = sim.call("x", 5000);
        sim.advance(Duration::from_millis(100));
        let now = sim.now;
        assert_eq!(sim.client.m.reconnect(now), Ok(()));
        sim.client.redial(&mut sim.broker);
        sim.settle();
        sim.serve_all(0);
        assert_eq!(ok_body(sim.result(id)), b"re:x");
    }
}

/// Losing the reply channel ends sent calls (`ReplyPathLost`: may have run) at once; the
/// client re-arms its reply path on a new channel and later calls work.
#[test]
fn channel_loss_ends_sent_calls_and_rearms() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 5);
        let a = sim.call("a", 5000);
        let ch = sim.reply_channel();
        let conn = sim.client.conn;
        sim.broker
            .close_channel(conn, ch, 406, "PRECONDITION_FAILED");
        sim.settle();
        assert_eq!(*err(sim.result(a)), RpcError::ReplyPathLost);
        assert!(sim.client.m.is_ready());
        assert_ne!(sim.reply_channel(), ch);
        let b = sim.call("b", 5000);
        // The server answers both; a's reply goes to a dead address and is lost.
        sim.serve_all(0);
        assert_eq!(ok_body(sim.result(b)), b"re:b");
        assert_eq!(sim.ended.len(), 2);
    }
}

/// The broker cancels the reply consumer (the exclusive reply queue was deleted, RabbitMQ
/// "Consumer Cancel Notification"): calls waiting on that path end at once as may-have-run,
/// the path is armed again (a new queue), and the next call succeeds, on the same connection.
#[test]
fn broker_cancel_of_the_reply_consumer_ends_waiting_calls_and_rearms() {
    let mut sim = Sim::with_mode(ReplyMode::ExclusiveQueue, 1, 5);
    let waiting = sim.call("a", 60_000);
    let idempotent = sim.call_with({
        let mut c = CallRequest::new(Q, "i", Duration::from_secs(60));
        c.idempotent = true;
        c
    });
    let old = sim.broker.reply_addresses(sim.client.conn);
    assert_eq!(old.len(), 1);
    sim.broker.delete(&old[0]);
    sim.settle();
    // Ended at once, not at the 60 s deadline.
    assert_eq!(*err(sim.result(waiting)), RpcError::ReplyPathLost);
    assert!(err(sim.result(waiting)).may_have_run());
    assert!(sim.client.m.is_ready());
    let new = sim.broker.reply_addresses(sim.client.conn);
    assert_eq!(new.len(), 1);
    assert_ne!(new, old);
    let next = sim.call("b", 1000);
    sim.serve_all(0);
    assert_eq!(ok_body(sim.result(next)), b"re:b");
    // The idempotent call was sent again on the new path and answered.
    assert_eq!(ok_body(sim.result(idempotent)), b"re:i");
    assert_eq!(sim.client.m.stats().reply_path_rearmed, 1);
    assert!(sim.client.up, "no reconnect");
}

/// One bad call among many: a call to an exchange that does not exist ends alone, with the
/// broker's 404 and its words, before anything is published; the calls around it are answered.
#[test]
fn a_call_to_a_missing_exchange_ends_alone() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 64);
        let good: Vec<CallId> = (0..8).map(|i| sim.call(&i.to_string(), 5000)).collect();
        let bad = sim.call_with({
            let mut c = CallRequest::new(Q, "bad", Duration::from_secs(5));
            c.exchange = "no-such-exchange".into();
            c
        });
        let more: Vec<CallId> = (8..16).map(|i| sim.call(&i.to_string(), 5000)).collect();
        sim.serve_all(0);
        match err(sim.result(bad)) {
            RpcError::Refused { code, text } => {
                assert_eq!(code.0, 404);
                assert!(text.contains("no-such-exchange"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!err(sim.result(bad)).may_have_run());
        for (i, id) in good.iter().chain(&more).enumerate() {
            assert_eq!(ok_body(sim.result(*id)), format!("re:{i}").as_bytes());
        }
        assert_eq!(sim.client.m.stats().reply_path_rearmed, 0);
        assert!(sim.client.up, "no reconnect");
    }
}

/// With the exchange check off, a publish to a missing exchange closes the publishing channel.
/// An idempotent call refused this way is sent again a bounded number of times, never in a
/// loop; in exclusive-queue mode the reply path is not touched.
#[test]
fn a_refused_idempotent_call_is_not_resent_in_a_loop() {
    for mode in MODES {
        let mut config = client_config(mode);
        config.exchange_check = None;
        let mut sim = Sim::new(config, 1, 5);
        let bad = sim.call_with({
            let mut c = CallRequest::new(Q, "bad", Duration::from_secs(60));
            c.exchange = "no-such-exchange".into();
            c.idempotent = true;
            c
        });
        sim.settle();
        // The broker's words name the exchange: the call is the culprit, never resent.
        match err(sim.result(bad)) {
            RpcError::Refused { code, text } => {
                assert_eq!(code.0, 404);
                assert!(text.contains("no-such-exchange"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let stats = sim.client.m.stats();
        assert_eq!(stats.requests_sent, 1, "the culprit is not sent again");
        let rearmed = if mode == ReplyMode::ExclusiveQueue {
            0
        } else {
            1
        };
        assert_eq!(stats.reply_path_rearmed, rearmed);
        let good = sim.call("ok", 1000);
        sim.serve_all(0);
        assert_eq!(ok_body(sim.result(good)), b"re:ok");
        assert!(sim.client.up, "no reconnect");
    }
}

/// What the broker would refuse by closing the channel is refused at the call site, with
/// nothing sent: a body above `max_message_size`, a `user_id` that is not ours.
#[test]
fn calls_the_broker_would_refuse_are_refused_before_sending() {
    let mut sim = Sim::with_mode(ReplyMode::ExclusiveQueue, 1, 5);
    let now = sim.now;
    let wall = sim.wall();
    let limit = conn_config().max_message_size;
    let big = vec![0u8; usize::try_from(limit).unwrap() + 1];
    assert_eq!(
        sim.client
            .m
            .call(now, wall, CallRequest::new(Q, big, Duration::from_secs(1))),
        Err(UsageError::MessageTooLarge {
            size: limit + 1,
            limit
        })
    );
    let mut request = CallRequest::new(Q, "x", Duration::from_secs(1));
    request.properties = BasicProperties::default().with_user_id(ShortString::from("mallory"));
    assert_eq!(
        sim.client.m.call(now, wall, request),
        Err(UsageError::UserIdMismatch {
            user_id: "mallory".into()
        })
    );
    assert_eq!(sim.client.m.stats().calls_started, 0);
}

/// A caller that gives up cancels its call: the slot is free at once, nothing is reported for
/// it, and its reply, when it comes, is counted as late and never delivered.
#[test]
fn a_cancelled_call_frees_its_slot_and_its_reply_is_late() {
    let mut config = client_config(ReplyMode::ExclusiveQueue);
    config.max_in_flight = 1;
    let mut sim = Sim::new(config, 1, 5);
    for _ in 0..10_000 {
        let id = sim.call("dropped", 60_000);
        assert!(sim.client.m.cancel(id));
        assert!(!sim.client.m.cancel(id), "cancelled once");
    }
    assert_eq!(sim.client.m.in_flight(), 0);
    let next = sim.call("kept", 1000);
    sim.serve_all(0);
    assert_eq!(ok_body(sim.result(next)), b"re:kept");
    let stats = sim.client.m.stats();
    assert_eq!(stats.calls_cancelled, 10_000);
    assert_eq!(sim.ended.len(), 1, "cancelled calls raise no event");
    // Every cancelled request that reached the server was answered and counted late.
    assert_eq!(
        stats.replies_late + stats.replies_duplicate + stats.replies_unknown,
        stats.requests_sent - 1
    );
    assert_eq!(stats.replies_duplicate + stats.replies_unknown, 0);
}

/// An idempotent call is sent again after a connection loss instead of failing.
#[test]
fn idempotent_call_is_resent_after_reconnect() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 5);
        let id = sim.call_with({
            let mut c = CallRequest::new(Q, "x", Duration::from_secs(5));
            c.idempotent = true;
            c
        });
        let conn = sim.client.conn;
        sim.broker.drop_connection(conn);
        sim.settle();
        assert!(sim.is_pending(id));
        let now = sim.now;
        sim.client.m.reconnect(now).unwrap();
        sim.client.redial(&mut sim.broker);
        sim.settle();
        assert_eq!(sim.serve_all(0), 2, "the first copy and the resent one");
        assert_eq!(ok_body(sim.result(id)), b"re:x");
        assert_eq!(sim.client.m.stats().requests_sent, 2);
        assert_eq!(sim.ended.len(), 1);
    }
}

/// Closing the client ends every call; `is_finished` once the connection is closed.
#[test]
fn close_ends_every_call() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 5);
        let a = sim.call("a", 5000);
        let now = sim.now;
        sim.client.m.close(now);
        sim.settle();
        assert_eq!(*err(sim.result(a)), RpcError::ConnectionLost { sent: true });
        assert!(sim.client.m.is_finished());
        assert_eq!(
            sim.client.m.call(
                now,
                sim.wall(),
                CallRequest::new(Q, "b", Duration::from_secs(1))
            ),
            Err(UsageError::ShutDown)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Late, duplicate and unknown replies; bounds; correlation ids
// ---------------------------------------------------------------------------------------------

/// Replies nobody waits for are dropped and counted, never delivered: unknown ids (another
/// client's prefix, ids never issued, no id, garbage), duplicates of an answered call, and
/// late replies for a call that timed out.
#[test]
fn late_duplicate_and_unknown_replies_are_counted_not_delivered() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 5);
        let addr = sim.broker.reply_addresses(sim.client.conn);
        assert_eq!(addr.len(), 1, "{addr:?}");
        let addr = addr[0].clone();
        let id = sim.call("x", 1000);
        let req = sim.take(0).unwrap();
        let corr = req.properties.correlation_id().clone().unwrap();
        sim.reply(0, req, Ok(Bytes::from("1")));
        assert_eq!(ok_body(sim.result(id)), b"1");
        let reply = |c: Option<&str>| {
            let p = BasicProperties::default();
            match c {
                Some(c) => p.with_correlation_id(ShortString::from(c)),
                None => p,
            }
        };
        // Duplicate.
        assert!(sim
            .broker
            .publish(&addr, reply(Some(corr.as_str())), b"again"));
        // Unknown: other prefix, never issued, no id, not ours at all.
        assert!(sim
            .broker
            .publish(&addr, reply(Some("someone-else.1")), b"?"));
        assert!(sim.broker.publish(
            &addr,
            reply(Some(sim_key().issue(CallId(99)).as_str())),
            b"?"
        ));
        assert!(sim.broker.publish(&addr, reply(None), b"?"));
        assert!(sim.broker.publish(&addr, reply(Some("1.x")), b"?"));
        // Late.
        let late = sim.call("y", 100);
        let req = sim.take(0).unwrap();
        sim.advance(Duration::from_millis(100));
        assert_eq!(*err(sim.result(late)), RpcError::TimedOut);
        sim.reply(0, req, Ok(Bytes::from("2")));
        sim.settle();
        let stats = sim.client.m.stats();
        assert_eq!(stats.replies_duplicate, 1);
        assert_eq!(stats.replies_unknown, 4);
        assert_eq!(stats.replies_late, 1);
        assert_eq!(sim.ended.len(), 2);
        assert_eq!(stats.calls_answered, 1);
        assert_eq!(stats.calls_failed, 1);
    }
}

/// The bound on calls in flight: a clear error at the call site, never an unbounded queue.
#[test]
fn calls_in_flight_are_bounded() {
    let mut config = client_config(ReplyMode::DirectReplyTo);
    config.max_in_flight = 2;
    let mut sim = Sim::new(config, 1, 5);
    let a = sim.call("a", 1000);
    let _b = sim.call("b", 1000);
    let now = sim.now;
    assert_eq!(
        sim.client.m.call(
            now,
            sim.wall(),
            CallRequest::new(Q, "c", Duration::from_secs(1))
        ),
        Err(UsageError::TooManyCalls { limit: 2 })
    );
    assert_eq!(sim.client.m.stats().calls_started, 2);
    let req = sim.take(0).unwrap();
    sim.reply(0, req, Ok(Bytes::new()));
    assert!(!sim.is_pending(a));
    let _c = sim.call("c", 1000);
    assert_eq!(sim.client.m.in_flight(), 2);
}

/// Correlation ids fit a short string, are distinct, and cannot be predicted: whoever sees
/// the id of one call (a server, anyone reading the request queue) and forges the next one by
/// counting up any number in it cannot answer that call. The forged replies are counted as
/// unknown and the call gets its real reply.
#[test]
fn correlation_ids_cannot_be_forged_from_earlier_ones() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 5);
        let addr = sim.broker.reply_addresses(sim.client.conn)[0].clone();
        let first = sim.call("a", 1000);
        let req = sim.take(0).unwrap();
        let seen = req.properties.correlation_id().clone().unwrap();
        assert!(seen.as_str().len() <= 255);
        sim.reply(0, req, Ok(Bytes::from("a")));
        assert_eq!(ok_body(sim.result(first)), b"a");

        let next = sim.call("b", 1000);
        let forged = forge_next(seen.as_str());
        assert!(!forged.is_empty());
        for id in &forged {
            let props =
                BasicProperties::default().with_correlation_id(ShortString::from(id.as_str()));
            assert!(sim.broker.publish(&addr, props, b"forged"));
        }
        sim.settle();
        assert!(sim.is_pending(next), "a forged reply ended the call");
        let req = sim.take(0).unwrap();
        let real = req.properties.correlation_id().clone().unwrap();
        assert_ne!(real, seen, "distinct ids");
        assert!(
            !forged.contains(&real.to_string()),
            "{real} was predictable"
        );
        sim.reply(0, req, Ok(Bytes::from("b")));
        assert_eq!(ok_body(sim.result(next)), b"b");
        assert_eq!(sim.client.m.stats().replies_unknown, forged.len() as u64);
    }
}

/// Every id an attacker would try after seeing `id`: each run of decimal or hex digits in it
/// counted up by one to ten.
fn forge_next(id: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = id.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_hexdigit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_hexdigit() {
            i += 1;
        }
        let run = &id[start..i];
        for step in 1..=10u64 {
            let mut candidates = Vec::new();
            if let Ok(n) = run.parse::<u64>() {
                candidates.push((n + step).to_string());
            }
            if run.len() <= 16 {
                if let Ok(n) = u64::from_str_radix(run, 16) {
                    candidates.push(format!("{:0width$x}", n + step, width = run.len()));
                }
            }
            for c in candidates {
                out.push(format!("{}{}{}", &id[..start], c, &id[i..]));
            }
        }
    }
    out.sort();
    out.dedup();
    out.retain(|f| f != id);
    out
}

// ---------------------------------------------------------------------------------------------
// The server's duties
// ---------------------------------------------------------------------------------------------

/// A request without `reply_to` is acked, dropped and counted, never handed to a handler.
#[test]
fn server_drops_request_without_reply_to() {
    let mut sim = Sim::with_mode(ReplyMode::DirectReplyTo, 1, 5);
    assert!(sim.broker.publish(
        Q,
        BasicProperties::default().with_correlation_id(ShortString::from("c.1")),
        b"5"
    ));
    sim.settle();
    assert_eq!(sim.servers[0].m.buffered(), 1);
    assert!(sim.take(0).is_none());
    let stats = sim.servers[0].m.stats();
    assert_eq!(stats.dropped_no_reply_to, 1);
    assert_eq!(stats.received, 1);
    assert_eq!(sim.broker.unacked(sim.servers[0].conn), 0, "acked");
    assert_eq!(sim.broker.queue_len(Q), 0, "not requeued");
}

/// A request whose deadline passed while it waited in the prefetch buffer is acked, dropped
/// and counted, never run; its caller times out.
#[test]
fn server_drops_request_expired_in_prefetch_buffer() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 2);
        let slow = sim.call("slow", 5000);
        let quick = sim.call("quick", 100);
        assert_eq!(sim.servers[0].m.buffered(), 2);
        let first = sim.take(0).unwrap();
        sim.advance(Duration::from_millis(100));
        assert_eq!(*err(sim.result(quick)), RpcError::TimedOut);
        sim.reply(0, first, Ok(Bytes::from("s")));
        assert!(
            sim.take(0).is_none(),
            "the expired request is not handed out"
        );
        let stats = sim.servers[0].m.stats();
        assert_eq!(stats.dropped_expired, 1);
        assert_eq!(stats.replied_ok, 1);
        assert_eq!(sim.broker.unacked(sim.servers[0].conn), 0);
        assert_eq!(ok_body(sim.result(slow)), b"s");
        assert_eq!(
            sim.client.m.stats().replies_late,
            0,
            "no reply for the dropped one"
        );
    }
}

/// A reply handle dropped unanswered is reported and the request goes back; dropped as often as
/// `max_deliveries` allows (2 here), the request is dropped for good. (More in sim_server.rs.)
#[test]
fn abandoned_reply_token_is_reported_requeued_once() {
    let mut sim = Sim::with_mode(ReplyMode::ExclusiveQueue, 0, 1);
    let now = sim.now;
    let mut config = server_config(Q, 1);
    config.max_deliveries = 2;
    sim.servers.push(Wire::new(
        RpcServer::new(config, conn_config(), now),
        &mut sim.broker,
    ));
    sim.settle();
    let id = sim.call("poison", 1000);
    let req = sim.take(0).unwrap();
    sim.servers[0].m.abandon(now, req.token);
    sim.settle();
    let events = server_events(&mut sim.servers[0].m);
    assert!(
        events.contains(&ServerEvent::Abandoned { requeued: true }),
        "{events:?}"
    );
    let again = sim.take(0).expect("requeued");
    sim.servers[0].m.abandon(now, again.token);
    sim.settle();
    let events = server_events(&mut sim.servers[0].m);
    assert!(
        events.contains(&ServerEvent::Abandoned { requeued: false }),
        "{events:?}"
    );
    assert!(sim.take(0).is_none());
    assert_eq!(sim.broker.queue_len(Q), 0);
    assert_eq!(sim.servers[0].m.stats().abandoned, 2);
    assert_eq!(sim.servers[0].m.in_flight(), 0);
    sim.advance(Duration::from_secs(1));
    assert_eq!(*err(sim.result(id)), RpcError::TimedOut);
}

/// Graceful shutdown: the consumer is cancelled, buffered requests go back to the broker (and
/// to the other server), requests in flight are still answered, then the connection closes.
#[test]
fn graceful_shutdown_finishes_in_flight_and_gives_back_the_rest() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 3);
        let ids: Vec<CallId> = (0..3).map(|i| sim.call(&i.to_string(), 5000)).collect();
        assert_eq!(sim.servers[0].m.buffered(), 3);
        let in_flight = sim.take(0).unwrap();
        let now = sim.now;
        sim.servers[0].m.shutdown(now);
        sim.settle();
        assert!(
            !sim.servers[0].m.is_stopped(),
            "one request is still in flight"
        );
        assert_eq!(sim.broker.consumer_count(Q), 0, "consumer cancelled");
        assert_eq!(sim.broker.queue_len(Q), 2, "buffered requests given back");
        assert_eq!(sim.servers[0].m.buffered(), 0);
        sim.reply(0, in_flight, Ok(Bytes::from("done")));
        assert_eq!(ok_body(sim.result(ids[0])), b"done");
        assert!(sim.servers[0].m.is_stopped());
        assert!(server_events(&mut sim.servers[0].m).contains(&ServerEvent::Stopped));
        assert!(!sim.servers[0].up, "connection closed");
        // Another server takes the rest, flagged redelivered: they never ran.
        let now = sim.now;
        sim.servers.push(Wire::new(
            RpcServer::new(server_config(Q, 3), conn_config(), now),
            &mut sim.broker,
        ));
        sim.settle();
        assert_eq!(sim.serve_all(1), 2);
        assert_eq!(ok_body(sim.result(ids[1])), b"re:1");
        assert_eq!(ok_body(sim.result(ids[2])), b"re:2");
        assert_eq!(sim.ended.len(), 3);
    }
}

/// Shutting down an idle server stops it at once (after the close handshake).
#[test]
fn graceful_shutdown_of_idle_server() {
    let mut sim = Sim::with_mode(ReplyMode::DirectReplyTo, 1, 3);
    let now = sim.now;
    sim.servers[0].m.shutdown(now);
    sim.settle();
    assert!(sim.servers[0].m.is_stopped());
    assert!(server_events(&mut sim.servers[0].m).contains(&ServerEvent::Stopped));
    assert_eq!(sim.broker.consumer_count(Q), 0);
}

/// The server declares the request queue when it does not exist yet.
#[test]
fn server_declares_a_missing_queue() {
    let base = base_instant();
    let mut broker = Broker::new();
    let mut server = Wire::new(
        RpcServer::new(server_config("fresh", 1), conn_config(), base),
        &mut broker,
    );
    settle(&mut broker, base, &mut [&mut server]);
    assert!(server.m.is_serving());
    assert!(broker.queue_exists("fresh"));
    assert_eq!(broker.consumer_count("fresh"), 1);
    assert!(broker.violations.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Extreme timeouts
// ---------------------------------------------------------------------------------------------

/// RabbitMQ refuses an `expiration` above 2^32 - 1 ms with a channel error, which would take
/// every call in flight down with it: a very long timeout must be capped on the wire.
#[test]
fn very_long_timeout_caps_expiration() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 5);
        let other = sim.call("other", 5000);
        let id = sim.call("x", 60 * 24 * 3600 * 1000);
        let other_req = sim.take(0).unwrap();
        let req = sim.take(0).unwrap();
        assert_eq!(
            req.properties.expiration().as_ref().unwrap().as_str(),
            "4294967295"
        );
        sim.reply(0, req, Ok(Bytes::from("a")));
        sim.reply(0, other_req, Ok(Bytes::from("b")));
        assert_eq!(ok_body(sim.result(id)), b"a");
        assert_eq!(ok_body(sim.result(other)), b"b");
    }
}

/// A timeout too large for `Instant` arithmetic is a caller's choice, not a panic.
#[test]
fn huge_timeout_does_not_panic() {
    let mut sim = Sim::with_mode(ReplyMode::DirectReplyTo, 1, 5);
    let id = sim.call_with(CallRequest::new(Q, "x", Duration::MAX));
    sim.serve_all(0);
    assert_eq!(ok_body(sim.result(id)), b"re:x");
}

// ---------------------------------------------------------------------------------------------
// Flow control
// ---------------------------------------------------------------------------------------------

/// With a tiny outbound high-water mark, calls beyond it wait in the client and go out as the
/// driver takes bytes, without needing any input from the broker.
#[test]
fn backpressure_releases_held_calls_as_bytes_drain() {
    let mut config = client_config(ReplyMode::DirectReplyTo);
    config.outbound_high_water = 1;
    let mut sim = Sim::new(config, 1, 50);
    let now = sim.now;
    let ids: Vec<CallId> = (0..5)
        .map(|i| {
            sim.client
                .m
                .call(
                    now,
                    sim.wall(),
                    CallRequest::new(Q, i.to_string(), Duration::from_secs(1)),
                )
                .unwrap()
        })
        .collect();
    sim.settle();
    assert_eq!(
        sim.client.m.stats().requests_sent,
        5,
        "all went out without input"
    );
    assert_eq!(sim.servers[0].m.buffered(), 5);
    sim.serve_all(0);
    for id in ids {
        assert!(ok_body(sim.result(id)).starts_with(b"re:"));
    }
}

/// `poll_transmit` only hands bytes over: held calls go out when the driver reports that what
/// it took was written (`handle_transmitted`), not as a side effect of taking bytes.
#[test]
fn held_calls_go_out_when_the_driver_reports_room() {
    let mut config = client_config(ReplyMode::DirectReplyTo);
    config.outbound_high_water = 1;
    let mut sim = Sim::new(config, 1, 50);
    // A first call, so that the request queue's servers are known and calls go out at once.
    let first = sim.call("first", 1000);
    sim.serve_all(0);
    assert_eq!(ok_body(sim.result(first)), b"re:first");
    let now = sim.now;
    let ids: Vec<CallId> = (0..3)
        .map(|i| {
            let request = CallRequest::new(Q, i.to_string(), Duration::from_secs(1));
            sim.client.m.call(now, sim.wall(), request).unwrap()
        })
        .collect();
    // The first fills the outbound buffer past its high-water mark; the others are held.
    assert_eq!(sim.client.m.stats().requests_sent, 2);
    let mut written = Vec::new();
    assert!(sim.client.m.poll_transmit(now, &mut written) > 0);
    assert_eq!(
        sim.client.m.stats().requests_sent,
        2,
        "taking bytes sent nothing"
    );
    assert_eq!(sim.client.m.poll_transmit(now, &mut Vec::new()), 0);
    // The driver wrote them: there is room, and the next held call goes out.
    let conn = sim.client.conn;
    sim.broker.feed(conn, now, &written);
    sim.client.m.handle_transmitted(now);
    assert_eq!(sim.client.m.stats().requests_sent, 3);
    sim.settle();
    assert_eq!(sim.client.m.stats().requests_sent, 4);
    sim.serve_all(0);
    for id in ids {
        assert!(ok_body(sim.result(id)).starts_with(b"re:"));
    }
}

/// A blocked connection holds new requests; they go out when the alarm clears, and those whose
/// deadline passes meanwhile end `Expired` (never sent).
#[test]
fn blocked_connection_holds_requests() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 50);
        let conn = sim.client.conn;
        sim.broker.block(conn, "low on memory");
        sim.settle();
        assert!(sim.other.contains(&ClientEvent::Blocked {
            reason: "low on memory".into()
        }));
        let short = sim.call("short", 100);
        let long = sim.call("long", 1000);
        assert_eq!(sim.client.m.stats().requests_sent, 0);
        sim.advance(Duration::from_millis(100));
        assert_eq!(*err(sim.result(short)), RpcError::Expired);
        sim.broker.unblock(conn);
        sim.settle();
        assert!(sim.other.contains(&ClientEvent::Unblocked));
        sim.serve_all(0);
        assert_eq!(ok_body(sim.result(long)), b"re:long");
        assert_eq!(sim.client.m.stats().requests_sent, 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Server resilience
// ---------------------------------------------------------------------------------------------

/// The server's channel dies with a request in a handler: the broker requeues it, the server
/// subscribes again and gets it redelivered; the old token's reply is counted stale and never
/// acks a tag on the new channel (which would be a 406 from the broker), but it is published on
/// the new channel, so the caller hears at once; the redelivered copy's reply is a duplicate.
#[test]
fn server_channel_loss_makes_tokens_stale() {
    for mode in MODES {
        let mut sim = Sim::with_mode(mode, 1, 1);
        let id = sim.call("x", 5000);
        let old = sim.take(0).unwrap();
        let conn = sim.servers[0].conn;
        let ch = sim.broker.consumer_channels(conn)[0];
        sim.broker
            .close_channel(conn, ch, 406, "PRECONDITION_FAILED");
        sim.settle();
        assert!(sim.servers[0].m.is_serving(), "subscribed again");
        // The redelivered copy waits for the running one (see sim_server.rs, issue 20 item 3).
        assert!(sim.take(0).is_none(), "not run beside the first run");
        sim.reply(0, old, Ok(Bytes::from("stale")));
        assert_eq!(sim.servers[0].m.stats().stale_replies, 1);
        assert_eq!(
            ok_body(sim.result(id)),
            b"stale",
            "published on the new channel"
        );
        // The redelivery is answered from the reply cache: the duplicate is dropped.
        assert!(sim.take(0).is_none(), "never run twice");
        assert_eq!(sim.servers[0].m.stats().reply_cache_hits, 1);
        assert_eq!(ok_body(sim.result(id)), b"stale");
        assert_eq!(sim.broker.unacked(conn), 0);
        assert_eq!(sim.servers[0].m.in_flight(), 0);
    }
}

/// The request queue is deleted under the server (the broker cancels its consumer): the
/// server declares it again and serves it.
#[test]
fn server_recovers_from_queue_deletion() {
    let mut sim = Sim::with_mode(ReplyMode::ExclusiveQueue, 1, 1);
    sim.broker.delete(Q);
    sim.settle();
    assert!(sim.broker.queue_exists(Q), "declared again");
    assert!(sim.servers[0].m.is_serving());
    assert_eq!(sim.broker.consumer_count(Q), 1);
    let id = sim.call("x", 1000);
    sim.serve_all(0);
    assert_eq!(ok_body(sim.result(id)), b"re:x");
}

/// The server's connection is closed by the broker: requests in flight are requeued by the
/// broker; after `reconnect` the server serves them again.
#[test]
fn server_reconnects_after_connection_loss() {
    let mut sim = Sim::with_mode(ReplyMode::DirectReplyTo, 1, 2);
    let a = sim.call("a", 5000);
    let b = sim.call("b", 5000);
    let held = sim.take(0).unwrap();
    let conn = sim.servers[0].conn;
    sim.broker.close_connection(conn, 320, "CONNECTION_FORCED");
    sim.settle();
    assert!(server_events(&mut sim.servers[0].m)
        .iter()
        .any(|e| matches!(e, ServerEvent::Disconnected(_))));
    assert_eq!(sim.servers[0].m.buffered(), 0);
    let now = sim.now;
    sim.servers[0].m.reconnect(now).unwrap();
    sim.servers[0].redial(&mut sim.broker);
    sim.settle();
    // The held request's ack is void, but its reply goes out on the new channel.
    sim.reply(0, held, Ok(Bytes::from("early")));
    assert_eq!(sim.servers[0].m.stats().stale_replies, 1);
    assert_eq!(ok_body(sim.result(a)), b"early");
    // `a` is answered again from the reply cache, not run again.
    assert_eq!(sim.serve_all(0), 1);
    assert_eq!(sim.servers[0].m.stats().reply_cache_hits, 1);
    assert_eq!(ok_body(sim.result(a)), b"early");
    assert_eq!(ok_body(sim.result(b)), b"re:b");
}

/// A reply handle from before a reconnect is dropped after it: the new connection reuses the
/// channel number and delivery tag, so settling the old tag would reject someone else's
/// delivery. The server must only count it.
#[test]
fn stale_token_abandoned_after_reconnect_touches_nothing() {
    let mut sim = Sim::with_mode(ReplyMode::DirectReplyTo, 1, 1);
    let id = sim.call("x", 5000);
    let old = sim.take(0).unwrap();
    let conn = sim.servers[0].conn;
    sim.broker.drop_connection(conn);
    sim.settle();
    let now = sim.now;
    sim.servers[0].m.reconnect(now).unwrap();
    sim.servers[0].redial(&mut sim.broker);
    sim.settle();
    assert_eq!(
        sim.servers[0].m.buffered(),
        1,
        "redelivered on the new connection"
    );
    sim.servers[0].m.abandon(now, old.token);
    sim.settle();
    assert_eq!(
        sim.servers[0].m.buffered(),
        1,
        "the new delivery is untouched"
    );
    assert_eq!(sim.serve_all(0), 1);
    assert_eq!(ok_body(sim.result(id)), b"re:x");
    assert_eq!(sim.servers[0].m.stats().abandoned, 1);
}

/// The server consumes with the prefetch it is given: the broker never pushes more
/// unacknowledged requests than that; the rest wait in the queue.
#[test]
fn server_prefetch_bounds_what_it_holds() {
    let mut sim = Sim::with_mode(ReplyMode::DirectReplyTo, 1, 2);
    let ids: Vec<CallId> = (0..5).map(|i| sim.call(&i.to_string(), 5000)).collect();
    assert_eq!(sim.servers[0].m.buffered(), 2);
    assert_eq!(sim.broker.queue_len(Q), 3);
    let a = sim.take(0).expect("first");
    let b = sim.take(0).expect("second");
    assert!(sim.take(0).is_none(), "nothing more until one is acked");
    sim.reply(0, a, Ok(Bytes::from("a")));
    assert_eq!(sim.servers[0].m.buffered(), 1, "one more came in");
    sim.reply(0, b, Ok(Bytes::from("b")));
    sim.serve_all(0);
    assert_eq!(sim.ended.len(), 5);
    assert_eq!(ok_body(sim.result(ids[4])), b"re:4");
}

/// Shutdown requested while the server is still subscribing (here: right after a reconnect,
/// with a request from the old connection still in a handler) must not start serving: the
/// subscription is abandoned, the old request finishes, the server stops.
#[test]
fn shutdown_while_subscribing_never_serves() {
    let mut sim = Sim::with_mode(ReplyMode::DirectReplyTo, 1, 1);
    let id = sim.call("x", 5000);
    let old = sim.take(0).expect("request");
    let conn = sim.servers[0].conn;
    sim.broker.drop_connection(conn);
    sim.settle();
    let now = sim.now;
    sim.servers[0].m.reconnect(now).expect("closed");
    sim.servers[0].redial(&mut sim.broker);
    // Handshake and the passive declare go out; shut down before the broker answers.
    let mut broker = std::mem::take(&mut sim.broker);
    for _ in 0..3 {
        Step::step(&mut sim.servers[0], &mut broker, now);
    }
    sim.broker = broker;
    assert!(!sim.servers[0].m.is_serving());
    server_events(&mut sim.servers[0].m);
    sim.servers[0].m.shutdown(now);
    sim.settle();
    assert!(
        !sim.servers[0].m.is_serving(),
        "started serving after shutdown"
    );
    assert_eq!(sim.broker.consumer_count(Q), 0);
    assert!(!server_events(&mut sim.servers[0].m).contains(&ServerEvent::Ready));
    sim.reply(0, old, Ok(Bytes::from("stale")));
    assert!(sim.servers[0].m.is_stopped());
    // Its ack was void (the request went back to the queue), but the reply still reached the
    // caller on the channel the server had left.
    assert_eq!(ok_body(sim.result(id)), b"stale");
    assert_eq!(sim.broker.queue_len(Q), 1);
}

// ---------------------------------------------------------------------------------------------
// Publisher confirms: one refused publish harms only itself (issue 21)
// ---------------------------------------------------------------------------------------------

/// A body above the broker's `max_message_size` (but within the client's configured limit)
/// closes the publishing channel with 406. The oversized call alone ends `Refused` with the
/// broker's words, never ran; calls confirmed before it, and calls published before it whose
/// confirms had not come (the broker had enqueued them), go on waiting and are answered in
/// exclusive-queue mode; the calls after it, which the broker discarded, are sent again and
/// answered. The limit the broker named is used for later calls, refused before sending.
#[test]
fn an_oversized_request_ends_alone_and_the_others_are_answered() {
    for mode in MODES {
        let mut broker = Broker::new();
        broker.max_message_size = 1000;
        let mut sim = Sim::with_connection(client_config(mode), conn_config(), broker, 1, 64);
        let confirmed: Vec<CallId> = (0..4).map(|i| sim.call(&format!("c{i}"), 5000)).collect();
        let conn = sim.client.conn;
        sim.broker.hold_confirms(conn);
        let unconfirmed: Vec<CallId> = (0..4).map(|i| sim.call(&format!("u{i}"), 5000)).collect();
        let big = sim.call_with(CallRequest::new(
            Q,
            vec![b'x'; 2000],
            Duration::from_secs(5),
        ));
        let after: Vec<CallId> = (0..4).map(|i| sim.call(&format!("a{i}"), 5000)).collect();
        // No body this large was accepted on the channel: it goes out alone, once the
        // publishes in flight are settled, and the calls after it wait behind it.
        assert!(sim.is_pending(big));
        sim.broker.release_confirms(conn);
        sim.settle();
        match err(sim.result(big)) {
            e @ RpcError::Refused { code, text } => {
                assert_eq!(code.0, 406);
                assert!(
                    text.contains("message size 2000 is larger than configured max size 1000"),
                    "{text}"
                );
                assert!(!e.may_have_run());
            }
            other => panic!("{other:?}"),
        }
        sim.serve_all(0);
        let answered: Vec<&CallId> = match mode {
            ReplyMode::ExclusiveQueue => {
                confirmed.iter().chain(&unconfirmed).chain(&after).collect()
            }
            // The publishing channel is the reply path's: the calls it had taken lost their
            // reply path (they may have run); those the broker discarded went out again.
            _ => {
                for id in confirmed.iter().chain(&unconfirmed) {
                    assert_eq!(*err(sim.result(*id)), RpcError::ReplyPathLost);
                }
                after.iter().collect()
            }
        };
        for id in answered {
            assert!(ok_body(sim.result(*id)).starts_with(b"re:"), "{id:?}");
        }
        assert_eq!(sim.ended.len(), 13, "every call ended once");
        assert!(sim.client.up, "no reconnect");
        // The broker's limit is now the client's.
        let (now, wall) = (sim.now, sim.wall());
        assert_eq!(
            sim.client.m.call(
                now,
                wall,
                CallRequest::new(Q, vec![0u8; 1001], Duration::from_secs(1))
            ),
            Err(UsageError::MessageTooLarge {
                size: 1001,
                limit: 1000
            })
        );
    }
}

/// A client (with `config`) and no server, against a broker whose request queue takes at most
/// `max_length` messages and nacks the rest (`x-overflow: reject-publish`). The server check is
/// off: with no server, the calls must go out to find the queue full.
fn limited_queue_sim(mut config: ClientConfig, max_length: usize) -> Sim {
    let mut broker = Broker::new();
    broker.limit_queue(Q, max_length);
    config.server_check = None;
    Sim::with_connection(config, conn_config(), broker, 0, 1)
}

/// A publish the broker refuses by closing the channel loses the confirms it had not sent yet,
/// `basic.nack`s of a full `reject-publish` queue included: the calls refused that way would
/// wait for replies that never come. A request to an exchange the channel has not settled a
/// publish to goes out alone, so every nacked call still ends `QueueFull` at once and the
/// refused one alone ends `Refused`. Before requests went out alone, the nacked calls were
/// left waiting (and ended `TimedOut`, may have run, though none had).
#[test]
fn a_refusal_while_the_queue_rejects_loses_no_nack() {
    for mode in MODES {
        let mut config = client_config(mode);
        config.exchange_check = None;
        let mut sim = limited_queue_sim(config, 0);
        let conn = sim.client.conn;
        let first = sim.call("0", 5000);
        assert_eq!(*err(sim.result(first)), RpcError::QueueFull);
        sim.broker.hold_confirms(conn);
        let calls: Vec<CallId> = (1..20).map(|i| sim.call(&i.to_string(), 5000)).collect();
        let bad = sim.call_with({
            let mut c = CallRequest::new(Q, "bad", Duration::from_secs(5));
            c.exchange = "no-such-exchange".into();
            c
        });
        assert!(sim.is_pending(bad), "it waits for the nacks in flight");
        sim.broker.release_confirms(conn);
        sim.settle();
        for id in &calls {
            assert_eq!(*err(sim.result(*id)), RpcError::QueueFull, "{id:?}");
        }
        match err(sim.result(bad)) {
            RpcError::Refused { code, .. } => assert_eq!(code.0, 404),
            other => panic!("{other:?}"),
        }
        assert_eq!(sim.client.m.stats().requests_nacked, 20);
    }
}

/// A request queue with `x-max-length` and `x-overflow: reject-publish` is full: the broker
/// nacks the publish, and the call ends `QueueFull` at once (never ran), counted; the calls
/// the queue took wait for a server.
#[test]
fn a_full_request_queue_ends_calls_queue_full_at_once() {
    for mode in MODES {
        let mut sim = limited_queue_sim(client_config(mode), 3);
        let calls: Vec<CallId> = (0..5).map(|i| sim.call(&i.to_string(), 10_000)).collect();
        for id in &calls[3..] {
            let e = err(sim.result(*id));
            assert_eq!(*e, RpcError::QueueFull);
            assert!(!e.may_have_run());
        }
        for id in &calls[..3] {
            assert!(sim.is_pending(*id));
        }
        assert_eq!(sim.client.m.stats().requests_nacked, 2);
    }
}

/// A reply above the client's `max_body_size` ends its call at once with `ReplyTooLarge`
/// (the request ran), counted; an unroutable request whose return is above it still ends
/// `NotRouted`.
#[test]
fn a_reply_too_large_ends_its_call_at_once() {
    for mode in MODES {
        let mut conn = conn_config();
        conn.max_body_size = 1000;
        let mut config = client_config(mode);
        config.server_check = None;
        let mut sim = Sim::with_connection(config, conn, Broker::new(), 1, 8);
        let big = sim.call("big", 5000);
        let small = sim.call("small", 5000);
        let req = sim.take(0).unwrap();
        sim.reply(0, req, Ok(Bytes::from(vec![b'r'; 2000])));
        assert_eq!(
            *err(sim.result(big)),
            RpcError::ReplyTooLarge {
                size: 2000,
                limit: 1000
            }
        );
        assert!(err(sim.result(big)).may_have_run());
        sim.serve_all(0);
        assert_eq!(ok_body(sim.result(small)), b"re:small");
        let unroutable = sim.call_with(CallRequest::new(
            "nowhere",
            vec![b'x'; 2000],
            Duration::from_secs(5),
        ));
        assert_eq!(*err(sim.result(unroutable)), RpcError::NotRouted);
        assert_eq!(sim.client.m.stats().replies_too_large, 2);
    }
}

/// The client works on as few channels as the broker allows (its `channel_max`, here asked
/// down by the client as the URI's `channel_max` does), in both reply modes: it never opens
/// more, and calls are answered. The server check runs only with a channel to spare.
#[test]
fn the_client_works_at_channel_max_1_2_and_3() {
    for mode in MODES {
        for channel_max in 1..=3u16 {
            let mut conn = conn_config();
            conn.channel_max = channel_max;
            let mut sim = Sim::with_connection(client_config(mode), conn, Broker::new(), 1, 8);
            assert!(sim.client.m.is_ready(), "{mode:?} {channel_max}");
            let calls: Vec<CallId> = (0..4).map(|i| sim.call(&i.to_string(), 5000)).collect();
            sim.serve_all(0);
            for (i, id) in calls.iter().enumerate() {
                assert_eq!(
                    ok_body(sim.result(*id)),
                    format!("re:{i}").as_bytes(),
                    "{mode:?} {channel_max}"
                );
            }
            let open = sim.broker.open_channels(sim.client.conn);
            assert!(
                open.len() <= usize::from(channel_max),
                "{mode:?} {channel_max}: {open:?}"
            );
            // A call to a missing exchange still ends alone (by the confirms when the checks
            // are off), and the next call is answered.
            let bad = sim.call_with({
                let mut c = CallRequest::new(Q, "bad", Duration::from_secs(5));
                c.exchange = "no-such-exchange".into();
                c
            });
            assert!(
                matches!(err(sim.result(bad)), RpcError::Refused { code, .. } if code.0 == 404),
                "{mode:?} {channel_max}: {:?}",
                sim.result(bad)
            );
            let good = sim.call("good", 5000);
            sim.serve_all(0);
            assert_eq!(
                ok_body(sim.result(good)),
                b"re:good",
                "{mode:?} {channel_max}"
            );
            assert!(sim.client.up, "no reconnect");
        }
    }
}

/// The publishing channel closes for a reason that names no publish (here an unknown 406):
/// nothing tells which unconfirmed publish the broker took, so none is typed never-ran; in
/// exclusive-queue mode each keeps waiting for its reply, and those the broker had enqueued
/// are answered, on the same connection and reply path.
#[test]
fn a_publishing_channel_closed_for_no_known_publish_keeps_its_calls_waiting() {
    let mut config = client_config(ReplyMode::ExclusiveQueue);
    config.server_check = None;
    let mut sim = Sim::new(config, 1, 8);
    let conn = sim.client.conn;
    sim.broker.hold_confirms(conn);
    let calls: Vec<CallId> = (0..3).map(|i| sim.call(&i.to_string(), 5000)).collect();
    let reply = sim.reply_channel();
    let publisher = *sim
        .broker
        .open_channels(conn)
        .iter()
        .find(|ch| **ch != reply)
        .unwrap();
    sim.broker
        .close_channel(conn, publisher, 406, "PRECONDITION_FAILED - something else");
    sim.settle();
    for id in &calls {
        assert!(sim.is_pending(*id), "{id:?}: {:?}", sim.ended);
    }
    sim.broker.release_confirms(conn);
    sim.serve_all(0);
    for (i, id) in calls.iter().enumerate() {
        assert_eq!(ok_body(sim.result(*id)), format!("re:{i}").as_bytes());
    }
    assert_eq!(sim.client.m.stats().reply_path_rearmed, 0);
    let later = sim.call("later", 5000);
    sim.serve_all(0);
    assert_eq!(ok_body(sim.result(later)), b"re:later");
}

/// Random mixes of good calls, calls the broker refuses (a body above its `max_message_size`,
/// a missing exchange, a full `reject-publish` queue), confirms held back and released,
/// servers taking requests, and time, in both reply modes, from fixed seeds: every call ends
/// exactly once, by its deadline, and a call typed never-ran was never received by a server.
#[test]
fn refusals_among_calls_end_once_and_never_ran_means_never_received() {
    const LIMITED: &str = "limited";
    for mode in MODES {
        for seed in 1..=24u64 {
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut broker = Broker::new();
            broker.max_message_size = 1000;
            broker.limit_queue(LIMITED, 2);
            let mut config = client_config(mode);
            config.server_check = None;
            config.exchange_check = None;
            let mut sim = Sim::with_connection(config, conn_config(), broker, 1, 4);
            let conn = sim.client.conn;
            let mut started = Vec::new();
            let mut received = std::collections::BTreeSet::new();
            let mut holding = false;
            for _ in 0..60 {
                let (now, wall) = (sim.now, sim.wall());
                let timeout = Duration::from_millis(200 + xorshift(&mut rng) % 2000);
                let mut request = CallRequest::new(Q, "g", timeout);
                match xorshift(&mut rng) % 12 {
                    0..=4 => {}
                    5 => request.body = Bytes::from(vec![b'b'; 2000]),
                    6 => request.exchange = "no-such-exchange".into(),
                    7 => request.routing_key = LIMITED.into(),
                    8 => {
                        holding = !holding;
                        if holding {
                            sim.broker.hold_confirms(conn);
                        } else {
                            sim.broker.release_confirms(conn);
                        }
                        sim.settle();
                        continue;
                    }
                    9 | 10 => {
                        if let Some(req) = sim.take(0) {
                            received.insert(req.properties.correlation_id().clone().unwrap());
                            sim.reply(0, req, Ok(Bytes::from_static(b"re")));
                        }
                        continue;
                    }
                    _ => {
                        sim.advance(Duration::from_millis(xorshift(&mut rng) % 300));
                        continue;
                    }
                }
                request.idempotent = xorshift(&mut rng) & 1 == 0;
                // A body above the limit the client learned is refused at the call site.
                if let Ok(id) = sim.client.m.call(now, wall, request) {
                    started.push(id);
                    sim.settle();
                }
            }
            sim.broker.release_confirms(conn);
            sim.settle();
            for _ in 0..20 {
                while let Some(req) = sim.take(0) {
                    received.insert(req.properties.correlation_id().clone().unwrap());
                    sim.reply(0, req, Ok(Bytes::from_static(b"re")));
                }
                sim.advance(Duration::from_millis(200));
            }
            for id in &started {
                let result = sim.result(*id);
                let corr = sim_key().issue(*id);
                if let Err(e) = result {
                    assert!(
                        e.may_have_run() || !received.contains(&corr),
                        "{mode:?} seed {seed}: {id:?} ended {e:?} but a server received it"
                    );
                }
            }
            assert_eq!(sim.ended.len(), started.len(), "{mode:?} seed {seed}");
            assert_eq!(sim.client.m.in_flight(), 0);
        }
    }
}
