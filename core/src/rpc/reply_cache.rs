//! The replies this server published lately, by request (reply address + correlation id), so
//! that a request the broker delivers again after its reply went out is answered again from
//! here instead of being run again. RabbitMQ redelivers a request whose ack it never read: its
//! channel closed (a `consumer_timeout` of a handler slower than it, RabbitMQ "Consumers",
//! "Delivery Acknowledgement Timeout"; an ack lost with its connection).
//!
//! Bounded by count and by body bytes; the oldest entry goes first.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use bytes::Bytes;

use crate::types::BasicProperties;

/// A reply as published.
#[derive(Debug, Clone)]
pub(crate) struct CachedReply {
    pub(crate) properties: BasicProperties,
    pub(crate) body: Bytes,
    pub(crate) is_error: bool,
}

/// The cache.
#[derive(Debug)]
pub(crate) struct ReplyCache<K> {
    entries: HashMap<K, (u64, CachedReply)>,
    /// Insertion order, with the stamp each key had then (a key inserted again leaves a stale
    /// entry here, skipped on eviction).
    order: VecDeque<(u64, K)>,
    stamp: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl<K: Hash + Eq + Clone> ReplyCache<K> {
    /// A cache of at most `max_entries` replies and `max_bytes` of their bodies (0: none).
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            stamp: 0,
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    /// Remembers a reply published for `key`.
    pub(crate) fn insert(&mut self, key: K, reply: CachedReply) {
        let size = reply.body.len();
        if self.max_entries == 0 || size > self.max_bytes {
            return;
        }
        self.stamp += 1;
        self.bytes += size;
        if let Some((_, old)) = self.entries.insert(key.clone(), (self.stamp, reply)) {
            self.bytes -= old.body.len();
        }
        self.order.push_back((self.stamp, key));
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((stamp, key)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&key).is_some_and(|(s, _)| *s == stamp) {
                if let Some((_, old)) = self.entries.remove(&key) {
                    self.bytes -= old.body.len();
                }
            }
        }
        // Stale order entries (keys inserted again) are bounded by the live ones.
        if self.order.len() > 2 * self.max_entries {
            let entries = &self.entries;
            self.order
                .retain(|(stamp, key)| entries.get(key).is_some_and(|(s, _)| s == stamp));
        }
    }

    /// The reply published for `key`, if remembered.
    pub(crate) fn get(&self, key: &K) -> Option<&CachedReply> {
        self.entries.get(key).map(|(_, reply)| reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(body: &'static [u8]) -> CachedReply {
        CachedReply {
            properties: BasicProperties::default(),
            body: Bytes::from_static(body),
            is_error: false,
        }
    }

    #[test]
    fn the_oldest_goes_first_by_count_and_by_bytes() {
        let mut c = ReplyCache::new(2, 10);
        c.insert(1, reply(b"aaaa"));
        c.insert(2, reply(b"bbbb"));
        c.insert(3, reply(b"cc"));
        assert!(c.get(&1).is_none(), "count");
        assert!(c.get(&2).is_some() && c.get(&3).is_some());
        c.insert(4, reply(b"dddddddd"));
        assert!(
            c.get(&2).is_none() && c.get(&3).is_some(),
            "bytes: 2 + 8 fit"
        );
        assert_eq!(
            &c.get(&4).map(|r| r.body.clone()).unwrap_or_default()[..],
            b"dddddddd"
        );
        c.insert(5, reply(b"way too large"));
        assert!(c.get(&5).is_none(), "larger than the cache");
        c.insert(4, reply(b"e"));
        c.insert(6, reply(b"f"));
        assert!(c.get(&4).is_some() && c.get(&6).is_some());
        assert!(ReplyCache::new(0, 10).get(&1).is_none());
    }
}
