//! One simulation harness for amqp-rpc-core, shared by the core's integration tests, its
//! proptests and the cargo-fuzz targets in `fuzz/`. Nothing here touches a socket or sleeps:
//! bytes move through memory and time is virtual; the only clock read is [`t0`].
//!
//! - [`frames`]: server-side frame builders, encoded by amq-protocol (not by the code under test).
//! - [`Sim`] and [`ScriptedBroker`]: one client machine against a broker the test scripts frame
//!   by frame (connection-level tests).
//! - [`broker::Broker`]: an in-memory RabbitMQ-like broker (queues, consumers, prefetch, direct
//!   reply-to, exclusive queues, TTL) that any number of clients talk to.
//! - [`rpc`]: wires RPC clients and servers to that broker ([`rpc::Wire`]), moves bytes until
//!   nothing moves ([`rpc::settle`]) and advances time from timer to timer ([`rpc::advance`]).
//! - [`fuzz`]: the fuzz scenario drivers; each cargo-fuzz target is one call into them, so a
//!   crash reproduces from a test too.
//!
//! It is a test harness: a failed check panics, which is how a test or a fuzz target fails.

// A panic is this crate's way to report a failed check, so `unwrap`/`expect` are assertions.
#![allow(clippy::unwrap_used)]

pub mod broker;
pub mod frames;
pub mod fuzz;
pub mod rpc;
mod scripted;

use std::time::Instant;

pub use scripted::{
    Chunking, HandshakeScript, HandshakeTranscript, ScriptedBroker, Sim, SimClient,
};

/// The base instant of a simulation. The core never reads the clock; the harness reads it once
/// here and adds virtual durations to it.
#[allow(clippy::disallowed_methods)]
pub fn t0() -> Instant {
    Instant::now()
}

/// One step of xorshift64 (Marsaglia): the harness's only randomness, deterministic so that a
/// failure replays from its seed. `state` must not be zero.
pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
