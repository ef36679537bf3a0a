//! etcd's v3election service (`v3electionpb.Election`): named elections whose candidates are
//! keys attached to leases, as etcd's own server runs them with its `concurrency.Election`
//! recipe (docs/design.md §18).
//!
//! Campaign puts the candidate's key `NAME/LEASE` (lower-case hex) with its value unless it
//! exists (the same lease campaigning again: its value is proclaimed), then waits as a lock
//! does ([`super::lock`]) until no key under `NAME/` created before it is left: the oldest key
//! leads. Proclaim and Resign act only while the leader key's create revision is still the one
//! Campaign answered. Leader is the oldest key; Observe streams it, and again whenever its value
//! changes or another key takes over. On a sharded cluster the candidates' keys live in the
//! election's home shard, as a lock's do ([`super::lock`]).

use std::sync::Arc;

use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::{
    gateway::{errors, kv_of, revision_i64, status_of, Caller, EtcdNode, Gateway},
    lock::{enqueue, home_shard, name_prefix, wait_for_earlier, Candidate, Queued},
    proto::v3electionpb::{
        election_server::Election, CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse,
        ProclaimRequest, ProclaimResponse, ResignRequest, ResignResponse,
    },
};
use crate::api::{
    ApiError, ClientResponse, CompareOp, EventKind, KeyRange, KeyRecord, KvCompare, KvCompareTarget, KvOp, KvPut,
    KvTxn, RangeQuery, ReadConsistency, Revision, WatchRequest, WatchStart,
};

/// etcd's error for a proclamation by a candidate that does not lead (`ErrElectionNotLeader`).
const NOT_LEADER: &str = "election: not leader";
/// etcd's error when an election has no leader (`ErrGRPCElectionNoLeader`).
const NO_LEADER: &str = "etcdserver: election: no leader";

/// etcd's Election service over a node.
#[derive(Debug)]
pub struct ElectionService<N: EtcdNode>(pub Arc<Gateway<N>>);

/// The leader of the election under `prefix` (its oldest key in the home shard), with the
/// revision of that shard read.
async fn leader_of<N: EtcdNode>(gw: &Gateway<N>, prefix: &[u8]) -> Result<(Option<KeyRecord>, Revision), Status> {
    let query = RangeQuery::all(KeyRange::prefix(prefix.to_vec()));
    let page = gw.range_of_shard(home_shard(gw, prefix), query, ReadConsistency::Linearizable).await?;
    let leader = page.kvs.into_iter().min_by_key(|k| k.create_revision);
    Ok((leader, page.revision))
}

/// The key a leader key names, checked against its election and the caller's scope.
fn leader_key(caller: &Caller, leader: Option<LeaderKey>) -> Result<LeaderKey, Status> {
    let leader = leader.ok_or_else(|| Status::invalid_argument("\"leader\" field must be provided"))?;
    let prefix = name_prefix(caller, leader.name.clone())?;
    if !leader.key.starts_with(&prefix) {
        return Err(Status::invalid_argument("the leader key is not a key of its election"));
    }
    Ok(leader)
}

/// A txn on `leader`'s key that runs `op` only while the key is the one Campaign answered.
fn while_leading(leader: &LeaderKey, op: KvOp) -> KvTxn {
    KvTxn {
        compares: vec![KvCompare {
            range: KeyRange::single(leader.key.clone()),
            op: CompareOp::Equal,
            target: KvCompareTarget::CreateRevision(u64::try_from(leader.rev).unwrap_or(0)),
        }],
        success: vec![op],
        failure: Vec::new(),
    }
}

/// Streams the leader of the election under `prefix`: now, then each time its value changes or
/// another key leads; ends when the client goes, the endpoint stops, or on an error.
async fn observe<N: EtcdNode>(gw: Arc<Gateway<N>>, prefix: Vec<u8>, tx: mpsc::Sender<Result<LeaderResponse, Status>>) {
    let mut sent: Option<(Vec<u8>, Revision)> = None;
    let fail = |e: Status| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(Err(e)).await;
        }
    };
    loop {
        let (leader, read) = match leader_of(&gw, &prefix).await {
            Ok(l) => l,
            Err(e) => return fail(e).await,
        };
        // Watch the leader's key (its changes) or, with no leader, the whole election (its
        // first candidate), from the state just read on.
        let (key, is_prefix) = match &leader {
            Some(l) => (l.key.clone(), false),
            None => (prefix.clone(), true),
        };
        if let Some(l) = leader {
            if sent.as_ref() != Some(&(l.key.clone(), l.mod_revision)) {
                sent = Some((l.key.clone(), l.mod_revision));
                let answer = LeaderResponse { header: gw.header(read), kv: Some(kv_of(l)) };
                if tx.send(Ok(answer)).await.is_err() {
                    return;
                }
            }
        }
        // A prefix watch of a sharded cluster covers every shard and cannot start at one
        // shard's revision: it starts now, and a second read sees a candidate that came first.
        let sharded_prefix = is_prefix && gw.router().num_shards() > 1;
        let start = if sharded_prefix { WatchStart::Now } else { WatchStart::FromRevision(read + 1) };
        let request = WatchRequest { key, prefix: is_prefix, prev_kv: false, start };
        let mut frames = match gw.node.watch(request, Default::default()).await {
            Ok(f) => f,
            Err(ApiError::Compacted { .. }) => continue,
            Err(e) => return fail(status_of(e)).await,
        };
        if sharded_prefix {
            match leader_of(&gw, &prefix).await {
                Ok((Some(_), _)) => continue,
                Ok((None, _)) => {}
                Err(e) => return fail(e).await,
            }
        }
        loop {
            let frame = tokio::select! {
                frame = frames.recv() => frame,
                _ = tx.closed() => return,
                _ = gw.stop.cancelled() => return,
            };
            match frame {
                // Any change there: read the leader again (a new value, a new leader, a first
                // candidate).
                Some(Ok(ClientResponse::WatchEvents(events)))
                    if events.iter().any(|e| e.kind == EventKind::Delete || e.kind == EventKind::Put) =>
                {
                    break
                }
                Some(Ok(_)) => {}
                Some(Err(ApiError::Compacted { .. } | ApiError::WatchCancelled(_))) => break,
                Some(Err(e)) => return fail(status_of(e)).await,
                None => return fail(Status::unavailable(errors::NO_LEADER)).await,
            }
        }
    }
}

type ObserveStream = BoxStream<'static, Result<LeaderResponse, Status>>;

#[tonic::async_trait]
impl<N: EtcdNode> Election for ElectionService<N> {
    async fn campaign(&self, request: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        let gw = &self.0;
        let caller = gw.caller(request.metadata())?;
        let r = request.into_inner();
        let prefix = name_prefix(&caller, r.name.clone())?;
        let shard = home_shard(gw, &prefix);
        let Candidate { key, lease, mine, existing } =
            enqueue(gw, &caller, shard, &prefix, r.lease, r.value.clone()).await?;
        if existing.is_some_and(|v| v != r.value) {
            // The same lease campaigning again with another value: proclaim it.
            let put = KvOp::Put(KvPut {
                key: key.clone(),
                value: r.value.clone(),
                lease,
                prev_kv: false,
                ignore_value: false,
                ignore_lease: false,
            });
            gw.write(&caller, shard, KvTxn::op(put)).await?;
        }
        let mut queued = Queued { gw: gw.clone(), caller: caller.clone(), shard, key: key.clone(), armed: true };
        let at = wait_for_earlier(gw, &caller, shard, &prefix, mine).await?;
        queued.armed = false;
        let leader = LeaderKey { name: r.name, key, rev: revision_i64(mine), lease: lease as i64 };
        Ok(Response::new(CampaignResponse { header: gw.header(at), leader: Some(leader) }))
    }

    async fn proclaim(&self, request: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let gw = &self.0;
        let caller = gw.caller(request.metadata())?;
        let r = request.into_inner();
        let leader = leader_key(&caller, r.leader)?;
        let shard = gw.router().shard_for_key(&leader.key);
        let put = KvOp::Put(KvPut {
            key: leader.key.clone(),
            value: r.value,
            lease: u64::try_from(leader.lease).unwrap_or(0),
            prev_kv: false,
            ignore_value: false,
            ignore_lease: false,
        });
        let txn = while_leading(&leader, put);
        caller.may_run(&txn)?;
        let (revision, leading, _) = gw.write(&caller, shard, txn).await?;
        if !leading {
            return Err(Status::failed_precondition(NOT_LEADER));
        }
        Ok(Response::new(ProclaimResponse { header: gw.header(revision) }))
    }

    async fn leader(&self, request: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let gw = &self.0;
        let caller = gw.caller(request.metadata())?;
        let prefix = name_prefix(&caller, request.into_inner().name)?;
        match leader_of(gw, &prefix).await? {
            (Some(l), read) => Ok(Response::new(LeaderResponse { header: gw.header(read), kv: Some(kv_of(l)) })),
            (None, _) => Err(Status::unavailable(NO_LEADER)),
        }
    }

    type ObserveStream = ObserveStream;

    async fn observe(&self, request: Request<LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let gw = &self.0;
        let caller = gw.caller(request.metadata())?;
        let prefix = name_prefix(&caller, request.into_inner().name)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(observe(gw.clone(), prefix, tx));
        Ok(Response::new(super::gateway::stream_of(rx)))
    }

    async fn resign(&self, request: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let gw = &self.0;
        let caller = gw.caller(request.metadata())?;
        let r = request.into_inner();
        let leader = leader_key(&caller, r.leader)?;
        let shard = gw.router().shard_for_key(&leader.key);
        let txn =
            while_leading(&leader, KvOp::DeleteRange { range: KeyRange::single(leader.key.clone()), prev_kv: false });
        caller.may_run(&txn)?;
        // A candidate that no longer leads has nothing to give up (etcd: no error).
        let (revision, _, _) = gw.write(&caller, shard, txn).await?;
        Ok(Response::new(ResignResponse { header: gw.header(revision) }))
    }
}
