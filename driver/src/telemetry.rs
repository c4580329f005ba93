//! Spans and events: one span per call on the client and one per request on the server, with
//! fields named after OpenTelemetry's semantic conventions for messaging
//! (<https://opentelemetry.io/docs/specs/semconv/messaging/rabbitmq/>), so that a
//! `tracing-opentelemetry` layer exports them as they are.
//!
//! The driver never prints: it emits through the `tracing` facade, and without a subscriber
//! (or with one that filters these out) a span costs an atomic load of the callsite's interest.

use amqp_rpc_core::rpc::{HandlerError, ReplyMode, Response, RpcReply, DIRECT_REPLY_TO};
use amqp_rpc_core::types::BasicProperties;
use amqp_rpc_core::RpcError;
use tracing::field::Empty;
use tracing::Span;

use crate::client::CallError;

/// `messaging.system` of every span.
const SYSTEM: &str = "rabbitmq";

/// The span of one call, from the caller's `call_with` to its end. `messaging.destination.name`
/// is the exchange (empty: the default exchange, whose routing key is the queue), as the
/// convention says for RabbitMQ; the routing key has a field of its own.
pub(crate) fn call_span(exchange: &str, routing_key: &str, mode: ReplyMode) -> Span {
    tracing::info_span!(
        "rpc.call",
        otel.kind = "client",
        otel.status_code = Empty,
        messaging.system = SYSTEM,
        messaging.operation = "publish",
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = routing_key,
        messaging.message.conversation_id = Empty,
        rpc.reply_mode = reply_mode_name(mode),
        outcome = Empty,
        may_have_run = Empty,
    )
}

/// Puts the call's trace context (W3C `traceparent`, `tracestate`) in the request's headers,
/// with the `otel` feature and a `tracing-opentelemetry` layer installed; nothing otherwise.
pub(crate) fn inject(span: &Span, properties: &mut BasicProperties) {
    #[cfg(feature = "otel")]
    crate::trace_context::inject(span, properties);
    #[cfg(not(feature = "otel"))]
    let _ = (span, properties);
}

/// The event of a request handed to the connection, in `span`.
pub(crate) fn call_queued(span: &Span, call: u64) {
    tracing::debug!(parent: span, call, "request queued for publish");
}

/// Records how a call ended in its span, with an event: `reply received`, or `call failed`
/// with the error's kind.
pub(crate) fn call_ended(span: &Span, result: &Result<RpcReply, CallError>) {
    let kind = call_outcome(result);
    crate::metrics::call_ended(
        kind,
        result
            .as_ref()
            .map_or_else(CallError::may_have_run, |_| true),
    );
    span.record("outcome", kind);
    match result {
        Ok(reply) => {
            if let Some(id) = reply.properties.correlation_id() {
                span.record("messaging.message.conversation_id", id.as_str());
            }
            span.record("otel.status_code", "OK");
            tracing::debug!(parent: span, bytes = reply.body.len(), "reply received");
        }
        Err(error) => {
            let may_have_run = error.may_have_run();
            span.record("may_have_run", may_have_run);
            span.record("otel.status_code", "ERROR");
            tracing::info!(parent: span, error.type = kind, may_have_run, %error, "call failed");
        }
    }
}

/// Records that the caller gave up on its call (dropped its future) before it ended.
pub(crate) fn call_cancelled(span: &Span) {
    // Whether it was published yet is the machine's to know: counted as may have run.
    crate::metrics::call_ended("cancelled", true);
    span.record("outcome", "cancelled");
    tracing::debug!(parent: span, "call cancelled by its caller");
}

/// The outcome kind of a call: `ok`, or the kind of its error, as the `outcome` field says.
pub(crate) fn call_outcome(result: &Result<RpcReply, CallError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(CallError::Rpc(e)) => match e {
            RpcError::NotRouted => "not_routed",
            RpcError::NoServers => "no_servers",
            RpcError::Expired => "expired",
            RpcError::TimedOut => "timed_out",
            RpcError::ConnectionLost { .. } => "connection_lost",
            RpcError::Remote { .. } => "remote",
            RpcError::Rejected { .. } => "rejected",
            RpcError::Refused { .. } => "refused",
            RpcError::ReplyPathLost => "reply_path_lost",
            RpcError::QueueFull => "queue_full",
            RpcError::ReplyTooLarge { .. } => "reply_too_large",
            // `RpcError` is non-exhaustive: a kind added later is named here when it is.
            _ => "other",
        },
        Err(CallError::TooManyCalls { .. }) => "too_many_calls",
        Err(CallError::Closed) => "closed",
        Err(CallError::Unavailable { .. }) => "unavailable",
        Err(CallError::Invalid(_)) => "invalid",
        Err(CallError::Encode { .. }) => "encode",
        Err(CallError::Decode { .. }) => "decode",
    }
}

/// The span of one request on the server, from its hand-out to a worker to its answer; the
/// handler runs inside it. With the `otel` feature, it is a child of the caller's span when
/// the request carries a trace context.
pub(crate) fn request_span(queue: &str, properties: &BasicProperties) -> Span {
    let span = new_request_span(queue, properties);
    #[cfg(feature = "otel")]
    crate::trace_context::extract(&span, properties);
    span
}

fn new_request_span(queue: &str, properties: &BasicProperties) -> Span {
    let direct = properties
        .reply_to()
        .as_ref()
        .is_some_and(|r| r.as_str().starts_with(DIRECT_REPLY_TO));
    let mode = if direct {
        ReplyMode::DirectReplyTo
    } else {
        ReplyMode::ExclusiveQueue
    };
    tracing::info_span!(
        "rpc.request",
        otel.kind = "server",
        otel.status_code = Empty,
        messaging.system = SYSTEM,
        messaging.operation = "process",
        messaging.destination.name = queue,
        messaging.message.conversation_id = properties
            .correlation_id()
            .as_ref()
            .map_or("", |id| id.as_str()),
        rpc.reply_mode = reply_mode_name(mode),
        outcome = Empty,
    )
}

/// Records a handler's answer in its request's span, with an event: `reply`, or `error reply`
/// with its code. Returns the outcome: `ok`, `rejected` or `failed`.
pub(crate) fn request_answered(
    span: &Span,
    result: &Result<Response, HandlerError>,
) -> &'static str {
    match result {
        Ok(response) => {
            span.record("outcome", "ok");
            span.record("otel.status_code", "OK");
            tracing::debug!(parent: span, bytes = response.body.len(), "reply");
            "ok"
        }
        Err(error) => {
            let (kind, code) = match error {
                HandlerError::Rejected { code, .. } => ("rejected", code),
                HandlerError::Failed { code, .. } => ("failed", code),
            };
            span.record("outcome", kind);
            span.record("otel.status_code", "ERROR");
            tracing::info!(parent: span, error.type = kind, code = code.as_str(), "error reply");
            kind
        }
    }
}

fn reply_mode_name(mode: ReplyMode) -> &'static str {
    match mode {
        ReplyMode::DirectReplyTo => "direct_reply_to",
        ReplyMode::ExclusiveQueue => "exclusive_queue",
    }
}
