//! [`ShardedKeyValueStore`]: the node's view of the sharded key space, and where each request
//! goes (docs/design.md, "Data path").
//!
//! Owns: the shards this node hosts ([`RaftNode`] by shard id), the key → shard routing
//! ([`ShardRouter`]), where to find shards this node does not host or lead ([`ShardHints`]:
//! leader hints from `NotLeader` answers, gossip and status probes), the forwarding decisions
//! ([`plan`]: answer here, send to a node that hosts the shard, or to the shard's leader; at
//! most [`MAX_HOPS`] hops between nodes, so never a loop), the forwarding itself (batched per
//! peer for gets and writes straight from clients, [`super::forward`]) with retries until the
//! request timeout, scans over every shard merged in key order with exact paging
//! ([`merge_scan_pages`]), and prefix deletes sent to every shard with their counts summed
//! ([`merge_delete_prefix`]).
//!
//! Never: validate requests against the limits or answer membership and placement requests
//! (the cluster's dispatcher does, through [`AnswerHere`]), or touch storage directly (each
//! shard's [`RaftNode`] does).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    pin::Pin,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    forward::{ForwardError, ForwardStats, Forwarder},
    ShardRouter,
};
use crate::{
    api::{
        raft::MemberNode, shard_raft_id, split_raft_id, ApiError, ClientRequest, ClientResponse, ClientResult,
        ForwardedRequest, NodeId, ReadConsistency, ScanPage, ScanRequest, ShardId, WriteCommand, WriteOutcome,
        WriteSession,
    },
    raft::RaftNode,
    storage::scan::SCAN_PAGE_MAX_BYTES,
    transport::{request::send_request, ConnectionPool},
};

/// Most times a request is forwarded between nodes: a node that does not host the shard sends it
/// to a node that does, which may send it on to the shard's leader.
pub const MAX_HOPS: u8 = 2;

/// A boxed answer (routing recurses: scans and membership changes route per-shard parts again).
pub type BoxedResult<'a> = Pin<Box<dyn Future<Output = ClientResult> + Send + 'a>>;

/// What answers a request once routing has brought it to the node that should answer it: the
/// cluster's dispatcher (it validates, and answers membership and placement requests itself).
pub trait AnswerHere: Send + Sync {
    fn answer_here(&self, request: ClientRequest) -> BoxedResult<'_>;
}

/// Who leads one shard, as a node sees it (announced over gossip).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderHint {
    pub shard: ShardId,
    pub leader: NodeId,
    pub term: u64,
}

/// Where a request goes next, decided from the request, the shards hosted here and its hops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Answer on this node (a request for no shard, a stale read or a scan, or a shard-bound
    /// request this node can answer without its shard's leader).
    Here,
    /// The shard is not hosted here: send the request to a node that hosts it.
    ViaHost(ShardId),
    /// The request needs the leader of a shard hosted here: answer here if this node leads it,
    /// otherwise forward to the leader.
    ToLeader(ShardId),
}

/// Decides where `request` goes on node `me`. `hosted` says whether this node hosts a shard;
/// `hops` counts the node-to-node forwards the request has taken so far.
pub fn plan(
    me: NodeId,
    router: &ShardRouter,
    hosted: impl Fn(ShardId) -> bool,
    request: &ClientRequest,
    hops: u8,
) -> Result<Route, ApiError> {
    let elsewhere = |shard: ShardId| {
        if hops >= MAX_HOPS {
            return Err(ApiError::Unavailable(format!("shard {shard} is not hosted on node {me}")));
        }
        Ok(Route::ViaHost(shard))
    };
    if fans_out(router, request) {
        // Coordinated here, like a scan: one `ShardWrite` per shard, each routed on its own.
        return Ok(Route::Here);
    }
    let shard_bound = matches!(
        request,
        ClientRequest::Get { .. }
            | ClientRequest::Write { .. }
            | ClientRequest::ShardWrite { .. }
            | ClientRequest::ShardScan { .. }
            | ClientRequest::ShardMembership { .. }
            | ClientRequest::MoveLeader { .. }
            | ClientRequest::MoveLeaderAttempt { .. }
            | ClientRequest::LeaseKeepAlive { .. }
            | ClientRequest::LeaseInfo { .. }
            | ClientRequest::ShardLeaseKeys { .. }
            | ClientRequest::ShardLeases { .. }
            | ClientRequest::ShardBackup { .. }
            | ClientRequest::ShardRange { .. }
            | ClientRequest::ShardRangeAt { .. }
            | ClientRequest::ShardTxnRead { .. }
    );
    if shard_bound {
        let shard = shard_of(router, request)?;
        if !hosted(shard) {
            return elsewhere(shard);
        }
    }
    if !request.needs_leader() || matches!(request, ClientRequest::Scan(_)) {
        return Ok(Route::Here);
    }
    // Leader-bound requests for no particular shard (membership) are coordinated on shard 0.
    let shard = shard_of(router, request)?;
    if !hosted(shard) {
        return elsewhere(shard);
    }
    Ok(Route::ToLeader(shard))
}

/// The shard a request belongs to (requests for no particular shard: shard 0, whose membership
/// lists every member of the cluster).
pub fn shard_of(router: &ShardRouter, request: &ClientRequest) -> Result<ShardId, ApiError> {
    match request {
        ClientRequest::Get { key, .. } => Ok(router.shard_for_key(key)),
        ClientRequest::Write { command, .. } => write_shard(router, command),
        ClientRequest::LeaseKeepAlive { id } | ClientRequest::LeaseInfo { id } => Ok(router.shard_for_lease(*id)),
        ClientRequest::ShardScan { shard, .. }
        | ClientRequest::ShardWrite { shard, .. }
        | ClientRequest::ShardMembership { shard, .. }
        | ClientRequest::MoveLeader { shard, .. }
        | ClientRequest::MoveLeaderAttempt { shard, .. }
        | ClientRequest::ShardLeaseKeys { shard, .. }
        | ClientRequest::ShardLeases { shard }
        | ClientRequest::ShardBackup { shard, .. }
        | ClientRequest::ShardRange { shard, .. }
        | ClientRequest::ShardRangeAt { shard, .. }
        | ClientRequest::ShardTxnRead { shard, .. } => {
            if *shard >= router.num_shards() {
                return Err(ApiError::InvalidRequest(format!(
                    "shard {shard} does not exist (the cluster has {})",
                    router.num_shards()
                )));
            }
            Ok(*shard)
        }
        _ => Ok(0),
    }
}

/// Whether `request` is a write that covers every shard (a prefix delete on a cluster of more
/// than one shard): the node receiving it sends it to each shard ([`ShardedKeyValueStore::delete_prefix_all`]).
pub fn fans_out(router: &ShardRouter, request: &ClientRequest) -> bool {
    match request {
        ClientRequest::Write { command: WriteCommand::DeletePrefix { .. }, .. } => router.num_shards() > 1,
        // Coordinated by the node that receives it: the home shard first, then every other one.
        ClientRequest::Write { command: WriteCommand::LeaseRevoke { .. }, .. } => true,
        _ => false,
    }
}

/// The one shard every key of a write falls into (a batch or a txn may not span shards; a
/// prefix delete belongs to the only shard, or is sent to every shard by [`fans_out`]).
pub fn write_shard(router: &ShardRouter, command: &WriteCommand) -> Result<ShardId, ApiError> {
    if let Some(id) = command.lease_home() {
        return Ok(router.shard_for_lease(id));
    }
    if let WriteCommand::LeaseDrop { .. } = command {
        return Err(ApiError::InvalidRequest("a lease drop names its shard: send it as a shard write".into()));
    }
    if let WriteCommand::DeletePrefix { .. } = command {
        return match router.num_shards() {
            1 => Ok(0),
            n => Err(ApiError::InvalidRequest(format!(
                "a prefix delete covers all {n} shards: send it as a write to any node (it goes to every shard) \
                 or as a shard write naming one shard"
            ))),
        };
    }
    if let WriteCommand::KvTxn { txn, .. } = command {
        if command.keys().is_empty() && router.num_shards() > 1 {
            return Err(ApiError::InvalidRequest(format!(
                "a txn of key ranges only may reach all {} shards: send it as a shard write naming one shard",
                router.num_shards()
            )));
        }
        if command.keys().is_empty() && !txn.spans().is_empty() {
            return Ok(0);
        }
    }
    let mut shards: Vec<ShardId> = command.keys().iter().map(|k| router.shard_for_key(k)).collect();
    shards.sort_unstable();
    shards.dedup();
    match (shards.as_slice(), command) {
        ([one], _) => Ok(*one),
        ([], _) => Err(ApiError::InvalidRequest("a write must name at least one key".into())),
        (many, WriteCommand::Txn { .. } | WriteCommand::KvTxn { .. }) => Err(ApiError::InvalidRequest(format!(
            "txn keys span shards {}; a txn is atomic within one shard only",
            list_shards(many)
        ))),
        (many, _) => Err(ApiError::InvalidRequest(format!(
            "a batch must stay within one shard; its keys fall into shards {many:?}"
        ))),
    }
}

/// `[1, 3]` → "1 and 3"; `[0, 1, 3]` → "0, 1 and 3".
fn list_shards(shards: &[ShardId]) -> String {
    match shards.split_last() {
        None => String::new(),
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => {
            let rest: Vec<String> = rest.iter().map(ShardId::to_string).collect();
            format!("{} and {last}", rest.join(", "))
        }
    }
}

/// Merges the outcomes of a prefix delete on every shard: the counts summed, the highest
/// revision (revisions are per shard). If any shard answered `StaleSequence` (the session moved
/// on: that shard's part was not applied now), so does the merge: the outcome is unknown.
pub fn merge_delete_prefix(outcomes: impl IntoIterator<Item = WriteOutcome>) -> Result<WriteOutcome, ApiError> {
    let (mut revision, mut deleted, mut stale) = (0, 0u64, None::<u64>);
    for outcome in outcomes {
        match outcome {
            WriteOutcome::DeletePrefix { revision: r, deleted: d } => {
                revision = revision.max(r);
                deleted = deleted.saturating_add(d);
            }
            WriteOutcome::StaleSequence { last_seq } => stale = Some(stale.map_or(last_seq, |s| s.max(last_seq))),
            // A shard that forgot the session did not apply its part: unknown as a whole.
            unknown @ WriteOutcome::UnknownSession { .. } => return Ok(unknown),
            other => {
                return Err(ApiError::Internal(format!("a shard answered a prefix delete with {other:?}")));
            }
        }
    }
    Ok(match stale {
        Some(last_seq) => WriteOutcome::StaleSequence { last_seq },
        None => WriteOutcome::DeletePrefix { revision, deleted },
    })
}

/// Merges one page from every shard into one page in key order. Every shard's page starts at
/// the same lower bound; the merged page stops at the smallest last key of any shard that has
/// more (so no key of any shard is skipped by the next page) and at `limit` keys; it carries a
/// continuation exactly when more keys may follow.
pub fn merge_scan_pages(pages: impl IntoIterator<Item = ScanPage>, limit: usize, max_bytes: usize) -> ScanPage {
    let mut entries = Vec::new();
    let mut bound: Option<Vec<u8>> = None;
    for page in pages {
        if let Some(c) = &page.continuation {
            if bound.as_ref().is_none_or(|b| c < b) {
                bound = Some(c.clone());
            }
        }
        entries.extend(page.entries);
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    if let Some(b) = &bound {
        entries.retain(|kv| &kv.key <= b);
    }
    let mut more = bound.is_some() || entries.len() > limit;
    entries.truncate(limit);
    // Cut by bytes too (at least one key): the merged page stays inside one frame however many
    // shards answered, and the continuation keeps paging exact.
    let mut bytes = 0usize;
    if let Some(cut) = entries.iter().position(|kv| {
        bytes += kv.key.len() + kv.value.len();
        bytes >= max_bytes
    }) {
        if cut + 1 < entries.len() {
            entries.truncate(cut + 1);
            more = true;
        }
    }
    let continuation = if more { entries.last().map(|kv| kv.key.clone()) } else { None };
    ScanPage { entries, continuation }
}

/// The byte cap of one shard's page in a scan over `num_shards` shards: together they fit in
/// one merged page ([`SCAN_PAGE_MAX_BYTES`]), so a scan over many shards holds no more than a
/// scan over one (each page still holds at least one key).
pub fn shard_page_bytes(num_shards: u32) -> usize {
    (SCAN_PAGE_MAX_BYTES / num_shards.max(1) as usize).max(MIN_SHARD_PAGE_BYTES)
}

/// The smallest per-shard byte cap of a merged scan.
const MIN_SHARD_PAGE_BYTES: usize = 64 * 1024;

/// Where to find shards: leader hints (from `NotLeader` answers, gossip and status probes) and
/// the shards each node announced hosting.
#[derive(Debug, Default)]
pub struct ShardHints {
    inner: Mutex<Hints>,
}

#[derive(Debug, Default)]
struct Hints {
    /// The node believed to lead (or at least host) each shard.
    leaders: HashMap<ShardId, NodeId>,
    /// The highest term a leader was announced for, per shard.
    leader_terms: HashMap<ShardId, u64>,
    /// Which nodes announced hosting each shard.
    hosts: HashMap<ShardId, BTreeSet<NodeId>>,
}

impl ShardHints {
    fn lock(&self) -> std::sync::MutexGuard<'_, Hints> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers (`Some`) or forgets (`None`) the node believed to lead `shard`.
    pub fn set(&self, shard: ShardId, node: Option<NodeId>) {
        let mut h = self.lock();
        match node {
            Some(n) => h.leaders.insert(shard, n),
            None => h.leaders.remove(&shard),
        };
    }

    /// The node believed to lead `shard`, if any.
    pub fn leader(&self, shard: ShardId) -> Option<NodeId> {
        self.lock().leaders.get(&shard).copied()
    }

    /// Takes in what node `from` announced: the shards it hosts (replacing what it announced
    /// before) and who leads its shards. A leader hint counts only for shards not hosted here
    /// (`hosted_here`; Raft knows those leaders) and only if its term is not older than any seen.
    pub fn note_announcement(
        &self,
        from: NodeId,
        hosts: &[ShardId],
        leaders: &[LeaderHint],
        hosted_here: impl Fn(ShardId) -> bool,
    ) {
        let mut h = self.lock();
        for nodes in h.hosts.values_mut() {
            nodes.remove(&from);
        }
        for shard in hosts {
            h.hosts.entry(*shard).or_default().insert(from);
        }
        for hint in leaders {
            if hosted_here(hint.shard) {
                continue;
            }
            let seen = h.leader_terms.entry(hint.shard).or_default();
            if hint.term >= *seen {
                *seen = hint.term;
                h.leaders.insert(hint.shard, hint.leader);
            }
        }
    }

    /// A node to send a request for `shard` to without asking anyone: the leader hint, or else a
    /// node (other than `me`) that announced hosting it.
    pub fn known_host(&self, shard: ShardId, me: NodeId) -> Option<NodeId> {
        let h = self.lock();
        if let Some(n) = h.leaders.get(&shard) {
            return Some(*n);
        }
        h.hosts.get(&shard).and_then(|nodes| nodes.iter().copied().find(|n| *n != me))
    }
}

/// The sharded key-value store as one node sees it: its own shards, and the way to every other.
#[derive(Debug)]
pub struct ShardedKeyValueStore {
    node_id: NodeId,
    shards: BTreeMap<ShardId, RaftNode>,
    router: ShardRouter,
    pool: ConnectionPool,
    hints: ShardHints,
    /// Gets and writes on their way to a shard leader on another node, batched per peer.
    forwarder: Forwarder,
    request_timeout: Duration,
    max_scan_page: usize,
}

impl ShardedKeyValueStore {
    /// `max_forward_batch`: most requests in one forwarded batch ([`super::forward::max_batch_items`]).
    pub fn new(
        node_id: NodeId,
        shards: BTreeMap<ShardId, RaftNode>,
        router: ShardRouter,
        pool: ConnectionPool,
        request_timeout: Duration,
        max_scan_page: usize,
        max_forward_batch: usize,
    ) -> Self {
        ShardedKeyValueStore {
            node_id,
            shards,
            router,
            forwarder: Forwarder::new(pool.clone(), max_forward_batch),
            pool,
            hints: ShardHints::default(),
            request_timeout,
            max_scan_page,
        }
    }

    /// The shards this node hosts.
    pub fn shards(&self) -> &BTreeMap<ShardId, RaftNode> {
        &self.shards
    }

    pub fn num_shards(&self) -> u32 {
        self.router.num_shards()
    }

    /// Key and lease → shard routing.
    pub fn router(&self) -> &ShardRouter {
        &self.router
    }

    pub fn pool(&self) -> &ConnectionPool {
        &self.pool
    }

    /// How much of this node's forwarding to shard leaders went out in batches.
    pub fn forward_stats(&self) -> ForwardStats {
        self.forwarder.stats()
    }

    /// A hosted shard, or a typed error.
    pub fn local(&self, shard: ShardId) -> Result<&RaftNode, ApiError> {
        self.shards
            .get(&shard)
            .ok_or_else(|| ApiError::Unavailable(format!("shard {shard} is not hosted on node {}", self.node_id)))
    }

    /// Shard 0: its membership lists every member of the cluster.
    pub fn primary(&self) -> Result<&RaftNode, ApiError> {
        self.local(0)
    }

    /// The shard of a write's keys.
    pub fn write_shard(&self, command: &WriteCommand) -> Result<ShardId, ApiError> {
        write_shard(&self.router, command)
    }

    /// Every member of the cluster (from the membership of the shards hosted here).
    pub fn known_nodes(&self) -> BTreeMap<NodeId, MemberNode> {
        let mut nodes = BTreeMap::new();
        for shard in self.shards.values() {
            for (raft_id, member, _) in shard.members() {
                nodes.entry(split_raft_id(raft_id).1).or_insert(member);
            }
        }
        nodes
    }

    /// Where to reach `node_id`, from any hosted shard's membership.
    pub fn node_addr(&self, node_id: NodeId) -> Option<iroh::EndpointAddr> {
        self.shards
            .iter()
            .find_map(|(s, shard)| shard.member(shard_raft_id(*s, node_id)))
            .and_then(|m| m.endpoint_addr())
    }

    /// Takes in a verified gossip announcement of node `from`.
    pub fn note_announcement(&self, from: NodeId, hosts: &[ShardId], leaders: &[LeaderHint]) {
        self.hints.note_announcement(from, hosts, leaders, |s| self.shards.contains_key(&s));
    }

    /// A get answered by the local replica of the key's shard (the caller has routed it here).
    pub async fn get_here(&self, key: &[u8], consistency: ReadConsistency) -> ClientResult {
        let shard = self.local(self.router.shard_for_key(key))?;
        shard.get(key, consistency).await.map(ClientResponse::Get)
    }

    /// A write proposed to the local replica of its shard (the caller has routed it here).
    pub async fn write_here(&self, session: WriteSession, command: WriteCommand) -> Result<WriteOutcome, ApiError> {
        let shard = self.local(self.write_shard(&command)?)?;
        shard.write(session, command).await
    }

    /// A write for hosted shard `shard`, named by the sender (the caller has routed it here).
    /// Keys the command names must fall into that shard.
    pub async fn shard_write_here(
        &self,
        shard: ShardId,
        session: WriteSession,
        command: WriteCommand,
    ) -> Result<WriteOutcome, ApiError> {
        let ranges_only = matches!(&command, WriteCommand::KvTxn { .. }) && command.keys().is_empty();
        if !ranges_only && !matches!(command, WriteCommand::DeletePrefix { .. } | WriteCommand::LeaseDrop { .. }) {
            let owner = self.write_shard(&command)?;
            if owner != shard {
                return Err(ApiError::InvalidRequest(format!(
                    "a shard write for shard {shard} names keys of shard {owner}"
                )));
            }
        }
        self.local(shard)?.write(session, command).await
    }

    /// A prefix delete on every shard: one [`ClientRequest::ShardWrite`] per shard, all with the
    /// client's session, routed (and retried) each on its own, concurrently; the outcomes merged
    /// by [`merge_delete_prefix`]. Each shard deletes its keys atomically; shards do not commit
    /// together, so a failure may leave some shards done: the error is returned, and a retry
    /// of the same write (same session and sequence number, as the client resends it) is
    /// answered by those shards from their session table — each shard applies its part at most
    /// once — and applied by the others (docs/design.md §7, §9).
    pub async fn delete_prefix_all(
        &self,
        session: WriteSession,
        prefix: Vec<u8>,
        here: &dyn AnswerHere,
    ) -> Result<WriteOutcome, ApiError> {
        let answers = futures::future::join_all((0..self.router.num_shards()).map(|shard| {
            let command = WriteCommand::DeletePrefix { prefix: prefix.clone() };
            self.route(ClientRequest::ShardWrite { shard, session, command }, 0, here)
        }))
        .await;
        let outcomes = answers
            .into_iter()
            .map(|answer| match answer? {
                ClientResponse::Write(outcome) => Ok(outcome),
                other => Err(ApiError::Internal(format!("a shard answered a prefix delete with {other:?}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        merge_delete_prefix(outcomes)
    }

    /// One page of one hosted shard.
    pub async fn scan_shard_here(&self, shard: ShardId, scan: &ScanRequest) -> ClientResult {
        let max_bytes = shard_page_bytes(self.router.num_shards());
        self.local(shard)?.scan(scan, self.max_scan_page, max_bytes).await.map(ClientResponse::Scan)
    }

    /// Routes a request: answered here (by `here`), or forwarded to a node that hosts its shard or
    /// to its shard's leader.
    pub fn route<'a>(&'a self, request: ClientRequest, hops: u8, here: &'a dyn AnswerHere) -> BoxedResult<'a> {
        Box::pin(async move {
            match plan(self.node_id, &self.router, |s| self.shards.contains_key(&s), &request, hops)? {
                Route::Here => here.answer_here(request).await,
                Route::ViaHost(shard) => self.route_to_remote_shard(shard, request, hops).await,
                Route::ToLeader(shard) => self.route_to_leader(shard, request, hops, here).await,
            }
        })
    }

    /// A scan over every shard, merged in key order ([`merge_scan_pages`]).
    pub async fn scan_all(&self, req: ScanRequest, here: &dyn AnswerHere) -> Result<ScanPage, ApiError> {
        let num = self.router.num_shards();
        let as_page = |answer: ClientResult| match answer? {
            ClientResponse::Scan(page) => Ok(page),
            other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
        };
        if num == 1 {
            return as_page(self.route(ClientRequest::ShardScan { shard: 0, scan: req }, 0, here).await);
        }
        let limit = (req.limit as usize).min(self.max_scan_page).max(1);
        let pages = futures::future::join_all((0..num).map(|shard| {
            let scan = ScanRequest { limit: limit as u32, ..req.clone() };
            self.route(ClientRequest::ShardScan { shard, scan }, 0, here)
        }))
        .await;
        let pages = pages.into_iter().map(as_page).collect::<Result<Vec<_>, _>>()?;
        Ok(merge_scan_pages(pages, limit, SCAN_PAGE_MAX_BYTES))
    }

    /// Answers here if this node leads the request's shard; otherwise forwards to that shard's
    /// leader. If the leader cannot be reached (it may just have died), waits for Raft to learn a
    /// new one and tries again, until the request timeout.
    async fn route_to_leader(
        &self,
        shard_id: ShardId,
        request: ClientRequest,
        hops: u8,
        here: &dyn AnswerHere,
    ) -> ClientResult {
        let shard = self.local(shard_id)?;
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let leader = match here.answer_here(request.clone()).await {
                Err(ApiError::NotLeader { leader: Some(leader), .. }) if hops < MAX_HOPS => leader,
                other => return other,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let why = match self.node_addr(leader) {
                None => format!("leader {leader} of shard {shard_id} has no known address"),
                Some(addr) => {
                    // Straight from a client: batched with other requests for that leader.
                    let forward = async {
                        match ForwardedRequest::of(&request).filter(|_| hops == 0) {
                            Some(batchable) => self.forwarder.send(leader, &addr, batchable, left).await,
                            None => send_request(&self.pool, &addr, hops + 1, request.clone(), left)
                                .await
                                .map_err(ForwardError::from),
                        }
                    };
                    // Give up on this leader as soon as Raft tells us it changed: a dead leader's
                    // connection may hang until the QUIC idle timeout.
                    tokio::select! {
                        answer = forward => match answer {
                            Ok(Err(ApiError::NotLeader { .. })) => format!("node {leader} no longer leads shard {shard_id}"),
                            Ok(answer) => return answer,
                            Err(e) => format!("leader {leader} of shard {shard_id} unreachable: {e}"),
                        },
                        _ = shard.leader_changed_from(leader) => format!("leadership of shard {shard_id} moved away from node {leader}"),
                    }
                }
            };
            if Instant::now() + Duration::from_millis(100) >= deadline {
                return Err(ApiError::Unavailable(why));
            }
            tracing::debug!("forwarding failed, retrying: {why}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a request for a shard this node does not host to a node that does (preferably its
    /// leader), found from the hints or by asking the members.
    async fn route_to_remote_shard(&self, shard_id: ShardId, request: ClientRequest, hops: u8) -> ClientResult {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let why = match self.shard_host(shard_id).await {
                None => format!("no reachable node hosts shard {shard_id}"),
                Some(target) => match self.node_addr(target) {
                    None => format!("node {target} has no known address"),
                    Some(addr) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match send_request(&self.pool, &addr, hops + 1, request.clone(), left).await {
                            Ok(Err(ApiError::NotLeader { leader: Some(l), .. })) => {
                                self.hints.set(shard_id, Some(l));
                                format!("node {target} does not lead shard {shard_id}")
                            }
                            Ok(Err(ApiError::Unavailable(m))) => {
                                self.hints.set(shard_id, None);
                                m
                            }
                            Ok(answer) => return answer,
                            Err(e) => {
                                self.hints.set(shard_id, None);
                                format!("node {target} unreachable: {e}")
                            }
                        }
                    }
                },
            };
            if Instant::now() + Duration::from_millis(200) >= deadline {
                return Err(ApiError::Unavailable(why));
            }
            tracing::debug!("routing to shard {shard_id} failed, retrying: {why}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A node that hosts `shard` — its leader if anyone reports one — from the hints, or by
    /// asking every member for its status.
    async fn shard_host(&self, shard: ShardId) -> Option<NodeId> {
        if let Some(n) = self.hints.known_host(shard, self.node_id) {
            return Some(n);
        }
        let timeout = self.request_timeout.min(Duration::from_secs(3));
        let asks =
            self.known_nodes().into_iter().filter(|(id, _)| *id != self.node_id).map(|(id, member)| async move {
                let addr = member.endpoint_addr()?;
                match send_request(&self.pool, &addr, 1, ClientRequest::NodeStatus, timeout).await {
                    Ok(Ok(ClientResponse::NodeStatus(st))) => Some((id, st)),
                    _ => None,
                }
            });
        let mut host = None;
        let mut leader = None;
        for (id, st) in futures::future::join_all(asks).await.into_iter().flatten() {
            if let Some(s) = st.shards.iter().find(|s| s.shard == shard) {
                host.get_or_insert(id);
                if s.role == "Leader" {
                    leader = Some(id);
                }
            }
        }
        let found = leader.or(host);
        self.hints.set(shard, found);
        found
    }
}

#[cfg(test)]
mod tests;
