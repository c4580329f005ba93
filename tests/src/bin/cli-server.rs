//! The `server` program of amqp-rpc-cli (the transports' `server` and `smol-server` bins), built
//! in this crate so that tests can start it by `CARGO_BIN_EXE_cli-server`: the runtime is
//! `E2E_TRANSPORT` (`tokio`, the default, or `smol`), the rest of the command line is the
//! program's own.

use std::process::ExitCode;

use e2e_tests::rt::{Smol, TestRuntime, Tokio};

fn main() -> ExitCode {
    match std::env::var("E2E_TRANSPORT").as_deref() {
        Ok("smol") => Smol::block_on(amqp_rpc_cli::server_main::<transport_smol::Smol>(
            transport_smol::shutdown_signal(),
        )),
        _ => Tokio::block_on(amqp_rpc_cli::server_main::<transport_tokio::Tokio>(
            transport_tokio::shutdown_signal(),
        )),
    }
}
