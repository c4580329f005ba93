//! Heartbeat timers (spec §4.2.7; RabbitMQ "Detecting Dead TCP Connections with Heartbeats").
//!
//! We send a heartbeat frame after half an interval without writing anything, and declare the
//! peer dead after two intervals without reading anything. Any frame counts as traffic.

use std::time::{Duration, Instant};

/// What the heartbeat timers want done at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeartbeatAction {
    /// Nothing due.
    None,
    /// Queue a heartbeat frame.
    Send,
    /// Nothing was read for two intervals.
    PeerDead,
}

#[derive(Debug, Clone)]
pub(crate) struct Heartbeat {
    interval: Duration,
    last_read: Instant,
    last_write: Instant,
}

impl Heartbeat {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            interval: Duration::ZERO,
            last_read: now,
            last_write: now,
        }
    }

    /// Starts the timers with the negotiated interval (zero turns them off).
    pub(crate) fn start(&mut self, interval: Duration, now: Instant) {
        self.interval = interval;
        self.last_read = now;
        self.last_write = now;
    }

    pub(crate) fn on_read(&mut self, now: Instant) {
        self.last_read = self.last_read.max(now);
    }

    pub(crate) fn on_write(&mut self, now: Instant) {
        self.last_write = self.last_write.max(now);
    }

    fn send_at(&self) -> Instant {
        self.last_write + self.interval / 2
    }

    fn dead_at(&self) -> Instant {
        self.last_read + self.interval * 2
    }

    /// The next instant at which [`Heartbeat::action`] may change, if heartbeats are on.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        (!self.interval.is_zero()).then(|| self.send_at().min(self.dead_at()))
    }

    pub(crate) fn action(&self, now: Instant) -> HeartbeatAction {
        if self.interval.is_zero() {
            HeartbeatAction::None
        } else if now >= self.dead_at() {
            HeartbeatAction::PeerDead
        } else if now >= self.send_at() {
            HeartbeatAction::Send
        } else {
            HeartbeatAction::None
        }
    }
}
