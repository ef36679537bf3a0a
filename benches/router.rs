//! Key router throughput: the stable hash alone, and hash + jump to 1, 4 and 256 shards.
//! Run with `cargo bench --bench router`.

use aspen::sharding::{stable_key_hash, ShardRouter};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn keys() -> Vec<Vec<u8>> {
    (0..1024).map(|i| format!("user/{i:08}/profile").into_bytes()).collect()
}

fn router(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("router");
    group.throughput(Throughput::Elements(keys.len() as u64));
    group.bench_function("stable_key_hash", |b| {
        b.iter(|| keys.iter().fold(0u64, |acc, k| acc ^ stable_key_hash(std::hint::black_box(k))))
    });
    for shards in [1u32, 4, 256] {
        let r = ShardRouter::new(shards);
        group.bench_with_input(BenchmarkId::new("shard_for_key", shards), &r, |b, r| {
            b.iter(|| keys.iter().fold(0u32, |acc, k| acc ^ r.shard_for_key(std::hint::black_box(k))))
        });
    }
    group.finish();
}

criterion_group!(benches, router);
criterion_main!(benches);
