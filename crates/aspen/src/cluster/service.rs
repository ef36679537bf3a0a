//! The client-facing service of a node: a thin dispatcher. Every request is routed by the
//! node's [`ShardedKeyValueStore`] (answered here, or forwarded to a node that hosts its shard or
//! to its shard's leader); what is answered here is checked against the configured limits
//! ([`super::validate`]) and handed to the piece that owns it: the store (gets, writes, per-shard
//! writes, scans; prefix deletes fanned out to every shard), [`super::membership`] (joins,
//! learners, promotions, removals), [`super::placement`] (leader moves and balancing), or this
//! file (`cluster init`, node and cluster status, tickets).
//! Nothing here touches storage directly.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use super::validate;
use crate::{
    api::{
        ApiError, ClientRequest, ClientResponse, ClientResult, ClusterId, ClusterStatus, DefragReport,
        ForwardedResponse, NodeId, NodeReport, NodeStatus, NodeTicket, ShardDefrag, ShardStatus, WriteCommand,
    },
    config::LimitsConfig,
    raft::{network::SharedClusterId, MemberNode, RaftNode},
    sharding::{
        forward::{check_forwarded, fit_answers, max_batch_items},
        AnswerHere, BoxedResult, ShardRouter, ShardedKeyValueStore,
    },
    storage::metadata::{ClusterIdentity, MetadataStore},
    transport::{endpoint::write_file_atomic, request::send_request, ClientService},
};

/// How long a node waits for another to defragment its shards (minutes for many GB).
pub const DEFRAG_TIMEOUT: Duration = Duration::from_secs(3600);

/// Serves client requests for one node.
#[derive(Debug)]
pub struct NodeService {
    pub(super) node_id: NodeId,
    pub(super) cluster_name: String,
    pub(super) data_dir: PathBuf,
    pub(super) limits: LimitsConfig,
    /// The shards of this node and the way to every other shard.
    pub(super) store: ShardedKeyValueStore,
    pub(super) metadata: Arc<MetadataStore>,
    pub(super) cluster_id: SharedClusterId,
    /// This node as a Raft member (endpoint id + addresses).
    pub(super) me: MemberNode,
    pub(super) ticket: RwLock<NodeTicket>,
    init_lock: tokio::sync::Mutex<()>,
    pub(super) membership_lock: tokio::sync::Mutex<()>,
    /// Cancelled when this node learns it was removed from the cluster (`cluster::admission`).
    pub(super) removed: tokio_util::sync::CancellationToken,
    /// The claim token a fresh `--no-init` node waits for (`cluster::claim`).
    pub(super) claim: Arc<super::claim::Claim>,
    /// Issues and verifies tokens (`crate::auth`); kept current by `cluster::tokens`.
    pub(super) authority: Arc<crate::auth::Authority>,
    /// Leader hand-overs this node ran, by shard (`cluster::placement`'s rate limit).
    pub(super) handovers: super::placement::Handovers,
    /// This node's admin token, until it is recorded in shard 0 (`cluster::tokens`).
    pub(super) unrecorded: std::sync::Mutex<Option<crate::api::TokenInfo>>,
    /// The node-wide metrics its protocol handlers record (`GET /metrics`).
    pub(super) metrics: Arc<crate::metrics::NodeMetrics>,
    /// The peers gossip told this node about.
    pub(super) peers: crate::transport::pool::PeerBook,
    /// The backups this node serves as a shard leader (`cluster::backup`).
    pub(super) backups: super::backup::BackupSessions,
    /// The raised alarms as this node's replica of shard 0 shows them (`cluster::alarm`).
    pub(super) alarms: super::alarm::AlarmBook,
    /// The data this node stores, as last measured (`cluster::alarm`; `GET /metrics`).
    pub(super) stored_bytes: std::sync::atomic::AtomicU64,
    /// The sizes of the shards' state-machine files, as last checked (`cluster::alarm`).
    pub(super) data_file_bytes: std::sync::atomic::AtomicU64,
    /// Why this node is short of space now, if it is (`cluster::alarm`; it refuses writes that
    /// add data at once, before its alarm is recorded).
    pub(super) space_low: RwLock<Option<String>>,
    /// Where this node serves the etcd API (`--etcd-addr`), once it does: `http://…`/`https://…`.
    etcd_endpoint: RwLock<Option<String>>,
}

/// What [`NodeService::readiness`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeReadiness {
    /// Why the node as a whole cannot serve (it belongs to no cluster yet).
    pub node: Option<String>,
    /// Each hosted shard, with its reason if it is not ready.
    pub shards: Vec<(crate::api::ShardId, Option<String>)>,
}

impl NodeReadiness {
    /// Ready: a member of a cluster, and every hosted shard ready (there is always one: shard 0).
    pub fn ready(&self) -> bool {
        self.node.is_none() && !self.shards.is_empty() && self.shards.iter().all(|(_, reason)| reason.is_none())
    }
}

impl NodeService {
    /// The service of the node `base` describes, over its `shards`, recording into `metrics`.
    pub fn new(
        base: &super::bootstrap::BaseNodeResources,
        shards: BTreeMap<crate::api::ShardId, RaftNode>,
        metrics: Arc<crate::metrics::NodeMetrics>,
    ) -> Self {
        let config = &base.config;
        let (metadata, cluster_id, me, ticket, pool, removed) = (
            base.metadata_store.clone(),
            base.cluster_id.clone(),
            base.member(),
            base.ticket(),
            base.pool.clone(),
            base.admission.removed(),
        );
        let (claim, authority) = (base.claim.clone(), base.authority.clone());
        let store = ShardedKeyValueStore::new(
            config.node_id,
            shards,
            ShardRouter::new(config.sharding.effective_num_shards()),
            pool,
            config.limits.request_timeout(),
            config.limits.max_scan_page as usize,
            max_batch_items(config.limits.max_key_bytes, config.limits.max_value_bytes),
        );
        NodeService {
            node_id: config.node_id,
            cluster_name: config.cluster_name.clone(),
            data_dir: config.data_dir.clone(),
            limits: config.limits.clone(),
            store,
            metadata,
            cluster_id,
            me,
            ticket: RwLock::new(ticket),
            init_lock: tokio::sync::Mutex::new(()),
            membership_lock: tokio::sync::Mutex::new(()),
            removed,
            claim,
            authority,
            unrecorded: Default::default(),
            handovers: Default::default(),
            metrics,
            peers: base.peers.clone(),
            backups: Default::default(),
            alarms: Default::default(),
            stored_bytes: Default::default(),
            data_file_bytes: Default::default(),
            space_low: Default::default(),
            etcd_endpoint: Default::default(),
        }
    }

    /// Where this node serves the etcd API, if it does (etcd's member list shows it).
    pub fn etcd_endpoint(&self) -> Option<String> {
        self.etcd_endpoint.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records where this node serves the etcd API.
    pub fn set_etcd_endpoint(&self, url: String) {
        *self.etcd_endpoint.write().unwrap_or_else(|p| p.into_inner()) = Some(url);
    }

    /// The node-wide metrics (requests, connections, token refusals, journal fsyncs).
    pub fn metrics(&self) -> &Arc<crate::metrics::NodeMetrics> {
        &self.metrics
    }

    /// The node's sharded store: its shards, routing and forwarding.
    pub fn store(&self) -> &ShardedKeyValueStore {
        &self.store
    }

    pub fn ticket(&self) -> NodeTicket {
        self.ticket.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Writes the current ticket to `<data-dir>/node.ticket`.
    pub fn write_ticket_file(&self) -> std::io::Result<()> {
        let ticket = self.ticket().encode();
        write_file_atomic(&self.data_dir.join("node.ticket"), format!("{ticket}\n").as_bytes())
    }

    pub(super) fn first_status(&self) -> ShardStatus {
        match self.store.shards().values().next() {
            Some(s) => s.status(),
            None => ShardStatus {
                shard: 0,
                leader: None,
                term: 0,
                voters: Vec::new(),
                learners: Vec::new(),
                last_applied: 0,
                last_log_index: 0,
                role: "Unknown".into(),
                health: Default::default(),
                digest: None,
            },
        }
    }

    /// Makes this node a one-node cluster (every shard), unless it already belongs to one.
    /// Returns whether this call initialized it.
    pub async fn init_cluster(&self) -> Result<bool, ApiError> {
        let _guard = self.init_lock.lock().await;
        let internal = |e: crate::storage::StorageError| ApiError::Internal(format!("metadata: {e}"));
        if self.metadata.identity().map_err(internal)?.is_some() {
            return Ok(false);
        }
        if self.store.shards().len() as u32 != self.store.num_shards() {
            return Err(ApiError::Refused(format!(
                "the node that initializes a cluster must host all {} shards; this one hosts {:?}",
                self.store.num_shards(),
                self.store.shards().keys().collect::<Vec<_>>()
            )));
        }
        for shard in self.store.shards().values() {
            let raft = shard.raft();
            if raft.is_initialized().await.map_err(|e| ApiError::Unavailable(e.to_string()))? {
                // Identity is recorded after Raft is initialized; a crash in between leaves
                // one-node groups of our own, which we adopt. Anything else is another cluster's.
                let voters: Vec<u64> = raft.metrics().borrow().membership_config.membership().voter_ids().collect();
                if voters != [shard.raft_id()] {
                    return Err(ApiError::InvalidRequest("this node's Raft state belongs to a cluster already".into()));
                }
            }
        }
        let cluster_id = ClusterId::random();
        for shard in self.store.shards().values() {
            shard.initialize(BTreeMap::from([(shard.raft_id(), self.me.clone())])).await?;
        }
        self.metadata
            .set_identity(&ClusterIdentity {
                cluster_id,
                cluster_name: self.cluster_name.clone(),
                node_id: self.node_id,
                num_shards: self.store.num_shards(),
            })
            .map_err(internal)?;
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = cluster_id;
        self.authority.set_cluster(Some(cluster_id));
        self.ticket.write().unwrap_or_else(|p| p.into_inner()).cluster_id = cluster_id;
        self.claim.settle();
        // The cluster's signing key, then this node's admin.token (local admin access): both
        // before the node serves, so that `aspen-cli --data-dir` works from its first request.
        // The write waits for this one-node cluster to elect itself (slow on a busy machine).
        let deadline = tokio::time::Instant::now() + self.limits.request_timeout().max(Duration::from_secs(60));
        loop {
            match self.establish_cluster_key().await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!("could not make the cluster's signing key yet ({e}); retrying in the background");
                    break;
                }
                Err(e) => {
                    tracing::debug!("making the cluster's signing key: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
            }
        }
        if let Err(e) = self.ensure_admin_token() {
            tracing::warn!("could not write this node's admin token: {e}");
        }
        // Last: whoever waits for the ticket to name the cluster finds admin.token there too.
        if let Err(e) = self.write_ticket_file() {
            tracing::warn!("could not rewrite node.ticket: {e}");
        }
        tracing::info!(%cluster_id, shards = self.store.shards().len(), "initialized a new cluster");
        Ok(true)
    }

    pub(super) fn node_status(&self) -> NodeStatus {
        NodeStatus { node_id: self.node_id, shards: self.store.shards().values().map(RaftNode::status).collect() }
    }

    pub(super) fn identity(&self) -> Result<Option<ClusterIdentity>, ApiError> {
        self.metadata.identity().map_err(|e| ApiError::Internal(format!("metadata: {e}")))
    }

    /// Defragments the state machines of node `node_id` (this node if `None` or ours), one
    /// shard after another; another node's are asked of it.
    async fn defragment(&self, node_id: Option<NodeId>) -> Result<DefragReport, ApiError> {
        if let Some(id) = node_id.filter(|id| *id != self.node_id) {
            let member = self
                .store
                .known_nodes()
                .remove(&id)
                .ok_or_else(|| ApiError::InvalidRequest(format!("node {id} is not a member of this cluster")))?;
            let addr = member
                .endpoint_addr()
                .ok_or_else(|| ApiError::Unavailable(format!("node {id} has no valid address")))?;
            let request = ClientRequest::Defragment { node_id: None };
            return match send_request(self.store.pool(), &addr, 1, request, DEFRAG_TIMEOUT).await {
                Ok(Ok(ClientResponse::Defragmented(report))) => Ok(report),
                Ok(Ok(other)) => Err(ApiError::Internal(format!("node {id} answered a defrag with {other:?}"))),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(ApiError::Unavailable(format!("node {id}: {e}"))),
            };
        }
        let mut shards = Vec::new();
        for (shard, node) in self.store.shards() {
            let reader = node.reader().clone();
            let done = tokio::task::spawn_blocking(move || reader.defragment())
                .await
                .map_err(|e| ApiError::Internal(format!("shard {shard}: defrag task: {e}")))?
                .map_err(|e| match e {
                    // A resource to free, not a fault: `no_space` (aspen-cli exit 3), nothing changed.
                    crate::storage::StorageError::NoRoom(m) => {
                        ApiError::NoSpace(format!("shard {shard}: defrag refused, nothing changed: {m}"))
                    }
                    e => ApiError::Internal(format!("shard {shard}: defrag: {e}")),
                })?;
            node.metrics().defrags.inc();
            node.metrics().defrag_reclaimed_bytes.add(done.before_bytes.saturating_sub(done.after_bytes));
            shards.push(ShardDefrag {
                shard: *shard,
                before_bytes: done.before_bytes,
                after_bytes: done.after_bytes,
                keys: done.keys,
                millis: (done.secs * 1000.0) as u64,
            });
        }
        Ok(DefragReport { node_id: self.node_id, shards })
    }

    /// Asks every member for its own view, concurrently, with a short timeout each.
    async fn cluster_status(&self) -> Result<ClusterStatus, ApiError> {
        let (cluster_id, cluster_name) = match self.identity()? {
            Some(i) => (i.cluster_id, i.cluster_name),
            None => (ClusterId::default(), self.cluster_name.clone()),
        };
        let timeout = self.limits.request_timeout().min(Duration::from_secs(3));
        let mut asks = Vec::new();
        for (node_id, member) in self.store.known_nodes() {
            if node_id == self.node_id {
                continue;
            }
            asks.push(async move {
                let Some(addr) = member.endpoint_addr() else {
                    return NodeReport { node_id, status: None, error: Some("no valid address".into()) };
                };
                match send_request(self.store.pool(), &addr, 1, ClientRequest::NodeStatus, timeout).await {
                    Ok(Ok(ClientResponse::NodeStatus(s))) => NodeReport { node_id, status: Some(s), error: None },
                    Ok(Ok(other)) => NodeReport { node_id, status: None, error: Some(format!("unexpected {other:?}")) },
                    Ok(Err(e)) => NodeReport { node_id, status: None, error: Some(e.to_string()) },
                    Err(e) => NodeReport { node_id, status: None, error: Some(e.to_string()) },
                }
            });
        }
        let mut reports = futures::future::join_all(asks).await;
        reports.push(NodeReport { node_id: self.node_id, status: Some(self.node_status()), error: None });
        reports.sort_by_key(|r| r.node_id);
        Ok(ClusterStatus {
            node_id: self.node_id,
            cluster_id,
            cluster_name,
            shards: self.store.shards().values().map(RaftNode::status).collect(),
            nodes: reports,
        })
    }

    /// Whether this node can serve — what `GET /ready`, gRPC health and the etcd port's
    /// `/health` report: why not, if it belongs to no cluster yet, and each hosted shard's
    /// reason it is not ready (`RaftNode::readiness`), in shard order.
    pub fn readiness(&self) -> NodeReadiness {
        let node = (self.cluster_id() == ClusterId::default()).then(|| "not initialized: no cluster yet".to_string());
        let shards = self.store.shards().iter().map(|(shard, raft)| (*shard, raft.readiness().err())).collect();
        NodeReadiness { node, shards }
    }

    pub(super) fn cluster_id(&self) -> ClusterId {
        *self.cluster_id.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A node removed from the cluster hosts no shard any more, and the members refuse its
    /// connections (so it cannot forward either): a request for data is answered at once with
    /// `Unavailable`, which sends clients to another member, instead of waiting out its timeout.
    pub(super) fn refuse_if_removed(&self) -> Result<(), ApiError> {
        if self.removed.is_cancelled() {
            return Err(ApiError::Unavailable(format!(
                "node {} was removed from the cluster: ask another member",
                self.node_id
            )));
        }
        Ok(())
    }

    /// Routes a request from here (answered here, or forwarded).
    pub(super) fn route(&self, request: ClientRequest, hops: u8) -> BoxedResult<'_> {
        self.store.route(request, hops, self)
    }

    /// A range read's keys are within the key size limit (range, end, `after`).
    fn check_range_keys(&self, query: &crate::api::RangeQuery) -> Result<(), ApiError> {
        for k in [Some(&query.range.key), query.range.end.as_ref(), query.after.as_ref()].into_iter().flatten() {
            if k.len() as u64 > self.limits.max_key_bytes {
                let (size, limit) = (k.len() as u64, self.limits.max_key_bytes);
                return Err(ApiError::TooLarge { what: "key".into(), size, limit });
            }
        }
        Ok(())
    }

    /// Answers a request on this node, without forwarding (routing has brought it here).
    async fn handle_local(&self, request: ClientRequest) -> ClientResult {
        if request.needs_data() && self.cluster_id() == ClusterId::default() {
            // A `--no-init` node (or one still joining) has no data: say so at once instead of
            // waiting for a leader that will not come.
            return Err(ApiError::NotInitialized { node_id: self.node_id });
        }
        if let ClientRequest::Write { command, .. } | ClientRequest::ShardWrite { command, .. } = &request {
            self.check_space(command)?;
        }
        match request {
            ClientRequest::Get { key, consistency } => {
                validate::check_key(&self.limits, &key)?;
                self.store.get_here(&key, consistency).await
            }
            ClientRequest::Write { session, command: WriteCommand::DeletePrefix { prefix } }
                if self.store.num_shards() > 1 =>
            {
                validate::check_write(&self.limits, &WriteCommand::DeletePrefix { prefix: prefix.clone() })?;
                self.store.delete_prefix_all(session, prefix, self).await.map(ClientResponse::Write)
            }
            ClientRequest::Write { session, command: WriteCommand::LeaseRevoke { id } } => {
                validate::check_client_write(&self.limits, &WriteCommand::LeaseRevoke { id })?;
                self.revoke_lease(session, id).await
            }
            ClientRequest::Write { session, command: command @ WriteCommand::PutLease { .. } } => {
                validate::check_client_write(&self.limits, &command)?;
                self.put_with_lease(session, command).await
            }
            ClientRequest::Write { session, command } => {
                validate::check_client_write(&self.limits, &command)?;
                self.store.write_here(session, command).await.map(ClientResponse::Write)
            }
            ClientRequest::ShardWrite { shard, session, command } => {
                validate::check_write(&self.limits, &command)?;
                self.store.shard_write_here(shard, session, command).await.map(ClientResponse::Write)
            }
            ClientRequest::Scan(req) => {
                validate::check_scan(&self.limits, &req)?;
                self.store.scan_all(req, self).await.map(ClientResponse::Scan)
            }
            ClientRequest::ShardScan { shard, scan } => {
                validate::check_scan(&self.limits, &scan)?;
                self.store.scan_shard_here(shard, &scan).await
            }
            ClientRequest::ShardRange { shard, query, consistency } => {
                self.check_range_keys(&query)?;
                self.store.local(shard)?.range(&query, consistency).await.map(ClientResponse::Range)
            }
            ClientRequest::ShardRangeAt { shard, query, consistency, revision } => {
                self.check_range_keys(&query)?;
                self.store.local(shard)?.range_at(&query, consistency, revision).await.map(ClientResponse::Range)
            }
            ClientRequest::ShardTxnRead { shard, txn, consistency } => {
                validate::check_kv_txn(&self.limits, &txn)?;
                if !txn.is_read_only() {
                    return Err(ApiError::InvalidRequest("a txn read holds range reads only".into()));
                }
                let (revision, succeeded, results) = self.store.local(shard)?.txn_read(txn, consistency).await?;
                Ok(ClientResponse::KvTxnRead { revision, succeeded, results })
            }
            ClientRequest::EtcdEndpoint => Ok(ClientResponse::EtcdEndpoint(self.etcd_endpoint())),
            ClientRequest::ShardMembership { shard, change } => self.apply_shard_change(shard, change).await,
            ClientRequest::Defragment { node_id } => self.defragment(node_id).await.map(ClientResponse::Defragmented),
            ClientRequest::AlarmList => self.list_alarms().await,
            ClientRequest::AlarmDisarm => self.disarm_alarms().await,
            ClientRequest::ShardBackup { shard, session, offset } => {
                let node = self.store.local(shard)?;
                self.backups.chunk(node, shard, session, offset).await.map(ClientResponse::BackupChunk)
            }
            ClientRequest::ClusterStatus => self.cluster_status().await.map(ClientResponse::ClusterStatus),
            ClientRequest::NodeStatus => Ok(ClientResponse::NodeStatus(self.node_status())),
            ClientRequest::Members => Ok(ClientResponse::Members(self.members())),
            ClientRequest::Topology => {
                Ok(ClientResponse::Topology { num_shards: self.store.num_shards(), members: self.members() })
            }
            ClientRequest::ClusterInit => {
                self.claim.check(self.node_id, None)?;
                self.init_cluster().await.map(|initialized| ClientResponse::ClusterInit { initialized })
            }
            ClientRequest::ClusterInitClaimed { claim_token } => {
                self.claim.check(self.node_id, Some(&claim_token))?;
                self.init_cluster().await.map(|initialized| ClientResponse::ClusterInit { initialized })
            }
            ClientRequest::AddLearner { ticket } => self.add_learner(&ticket, None).await,
            ClientRequest::AddLearnerClaimed { ticket, claim_token } => {
                self.add_learner(&ticket, Some(claim_token)).await
            }
            ClientRequest::Promote { node_id } => self.promote(node_id).await,
            ClientRequest::Remove { node_id } => self.remove(node_id).await,
            ClientRequest::Join(req) => self.join(req).await,
            ClientRequest::AcceptMembership(info) => self.accept_membership(info, None),
            ClientRequest::ClaimMembership { info, claim_token } => self.accept_membership(info, Some(&claim_token)),
            ClientRequest::MoveLeader { shard, node_id } => self.move_leader(shard, node_id).await,
            ClientRequest::MoveLeaderAttempt { shard, node_id } => self.move_leader_attempt(shard, node_id).await,
            ClientRequest::TriggerElect { shard } => {
                tracing::debug!(shard, "campaigning for a leadership hand-over");
                let shard = self.store.local(shard)?;
                shard.raft().trigger().elect().await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
                Ok(ClientResponse::ElectionTriggered)
            }
            ClientRequest::BalanceLeaders => self.balance_leaders().await,
            ClientRequest::Departed { node_id } => self.departed(node_id),
            ClientRequest::AuthTokenCreate { read, write, admin, prefixes, ttl_secs } => {
                self.create_token(crate::auth::Scope { read, write, admin, prefixes }, ttl_secs).await
            }
            ClientRequest::AuthTokenList => self.list_tokens().await,
            ClientRequest::AuthTokenRevoke { id } => self.revoke_token(id).await,
            ClientRequest::JoinTokenCreate { ttl_secs, single_use } => self.create_join_token(ttl_secs, single_use),
            ClientRequest::LeaseKeepAlive { id } => {
                let ttl_secs = self.store.local(self.store.router().shard_for_lease(id))?.lease_keepalive(id).await?;
                Ok(ClientResponse::LeaseKeepAlive { id, ttl_secs })
            }
            ClientRequest::LeaseInfo { id } => {
                let home = self.store.local(self.store.router().shard_for_lease(id))?;
                home.lease_info(id).await.map(ClientResponse::LeaseStatus)
            }
            ClientRequest::LeaseTimeToLive { id, keys } => self.lease_time_to_live(id, keys).await,
            ClientRequest::LeaseList => self.list_leases().await,
            ClientRequest::ShardLeaseKeys { shard, id } => {
                self.store.local(shard)?.lease_keys(id).await.map(ClientResponse::LeaseKeys)
            }
            ClientRequest::ShardLeases { shard } => self.store.local(shard)?.leases().await.map(ClientResponse::Leases),
            // A stream: `ClientService::watch` serves it on the node the client talks to.
            ClientRequest::Watch(_) => Err(ApiError::InvalidRequest(
                "a watch is served as a stream by the node that receives it; it is never forwarded".into(),
            )),
            // Unpacked by `handle` before routing; never inside a batch.
            ClientRequest::Forwarded { .. } => {
                Err(ApiError::InvalidRequest("a forwarded batch cannot be nested or routed".into()))
            }
        }
    }
}

impl AnswerHere for NodeService {
    fn answer_here(&self, request: ClientRequest) -> BoxedResult<'_> {
        Box::pin(self.handle_local(request))
    }
}

impl ClientService for NodeService {
    async fn watch(
        &self,
        request: crate::api::WatchRequest,
        finish: tokio_util::sync::CancellationToken,
    ) -> Result<tokio::sync::mpsc::Receiver<ClientResult>, ApiError> {
        self.start_watch_asked(request, super::watch::WatchAsks { position: None, finish }).await
    }

    async fn handle(&self, request: ClientRequest, hops: u8) -> ClientResult {
        if request.needs_data() || matches!(request, ClientRequest::Forwarded { .. }) {
            self.refuse_if_removed()?;
        }
        match request {
            ClientRequest::Forwarded { requests } => {
                check_forwarded(&requests)?;
                let answers = futures::future::join_all(
                    requests
                        .into_iter()
                        .map(|r| async move { ForwardedResponse::of(self.route(r.into(), hops).await) }),
                )
                .await;
                Ok(ClientResponse::Forwarded(fit_answers(answers)))
            }
            request => self.route(request, hops).await,
        }
    }
}
