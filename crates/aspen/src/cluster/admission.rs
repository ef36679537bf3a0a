//! Keeps the endpoint's gate (`transport::gate`) in step with the cluster's membership, and
//! notices when this node has been removed.
//!
//! Shard 0 is hosted by every node, so its membership (voters and learners, as this node's
//! replica of shard 0 last saw it) names every member. Each time it changes, the gate admits
//! exactly those endpoints to the members-only ALPNs.
//!
//! A removed node seldom sees its own removal in its log: the leader stops replicating to it as
//! soon as it appends the membership without it. So it learns of it in one of three ways, and
//! each cancels [`Admission::removed`], on which `aspen-node` stops (exit code 2: restarting
//! cannot help): the node that carried out `cluster remove` tells it (`ClientRequest::Departed`);
//! its shard 0 membership, having listed it, no longer does; or, checked soon after the node
//! starts and then every [`CHECK_EVERY`], a majority of shard 0's voters (in its view) refuse it as not a member —
//! for a node that was down or cut off when it was removed.
//!
//! Owns: those watch tasks. Never: change membership.

use std::{collections::HashSet, sync::Arc, time::Duration};

use openraft::LogId;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{shard_raft_id, ClientRequest, NodeId},
    raft::RaftNode,
    transport::{gate::PeerGate, request::send_request, ConnectionPool, TransportError},
};

/// How often a member asks shard 0's voters whether they still admit it.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);
/// The first such check, this long after the node starts serving (a node removed while it was
/// down finds out soon after it starts).
const CHECK_FIRST: Duration = Duration::from_secs(3);
/// The budget of one voter's answer in that check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The membership watch of one node.
#[derive(Debug, Clone)]
pub struct Admission {
    gate: Arc<PeerGate>,
    removed: CancellationToken,
}

impl Admission {
    pub fn new(gate: Arc<PeerGate>) -> Self {
        Admission { gate, removed: CancellationToken::new() }
    }

    pub fn gate(&self) -> &Arc<PeerGate> {
        &self.gate
    }

    /// Cancelled once this node is no longer a member of the cluster.
    pub fn removed(&self) -> CancellationToken {
        self.removed.clone()
    }

    /// Applies shard 0's current membership to the gate now, then follows every change until
    /// `shutdown` (on a task of its own).
    pub fn start(&self, node_id: NodeId, shard0: &RaftNode, shutdown: CancellationToken) {
        let me = shard_raft_id(0, node_id);
        let mut metrics = shard0.raft().metrics();
        let mut watch = Watch { me, last: None, was_member: false };
        watch.update(self, &metrics.borrow_and_update());
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = metrics.changed() => if changed.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
                // Metrics change with every log entry: look at the membership's log id under the
                // borrow, without copying the metrics (the membership itself seldom changes).
                watch.update(&this, &metrics.borrow_and_update());
            }
        });
    }

    /// Every [`CHECK_EVERY`] while shard 0's membership lists this node: asks the other voters
    /// (on the peer ALPN, whose gate decides by their own view of the membership) and, when a
    /// majority of the voters refuse this node as not a member, takes it as removed.
    pub fn check_periodically(
        &self,
        node_id: NodeId,
        shard0: RaftNode,
        pool: ConnectionPool,
        shutdown: CancellationToken,
    ) {
        let removed = self.removed.clone();
        tokio::spawn(async move {
            let me = shard_raft_id(0, node_id);
            let mut wait = CHECK_FIRST;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(std::mem::replace(&mut wait, CHECK_EVERY)) => {}
                    _ = shutdown.cancelled() => return,
                    _ = removed.cancelled() => return,
                }
                let members = shard0.members();
                if !members.iter().any(|(id, _, _)| *id == me) {
                    continue;
                }
                let voters: Vec<_> = members.iter().filter(|(_, _, voter)| *voter).collect();
                let asks = voters.iter().filter(|(id, _, _)| *id != me).filter_map(|(_, m, _)| m.endpoint_addr()).map(
                    |addr| {
                        let pool = pool.clone();
                        async move { send_request(&pool, &addr, 1, ClientRequest::NodeStatus, CHECK_TIMEOUT).await }
                    },
                );
                let refusals = futures::future::join_all(asks)
                    .await
                    .iter()
                    .filter(|r| matches!(r, Err(TransportError::NotAMember { .. })))
                    .count();
                if refusals * 2 > voters.len() && !removed.is_cancelled() {
                    tracing::warn!(
                        refusals,
                        voters = voters.len(),
                        "the cluster's voters no longer admit this node: it was removed"
                    );
                    removed.cancel();
                }
            }
        });
    }
}

struct Watch {
    me: u64,
    /// The membership log id last applied to the gate (metrics change on every entry; the
    /// membership seldom).
    last: Option<Option<LogId<u64>>>,
    was_member: bool,
}

impl Watch {
    fn update(&mut self, admission: &Admission, m: &openraft::RaftMetrics<u64, crate::raft::MemberNode>) {
        let log_id = *m.membership_config.log_id();
        if self.last.as_ref() == Some(&log_id) {
            return;
        }
        self.last = Some(log_id);
        let membership = m.membership_config.membership();
        let mut ids = HashSet::new();
        let mut is_member = false;
        for (raft_id, node) in membership.nodes() {
            is_member |= *raft_id == self.me;
            if let Ok(id) = iroh::EndpointId::from_bytes(&node.endpoint_id) {
                ids.insert(id);
            }
        }
        self.was_member |= is_member;
        if !self.was_member {
            // Fresh, or being added and still catching up: the memberships in the log before
            // the one that adds this node may not list the leader that sends it the log. It
            // holds no data of its own yet; the gate stays open until it sees itself listed.
            return;
        }
        if !is_member && !admission.removed.is_cancelled() {
            tracing::warn!("this node was removed from the cluster (shard 0's membership no longer lists it)");
            admission.removed.cancel();
        }
        let closed = admission.gate.set_members(ids);
        if closed > 0 {
            tracing::info!(closed, "closed the connections of nodes that left the cluster");
        }
    }
}
