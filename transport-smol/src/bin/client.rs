//! Asks the Fibonacci RPC server for fib(n) on smol: `cargo run -p transport-smol --bin smol-client 30`
use std::process::ExitCode;

fn main() -> ExitCode {
    smol::block_on(amqp_rpc_cli::client_main::<transport_smol::Smol>())
}
