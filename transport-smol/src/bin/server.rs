//! The Fibonacci RPC server on smol. `cargo run -p transport-smol --bin smol-server`
use std::process::ExitCode;

fn main() -> ExitCode {
    let threads = amqp_rpc_cli::threads_hint();
    if threads > 0 {
        // smol reads SMOL_THREADS once, when its executor starts at the first spawn; this is
        // before that, and before any other thread exists, so setting it is sound.
        std::env::set_var("SMOL_THREADS", threads.to_string());
    }
    smol::block_on(amqp_rpc_cli::server_main::<transport_smol::Smol>(
        transport_smol::shutdown_signal(),
    ))
}
