//! Storage of one shard, without Raft or network:
//! - `log_append`: [`RedbLogStore`] append of 1 / 16 / 256 entries (256-byte put values), each
//!   append one fsync'd redb transaction, timed until openraft would be told it is durable;
//! - `apply`: [`RedbStateMachine`] apply of 1 / 16 / 256 put entries (one redb commit without
//!   fsync per call, as in the node);
//! - `apply_command`: 16 entries of one write each, as a plain `Put` and as the etcd API's
//!   one-op `KvTxn` put (what a put costs through each).
//!
//! Run with `cargo bench --bench storage`. Throughput is in entries per second.

use std::time::{Duration, Instant};

use aspen::{
    api::raft::{Entry, LogId, WriteRequest},
    api::{Id128, KvOp, KvPut, KvTxn, WriteCommand, WriteSession},
    storage::{RedbLogStore, RedbStateMachine},
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use openraft::{
    storage::{RaftLogStorageExt, RaftStateMachine},
    CommittedLeaderId, EntryPayload,
};

const BATCHES: [u64; 3] = [1, 16, 256];
const VALUE_BYTES: usize = 256;

/// A put of a 256-byte value at `index`, by a client session of its own.
fn put_entry(index: u64) -> Entry {
    entry(index, false)
}

/// A put of a 256-byte value at `index` (as a one-op `KvTxn` with `txn`), by a client session
/// of its own.
fn entry(index: u64, txn: bool) -> Entry {
    let mut id = [0xAB; 16];
    id[8..].copy_from_slice(&index.to_be_bytes());
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(
            WriteRequest {
                session: WriteSession { client_id: Id128(id), seq: 1 },
                command: {
                    let (key, value) = (format!("key/{index:010}").into_bytes(), vec![b'v'; VALUE_BYTES]);
                    if txn {
                        let put =
                            KvPut { key, value, lease: 0, prev_kv: false, ignore_value: false, ignore_lease: false };
                        WriteCommand::KvTxn { txn: KvTxn::op(KvOp::Put(put)), leases_checked: false }
                    } else {
                        WriteCommand::Put { key, value }
                    }
                },
                timestamp_ms: 1_000,
            }
            .into(),
        ),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

fn log_append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("log_append");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for len in BATCHES {
        // A fresh log per batch size, so that one size's file growth does not slow the next.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = RedbLogStore::open(
            &dir.path().join("raft-log.db"),
            1 << 20,
            aspen::config::StorageConfig::default().cache_split(1).log,
        )
        .expect("open log");
        let mut next = 1u64;
        group.throughput(Throughput::Elements(len));
        group.bench_function(BenchmarkId::from_parameter(len), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let entries: Vec<Entry> = (next..next + len).map(put_entry).collect();
                    next += len;
                    let start = Instant::now();
                    rt.block_on(store.blocking_append(entries)).expect("append");
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

/// A fresh state machine (the node's cache share for one shard).
fn open_sm(dir: &tempfile::TempDir) -> RedbStateMachine {
    RedbStateMachine::open(
        &dir.path().join("state-machine.db"),
        aspen::config::StorageConfig::default().cache_split(1).state_machine,
    )
    .expect("open state machine")
}

/// Times `sm.apply` of `len` entries made by `make` (log indexes from 1 on), per iteration.
fn bench_apply(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    len: u64,
    make: impl Fn(u64) -> Entry,
) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sm = open_sm(&dir);
    let mut next = 1u64;
    group.throughput(Throughput::Elements(len));
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let entries: Vec<Entry> = (next..next + len).map(&make).collect();
                next += len;
                let start = Instant::now();
                let results = rt.block_on(sm.apply(entries)).expect("apply");
                total += start.elapsed();
                assert_eq!(results.len() as u64, len);
            }
            total
        })
    });
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for len in BATCHES {
        bench_apply(&mut group, BenchmarkId::from_parameter(len), len, put_entry);
    }
    group.finish();
}

fn apply_command(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_command");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for (name, txn) in [("put", false), ("kv_txn_put", true)] {
        bench_apply(&mut group, BenchmarkId::from_parameter(name), 16, |i| entry(i, txn));
    }
    group.finish();
}

criterion_group!(benches, log_append, apply, apply_command);
criterion_main!(benches);
