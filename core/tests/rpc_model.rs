//! Model-based test of the RPC machines: random interleavings of call / server take / reply /
//! abandon / duplicate reply / unknown reply / time advance / channel close / connection close /
//! reconnect, run against the real `RpcClient` and `RpcServer` over the in-memory broker, and
//! against a small reference model that predicts every outcome.
//!
//! Checked after every operation:
//! - the calls that ended are exactly those the model ends, with the model's outcome, each once;
//! - timers: `poll_timeout` is exactly the earliest pending deadline, and a call ends at the
//!   virtual instant of its deadline (time advances from deadline to deadline);
//! - client and server stats equal the model's counters (late / duplicate / unknown replies,
//!   requests sent, replies, drops, abandoned tokens);
//! - the broker saw no protocol violation, in particular no delivery tag acked twice, and every
//!   delivery to the server is buffered, in a handler, or settled.

// In a test an unwrap is an assertion.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use amqp_rpc_core::rpc::{
    CallId, CallRequest, ClientEvent, ClientStats, HandlerError, ReplyMode, Request, RpcClient,
    RpcServer, ServerStats, ERROR_HEADER, REJECTED_HEADER,
};
use amqp_rpc_core::types::{AMQPValue, BasicProperties, FieldTable, LongString, ShortString};
use amqp_rpc_core::{RpcError, UsageError};
use bytes::Bytes;
use proptest::prelude::*;

use amqp_rpc_sim::broker::Broker;
use amqp_rpc_sim::rpc::*;

const Q: &str = "rpc";
/// The correlation id the client under test gives call `n`.
fn corr_id(n: u64) -> String {
    sim_key().issue(CallId(n)).to_string()
}

#[derive(Debug, Clone)]
enum Op {
    Call { timeout_ms: u64, idempotent: bool },
    Take,
    Reply { pick: usize, kind: u8 },
    Abandon { pick: usize },
    Duplicate,
    Unknown { kind: u8 },
    Advance { ms: u64 },
    ChannelClose,
    ConnectionClose { forced: bool },
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop_oneof![Just(0u64), 1u64..2000], any::<bool>())
            .prop_map(|(timeout_ms, idempotent)| Op::Call { timeout_ms, idempotent }),
        4 => Just(Op::Take),
        4 => (any::<usize>(), 0u8..3).prop_map(|(pick, kind)| Op::Reply { pick, kind }),
        1 => any::<usize>().prop_map(|pick| Op::Abandon { pick }),
        2 => Just(Op::Duplicate),
        1 => (0u8..4).prop_map(|kind| Op::Unknown { kind }),
        4 => prop_oneof![Just(0u64), 1u64..1500].prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::ChannelClose),
        1 => any::<bool>().prop_map(|forced| Op::ConnectionClose { forced }),
        2 => Just(Op::Reconnect),
    ]
}

/// What the model expects a call to end with (replies compared by body).
type Outcome = Result<Bytes, RpcError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Answered,
    Otherwise,
}

#[derive(Debug, Clone)]
struct MCall {
    deadline: Instant,
    wall_deadline: u64,
    idempotent: bool,
    /// Reply-path incarnation it was last sent on; `None` while not sent.
    sent_on: Option<u64>,
    /// Whether it was ever published: an idempotent call waiting to be sent again may have run.
    published: bool,
    /// Reply-path channel losses it was sent again after (at most two).
    channel_losses: u32,
}

/// A request as the server holds it.
#[derive(Debug, Clone)]
struct MReq {
    call: CallId,
    redelivered: bool,
    /// The client's reply-path incarnation when it was published.
    incarnation: u64,
    wall_deadline: u64,
}

#[derive(Debug, Clone)]
struct LastReply {
    reply_to: String,
    call: CallId,
    incarnation: u64,
    kind: u8,
}

#[derive(Debug, Default)]
struct Model {
    next_id: u64,
    pending: BTreeMap<CallId, MCall>,
    ended: BTreeMap<CallId, Ended>,
    /// Calls waiting to be sent, in the order the client sends them.
    held: VecDeque<CallId>,
    connected: bool,
    /// Bumped whenever the client's reply path dies (channel or connection lost).
    incarnation: u64,
    server_buf: VecDeque<MReq>,
    client: ClientStats,
    server: ServerStats,
    /// Outcomes produced by the current operation.
    out: Vec<(CallId, Outcome)>,
}

impl Model {
    fn end(&mut self, id: CallId, outcome: Outcome) {
        let call = self
            .pending
            .remove(&id)
            .expect("model ends pending calls only");
        let _ = call;
        let answered = matches!(
            outcome,
            Ok(_) | Err(RpcError::Remote { .. } | RpcError::Rejected { .. })
        );
        if answered {
            self.client.calls_answered += 1;
        } else {
            self.client.calls_failed += 1;
        }
        self.ended.insert(
            id,
            if answered {
                Ended::Answered
            } else {
                Ended::Otherwise
            },
        );
        self.held.retain(|h| *h != id);
        self.out.push((id, outcome));
    }

    /// Sends every held call (the client is connected and its reply path armed).
    fn flush(&mut self) {
        if !self.connected {
            return;
        }
        while let Some(id) = self.held.pop_front() {
            let call = self.pending.get_mut(&id).expect("held calls are pending");
            call.sent_on = Some(self.incarnation);
            call.published = true;
            self.client.requests_sent += 1;
            self.server.received += 1;
            self.server_buf.push_back(MReq {
                call: id,
                redelivered: false,
                incarnation: self.incarnation,
                wall_deadline: call.wall_deadline,
            });
        }
    }

    /// The reply path died with its channel (the connection lives): sent calls end
    /// `ReplyPathLost`, idempotent ones with time left wait to be sent again, at most twice.
    fn lose_channel(&mut self, now: Instant) {
        self.incarnation += 1;
        self.client.reply_path_rearmed += 1;
        let sent: Vec<CallId> = self
            .pending
            .iter()
            .filter(|(_, c)| c.sent_on.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in sent {
            let call = self.pending.get_mut(&id).expect("listed above");
            if call.idempotent && call.deadline > now && call.channel_losses < 2 {
                call.sent_on = None;
                call.channel_losses += 1;
                self.held.push_back(id);
            } else {
                self.end(id, Err(RpcError::ReplyPathLost));
            }
        }
    }

    /// The connection died: sent calls end `ConnectionLost { sent: true }`, idempotent ones
    /// with time left wait to be sent again.
    fn lose_path(&mut self, now: Instant) {
        self.incarnation += 1;
        let sent: Vec<CallId> = self
            .pending
            .iter()
            .filter(|(_, c)| c.sent_on.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in sent {
            let call = self.pending.get_mut(&id).expect("listed above");
            if call.idempotent && call.deadline > now {
                call.sent_on = None;
                self.held.push_back(id);
            } else {
                self.end(id, Err(RpcError::ConnectionLost { sent: true }));
            }
        }
    }

    /// A reply for `call` published on the reply path of `incarnation`.
    fn reply_arrives(&mut self, call: CallId, incarnation: u64, outcome: Outcome) {
        if !self.connected || incarnation != self.incarnation {
            // Its reply queue or direct reply-to channel is gone: the broker drops it.
            return;
        }
        if self.pending.contains_key(&call) {
            assert_eq!(
                self.pending[&call].sent_on,
                Some(incarnation),
                "a live reply path implies the call was sent on it"
            );
            self.end(call, outcome);
        } else {
            match self.ended.get(&call) {
                Some(Ended::Answered) => self.client.replies_duplicate += 1,
                Some(Ended::Otherwise) => self.client.replies_late += 1,
                None => unreachable!("a reply for a call never made"),
            }
        }
    }

    fn earliest_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|c| c.deadline).min()
    }

    /// Ends every call whose deadline is `now` or earlier.
    fn expire(&mut self, now: Instant) {
        let due: Vec<CallId> = self
            .pending
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let outcome = if self.pending[&id].published {
                RpcError::TimedOut
            } else {
                RpcError::Expired
            };
            self.end(id, Err(outcome));
        }
    }
}

fn reply_outcome(call: CallId, kind: u8) -> (Result<Bytes, HandlerError>, Outcome) {
    let body = Bytes::from(format!("r{}", call.0));
    match kind {
        0 => (Ok(body.clone()), Ok(body)),
        1 => (
            Err(HandlerError::Failed {
                code: "handler_failed".into(),
                message: "boom".into(),
            }),
            Err(RpcError::Remote {
                code: "handler_failed".into(),
                message: "boom".into(),
            }),
        ),
        _ => (
            Err(HandlerError::Rejected {
                code: "invalid_request".into(),
                message: "bad n".into(),
            }),
            Err(RpcError::Rejected {
                code: "invalid_request".into(),
                message: "bad n".into(),
            }),
        ),
    }
}

/// The wire form of a reply, for replaying one by hand (documented in `amqp_rpc_core::rpc`).
fn reply_message(call: CallId, kind: u8) -> (BasicProperties, Bytes) {
    let props = BasicProperties::default().with_correlation_id(ShortString::from(corr_id(call.0)));
    match reply_outcome(call, kind).0 {
        Ok(body) => (props, body),
        Err(HandlerError::Failed { code, message })
        | Err(HandlerError::Rejected { code, message }) => {
            let mut headers = FieldTable::default();
            headers.insert(
                ShortString::from(ERROR_HEADER),
                AMQPValue::LongString(LongString::from(code)),
            );
            headers.insert(
                ShortString::from(REJECTED_HEADER),
                AMQPValue::Boolean(kind == 2),
            );
            (props.with_headers(headers), Bytes::from(message))
        }
    }
}

struct Harness {
    base: Instant,
    now: Instant,
    broker: Broker,
    client: Wire<RpcClient>,
    server: Wire<RpcServer>,
    tokens: Vec<(MReq, Request)>,
    last_reply: Option<LastReply>,
    model: Model,
    max_in_flight: usize,
}

impl Harness {
    fn new(
        mode: ReplyMode,
        server_check: bool,
        max_in_flight: usize,
        chunk: Option<usize>,
    ) -> Self {
        let base = base_instant();
        let mut broker = Broker::new();
        // Two deliveries at most: an abandoned request is requeued once, as the model says. The
        // clocks agree exactly here, so no skew tolerance: a request is dropped at its deadline.
        let mut server_config = server_config(Q, 1000);
        server_config.max_deliveries = 2;
        server_config.clock_skew_tolerance = Duration::ZERO;
        let mut server = Wire::new(
            RpcServer::new(server_config, conn_config(), base),
            &mut broker,
        );
        settle(&mut broker, base, &mut [&mut server]);
        assert!(server.m.is_serving());
        let mut config = client_config(mode);
        config.max_in_flight = max_in_flight;
        config.server_check = server_check.then_some(Duration::from_millis(1000));
        let mut client = Wire::new(
            RpcClient::new(config, conn_config(), sim_key(), base),
            &mut broker,
        );
        client.chunk = chunk;
        let mut h = Self {
            base,
            now: base,
            broker,
            client,
            server,
            tokens: Vec::new(),
            last_reply: None,
            model: Model {
                connected: true,
                ..Model::default()
            },
            max_in_flight,
        };
        h.settle();
        assert!(h.client.m.is_ready());
        h.check();
        h
    }

    fn wall(&self) -> u64 {
        wall(self.base, self.now).0
    }

    fn settle(&mut self) {
        settle(
            &mut self.broker,
            self.now,
            &mut [&mut self.client, &mut self.server],
        );
    }

    /// Compares what the machines did with what the model predicted.
    fn check(&mut self) {
        let mut got: Vec<(CallId, Outcome)> = Vec::new();
        while let Some(event) = self.client.m.poll_event() {
            if let ClientEvent::CallEnded { call, result } = event {
                got.push((call, result.map(|r| r.body)));
            }
        }
        got.sort_by_key(|(id, _)| *id);
        let mut want = std::mem::take(&mut self.model.out);
        want.sort_by_key(|(id, _)| *id);
        assert_eq!(got, want, "calls ended at {:?}", self.now - self.base);
        assert_eq!(self.client.m.stats(), self.model.client, "client stats");
        let s = self.server.m.stats();
        let m = &self.model.server;
        assert_eq!(
            (
                s.received,
                s.replied_ok,
                s.replied_error,
                s.dropped_expired,
                s.abandoned
            ),
            (
                m.received,
                m.replied_ok,
                m.replied_error,
                m.dropped_expired,
                m.abandoned
            ),
            "server stats"
        );
        assert_eq!((s.dropped_no_reply_to, s.stale_replies), (0, 0));
        assert_eq!(self.client.m.in_flight(), self.model.pending.len());
        self.broker.assert_no_violations();
        let acks: BTreeSet<_> = self.broker.acks.iter().collect();
        assert_eq!(
            acks.len(),
            self.broker.acks.len(),
            "a delivery tag acked twice"
        );
        assert_eq!(
            self.broker.unacked(self.server.conn),
            self.model.server_buf.len() + self.tokens.len(),
            "every delivery is buffered, in a handler, or settled once"
        );
        assert_eq!(self.server.m.buffered(), self.model.server_buf.len());
        if self.model.connected {
            assert!(self.client.m.is_ready());
            // No connection timer runs (heartbeats off): the next timer is the next deadline.
            assert_eq!(self.client.m.poll_timeout(), self.model.earliest_deadline());
        }
    }

    fn apply(&mut self, op: &Op) {
        let now = self.now;
        match *op {
            Op::Call {
                timeout_ms,
                idempotent,
            } => {
                let mut request = CallRequest::new(Q, "n", Duration::from_millis(timeout_ms));
                request.idempotent = idempotent;
                let result = self.client.m.call(now, wall(self.base, now), request);
                if self.model.pending.len() >= self.max_in_flight {
                    assert_eq!(
                        result,
                        Err(UsageError::TooManyCalls {
                            limit: self.max_in_flight
                        })
                    );
                    return;
                }
                self.model.next_id += 1;
                let id = CallId(self.model.next_id);
                assert_eq!(result, Ok(id));
                self.model.client.calls_started += 1;
                self.model.pending.insert(
                    id,
                    MCall {
                        deadline: now + Duration::from_millis(timeout_ms),
                        wall_deadline: self.wall() + timeout_ms,
                        idempotent,
                        sent_on: None,
                        published: false,
                        channel_losses: 0,
                    },
                );
                if timeout_ms == 0 {
                    // No budget: never published.
                    self.model.end(id, Err(RpcError::Expired));
                } else {
                    self.model.held.push_back(id);
                    self.model.flush();
                }
                self.settle();
            }
            Op::Take => {
                let wall_now = self.wall();
                let got = self.server.m.poll_request(now, wall(self.base, now));
                let mut want = None;
                while let Some(req) = self.model.server_buf.pop_front() {
                    if req.wall_deadline <= wall_now {
                        self.model.server.dropped_expired += 1;
                    } else {
                        want = Some(req);
                        break;
                    }
                }
                match (got, want) {
                    (None, None) => {}
                    (Some(request), Some(req)) => {
                        let corr = request.properties.correlation_id().clone();
                        assert_eq!(
                            corr.as_ref().map(|c| c.as_str().to_owned()),
                            Some(corr_id(req.call.0))
                        );
                        self.tokens.push((req, request));
                    }
                    (got, want) => panic!("server took {got:?}, model says {want:?}"),
                }
                self.settle();
            }
            Op::Reply { pick, kind } => {
                if self.tokens.is_empty() {
                    return;
                }
                let (req, request) = self.tokens.remove(pick % self.tokens.len());
                let reply_to = request
                    .properties
                    .reply_to()
                    .as_ref()
                    .expect("requests carry reply_to")
                    .to_string();
                let (result, outcome) = reply_outcome(req.call, kind);
                self.server.m.reply(now, request.token, result);
                if kind == 0 {
                    self.model.server.replied_ok += 1;
                } else {
                    self.model.server.replied_error += 1;
                }
                self.model.reply_arrives(req.call, req.incarnation, outcome);
                self.last_reply = Some(LastReply {
                    reply_to,
                    call: req.call,
                    incarnation: req.incarnation,
                    kind,
                });
                self.settle();
            }
            Op::Abandon { pick } => {
                if self.tokens.is_empty() {
                    return;
                }
                let (req, request) = self.tokens.remove(pick % self.tokens.len());
                let now = self.now;
                self.server.m.abandon(now, request.token);
                self.model.server.abandoned += 1;
                // Requeued once, flagged redelivered, back in the server's buffer; unless its
                // `expiration` (the caller's budget, counted from its publish) ran out: then the
                // broker drops it (TTL).
                if !req.redelivered && req.wall_deadline > self.wall() {
                    self.model.server.received += 1;
                    self.model.server_buf.push_back(MReq {
                        redelivered: true,
                        ..req
                    });
                }
                self.settle();
            }
            Op::Duplicate => {
                let Some(last) = self.last_reply.clone() else {
                    return;
                };
                let (props, body) = reply_message(last.call, last.kind);
                self.broker.publish(&last.reply_to, props, &body);
                let outcome = reply_outcome(last.call, last.kind).1;
                self.model
                    .reply_arrives(last.call, last.incarnation, outcome);
                self.settle();
            }
            Op::Unknown { kind } => {
                if !self.model.connected {
                    return;
                }
                let addresses = self.broker.reply_addresses(self.client.conn);
                assert_eq!(addresses.len(), 1, "one reply path: {addresses:?}");
                let props = BasicProperties::default();
                let props = match kind {
                    0 => props.with_correlation_id(ShortString::from("someone-else.1")),
                    1 => props
                        .with_correlation_id(ShortString::from(corr_id(self.model.next_id + 1000))),
                    2 => props,
                    _ => props.with_correlation_id(ShortString::from("1.x".to_owned())),
                };
                assert!(self.broker.publish(&addresses[0], props, b"?"));
                self.model.client.replies_unknown += 1;
                self.settle();
            }
            Op::Advance { ms } => {
                let to = now + Duration::from_millis(ms);
                loop {
                    let next = [self.client.m.poll_timeout(), self.server.m.poll_timeout()]
                        .into_iter()
                        .flatten()
                        .min();
                    match next {
                        Some(t) if t <= to => {
                            assert!(t >= self.now, "a timer in the past");
                            self.now = t;
                            self.broker.tick(t);
                            self.client.m.handle_timeout(t);
                            self.server.m.handle_timeout(t);
                            self.settle();
                            // Exactly the calls due now end now: not before, not one tick later.
                            self.model.expire(t);
                            self.check();
                        }
                        _ => break,
                    }
                }
                self.now = to;
                self.broker.tick(to);
                self.settle();
            }
            Op::ChannelClose => {
                if !self.model.connected {
                    return;
                }
                let chans = self.broker.consumer_channels(self.client.conn);
                assert_eq!(chans.len(), 1, "one reply channel: {chans:?}");
                self.broker
                    .close_channel(self.client.conn, chans[0], 406, "PRECONDITION_FAILED");
                self.model.lose_channel(now);
                // The client re-arms at once and sends what waits.
                self.model.flush();
                self.settle();
            }
            Op::ConnectionClose { forced } => {
                if !self.model.connected {
                    return;
                }
                if forced {
                    self.broker
                        .close_connection(self.client.conn, 320, "CONNECTION_FORCED");
                } else {
                    self.broker.drop_connection(self.client.conn);
                }
                self.model.connected = false;
                self.model.lose_path(now);
                self.settle();
                assert!(!self.client.up);
            }
            Op::Reconnect => {
                if self.model.connected {
                    assert_eq!(self.client.m.reconnect(now), Err(UsageError::Closing));
                    return;
                }
                self.client
                    .m
                    .reconnect(now)
                    .expect("closed, so reconnect works");
                self.client.redial(&mut self.broker);
                self.model.connected = true;
                self.model.flush();
                self.settle();
            }
        }
    }

    /// Answers everything the server holds, then closes the client: every call has ended.
    fn finish(&mut self) {
        loop {
            let before = self.tokens.len();
            self.apply(&Op::Take);
            self.check();
            if self.tokens.len() == before {
                break;
            }
            self.apply(&Op::Reply { pick: 0, kind: 0 });
            self.check();
        }
        let now = self.now;
        self.client.m.close(now);
        // Calls not sent end first (never ran), then the sent ones (may have run).
        for id in std::mem::take(&mut self.model.held) {
            // An idempotent call waiting to be sent again was published before: it may have run.
            let sent = self.model.pending[&id].published;
            self.model.end(id, Err(RpcError::ConnectionLost { sent }));
        }
        let rest: Vec<CallId> = self.model.pending.keys().copied().collect();
        for id in rest {
            self.model
                .end(id, Err(RpcError::ConnectionLost { sent: true }));
        }
        self.model.connected = false;
        self.settle();
        self.check();
        assert!(self.client.m.is_finished());
        assert_eq!(
            self.model.ended.len() as u64,
            self.model.next_id,
            "every call ended exactly once"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    #[test]
    fn rpc_matches_model(
        direct in any::<bool>(),
        server_check in any::<bool>(),
        max_in_flight in 1usize..7,
        chunk in prop_oneof![Just(None), Just(Some(1usize)), Just(Some(5)), Just(Some(64))],
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mode = if direct { ReplyMode::DirectReplyTo } else { ReplyMode::ExclusiveQueue };
        let mut h = Harness::new(mode, server_check, max_in_flight, chunk);
        for op in &ops {
            h.apply(op);
            h.check();
        }
        h.finish();
    }
}
