//! Who may connect to this node: the endpoint's admission check, which iroh runs once a
//! connection's TLS handshake has proven the remote's endpoint id, before any stream opens
//! (docs/design.md §5, "Who may connect").
//!
//! - The client ALPN (`aspen-client`) admits anyone.
//! - Every other ALPN — the Raft ALPNs, the peer ALPN (`aspen-peer/1`) and gossip — admits only
//!   the members of the cluster: the voters and learners of shard 0, which every node hosts, so
//!   its membership lists every node. Anyone else is refused at once with [`REFUSED_CODE`] and a
//!   reason that names nothing of the cluster.
//! - A node that has not yet seen itself in shard 0's membership (fresh, or being added and
//!   catching up: the memberships in the log before its own addition may not list the leader
//!   that sends it the log) admits any endpoint on those ALPNs; it holds no data of its own yet.
//! - When an endpoint leaves the membership, the connections it opened to the members-only
//!   ALPNs are closed, so a removed node cannot go on sending Raft messages on a connection it
//!   opened before.
//!
//! Owns: the admitted set and the connections admitted through it. Never: decide membership
//! (Raft does; `cluster::bootstrap` feeds shard 0's view in), or check client requests (the
//! service does).

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use iroh::{
    endpoint::{AfterHandshakeOutcome, Connection, ConnectionError, EndpointHooks, Side, VarInt, WeakConnectionHandle},
    EndpointId,
};

use crate::api::CLIENT_ALPN;

/// The QUIC close code of a connection refused by the gate.
pub const REFUSED_CODE: u32 = 403;
/// The close reason sent with [`REFUSED_CODE`].
pub const REFUSED_REASON: &[u8] = b"not a member";

/// Whether a connection ended because the peer's gate refused this node.
pub fn is_refusal(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(REFUSED_CODE))
}

/// The admission state of one node's endpoint (see the module docs).
#[derive(Debug, Default)]
pub struct PeerGate {
    state: RwLock<State>,
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// `None`: this node has not seen itself in a membership yet, every endpoint is admitted.
    members: Option<HashSet<EndpointId>>,
    /// Connections admitted to a members-only ALPN, by remote endpoint.
    admitted: HashMap<EndpointId, Vec<WeakConnectionHandle>>,
}

impl PeerGate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether `alpn` is open to anyone (only the client ALPN is).
    pub fn is_public(alpn: &[u8]) -> bool {
        alpn == CLIENT_ALPN
    }

    /// Whether `id` may connect to the members-only ALPNs now.
    pub fn admits(&self, id: &EndpointId) -> bool {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.members.as_ref().is_none_or(|m| m.contains(id))
    }

    /// Whether the gate admits members only (this node has seen itself in the membership).
    pub fn is_closed(&self) -> bool {
        self.state.read().unwrap_or_else(|p| p.into_inner()).members.is_some()
    }

    /// How many connections were refused since the node started.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Sets the members (shard 0's voters and learners). Connections of endpoints that are no
    /// longer members are closed; returns how many.
    pub fn set_members(&self, members: HashSet<EndpointId>) -> usize {
        let departed: Vec<WeakConnectionHandle> = {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<EndpointId> = state.admitted.keys().filter(|id| !members.contains(*id)).copied().collect();
            state.members = Some(members);
            gone.iter().filter_map(|id| state.admitted.remove(id)).flatten().collect()
        };
        let mut closed = 0;
        for conn in departed.iter().filter_map(WeakConnectionHandle::upgrade) {
            conn.close(VarInt::from_u32(REFUSED_CODE), REFUSED_REASON);
            closed += 1;
        }
        closed
    }

    /// Decides on a connection whose handshake just completed.
    fn decide(&self, conn: &Connection) -> AfterHandshakeOutcome {
        // Connections this node opened go where it chose to go; the client ALPN is public.
        if conn.side() == Side::Client || Self::is_public(conn.alpn()) {
            return AfterHandshakeOutcome::Accept;
        }
        let id = conn.remote_id();
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.members.as_ref().is_some_and(|m| !m.contains(&id)) {
            drop(state);
            let n = self.refused.fetch_add(1, Ordering::Relaxed);
            // The first refusal and then one in a thousand: a hostile endpoint cannot flood the log.
            if n % 1000 == 0 {
                tracing::info!(
                    remote = %id.fmt_short(),
                    alpn = %String::from_utf8_lossy(conn.alpn()),
                    refused = n + 1,
                    "refused a connection from an endpoint that is not a member"
                );
            }
            return AfterHandshakeOutcome::Reject {
                error_code: VarInt::from_u32(REFUSED_CODE),
                reason: REFUSED_REASON.to_vec(),
            };
        }
        let handles = state.admitted.entry(id).or_default();
        handles.retain(|h| h.upgrade().is_some());
        handles.push(conn.weak_handle());
        AfterHandshakeOutcome::Accept
    }
}

/// The [`PeerGate`] as iroh endpoint hooks (installed when the node's endpoint is built).
#[derive(Debug, Clone)]
pub struct GateHooks(pub Arc<PeerGate>);

impl EndpointHooks for GateHooks {
    fn after_handshake<'a>(&'a self, conn: &'a Connection) -> impl Future<Output = AfterHandshakeOutcome> + Send + 'a {
        std::future::ready(self.0.decide(conn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> EndpointId {
        iroh::SecretKey::from_bytes(&[n; 32]).public()
    }

    #[test]
    fn a_fresh_node_admits_anyone_and_a_member_node_only_members() {
        let gate = PeerGate::new();
        assert!(!gate.is_closed());
        assert!(gate.admits(&id(9)), "no membership seen yet");
        assert_eq!(gate.set_members([id(1), id(2)].into_iter().collect()), 0);
        assert!(gate.is_closed());
        assert!(gate.admits(&id(1)) && gate.admits(&id(2)));
        assert!(!gate.admits(&id(9)), "not a member");
        gate.set_members([id(1)].into_iter().collect());
        assert!(!gate.admits(&id(2)), "removed from the membership");
        assert!(PeerGate::is_public(CLIENT_ALPN));
        assert!(!PeerGate::is_public(crate::api::PEER_ALPN) && !PeerGate::is_public(crate::api::RAFT_MUX_ALPN));
    }
}
