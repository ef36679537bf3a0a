//! etcd-shaped key operations on the state machine (`api::kv`; docs/design.md §18): range reads
//! (on a read transaction, or inside a txn being applied) and the apply of
//! [`WriteCommand::KvTxn`](crate::api::WriteCommand::KvTxn).
//!
//! A txn is decided before anything changes, as etcd does: every compare, nested txns' included,
//! is evaluated against the state before the txn (which branch of each level runs), then the
//! puts on that path are checked (a lease that must exist, a key whose value or lease is kept);
//! only then do its ops apply, in order, each seeing the ones before, every change at the txn's
//! revision. A refused txn changes nothing.

use std::ops::Bound;

use redb::ReadableTable;

use super::{decode_value, put, remove, StoredValue, WriteTables};
use crate::{
    api::{
        is_reserved_key, KeyRange, KeyRecord, KvOp, KvOpResult, KvTxn, RangePage, RangeQuery, Revision, WriteOutcome,
    },
    storage::StorageError,
};

/// Most bytes of keys and values one range answer carries (a quarter frame); a range with more
/// says `more` and is read on in pages (`RangeQuery::after`). Inside a txn, every range and
/// every list of deleted keys shares one budget of this size.
pub const MAX_RANGE_ANSWER_BYTES: usize = crate::api::MAX_FRAME_BYTES / 4;

fn record(key: &[u8], s: StoredValue) -> KeyRecord {
    KeyRecord {
        key: key.to_vec(),
        value: s.value,
        create_revision: s.create_revision,
        mod_revision: s.mod_revision,
        version: s.version,
        lease: s.lease,
    }
}

/// The bounds of `range` for a redb range over the KV table (after `after`, if given).
fn bounds<'a>(range: &'a KeyRange, after: Option<&'a [u8]>) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    let lower = match after {
        Some(a) if a >= range.key.as_slice() => Bound::Excluded(a),
        _ => Bound::Included(range.key.as_slice()),
    };
    let upper = match (&range.end, range.upper()) {
        (None, _) => Bound::Included(range.key.as_slice()),
        (Some(_), Some(end)) => Bound::Excluded(end),
        (Some(_), None) => Bound::Unbounded,
    };
    (lower, upper)
}

/// Whether a client's range passes over the cluster's reserved keys (it does unless it starts in
/// the reserved keyspace: the cluster's own reads).
fn skips_reserved(range: &KeyRange) -> bool {
    !is_reserved_key(&range.key)
}

/// Reads `q` from `kv` (any readable KV table: a read transaction's, or the one a txn is
/// writing), reporting `revision` as the revision seen, with at most `budget` bytes of keys and
/// values (taken from it).
pub(crate) fn range_read<T>(
    kv: &T,
    q: &RangeQuery,
    revision: Revision,
    budget: &mut usize,
) -> Result<RangePage, StorageError>
where
    T: ReadableTable<&'static [u8], &'static [u8]>,
{
    let mut page = RangePage { kvs: Vec::new(), count: 0, more: false, revision };
    if q.range.is_empty() || (q.range.is_single() && q.after.is_some()) {
        return Ok(page);
    }
    let skip_reserved = skips_reserved(&q.range);
    let (lower, upper) = bounds(&q.range, q.after.as_deref());
    if matches!((lower, upper), (Bound::Excluded(l), Bound::Excluded(u)) if l >= u) {
        return Ok(page);
    }
    let mut full = false;
    for item in kv.range::<&[u8]>((lower, upper))? {
        let (k, v) = item?;
        let key = k.value();
        if skip_reserved && is_reserved_key(key) {
            continue;
        }
        // etcd's count: every key of the range, whatever the revision filters say.
        page.count += 1;
        if q.count_only || full {
            continue;
        }
        let kr = record(key, decode_value(v.value())?);
        if !q.admits(&kr) {
            continue;
        }
        if q.limit > 0 && page.kvs.len() as u64 >= q.limit {
            full = true;
            page.more = true;
            continue;
        }
        let size = kr.key.len() + if q.keys_only { 0 } else { kr.value.len() } + 64;
        if size > *budget && !page.kvs.is_empty() {
            full = true;
            page.more = true;
            continue;
        }
        *budget = budget.saturating_sub(size);
        let mut kr = kr;
        if q.keys_only {
            kr.value = Vec::new();
        }
        page.kvs.push(kr);
    }
    Ok(page)
}

/// A key's stored state as a record, if present.
fn current<T>(kv: &T, key: &[u8]) -> Result<Option<KeyRecord>, StorageError>
where
    T: ReadableTable<&'static [u8], &'static [u8]>,
{
    match kv.get(key)? {
        Some(v) => Ok(Some(record(key, decode_value(v.value())?))),
        None => Ok(None),
    }
}

/// Which branch each level of a txn takes, decided on the state before it: `succeeded`, and
/// the paths of the nested txns of that branch, in order.
struct Path {
    succeeded: bool,
    nested: Vec<Path>,
}

fn decide<T>(kv: &T, txn: &KvTxn) -> Result<Path, StorageError>
where
    T: ReadableTable<&'static [u8], &'static [u8]>,
{
    let mut succeeded = true;
    for c in &txn.compares {
        if !compare_holds(kv, c)? {
            succeeded = false;
            break;
        }
    }
    let branch = if succeeded { &txn.success } else { &txn.failure };
    let mut nested = Vec::new();
    for op in branch {
        if let KvOp::Txn(t) = op {
            nested.push(decide(kv, t)?);
        }
    }
    Ok(Path { succeeded, nested })
}

fn compare_holds<T>(kv: &T, c: &crate::api::KvCompare) -> Result<bool, StorageError>
where
    T: ReadableTable<&'static [u8], &'static [u8]>,
{
    if c.range.is_single() {
        return Ok(c.holds_for(current(kv, &c.range.key)?.as_ref()));
    }
    if c.range.is_empty() {
        return Ok(c.holds_for(None));
    }
    let skip_reserved = skips_reserved(&c.range);
    let mut any = false;
    for item in kv.range::<&[u8]>(bounds(&c.range, None))? {
        let (k, v) = item?;
        if skip_reserved && is_reserved_key(k.value()) {
            continue;
        }
        any = true;
        if !c.holds_for(Some(&record(k.value(), decode_value(v.value())?))) {
            return Ok(false);
        }
    }
    Ok(any || c.holds_for(None))
}

/// What the ops of a txn's path did to keys so far, as far as a later put that keeps a key's
/// value or lease must know: keys put, and ranges deleted after them.
#[derive(Default)]
struct PathWrites {
    put: std::collections::BTreeSet<Vec<u8>>,
    deleted: Vec<KeyRange>,
}

/// Why a txn's path cannot apply: the outcome to answer with instead. A put that keeps the
/// value or lease of its key needs the key to exist at that point of the path (before the txn,
/// and not deleted by an op before it; or put by one).
fn refusal(
    t: &mut WriteTables<'_, '_>,
    txn: &KvTxn,
    path: &Path,
    checked: bool,
) -> Result<Option<WriteOutcome>, StorageError> {
    refusal_in(t, txn, path, checked, &mut PathWrites::default())
}

fn refusal_in(
    t: &mut WriteTables<'_, '_>,
    txn: &KvTxn,
    path: &Path,
    checked: bool,
    writes: &mut PathWrites,
) -> Result<Option<WriteOutcome>, StorageError> {
    let branch = if path.succeeded { &txn.success } else { &txn.failure };
    let mut nested = path.nested.iter();
    for op in branch {
        match op {
            KvOp::Put(p) => {
                if p.ignore_value || p.ignore_lease {
                    let exists = writes.put.contains(&p.key)
                        || (!writes.deleted.iter().any(|r| r.contains(&p.key))
                            && t.kv.get(p.key.as_slice())?.is_some());
                    if !exists {
                        return Ok(Some(WriteOutcome::KeyNotFound { key: p.key.clone() }));
                    }
                }
                if p.lease != 0 && !p.ignore_lease {
                    match super::lease_known(t, p.lease, checked)? {
                        Some(true) => {}
                        Some(false) => return Ok(Some(WriteOutcome::LeaseNotFound { id: p.lease })),
                        None => return Ok(Some(WriteOutcome::LeaseUnchecked { id: p.lease })),
                    }
                }
                writes.put.insert(p.key.clone());
            }
            KvOp::DeleteRange { range, .. } => {
                writes.put.retain(|k| !range.contains(k));
                writes.deleted.push(range.clone());
            }
            KvOp::Txn(inner) => {
                let Some(p) = nested.next() else { return Err(StorageError::Corrupt("txn path out of step".into())) };
                if let Some(r) = refusal_in(t, inner, p, checked, writes)? {
                    return Ok(Some(r));
                }
            }
            KvOp::Range(_) => {}
        }
    }
    Ok(None)
}

/// Applies a txn at `revision` (see the module docs). Returns the outcome, and whether it is
/// to be recorded in the write's session (a [`WriteOutcome::LeaseUnchecked`] is not: the node
/// checks the lease and resends).
pub(super) fn apply_kv_txn(
    t: &mut WriteTables<'_, '_>,
    revision: Revision,
    txn: KvTxn,
    leases_checked: bool,
) -> Result<WriteOutcome, StorageError> {
    let path = decide(&*t.kv, &txn)?;
    if let Some(refused) = refusal(t, &txn, &path, leases_checked)? {
        return Ok(refused);
    }
    let mut budget = MAX_RANGE_ANSWER_BYTES;
    let mut wrote = false;
    let first_event = t.events.as_ref().map_or(0, |e| e.len());
    let writes_twice = writes(&txn) > 1;
    let results = run(t, revision, txn, &path, &mut budget, &mut wrote)?;
    if writes_twice {
        if let Some(events) = t.events.as_deref_mut() {
            prev_before_the_txn(&mut events[first_event..]);
        }
    }
    // A txn that changed nothing reports the shard's revision before it (etcd: a read-only txn
    // does not move the revision): at or after every earlier write, before every later one.
    let revision = if wrote { revision } else { revision.saturating_sub(1) };
    Ok(WriteOutcome::KvTxn { revision, succeeded: path.succeeded, results })
}

/// Write ops of a txn, both branches and nested txns included.
fn writes(txn: &KvTxn) -> usize {
    txn.success
        .iter()
        .chain(&txn.failure)
        .map(|op| match op {
            KvOp::Put(_) | KvOp::DeleteRange { .. } => 1,
            KvOp::Txn(t) => writes(t),
            KvOp::Range(_) => 0,
        })
        .sum()
}

/// A key a txn writes twice (deleted, then put again) has two events of the txn's revision:
/// each carries the key as it was before the txn, as etcd's do (an event's previous key is the
/// key at the revision before it), not as the txn's earlier op left it.
fn prev_before_the_txn(events: &mut [crate::api::WatchEvent]) {
    let mut first: std::collections::HashMap<Vec<u8>, usize> = std::collections::HashMap::new();
    for i in 0..events.len() {
        match first.get(&events[i].key) {
            Some(&j) => {
                let (prev_value, prev_meta) = (events[j].prev_value.clone(), events[j].prev_meta);
                events[i].prev_value = prev_value;
                events[i].prev_meta = prev_meta;
            }
            None => {
                first.insert(events[i].key.clone(), i);
            }
        }
    }
}

fn run(
    t: &mut WriteTables<'_, '_>,
    revision: Revision,
    txn: KvTxn,
    path: &Path,
    budget: &mut usize,
    wrote: &mut bool,
) -> Result<Vec<KvOpResult>, StorageError> {
    let branch = if path.succeeded { txn.success } else { txn.failure };
    let mut nested = path.nested.iter();
    let mut results = Vec::with_capacity(branch.len());
    for op in branch {
        let result = match op {
            KvOp::Range(q) => {
                // The revision a range in a txn reports: the txn's (etcd's header revision).
                KvOpResult::Range(range_read(&*t.kv, &q, revision, budget)?)
            }
            KvOp::Put(p) => {
                let old = current(&*t.kv, &p.key)?;
                let value = match (&old, p.ignore_value) {
                    (Some(o), true) => o.value.clone(),
                    _ => p.value,
                };
                let lease = match (&old, p.ignore_lease) {
                    (Some(o), true) => o.lease,
                    _ => p.lease,
                };
                put(t, &p.key, value, revision, lease)?;
                *wrote = true;
                KvOpResult::Put { prev: if p.prev_kv { old } else { None } }
            }
            KvOp::DeleteRange { range, prev_kv } => {
                let (deleted, prev) = delete_range(t, &range, prev_kv, revision, budget)?;
                *wrote |= deleted > 0;
                KvOpResult::DeleteRange { deleted, prev }
            }
            KvOp::Txn(inner) => {
                let Some(p) = nested.next() else { return Err(StorageError::Corrupt("txn path out of step".into())) };
                let results = run(t, revision, inner, p, budget, wrote)?;
                KvOpResult::Txn { succeeded: p.succeeded, results }
            }
        };
        results.push(result);
    }
    Ok(results)
}

/// Deletes every key of `range` (the cluster's reserved keys only if the range starts among
/// them), each as `remove` would; returns how many went and, if asked, each as it was (as many
/// as `budget` allows).
fn delete_range(
    t: &mut WriteTables<'_, '_>,
    range: &KeyRange,
    prev_kv: bool,
    revision: Revision,
    budget: &mut usize,
) -> Result<(u64, Vec<KeyRecord>), StorageError> {
    let mut prev = Vec::new();
    let mut keep_prev = |kr: KeyRecord, budget: &mut usize| {
        let size = kr.key.len() + kr.value.len() + 64;
        if prev_kv && size <= *budget {
            *budget -= size;
            prev.push(kr);
        }
    };
    if range.is_single() {
        let old = current(&*t.kv, &range.key)?;
        let existed = remove(t, &range.key, revision)?;
        if let Some(o) = old {
            keep_prev(o, budget);
        }
        return Ok((u64::from(existed), prev));
    }
    if range.is_empty() {
        return Ok((0, prev));
    }
    let skip_reserved = skips_reserved(range);
    let mut keys = Vec::new();
    for item in t.kv.range::<&[u8]>(bounds(range, None))? {
        let (k, _) = item?;
        if !(skip_reserved && is_reserved_key(k.value())) {
            keys.push(k.value().to_vec());
        }
    }
    let mut deleted = 0;
    for key in keys {
        let old = current(&*t.kv, &key)?;
        if remove(t, &key, revision)? {
            deleted += 1;
        }
        if let Some(o) = old {
            keep_prev(o, budget);
        }
    }
    Ok((deleted, prev))
}

/// Evaluates a txn that writes nothing ([`KvTxn::is_read_only`]) on one read transaction of the
/// state machine: its compares decide the branch as [`apply_kv_txn`] would, and its ranges
/// read that state. Returns the applied revision (what etcd reports for a read-only txn: the
/// store's current revision), the branch taken and the results.
pub(super) fn read_txn(db: &redb::Database, txn: KvTxn) -> Result<(Revision, bool, Vec<KvOpResult>), StorageError> {
    use redb::ReadableDatabase;
    if !txn.is_read_only() {
        return Err(StorageError::Corrupt("a txn that writes was sent to be read".into()));
    }
    let rtx = db.begin_read()?;
    let applied: Option<super::LogId> = super::read_meta(&rtx.open_table(super::META)?, super::KEY_LAST_APPLIED)?;
    let revision = crate::api::applied_revision(applied.map_or(0, |l| l.index));
    let kv = rtx.open_table(super::KV)?;
    let path = decide(&kv, &txn)?;
    let mut budget = MAX_RANGE_ANSWER_BYTES;
    let results = read_branch(&kv, txn, &path, revision, &mut budget)?;
    Ok((revision, path.succeeded, results))
}

/// The results of a read-only txn's branch `path` (its ranges, nested txns' included).
fn read_branch<T>(
    kv: &T,
    txn: KvTxn,
    path: &Path,
    revision: Revision,
    budget: &mut usize,
) -> Result<Vec<KvOpResult>, StorageError>
where
    T: ReadableTable<&'static [u8], &'static [u8]>,
{
    let branch = if path.succeeded { txn.success } else { txn.failure };
    let mut nested = path.nested.iter();
    let mut results = Vec::with_capacity(branch.len());
    for op in branch {
        results.push(match op {
            KvOp::Range(q) => KvOpResult::Range(range_read(kv, &q, revision, budget)?),
            KvOp::Txn(inner) => {
                let Some(p) = nested.next() else { return Err(StorageError::Corrupt("txn path out of step".into())) };
                KvOpResult::Txn { succeeded: p.succeeded, results: read_branch(kv, inner, p, revision, budget)? }
            }
            KvOp::Put(_) | KvOp::DeleteRange { .. } => {
                return Err(StorageError::Corrupt("a txn that writes was sent to be read".into()))
            }
        });
    }
    Ok(results)
}

/// Reads `q` on a read transaction of the state machine, reporting the applied revision.
pub(super) fn read_range(db: &redb::Database, q: &RangeQuery) -> Result<RangePage, StorageError> {
    use redb::ReadableDatabase;
    let txn = db.begin_read()?;
    let applied: Option<super::LogId> = super::read_meta(&txn.open_table(super::META)?, super::KEY_LAST_APPLIED)?;
    let revision = crate::api::applied_revision(applied.map_or(0, |l| l.index));
    let kv = txn.open_table(super::KV)?;
    let mut budget = MAX_RANGE_ANSWER_BYTES;
    range_read(&kv, q, revision, &mut budget)
}
