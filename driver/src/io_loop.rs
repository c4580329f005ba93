//! The one driver loop (DESIGN §5): a task owns the socket and the machine and waits on four
//! things at once — readable bytes, a writable socket while bytes wait, a command from a user
//! handle, and the machine's timer. No protocol logic lives here.

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
                    match Pin::new(&mut *s).poll_read(cx, &mut self.read_buf) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Wake::Eof(None)),
                        Poll::Ready(Ok(n)) => return Poll::Ready(Wake::Read(n)),
                        Poll::Ready(Err(e)) => return Poll::Ready(Wake::Eof(Some(e))),
                        Poll::Pending => {}
                    }
                }
                if self.handles_open {
                    match commands.poll_next_unpin(cx) {
                        Poll::Ready(Some(c)) => return Poll::Ready(Wake::Command(c)),
                        Poll::Ready(None) => return Poll::Ready(Wake::HandlesDropped),
                        Poll::Pending => {}
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
