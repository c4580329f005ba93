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

    /// A broker `basic.ack` (`acked`) or `basic.nack`: one [`Event::PublishConfirmed`] per
    /// publish it settles. Tags that settle nothing (already settled, never sent) are ignored.
    pub(crate) fn on_broker_confirm(
        &mut self,
        channel: ChannelId,
        tag: u64,
        multiple: bool,
        acked: bool,
    ) -> Vec<Event> {
        self.settle(tag, multiple)
            .into_iter()
            .map(|seq| Event::PublishConfirmed {
                channel,
                seq,
                acked,
            })
            .collect()
    }

    /// Removes and returns the sequence numbers a broker ack or nack settles.
    pub(crate) fn settle(&mut self, tag: u64, multiple: bool) -> Vec<DeliveryTag> {
        if multiple && tag == 0 {
            // "If the multiple field is 1, and the delivery tag is zero, this indicates
            // acknowledgement of all outstanding messages" (spec, basic.ack delivery-tag).
            self.unsettled.drain(..).map(DeliveryTag).collect()
        } else if multiple {
            let n = self.unsettled.partition_point(|&s| s <= tag);
            self.unsettled.drain(..n).map(DeliveryTag).collect()
        } else {
            match self.unsettled.binary_search(&tag) {
                Ok(i) => {
                    self.unsettled.remove(i);
                    vec![DeliveryTag(tag)]
                }
                Err(_) => Vec::new(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_settle_single_and_multiple() {
        let mut c = Confirms::default();
        for _ in 0..5 {
            c.next();
        }
        assert_eq!(c.settle(2, false), vec![DeliveryTag(2)]);
        assert_eq!(c.settle(2, false), vec![]);
        assert_eq!(
            c.settle(4, true),
            vec![DeliveryTag(1), DeliveryTag(3), DeliveryTag(4)]
        );
        assert_eq!(c.settle(9, true), vec![DeliveryTag(5)]);
    }

    #[test]
    fn multiple_with_tag_zero_settles_everything() {
        let mut c = Confirms::default();
        for _ in 0..3 {
            c.next();
        }
        assert_eq!(c.settle(0, false), vec![]);
        assert_eq!(
            c.settle(0, true),
            vec![DeliveryTag(1), DeliveryTag(2), DeliveryTag(3)]
        );
    }
}
