//! Raft RPC messages as they travel between nodes (ALPN `raft-rpc`, and `raft-shard` after the
//! 4-byte shard prefix). One request and one response frame per QUIC bi-stream.
//!
//! Every request carries the cluster id; a node refuses requests from another cluster with
//! [`RaftRefusal::WrongCluster`] instead of handing them to openraft.

use openraft::{
    error::{InstallSnapshotError, RaftError},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
        VoteResponse,
    },
};
use serde::{Deserialize, Serialize};

use super::TypeConfig;
use crate::api::{ClusterId, ShardId};

/// A Raft request.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

impl RaftRequest {
    pub fn kind(&self) -> &'static str {
        match self {
            RaftRequest::AppendEntries(_) => "append_entries",
            RaftRequest::Vote(_) => "vote",
            RaftRequest::InstallSnapshot(_) => "install_snapshot",
        }
    }
}

/// The frame that opens every Raft stream.
#[derive(Debug, Serialize, Deserialize)]
pub struct RaftEnvelope {
    pub cluster_id: ClusterId,
    pub request: RaftRequest,
}

/// Why a node would not hand a Raft request to openraft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RaftRefusal {
    #[error("request is for cluster {got}, this node belongs to cluster {expected}")]
    WrongCluster { expected: ClusterId, got: ClusterId },
    #[error("shard {0} is not hosted on this node")]
    UnknownShard(ShardId),
    #[error("this node has not joined a cluster yet")]
    NotReady,
    #[error("malformed request: {0}")]
    Malformed(String),
}

/// The answer to a Raft request.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftResponse {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Refused(RaftRefusal),
}
