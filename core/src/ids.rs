//! Newtypes for the numbers the protocol and the API hand around.

use std::fmt;

/// An AMQP channel number. Channel 0 is the connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u16);

impl ChannelId {
    /// The connection's own channel.
    pub const CONNECTION: ChannelId = ChannelId(0);

    /// Whether this is channel 0.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "channel {}", self.0)
    }
}

/// A delivery tag: the broker's per-channel number for a delivery (spec §1.8.3.13), or, on a
/// channel in confirm mode, the sequence number of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryTag(pub u64);

/// Identifies a synchronous request (declare, consume, qos, ...) until its `*-ok` or its
/// channel's failure is reported as an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// An AMQP reply code (spec §1.2, constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyCode(pub u16);

impl ReplyCode {
    /// 200: normal close.
    pub const REPLY_SUCCESS: ReplyCode = ReplyCode(200);
    /// 311: content too large (soft).
    pub const CONTENT_TOO_LARGE: ReplyCode = ReplyCode(311);
    /// 312: no route for a mandatory publish (in `basic.return`).
    pub const NO_ROUTE: ReplyCode = ReplyCode(312);
    /// 320: the broker is shutting the connection down.
    pub const CONNECTION_FORCED: ReplyCode = ReplyCode(320);
    /// 403: access refused (also authentication failure in RabbitMQ).
    pub const ACCESS_REFUSED: ReplyCode = ReplyCode(403);
    /// 404: not found.
    pub const NOT_FOUND: ReplyCode = ReplyCode(404);
    /// 405: resource locked (exclusive queue of another connection).
    pub const RESOURCE_LOCKED: ReplyCode = ReplyCode(405);
    /// 406: precondition failed.
    pub const PRECONDITION_FAILED: ReplyCode = ReplyCode(406);
    /// 501: frame error.
    pub const FRAME_ERROR: ReplyCode = ReplyCode(501);
    /// 502: syntax error.
    pub const SYNTAX_ERROR: ReplyCode = ReplyCode(502);
    /// 503: command invalid.
    pub const COMMAND_INVALID: ReplyCode = ReplyCode(503);
    /// 504: channel error.
    pub const CHANNEL_ERROR: ReplyCode = ReplyCode(504);
    /// 505: unexpected frame.
    pub const UNEXPECTED_FRAME: ReplyCode = ReplyCode(505);
    /// 530: not allowed (e.g. vhost access).
    pub const NOT_ALLOWED: ReplyCode = ReplyCode(530);
    /// 541: internal error.
    pub const INTERNAL_ERROR: ReplyCode = ReplyCode(541);
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
