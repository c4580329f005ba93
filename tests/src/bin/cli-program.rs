//! The programs of amqp-rpc-cli (the transports' `server`/`bench` bins and smol's), built in this
//! crate so that tests can start them by `CARGO_BIN_EXE_cli-program`: `E2E_PROGRAM` says which
//! (`server`, the default, or `bench`), `E2E_TRANSPORT` on which runtime (`tokio`, the default,
//! or `smol`); the rest of the command line is the program's own.

use std::process::ExitCode;

use e2e_tests::rt::{Smol, TestRuntime, Tokio};

fn main() -> ExitCode {
    let smol = std::env::var("E2E_TRANSPORT").as_deref() == Ok("smol");
    match (std::env::var("E2E_PROGRAM").as_deref(), smol) {
        (Ok("bench"), true) => Smol::block_on(amqp_rpc_cli::bench_main::<transport_smol::Smol>()),
        (Ok("bench"), false) => {
            Tokio::block_on(amqp_rpc_cli::bench_main::<transport_tokio::Tokio>())
        }
        (_, true) => Smol::block_on(amqp_rpc_cli::server_main::<transport_smol::Smol>(
            transport_smol::shutdown_signal(),
        )),
        (_, false) => Tokio::block_on(amqp_rpc_cli::server_main::<transport_tokio::Tokio>(
            transport_tokio::shutdown_signal(),
        )),
    }
}
