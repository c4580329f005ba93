//! Measures calls/s and latency against the running server on smol:
//! `cargo run --release -p transport-smol --bin smol-bench -- --concurrency 64`
use std::process::ExitCode;

fn main() -> ExitCode {
    let threads = amqp_rpc_cli::threads_hint();
    if threads > 0 {
        // smol reads SMOL_THREADS once, when its executor starts at the first spawn; this is
        // before that, and before any other thread exists, so setting it is sound.
        std::env::set_var("SMOL_THREADS", threads.to_string());
    }
    smol::block_on(amqp_rpc_cli::bench_main::<transport_smol::Smol>())
}
