//! Measures calls/s and latency against the running server on smol:
//! `cargo run --release -p transport-smol --bin smol-bench -- --concurrency 64`
use std::process::ExitCode;

fn main() -> ExitCode {
    transport_smol::run_program(
        amqp_rpc_cli::threads_hint(),
        amqp_rpc_cli::bench_main::<transport_smol::Smol>(),
    )
}
