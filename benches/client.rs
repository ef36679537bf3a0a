//! One client request end to end on loopback: [`AspenClient`] → QUIC → an in-process single
//! node (real bootstrap, endpoint, Raft and redb in a temp dir) → reply. One request in flight
//! at a time, so this is latency: `put` (Raft commit with fsync, then apply), linearizable `get`
//! (ReadIndex on the leader) and stale `get` (local read).
//!
//! Run with `cargo bench --bench client`. For throughput under concurrency use
//! `aspen-cli bench`.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use aspen::{
    api::{BatchOp, ReadConsistency},
    cluster::bootstrap_node,
    AspenClient, NodeConfig,
};
use criterion::{criterion_group, criterion_main, Criterion};

const KEYS: u64 = 1_000;

fn client(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = NodeConfig {
        data_dir: dir.path().join("node-1"),
        // Port 0: the ticket carries the port actually bound.
        bind_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Default::default()
    };
    let node = rt.block_on(bootstrap_node(config)).expect("node starts");
    let client = rt
        .block_on(AspenClient::connect(vec![node.ticket()], Duration::from_secs(30)))
        .expect("client endpoint")
        .with_token(node.admin_token().expect("admin.token"));
    // Wait until the fresh node has elected itself, then write every key the gets ask for.
    rt.block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while node.shard0.leader().is_none() {
            assert!(std::time::Instant::now() < deadline, "the node elected no leader within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for first in (0..KEYS).step_by(100) {
            let ops = (first..first + 100).map(|i| BatchOp::Put { key: key(i), value: vec![b'v'; 256] }).collect();
            client.batch(ops).await.expect("prefill batch");
        }
    });

    let mut group = c.benchmark_group("client");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let next = AtomicU64::new(0);
    group.bench_function("put", |b| {
        b.to_async(&rt).iter(|| async {
            let i = next.fetch_add(1, Ordering::Relaxed) % KEYS;
            client.put(key(i), vec![b'w'; 256]).await.expect("put")
        })
    });
    for (name, consistency) in
        [("get_linearizable", ReadConsistency::Linearizable), ("get_stale", ReadConsistency::Stale)]
    {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let i = next.fetch_add(1, Ordering::Relaxed) % KEYS;
                let kv = client.get_with(key(i), consistency).await.expect("get");
                assert!(kv.is_some(), "key {i} was written");
            })
        });
    }
    group.finish();
    rt.block_on(async {
        client.close().await;
        node.shutdown().await;
    });
}

fn key(i: u64) -> Vec<u8> {
    format!("bench/{i:08}").into_bytes()
}

criterion_group!(benches, client);
criterion_main!(benches);
