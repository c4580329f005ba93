//! Getting a socket: TCP connect under a timeout while commands keep being served, and the
//! backoff between attempts.

use std::time::{Duration, Instant};

use amqp_rpc_core::Machine;
use futures_channel::mpsc;
use futures_util::future::{select, Either};

use crate::io_loop::{Handler, Loop};
use crate::options::{ConnectError, ConnectOptions};
use crate::Runtime;

/// Exponential backoff with jitter between reconnect attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first attempt.
    pub initial: Duration,
    /// Cap on any delay.
    pub max: Duration,
    /// Growth factor per attempt.
    pub factor: f64,
    /// Fraction of each delay that is random (0 to 1), so that clients cut off together do not
    /// come back together.
    pub jitter: f64,
    /// Attempts before giving up; `None` retries forever.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            factor: 2.0,
            jitter: 0.5,
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// No reconnecting at all.
    pub fn never() -> Self {
        Self {
            max_attempts: Some(0),
            ..Self::default()
        }
    }

    /// The delay before attempt `attempt` (0-based), or `None` when attempts are exhausted.
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        if self.max_attempts.is_some_and(|max| attempt >= max) {
            return None;
        }
        let exp = self
            .factor
            .max(1.0)
            .powi(i32::try_from(attempt.min(64)).unwrap_or(64));
        let base = self.initial.as_secs_f64() * exp;
        let capped = base.min(self.max.as_secs_f64());
        // Uniform in [1 - jitter, 1]; randomness from a v4 UUID, which the core already uses.
        let unit = (uuid::Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0;
        let jitter = self.jitter.clamp(0.0, 1.0);
        Some(Duration::from_secs_f64(capped * (1.0 - jitter * unit)))
    }
}

/// Connects a TCP socket within `options.connect_timeout`, serving commands and timers of
/// `machine` meanwhile (calls made while reconnecting wait, and expire on time).
pub(crate) async fn connect_stream<R: Runtime, M: Machine, H: Handler<M>>(
    options: &ConnectOptions,
    io: &mut Loop<R>,
    machine: &mut M,
    commands: &mut mpsc::Receiver<H::Command>,
    handler: &mut H,
) -> Result<R::Stream, ConnectError> {
    let address = options.address();
    let deadline = Instant::now() + options.connect_timeout;
    let connect = R::connect(&options.host, options.port);
    let idle = Box::pin(io.drive(None, Some(deadline), machine, commands, handler));
    match select(connect, idle).await {
        Either::Left((Ok(stream), _)) => Ok(stream),
        Either::Left((Err(error), _)) => Err(ConnectError::Io { address, error }),
        Either::Right(_) => Err(ConnectError::TimedOut {
            address,
            after: options.connect_timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_stops() {
        let b = Backoff {
            jitter: 0.0,
            max_attempts: Some(5),
            ..Backoff::default()
        };
        assert_eq!(b.delay(0), Some(Duration::from_millis(100)));
        assert_eq!(b.delay(1), Some(Duration::from_millis(200)));
        assert_eq!(b.delay(4), Some(Duration::from_millis(1600)));
        assert_eq!(b.delay(5), None);
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        assert_eq!(b.delay(30), Some(Duration::from_secs(10)));
        assert_eq!(Backoff::never().delay(0), None);
    }

    #[test]
    fn jitter_stays_in_range() {
        let b = Backoff::default();
        for _ in 0..100 {
            let d = b.delay(2).unwrap_or_default();
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
    }
}
