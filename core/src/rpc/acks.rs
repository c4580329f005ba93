//! The server's acks, coalesced: a request answered is not acked at once but marked, and the
//! end of the turn ([`crate::rpc::RpcServer::poll_transmit`]) acks every marked
//! request of the channel's settled prefix with one `basic.ack` whose `multiple` flag is set.
//!
//! A multiple ack settles every unacked delivery up to and including the tag it names (AMQP
//! 0-9-1 §1.8.3.13, basic.ack: "up to and including the delivery tag specified"), so it may
//! only name a tag below which nothing still runs: the window keeps every delivery of the
//! channel not settled yet, in delivery order, and acks with `multiple` only its leading run
//! of answered ones. An answered request behind one still running is acked alone, in the same
//! turn: coalescing never delays an ack past the turn it was made in, so the broker's
//! prefetch window refills as fast as before.

use std::collections::VecDeque;

use crate::ids::{ChannelId, DeliveryTag};

/// One ack to send: the tag, and whether it settles everything up to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ack {
    pub(crate) channel: ChannelId,
    pub(crate) delivery_tag: DeliveryTag,
    pub(crate) multiple: bool,
}

/// Deliveries of one channel not settled on the wire yet.
#[derive(Debug, Default)]
pub(crate) struct AckWindow {
    /// The channel the window tracks; deliveries of another one are acked at once.
    channel: Option<ChannelId>,
    /// In delivery order (tags rise on a channel, §1.8.3.13 basic.deliver): the tag and whether
    /// the request was answered (its ack is owed).
    open: VecDeque<(DeliveryTag, bool)>,
    /// How many entries of `open` are answered.
    answered: usize,
}

impl AckWindow {
    /// A delivery arrived: it must be settled later. Returns false when it cannot be tracked
    /// (another channel than the window's while the window holds some, or a tag not above the
    /// last one); its ack then goes out alone, at once.
    pub(crate) fn delivered(&mut self, channel: ChannelId, tag: DeliveryTag) -> bool {
        if self.open.is_empty() {
            self.channel = Some(channel);
        }
        let rising = self.open.back().is_none_or(|(last, _)| last.0 < tag.0);
        if self.channel != Some(channel) || !rising {
            return false;
        }
        self.open.push_back((tag, false));
        true
    }

    /// The request was answered and its reply queued: its ack is owed. Returns false when the
    /// window does not track it; the caller then acks it alone, at once.
    pub(crate) fn answered(&mut self, channel: ChannelId, tag: DeliveryTag) -> bool {
        match self.find(channel, tag) {
            Some(i) if !self.open[i].1 => {
                self.open[i].1 = true;
                self.answered += 1;
                true
            }
            _ => false,
        }
    }

    /// The delivery was settled on the wire another way (rejected, acked alone): forget it.
    pub(crate) fn settled(&mut self, channel: ChannelId, tag: DeliveryTag) {
        if let Some(i) = self.find(channel, tag) {
            if let Some((_, true)) = self.open.remove(i) {
                self.answered -= 1;
            }
        }
    }

    /// The channel is gone: the broker requeued every delivery it had, and their tags are void.
    pub(crate) fn clear(&mut self) {
        self.open.clear();
        self.answered = 0;
        self.channel = None;
    }

    /// Whether acks are owed.
    pub(crate) fn has_acks(&self) -> bool {
        self.answered > 0
    }

    /// The acks owed, fewest frames first: one for the leading run of answered deliveries
    /// (`multiple` when it holds more than one), then one per answered delivery behind a
    /// running one. They leave the window.
    pub(crate) fn take_acks(&mut self, out: &mut Vec<Ack>) {
        let Some(channel) = self.channel.filter(|_| self.answered > 0) else {
            return;
        };
        let mut leading = 0;
        let mut through = None;
        while let Some(&(tag, true)) = self.open.front() {
            self.open.pop_front();
            leading += 1;
            through = Some(tag);
        }
        if let Some(delivery_tag) = through {
            out.push(Ack {
                channel,
                delivery_tag,
                multiple: leading > 1,
            });
        }
        self.answered -= leading;
        if self.answered > 0 {
            self.open.retain(|&(delivery_tag, answered)| {
                if answered {
                    out.push(Ack {
                        channel,
                        delivery_tag,
                        multiple: false,
                    });
                }
                !answered
            });
            self.answered = 0;
        }
    }

    fn find(&self, channel: ChannelId, tag: DeliveryTag) -> Option<usize> {
        if self.channel != Some(channel) {
            return None;
        }
        self.open.binary_search_by_key(&tag.0, |(t, _)| t.0).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH: ChannelId = ChannelId(1);

    fn window(tags: &[u64]) -> AckWindow {
        let mut w = AckWindow::default();
        for &t in tags {
            assert!(w.delivered(CH, DeliveryTag(t)));
        }
        w
    }

    fn acks(w: &mut AckWindow) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        w.take_acks(&mut out);
        out.iter().map(|a| (a.delivery_tag.0, a.multiple)).collect()
    }

    #[test]
    fn a_leading_run_is_one_multiple_ack() {
        let mut w = window(&[1, 2, 3]);
        for t in [3, 1, 2] {
            assert!(w.answered(CH, DeliveryTag(t)));
        }
        assert_eq!(acks(&mut w), [(3, true)]);
        assert!(!w.has_acks());
        assert_eq!(acks(&mut w), []);
    }

    #[test]
    fn answers_behind_a_running_request_are_acked_alone() {
        let mut w = window(&[1, 2, 3, 4]);
        for t in [1, 3, 4] {
            w.answered(CH, DeliveryTag(t));
        }
        assert_eq!(acks(&mut w), [(1, false), (3, false), (4, false)]);
        w.answered(CH, DeliveryTag(2));
        assert_eq!(acks(&mut w), [(2, false)]);
    }

    #[test]
    fn a_rejected_delivery_leaves_the_window() {
        let mut w = window(&[1, 2, 3]);
        w.answered(CH, DeliveryTag(2));
        w.answered(CH, DeliveryTag(3));
        w.settled(CH, DeliveryTag(1));
        assert_eq!(acks(&mut w), [(3, true)]);
    }

    #[test]
    fn untracked_deliveries_are_refused() {
        let mut w = window(&[5]);
        assert!(!w.delivered(ChannelId(2), DeliveryTag(6)));
        assert!(!w.delivered(CH, DeliveryTag(4)));
        assert!(!w.answered(CH, DeliveryTag(4)));
        assert!(!w.answered(ChannelId(2), DeliveryTag(5)));
        assert!(w.answered(CH, DeliveryTag(5)));
        assert!(!w.answered(CH, DeliveryTag(5)), "answered once");
        w.clear();
        assert!(!w.has_acks());
        assert_eq!(acks(&mut w), []);
    }
}
