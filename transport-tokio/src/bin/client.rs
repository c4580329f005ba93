//! Asks the Fibonacci RPC server for fib(n) on tokio: `cargo run -p transport-tokio --bin client 30`
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    amqp_rpc_cli::client_main::<transport_tokio::Tokio>().await
}
