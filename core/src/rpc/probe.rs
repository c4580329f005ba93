//! The RPC client's checker of request queues and exchanges: before a call goes out, a passive
//! declare asks whether its queue has consumers (`ClientConfig::server_check`) or its exchange
//! exists (`ClientConfig::exchange_check`), so that a call nobody can answer fails at once
//! (`NoServers`, `NotRouted`, `Refused`) instead of at its deadline.
//!
//! It has its own channel (a passive declare of a missing queue or exchange closes the channel
//! with 404) and runs one passive declare at a time, so that a failure names its target. It
//! returns what it learned; the client applies it (its timer table holds the rechecks).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use amq_protocol::types::FieldTable;

use crate::connection::{Connection, QueueOptions, Reply};
use crate::error::{ChannelError, RpcError};
use crate::ids::{ChannelId, ReplyCode, RequestId};

/// What a passive declare asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    Queue(String),
    Exchange(String),
}

/// What the probe says of a call that waits to be sent.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Its queue has servers, or its exchange exists, or nobody can tell: send it.
    Send,
    /// Not known yet (a look is under way or due): keep it.
    Wait,
    /// It cannot succeed: end it with this error.
    Fail(RpcError),
}

/// A request queue's status changed; the client's timer table follows.
#[derive(Debug)]
pub(super) struct QueueUpdate {
    /// The queue; a second look planned for it is off.
    pub(super) queue: String,
    /// Every other queue was forgotten too (the table was full): their second looks are off.
    pub(super) forgot_others: bool,
    /// When to take a second look at a zero count, if one is due.
    pub(super) recheck_at: Option<Instant>,
}

/// How long after a zero count that followed a positive one the count is read again.
const ZERO_RECHECK: Duration = Duration::from_millis(250);

/// Bound on distinct request queues (and, apart, exchanges) whose status is remembered.
const MAX_PROBED_QUEUES: usize = 1024;

/// The checker's state on the current connection, and what it learned (kept across
/// connections: the broker's queues outlive them).
#[derive(Debug, Default)]
pub(super) struct Probe {
    channel: Option<ChannelId>,
    in_flight: Option<(RequestId, Target)>,
    queues: HashMap<String, QueueStatus>,
    exchanges: HashMap<String, ExchangeStatus>,
    /// Whether the client was ready once already: the next ready is a reconnect.
    was_ready: bool,
    /// Until when, after the client's own reconnect, a queue that had servers and now reads
    /// zero consumers or missing is looked at again instead of believed (see
    /// [`Probe::on_ready`]).
    grace_until: Option<Instant>,
}

/// What the client knows of a request queue's consumers.
#[derive(Debug, Clone, Copy, Default)]
struct QueueStatus {
    consumers: Consumers,
    checked_at: Option<Instant>,
    /// A zero count right after a positive one is looked at again before calls fail: a quorum
    /// queue electing a new leader, or a server reconnecting, reads zero for a moment while its
    /// servers are fine. Calls wait (within their deadline) until the second look.
    confirming: bool,
}

/// The answer of the last passive declare of a request queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Consumers {
    /// Not asked yet.
    #[default]
    Unasked,
    /// The queue's consumer count.
    Count(u32),
    /// The queue does not exist (404).
    Absent,
    /// The broker refused to say (403, 405...): calls go out, and the mandatory flag still
    /// catches a queue that is missing.
    Unknown,
}

/// What the client knows of an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExchangeStatus {
    exists: Exists,
    checked_at: Instant,
}

/// The answer of the last passive declare of an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Exists {
    Yes,
    /// The broker said no (404), in these words.
    No {
        code: ReplyCode,
        text: String,
    },
    /// The broker refused to say (403...): calls go out.
    Unknown,
}

impl Probe {
    /// Whether no passive declare is under way (one runs at a time).
    pub(super) fn is_idle(&self) -> bool {
        self.in_flight.is_none()
    }

    /// The connection is gone, and its channel and answer with it.
    pub(super) fn forget_connection(&mut self) {
        self.channel = None;
        self.in_flight = None;
    }

    /// The client's reply path is armed at `now`. After a reconnect (not the first connect),
    /// `grace` begins: a broker restart or a network cut that took the client's connection
    /// most likely took its servers' too, and they come back on their own schedule (their
    /// backoff, `queue.declare` of a queue that did not survive, `basic.consume`). Until they
    /// do, the queue reads zero consumers, or 404 for a non-durable classic queue that vanished
    /// with the restart. Within the grace such a queue is looked at again every
    /// [`ZERO_RECHECK`] and calls wait (within their deadline) instead of failing `NoServers`
    /// or `NotRouted`; after it, the count is believed as usual.
    pub(super) fn on_ready(&mut self, now: Instant, grace: Duration) {
        if std::mem::replace(&mut self.was_ready, true) && !grace.is_zero() {
            self.grace_until = now.checked_add(grace);
            // A count from before the reconnect says nothing of the servers now: a call sent on
            // it would come back `NotRouted` from a queue gone with a restart. Look first.
            for status in self.queues.values_mut() {
                if matches!(status.consumers, Consumers::Count(n) if n > 0) {
                    *status = QueueStatus {
                        consumers: Consumers::Count(0),
                        checked_at: None,
                        confirming: true,
                    };
                }
            }
        }
    }

    /// Whether `now` is within the grace after a reconnect.
    fn in_grace(&self, now: Instant) -> bool {
        self.grace_until.is_some_and(|until| now < until)
    }

    /// A channel closed; returns whether it was the probe's.
    pub(super) fn on_channel_closed(&mut self, channel: ChannelId) -> bool {
        let ours = self.channel == Some(channel);
        if ours {
            self.channel = None;
        }
        ours
    }

    /// The verdict on a call to `queue` through the default exchange, with `interval` between
    /// looks; starts a look when the last one is stale.
    pub(super) fn queue_verdict(
        &mut self,
        conn: &mut Connection,
        now: Instant,
        queue: &str,
        interval: Duration,
    ) -> Verdict {
        let status = self.queues.get(queue).copied();
        let fresh = status
            .and_then(|s| s.checked_at)
            .is_some_and(|at| at.checked_add(interval).is_none_or(|until| now < until));
        if !fresh {
            self.start(conn, Target::Queue(queue.to_owned()));
        }
        match status.map(|s| s.consumers) {
            Some(Consumers::Count(n)) if n > 0 => Verdict::Send,
            _ if status.is_some_and(|s| s.confirming) => Verdict::Wait,
            Some(Consumers::Count(_)) if fresh => Verdict::Fail(RpcError::NoServers),
            Some(Consumers::Absent) if fresh => Verdict::Fail(RpcError::NotRouted),
            Some(Consumers::Unknown) if fresh => Verdict::Send,
            _ => Verdict::Wait,
        }
    }

    /// The verdict on a call through `exchange`: it goes out once the exchange is known to
    /// exist. Starts a look when the last one is stale.
    pub(super) fn exchange_verdict(
        &mut self,
        conn: &mut Connection,
        now: Instant,
        exchange: &str,
        interval: Duration,
    ) -> Verdict {
        let status = self.exchanges.get(exchange);
        let fresh = status.is_some_and(|s| {
            s.checked_at
                .checked_add(interval)
                .is_none_or(|until| now < until)
        });
        let verdict = match status.map(|s| &s.exists) {
            Some(Exists::Yes) => Verdict::Send,
            Some(Exists::No { code, text }) if fresh => Verdict::Fail(RpcError::Refused {
                code: *code,
                text: text.clone(),
            }),
            Some(Exists::Unknown) if fresh => Verdict::Send,
            _ => Verdict::Wait,
        };
        if !fresh {
            self.start(conn, Target::Exchange(exchange.to_owned()));
        }
        verdict
    }

    /// Starts a passive declare of `target`, on the probe's channel (opened when needed),
    /// unless one is under way or the connection is not open.
    pub(super) fn start(&mut self, conn: &mut Connection, target: Target) {
        if !self.is_idle() || !conn.is_open() {
            return;
        }
        let channel = match self.channel {
            Some(c) if conn.is_channel_usable(c) => c,
            _ => match conn.open_channel() {
                Ok(c) => {
                    self.channel = Some(c);
                    c
                }
                Err(_) => return,
            },
        };
        let sent = match &target {
            Target::Queue(queue) => {
                let passive = QueueOptions {
                    passive: true,
                    ..QueueOptions::default()
                };
                conn.declare_queue(channel, queue, passive, FieldTable::default())
            }
            Target::Exchange(exchange) => conn.check_exchange(channel, exchange),
        };
        if let Ok(request) = sent {
            self.in_flight = Some((request, target));
        }
    }

    /// Takes the look `request` answers, if it is the probe's.
    pub(super) fn take_answered(&mut self, request: RequestId) -> Option<Target> {
        self.in_flight
            .take_if(|(r, _)| *r == request)
            .map(|(_, target)| target)
    }

    /// The broker answered the look at `target`.
    pub(super) fn on_answer(
        &mut self,
        now: Instant,
        target: Target,
        reply: Reply,
    ) -> Option<QueueUpdate> {
        match (target, reply) {
            (Target::Queue(queue), Reply::QueueDeclared { consumer_count, .. }) => {
                let before = self.queues.get(&queue).copied().unwrap_or_default();
                let had_servers = matches!(before.consumers, Consumers::Count(n) if n > 0);
                // The first zero after servers were seen is checked again; a second zero (or a
                // zero with no servers ever seen) is believed, unless the client reconnected
                // lately and the servers may be reconnecting too.
                let first_zero = had_servers && !before.confirming;
                let graced = (had_servers || before.confirming) && self.in_grace(now);
                let confirming = consumer_count == 0 && (first_zero || graced);
                let status = QueueStatus {
                    consumers: Consumers::Count(consumer_count),
                    checked_at: Some(now),
                    confirming,
                };
                let mut update = self.set_queue_status(queue, status);
                update.recheck_at = now.checked_add(ZERO_RECHECK).filter(|_| confirming);
                Some(update)
            }
            (Target::Exchange(exchange), Reply::ExchangeExists) => {
                self.set_exchange_status(&exchange, Exists::Yes, now);
                None
            }
            _ => None,
        }
    }

    /// The broker refused the look at `target` (its channel closed with `error`).
    pub(super) fn on_refused(
        &mut self,
        now: Instant,
        target: Target,
        error: ChannelError,
    ) -> Option<QueueUpdate> {
        match target {
            Target::Queue(queue) => {
                // 404: the queue does not exist, so a publish to it would come back.
                let consumers = if error.code == ReplyCode::NOT_FOUND {
                    Consumers::Absent
                } else {
                    Consumers::Unknown
                };
                // A queue that had servers and vanished just after our reconnect: its server
                // may be about to declare it again (a non-durable queue after a restart).
                let before = self.queues.get(&queue).copied().unwrap_or_default();
                let had_servers = matches!(before.consumers, Consumers::Count(n) if n > 0);
                let confirming = consumers == Consumers::Absent
                    && (had_servers || before.confirming)
                    && self.in_grace(now);
                let status = QueueStatus {
                    consumers,
                    checked_at: Some(now),
                    confirming,
                };
                let mut update = self.set_queue_status(queue, status);
                update.recheck_at = now.checked_add(ZERO_RECHECK).filter(|_| confirming);
                Some(update)
            }
            Target::Exchange(exchange) => {
                let exists = if error.code == ReplyCode::NOT_FOUND {
                    Exists::No {
                        code: error.code,
                        text: error.text,
                    }
                } else {
                    Exists::Unknown
                };
                self.set_exchange_status(&exchange, exists, now);
                None
            }
        }
    }

    /// Replaces what is known of `queue`.
    fn set_queue_status(&mut self, queue: String, status: QueueStatus) -> QueueUpdate {
        let forgot_others =
            self.queues.len() >= MAX_PROBED_QUEUES && !self.queues.contains_key(&queue);
        if forgot_others {
            self.queues.clear();
        }
        self.queues.insert(queue.clone(), status);
        QueueUpdate {
            queue,
            forgot_others,
            recheck_at: None,
        }
    }

    fn set_exchange_status(&mut self, exchange: &str, exists: Exists, now: Instant) {
        if self.exchanges.len() >= MAX_PROBED_QUEUES && !self.exchanges.contains_key(exchange) {
            self.exchanges.clear();
        }
        let status = ExchangeStatus {
            exists,
            checked_at: now,
        };
        self.exchanges.insert(exchange.to_owned(), status);
    }
}
