//! The Fibonacci RPC server on tokio. `cargo run -p transport-tokio --bin server -- --help`
use std::process::ExitCode;

fn main() -> ExitCode {
    transport_tokio::run_program(
        amqp_rpc_cli::threads_hint(),
        amqp_rpc_cli::server_main::<transport_tokio::Tokio>(transport_tokio::shutdown_signal()),
    )
}
