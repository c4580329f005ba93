//! Per-channel state and its transitions (spec §1.5.2): the FIFO of expected synchronous
//! replies, the message being received, publisher confirms. A method or content frame on a
//! channel returns a [`ChannelStep`] that says what happened; the connection applies it (sends,
//! events, errors), since only it owns the outbound buffer and the event queue.

use std::collections::VecDeque;

use amq_protocol::protocol::{
    basic, channel as chan, confirm, exchange, queue, AMQPClass, BasicProperties,
};
use bytes::Bytes;

use crate::error::{ChannelError, FrameError, Initiator};
use crate::ids::{ChannelId, DeliveryTag, ReplyCode, RequestId};

use super::confirms::Confirms;
use super::content::{BodyPool, ContentMethod, ContentProgress, PartialContent};
use super::{Event, Reply};

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

/// What a frame on a channel did, for the connection to apply.
// Returned once per frame and applied at once: boxing the event would cost an allocation per
// delivery to save a short-lived move.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum ChannelStep {
    /// Nothing to report (a partial message, a frame discarded while closing).
    Nothing,
    /// Report this event.
    Report(Event),
    /// Report these events, in order (a confirm with `multiple` settles several publishes).
    ReportAll(Vec<Event>),
    /// Send `method` on the channel (a `*-ok` the broker waits for), then report `event`.
    Answer {
        /// The method to send back.
        method: AMQPClass,
        /// The event to report.
        event: Event,
    },
    /// The channel is gone: forget it and fail every request waiting on it. With `close_ok`,
    /// the broker closed it and waits for our `channel.close-ok`.
    Closed {
        /// Why it closed.
        error: ChannelError,
        /// Whether to answer the broker's `channel.close`.
        close_ok: bool,
    },
    /// The peer broke the protocol: a hard error for the whole connection.
    Violation(Violation),
}

/// How the peer broke the protocol on a channel.
#[derive(Debug)]
pub(crate) enum Violation {
    /// A method that is not allowed here (spec §1.4.2.9 reply codes).
    Protocol { code: ReplyCode, text: String },
    /// Frames out of the order content requires (spec §4.2.6).
    Frame(FrameError),
}

impl ChannelStep {
    fn protocol(code: ReplyCode, text: String) -> Self {
        ChannelStep::Violation(Violation::Protocol { code, text })
    }
}

/// One open (or opening, or closing) channel.
#[derive(Debug)]
pub(crate) struct Channel {
    id: ChannelId,
    state: ChannelState,
    expected: VecDeque<Expect>,
    content: Option<PartialContent>,
    /// Delivered bodies whose buffers the next multi-frame bodies may reuse.
    bodies: BodyPool,
    pub(crate) confirms: Option<Confirms>,
}

impl Channel {
    /// A channel whose `channel.open` just went out.
    pub(crate) fn new(id: ChannelId) -> Self {
        Self {
            id,
            state: ChannelState::Opening,
            expected: VecDeque::from([Expect::OpenOk]),
            content: None,
            bodies: BodyPool::default(),
            confirms: None,
        }
    }

    /// Whether commands may be sent on it.
    pub(crate) fn accepts_commands(&self) -> bool {
        self.state != ChannelState::Closing
    }

    /// Queues the reply a synchronous request just sent waits for.
    pub(crate) fn expect(&mut self, expect: Expect) {
        self.expected.push_back(expect);
    }

    /// The requests still waiting for a reply, which fail when the channel goes.
    pub(crate) fn waiting_requests(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.expected.iter().filter_map(|e| e.request())
    }

    /// Our `channel.close` went out: wait for close-ok, discarding everything else.
    pub(crate) fn start_close(&mut self) {
        self.state = ChannelState::Closing;
        self.expected.push_back(Expect::CloseOk);
        // The rest of a message being received is discarded with it; close-ok must not count
        // as "a method in the middle of content".
        self.content = None;
    }

    /// Handles a method frame on this channel.
    // One arm per method the broker may send on an open channel: it reads best as one table.
    pub(crate) fn on_method(&mut self, method: AMQPClass) -> ChannelStep {
        if self.content.is_some() {
            return ChannelStep::Violation(Violation::Frame(FrameError::Unexpected {
                what: "method frame in the middle of content",
            }));
        }
        if self.state == ChannelState::Closing {
            return self.on_method_while_closing(method);
        }
        match method {
            AMQPClass::Channel(chan::AMQPMethod::OpenOk(_)) => {
                if let Err(violation) = self.pop_expected(|e| e == Expect::OpenOk) {
                    return ChannelStep::Violation(violation);
                }
                self.state = ChannelState::Open;
                ChannelStep::Report(Event::ChannelOpened(self.id))
            }
            AMQPClass::Channel(chan::AMQPMethod::Close(close)) => self.closed_by_server(close),
            AMQPClass::Channel(chan::AMQPMethod::Flow(flow)) => ChannelStep::Answer {
                method: AMQPClass::Channel(chan::AMQPMethod::FlowOk(chan::FlowOk {
                    active: flow.active,
                })),
                event: Event::Flow {
                    channel: self.id,
                    active: flow.active,
                },
            },
            AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => {
                self.start_content(ContentMethod::Deliver {
                    consumer_tag: d.consumer_tag.to_string(),
                    delivery_tag: DeliveryTag(d.delivery_tag),
                    redelivered: d.redelivered,
                    exchange: d.exchange.to_string(),
                    routing_key: d.routing_key.to_string(),
                })
            }
            AMQPClass::Basic(basic::AMQPMethod::Return(r)) => {
                self.start_content(ContentMethod::Return {
                    reply_code: ReplyCode(r.reply_code),
                    reply_text: r.reply_text.to_string(),
                    exchange: r.exchange.to_string(),
                    routing_key: r.routing_key.to_string(),
                })
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => {
                self.on_broker_confirm(ack.delivery_tag, ack.multiple, true)
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(nack)) => {
                self.on_broker_confirm(nack.delivery_tag, nack.multiple, false)
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
                let event = Event::ConsumerCancelled {
                    channel: self.id,
                    consumer_tag: cancel.consumer_tag.to_string(),
                };
                if cancel.nowait {
                    return ChannelStep::Report(event);
                }
                let ok = basic::CancelOk {
                    consumer_tag: cancel.consumer_tag,
                };
                ChannelStep::Answer {
                    method: AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok)),
                    event,
                }
            }
            other => self.on_reply(other),
        }
    }

    /// Handles a content header frame.
    pub(crate) fn on_header(
        &mut self,
        body_size: u64,
        properties: BasicProperties,
        max_body_size: u64,
    ) -> ChannelStep {
        let progress = match &mut self.content {
            // A closing channel discards content (spec §1.5.2.5): a delivery the broker sent
            // before it saw our channel.close.
            _ if self.state == ChannelState::Closing => return ChannelStep::Nothing,
            Some(content) => content.on_header(body_size, properties, max_body_size),
            None => Err(FrameError::Unexpected {
                what: "content header without a content method",
            }),
        };
        self.content_progress(progress)
    }

    /// Handles a content body frame.
    pub(crate) fn on_body(&mut self, payload: Bytes) -> ChannelStep {
        let progress = match &mut self.content {
            _ if self.state == ChannelState::Closing => return ChannelStep::Nothing,
            Some(content) => content.on_body(payload, &mut self.bodies),
            None => Err(FrameError::Unexpected {
                what: "content body without a content method",
            }),
        };
        self.content_progress(progress)
    }

    /// A body frame of `size` payload bytes is about to arrive: whether its payload may be
    /// copied straight into the message being received (see
    /// `PartialContent::start_streamed_body`). False leaves the frame to [`Channel::on_body`].
    pub(crate) fn start_streamed_body(&mut self, size: usize) -> bool {
        match &mut self.content {
            Some(content) if self.state != ChannelState::Closing => {
                content.start_streamed_body(size, &mut self.bodies)
            }
            _ => false,
        }
    }

    /// Part of a streamed body frame's payload. Dropped when the message is gone meanwhile
    /// (our channel.close discards content).
    pub(crate) fn streamed_body(&mut self, bytes: &[u8]) {
        if let Some(content) = &mut self.content {
            content.streamed_body(bytes);
        }
    }

    /// The streamed body frame ended (its frame-end octet checked).
    pub(crate) fn end_streamed_body(&mut self) -> ChannelStep {
        match &mut self.content {
            Some(content) if self.state != ChannelState::Closing => {
                let progress = content.end_streamed_body(&mut self.bodies);
                self.content_progress(Ok(progress))
            }
            _ => ChannelStep::Nothing,
        }
    }

    /// Only close and close-ok matter while our close is on its way (spec §1.5.2.5).
    fn on_method_while_closing(&mut self, method: AMQPClass) -> ChannelStep {
        match method {
            AMQPClass::Channel(chan::AMQPMethod::CloseOk(_)) => ChannelStep::Closed {
                error: ChannelError {
                    channel: self.id,
                    initiator: Initiator::Client,
                    code: ReplyCode::REPLY_SUCCESS,
                    text: "closed by application".into(),
                },
                close_ok: false,
            },
            AMQPClass::Channel(chan::AMQPMethod::Close(close)) => self.closed_by_server(close),
            _ => ChannelStep::Nothing,
        }
    }

    fn closed_by_server(&self, close: chan::Close) -> ChannelStep {
        ChannelStep::Closed {
            error: ChannelError {
                channel: self.id,
                initiator: Initiator::Server,
                code: ReplyCode(close.reply_code),
                text: close.reply_text.to_string(),
            },
            close_ok: true,
        }
    }

    /// A `*-ok` that answers a synchronous request of ours.
    fn on_reply(&mut self, method: AMQPClass) -> ChannelStep {
        let (matches, reply): (fn(Expect) -> bool, Reply) = match method {
            AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => {
                (|e| matches!(e, Expect::QosOk(_)), Reply::QosOk)
            }
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => (
                |e| matches!(e, Expect::DeclareOk(_)),
                Reply::QueueDeclared {
                    queue: ok.queue.to_string(),
                    message_count: ok.message_count,
                    consumer_count: ok.consumer_count,
                },
            ),
            AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_)) => (
                |e| matches!(e, Expect::ExchangeDeclareOk(_)),
                Reply::ExchangeExists,
            ),
            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)) => (
                |e| matches!(e, Expect::DeleteOk(_)),
                Reply::QueueDeleted {
                    message_count: ok.message_count,
                },
            ),
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)) => (
                |e| matches!(e, Expect::ConsumeOk(_)),
                Reply::ConsumeOk {
                    consumer_tag: ok.consumer_tag.to_string(),
                },
            ),
            AMQPClass::Basic(basic::AMQPMethod::CancelOk(ok)) => (
                |e| matches!(e, Expect::CancelOk(_)),
                Reply::CancelOk {
                    consumer_tag: ok.consumer_tag.to_string(),
                },
            ),
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => {
                (|e| matches!(e, Expect::SelectOk(_)), Reply::ConfirmSelected)
            }
            _ => {
                return ChannelStep::protocol(
                    ReplyCode::COMMAND_INVALID,
                    format!("unexpected method on {}", self.id),
                )
            }
        };
        match self.pop_expected(matches).map(Expect::request) {
            Ok(Some(request)) => ChannelStep::Report(Event::Completed {
                request,
                channel: self.id,
                reply,
            }),
            Ok(None) => ChannelStep::Nothing,
            Err(violation) => ChannelStep::Violation(violation),
        }
    }

    /// Pops the front of the reply FIFO if `matches` accepts it; otherwise the server answered
    /// out of order, which is a hard error.
    fn pop_expected(&mut self, matches: impl Fn(Expect) -> bool) -> Result<Expect, Violation> {
        match self.expected.front() {
            Some(&e) if matches(e) => {
                self.expected.pop_front();
                Ok(e)
            }
            _ => Err(Violation::Protocol {
                code: ReplyCode::COMMAND_INVALID,
                text: format!("unexpected reply on {}", self.id),
            }),
        }
    }

    fn start_content(&mut self, method: ContentMethod) -> ChannelStep {
        self.content = Some(PartialContent::new(method));
        ChannelStep::Nothing
    }

    fn content_progress(&mut self, progress: Result<ContentProgress, FrameError>) -> ChannelStep {
        let progress = match progress {
            Ok(p) => p,
            Err(e) => return ChannelStep::Violation(Violation::Frame(e)),
        };
        let (event, finished) = progress.into_event(self.id);
        if finished {
            self.content = None;
        }
        event.map_or(ChannelStep::Nothing, ChannelStep::Report)
    }

    /// A broker `basic.ack` or `basic.nack` (RabbitMQ "Publisher Confirms").
    fn on_broker_confirm(&mut self, tag: u64, multiple: bool, acked: bool) -> ChannelStep {
        match self.confirms.as_mut() {
            Some(confirms) if multiple => {
                ChannelStep::ReportAll(confirms.on_broker_confirm_multiple(self.id, tag, acked))
            }
            Some(confirms) => confirms
                .on_broker_confirm_one(self.id, tag, acked)
                .map_or(ChannelStep::Nothing, ChannelStep::Report),
            None => ChannelStep::protocol(
                ReplyCode::COMMAND_INVALID,
                format!(
                    "publisher confirm on {}, which is not in confirm mode",
                    self.id
                ),
            ),
        }
    }
}
