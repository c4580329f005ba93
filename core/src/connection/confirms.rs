//! Publisher confirms (RabbitMQ "Publisher Confirms").

use std::collections::VecDeque;

use crate::ids::{ChannelId, DeliveryTag};

use super::Event;

/// Publisher-confirm state of a channel in confirm mode (RabbitMQ "Publisher Confirms"):
/// publishes are numbered from 1 after `confirm.select`; `basic.ack`/`basic.nack` from the broker
/// settle one number, or every number up to it when `multiple` is set.
#[derive(Debug, Clone, Default)]
pub(crate) struct Confirms {
    next_seq: u64,
    /// Unsettled sequence numbers, ascending.
    unsettled: VecDeque<u64>,
}

impl Confirms {
    /// Numbers a publish sent on the channel.
    pub(crate) fn next(&mut self) -> DeliveryTag {
        self.next_seq += 1;
        self.unsettled.push_back(self.next_seq);
        DeliveryTag(self.next_seq)
    }

    /// A broker `basic.ack` (`acked`) or `basic.nack` with `multiple` set: one
    /// [`Event::PublishConfirmed`] per publish it settles. Tags that settle nothing (already
    /// settled, never sent) are ignored.
    pub(crate) fn on_broker_confirm_multiple(
        &mut self,
        channel: ChannelId,
        tag: u64,
        acked: bool,
    ) -> Vec<Event> {
        self.settle_up_to(tag)
            .into_iter()
            .map(|seq| Event::PublishConfirmed {
                channel,
                seq,
                acked,
            })
            .collect()
    }

    /// A broker `basic.ack` or `basic.nack` of one publish: its event, if it settles one.
    /// Nothing is allocated (this runs once per publish when the broker confirms one by one).
    pub(crate) fn on_broker_confirm_one(
        &mut self,
        channel: ChannelId,
        tag: u64,
        acked: bool,
    ) -> Option<Event> {
        // Confirms come mostly in publish order: the front first, then a binary search.
        let index = match self.unsettled.front() {
            Some(&front) if front == tag => 0,
            _ => self.unsettled.binary_search(&tag).ok()?,
        };
        let seq = self.unsettled.remove(index)?;
        Some(Event::PublishConfirmed {
            channel,
            seq: DeliveryTag(seq),
            acked,
        })
    }

    /// Removes and returns the sequence numbers a broker ack or nack with `multiple` settles:
    /// every one up to `tag`.
    fn settle_up_to(&mut self, tag: u64) -> Vec<DeliveryTag> {
        let n = if tag == 0 {
            // "If the multiple field is 1, and the delivery tag is zero, this indicates
            // acknowledgement of all outstanding messages" (spec, basic.ack delivery-tag).
            self.unsettled.len()
        } else {
            self.unsettled.partition_point(|&s| s <= tag)
        };
        self.unsettled.drain(..n).map(DeliveryTag).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH: ChannelId = ChannelId(1);

    fn seqs(events: Vec<Event>) -> Vec<u64> {
        events
            .into_iter()
            .map(|e| match e {
                Event::PublishConfirmed { seq, .. } => seq.0,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn confirms_settle_single_and_multiple() {
        let mut c = Confirms::default();
        for _ in 0..5 {
            c.next();
        }
        assert!(c.on_broker_confirm_one(CH, 2, true).is_some());
        assert_eq!(c.on_broker_confirm_one(CH, 2, true), None);
        assert_eq!(
            seqs(c.on_broker_confirm_multiple(CH, 4, true)),
            vec![1, 3, 4]
        );
        assert_eq!(seqs(c.on_broker_confirm_multiple(CH, 9, false)), vec![5]);
        assert_eq!(c.on_broker_confirm_one(CH, 9, true), None);
    }

    #[test]
    fn multiple_with_tag_zero_settles_everything() {
        let mut c = Confirms::default();
        for _ in 0..3 {
            c.next();
        }
        assert_eq!(c.on_broker_confirm_one(CH, 0, true), None);
        assert_eq!(
            seqs(c.on_broker_confirm_multiple(CH, 0, true)),
            vec![1, 2, 3]
        );
    }
}
