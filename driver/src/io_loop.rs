//! The one driver loop (ARCHITECTURE §2): a task owns the socket and the machine and waits on four
//! things at once — readable bytes, a writable socket while bytes wait, a command from a user
//! handle, and the machine's timer. No protocol logic lives here.
//!
//! Fairness: a source that is always ready must not starve the others. The timer is checked
//! against the clock at every turn, not only when nothing else is ready (a saturating flood of
//! deliveries must not stop heartbeats and call deadlines), and reads and commands take turns
//! at going first.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use amqp_rpc_core::Machine;
use futures_channel::mpsc;
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::future::poll_fn;
use futures_util::StreamExt;

use crate::Runtime;

/// Size of each socket read. A read takes whatever the kernel has buffered, up to this, and
/// the machine parses every whole frame in it before the loop waits again.
const READ_CHUNK: usize = 64 * 1024;
/// Commands handled in one go before the loop flushes: a burst of calls from many tasks leaves
/// in one write instead of one write per call.
const COMMAND_BATCH: usize = 256;
/// How long the last bytes of a closed connection may take to leave before the socket is
/// dropped anyway.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What the loop asks of the code around the machine.
pub(crate) trait Handler<M> {
    /// A message from a user handle.
    type Command;
    /// Runs after every wake-up: drain the machine's events and answer callers.
    fn on_wake(&mut self, machine: &mut M, now: Instant);
    /// A command from a user handle.
    fn on_command(&mut self, machine: &mut M, now: Instant, command: Self::Command);
    /// Every user handle is gone.
    fn on_handles_dropped(&mut self, machine: &mut M, now: Instant);
    /// Closed on purpose (the client closed, the server shut down): no reconnect, and a wait
    /// without a socket (between reconnects, or for a TCP connect) ends at once instead of at
    /// its deadline.
    fn finished(&self, machine: &M) -> bool;
}

/// Why [`drive`] returned.
#[derive(Debug)]
pub(crate) enum Exit {
    /// The machine's connection closed and everything it had to send went out.
    Closed,
    /// The socket failed or reached EOF; the machine has been told.
    Io,
    /// `until` passed (only without a socket).
    Until,
    /// The handler finished while there was no socket ([`Handler::finished`]).
    Finished,
}

/// Reusable buffers and timer of one driver task.
pub(crate) struct Loop<R: Runtime> {
    read_buf: Vec<u8>,
    write_buf: Vec<u8>,
    written: usize,
    timer: Pin<Box<R::Sleep>>,
    armed: Option<Instant>,
    handles_open: bool,
    /// Flips every turn: whether commands are polled before reads in this one.
    commands_first: bool,
}

impl<R: Runtime> Loop<R> {
    pub(crate) fn new() -> Self {
        Self {
            read_buf: vec![0; READ_CHUNK],
            write_buf: Vec::with_capacity(READ_CHUNK),
            written: 0,
            timer: Box::pin(R::sleep_until(far_future())),
            armed: None,
            handles_open: true,
            commands_first: false,
        }
    }

    /// Runs `machine` over `stream` until its connection closes or the socket fails; without a
    /// stream (between reconnects), handles commands and timers until `until`.
    pub(crate) async fn drive<M: Machine, H: Handler<M>>(
        &mut self,
        mut stream: Option<&mut R::Stream>,
        until: Option<Instant>,
        machine: &mut M,
        commands: &mut mpsc::Receiver<H::Command>,
        handler: &mut H,
    ) -> Exit {
        self.write_buf.clear();
        self.written = 0;
        let mut closed_at: Option<Instant> = None;
        loop {
            let now = Instant::now();
            // Due whatever else is ready: serviced here, not only when the loop goes idle.
            if self.armed.is_some_and(|at| now >= at) {
                self.armed = None;
                machine.handle_timeout(now);
            }
            if stream.is_some() && self.written == self.write_buf.len() {
                // Everything handed over was written: work held back for room may go now
                // (its events are drained just below, its bytes taken further down).
                machine.handle_transmitted(now);
            }
            handler.on_wake(machine, now);
            if stream.is_none() && handler.finished(machine) {
                return Exit::Finished;
            }
            if stream.is_some() && self.written == self.write_buf.len() {
                self.write_buf.clear();
                self.written = 0;
                machine.poll_transmit(now, &mut self.write_buf);
            }
            let mut until = until;
            if stream.is_some() && machine.is_closed() {
                // The last bytes (a close or close-ok) get a short while to leave; a peer that
                // stopped reading (a blocked connection, a dead network) must not hold us.
                let linger = *closed_at.get_or_insert(now) + CLOSE_LINGER;
                if self.write_buf.is_empty() || now >= linger {
                    return Exit::Closed;
                }
                until = Some(until.map_or(linger, |u| u.min(linger)));
            }
            if until.is_some_and(|u| now >= u) {
                return Exit::Until;
            }
            let deadline = match (machine.poll_timeout(), until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if deadline != self.armed {
                R::reset(self.timer.as_mut(), deadline.unwrap_or_else(far_future));
                self.armed = deadline;
            }

            self.commands_first = !self.commands_first;
            let commands_first = self.commands_first;
            let wake = poll_fn(|cx| {
                if let Some(s) = stream.as_deref_mut() {
                    if self.written < self.write_buf.len() {
                        match Pin::new(&mut *s).poll_write(cx, &self.write_buf[self.written..]) {
                            Poll::Ready(Ok(0)) => return Poll::Ready(Wake::Eof(None)),
                            Poll::Ready(Ok(n)) => return Poll::Ready(Wake::Wrote(n)),
                            Poll::Ready(Err(e)) => return Poll::Ready(Wake::Eof(Some(e))),
                            Poll::Pending => {}
                        }
                    }
                }
                if commands_first {
                    if let Poll::Ready(wake) = self.poll_command(cx, commands) {
                        return Poll::Ready(wake);
                    }
                }
                if let Some(s) = stream.as_deref_mut() {
                    match Pin::new(&mut *s).poll_read(cx, &mut self.read_buf) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Wake::Eof(None)),
                        Poll::Ready(Ok(n)) => return Poll::Ready(Wake::Read(n)),
                        Poll::Ready(Err(e)) => return Poll::Ready(Wake::Eof(Some(e))),
                        Poll::Pending => {}
                    }
                }
                if !commands_first {
                    if let Poll::Ready(wake) = self.poll_command(cx, commands) {
                        return Poll::Ready(wake);
                    }
                }
                if self.armed.is_some() && self.timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
                Poll::Pending
            })
            .await;

            let now = Instant::now();
            match wake {
                Wake::Read(n) => machine.handle_input(now, &self.read_buf[..n]),
                Wake::Wrote(n) => self.written += n,
                Wake::Eof(error) => {
                    match error {
                        Some(error) => tracing::debug!(%error, "socket failed"),
                        None => tracing::debug!("socket closed by peer"),
                    }
                    machine.handle_eof(now);
                    handler.on_wake(machine, now);
                    return Exit::Io;
                }
                Wake::Command(command) => {
                    handler.on_command(machine, now, command);
                    // Take every command already queued, so they leave in one write.
                    for _ in 0..COMMAND_BATCH {
                        match commands.try_recv() {
                            Ok(command) => handler.on_command(machine, now, command),
                            Err(mpsc::TryRecvError::Closed) => {
                                self.handles_open = false;
                                handler.on_handles_dropped(machine, now);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
                Wake::HandlesDropped => {
                    self.handles_open = false;
                    handler.on_handles_dropped(machine, now);
                }
                Wake::Timer => {
                    self.armed = None;
                    machine.handle_timeout(now);
                }
            }
        }
    }

    fn poll_command<C>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        commands: &mut mpsc::Receiver<C>,
    ) -> Poll<Wake<C>> {
        if !self.handles_open {
            return Poll::Pending;
        }
        match commands.poll_next_unpin(cx) {
            Poll::Ready(Some(c)) => Poll::Ready(Wake::Command(c)),
            Poll::Ready(None) => Poll::Ready(Wake::HandlesDropped),
            Poll::Pending => Poll::Pending,
        }
    }
}

enum Wake<C> {
    Read(usize),
    Wrote(usize),
    Eof(Option<io::Error>),
    Command(C),
    HandlesDropped,
    Timer,
}

/// A deadline that never comes, for a timer with nothing to time.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// `after` from now; a user-given duration too large for an `Instant` (`Duration::MAX`) means
/// "not in the life of this process" rather than a panic.
pub(crate) fn deadline_in(after: Duration) -> Instant {
    Instant::now().checked_add(after).unwrap_or_else(far_future)
}

#[cfg(test)]
mod tests {
    //! The loop's fairness, over a socket that is always readable (a saturating flood).

    use std::task::Context;

    use futures_util::task::noop_waker;

    use super::*;

    /// A runtime whose socket never runs dry and whose timer is a clock check.
    struct Flood;

    /// Always readable (heartbeat-sized chunks), always writable.
    struct FloodStream;

    impl futures_io::AsyncRead for FloodStream {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(8);
            buf[..n].fill(0);
            Poll::Ready(Ok(n))
        }
    }

    impl futures_io::AsyncWrite for FloodStream {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct ClockSleep(Instant);

    impl Future for ClockSleep {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if Instant::now() >= self.0 {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    impl Runtime for Flood {
        type Tcp = FloodStream;
        type Stream = crate::Stream<FloodStream>;
        type Sleep = ClockSleep;
        fn resolve(
            _host: &str,
            _port: u16,
        ) -> Pin<Box<dyn Future<Output = io::Result<Vec<std::net::SocketAddr>>> + Send>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn connect(
            _address: std::net::SocketAddr,
        ) -> Pin<Box<dyn Future<Output = io::Result<Self::Tcp>> + Send>> {
            Box::pin(async { Ok(FloodStream) })
        }
        fn sleep_until(deadline: Instant) -> Self::Sleep {
            ClockSleep(deadline)
        }
        fn reset(mut sleep: Pin<&mut Self::Sleep>, deadline: Instant) {
            sleep.0 = deadline;
        }
        fn spawn<F: Future<Output = ()> + Send + 'static>(_future: F) {}
    }

    /// A machine with one timer, due shortly after the start.
    struct Timed {
        due: Option<Instant>,
        fired: bool,
        bytes_in: usize,
    }

    impl Machine for Timed {
        type Event = ();
        fn poll_event(&mut self) -> Option<()> {
            None
        }
        fn handle_input(&mut self, _now: Instant, bytes: &[u8]) {
            self.bytes_in += bytes.len();
        }
        fn handle_eof(&mut self, _now: Instant) {}
        fn handle_timeout(&mut self, now: Instant) {
            if self.due.is_some_and(|d| now >= d) {
                self.due = None;
                self.fired = true;
            }
        }
        fn poll_transmit(&mut self, _now: Instant, _buf: &mut Vec<u8>) -> usize {
            0
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.due
        }
        fn is_closed(&self) -> bool {
            false
        }
    }

    /// Counts commands; stops the loop (through `finished`) once the timer fired.
    struct Commands(usize);

    impl Handler<Timed> for Commands {
        type Command = ();
        fn on_wake(&mut self, _machine: &mut Timed, _now: Instant) {}
        fn on_command(&mut self, _machine: &mut Timed, _now: Instant, _command: ()) {
            self.0 += 1;
        }
        fn on_handles_dropped(&mut self, _machine: &mut Timed, _now: Instant) {}
        fn finished(&self, _machine: &Timed) -> bool {
            false
        }
    }

    /// Polls `future` until it completes; everything here is always ready or a clock check.
    fn block_on<F: Future>(future: F) -> F::Output {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }

    #[test]
    fn timers_and_commands_are_served_under_a_read_flood() {
        let start = Instant::now();
        let mut machine = Timed {
            due: Some(start + Duration::from_millis(20)),
            fired: false,
            bytes_in: 0,
        };
        let (mut tx, mut rx) = mpsc::channel(16);
        for _ in 0..10 {
            tx.try_send(()).expect("room for ten commands");
        }
        let mut handler = Commands(0);
        let mut io = Loop::<Flood>::new();
        let mut stream = crate::Stream::plain(FloodStream);
        // The loop runs until `until` (2 s) unless the flood starves nothing; then the check
        // below ends it early by construction: the machine's timer is its only deadline.
        let exit = block_on(io.drive(
            Some(&mut stream),
            Some(start + Duration::from_secs(2)),
            &mut machine,
            &mut rx,
            &mut handler,
        ));
        assert!(matches!(exit, Exit::Until), "{exit:?}");
        assert!(machine.bytes_in > 0, "the flood was read");
        assert!(machine.fired, "the timer never fired under the flood");
        assert_eq!(handler.0, 10, "commands starved under the flood");
    }
}
