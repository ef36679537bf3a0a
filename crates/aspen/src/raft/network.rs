//! openraft's network over the node's transport: each shard's `RaftNetworkFactory`, sharing the
//! node's connection pool. Votes and AppendEntries of every shard travel on one long-lived
//! stream per peer ([`crate::transport::mux`]); snapshot chunks, large AppendEntries and peers
//! that do not serve the mux get one bi-stream per RPC (`raft-rpc` / `raft-shard`).
//!
//! Owns: the mapping of openraft's `RaftNetwork` calls onto frames, the cluster id stamped on
//! every message, the commit-index cap, and telling the node's
//! [`crate::transport::reachability::Reachability`] how every RPC to a peer went (so a peer that
//! stops answering is logged once per peer, not once per RPC of every shard; openraft's own
//! per-RPC reports are dropped by the default log filter). Failures to a peer already known
//! unreachable are reported to openraft as `Unreachable`, so that it backs off instead of
//! retrying at every heartbeat. Never: dial or pool connections itself
//! ([`crate::transport::pool`] does).

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use iroh::EndpointAddr;
use openraft::{
    error::{InstallSnapshotError, NetworkError as RaftNetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::RPCOption,
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
        VoteResponse,
    },
    RaftNetwork, RaftNetworkFactory,
};

use crate::{
    api::{
        frame::{encode_frame, read_frame},
        raft::{LogId, MemberNode, TypeConfig},
        raft_rpc::{RaftEnvelope, RaftRefusal, RaftRequest, RaftResponse},
        split_raft_id, ClusterId, NodeId, ShardId, MAX_FRAME_BYTES, RAFT_ALPN, RAFT_SHARDED_ALPN,
    },
    storage::DurableWatch,
    transport::{fault, mux::MUX_MAX_REQUEST, reachability::counts_as_silence, ConnectionPool, TransportError},
};

/// The cluster id this node stamps on its Raft messages (set at init or join).
pub type SharedClusterId = Arc<RwLock<ClusterId>>;

/// openraft's network factory for one shard.
#[derive(Clone, Debug)]
pub struct IrohNetworkFactory {
    pool: ConnectionPool,
    cluster_id: SharedClusterId,
    /// `None`: legacy `raft-rpc` ALPN (shard 0, no prefix). `Some(n)`: `raft-shard` with prefix n.
    shard: Option<ShardId>,
    /// The shard's own log: the commit index sent to followers never runs ahead of it.
    commit_cap: Option<DurableWatch>,
}

impl IrohNetworkFactory {
    pub fn new(pool: ConnectionPool, cluster_id: SharedClusterId, shard: Option<ShardId>) -> Self {
        IrohNetworkFactory { pool, cluster_id, shard, commit_cap: None }
    }

    /// Caps the commit index this shard's AppendEntries carry at what `log` holds durably: the
    /// leader acknowledges its own appends before their fsync
    /// ([`crate::storage::RedbLogStore::overlap_own_appends`]), and a follower must not apply an entry
    /// the leader could still lose.
    pub fn cap_commit_at(mut self, log: DurableWatch) -> Self {
        self.commit_cap = Some(log);
        self
    }
}

/// The commit index to send: `committed`, or the leader's last durable log id if that is older.
/// Both lie on the leader's own log, so the smaller index is the older of the two.
pub(crate) fn capped_commit(committed: Option<LogId>, durable: Option<LogId>) -> Option<LogId> {
    match (committed, durable) {
        (Some(c), Some(d)) if d.index < c.index => Some(d),
        (Some(_), None) => None,
        (c, _) => c,
    }
}

impl RaftNetworkFactory<TypeConfig> for IrohNetworkFactory {
    type Network = IrohNetwork;

    async fn new_client(&mut self, target: u64, node: &MemberNode) -> IrohNetwork {
        IrohNetwork { target, addr: node.endpoint_addr(), factory: self.clone() }
    }
}

/// openraft's client to one peer of one shard.
pub struct IrohNetwork {
    target: u64,
    addr: Option<EndpointAddr>,
    factory: IrohNetworkFactory,
}

impl IrohNetwork {
    /// The peer node this client talks to (the same for every shard).
    fn peer(&self) -> NodeId {
        split_raft_id(self.target).1
    }

    /// One RPC, its outcome told to the node's peer reachability.
    async fn call(&self, request: RaftRequest, ttl: Duration) -> Result<RaftResponse, TransportError> {
        let result = self.exchange(request, ttl).await;
        let reachability = self.factory.pool.reachability();
        let endpoint = EndpointName(self.addr.as_ref());
        match &result {
            // This node is stopping (its endpoint is closing): that says nothing about the peer.
            Err(_) if self.factory.pool.closing() => {}
            Err(e) if counts_as_silence(e) => reachability.failed(self.peer(), endpoint, e),
            // An answer, even a refusal, is from a peer that is up.
            _ => reachability.answered(self.peer(), endpoint),
        }
        result
    }

    /// openraft's view of a failed RPC. `Unreachable` makes openraft back off (500 ms) before the
    /// next RPC to this peer; other network errors are retried at the next heartbeat. So a peer
    /// that could not be dialled, refused, or is known not to answer is `Unreachable`.
    fn rpc_err<E: std::error::Error>(&self, e: TransportError) -> RPCError<u64, MemberNode, E> {
        let silent_peer = counts_as_silence(&e) && self.factory.pool.reachability().is_down(self.peer());
        if e.is_unreachable() || matches!(e, TransportError::Refused(_)) || silent_peer {
            return RPCError::Unreachable(Unreachable::new(&e));
        }
        RPCError::Network(RaftNetworkError::new(&e))
    }

    /// The RPC itself, within `ttl`: on the peer's mux stream, or on a stream of its own.
    async fn exchange(&self, request: RaftRequest, ttl: Duration) -> Result<RaftResponse, TransportError> {
        let addr = self.addr.as_ref().ok_or(TransportError::NoAddress)?;
        let cluster_id = *self.factory.cluster_id.read().unwrap_or_else(|p| p.into_inner());
        let snapshot = matches!(request, RaftRequest::InstallSnapshot(_));
        let envelope = encode_frame(&RaftEnvelope { cluster_id, request })?;
        let pool = &self.factory.pool;
        let (me, shard) = (pool.endpoint().id(), self.factory.shard.unwrap_or(0));
        let on_mux = !snapshot && envelope.len() <= MUX_MAX_REQUEST && !pool.mux.refuses(&addr.id);
        let exchange = async {
            fault::on_send(me, addr.id, Some(shard)).await?;
            let resp = match on_mux {
                true => match pool.mux.call(pool, addr, shard, &envelope).await.inspect(|_| {
                    pool.sent.on_mux.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }) {
                    // An older peer without the mux: this call, and the next minute's, go alone.
                    Err(TransportError::AlpnRefused { .. }) if pool.mux.refuses(&addr.id) => {
                        self.call_on_own_stream(addr, &envelope).await?
                    }
                    other => other?,
                },
                false => self.call_on_own_stream(addr, &envelope).await?,
            };
            fault::on_reply(me, addr.id, Some(shard)).await?;
            Ok::<_, TransportError>(resp)
        };
        let resp = tokio::time::timeout(ttl, exchange).await.map_err(|_| TransportError::Timeout(ttl))??;
        if let RaftResponse::Refused(r) = resp {
            if matches!(r, RaftRefusal::Busy { .. }) {
                // Expected while the peer's shard is backed up; openraft backs off and retries.
                tracing::debug!(target = self.target, "raft request refused by peer: {r}");
            } else {
                tracing::warn!(target = self.target, "raft request refused by peer: {r}");
            }
            return Err(TransportError::Refused(r));
        }
        Ok(resp)
    }

    /// One RPC on a bi-stream of its own (`raft-shard` with the shard prefix, or `raft-rpc`).
    async fn call_on_own_stream(&self, addr: &EndpointAddr, envelope: &[u8]) -> Result<RaftResponse, TransportError> {
        let alpn: &'static [u8] = if self.factory.shard.is_some() { RAFT_SHARDED_ALPN } else { RAFT_ALPN };
        let pool = &self.factory.pool;
        let conn = pool.get(addr, alpn).await?;
        pool.sent.alone.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(TransportError::Open)?;
            if let Some(shard) = self.factory.shard {
                send.write_all(&crate::api::encode_shard_prefix(shard)).await?;
            }
            send.write_all(envelope).await?;
            send.finish()?;
            let resp: RaftResponse = read_frame(&mut recv, MAX_FRAME_BYTES).await?;
            Ok::<_, TransportError>(resp)
        }
        .await;
        if result.is_err() && conn.close_reason().is_some() {
            pool.invalidate(addr.id, alpn);
        }
        result
    }
}

/// A peer's endpoint id, short, for log lines (formatted only when a line is written).
struct EndpointName<'a>(Option<&'a EndpointAddr>);

impl std::fmt::Display for EndpointName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{}", addr.id.fmt_short()),
            None => f.write_str("none"),
        }
    }
}

impl RaftNetwork<TypeConfig> for IrohNetwork {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, MemberNode, RaftError<u64>>> {
        if let Some(log) = &self.factory.commit_cap {
            rpc.leader_commit = capped_commit(rpc.leader_commit, log.borrow().last);
        }
        match self.call(RaftRequest::AppendEntries(rpc), option.hard_ttl()).await.map_err(|e| self.rpc_err(e))? {
            RaftResponse::AppendEntries(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.rpc_err(TransportError::UnexpectedResponse)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, MemberNode, RaftError<u64, InstallSnapshotError>>> {
        match self.call(RaftRequest::InstallSnapshot(rpc), option.hard_ttl()).await.map_err(|e| self.rpc_err(e))? {
            RaftResponse::InstallSnapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.rpc_err(TransportError::UnexpectedResponse)),
        }
    }

    /// Streamed: the snapshot is written into chunks as they are sent (docs/design.md §6.4).
    async fn full_snapshot(
        &mut self,
        vote: openraft::Vote<u64>,
        snapshot: openraft::Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = openraft::error::ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<
        openraft::raft::SnapshotResponse<u64>,
        openraft::error::StreamingError<TypeConfig, openraft::error::Fatal<u64>>,
    > {
        super::snapshot_transfer::send(self, vote, snapshot, cancel, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, MemberNode, RaftError<u64>>> {
        match self.call(RaftRequest::Vote(rpc), option.hard_ttl()).await.map_err(|e| self.rpc_err(e))? {
            RaftResponse::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(self.rpc_err(TransportError::UnexpectedResponse)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use iroh::protocol::Router;
    use openraft::{raft::VoteRequest, Vote};

    use iroh::address_lookup::MemoryLookup;

    use super::*;
    use crate::{
        api::Id128,
        raft::server::{RaftProtocolHandler, RaftWire, ShardRegistry},
        transport::{
            endpoint::{bind_endpoint, listening_addrs},
            PeerBook, RaftTransportStats,
        },
    };

    /// A peer that serves only `raft-rpc` (an older version without the mux): the call falls
    /// back to a stream of its own, reaches the peer's handler (which hosts no shard, so the
    /// answer is a refusal naming shard 0), and later calls skip the mux for a while.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peers_without_the_mux_get_a_stream_per_rpc() {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let cluster_id: SharedClusterId = Arc::new(RwLock::new(Id128([5; 16])));
        let old = bind_endpoint(loopback, None, MemoryLookup::new()).await.unwrap();
        let handler = RaftProtocolHandler::new(ShardRegistry::default(), cluster_id.clone(), RaftWire::Legacy);
        let router = Router::builder(old.clone()).accept(RAFT_ALPN, handler).spawn();
        let member = MemberNode { endpoint_id: *old.id().as_bytes(), addrs: listening_addrs(&old, loopback) };

        let me = bind_endpoint(loopback, None, MemoryLookup::new()).await.unwrap();
        let pool = ConnectionPool::new(me.clone(), PeerBook::new(MemoryLookup::new()), Duration::from_secs(10));
        let mut factory = IrohNetworkFactory::new(pool.clone(), cluster_id, None);
        let mut net = factory.new_client(2, &member).await;
        for round in 0..2 {
            let vote = VoteRequest { vote: Vote::new(1, 1), last_log_id: None };
            let err = net.vote(vote, RPCOption::new(Duration::from_secs(10))).await.unwrap_err();
            assert!(err.to_string().contains("shard 0 is not hosted"), "round {round}: {err}");
            assert!(pool.mux.refuses(&old.id()), "round {round}: the refusal of the mux is remembered");
        }
        assert_eq!(pool.raft_transport_stats(), RaftTransportStats { on_mux: 0, alone: 2 });
        router.shutdown().await.unwrap();
        me.close().await;
    }

    #[test]
    fn commit_index_sent_to_followers_never_passes_the_durable_log() {
        let (c, d) = (
            Some(LogId::new(openraft::CommittedLeaderId::new(2, 1), 9)),
            Some(LogId::new(openraft::CommittedLeaderId::new(2, 1), 7)),
        );
        assert_eq!(capped_commit(c, d), d, "capped at the durable log");
        assert_eq!(capped_commit(d, c), d, "a durable log ahead of the commit changes nothing");
        assert_eq!(capped_commit(c, None), None);
        assert_eq!(capped_commit(None, d), None);
        assert_eq!(capped_commit(c, c), c);
    }
}
