//! Measures calls/s and latency against the running server on tokio.
use std::process::ExitCode;

fn main() -> ExitCode {
    amqp_rpc_cli::with_args(|args: amqp_rpc_cli::BenchArgs| {
        let threads = args.runtime.threads;
        transport_tokio::run_program(
            threads,
            amqp_rpc_cli::bench_main::<transport_tokio::Tokio>(args),
        )
    })
}
