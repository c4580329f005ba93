//! Metrics through the `metrics` facade: the application installs a recorder (Prometheus,
//! StatsD, OpenTelemetry...) and sees these; without one, each call here is a load of the
//! no-op recorder. Names follow Prometheus conventions (`_total` counters, `_seconds`
//! histograms).
//!
//! Counters of what the machines count themselves (late replies, drops...) are fed from the
//! difference between two published stats snapshots, so that no counter is kept twice; gauges
//! move by the difference too, so that several clients in one process add up.

use std::time::{Duration, Instant};

use amqp_rpc_core::rpc::{ClientStats, ServerStats};

use crate::stats::Snapshot;

/// Calls ended, by `outcome` (see the span field of the same name) and `may_have_run`.
pub const CLIENT_CALLS: &str = "amqp_rpc_client_calls_total";
/// Time from `call_with` to its result, by `outcome`.
pub const CLIENT_CALL_DURATION: &str = "amqp_rpc_client_call_duration_seconds";
/// Calls in flight.
pub const CLIENT_IN_FLIGHT: &str = "amqp_rpc_client_calls_in_flight";
/// Requests published (a resent idempotent call counts twice).
pub const CLIENT_REQUESTS_SENT: &str = "amqp_rpc_client_requests_sent_total";
/// Replies that came after their call ended, by `kind`: `late`, `duplicate`, `unknown`.
pub const CLIENT_STRAY_REPLIES: &str = "amqp_rpc_client_stray_replies_total";
/// Reply paths re-armed after the broker cancelled the reply consumer.
pub const CLIENT_REPLY_PATH_REARMED: &str = "amqp_rpc_client_reply_path_rearmed_total";
/// Reconnect attempts, by `side` (`client`, `server`).
pub const RECONNECTS: &str = "amqp_rpc_reconnects_total";
/// Requests answered, by `outcome` (`ok`, `rejected`, `failed`).
pub const SERVER_REQUESTS: &str = "amqp_rpc_server_requests_total";
/// Deliveries received.
pub const SERVER_RECEIVED: &str = "amqp_rpc_server_received_total";
/// Requests dropped without running, by `reason`: `expired`, `no_reply_to`,
/// `too_many_deliveries` (a request redelivered more than `max_deliveries` times).
pub const SERVER_DROPPED: &str = "amqp_rpc_server_dropped_total";
/// Time a request's handler took, its deadline included.
pub const SERVER_HANDLER_DURATION: &str = "amqp_rpc_server_handler_duration_seconds";
/// Time from the request's `timestamp` property (set by its publisher; whole seconds, per
/// AMQP 0-9-1 §4.2.5.4) to its hand-out to a handler. Only for requests that carry one.
pub const SERVER_QUEUE_WAIT: &str = "amqp_rpc_server_queue_wait_seconds";
/// Requests handed to a handler and not answered.
pub const SERVER_IN_FLIGHT: &str = "amqp_rpc_server_requests_in_flight";

/// Counts a call's end.
pub(crate) fn call_ended(outcome: &'static str, may_have_run: bool) {
    ::metrics::counter!(CLIENT_CALLS, "outcome" => outcome, "may_have_run" => bool_label(may_have_run))
        .increment(1);
}

/// Records a call's duration, as its caller saw it.
pub(crate) fn call_duration(outcome: &'static str, started: Instant) {
    ::metrics::histogram!(CLIENT_CALL_DURATION, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// Counts a reconnect attempt.
pub(crate) fn reconnecting(side: &'static str) {
    ::metrics::counter!(RECONNECTS, "side" => side).increment(1);
}

/// Feeds the counters and gauge the client's machine keeps, from two snapshots.
pub(crate) fn client_changed(before: &Snapshot<ClientStats>, now: &Snapshot<ClientStats>) {
    let (b, n) = (&before.stats, &now.stats);
    add(CLIENT_REQUESTS_SENT, &[], b.requests_sent, n.requests_sent);
    add(
        CLIENT_STRAY_REPLIES,
        &[("kind", "late")],
        b.replies_late,
        n.replies_late,
    );
    add(
        CLIENT_STRAY_REPLIES,
        &[("kind", "duplicate")],
        b.replies_duplicate,
        n.replies_duplicate,
    );
    add(
        CLIENT_STRAY_REPLIES,
        &[("kind", "unknown")],
        b.replies_unknown,
        n.replies_unknown,
    );
    add(
        CLIENT_REPLY_PATH_REARMED,
        &[],
        b.reply_path_rearmed,
        n.reply_path_rearmed,
    );
    gauge(CLIENT_IN_FLIGHT, before.in_flight, now.in_flight);
}

/// Counts a handler's answer and records how long it took.
pub(crate) fn request_answered(outcome: &'static str, took: Duration) {
    ::metrics::counter!(SERVER_REQUESTS, "outcome" => outcome).increment(1);
    ::metrics::histogram!(SERVER_HANDLER_DURATION).record(took.as_secs_f64());
}

/// Records a request's wait in the queue, from its `timestamp` (Unix seconds) to `now_ms`.
pub(crate) fn queue_wait(timestamp_s: u64, now_ms: u64) {
    let wait_ms = now_ms.saturating_sub(timestamp_s.saturating_mul(1000));
    // Whole-second timestamps make this up to a second long; a clock behind the publisher's
    // makes it zero rather than negative.
    #[allow(clippy::cast_precision_loss)]
    ::metrics::histogram!(SERVER_QUEUE_WAIT).record(wait_ms as f64 / 1000.0);
}

/// Feeds the counters and gauge the server's machine keeps, from two snapshots.
pub(crate) fn server_changed(before: &Snapshot<ServerStats>, now: &Snapshot<ServerStats>) {
    let (b, n) = (&before.stats, &now.stats);
    add(SERVER_RECEIVED, &[], b.received, n.received);
    add(
        SERVER_DROPPED,
        &[("reason", "expired")],
        b.dropped_expired,
        n.dropped_expired,
    );
    add(
        SERVER_DROPPED,
        &[("reason", "no_reply_to")],
        b.dropped_no_reply_to,
        n.dropped_no_reply_to,
    );
    add(
        SERVER_DROPPED,
        &[("reason", "too_many_deliveries")],
        b.dropped_too_many_deliveries,
        n.dropped_too_many_deliveries,
    );
    gauge(SERVER_IN_FLIGHT, before.in_flight, now.in_flight);
}

fn add(name: &'static str, labels: &[(&'static str, &'static str)], before: u64, now: u64) {
    if now > before {
        ::metrics::counter!(name, labels).increment(now - before);
    }
}

#[allow(clippy::cast_precision_loss)] // in-flight counts are far below 2^52
fn gauge(name: &'static str, before: usize, now: usize) {
    if now != before {
        ::metrics::gauge!(name).increment(now as f64 - before as f64);
    }
}

fn bool_label(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}
