//! The supervisor: watches every hosted shard's health (`RaftNode::health`: Raft running, a
//! leader known, recent heartbeats, small apply lag) once a second and logs when a shard turns
//! unhealthy and when it recovers. A shard whose Raft stopped on a fatal error (a storage error)
//! is logged at error (`shard stopped`): the node's default log filter drops openraft's own line
//! about it (`logging::DEFAULT_LOG_FILTER`). Health is also part of every shard's status
//! (`cluster status`).
//!
//! It only observes; it never changes Raft state.

use std::{collections::BTreeMap, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{api::ShardId, raft::RaftNode};

/// How often the supervisor looks.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Watches the shards of one node until `shutdown` is cancelled.
#[derive(Debug)]
pub struct Supervisor {
    task: tokio::task::JoinHandle<()>,
}

impl Supervisor {
    pub fn spawn(node_id: u64, shards: BTreeMap<ShardId, RaftNode>, shutdown: CancellationToken) -> Self {
        let task = tokio::spawn(async move {
            let mut healthy: BTreeMap<ShardId, bool> = shards.keys().map(|s| (*s, true)).collect();
            let mut stopped = std::collections::BTreeSet::new();
            // Give elections at start-up a chance before the first report.
            let grace = shards.values().next().map(|s| s.raft().config().election_timeout_max).unwrap_or(0);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(grace * 2)) => {}
            }
            let mut tick = tokio::time::interval(CHECK_INTERVAL);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                for (id, shard) in &shards {
                    let h = shard.health();
                    let was = healthy.insert(*id, h.healthy).unwrap_or(true);
                    // A Raft core that stopped never starts again: one line, whatever came before.
                    if shard.raft().metrics().borrow().running_state.is_err() {
                        if stopped.insert(*id) {
                            tracing::error!(node_id, shard = id, reason = %h.reason, "shard stopped");
                        }
                    } else if was && !h.healthy {
                        tracing::warn!(node_id, shard = id, reason = %h.reason, apply_lag = h.apply_lag, "shard unhealthy");
                    } else if !was && h.healthy {
                        tracing::info!(node_id, shard = id, "shard healthy again");
                    }
                }
            }
        });
        Supervisor { task }
    }

    /// Stops watching (also happens when the node's shutdown token is cancelled).
    pub fn abort(&self) {
        self.task.abort();
    }
}
