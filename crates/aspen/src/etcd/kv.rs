//! etcd's KV service: Range, Put, DeleteRange, Txn and Compact (docs/design.md §18), each
//! turned into the node's range reads and `KvTxn` writes.
//!
//! A put or a single-key delete is a write of its key's shard; a range delete one write per
//! shard the range may reach (each atomic in its shard); a txn one write of the one shard all
//! its keys are in — a txn whose keys span shards is refused (`FAILED_PRECONDITION`, naming the
//! shards). A range at a past revision of one shard is read from the state now and the serving
//! node's watch history (`storage::past`); a range over several shards at a revision is refused.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    gateway::{errors, key_range, kv_of, revision_u64, unknown_outcome, Caller, EtcdNode, Gateway},
    proto::etcdserverpb::{
        compare::{CompareResult, CompareTarget, TargetUnion},
        kv_server::Kv,
        range_request::{SortOrder, SortTarget},
        request_op, response_op, CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest,
        DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseOp, TxnRequest,
        TxnResponse,
    },
};
use crate::api::{
    is_reserved_key, CompareOp, KeyRange, KeyRecord, KvCompare, KvCompareTarget, KvOp, KvOpResult, KvPut, KvTxn,
    RangePage, RangeQuery, ReadConsistency, Revision, ShardId, WriteCommand, WriteOutcome,
};

/// etcd's KV service over a node.
#[derive(Debug)]
pub struct KvService<N: EtcdNode>(pub Arc<Gateway<N>>);

fn reserved(key: &[u8]) -> Result<(), Status> {
    if is_reserved_key(key) {
        return Err(Status::invalid_argument("keys starting with \\x00aspen/ are reserved for the cluster"));
    }
    Ok(())
}

/// A range as etcd requests name it; refused if it is empty or starts in the reserved keys.
fn request_range(key: Vec<u8>, range_end: Vec<u8>) -> Result<KeyRange, Status> {
    if key.is_empty() && range_end.is_empty() {
        return Err(Status::invalid_argument(errors::EMPTY_KEY));
    }
    reserved(&key)?;
    Ok(key_range(key, range_end))
}

fn lease_of(lease: i64) -> Result<u64, Status> {
    u64::try_from(lease).map_err(|_| Status::invalid_argument(format!("lease id {lease} is negative")))
}

/// How a range's keys are ordered in its answer: `None` for key order (what shards give).
fn sorting(r: &RangeRequest) -> Option<(SortTarget, bool)> {
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    let order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    match (target, order) {
        (SortTarget::Key, SortOrder::None | SortOrder::Ascend) => None,
        (t, SortOrder::Descend) => Some((t, true)),
        (t, _) => Some((t, false)),
    }
}

/// The node's query for an etcd range (a sorted range reads the keys etcd would, then sorts and
/// cuts them: `finish_range`).
fn range_query(r: &RangeRequest) -> Result<RangeQuery, Status> {
    if r.revision < 0 || r.limit < 0 {
        return Err(Status::invalid_argument("negative revision or limit"));
    }
    let range = request_range(r.key.clone(), r.range_end.clone())?;
    let sort = sorting(r);
    // What etcd reads before it sorts and cuts: every key if an order is asked for or a
    // revision filter is set; else the first `limit` + 1 in key order when it sorts anyway (a
    // target other than the key with no order sorts ascending — those keys only, as etcd does).
    let order_asked = SortOrder::try_from(r.sort_order).is_ok_and(|o| o != SortOrder::None);
    let filtered =
        r.min_mod_revision > 0 || r.max_mod_revision > 0 || r.min_create_revision > 0 || r.max_create_revision > 0;
    let limit = match sort {
        _ if r.limit == 0 => 0,
        None => r.limit as u64,
        Some(_) if order_asked || filtered => 0,
        Some(_) => r.limit as u64 + 1,
    };
    // Sorted by value, keys only: the values are read to sort by, then left out (finish_range).
    let by_value = matches!(sort, Some((SortTarget::Value, _)));
    Ok(RangeQuery {
        range,
        limit,
        keys_only: r.keys_only && !by_value,
        count_only: r.count_only,
        min_mod_revision: revision_u64(r.min_mod_revision),
        max_mod_revision: revision_u64(r.max_mod_revision),
        min_create_revision: revision_u64(r.min_create_revision),
        max_create_revision: revision_u64(r.max_create_revision),
        after: None,
    })
}

/// Sorts and cuts a page as `r` asks (key order and the limit are the shards' already).
fn finish_range(r: &RangeRequest, mut page: RangePage) -> RangePage {
    if let Some((target, descend)) = sorting(r) {
        fn field(target: SortTarget, kv: &KeyRecord) -> (u64, &[u8]) {
            match target {
                SortTarget::Key => (0, kv.key.as_slice()),
                SortTarget::Version => (kv.version, &[]),
                SortTarget::Create => (kv.create_revision, &[]),
                SortTarget::Mod => (kv.mod_revision, &[]),
                SortTarget::Value => (0, kv.value.as_slice()),
            }
        }
        // Ties stay in key order, descending too (etcd's sort keeps them so).
        page.kvs.sort_by(|a, b| {
            let by_field = field(target, a).cmp(&field(target, b));
            if descend { by_field.reverse() } else { by_field }.then_with(|| a.key.cmp(&b.key))
        });
        // The keys etcd would read were read, unless a byte budget cut them (a range in a txn:
        // `more` from the read then); more also if the limit cuts them.
        let cut = r.limit > 0 && page.kvs.len() as u64 > r.limit as u64;
        if cut {
            page.kvs.truncate(r.limit as usize);
        }
        page.more = (page.more || cut) && !r.count_only;
        if r.keys_only {
            page.kvs.iter_mut().for_each(|kv| kv.value = Vec::new());
        }
    }
    page
}

/// A range over several shards at a revision: refused, since a revision is a position in one
/// shard's history (the state "at" it is no one state of several shards).
const SEVERAL_SHARDS_AT_A_REVISION: &str = "a range over several shards cannot be read at a revision: revisions are \
     per shard (docs/etcd.md, \"Sharded clusters\"); read it without one, or each key at its shard's revision";

fn compare_of(c: Compare) -> Result<KvCompare, Status> {
    let op = match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => CompareOp::Equal,
        Ok(CompareResult::Greater) => CompareOp::Greater,
        Ok(CompareResult::Less) => CompareOp::Less,
        Ok(CompareResult::NotEqual) => CompareOp::NotEqual,
        Err(_) => return Err(Status::invalid_argument(format!("unknown compare result {}", c.result))),
    };
    let target = match (CompareTarget::try_from(c.target), c.target_union) {
        (Ok(CompareTarget::Version), Some(TargetUnion::Version(v))) => KvCompareTarget::Version(revision_u64(v)),
        (Ok(CompareTarget::Create), Some(TargetUnion::CreateRevision(v))) => {
            KvCompareTarget::CreateRevision(revision_u64(v))
        }
        (Ok(CompareTarget::Mod), Some(TargetUnion::ModRevision(v))) => KvCompareTarget::ModRevision(revision_u64(v)),
        (Ok(CompareTarget::Value), Some(TargetUnion::Value(v))) => KvCompareTarget::Value(v),
        (Ok(CompareTarget::Lease), Some(TargetUnion::Lease(v))) => KvCompareTarget::Lease(revision_u64(v)),
        // proto3 leaves a zero target out: a compare with 0.
        (Ok(CompareTarget::Version), None) => KvCompareTarget::Version(0),
        (Ok(CompareTarget::Create), None) => KvCompareTarget::CreateRevision(0),
        (Ok(CompareTarget::Mod), None) => KvCompareTarget::ModRevision(0),
        (Ok(CompareTarget::Value), None) => KvCompareTarget::Value(Vec::new()),
        (Ok(CompareTarget::Lease), None) => KvCompareTarget::Lease(0),
        (target, union) => {
            return Err(Status::invalid_argument(format!("compare target {target:?} does not match {union:?}")))
        }
    };
    Ok(KvCompare { range: request_range(c.key, c.range_end)?, op, target })
}

fn put_of(p: PutRequest) -> Result<KvPut, Status> {
    if p.key.is_empty() {
        return Err(Status::invalid_argument(errors::EMPTY_KEY));
    }
    reserved(&p.key)?;
    if p.ignore_value && !p.value.is_empty() {
        return Err(Status::invalid_argument(errors::VALUE_PROVIDED));
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(Status::invalid_argument(errors::LEASE_PROVIDED));
    }
    Ok(KvPut {
        key: p.key,
        value: p.value,
        lease: lease_of(p.lease)?,
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    })
}

fn op_of(op: RequestOp) -> Result<KvOp, Status> {
    Ok(match op.request {
        Some(request_op::Request::RequestRange(r)) => {
            if r.revision != 0 {
                return Err(Status::unimplemented(
                    "a range at a revision is not supported inside a txn (a txn reads the current state); read it with a Range",
                ));
            }
            KvOp::Range(range_query(&r)?)
        }
        Some(request_op::Request::RequestPut(p)) => KvOp::Put(put_of(p)?),
        Some(request_op::Request::RequestDeleteRange(d)) => {
            KvOp::DeleteRange { range: request_range(d.key, d.range_end)?, prev_kv: d.prev_kv }
        }
        Some(request_op::Request::RequestTxn(t)) => KvOp::Txn(txn_of(t)?),
        None => return Err(Status::invalid_argument("a txn operation names no request")),
    })
}

fn txn_of(t: TxnRequest) -> Result<KvTxn, Status> {
    let txn = KvTxn {
        compares: t.compare.into_iter().map(compare_of).collect::<Result<_, _>>()?,
        success: t.success.into_iter().map(op_of).collect::<Result<_, _>>()?,
        failure: t.failure.into_iter().map(op_of).collect::<Result<_, _>>()?,
    };
    for branch in [&txn.success, &txn.failure] {
        check_duplicates(branch)?;
    }
    Ok(txn)
}

/// etcd refuses a branch that writes one key twice — two puts, or a put into a deleted range —
/// nested txns included; this is its check (`checkIntervals`), rule for rule, so that what etcd
/// takes Aspen takes: a nested txn's puts may not repeat a put of an earlier nested txn or fall
/// in a delete of the branch or of an earlier nested txn (its two branches may put the same
/// key: only one runs); the branch's own puts may not repeat any put or fall in any delete. A
/// delete to the end of the keyspace (`range_end` `"\0"`) is not seen by etcd's check (its
/// interval is empty there), so it is not here either.
fn check_duplicates(branch: &[KvOp]) -> Result<(), Status> {
    branch_writes(branch).map(|_| ())
}

/// The keys a branch puts and the ranges it deletes (nested txns' included), or the refusal.
fn branch_writes(branch: &[KvOp]) -> Result<(std::collections::BTreeSet<Vec<u8>>, Vec<KeyRange>), Status> {
    let duplicate = || Status::invalid_argument(errors::DUPLICATE_KEY);
    let seen_by_etcd = |r: &KeyRange| r.end.as_ref().is_none_or(|end| !end.is_empty());
    let mut deletes: Vec<KeyRange> = branch
        .iter()
        .filter_map(|op| match op {
            KvOp::DeleteRange { range, .. } if seen_by_etcd(range) => Some(range.clone()),
            _ => None,
        })
        .collect();
    let mut puts = std::collections::BTreeSet::new();
    for op in branch {
        let KvOp::Txn(t) = op else { continue };
        let (then_puts, then_deletes) = branch_writes(&t.success)?;
        let (else_puts, else_deletes) = branch_writes(&t.failure)?;
        let deleted = |k: &Vec<u8>| deletes.iter().any(|r| r.contains(k));
        if then_puts.iter().any(|k| puts.contains(k) || deleted(k))
            || else_puts.iter().any(|k| (puts.contains(k) && !then_puts.contains(k)) || deleted(k))
        {
            return Err(duplicate());
        }
        puts.extend(then_puts);
        puts.extend(else_puts);
        deletes.extend(then_deletes);
        deletes.extend(else_deletes);
    }
    for op in branch {
        let KvOp::Put(p) = op else { continue };
        if puts.contains(&p.key) || deletes.iter().any(|r| r.contains(&p.key)) {
            return Err(duplicate());
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, deletes))
}

impl<N: EtcdNode> KvService<N> {
    /// The one shard a txn's keys are in (every shard a range may reach counts).
    fn txn_shard(&self, txn: &KvTxn) -> Result<ShardId, Status> {
        let gw = &self.0;
        let mut shards = std::collections::BTreeSet::new();
        let mut ranged = false;
        for (key, end) in txn.spans() {
            let range = KeyRange { key: key.to_vec(), end: end.map(<[u8]>::to_vec) };
            ranged |= !range.is_single();
            shards.extend(gw.shards_of(&range));
        }
        match shards.len() {
            0 => Ok(0),
            1 => Ok(*shards.first().unwrap_or(&0)),
            _ => {
                let list: Vec<String> = shards.iter().map(ToString::to_string).collect();
                // Said only when a range is why: a range counts as every shard.
                let why = if ranged { " (a key range reaches every shard)" } else { "" };
                Err(Status::failed_precondition(format!(
                    "a txn is atomic within one shard only; its keys are in shards {}{why}",
                    list.join(", ")
                )))
            }
        }
    }

    /// Runs a txn (a put, a delete, or a client's txn) on its shard: one that writes nothing
    /// as a linearizable read (no log entry, nothing kept in a session), any other as a write.
    async fn run(&self, caller: &Caller, txn: KvTxn) -> Result<(Revision, bool, Vec<KvOpResult>), Status> {
        caller.may_run(&txn)?;
        let shard = self.txn_shard(&txn)?;
        if txn.is_read_only() {
            return self.0.read_txn(shard, txn).await;
        }
        self.0.write(caller, shard, txn).await
    }

    /// The answers of a branch's ops (`ops`: the requests, for their sort orders).
    fn responses(&self, ops: &[RequestOp], results: Vec<KvOpResult>, revision: Revision) -> Vec<ResponseOp> {
        let gw = &self.0;
        ops.iter()
            .zip(results)
            .map(|(op, result)| {
                let response = match (result, &op.request) {
                    (KvOpResult::Range(page), Some(request_op::Request::RequestRange(r))) => {
                        let page = finish_range(r, page);
                        response_op::Response::ResponseRange(RangeResponse {
                            header: gw.header(revision),
                            count: page.count as i64,
                            more: page.more,
                            kvs: page.kvs.into_iter().map(kv_of).collect(),
                        })
                    }
                    (KvOpResult::Range(page), _) => response_op::Response::ResponseRange(RangeResponse {
                        header: gw.header(revision),
                        count: page.count as i64,
                        more: page.more,
                        kvs: page.kvs.into_iter().map(kv_of).collect(),
                    }),
                    (KvOpResult::Put { prev }, _) => response_op::Response::ResponsePut(PutResponse {
                        header: gw.header(revision),
                        prev_kv: prev.map(kv_of),
                    }),
                    (KvOpResult::DeleteRange { deleted, prev }, _) => {
                        response_op::Response::ResponseDeleteRange(DeleteRangeResponse {
                            header: gw.header(revision),
                            deleted: deleted as i64,
                            prev_kvs: prev.into_iter().map(kv_of).collect(),
                        })
                    }
                    (KvOpResult::Txn { succeeded, results }, request) => {
                        let inner = match request {
                            Some(request_op::Request::RequestTxn(t)) => {
                                if succeeded {
                                    t.success.as_slice()
                                } else {
                                    t.failure.as_slice()
                                }
                            }
                            _ => &[],
                        };
                        response_op::Response::ResponseTxn(TxnResponse {
                            header: gw.header(revision),
                            succeeded,
                            responses: self.responses(inner, results, revision),
                        })
                    }
                };
                ResponseOp { response: Some(response) }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl<N: EtcdNode> Kv for KvService<N> {
    async fn range(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let gw = &self.0;
        let caller = gw.caller(request.metadata())?;
        let r = request.into_inner();
        let query = range_query(&r)?;
        caller.may_read(&query.range)?;
        let consistency = if r.serializable { ReadConsistency::Stale } else { ReadConsistency::Linearizable };
        // At a revision: one shard's (a future one is refused for every page read).
        let page = match r.revision {
            0 => gw.range(query, consistency).await?,
            rev => match gw.range_at(query, consistency, revision_u64(rev)).await? {
                Some(page) => page,
                None => return Err(Status::unimplemented(SEVERAL_SHARDS_AT_A_REVISION)),
            },
        };
        let page = finish_range(&r, page);
        Ok(Response::new(RangeResponse {
            header: gw.header(page.revision),
            count: page.count as i64,
            more: page.more,
            kvs: page.kvs.into_iter().map(kv_of).collect(),
        }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        let put = put_of(request.into_inner())?;
        if !(put.prev_kv || put.ignore_value || put.ignore_lease) && put.lease == 0 {
            // A plain put: the node's own put command (lighter to apply and to record).
            caller.may_run(&KvTxn::op(KvOp::Put(put.clone())))?;
            let shard = self.0.router().shard_for_key(&put.key);
            let command = WriteCommand::Put { key: put.key, value: put.value };
            return match self.0.write_command(&caller, shard, false, command).await? {
                WriteOutcome::Put { revision } => {
                    Ok(Response::new(PutResponse { header: self.0.header(revision), prev_kv: None }))
                }
                other => Err(unknown_outcome(other)),
            };
        }
        let lease = put.lease;
        let (revision, _, results) = match self.run(&caller, KvTxn::op(KvOp::Put(put))).await {
            // etcd's Put checks the lease before the key an ignore flag needs (its Txn the
            // other way round, as the state machine does): a missing key with a lease that is
            // gone says "lease not found".
            Err(e) if e.message() == errors::KEY_NOT_FOUND && lease != 0 && !self.0.lease_exists(lease).await? => {
                return Err(Status::not_found(errors::LEASE_NOT_FOUND));
            }
            other => other?,
        };
        let prev_kv = match results.into_iter().next() {
            Some(KvOpResult::Put { prev }) => prev.map(kv_of),
            _ => None,
        };
        Ok(Response::new(PutResponse { header: self.0.header(revision), prev_kv }))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let gw = &self.0;
        let caller = gw.caller(request.metadata())?;
        let d = request.into_inner();
        let range = request_range(d.key, d.range_end)?;
        let txn = KvTxn::op(KvOp::DeleteRange { range: range.clone(), prev_kv: d.prev_kv });
        caller.may_run(&txn)?;
        // Each shard the range may reach deletes its keys of it (atomically there).
        let writes = gw.shards_of(&range).into_iter().map(|shard| gw.write(&caller, shard, txn.clone()));
        let (mut revision, mut deleted, mut prev) = (0, 0u64, Vec::new());
        for (rev, _, results) in futures::future::try_join_all(writes).await? {
            revision = revision.max(rev);
            if let Some(KvOpResult::DeleteRange { deleted: d, prev: p }) = results.into_iter().next() {
                deleted += d;
                prev.extend(p);
            }
        }
        prev.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Response::new(DeleteRangeResponse {
            header: gw.header(revision),
            deleted: deleted as i64,
            prev_kvs: prev.into_iter().map(kv_of).collect(),
        }))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        let t = request.into_inner();
        if t.compare.is_empty() && t.success.is_empty() && t.failure.is_empty() {
            // Nothing to compare or run: etcd answers success at the current revision.
            let mut revision = 0;
            for shard in 0..self.0.router().num_shards() {
                revision = revision.max(self.0.revision_of(shard).await?);
            }
            return Ok(Response::new(TxnResponse {
                header: self.0.header(revision),
                succeeded: true,
                responses: vec![],
            }));
        }
        let txn = txn_of(t.clone())?;
        let (revision, succeeded, results) = self.run(&caller, txn).await?;
        let ops = if succeeded { &t.success } else { &t.failure };
        Ok(Response::new(TxnResponse {
            header: self.0.header(revision),
            succeeded,
            responses: self.responses(ops, results, revision),
        }))
    }

    async fn compact(&self, request: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let gw = &self.0;
        let caller = gw.caller(request.metadata())?;
        caller.needs("compaction", |s| s.write, "write")?;
        let asked = revision_u64(request.into_inner().revision);
        let mut current = 0;
        for shard in 0..gw.router().num_shards() {
            current = current.max(gw.revision_of(shard).await?);
        }
        if asked > current {
            return Err(Status::out_of_range(errors::FUTURE_REV));
        }
        // Nothing to discard: Aspen keeps one version of each key, and its watch history is
        // bounded by size (docs/design.md §17).
        Ok(Response::new(CompactionResponse { header: gw.header(current) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_ranges_map_to_key_ranges() {
        assert_eq!(key_range(b"a".to_vec(), vec![]), KeyRange::single("a"));
        assert_eq!(key_range(b"a".to_vec(), vec![0]).end, Some(vec![]));
        assert!(key_range(b"a".to_vec(), vec![0]).contains(b"zzz"));
        assert_eq!(key_range(b"a/".to_vec(), b"a0".to_vec()), KeyRange::prefix("a/"));
        assert!(request_range(vec![], vec![]).is_err(), "an empty key names nothing");
        assert!(request_range(b"\x00aspen/tokens".to_vec(), vec![]).is_err(), "reserved keys are refused");
        assert!(request_range(vec![], vec![0]).is_ok(), "every key");
    }

    /// A sorted range inside a txn is read once, under the txn's byte budget: when the budget
    /// cut it, `more` says so (the limit alone would not).
    #[test]
    fn a_sorted_range_cut_by_the_byte_budget_says_more() {
        let r = RangeRequest {
            key: b"a".to_vec(),
            range_end: vec![0],
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Value as i32,
            ..Default::default()
        };
        let kv = |k: &str| KeyRecord {
            key: k.into(),
            value: b"v".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 0,
        };
        let page = RangePage { kvs: vec![kv("a"), kv("b")], count: 5, more: true, revision: 9 };
        assert!(finish_range(&r, page.clone()).more, "cut by the budget");
        assert!(!finish_range(&r, RangePage { more: false, ..page.clone() }).more, "every key read");
        let limited = RangeRequest { limit: 1, ..r.clone() };
        let out = finish_range(&limited, RangePage { more: false, ..page.clone() });
        assert!(out.more && out.kvs.len() == 1, "cut by the limit: {out:?}");
        let counted = RangeRequest { count_only: true, ..r };
        assert!(!finish_range(&counted, RangePage { kvs: vec![], ..page }).more, "count only");
    }

    #[test]
    fn a_branch_writing_one_key_twice_is_refused() {
        let put = |k: &str| {
            KvOp::Put(KvPut {
                key: k.into(),
                value: vec![],
                lease: 0,
                prev_kv: false,
                ignore_value: false,
                ignore_lease: false,
            })
        };
        assert!(check_duplicates(&[put("a"), put("b")]).is_ok());
        assert!(check_duplicates(&[put("a"), put("a")]).is_err());
        let delete = KvOp::DeleteRange { range: KeyRange::prefix("a"), prev_kv: false };
        assert!(check_duplicates(&[put("ab"), delete.clone()]).is_err());
        assert!(check_duplicates(&[put("b"), delete.clone()]).is_ok());
        // Nested txns count: a put there of a key the branch deletes, or puts too.
        let nested = |ops: Vec<KvOp>| KvOp::Txn(KvTxn { compares: vec![], success: ops, failure: vec![] });
        assert!(check_duplicates(&[delete.clone(), nested(vec![put("ab")])]).is_err());
        assert!(check_duplicates(&[put("x"), nested(vec![put("x")])]).is_err());
        assert!(check_duplicates(&[put("x"), nested(vec![put("y")])]).is_ok());
        // As etcd: a nested txn may put in one branch what it deletes in the other; a later
        // nested txn may delete what an earlier one put; a delete to the end of the keyspace
        // is not counted.
        let both = |success: Vec<KvOp>, failure: Vec<KvOp>| KvOp::Txn(KvTxn { compares: vec![], success, failure });
        assert!(check_duplicates(&[both(vec![put("ab")], vec![delete.clone()])]).is_ok());
        assert!(check_duplicates(&[both(vec![put("x")], vec![put("x")])]).is_ok());
        assert!(check_duplicates(&[nested(vec![put("ab")]), nested(vec![delete.clone()])]).is_ok());
        assert!(check_duplicates(&[nested(vec![delete.clone()]), nested(vec![put("ab")])]).is_err());
        let to_the_end = KvOp::DeleteRange { range: key_range(b"a".to_vec(), vec![0]), prev_kv: false };
        assert!(check_duplicates(&[put("b"), to_the_end]).is_ok());
    }
}
