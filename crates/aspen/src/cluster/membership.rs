//! Cluster membership: joins, `cluster add-learner`, `promote` and `remove`, applied to every
//! shard on that shard's leader (routed like any other shard-bound request), with the checks
//! that keep node ids and endpoint ids one-to-one; and the cluster identity a node adopts when
//! it is added.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use openraft::ChangeMembers;

use super::service::NodeService;
use crate::{
    api::{
        shard_raft_id, split_raft_id, ApiError, ClientRequest, ClientResponse, ClientResult, ClusterId, ClusterInfo,
        JoinRequest, MemberAddr, MembershipChange, NodeId, NodeTicket, ShardId, ShardStatus,
    },
    raft::MemberNode,
    storage::metadata::ClusterIdentity,
    transport::request::send_request,
};

/// How long a join waits, in all, for the new node to catch up before promoting it.
const JOIN_CATCH_UP_WAIT: Duration = Duration::from_secs(40);

impl NodeService {
    /// Tickets of every member.
    pub(super) fn members(&self) -> Vec<String> {
        let cluster_id = *self.cluster_id.read().unwrap_or_else(|p| p.into_inner());
        self.store
            .known_nodes()
            .into_iter()
            .filter_map(|(node_id, member)| {
                let endpoint_id = iroh::EndpointId::from_bytes(&member.endpoint_id).ok()?;
                // Prefer where the member last announced itself (gossip) over membership's record.
                let addrs = self.store.pool().peers().announced(&endpoint_id).unwrap_or(member.addrs);
                if addrs.is_empty() {
                    return None;
                }
                Some(NodeTicket { cluster_id, node_id, endpoint_id, addrs }.encode())
            })
            .collect()
    }

    /// Adopts a cluster identity offered by a leader that is about to add this node (a fresh
    /// `--no-init` node only with its claim token).
    pub(super) fn accept_membership(
        &self,
        info: ClusterInfo,
        claim_token: Option<&str>,
    ) -> Result<ClientResponse, ApiError> {
        match self.identity()? {
            Some(id) if id.cluster_id == info.cluster_id => Ok(self.accepted()),
            Some(id) => Err(ApiError::Refused(format!(
                "node {} belongs to cluster {} ({}), not {}",
                self.node_id, id.cluster_id, id.cluster_name, info.cluster_id
            ))),
            None => {
                self.claim.check(self.node_id, claim_token)?;
                if info.cluster_name != self.cluster_name {
                    return Err(ApiError::Refused(format!(
                        "node {} runs with --cluster-name {:?}, the cluster is named {:?}",
                        self.node_id, self.cluster_name, info.cluster_name
                    )));
                }
                self.adopt_identity(&info, true)?;
                Ok(self.accepted())
            }
        }
    }

    pub(super) fn accepted(&self) -> ClientResponse {
        ClientResponse::MembershipAccepted { local_shards: self.store.shards().keys().copied().collect() }
    }

    /// Records a cluster identity this node now belongs to (after a join or an accepted add);
    /// `rewrite_ticket`: rewrite node.ticket now (a joining node writes it once it serves, after
    /// its admin.token).
    pub fn adopt_identity(&self, info: &ClusterInfo, rewrite_ticket: bool) -> Result<(), ApiError> {
        self.metadata
            .set_identity(&ClusterIdentity {
                cluster_id: info.cluster_id,
                cluster_name: info.cluster_name.clone(),
                node_id: self.node_id,
                num_shards: info.num_shards,
            })
            .map_err(|e| ApiError::Internal(format!("metadata: {e}")))?;
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = info.cluster_id;
        self.authority.set_cluster(Some(info.cluster_id));
        self.ticket.write().unwrap_or_else(|p| p.into_inner()).cluster_id = info.cluster_id;
        self.claim.settle();
        if rewrite_ticket {
            if let Err(e) = self.write_ticket_file() {
                tracing::warn!("could not rewrite node.ticket: {e}");
            }
        }
        Ok(())
    }

    pub(super) fn cluster_info(&self) -> Result<ClusterInfo, ApiError> {
        // Retryable: the node may be in the middle of joining (its identity is recorded last).
        let id = self.identity()?.ok_or_else(|| {
            ApiError::Unavailable(format!("node {} has not initialized or joined a cluster yet", self.node_id))
        })?;
        Ok(ClusterInfo { cluster_id: id.cluster_id, cluster_name: id.cluster_name, num_shards: id.num_shards })
    }

    /// Checks that `node_id`/`endpoint_id` can be added: a node id already in use by another
    /// endpoint, or an endpoint already a member under another node id, is refused.
    pub(super) fn check_new_member(&self, node_id: NodeId, endpoint_id: &[u8; 32]) -> Result<(), ApiError> {
        for (raft_id, member, _) in self.store.primary()?.members() {
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
    pub(super) async fn join(&self, req: JoinRequest) -> Result<ClientResponse, ApiError> {
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
        check_addrs(req.addrs.len())?;
        self.check_join_token(&req.join_token, req.node_id).await?;
        // One membership change at a time on this node: two joiners with the same node id must
        // not both pass the duplicate check.
        let _guard = self.membership_lock.lock().await;
        self.check_new_member(req.node_id, &req.endpoint_id)?;
        self.check_shard_list(&req.local_shards)?;
        let member = MemberAddr { endpoint_id: req.endpoint_id, addrs: req.addrs.clone() };
        self.add_everywhere(req.node_id, &member, &req.local_shards).await?;
        self.wait_learner_caught_up(req.node_id, &req.local_shards).await;
        for &shard in &req.local_shards {
            self.change_shard(shard, MembershipChange::AddVoter { node_id: req.node_id }).await?;
        }
        tracing::info!(node_id = req.node_id, "node joined as voter");
        Ok(ClientResponse::Joined(info))
    }

    /// Before a joining node is promoted: on each of its shards this node leads, waits until
    /// the learner has the leader's log as it is now — by snapshot, when the log behind was
    /// purged. Promoting earlier changes the membership while a snapshot is on its way, which
    /// drops openraft's replication stream and makes the leader start the snapshot over
    /// (benches/RESULTS.md, Session 16). Bounded by [`JOIN_CATCH_UP_WAIT`] in all (the joining
    /// node waits at least 60 s for its join); past it the node is promoted anyway and catches
    /// up as a voter. Shards led elsewhere are not waited for.
    async fn wait_learner_caught_up(&self, node_id: NodeId, shards: &[ShardId]) {
        let deadline = Instant::now() + JOIN_CATCH_UP_WAIT;
        for &shard in shards {
            let Ok(local) = self.store.local(shard) else { continue };
            let Some(index) = local.raft().metrics().borrow().last_log_index else { continue };
            let left = deadline.saturating_duration_since(Instant::now());
            if !local.wait_replicated(shard_raft_id(shard, node_id), index, left).await {
                tracing::info!(node_id, shard, index, "promoting a joining node before it caught up with the log");
            }
        }
    }

    /// Adds a node as learner on every shard, then confirms shard 0 lists it with this endpoint.
    pub(super) async fn add_everywhere(
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
        match self.store.primary()?.member(shard_raft_id(0, node_id)) {
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
    pub(super) fn check_shard_list(&self, shards: &[ShardId]) -> Result<(), ApiError> {
        let unique: BTreeSet<&ShardId> = shards.iter().collect();
        if !shards.contains(&0) || unique.len() != shards.len() || shards.iter().any(|s| *s >= self.store.num_shards())
        {
            return Err(ApiError::Refused(format!(
                "the node's shard list {shards:?} must include shard 0, name each shard once, and stay below {}",
                self.store.num_shards()
            )));
        }
        Ok(())
    }

    /// Applies one membership change to one shard, on that shard's leader (here or forwarded).
    pub(super) async fn change_shard(&self, shard: ShardId, change: MembershipChange) -> Result<ShardStatus, ApiError> {
        match self.route(ClientRequest::ShardMembership { shard, change }, 0).await? {
            ClientResponse::Membership(status) => Ok(status),
            other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Applies a membership change to a shard this node hosts (it must lead it).
    pub(super) async fn apply_shard_change(&self, shard_id: ShardId, change: MembershipChange) -> ClientResult {
        let shard = self.store.local(shard_id)?;
        match change {
            MembershipChange::AddLearner { node_id, member } => {
                check_node_id(node_id)?;
                check_addrs(member.addrs.len())?;
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
    pub(super) async fn remove_self(&self, shard_id: ShardId, members: &[(u64, MemberNode, bool)]) -> ClientResult {
        let shard = self.store.local(shard_id)?;
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
    pub(super) async fn hand_over_before_removal(
        &self,
        shard_id: ShardId,
        members: &[(u64, MemberNode, bool)],
    ) -> ClientResult {
        let shard = self.store.local(shard_id)?;
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
            match self.hand_over(shard_id, *target, false).await {
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
    pub(super) async fn add_learner(
        &self,
        ticket: &str,
        claim_token: Option<String>,
    ) -> Result<ClientResponse, ApiError> {
        let ticket = NodeTicket::decode(ticket).map_err(|e| ApiError::InvalidRequest(format!("ticket: {e}")))?;
        check_node_id(ticket.node_id)?;
        check_addrs(ticket.addrs.len())?;
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
        let local_shards = match send_request(
            self.store.pool(),
            &ticket.endpoint_addr(),
            1,
            match claim_token {
                Some(claim_token) => ClientRequest::ClaimMembership { info, claim_token },
                None => ClientRequest::AcceptMembership(info),
            },
            timeout,
        )
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
    pub(super) async fn promote(&self, node_id: NodeId) -> Result<ClientResponse, ApiError> {
        self.change_member_everywhere(node_id, MembershipChange::AddVoter { node_id }).await
    }

    /// `cluster remove ID`: out of every shard's membership; then the removed node is told, so
    /// that it stops (best effort: a node that is down then stops at its next start, when the
    /// members refuse it).
    pub(super) async fn remove(&self, node_id: NodeId) -> Result<ClientResponse, ApiError> {
        let addr = self.store.node_addr(node_id);
        let answer = self.change_member_everywhere(node_id, MembershipChange::Remove { node_id }).await?;
        if node_id == self.node_id {
            self.departed(node_id)?;
        } else if let Some(addr) = addr {
            let pool = self.store.pool().clone();
            tokio::spawn(async move {
                let notice = ClientRequest::Departed { node_id };
                match send_request(&pool, &addr, 1, notice, DEPARTED_NOTICE_TIMEOUT).await {
                    Ok(Ok(_)) => tracing::info!(node_id, "told the removed node to stop"),
                    Ok(Err(e)) => tracing::info!(node_id, "the removed node did not take the notice to stop: {e}"),
                    Err(e) => tracing::info!(node_id, "could not tell the removed node to stop: {e}"),
                }
            });
        }
        Ok(answer)
    }

    /// Takes in the notice that node `node_id` (this one) was removed from the cluster.
    pub(super) fn departed(&self, node_id: NodeId) -> Result<ClientResponse, ApiError> {
        if node_id != self.node_id {
            return Err(ApiError::InvalidRequest(format!(
                "a removal notice for node {node_id} reached node {}",
                self.node_id
            )));
        }
        if !self.removed.is_cancelled() {
            tracing::warn!(node_id, "this node was removed from the cluster");
            self.removed.cancel();
        }
        Ok(ClientResponse::Departing)
    }

    /// Applies `change` about member `node_id` on every shard (a no-op on shards it does not
    /// host); answers with shard 0's membership afterwards.
    pub(super) async fn change_member_everywhere(&self, node_id: NodeId, change: MembershipChange) -> ClientResult {
        check_node_id(node_id)?;
        let _guard = self.membership_lock.lock().await;
        let primary = self.store.primary()?;
        if primary.member(shard_raft_id(0, node_id)).is_none() {
            // This replica of shard 0 may lag (a learner added a moment ago through another
            // node): its leader knows the latest membership, so a node that does not lead shard
            // 0 answers `NotLeader` and the request is forwarded there (`route_to_leader`), or
            // `Unavailable` while no leader is known.
            primary.refer_to_leader()?;
            return Err(ApiError::InvalidRequest(format!("node {node_id} is not a member; add it first")));
        }
        // Shard 0's membership says who is a member, so a removal leaves it for last: if the
        // removal stops half-way (a timeout during a leader hand-over, say), a retry still finds
        // the node a member and finishes the other shards.
        let shards: Vec<ShardId> = match change {
            MembershipChange::Remove { .. } => (0..self.store.num_shards()).rev().collect(),
            _ => (0..self.store.num_shards()).collect(),
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
}

/// How long the node that removed another waits for it to take the notice to stop.
const DEPARTED_NOTICE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A member lists at most [`crate::api::MAX_MEMBER_ADDRS`] addresses.
pub(super) fn check_addrs(n: usize) -> Result<(), ApiError> {
    if n > crate::api::MAX_MEMBER_ADDRS {
        return Err(ApiError::Refused(format!(
            "a member lists at most {} addresses, not {n}",
            crate::api::MAX_MEMBER_ADDRS
        )));
    }
    Ok(())
}

/// Node ids are 48 bits (they share a Raft id with the shard id) and never 0.
pub(super) fn check_node_id(node_id: NodeId) -> Result<(), ApiError> {
    if node_id == 0 || node_id > crate::api::MAX_NODE_ID {
        return Err(ApiError::InvalidRequest(format!("node id {node_id} is out of range 1..=2^48-1")));
    }
    Ok(())
}
