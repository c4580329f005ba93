//! Measures calls/s and latency against the running server on tokio.
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    amqp_rpc_cli::bench_main::<transport_tokio::Tokio>().await
}
