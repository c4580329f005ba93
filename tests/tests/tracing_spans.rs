//! The spans and events the driver emits, seen by a subscriber installed for this test binary:
//! one `rpc.call` span per call, one `rpc.request` span per request, with OpenTelemetry's
//! messaging fields, the outcome, and an event per reply and per error kind.
//! `cargo test -p e2e-tests --test tracing_spans`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, Once, PoisonError};
use std::time::Duration;

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::{CallError, ReplyMode, RpcError};
use e2e_tests::broker::{unique_name, QueueGuard};
use e2e_tests::calls::{call, connect, expect_fib, CALL_TIMEOUT};
use e2e_tests::rt::{sleep, timeout, TestRuntime};
use e2e_tests::servers::{server_options, TestServer};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

// The capturing subscriber goes in before the suite's logging (which then finds a global
// subscriber and stays out).
e2e_tests::e2e_tests!(setup = install; spans_of_calls_and_requests);

/// How long a closed span may take to show (its last clone drops in the driver task).
const SHOWS_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// A subscriber that keeps every closed span, with its fields and the events emitted in it
// ---------------------------------------------------------------------------------------------

/// A span as it closed.
#[derive(Debug, Clone, Default)]
struct Closed {
    name: String,
    fields: BTreeMap<String, String>,
    /// The messages of the events emitted in it, with their `error.type` if any.
    events: Vec<String>,
}

impl Closed {
    fn field(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }
}

static CLOSED: Mutex<Vec<Closed>> = Mutex::new(Vec::new());

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

struct Capture;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Closed {
                name: attrs.metadata().name().to_owned(),
                fields: fields.0,
                events: Vec::new(),
            });
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            if let Some(closed) = span.extensions_mut().get_mut::<Closed>() {
                closed.fields.extend(fields.0);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let message = fields.0.get("message").cloned().unwrap_or_default();
        let line = match fields.0.get("error.type") {
            Some(kind) => format!("{message} ({kind})"),
            None => message,
        };
        if let Some(span) = ctx.event_span(event) {
            if let Some(closed) = span.extensions_mut().get_mut::<Closed>() {
                closed.events.push(line);
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            if let Some(closed) = span.extensions_mut().remove::<Closed>() {
                CLOSED
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(closed);
            }
        }
    }
}

/// Installs the capturing subscriber for the whole binary (the driver's tasks run on other
/// threads than the test's), once.
fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let subscriber = tracing_subscriber::registry().with(Capture);
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other subscriber in this binary");
    });
}

/// Waits until `count` closed spans named `name` match `filter`, at most [`SHOWS_WITHIN`].
async fn closed_spans<R: TestRuntime>(
    name: &str,
    count: usize,
    filter: impl Fn(&Closed) -> bool,
) -> Vec<Closed> {
    let find = || -> Vec<Closed> {
        CLOSED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| s.name == name && filter(s))
            .cloned()
            .collect()
    };
    let found = timeout::<R, _>(SHOWS_WITHIN, async {
        while find().len() < count {
            sleep::<R>(Duration::from_millis(10)).await;
        }
    })
    .await;
    let spans = find();
    assert!(
        found.is_some(),
        "{count} {name} spans not seen within {SHOWS_WITHIN:?}: {spans:#?}"
    );
    spans
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// An answered call, a rejected call and a call to a missing queue each leave a client span
/// with their outcome; the two requests a server ran each leave a server span with the same
/// conversation id as their call's span.
async fn spans_of_calls_and_requests<R: TestRuntime>() {
    let queue = QueueGuard::new("obs-spans");
    let server = TestServer::start::<R, _, _>(server_options(queue.name()), fib_handler).await;
    let client = connect::<R>(ReplyMode::DirectReplyTo).await;
    expect_fib(call(&client, queue.name(), "12", CALL_TIMEOUT).await, 12);
    let rejected = call(&client, queue.name(), "twelve", CALL_TIMEOUT).await;
    assert!(
        matches!(rejected, Err(CallError::Rpc(RpcError::Rejected { .. }))),
        "{rejected:?}"
    );
    let missing = unique_name("obs-missing");
    let not_routed = call(&client, &missing, "12", CALL_TIMEOUT).await;
    assert_eq!(not_routed, Err(CallError::Rpc(RpcError::NotRouted)));

    let to_queue =
        |s: &Closed| s.field("messaging.rabbitmq.destination.routing_key") == queue.name();
    let calls = closed_spans::<R>("rpc.call", 2, to_queue).await;
    let requests = closed_spans::<R>("rpc.request", 2, |s| {
        s.field("messaging.destination.name") == queue.name()
    })
    .await;
    for span in calls.iter().chain(&requests) {
        assert_eq!(span.field("messaging.system"), "rabbitmq", "{span:#?}");
        assert_eq!(span.field("rpc.reply_mode"), "direct_reply_to", "{span:#?}");
    }

    let ok = calls
        .iter()
        .find(|s| s.field("outcome") == "ok")
        .unwrap_or_else(|| panic!("no ok call span: {calls:#?}"));
    assert_eq!(ok.field("messaging.operation"), "publish");
    assert_eq!(ok.field("otel.kind"), "client");
    assert!(
        ok.events.iter().any(|e| e == "request queued for publish"),
        "{ok:#?}"
    );
    assert!(ok.events.iter().any(|e| e == "reply received"), "{ok:#?}");
    let conversation = ok.field("messaging.message.conversation_id");
    assert!(!conversation.is_empty(), "{ok:#?}");
    let served = requests
        .iter()
        .find(|s| s.field("messaging.message.conversation_id") == conversation)
        .unwrap_or_else(|| panic!("no request span for {conversation}: {requests:#?}"));
    assert_eq!(served.field("outcome"), "ok", "{served:#?}");
    assert_eq!(served.field("messaging.operation"), "process");
    assert_eq!(served.field("otel.kind"), "server");
    assert!(served.events.iter().any(|e| e == "reply"), "{served:#?}");

    let refused = calls
        .iter()
        .find(|s| s.field("outcome") == "rejected")
        .unwrap_or_else(|| panic!("no rejected call span: {calls:#?}"));
    assert_eq!(refused.field("may_have_run"), "false", "{refused:#?}");
    assert!(
        refused.events.iter().any(|e| e == "call failed (rejected)"),
        "{refused:#?}"
    );
    assert!(
        requests.iter().any(|s| s.field("outcome") == "rejected"
            && s.events.iter().any(|e| e == "error reply (rejected)")),
        "{requests:#?}"
    );

    let lost = closed_spans::<R>("rpc.call", 1, |s| {
        s.field("messaging.rabbitmq.destination.routing_key") == missing
    })
    .await;
    assert_eq!(lost[0].field("outcome"), "not_routed", "{lost:#?}");
    assert!(
        lost[0]
            .events
            .iter()
            .any(|e| e == "call failed (not_routed)"),
        "{lost:#?}"
    );

    client.close().await;
    server.stop::<R>().await;
}
