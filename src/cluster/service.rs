//! The client-facing service of a node: validates every request against the configured limits,
//! then answers it from the shard that owns the key.
//!
//! Owns: request validation; forwarding leader-bound requests (writes, linearizable reads,
//! membership changes) once to the leader; `cluster init`; joins and membership changes; and
//! `cluster status`, which asks every member for its own view. Reads and writes go to
//! [`RaftNode`]; nothing here touches storage directly.

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
        ClusterInfo, ClusterStatus, JoinRequest, NodeId, NodeReport, NodeStatus, NodeTicket, ScanRequest, WriteCommand,
    },
    cluster::{
        endpoint::write_file_atomic,
        metadata::{ClusterIdentity, MetadataStore},
    },
    config::{LimitsConfig, NodeConfig},
    protocol::{client::send_request, ClientService},
    raft::{
        network::{ConnectionPool, SharedClusterId},
        MemberNode, RaftNode,
    },
};

/// Serves client requests for one node.
#[derive(Debug)]
pub struct NodeService {
    node_id: NodeId,
    cluster_name: String,
    data_dir: PathBuf,
    limits: LimitsConfig,
    shard0: RaftNode,
    metadata: Arc<MetadataStore>,
    cluster_id: SharedClusterId,
    /// This node as a Raft member (endpoint id + addresses).
    me: MemberNode,
    ticket: RwLock<NodeTicket>,
    init_lock: tokio::sync::Mutex<()>,
    membership_lock: tokio::sync::Mutex<()>,
    pool: ConnectionPool,
}

impl NodeService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &NodeConfig,
        shard0: RaftNode,
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
            shard0,
            metadata,
            cluster_id,
            me,
            ticket: RwLock::new(ticket),
            init_lock: tokio::sync::Mutex::new(()),
            membership_lock: tokio::sync::Mutex::new(()),
            pool,
        }
    }

    pub fn ticket(&self) -> NodeTicket {
        self.ticket.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Writes the current ticket to `<data-dir>/node.ticket`.
    pub fn write_ticket_file(&self) -> std::io::Result<()> {
        let ticket = self.ticket().encode();
        write_file_atomic(&self.data_dir.join("node.ticket"), format!("{ticket}\n").as_bytes())
    }

    /// Makes this node a one-node cluster, unless it already belongs to one.
    /// Returns whether this call initialized it.
    pub async fn init_cluster(&self) -> Result<bool, ApiError> {
        let _guard = self.init_lock.lock().await;
        let internal = |e: crate::raft::StorageError| ApiError::Internal(format!("metadata: {e}"));
        if self.metadata.identity().map_err(internal)?.is_some() {
            return Ok(false);
        }
        let raft = self.shard0.raft();
        if raft.is_initialized().await.map_err(|e| ApiError::Unavailable(e.to_string()))? {
            // Identity is recorded after Raft is initialized; a crash in between leaves a one-node
            // group of our own, which we adopt. Anything else belongs to someone else's cluster.
            let voters: Vec<u64> = raft.metrics().borrow().membership_config.membership().voter_ids().collect();
            if voters != [self.shard0.raft_id()] {
                return Err(ApiError::InvalidRequest("this node's Raft state belongs to a cluster already".into()));
            }
        }
        let cluster_id = ClusterId::random();
        let members = BTreeMap::from([(self.shard0.raft_id(), self.me.clone())]);
        self.shard0.initialize(members).await?;
        self.metadata
            .set_identity(&ClusterIdentity {
                cluster_id,
                cluster_name: self.cluster_name.clone(),
                node_id: self.node_id,
                num_shards: 1,
            })
            .map_err(internal)?;
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = cluster_id;
        self.ticket.write().unwrap_or_else(|p| p.into_inner()).cluster_id = cluster_id;
        if let Err(e) = self.write_ticket_file() {
            tracing::warn!("could not rewrite node.ticket: {e}");
        }
        tracing::info!(%cluster_id, "initialized a new cluster");
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
        NodeStatus { node_id: self.node_id, shards: vec![self.shard0.status()] }
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
        let mut reports = Vec::new();
        let mut asks = Vec::new();
        for (raft_id, member, _) in self.shard0.members() {
            let node_id = split_raft_id(raft_id).1;
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
        reports.extend(futures::future::join_all(asks).await);
        reports.push(NodeReport { node_id: self.node_id, status: Some(self.node_status()), error: None });
        reports.sort_by_key(|r| r.node_id);
        Ok(ClusterStatus {
            node_id: self.node_id,
            cluster_id,
            cluster_name,
            shards: vec![self.shard0.status()],
            nodes: reports,
        })
    }

    /// Tickets of every member of shard 0.
    fn members(&self) -> Vec<String> {
        let cluster_id = *self.cluster_id.read().unwrap_or_else(|p| p.into_inner());
        self.shard0
            .members()
            .into_iter()
            .filter_map(|(raft_id, member, _)| {
                let endpoint_id = iroh::EndpointId::from_bytes(&member.endpoint_id).ok()?;
                if member.addrs.is_empty() {
                    return None;
                }
                let node_id = split_raft_id(raft_id).1;
                Some(NodeTicket { cluster_id, node_id, endpoint_id, addrs: member.addrs }.encode())
            })
            .collect()
    }

    /// Adopts a cluster identity offered by a leader that is about to add this node.
    fn accept_membership(&self, info: ClusterInfo) -> Result<ClientResponse, ApiError> {
        match self.identity()? {
            Some(id) if id.cluster_id == info.cluster_id => Ok(ClientResponse::MembershipAccepted),
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
                Ok(ClientResponse::MembershipAccepted)
            }
        }
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
    fn check_new_member(&self, node_id: NodeId, endpoint_id: &[u8; 32]) -> Result<Option<bool>, ApiError> {
        for (raft_id, member, voter) in self.shard0.members() {
            let id = split_raft_id(raft_id).1;
            if id == node_id {
                if &member.endpoint_id != endpoint_id {
                    return Err(ApiError::Refused(format!(
                        "node id {node_id} is already a member of this cluster with another endpoint id; \
                         give the new node an unused --node-id"
                    )));
                }
                return Ok(Some(voter));
            }
            if &member.endpoint_id == endpoint_id {
                return Err(ApiError::Refused(format!(
                    "this endpoint is already a member of this cluster as node {id}, not node {node_id}"
                )));
            }
        }
        Ok(None)
    }

    /// Handles a join on the leader: checks, adds as learner (waits for catch-up), promotes.
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
        let member = MemberNode { endpoint_id: req.endpoint_id, addrs: req.addrs.clone() };
        let existing = self.check_new_member(req.node_id, &req.endpoint_id)?;
        let raft_id = shard_raft_id(0, req.node_id);
        match existing {
            None => self.shard0.add_learner(raft_id, member.clone()).await?,
            // A re-join (e.g. after a crash mid-join): refresh the address if it moved.
            Some(_) => self.refresh_address(raft_id, &member).await?,
        }
        self.verify_member(raft_id, &req.endpoint_id)?;
        if existing != Some(true) {
            self.shard0.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([raft_id]))).await?;
            tracing::info!(node_id = req.node_id, "node joined as voter");
        }
        Ok(ClientResponse::Joined(info))
    }

    /// Updates a member's addresses in the membership if they changed.
    async fn refresh_address(&self, raft_id: u64, member: &MemberNode) -> Result<(), ApiError> {
        if self.shard0.member(raft_id).is_some_and(|m| m.addrs != member.addrs) {
            let nodes = BTreeMap::from([(raft_id, member.clone())]);
            self.shard0.change_membership(ChangeMembers::SetNodes(nodes)).await?;
        }
        Ok(())
    }

    /// Confirms that `raft_id` is in the membership with this endpoint id (`add_learner` leaves
    /// an existing entry alone, so a race must not be reported as success).
    fn verify_member(&self, raft_id: u64, endpoint_id: &[u8; 32]) -> Result<(), ApiError> {
        match self.shard0.member(raft_id) {
            Some(m) if &m.endpoint_id == endpoint_id => Ok(()),
            Some(_) => Err(ApiError::Refused(format!(
                "node id {} is already a member of this cluster with another endpoint id",
                split_raft_id(raft_id).1
            ))),
            None => Err(ApiError::Unavailable(format!("node {} was not added; retry", split_raft_id(raft_id).1))),
        }
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
        match send_request(&self.pool, &ticket.endpoint_addr(), 1, ClientRequest::AcceptMembership(info), timeout).await
        {
            Ok(Ok(ClientResponse::MembershipAccepted)) => {}
            Ok(Ok(other)) => return Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(ApiError::Unavailable(format!("node {} unreachable: {e}", ticket.node_id))),
        }
        let member = MemberNode { endpoint_id, addrs: ticket.addrs.clone() };
        let raft_id = shard_raft_id(0, ticket.node_id);
        self.shard0.add_learner(raft_id, member).await?;
        self.verify_member(raft_id, &endpoint_id)?;
        Ok(ClientResponse::Membership(self.shard0.status()))
    }

    async fn promote(&self, node_id: NodeId) -> Result<ClientResponse, ApiError> {
        check_node_id(node_id)?;
        let _guard = self.membership_lock.lock().await;
        let raft_id = shard_raft_id(0, node_id);
        match self.shard0.members().into_iter().find(|(id, _, _)| *id == raft_id) {
            None => return Err(ApiError::InvalidRequest(format!("node {node_id} is not a member; add it first"))),
            Some((_, _, true)) => {}
            Some(_) => self.shard0.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([raft_id]))).await?,
        }
        Ok(ClientResponse::Membership(self.shard0.status()))
    }

    async fn remove(&self, node_id: NodeId) -> Result<ClientResponse, ApiError> {
        check_node_id(node_id)?;
        let _guard = self.membership_lock.lock().await;
        let raft_id = shard_raft_id(0, node_id);
        let Some((_, _, voter)) = self.shard0.members().into_iter().find(|(id, _, _)| *id == raft_id) else {
            return Err(ApiError::InvalidRequest(format!("node {node_id} is not a member")));
        };
        if voter {
            let voters = self.shard0.members().iter().filter(|(_, _, v)| *v).count();
            if voters <= 1 {
                return Err(ApiError::Refused(format!("node {node_id} is the last voter; it cannot be removed")));
            }
            self.shard0.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([raft_id]))).await?;
        }
        self.shard0.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([raft_id]))).await?;
        Ok(ClientResponse::Membership(self.shard0.status()))
    }

    /// Answers a request on this node, without forwarding.
    async fn handle_local(&self, request: ClientRequest) -> ClientResult {
        match request {
            ClientRequest::Get { key, consistency } => {
                self.check_key(&key)?;
                self.shard0.get(&key, consistency).await.map(ClientResponse::Get)
            }
            ClientRequest::Write { session, command } => {
                self.validate_write(&command)?;
                self.shard0.write(session, command).await.map(ClientResponse::Write)
            }
            ClientRequest::Scan(req) => {
                self.validate_scan(&req)?;
                self.shard0.scan(&req, self.limits.max_scan_page as usize).await.map(ClientResponse::Scan)
            }
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
        }
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
        if !request.needs_leader() {
            return self.handle_local(request).await;
        }
        // Leader-bound: answer here if we lead; otherwise forward once to the leader we know.
        // If the leader cannot be reached (it may just have died), wait for Raft to learn a new
        // one and try again, until the request timeout.
        let deadline = Instant::now() + self.limits.request_timeout();
        loop {
            let leader = match self.handle_local(request.clone()).await {
                Err(ApiError::NotLeader { leader: Some(leader), .. }) if hops == 0 => leader,
                other => return other,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let why = match self.shard0.member(shard_raft_id(0, leader)).and_then(|m| m.endpoint_addr()) {
                None => format!("leader {leader} has no known address"),
                Some(addr) => {
                    // Give up on this leader as soon as Raft tells us it changed: a dead leader's
                    // connection may hang until the QUIC idle timeout.
                    let forward = send_request(&self.pool, &addr, hops + 1, request.clone(), left);
                    tokio::select! {
                        answer = forward => match answer {
                            Ok(Err(ApiError::NotLeader { .. })) => format!("node {leader} is no longer the leader"),
                            Ok(answer) => return answer,
                            Err(e) => format!("leader {leader} unreachable: {e}"),
                        },
                        _ = self.shard0.leader_changed_from(leader) => format!("leadership moved away from node {leader}"),
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
