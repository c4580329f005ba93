//! In-process RPC servers and clients for the tests, on any runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rpc_cli::{fib, fib_handler};
use amqp_rpc_driver::{
    Backoff, ClientOptions, ConnectError, ConnectOptions, HandlerError, ReplyMode, Request,
    Runtime, Server, ServerHandle, ServerOptions, ServerReport,
};
use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_util::future::{select, Either};
use futures_util::StreamExt;

use crate::broker::uri;
use crate::rt::{within, TestRuntime};

/// How long a server may take to start consuming.
pub const READY_LIMIT: Duration = Duration::from_secs(10);
/// How long a graceful shutdown may take.
pub const STOP_LIMIT: Duration = Duration::from_secs(15);

/// Client options for the test broker with `mode`.
pub fn client_options(mode: ReplyMode) -> ClientOptions {
    client_options_at(&uri(), mode)
}

/// Client options for the broker at `uri` with `mode`.
pub fn client_options_at(uri: &str, mode: ReplyMode) -> ClientOptions {
    let mut options = ClientOptions::from_uri(uri).expect("the broker URI does not parse");
    options.rpc.reply_mode = mode;
    options.default_timeout = Duration::from_secs(20);
    options
}

/// Server options for `queue` on the test broker: one worker, prefetch 1, as the tutorial.
pub fn server_options(queue: &str) -> ServerOptions {
    server_options_at(&uri(), queue)
}

/// Server options for `queue` on the broker at `uri`: one worker, prefetch 1.
pub fn server_options_at(uri: &str, queue: &str) -> ServerOptions {
    ServerOptions::from_uri(uri, queue).expect("the broker URI does not parse")
}

/// The heartbeat of the fault suite: short, so that a dead peer is found in seconds. (In
/// production use RabbitMQ's recommended values, 5 to 20 s at the lowest; 1 s here would make
/// a busy broker drop healthy connections.)
pub const FAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// The reconnect policy of the fault suite: quick first retry, capped at 1 s, so that a
/// restarted broker is found again within about a second.
pub fn fault_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(1),
        ..Backoff::default()
    }
}

/// The fault suite's connection settings: [`FAULT_HEARTBEAT`], a connect timeout of 3 s, and
/// `name` as the connection name (for `rabbitmqctl close_connection`).
pub fn fault_connect_settings(address: &mut ConnectOptions, name: &str) {
    address.connection.heartbeat = FAULT_HEARTBEAT;
    address.connection.connection_name = Some(name.to_owned());
    address.connect_timeout = Duration::from_secs(3);
    address.connection.handshake_timeout = Duration::from_secs(3);
}

/// Client options of the fault suite for the broker at `uri`: [`FAULT_HEARTBEAT`],
/// [`fault_backoff`], a connect timeout of 3 s, and `name` as the connection name (for
/// `rabbitmqctl close_connection`).
pub fn fault_client_options(uri: &str, mode: ReplyMode, name: &str) -> ClientOptions {
    let mut options = client_options_at(uri, mode);
    for address in options.connect.iter_mut() {
        fault_connect_settings(address, name);
    }
    options.backoff = fault_backoff();
    options
}

/// Server options of the fault suite for `queue` at `uri`: like [`fault_client_options`], with
/// `workers` workers and as much prefetch.
pub fn fault_server_options(uri: &str, queue: &str, name: &str, workers: u16) -> ServerOptions {
    let mut options = server_options_at(uri, queue);
    for address in options.connect.iter_mut() {
        fault_connect_settings(address, name);
    }
    options.backoff = fault_backoff();
    options.rpc.prefetch = workers.max(1);
    options.workers = usize::from(workers.max(1));
    options
}

/// The Fibonacci service for bodies padded after the number (`"30      …"`, any length): it
/// answers fib of the leading number, so that requests can be made large.
pub async fn fib_padded(request: Request) -> Result<Bytes, HandlerError> {
    let digits = request
        .body
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let n = std::str::from_utf8(&request.body[..digits.min(3)])
        .ok()
        .and_then(|s| s.parse::<u32>().ok());
    match n.and_then(fib) {
        Some(value) => Ok(Bytes::from(value.to_string())),
        None => Err(HandlerError::Rejected {
            code: "invalid_request".into(),
            message: "expected a number from 0 to 186 first".into(),
        }),
    }
}

/// The future a boxed handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, HandlerError>> + Send>>;

/// Counts the requests a handler started, so that a test knows when one is in flight and how
/// many a server ran.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    /// The count so far.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits until the count reaches `n` (polling every 10 ms), at most `limit`.
    pub async fn wait_for<R: Runtime>(&self, n: usize, limit: Duration) {
        let what = format!("waiting for {n} requests to start (saw {})", self.get());
        within::<R, _>(limit, &what, async {
            while self.get() < n {
                crate::rt::sleep::<R>(Duration::from_millis(10)).await;
            }
        })
        .await
    }
}

/// Holds requests in a handler until released or for at most `max`, so that a test can act
/// while requests are in flight and still let them finish quickly at its end.
#[derive(Debug, Clone)]
pub struct Hold {
    released: Arc<AtomicBool>,
    max: Duration,
}

impl Hold {
    /// Requests take no time.
    pub fn none() -> Self {
        Self::up_to(Duration::ZERO)
    }

    /// Requests wait until [`Hold::release`], at most `max`.
    pub fn up_to(max: Duration) -> Self {
        Self {
            released: Arc::new(AtomicBool::new(false)),
            max,
        }
    }

    /// Lets held requests (and later ones) go.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }

    /// Holds later requests again (until the next [`Hold::release`]).
    pub fn hold_again(&self) {
        self.released.store(false, Ordering::SeqCst);
    }

    async fn wait<R: Runtime>(&self) {
        let until = Instant::now() + self.max;
        while !self.released.load(Ordering::SeqCst) && Instant::now() < until {
            crate::rt::sleep::<R>(Duration::from_millis(10).min(self.max)).await;
        }
    }
}

/// The Fibonacci service of the bins, counting each request in `started` and holding it with
/// `hold` (on `R`'s timer) before it answers.
pub fn fib_held<R: Runtime>(
    hold: Hold,
    started: Counter,
) -> impl Fn(Request) -> HandlerFuture + Send + Sync + 'static {
    move |request| {
        started.bump();
        let hold = hold.clone();
        Box::pin(async move {
            if !hold.max.is_zero() {
                hold.wait::<R>().await;
            }
            fib_handler(request).await
        })
    }
}

/// A server running in a task of the test's runtime.
#[derive(Debug)]
pub struct TestServer {
    handle: ServerHandle,
    ready: mpsc::UnboundedReceiver<()>,
    /// `None` once waited for.
    done: Option<oneshot::Receiver<Result<ServerReport, ConnectError>>>,
}

impl TestServer {
    /// Starts serving with `handler` and waits until the server consumes its queue (at most
    /// [`READY_LIMIT`]). Panics if it fails to start.
    pub async fn start<R, H, F>(options: ServerOptions, handler: H) -> Self
    where
        R: TestRuntime,
        H: Fn(Request) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
    {
        match Self::try_start::<R, H, F>(options, handler).await {
            Ok(server) => server,
            Err(e) => panic!("server did not start: {e}"),
        }
    }

    /// Like [`TestServer::start`], but returns the error `serve` ended with.
    pub async fn try_start<R, H, F>(
        options: ServerOptions,
        handler: H,
    ) -> Result<Self, ConnectError>
    where
        R: TestRuntime,
        H: Fn(Request) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
    {
        Self::try_start_with::<R, _, _>(options, move |server| server.serve(handler)).await
    }

    /// Like [`TestServer::start`], for any way of serving: `serve` gets the server and returns
    /// the future that serves (e.g. `|server| server.serve_json(handler)`).
    pub async fn start_with<R, S, Fut>(options: ServerOptions, serve: S) -> Self
    where
        R: TestRuntime,
        S: FnOnce(Server<R>) -> Fut,
        Fut: Future<Output = Result<ServerReport, ConnectError>> + Send + 'static,
    {
        match Self::try_start_with::<R, S, Fut>(options, serve).await {
            Ok(server) => server,
            Err(e) => panic!("server did not start: {e}"),
        }
    }

    /// Like [`TestServer::start_with`], but returns the error the serving ended with.
    pub async fn try_start_with<R, S, Fut>(
        options: ServerOptions,
        serve: S,
    ) -> Result<Self, ConnectError>
    where
        R: TestRuntime,
        S: FnOnce(Server<R>) -> Fut,
        Fut: Future<Output = Result<ServerReport, ConnectError>> + Send + 'static,
    {
        let queue = options.rpc.queue.clone();
        let (ready_tx, mut ready) = mpsc::unbounded();
        let server = Server::<R>::new(options).on_ready(move || {
            let _ = ready_tx.unbounded_send(());
        });
        let handle = server.handle();
        let (done_tx, mut done) = oneshot::channel();
        let serving = serve(server);
        R::spawn(async move {
            let _ = done_tx.send(serving.await);
        });
        let what = format!("server of {queue} starting on {}", R::NAME);
        let started = within::<R, _>(READY_LIMIT, &what, select(ready.next(), &mut done)).await;
        let ended = match started {
            Either::Left((Some(()), _)) => {
                return Ok(Self {
                    handle,
                    ready,
                    done: Some(done),
                })
            }
            // `serve` returned and dropped the on-ready callback: its result is on its way.
            Either::Left((None, _)) => within::<R, _>(READY_LIMIT, &what, done).await,
            Either::Right((ended, _)) => ended,
        };
        match ended {
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => panic!("{what}: stopped before it was ready"),
            Err(_) => panic!("{what}: task dropped"),
        }
    }

    /// A handle that shuts the server down.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Waits until the server is consuming again (after a reconnect), at most `limit`.
    pub async fn wait_ready_again<R: Runtime>(&mut self, limit: Duration) {
        within::<R, _>(limit, "server consuming again", self.ready.next()).await;
    }

    /// How many times the server started consuming again since the last look (after a
    /// reconnect or a broker-sent cancel); never waits.
    pub fn times_ready_again(&mut self) -> usize {
        let mut n = 0;
        while let Ok(()) = self.ready.try_recv() {
            n += 1;
        }
        n
    }

    /// Shuts the server down gracefully and returns its report (at most [`STOP_LIMIT`]).
    pub async fn stop<R: Runtime>(self) -> ServerReport {
        self.handle.shutdown().await;
        self.wait_stopped::<R>(STOP_LIMIT)
            .await
            .expect("server failed while stopping")
    }

    /// Waits for `serve` to return by itself (e.g. after a connection loss with
    /// [`amqp_rpc_driver::Backoff::never`]), at most `limit`.
    pub async fn wait_stopped<R: Runtime>(
        mut self,
        limit: Duration,
    ) -> Result<ServerReport, ConnectError> {
        let done = self.done.take().expect("waited for once");
        within::<R, _>(limit, "server stopping", done)
            .await
            .expect("server task dropped")
    }
}

impl Drop for TestServer {
    /// A test that panics leaves its servers behind (smol's executor outlives the test): start
    /// their graceful shutdown, so that they stop consuming and cannot declare the test's queue
    /// again after its guard deleted it. Sending never waits: every handle has a slot of its own.
    fn drop(&mut self) {
        if self.done.is_some() {
            let _ = futures_util::FutureExt::now_or_never(self.handle.shutdown());
        }
    }
}
