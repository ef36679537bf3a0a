//! etcd's v3lock service (`v3lockpb.Lock`): named locks held by keys attached to leases, as
//! etcd's own server does them with its `concurrency.Mutex` recipe (docs/design.md §18).
//!
//! Lock: the caller's key `NAME/LEASE` (lower-case hex) is created with the lease unless it
//! exists (then it is reused: the same lease asks again); the lock is the caller's once every key
//! under `NAME/` created before it is gone — it waits on the youngest of those, watching it for
//! its deletion, until none is left. If the caller goes away or anything fails while it waits,
//! its key is deleted (so it does not block the queue); if its key went meanwhile (the lease
//! expired), the lock is not held. Unlock deletes the key.
//!
//! Keys of one lock are ordered by their create revision, which is per shard, so a lock's queue
//! lives in one shard, its *home*: the shard of `NAME/`. On a cluster of several shards a
//! caller's key is `NAME/LEASE` if that key is in the home shard, else `NAME/LEASE/N` with the
//! smallest `N` (decimal) that puts it there; only keys under `NAME/` in the home shard take part
//! in the queue. On one shard every key is `NAME/LEASE`, as etcd's.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    gateway::{errors, status_of, Caller, EtcdNode, Gateway},
    proto::v3lockpb::{lock_server::Lock, LockRequest, LockResponse, UnlockRequest, UnlockResponse},
};
use crate::api::{
    is_reserved_key, routing::ShardRouter, ApiError, ClientResponse, CompareOp, EventKind, KeyRange, KvCompare,
    KvCompareTarget, KvOp, KvOpResult, KvPut, KvTxn, RangeQuery, ReadConsistency, Revision, ShardId, WatchRequest,
    WatchStart,
};

/// The TTL of the lease a lock or a campaign gets when the caller names none (etcd's session
/// default).
const SESSION_TTL_SECS: u64 = 60;

/// etcd's Lock service over a node.
#[derive(Debug)]
pub struct LockService<N: EtcdNode>(pub Arc<Gateway<N>>);

/// The shard a lock's (or an election's) queue lives in: the shard of its prefix `NAME/`.
pub(super) fn home_shard<N: EtcdNode>(gw: &Gateway<N>, prefix: &[u8]) -> ShardId {
    gw.router().shard_for_key(prefix)
}

/// The caller's key in the queue under `prefix`: `NAME/LEASE`, or on a sharded cluster
/// `NAME/LEASE/N` with the smallest `N` that puts it in the home shard (the same lease always
/// gets the same key).
pub(super) fn queue_key(router: &ShardRouter, prefix: &[u8], lease: u64) -> Vec<u8> {
    let home = router.shard_for_key(prefix);
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    if router.shard_for_key(&key) == home {
        return key;
    }
    // Each suffix lands home with probability 1 / num_shards: one of the first few does.
    (0u64..)
        .map(|n| {
            let mut k = key.clone();
            k.extend_from_slice(format!("/{n}").as_bytes());
            k
        })
        .find(|k| router.shard_for_key(k) == home)
        .unwrap_or(key)
}

/// Checks a lock's or an election's name and gives its key prefix (`NAME/`).
pub(super) fn name_prefix(caller: &Caller, name: Vec<u8>) -> Result<Vec<u8>, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(errors::EMPTY_KEY));
    }
    if is_reserved_key(&name) {
        return Err(Status::invalid_argument("keys starting with \\x00aspen/ are reserved for the cluster"));
    }
    let mut prefix = name;
    prefix.push(b'/');
    caller.may_read(&KeyRange::prefix(prefix.clone()))?;
    Ok(prefix)
}

/// A queued locker or candidate.
pub(super) struct Candidate {
    /// `NAME/LEASE`.
    pub key: Vec<u8>,
    pub lease: u64,
    /// Its key's create revision: its place in the queue.
    pub mine: Revision,
    /// The key's value if it was there already (the same lease asking again).
    pub existing: Option<Vec<u8>>,
}

/// Queues the caller under `prefix` with `lease` (0: a new lease of [`SESSION_TTL_SECS`]): puts
/// its key ([`queue_key`]) with `value` in the home `shard` unless it exists.
pub(super) async fn enqueue<N: EtcdNode>(
    gw: &Gateway<N>,
    caller: &Caller,
    shard: ShardId,
    prefix: &[u8],
    lease: i64,
    value: Vec<u8>,
) -> Result<Candidate, Status> {
    let lease = match lease {
        0 => gw.grant_lease(caller, SESSION_TTL_SECS).await?,
        id => u64::try_from(id).map_err(|_| Status::not_found(errors::LEASE_NOT_FOUND))?,
    };
    let key = queue_key(gw.router(), prefix, lease);
    let create = queue_txn(&key, value, lease);
    caller.may_run(&create)?;
    let (revision, created, results) = gw.write(caller, shard, create).await?;
    if created {
        return Ok(Candidate { key, lease, mine: revision, existing: None });
    }
    // The txn read the key in the same state its compare saw it in: it is there.
    match results.into_iter().next() {
        Some(KvOpResult::Range(page)) => match page.kvs.into_iter().next() {
            Some(k) => Ok(Candidate { key, lease, mine: k.create_revision, existing: Some(k.value) }),
            None => Err(Status::internal("a queued key was neither created nor found")),
        },
        _ => Err(Status::internal("a queued key was neither created nor found")),
    }
}

/// The txn that queues a candidate: puts `key` with `value` and `lease` unless it exists, else
/// reads it.
fn queue_txn(key: &[u8], value: Vec<u8>, lease: u64) -> KvTxn {
    KvTxn {
        compares: vec![KvCompare {
            range: KeyRange::single(key.to_vec()),
            op: CompareOp::Equal,
            target: KvCompareTarget::CreateRevision(0),
        }],
        success: vec![KvOp::Put(KvPut {
            key: key.to_vec(),
            value,
            lease,
            prev_kv: false,
            ignore_value: false,
            ignore_lease: false,
        })],
        failure: vec![KvOp::Range(RangeQuery::all(KeyRange::single(key.to_vec())))],
    }
}

/// Deletes the caller's queued key unless disarmed: a Lock call that ends before it holds the
/// lock (the client went away, a failure) leaves no key behind to block the others.
pub(super) struct Queued<N: EtcdNode> {
    pub gw: Arc<Gateway<N>>,
    pub caller: Caller,
    /// The key's (home) shard.
    pub shard: ShardId,
    pub key: Vec<u8>,
    pub armed: bool,
}

impl<N: EtcdNode> Drop for Queued<N> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Dropped as its runtime stops: the key goes with its lease then.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (gw, caller, shard, key) =
            (self.gw.clone(), self.caller.clone(), self.shard, std::mem::take(&mut self.key));
        runtime.spawn(async move {
            let delete = KvTxn::op(KvOp::DeleteRange { range: KeyRange::single(key), prev_kv: false });
            if let Err(e) = gw.write(&caller, shard, delete).await {
                tracing::debug!("etcd API: a lock's queued key was not deleted: {e}");
            }
        });
    }
}

/// Waits until no key under `prefix` in the home `shard` created before `mine` is left; that
/// shard's revision then.
pub(super) async fn wait_for_earlier<N: EtcdNode>(
    gw: &Gateway<N>,
    caller: &Caller,
    shard: ShardId,
    prefix: &[u8],
    mine: Revision,
) -> Result<Revision, Status> {
    loop {
        let mut q = RangeQuery::all(KeyRange::prefix(prefix.to_vec()));
        q.keys_only = true;
        q.max_create_revision = mine.saturating_sub(1);
        let page = gw.range_of_shard(shard, q, ReadConsistency::Linearizable).await?;
        let Some(youngest) = page.kvs.iter().max_by_key(|k| k.create_revision) else {
            return Ok(page.revision);
        };
        // Wait for its deletion, from the state just read on (a deletion after it cannot be
        // missed; one before it would have removed it from the read).
        let request = WatchRequest {
            key: youngest.key.clone(),
            prefix: false,
            prev_kv: false,
            start: WatchStart::FromRevision(page.revision + 1),
        };
        let mut frames = match gw.node.watch(request, Default::default()).await {
            Ok(frames) => frames,
            // This node's history no longer reaches back to the read: read again.
            Err(ApiError::Compacted { .. }) => continue,
            Err(e) => return Err(status_of(e)),
        };
        loop {
            match frames.recv().await {
                Some(Ok(ClientResponse::WatchEvents(events))) => {
                    if events.iter().any(|e| e.kind == EventKind::Delete && e.key == youngest.key) {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                // The watch lost its place (a snapshot, a slow reader): read again.
                Some(Err(ApiError::Compacted { .. } | ApiError::WatchCancelled(_))) => break,
                Some(Err(e)) => return Err(status_of(e)),
                None => return Err(Status::unavailable(errors::NO_LEADER)),
            }
        }
        // Tokens expire and get revoked while locks wait.
        gw.recheck(caller)?;
    }
}

#[tonic::async_trait]
impl<N: EtcdNode> Lock for LockService<N> {
    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let gw = &self.0;
        let caller = gw.caller(request.metadata())?;
        let r = request.into_inner();
        let prefix = name_prefix(&caller, r.name)?;
        let shard = home_shard(gw, &prefix);
        let Candidate { key, mine, .. } = enqueue(gw, &caller, shard, &prefix, r.lease, Vec::new()).await?;
        let mut queued = Queued { gw: gw.clone(), caller: caller.clone(), shard, key: key.clone(), armed: true };
        let at = wait_for_earlier(gw, &caller, shard, &prefix, mine).await?;
        // Its key must still be there: a lease that expired while it waited took the key (and
        // the place in the queue) with it.
        let mut q = RangeQuery::all(KeyRange::single(key.clone()));
        q.keys_only = true;
        let page = gw.range_of_shard(shard, q, ReadConsistency::Linearizable).await?;
        if page.kvs.first().map(|k| k.create_revision) != Some(mine) {
            queued.armed = false;
            return Err(Status::not_found(errors::LEASE_NOT_FOUND));
        }
        queued.armed = false;
        Ok(Response::new(LockResponse { header: gw.header(at.max(page.revision)), key }))
    }

    async fn unlock(&self, request: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let gw = &self.0;
        let caller = gw.caller(request.metadata())?;
        let key = request.into_inner().key;
        if key.is_empty() {
            return Err(Status::invalid_argument(errors::EMPTY_KEY));
        }
        if is_reserved_key(&key) {
            return Err(Status::invalid_argument("keys starting with \\x00aspen/ are reserved for the cluster"));
        }
        let shard = gw.router().shard_for_key(&key);
        let delete = KvTxn::op(KvOp::DeleteRange { range: KeyRange::single(key), prev_kv: false });
        caller.may_run(&delete)?;
        let (revision, _, _) = gw.write(&caller, shard, delete).await?;
        Ok(Response::new(UnlockResponse { header: gw.header(revision) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_key_lives_in_its_names_shard_and_stays_the_same() {
        let one = ShardRouter::new(1);
        assert_eq!(queue_key(&one, b"job/", 0x1f), b"job/1f", "one shard: etcd's NAME/LEASE");
        let four = ShardRouter::new(4);
        let mut suffixed = 0;
        for lease in 1..200u64 {
            let key = queue_key(&four, b"job/", lease);
            assert_eq!(four.shard_for_key(&key), four.shard_for_key(b"job/"), "{key:?}");
            assert!(key.starts_with(format!("job/{lease:x}").as_bytes()), "{key:?}");
            assert_eq!(key, queue_key(&four, b"job/", lease), "the same lease, the same key");
            suffixed += usize::from(key.len() > format!("job/{lease:x}").len());
        }
        assert!(suffixed > 0, "some leases' plain keys are in other shards");
    }
}
