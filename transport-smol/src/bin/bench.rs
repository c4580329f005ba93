//! Measures calls/s and latency against the running server on smol.
use std::process::ExitCode;

fn main() -> ExitCode {
    smol::block_on(amqp_rpc_driver::bench_main::<transport_smol::Smol>())
}
