//! The `connection` scenario of `amqp_rpc_sim::fuzz` (see fuzz/README.md).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| amqp_rpc_sim::fuzz::connection(data));
