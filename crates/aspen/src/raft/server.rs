//! Raft RPC handlers: `raft-rpc` (legacy, unprefixed, always shard 0), `raft-shard` (every
//! stream starts with the shard id as `u32` big-endian, then the same frames), and `raft-mux`
//! (many requests of any shard on one long-lived stream; framing in `transport::mux`).
//!
//! A request from another cluster, for a shard not hosted here, or that does not decode, is
//! answered with a [`RaftRefusal`] on that stream; the connection stays up for other streams.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use iroh::{
    endpoint::{Connection, RecvStream, SendStream},
    protocol::{AcceptError, ProtocolHandler},
};

use super::{network::SharedClusterId, RaftNode};
use crate::{
    api::{
        frame::encode_frame,
        raft_rpc::{read_raft_request, RaftEnvelope, RaftRefusal, RaftRequest, RaftResponse},
        ClusterId, ShardId, MAX_FRAME_BYTES,
    },
    transport::mux,
};

/// The shards this node hosts, by shard id, for routing incoming Raft streams.
#[derive(Clone, Default)]
pub struct ShardRegistry {
    shards: Arc<RwLock<HashMap<ShardId, RaftNode>>>,
}

impl std::fmt::Debug for ShardRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shards: Vec<ShardId> = self.shards.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        f.debug_struct("ShardRegistry").field("shards", &shards).finish()
    }
}

impl ShardRegistry {
    pub fn insert(&self, shard: ShardId, node: RaftNode) {
        self.shards.write().unwrap_or_else(|p| p.into_inner()).insert(shard, node);
    }

    pub fn get(&self, shard: ShardId) -> Option<RaftNode> {
        self.shards.read().unwrap_or_else(|p| p.into_inner()).get(&shard).cloned()
    }
}

/// Which Raft ALPN a handler serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaftWire {
    /// `raft-rpc`: one request per stream, shard 0.
    Legacy,
    /// `raft-shard`: one request per stream after a shard prefix.
    Sharded,
    /// `raft-mux`: requests of any shard on long-lived streams.
    Mux,
}

/// Serves one of the Raft ALPNs ([`RaftWire`]).
#[derive(Clone, Debug)]
pub struct RaftProtocolHandler {
    registry: ShardRegistry,
    cluster_id: SharedClusterId,
    wire: RaftWire,
    /// Per shard: the snapshot being received and how many bytes of it arrived, so a chunk
    /// can only continue what came before (openraft writes chunks at their offset into memory).
    snapshot_progress: Arc<std::sync::Mutex<HashMap<ShardId, (String, u64)>>>,
}

impl RaftProtocolHandler {
    pub fn new(registry: ShardRegistry, cluster_id: SharedClusterId, wire: RaftWire) -> Self {
        RaftProtocolHandler { registry, cluster_id, wire, snapshot_progress: Default::default() }
    }

    /// Refuses a snapshot chunk that does not start at 0 or continue the chunks received so far.
    fn check_snapshot_chunk(&self, shard: ShardId, id: &str, offset: u64, len: u64) -> Result<(), RaftRefusal> {
        let mut progress = self.snapshot_progress.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset.saturating_add(len);
        if offset == 0 {
            progress.insert(shard, (id.to_string(), end));
            return Ok(());
        }
        match progress.get_mut(&shard) {
            Some((current, received)) if current == id && offset <= *received => {
                *received = (*received).max(end);
                Ok(())
            }
            _ => Err(RaftRefusal::Malformed(format!(
                "snapshot chunk at offset {offset} does not continue a snapshot being received"
            ))),
        }
    }
}

impl ProtocolHandler for RaftProtocolHandler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let remote = conn.remote_id().fmt_short().to_string();
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%remote, "raft connection ended: {e}");
                    return Ok(());
                }
            };
            let this = self.clone();
            if this.wire == RaftWire::Mux {
                tokio::spawn(mux::serve_stream(send, recv, move |shard, envelope| {
                    let this = this.clone();
                    async move {
                        match crate::api::frame::decode::<RaftEnvelope>(&envelope) {
                            Ok(env) => this.answer_request(shard, env).await,
                            Err(e) => RaftResponse::Refused(RaftRefusal::Malformed(e.to_string())),
                        }
                    }
                }));
            } else {
                tokio::spawn(async move { this.serve_stream(send, recv).await });
            }
        }
    }
}

impl RaftProtocolHandler {
    async fn serve_stream(&self, mut send: SendStream, mut recv: RecvStream) {
        let response = self.answer(&mut recv).await;
        if let RaftResponse::Refused(r) = &response {
            tracing::warn!("refused raft request: {r}");
        }
        let bytes = match encode_frame(&response) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("cannot encode raft response: {e}");
                return;
            }
        };
        if send.write_all(&bytes).await.is_ok() && send.finish().is_ok() {
            crate::api::frame::drain_to_end(&mut recv, crate::api::frame::REQUEST_END_WAIT).await;
        }
    }

    async fn answer(&self, recv: &mut RecvStream) -> RaftResponse {
        let (shard, env) = match read_raft_request(recv, self.wire == RaftWire::Sharded, MAX_FRAME_BYTES).await {
            Ok(request) => request,
            Err(refusal) => return RaftResponse::Refused(refusal),
        };
        self.answer_request(shard, env).await
    }

    /// Answers one decoded request for `shard`.
    async fn answer_request(&self, shard: ShardId, env: RaftEnvelope) -> RaftResponse {
        let expected = *self.cluster_id.read().unwrap_or_else(|p| p.into_inner());
        if expected == ClusterId::default() {
            return RaftResponse::Refused(RaftRefusal::NotReady);
        }
        if env.cluster_id != expected {
            return RaftResponse::Refused(RaftRefusal::WrongCluster { expected, got: env.cluster_id });
        }
        let Some(node) = self.registry.get(shard) else {
            return RaftResponse::Refused(RaftRefusal::UnknownShard(shard));
        };
        let raft = node.raft();
        match env.request {
            RaftRequest::AppendEntries(r) => {
                let result = raft.append_entries(r).await;
                if matches!(&result, Ok(resp) if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_)))
                {
                    // A current leader reached us: the heartbeat age in health reports restarts.
                    node.record_leader_contact();
                }
                RaftResponse::AppendEntries(result)
            }
            RaftRequest::Vote(r) => RaftResponse::Vote(raft.vote(r).await),
            RaftRequest::InstallSnapshot(r) => {
                if let Err(refusal) =
                    self.check_snapshot_chunk(shard, &r.meta.snapshot_id, r.offset, r.data.len() as u64)
                {
                    return RaftResponse::Refused(refusal);
                }
                RaftResponse::InstallSnapshot(raft.install_snapshot(r).await)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_chunks_must_continue_what_arrived() {
        let h = RaftProtocolHandler::new(ShardRegistry::default(), Default::default(), RaftWire::Legacy);
        // A chunk in the middle of nothing (a hostile offset) is refused.
        assert!(h.check_snapshot_chunk(0, "s1", 1 << 40, 10).is_err());
        assert!(h.check_snapshot_chunk(0, "s1", 0, 100).is_ok());
        assert!(h.check_snapshot_chunk(0, "s1", 100, 100).is_ok());
        // Resending an earlier chunk is fine; skipping ahead is not; nor is another snapshot's id.
        assert!(h.check_snapshot_chunk(0, "s1", 50, 100).is_ok());
        assert!(h.check_snapshot_chunk(0, "s1", 1000, 100).is_err());
        assert!(h.check_snapshot_chunk(0, "s2", 200, 100).is_err());
        // Shards are independent.
        assert!(h.check_snapshot_chunk(1, "s1", 100, 1).is_err());
    }
}
