//! RPC over AMQP 0-9-1 (ARCHITECTURE §5): a client machine that matches replies to calls by
//! correlation id, and a server machine that consumes a request queue and replies.
//!
//! Both own a [`crate::Connection`] and are driven exactly like it (see the crate docs); they add
//! their own events and commands on top.
//!
//! # Wire format
//!
//! This is what a client or server in another language must speak to interoperate; it is a
//! superset of RabbitMQ's tutorial 6, so the tutorial's programs interoperate as they are.
//!
//! A **request** is a message published to the request queue (default exchange, routing key =
//! queue name, `mandatory` set) with these properties:
//! - `reply_to`: the queue the reply goes to (`amq.rabbitmq.reply-to` for direct reply-to);
//! - `correlation_id`: an opaque string of at most 255 bytes, echoed by the reply. This
//!   client's ids are `<call number in hex>.<128-bit keyed MAC of it in hex>`, so that no id can
//!   be predicted from earlier ones and a forged reply is dropped as unknown;
//! - `expiration`: the milliseconds left before the caller gives up, so that the broker drops a
//!   request nobody took in time. The server also counts this relative budget from the moment
//!   the request reached it, which no clock skew affects;
//! - header `x-rpc-deadline` (64-bit integer, `l`): the caller's deadline in milliseconds since
//!   the Unix epoch. The server trusts it up to its clock-skew tolerance
//!   (`ServerConfig::clock_skew_tolerance`, 2 s by default).
//!
//! A server drops (acks, counts and logs, never runs) a request whose caller has given up by
//! the time it takes it off its prefetch buffer: its relative budget ran out, or its absolute
//! deadline is more than the tolerance behind the server's clock. A handler still running at
//! that instant is abandoned with the error reply `deadline_exceeded`.
//!
//! A server rejects without requeue (the broker dead-letters it where the queue has a
//! dead-letter exchange) a request delivered more than `ServerConfig::max_deliveries` times,
//! counted from `x-delivery-count` (quorum queues) and from the deliveries the server saw die
//! under a running handler: a poison message must not circle forever.
//!
//! A **reply** is published to the default exchange with routing key = the request's `reply_to`
//! and the request's `correlation_id`. A successful reply carries the result in its body and no
//! `x-rpc-error` or `x-rpc-rejected` header; its handler may give it a `content_type`, a
//! `content_encoding` and other headers ([`Response`]). An **error reply** carries:
//! - header `x-rpc-error` (long string): a machine-readable code, e.g. `invalid_request`,
//!   `handler_failed`, or one the server itself sends: `handler_panicked` (the handler
//!   panicked), `deadline_exceeded` (the handler was still running at the caller's deadline and
//!   was abandoned), `reply_too_large` (the handler's reply exceeds the broker's
//!   `max_message_size` or its header the negotiated frame_max, so it could not be published),
//!   `request_too_large` (the request body exceeds the server's limit; sent rejected);
//! - header `x-rpc-rejected` (boolean): `true` when the server refused the request before
//!   running it (invalid input), so retrying the same request is pointless;
//! - body: a human-readable UTF-8 message.
//!
//! The server publishes the reply and then acknowledges the request, once the broker has
//! confirmed the reply (publisher confirms on the server's reply channel): a reply the broker
//! refused or lost never leaves its request acked. A server that dies between the two gets its
//! request redelivered to another server, which replies again: clients drop replies whose
//! correlation id they no longer wait for. Likewise, when the server's channel or
//! connection was replaced while a handler ran, its reply is still published (on the current
//! channel) and only the ack is void: the broker redelivers the request, and the caller drops
//! the second reply.

mod acks;
mod client;
mod correlation;
mod isolation;
#[cfg(feature = "json")]
mod json;
mod outbox;
mod policy;
mod probe;
mod reply_cache;
mod reply_to;
mod response;
mod server;

pub use client::{
    CallRequest, ClientConfig, ClientEvent, ClientStats, ReplyMode, RpcClient, RpcReply,
};
pub use correlation::{CallId, CorrelationKey};
#[cfg(feature = "json")]
pub use json::INVALID_JSON;
pub use policy::DropReason;
pub use response::Response;
pub use server::{
    HandlerError, QueueKind, ReplyToken, Request, RpcServer, ServerConfig, ServerEvent,
    ServerStats, DEADLINE_EXCEEDED, HANDLER_PANICKED, HANDLER_TIMEOUT, INVALID_REQUEST, IO_ERROR,
    REPLY_TOO_LARGE,
};

/// Milliseconds since the Unix epoch, as read from the driver's wall clock. The core never reads
/// a clock; deadlines that cross hosts need wall time, so the driver passes it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub u64);

/// Header carrying the caller's absolute deadline ([`UnixMillis`] as a signed 64-bit integer).
pub const DEADLINE_HEADER: &str = "x-rpc-deadline";
/// Header carrying an error reply's machine-readable code.
pub const ERROR_HEADER: &str = "x-rpc-error";
/// Header set to `true` on an error reply for a request refused before it ran.
pub const REJECTED_HEADER: &str = "x-rpc-rejected";
/// The pseudo-queue of RabbitMQ's direct reply-to (RabbitMQ "Direct Reply-to").
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
