//! RPC over AMQP 0-9-1 (DESIGN §4): a client machine that matches replies to calls by
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
//!   request nobody took in time;
//! - header `x-rpc-deadline` (64-bit integer, `l`): the caller's deadline in milliseconds since
//!   the Unix epoch. A server drops a request whose deadline has passed when it takes it off its
//!   prefetch buffer, without running it. Clocks of client and server hosts are assumed in sync.
//!
//! A **reply** is published to the default exchange with routing key = the request's `reply_to`
//! and the request's `correlation_id`. A successful reply carries the result in its body and no
//! `x-rpc-error` header. An **error reply** carries:
//! - header `x-rpc-error` (long string): a machine-readable code, e.g. `invalid_request`,
//!   `handler_failed`;
//! - header `x-rpc-rejected` (boolean): `true` when the server refused the request before
//!   running it (invalid input), so retrying the same request is pointless;
//! - body: a human-readable UTF-8 message.
//!
//! The server publishes the reply and then acknowledges the request. A server that dies between
//! the two gets its request redelivered to another server, which replies again: clients drop
//! replies whose correlation id they no longer wait for.

mod client;
mod correlation;
mod decide;
mod server;

pub use client::{
    CallId, CallRequest, ClientConfig, ClientEvent, ClientStats, ReplyMode, RpcClient, RpcReply,
};
pub use correlation::CorrelationKey;
pub use decide::{decide, Decision, DropReason, HandlerOutcome, RequestFacts};
pub use server::{
    HandlerError, QueueKind, ReplyToken, Request, RpcServer, ServerConfig, ServerEvent, ServerStats,
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
