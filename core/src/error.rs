//! Errors, by who is at fault (ARCHITECTURE §4).
//!
//! - [`FrameError`]: the peer sent bytes that are not valid AMQP 0-9-1.
//! - [`ConnectionError`]: the connection is gone (hard, sticky: every later command returns it).
//! - [`ChannelError`]: one channel is gone; the connection lives.
//! - [`UsageError`]: the caller misused the API; returned at the call site, nothing was sent.
//! - [`RpcError`]: how an RPC call ended when it did not end with a reply.

use std::fmt;
use std::time::Duration;

use crate::ids::{ChannelId, ReplyCode};

/// The deepest nesting of field tables and arrays the codec accepts
/// ([`FrameError::TableTooDeep`] beyond). RabbitMQ itself never sends more than a handful of
/// levels (server properties hold a `capabilities` table inside the top one).
pub const MAX_TABLE_DEPTH: usize = 64;

/// Bytes from the peer that are not valid AMQP 0-9-1. Each maps to the reply code RabbitMQ
/// uses when it closes a connection for the same fault.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announced a payload larger than the negotiated frame_max allows.
    FrameTooLarge {
        /// Payload size from the header.
        size: u32,
        /// Negotiated frame_max (whole frame).
        frame_max: u32,
    },
    /// The octet after the payload was not `0xCE`.
    BadFrameEnd(u8),
    /// A frame type other than method, header, body or heartbeat.
    UnknownFrameType(u8),
    /// A heartbeat on a channel other than 0, or with a payload.
    BadHeartbeat,
    /// A content header or body on channel 0.
    ContentOnChannelZero,
    /// A method or content-header payload that does not parse.
    Syntax {
        /// What failed to parse.
        what: &'static str,
    },
    /// Field tables nested deeper than [`MAX_TABLE_DEPTH`].
    TableTooDeep,
    /// A frame the protocol does not allow here (content without a method, a method in the
    /// middle of content, a body longer than announced...).
    Unexpected {
        /// What was wrong.
        what: &'static str,
    },
    /// The server answered our protocol header with its own: it does not speak 0-9-1.
    ProtocolVersionRejected {
        /// Server's major version.
        major: u8,
        /// Server's minor version.
        minor: u8,
        /// Server's revision.
        revision: u8,
    },
}

impl FrameError {
    /// The reply code a `connection.close` for this fault carries (501, 502 or 505).
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            FrameError::FrameTooLarge { .. }
            | FrameError::BadFrameEnd(_)
            | FrameError::UnknownFrameType(_)
            | FrameError::BadHeartbeat
            | FrameError::ProtocolVersionRejected { .. } => ReplyCode::FRAME_ERROR,
            FrameError::Syntax { .. } | FrameError::TableTooDeep => ReplyCode::SYNTAX_ERROR,
            FrameError::ContentOnChannelZero | FrameError::Unexpected { .. } => {
                ReplyCode::UNEXPECTED_FRAME
            }
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::FrameTooLarge { size, frame_max } => {
                write!(
                    f,
                    "frame payload of {size} bytes exceeds frame_max {frame_max}"
                )
            }
            FrameError::BadFrameEnd(b) => write!(f, "frame end octet was {b:#04x}, not 0xce"),
            FrameError::UnknownFrameType(t) => write!(f, "unknown frame type {t}"),
            FrameError::BadHeartbeat => {
                f.write_str("heartbeat frame not on channel 0 or not empty")
            }
            FrameError::ContentOnChannelZero => f.write_str("content frame on channel 0"),
            FrameError::Syntax { what } => write!(f, "malformed {what}"),
            FrameError::TableTooDeep => write!(
                f,
                "field tables nested deeper than {} levels",
                MAX_TABLE_DEPTH
            ),
            FrameError::Unexpected { what } => write!(f, "unexpected frame: {what}"),
            FrameError::ProtocolVersionRejected {
                major,
                minor,
                revision,
            } => write!(
                f,
                "server rejected AMQP 0-9-1 and offered {major}-{minor}-{revision}"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Why the connection ended. Sticky: once the connection has one, every later command returns
/// it inside [`UsageError::ConnectionClosed`], and [`crate::Event::Closed`] is the last event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The server sent bytes that are not AMQP 0-9-1; we closed with the matching code.
    Frame(FrameError),
    /// The server violated the protocol in a well-formed frame; we closed with `code`.
    Protocol {
        /// The code we closed with.
        code: ReplyCode,
        /// What was wrong.
        reason: String,
    },
    /// The server offers none of the SASL mechanisms we may use.
    NoCommonMechanism {
        /// The mechanisms the server offered.
        offered: String,
        /// The mechanisms we were allowed to use, space-separated
        /// ([`crate::ConnectionConfig::auth_mechanisms`], or `PLAIN AMQPLAIN` by default).
        asked: String,
    },
    /// Wrong user name or password (or the user may not log in).
    AuthenticationFailed {
        /// The server's reason, when it gave one (never contains the password).
        reason: String,
    },
    /// The server closed the connection.
    ClosedByServer {
        /// Its reply code (320 when the broker shuts down or an operator closed us).
        code: ReplyCode,
        /// Its reply text.
        text: String,
    },
    /// The application closed the connection.
    ClosedByApplication,
    /// The handshake did not finish within [`crate::ConnectionConfig::handshake_timeout`].
    HandshakeTimedOut {
        /// How far it got: what was seen says what the broker may be short of.
        stage: HandshakeStage,
        /// The timeout.
        after: Duration,
    },
    /// The user name and password do not fit in `connection.start-ok`, which must fit in one
    /// frame before `connection.tune` (spec §4.2.3: no larger frame_max is agreed yet). Refused
    /// before sending: the broker would drop the connection with a frame error. Only the
    /// lengths are given, never the values.
    CredentialsTooLong {
        /// The user name's length in bytes.
        username: usize,
        /// The password's length in bytes.
        password: usize,
        /// The `start-ok` frame's size in bytes with them.
        frame: usize,
        /// The largest frame allowed before tune.
        limit: u32,
    },
    /// Nothing arrived for two heartbeat intervals: the peer is presumed dead.
    HeartbeatTimedOut,
    /// The byte stream ended (the socket closed or failed) without a close handshake.
    ConnectionLost,
    /// The broker refused, again and again, to set up the RPC client's reply path (e.g. 403
    /// ACCESS_REFUSED on the exclusive reply queue's `queue.declare`), so the client gave the
    /// connection up. Carries the broker's last words.
    ReplyPathRefused {
        /// The reply code of the `channel.close`.
        code: ReplyCode,
        /// Its reply text.
        text: String,
    },
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionError::Frame(e) => write!(f, "protocol error from server: {e}"),
            ConnectionError::Protocol { code, reason } => {
                write!(f, "server violated the protocol ({code}): {reason}")
            }
            ConnectionError::NoCommonMechanism { offered, asked } => write!(
                f,
                "no common authentication mechanism: server offers [{offered}], we asked for [{asked}]"
            ),
            ConnectionError::AuthenticationFailed { reason } if reason.is_empty() => {
                f.write_str("authentication failed: wrong user name or password")
            }
            ConnectionError::AuthenticationFailed { reason } => {
                write!(f, "authentication failed: {reason}")
            }
            ConnectionError::ClosedByServer { code, text } => {
                write!(f, "connection closed by server ({code}): {text}")
            }
            ConnectionError::ClosedByApplication => f.write_str("connection closed by the application"),
            ConnectionError::HandshakeTimedOut { stage, after } => stage.explain(f, *after),
            ConnectionError::CredentialsTooLong {
                username,
                password,
                frame,
                limit,
            } => write!(
                f,
                "credentials too long: with a user name of {username} bytes and a password of \
                 {password} bytes, connection.start-ok is a frame of {frame} bytes, and a frame \
                 before connection.tune may hold at most {limit}"
            ),
            ConnectionError::HeartbeatTimedOut => {
                f.write_str("no data from server for two heartbeat intervals")
            }
            ConnectionError::ConnectionLost => f.write_str("connection lost"),
            ConnectionError::ReplyPathRefused { code, text } => {
                write!(f, "broker refused the reply path ({code}): {text}")
            }
        }
    }
}

impl std::error::Error for ConnectionError {}

/// How far the opening handshake got before [`ConnectionError::HandshakeTimedOut`] (spec
/// §1.4.2: protocol header, start / start-ok, tune / tune-ok, open / open-ok).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeStage {
    /// Not one byte came back after our protocol header.
    NoReply,
    /// Some bytes came back, but not a whole `connection.start`.
    PartialStart,
    /// `connection.start-ok` (the login) sent; neither `connection.tune` nor a close came.
    AwaitingTune,
    /// `connection.tune-ok` and `connection.open` sent; no `connection.open-ok` came.
    AwaitingOpenOk,
}

impl HandshakeStage {
    /// What was seen, and what it may mean.
    fn explain(self, f: &mut fmt::Formatter<'_>, after: Duration) -> fmt::Result {
        match self {
            // The kernel completes the TCP handshake from its backlog whether or not RabbitMQ
            // accepts the socket: a node out of file descriptors (its connection limit) shows
            // exactly this.
            HandshakeStage::NoReply => write!(
                f,
                "no reply to the AMQP protocol header within {after:?}: the TCP connection was \
                 accepted but nothing answered; the broker may be out of file descriptors or \
                 sockets (at its connection limit), overloaded or still starting, or the port \
                 is not an AMQP listener (a TLS port needs amqps://)"
            ),
            HandshakeStage::PartialStart => write!(
                f,
                "the answer to the AMQP protocol header stopped short of a whole \
                 connection.start within {after:?}: the network stalls, or the peer is not an \
                 AMQP 0-9-1 broker"
            ),
            HandshakeStage::AwaitingTune => write!(
                f,
                "no answer to the login (connection.start-ok) within {after:?}: the broker is \
                 overloaded, or its authentication backend (LDAP, HTTP, OAuth) is slow or \
                 unreachable"
            ),
            HandshakeStage::AwaitingOpenOk => write!(
                f,
                "no answer to connection.open within {after:?}: the broker is overloaded, or \
                 the vhost is not available on this node"
            ),
        }
    }
}

/// Who closed a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// The broker sent `channel.close`.
    Server,
    /// We did (the application asked, or we met a fault we close channels for).
    Client,
}

/// A channel closed; the connection lives on (spec §1.2 "soft errors").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelError {
    /// The channel that closed.
    pub channel: ChannelId,
    /// Who closed it.
    pub initiator: Initiator,
    /// The reply code of the `channel.close` (200 for a normal close).
    pub code: ReplyCode,
    /// Its reply text.
    pub text: String,
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match self.initiator {
            Initiator::Server => "server",
            Initiator::Client => "client",
        };
        write!(
            f,
            "{} closed by {who} ({}): {}",
            self.channel, self.code, self.text
        )
    }
}

impl std::error::Error for ChannelError {}

/// The caller misused the API. Nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UsageError {
    /// The connection is closed; this is why.
    ConnectionClosed(ConnectionError),
    /// The connection is not open yet (wait for [`crate::Event::Connected`]).
    NotConnected,
    /// The channel is not open on this connection (never opened, closing or closed).
    ChannelNotOpen(ChannelId),
    /// Every channel number up to the negotiated channel_max is in use.
    NoFreeChannel,
    /// A name or string field is longer than the 255 bytes a short string holds.
    NameTooLong {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A method or content header (with its tables) does not fit in the negotiated frame_max.
    FrameTooLarge,
    /// A message body is larger than the broker accepts
    /// ([`crate::ConnectionConfig::max_message_size`]).
    MessageTooLarge {
        /// The body's size in bytes.
        size: u64,
        /// The configured limit in bytes.
        limit: u64,
    },
    /// The connection is already closing.
    Closing,
    /// The RPC client already has as many calls in flight as its configured limit.
    TooManyCalls {
        /// The configured limit ([`crate::rpc::ClientConfig::max_in_flight`]).
        limit: usize,
    },
    /// The RPC client or server was shut down.
    ShutDown,
    /// A request's `user_id` property is not the connection's user: RabbitMQ would refuse the
    /// publish with 406 and close the channel (RabbitMQ "Validated User-ID").
    UserIdMismatch {
        /// The `user_id` the request carried.
        user_id: String,
    },
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::ConnectionClosed(e) => write!(f, "connection closed: {e}"),
            UsageError::NotConnected => f.write_str("connection is not open yet"),
            UsageError::ChannelNotOpen(c) => write!(f, "{c} is not open"),
            UsageError::NoFreeChannel => f.write_str("no free channel number"),
            UsageError::NameTooLong { field, len } => {
                write!(
                    f,
                    "{field} is {len} bytes; a short string holds at most 255"
                )
            }
            UsageError::FrameTooLarge => f.write_str("method or header exceeds frame_max"),
            UsageError::MessageTooLarge { size, limit } => write!(
                f,
                "message body of {size} bytes exceeds the broker's max_message_size of {limit}"
            ),
            UsageError::Closing => f.write_str("connection is closing"),
            UsageError::TooManyCalls { limit } => write!(f, "{limit} calls already in flight"),
            UsageError::ShutDown => f.write_str("shut down"),
            UsageError::UserIdMismatch { user_id } => write!(
                f,
                "user_id {user_id:?} is not the connection's user; the broker would refuse it"
            ),
        }
    }
}

impl std::error::Error for UsageError {}

/// How an RPC call ended when it did not end with a successful reply (ARCHITECTURE §5). Each says
/// whether the request may have run on a server: see [`RpcError::may_have_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RpcError {
    /// The broker returned the mandatory request: no queue is bound to its routing key.
    /// Never ran.
    NotRouted,
    /// The request queue has no consumer, so nobody would answer. Never ran (never sent).
    NoServers,
    /// The deadline passed before the request could be sent (the client was connecting,
    /// reconnecting, blocked or backed up). Never ran.
    Expired,
    /// The deadline passed after the request was sent. May have run.
    TimedOut,
    /// The connection or channel was lost. May have run when `sent`.
    ConnectionLost {
        /// Whether the request had been published.
        sent: bool,
    },
    /// The server ran the request and answered with an error.
    Remote {
        /// Machine-readable code from the `x-rpc-error` header.
        code: String,
        /// Human-readable message from the body.
        message: String,
    },
    /// The server refused the request as invalid before running it.
    Rejected {
        /// Machine-readable code from the `x-rpc-error` header.
        code: String,
        /// Human-readable message from the body.
        message: String,
    },
    /// The broker refused the request before routing it (e.g. 404: its exchange does not
    /// exist), with the broker's reply code and text. Never ran.
    Refused {
        /// The broker's reply code.
        code: ReplyCode,
        /// The broker's reply text.
        text: String,
    },
    /// The request was sent, and then the path its reply would come back on was lost: the
    /// broker cancelled the reply consumer (its queue was deleted, its node went away) or
    /// closed its channel. The client arms a new reply path at once. May have run.
    ReplyPathLost,
    /// The broker nacked the request (RabbitMQ sends `basic.nack` for a publish a
    /// `reject-publish` queue at its length limit refused, or, rarely, when a queue failed
    /// internally; RabbitMQ "Publisher Confirms", "Queue Length Limit"). Never ran.
    ///
    /// Only `x-overflow: reject-publish` (or `reject-publish-dlx`) tells the publisher: a queue
    /// with the default `drop-head` overflow takes the request and drops its oldest message
    /// instead, and a dead-lettered or expired request is dropped without a word to the
    /// publisher. Those calls end [`RpcError::TimedOut`] at their deadline, so use
    /// `reject-publish` on request queues with a length limit, and a deadline the caller can
    /// afford to wait.
    QueueFull,
    /// The reply is larger than the client accepts
    /// ([`crate::ConnectionConfig::max_body_size`]): its body was skipped, never buffered.
    /// The server ran the request. May have run (it did).
    ReplyTooLarge {
        /// The body size the reply's header announced, in bytes.
        size: u64,
        /// The client's limit, in bytes.
        limit: u64,
    },
}

impl RpcError {
    /// Whether a server may have run the request: `false` means retrying cannot run it twice.
    pub fn may_have_run(&self) -> bool {
        match self {
            RpcError::NotRouted
            | RpcError::NoServers
            | RpcError::Expired
            | RpcError::Rejected { .. }
            | RpcError::Refused { .. }
            | RpcError::QueueFull => false,
            RpcError::ConnectionLost { sent } => *sent,
            RpcError::TimedOut
            | RpcError::Remote { .. }
            | RpcError::ReplyPathLost
            | RpcError::ReplyTooLarge { .. } => true,
        }
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RpcError::NotRouted => {
                f.write_str("request not routed: no queue is bound to its routing key")
            }
            RpcError::NoServers => f.write_str("no server is consuming the request queue"),
            RpcError::Expired => f.write_str("deadline passed before the request could be sent"),
            RpcError::TimedOut => f.write_str("timed out waiting for the reply"),
            RpcError::ConnectionLost { sent: true } => {
                f.write_str("connection lost after the request was sent (it may have run)")
            }
            RpcError::ConnectionLost { sent: false } => {
                f.write_str("connection lost before the request was sent")
            }
            RpcError::Remote { code, message } => write!(f, "server error {code}: {message}"),
            RpcError::Rejected { code, message } => {
                write!(f, "request rejected ({code}): {message}")
            }
            RpcError::Refused { code, text } => {
                write!(f, "broker refused the request ({code}): {text}")
            }
            RpcError::ReplyPathLost => {
                f.write_str("reply path lost after the request was sent (it may have run)")
            }
            RpcError::QueueFull => f.write_str(
                "the broker refused the request: the request queue is full (it did not run)",
            ),
            RpcError::ReplyTooLarge { size, limit } => write!(
                f,
                "reply of {size} bytes is larger than the client's limit of {limit} (the request ran)"
            ),
        }
    }
}

impl std::error::Error for RpcError {}
