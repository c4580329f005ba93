//! The server's replies between their publish and the broker's confirm: a request is acked
//! only once the broker has confirmed its reply (RabbitMQ "Publisher Confirms": a confirm for
//! a publish to a queue means the queue took it; one routed nowhere is confirmed at once).
//!
//! Replies go out on a channel of their own in confirm mode. Each reply waits here, with the
//! facts that settle its request, until its `basic.ack` (the request is then acked) or
//! `basic.nack` (the request is requeued). When the broker closes the reply channel, the
//! broker took none of the unconfirmed replies for sure: they are published again on a fresh
//! channel, one at a time ("careful" mode), so that a reply the broker refuses again is alone
//! in flight when it does and is named as the culprit; once every reply waiting has been
//! confirmed, replies are pipelined again.
//!
//! Bounded: a request has at most one reply here, and requests in flight are bounded by the
//! prefetch window (plus stale replies of an older channel, bounded by the handlers that were
//! running when it closed).

use std::collections::VecDeque;

use bytes::Bytes;

use crate::ids::DeliveryTag;
use crate::types::BasicProperties;

/// A reply published and not confirmed yet, or waiting to be published again.
#[derive(Debug)]
pub(crate) struct Outgoing<F> {
    /// Its publish sequence number on the reply channel; `None` while it waits.
    pub(crate) seq: Option<DeliveryTag>,
    /// What settles its request (the server's token facts).
    pub(crate) facts: F,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Bytes,
    /// An error reply (counted in `replied_error` once confirmed).
    pub(crate) is_error: bool,
    /// Already the server's replacement for a reply the broker refused: if the broker refuses
    /// this too, the request is settled without a reply.
    pub(crate) is_fallback: bool,
    /// A reply published before, answered again from the reply cache: counted as a cache hit,
    /// not as a reply.
    pub(crate) from_cache: bool,
}

/// Replies in flight on the reply channel, and replies waiting for a channel or their turn.
#[derive(Debug)]
pub(crate) struct Outbox<F> {
    /// Published, in sequence order (the broker confirms in any order, mostly in order).
    unconfirmed: VecDeque<Outgoing<F>>,
    /// Waiting to be published, in the order they were made.
    waiting: VecDeque<Outgoing<F>>,
    /// After a reply channel died under unconfirmed replies: one reply in flight at a time,
    /// until `waiting` is empty.
    careful: bool,
}

impl<F> Default for Outbox<F> {
    fn default() -> Self {
        Self {
            unconfirmed: VecDeque::new(),
            waiting: VecDeque::new(),
            careful: false,
        }
    }
}

impl<F> Outbox<F> {
    /// Whether a new reply may be published now (else it must [`Outbox::wait`]).
    pub(crate) fn may_publish(&self) -> bool {
        self.waiting.is_empty() && (!self.careful || self.unconfirmed.is_empty())
    }

    /// A reply was published with sequence number `seq`.
    pub(crate) fn published(&mut self, mut reply: Outgoing<F>, seq: DeliveryTag) {
        reply.seq = Some(seq);
        self.unconfirmed.push_back(reply);
    }

    /// A reply waits its turn.
    pub(crate) fn wait(&mut self, reply: Outgoing<F>) {
        self.waiting.push_back(reply);
    }

    /// A reply waits, ahead of every other (the culprit's replacement).
    pub(crate) fn wait_first(&mut self, reply: Outgoing<F>) {
        self.waiting.push_front(reply);
    }

    /// The broker confirmed `seq`: its reply leaves.
    pub(crate) fn confirmed(&mut self, seq: DeliveryTag) -> Option<Outgoing<F>> {
        let i = self.unconfirmed.iter().position(|r| r.seq == Some(seq))?;
        self.unconfirmed.remove(i)
    }

    /// The next reply to publish now, if its turn has come. Leaving careful mode once nothing
    /// waits.
    pub(crate) fn next_to_publish(&mut self) -> Option<Outgoing<F>> {
        if self.careful && !self.unconfirmed.is_empty() {
            return None;
        }
        let next = self.waiting.pop_front();
        if self.waiting.is_empty() && next.is_none() {
            self.careful = false;
        }
        next
    }

    /// The reply channel died: its unconfirmed replies are taken out. Returns the culprit when
    /// exactly one reply was in flight in careful mode (the broker refused that one); the other
    /// replies wait to be published again, ahead of the ones already waiting, and the outbox
    /// turns careful.
    pub(crate) fn channel_died(&mut self) -> Option<Outgoing<F>> {
        let culprit = if self.careful && self.unconfirmed.len() == 1 {
            self.unconfirmed.pop_front()
        } else {
            None
        };
        if !self.unconfirmed.is_empty() {
            self.careful = true;
        }
        while let Some(mut reply) = self.unconfirmed.pop_back() {
            reply.seq = None;
            self.waiting.push_front(reply);
        }
        culprit
    }

    /// Every reply, unconfirmed first: the channel for them is gone for good (the connection
    /// closed, or the server falls back to replying on the consuming channel).
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Outgoing<F>> + '_ {
        self.careful = false;
        self.unconfirmed.drain(..).chain(self.waiting.drain(..))
    }

    /// Whether no reply is unconfirmed or waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.unconfirmed.is_empty() && self.waiting.is_empty()
    }

    /// Whether replies wait for their confirm.
    pub(crate) fn has_unconfirmed(&self) -> bool {
        !self.unconfirmed.is_empty()
    }

    /// Whether replies wait for a channel or their turn.
    pub(crate) fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }
}

/// The limit in a RabbitMQ refusal of an oversized message: "PRECONDITION_FAILED - message
/// size N is larger than configured max size M" (rabbit_channel's `check_msg_size`).
pub(crate) fn refused_size_limit(text: &str) -> Option<u64> {
    let (_, rest) = text.split_once("larger than configured max size ")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

#[cfg(test)]
mod tests {
    // In a test an unwrap is an assertion.
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reply(n: u32) -> Outgoing<u32> {
        Outgoing {
            seq: None,
            facts: n,
            properties: BasicProperties::default(),
            body: Bytes::new(),
            is_error: false,
            is_fallback: false,
            from_cache: false,
        }
    }

    #[test]
    fn a_death_with_one_in_flight_in_careful_mode_names_the_culprit() {
        let mut o = Outbox::default();
        for n in 1..=3 {
            assert!(o.may_publish());
            o.published(reply(n), DeliveryTag(u64::from(n)));
        }
        // Pipelined: no culprit, all three wait, in order, and the outbox turns careful.
        assert!(o.channel_died().is_none());
        assert!(!o.may_publish());
        let first = o.next_to_publish().unwrap();
        assert_eq!(first.facts, 1);
        o.published(first, DeliveryTag(1));
        assert!(o.next_to_publish().is_none(), "one at a time");
        assert_eq!(o.confirmed(DeliveryTag(1)).unwrap().facts, 1);
        let second = o.next_to_publish().unwrap();
        o.published(second, DeliveryTag(2));
        assert_eq!(o.channel_died().unwrap().facts, 2, "the culprit");
        let third = o.next_to_publish().unwrap();
        assert_eq!(third.facts, 3);
        o.published(third, DeliveryTag(1));
        o.confirmed(DeliveryTag(1)).unwrap();
        assert!(o.next_to_publish().is_none());
        assert!(o.may_publish(), "pipelining again");
        assert!(o.is_empty());
    }

    #[test]
    fn the_brokers_size_limit_is_read_from_its_words() {
        let text =
            "PRECONDITION_FAILED - message size 2000000 is larger than configured max size 1048576";
        assert_eq!(refused_size_limit(text), Some(1_048_576));
        assert_eq!(refused_size_limit("PRECONDITION_FAILED - other"), None);
        assert_eq!(
            refused_size_limit("larger than configured max size x"),
            None
        );
    }
}
