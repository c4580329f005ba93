//! The `server`, `client` and `bench` programs of amqp-rpc, written once for every runtime: each
//! transport's `src/bin/*.rs` is a few lines that call [`server_main`], [`client_main`] or
//! [`bench_main`] with its [`Runtime`](amqp_rpc_driver::Runtime) (the server and the bench
//! with their arguments, parsed by [`with_args`] first: `--threads` picks the runtime).
//!
//! The transports depend on this crate only through their default `cli` feature, which builds
//! their programs; a library user of a transport sets `default-features = false` and gets none
//! of it (no clap, no tracing-subscriber).
//!
//! One file per program ([`mod@server`], [`mod@client`], [`mod@bench`]), each with its clap arguments; the
//! flags they share in [`args`]; the Fibonacci service that the programs, the tests and the
//! examples all use in [`mod@fib`].
#![deny(missing_docs)]

pub mod args;
pub mod bench;
pub mod client;
pub mod cpu;
pub mod fib;
pub mod latency;
mod logging;
pub mod payload;
pub mod plot;
pub mod prometheus;
pub mod server;

pub use args::{with_args, RuntimeArgs};
pub use bench::{bench_main, BenchArgs};
pub use client::{client_main, ClientArgs};
pub use fib::{fib, fib_handler, fib_reply, FIB_MAX};
pub use payload::echo_handler;
pub use server::{server_main, ServerArgs};
