//! The client-facing service of a node: validates every request against the configured limits,
//! then answers it from the shard that owns the key.
//!
//! Owns: request validation; routing each key to its shard (`ShardRouter`); forwarding
//! leader-bound requests (writes, linearizable reads, membership changes) once to the shard's
//! leader (gets and writes straight from clients in per-peer batches, `cluster::forward`, and
//! answering such batches); scans merged over all shards in key order; `cluster init`; joins and membership
//! changes, applied to every shard on that shard's leader; and `cluster status`, which asks
//! every member for its own view. Reads and writes go to [`RaftNode`]; nothing here touches
//! storage directly.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use openraft::ChangeMembers;

use crate::{
    api::{
        shard_raft_id, split_raft_id, ApiError, BatchOp, ClientRequest, ClientResponse, ClientResult, ClusterId,
        ClusterInfo, ClusterStatus, ForwardedRequest, ForwardedResponse, JoinRequest, MemberAddr, MembershipChange,
        NodeId, NodeReport, NodeStatus, NodeTicket, ScanPage, ScanRequest, ShardId, ShardStatus, WriteCommand,
    },
    cluster::{
        endpoint::write_file_atomic,
        forward::{check_forwarded, fit_answers, max_batch_items, Forwarder},
        metadata::{ClusterIdentity, MetadataStore},
    },
    config::{LimitsConfig, NodeConfig},
    protocol::{client::send_request, ClientService},
    raft::{
        network::{ConnectionPool, SharedClusterId},
        MemberNode, RaftNode,
    },
    sharding::ShardRouter,
};

/// Serves client requests for one node.
#[derive(Debug)]
pub struct NodeService {
    node_id: NodeId,
    cluster_name: String,
    data_dir: PathBuf,
    limits: LimitsConfig,
    /// The shards this node hosts.
    shards: BTreeMap<ShardId, RaftNode>,
    /// Key → shard for the cluster's number of shards.
    router: ShardRouter,
    metadata: Arc<MetadataStore>,
    cluster_id: SharedClusterId,
    /// This node as a Raft member (endpoint id + addresses).
    me: MemberNode,
    ticket: RwLock<NodeTicket>,
    init_lock: tokio::sync::Mutex<()>,
    membership_lock: tokio::sync::Mutex<()>,
    pool: ConnectionPool,
    /// For shards not hosted here: the node believed to lead (or at least host) each.
    leader_hints: std::sync::Mutex<std::collections::HashMap<ShardId, NodeId>>,
    /// From gossip: the highest term a leader was announced for, per shard, and which nodes
    /// announced hosting each shard.
    gossip_hints: std::sync::Mutex<GossipHints>,
    /// Gets and writes on their way to a shard leader on another node, batched per peer.
    forwarder: Forwarder,
}

#[derive(Debug, Default)]
struct GossipHints {
    leader_terms: std::collections::HashMap<ShardId, u64>,
    hosts: std::collections::HashMap<ShardId, std::collections::BTreeSet<NodeId>>,
}

impl NodeService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &NodeConfig,
        shards: BTreeMap<ShardId, RaftNode>,
        metadata: Arc<MetadataStore>,
        cluster_id: SharedClusterId,
        me: MemberNode,
        ticket: NodeTicket,
        pool: ConnectionPool,
    ) -> Self {
        NodeService {
            node_id: config.node_id,
            cluster_name: config.cluster_name.clone(),
            data_dir: config.data_dir.clone(),
            limits: config.limits.clone(),
            shards,
            router: ShardRouter::new(config.sharding.effective_num_shards()),
            metadata,
            cluster_id,
            me,
            ticket: RwLock::new(ticket),
            init_lock: tokio::sync::Mutex::new(()),
            membership_lock: tokio::sync::Mutex::new(()),
            forwarder: Forwarder::new(
                pool.clone(),
                max_batch_items(config.limits.max_key_bytes, config.limits.max_value_bytes),
            ),
            pool,
            leader_hints: Default::default(),
            gossip_hints: Default::default(),
        }
    }

    /// How much of this node's forwarding to shard leaders went out in batches.
    pub fn forward_stats(&self) -> crate::cluster::forward::ForwardStats {
        self.forwarder.stats()
    }

    pub fn ticket(&self) -> NodeTicket {
        self.ticket.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Writes the current ticket to `<data-dir>/node.ticket`.
    pub fn write_ticket_file(&self) -> std::io::Result<()> {
        let ticket = self.ticket().encode();
        write_file_atomic(&self.data_dir.join("node.ticket"), format!("{ticket}\n").as_bytes())
    }

    /// A hosted shard, or a typed error.
    fn local_shard(&self, shard: ShardId) -> Result<&RaftNode, ApiError> {
        self.shards
            .get(&shard)
            .ok_or_else(|| ApiError::Unavailable(format!("shard {shard} is not hosted on node {}", self.node_id)))
    }

    /// Shard 0: its membership lists every member of the cluster.
    fn primary(&self) -> Result<&RaftNode, ApiError> {
        self.local_shard(0)
    }

    fn first_status(&self) -> ShardStatus {
        match self.shards.values().next() {
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
        let internal = |e: crate::raft::StorageError| ApiError::Internal(format!("metadata: {e}"));
        if self.metadata.identity().map_err(internal)?.is_some() {
            return Ok(false);
        }
        if self.shards.len() as u32 != self.router.num_shards() {
            return Err(ApiError::Refused(format!(
                "the node that initializes a cluster must host all {} shards; this one hosts {:?}",
                self.router.num_shards(),
                self.shards.keys().collect::<Vec<_>>()
            )));
        }
        for shard in self.shards.values() {
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
        for shard in self.shards.values() {
            shard.initialize(BTreeMap::from([(shard.raft_id(), self.me.clone())])).await?;
        }
        self.metadata
            .set_identity(&ClusterIdentity {
                cluster_id,
                cluster_name: self.cluster_name.clone(),
                node_id: self.node_id,
                num_shards: self.router.num_shards(),
            })
            .map_err(internal)?;
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = cluster_id;
        self.ticket.write().unwrap_or_else(|p| p.into_inner()).cluster_id = cluster_id;
        if let Err(e) = self.write_ticket_file() {
            tracing::warn!("could not rewrite node.ticket: {e}");
        }
        tracing::info!(%cluster_id, shards = self.shards.len(), "initialized a new cluster");
        Ok(true)
    }

    fn check_key(&self, key: &[u8]) -> Result<(), ApiError> {
        if key.is_empty() {
            return Err(ApiError::InvalidRequest("key must not be empty".into()));
        }
        if key.len() as u64 > self.limits.max_key_bytes {
            return Err(ApiError::TooLarge {
                what: "key".into(),
                size: key.len() as u64,
                limit: self.limits.max_key_bytes,
            });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), ApiError> {
        if value.len() as u64 > self.limits.max_value_bytes {
            return Err(ApiError::TooLarge {
                what: "value".into(),
                size: value.len() as u64,
                limit: self.limits.max_value_bytes,
            });
        }
        Ok(())
    }

    /// Checks a write against the limits before it reaches the log.
    pub fn validate_write(&self, command: &WriteCommand) -> Result<(), ApiError> {
        match command {
            WriteCommand::Put { key, value } => {
                self.check_key(key)?;
                self.check_value(value)
            }
            WriteCommand::Delete { key } => self.check_key(key),
            WriteCommand::Cas { key, expected, new_value } => {
                self.check_key(key)?;
                if let Some(e) = expected {
                    self.check_value(e)?;
                }
                self.check_value(new_value)
            }
            WriteCommand::Batch { ops } => {
                if ops.is_empty() {
                    return Err(ApiError::InvalidRequest("batch must hold at least one operation".into()));
                }
                if ops.len() as u64 > self.limits.max_batch_ops {
                    return Err(ApiError::TooLarge {
                        what: "batch".into(),
                        size: ops.len() as u64,
                        limit: self.limits.max_batch_ops,
                    });
                }
                let mut total = 0u64;
                for op in ops {
                    self.check_key(op.key())?;
                    if let BatchOp::Put { value, .. } = op {
                        self.check_value(value)?;
                        total += value.len() as u64;
                    }
                }
                let cap = self.limits.max_value_bytes * 4;
                if total > cap {
                    return Err(ApiError::TooLarge { what: "batch values".into(), size: total, limit: cap });
                }
                Ok(())
            }
        }
    }

    fn validate_scan(&self, req: &ScanRequest) -> Result<(), ApiError> {
        if req.limit == 0 {
            return Err(ApiError::InvalidRequest("scan limit must be at least 1".into()));
        }
        for k in
            [Some(&req.prefix), req.start.as_ref(), req.end.as_ref(), req.continuation.as_ref()].into_iter().flatten()
        {
            if k.len() as u64 > self.limits.max_key_bytes {
                return Err(ApiError::TooLarge {
                    what: "scan bound".into(),
                    size: k.len() as u64,
                    limit: self.limits.max_key_bytes,
                });
            }
        }
        Ok(())
    }

    fn node_status(&self) -> NodeStatus {
        NodeStatus { node_id: self.node_id, shards: self.shards.values().map(RaftNode::status).collect() }
    }

    fn identity(&self) -> Result<Option<ClusterIdentity>, ApiError> {
        self.metadata.identity().map_err(|e| ApiError::Internal(format!("metadata: {e}")))
    }

    /// Asks every member for its own view, concurrently, with a short timeout each.
    async fn cluster_status(&self) -> Result<ClusterStatus, ApiError> {
        let (cluster_id, cluster_name) = match self.identity()? {
            Some(i) => (i.cluster_id, i.cluster_name),
            None => (ClusterId::default(), self.cluster_name.clone()),
        };
        let timeout = self.limits.request_timeout().min(Duration::from_secs(3));
        let mut asks = Vec::new();
        for (node_id, member) in self.known_nodes() {
            if node_id == self.node_id {
                continue;
            }
            asks.push(async move {
                let Some(addr) = member.endpoint_addr() else {
                    return NodeReport { node_id, status: None, error: Some("no valid address".into()) };
                };
                match send_request(&self.pool, &addr, 1, ClientRequest::NodeStatus, timeout).await {
                    Ok(Ok(ClientResponse::NodeStatus(s))) => NodeReport { node_id, status: Some(s), error: None },
                    Ok(Ok(other)) => NodeReport { node_id, status: None, error: Some(format!("unexpected {other:?}")) },
                    Ok(Err(e)) => NodeReport { node_id, status: None, error: Some(e.to_string()) },
                    Err(e) => NodeReport { node_id, status: None, error: Some(e) },
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
            shards: self.shards.values().map(RaftNode::status).collect(),
            nodes: reports,
        })
    }

    /// Every node this node knows from the membership of the shards it hosts, by node id.
    /// The shards this node hosts.
    pub fn shards(&self) -> &BTreeMap<ShardId, RaftNode> {
        &self.shards
    }

    /// Applies a verified gossip announcement: leader hints (for shards not hosted here, when the
    /// announced term is not older than any seen) and which shards the node hosts.
    pub fn note_gossip(&self, a: &crate::cluster::gossip::Announcement) {
        let mut g = self.gossip_hints.lock().unwrap_or_else(|p| p.into_inner());
        for hosts in g.hosts.values_mut() {
            hosts.remove(&a.node_id);
        }
        for shard in &a.local_shards {
            g.hosts.entry(*shard).or_default().insert(a.node_id);
        }
        for hint in &a.leaders {
            if self.shards.contains_key(&hint.shard) {
                continue;
            }
            let seen = g.leader_terms.entry(hint.shard).or_default();
            if hint.term >= *seen {
                *seen = hint.term;
                self.set_hint(hint.shard, Some(hint.leader));
            }
        }
    }

    /// Every member of the cluster (from the membership of the shards hosted here).
    pub(crate) fn known_nodes(&self) -> BTreeMap<NodeId, MemberNode> {
        let mut nodes = BTreeMap::new();
        for shard in self.shards.values() {
            for (raft_id, member, _) in shard.members() {
                nodes.entry(split_raft_id(raft_id).1).or_insert(member);
            }
        }
        nodes
    }

    /// Where to reach `node_id`, from any hosted shard's membership.
    fn node_addr(&self, node_id: NodeId) -> Option<iroh::EndpointAddr> {
        self.shards
            .iter()
            .find_map(|(s, shard)| shard.member(shard_raft_id(*s, node_id)))
            .and_then(|m| m.endpoint_addr())
    }

    /// Tickets of every member.
    fn members(&self) -> Vec<String> {
        let cluster_id = *self.cluster_id.read().unwrap_or_else(|p| p.into_inner());
        self.known_nodes()
            .into_iter()
            .filter_map(|(node_id, member)| {
                let endpoint_id = iroh::EndpointId::from_bytes(&member.endpoint_id).ok()?;
                // Prefer where the member last announced itself (gossip) over membership's record.
                let addrs = self.pool.peers().announced(&endpoint_id).unwrap_or(member.addrs);
                if addrs.is_empty() {
                    return None;
                }
                Some(NodeTicket { cluster_id, node_id, endpoint_id, addrs }.encode())
            })
            .collect()
    }

    /// Adopts a cluster identity offered by a leader that is about to add this node.
    fn accept_membership(&self, info: ClusterInfo) -> Result<ClientResponse, ApiError> {
        match self.identity()? {
            Some(id) if id.cluster_id == info.cluster_id => Ok(self.accepted()),
            Some(id) => Err(ApiError::Refused(format!(
                "node {} belongs to cluster {} ({}), not {}",
                self.node_id, id.cluster_id, id.cluster_name, info.cluster_id
            ))),
            None => {
                if info.cluster_name != self.cluster_name {
                    return Err(ApiError::Refused(format!(
                        "node {} runs with --cluster-name {:?}, the cluster is named {:?}",
                        self.node_id, self.cluster_name, info.cluster_name
                    )));
                }
                self.adopt_identity(&info)?;
                Ok(self.accepted())
            }
        }
    }

    fn accepted(&self) -> ClientResponse {
        ClientResponse::MembershipAccepted { local_shards: self.shards.keys().copied().collect() }
    }

    /// Records a cluster identity this node now belongs to (after a join or an accepted add).
    pub fn adopt_identity(&self, info: &ClusterInfo) -> Result<(), ApiError> {
        self.metadata
            .set_identity(&ClusterIdentity {
                cluster_id: info.cluster_id,
                cluster_name: info.cluster_name.clone(),
                node_id: self.node_id,
                num_shards: info.num_shards,
            })
            .map_err(|e| ApiError::Internal(format!("metadata: {e}")))?;
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = info.cluster_id;
        self.ticket.write().unwrap_or_else(|p| p.into_inner()).cluster_id = info.cluster_id;
        if let Err(e) = self.write_ticket_file() {
            tracing::warn!("could not rewrite node.ticket: {e}");
        }
        Ok(())
    }

    fn cluster_info(&self) -> Result<ClusterInfo, ApiError> {
        // Retryable: the node may be in the middle of joining (its identity is recorded last).
        let id = self.identity()?.ok_or_else(|| {
            ApiError::Unavailable(format!("node {} has not initialized or joined a cluster yet", self.node_id))
        })?;
        Ok(ClusterInfo { cluster_id: id.cluster_id, cluster_name: id.cluster_name, num_shards: id.num_shards })
    }

    /// Checks that `node_id`/`endpoint_id` can be added: a node id already in use by another
    /// endpoint, or an endpoint already a member under another node id, is refused.
    fn check_new_member(&self, node_id: NodeId, endpoint_id: &[u8; 32]) -> Result<(), ApiError> {
        for (raft_id, member, _) in self.primary()?.members() {
            let id = split_raft_id(raft_id).1;
            if id == node_id && &member.endpoint_id != endpoint_id {
                return Err(ApiError::Refused(format!(
                    "node id {node_id} is already a member of this cluster with another endpoint id; \
                     give the new node an unused --node-id"
                )));
            }
            if id != node_id && &member.endpoint_id == endpoint_id {
                return Err(ApiError::Refused(format!(
                    "this endpoint is already a member of this cluster as node {id}, not node {node_id}"
                )));
            }
        }
        Ok(())
    }

    /// Handles a join (on shard 0's leader): checks, then on every shard adds the node as a
    /// learner (waiting for it to catch up) and promotes it to voter.
    async fn join(&self, req: JoinRequest) -> Result<ClientResponse, ApiError> {
        let info = self.cluster_info()?;
        if req.cluster_id != info.cluster_id {
            return Err(ApiError::Refused(format!(
                "the joining node's ticket names cluster {}, but this is cluster {} ({})",
                req.cluster_id, info.cluster_id, info.cluster_name
            )));
        }
        if req.cluster_name != info.cluster_name {
            return Err(ApiError::Refused(format!(
                "the joining node runs with --cluster-name {:?}, but this cluster is named {:?}",
                req.cluster_name, info.cluster_name
            )));
        }
        if req.num_shards != info.num_shards {
            return Err(ApiError::Refused(format!(
                "the joining node is configured for {} shards, this cluster has {}",
                req.num_shards, info.num_shards
            )));
        }
        check_node_id(req.node_id)?;
        // One membership change at a time on this node: two joiners with the same node id must
        // not both pass the duplicate check.
        let _guard = self.membership_lock.lock().await;
        self.check_new_member(req.node_id, &req.endpoint_id)?;
        self.check_shard_list(&req.local_shards)?;
        let member = MemberAddr { endpoint_id: req.endpoint_id, addrs: req.addrs.clone() };
        self.add_everywhere(req.node_id, &member, &req.local_shards).await?;
        for &shard in &req.local_shards {
            self.change_shard(shard, MembershipChange::AddVoter { node_id: req.node_id }).await?;
        }
        tracing::info!(node_id = req.node_id, "node joined as voter");
        Ok(ClientResponse::Joined(info))
    }

    /// Adds a node as learner on every shard, then confirms shard 0 lists it with this endpoint.
    async fn add_everywhere(
        &self,
        node_id: NodeId,
        member: &MemberAddr,
        shards: &[ShardId],
    ) -> Result<ShardStatus, ApiError> {
        let mut first = None;
        for &shard in shards {
            let change = MembershipChange::AddLearner { node_id, member: member.clone() };
            let status = self.change_shard(shard, change).await?;
            first.get_or_insert(status);
        }
        match self.primary()?.member(shard_raft_id(0, node_id)) {
            Some(m) if m.endpoint_id == member.endpoint_id => {}
            Some(_) => {
                return Err(ApiError::Refused(format!(
                    "node id {node_id} is already a member of this cluster with another endpoint id"
                )))
            }
            None => return Err(ApiError::Unavailable(format!("node {node_id} was not added yet; retry"))),
        }
        Ok(first.unwrap_or_else(|| self.first_status()))
    }

    /// Checks a node's list of hosted shards: shard 0 included, every shard exists, no repeats.
    fn check_shard_list(&self, shards: &[ShardId]) -> Result<(), ApiError> {
        let unique: BTreeSet<&ShardId> = shards.iter().collect();
        if !shards.contains(&0) || unique.len() != shards.len() || shards.iter().any(|s| *s >= self.router.num_shards())
        {
            return Err(ApiError::Refused(format!(
                "the node's shard list {shards:?} must include shard 0, name each shard once, and stay below {}",
                self.router.num_shards()
            )));
        }
        Ok(())
    }

    /// Applies one membership change to one shard, on that shard's leader (here or forwarded).
    async fn change_shard(&self, shard: ShardId, change: MembershipChange) -> Result<ShardStatus, ApiError> {
        match self.route(ClientRequest::ShardMembership { shard, change }, 0).await? {
            ClientResponse::Membership(status) => Ok(status),
            other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Applies a membership change to a shard this node hosts (it must lead it).
    async fn apply_shard_change(&self, shard_id: ShardId, change: MembershipChange) -> ClientResult {
        let shard = self.local_shard(shard_id)?;
        match change {
            MembershipChange::AddLearner { node_id, member } => {
                check_node_id(node_id)?;
                let raft_id = shard_raft_id(shard_id, node_id);
                let member = MemberNode { endpoint_id: member.endpoint_id, addrs: member.addrs };
                match shard.member(raft_id) {
                    None => shard.add_learner(raft_id, member.clone()).await?,
                    Some(m) if m.endpoint_id != member.endpoint_id => {
                        return Err(ApiError::Refused(format!(
                            "node id {node_id} is already a member of this cluster with another endpoint id; \
                             give the new node an unused --node-id"
                        )))
                    }
                    // A re-join (e.g. after a crash mid-join): refresh the address if it moved.
                    Some(m) if m.addrs != member.addrs => {
                        let nodes = BTreeMap::from([(raft_id, member.clone())]);
                        shard.change_membership(ChangeMembers::SetNodes(nodes)).await?
                    }
                    Some(_) => {}
                }
            }
            MembershipChange::AddVoter { node_id } => {
                let raft_id = shard_raft_id(shard_id, node_id);
                match shard.members().into_iter().find(|(id, _, _)| *id == raft_id) {
                    // The node does not host this shard: nothing to promote here.
                    None => {}
                    Some((_, _, true)) => {}
                    Some(_) => shard.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([raft_id]))).await?,
                }
            }
            MembershipChange::Remove { node_id } => {
                let raft_id = shard_raft_id(shard_id, node_id);
                let members = shard.members();
                if raft_id == shard.raft_id() {
                    // A node never proposes its own removal. openraft 0.9 steps a removed leader
                    // down between the two membership entries of a removal and then trips over
                    // its own leadership check. Checking "am I the leader?" once is not enough:
                    // leadership can come back to this node while the change waits for a leader
                    // (seed 1795704930358377447). So the removal is always proposed by another
                    // voter: if this node leads, it hands the shard over first; otherwise it
                    // names the leader and the request is forwarded there.
                    return self.remove_self(shard_id, &members).await;
                }
                if let Some((_, _, voter)) = members.iter().find(|(id, _, _)| *id == raft_id) {
                    if *voter {
                        if members.iter().filter(|(_, _, v)| *v).count() <= 1 {
                            return Err(ApiError::Refused(format!(
                                "node {node_id} is the last voter of shard {shard_id}; it cannot be removed"
                            )));
                        }
                        shard.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([raft_id]))).await?;
                    }
                    shard.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([raft_id]))).await?;
                }
            }
        }
        Ok(ClientResponse::Membership(shard.status()))
    }

    /// The removal of this node from `shard_id`, asked of this node: answers `NotLeader` naming
    /// the shard's leader (after handing the leadership over if this node holds it), so that the
    /// request is forwarded to a node that can propose it.
    async fn remove_self(&self, shard_id: ShardId, members: &[(u64, MemberNode, bool)]) -> ClientResult {
        let shard = self.local_shard(shard_id)?;
        let deadline = Instant::now() + self.limits.request_timeout();
        if !shard.wait_for_leader(deadline).await {
            return Err(ApiError::Unavailable(format!("shard {shard_id} has no leader")));
        }
        match shard.leader() {
            Some(leader) if leader == self.node_id => self.hand_over_before_removal(shard_id, members).await,
            leader => Err(ApiError::NotLeader { leader, leader_ticket: None }),
        }
    }

    /// Moves the leadership of `shard_id` from this node to another voter, so that this node
    /// can be removed by the new leader; answers `NotLeader` naming the new leader.
    async fn hand_over_before_removal(&self, shard_id: ShardId, members: &[(u64, MemberNode, bool)]) -> ClientResult {
        let shard = self.local_shard(shard_id)?;
        let targets: Vec<NodeId> = members
            .iter()
            .filter(|(id, _, voter)| *voter && *id != shard.raft_id())
            .map(|(id, _, _)| split_raft_id(*id).1)
            .collect();
        if targets.is_empty() {
            return Err(ApiError::Refused(format!(
                "node {} is the last voter of shard {shard_id}; it cannot be removed",
                self.node_id
            )));
        }
        let mut last = String::new();
        for target in targets.iter().cycle().take(targets.len() * 2) {
            match self.move_leader_attempt(shard_id, *target).await {
                Ok(_) | Err(ApiError::NotLeader { .. }) => {}
                Err(e) => last = e.to_string(),
            }
            if let Some(leader) = shard.leader().filter(|l| *l != self.node_id) {
                return Err(ApiError::NotLeader { leader: Some(leader), leader_ticket: None });
            }
        }
        Err(ApiError::Unavailable(format!(
            "node {} leads shard {shard_id} and could not hand it over before its removal{}",
            self.node_id,
            if last.is_empty() { String::new() } else { format!(" (last error: {last})") }
        )))
    }

    /// `cluster add-learner TICKET`: hands the node our identity, then adds it as a learner.
    async fn add_learner(&self, ticket: &str) -> Result<ClientResponse, ApiError> {
        let ticket = NodeTicket::decode(ticket).map_err(|e| ApiError::InvalidRequest(format!("ticket: {e}")))?;
        check_node_id(ticket.node_id)?;
        let _guard = self.membership_lock.lock().await;
        let info = self.cluster_info()?;
        if ticket.cluster_id != ClusterId::default() && ticket.cluster_id != info.cluster_id {
            return Err(ApiError::Refused(format!(
                "node {} belongs to cluster {}, this is cluster {}",
                ticket.node_id, ticket.cluster_id, info.cluster_id
            )));
        }
        let endpoint_id = *ticket.endpoint_id.as_bytes();
        self.check_new_member(ticket.node_id, &endpoint_id)?;
        let timeout = self.limits.request_timeout();
        let local_shards =
            match send_request(&self.pool, &ticket.endpoint_addr(), 1, ClientRequest::AcceptMembership(info), timeout)
                .await
            {
                Ok(Ok(ClientResponse::MembershipAccepted { local_shards })) => local_shards,
                Ok(Ok(other)) => return Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(ApiError::Unavailable(format!("node {} unreachable: {e}", ticket.node_id))),
            };
        self.check_shard_list(&local_shards)?;
        let member = MemberAddr { endpoint_id, addrs: ticket.addrs.clone() };
        self.add_everywhere(ticket.node_id, &member, &local_shards).await.map(ClientResponse::Membership)
    }

    /// `cluster promote ID`: learner → voter on every shard it hosts.
    async fn promote(&self, node_id: NodeId) -> Result<ClientResponse, ApiError> {
        self.change_member_everywhere(node_id, MembershipChange::AddVoter { node_id }).await
    }

    /// `cluster remove ID`: out of every shard's membership.
    async fn remove(&self, node_id: NodeId) -> Result<ClientResponse, ApiError> {
        self.change_member_everywhere(node_id, MembershipChange::Remove { node_id }).await
    }

    /// Applies `change` about member `node_id` on every shard (a no-op on shards it does not
    /// host); answers with shard 0's membership afterwards.
    async fn change_member_everywhere(&self, node_id: NodeId, change: MembershipChange) -> ClientResult {
        check_node_id(node_id)?;
        let _guard = self.membership_lock.lock().await;
        if self.primary()?.member(shard_raft_id(0, node_id)).is_none() {
            return Err(ApiError::InvalidRequest(format!("node {node_id} is not a member; add it first")));
        }
        // Shard 0's membership says who is a member, so a removal leaves it for last: if the
        // removal stops half-way (a timeout during a leader hand-over, say), a retry still finds
        // the node a member and finishes the other shards.
        let shards: Vec<ShardId> = match change {
            MembershipChange::Remove { .. } => (0..self.router.num_shards()).rev().collect(),
            _ => (0..self.router.num_shards()).collect(),
        };
        let mut first = None;
        for shard in shards {
            let status = self.change_shard(shard, change.clone()).await?;
            if shard == 0 || first.is_none() {
                first = Some(status);
            }
        }
        Ok(ClientResponse::Membership(first.unwrap_or_else(|| self.first_status())))
    }

    /// The shard a leader-bound request belongs to (membership coordination runs on shard 0).
    fn request_shard(&self, request: &ClientRequest) -> Result<ShardId, ApiError> {
        match request {
            ClientRequest::Get { key, .. } => Ok(self.router.shard_for_key(key)),
            ClientRequest::Write { command, .. } => self.write_shard(command),
            ClientRequest::ShardScan { shard, .. }
            | ClientRequest::ShardMembership { shard, .. }
            | ClientRequest::MoveLeader { shard, .. }
            | ClientRequest::MoveLeaderAttempt { shard, .. } => {
                if *shard >= self.router.num_shards() {
                    return Err(ApiError::InvalidRequest(format!(
                        "shard {shard} does not exist (the cluster has {})",
                        self.router.num_shards()
                    )));
                }
                Ok(*shard)
            }
            _ => Ok(0),
        }
    }

    /// The one shard every key of a write falls into (a batch may not span shards).
    fn write_shard(&self, command: &WriteCommand) -> Result<ShardId, ApiError> {
        {
            {
                let mut shards: Vec<ShardId> = command.keys().iter().map(|k| self.router.shard_for_key(k)).collect();
                shards.sort_unstable();
                shards.dedup();
                match shards.as_slice() {
                    [one] => Ok(*one),
                    [] => Err(ApiError::InvalidRequest("a write must name at least one key".into())),
                    many => Err(ApiError::InvalidRequest(format!(
                        "a batch must stay within one shard; its keys fall into shards {many:?}"
                    ))),
                }
            }
        }
    }

    /// Answers a request on this node, without forwarding.
    async fn handle_local(&self, request: ClientRequest) -> ClientResult {
        match request {
            ClientRequest::Get { key, consistency } => {
                self.check_key(&key)?;
                let shard = self.local_shard(self.router.shard_for_key(&key))?;
                shard.get(&key, consistency).await.map(ClientResponse::Get)
            }
            ClientRequest::Write { session, command } => {
                self.validate_write(&command)?;
                let shard = self.local_shard(self.write_shard(&command)?)?;
                shard.write(session, command).await.map(ClientResponse::Write)
            }
            ClientRequest::Scan(req) => {
                self.validate_scan(&req)?;
                self.scan_all(req).await.map(ClientResponse::Scan)
            }
            ClientRequest::ShardScan { shard, scan } => {
                self.validate_scan(&scan)?;
                let shard = self.local_shard(shard)?;
                shard.scan(&scan, self.limits.max_scan_page as usize).await.map(ClientResponse::Scan)
            }
            ClientRequest::ShardMembership { shard, change } => self.apply_shard_change(shard, change).await,
            ClientRequest::ClusterStatus => self.cluster_status().await.map(ClientResponse::ClusterStatus),
            ClientRequest::NodeStatus => Ok(ClientResponse::NodeStatus(self.node_status())),
            ClientRequest::Members => Ok(ClientResponse::Members(self.members())),
            ClientRequest::ClusterInit => {
                self.init_cluster().await.map(|initialized| ClientResponse::ClusterInit { initialized })
            }
            ClientRequest::AddLearner { ticket } => self.add_learner(&ticket).await,
            ClientRequest::Promote { node_id } => self.promote(node_id).await,
            ClientRequest::Remove { node_id } => self.remove(node_id).await,
            ClientRequest::Join(req) => self.join(req).await,
            ClientRequest::AcceptMembership(info) => self.accept_membership(info),
            ClientRequest::MoveLeader { shard, node_id } => self.move_leader(shard, node_id).await,
            ClientRequest::MoveLeaderAttempt { shard, node_id } => self.move_leader_attempt(shard, node_id).await,
            ClientRequest::TriggerElect { shard } => {
                tracing::debug!(shard, "campaigning for a leadership hand-over");
                let shard = self.local_shard(shard)?;
                shard.raft().trigger().elect().await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
                Ok(ClientResponse::ElectionTriggered)
            }
            ClientRequest::BalanceLeaders => self.balance_leaders().await,
            // Unpacked by `handle` before routing; never inside a batch.
            ClientRequest::Forwarded { .. } => {
                Err(ApiError::InvalidRequest("a forwarded batch cannot be nested or routed".into()))
            }
        }
    }

    fn leaders(&self) -> ClientResponse {
        ClientResponse::Leaders(self.shards.values().map(RaftNode::status).collect())
    }

    /// Moves the leadership of `shard` to `node_id`, retrying attempts (on whichever node leads
    /// the shard at the time) until it holds or the request timeout passes.
    async fn move_leader(&self, shard_id: ShardId, node_id: NodeId) -> ClientResult {
        check_node_id(node_id)?;
        let shard = self.local_shard(shard_id)?;
        if !shard.members().iter().any(|(id, _, voter)| *voter && *id == shard_raft_id(shard_id, node_id)) {
            return Err(ApiError::InvalidRequest(format!("node {node_id} is not a voter of shard {shard_id}")));
        }
        let deadline = Instant::now() + self.limits.request_timeout().max(Duration::from_secs(30));
        let mut last = String::new();
        while Instant::now() < deadline {
            if shard.leader() == Some(node_id) {
                return Ok(self.leaders());
            }
            match self.route(ClientRequest::MoveLeaderAttempt { shard: shard_id, node_id }, 0).await {
                Ok(_) => {}
                Err(e) => last = e.to_string(),
            }
            // Wait until this node has learned the outcome.
            let settle = Instant::now() + Duration::from_secs(5);
            while Instant::now() < settle && shard.leader() != Some(node_id) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Err(ApiError::Unavailable(format!(
            "moving the leadership of shard {shard_id} to node {node_id} did not hold before the timeout{}",
            if last.is_empty() { String::new() } else { format!(" (last error: {last})") }
        )))
    }

    /// One leadership hand-over, run on the shard's leader: stop heartbeats so that the
    /// followers' leader lease lapses, ask the target to campaign, resume heartbeats.
    /// (openraft 0.9 has no leadership transfer call.)
    async fn move_leader_attempt(&self, shard_id: ShardId, node_id: NodeId) -> ClientResult {
        let shard = self.local_shard(shard_id)?;
        if shard.leader() == Some(node_id) {
            return Ok(self.leaders());
        }
        // Only the leader hands over; anyone else answers NotLeader and the request is forwarded.
        if shard.leader() != Some(self.node_id) {
            return Err(ApiError::NotLeader { leader: shard.leader(), leader_ticket: None });
        }
        let addr = self
            .node_addr(node_id)
            .ok_or_else(|| ApiError::InvalidRequest(format!("node {node_id} has no known address")))?;
        let raft = shard.raft();
        let lease = Duration::from_millis(raft.config().election_timeout_max);
        // Under load, every client write and linearizable read sends AppendEntries, which renew
        // the followers' leader lease: they would refuse to vote for the target and this node
        // would win the next election again. So hold new writes and reads, let the target catch
        // up with the log (a lagging target cannot win a vote either), then go quiet.
        let _paused = shard.pause_for_handover();
        let target_raft_id = shard_raft_id(shard_id, node_id);
        if !shard.wait_replicated_to(target_raft_id, Instant::now() + lease).await {
            tracing::debug!(shard = shard_id, to = node_id, "hand-over: the target has not caught up; trying anyway");
        }
        raft.runtime_config().heartbeat(false);
        let result = async {
            tokio::time::sleep(lease + Duration::from_millis(100)).await;
            let ask = send_request(&self.pool, &addr, 1, ClientRequest::TriggerElect { shard: shard_id }, lease * 2);
            let answer = ask.await;
            tracing::debug!(shard = shard_id, to = node_id, "asked the target to campaign: {answer:?}");
            match answer {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(ApiError::Unavailable(format!("node {node_id} unreachable: {e}"))),
            }
            // Give the election time to finish before heartbeats resume.
            let changed = tokio::time::timeout(lease * 2, shard.leader_changed_from(self.node_id)).await;
            tracing::debug!(
                shard = shard_id,
                "hand-over: leader changed: {}, now {:?}",
                changed.is_ok(),
                shard.leader()
            );
            Ok(())
        }
        .await;
        raft.runtime_config().heartbeat(true);
        result.map(|()| self.leaders())
    }

    /// Spreads shard leaders evenly over the voters: while some node leads more than
    /// `ceil(shards / voters)` shards, move one of its shards to the voter leading the fewest.
    async fn balance_leaders(&self) -> ClientResult {
        let voters: Vec<NodeId> = self.primary()?.status().voters;
        if voters.is_empty() {
            return Err(ApiError::Unavailable("shard 0 has no voters".into()));
        }
        let cap = (self.router.num_shards() as usize).div_ceil(voters.len());
        for _round in 0..self.router.num_shards() * 2 {
            let mut count: BTreeMap<NodeId, usize> = voters.iter().map(|v| (*v, 0)).collect();
            let mut led: BTreeMap<NodeId, Vec<ShardId>> = BTreeMap::new();
            for (id, shard) in &self.shards {
                if let Some(l) = shard.leader() {
                    *count.entry(l).or_default() += 1;
                    led.entry(l).or_default().push(*id);
                }
            }
            let Some((&busiest, &most)) = count.iter().max_by_key(|(_, c)| **c) else { break };
            if most <= cap {
                return Ok(self.leaders());
            }
            let Some((&idlest, _)) = count.iter().min_by_key(|(_, c)| **c) else { break };
            let Some(&shard) = led.get(&busiest).and_then(|s| s.last()) else { break };
            tracing::info!(shard, from = busiest, to = idlest, "balancing shard leadership");
            self.move_leader(shard, idlest).await?;
        }
        Ok(self.leaders())
    }

    /// A scan over every shard, merged in key order. Each shard returns a page from the same
    /// lower bound; the merged page stops at the smallest last key of any shard that has more,
    /// so no key of any shard is skipped, and at `limit` keys.
    async fn scan_all(&self, req: ScanRequest) -> Result<ScanPage, ApiError> {
        let num = self.router.num_shards();
        if num == 1 {
            return match self.route(ClientRequest::ShardScan { shard: 0, scan: req }, 0).await? {
                ClientResponse::Scan(page) => Ok(page),
                other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
            };
        }
        let limit = (req.limit as usize).min(self.limits.max_scan_page as usize).max(1);
        let pages = futures::future::join_all((0..num).map(|shard| {
            let scan = ScanRequest { limit: limit as u32, ..req.clone() };
            self.route(ClientRequest::ShardScan { shard, scan }, 0)
        }))
        .await;
        let mut entries = Vec::new();
        let mut bound: Option<Vec<u8>> = None;
        for page in pages {
            match page? {
                ClientResponse::Scan(p) => {
                    if let Some(c) = &p.continuation {
                        if bound.as_ref().is_none_or(|b| c < b) {
                            bound = Some(c.clone());
                        }
                    }
                    entries.extend(p.entries);
                }
                other => return Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
            }
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(b) = &bound {
            entries.retain(|kv| &kv.key <= b);
        }
        let more = bound.is_some() || entries.len() > limit;
        entries.truncate(limit);
        let continuation = if more { entries.last().map(|kv| kv.key.clone()) } else { None };
        Ok(ScanPage { entries, continuation })
    }
}

fn check_node_id(node_id: NodeId) -> Result<(), ApiError> {
    if node_id == 0 || node_id > crate::api::MAX_NODE_ID {
        return Err(ApiError::InvalidRequest(format!("node id {node_id} is out of range 1..=2^48-1")));
    }
    Ok(())
}

impl ClientService for NodeService {
    async fn handle(&self, request: ClientRequest, hops: u8) -> ClientResult {
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

/// Most times a request is forwarded between nodes: a node that does not host the shard sends it
/// to a node that does, which may send it on to the shard's leader.
const MAX_HOPS: u8 = 2;

type BoxedResult<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ClientResult> + Send + 'a>>;

impl NodeService {
    /// Routes a request: answered here, or forwarded once to its shard's leader. (Boxed: scans
    /// and membership changes route their per-shard parts through it again.)
    fn route(&self, request: ClientRequest, hops: u8) -> BoxedResult<'_> {
        Box::pin(self.route_inner(request, hops))
    }

    /// Sends a request for a shard this node does not host to a node that does (preferably its
    /// leader), found from leader hints or by asking the members.
    async fn route_to_remote_shard(&self, shard_id: ShardId, request: ClientRequest, hops: u8) -> ClientResult {
        if hops >= MAX_HOPS {
            return Err(ApiError::Unavailable(format!("shard {shard_id} is not hosted on node {}", self.node_id)));
        }
        let deadline = Instant::now() + self.limits.request_timeout();
        loop {
            let why = match self.shard_host(shard_id).await {
                None => format!("no reachable node hosts shard {shard_id}"),
                Some(target) => match self.node_addr(target) {
                    None => format!("node {target} has no known address"),
                    Some(addr) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match send_request(&self.pool, &addr, hops + 1, request.clone(), left).await {
                            Ok(Err(ApiError::NotLeader { leader: Some(l), .. })) => {
                                self.set_hint(shard_id, Some(l));
                                format!("node {target} does not lead shard {shard_id}")
                            }
                            Ok(Err(ApiError::Unavailable(m))) => {
                                self.set_hint(shard_id, None);
                                m
                            }
                            Ok(answer) => return answer,
                            Err(e) => {
                                self.set_hint(shard_id, None);
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

    fn set_hint(&self, shard: ShardId, node: Option<NodeId>) {
        let mut hints = self.leader_hints.lock().unwrap_or_else(|p| p.into_inner());
        match node {
            Some(n) => hints.insert(shard, n),
            None => hints.remove(&shard),
        };
    }

    /// A node that hosts `shard` — its leader if anyone reports one — from the hint cache, or
    /// by asking every member for its status.
    async fn shard_host(&self, shard: ShardId) -> Option<NodeId> {
        if let Some(n) = self.leader_hints.lock().unwrap_or_else(|p| p.into_inner()).get(&shard) {
            return Some(*n);
        }
        let announced = self.gossip_hints.lock().unwrap_or_else(|p| p.into_inner()).hosts.get(&shard).cloned();
        if let Some(host) = announced.and_then(|h| h.into_iter().find(|n| *n != self.node_id)) {
            return Some(host);
        }
        let timeout = self.limits.request_timeout().min(Duration::from_secs(3));
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
        self.set_hint(shard, found);
        found
    }

    async fn route_inner(&self, request: ClientRequest, hops: u8) -> ClientResult {
        let shard_bound = matches!(
            request,
            ClientRequest::Get { .. }
                | ClientRequest::Write { .. }
                | ClientRequest::ShardScan { .. }
                | ClientRequest::ShardMembership { .. }
                | ClientRequest::MoveLeader { .. }
                | ClientRequest::MoveLeaderAttempt { .. }
        );
        if shard_bound {
            let shard_id = self.request_shard(&request)?;
            if !self.shards.contains_key(&shard_id) {
                return self.route_to_remote_shard(shard_id, request, hops).await;
            }
        }
        if !request.needs_leader() || matches!(request, ClientRequest::Scan(_)) {
            return self.handle_local(request).await;
        }
        // Leader-bound: answer here if we lead the request's shard; otherwise forward to that
        // shard's leader (at most MAX_HOPS hops in all, so never a loop). If the leader cannot be
        // reached (it may just have died), wait for Raft to learn a new one and try again, until
        // the request timeout.
        let shard_id = self.request_shard(&request)?;
        let Some(shard) = self.shards.get(&shard_id) else {
            return self.route_to_remote_shard(shard_id, request, hops).await;
        };
        let deadline = Instant::now() + self.limits.request_timeout();
        loop {
            let leader = match self.handle_local(request.clone()).await {
                Err(ApiError::NotLeader { leader: Some(leader), .. }) if hops < MAX_HOPS => leader,
                other => return other,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let why = match self.node_addr(leader) {
                None => format!("leader {leader} of shard {shard_id} has no known address"),
                Some(addr) => {
                    // Give up on this leader as soon as Raft tells us it changed: a dead leader's
                    // connection may hang until the QUIC idle timeout.
                    // Straight from a client: batched with other requests for that leader.
                    let forward = async {
                        match ForwardedRequest::of(&request).filter(|_| hops == 0) {
                            Some(batchable) => self.forwarder.send(leader, &addr, batchable, left).await,
                            None => send_request(&self.pool, &addr, hops + 1, request.clone(), left).await,
                        }
                    };
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
}
