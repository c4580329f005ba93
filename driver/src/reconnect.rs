//! Getting a socket: TCP connect under a timeout while commands keep being served, the choice
//! of address per attempt, and the backoff between attempts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use amqp_rpc_core::rpc::{RpcClient, RpcServer};
use amqp_rpc_core::{ConnectionConfig, ConnectionError, Machine, UsageError};
use futures_channel::mpsc;
use futures_util::future::{select, Either};

use crate::addresses::{AddressFailure, Rotation};
use crate::io_loop::{deadline_in, Handler, Loop};
use crate::options::{ConnectError, ConnectOptions};
use crate::tls::{Connector, Stream, Verify};
use crate::Runtime;

/// Exponential backoff with jitter between reconnect attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first attempt.
    pub initial: Duration,
    /// Cap on any delay.
    pub max: Duration,
    /// Growth factor per attempt.
    pub factor: f64,
    /// Fraction of each delay that is random (0 to 1), so that clients cut off together do not
    /// come back together.
    pub jitter: f64,
    /// Attempts before giving up; `None` retries forever.
    pub max_attempts: Option<u32>,
    /// How long reconnecting goes on while the broker refuses the client (a wrong password:
    /// 403 ACCESS_REFUSED; a vhost deleted or no longer permitted: 530 NOT_ALLOWED), counted
    /// from the first refusal since the last good connection; `None` retries forever. Passwords
    /// get rotated and permissions restored, so a refusal is retried like any failure, with
    /// the same delays, for this long (with a
    /// [`crate::ConnectOptions::with_credentials_provider`], each attempt asks for fresh
    /// credentials). Meanwhile the state is [`crate::ConnectionState::Refused`] with the
    /// broker's words, and calls wait within their deadline, then end with
    /// [`crate::CallError::Unavailable`]. After it, the client or server gives up with the
    /// refusal. A failed first connect is not retried at all unless asked for.
    pub refusal_budget: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            factor: 2.0,
            jitter: 0.5,
            max_attempts: None,
            refusal_budget: Some(Duration::from_secs(60)),
        }
    }
}

impl Backoff {
    /// A server's default: like [`Backoff::default`], but at most 1 s between attempts. A
    /// server whose broker comes back must be back as fast as the clients, which only need
    /// their reply path (calls fail `NoServers` until a server consumes again); a service has
    /// few servers and many clients, so their attempts cost the broker little.
    pub fn server() -> Self {
        Self {
            max: Duration::from_secs(1),
            ..Self::default()
        }
    }

    /// No reconnecting at all.
    pub fn never() -> Self {
        Self {
            max_attempts: Some(0),
            ..Self::default()
        }
    }

    /// The delay before attempt `attempt` (0-based), or `None` when attempts are exhausted.
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        if self.max_attempts.is_some_and(|max| attempt >= max) {
            return None;
        }
        let exp = self
            .factor
            .max(1.0)
            .powi(i32::try_from(attempt.min(64)).unwrap_or(64));
        let base = self.initial.as_secs_f64() * exp;
        let capped = base.min(self.max.as_secs_f64());
        // Uniform in [1 - jitter, 1]. A small non-cryptographic RNG (fastrand, thread-local,
        // seeded per thread) is all that spreading clients apart needs.
        let unit = fastrand::f64();
        let jitter = self.jitter.clamp(0.0, 1.0);
        // `max` may be `Duration::MAX`, whose seconds an f64 rounds up past what a `Duration`
        // holds: such a delay is `max` itself.
        Some(Duration::try_from_secs_f64(capped * (1.0 - jitter * unit)).unwrap_or(self.max))
    }
}

/// Resolves the host, connects to its addresses in turn and, for `amqps`, runs the TLS
/// handshake, all within `options.connect_timeout`, serving commands and timers of `machine`
/// meanwhile (calls made while reconnecting wait, and expire on time).
pub(crate) async fn connect_stream<R: Runtime, M: Machine, H: Handler<M>>(
    options: &ConnectOptions,
    io: &mut Loop<R>,
    machine: &mut M,
    commands: &mut mpsc::Receiver<H::Command>,
    handler: &mut H,
) -> Result<R::Stream, ConnectError> {
    let deadline = deadline_in(options.connect_timeout);
    let connect = Box::pin(open_stream::<R>(options, deadline));
    let idle = Box::pin(io.drive(None, Some(deadline), machine, commands, handler));
    match select(connect, idle).await {
        Either::Left((result, _)) => result,
        Either::Right(_) => Err(ConnectError::TimedOut {
            address: options.address(),
            after: options.connect_timeout,
        }),
    }
}

/// Name resolution, TCP and TLS: the part of [`connect_stream`] that has a socket to show.
async fn open_stream<R: Runtime>(
    options: &ConnectOptions,
    deadline: Instant,
) -> Result<R::Stream, ConnectError> {
    let address = options.address();
    // The TLS settings first: a missing CA file needs no network to be reported.
    let connector = match &options.tls {
        Some(tls) => {
            if tls.verify == Verify::None && tls.client_config.is_none() {
                // At every connect, as the issue asks: nobody should run like this unaware.
                tracing::warn!(
                    %address,
                    "verify_none: the broker's TLS certificate is NOT verified; anyone on the \
                     path can read and change this connection"
                );
            }
            Some(
                Connector::new(tls, &options.host).map_err(|error| ConnectError::Tls {
                    address: address.clone(),
                    error,
                })?,
            )
        }
        None => None,
    };
    let addresses = R::resolve(&options.host, options.port)
        .await
        .map_err(|error| ConnectError::Io {
            address: address.clone(),
            error,
        })?;
    let tcp = connect_any::<R>(&addresses, deadline)
        .await
        .map_err(|error| ConnectError::Io {
            address: address.clone(),
            error,
        })?;
    match connector {
        None => Ok(Stream::plain(tcp).into()),
        Some(connector) => match connector.handshake(tcp).await {
            Ok(stream) => Ok(stream.into()),
            Err(error) => Err(ConnectError::Tls { address, error }),
        },
    }
}

/// Tries each address in turn until one accepts (RFC 6724's order, as the resolver gave it:
/// `localhost` may be `::1` then `127.0.0.1`, with the broker on only one of them). Each
/// attempt gets an equal share of the time left, so that one address that swallows packets
/// cannot use up the time of the others. The error is the last attempt's.
async fn connect_any<R: Runtime>(
    addresses: &[SocketAddr],
    deadline: Instant,
) -> std::io::Result<R::Tcp> {
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the host name resolved to no address",
    );
    for (i, &address) in addresses.iter().enumerate() {
        let now = Instant::now();
        let left = u32::try_from(addresses.len() - i).unwrap_or(u32::MAX);
        let share = deadline.saturating_duration_since(now) / left;
        let timer = Box::pin(R::sleep_until(now + share));
        match select(R::connect(address), timer).await {
            Either::Left((Ok(tcp), _)) => return Ok(tcp),
            Either::Left((Err(error), _)) => {
                tracing::debug!(%address, %error, "connect failed; trying the next address");
                last = error;
            }
            Either::Right(_) => {
                tracing::debug!(%address, "connect timed out; trying the next address");
                last = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
            }
        }
    }
    Err(last)
}

/// A machine that can start over on a new socket.
pub(crate) trait Reconnect: Machine {
    /// Replaces the closed connection with a fresh one, with `config`'s settings (those of the
    /// address about to be tried), starting its handshake at `now`.
    fn reconnect_to(&mut self, now: Instant, config: ConnectionConfig) -> Result<(), UsageError>;
}

impl Reconnect for RpcClient {
    fn reconnect_to(&mut self, now: Instant, config: ConnectionConfig) -> Result<(), UsageError> {
        RpcClient::reconnect_to(self, now, config)
    }
}

impl Reconnect for RpcServer {
    fn reconnect_to(&mut self, now: Instant, config: ConnectionConfig) -> Result<(), UsageError> {
        RpcServer::reconnect_to(self, now, config)
    }
}

/// What the session loop asks of the code around a client or server machine.
pub(crate) trait Session<M>: Handler<M> {
    /// Whether the machine became ready since the last call (a fresh start resets the backoff).
    fn take_was_ready(&mut self) -> bool;
    /// Whether the machine has ever been ready (a first connect that fails is not retried
    /// unless [`Session::retry_first_connect`] says so).
    fn ever_ready(&self) -> bool;
    /// The policy for a failed first connect.
    fn retry_first_connect(&self) -> bool {
        false
    }
    /// Why the last connection ended, as the machine reported it.
    fn last_error(&self) -> Option<&ConnectionError>;
    /// A reconnect attempt is about to wait `delay`.
    fn on_reconnecting(&mut self, attempt: u32, delay: Duration) {
        tracing::info!(attempt, ?delay, "reconnecting");
    }
    /// A reconnect attempt is about to wait `delay` after the broker refused the last one with
    /// `error` (see [`Backoff::refusal_budget`]).
    fn on_refused(&mut self, attempt: u32, delay: Duration, error: &ConnectionError) {
        tracing::warn!(attempt, ?delay, %error, "the broker refused the connection; retrying");
        self.on_reconnecting(attempt, delay);
    }
}

/// Connects, drives the machine until its connection ends, and reconnects until the session is
/// finished. The machine must have been created with `config`, from
/// `rotation.current().connection_config()`.
///
/// Addresses are tried in `rotation`'s order. A *round* tries each address once, moving to the
/// next at once when one fails (refused, timed out, or closed before the session was ready);
/// the backoff waits only between rounds, and after a connection that was ready is lost. Every
/// new connection, after a loss too, goes to the address after the last one used: the node
/// just lost is the least likely to answer. Each attempt takes its settings (and credentials,
/// from a provider if there is one) afresh; credentials that cannot fit in the handshake are
/// refused before a socket is opened.
///
/// One policy for refusals (see [`Backoff::refusal_budget`]): a round with a refusal is
/// retried with the backoff like any other, until the budget since the first refusal is spent.
///
/// Returns `Err` when it gives up: a first round that failed (unless retried), refusals past
/// their budget, or backoff attempts exhausted. The error is the address's own when there is
/// one address, else [`ConnectError::AllFailed`] naming each.
pub(crate) async fn run_session<R: Runtime, M: Reconnect, S: Session<M>>(
    mut rotation: Rotation,
    mut config: ConnectionConfig,
    backoff: &Backoff,
    machine: &mut M,
    commands: &mut mpsc::Receiver<S::Command>,
    session: &mut S,
) -> Result<(), ConnectError> {
    let mut io = Loop::<R>::new();
    let mut attempt: u32 = 0;
    let mut round: Vec<AddressFailure> = Vec::new();
    // When the broker first refused us since the last good connection.
    let mut refused_since: Option<Instant> = None;
    loop {
        let options = rotation.current();
        tracing::debug!(address = %options.address(), "connecting");
        let connect_error = if let Err(error) = config.check_credentials_fit() {
            // Not worth a socket: the handshake would refuse them.
            machine.handle_eof(Instant::now());
            Some(ConnectError::Connection(error))
        } else {
            match connect_stream::<R, _, _>(options, &mut io, machine, commands, session).await {
                Ok(mut stream) => {
                    let exit = io
                        .drive(Some(&mut stream), None, machine, commands, session)
                        .await;
                    tracing::debug!(?exit, address = %options.address(), "connection ended");
                    // A TLS failure after the handshake (a TLS 1.3 server that refuses our
                    // certificate alerts on the first read) or TLS bytes on a plain stream:
                    // that is why connecting failed, not a lost connection.
                    stream
                        .as_mut()
                        .take_failure()
                        .map(|error| ConnectError::Tls {
                            address: options.address(),
                            error,
                        })
                }
                Err(error) => {
                    // The byte stream the machine waits for will not come.
                    machine.handle_eof(Instant::now());
                    Some(error)
                }
            }
        };
        session.on_wake(machine, Instant::now());
        if session.finished(machine) {
            return Ok(());
        }
        if session.take_was_ready() {
            // A good connection was lost: a fresh start.
            attempt = 0;
            round.clear();
            refused_since = None;
        } else {
            round.push(AddressFailure {
                address: options.address(),
                error: connect_error.unwrap_or_else(|| ended_with(session)),
            });
        }
        rotation.advance();
        let round_failed = round.len() >= rotation.len();
        if !round.is_empty() && !round_failed {
            // The next address of this round, at once.
            config = rotation.current().connection_config();
            if machine
                .reconnect_to(Instant::now(), config.clone())
                .is_err()
            {
                return Ok(());
            }
            continue;
        }
        if round_failed && !session.ever_ready() && !session.retry_first_connect() {
            return Err(AddressFailure::into_error(round));
        }
        // The round's last refusal: what the application is told while retrying.
        let refusal = round
            .iter()
            .rev()
            .find_map(AddressFailure::refusal)
            .cloned();
        if refusal.is_some() {
            let since = *refused_since.get_or_insert_with(Instant::now);
            if backoff
                .refusal_budget
                .is_some_and(|budget| since.elapsed() >= budget)
            {
                return Err(AddressFailure::into_error(round));
            }
        }
        let Some(delay) = backoff.delay(attempt) else {
            return Err(if round.is_empty() {
                ended_with(session)
            } else {
                AddressFailure::into_error(round)
            });
        };
        attempt += 1;
        round.clear();
        match &refusal {
            Some(error) => session.on_refused(attempt, delay, error),
            None => session.on_reconnecting(attempt, delay),
        }
        io.drive(None, Some(deadline_in(delay)), machine, commands, session)
            .await;
        config = rotation.current().connection_config();
        if session.finished(machine)
            || machine
                .reconnect_to(Instant::now(), config.clone())
                .is_err()
        {
            return Ok(());
        }
    }
}

/// Why the session's last connection ended, as an error to give up with.
fn ended_with<M, S: Session<M>>(session: &S) -> ConnectError {
    ConnectError::Connection(
        session
            .last_error()
            .cloned()
            .unwrap_or(ConnectionError::ConnectionLost),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_stops() {
        let b = Backoff {
            jitter: 0.0,
            max_attempts: Some(5),
            ..Backoff::default()
        };
        assert_eq!(b.delay(0), Some(Duration::from_millis(100)));
        assert_eq!(b.delay(1), Some(Duration::from_millis(200)));
        assert_eq!(b.delay(4), Some(Duration::from_millis(1600)));
        assert_eq!(b.delay(5), None);
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        assert_eq!(b.delay(30), Some(Duration::from_secs(10)));
        assert_eq!(Backoff::never().delay(0), None);
    }

    #[test]
    fn duration_max_is_never_a_panic() {
        let b = Backoff {
            max: Duration::MAX,
            initial: Duration::MAX,
            factor: f64::MAX,
            ..Backoff::default()
        };
        for attempt in [0, 1, 64, u32::MAX - 1] {
            assert!(b.delay(attempt).is_some());
        }
        assert!(deadline_in(Duration::MAX) > Instant::now());
    }

    #[test]
    fn jitter_stays_in_range() {
        let b = Backoff::default();
        for _ in 0..100 {
            let d = b.delay(2).unwrap_or_default();
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
    }

    /// The jitter is random: clients cut off together spread out rather than come back in step.
    #[test]
    fn jitter_spreads_the_delays() {
        let b = Backoff::default();
        let delays: std::collections::HashSet<Duration> =
            (0..50).filter_map(|_| b.delay(3)).collect();
        assert!(delays.len() > 10, "{delays:?}");
    }

    /// Issue 10 case 6: every address a name resolves to is tried in turn, and the first that
    /// accepts wins; with none, the last error is reported.
    #[test]
    fn tries_every_resolved_address_in_turn() {
        let refused: SocketAddr = "[::1]:1".parse().expect("address");
        let good: SocketAddr = "127.0.0.1:2".parse().expect("address");
        let unreachable: SocketAddr = "127.0.0.1:3".parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(5);
        let run = |addresses: &[SocketAddr]| {
            TRIED.with(|t| t.lock().map(|mut t| t.clear()).ok());
            futures_util::FutureExt::now_or_never(connect_any::<Fake>(addresses, deadline))
                .expect("the fake runtime never waits")
        };
        let tcp = run(&[refused, unreachable, good]).expect("the third address accepts");
        assert_eq!(tcp.0, good);
        assert_eq!(tried(), vec![refused, unreachable, good]);
        let error = run(&[refused, unreachable]).expect_err("nothing accepts");
        assert_eq!(error.kind(), std::io::ErrorKind::HostUnreachable);
        assert!(run(&[]).is_err());
    }

    thread_local! {
        static TRIED: std::sync::Mutex<Vec<SocketAddr>> = const { std::sync::Mutex::new(Vec::new()) };
    }

    fn tried() -> Vec<SocketAddr> {
        TRIED.with(|t| t.lock().map(|t| t.clone()).unwrap_or_default())
    }

    /// A runtime whose connects finish at once: port 1 is refused, port 3 unreachable, any
    /// other accepts. Its timers never fire.
    struct Fake;

    #[derive(Debug)]
    struct FakeTcp(SocketAddr);

    impl futures_io::AsyncRead for FakeTcp {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Ok(0))
        }
    }

    impl futures_io::AsyncWrite for FakeTcp {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

    impl Runtime for Fake {
        type Tcp = FakeTcp;
        type Stream = Stream<FakeTcp>;
        type Sleep = std::future::Pending<()>;

        fn resolve(_: &str, _: u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
            Box::pin(std::future::ready(Ok(Vec::new())))
        }

        fn connect(address: SocketAddr) -> BoxFuture<std::io::Result<FakeTcp>> {
            TRIED.with(|t| t.lock().map(|mut t| t.push(address)).ok());
            let result = match address.port() {
                1 => Err(std::io::ErrorKind::ConnectionRefused.into()),
                3 => Err(std::io::ErrorKind::HostUnreachable.into()),
                _ => Ok(FakeTcp(address)),
            };
            Box::pin(std::future::ready(result))
        }

        fn sleep_until(_: Instant) -> Self::Sleep {
            std::future::pending()
        }

        fn reset(_: std::pin::Pin<&mut Self::Sleep>, _: Instant) {}

        fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(_: F) {}
    }
}
