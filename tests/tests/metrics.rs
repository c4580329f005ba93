//! The metrics the driver emits through the `metrics` facade, seen by a recorder installed for
//! this test binary: calls by outcome, call and handler durations, requests by outcome,
//! deliveries received, and in-flight gauges back at zero.
//! `cargo test -p e2e-tests --test metrics`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use amqp_rpc_cli::fib_handler;
use amqp_rpc_driver::metrics::{
    CLIENT_CALLS, CLIENT_CALL_DURATION, CLIENT_IN_FLIGHT, SERVER_HANDLER_DURATION,
    SERVER_IN_FLIGHT, SERVER_RECEIVED, SERVER_REQUESTS,
};
use amqp_rpc_driver::{CallError, ReplyMode, RpcError};
use e2e_tests::broker::{unique_name, QueueGuard};
use e2e_tests::calls::{call, connect, expect_fib, CALL_TIMEOUT};
use e2e_tests::rt::{run, sleep, timeout, Smol, TestRuntime, Tokio};
use e2e_tests::servers::{server_options, TestServer};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

// As `e2e_tests!` does, one case at a time: the recorder is global and the metrics carry no
// per-client label, so the two runtimes' cases must not count into each other's figures.
mod counts_calls_and_requests_by_outcome {
    #[test]
    fn tokio() {
        let _serial = super::serial();
        super::run::<super::Tokio, _>(
            "counts_calls_and_requests_by_outcome",
            super::counts_calls_and_requests_by_outcome::<super::Tokio>,
        );
    }

    #[test]
    fn smol() {
        let _serial = super::serial();
        super::run::<super::Smol, _>(
            "counts_calls_and_requests_by_outcome",
            super::counts_calls_and_requests_by_outcome::<super::Smol>,
        );
    }
}

/// How long a figure may take to show (the driver task publishes on its next wake-up).
const SHOWS_WITHIN: Duration = Duration::from_secs(5);

/// Installs the recorder once for the binary and runs one case at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    snapshotter();
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other recorder in this binary");
        snapshotter
    })
}

/// Counters and gauges by name and sorted labels; histograms by name, their sample counts.
/// The debugging recorder drains every metric at each snapshot (counters, gauges and
/// histograms are reset to zero), so a snapshot holds the change since the previous one and
/// [`Figures::absorb`] adds them up.
#[derive(Debug, Default)]
struct Figures {
    values: HashMap<(String, Vec<(String, String)>), f64>,
    samples: HashMap<String, usize>,
}

impl Figures {
    fn take() -> Self {
        let mut figures = Figures::default();
        for (key, _, _, value) in snapshotter().snapshot().into_vec() {
            let (kind, key) = key.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            let name = key.name().to_owned();
            match (kind, value) {
                (MetricKind::Counter, DebugValue::Counter(v)) => {
                    #[allow(clippy::cast_precision_loss)]
                    figures.values.insert((name, labels), v as f64);
                }
                (MetricKind::Gauge, DebugValue::Gauge(v)) => {
                    figures.values.insert((name, labels), v.into_inner());
                }
                (MetricKind::Histogram, DebugValue::Histogram(v)) => {
                    *figures.samples.entry(name).or_default() += v.len();
                }
                _ => {}
            }
        }
        figures
    }

    fn absorb(&mut self, change: Figures) {
        for (key, v) in change.values {
            *self.values.entry(key).or_default() += v;
        }
        for (name, n) in change.samples {
            *self.samples.entry(name).or_default() += n;
        }
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        self.values
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// Two answered calls, a rejected one and one to a missing queue move the client's counters
/// by outcome and the server's by answer; both durations get samples; the in-flight gauges
/// end where they started.
async fn counts_calls_and_requests_by_outcome<R: TestRuntime>() {
    // What the previous case left is drained here.
    let _ = Figures::take();
    let queue = QueueGuard::new("obs-metrics");
    let server = TestServer::start::<R, _, _>(server_options(queue.name()), fib_handler).await;
    let client = connect::<R>(ReplyMode::default()).await;
    expect_fib(call(&client, queue.name(), "5", CALL_TIMEOUT).await, 5);
    expect_fib(call(&client, queue.name(), "6", CALL_TIMEOUT).await, 6);
    let rejected = call(&client, queue.name(), "six", CALL_TIMEOUT).await;
    assert!(
        matches!(rejected, Err(CallError::Rpc(RpcError::Rejected { .. }))),
        "{rejected:?}"
    );
    let missing = unique_name("obs-metrics-missing");
    let not_routed = call(&client, &missing, "5", CALL_TIMEOUT).await;
    assert_eq!(not_routed, Err(CallError::Rpc(RpcError::NotRouted)));
    client.close().await;
    server.stop::<R>().await;

    // Every figure is final once both sides closed; give a published change a moment anyway.
    let moved = |f: &Figures| {
        [
            f.value(CLIENT_CALLS, &[("outcome", "ok"), ("may_have_run", "true")]),
            f.value(
                CLIENT_CALLS,
                &[("outcome", "rejected"), ("may_have_run", "false")],
            ),
            f.value(
                CLIENT_CALLS,
                &[("outcome", "not_routed"), ("may_have_run", "false")],
            ),
            f.value(SERVER_REQUESTS, &[("outcome", "ok")]),
            f.value(SERVER_REQUESTS, &[("outcome", "rejected")]),
            f.value(SERVER_RECEIVED, &[]),
            f.value(CLIENT_IN_FLIGHT, &[]),
            f.value(SERVER_IN_FLIGHT, &[]),
        ]
    };
    let want = [2.0, 1.0, 1.0, 2.0, 1.0, 3.0, 0.0, 0.0];
    let mut total = Figures::default();
    let seen = timeout::<R, _>(SHOWS_WITHIN, async {
        loop {
            total.absorb(Figures::take());
            if moved(&total) == want {
                return;
            }
            sleep::<R>(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        seen.is_some(),
        "counters moved by {:?}, expected {want:?}: {total:#?}",
        moved(&total)
    );
    let samples = |name: &str| total.samples.get(name).copied().unwrap_or(0);
    assert_eq!(samples(CLIENT_CALL_DURATION), 4, "{total:#?}");
    assert_eq!(samples(SERVER_HANDLER_DURATION), 3, "{total:#?}");
}
