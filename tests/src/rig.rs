//! The fault suite's rig: a request queue of its own, an in-process server, a client with the
//! fault suite's settings, a [`Ledger`] for its calls and a [`StateLog`] of its connection, on
//! any node. A case starts a [`Load`], makes its fault, waits for recovery, and
//! [`Rig::finish`] checks that nothing was lost.

use std::future::Future;
use std::time::{Duration, Instant};

use amqp_rpc_driver::{
    Client, ClientOptions, ConnectionState, ReplyMode, ServerOptions, ServerReport,
};

use crate::broker::{unique_name, Node, QueueGuard};
use crate::calls::connect_with;
use crate::faults::Proxy;
use crate::ledger::{assert_queue_drained, Class, Ledger, Load, LoadSpec, Summary};
use crate::rt::TestRuntime;
use crate::servers::{
    fault_client_options, fault_server_options, fib_held, fib_padded, Counter, Hold, TestServer,
};
use crate::states::StateLog;

/// How late after its deadline a call may end: the slack of a small, loaded machine.
pub const BUDGET: Duration = Duration::from_secs(2);
/// Bound on getting back to work after a fault ends.
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(15);
/// Successful calls that show the load is under way, before a fault.
pub const WARM_UP: u64 = 20;
/// Successful calls, started after a fault, that show the service recovered.
pub const AFTER: u64 = 40;

/// The service a rig's server runs.
pub trait Service {
    /// Workers, and as much prefetch.
    fn workers(&self) -> u16;
    /// Starts a [`TestServer`] with `options`.
    fn start<R: TestRuntime>(&self, options: ServerOptions) -> impl Future<Output = TestServer>;
}

/// fib, 20 ms per request, 4 workers: under load some requests are always in flight, and
/// some wait in the queue.
#[derive(Debug, Clone, Copy)]
pub struct SlowFib;

impl Service for SlowFib {
    fn workers(&self) -> u16 {
        4
    }

    async fn start<R: TestRuntime>(&self, options: ServerOptions) -> TestServer {
        let handler = fib_held::<R>(Hold::up_to(Duration::from_millis(20)), Counter::default());
        TestServer::start::<R, _, _>(options, handler).await
    }
}

/// fib of padded bodies ([`fib_padded`]), at once, 8 workers.
#[derive(Debug, Clone, Copy)]
pub struct PaddedFib;

impl Service for PaddedFib {
    fn workers(&self) -> u16 {
        8
    }

    async fn start<R: TestRuntime>(&self, options: ServerOptions) -> TestServer {
        TestServer::start::<R, _, _>(options, fib_padded).await
    }
}

/// A queue, a server, a client, a ledger and a state log. See the [module docs](self).
#[derive(Debug)]
pub struct Rig<R: TestRuntime> {
    /// The node everything runs on.
    pub node: Node,
    /// The request queue (deleted when the rig drops).
    pub queue: QueueGuard,
    /// The server, until [`Rig::finish`].
    pub server: Option<TestServer>,
    /// The server's connection name.
    pub server_name: String,
    /// The client.
    pub client: Client<R>,
    /// The client's connection name.
    pub client_name: String,
    /// Every call of the rig's loads.
    pub ledger: Ledger,
    /// The client's state changes.
    pub states: StateLog,
    created: Instant,
}

impl<R: TestRuntime> Rig<R> {
    /// A server of `service` on a queue of its own, and a fault-suite client (through `proxy`
    /// if given), on `node`.
    pub async fn start(
        node: &Node,
        what: &str,
        service: impl Service,
        proxy: Option<&Proxy>,
    ) -> Self {
        Self::start_with(node, what, service, proxy, |_| {}).await
    }

    /// The same, with `tune` applied to the client's options.
    pub async fn start_with(
        node: &Node,
        what: &str,
        service: impl Service,
        proxy: Option<&Proxy>,
        tune: impl FnOnce(&mut ClientOptions),
    ) -> Self {
        let created = Instant::now();
        let queue = QueueGuard::on(node, what);
        let server_name = unique_name("server");
        let options =
            fault_server_options(node.uri(), queue.name(), &server_name, service.workers());
        let server = service.start::<R>(options).await;
        let client_name = unique_name("client");
        let mut options = fault_client_options(node.uri(), ReplyMode::default(), &client_name);
        if let Some(proxy) = proxy {
            options = proxy.redirect(options);
        }
        tune(&mut options);
        let client = connect_with::<R>(options).await;
        let states = StateLog::watch(&client);
        Self {
            node: node.clone(),
            queue,
            server: Some(server),
            server_name,
            client,
            client_name,
            ledger: Ledger::new(BUDGET),
            states,
            created,
        }
    }

    /// The server.
    pub fn server_mut(&mut self) -> &mut TestServer {
        self.server
            .as_mut()
            .expect("the rig has a server until finish")
    }

    /// Starts callers of the rig's queue through its client and ledger.
    pub fn load(&self, spec: LoadSpec) -> Load {
        Load::start(&self.client, self.queue.name(), &self.ledger, spec)
    }

    /// Waits until the load is under way ([`WARM_UP`] calls answered).
    pub async fn warm_up(&self) {
        self.ledger
            .wait_recovered::<R>(self.created, WARM_UP, RECOVERY_LIMIT)
            .await;
    }

    /// Waits until [`AFTER`] calls started at or after `since` were answered.
    pub async fn recovered_since(&self, since: Instant) -> Duration {
        self.ledger
            .wait_recovered::<R>(since, AFTER, RECOVERY_LIMIT)
            .await
    }

    /// Stops `load` and checks that nothing was lost (only `allowed` errors), that the queue
    /// drains, and that the server stops cleanly with nothing left in the queue.
    pub async fn finish(mut self, load: Load, allowed: &[Class]) -> (Summary, ServerReport) {
        load.stop::<R>(BUDGET).await;
        let summary = self
            .ledger
            .check::<R>(allowed, Duration::from_secs(20))
            .await;
        assert_queue_drained::<R>(&self.node, self.queue.name(), Duration::from_secs(10)).await;
        self.client.close().await;
        let server = self
            .server
            .take()
            .expect("the rig has a server until finish");
        let report = server.stop::<R>().await;
        // Nothing the server held went back to the queue.
        assert_queue_drained::<R>(&self.node, self.queue.name(), Duration::from_secs(5)).await;
        eprintln!("{} on {}: {summary}", self.queue.name(), R::NAME);
        (summary, report)
    }
}

/// A fault-suite client of `node` (through `proxy` if given).
pub async fn fault_client<R: TestRuntime>(node: &Node, proxy: Option<&Proxy>) -> Client<R> {
    let mut options =
        fault_client_options(node.uri(), ReplyMode::default(), &unique_name("client"));
    if let Some(proxy) = proxy {
        options = proxy.redirect(options);
    }
    connect_with::<R>(options).await
}

/// `Reconnecting { .. }`.
pub fn is_reconnecting(state: &ConnectionState) -> bool {
    matches!(state, ConnectionState::Reconnecting { .. })
}

/// `Connected`.
pub fn is_connected(state: &ConnectionState) -> bool {
    *state == ConnectionState::Connected
}

/// `Blocked { .. }`.
pub fn is_blocked(state: &ConnectionState) -> bool {
    matches!(state, ConnectionState::Blocked { .. })
}
