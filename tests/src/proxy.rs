//! A fault-injecting TCP proxy for end-to-end tests.
//!
//! [`FaultProxy`] listens on an ephemeral loopback port and forwards every connection to one
//! upstream address (normally the broker). A test points its client at
//! [`FaultProxy::local_addr`] and then, while traffic flows, switches the [`FaultMode`] to stall
//! or throttle either direction, or aborts every connection with a TCP reset. This makes real
//! network faults (a silent peer, a slow link, a dropped connection) without touching the broker.
//!
//! Stalled bytes are held, never dropped: the proxy stops reading in the stalled direction, so
//! the sender's bytes wait in kernel buffers (and at most one proxy buffer of
//! [`BUF_SIZE`] bytes per direction) until the mode goes back to [`FaultMode::Pass`]. Memory use
//! is bounded: two fixed buffers per connection.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use e2e_tests::proxy::{FaultMode, FaultProxy};
//!
//! let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).await?;
//! let addr = proxy.local_addr(); // connect the client under test here
//! proxy.set_mode(FaultMode::StallDownstream); // the client hears nothing from the broker
//! proxy.set_mode(FaultMode::Pass); // held bytes are delivered
//! proxy.reset_all(); // every live connection gets a TCP RST
//! # let _ = addr;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Size of the buffer the proxy holds per direction per connection.
pub const BUF_SIZE: usize = 16 * 1024;

/// What the proxy does to the bytes it forwards.
///
/// "Upstream" is client to broker (towards the address given to [`FaultProxy::start`]);
/// "downstream" is broker to client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FaultMode {
    /// Forward everything in both directions as fast as it comes.
    #[default]
    Pass,
    /// Hold the bytes of both directions until the mode changes.
    StallBoth,
    /// Hold client-to-broker bytes; broker-to-client bytes still flow.
    StallUpstream,
    /// Hold broker-to-client bytes; client-to-broker bytes still flow.
    StallDownstream,
    /// Forward client-to-broker bytes at about `bytes_per_sec` (0 holds them, as a stall);
    /// broker-to-client bytes flow freely.
    SlowUpstream {
        /// Target throughput, in bytes per second.
        bytes_per_sec: u64,
    },
}

/// A TCP proxy from an ephemeral port on 127.0.0.1 to one upstream address, with faults on
/// demand. See the [module docs](self).
///
/// Dropping it stops accepting and ends every proxied connection (with a normal close).
#[derive(Debug)]
pub struct FaultProxy {
    local_addr: SocketAddr,
    mode: watch::Sender<FaultMode>,
    /// Bumped by [`FaultProxy::reset_all`]; every connection watches it.
    resets: watch::Sender<u64>,
    live: Arc<AtomicUsize>,
    /// The accept loop, which owns the connection tasks: aborting it drops them all.
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy listening on `127.0.0.1:0` that forwards each accepted connection to
    /// `upstream`, in [`FaultMode::Pass`].
    ///
    /// A connection whose upstream connect fails is reset at once. Must be called within a
    /// tokio runtime, which runs the proxy's tasks.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let local_addr = listener.local_addr()?;
        let (mode, _) = watch::channel(FaultMode::Pass);
        let (resets, _) = watch::channel(0u64);
        let live = Arc::new(AtomicUsize::new(0));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            upstream,
            mode.clone(),
            resets.clone(),
            live.clone(),
        ));
        Ok(FaultProxy {
            local_addr,
            mode,
            resets,
            live,
            accept_task,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Switches the fault mode, for all current and future connections, at once.
    ///
    /// Bytes a connection already read before a stall began are held too, not forwarded.
    pub fn set_mode(&self, mode: FaultMode) {
        self.mode.send_replace(mode);
    }

    /// The current fault mode.
    pub fn mode(&self) -> FaultMode {
        *self.mode.borrow()
    }

    /// Aborts every live connection on both sides with a TCP reset (`SO_LINGER` 0, then close).
    ///
    /// The resets happen on the proxy's tasks, right after this returns; poll
    /// [`FaultProxy::connections`] to wait for them. Connections accepted afterwards are not
    /// affected.
    pub fn reset_all(&self) {
        self.resets.send_modify(|generation| *generation += 1);
    }

    /// How many proxied connections are open now.
    pub fn connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Which way bytes travel through a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to upstream.
    Upstream,
    /// Upstream to client.
    Downstream,
}

/// What a direction does under a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Free,
    Held,
    Paced { bytes_per_sec: u64 },
}

fn flow(mode: FaultMode, direction: Direction) -> Flow {
    match (mode, direction) {
        (FaultMode::Pass, _) => Flow::Free,
        (FaultMode::StallBoth, _) => Flow::Held,
        (FaultMode::StallUpstream, Direction::Upstream) => Flow::Held,
        (FaultMode::StallUpstream, Direction::Downstream) => Flow::Free,
        (FaultMode::StallDownstream, Direction::Upstream) => Flow::Free,
        (FaultMode::StallDownstream, Direction::Downstream) => Flow::Held,
        (FaultMode::SlowUpstream { bytes_per_sec: 0 }, Direction::Upstream) => Flow::Held,
        (FaultMode::SlowUpstream { bytes_per_sec }, Direction::Upstream) => {
            Flow::Paced { bytes_per_sec }
        }
        (FaultMode::SlowUpstream { .. }, Direction::Downstream) => Flow::Free,
    }
}

/// Decrements the live-connection count when a connection task ends, however it ends
/// (including being aborted when the proxy is dropped).
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<FaultMode>,
    resets: watch::Sender<u64>,
    live: Arc<AtomicUsize>,
) {
    // Owned here so that aborting this task (on drop of the proxy) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let client = match accepted {
                    Ok((client, _)) => client,
                    // E.g. EMFILE or a connection reset before accept: keep serving the others,
                    // after a pause so a persistent error does not spin.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                live.fetch_add(1, Ordering::SeqCst);
                let guard = LiveGuard(live.clone());
                // Subscribing here, before the next accept, means a reset_all() that returns
                // after this point is seen by this connection.
                let conn = proxy_connection(client, upstream, mode.subscribe(), resets.subscribe());
                connections.spawn(async move {
                    let _guard = guard;
                    conn.await;
                });
            }
            // Reap finished connections so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn proxy_connection(
    client: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<FaultMode>,
    mut resets: watch::Receiver<u64>,
) {
    let connect = tokio::select! {
        connected = TcpStream::connect(upstream) => connected,
        _ = resets.changed() => {
            abort(&client);
            return;
        }
    };
    let Ok(mut server) = connect else {
        abort(&client);
        return;
    };
    let mut client = client;
    // Frames are small and latency matters in the tests; the proxy must not add Nagle delays.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);

    let reset = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(client_read, server_write, Direction::Upstream, mode.clone());
        let down = pump(server_read, client_write, Direction::Downstream, mode);
        tokio::select! {
            // Both directions ended with EOF: close normally. An error in either direction (a
            // reset by one peer, say) is passed on to the other peer as a reset.
            pumped = async { tokio::try_join!(up, down) } => pumped.is_err(),
            _ = resets.changed() => true,
        }
    };
    if reset {
        abort(&client);
        abort(&server);
    }
    // Dropping the streams closes them: with SO_LINGER 0 that sends RST instead of FIN.
}

/// Makes the next close of `stream` send a TCP RST.
fn abort(stream: &TcpStream) {
    // If this fails the close is a normal FIN, which the tests also treat as a lost connection.
    let _ = stream.set_zero_linger();
}

/// Copies `from` to `to` under the fault mode until EOF (then half-closes `to`) or an error.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    direction: Direction,
    mut mode: watch::Receiver<FaultMode>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        // While held, do not read at all: the peer's bytes back up in the kernel buffers and
        // then in the peer's send window, as they would behind a stuck link.
        wait_until_flowing(&mut mode, direction).await?;
        // Under pacing, read small chunks (about a tenth of a second's worth) so the rate is
        // smooth rather than one buffer-sized burst per second.
        let limit = match flow(*mode.borrow(), direction) {
            Flow::Paced { bytes_per_sec } => {
                usize::try_from(bytes_per_sec / 10).map_or(BUF_SIZE, |n| n.clamp(1, BUF_SIZE))
            }
            Flow::Free | Flow::Held => BUF_SIZE,
        };
        let n = tokio::select! {
            read = from.read(&mut buf[..limit]) => read?,
            // A new mode while waiting for bytes: start over with its read size. Cancelling a
            // TcpStream read loses no bytes.
            changed = mode.changed() => {
                changed.map_err(|_| stopped())?;
                continue;
            }
        };
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        // A stall that began while we waited in read() holds these bytes too.
        wait_until_flowing(&mut mode, direction).await?;
        to.write_all(&buf[..n]).await?;
        let flow_now = flow(*mode.borrow_and_update(), direction);
        if let Flow::Paced { bytes_per_sec } = flow_now {
            // n <= BUF_SIZE, so the cast is exact.
            let pause = Duration::from_secs_f64(n as f64 / bytes_per_sec as f64);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                // A new mode applies at once, e.g. back to Pass mid-pause.
                changed = mode.changed() => changed.map_err(|_| stopped())?,
            }
        }
    }
}

async fn wait_until_flowing(
    mode: &mut watch::Receiver<FaultMode>,
    direction: Direction,
) -> io::Result<()> {
    mode.wait_for(|mode| flow(*mode, direction) != Flow::Held)
        .await
        .map(|_| ())
        .map_err(|_| stopped())
}

fn stopped() -> io::Error {
    io::Error::other("fault proxy stopped")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Instant;

    /// Bound on every test, so a proxy bug fails a test instead of hanging the suite.
    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// A local echo server; returns its address. Lives as long as the test's runtime.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(TEST_TIMEOUT, f)
            .await
            .expect("test timed out")
    }

    /// Reads for `window` and returns how many bytes arrived.
    async fn bytes_within(stream: &mut TcpStream, window: Duration) -> usize {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(read) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            match read.unwrap() {
                0 => break,
                n => total += n,
            }
        }
        total
    }

    async fn wait_for_connections(proxy: &FaultProxy, n: usize) {
        while proxy.connections() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn passes_bytes_both_ways() {
        within(async {
            let proxy = FaultProxy::start(echo_server().await).await.unwrap();
            let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
            let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
            let (mut r, mut w) = client.split();
            let write = async {
                w.write_all(&payload).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut echoed = Vec::new();
            let read = r.read_to_end(&mut echoed);
            let ((), read) = tokio::join!(write, read);
            read.unwrap();
            assert_eq!(echoed, payload);
            assert_eq!(proxy.mode(), FaultMode::Pass);
            // Both sides closed with EOF: the connection ends and is no longer counted.
            drop(client);
            wait_for_connections(&proxy, 0).await;
        })
        .await;
    }

    #[tokio::test]
    async fn stall_downstream_holds_then_delivers() {
        within(async {
            let proxy = FaultProxy::start(echo_server().await).await.unwrap();
            let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
            client.write_all(b"before").await.unwrap();
            let mut buf = [0u8; 6];
            client.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"before");

            proxy.set_mode(FaultMode::StallDownstream);
            client.write_all(b"held").await.unwrap();
            assert_eq!(
                bytes_within(&mut client, Duration::from_millis(300)).await,
                0
            );

            proxy.set_mode(FaultMode::Pass);
            let mut buf = [0u8; 4];
            client.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"held");
        })
        .await;
    }

    #[tokio::test]
    async fn stall_upstream_and_both_hold_then_deliver() {
        within(async {
            let proxy = FaultProxy::start(echo_server().await).await.unwrap();
            let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
            for mode in [FaultMode::StallUpstream, FaultMode::StallBoth] {
                proxy.set_mode(mode);
                client.write_all(b"x").await.unwrap();
                assert_eq!(
                    bytes_within(&mut client, Duration::from_millis(200)).await,
                    0,
                    "{mode:?}"
                );
                proxy.set_mode(FaultMode::Pass);
                let mut buf = [0u8; 1];
                client.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"x");
            }
        })
        .await;
    }

    #[tokio::test]
    async fn stall_applies_to_new_connections() {
        within(async {
            let proxy = FaultProxy::start(echo_server().await).await.unwrap();
            proxy.set_mode(FaultMode::StallBoth);
            let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
            client.write_all(b"late").await.unwrap();
            assert_eq!(
                bytes_within(&mut client, Duration::from_millis(200)).await,
                0
            );
            proxy.set_mode(FaultMode::Pass);
            let mut buf = [0u8; 4];
            client.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"late");
        })
        .await;
    }

    #[tokio::test]
    async fn reset_all_aborts_live_connections() {
        within(async {
            let proxy = FaultProxy::start(echo_server().await).await.unwrap();
            let mut a = TcpStream::connect(proxy.local_addr()).await.unwrap();
            let mut b = TcpStream::connect(proxy.local_addr()).await.unwrap();
            // A round trip on each guarantees both are accepted and proxied.
            for stream in [&mut a, &mut b] {
                stream.write_all(b"hi").await.unwrap();
                let mut buf = [0u8; 2];
                stream.read_exact(&mut buf).await.unwrap();
            }
            assert_eq!(proxy.connections(), 2);

            proxy.reset_all();
            for stream in [&mut a, &mut b] {
                let mut buf = [0u8; 16];
                match stream.read(&mut buf).await {
                    Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
                    Ok(n) => assert_eq!(n, 0, "expected a reset or EOF"),
                }
            }
            wait_for_connections(&proxy, 0).await;

            // The proxy still serves new connections.
            let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
            c.write_all(b"ok").await.unwrap();
            let mut buf = [0u8; 2];
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ok");
        })
        .await;
    }

    #[tokio::test]
    async fn slow_upstream_throttles() {
        within(async {
            let proxy = FaultProxy::start(echo_server().await).await.unwrap();
            let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
            proxy.set_mode(FaultMode::SlowUpstream {
                bytes_per_sec: 16 * 1024,
            });
            let (mut r, mut w) = client.split();
            let payload = vec![7u8; 64 * 1024];
            let writer = async {
                // 64 KiB fits in the kernel buffers, so this write does not wait for the proxy.
                w.write_all(&payload).await.unwrap();
            };
            let start = Instant::now();
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            let reader = async {
                let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
                while let Ok(n) = tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
                    got += n.unwrap();
                }
            };
            tokio::join!(writer, reader);
            assert!(got > 0, "some bytes flow under SlowUpstream");
            assert!(
                got < 32 * 1024,
                "{got} bytes in {:?} at 16 KiB/s",
                start.elapsed()
            );

            // Back to Pass: the rest arrives promptly.
            proxy.set_mode(FaultMode::Pass);
            let mut rest = vec![0u8; 64 * 1024 - got];
            r.read_exact(&mut rest).await.unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn drop_stops_the_proxy() {
        within(async {
            let proxy = FaultProxy::start(echo_server().await).await.unwrap();
            let addr = proxy.local_addr();
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(b"hi").await.unwrap();
            let mut buf = [0u8; 2];
            client.read_exact(&mut buf).await.unwrap();
            drop(proxy);
            // The proxied connection is closed and the listener is gone.
            let mut buf = [0u8; 2];
            match client.read(&mut buf).await {
                Ok(n) => assert_eq!(n, 0),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            }
            loop {
                if TcpStream::connect(addr).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    #[tokio::test]
    async fn upstream_refusal_resets_the_client() {
        within(async {
            // Bind then drop, so nothing listens on this port.
            let dead = TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap()
                .local_addr()
                .unwrap();
            let proxy = FaultProxy::start(dead).await.unwrap();
            let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
            let mut buf = [0u8; 2];
            match client.read(&mut buf).await {
                Ok(n) => assert_eq!(n, 0),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            }
            wait_for_connections(&proxy, 0).await;
        })
        .await;
    }

    #[test]
    fn flow_table() {
        use Direction::{Downstream as D, Upstream as U};
        let slow = FaultMode::SlowUpstream { bytes_per_sec: 100 };
        let cases = [
            (FaultMode::Pass, Flow::Free, Flow::Free),
            (FaultMode::StallBoth, Flow::Held, Flow::Held),
            (FaultMode::StallUpstream, Flow::Held, Flow::Free),
            (FaultMode::StallDownstream, Flow::Free, Flow::Held),
            (slow, Flow::Paced { bytes_per_sec: 100 }, Flow::Free),
            (
                FaultMode::SlowUpstream { bytes_per_sec: 0 },
                Flow::Held,
                Flow::Free,
            ),
        ];
        for (mode, up, down) in cases {
            assert_eq!(flow(mode, U), up, "{mode:?} upstream");
            assert_eq!(flow(mode, D), down, "{mode:?} downstream");
        }
    }
}
