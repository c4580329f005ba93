//! The Fibonacci RPC server on smol. `cargo run -p transport-smol --bin smol-server`
use std::process::ExitCode;

fn main() -> ExitCode {
    amqp_rpc_cli::with_args(|args: amqp_rpc_cli::ServerArgs| {
        let threads = args.runtime.threads;
        transport_smol::run_program(
            threads,
            amqp_rpc_cli::server_main::<transport_smol::Smol>(
                args,
                transport_smol::shutdown_signal(),
            ),
        )
    })
}
