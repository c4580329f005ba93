//! Measures calls/s and latency against the running server on smol:
//! `cargo run --release -p transport-smol --bin smol-bench -- --concurrency 64`
use std::process::ExitCode;

fn main() -> ExitCode {
    smol::block_on(amqp_rpc_cli::bench_main::<transport_smol::Smol>())
}
