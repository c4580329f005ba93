//! The Fibonacci RPC server on tokio. `cargo run -p transport-tokio --bin server -- --help`
use std::process::ExitCode;

fn main() -> ExitCode {
    amqp_rpc_cli::with_args(|args: amqp_rpc_cli::ServerArgs| {
        let threads = args.runtime.threads;
        transport_tokio::run_program(
            threads,
            amqp_rpc_cli::server_main::<transport_tokio::Tokio>(
                args,
                transport_tokio::shutdown_signal(),
            ),
        )
    })
}
