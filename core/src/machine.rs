//! The driving contract every machine of this crate shares, as a trait, so that one driver loop
//! can run any of them over any runtime.

use std::time::Instant;

use crate::connection::{Connection, Event};
use crate::rpc::{ClientEvent, RpcClient, RpcServer, ServerEvent};

/// A sans-IO machine: bytes and time in, bytes and timer deadlines out.
///
/// Drive it like this (the crate docs show a whole loop):
/// 1. after any input or command, drain its events ([`Machine::poll_event`]);
/// 2. when the driver's write buffer is empty, say so with [`Machine::handle_transmitted`]
///    (then drain events again), and refill it with [`Machine::poll_transmit`] — this is the
///    backpressure: bytes the socket has not taken stay in the machine, where callers can see
///    them. `poll_transmit` only hands bytes over; it changes no other state;
/// 3. re-arm the timer from [`Machine::poll_timeout`] last, and call
///    [`Machine::handle_timeout`] when it fires.
pub trait Machine {
    /// What the machine reports to its driver.
    type Event;

    /// Bytes read from the socket.
    fn handle_input(&mut self, now: Instant, bytes: &[u8]);
    /// The socket reached EOF or failed.
    fn handle_eof(&mut self, now: Instant);
    /// The timer from [`Machine::poll_timeout`] fired (late is fine, early is harmless).
    fn handle_timeout(&mut self, now: Instant);
    /// The driver's write buffer is empty: every byte [`Machine::poll_transmit`] gave was
    /// written. A machine that holds work back for room (the RPC client's held calls) queues
    /// it now. The default does nothing.
    fn handle_transmitted(&mut self, now: Instant) {
        let _ = now;
    }
    /// Appends bytes to send; returns how many. Only drains: no other state changes.
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> usize;
    /// When to call [`Machine::handle_timeout`] next.
    fn poll_timeout(&self) -> Option<Instant>;
    /// The next event, if any. Drain them after every input, timeout and command.
    fn poll_event(&mut self) -> Option<Self::Event>;
    /// Whether the connection is closed: once the write buffer is flushed, drop the socket.
    fn is_closed(&self) -> bool;
}

macro_rules! impl_machine {
    ($ty:ty, $event:ty, $conn:ident => $closed:expr $(, $transmitted:ident)?) => {
        impl Machine for $ty {
            type Event = $event;
            $(
                fn $transmitted(&mut self, now: Instant) {
                    <$ty>::$transmitted(self, now)
                }
            )?

            fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
                <$ty>::handle_input(self, now, bytes)
            }
            fn handle_eof(&mut self, now: Instant) {
                <$ty>::handle_eof(self, now)
            }
            fn handle_timeout(&mut self, now: Instant) {
                <$ty>::handle_timeout(self, now)
            }
            fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> usize {
                <$ty>::poll_transmit(self, now, buf)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                <$ty>::poll_timeout(self)
            }
            fn poll_event(&mut self) -> Option<$event> {
                <$ty>::poll_event(self)
            }
            fn is_closed(&self) -> bool {
                let $conn = self;
                $closed
            }
        }
    };
}

impl_machine!(Connection, Event, c => c.is_closed());
impl_machine!(RpcClient, ClientEvent, c => c.connection().is_closed(), handle_transmitted);
impl_machine!(RpcServer, ServerEvent, s => s.connection().is_closed());
