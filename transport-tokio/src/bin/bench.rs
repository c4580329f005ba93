//! Measures calls/s and latency against the running server on tokio.
use std::process::ExitCode;

fn main() -> ExitCode {
    transport_tokio::run_program(
        amqp_rpc_cli::threads_hint(),
        amqp_rpc_cli::bench_main::<transport_tokio::Tokio>(),
    )
}
