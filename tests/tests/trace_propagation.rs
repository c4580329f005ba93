//! W3C trace context across the broker (the driver's `otel` feature): with a
//! `tracing-opentelemetry` layer installed, a call's span is a child of the caller's span and
//! the server's request span is a child of the call's span, in the same trace.
//! `cargo test -p e2e-tests --test trace_propagation`.

use std::sync::{Once, OnceLock};
use std::time::Duration;

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::ReplyMode;
use e2e_tests::broker::QueueGuard;
use e2e_tests::calls::{call, connect, expect_fib, CALL_TIMEOUT};
use e2e_tests::rt::{sleep, timeout, TestRuntime};
use e2e_tests::servers::{server_options, TestServer};
use opentelemetry::trace::{SpanId, TraceContextExt, TracerProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

// The capturing subscriber goes in before the suite's logging (which then finds a global
// subscriber and stays out).
e2e_tests::e2e_tests!(setup = install; server_span_is_a_child_of_the_call_span);

/// How long an ended span may take to reach the exporter (its last clone drops in a driver
/// task).
const SHOWS_WITHIN: Duration = Duration::from_secs(5);

static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();

/// Installs, once for the binary, a subscriber that exports every span to memory.
fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("e2e"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("no other subscriber in this binary");
        let _ = EXPORTER.set(exporter);
    });
}

/// The exported span named `name` whose attribute `key` is `value`, waited for at most
/// [`SHOWS_WITHIN`].
async fn exported<R: TestRuntime>(name: &str, key: &str, value: &str) -> SpanData {
    let find = || {
        EXPORTER
            .get()
            .expect("installed")
            .get_finished_spans()
            .expect("the in-memory exporter answers")
            .into_iter()
            .find(|s| {
                s.name == name
                    && s.attributes
                        .iter()
                        .any(|kv| kv.key.as_str() == key && kv.value.as_str() == value)
            })
    };
    let found = timeout::<R, _>(SHOWS_WITHIN, async {
        loop {
            if let Some(span) = find() {
                return span;
            }
            sleep::<R>(Duration::from_millis(10)).await;
        }
    })
    .await;
    found.unwrap_or_else(|| panic!("no {name} span with {key} = {value} within {SHOWS_WITHIN:?}"))
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// A call made inside a caller's span: the exported `rpc.call` span is the caller's child, and
/// the server's `rpc.request` span (made in another connection's driver task, linked only by
/// the `traceparent` header) is the call span's child, remote, in the same trace.
async fn server_span_is_a_child_of_the_call_span<R: TestRuntime>() {
    let queue = QueueGuard::new("obs-trace");
    let server = TestServer::start::<R, _, _>(server_options(queue.name()), fib_handler).await;
    let client = connect::<R>(ReplyMode::default()).await;

    let caller = tracing::info_span!("caller");
    let caller_id = caller.context().span().span_context().span_id();
    assert_ne!(
        caller_id,
        SpanId::INVALID,
        "the layer gives spans a context"
    );
    let reply = call(&client, queue.name(), "9", CALL_TIMEOUT)
        .instrument(caller.clone())
        .await;
    expect_fib(reply, 9);
    drop(caller);

    let call_span = exported::<R>(
        "rpc.call",
        "messaging.rabbitmq.destination.routing_key",
        queue.name(),
    )
    .await;
    let request_span =
        exported::<R>("rpc.request", "messaging.destination.name", queue.name()).await;
    assert_eq!(call_span.parent_span_id, caller_id, "{call_span:#?}");
    assert_eq!(
        request_span.span_context.trace_id(),
        call_span.span_context.trace_id(),
        "one trace: {request_span:#?}"
    );
    assert_eq!(
        request_span.parent_span_id,
        call_span.span_context.span_id(),
        "the request span's parent is the call span: {request_span:#?}"
    );

    client.close().await;
    server.stop::<R>().await;
}
