//! Gossip discovery: every node announces where it listens and which shard leaders it sees.
//!
//! Owns: the iroh-gossip instance of the node, the topic of its cluster (derived from the cluster
//! id, so nodes of different clusters never share a swarm), the signed announcement format and
//! its verification, and the task that announces this node and applies what peers announce.
//!
//! Trust: an announcement is accepted only when the node id it names is a member in this node's
//! Raft membership, the endpoint id it names is the one membership records for that node, and the
//! signature verifies with that endpoint's public key (the node key). Gossip never adds members
//! and never changes who a node is; it only refreshes a member's addresses (in the [`PeerBook`],
//! used next time the member is dialled) and the leader/host hints used to route requests for
//! shards this node does not host. Announcements of one node are ordered by a sequence number
//! (microseconds since the epoch at signing, strictly increasing per process); older or replayed
//! ones are ignored.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use iroh::{Endpoint, EndpointId, PublicKey, SecretKey, Signature};
use iroh_gossip::{
    api::{Event, GossipReceiver, GossipSender},
    Gossip, TopicId,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    api::{ClusterId, NodeId, ShardId},
    cluster::service::NodeService,
    raft::network::SharedClusterId,
    transport::{endpoint::listening_addrs, PeerBook},
};

/// Largest gossip message this node sends or accepts.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 16 * 1024;
/// Version of the announcement format.
pub const ANNOUNCEMENT_VERSION: u8 = 1;
/// Domain separation for announcement signatures.
const SIGNING_CONTEXT: &[u8] = b"aspen-gossip-announcement-v1";
const MAX_ADDRS: usize = crate::api::MAX_MEMBER_ADDRS;
const MAX_SHARD_ENTRIES: usize = crate::config::MAX_SHARDS as usize;

/// The gossip topic of a cluster: a fixed 16-byte tag followed by the 16-byte cluster id.
pub fn topic_for(cluster_id: ClusterId) -> TopicId {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(b"aspen-gossip/v1:");
    bytes[16..].copy_from_slice(&cluster_id.0);
    TopicId::from_bytes(bytes)
}

pub use crate::sharding::LeaderHint;

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub version: u8,
    pub cluster_id: ClusterId,
    pub node_id: NodeId,
    /// The node's endpoint id (public key); must match Raft membership.
    pub endpoint_id: [u8; 32],
    /// Where the node listens now.
    pub addrs: Vec<SocketAddr>,
    /// The shards it hosts.
    pub local_shards: Vec<ShardId>,
    /// Leaders of its shards as it sees them.
    pub leaders: Vec<LeaderHint>,
    /// Strictly increasing per node (microseconds since the epoch at signing).
    pub seq: u64,
}

/// An announcement as sent on the wire: the postcard-encoded [`Announcement`] and an ed25519
/// signature over a context string followed by those bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAnnouncement {
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Why an announcement was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    #[error("announcement of {0} bytes exceeds the limit of {MAX_ANNOUNCEMENT_BYTES}")]
    TooLarge(usize),
    #[error("malformed announcement: {0}")]
    Malformed(String),
    #[error("announcement format version {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("announcement is for cluster {got}, this node is in {expected}")]
    WrongCluster { expected: ClusterId, got: ClusterId },
    #[error("node {0} is not a member of this cluster")]
    UnknownNode(NodeId),
    #[error("node {0} announced an endpoint id that Raft membership does not record for it")]
    EndpointMismatch(NodeId),
    #[error("bad signature on the announcement of node {0}")]
    BadSignature(NodeId),
    #[error("stale announcement of node {node} (seq {seq}, already saw {seen})")]
    Stale { node: NodeId, seq: u64, seen: u64 },
    #[error("encode: {0}")]
    Encode(String),
}

fn signing_bytes(payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(payload);
    msg
}

impl SignedAnnouncement {
    /// Encodes and signs `announcement` with the node key.
    pub fn sign(announcement: &Announcement, key: &SecretKey) -> Result<Self, GossipError> {
        let payload = postcard::to_stdvec(announcement).map_err(|e| GossipError::Encode(e.to_string()))?;
        let signature = key.sign(&signing_bytes(&payload)).to_bytes().to_vec();
        Ok(SignedAnnouncement { payload, signature })
    }

    /// The bytes sent on the gossip topic.
    pub fn encode(&self) -> Result<Vec<u8>, GossipError> {
        let bytes = postcard::to_stdvec(self).map_err(|e| GossipError::Encode(e.to_string()))?;
        if bytes.len() > MAX_ANNOUNCEMENT_BYTES {
            return Err(GossipError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Decodes wire bytes (no verification yet).
    pub fn decode(bytes: &[u8]) -> Result<Self, GossipError> {
        if bytes.len() > MAX_ANNOUNCEMENT_BYTES {
            return Err(GossipError::TooLarge(bytes.len()));
        }
        let (signed, rest): (SignedAnnouncement, _) =
            postcard::take_from_bytes(bytes).map_err(|e| GossipError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(GossipError::Malformed(format!("{} trailing bytes", rest.len())));
        }
        Ok(signed)
    }

    /// Checks the announcement against this node's cluster and Raft membership
    /// (`member_endpoint(node)` is the endpoint id membership records for `node`, if it is a
    /// member) and returns it when it is authentic.
    pub fn verify(
        &self,
        cluster_id: ClusterId,
        member_endpoint: impl Fn(NodeId) -> Option<[u8; 32]>,
    ) -> Result<Announcement, GossipError> {
        let (a, rest): (Announcement, _) =
            postcard::take_from_bytes(&self.payload).map_err(|e| GossipError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(GossipError::Malformed(format!("{} trailing payload bytes", rest.len())));
        }
        if a.version != ANNOUNCEMENT_VERSION {
            return Err(GossipError::UnsupportedVersion(a.version));
        }
        if a.cluster_id != cluster_id {
            return Err(GossipError::WrongCluster { expected: cluster_id, got: a.cluster_id });
        }
        if a.addrs.len() > MAX_ADDRS || a.local_shards.len() > MAX_SHARD_ENTRIES || a.leaders.len() > MAX_SHARD_ENTRIES
        {
            return Err(GossipError::Malformed("too many addresses or shard entries".into()));
        }
        let recorded = member_endpoint(a.node_id).ok_or(GossipError::UnknownNode(a.node_id))?;
        if recorded != a.endpoint_id {
            return Err(GossipError::EndpointMismatch(a.node_id));
        }
        let key = PublicKey::from_bytes(&recorded).map_err(|_| GossipError::EndpointMismatch(a.node_id))?;
        let sig: [u8; 64] = self.signature.as_slice().try_into().map_err(|_| GossipError::BadSignature(a.node_id))?;
        key.verify(&signing_bytes(&self.payload), &Signature::from_bytes(&sig))
            .map_err(|_| GossipError::BadSignature(a.node_id))?;
        Ok(a)
    }
}

/// Highest sequence number seen per node: rejects replayed and reordered announcements.
#[derive(Debug, Default)]
pub struct SeqTracker {
    seen: HashMap<NodeId, u64>,
}

impl SeqTracker {
    /// Accepts `seq` for `node` if it is newer than anything seen from it.
    pub fn accept(&mut self, node: NodeId, seq: u64) -> Result<(), GossipError> {
        match self.seen.get(&node) {
            Some(&seen) if seq <= seen => Err(GossipError::Stale { node, seq, seen }),
            _ => {
                self.seen.insert(node, seq);
                Ok(())
            }
        }
    }
}

/// The node's gossip: the iroh-gossip instance (registered on the endpoint's router under
/// [`iroh_gossip::ALPN`]) and, once started, the announce/listen task.
#[derive(Debug)]
pub struct GossipDiscovery {
    gossip: Gossip,
    interval: Duration,
    cluster_id: SharedClusterId,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl GossipDiscovery {
    /// Creates the gossip instance on `endpoint` (it contacts only peers it is told about).
    pub fn new(endpoint: &Endpoint, cluster_id: SharedClusterId, interval: Duration) -> Self {
        let gossip = Gossip::builder().max_message_size(MAX_ANNOUNCEMENT_BYTES).spawn(endpoint.clone());
        GossipDiscovery { gossip, interval, cluster_id, task: Mutex::new(None) }
    }

    /// The protocol handler to register with the router.
    pub fn protocol(&self) -> GossipProtocol {
        GossipProtocol(self.gossip.clone())
    }

    /// The topic of this node's cluster; `None` until the node has initialized or joined one.
    pub fn topic_id(&self) -> Option<TopicId> {
        let id = *self.cluster_id.read().unwrap_or_else(|p| p.into_inner());
        (id != ClusterId::default()).then(|| topic_for(id))
    }

    /// Starts announcing this node and applying peers' announcements until `cancel`.
    pub fn start(&self, ctx: AnnounceContext, cancel: CancellationToken) {
        let runner = Runner { gossip: self.gossip.clone(), interval: self.interval, ctx, seq: 0 };
        let handle = tokio::spawn(runner.run(cancel));
        if let Some(old) = self.task.lock().unwrap_or_else(|p| p.into_inner()).replace(handle) {
            old.abort();
        }
    }

    /// Stops the task and the gossip instance.
    pub async fn shutdown(&self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        // Graceful (the actor tells its neighbours it leaves) but bounded: a wedged actor only
        // moves again once the endpoint closes its connections, which comes later in a stop.
        match tokio::time::timeout(GOSSIP_STOP, self.gossip.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("gossip shutdown: {e}"),
            Err(_) => tracing::warn!(
                "gossip did not stop within {GOSSIP_STOP:?} (its actor waits on a peer connection); the endpoint's \
                 close ends it"
            ),
        }
    }
}

/// Longest a node's stop waits for gossip's graceful shutdown.
///
/// iroh-gossip 0.101's actor hands each message for a peer to that connection's send loop over a
/// bounded channel and awaits room in it (`net.rs`, `active_send_tx.send(..).await`). If the send
/// loop has ended on an error while the connection stays open (keep-alives hold it), nothing
/// reads that channel again: after 64 more messages to the peer the whole actor waits there for
/// good, never reading its command channel, so `Gossip::shutdown` waits until the connection
/// closes (upstream n0-computer/iroh-gossip#47, no released fix). The connection closes when the
/// endpoint does, which is why neither shutdown below may hold the stop up (docs/design.md §12).
const GOSSIP_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// The gossip instance as the router's protocol handler. The router stops it when it shuts down,
/// and [`GossipDiscovery::shutdown`] has usually stopped it already (a node's shutdown does,
/// first): stopping a stopped instance is fine here (`ActorDropped`, logged at debug).
#[derive(Debug, Clone)]
pub struct GossipProtocol(Gossip);

impl iroh::protocol::ProtocolHandler for GossipProtocol {
    async fn accept(&self, connection: iroh::endpoint::Connection) -> Result<(), iroh::protocol::AcceptError> {
        iroh::protocol::ProtocolHandler::accept(&self.0, connection).await
    }

    async fn shutdown(&self) {
        // Stopped already by `GossipDiscovery::shutdown` in a node's stop, this returns at once;
        // but a wedged actor (see [`GOSSIP_STOP`]) moves only once the endpoint closes, which
        // the router does after every handler's shutdown has returned. So the router does not
        // wait for it: the call goes on in the background and ends with the endpoint's close.
        // (Session 23: awaited here, it held a stop for the router's whole drain limit.)
        let gossip = self.0.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(GOSSIP_AFTER_CLOSE, gossip.shutdown()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("gossip shutdown (already stopped): {e}"),
                Err(_) => tracing::warn!("gossip did not stop within {GOSSIP_AFTER_CLOSE:?} of the router's shutdown"),
            }
        });
    }
}

/// How long the background shutdown of the router's gossip handler may take (the endpoint closes
/// meanwhile, which ends a wedged actor's wait).
const GOSSIP_AFTER_CLOSE: std::time::Duration = std::time::Duration::from_secs(30);

/// What the announce task needs from the node.
#[derive(Clone, Debug)]
pub struct AnnounceContext {
    pub node_id: NodeId,
    pub secret_key: SecretKey,
    pub endpoint: Endpoint,
    pub bind_addr: SocketAddr,
    pub cluster_id: SharedClusterId,
    pub peers: PeerBook,
    pub service: Arc<NodeService>,
}

struct Runner {
    gossip: Gossip,
    interval: Duration,
    ctx: AnnounceContext,
    seq: u64,
}

impl Runner {
    fn cluster_id(&self) -> ClusterId {
        *self.ctx.cluster_id.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Endpoint ids of the other members, with their recorded addresses put in the address book
    /// so gossip can dial them.
    fn member_endpoints(&self) -> Vec<EndpointId> {
        let mut ids = Vec::new();
        for (node, member) in self.ctx.service.store().known_nodes() {
            if node == self.ctx.node_id {
                continue;
            }
            if let Some(addr) = member.endpoint_addr() {
                ids.push(addr.id);
                self.ctx.peers.add(self.ctx.peers.resolve(&addr));
            }
        }
        ids
    }

    async fn run(mut self, cancel: CancellationToken) {
        // A fresh node has no cluster (and so no topic) until it initializes or joins.
        let cluster_id = loop {
            let id = self.cluster_id();
            if id != ClusterId::default() {
                break id;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        };
        let topic = topic_for(cluster_id);
        let mut seqs = SeqTracker::default();
        while !cancel.is_cancelled() {
            let bootstrap = self.member_endpoints();
            match self.gossip.subscribe(topic, bootstrap).await {
                Ok(sub) => {
                    let (sender, receiver) = sub.split();
                    self.serve(cluster_id, sender, receiver, &mut seqs, &cancel).await;
                }
                Err(e) => tracing::warn!("gossip subscribe failed: {e}"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// Announces every interval and applies what arrives, until the subscription ends.
    async fn serve(
        &mut self,
        cluster_id: ClusterId,
        sender: GossipSender,
        mut receiver: GossipReceiver,
        seqs: &mut SeqTracker,
        cancel: &CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    // Re-dial members when we have no neighbour (all peers restarted, say).
                    if receiver.neighbors().next().is_none() {
                        let ids = self.member_endpoints();
                        if !ids.is_empty() {
                            if let Err(e) = sender.join_peers(ids).await {
                                tracing::debug!("gossip join_peers: {e}");
                            }
                        }
                    }
                    match self.announcement(cluster_id).and_then(|a| SignedAnnouncement::sign(&a, &self.ctx.secret_key)?.encode()) {
                        Ok(bytes) => {
                            if let Err(e) = sender.broadcast(bytes.into()).await {
                                tracing::debug!("gossip broadcast: {e}");
                                return;
                            }
                        }
                        Err(e) => tracing::warn!("cannot build gossip announcement: {e}"),
                    }
                }
                event = receiver.next() => match event {
                    Some(Ok(Event::Received(msg))) => self.apply(cluster_id, &msg.content, seqs),
                    Some(Ok(Event::NeighborUp(id))) => tracing::debug!(peer = %id.fmt_short(), "gossip neighbour up"),
                    Some(Ok(Event::NeighborDown(id))) => tracing::debug!(peer = %id.fmt_short(), "gossip neighbour down"),
                    Some(Ok(Event::Lagged)) => tracing::debug!("gossip receiver lagged"),
                    Some(Err(e)) => {
                        tracing::debug!("gossip receiver: {e}");
                        return;
                    }
                    None => return,
                },
            }
        }
    }

    fn announcement(&mut self, cluster_id: ClusterId) -> Result<Announcement, GossipError> {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or_default();
        self.seq = now_us.max(self.seq + 1);
        let mut leaders = Vec::new();
        let mut local_shards = Vec::new();
        for (shard, node) in self.ctx.service.store().shards() {
            local_shards.push(*shard);
            let status = node.status();
            if let Some(leader) = status.leader {
                leaders.push(LeaderHint { shard: *shard, leader, term: status.term });
            }
        }
        Ok(Announcement {
            version: ANNOUNCEMENT_VERSION,
            cluster_id,
            node_id: self.ctx.node_id,
            endpoint_id: *self.ctx.endpoint.id().as_bytes(),
            addrs: listening_addrs(&self.ctx.endpoint, self.ctx.bind_addr),
            local_shards,
            leaders,
            seq: self.seq,
        })
    }

    fn apply(&self, cluster_id: ClusterId, bytes: &[u8], seqs: &mut SeqTracker) {
        let members: BTreeMap<NodeId, [u8; 32]> =
            self.ctx.service.store().known_nodes().into_iter().map(|(id, m)| (id, m.endpoint_id)).collect();
        let verified = SignedAnnouncement::decode(bytes)
            .and_then(|s| s.verify(cluster_id, |node| members.get(&node).copied()))
            .and_then(|a| seqs.accept(a.node_id, a.seq).map(|()| a));
        match verified {
            Ok(a) if a.node_id == self.ctx.node_id => {}
            Ok(a) => {
                if let Ok(id) = EndpointId::from_bytes(&a.endpoint_id) {
                    if self.ctx.peers.refresh(id, a.addrs.clone()) {
                        tracing::info!(node = a.node_id, addrs = ?a.addrs, "gossip: member's addresses refreshed");
                    }
                }
                self.ctx.service.store().note_announcement(a.node_id, &a.local_shards, &a.leaders);
            }
            Err(e @ (GossipError::Stale { .. } | GossipError::UnknownNode(_))) => tracing::debug!("gossip: {e}"),
            Err(e) => tracing::warn!("gossip announcement rejected: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_bytes(&[seed; 32])
    }

    fn announcement(node_id: NodeId, key: &SecretKey) -> Announcement {
        Announcement {
            version: ANNOUNCEMENT_VERSION,
            cluster_id: crate::api::Id128([7; 16]),
            node_id,
            endpoint_id: *key.public().as_bytes(),
            addrs: vec!["127.0.0.1:7601".parse().unwrap()],
            local_shards: vec![0, 1],
            leaders: vec![LeaderHint { shard: 1, leader: node_id, term: 3 }],
            seq: 1,
        }
    }

    #[test]
    fn topic_depends_on_cluster_id() {
        let a = topic_for(crate::api::Id128([1; 16]));
        let b = topic_for(crate::api::Id128([2; 16]));
        assert_ne!(a, b);
        assert_eq!(a, topic_for(crate::api::Id128([1; 16])));
    }

    #[test]
    fn valid_announcement_round_trips_and_verifies() {
        let k = key(1);
        let a = announcement(2, &k);
        let bytes = SignedAnnouncement::sign(&a, &k).unwrap().encode().unwrap();
        let members = |n: NodeId| (n == 2).then(|| *k.public().as_bytes());
        let got = SignedAnnouncement::decode(&bytes).unwrap().verify(a.cluster_id, members).unwrap();
        assert_eq!(got, a);
    }

    #[test]
    fn forged_and_tampered_announcements_are_rejected() {
        let real = key(1);
        let forger = key(9);
        let a = announcement(2, &real);
        let cluster = a.cluster_id;
        let members = |n: NodeId| (n == 2).then(|| *real.public().as_bytes());

        // Signed by another key while claiming node 2's endpoint id.
        let forged = SignedAnnouncement::sign(&a, &forger).unwrap();
        assert_eq!(forged.verify(cluster, members), Err(GossipError::BadSignature(2)));

        // The forger's own endpoint id for node 2: membership says otherwise.
        let impostor = announcement(2, &forger);
        let signed = SignedAnnouncement::sign(&impostor, &forger).unwrap();
        assert_eq!(signed.verify(cluster, members), Err(GossipError::EndpointMismatch(2)));

        // A valid signature over other bytes: one payload byte flipped (the port).
        let mut tampered = SignedAnnouncement::sign(&a, &real).unwrap();
        let last = tampered.payload.len() - 1;
        tampered.payload[last] ^= 1;
        assert!(tampered.verify(cluster, members).is_err());
        let mut tampered = SignedAnnouncement::sign(&a, &real).unwrap();
        let pos = tampered.payload.len() - 8;
        tampered.payload[pos] ^= 0x40;
        assert!(tampered.verify(cluster, members).is_err());

        // Truncated or missing signature.
        let mut short = SignedAnnouncement::sign(&a, &real).unwrap();
        short.signature.truncate(10);
        assert_eq!(short.verify(cluster, members), Err(GossipError::BadSignature(2)));

        // A node that is not a member, and another cluster.
        let stranger = announcement(5, &real);
        let signed = SignedAnnouncement::sign(&stranger, &real).unwrap();
        assert_eq!(signed.verify(cluster, members), Err(GossipError::UnknownNode(5)));
        let other = crate::api::Id128([8; 16]);
        let signed = SignedAnnouncement::sign(&a, &real).unwrap();
        assert!(matches!(signed.verify(other, members), Err(GossipError::WrongCluster { .. })));
    }

    #[test]
    fn malformed_bytes_are_rejected_without_panic() {
        assert!(matches!(SignedAnnouncement::decode(&[]), Err(GossipError::Malformed(_))));
        assert!(matches!(SignedAnnouncement::decode(&[0xff; 40]), Err(GossipError::Malformed(_))));
        assert!(matches!(
            SignedAnnouncement::decode(&vec![0u8; MAX_ANNOUNCEMENT_BYTES + 1]),
            Err(GossipError::TooLarge(_))
        ));
        let k = key(1);
        let mut bytes = SignedAnnouncement::sign(&announcement(2, &k), &k).unwrap().encode().unwrap();
        bytes.push(0);
        assert!(matches!(SignedAnnouncement::decode(&bytes), Err(GossipError::Malformed(_))));
        bytes.truncate(bytes.len() - 5);
        assert!(matches!(SignedAnnouncement::decode(&bytes), Err(GossipError::Malformed(_))));
        // Garbage payload under a valid envelope.
        let garbage = SignedAnnouncement { payload: vec![1, 2, 3], signature: vec![0; 64] };
        assert!(matches!(garbage.verify(crate::api::Id128([7; 16]), |_| None), Err(GossipError::Malformed(_))));
    }

    #[test]
    fn replayed_and_reordered_announcements_are_stale() {
        let mut t = SeqTracker::default();
        t.accept(2, 10).unwrap();
        assert!(matches!(t.accept(2, 10), Err(GossipError::Stale { .. })));
        assert!(matches!(t.accept(2, 9), Err(GossipError::Stale { .. })));
        t.accept(3, 1).unwrap();
        t.accept(2, 11).unwrap();
    }
}
