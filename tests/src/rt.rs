//! One test case, every runtime: the [`TestRuntime`] trait, runtime-neutral helpers built on
//! [`amqp_rpc_driver::Runtime`], and the [`e2e_tests!`](crate::e2e_tests) macro.

use std::future::Future;
use std::time::{Duration, Instant};

use amqp_rpc_driver::Runtime;
use futures_channel::oneshot;
use futures_util::future::{select, Either};

pub use transport_smol::Smol;
pub use transport_tokio::Tokio;

/// How long one test case may take in all, set-up and clean-up included. Every wait inside a
/// case has a tighter bound of its own; this one catches a wait somebody forgot.
pub const CASE_LIMIT: Duration = Duration::from_secs(90);

/// A runtime a test case can run on: the driver's [`Runtime`] plus a way to run a future to
/// completion from a plain `#[test]` function.
pub trait TestRuntime: Runtime + Sized {
    /// `tokio` or `smol`; also the `--transport` value of the `e2e-server` bin.
    const NAME: &'static str;

    /// Runs `future` to completion on this runtime, with tasks spawned by [`Runtime::spawn`]
    /// running meanwhile.
    fn block_on<F: Future>(future: F) -> F::Output;
}

impl TestRuntime for Tokio {
    const NAME: &'static str = "tokio";

    /// A multi-thread runtime of its own per call, so that tasks really run in parallel with
    /// the test's future; dropping it at the end ends every task the case left behind.
    fn block_on<F: Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("cannot build a tokio runtime");
        runtime.block_on(future)
    }
}

impl TestRuntime for Smol {
    const NAME: &'static str = "smol";

    /// `smol::block_on`; spawned tasks run on smol's global executor threads.
    fn block_on<F: Future>(future: F) -> F::Output {
        smol::block_on(future)
    }
}

/// Waits for `duration` on `R`'s timer.
pub async fn sleep<R: Runtime>(duration: Duration) {
    R::sleep_until(Instant::now() + duration).await
}

/// Runs `future` for at most `limit`: `None` if it did not finish in time.
pub async fn timeout<R: Runtime, F: Future>(limit: Duration, future: F) -> Option<F::Output> {
    let timer = Box::pin(R::sleep_until(Instant::now() + limit));
    match select(Box::pin(future), timer).await {
        Either::Left((output, _)) => Some(output),
        Either::Right(_) => None,
    }
}

/// Like [`timeout`], but a miss fails the test with `what` in the message.
pub async fn within<R: Runtime, F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match timeout::<R, F>(limit, future).await {
        Some(output) => output,
        None => panic!("{what}: not done within {limit:?}"),
    }
}

/// A task spawned with [`spawn`]; [`Task::join`] waits for its output.
#[derive(Debug)]
pub struct Task<T> {
    output: oneshot::Receiver<T>,
}

impl<T> Task<T> {
    /// The task's output. Panics when the task panicked or was dropped by its runtime.
    pub async fn join(self) -> T {
        self.output
            .await
            .expect("task ended without an output (it panicked?)")
    }
}

/// Spawns `future` on `R` and returns a handle to its output.
pub fn spawn<R: Runtime, T: Send + 'static>(
    future: impl Future<Output = T> + Send + 'static,
) -> Task<T> {
    let (tx, rx) = oneshot::channel();
    R::spawn(async move {
        let _ = tx.send(future.await);
    });
    Task { output: rx }
}

/// Runs blocking `f` (a child process, a blocking socket) on a thread of its own, so that the
/// runtime's threads keep running while it waits.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.expect("blocking closure panicked")
}

/// Logs from the driver go to the test's output when `RUST_LOG` is set (e.g.
/// `RUST_LOG=amqp_rpc_driver=debug cargo test -p e2e-tests -- --nocapture`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Runs one case on `R` under [`CASE_LIMIT`].
pub fn run<R: TestRuntime, F: Future<Output = ()>>(case: &str, make: impl FnOnce() -> F) {
    init_logging();
    let what = format!("test case {case} on {}", R::NAME);
    R::block_on(within::<R, _>(CASE_LIMIT, &what, make()));
}

/// What a test file without a setup runs before each case: nothing.
pub fn no_setup() {}

/// Emits, for each generic case `fn case<R: TestRuntime>() -> impl Future<Output = ()>`, a
/// module `case` with one `#[test]` per transport: `case::tokio` and `case::smol`. So every case
/// is written once, and `cargo test -p e2e-tests smol` runs the smol half. Attributes before a
/// case (e.g. `#[ignore = "why"]`) go on both tests. `e2e_tests!(setup = f; cases...)` calls
/// the file's `fn f()` first in every test, before the suite's logging (for a file that
/// installs its own global subscriber).
#[macro_export]
macro_rules! e2e_tests {
    (setup = $setup:ident; $($(#[$attr:meta])* $case:ident),* $(,)?) => {
        $crate::e2e_tests!(@with super::$setup; $($(#[$attr])* $case),*);
    };
    ($($(#[$attr:meta])* $case:ident),* $(,)?) => {
        $crate::e2e_tests!(@with $crate::rt::no_setup; $($(#[$attr])* $case),*);
    };
    (@with $setup:path; $($(#[$attr:meta])* $case:ident),*) => {
        $(
            mod $case {
                #[test]
                $(#[$attr])*
                fn tokio() {
                    $setup();
                    $crate::rt::run::<$crate::rt::Tokio, _>(
                        stringify!($case),
                        super::$case::<$crate::rt::Tokio>,
                    );
                }

                #[test]
                $(#[$attr])*
                fn smol() {
                    $setup();
                    $crate::rt::run::<$crate::rt::Smol, _>(
                        stringify!($case),
                        super::$case::<$crate::rt::Smol>,
                    );
                }
            }
        )*
    };
}
