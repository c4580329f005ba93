//! Simulation harness for the RPC machines: each machine is wired to a connection of the
//! in-memory [`Broker`], bytes are moved until nothing moves, and virtual time advances from
//! timer to timer so that every deadline fires at its exact instant.

use std::time::{Duration, Instant};

use amqp_rpc_core::rpc::{
    CallId, ClientConfig, ClientEvent, CorrelationKey, ReplyMode, RpcClient, RpcReply, RpcServer,
    ServerConfig, ServerEvent, UnixMillis,
};
use amqp_rpc_core::{ConnectionConfig, Machine, RpcError};

use crate::broker::{Broker, ConnId};

/// A real instant to start virtual time from (the same as [`crate::t0`]).
pub use crate::t0 as base_instant;

/// A fixed wall-clock origin (2024-01-01T00:00:00Z) so that deadline headers are reproducible.
pub const WALL0: u64 = 1_704_067_200_000;

/// The correlation key of simulated clients: fixed, so that runs replay exactly.
pub fn sim_key() -> CorrelationKey {
    CorrelationKey::from_bytes([0x5a; 32])
}

/// Connection settings for the simulation: heartbeats off (the broker tunes them off too).
pub fn conn_config() -> ConnectionConfig {
    let mut config = ConnectionConfig::default();
    config.heartbeat = Duration::ZERO;
    config
}

/// A machine and its broker connection.
#[derive(Debug)]
pub struct Wire<M> {
    /// The machine under test.
    pub m: M,
    /// Its connection on the broker (a new one after each [`Wire::redial`]).
    pub conn: ConnId,
    /// Whether the socket is up (false after EOF until [`Wire::redial`]).
    pub up: bool,
    /// Feed broker bytes in chunks of at most this size (a fault knob: any split must work).
    pub chunk: Option<usize>,
}

impl<M: Machine> Wire<M> {
    /// Wires `m` to a new connection on `broker`.
    pub fn new(m: M, broker: &mut Broker) -> Self {
        Self {
            m,
            conn: broker.connect(),
            up: true,
            chunk: None,
        }
    }

    /// A new socket to the broker (after the machine's `reconnect`).
    pub fn redial(&mut self, broker: &mut Broker) {
        self.conn = broker.connect();
        self.up = true;
    }
}

/// One step of moving bytes between a wire and the broker.
pub trait Step {
    /// Moves what is ready both ways; returns whether anything moved.
    fn step(&mut self, broker: &mut Broker, now: Instant) -> bool;
    /// Fires the machine's timer if due at `now`.
    fn fire(&mut self, now: Instant);
    /// The machine's next timer.
    fn next_deadline(&self) -> Option<Instant>;
}

impl<M: Machine> Step for Wire<M> {
    fn step(&mut self, broker: &mut Broker, now: Instant) -> bool {
        if !self.up {
            // A machine whose socket is down still produces bytes nobody reads; drop them.
            let mut sink = Vec::new();
            self.m.poll_transmit(now, &mut sink);
            return false;
        }
        let mut moved = false;
        let mut buf = Vec::new();
        // This wire's socket takes every byte at once: its write buffer is always empty.
        self.m.handle_transmitted(now);
        if self.m.poll_transmit(now, &mut buf) > 0 {
            moved = true;
            broker.feed(self.conn, now, &buf);
        }
        let out = broker.take_output(self.conn);
        if !out.is_empty() {
            moved = true;
            match self.chunk {
                Some(n) => {
                    for piece in out.chunks(n.max(1)) {
                        self.m.handle_input(now, piece);
                    }
                }
                None => self.m.handle_input(now, &out),
            }
        }
        if broker.is_dead(self.conn) {
            self.m.handle_eof(now);
            self.up = false;
            moved = true;
        }
        moved
    }

    fn fire(&mut self, now: Instant) {
        if self.m.poll_timeout().is_some_and(|d| d <= now) {
            self.m.handle_timeout(now);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.m.poll_timeout()
    }
}

/// Moves bytes until nothing moves.
pub fn settle(broker: &mut Broker, now: Instant, wires: &mut [&mut dyn Step]) {
    for _ in 0..10_000 {
        let mut moved = false;
        for w in wires.iter_mut() {
            moved |= w.step(broker, now);
        }
        if !moved {
            return;
        }
    }
    panic!("the simulation does not settle (a message loop?)");
}

/// Advances virtual time from `*now` to `to`, stopping at every timer on the way: each machine
/// whose timer is due runs `handle_timeout` at that exact instant, then bytes settle.
/// `on_step` runs after each stop with the stop's instant (to check what happened exactly then).
pub fn advance(
    broker: &mut Broker,
    now: &mut Instant,
    to: Instant,
    wires: &mut [&mut dyn Step],
    mut on_step: impl FnMut(Instant, &mut [&mut dyn Step]),
) {
    for _ in 0..100_000 {
        let next = wires.iter().filter_map(|w| w.next_deadline()).min();
        match next {
            Some(t) if t <= to => {
                // A timer in the past runs now; time never goes backwards.
                let t = t.max(*now);
                *now = t;
                broker.tick(t);
                for w in wires.iter_mut() {
                    w.fire(t);
                }
                settle(broker, t, wires);
                on_step(t, wires);
                if wires.iter().filter_map(|w| w.next_deadline()).min() == Some(t) {
                    // Still due after handle_timeout at the same instant: the timer is stuck.
                    panic!("a timer stays due at the instant it fired");
                }
            }
            _ => {
                *now = to.max(*now);
                broker.tick(*now);
                settle(broker, *now, wires);
                return;
            }
        }
    }
    panic!("too many timer stops");
}

/// Wall-clock milliseconds matching virtual instant `now`.
pub fn wall(base: Instant, now: Instant) -> UnixMillis {
    UnixMillis(WALL0 + u64::try_from((now - base).as_millis()).expect("test time fits"))
}

/// A client config for the simulation.
pub fn client_config(mode: ReplyMode) -> ClientConfig {
    let mut config = ClientConfig::default();
    config.reply_mode = mode;
    config
}

/// Drains a client's events.
pub fn client_events(c: &mut RpcClient) -> Vec<ClientEvent> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

/// How a call ended, as the client's `CallEnded` event said.
pub type CallEnd = (CallId, Result<RpcReply, RpcError>);

/// Drains a client's events: each `CallEnded` is appended to `ended` (a call must end at most
/// once, so one already there fails the test); the other events are returned in order.
pub fn collect_call_ends(client: &mut RpcClient, ended: &mut Vec<CallEnd>) -> Vec<ClientEvent> {
    let mut other = Vec::new();
    for event in client_events(client) {
        match event {
            ClientEvent::CallEnded { call, result } => {
                assert!(
                    ended.iter().all(|(c, _)| *c != call),
                    "{call:?} ended twice"
                );
                ended.push((call, result));
            }
            event => other.push(event),
        }
    }
    other
}

/// Drains a server's events.
pub fn server_events(s: &mut RpcServer) -> Vec<ServerEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// A server config for `queue` with `prefetch`.
pub fn server_config(queue: &str, prefetch: u16) -> ServerConfig {
    let mut config = ServerConfig::new(queue);
    config.prefetch = prefetch;
    config
}
