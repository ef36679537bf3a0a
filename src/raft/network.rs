//! The Raft network over iroh: one pooled QUIC connection per peer endpoint and ALPN, shared by
//! every shard of the node. Votes and AppendEntries of every shard travel on one long-lived
//! stream per peer (`super::mux`); snapshot chunks, large AppendEntries and peers that do not
//! serve the mux get one bi-stream per RPC (`raft-rpc` / `raft-shard`).
//!
//! Owns: the connection pool, the peer address book (iroh `MemoryLookup`), and the mapping of
//! openraft's `RaftNetwork` calls onto frames. Never: talk to anything but the endpoint ids
//! and direct addresses it was given (no relays, no DNS; see `cluster::endpoint`).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use iroh::{address_lookup::MemoryLookup, endpoint::Connection, Endpoint, EndpointAddr, EndpointId};
use openraft::{
    error::{InstallSnapshotError, NetworkError as RaftNetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::RPCOption,
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
        VoteResponse,
    },
    RaftNetwork, RaftNetworkFactory,
};

use super::{
    log_store::DurableWatch,
    mux::{MuxClient, MUX_MAX_REQUEST},
    rpc::{RaftEnvelope, RaftRefusal, RaftRequest, RaftResponse},
    LogId, MemberNode, TypeConfig,
};
use crate::api::{
    frame::{encode_frame, read_frame},
    ClusterId, ShardId, MAX_FRAME_BYTES, RAFT_ALPN, RAFT_SHARDED_ALPN,
};

/// Errors of the Raft transport.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("peer has no valid endpoint address")]
    NoAddress,
    #[error("connect to {peer}: {message}")]
    Connect { peer: String, message: String },
    #[error("stream: {0}")]
    Stream(String),
    #[error("frame: {0}")]
    Frame(#[from] crate::api::FrameError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("peer refused: {0}")]
    Refused(#[from] RaftRefusal),
    #[error("unexpected response kind")]
    UnexpectedResponse,
}

/// Where peers can be reached: feeds iroh's `MemoryLookup` so endpoints can be dialled by id,
/// and remembers the addresses each peer last announced over gossip, which are added to the
/// (possibly stale) addresses recorded in Raft membership whenever a peer is dialled.
#[derive(Clone, Debug, Default)]
pub struct PeerBook {
    lookup: MemoryLookup,
    announced: Arc<RwLock<HashMap<EndpointId, Vec<std::net::SocketAddr>>>>,
}

impl PeerBook {
    pub fn new(lookup: MemoryLookup) -> Self {
        PeerBook { lookup, announced: Default::default() }
    }

    /// Records the addresses a peer announced (verified by the caller); they replace the ones it
    /// announced before. Returns `true` when they differ from what was known.
    pub fn refresh(&self, id: EndpointId, addrs: Vec<std::net::SocketAddr>) -> bool {
        if addrs.is_empty() {
            return false;
        }
        let changed = {
            let mut announced = self.announced.write().unwrap_or_else(|p| p.into_inner());
            let changed = announced.get(&id) != Some(&addrs);
            announced.insert(id, addrs.clone());
            changed
        };
        self.add(EndpointAddr::from_parts(id, addrs.into_iter().map(iroh::TransportAddr::Ip)));
        changed
    }

    /// The addresses `id` last announced over gossip, if any.
    pub fn announced(&self, id: &EndpointId) -> Option<Vec<std::net::SocketAddr>> {
        self.announced.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// `addr` plus the addresses its endpoint announced most recently.
    pub fn resolve(&self, addr: &EndpointAddr) -> EndpointAddr {
        match self.announced(&addr.id) {
            Some(fresh) => {
                let mut out = addr.clone();
                out.addrs.extend(fresh.into_iter().map(iroh::TransportAddr::Ip));
                out
            }
            None => addr.clone(),
        }
    }

    pub fn lookup(&self) -> &MemoryLookup {
        &self.lookup
    }

    /// Records (or refreshes) a peer's addresses.
    pub fn add(&self, addr: EndpointAddr) {
        if !addr.is_empty() {
            self.lookup.add_endpoint_info(addr);
        }
    }
}

/// One slot per (peer, ALPN); the async mutex makes concurrent callers share one dial.
type Slot = Arc<tokio::sync::Mutex<Option<Connection>>>;
type SlotMap = HashMap<(EndpointId, &'static [u8]), Slot>;

/// Pooled QUIC connections of this node to its peers.
#[derive(Debug, Clone)]
pub struct ConnectionPool {
    endpoint: Endpoint,
    peers: PeerBook,
    slots: Arc<std::sync::Mutex<SlotMap>>,
    connect_timeout: Duration,
    mux: MuxClient,
    sent: Arc<SentCounters>,
}

#[derive(Debug, Default)]
struct SentCounters {
    on_mux: std::sync::atomic::AtomicU64,
    alone: std::sync::atomic::AtomicU64,
}

/// How this node's Raft RPCs travelled since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftTransportStats {
    /// RPCs sent on a peer's long-lived mux stream.
    pub on_mux: u64,
    /// RPCs sent on a stream of their own (snapshot chunks, large AppendEntries, older peers).
    pub alone: u64,
}

impl ConnectionPool {
    pub fn new(endpoint: Endpoint, peers: PeerBook, connect_timeout: Duration) -> Self {
        ConnectionPool {
            endpoint,
            peers,
            slots: Default::default(),
            connect_timeout,
            mux: MuxClient::default(),
            sent: Default::default(),
        }
    }

    /// How this node's Raft RPCs travelled (mux or a stream each).
    pub fn raft_transport_stats(&self) -> RaftTransportStats {
        use std::sync::atomic::Ordering::Relaxed;
        RaftTransportStats { on_mux: self.sent.on_mux.load(Relaxed), alone: self.sent.alone.load(Relaxed) }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn peers(&self) -> &PeerBook {
        &self.peers
    }

    /// A live connection to `addr` on `alpn`, dialling if there is none.
    pub async fn get(&self, addr: &EndpointAddr, alpn: &'static [u8]) -> Result<Connection, NetworkError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry((addr.id, alpn)).or_default().clone()
        };
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let addr = self.peers.resolve(addr);
        self.peers.add(addr.clone());
        let peer = addr.id.fmt_short().to_string();
        let conn = tokio::time::timeout(self.connect_timeout, self.endpoint.connect(addr.clone(), alpn))
            .await
            .map_err(|_| NetworkError::Connect { peer: peer.clone(), message: "timed out".into() })?
            .map_err(|e| NetworkError::Connect { peer, message: e.to_string() })?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets a connection that failed, so the next call dials again.
    pub fn invalidate(&self, id: EndpointId, alpn: &'static [u8]) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.remove(&(id, alpn));
    }
}

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
    /// ([`super::RedbLogStore::overlap_own_appends`]), and a follower must not apply an entry
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
    async fn call(&self, request: RaftRequest, ttl: Duration) -> Result<RaftResponse, NetworkError> {
        let addr = self.addr.as_ref().ok_or(NetworkError::NoAddress)?;
        let cluster_id = *self.factory.cluster_id.read().unwrap_or_else(|p| p.into_inner());
        let snapshot = matches!(request, RaftRequest::InstallSnapshot(_));
        let envelope = encode_frame(&RaftEnvelope { cluster_id, request })?;
        let pool = &self.factory.pool;
        let (me, shard) = (pool.endpoint().id(), self.factory.shard.unwrap_or(0));
        let on_mux = !snapshot && envelope.len() <= MUX_MAX_REQUEST && !pool.mux.refuses(&addr.id);
        let exchange = async {
            crate::fault::on_send(me, addr.id, Some(shard)).await.map_err(|e| NetworkError::Stream(e.to_string()))?;
            let resp = match on_mux {
                true => match pool.mux.call(pool, addr, shard, &envelope).await.inspect(|_| {
                    pool.sent.on_mux.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }) {
                    // An older peer without the mux: this call, and the next minute's, go alone.
                    Err(NetworkError::Connect { .. }) if pool.mux.refuses(&addr.id) => {
                        self.call_on_own_stream(addr, &envelope).await?
                    }
                    other => other?,
                },
                false => self.call_on_own_stream(addr, &envelope).await?,
            };
            crate::fault::on_reply(me, addr.id, Some(shard)).await.map_err(|e| NetworkError::Stream(e.to_string()))?;
            Ok::<_, NetworkError>(resp)
        };
        let resp = tokio::time::timeout(ttl, exchange).await.map_err(|_| NetworkError::Timeout(ttl))??;
        if let RaftResponse::Refused(r) = resp {
            if matches!(r, RaftRefusal::Busy { .. }) {
                // Expected while the peer's shard is backed up; openraft backs off and retries.
                tracing::debug!(target = self.target, "raft request refused by peer: {r}");
            } else {
                tracing::warn!(target = self.target, "raft request refused by peer: {r}");
            }
            return Err(NetworkError::Refused(r));
        }
        Ok(resp)
    }

    /// One RPC on a bi-stream of its own (`raft-shard` with the shard prefix, or `raft-rpc`).
    async fn call_on_own_stream(&self, addr: &EndpointAddr, envelope: &[u8]) -> Result<RaftResponse, NetworkError> {
        let alpn: &'static [u8] = if self.factory.shard.is_some() { RAFT_SHARDED_ALPN } else { RAFT_ALPN };
        let pool = &self.factory.pool;
        let conn = pool.get(addr, alpn).await?;
        pool.sent.alone.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| NetworkError::Stream(e.to_string()))?;
            if let Some(shard) = self.factory.shard {
                send.write_all(&crate::api::encode_shard_prefix(shard))
                    .await
                    .map_err(|e| NetworkError::Stream(e.to_string()))?;
            }
            send.write_all(envelope).await.map_err(|e| NetworkError::Stream(e.to_string()))?;
            send.finish().map_err(|e| NetworkError::Stream(e.to_string()))?;
            let resp: RaftResponse = read_frame(&mut recv, MAX_FRAME_BYTES).await?;
            Ok::<_, NetworkError>(resp)
        }
        .await;
        if result.is_err() && conn.close_reason().is_some() {
            pool.invalidate(addr.id, alpn);
        }
        result
    }
}

fn rpc_err<E: std::error::Error>(e: NetworkError) -> RPCError<u64, MemberNode, E> {
    match e {
        NetworkError::Connect { .. } | NetworkError::NoAddress | NetworkError::Refused(_) => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        other => RPCError::Network(RaftNetworkError::new(&other)),
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
        match self.call(RaftRequest::AppendEntries(rpc), option.hard_ttl()).await.map_err(rpc_err)? {
            RaftResponse::AppendEntries(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(rpc_err(NetworkError::UnexpectedResponse)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, MemberNode, RaftError<u64, InstallSnapshotError>>> {
        match self.call(RaftRequest::InstallSnapshot(rpc), option.hard_ttl()).await.map_err(rpc_err)? {
            RaftResponse::InstallSnapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(rpc_err(NetworkError::UnexpectedResponse)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, MemberNode, RaftError<u64>>> {
        match self.call(RaftRequest::Vote(rpc), option.hard_ttl()).await.map_err(rpc_err)? {
            RaftResponse::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            _ => Err(rpc_err(NetworkError::UnexpectedResponse)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use iroh::protocol::Router;
    use openraft::{raft::VoteRequest, Vote};

    use super::*;
    use crate::{
        api::Id128,
        cluster::endpoint::{bind_endpoint, listening_addrs},
        protocol::{RaftProtocolHandler, RaftWire, ShardRegistry},
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
}
