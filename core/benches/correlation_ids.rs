//! The cost of unforgeable correlation ids: issuing and verifying a keyed-MAC id (what the
//! client does per call) against the predictable `prefix.counter` ids it replaced.
//! `cargo bench -p amqp-rpc-core --bench correlation_ids`.

// A benchmark's setup may unwrap: a failure is a broken benchmark, not a user's input.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use amqp_rpc_core::rpc::{CallId, CorrelationKey};
use criterion::{criterion_group, criterion_main, Criterion};

fn ids(c: &mut Criterion) {
    let key = CorrelationKey::from_bytes([0x42; 32]);
    let mut group = c.benchmark_group("correlation id per call");
    let mut n = 0u64;
    group.bench_function("keyed MAC: issue + verify", |b| {
        b.iter(|| {
            n += 1;
            let id = key.issue(CallId(black_box(n)));
            black_box(key.verify(id.as_str()))
        })
    });
    let prefix = "3f2a9c4e5b6d7081920a1b2c3d4e5f60";
    let mut n = 0u64;
    group.bench_function("prefix.counter (before): format + parse", |b| {
        b.iter(|| {
            n += 1;
            let id = format!("{prefix}.{}", black_box(n));
            let parsed = id
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|rest| rest.parse::<u64>().ok());
            black_box(parsed)
        })
    });
    group.finish();
}

criterion_group!(benches, ids);
criterion_main!(benches);
