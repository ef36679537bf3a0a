//! What recording metrics costs on the request path (docs/operations.md, "Metrics"): the work
//! the client protocol handler does per request (find the kind's counters, count the outcome,
//! observe the latency: two clock reads), and what a shard does per proposed entry and per
//! apply. Compare with the CPU per operation of `aspen-compare` (benches/RESULTS.md).
//! Run with `cargo bench --bench metrics`.

use std::{sync::Arc, time::Instant};

use aspen::metrics::{Histogram, NodeMetrics, ShardMetrics};
use criterion::{criterion_group, criterion_main, Criterion};

fn metrics(c: &mut Criterion) {
    let node = NodeMetrics::new(Arc::new(Histogram::durations()));
    // The kinds a busy node has seen (the map the handler looks a kind up in).
    for op in ["get", "put", "delete", "cas", "batch", "txn", "scan", "lease_keepalive", "cluster status"] {
        node.op("client", op);
        node.op("peer", op);
    }
    let shard = ShardMetrics::default();
    let mut group = c.benchmark_group("metrics");
    group.bench_function("request", |b| {
        b.iter(|| {
            let started = Instant::now();
            node.forwarded(std::hint::black_box(0));
            node.op("client", std::hint::black_box("put")).record(started, Ok(()));
        })
    });
    group.bench_function("request_with_stream_gauge", |b| {
        b.iter(|| {
            let _open = node.stream("client");
            let started = Instant::now();
            node.op("client", std::hint::black_box("get")).record(started, Ok(()));
        })
    });
    group.bench_function("entry_proposed_and_applied", |b| {
        b.iter(|| {
            let started = Instant::now();
            shard.proposals.inc();
            shard.writes_per_entry.observe(std::hint::black_box(20));
            shard.apply.observe_since(started);
        })
    });
    group.finish();
}

criterion_group!(benches, metrics);
criterion_main!(benches);
