//! The Fibonacci RPC server on smol. `cargo run -p transport-smol --bin smol-server`
use std::process::ExitCode;

fn main() -> ExitCode {
    transport_smol::run_program(
        amqp_rpc_cli::threads_hint(),
        amqp_rpc_cli::server_main::<transport_smol::Smol>(transport_smol::shutdown_signal()),
    )
}
