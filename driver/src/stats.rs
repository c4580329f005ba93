//! Counters and gauges a driver task publishes for its handles to read while it runs.
//!
//! The driver task owns the machine, so a handle cannot ask the machine itself. After every
//! wake-up the task copies the machine's counters and its in-flight gauge into a [`Shared`]
//! cell, and only when they changed: the lock is taken once per wake-up that did something a
//! counter shows, never by the hot path of a handle, and a reader holds it for one copy.

use std::sync::{Arc, Mutex, PoisonError};

/// A machine's counters with its in-flight gauge, as last published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Snapshot<S> {
    /// The machine's counters (they survive reconnects: the machine does).
    pub(crate) stats: S,
    /// Calls (client) or requests (server) started and not ended.
    pub(crate) in_flight: usize,
}

/// The last snapshot, shared by the driver task (the one writer) and the handles (readers).
#[derive(Debug, Default)]
pub(crate) struct Shared<S> {
    inner: Mutex<Snapshot<S>>,
}

impl<S: Copy + Default> Shared<S> {
    /// A cell holding zeros, until the driver task publishes.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Snapshot::default()),
        })
    }

    /// The last snapshot published.
    pub(crate) fn get(&self) -> Snapshot<S> {
        // Poison cannot leave a snapshot half written: it is `Copy`, assigned whole.
        *self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The driver task's side of a [`Shared`] cell: remembers what it published last, so that a
/// wake-up that changed nothing costs a comparison and no lock.
#[derive(Debug)]
pub(crate) struct Publisher<S> {
    shared: Arc<Shared<S>>,
    last: Snapshot<S>,
}

impl<S: Copy + Default + PartialEq> Publisher<S> {
    /// Publishes into `shared`.
    pub(crate) fn new(shared: Arc<Shared<S>>) -> Self {
        Self {
            shared,
            last: Snapshot::default(),
        }
    }

    /// Makes `now` what readers see, if it differs from the last snapshot; returns the last
    /// snapshot then (for the metrics fed from the difference).
    pub(crate) fn publish(&mut self, now: Snapshot<S>) -> Option<Snapshot<S>> {
        if now == self.last {
            return None;
        }
        let before = std::mem::replace(&mut self.last, now);
        *self
            .shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = now;
        Some(before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_what_was_published_last() {
        let shared = Shared::<u64>::new();
        let mut publisher = Publisher::new(Arc::clone(&shared));
        assert_eq!(shared.get(), Snapshot::default());
        publisher.publish(Snapshot {
            stats: 3,
            in_flight: 2,
        });
        assert_eq!(
            shared.get(),
            Snapshot {
                stats: 3,
                in_flight: 2
            }
        );
        publisher.publish(Snapshot {
            stats: 4,
            in_flight: 0,
        });
        assert_eq!(shared.get().stats, 4);
        assert_eq!(shared.get().in_flight, 0);
    }
}
