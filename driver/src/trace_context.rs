//! W3C trace context (<https://www.w3.org/TR/trace-context/>) in a request's AMQP headers, with
//! the `otel` feature: the client puts the `traceparent` and `tracestate` of its call's span in
//! the request's headers, and the server makes its request span a child of the context found
//! there. Without a `tracing-opentelemetry` layer installed, a span has no OpenTelemetry
//! context and nothing is sent.
//!
//! The two headers are written and parsed here rather than through a global propagator, so
//! that propagation needs no setup by the user and never depends on which propagator is
//! installed.

use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use amqp_rpc_core::types::BasicProperties;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header that carries the trace and parent span ids (W3C trace context §3.2).
pub(crate) const TRACEPARENT: &str = "traceparent";
/// The header that carries vendor-specific trace state (W3C trace context §3.3).
pub(crate) const TRACESTATE: &str = "tracestate";

/// Puts `span`'s trace context in `properties`' headers, when it has one.
pub(crate) fn inject(span: &Span, properties: &mut BasicProperties) {
    let context = span.context();
    let otel_span = context.span();
    let span_context = otel_span.span_context();
    if !span_context.is_valid() {
        return;
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        TRACEPARENT.into(),
        AMQPValue::LongString(LongString::from(traceparent(span_context))),
    );
    let state = span_context.trace_state().header();
    if !state.is_empty() {
        headers.insert(
            TRACESTATE.into(),
            AMQPValue::LongString(LongString::from(state)),
        );
    }
    *properties = properties.clone().with_headers(headers);
}

/// Makes `span` a child of the trace context in `properties`' headers, when there is a valid
/// one; a missing or malformed `traceparent` leaves `span` where it is (a malformed
/// `tracestate` is dropped, as §3.3.1.1 allows).
pub(crate) fn extract(span: &Span, properties: &BasicProperties) {
    let Some(headers) = properties.headers() else {
        return;
    };
    let Some(parent) = header(headers, TRACEPARENT).and_then(|v| parse_traceparent(&v)) else {
        return;
    };
    let (trace_id, span_id, flags) = parent;
    let state = header(headers, TRACESTATE)
        .and_then(|v| v.parse::<TraceState>().ok())
        .unwrap_or_default();
    let remote = SpanContext::new(trace_id, span_id, flags, true, state);
    // An error means the span is disabled or has no OpenTelemetry layer: nothing to link.
    let _ = span.set_parent(Context::new().with_remote_span_context(remote));
}

/// The `traceparent` value of `context`: version 00, trace id, parent id, flags (§3.2.2).
fn traceparent(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

/// Parses a `traceparent` value (§3.2.2): `version-traceid-parentid-flags`, lowercase hex, with
/// all-zero ids invalid and version `ff` forbidden. A later version may append fields after
/// the flags (§4.3); they are ignored.
fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(version, 2)
        || version == "ff"
        || (version == "00" && parts.next().is_some())
        || !lower_hex(trace_id, 32)
        || !lower_hex(span_id, 16)
        || !lower_hex(flags, 2)
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    // Only the sampled bit is defined (§3.2.2.5); the others are ignored.
    Some((trace_id, span_id, TraceFlags::new(flags & 1)))
}

/// A header's value as text, whether sent as a long or a short string.
fn header(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("valid hex"),
            SpanId::from_hex("00f067aa0ba902b7").expect("valid hex"),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let value = traceparent(&context);
        assert_eq!(
            value,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            parse_traceparent(&value),
            Some((context.trace_id(), context.span_id(), TraceFlags::SAMPLED))
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more")
                .is_some()
        );
    }
}
