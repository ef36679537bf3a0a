//! Who may connect to this node: the endpoint's admission check, which iroh runs once a
//! connection's TLS handshake has proven the remote's endpoint id, before any stream opens
//! (docs/design.md §5, "Who may connect").
//!
//! - The client ALPN (`aspen-client`) admits anyone, up to a number of client connections open
//!   at once (`[limits] max_connections`); beyond it a connection is closed with [`BUSY_CODE`].
//!   Members' connections do not count, so a flood of clients cannot cut Raft off.
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
/// The QUIC close code of a client connection refused because too many are open.
pub const BUSY_CODE: u32 = 429;
/// The close reason sent with [`BUSY_CODE`].
pub const BUSY_REASON: &[u8] = b"too many connections; retry later";

/// Whether a connection ended because the peer's gate refused this node.
pub fn is_refusal(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(REFUSED_CODE))
}

/// The admission state of one node's endpoint (see the module docs).
#[derive(Debug, Default)]
pub struct PeerGate {
    state: RwLock<State>,
    refused: AtomicU64,
    /// Client connections open at once, at most (0: no limit).
    max_clients: usize,
}

#[derive(Debug, Default)]
struct State {
    /// `None`: this node has not seen itself in a membership yet, every endpoint is admitted.
    members: Option<HashSet<EndpointId>>,
    /// Connections admitted to a members-only ALPN, by remote endpoint.
    admitted: HashMap<EndpointId, Vec<WeakConnectionHandle>>,
    /// Client connections admitted, by remote (some may have ended since, or come from a node
    /// that has become a member since: neither counts).
    clients: Vec<(EndpointId, WeakConnectionHandle)>,
}

impl PeerGate {
    /// A gate that admits at most `max_clients` client connections at once (0: no limit).
    pub fn new(max_clients: usize) -> Arc<Self> {
        Arc::new(PeerGate { max_clients, ..Self::default() })
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
        // Connections this node opened go where it chose to go.
        if conn.side() == Side::Client {
            return AfterHandshakeOutcome::Accept;
        }
        if Self::is_public(conn.alpn()) {
            return self.decide_client(conn);
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
        handles.retain(is_open);
        handles.push(conn.weak_handle());
        AfterHandshakeOutcome::Accept
    }
}

impl PeerGate {
    /// Admits a client connection while fewer than `max_clients` are open.
    fn decide_client(&self, conn: &Connection) -> AfterHandshakeOutcome {
        if self.max_clients == 0 {
            return AfterHandshakeOutcome::Accept;
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.members.as_ref().is_some_and(|m| m.contains(&conn.remote_id())) {
            return AfterHandshakeOutcome::Accept;
        }
        if state.clients.len() >= self.max_clients {
            let State { members, clients, .. } = &mut *state;
            clients.retain(|(id, h)| is_open(h) && members.as_ref().is_none_or(|m| !m.contains(id)));
        }
        if state.clients.len() >= self.max_clients {
            drop(state);
            let n = self.refused.fetch_add(1, Ordering::Relaxed);
            if n % 1000 == 0 {
                tracing::warn!(
                    max = self.max_clients,
                    refused = n + 1,
                    "refused a client connection: the node has [limits] max_connections open"
                );
            }
            return AfterHandshakeOutcome::Reject {
                error_code: VarInt::from_u32(BUSY_CODE),
                reason: BUSY_REASON.to_vec(),
            };
        }
        state.clients.push((conn.remote_id(), conn.weak_handle()));
        AfterHandshakeOutcome::Accept
    }
}

/// Whether a connection is still open (not dropped, not closed by either side).
fn is_open(handle: &WeakConnectionHandle) -> bool {
    handle.upgrade().is_some_and(|c| c.close_reason().is_none())
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
        let gate = PeerGate::new(0);
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
