//! Per-channel state: the FIFO of expected synchronous replies, content reassembly and
//! publisher-confirm bookkeeping.

use std::collections::VecDeque;

use amq_protocol::protocol::BasicProperties;
use bytes::{Bytes, BytesMut};

use crate::error::FrameError;
use crate::ids::{DeliveryTag, ReplyCode, RequestId};

/// Where a channel is in its life (spec §1.5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelState {
    /// `channel.open` sent; commands may already be pipelined behind it.
    Opening,
    /// `channel.open-ok` received.
    Open,
    /// `channel.close` sent; every frame but close and close-ok is discarded (spec §1.5.2.5).
    Closing,
}

/// A synchronous reply the channel waits for, in the order the requests went out. AMQP
/// channels answer synchronous methods in order (spec §2.2.2), so a FIFO matches each `*-ok`.
// The variants are named after the `*-ok` methods of the spec they wait for.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    OpenOk,
    CloseOk,
    QosOk(RequestId),
    DeclareOk(RequestId),
    ExchangeDeclareOk(RequestId),
    DeleteOk(RequestId),
    ConsumeOk(RequestId),
    CancelOk(RequestId),
    SelectOk(RequestId),
}

impl Expect {
    pub(crate) fn request(self) -> Option<RequestId> {
        match self {
            Expect::OpenOk | Expect::CloseOk => None,
            Expect::QosOk(r)
            | Expect::DeclareOk(r)
            | Expect::ExchangeDeclareOk(r)
            | Expect::DeleteOk(r)
            | Expect::ConsumeOk(r)
            | Expect::CancelOk(r)
            | Expect::SelectOk(r) => Some(r),
        }
    }
}

/// The method that announced content, waiting for its header and body.
#[derive(Debug, Clone)]
pub(crate) enum ContentMethod {
    Deliver {
        consumer_tag: String,
        delivery_tag: DeliveryTag,
        redelivered: bool,
        exchange: String,
        routing_key: String,
    },
    Return {
        reply_code: ReplyCode,
        reply_text: String,
        exchange: String,
        routing_key: String,
    },
}

impl ContentMethod {
    pub(crate) fn delivery_tag(&self) -> Option<DeliveryTag> {
        match self {
            ContentMethod::Deliver { delivery_tag, .. } => Some(*delivery_tag),
            ContentMethod::Return { .. } => None,
        }
    }
}

/// Body bytes collected so far. One frame stays a zero-copy slice of the read buffer; only a
/// body split over several frames is copied into one buffer.
#[derive(Debug, Clone, Default)]
enum Body {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
    /// Too large to keep: we count the bytes and drop them.
    Skipped(u64),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::One(b) => b.len() as u64,
            Body::Many(b) => b.len() as u64,
            Body::Skipped(n) => *n,
        }
    }
}

/// Most bytes reserved for a multi-frame body before its frames arrive; beyond this the buffer
/// grows with what actually comes.
const INITIAL_BODY_CAPACITY: u64 = 1024 * 1024;

/// A content-bearing method and what has arrived of its content.
#[derive(Debug, Clone)]
pub(crate) struct PartialContent {
    pub(crate) method: ContentMethod,
    header: Option<(u64, BasicProperties)>,
    body: Body,
}

/// A message whose method, header and body have all arrived.
#[derive(Debug)]
pub(crate) struct CompleteContent {
    pub(crate) method: ContentMethod,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Bytes,
}

/// What a content frame did to the message being assembled.
// Returned once per content frame and consumed at once: boxing the complete message would cost
// an allocation per delivery to save a short-lived move.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum ContentProgress {
    /// More frames to come.
    Partial,
    /// The message is complete.
    Complete(CompleteContent),
    /// The header announced more than `max_body_size`: the body will be skipped. Reported once.
    TooLarge {
        delivery_tag: Option<DeliveryTag>,
        body_size: u64,
        properties: Box<BasicProperties>,
    },
    /// The skipped body has fully arrived.
    SkippedComplete,
}

impl PartialContent {
    pub(crate) fn new(method: ContentMethod) -> Self {
        Self {
            method,
            header: None,
            body: Body::Empty,
        }
    }

    /// Takes the content header. `body_size` is checked against `max_body_size` before any
    /// buffer is sized for it.
    pub(crate) fn on_header(
        &mut self,
        body_size: u64,
        properties: BasicProperties,
        max_body_size: u64,
    ) -> Result<ContentProgress, FrameError> {
        if self.header.is_some() {
            return Err(FrameError::Unexpected {
                what: "second content header",
            });
        }
        if body_size > max_body_size {
            self.header = Some((body_size, BasicProperties::default()));
            self.body = Body::Skipped(0);
            return Ok(ContentProgress::TooLarge {
                delivery_tag: self.method.delivery_tag(),
                body_size,
                properties: Box::new(properties),
            });
        }
        self.header = Some((body_size, properties));
        Ok(self.progress())
    }

    /// Takes one body frame.
    pub(crate) fn on_body(&mut self, payload: Bytes) -> Result<ContentProgress, FrameError> {
        let Some((body_size, _)) = &self.header else {
            return Err(FrameError::Unexpected {
                what: "content body before content header",
            });
        };
        let body_size = *body_size;
        if self.body.len() + payload.len() as u64 > body_size {
            return Err(FrameError::Unexpected {
                what: "content body longer than announced",
            });
        }
        self.body = match std::mem::take(&mut self.body) {
            Body::Empty if payload.len() as u64 == body_size => Body::One(payload),
            Body::Empty => {
                // Sized for what is announced (at most `max_body_size`, checked in `on_header`),
                // but no more than a window up front: a peer that announces much and sends
                // little must not make us reserve it all.
                let capacity = body_size.min(INITIAL_BODY_CAPACITY);
                let mut buf = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
                buf.extend_from_slice(&payload);
                Body::Many(buf)
            }
            Body::One(first) => {
                let mut buf = BytesMut::from(&first[..]);
                buf.extend_from_slice(&payload);
                Body::Many(buf)
            }
            Body::Many(mut buf) => {
                buf.extend_from_slice(&payload);
                Body::Many(buf)
            }
            Body::Skipped(n) => Body::Skipped(n + payload.len() as u64),
        };
        Ok(self.progress())
    }

    fn progress(&mut self) -> ContentProgress {
        let Some((body_size, _)) = &self.header else {
            return ContentProgress::Partial;
        };
        if self.body.len() < *body_size {
            return ContentProgress::Partial;
        }
        let (_, properties) = self.header.take().unwrap_or_default();
        let body = match std::mem::take(&mut self.body) {
            Body::Empty => Bytes::new(),
            Body::One(b) => b,
            Body::Many(b) => b.freeze(),
            Body::Skipped(_) => return ContentProgress::SkippedComplete,
        };
        ContentProgress::Complete(CompleteContent {
            method: self.method.clone(),
            properties,
            body,
        })
    }
}

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
    pub(crate) fn next(&mut self) -> DeliveryTag {
        self.next_seq += 1;
        self.unsettled.push_back(self.next_seq);
        DeliveryTag(self.next_seq)
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

/// One open (or opening, or closing) channel.
#[derive(Debug)]
pub(crate) struct Channel {
    pub(crate) state: ChannelState,
    pub(crate) expected: VecDeque<Expect>,
    pub(crate) content: Option<PartialContent>,
    pub(crate) confirms: Option<Confirms>,
}

impl Channel {
    pub(crate) fn new() -> Self {
        Self {
            state: ChannelState::Opening,
            expected: VecDeque::from([Expect::OpenOk]),
            content: None,
            confirms: None,
        }
    }

    /// Whether commands may be sent on it.
    pub(crate) fn accepts_commands(&self) -> bool {
        self.state != ChannelState::Closing
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

    fn deliver() -> ContentMethod {
        ContentMethod::Deliver {
            consumer_tag: "c".into(),
            delivery_tag: DeliveryTag(1),
            redelivered: false,
            exchange: String::new(),
            routing_key: "q".into(),
        }
    }

    #[test]
    fn body_split_over_frames_is_joined() {
        let mut p = PartialContent::new(deliver());
        assert!(matches!(
            p.on_header(6, BasicProperties::default(), 100),
            Ok(ContentProgress::Partial)
        ));
        assert!(matches!(
            p.on_body(Bytes::from_static(b"abc")),
            Ok(ContentProgress::Partial)
        ));
        match p.on_body(Bytes::from_static(b"def")) {
            Ok(ContentProgress::Complete(c)) => assert_eq!(&c.body[..], b"abcdef"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_body_is_skipped_not_buffered() {
        let mut p = PartialContent::new(deliver());
        assert!(matches!(
            p.on_header(1000, BasicProperties::default(), 10),
            Ok(ContentProgress::TooLarge {
                delivery_tag: Some(DeliveryTag(1)),
                body_size: 1000,
                ..
            })
        ));
        assert!(matches!(
            p.on_body(Bytes::from(vec![0; 600])),
            Ok(ContentProgress::Partial)
        ));
        assert!(matches!(
            p.on_body(Bytes::from(vec![0; 400])),
            Ok(ContentProgress::SkippedComplete)
        ));
    }

    #[test]
    fn body_longer_than_announced_is_an_error() {
        let mut p = PartialContent::new(deliver());
        p.on_header(2, BasicProperties::default(), 100).ok();
        assert!(p.on_body(Bytes::from_static(b"abc")).is_err());
    }
}
