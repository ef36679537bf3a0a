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
    /// Counts open connections and streams (`alpn="raft"`), when set.
    metrics: Option<Arc<crate::metrics::NodeMetrics>>,
}

impl RaftProtocolHandler {
    pub fn new(registry: ShardRegistry, cluster_id: SharedClusterId, wire: RaftWire) -> Self {
        RaftProtocolHandler { registry, cluster_id, wire, metrics: None }
    }

    /// Counts connections and streams into `metrics` (the node's).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::NodeMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

impl ProtocolHandler for RaftProtocolHandler {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let remote = conn.remote_id().fmt_short().to_string();
        let _open = self.metrics.as_ref().map(|m| m.connection("raft"));
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%remote, "raft connection ended: {e}");
                    return Ok(());
                }
            };
            let this = self.clone();
            let stream_open = self.metrics.as_ref().map(|m| m.stream("raft"));
            if this.wire == RaftWire::Mux {
                let served = mux::serve_stream(send, recv, move |shard, envelope| {
                    let this = this.clone();
                    async move {
                        match crate::api::frame::decode::<RaftEnvelope>(&envelope) {
                            Ok(env) => this.answer_request(shard, env).await,
                            Err(e) => RaftResponse::Refused(RaftRefusal::Malformed(e.to_string())),
                        }
                    }
                });
                tokio::spawn(async move {
                    served.await;
                    drop(stream_open);
                });
            } else {
                tokio::spawn(async move {
                    this.serve_stream(send, recv).await;
                    drop(stream_open);
                });
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
                let leader_commit = r.leader_commit.map(|l| l.index);
                let result = raft.append_entries(r).await;
                if matches!(&result, Ok(resp) if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_)))
                {
                    // A current leader reached us: the heartbeat age in health reports restarts.
                    node.record_leader_contact(leader_commit);
                }
                RaftResponse::AppendEntries(result)
            }
            RaftRequest::Vote(r) => RaftResponse::Vote(raft.vote(r).await),
            RaftRequest::InstallSnapshot(r) => node.receive_snapshot_chunk(r).await,
        }
    }
}
