//! Connections of this node to its peers: one pooled QUIC connection per (peer endpoint, ALPN),
//! shared by every shard and every user (Raft, forwarding, membership), and the peer address
//! book that resolves endpoint ids to addresses.
//!
//! Owns: the pool (concurrent callers share one dial; a failed connection is forgotten so the
//! next call dials again), the [`PeerBook`] (iroh `MemoryLookup` plus the addresses peers last
//! announced over gossip), the raft mux client of the node ([`super::mux::MuxClient`]), whether
//! each peer answers ([`Reachability`], fed by the Raft network) and the counters of how Raft RPCs
//! travelled. Never: talk to anything but the endpoint ids and direct
//! addresses it was given (no relays, no DNS; see [`super::endpoint`]).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use iroh::{address_lookup::MemoryLookup, endpoint::Connection, Endpoint, EndpointAddr, EndpointId};

use super::{mux::MuxClient, reachability::Reachability, TransportError};

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

    /// How many peers announced their addresses over gossip.
    pub fn announced_count(&self) -> usize {
        self.announced.read().unwrap_or_else(|p| p.into_inner()).len()
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
    pub(crate) mux: MuxClient,
    pub(crate) sent: Arc<SentCounters>,
    reachability: Reachability,
}

#[derive(Debug, Default)]
pub(crate) struct SentCounters {
    pub(crate) on_mux: std::sync::atomic::AtomicU64,
    pub(crate) alone: std::sync::atomic::AtomicU64,
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
            reachability: Reachability::default(),
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

    /// Whether each peer answers this node's Raft messages (shared by every shard).
    pub fn reachability(&self) -> &Reachability {
        &self.reachability
    }

    /// Whether this node's endpoint is closing or closed (the node is stopping): failures to
    /// reach peers from then on say nothing about the peers.
    pub fn closing(&self) -> bool {
        futures::FutureExt::now_or_never(self.endpoint.closed()).is_some()
    }

    /// A live connection to `addr` on `alpn`, dialling if there is none.
    ///
    /// The dial runs as a task of its own, bounded by the connect timeout only: a caller that
    /// gives up sooner (a Raft RPC waits one heartbeat interval) stops waiting, but the dial goes
    /// on and the next caller finds its connection. Cancelling it half-way would abort the
    /// handshake, so that a peer whose handshake takes longer than the caller's patience (a
    /// restarting peer, a long round trip) were never connected, and would make the peer log
    /// every aborted handshake.
    pub async fn get(&self, addr: &EndpointAddr, alpn: &'static [u8]) -> Result<Connection, TransportError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry((addr.id, alpn)).or_default().clone()
        };
        let mut guard = slot.lock_owned().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let addr = self.peers.resolve(addr);
        self.peers.add(addr.clone());
        let peer = addr.id.fmt_short().to_string();
        let (endpoint, connect_timeout) = (self.endpoint.clone(), self.connect_timeout);
        // Holds the slot until the dial ends: concurrent callers wait for it and share its result.
        let dial = tokio::spawn({
            let peer = peer.clone();
            async move {
                let conn = tokio::time::timeout(connect_timeout, endpoint.connect(addr, alpn))
                    .await
                    .map_err(|_| TransportError::ConnectTimeout { peer: peer.clone(), after: connect_timeout })?
                    .map_err(|e| TransportError::connect(peer, alpn, e))?;
                *guard = Some(conn.clone());
                Ok(conn)
            }
        });
        match dial.await {
            Ok(result) => result,
            // Only a panic inside iroh's connect, or a runtime shutting down, gets here.
            Err(e) => Err(TransportError::LinkFailed { peer, reason: format!("dial: {e}") }),
        }
    }

    /// Forgets a connection that failed, so the next call dials again.
    pub fn invalidate(&self, id: EndpointId, alpn: &'static [u8]) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.remove(&(id, alpn));
    }
}
