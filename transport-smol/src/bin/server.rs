//! The Fibonacci RPC server on smol. `cargo run -p transport-smol --bin smol-server`
use std::process::ExitCode;

fn main() -> ExitCode {
    smol::block_on(amqp_rpc_cli::server_main::<transport_smol::Smol>(
        transport_smol::shutdown_signal(),
    ))
}
