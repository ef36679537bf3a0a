//! Leader placement: `cluster move-leader` (a hand-over run on the shard's leader: pause
//! heartbeats until the followers' lease lapses, ask the target to campaign; openraft 0.9 has no
//! transfer call) and `cluster balance-leaders` (spread shard leaders evenly over the voters).
//!
//! A hand-over pauses the shard's writes for about two election timeouts, so they are
//! rate-limited (besides needing an admin token): a leader runs one hand-over of a shard at a
//! time, and starts the next only after one election timeout (max) of normal service since the
//! last one ended; an attempt before that is refused as retryable (`move_leader` retries until
//! its deadline).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{membership::check_node_id, service::NodeService};
use crate::{
    api::{shard_raft_id, ApiError, ClientRequest, ClientResponse, ClientResult, NodeId, ShardId},
    raft::RaftNode,
    transport::request::send_request,
};

impl NodeService {
    pub(super) fn leaders(&self) -> ClientResponse {
        ClientResponse::Leaders(self.store.shards().values().map(RaftNode::status).collect())
    }

    /// Moves the leadership of `shard` to `node_id`, retrying attempts (on whichever node leads
    /// the shard at the time) until it holds or the request timeout passes.
    pub(super) async fn move_leader(&self, shard_id: ShardId, node_id: NodeId) -> ClientResult {
        check_node_id(node_id)?;
        let shard = self.store.local(shard_id)?;
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
    pub(super) async fn move_leader_attempt(&self, shard_id: ShardId, node_id: NodeId) -> ClientResult {
        self.hand_over(shard_id, node_id, true).await
    }

    /// [`Self::move_leader_attempt`]; `spaced`: keep the rate limit's gap after the last
    /// hand-over (a removal, which must hand over first, does not wait for it).
    pub(super) async fn hand_over(&self, shard_id: ShardId, node_id: NodeId, spaced: bool) -> ClientResult {
        let shard = self.store.local(shard_id)?;
        if shard.leader() == Some(node_id) {
            return Ok(self.leaders());
        }
        // Only the leader hands over; anyone else answers NotLeader and the request is forwarded.
        if shard.leader() != Some(self.node_id) {
            return Err(ApiError::NotLeader { leader: shard.leader(), leader_ticket: None });
        }
        let addr = self
            .store
            .node_addr(node_id)
            .ok_or_else(|| ApiError::InvalidRequest(format!("node {node_id} has no known address")))?;
        let raft = shard.raft();
        let lease = Duration::from_millis(raft.config().election_timeout_max);
        let gap = if spaced { lease } else { Duration::ZERO };
        let _slot = HandoverSlot::take(&self.handovers, shard_id, gap)?;
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
            let ask =
                send_request(self.store.pool(), &addr, 1, ClientRequest::TriggerElect { shard: shard_id }, lease * 2);
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
    pub(super) async fn balance_leaders(&self) -> ClientResult {
        let voters: Vec<NodeId> = self.store.primary()?.status().voters;
        if voters.is_empty() {
            return Err(ApiError::Unavailable("shard 0 has no voters".into()));
        }
        let cap = (self.store.num_shards() as usize).div_ceil(voters.len());
        for _round in 0..self.store.num_shards() * 2 {
            let mut count: BTreeMap<NodeId, usize> = voters.iter().map(|v| (*v, 0)).collect();
            let mut led: BTreeMap<NodeId, Vec<ShardId>> = BTreeMap::new();
            for (id, shard) in self.store.shards() {
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
}

/// Where a shard's last hand-over run by this node stands.
#[derive(Clone, Copy, Debug)]
pub(super) enum Handover {
    Running,
    EndedAt(Instant),
}

/// This node's hand-overs by shard.
pub(super) type Handovers = std::sync::Mutex<std::collections::HashMap<ShardId, Handover>>;

/// A running hand-over of one shard; marks it ended when dropped.
struct HandoverSlot<'a> {
    handovers: &'a Handovers,
    shard: ShardId,
}

impl<'a> HandoverSlot<'a> {
    /// Starts a hand-over of `shard` unless one runs, or one ended less than `gap` ago.
    fn take(handovers: &'a Handovers, shard: ShardId, gap: Duration) -> Result<Self, ApiError> {
        let mut map = handovers.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&shard) {
            Some(Handover::Running) => {
                return Err(ApiError::Unavailable(format!("a leader move of shard {shard} is running; retry")))
            }
            Some(Handover::EndedAt(t)) if t.elapsed() < gap => {
                return Err(ApiError::Unavailable(format!(
                    "shard {shard} handed its leadership over {:?} ago; leader moves are limited to one per {gap:?} \
                     of normal service: retry",
                    t.elapsed()
                )))
            }
            _ => {}
        }
        map.insert(shard, Handover::Running);
        Ok(HandoverSlot { handovers, shard })
    }
}

impl Drop for HandoverSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.handovers.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(self.shard, Handover::EndedAt(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_overs_of_a_shard_run_one_at_a_time_and_apart() {
        let handovers = Handovers::default();
        let gap = Duration::from_millis(200);
        let first = HandoverSlot::take(&handovers, 1, gap).expect("the first hand-over runs");
        assert!(HandoverSlot::take(&handovers, 1, gap).is_err(), "a second one while it runs is refused");
        let other = HandoverSlot::take(&handovers, 2, gap).expect("another shard's is independent");
        drop(first);
        assert!(matches!(HandoverSlot::take(&handovers, 1, gap), Err(ApiError::Unavailable(_))), "too soon after");
        std::thread::sleep(gap);
        assert!(HandoverSlot::take(&handovers, 1, gap).is_ok(), "after the gap it runs again");
        drop(other);
    }
}
