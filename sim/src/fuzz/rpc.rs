//! Arbitrary RPC operation sequences: an `RpcClient` and an `RpcServer` over the in-memory
//! broker of [`crate::broker`], in virtual time. Each input byte picks an operation
//! (call, take, reply, abandon, duplicate or forged reply, time advance, client channel or
//! connection loss, reconnects, server crash between reply and ack, server shutdown, resource
//! alarm), the next bytes its arguments.
//!
//! Checked: no panic; the broker sees no protocol violation (no delivery tag acked twice, no
//! invalid expiration...); a call ends at most once, never before its deadline with
//! `TimedOut`/`Expired` and never after it (the timer stops at every deadline); when the input
//! is used up, closing the client ends every call that was accepted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use amqp_rpc_core::rpc::{
    CallId, CallRequest, ClientConfig, ClientEvent, CorrelationKey, HandlerError, ReplyMode,
    Request, RpcClient, RpcServer, ERROR_HEADER, REJECTED_HEADER,
};
use amqp_rpc_core::types::{AMQPValue, BasicProperties, FieldTable, LongString, ShortString};
use amqp_rpc_core::RpcError;
use bytes::Bytes;

use crate::broker::Broker;
use crate::rpc::{base_instant, client_config, conn_config, server_config, settle, wall, Wire};

const Q: &str = "rpc";
const PREFIX: &str = "fz";

/// Runs the `rpc` scenario on one fuzz input.
pub fn rpc(data: &[u8]) {
    let mut input = Input(data);
    let mode = if input.byte() & 1 == 0 {
        ReplyMode::DirectReplyTo
    } else {
        ReplyMode::ExclusiveQueue
    };
    let flags = input.byte();
    let mut config = client_config(mode);
    config.max_in_flight = 1 + usize::from(flags & 7);
    config.server_check = (flags & 8 != 0).then_some(Duration::from_millis(300));
    let mut h = Harness::new(config, 1 + u16::from(input.byte() % 4));
    while let Some(op) = input.byte_opt() {
        h.apply(op, &mut input);
        h.check();
    }
    h.finish();
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte_opt(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn byte(&mut self) -> u8 {
        self.byte_opt().unwrap_or(0)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

struct Harness {
    base: Instant,
    now: Instant,
    broker: Broker,
    client: Wire<RpcClient>,
    server: Wire<RpcServer>,
    tokens: Vec<Request>,
    last_reply: Option<(String, BasicProperties, Bytes)>,
    /// Calls accepted and not ended, with their deadlines.
    pending: BTreeMap<CallId, Instant>,
    ended: BTreeMap<CallId, ()>,
    accepted: u64,
}

impl Harness {
    fn new(config: ClientConfig, prefetch: u16) -> Self {
        let base = base_instant();
        let mut broker = Broker::new();
        broker.declare(Q);
        let server = Wire::new(
            RpcServer::new(server_config(Q, prefetch), conn_config(), base),
            &mut broker,
        );
        let client = Wire::new(
            RpcClient::new(
                config,
                conn_config(),
                CorrelationKey::from_bytes([0x5a; 32]),
                base,
            ),
            &mut broker,
        );
        let mut h = Self {
            base,
            now: base,
            broker,
            client,
            server,
            tokens: Vec::new(),
            last_reply: None,
            pending: BTreeMap::new(),
            ended: BTreeMap::new(),
            accepted: 0,
        };
        h.settle();
        h
    }

    fn settle(&mut self) {
        settle(
            &mut self.broker,
            self.now,
            &mut [&mut self.client, &mut self.server],
        );
    }

    fn check(&mut self) {
        self.broker.assert_no_violations();
        while let Some(event) = self.client.m.poll_event() {
            if let ClientEvent::CallEnded { call, result } = event {
                let deadline = self
                    .pending
                    .remove(&call)
                    .unwrap_or_else(|| panic!("{call:?} ended twice or was never accepted"));
                self.ended.insert(call, ());
                if matches!(result, Err(RpcError::TimedOut | RpcError::Expired)) {
                    assert!(self.now >= deadline, "{call:?} timed out early");
                }
            }
        }
        // Never late: the timer stops at every deadline.
        if let Some((id, d)) = self.pending.iter().find(|(_, d)| **d <= self.now) {
            panic!("{id:?} is past its deadline {d:?} and has not ended");
        }
        while self.server.m.poll_event().is_some() {}
    }

    fn apply(&mut self, op: u8, input: &mut Input<'_>) {
        let now = self.now;
        match op % 16 {
            0..=2 => {
                let timeout = Duration::from_millis(u64::from(input.byte()) * 10);
                let mut request =
                    CallRequest::new(Q, Bytes::copy_from_slice(input.bytes(3)), timeout);
                request.idempotent = op & 0x10 != 0;
                if let Ok(id) = self.client.m.call(now, wall(self.base, now), request) {
                    self.accepted += 1;
                    assert_eq!(id, CallId(self.accepted));
                    self.pending.insert(id, now + timeout);
                }
            }
            3 | 4 => {
                if let Some(r) = self.server.m.poll_request(now, wall(self.base, now)) {
                    self.tokens.push(r);
                }
            }
            5 | 6 => {
                if self.tokens.is_empty() {
                    return;
                }
                let pick = usize::from(input.byte()) % self.tokens.len();
                let r = self.tokens.remove(pick);
                let result = match input.byte() % 3 {
                    0 => Ok(r.body.clone()),
                    1 => Err(HandlerError::Failed {
                        code: "handler_failed".into(),
                        message: "boom".into(),
                    }),
                    _ => Err(HandlerError::Rejected {
                        code: "invalid_request".into(),
                        message: "bad".into(),
                    }),
                };
                if let Some(to) = r.properties.reply_to().as_ref() {
                    let props = BasicProperties::default().with_correlation_id(
                        r.properties.correlation_id().clone().unwrap_or_default(),
                    );
                    self.last_reply = Some((to.to_string(), props, r.body.clone()));
                }
                if op & 0x20 != 0 {
                    // The server dies between its reply and its ack.
                    self.broker.die_after_next_publish(self.server.conn);
                }
                self.server.m.reply(now, r.token, result);
            }
            7 => {
                if self.tokens.is_empty() {
                    return;
                }
                let pick = usize::from(input.byte()) % self.tokens.len();
                let r = self.tokens.remove(pick);
                self.server.m.abandon(now, r.token);
            }
            8 => {
                // A duplicate, or a forged reply with arbitrary correlation id and headers.
                let Some((to, props, body)) = self.last_reply.clone() else {
                    return;
                };
                let props = if op & 0x10 != 0 {
                    let corr = String::from_utf8_lossy(input.bytes(12)).into_owned();
                    let mut headers = FieldTable::default();
                    match input.byte() % 4 {
                        0 => {}
                        1 => {
                            headers
                                .insert(ShortString::from(ERROR_HEADER), AMQPValue::Boolean(true));
                        }
                        2 => {
                            let code = LongString::from(input.bytes(4).to_vec());
                            headers.insert(
                                ShortString::from(ERROR_HEADER),
                                AMQPValue::LongString(code),
                            );
                        }
                        _ => {
                            headers
                                .insert(ShortString::from(REJECTED_HEADER), AMQPValue::LongInt(1));
                        }
                    }
                    let props = props.with_headers(headers);
                    match ShortString::try_new(format!("{PREFIX}.{corr}")) {
                        Ok(c) => props.with_correlation_id(c),
                        Err(_) => props,
                    }
                } else {
                    props
                };
                self.broker.publish(&to, props, &body);
            }
            9 | 10 => self.advance(Duration::from_millis(u64::from(input.byte()) * 7)),
            11 => {
                if let Some(&ch) = self.broker.consumer_channels(self.client.conn).first() {
                    self.broker
                        .close_channel(self.client.conn, ch, 406, "PRECONDITION_FAILED");
                }
            }
            12 => {
                if self.client.up {
                    if op & 0x10 != 0 {
                        self.broker.drop_connection(self.client.conn);
                    } else {
                        self.broker
                            .close_connection(self.client.conn, 320, "CONNECTION_FORCED");
                    }
                } else if self.client.m.reconnect(now).is_ok() {
                    self.client.redial(&mut self.broker);
                }
            }
            13 => {
                if self.server.up {
                    self.broker.drop_connection(self.server.conn);
                } else if self.server.m.reconnect(now).is_ok() {
                    self.server.redial(&mut self.broker);
                }
            }
            14 => {
                if op & 0x10 != 0 {
                    self.server.m.shutdown(now);
                } else {
                    self.client.m.abandon();
                }
            }
            _ => {
                if op & 0x10 != 0 {
                    self.broker.block(self.client.conn, "low on memory");
                } else {
                    self.broker.unblock(self.client.conn);
                }
            }
        }
        self.settle();
    }

    fn advance(&mut self, by: Duration) {
        let to = self.now + by;
        loop {
            let next = [self.client.m.poll_timeout(), self.server.m.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= to => {
                    self.now = t.max(self.now);
                    self.broker.tick(self.now);
                    self.client.m.handle_timeout(self.now);
                    self.server.m.handle_timeout(self.now);
                    self.settle();
                    self.check();
                }
                _ => break,
            }
        }
        self.now = to;
        self.broker.tick(to);
    }

    fn finish(&mut self) {
        self.client.m.close(self.now);
        self.settle();
        self.check();
        assert!(
            self.pending.is_empty(),
            "calls never ended: {:?}",
            self.pending
        );
        assert_eq!(self.ended.len() as u64, self.accepted);
        let stats = self.client.m.stats();
        assert_eq!(stats.calls_started, self.accepted);
        assert_eq!(stats.calls_answered + stats.calls_failed, self.accepted);
    }
}
