//! Heartbeat timers (spec §4.2.7; RabbitMQ "Detecting Dead TCP Connections with Heartbeats").
//!
//! We send a heartbeat frame after half an interval without writing anything, and declare the
//! peer dead after two intervals without reading anything. Any frame counts as traffic. The
//! two deadlines live in the connection's timer table; this says where they fall.

use std::time::{Duration, Instant};

/// The negotiated heartbeat interval; zero turns heartbeats off.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Heartbeat {
    interval: Duration,
}

impl Heartbeat {
    /// Heartbeats every `interval` (zero: none).
    pub(crate) fn new(interval: Duration) -> Self {
        Self { interval }
    }

    /// When to send a heartbeat after writing at `written`, if heartbeats are on.
    pub(crate) fn send_at(self, written: Instant) -> Option<Instant> {
        (!self.interval.is_zero()).then(|| written + self.interval / 2)
    }

    /// When the peer is dead if nothing is read after `read`, if heartbeats are on.
    pub(crate) fn dead_at(self, read: Instant) -> Option<Instant> {
        (!self.interval.is_zero()).then(|| read + self.interval * 2)
    }
}
