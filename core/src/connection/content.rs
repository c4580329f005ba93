//! Content assembly: a content-bearing method (`basic.deliver`, `basic.return`), then one
//! content header, then body frames up to the size the header announced (spec §4.2.6).

use amq_protocol::protocol::BasicProperties;
use bytes::{Bytes, BytesMut};

use crate::error::FrameError;
use crate::ids::{ChannelId, DeliveryTag, ReplyCode};

use super::{Delivery, Event, Returned};

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

/// Bodies this many bytes or smaller are kept for reuse once delivered; a larger one is freed
/// as usual. Bounds what an idle channel holds to `RECYCLED_BODIES * RECYCLE_MAX_BODY`.
const RECYCLE_MAX_BODY: usize = 4 * 1024 * 1024;
/// How many delivered multi-frame bodies a channel watches for reuse: enough for the messages
/// a consumer with a small prefetch holds at once.
const RECYCLED_BODIES: usize = 4;

/// Buffers of multi-frame bodies already delivered, kept so the next such body is joined into
/// memory the application has finished with instead of a fresh allocation. A body of 1 MB
/// allocated and freed per message made glibc return the heap's top to the system and fault
/// it in again (zeroed) each time: a quarter of an echo server's time. A buffer is reused only
/// once every `Bytes` the application got from it is dropped (`Bytes::try_into_mut`), so the
/// application never sees its body change.
#[derive(Debug, Default)]
pub(crate) struct BodyPool {
    delivered: Vec<Bytes>,
}

impl BodyPool {
    /// An empty buffer of at least `capacity` bytes: a delivered body's, if one is free and
    /// large enough, else a new one.
    fn take(&mut self, capacity: usize) -> BytesMut {
        let free = self
            .delivered
            .iter()
            .position(|body| body.len() >= capacity && body.is_unique());
        if let Some(i) = free {
            // Unique: the application dropped every `Bytes` of it, so nobody sees it change.
            if let Ok(mut buf) = self.delivered.swap_remove(i).try_into_mut() {
                buf.clear();
                if buf.capacity() >= capacity {
                    return buf;
                }
            }
        }
        BytesMut::with_capacity(capacity)
    }

    /// Watches `body` (about to be delivered) for reuse once the application drops it.
    fn keep(&mut self, body: &Bytes) {
        if body.len() > RECYCLE_MAX_BODY {
            return;
        }
        if self.delivered.len() >= RECYCLED_BODIES {
            // Full: let go of the first (roughly the longest watched, the one the application
            // may hold for long) rather than keep many.
            self.delivered.remove(0);
        }
        self.delivered.push(body.clone());
    }
}

/// The buffer of a body that spans several frames, allocated once at the size its header
/// announced, so every frame is copied in exactly once and the buffer never grows (a doubling
/// buffer copies a 16 MB body about twice over and frees each smaller step). The size is at
/// most `max_body_size`, checked in `on_header` before any frame is taken; a larger body is
/// skipped unbuffered.
fn sized_for(body_size: u64, pool: &mut BodyPool) -> BytesMut {
    pool.take(usize::try_from(body_size).unwrap_or(0))
}

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

impl ContentProgress {
    /// The event this progress reports on `channel`, and whether the message is finished
    /// (the channel then waits for the next content method).
    pub(crate) fn into_event(self, channel: ChannelId) -> (Option<Event>, bool) {
        match self {
            ContentProgress::Partial => (None, false),
            ContentProgress::TooLarge {
                delivery_tag,
                body_size,
                properties,
            } => (
                Some(Event::ContentTooLarge {
                    channel,
                    delivery_tag,
                    body_size,
                    properties,
                }),
                false,
            ),
            ContentProgress::SkippedComplete => (None, true),
            ContentProgress::Complete(CompleteContent {
                method,
                properties,
                body,
            }) => (Some(method.into_event(channel, properties, body)), true),
        }
    }
}

impl ContentMethod {
    /// The event a complete message is reported as.
    fn into_event(self, channel: ChannelId, properties: BasicProperties, body: Bytes) -> Event {
        match self {
            ContentMethod::Deliver {
                consumer_tag,
                delivery_tag,
                redelivered,
                exchange,
                routing_key,
            } => Event::Delivery(Delivery {
                channel,
                consumer_tag,
                delivery_tag,
                redelivered,
                exchange,
                routing_key,
                properties,
                body,
            }),
            ContentMethod::Return {
                reply_code,
                reply_text,
                exchange,
                routing_key,
            } => Event::Returned(Returned {
                channel,
                reply_code,
                reply_text,
                exchange,
                routing_key,
                properties,
                body,
            }),
        }
    }
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
        Ok(self.progress(None))
    }

    /// Takes one body frame.
    pub(crate) fn on_body(
        &mut self,
        payload: Bytes,
        pool: &mut BodyPool,
    ) -> Result<ContentProgress, FrameError> {
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
                let mut buf = sized_for(body_size, pool);
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
        Ok(self.progress(Some(pool)))
    }

    /// Whether a body frame of `size` payload bytes may be copied straight from the input into
    /// this message's buffer: the header has arrived, the body is not being skipped, the frame
    /// fits in what the header announced, and the body spans several frames (a body in one
    /// frame stays a slice of the read buffer, no copy at all). On true the buffer is ready.
    /// On false the frame takes the ordinary path, which reports any violation.
    pub(crate) fn start_streamed_body(&mut self, size: usize, pool: &mut BodyPool) -> bool {
        let Some((body_size, _)) = &self.header else {
            return false;
        };
        let body_size = *body_size;
        let fits = self.body.len().saturating_add(size as u64) <= body_size;
        match &self.body {
            Body::Many(_) => fits,
            Body::Empty if fits && (size as u64) < body_size => {
                self.body = Body::Many(sized_for(body_size, pool));
                true
            }
            _ => false,
        }
    }

    /// Appends part of a streamed body frame's payload (see `start_streamed_body`).
    pub(crate) fn streamed_body(&mut self, bytes: &[u8]) {
        if let Body::Many(buf) = &mut self.body {
            buf.extend_from_slice(bytes);
        }
    }

    /// A streamed body frame ended: where the message stands.
    pub(crate) fn end_streamed_body(&mut self, pool: &mut BodyPool) -> ContentProgress {
        self.progress(Some(pool))
    }

    fn progress(&mut self, pool: Option<&mut BodyPool>) -> ContentProgress {
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
            Body::Many(b) => {
                let body = b.freeze();
                if let Some(pool) = pool {
                    pool.keep(&body);
                }
                body
            }
            Body::Skipped(_) => return ContentProgress::SkippedComplete,
        };
        ContentProgress::Complete(CompleteContent {
            method: self.method.clone(),
            properties,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut pool = BodyPool::default();
        assert!(matches!(
            p.on_header(6, BasicProperties::default(), 100),
            Ok(ContentProgress::Partial)
        ));
        assert!(matches!(
            p.on_body(Bytes::from_static(b"abc"), &mut pool),
            Ok(ContentProgress::Partial)
        ));
        match p.on_body(Bytes::from_static(b"def"), &mut pool) {
            Ok(ContentProgress::Complete(c)) => assert_eq!(&c.body[..], b"abcdef"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_body_is_skipped_not_buffered() {
        let mut p = PartialContent::new(deliver());
        let mut pool = BodyPool::default();
        assert!(matches!(
            p.on_header(1000, BasicProperties::default(), 10),
            Ok(ContentProgress::TooLarge {
                delivery_tag: Some(DeliveryTag(1)),
                body_size: 1000,
                ..
            })
        ));
        assert!(matches!(
            p.on_body(Bytes::from(vec![0; 600]), &mut pool),
            Ok(ContentProgress::Partial)
        ));
        assert!(matches!(
            p.on_body(Bytes::from(vec![0; 400]), &mut pool),
            Ok(ContentProgress::SkippedComplete)
        ));
    }

    #[test]
    fn body_longer_than_announced_is_an_error() {
        let mut p = PartialContent::new(deliver());
        let mut pool = BodyPool::default();
        p.on_header(2, BasicProperties::default(), 100).ok();
        assert!(p.on_body(Bytes::from_static(b"abc"), &mut pool).is_err());
    }

    /// Joins a body of `parts` through `pool` and returns it.
    fn join(pool: &mut BodyPool, parts: &[&'static [u8]]) -> Bytes {
        let mut p = PartialContent::new(deliver());
        let size = parts.iter().map(|b| b.len() as u64).sum();
        p.on_header(size, BasicProperties::default(), 100).ok();
        for part in parts {
            if let Ok(ContentProgress::Complete(c)) = p.on_body(Bytes::from_static(part), pool) {
                return c.body;
            }
        }
        panic!("body not complete");
    }

    #[test]
    fn a_dropped_body_buffer_is_reused_and_a_held_one_is_not() {
        let mut pool = BodyPool::default();
        let first = join(&mut pool, &[b"abc", b"def"]);
        let first_ptr = first.as_ptr();
        let held = join(&mut pool, &[b"ghi", b"jkl"]);
        // `first` is still held: the second body got its own buffer.
        assert_ne!(held.as_ptr(), first_ptr);
        assert_eq!(&first[..], b"abcdef");
        drop(first);
        let third = join(&mut pool, &[b"mn", b"opq"]);
        assert_eq!(third.as_ptr(), first_ptr);
        assert_eq!(&third[..], b"mnopq");
        assert_eq!(&held[..], b"ghijkl");
    }
}
