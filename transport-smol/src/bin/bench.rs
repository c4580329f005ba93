//! Measures calls/s and latency against the running server on smol:
//! `cargo run --release -p transport-smol --bin smol-bench -- --concurrency 64`
use std::process::ExitCode;

fn main() -> ExitCode {
    amqp_rpc_cli::with_args(|args: amqp_rpc_cli::BenchArgs| {
        let threads = args.runtime.threads;
        transport_smol::run_program(
            threads,
            amqp_rpc_cli::bench_main::<transport_smol::Smol>(args),
        )
    })
}
