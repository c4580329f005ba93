//! The Fibonacci RPC server on tokio. `cargo run -p transport-tokio --bin server -- --help`
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    amqp_rpc_cli::server_main::<transport_tokio::Tokio>(transport_tokio::shutdown_signal()).await
}
