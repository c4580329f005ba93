//! The programs of amqp-rpc-cli (the transports' `server`/`bench` bins and smol's), built in this
//! crate so that tests can start them by `CARGO_BIN_EXE_cli-program`: `E2E_PROGRAM` says which
//! (`server`, the default, or `bench`), `E2E_TRANSPORT` on which runtime (`tokio`, the default,
//! or `smol`); the rest of the command line is the program's own.

use std::process::ExitCode;

use e2e_tests::rt::{Smol, TestRuntime, Tokio};

fn main() -> ExitCode {
    use amqp_rpc_cli::{bench_main, server_main, with_args, BenchArgs, ServerArgs};
    let smol = std::env::var("E2E_TRANSPORT").as_deref() == Ok("smol");
    match (std::env::var("E2E_PROGRAM").as_deref(), smol) {
        (Ok("bench"), true) => {
            with_args(|args: BenchArgs| Smol::block_on(bench_main::<transport_smol::Smol>(args)))
        }
        (Ok("bench"), false) => {
            with_args(|args: BenchArgs| Tokio::block_on(bench_main::<transport_tokio::Tokio>(args)))
        }
        (_, true) => with_args(|args: ServerArgs| {
            Smol::block_on(server_main::<transport_smol::Smol>(
                args,
                transport_smol::shutdown_signal(),
            ))
        }),
        (_, false) => with_args(|args: ServerArgs| {
            Tokio::block_on(server_main::<transport_tokio::Tokio>(
                args,
                transport_tokio::shutdown_signal(),
            ))
        }),
    }
}
