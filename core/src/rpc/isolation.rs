//! Which requests go out alone on the publishing channel, so that a refused publish harms only
//! itself.
//!
//! RabbitMQ refuses some publishes by closing the channel (406 for a body above
//! `max_message_size`, 404 for a missing exchange, 403 for one the user may not write to:
//! AMQP 0-9-1 §1.2 "soft errors"). The confirms of earlier publishes that the broker had not
//! sent yet are lost with the channel, and so are its `basic.nack`s of publishes that a full
//! `reject-publish` queue refused (RabbitMQ "Queue Length Limit": a classic queue sends them to
//! the channel asynchronously). A call whose confirm was lost cannot tell whether the broker
//! took its request: it waits for a reply that never comes if the request was in fact nacked
//! (measured on RabbitMQ 3.10: 200 calls to a queue of length 0 pipelined ahead of one publish
//! to a missing exchange, some end `TimedOut` instead of `QueueFull`).
//!
//! So a publish the channel has not seen the broker accept the like of, a body larger than any
//! it settled or an exchange it has not settled a publish to, goes out alone: once every
//! earlier publish is settled, and with every later one held until it is settled. If the broker
//! refuses it, nothing else is in flight to lose its confirm. A confirm (ack or nack) of such a
//! publish proves the channel accepts its size and its exchange (the channel checks both before
//! routing; a nack comes from a queue), so later publishes within what is proved go out
//! pipelined as before. RabbitMQ reads `max_message_size` when a channel opens, so what is
//! proved holds for the channel's life and is forgotten with it.
//!
//! Cost: one confirm round trip each time a channel sees a larger body or a new exchange (the
//! first request on every publishing channel is one), during which later requests wait.
//! Residual: an exchange deleted after a publish to it was settled is refused with others in
//! flight (the exchange check, `ClientConfig::exchange_check`, narrows that window).

use crate::ids::DeliveryTag;

/// At most this many exchanges are remembered per channel; the oldest is forgotten first (a
/// forgotten exchange is only tried alone again).
const MAX_EXCHANGES: usize = 32;

/// What the publishing channel has proved it accepts, and the publish in flight alone, if any.
#[derive(Debug, Default)]
pub(crate) struct Isolation {
    /// The largest body the channel settled (`None`: no publish settled yet).
    max_body: Option<u64>,
    /// Exchanges the channel settled a publish to, oldest first.
    exchanges: Vec<String>,
    /// The publish that went out alone and is not settled yet.
    alone: Option<Alone>,
}

#[derive(Debug)]
struct Alone {
    seq: DeliveryTag,
    body: u64,
    exchange: String,
}

/// What [`Isolation::admit`] says of a request about to be published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Within what the channel accepted: publish it, pipelined.
    Pipelined,
    /// Untried, and nothing is in flight: publish it alone ([`Isolation::sent_alone`]).
    Alone,
    /// Wait, and hold every later request behind it (first in, first out): an untried request
    /// waits for the publishes in flight to settle, or another is in flight alone.
    Hold,
}

impl Isolation {
    /// Whether a request of `body` bytes to `exchange` may go out now; `in_flight` says whether
    /// any publish on the channel is unconfirmed.
    pub(crate) fn admit(&self, exchange: &str, body: u64, in_flight: bool) -> Admission {
        if self.alone.is_some() {
            return Admission::Hold;
        }
        let tried = self.max_body.is_some_and(|max| body <= max)
            && self.exchanges.iter().any(|e| e == exchange);
        match (tried, in_flight) {
            (true, _) => Admission::Pipelined,
            (false, false) => Admission::Alone,
            (false, true) => Admission::Hold,
        }
    }

    /// The request admitted [`Admission::Alone`] went out as publish `seq`.
    pub(crate) fn sent_alone(&mut self, seq: DeliveryTag, exchange: String, body: u64) {
        self.alone = Some(Alone {
            seq,
            body,
            exchange,
        });
    }

    /// The broker settled publish `seq` (acked or nacked) without closing the channel.
    pub(crate) fn settled(&mut self, seq: DeliveryTag) {
        let Some(alone) = self.alone.take_if(|a| a.seq == seq) else {
            return;
        };
        self.max_body = Some(self.max_body.map_or(alone.body, |m| m.max(alone.body)));
        if !self.exchanges.contains(&alone.exchange) {
            if self.exchanges.len() == MAX_EXCHANGES {
                self.exchanges.remove(0);
            }
            self.exchanges.push(alone.exchange);
        }
    }

    /// The publishing channel is gone: a new one proves everything again.
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_goes_alone_and_proves_its_size_and_exchange() {
        let mut iso = Isolation::default();
        assert_eq!(iso.admit("", 10, false), Admission::Alone);
        assert_eq!(iso.admit("", 10, true), Admission::Hold);
        iso.sent_alone(DeliveryTag(1), String::new(), 10);
        // Everything waits behind it, even what would be within the proof.
        assert_eq!(iso.admit("", 1, false), Admission::Hold);
        // Another publish's confirm proves nothing.
        iso.settled(DeliveryTag(7));
        assert_eq!(iso.admit("", 1, false), Admission::Hold);
        iso.settled(DeliveryTag(1));
        assert_eq!(iso.admit("", 10, true), Admission::Pipelined);
        assert_eq!(iso.admit("", 0, true), Admission::Pipelined);
        // Larger, or to another exchange: alone again.
        assert_eq!(iso.admit("", 11, true), Admission::Hold);
        assert_eq!(iso.admit("", 11, false), Admission::Alone);
        assert_eq!(iso.admit("x", 1, false), Admission::Alone);
    }

    #[test]
    fn proofs_accumulate_and_reset_with_the_channel() {
        let mut iso = Isolation::default();
        iso.sent_alone(DeliveryTag(1), "a".into(), 100);
        iso.settled(DeliveryTag(1));
        iso.sent_alone(DeliveryTag(2), "b".into(), 5);
        iso.settled(DeliveryTag(2));
        // The size proved on one exchange holds for the other: the limit is the channel's.
        assert_eq!(iso.admit("b", 100, true), Admission::Pipelined);
        assert_eq!(iso.admit("a", 100, true), Admission::Pipelined);
        iso.reset();
        assert_eq!(iso.admit("a", 1, false), Admission::Alone);
    }

    #[test]
    fn exchanges_are_bounded_oldest_out() {
        let mut iso = Isolation::default();
        for i in 0..=MAX_EXCHANGES as u64 {
            iso.sent_alone(DeliveryTag(i + 1), format!("e{i}"), 1);
            iso.settled(DeliveryTag(i + 1));
        }
        assert_eq!(iso.exchanges.len(), MAX_EXCHANGES);
        assert_eq!(iso.admit("e0", 1, true), Admission::Hold);
        assert_eq!(
            iso.admit(&format!("e{MAX_EXCHANGES}"), 1, true),
            Admission::Pipelined
        );
    }
}
