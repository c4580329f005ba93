//! The fuzz scenario drivers. Each takes the fuzzer's bytes and panics when a check fails; the
//! cargo-fuzz targets in `fuzz/fuzz_targets/` are one call each, and `fuzz/README.md` describes
//! what each checks.

mod connection;
mod frames;
mod rpc;

pub use connection::connection;
pub use frames::frames;
pub use rpc::rpc;
