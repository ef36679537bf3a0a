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
use tokio::io::{AsyncRead, AsyncReadExt};

use super::raft::TypeConfig;
use crate::api::{
    decode_shard_prefix,
    frame::{decode, decode_frame, read_frame_bytes},
    split_shard_prefix, ClusterId, ShardId,
};

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
    /// The shard has too many requests of this sender in progress, or did not answer in time
    /// (its Raft core is stalled); the sender retries later.
    #[error("shard {shard} is busy: {why}")]
    Busy { shard: ShardId, why: String },
}

/// The answer to a Raft request.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftResponse {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Refused(RaftRefusal),
}

/// Reads the request that opens a Raft stream: with `prefixed` (`raft-shard`) the 4-byte shard id
/// first, then one [`RaftEnvelope`] frame of at most `limit` bytes. Unprefixed streams are shard 0.
/// Anything else is [`RaftRefusal::Malformed`].
pub async fn read_raft_request<R: AsyncRead + Unpin>(
    r: &mut R,
    prefixed: bool,
    limit: usize,
) -> Result<(ShardId, RaftEnvelope), RaftRefusal> {
    let shard = if prefixed {
        let mut prefix = [0u8; 4];
        r.read_exact(&mut prefix).await.map_err(|e| RaftRefusal::Malformed(format!("shard prefix: {e}")))?;
        decode_shard_prefix(prefix)
    } else {
        0
    };
    let env =
        read_frame_bytes(r, limit).await.and_then(|b| decode(&b)).map_err(|e| RaftRefusal::Malformed(e.to_string()))?;
    Ok((shard, env))
}

/// The in-memory twin of [`read_raft_request`]: decodes the request at the front of `bytes` and
/// returns what follows it (a well-behaved peer sends nothing more on the stream).
pub fn decode_raft_request(
    bytes: &[u8],
    prefixed: bool,
    limit: usize,
) -> Result<(ShardId, RaftEnvelope, &[u8]), RaftRefusal> {
    let (shard, frames) = if prefixed {
        split_shard_prefix(bytes).ok_or_else(|| RaftRefusal::Malformed("shard prefix: truncated".into()))?
    } else {
        (0, bytes)
    };
    let (env, rest) = decode_frame(frames, limit).map_err(|e| RaftRefusal::Malformed(e.to_string()))?;
    Ok((shard, env, rest))
}

#[cfg(test)]
mod tests {
    use openraft::{raft::VoteRequest, Vote};

    use super::*;
    use crate::api::{encode_shard_prefix, frame::encode_frame, Id128};

    fn vote_frame() -> Vec<u8> {
        let env = RaftEnvelope {
            cluster_id: Id128([3; 16]),
            request: RaftRequest::Vote(VoteRequest { vote: Vote::new(4, 2), last_log_id: None }),
        };
        encode_frame(&env).unwrap()
    }

    #[tokio::test]
    async fn stream_reader_and_slice_decoder_agree() {
        let mut stream = encode_shard_prefix(7).to_vec();
        stream.extend_from_slice(&vote_frame());
        let (shard, env, rest) = decode_raft_request(&stream, true, 1024).unwrap();
        assert_eq!((shard, env.cluster_id, rest.len()), (7, Id128([3; 16]), 0));
        assert!(matches!(env.request, RaftRequest::Vote(_)));
        let (shard, env) = read_raft_request(&mut stream.as_slice(), true, 1024).await.unwrap();
        assert_eq!((shard, env.cluster_id), (7, Id128([3; 16])));

        // Unprefixed: shard 0, and the frame starts at once.
        let (shard, _, _) = decode_raft_request(&vote_frame(), false, 1024).unwrap();
        assert_eq!(shard, 0);

        // Short prefix, truncated frame, oversized length, garbage: refused the same way by both.
        let mut oversized = encode_shard_prefix(1).to_vec();
        oversized.extend_from_slice(&u32::MAX.to_be_bytes());
        for bad in [&[0u8, 0][..], &stream[..stream.len() - 1], &oversized, &[0, 0, 0, 0, 0, 0, 0, 2, 0xff, 0xff]] {
            let pure = decode_raft_request(bad, true, 1024).map(|_| ()).unwrap_err();
            let streamed = read_raft_request(&mut &bad[..], true, 1024).await.map(|_| ()).unwrap_err();
            assert!(matches!(pure, RaftRefusal::Malformed(_)), "{bad:?}: {pure}");
            assert!(matches!(streamed, RaftRefusal::Malformed(_)), "{bad:?}: {streamed}");
        }
    }
}
