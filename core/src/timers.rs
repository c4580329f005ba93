//! Named deadlines (ARCHITECTURE §3): every machine keeps its timers in one [`TimerTable`],
//! which alone computes the earliest deadline (`poll_timeout`) and says which timers are due
//! (`handle_timeout`). The core never reads a clock: `now` is always an argument.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// Deadlines keyed by `K` (a small enum per machine), at most one per key.
///
/// Kept twice, by key and by time, so that setting, clearing and finding the earliest are all
/// O(log n): the RPC client holds one deadline per call in flight. `At` is [`Instant`] except
/// in unit tests, which need instants without reading a clock.
#[derive(Debug, Clone)]
pub(crate) struct TimerTable<K, At = Instant> {
    by_key: BTreeMap<K, At>,
    by_time: BTreeSet<(At, K)>,
}

impl<K: Ord + Clone, At: Ord + Copy> TimerTable<K, At> {
    /// A table with no timer running.
    pub(crate) fn new() -> Self {
        Self {
            by_key: BTreeMap::new(),
            by_time: BTreeSet::new(),
        }
    }

    /// Runs `key` until `at`, replacing its previous deadline.
    pub(crate) fn set(&mut self, key: K, at: At) {
        if let Some(old) = self.by_key.insert(key.clone(), at) {
            self.by_time.remove(&(old, key.clone()));
        }
        self.by_time.insert((at, key));
    }

    /// Moves a running timer `key` later to `at`; does nothing when `key` is not running or
    /// already runs until `at` or later.
    pub(crate) fn extend(&mut self, key: K, at: At) {
        if self.by_key.get(&key).is_some_and(|&old| old < at) {
            self.set(key, at);
        }
    }

    /// Stops `key`; returns its deadline if it was running.
    pub(crate) fn clear(&mut self, key: &K) -> Option<At> {
        let at = self.by_key.remove(key)?;
        self.by_time.remove(&(at, key.clone()));
        Some(at)
    }

    /// Stops every timer.
    pub(crate) fn clear_all(&mut self) {
        self.by_key.clear();
        self.by_time.clear();
    }

    /// The deadline of `key`, if it runs.
    pub(crate) fn get(&self, key: &K) -> Option<At> {
        self.by_key.get(key).copied()
    }

    /// Whether `key` runs and its deadline is `now` or earlier.
    pub(crate) fn is_due(&self, key: &K, now: At) -> bool {
        self.get(key).is_some_and(|at| at <= now)
    }

    /// Stops and returns `key` if it is due at `now`.
    pub(crate) fn take_due(&mut self, key: &K, now: At) -> bool {
        let due = self.is_due(key, now);
        if due {
            self.clear(key);
        }
        due
    }

    /// Stops every timer `drop` accepts.
    pub(crate) fn clear_where(&mut self, drop: impl Fn(&K) -> bool) {
        self.by_key.retain(|key, _| !drop(key));
        self.by_time.retain(|(_, key)| !drop(key));
    }

    /// Stops and returns the earliest timer due at `now` (ties in key order), with its
    /// deadline.
    pub(crate) fn pop_due(&mut self, now: At) -> Option<(K, At)> {
        let (at, _) = self.by_time.first()?;
        if *at > now {
            return None;
        }
        let (at, key) = self.by_time.pop_first()?;
        self.by_key.remove(&key);
        Some((key, at))
    }

    /// The earliest deadline of the table, or of `also` (the timers of a machine this one
    /// drives, such as the connection under an RPC machine) when that is earlier.
    pub(crate) fn next(&self, also: Option<At>) -> Option<At> {
        self.next_where(also, |_| true)
    }

    /// [`TimerTable::next`] among the timers `include` accepts: a machine may hold a timer that
    /// cannot be served yet, which must not wake it (the driver would spin).
    pub(crate) fn next_where(&self, also: Option<At>, include: impl Fn(&K) -> bool) -> Option<At> {
        let own = self
            .by_time
            .iter()
            .find(|(_, key)| include(key))
            .map(|(at, _)| *at);
        match (own, also) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Key {
        A,
        B,
    }

    #[test]
    fn next_is_the_earliest_and_due_timers_pop_in_time_order() {
        let t0 = 100u64;
        let mut timers = TimerTable::<Key, u64>::new();
        timers.set(Key::B, t0 + 1);
        timers.set(Key::A, t0 + 2);
        assert_eq!(timers.next(None), Some(t0 + 1));
        assert_eq!(timers.next(Some(t0)), Some(t0));
        assert_eq!(timers.pop_due(t0), None);
        let later = t0 + 5;
        assert_eq!(timers.pop_due(later), Some((Key::B, t0 + 1)));
        assert_eq!(timers.pop_due(later), Some((Key::A, t0 + 2)));
        assert_eq!(timers.pop_due(later), None);
        assert_eq!(timers.next(None), None);
    }

    #[test]
    fn set_replaces_and_extend_only_moves_a_running_timer_later() {
        let t0 = 100u64;
        let mut timers = TimerTable::<Key, u64>::new();
        timers.extend(Key::A, t0);
        assert_eq!(timers.get(&Key::A), None);
        timers.set(Key::A, t0 + 3);
        timers.set(Key::A, t0 + 2);
        assert_eq!(timers.next(None), Some(t0 + 2));
        timers.extend(Key::A, t0 + 1);
        assert_eq!(timers.get(&Key::A), Some(t0 + 2));
        timers.extend(Key::A, t0 + 4);
        assert_eq!(timers.get(&Key::A), Some(t0 + 4));
        assert!(timers.take_due(&Key::A, t0 + 4));
        assert_eq!(timers.next(None), None);
        timers.set(Key::A, t0);
        timers.set(Key::B, t0 + 1);
        assert_eq!(timers.next_where(None, |k| *k == Key::B), Some(t0 + 1));
        timers.clear_where(|k| *k == Key::B);
        assert_eq!(timers.next_where(None, |k| *k == Key::B), None);
    }
}
