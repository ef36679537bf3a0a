//! etcd-shaped key operations of the state machine (`api::kv`; docs/design.md §18): range reads
//! (on a read transaction and inside a txn), puts with their previous key, kept values and
//! leases, range deletes, compares on keys, ranges and leases — every one against the state
//! before the txn — nested txns at one revision, read-only txns, exactly-once retries, and
//! replays that agree.

use super::*;
use crate::api::{
    applied_revision, write_revision, CompareOp, EventKind, KeyRange, KeyRecord, KvCompare, KvCompareTarget, KvOp,
    KvOpResult, KvPut, KvTxn, PrevMeta, RangePage, RangeQuery, WatchEvent, RESERVED_PREFIX,
};

use crate::api::CompareOp::{Equal, Greater, Less, NotEqual};

/// A node's own step: no session to check or keep.
const NODE: WriteSession = WriteSession { client_id: Id128([0; 16]), seq: 0 };

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn kv_txn_cmd(txn: KvTxn, leases_checked: bool) -> WriteCommand {
    WriteCommand::KvTxn { txn, leases_checked }
}

/// A txn by a client of its own (one write per session), leases unchecked (as a client sends it).
fn kv_txn(index: u64, txn: KvTxn) -> Entry {
    normal(1, index, request(unique_client(index), 1, kv_txn_cmd(txn, false)))
}

/// A txn of session (`client_id`, `seq`).
fn kv_txn_as(index: u64, client_id: Id128, seq: u64, txn: KvTxn, leases_checked: bool) -> Entry {
    normal(1, index, request(client_id, seq, kv_txn_cmd(txn, leases_checked)))
}

/// A txn without a session (a node's own step).
fn node_txn(index: u64, txn: KvTxn) -> Entry {
    normal(1, index, WriteRequest { session: NODE, command: kv_txn_cmd(txn, false), timestamp_ms: 0 })
}

/// One entry carrying several writes.
fn multi(index: u64, writes: Vec<WriteRequest>) -> Entry {
    Entry { log_id: log_id(1, index), payload: EntryPayload::Normal(WriteBatch(writes)) }
}

/// A plain put of a key given as bytes.
fn raw(index: u64, key: &[u8], value: &[u8]) -> Entry {
    normal(1, index, request(unique_client(index), 1, WriteCommand::Put { key: key.to_vec(), value: value.to_vec() }))
}

fn grant(index: u64, id: u64, ttl_secs: u64) -> Entry {
    normal(1, index, request(unique_client(index), 1, WriteCommand::LeaseGrant { id, ttl_secs }))
}

fn revoke(index: u64, id: u64) -> Entry {
    normal(1, index, request(unique_client(index), 1, WriteCommand::LeaseRevoke { id }))
}

fn lease_drop(index: u64, id: u64) -> Entry {
    normal(1, index, WriteRequest { session: NODE, command: WriteCommand::LeaseDrop { id }, timestamp_ms: 0 })
}

/// A key of the cluster's reserved keyspace.
fn reserved(name: &str) -> Vec<u8> {
    [RESERVED_PREFIX, name.as_bytes()].concat()
}

fn single(key: &str) -> KeyRange {
    KeyRange::single(key)
}

/// `[key, end)`.
fn span(key: &str, end: &str) -> KeyRange {
    KeyRange { key: key.into(), end: Some(end.into()) }
}

/// Every key at or after `key`.
fn from_key(key: impl Into<Vec<u8>>) -> KeyRange {
    KeyRange { key: key.into(), end: Some(Vec::new()) }
}

fn prefix(p: impl Into<Vec<u8>>) -> KeyRange {
    KeyRange::prefix(p)
}

fn query(range: KeyRange) -> RangeQuery {
    RangeQuery::all(range)
}

fn kput(key: &str, value: &str) -> KvPut {
    KvPut { key: key.into(), value: value.into(), lease: 0, prev_kv: false, ignore_value: false, ignore_lease: false }
}

fn put_op(key: &str, value: &str) -> KvOp {
    KvOp::Put(kput(key, value))
}

fn range_op(q: RangeQuery) -> KvOp {
    KvOp::Range(q)
}

fn del_op(range: KeyRange, prev_kv: bool) -> KvOp {
    KvOp::DeleteRange { range, prev_kv }
}

fn cmp(range: KeyRange, op: CompareOp, target: KvCompareTarget) -> KvCompare {
    KvCompare { range, op, target }
}

fn txn_of(compares: Vec<KvCompare>, success: Vec<KvOp>, failure: Vec<KvOp>) -> KvTxn {
    KvTxn { compares, success, failure }
}

fn nested(compares: Vec<KvCompare>, success: Vec<KvOp>, failure: Vec<KvOp>) -> KvOp {
    KvOp::Txn(txn_of(compares, success, failure))
}

fn version(v: u64) -> KvCompareTarget {
    KvCompareTarget::Version(v)
}

fn value(v: &str) -> KvCompareTarget {
    KvCompareTarget::Value(v.into())
}

/// A key as the etcd API shows it; its revisions given as the log indexes of lone writes.
fn record(
    key: impl AsRef<[u8]>,
    value: &[u8],
    create_index: u64,
    mod_index: u64,
    version: u64,
    lease: u64,
) -> KeyRecord {
    KeyRecord {
        key: key.as_ref().to_vec(),
        value: value.to_vec(),
        create_revision: rev(create_index),
        mod_revision: rev(mod_index),
        version,
        lease,
    }
}

/// A record with its value left out (`keys_only`).
fn key_only(mut kr: KeyRecord) -> KeyRecord {
    kr.value = Vec::new();
    kr
}

fn page(kvs: Vec<KeyRecord>, count: u64, more: bool, revision: u64) -> RangePage {
    RangePage { kvs, count, more, revision }
}

fn read(r: &StateReader, q: &RangeQuery) -> RangePage {
    r.kv_range(q).expect("kv range")
}

fn done(revision: u64, succeeded: bool, results: Vec<KvOpResult>) -> WriteOutcome {
    WriteOutcome::KvTxn { revision, succeeded, results }
}

fn put_result(prev: Option<KeyRecord>) -> KvOpResult {
    KvOpResult::Put { prev }
}

fn deleted(count: u64, prev: Vec<KeyRecord>) -> KvOpResult {
    KvOpResult::DeleteRange { deleted: count, prev }
}

fn lease_keys(r: &StateReader, id: u64) -> Vec<Vec<u8>> {
    r.lease_keys(id).expect("lease keys")
}

/// The last applied index of the seeded state machine ([`seed`]).
const SEEDED: u64 = 7;

/// Writes `a`, `ab`, `abc`, `b`, `c` and a reserved key, one per entry (1..=7, `a` twice).
async fn seed(sm: &mut RedbStateMachine) {
    let entries = vec![
        put(1, 1, "a", b"a1"),
        put(1, 2, "ab", b"ab1"),
        put(1, 3, "abc", b"abc1"),
        put(1, 4, "b", b"b1"),
        put(1, 5, "c", b"c1"),
        raw(6, &reserved("token"), b"t"),
        put(1, 7, "a", b"a2"),
    ];
    apply(sm, entries).await;
}

/// A key of [`seed`] as it stands after it.
fn seeded(key: &str) -> KeyRecord {
    match key {
        "a" => record("a", b"a2", 1, 7, 2, 0),
        "ab" => record("ab", b"ab1", 2, 2, 1, 0),
        "abc" => record("abc", b"abc1", 3, 3, 1, 0),
        "b" => record("b", b"b1", 4, 4, 1, 0),
        "c" => record("c", b"c1", 5, 5, 1, 0),
        _ => panic!("{key} was not seeded"),
    }
}

fn seeded_all(keys: &[&str]) -> Vec<KeyRecord> {
    keys.iter().map(|k| seeded(k)).collect()
}

/// The reserved key of [`seed`].
fn token() -> KeyRecord {
    record(reserved("token"), b"t", 6, 6, 1, 0)
}

/// Applies a txn of one compare with empty branches at `*next` (then moved on): whether the
/// compare held. Such a txn writes nothing: it answers the revision before its own.
async fn holds(sm: &mut RedbStateMachine, next: &mut u64, compare: KvCompare) -> bool {
    let index = *next;
    *next += 1;
    match apply_write(sm, kv_txn(index, txn_of(vec![compare.clone()], vec![], vec![]))).await {
        WriteOutcome::KvTxn { revision, succeeded, results } => {
            assert_eq!((revision, results), (rev(index) - 1, vec![]), "{compare:?}");
            succeeded
        }
        other => panic!("a txn answered {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Range reads
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads_single_keys_prefixes_from_keys_and_spans() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    seed(&mut sm).await;
    let at = applied_revision(SEEDED);

    // One key: present, then missing.
    assert_eq!(read(&r, &query(single("a"))), page(seeded_all(&["a"]), 1, false, at));
    assert_eq!(read(&r, &query(single("zz"))), page(vec![], 0, false, at));
    assert_eq!(read(&r, &query(single("aa"))), page(vec![], 0, false, at), "no prefix match for a single key");

    // A prefix; every key from one on; [a, b).
    assert_eq!(read(&r, &query(prefix("a"))), page(seeded_all(&["a", "ab", "abc"]), 3, false, at));
    assert_eq!(read(&r, &query(prefix("ab"))), page(seeded_all(&["ab", "abc"]), 2, false, at));
    assert_eq!(read(&r, &query(from_key("ab"))), page(seeded_all(&["ab", "abc", "b", "c"]), 4, false, at));
    assert_eq!(read(&r, &query(from_key("bb"))), page(seeded_all(&["c"]), 1, false, at));
    assert_eq!(read(&r, &query(span("ab", "b"))), page(seeded_all(&["ab", "abc"]), 2, false, at));
    assert_eq!(read(&r, &query(span("a", "c"))), page(seeded_all(&["a", "ab", "abc", "b"]), 4, false, at));
    assert_eq!(read(&r, &query(span("ab", "abc"))), page(seeded_all(&["ab"]), 1, false, at), "end exclusive");
    // Ranges holding no key at all: [b, a), [b, b), beyond the last key.
    assert_eq!(read(&r, &query(span("b", "a"))), page(vec![], 0, false, at));
    assert_eq!(read(&r, &query(span("b", "b"))), page(vec![], 0, false, at));
    assert_eq!(read(&r, &query(from_key("d"))), page(vec![], 0, false, at));

    // A client's range over everything passes over the reserved keys, however it is spelled.
    let everything = page(seeded_all(&["a", "ab", "abc", "b", "c"]), 5, false, at);
    assert_eq!(read(&r, &query(from_key(""))), everything);
    assert_eq!(read(&r, &query(prefix(""))), everything);
    assert_eq!(read(&r, &query(from_key("\x00"))), everything, "a range starting before the reserved keys");
    assert_eq!(read(&r, &query(span("\x00", "\x01"))), page(vec![], 0, false, at));
    // The cluster's own reads start among the reserved keys and see them.
    assert_eq!(read(&r, &query(prefix(RESERVED_PREFIX))), page(vec![token()], 1, false, at));
    let mut own = vec![token()];
    own.extend(seeded_all(&["a", "ab", "abc", "b", "c"]));
    assert_eq!(read(&r, &query(from_key(RESERVED_PREFIX))), page(own, 6, false, at));
    assert_eq!(r.get(&reserved("token")).unwrap().map(|kv| kv.value), Some(b"t".to_vec()));

    // The revision a read reports is the applied one, whatever the last entry was.
    apply(&mut sm, vec![blank(1, SEEDED + 1)]).await;
    assert_eq!(read(&r, &query(single("a"))).revision, applied_revision(SEEDED + 1));
    assert_eq!(read(&r, &query(single("zz"))).revision, applied_revision(SEEDED + 1));
    let empty = tempfile::tempdir().unwrap();
    let nothing = open_sm(empty.path());
    assert_eq!(read(&nothing.reader(), &query(from_key(""))), page(vec![], 0, false, applied_revision(0)));

    // A prefix of 0xff bytes has no end: every key from it on.
    apply(&mut sm, vec![raw(SEEDED + 2, b"\xff", b"1"), raw(SEEDED + 3, b"\xff\xff\x01", b"2")]).await;
    let at = applied_revision(SEEDED + 3);
    let ff = record(b"\xff", b"1", SEEDED + 2, SEEDED + 2, 1, 0);
    let ffff = record(b"\xff\xff\x01", b"2", SEEDED + 3, SEEDED + 3, 1, 0);
    assert_eq!(read(&r, &query(prefix(b"\xff".to_vec()))), page(vec![ff.clone(), ffff.clone()], 2, false, at));
    assert_eq!(read(&r, &query(prefix(b"\xff\xff".to_vec()))), page(vec![ffff.clone()], 1, false, at));
    assert_eq!(read(&r, &query(from_key("c"))), page(vec![seeded("c"), ff, ffff], 3, false, at));
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_limit_count_more_paging_keys_only_count_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    seed(&mut sm).await;
    let at = applied_revision(SEEDED);

    // A limit cuts the keys, not the count: `more` says keys follow.
    let mut q = query(from_key(""));
    q.limit = 2;
    assert_eq!(read(&r, &q), page(seeded_all(&["a", "ab"]), 5, true, at));
    q.limit = 4;
    assert_eq!(read(&r, &q), page(seeded_all(&["a", "ab", "abc", "b"]), 5, true, at));
    q.limit = 5;
    assert_eq!(read(&r, &q), page(seeded_all(&["a", "ab", "abc", "b", "c"]), 5, false, at));
    q.limit = 6;
    assert_eq!(read(&r, &q), page(seeded_all(&["a", "ab", "abc", "b", "c"]), 5, false, at));
    let mut one = query(single("a"));
    one.limit = 1;
    assert_eq!(read(&r, &one), page(seeded_all(&["a"]), 1, false, at));

    // Paging: the keys after the last one seen, counted from there.
    q.limit = 2;
    q.after = Some(b"ab".to_vec());
    assert_eq!(read(&r, &q), page(seeded_all(&["abc", "b"]), 3, true, at));
    q.after = Some(b"b".to_vec());
    assert_eq!(read(&r, &q), page(seeded_all(&["c"]), 1, false, at));
    q.after = Some(b"c".to_vec());
    assert_eq!(read(&r, &q), page(vec![], 0, false, at));
    q.after = Some(b"zz".to_vec());
    assert_eq!(read(&r, &q), page(vec![], 0, false, at));
    q.after = Some(b"aa".to_vec());
    assert_eq!(read(&r, &q), page(seeded_all(&["ab", "abc"]), 4, true, at), "after a key that is not there");
    // `after` before the range's start reads the range from its start.
    let mut q = query(span("ab", "b"));
    q.after = Some(b"a".to_vec());
    assert_eq!(read(&r, &q), page(seeded_all(&["ab", "abc"]), 2, false, at));
    q.after = Some(b"ab".to_vec());
    assert_eq!(read(&r, &q), page(seeded_all(&["abc"]), 1, false, at));
    q.after = Some(b"abc".to_vec());
    assert_eq!(read(&r, &q), page(vec![], 0, false, at), "after the last key of the range");
    // A single key has no next page.
    let mut q = query(single("a"));
    q.after = Some(b"a".to_vec());
    assert_eq!(read(&r, &q), page(vec![], 0, false, at));

    // Keys only: every field but the value.
    let mut q = query(prefix("a"));
    q.keys_only = true;
    let keys: Vec<KeyRecord> = seeded_all(&["a", "ab", "abc"]).into_iter().map(key_only).collect();
    assert_eq!(read(&r, &q), page(keys.clone(), 3, false, at));
    q.limit = 1;
    assert_eq!(read(&r, &q), page(keys[..1].to_vec(), 3, true, at));

    // Count only: no keys, the count of all of them, never `more`.
    let mut q = query(from_key(""));
    q.count_only = true;
    assert_eq!(read(&r, &q), page(vec![], 5, false, at));
    q.limit = 1;
    assert_eq!(read(&r, &q), page(vec![], 5, false, at));
    q.after = Some(b"ab".to_vec());
    assert_eq!(read(&r, &q), page(vec![], 3, false, at));
    let mut q = query(single("zz"));
    q.count_only = true;
    assert_eq!(read(&r, &q), page(vec![], 0, false, at));
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_revision_filters_bound_mod_and_create_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    apply(&mut sm, vec![put(1, 1, "a", b"a1"), put(1, 2, "b", b"b1"), put(1, 3, "c", b"c1"), put(1, 4, "a", b"a2")])
        .await;
    apply(&mut sm, vec![put(1, 5, "d", b"d1")]).await;
    let at = applied_revision(5);
    let a = record("a", b"a2", 1, 4, 2, 0);
    let b = record("b", b"b1", 2, 2, 1, 0);
    let c = record("c", b"c1", 3, 3, 1, 0);
    let d = record("d", b"d1", 5, 5, 1, 0);
    let filtered = |f: &dyn Fn(&mut RangeQuery)| {
        let mut q = query(from_key(""));
        f(&mut q);
        read(&r, &q)
    };

    assert_eq!(filtered(&|q| q.min_mod_revision = rev(3)), page(vec![a.clone(), c.clone(), d.clone()], 4, false, at));
    assert_eq!(filtered(&|q| q.min_mod_revision = rev(3) + 1), page(vec![a.clone(), d.clone()], 4, false, at));
    assert_eq!(filtered(&|q| q.max_mod_revision = rev(3)), page(vec![b.clone(), c.clone()], 4, false, at));
    assert_eq!(
        filtered(&|q| (q.min_mod_revision, q.max_mod_revision) = (rev(4), rev(4))),
        page(vec![a.clone()], 4, false, at),
        "bounds are inclusive"
    );
    assert_eq!(filtered(&|q| q.min_mod_revision = rev(6)), page(vec![], 4, false, at));
    assert_eq!(
        filtered(&|q| q.min_create_revision = rev(2)),
        page(vec![b.clone(), c.clone(), d.clone()], 4, false, at)
    );
    assert_eq!(filtered(&|q| q.max_create_revision = rev(1)), page(vec![a.clone()], 4, false, at));
    assert_eq!(
        filtered(&|q| (q.min_create_revision, q.max_mod_revision) = (rev(2), rev(3))),
        page(vec![b.clone(), c.clone()], 4, false, at)
    );
    // Filters come before the limit, not the count (etcd's count is of every key in the
    // range); paging counts what is left.
    assert_eq!(filtered(&|q| (q.min_mod_revision, q.limit) = (rev(3), 1)), page(vec![a.clone()], 4, true, at));
    assert_eq!(
        filtered(&|q| (q.min_mod_revision, q.after) = (rev(3), Some(b"a".to_vec()))),
        page(vec![c.clone(), d.clone()], 3, false, at)
    );
    assert_eq!(filtered(&|q| (q.min_create_revision, q.count_only) = (rev(2), true)), page(vec![], 4, false, at));
    assert_eq!(
        filtered(&|q| (q.max_mod_revision, q.limit) = (rev(3), 2)),
        page(vec![b.clone(), c.clone()], 4, false, at),
        "no `more` when no key after the limit passes the filters"
    );
    assert_eq!(
        filtered(&|q| (q.max_mod_revision, q.keys_only) = (rev(2), true)),
        page(vec![key_only(b.clone())], 4, false, at)
    );

    // Inside a txn alike.
    let mut q = query(from_key(""));
    q.min_create_revision = rev(2);
    q.max_create_revision = rev(3);
    let outcome = apply_write(&mut sm, kv_txn(6, KvTxn::op(range_op(q)))).await;
    let results = vec![KvOpResult::Range(page(vec![b, c], 4, false, rev(6)))];
    assert_eq!(outcome, done(rev(6) - 1, true, results));
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_in_a_txn_see_the_ops_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    seed(&mut sm).await;
    let i = SEEDED + 1;

    let mut limited = query(prefix("a"));
    limited.limit = 2;
    let mut keys = query(prefix("a"));
    keys.keys_only = true;
    let mut count = query(from_key(""));
    count.count_only = true;
    let success = vec![
        range_op(query(prefix("a"))),
        put_op("aa", "aa1"),
        range_op(limited),
        del_op(prefix("ab"), false),
        range_op(keys),
        range_op(count),
        range_op(query(from_key(""))),
    ];
    let aa = record("aa", b"aa1", i, i, 1, 0);
    // A range in a txn reports the txn's revision.
    let results = vec![
        KvOpResult::Range(page(seeded_all(&["a", "ab", "abc"]), 3, false, rev(i))),
        put_result(None),
        KvOpResult::Range(page(vec![seeded("a"), aa.clone()], 4, true, rev(i))),
        deleted(2, vec![]),
        KvOpResult::Range(page(vec![key_only(seeded("a")), key_only(aa.clone())], 2, false, rev(i))),
        // The reserved key is passed over in a txn too.
        KvOpResult::Range(page(vec![], 4, false, rev(i))),
        KvOpResult::Range(page(vec![seeded("a"), aa.clone(), seeded("b"), seeded("c")], 4, false, rev(i))),
    ];
    assert_eq!(apply_write(&mut sm, kv_txn(i, txn_of(vec![], success, vec![]))).await, done(rev(i), true, results));
    assert_eq!(read(&r, &query(from_key(""))).kvs, vec![seeded("a"), aa, seeded("b"), seeded("c")]);
    assert_eq!(r.get(&reserved("token")).unwrap().map(|kv| kv.value), Some(b"t".to_vec()));

    // A txn that only reads: its ranges report its revision, the txn the one before it (the
    // applied revision of the entry before).
    let outcome = apply_write(&mut sm, kv_txn(i + 1, KvTxn::op(range_op(query(single("b")))))).await;
    let results = vec![KvOpResult::Range(page(vec![seeded("b")], 1, false, rev(i + 1)))];
    assert_eq!(outcome, done(rev(i + 1) - 1, true, results));
    assert_eq!(rev(i + 1) - 1, applied_revision(i));
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_answer_is_cut_at_a_quarter_frame_and_read_on_in_pages() {
    use crate::storage::state_machine::MAX_RANGE_ANSWER_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    // Five keys of a quarter of the budget each (plus their keys and overhead): three fit.
    let big = vec![b'x'; MAX_RANGE_ANSWER_BYTES / 4];
    for i in 1..=5 {
        apply(&mut sm, vec![put(1, i, &format!("k{i}"), &big)]).await;
    }
    let at = applied_revision(5);
    let k = |i: u64| record(format!("k{i}"), &big, i, i, 1, 0);

    let mut q = query(from_key(""));
    assert_eq!(read(&r, &q), page(vec![k(1), k(2), k(3)], 5, true, at));
    q.after = Some(b"k3".to_vec());
    assert_eq!(read(&r, &q), page(vec![k(4), k(5)], 2, false, at), "the next page");
    // Keys only fit at once; a limit below the cut cuts first.
    let mut q = query(from_key(""));
    q.keys_only = true;
    assert_eq!(read(&r, &q), page((1..=5).map(|i| key_only(k(i))).collect(), 5, false, at));
    let mut q = query(from_key(""));
    q.limit = 2;
    assert_eq!(read(&r, &q), page(vec![k(1), k(2)], 5, true, at));
    // A key larger than what is left still comes when it is the page's first.
    let huge = vec![b'y'; MAX_RANGE_ANSWER_BYTES + 1];
    apply(&mut sm, vec![put(1, 6, "a-huge", &huge)]).await;
    assert_eq!(
        read(&r, &query(from_key(""))),
        page(vec![record("a-huge", &huge, 6, 6, 1, 0)], 6, true, applied_revision(6))
    );
    apply(&mut sm, vec![delete(1, 7, "a-huge")]).await;

    // In a txn, every range and every list of deleted keys share one budget.
    let ops = vec![range_op(query(from_key(""))), range_op(query(from_key(""))), del_op(from_key(""), true)];
    let results = vec![
        KvOpResult::Range(page(vec![k(1), k(2), k(3)], 5, true, rev(8))),
        // What is left is less than a key: the first comes anyway, then the page is cut.
        KvOpResult::Range(page(vec![k(1)], 5, true, rev(8))),
        // Nothing is left for the deleted keys: they all go, none is listed.
        deleted(5, vec![]),
    ];
    assert_eq!(apply_write(&mut sm, kv_txn(8, txn_of(vec![], ops, vec![]))).await, done(rev(8), true, results));
    assert!(all_keys(&r).is_empty());
    assert_digest_recounts(&r);
}

// ---------------------------------------------------------------------------------------------
// Puts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_answer_the_previous_key_and_keep_the_value_or_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    let current = |r: &StateReader| read(r, &query(single("k"))).kvs;
    assert_eq!(
        apply_write(&mut sm, grant(1, 7, 10)).await,
        WriteOutcome::LeaseGranted { revision: rev(1), id: 7, ttl_secs: 10 }
    );

    // A new key, attached to the lease (granted on this shard, its home).
    let p = KvPut { lease: 7, prev_kv: true, ..kput("k", "v1") };
    assert_eq!(
        apply_write(&mut sm, kv_txn(2, KvTxn::op(KvOp::Put(p)))).await,
        done(rev(2), true, vec![put_result(None)])
    );
    let v1 = record("k", b"v1", 2, 2, 1, 7);
    assert_eq!(current(&r), vec![v1.clone()]);
    assert_eq!(lease_keys(&r, 7), vec![b"k".to_vec()]);

    // A new value, the lease kept: the previous key comes back whole.
    let p = KvPut { ignore_lease: true, prev_kv: true, ..kput("k", "v2") };
    assert_eq!(
        apply_write(&mut sm, kv_txn(3, KvTxn::op(KvOp::Put(p)))).await,
        done(rev(3), true, vec![put_result(Some(v1))])
    );
    let v2 = record("k", b"v2", 2, 3, 2, 7);
    assert_eq!(current(&r), vec![v2.clone()]);
    assert_eq!(lease_keys(&r, 7), vec![b"k".to_vec()]);

    // The value kept, no lease: the key leaves its lease (etcd). No previous key unless asked.
    let p = KvPut { ignore_value: true, ..kput("k", "") };
    assert_eq!(
        apply_write(&mut sm, kv_txn(4, KvTxn::op(KvOp::Put(p)))).await,
        done(rev(4), true, vec![put_result(None)])
    );
    let kept = record("k", b"v2", 2, 4, 3, 0);
    assert_eq!(current(&r), vec![kept.clone()]);
    assert!(lease_keys(&r, 7).is_empty());

    // The value kept, the lease given: attached again.
    let p = KvPut { ignore_value: true, lease: 7, prev_kv: true, ..kput("k", "") };
    assert_eq!(
        apply_write(&mut sm, kv_txn(5, KvTxn::op(KvOp::Put(p)))).await,
        done(rev(5), true, vec![put_result(Some(kept))])
    );
    let leased = record("k", b"v2", 2, 5, 4, 7);
    assert_eq!(current(&r), vec![leased.clone()]);
    assert_eq!(lease_keys(&r, 7), vec![b"k".to_vec()]);

    // Both kept: only the revisions move.
    let p = KvPut { ignore_value: true, ignore_lease: true, prev_kv: true, ..kput("k", "") };
    assert_eq!(
        apply_write(&mut sm, kv_txn(6, KvTxn::op(KvOp::Put(p)))).await,
        done(rev(6), true, vec![put_result(Some(leased))])
    );
    let both = record("k", b"v2", 2, 6, 5, 7);
    assert_eq!(current(&r), vec![both.clone()]);

    // A plain put: new value, no lease.
    let p = KvPut { prev_kv: true, ..kput("k", "v3") };
    assert_eq!(
        apply_write(&mut sm, kv_txn(7, KvTxn::op(KvOp::Put(p)))).await,
        done(rev(7), true, vec![put_result(Some(both))])
    );
    assert_eq!(current(&r), vec![record("k", b"v3", 2, 7, 6, 0)]);
    assert!(lease_keys(&r, 7).is_empty());
    // The previous key of a new one: none.
    let p = KvPut { prev_kv: true, ..kput("fresh", "f") };
    assert_eq!(
        apply_write(&mut sm, kv_txn(8, KvTxn::op(KvOp::Put(p)))).await,
        done(rev(8), true, vec![put_result(None)])
    );
    // Two puts of one key in a txn: the second sees the first.
    let ops = vec![put_op("twice", "1"), KvOp::Put(KvPut { prev_kv: true, ..kput("twice", "2") })];
    assert_eq!(
        apply_write(&mut sm, kv_txn(9, txn_of(vec![], ops, vec![]))).await,
        done(rev(9), true, vec![put_result(None), put_result(Some(record("twice", b"1", 9, 9, 1, 0)))])
    );
    assert_eq!(read(&r, &query(single("twice"))).kvs, vec![record("twice", b"2", 9, 9, 2, 0)]);

    // From one lease to another.
    apply(&mut sm, vec![grant(10, 9, 10)]).await;
    apply_write(&mut sm, kv_txn(11, KvTxn::op(KvOp::Put(KvPut { lease: 7, ..kput("k", "v4") })))).await;
    let p = KvPut { lease: 9, prev_kv: true, ignore_value: true, ..kput("k", "") };
    assert_eq!(
        apply_write(&mut sm, kv_txn(12, KvTxn::op(KvOp::Put(p)))).await,
        done(rev(12), true, vec![put_result(Some(record("k", b"v4", 2, 11, 7, 7)))])
    );
    assert_eq!(current(&r), vec![record("k", b"v4", 2, 12, 8, 9)]);
    assert!(lease_keys(&r, 7).is_empty());
    assert_eq!(lease_keys(&r, 9), vec![b"k".to_vec()]);
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeping_the_value_or_lease_of_a_missing_key_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    seed(&mut sm).await;
    let before = all_keys(&r);
    let not_found = WriteOutcome::KeyNotFound { key: b"missing".to_vec() };
    let keep_value = || KvOp::Put(KvPut { ignore_value: true, ..kput("missing", "") });
    let keep_lease = || KvOp::Put(KvPut { ignore_lease: true, ..kput("missing", "v") });

    // Refused whole: the put before it does not apply either.
    let t = txn_of(vec![], vec![put_op("new", "x"), keep_value()], vec![]);
    assert_eq!(apply_write(&mut sm, kv_txn(8, t)).await, not_found);
    let t = txn_of(vec![], vec![del_op(single("a"), false), keep_lease()], vec![]);
    assert_eq!(apply_write(&mut sm, kv_txn(9, t)).await, not_found);
    // An existing key kept alongside a missing one: nothing.
    let kept_a = KvOp::Put(KvPut { ignore_value: true, ignore_lease: true, ..kput("a", "") });
    let t = txn_of(vec![], vec![kept_a, keep_value()], vec![]);
    assert_eq!(apply_write(&mut sm, kv_txn(10, t)).await, not_found);
    // In a nested txn on the path taken.
    let t = txn_of(vec![], vec![put_op("new", "x"), nested(vec![], vec![keep_value()], vec![])], vec![]);
    assert_eq!(apply_write(&mut sm, kv_txn(11, t)).await, not_found);
    let t = txn_of(
        vec![cmp(single("a"), Equal, version(9))],
        vec![],
        vec![nested(vec![cmp(single("b"), Equal, version(1))], vec![keep_lease()], vec![])],
    );
    assert_eq!(apply_write(&mut sm, kv_txn(12, t)).await, not_found);
    assert_eq!(all_keys(&r), before, "nothing changed");
    assert_eq!(get(&r, "new"), None);
    assert_digest_recounts(&r);

    // Off the path taken, it is never looked at.
    let t = txn_of(
        vec![cmp(single("a"), Equal, version(9))],
        vec![keep_value()],
        vec![put_op("new", "x"), nested(vec![cmp(single("a"), Equal, version(9))], vec![keep_lease()], vec![])],
    );
    assert_eq!(
        apply_write(&mut sm, kv_txn(13, t)).await,
        done(rev(13), false, vec![put_result(None), KvOpResult::Txn { succeeded: false, results: vec![] }])
    );
    assert_eq!(read(&r, &query(single("new"))).kvs, vec![record("new", b"x", 13, 13, 1, 0)]);
    assert_eq!(get(&r, "missing"), None);
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_with_a_lease_attach_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    let x = client(1);
    let leased = |key: &str, lease: u64| KvTxn::op(KvOp::Put(KvPut { lease, ..kput(key, "v") }));
    apply(&mut sm, vec![grant(1, 8, 10)]).await;

    // A lease this shard knows nothing of: not applied, not recorded in the session.
    assert_eq!(
        apply_write(&mut sm, kv_txn_as(2, x, 1, leased("far", 99), false)).await,
        WriteOutcome::LeaseUnchecked { id: 99 }
    );
    assert_eq!(get(&r, "far"), None);
    assert!(lease_keys(&r, 99).is_empty());
    let other = tempfile::tempdir().unwrap();
    let mut same = open_sm(other.path());
    apply(&mut same, vec![grant(1, 8, 10), blank(1, 2)]).await;
    assert_eq!(r.digest().unwrap(), same.reader().digest().unwrap(), "as if the entry were blank");
    // The node checked the lease at its home and resends, same session and sequence number.
    let ok = done(rev(3), true, vec![put_result(None)]);
    assert_eq!(apply_write(&mut sm, kv_txn_as(3, x, 1, leased("far", 99), true)).await, ok);
    assert_eq!(read(&r, &query(single("far"))).kvs, vec![record("far", b"v", 3, 3, 1, 99)]);
    assert_eq!(lease_keys(&r, 99), vec![b"far".to_vec()]);
    // Recorded now: a retry answers the same, applied once.
    assert_eq!(apply_write(&mut sm, kv_txn_as(4, x, 1, leased("far", 99), false)).await, ok);
    assert_eq!(read(&r, &query(single("far"))).kvs, vec![record("far", b"v", 3, 3, 1, 99)]);
    // Known here now (a key of it is here): no check needed.
    assert_eq!(
        apply_write(&mut sm, kv_txn_as(5, x, 2, leased("far2", 99), false)).await,
        done(rev(5), true, vec![put_result(None)])
    );
    assert_eq!(lease_keys(&r, 99), vec![b"far".to_vec(), b"far2".to_vec()]);

    // One unknown lease refuses the whole txn, on the path taken, nested or not.
    let unknown = || KvOp::Put(KvPut { lease: 77, ..kput("g", "v") });
    let t = txn_of(vec![], vec![put_op("plain", "p"), unknown()], vec![]);
    assert_eq!(apply_write(&mut sm, kv_txn(6, t)).await, WriteOutcome::LeaseUnchecked { id: 77 });
    let t = txn_of(vec![], vec![put_op("plain", "p"), nested(vec![], vec![unknown()], vec![])], vec![]);
    assert_eq!(apply_write(&mut sm, kv_txn(7, t)).await, WriteOutcome::LeaseUnchecked { id: 77 });
    assert_eq!(get(&r, "plain"), None);
    assert_eq!(get(&r, "g"), None);
    // Off the path taken it is not looked at.
    let t = txn_of(vec![cmp(single("nope"), Greater, version(0))], vec![unknown()], vec![put_op("plain", "p")]);
    assert_eq!(apply_write(&mut sm, kv_txn(8, t)).await, done(rev(8), false, vec![put_result(None)]));
    assert_eq!(get(&r, "g"), None);
    assert_eq!(get(&r, "plain").map(|kv| kv.value), Some(b"p".to_vec()));

    // The lease's home: attached at once.
    assert_eq!(apply_write(&mut sm, kv_txn(9, leased("home", 8))).await, done(rev(9), true, vec![put_result(None)]));
    assert_eq!(read(&r, &query(single("home"))).kvs, vec![record("home", b"v", 9, 9, 1, 8)]);
    assert_eq!(lease_keys(&r, 8), vec![b"home".to_vec()]);

    // Revoked: its keys went, puts with it are refused (recorded: a retry answers the same).
    assert_eq!(apply_write(&mut sm, revoke(10, 8)).await, WriteOutcome::LeaseRevoked { revision: rev(10), deleted: 1 });
    assert_eq!(get(&r, "home"), None);
    let y = client(2);
    assert_eq!(
        apply_write(&mut sm, kv_txn_as(11, y, 1, leased("late", 8), false)).await,
        WriteOutcome::LeaseNotFound { id: 8 }
    );
    assert_eq!(
        apply_write(&mut sm, kv_txn_as(12, y, 1, leased("late", 8), true)).await,
        WriteOutcome::LeaseNotFound { id: 8 }
    );
    assert_eq!(
        apply_write(&mut sm, kv_txn_as(13, y, 2, leased("late", 8), true)).await,
        WriteOutcome::LeaseNotFound { id: 8 }
    );
    assert_eq!(get(&r, "late"), None);

    // Revoked while this shard is not its home: its keys go, checked or not it is refused.
    assert_eq!(
        apply_write(&mut sm, lease_drop(14, 99)).await,
        WriteOutcome::LeaseRevoked { revision: rev(14), deleted: 2 }
    );
    assert_eq!(
        apply_write(&mut sm, kv_txn_as(15, x, 3, leased("far", 99), true)).await,
        WriteOutcome::LeaseNotFound { id: 99 }
    );
    assert_eq!(get(&r, "far"), None);
    assert!(lease_keys(&r, 99).is_empty());
    assert_digest_recounts(&r);
}

// ---------------------------------------------------------------------------------------------
// Range deletes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_range_counts_and_lists_what_went() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    seed(&mut sm).await;
    let delete = |index: u64, range: KeyRange, prev_kv: bool| kv_txn(index, KvTxn::op(del_op(range, prev_kv)));

    // One key, with its record; then again: nothing went, nothing was written.
    assert_eq!(
        apply_write(&mut sm, delete(8, single("ab"), true)).await,
        done(rev(8), true, vec![deleted(1, seeded_all(&["ab"]))])
    );
    assert_eq!(
        apply_write(&mut sm, delete(9, single("ab"), true)).await,
        done(rev(9) - 1, true, vec![deleted(0, vec![])])
    );
    // [b, c): `b` only; records only if asked.
    assert_eq!(
        apply_write(&mut sm, delete(10, span("b", "c"), false)).await,
        done(rev(10), true, vec![deleted(1, vec![])])
    );
    assert_eq!(get(&r, "b"), None);
    assert_eq!(get(&r, "c").map(|kv| kv.value), Some(b"c1".to_vec()));
    // A range holding no key.
    assert_eq!(
        apply_write(&mut sm, delete(11, span("c", "a"), true)).await,
        done(rev(11) - 1, true, vec![deleted(0, vec![])])
    );
    // A prefix: in key order.
    assert_eq!(
        apply_write(&mut sm, delete(12, prefix("a"), true)).await,
        done(rev(12), true, vec![deleted(2, seeded_all(&["a", "abc"]))])
    );
    assert_eq!(all_keys(&r).into_iter().map(|kv| kv.key).collect::<Vec<_>>(), vec![reserved("token"), b"c".to_vec()]);

    // Every key from one on.
    apply(&mut sm, vec![put(1, 13, "x", b"x1"), put(1, 14, "y", b"y1"), put(1, 15, "z", b"z1")]).await;
    assert_eq!(
        apply_write(&mut sm, delete(16, from_key("y"), true)).await,
        done(rev(16), true, vec![deleted(2, vec![record("y", b"y1", 14, 14, 1, 0), record("z", b"z1", 15, 15, 1, 0)])])
    );
    // Every key: the reserved ones stay, however everything is spelled.
    assert_eq!(
        apply_write(&mut sm, delete(17, from_key(""), true)).await,
        done(rev(17), true, vec![deleted(2, vec![seeded("c"), record("x", b"x1", 13, 13, 1, 0)])])
    );
    assert_eq!(all_keys(&r).into_iter().map(|kv| kv.key).collect::<Vec<_>>(), vec![reserved("token")]);
    assert_eq!(
        apply_write(&mut sm, delete(18, prefix(""), true)).await,
        done(rev(18) - 1, true, vec![deleted(0, vec![])])
    );
    assert_eq!(
        apply_write(&mut sm, delete(19, from_key("\x00"), true)).await,
        done(rev(19) - 1, true, vec![deleted(0, vec![])])
    );
    assert_eq!(all_keys(&r).len(), 1);
    // The cluster's own delete starts among the reserved keys.
    assert_eq!(
        apply_write(&mut sm, delete(20, prefix(RESERVED_PREFIX), true)).await,
        done(rev(20), true, vec![deleted(1, vec![token()])])
    );
    assert!(all_keys(&r).is_empty());
    assert_digest_recounts(&r);

    // Deleted keys leave their lease.
    apply(&mut sm, vec![grant(21, 3, 10)]).await;
    let ops = vec![
        KvOp::Put(KvPut { lease: 3, ..kput("l1", "1") }),
        KvOp::Put(KvPut { lease: 3, ..kput("l2", "2") }),
        KvOp::Put(KvPut { lease: 3, ..kput("l3", "3") }),
    ];
    apply_write(&mut sm, kv_txn(22, txn_of(vec![], ops, vec![]))).await;
    assert_eq!(lease_keys(&r, 3), vec![b"l1".to_vec(), b"l2".to_vec(), b"l3".to_vec()]);
    assert_eq!(
        apply_write(&mut sm, delete(23, span("l1", "l3"), false)).await,
        done(rev(23), true, vec![deleted(2, vec![])])
    );
    assert_eq!(lease_keys(&r, 3), vec![b"l3".to_vec()]);
    assert_eq!(
        apply_write(&mut sm, delete(24, single("l3"), true)).await,
        done(rev(24), true, vec![deleted(1, vec![record("l3", b"3", 22, 22, 1, 3)])])
    );
    assert!(lease_keys(&r, 3).is_empty());
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txns_changes_are_published_as_events_at_its_revision() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    apply(&mut sm, vec![put(1, 1, "a", b"a1"), put(1, 2, "b", b"b1"), put(1, 3, "c", b"c1")]).await;
    apply(&mut sm, vec![raw(4, &reserved("token"), b"t")]).await;
    let hub = sm.watch(0, 1000, 1 << 20, 64).unwrap();
    let mut sub = hub.subscribe(hub.now()).unwrap();
    // `prev`: the value before and its (create revision, mod revision, version, lease).
    let event = |kind: EventKind, key: &str, value: &str, prev: Option<(&str, [u64; 4])>, index: u32| WatchEvent {
        kind,
        key: key.into(),
        value: value.into(),
        prev_value: prev.map(|(v, _)| v.into()),
        prev_meta: prev.map(|(_, [create_revision, mod_revision, version, lease])| PrevMeta {
            create_revision,
            mod_revision,
            version,
            lease,
        }),
        shard: 0,
        revision: 0,
        index,
        create_revision: 0,
        version: 0,
        lease: 0,
    };
    apply(&mut sm, vec![grant(5, 4, 10)]).await;

    let ops = vec![
        KvOp::Put(KvPut { lease: 4, ..kput("a", "a2") }),
        del_op(span("b", "d"), false),
        nested(vec![], vec![put_op("d", "d1")], vec![]),
        range_op(query(from_key(""))),
    ];
    apply_write(&mut sm, kv_txn(6, txn_of(vec![], ops, vec![]))).await;
    let batch = sub.live.try_recv().expect("the txn's events");
    assert_eq!(batch.revision, applied_revision(6));
    let at6 = |e: WatchEvent| WatchEvent { revision: rev(6), ..e };
    let expected = vec![
        at6(WatchEvent {
            create_revision: rev(1),
            version: 2,
            lease: 4,
            ..event(EventKind::Put, "a", "a2", Some(("a1", [rev(1), rev(1), 1, 0])), 0)
        }),
        at6(event(EventKind::Delete, "b", "", Some(("b1", [rev(2), rev(2), 1, 0])), 1)),
        at6(event(EventKind::Delete, "c", "", Some(("c1", [rev(3), rev(3), 1, 0])), 2)),
        at6(WatchEvent { create_revision: rev(6), version: 1, ..event(EventKind::Put, "d", "d1", None, 3) }),
    ];
    assert_eq!(batch.events, expected);
    assert!(sub.live.try_recv().is_err(), "one batch per entry");

    // A txn that reads, deletes nothing or is refused publishes nothing.
    apply_write(&mut sm, kv_txn(7, KvTxn::op(range_op(query(from_key("")))))).await;
    apply_write(&mut sm, kv_txn(8, KvTxn::op(del_op(single("nope"), true)))).await;
    let refused = KvTxn::op(KvOp::Put(KvPut { ignore_value: true, ..kput("nope", "") }));
    assert_eq!(apply_write(&mut sm, kv_txn(9, refused)).await, WriteOutcome::KeyNotFound { key: b"nope".to_vec() });
    assert!(sub.live.try_recv().is_err());

    // Deleting everything: one event per client key, in key order; the reserved key stays.
    apply_write(&mut sm, kv_txn(10, KvTxn::op(del_op(from_key(""), false)))).await;
    let batch = sub.live.try_recv().expect("the delete's events");
    let at10 = |e: WatchEvent| WatchEvent { revision: rev(10), ..e };
    assert_eq!(
        batch.events,
        vec![
            at10(event(EventKind::Delete, "a", "", Some(("a2", [rev(1), rev(6), 2, 4])), 0)),
            at10(event(EventKind::Delete, "d", "", Some(("d1", [rev(6), rev(6), 1, 0])), 1))
        ]
    );
    assert_eq!(all_keys(&sm.reader()).len(), 1);

    // A key deleted and put again in one txn: both events carry the key as it was before the
    // txn (etcd's previous key is the one at the revision before), not the delete's outcome.
    apply(&mut sm, vec![put(1, 11, "e", b"e1")]).await;
    let _ = sub.live.try_recv();
    let ops = vec![nested(vec![], vec![del_op(from_key("e"), false)], vec![]), put_op("e", "e2")];
    apply_write(&mut sm, kv_txn(12, txn_of(vec![], ops, vec![]))).await;
    let batch = sub.live.try_recv().expect("the txn's events");
    let at12 = |e: WatchEvent| WatchEvent { revision: rev(12), ..e };
    let before = Some(("e1", [rev(11), rev(11), 1, 0]));
    assert_eq!(
        batch.events,
        vec![
            at12(event(EventKind::Delete, "e", "", before, 0)),
            at12(WatchEvent { create_revision: rev(12), version: 1, ..event(EventKind::Put, "e", "e2", before, 1) }),
        ]
    );
    assert_digest_recounts(&sm.reader());
}

// ---------------------------------------------------------------------------------------------
// Compares
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compares_on_keys_ranges_and_leases_follow_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    apply(&mut sm, vec![raw(1, &reserved("token"), b"t"), grant(2, 5, 10)]).await;
    apply_write(&mut sm, kv_txn(3, KvTxn::op(KvOp::Put(KvPut { lease: 5, ..kput("a", "a1") })))).await;
    apply(&mut sm, vec![put(1, 4, "b", b"b1"), put(1, 5, "b", b"b2"), put(1, 6, "c", b"c1")]).await;
    // a: a1, created and modified at 3, version 1, lease 5; b: b2, created at 4, modified at 5,
    // version 2; c: c1 at 6, version 1. The reserved key was created at 1.
    let before = all_keys(&r);
    use KvCompareTarget::{CreateRevision, Lease, ModRevision};
    let cases = [
        // One key.
        (cmp(single("a"), Equal, version(1)), true),
        (cmp(single("b"), Equal, version(2)), true),
        (cmp(single("b"), Greater, version(1)), true),
        (cmp(single("b"), Less, version(2)), false),
        (cmp(single("b"), Equal, CreateRevision(rev(4))), true),
        (cmp(single("b"), Equal, ModRevision(rev(5))), true),
        (cmp(single("b"), Less, ModRevision(rev(6))), true),
        (cmp(single("b"), Greater, ModRevision(rev(5))), false),
        (cmp(single("b"), Equal, value("b2")), true),
        (cmp(single("b"), Equal, value("b1")), false),
        (cmp(single("b"), NotEqual, value("b1")), true),
        (cmp(single("b"), Less, value("b3")), true),
        (cmp(single("b"), Greater, value("b3")), false),
        (cmp(single("a"), Equal, Lease(5)), true),
        (cmp(single("a"), NotEqual, Lease(5)), false),
        (cmp(single("b"), Equal, Lease(0)), true),
        (cmp(single("b"), Greater, Lease(0)), false),
        // A missing key: version, revisions and lease 0; every value compare fails.
        (cmp(single("zz"), Equal, version(0)), true),
        (cmp(single("zz"), Greater, version(0)), false),
        (cmp(single("zz"), NotEqual, version(0)), false),
        (cmp(single("zz"), Equal, CreateRevision(0)), true),
        (cmp(single("zz"), Less, ModRevision(1)), true),
        (cmp(single("zz"), Equal, Lease(0)), true),
        (cmp(single("zz"), Greater, Lease(0)), false),
        (cmp(single("zz"), Equal, value("")), false),
        (cmp(single("zz"), NotEqual, value("x")), false),
        (cmp(single("zz"), Less, value("z")), false),
        // A range: it holds when it holds for every key.
        (cmp(from_key(""), Greater, version(0)), true),
        (cmp(from_key(""), Equal, version(1)), false),
        (cmp(from_key(""), Less, version(3)), true),
        (cmp(span("a", "c"), Less, ModRevision(rev(6))), true),
        (cmp(from_key("a"), Less, ModRevision(rev(6))), false),
        (cmp(span("b", "c"), Equal, value("b2")), true),
        (cmp(from_key(""), Equal, value("b2")), false),
        (cmp(from_key(""), Greater, value("a")), true),
        (cmp(span("a", "b"), Equal, Lease(5)), true),
        (cmp(from_key(""), Equal, Lease(5)), false),
        (cmp(from_key(""), NotEqual, Lease(9)), true),
        (cmp(prefix("b"), Equal, CreateRevision(rev(4))), true),
        // A client's range passes over the reserved key (created before every other).
        (cmp(prefix(""), Greater, CreateRevision(rev(1))), true),
        (cmp(from_key(""), Greater, CreateRevision(rev(1))), true),
        (cmp(span("\x00", "\x01"), Equal, version(0)), true),
        (cmp(span("\x00", "\x01"), Equal, value("t")), false),
        // The cluster's own compares start among the reserved keys and see it.
        (cmp(prefix(RESERVED_PREFIX), Equal, CreateRevision(rev(1))), true),
        (cmp(prefix(RESERVED_PREFIX), Equal, value("t")), true),
        (cmp(from_key(RESERVED_PREFIX), Greater, CreateRevision(rev(1))), false),
        // A range without keys compares as one missing key; a value compare on it fails.
        (cmp(span("x", "z"), Equal, version(0)), true),
        (cmp(span("x", "z"), Greater, version(0)), false),
        (cmp(span("x", "z"), Equal, CreateRevision(0)), true),
        (cmp(span("x", "z"), Less, ModRevision(1)), true),
        (cmp(span("x", "z"), Equal, Lease(0)), true),
        (cmp(span("x", "z"), Equal, value("")), false),
        (cmp(span("x", "z"), NotEqual, value("x")), false),
        (cmp(from_key("d"), Equal, version(0)), true),
        (cmp(span("c", "a"), Equal, version(0)), true),
        (cmp(span("c", "a"), NotEqual, value("")), false),
        (cmp(span("b", "b"), Equal, Lease(0)), true),
    ];
    let mut next = 7;
    for (compare, expected) in cases {
        assert_eq!(holds(&mut sm, &mut next, compare.clone()).await, expected, "{compare:?}");
    }
    assert_eq!(all_keys(&r), before, "compares change nothing");

    // Every compare must hold: else the failure branch runs.
    let ok = cmp(single("a"), Equal, version(1));
    let bad = cmp(single("b"), Equal, value("b1"));
    let b = record("b", b"b2", 4, 5, 2, 0);
    let branches = || (vec![put_op("s", "1")], vec![range_op(query(single("b")))]);
    let (success, failure) = branches();
    let i = next;
    assert_eq!(
        apply_write(&mut sm, kv_txn(i, txn_of(vec![ok.clone(), bad.clone()], success, failure))).await,
        done(rev(i) - 1, false, vec![KvOpResult::Range(page(vec![b.clone()], 1, false, rev(i)))])
    );
    let (success, failure) = branches();
    assert_eq!(
        apply_write(&mut sm, kv_txn(i + 1, txn_of(vec![bad, ok.clone()], success, failure))).await,
        done(rev(i + 1) - 1, false, vec![KvOpResult::Range(page(vec![b], 1, false, rev(i + 1)))])
    );
    let (success, failure) = branches();
    let good = cmp(prefix("b"), Equal, value("b2"));
    assert_eq!(
        apply_write(&mut sm, kv_txn(i + 2, txn_of(vec![ok, good], success, failure))).await,
        done(rev(i + 2), true, vec![put_result(None)])
    );
    // No compare: success.
    assert_eq!(
        apply_write(&mut sm, kv_txn(i + 3, txn_of(vec![], vec![], vec![put_op("f", "1")]))).await,
        done(rev(i + 3) - 1, true, vec![])
    );
    assert_eq!(get(&r, "f"), None);
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compare_sees_the_state_before_the_txn() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    apply(&mut sm, vec![put(1, 1, "k", b"v")]).await;

    // The success branch deletes `k`; its nested txn's compare still sees `k` (a range read in
    // it, an op, sees the delete).
    let inner = nested(
        vec![cmp(single("k"), Greater, version(0))],
        vec![range_op(query(single("k"))), put_op("seen", "present")],
        vec![put_op("seen", "absent")],
    );
    let t = txn_of(vec![cmp(single("k"), Greater, version(0))], vec![del_op(single("k"), true), inner], vec![]);
    let results = vec![
        deleted(1, vec![record("k", b"v", 1, 1, 1, 0)]),
        KvOpResult::Txn {
            succeeded: true,
            results: vec![KvOpResult::Range(page(vec![], 0, false, rev(2))), put_result(None)],
        },
    ];
    assert_eq!(apply_write(&mut sm, kv_txn(2, t)).await, done(rev(2), true, results));
    assert_eq!(get(&r, "k"), None);
    assert_eq!(get(&r, "seen").map(|kv| kv.value), Some(b"present".to_vec()));

    // The other way: `k` is put first; the nested compare still sees it missing, and a value
    // compare on it fails.
    let inner = nested(
        vec![cmp(single("k"), Equal, version(0))],
        vec![
            range_op(query(single("k"))),
            KvOp::Put(KvPut { prev_kv: true, ..kput("seen", "absent") }),
            nested(vec![cmp(single("k"), Equal, value("w"))], vec![put_op("valued", "yes")], vec![]),
        ],
        vec![],
    );
    let t = txn_of(vec![], vec![put_op("k", "w"), inner], vec![]);
    let results = vec![
        put_result(None),
        KvOpResult::Txn {
            succeeded: true,
            results: vec![
                KvOpResult::Range(page(vec![record("k", b"w", 3, 3, 1, 0)], 1, false, rev(3))),
                put_result(Some(record("seen", b"present", 2, 2, 1, 0))),
                KvOpResult::Txn { succeeded: false, results: vec![] },
            ],
        },
    ];
    assert_eq!(apply_write(&mut sm, kv_txn(3, t)).await, done(rev(3), true, results));
    assert_eq!(get(&r, "valued"), None);

    // Deeper, from a failure branch: `k` changes first; the compares two levels down see its
    // version and mod revision as they were.
    let deepest = nested(
        vec![cmp(single("k"), Equal, KvCompareTarget::ModRevision(rev(3)))],
        vec![put_op("deep", "yes")],
        vec![put_op("deep", "no")],
    );
    let t = txn_of(
        vec![cmp(single("k"), Equal, value("nope"))],
        vec![],
        vec![put_op("k", "w2"), nested(vec![cmp(single("k"), Equal, version(1))], vec![deepest], vec![])],
    );
    let results = vec![
        put_result(None),
        KvOpResult::Txn {
            succeeded: true,
            results: vec![KvOpResult::Txn { succeeded: true, results: vec![put_result(None)] }],
        },
    ];
    assert_eq!(apply_write(&mut sm, kv_txn(4, t)).await, done(rev(4), false, results));
    assert_eq!(get(&r, "k"), Some(kv("k", b"w2", 3, 4, 2)));
    assert_eq!(get(&r, "deep").map(|kv| kv.value), Some(b"yes".to_vec()));

    // Range compares: a prefix empty before the txn compares as a missing key even after a put
    // into it; a range whose keys all go still holds for what they were.
    let t = txn_of(
        vec![],
        vec![
            put_op("n1", "x"),
            nested(vec![cmp(prefix("n"), Equal, version(0))], vec![put_op("n-was-empty", "yes")], vec![]),
            del_op(prefix("s"), false),
            nested(vec![cmp(prefix("s"), Greater, version(0))], vec![put_op("s-was-full", "yes")], vec![]),
        ],
        vec![],
    );
    let results = vec![
        put_result(None),
        KvOpResult::Txn { succeeded: true, results: vec![put_result(None)] },
        deleted(1, vec![]),
        KvOpResult::Txn { succeeded: true, results: vec![put_result(None)] },
    ];
    assert_eq!(apply_write(&mut sm, kv_txn(5, t)).await, done(rev(5), true, results));

    // A lease compare: attached in the txn, none before.
    apply(&mut sm, vec![grant(6, 3, 10)]).await;
    let t = txn_of(
        vec![],
        vec![
            KvOp::Put(KvPut { lease: 3, ..kput("l", "x") }),
            nested(
                vec![cmp(single("l"), Equal, KvCompareTarget::Lease(0))],
                vec![put_op("unleased-before", "yes")],
                vec![],
            ),
        ],
        vec![],
    );
    let results = vec![put_result(None), KvOpResult::Txn { succeeded: true, results: vec![put_result(None)] }];
    assert_eq!(apply_write(&mut sm, kv_txn(7, t)).await, done(rev(7), true, results));
    assert_eq!(read(&r, &query(single("l"))).kvs, vec![record("l", b"x", 7, 7, 1, 3)]);
    assert_digest_recounts(&r);
}

// ---------------------------------------------------------------------------------------------
// Nested txns, revisions, read-only txns
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_txns_answer_in_shape_and_write_at_the_txns_revision() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    apply(&mut sm, vec![put(1, 1, "old", b"o")]).await;

    let innermost = nested(
        vec![cmp(single("old"), Equal, value("x"))],
        vec![put_op("never", "n")],
        vec![put_op("p3", "3"), del_op(single("old"), true), range_op(query(prefix("p")))],
    );
    let t = txn_of(
        vec![],
        vec![
            put_op("p1", "1"),
            nested(
                vec![cmp(single("old"), Equal, version(1))],
                vec![put_op("p2", "2"), innermost],
                vec![put_op("never", "n")],
            ),
            nested(vec![], vec![], vec![]),
            range_op(query(prefix("p"))),
        ],
        vec![put_op("never", "n")],
    );
    let p = |k: &str, v: &[u8]| record(k, v, 2, 2, 1, 0);
    let all_p = vec![p("p1", b"1"), p("p2", b"2"), p("p3", b"3")];
    let results = vec![
        put_result(None),
        KvOpResult::Txn {
            succeeded: true,
            results: vec![
                put_result(None),
                KvOpResult::Txn {
                    succeeded: false,
                    results: vec![
                        put_result(None),
                        deleted(1, vec![record("old", b"o", 1, 1, 1, 0)]),
                        KvOpResult::Range(page(all_p.clone(), 3, false, rev(2))),
                    ],
                },
            ],
        },
        KvOpResult::Txn { succeeded: true, results: vec![] },
        KvOpResult::Range(page(all_p.clone(), 3, false, rev(2))),
    ];
    assert_eq!(apply_write(&mut sm, kv_txn(2, t)).await, done(rev(2), true, results));
    // Every write at the txn's one revision, whatever its depth.
    assert_eq!(read(&r, &query(from_key(""))).kvs, all_p);
    assert_eq!(get(&r, "never"), None);
    assert_eq!(get(&r, "old"), None);

    // Several txns in one entry: each its own revision (its place in the entry), for each of
    // its writes, nested or not.
    let writes = vec![
        request(
            client(1),
            1,
            kv_txn_cmd(
                txn_of(vec![], vec![put_op("q1", "1"), nested(vec![], vec![put_op("q2", "2")], vec![])], vec![]),
                false,
            ),
        ),
        request(client(2), 1, kv_txn_cmd(KvTxn::op(nested(vec![], vec![put_op("q3", "3")], vec![])), false)),
    ];
    let results = apply(&mut sm, vec![multi(3, writes)]).await;
    let (first, second) = (write_revision(3, 0), write_revision(3, 1));
    assert_eq!(
        results,
        vec![ApplyResult(vec![
            done(
                first,
                true,
                vec![put_result(None), KvOpResult::Txn { succeeded: true, results: vec![put_result(None)] }]
            ),
            done(second, true, vec![KvOpResult::Txn { succeeded: true, results: vec![put_result(None)] }]),
        ])]
    );
    let revisions: Vec<(Vec<u8>, u64, u64)> =
        read(&r, &query(prefix("q"))).kvs.into_iter().map(|k| (k.key, k.create_revision, k.mod_revision)).collect();
    assert_eq!(
        revisions,
        vec![(b"q1".to_vec(), first, first), (b"q2".to_vec(), first, first), (b"q3".to_vec(), second, second)]
    );
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_that_changes_nothing_moves_neither_the_revision_nor_the_state() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, mut b) = (open_sm(dir_a.path()), open_sm(dir_b.path()));
    let start = vec![put(1, 1, "a", b"a1"), put(1, 2, "b", b"b1"), put(1, 3, "a", b"a2")];
    apply(&mut a, start.clone()).await;
    apply(&mut b, start).await;
    let ra = a.reader();
    let before = all_keys(&ra);
    let a_rec = record("a", b"a2", 1, 3, 2, 0);

    // Without a session, a txn that only reads leaves the state as a blank entry would.
    let t = txn_of(vec![cmp(single("a"), Equal, version(2))], vec![range_op(query(from_key("")))], vec![]);
    let results = vec![KvOpResult::Range(page(vec![a_rec.clone(), record("b", b"b1", 2, 2, 1, 0)], 2, false, rev(4)))];
    assert_eq!(apply_write(&mut a, node_txn(4, t)).await, done(rev(4) - 1, true, results));
    assert_eq!(rev(4) - 1, applied_revision(3), "the revision the entry before left");
    apply(&mut b, vec![blank(1, 4)]).await;
    assert_eq!(ra.digest().unwrap(), b.reader().digest().unwrap());
    assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());

    // Likewise one whose deletes found nothing, in whichever branch ran.
    let t = txn_of(
        vec![cmp(single("a"), Equal, version(9))],
        vec![put_op("never", "n")],
        vec![
            del_op(single("missing"), true),
            del_op(prefix("zz"), true),
            nested(vec![], vec![del_op(span("c", "d"), false)], vec![]),
        ],
    );
    let results = vec![
        deleted(0, vec![]),
        deleted(0, vec![]),
        KvOpResult::Txn { succeeded: true, results: vec![deleted(0, vec![])] },
    ];
    assert_eq!(apply_write(&mut a, node_txn(5, t)).await, done(rev(5) - 1, false, results));
    apply(&mut b, vec![blank(1, 5)]).await;
    assert_eq!(ra.digest().unwrap(), b.reader().digest().unwrap());
    assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());

    // With a session: no key changes (the session records the answer).
    let t = txn_of(vec![cmp(single("a"), Equal, version(9))], vec![], vec![]);
    assert_eq!(apply_write(&mut a, kv_txn(6, t)).await, done(rev(6) - 1, false, vec![]));
    assert_eq!(all_keys(&ra), before);

    // Later in an entry: the revision of the write before it in the entry.
    let writes = vec![
        request(client(1), 1, kv_txn_cmd(KvTxn::op(put_op("w", "1")), false)),
        request(client(2), 1, kv_txn_cmd(KvTxn::op(range_op(query(single("w")))), false)),
        request(client(3), 1, kv_txn_cmd(KvTxn::op(range_op(query(single("a")))), false)),
    ];
    let w = KeyRecord {
        key: b"w".to_vec(),
        value: b"1".to_vec(),
        create_revision: write_revision(7, 0),
        mod_revision: write_revision(7, 0),
        version: 1,
        lease: 0,
    };
    assert_eq!(
        apply(&mut a, vec![multi(7, writes)]).await,
        vec![ApplyResult(vec![
            done(write_revision(7, 0), true, vec![put_result(None)]),
            done(write_revision(7, 0), true, vec![KvOpResult::Range(page(vec![w], 1, false, write_revision(7, 1)))]),
            done(
                write_revision(7, 1),
                true,
                vec![KvOpResult::Range(page(vec![a_rec], 1, false, write_revision(7, 2)))]
            ),
        ])]
    );
    assert_digest_recounts(&ra);
}

// ---------------------------------------------------------------------------------------------
// Exactly once, replays
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_kv_txns_answer_their_first_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    let x = client(1);
    // Creates `k` only if it is missing: applied twice, the second would fail.
    let create = || {
        txn_of(
            vec![cmp(single("k"), Equal, version(0))],
            vec![KvOp::Put(KvPut { prev_kv: true, ..kput("k", "v1") })],
            vec![range_op(query(single("k")))],
        )
    };
    let first = done(rev(1), true, vec![put_result(None)]);
    assert_eq!(apply_write(&mut sm, kv_txn_as(1, x, 1, create(), false)).await, first);
    assert_eq!(apply_write(&mut sm, kv_txn_as(2, x, 1, create(), false)).await, first);
    assert_eq!(get(&r, "k"), Some(kv("k", b"v1", 1, 1, 1)));

    // The next write of the session fails its compare and reads `k`; its retry answers what it
    // read then, whatever `k` is now.
    let second =
        done(rev(3) - 1, false, vec![KvOpResult::Range(page(vec![record("k", b"v1", 1, 1, 1, 0)], 1, false, rev(3)))]);
    assert_eq!(apply_write(&mut sm, kv_txn_as(3, x, 2, create(), false)).await, second);
    apply(&mut sm, vec![put(1, 4, "k", b"v2")]).await;
    assert_eq!(apply_write(&mut sm, kv_txn_as(5, x, 2, create(), false)).await, second);
    assert_eq!(
        apply_write(&mut sm, kv_txn_as(6, x, 1, create(), false)).await,
        WriteOutcome::StaleSequence { last_seq: 2 }
    );
    assert_eq!(get(&r, "k"), Some(kv("k", b"v2", 1, 4, 2)));

    // A retry in the same apply call, and one in the same entry.
    let y = client(2);
    let wipe = || txn_of(vec![], vec![del_op(from_key(""), true)], vec![]);
    let gone = done(rev(7), true, vec![deleted(1, vec![record("k", b"v2", 1, 4, 2, 0)])]);
    let results = apply(&mut sm, vec![kv_txn_as(7, y, 1, wipe(), false), kv_txn_as(8, y, 1, wipe(), false)]).await;
    assert_eq!(results, vec![ApplyResult(vec![gone.clone()]), ApplyResult(vec![gone])]);
    let z = client(3);
    let again = request(z, 1, kv_txn_cmd(KvTxn::op(put_op("once", "1")), false));
    let results = apply(&mut sm, vec![multi(9, vec![again.clone(), again])]).await;
    let once = done(write_revision(9, 0), true, vec![put_result(None)]);
    assert_eq!(results, vec![ApplyResult(vec![once.clone(), once])]);
    assert_eq!(get(&r, "once").map(|kv| kv.version), Some(1));

    // A refusal that is recorded answers the same even once the key exists.
    let w = client(4);
    let keep = || KvTxn::op(KvOp::Put(KvPut { ignore_value: true, ..kput("m", "") }));
    let refused = WriteOutcome::KeyNotFound { key: b"m".to_vec() };
    assert_eq!(apply_write(&mut sm, kv_txn_as(10, w, 1, keep(), false)).await, refused);
    apply(&mut sm, vec![put(1, 11, "m", b"x")]).await;
    assert_eq!(apply_write(&mut sm, kv_txn_as(12, w, 1, keep(), false)).await, refused);
    assert_eq!(get(&r, "m"), Some(kv("m", b"x", 11, 11, 1)));
    assert_digest_recounts(&r);

    // Sessions survive a restart.
    drop((r, sm));
    let mut sm = open_sm(dir.path());
    assert_eq!(apply_write(&mut sm, kv_txn_as(13, x, 2, create(), false)).await, second);
    assert_eq!(apply_write(&mut sm, kv_txn_as(14, w, 1, keep(), false)).await, refused);
    assert_digest_recounts(&sm.reader());
}

/// A log of every kind of KvTxn apply: leases, unchecked puts and their resends, retries,
/// nested txns, deletes of everything, refusals, several txns in an entry, read-only txns.
fn kv_txn_log() -> Vec<Entry> {
    let (x, y, z) = (client(1), client(2), client(3));
    let leased = |key: &str, lease: u64| KvTxn::op(KvOp::Put(KvPut { lease, ..kput(key, "v") }));
    vec![
        membership(1, 1, &[1]),
        grant(2, 5, 30),
        kv_txn(3, txn_of(vec![], vec![KvOp::Put(KvPut { lease: 5, ..kput("a", "a1") }), put_op("b", "b1")], vec![])),
        kv_txn_as(4, x, 1, leased("far", 99), false),
        kv_txn_as(5, x, 1, leased("far", 99), true),
        kv_txn_as(6, x, 1, leased("far", 99), false),
        kv_txn(
            7,
            txn_of(
                vec![cmp(single("a"), Equal, version(1))],
                vec![
                    del_op(prefix(""), true),
                    nested(vec![cmp(single("b"), Greater, version(0))], vec![put_op("c", "c1")], vec![]),
                ],
                vec![],
            ),
        ),
        multi(
            8,
            vec![
                request(y, 1, kv_txn_cmd(KvTxn::op(KvOp::Put(KvPut { prev_kv: true, ..kput("d", "d1") })), false)),
                request(z, 1, kv_txn_cmd(KvTxn::op(range_op(query(from_key("")))), false)),
                request(y, 1, kv_txn_cmd(KvTxn::op(put_op("d", "d1")), false)),
            ],
        ),
        kv_txn(9, KvTxn::op(KvOp::Put(KvPut { ignore_value: true, ..kput("e", "") }))),
        raw(10, &reserved("token"), b"t"),
        kv_txn(11, txn_of(vec![], vec![put_op("f", "f1"), del_op(from_key(""), true)], vec![])),
        kv_txn(12, leased("g", 5)),
        revoke(13, 5),
        lease_drop(14, 99),
        blank(1, 15),
        node_txn(16, KvTxn::op(range_op(query(from_key(RESERVED_PREFIX))))),
        kv_txn(
            17,
            txn_of(
                vec![],
                vec![KvOp::Put(KvPut { ignore_lease: true, prev_kv: true, ..kput("token2", "x") })],
                vec![put_op("h", "h1")],
            ),
        ),
        kv_txn_as(
            18,
            z,
            2,
            txn_of(vec![cmp(prefix(""), Equal, version(0))], vec![put_op("i", "i1")], vec![put_op("j", "j1")]),
            false,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_of_kv_txns_replays_to_the_same_state() {
    let log = kv_txn_log();
    let (dir_a, dir_b, dir_c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, mut b, mut c) = (open_sm(dir_a.path()), open_sm(dir_b.path()), open_sm(dir_c.path()));
    let mut one_by_one = Vec::new();
    for entry in log.clone() {
        one_by_one.extend(apply(&mut a, vec![entry]).await);
        assert_digest_recounts(&a.reader());
    }
    let all_at_once = apply(&mut b, log.clone()).await;
    let mut rest = log;
    let mut in_chunks = Vec::new();
    for n in [2, 5, 1, 7, 3] {
        let chunk: Vec<Entry> = rest.drain(..n.min(rest.len())).collect();
        in_chunks.extend(apply(&mut c, chunk).await);
    }
    assert!(rest.is_empty());
    assert_eq!(one_by_one, all_at_once);
    assert_eq!(one_by_one, in_chunks);
    assert_eq!(a.reader().digest().unwrap(), b.reader().digest().unwrap());
    assert_eq!(a.reader().digest().unwrap(), c.reader().digest().unwrap());
    assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
    assert_eq!(a.fingerprint().unwrap(), c.fingerprint().unwrap());
    assert_digest_recounts(&b.reader());
    assert_digest_recounts(&c.reader());

    // What the log did, as a client would see it.
    let outcome = |index: u64| one_by_one[index as usize - 1].0.clone();
    assert_eq!(outcome(4), vec![WriteOutcome::LeaseUnchecked { id: 99 }]);
    assert_eq!(outcome(5), vec![done(rev(5), true, vec![put_result(None)])]);
    assert_eq!(outcome(6), outcome(5));
    assert_eq!(
        outcome(7),
        vec![done(
            rev(7),
            true,
            vec![
                deleted(
                    3,
                    vec![
                        record("a", b"a1", 3, 3, 1, 5),
                        record("b", b"b1", 3, 3, 1, 0),
                        record("far", b"v", 5, 5, 1, 99)
                    ]
                ),
                KvOpResult::Txn { succeeded: true, results: vec![put_result(None)] },
            ]
        )]
    );
    let d = KeyRecord {
        key: b"d".to_vec(),
        value: b"d1".to_vec(),
        create_revision: write_revision(8, 0),
        mod_revision: write_revision(8, 0),
        version: 1,
        lease: 0,
    };
    let c_rec = record("c", b"c1", 7, 7, 1, 0);
    assert_eq!(
        outcome(8),
        vec![
            done(write_revision(8, 0), true, vec![put_result(None)]),
            done(
                write_revision(8, 0),
                true,
                vec![KvOpResult::Range(page(vec![c_rec.clone(), d.clone()], 2, false, write_revision(8, 1)))]
            ),
            done(write_revision(8, 0), true, vec![put_result(None)]),
        ]
    );
    assert_eq!(outcome(9), vec![WriteOutcome::KeyNotFound { key: b"e".to_vec() }]);
    assert_eq!(
        outcome(11),
        vec![done(rev(11), true, vec![put_result(None), deleted(3, vec![c_rec, d, record("f", b"f1", 11, 11, 1, 0)])])]
    );
    assert_eq!(outcome(12), vec![done(rev(12), true, vec![put_result(None)])]);
    assert_eq!(outcome(13), vec![WriteOutcome::LeaseRevoked { revision: rev(13), deleted: 1 }]);
    assert_eq!(outcome(14), vec![WriteOutcome::LeaseRevoked { revision: rev(14), deleted: 0 }]);
    assert_eq!(
        outcome(16),
        vec![done(rev(16) - 1, true, vec![KvOpResult::Range(page(vec![token_at(10)], 1, false, rev(16)))])]
    );
    assert_eq!(outcome(17), vec![WriteOutcome::KeyNotFound { key: b"token2".to_vec() }]);
    assert_eq!(outcome(18), vec![done(rev(18), true, vec![put_result(None)])]);
    let keys: Vec<Vec<u8>> = all_keys(&a.reader()).into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, vec![reserved("token"), b"i".to_vec()]);
}

/// The reserved key `token` written by the entry at `index`.
fn token_at(index: u64) -> KeyRecord {
    record(reserved("token"), b"t", index, index, 1, 0)
}

// ---------------------------------------------------------------------------------------------
// Found by these tests
// ---------------------------------------------------------------------------------------------

/// A put that keeps the value of a key must find the key; one that a nested txn runs after the
/// key was deleted earlier on the same path does not, and must not make up a value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeping_the_value_of_a_key_deleted_earlier_in_the_txn_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    apply(&mut sm, vec![put(1, 1, "k", b"v")]).await;
    let keep = KvOp::Put(KvPut { ignore_value: true, ..kput("k", "") });
    let t = txn_of(vec![], vec![del_op(single("k"), false), nested(vec![], vec![keep], vec![])], vec![]);
    let outcome = apply_write(&mut sm, kv_txn(2, t)).await;
    assert_eq!(get(&r, "k"), Some(kv("k", b"v", 1, 1, 1)), "{outcome:?}");
    assert_eq!(outcome, WriteOutcome::KeyNotFound { key: b"k".to_vec() });
}

/// A txn that writes nothing, evaluated on a read of the state (the etcd API's read-only txns:
/// no log entry), answers exactly what applying it as the next entry answers: the branch its
/// compares pick, its ranges (nested ones too), and the revision the last entry left. One that
/// writes is refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_txn_read_answers_what_applying_it_would() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    seed(&mut sm).await;
    let txns = vec![
        txn_of(vec![cmp(single("a"), Equal, version(2))], vec![range_op(query(prefix("a")))], vec![]),
        txn_of(
            vec![cmp(single("a"), Equal, value("nope"))],
            vec![range_op(query(single("b")))],
            vec![range_op(query(from_key("ab"))), nested(vec![], vec![range_op(query(single("c")))], vec![])],
        ),
        txn_of(vec![cmp(prefix("a"), Greater, version(0))], vec![], vec![range_op(query(single("zz")))]),
        txn_of(vec![], vec![range_op(query(span("ab", "c"))), range_op(query(prefix("")))], vec![]),
    ];
    for (next, t) in (SEEDED + 1..).zip(txns) {
        assert!(t.is_read_only());
        let (revision, succeeded, results) = r.kv_txn_read(t.clone()).expect("a txn read");
        assert_eq!(revision, applied_revision(next - 1));
        // Applied, a range inside reports the entry's revision; read, the state's (the etcd
        // API answers every op with the txn's revision, so only the keys and counts matter).
        let applied = match apply_write(&mut sm, node_txn(next, t.clone())).await {
            WriteOutcome::KvTxn { revision, succeeded, results } => done(revision, succeeded, at_revision(results, 0)),
            other => panic!("{other:?}"),
        };
        assert_eq!(applied, done(revision, succeeded, at_revision(results, 0)), "{t:?}");
    }
    let writes = txn_of(vec![], vec![range_op(query(single("a")))], vec![put_op("x", "y")]);
    assert!(!writes.is_read_only());
    assert!(r.kv_txn_read(writes).is_err(), "a txn that may write is not read");
    assert_eq!(r.get(b"x").unwrap(), None);
}

/// `results` with every range page's revision set to `revision`.
fn at_revision(results: Vec<KvOpResult>, revision: u64) -> Vec<KvOpResult> {
    results
        .into_iter()
        .map(|r| match r {
            KvOpResult::Range(p) => KvOpResult::Range(RangePage { revision, ..p }),
            KvOpResult::Txn { succeeded, results } => {
                KvOpResult::Txn { succeeded, results: at_revision(results, revision) }
            }
            other => other,
        })
        .collect()
}
