//! The shared vocabulary of Aspen, at the bottom of the dependency graph.
//!
//! This module owns the types that cross a boundary: key-value operations and their results,
//! the client request/response enums and their wire framing, the typed client errors, ALPN
//! names, the shard-aware Raft id codec and node tickets; and the Raft group's shared types
//! ([`raft`]: openraft type configuration, log entry payloads, member records) and node-to-node
//! Raft messages ([`raft_rpc`]). Every other module uses it; it must never import any of them.

pub mod backup;
pub mod frame;
pub mod kv;
pub mod lease;
pub mod raft;
pub mod raft_rpc;
pub mod routing;
pub mod ticket;
pub mod watch;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use frame::{FrameError, MAX_FRAME_BYTES};
pub use kv::{KeyRange, KeyRecord, KvCompare, KvCompareTarget, KvOp, KvOpResult, KvPut, KvTxn, RangePage, RangeQuery};
pub use lease::{format_lease_id, parse_lease_id, LeaseEntry, LeaseStatus};
pub use ticket::{NodeTicket, TicketError};
pub use watch::{EventKind, PrevMeta, WatchEvent, WatchPosition, WatchRequest, WatchStart};

/// A BLAKE3 hasher in derive-key mode for the context string `$context`, made once per call
/// site and cloned: `Hasher::new_derive_key` hashes its context on every call, which for the
/// small items of the state digest is a large share of the work. Same output.
macro_rules! derive_key_hasher {
    ($context:expr) => {{
        static HASHER: std::sync::LazyLock<blake3::Hasher> =
            std::sync::LazyLock::new(|| blake3::Hasher::new_derive_key($context));
        HASHER.clone()
    }};
}
pub(crate) use derive_key_hasher;

/// ALPN of the client protocol (requests from `aspen-cli`, the Rust client and forwarding nodes).
pub const CLIENT_ALPN: &[u8] = b"aspen-client";
/// ALPN of the legacy, unprefixed Raft protocol (shard 0 only).
pub const RAFT_ALPN: &[u8] = b"raft-rpc";
/// ALPN of the sharded Raft protocol: every stream starts with a `u32` big-endian shard id.
pub const RAFT_SHARDED_ALPN: &[u8] = b"raft-shard";
/// Raft RPCs of every shard to one peer on one long-lived stream (`transport::mux`).
pub const RAFT_MUX_ALPN: &[u8] = b"aspen-raft-mux/1";
/// Requests between members (forwarded requests, shard scans and writes, shard membership,
/// leader moves, elections, status fan-out): the client wire format, but only members of the
/// cluster may connect (`transport::gate`), and only here are the node-to-node requests
/// ([`ClientRequest::is_node_to_node`]) answered.
pub const PEER_ALPN: &[u8] = b"aspen-peer/1";

/// At most this many addresses per member (in joins, added learners and gossip announcements):
/// a caller cannot make every node store and dial an unbounded list.
pub const MAX_MEMBER_ADDRS: usize = 16;

/// Version of the client wire protocol, carried in every request envelope. Version 2 added
/// the envelope's token and the join request's join token.
pub const CLIENT_PROTOCOL_VERSION: u16 = 2;

/// Keys under this prefix belong to the cluster itself (issued tokens, revocations, used join
/// tokens): they live in shard 0, clients cannot read or write them, scans and prefix deletes
/// of clients pass over them.
pub const RESERVED_PREFIX: &[u8] = b"\x00aspen/";

/// Whether `key` lies in the reserved keyspace ([`RESERVED_PREFIX`]).
pub fn is_reserved_key(key: &[u8]) -> bool {
    key.starts_with(RESERVED_PREFIX)
}

/// The smallest key greater than every key with `prefix`, or `None` if there is none.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A node id as operators see it (`--node-id`). Must be `1 ..= 2^48 - 1`.
pub type NodeId = u64;
/// A shard number (`0 .. num_shards`).
pub type ShardId = u32;
/// A revision: where a change stands in its shard's history (docs/design.md §6.3): the Raft log
/// index of the entry that made it, times [`REVISIONS_PER_ENTRY`], plus the write's place in that
/// entry. Every write has its own, ordered as the shard applied them; revisions compare within a
/// shard only.
pub type Revision = u64;

/// Revisions one log entry spans: a write's place in its entry takes the low bits (an entry holds
/// at most `raft::batcher::MAX_WRITES` writes).
pub const REVISIONS_PER_ENTRY: u64 = 1024;

/// The revision of the write at `place` (0-based) in the entry at log `index`.
pub fn write_revision(index: u64, place: usize) -> Revision {
    let place = (place as u64).min(REVISIONS_PER_ENTRY - 1);
    index.saturating_mul(REVISIONS_PER_ENTRY).saturating_add(place)
}

/// A shard's revision once the entry at log `index` is applied: at or after every write of that
/// entry and the ones before, before every write of a later entry.
pub fn applied_revision(index: u64) -> Revision {
    index.saturating_mul(REVISIONS_PER_ENTRY).saturating_add(REVISIONS_PER_ENTRY - 1)
}

/// The log index of the entry that made the change at `revision`.
pub fn revision_entry(revision: Revision) -> u64 {
    revision / REVISIONS_PER_ENTRY
}

/// Largest node id that still leaves room for the shard in the upper 16 bits of a Raft id.
pub const MAX_NODE_ID: NodeId = (1 << 48) - 1;

/// Encodes the Raft id of `node_id` in `shard`: `(shard << 48) | node_id`. Shard 0's id equals the node id.
pub fn shard_raft_id(shard: ShardId, node_id: NodeId) -> u64 {
    ((shard as u64) << 48) | (node_id & MAX_NODE_ID)
}

/// Splits a shard-aware Raft id into `(shard, node_id)`.
pub fn split_raft_id(raft_id: u64) -> (ShardId, NodeId) {
    ((raft_id >> 48) as ShardId, raft_id & MAX_NODE_ID)
}

/// The 4-byte prefix that opens every `raft-shard` stream: the shard id, big-endian.
pub fn encode_shard_prefix(shard: ShardId) -> [u8; 4] {
    shard.to_be_bytes()
}

/// Reads the shard id from the first 4 bytes of a `raft-shard` stream.
pub fn decode_shard_prefix(bytes: [u8; 4]) -> ShardId {
    ShardId::from_be_bytes(bytes)
}

/// Splits the shard prefix off the front of a `raft-shard` stream held in memory: the shard id
/// and the frames after it. `None` when fewer than 4 bytes arrived.
pub fn split_shard_prefix(bytes: &[u8]) -> Option<(ShardId, &[u8])> {
    let (prefix, rest) = bytes.split_first_chunk::<4>()?;
    Some((decode_shard_prefix(*prefix), rest))
}

/// A random 16-byte id, printed as 32 hex digits (cluster ids, client session ids).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Id128(pub [u8; 16]);

impl Id128 {
    /// A fresh random id.
    pub fn random() -> Self {
        Id128(rand::random())
    }
}

impl fmt::Display for Id128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Id128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A cluster id: made once when a cluster is initialized, carried by tickets and Raft messages.
pub type ClusterId = Id128;

/// One stored key with its revisions, as returned by get and scan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after the first put).
    pub version: u64,
}

/// One operation in an atomic batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchOp {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

impl BatchOp {
    pub fn key(&self) -> &[u8] {
        match self {
            BatchOp::Put { key, .. } | BatchOp::Delete { key } => key,
        }
    }
}

/// A state-changing command, as replicated through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteCommand {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Set `key` to `new_value` only if its current value is `expected` (`None`: only if absent).
    Cas {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        expected: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        new_value: Vec<u8>,
    },
    /// Apply every operation atomically, in order.
    Batch { ops: Vec<BatchOp> },
    // New variants go at the END: commands are postcard-encoded in Raft logs and snapshots
    // (sessions keep outcomes), where a variant is its index.
    /// Delete every key of the shard that starts with `prefix` (empty: every key), atomically in
    /// one entry; each deleted key is deleted exactly as [`WriteCommand::Delete`] deletes it.
    /// Names no key: on a sharded cluster the receiving node sends it to every shard (one
    /// [`ClientRequest::ShardWrite`] each, same session) and sums the counts (docs/design.md §9).
    DeletePrefix {
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
    },
    /// An etcd-style transaction, atomic within one shard: if every compare holds, run `success`,
    /// else `failure`, in order, at one revision. All its keys (compares and both branches) must
    /// fall into one shard.
    Txn { compares: Vec<Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp> },
    /// Grant lease `id` (chosen by the client: [`lease::random_lease_id`]) for `ttl_secs`. Goes to
    /// the lease's home shard; `LeaseExists` if the id is taken or was revoked lately.
    LeaseGrant { id: u64, ttl_secs: u64 },
    /// Revoke lease `id` and delete every key attached to it, in every shard. A client sends it
    /// to any node, which coordinates (docs/design.md §16): this command to the home shard
    /// (the lease is marked revoking, the home shard's keys go), [`WriteCommand::LeaseDrop`] to
    /// every other shard, then [`WriteCommand::LeaseForget`] to the home shard.
    LeaseRevoke { id: u64 },
    /// Set `key` to `value`, attached to lease `lease` (the key goes when the lease does).
    /// `checked`: the sending node confirmed with the lease's home shard that the lease lives
    /// (clients send `false`; a shard that knows nothing of the lease answers
    /// [`WriteOutcome::LeaseUnchecked`] and the node checks and resends).
    PutLease {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        lease: u64,
        checked: bool,
    },
    /// Node to node, to a shard other than the lease's home: delete this shard's keys of lease
    /// `id` and remember the lease as revoked (a put with it that arrives later is refused).
    LeaseDrop { id: u64 },
    /// Node to node, to the lease's home shard once every other shard dropped it: forget the
    /// revoked lease's record (its tombstone stays).
    LeaseForget { id: u64 },
    /// An etcd-shaped txn (`api::kv`; the etcd API's puts, range deletes and txns), one write
    /// of the shard its keys are in. `leases_checked`: the node asked the home shard of every
    /// lease its puts attach to (as [`WriteCommand::PutLease`]'s `checked`; refused from clients).
    KvTxn { txn: KvTxn, leases_checked: bool },
}

impl WriteCommand {
    /// Every key this command names (a prefix delete names none: it covers a key range).
    /// The bytes of keys and values the command carries (what a log entry's batch size counts,
    /// `raft::batcher`; about what applying it writes).
    pub fn payload_bytes(&self) -> usize {
        match self {
            WriteCommand::Put { key, value } => key.len() + value.len(),
            WriteCommand::Delete { key } => key.len(),
            WriteCommand::Cas { key, expected, new_value } => {
                key.len() + expected.as_ref().map_or(0, Vec::len) + new_value.len()
            }
            WriteCommand::Batch { ops } => ops
                .iter()
                .map(|op| match op {
                    BatchOp::Put { key, value } => key.len() + value.len(),
                    BatchOp::Delete { key } => key.len(),
                })
                .sum(),
            WriteCommand::DeletePrefix { prefix } => prefix.len(),
            WriteCommand::PutLease { key, value, .. } => key.len() + value.len(),
            WriteCommand::LeaseGrant { .. }
            | WriteCommand::LeaseRevoke { .. }
            | WriteCommand::LeaseDrop { .. }
            | WriteCommand::LeaseForget { .. } => 16,
            WriteCommand::Txn { compares, success, failure } => {
                let compared: usize = compares
                    .iter()
                    .map(|c| c.key.len() + if let CompareTarget::Value(v) = &c.target { v.len() } else { 0 })
                    .sum();
                let ops: usize = success
                    .iter()
                    .chain(failure)
                    .map(|op| match op {
                        TxnOp::Put { key, value } => key.len() + value.len(),
                        TxnOp::Delete { key } | TxnOp::Get { key } => key.len(),
                    })
                    .sum();
                compared + ops
            }
            WriteCommand::KvTxn { txn, .. } => txn.bytes(),
        }
    }

    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            WriteCommand::Put { key, .. }
            | WriteCommand::Delete { key }
            | WriteCommand::Cas { key, .. }
            | WriteCommand::PutLease { key, .. } => {
                vec![key.as_slice()]
            }
            WriteCommand::Batch { ops } => ops.iter().map(BatchOp::key).collect(),
            WriteCommand::DeletePrefix { .. }
            | WriteCommand::LeaseGrant { .. }
            | WriteCommand::LeaseRevoke { .. }
            | WriteCommand::LeaseDrop { .. }
            | WriteCommand::LeaseForget { .. } => Vec::new(),
            WriteCommand::Txn { compares, success, failure } => {
                compares.iter().map(|c| c.key.as_slice()).chain(success.iter().chain(failure).map(TxnOp::key)).collect()
            }
            // Its single keys; its ranges cover this shard's keys in them (it is sent to each
            // shard a range may reach as a shard write).
            WriteCommand::KvTxn { txn, .. } => {
                txn.spans().into_iter().filter(|(_, end)| end.is_none()).map(|(key, _)| key).collect()
            }
        }
    }

    /// The lease whose home shard this command goes to (grants, revocations and their
    /// completion name a lease, not a key).
    pub fn lease_home(&self) -> Option<u64> {
        match self {
            WriteCommand::LeaseGrant { id, .. }
            | WriteCommand::LeaseRevoke { id }
            | WriteCommand::LeaseForget { id } => Some(*id),
            _ => None,
        }
    }
}

/// How a txn compare relates a key's current field to its target (etcd's `CompareResult`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

impl CompareOp {
    /// Whether `current op target` holds.
    pub fn holds<T: Ord + ?Sized>(self, current: &T, target: &T) -> bool {
        let order = current.cmp(target);
        match self {
            CompareOp::Equal => order.is_eq(),
            CompareOp::NotEqual => order.is_ne(),
            CompareOp::Less => order.is_lt(),
            CompareOp::Greater => order.is_gt(),
        }
    }
}

/// Which field of a key a txn compare reads, and the target it is compared with. etcd v3
/// semantics: a missing key has version, create revision and mod revision 0; a value compare on
/// a missing key fails whatever its operator (even `NotEqual`). Values compare as bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Version(u64),
    CreateRevision(Revision),
    ModRevision(Revision),
}

/// One condition of a txn: `key`'s field `op` target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    /// `key`'s value `op` `value` (fails if `key` is missing).
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::Value(value.into()) }
    }

    /// `key`'s version `op` `version` (0 if `key` is missing).
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: u64) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::Version(version) }
    }

    /// `key`'s create revision `op` `revision` (0 if `key` is missing).
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: Revision) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::CreateRevision(revision) }
    }

    /// `key`'s mod revision `op` `revision` (0 if `key` is missing).
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: Revision) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::ModRevision(revision) }
    }

    /// Whether the compare holds for the key's current state (`None`: missing).
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        match (&self.target, current) {
            (CompareTarget::Value(_), None) => false,
            (CompareTarget::Value(v), Some(kv)) => self.op.holds(kv.value.as_slice(), v.as_slice()),
            (CompareTarget::Version(v), kv) => self.op.holds(&kv.map_or(0, |kv| kv.version), v),
            (CompareTarget::CreateRevision(r), kv) => self.op.holds(&kv.map_or(0, |kv| kv.create_revision), r),
            (CompareTarget::ModRevision(r), kv) => self.op.holds(&kv.map_or(0, |kv| kv.mod_revision), r),
        }
    }
}

/// One operation of a txn branch. Ops run in order, each seeing the ones before it; every
/// write of a txn gets the txn's revision (a key put twice counts two writes, as in a batch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

impl TxnOp {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        TxnOp::Put { key: key.into(), value: value.into() }
    }

    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Delete { key: key.into() }
    }

    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Get { key: key.into() }
    }

    pub fn key(&self) -> &[u8] {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } | TxnOp::Get { key } => key,
        }
    }
}

/// The result of one [`TxnOp`] of the branch a txn ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOpResult {
    /// The put's revision (the txn's).
    Put { revision: Revision },
    /// Whether the key existed.
    Delete { deleted: bool },
    /// The key as the txn saw it at that point (`None`: missing).
    Get(Option<KeyValue>),
}

/// What a txn did, as [`crate::client::AspenClient::txn`] returns it (the fields of
/// [`WriteOutcome::Txn`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// The txn's revision (its entry's log index, of the keys' shard), whichever branch ran.
    pub revision: Revision,
    /// Whether every compare held (`success` ran) or not (`failure` ran).
    pub succeeded: bool,
    /// One result per op of the branch that ran, in order.
    pub results: Vec<TxnOpResult>,
}

/// A client's session for exactly-once writes: a random id and a sequence number that grows by
/// one with every new write of that session. A session has at most one write in flight.
///
/// Sequence numbers above [`STRICT_SEQ_BASE`] are numbered per shard (`STRICT_SEQ_BASE + 1` is a
/// session's first write to its shard): a shard that does not know such a session refuses any
/// later number with [`WriteOutcome::UnknownSession`] — it forgot the session, and applying a
/// retry could apply a write twice. Smaller numbers (clients of protocol version 1, and every
/// entry of logs written before) keep the old rule — an unknown session's write is applied —
/// so that replaying an old log gives the same state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteSession {
    pub client_id: Id128,
    pub seq: u64,
}

/// Where the sequence numbers of per-shard sessions start (see [`WriteSession`]).
pub const STRICT_SEQ_BASE: u64 = 1 << 62;

/// The outcome of a write, as stored for deduplication and returned to the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteOutcome {
    Put {
        revision: Revision,
    },
    Delete {
        revision: Revision,
        /// Whether the key existed.
        deleted: bool,
    },
    Cas {
        revision: Revision,
        succeeded: bool,
        /// On failure: the key's current value (`None` if absent).
        #[serde(with = "serde_bytes")]
        current: Option<Vec<u8>>,
    },
    Batch {
        revision: Revision,
    },
    /// The session's sequence number is older than the last one applied: the outcome of that
    /// write is no longer known (the client moved on, or the session expired).
    StaleSequence {
        last_seq: u64,
    },
    // New variants go at the END (outcomes are stored postcard-encoded in session records).
    /// Keys deleted by a [`WriteCommand::DeletePrefix`]. Summed over shards when it fanned out;
    /// `revision` is then the highest of the shards' revisions (revisions are per shard).
    DeletePrefix {
        revision: Revision,
        deleted: u64,
    },
    /// What a [`WriteCommand::Txn`] did (see [`TxnResponse`]).
    Txn {
        revision: Revision,
        succeeded: bool,
        results: Vec<TxnOpResult>,
    },
    /// Not applied: the shard does not know the session, and `seq` is past a session's first
    /// write there. The session was forgotten (idle over an hour, or pushed out); if this is a
    /// retry, the write may have been applied before — its outcome is unknown. Never recorded.
    UnknownSession {
        seq: u64,
    },
    /// [`WriteCommand::LeaseGrant`] granted the lease.
    LeaseGranted {
        revision: Revision,
        id: u64,
        ttl_secs: u64,
    },
    /// [`WriteCommand::LeaseGrant`]: the id is taken (or was revoked within the last hour).
    LeaseExists {
        id: u64,
    },
    /// The lease does not exist (never granted, expired or revoked): a put with it or a revoke
    /// of it did nothing.
    LeaseNotFound {
        id: u64,
    },
    /// Not applied, never recorded: this shard knows nothing of the put's lease; the node that
    /// sent it asks the lease's home shard and resends the put `checked`.
    LeaseUnchecked {
        id: u64,
    },
    /// A lease revocation's part on one shard: `deleted` keys went.
    LeaseRevoked {
        revision: Revision,
        deleted: u64,
    },
    /// [`WriteCommand::KvTxn`]: which branch ran and what each of its ops did. `revision`: the
    /// txn's (every key it wrote has it), or the shard's revision after it if it wrote nothing.
    KvTxn {
        revision: Revision,
        succeeded: bool,
        results: Vec<KvOpResult>,
    },
    /// A [`KvPut`] that keeps the current value or lease names a missing key: nothing applied.
    KeyNotFound {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

/// Where a client wants its read served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ReadConsistency {
    /// Confirmed with a quorum (ReadIndex) on the shard leader. The default.
    #[default]
    Linearizable,
    /// Served from the local state machine of whichever node answers; may be behind.
    Stale,
}

/// A scan request: keys in `[start, end)` (or with `prefix`), at most `limit` of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRequest {
    /// Only keys starting with this prefix (empty: all keys).
    #[serde(with = "serde_bytes")]
    pub prefix: Vec<u8>,
    /// Inclusive lower bound (after the prefix is applied); `None`: from the start of the prefix.
    #[serde(with = "serde_bytes")]
    pub start: Option<Vec<u8>>,
    /// Exclusive upper bound; `None`: to the end of the prefix.
    #[serde(with = "serde_bytes")]
    pub end: Option<Vec<u8>>,
    pub limit: u32,
    /// Continuation token from a previous page (the last key returned); scanning resumes after it.
    #[serde(with = "serde_bytes")]
    pub continuation: Option<Vec<u8>>,
    pub consistency: ReadConsistency,
}

/// One page of a scan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanPage {
    pub entries: Vec<KeyValue>,
    /// `Some(token)` when more keys may follow; pass it back as `continuation`.
    #[serde(with = "serde_bytes")]
    pub continuation: Option<Vec<u8>>,
}

/// A shard as reported by `cluster status`. Ids are node ids (not shard-aware Raft ids).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub shard: ShardId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub last_applied: u64,
    pub last_log_index: u64,
    /// This node's role in the shard: Leader, Follower, Candidate, Learner or Shutdown.
    pub role: String,
    pub health: ShardHealth,
    /// A digest of this node's replica of the shard, at the index it was read at (`None`: the
    /// state machine could not be read). Replicas at the same `applied_index` must have equal
    /// digests.
    pub digest: Option<StateDigest>,
}

/// A digest of one replica's state machine (keys with their revisions, client sessions, the
/// replicated clock and the last membership) at one applied log index. Defined in
/// `storage::state_machine`; independent of the storage layout, so equal on every replica that
/// applied the same log, whether entry by entry or through a snapshot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StateDigest {
    /// Index of the last applied log entry the digest describes (0: nothing applied yet).
    pub applied_index: u64,
    pub digest: [u8; 32],
}

impl StateDigest {
    /// The digest as 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.digest)
    }
}

impl fmt::Display for StateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.hex(), self.applied_index)
    }
}

impl fmt::Debug for StateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How one shard is doing on one node (see `cluster::supervisor`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardHealth {
    pub healthy: bool,
    pub leader_known: bool,
    /// Leader: ms since a quorum last acknowledged it. Follower: ms since the leader's last
    /// AppendEntries (heartbeat) arrived. `None`: never.
    pub heartbeat_age_ms: Option<u64>,
    /// Log entries stored here but not yet applied to the state machine.
    pub apply_lag: u64,
    /// Why the shard is unhealthy (empty when healthy).
    pub reason: String,
}

/// One node's own view of its shards (answer to [`ClientRequest::NodeStatus`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: NodeId,
    pub shards: Vec<ShardStatus>,
}

/// A member as seen from the node that answered `cluster status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node_id: NodeId,
    /// `None`: the node could not be reached; `error` says why.
    pub status: Option<NodeStatus>,
    pub error: Option<String>,
}

/// What `cluster status` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    pub cluster_id: ClusterId,
    pub cluster_name: String,
    /// The answering node's view of every shard it hosts.
    pub shards: Vec<ShardStatus>,
    /// Every member's own view (including the answering node), in node id order.
    pub nodes: Vec<NodeReport>,
}

/// A fresh node asking a cluster to add it (sent by `aspen-node --join`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The cluster the joiner expects (from its ticket).
    pub cluster_id: ClusterId,
    pub cluster_name: String,
    pub node_id: NodeId,
    pub endpoint_id: [u8; 32],
    pub addrs: Vec<std::net::SocketAddr>,
    pub num_shards: u32,
    /// The shards the joining node hosts (it is added to these only).
    pub local_shards: Vec<ShardId>,
    /// A join token of this cluster (`aspen-cli cluster join-token`).
    pub join_token: String,
}

/// How to reach a member (endpoint id + direct addresses), as carried in membership changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAddr {
    pub endpoint_id: [u8; 32],
    pub addrs: Vec<std::net::SocketAddr>,
}

/// One membership change of one shard (sent to that shard's leader by the node coordinating a
/// join, add-learner, promote or remove).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add as learner and wait until it caught up; refresh its address if it is a member already.
    AddLearner { node_id: NodeId, member: MemberAddr },
    /// Make a learner a voter (no-op for a voter).
    AddVoter { node_id: NodeId },
    /// Remove from voters (if a voter), then from the membership.
    Remove { node_id: NodeId },
}

/// The identity of a cluster, handed to a node that becomes a member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: ClusterId,
    pub cluster_name: String,
    pub num_shards: u32,
}

/// A request on the client ALPN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        consistency: ReadConsistency,
    },
    Write {
        session: WriteSession,
        command: WriteCommand,
    },
    Scan(ScanRequest),
    /// Every member's view of the cluster (fans out to the members).
    ClusterStatus,
    /// This node's own view only.
    NodeStatus,
    /// Tickets of every member (for client failover).
    Members,
    /// Initialize a one-node cluster on a node started with `--no-init`.
    ClusterInit,
    /// Add the node behind this ticket as a learner (it must run, fresh or already ours).
    AddLearner {
        ticket: String,
    },
    /// Make a learner a voter.
    Promote {
        node_id: NodeId,
    },
    /// Remove a voter or learner from the cluster.
    Remove {
        node_id: NodeId,
    },
    /// A fresh node asks to join: added as learner, caught up, promoted to voter.
    Join(JoinRequest),
    /// Sent by a leader to a fresh node before adding it: adopt this cluster's identity.
    AcceptMembership(ClusterInfo),
    /// One page of a scan of one shard (a node merging a scan over all shards sends these).
    ShardScan {
        shard: ShardId,
        scan: ScanRequest,
    },
    /// A membership change of one shard, for that shard's leader.
    ShardMembership {
        shard: ShardId,
        change: MembershipChange,
    },
    /// Move the leadership of one shard to a voter (retried until it holds or times out).
    MoveLeader {
        shard: ShardId,
        node_id: NodeId,
    },
    /// One attempt of a leadership move, run on the shard's current leader.
    MoveLeaderAttempt {
        shard: ShardId,
        node_id: NodeId,
    },
    /// Sent by a shard leader handing over: start an election for this shard now.
    TriggerElect {
        shard: ShardId,
    },
    /// Spread shard leaders evenly over the voters.
    BalanceLeaders,
    /// Several gets and writes forwarded together by another node (see `sharding::forward`):
    /// each is answered as if sent alone, in order, in one [`ClientResponse::Forwarded`].
    Forwarded {
        requests: Vec<ForwardedRequest>,
    },
    // New variants go at the END (older peers then answer a decode error, not a wrong request).
    /// A write for one shard, named explicitly: a node fanning a [`WriteCommand::DeletePrefix`]
    /// out over every shard sends one per shard. Any keys the command names must fall into
    /// `shard`.
    ShardWrite {
        shard: ShardId,
        session: WriteSession,
        command: WriteCommand,
    },
    /// Sent by the node that carried out `cluster remove` to the removed node: it is no longer a
    /// member and stops. (A removed node does not learn it from Raft: the leader stops
    /// replicating to it as soon as it appends the membership without it.)
    Departed {
        node_id: NodeId,
    },
    /// [`ClientRequest::AddLearner`] of a node started with `--no-init`: it joins only with the
    /// claim token it wrote to its data dir (`claim.token`).
    AddLearnerClaimed {
        ticket: String,
        claim_token: String,
    },
    /// [`ClientRequest::AcceptMembership`] with the claim token of the node being added.
    ClaimMembership {
        info: ClusterInfo,
        claim_token: String,
    },
    /// [`ClientRequest::ClusterInit`] with the node's claim token (a `--no-init` node initializes
    /// only with it).
    ClusterInitClaimed {
        claim_token: String,
    },
    /// Issue a client token with these permissions, for keys under `prefixes` (empty: any key),
    /// valid for `ttl_secs` (`None`: until revoked). Admin.
    AuthTokenCreate {
        read: bool,
        write: bool,
        admin: bool,
        prefixes: Vec<Vec<u8>>,
        ttl_secs: Option<u64>,
    },
    /// Every issued client token (not the tokens themselves). Admin.
    AuthTokenList,
    /// Revoke a client token by id: refused by every node within 2 s. Admin.
    AuthTokenRevoke {
        id: u64,
    },
    /// Issue a join token valid for `ttl_secs`; `single_use`: it admits one node id. Admin.
    JoinTokenCreate {
        ttl_secs: u64,
        single_use: bool,
    },
    /// The number of shards and every member's ticket (what a client needs to route and fail
    /// over; it numbers each session's writes per shard).
    Topology,
    /// Renew lease `id` to its granted TTL. Answered by the leader of the lease's home shard once
    /// it confirmed its leadership (ReadIndex): [`ClientResponse::LeaseKeepAlive`], or
    /// [`ApiError::LeaseNotFound`].
    LeaseKeepAlive {
        id: u64,
    },
    /// The remaining and granted TTL of lease `id` and, with `keys`, its keys in every shard.
    LeaseTimeToLive {
        id: u64,
        keys: bool,
    },
    /// Every lease of the cluster.
    LeaseList,
    /// Node to node: lease `id` as its home shard's leader knows it (no keys).
    LeaseInfo {
        id: u64,
    },
    /// Node to node: the keys of `shard` attached to lease `id` (linearizable).
    ShardLeaseKeys {
        shard: ShardId,
        id: u64,
    },
    /// Node to node: the live leases whose home is `shard` (linearizable).
    ShardLeases {
        shard: ShardId,
    },
    /// Stream the changes of a key or prefix, served by the receiving node from its own applied
    /// state: one [`ClientResponse::WatchCreated`], then [`ClientResponse::WatchEvents`] frames
    /// on the same stream until the client closes it (or an error frame ends it).
    Watch(WatchRequest),
    /// One chunk of a backup of `shard` (admin; `aspen-cli snapshot save`), answered by the
    /// shard's leader with [`ClientResponse::BackupChunk`]. `session` 0 starts one: the leader
    /// confirms its leadership, takes one consistent read of the state (everything acknowledged
    /// before is in it) and answers its first chunk; the chunk at `offset` of that session
    /// follows (the last chunk again, if its answer was lost). A session idle for a minute, or
    /// on a node that lost the leadership, is gone: start the shard over.
    ShardBackup {
        shard: ShardId,
        session: u64,
        offset: u64,
    },
    /// The raised alarms (admin; `aspen-cli alarm list`), answered with
    /// [`ClientResponse::Alarms`].
    AlarmList,
    /// Clears every raised alarm (admin; `aspen-cli alarm disarm`); a node whose condition
    /// persists raises its alarm again within seconds. Answered with the alarms cleared.
    AlarmDisarm,
    /// Node to node (the etcd API): a range read of one shard, with counts, limits, revision
    /// filters and the revision it saw. Linearizable on the leader, or `Stale` anywhere.
    ShardRange {
        shard: ShardId,
        query: RangeQuery,
        consistency: ReadConsistency,
    },
    /// Node to node (the etcd API): an etcd-shaped txn that writes nothing (compares and range
    /// reads only, [`KvTxn::is_read_only`]), evaluated on one read of one shard's state like
    /// [`ClientRequest::ShardRange`] instead of going through the log. Answered with
    /// [`ClientResponse::KvTxnRead`].
    ShardTxnRead {
        shard: ShardId,
        txn: KvTxn,
        consistency: ReadConsistency,
    },
    /// Node to node: the address this node serves the etcd API on, if it does (etcd's member
    /// list names every member's client URLs).
    EtcdEndpoint,
    /// Node to node (the etcd API): [`ClientRequest::ShardRange`] at a past revision of the
    /// shard, answered from the state now and the serving node's watch history (`storage::past`):
    /// `Compacted` if that history no longer reaches back to it. Answered with
    /// [`ClientResponse::Range`], whose revision is the state read's.
    ShardRangeAt {
        shard: ShardId,
        query: RangeQuery,
        consistency: ReadConsistency,
        revision: Revision,
    },
    /// Defragment the state machines of node `node_id` (`None`: of the node receiving it), one
    /// shard after another (admin; `aspen-cli defrag`, etcd's `Maintenance/Defragment`): each
    /// file is rewritten in key order and swapped in; that node's writes to the shard wait
    /// meanwhile (docs/design.md §6.6). Answered with [`ClientResponse::Defragmented`].
    Defragment {
        node_id: Option<NodeId>,
    },
}

/// What a defragmentation did on one node ([`ClientRequest::Defragment`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefragReport {
    pub node_id: NodeId,
    pub shards: Vec<ShardDefrag>,
}

/// One shard's state machine file, before and after its defragmentation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDefrag {
    pub shard: ShardId,
    pub before_bytes: u64,
    pub after_bytes: u64,
    /// Keys copied.
    pub keys: u64,
    /// How long the shard's writes on that node waited.
    pub millis: u64,
}

/// A raised alarm (recorded in shard 0, so every node refuses what it forbids).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmInfo {
    /// The node whose condition raised it.
    pub node_id: NodeId,
    /// `NOSPACE`.
    pub alarm: String,
    /// What the node saw (stored bytes over the quota, free disk space under the reserve).
    pub reason: String,
    /// When (ms since the Unix epoch).
    pub raised_unix_ms: u64,
}

/// One chunk of a shard's backup stream ([`ClientRequest::ShardBackup`]): the shard's
/// snapshot stream (docs/design.md §6.4) at `index`, from `offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupChunk {
    pub shard: ShardId,
    pub session: u64,
    /// The applied index the backup is of, and its entry's term and leader (Raft id).
    pub index: u64,
    pub term: u64,
    pub leader_raft_id: u64,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// The last chunk: the stream ends after it.
    pub done: bool,
    /// With the last chunk: the digest of the shard's data at `index` (keys outside the
    /// reserved keyspace, leases, lease tombstones; `StateReader::data_digest`).
    pub data_digest: Option<[u8; 32]>,
}

/// Permissions as operators write them: `read,write,admin` (those that are set).
pub fn permission_names(read: bool, write: bool, admin: bool) -> String {
    let names: Vec<&str> =
        [(read, "read"), (write, "write"), (admin, "admin")].iter().filter(|p| p.0).map(|p| p.1).collect();
    names.join(",")
}

/// An issued token as `auth token list` shows it (never the token itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Printed as 16 hex digits.
    pub id: u64,
    /// `client` or `join`.
    pub kind: String,
    pub read: bool,
    pub write: bool,
    pub admin: bool,
    pub prefixes: Vec<Vec<u8>>,
    /// The member that issued it.
    pub issuer: NodeId,
    /// Seconds since the Unix epoch.
    pub issued_at: u64,
    pub expires_at: Option<u64>,
    pub revoked: bool,
    /// A node's own `admin.token`, or `auth token create`'s note.
    pub note: String,
}

/// A request that can travel in a [`ClientRequest::Forwarded`] batch. Its own type (not a
/// `ClientRequest`) so that batches cannot nest: a decoder never recurses on input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardedRequest {
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        consistency: ReadConsistency,
    },
    Write {
        session: WriteSession,
        command: WriteCommand,
    },
    /// A range read of one key (the etcd API's gets; a key range's answer may be large).
    ShardRange {
        shard: ShardId,
        query: RangeQuery,
        consistency: ReadConsistency,
    },
    /// A put, a delete or an etcd-shaped txn of single keys, for a named shard (the etcd API's
    /// writes of keys).
    ShardWrite {
        shard: ShardId,
        session: WriteSession,
        command: WriteCommand,
    },
}

impl ForwardedRequest {
    /// The batchable form of `request`, if it is a get or a write (or the etcd API's range read
    /// or txn of single keys: their answers stay small).
    pub fn of(request: &ClientRequest) -> Option<Self> {
        match request {
            ClientRequest::Get { key, consistency } => {
                Some(ForwardedRequest::Get { key: key.clone(), consistency: *consistency })
            }
            ClientRequest::Write { session, command } => {
                Some(ForwardedRequest::Write { session: *session, command: command.clone() })
            }
            ClientRequest::ShardRange { shard, query, consistency } if query.range.is_single() => {
                Some(ForwardedRequest::ShardRange { shard: *shard, query: query.clone(), consistency: *consistency })
            }
            ClientRequest::ShardWrite { shard, session, command }
                if match command {
                    WriteCommand::KvTxn { txn, .. } => txn.spans().iter().all(|(_, end)| end.is_none()),
                    WriteCommand::Put { .. } | WriteCommand::Delete { .. } => true,
                    _ => false,
                } =>
            {
                Some(ForwardedRequest::ShardWrite { shard: *shard, session: *session, command: command.clone() })
            }
            _ => None,
        }
    }
}

impl From<ForwardedRequest> for ClientRequest {
    fn from(r: ForwardedRequest) -> Self {
        match r {
            ForwardedRequest::Get { key, consistency } => ClientRequest::Get { key, consistency },
            ForwardedRequest::Write { session, command } => ClientRequest::Write { session, command },
            ForwardedRequest::ShardRange { shard, query, consistency } => {
                ClientRequest::ShardRange { shard, query, consistency }
            }
            ForwardedRequest::ShardWrite { shard, session, command } => {
                ClientRequest::ShardWrite { shard, session, command }
            }
        }
    }
}

/// The answer to one [`ForwardedRequest`].
pub type ForwardedAnswer = Result<ForwardedResponse, ApiError>;

/// A successful answer to one [`ForwardedRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardedResponse {
    Get(Option<KeyValue>),
    Write(WriteOutcome),
    Range(RangePage),
}

impl ForwardedResponse {
    /// The answer of a get or a write in batch form; any other answer is an internal error.
    pub fn of(result: ClientResult) -> ForwardedAnswer {
        match result? {
            ClientResponse::Get(kv) => Ok(ForwardedResponse::Get(kv)),
            ClientResponse::Write(outcome) => Ok(ForwardedResponse::Write(outcome)),
            ClientResponse::Range(page) => Ok(ForwardedResponse::Range(page)),
            other => Err(ApiError::Internal(format!("a forwarded get or write was answered with {other:?}"))),
        }
    }
}

impl From<ForwardedResponse> for ClientResponse {
    fn from(r: ForwardedResponse) -> Self {
        match r {
            ForwardedResponse::Get(kv) => ClientResponse::Get(kv),
            ForwardedResponse::Write(outcome) => ClientResponse::Write(outcome),
            ForwardedResponse::Range(page) => ClientResponse::Range(page),
        }
    }
}

impl ClientRequest {
    /// Whether answering needs the cluster's data (reads, writes, scans): a node that has not
    /// initialized or joined a cluster refuses these with [`ApiError::NotInitialized`].
    pub fn needs_data(&self) -> bool {
        matches!(
            self,
            ClientRequest::Get { .. }
                | ClientRequest::Write { .. }
                | ClientRequest::ShardWrite { .. }
                | ClientRequest::Scan(_)
                | ClientRequest::ShardScan { .. }
                | ClientRequest::LeaseKeepAlive { .. }
                | ClientRequest::LeaseTimeToLive { .. }
                | ClientRequest::LeaseList
                | ClientRequest::LeaseInfo { .. }
                | ClientRequest::ShardLeaseKeys { .. }
                | ClientRequest::ShardLeases { .. }
                | ClientRequest::Watch(_)
                | ClientRequest::ShardBackup { .. }
                | ClientRequest::AlarmList
                | ClientRequest::AlarmDisarm
                | ClientRequest::Defragment { .. }
                | ClientRequest::ShardRange { .. }
                | ClientRequest::ShardRangeAt { .. }
                | ClientRequest::ShardTxnRead { .. }
        )
    }

    /// Whether only another node sends this request (on [`PEER_ALPN`]): the client ALPN refuses
    /// it, so that a client cannot skip the checks its own requests get (routing, the key's
    /// shard, the leader's hand-over) or act as a member.
    pub fn is_node_to_node(&self) -> bool {
        matches!(
            self,
            ClientRequest::ShardScan { .. }
                | ClientRequest::ShardMembership { .. }
                | ClientRequest::ShardWrite { .. }
                | ClientRequest::MoveLeaderAttempt { .. }
                | ClientRequest::TriggerElect { .. }
                | ClientRequest::AcceptMembership(_)
                | ClientRequest::Forwarded { .. }
                | ClientRequest::Departed { .. }
                | ClientRequest::ClaimMembership { .. }
                | ClientRequest::LeaseInfo { .. }
                | ClientRequest::ShardLeaseKeys { .. }
                | ClientRequest::ShardLeases { .. }
                | ClientRequest::ShardRange { .. }
                | ClientRequest::ShardRangeAt { .. }
                | ClientRequest::ShardTxnRead { .. }
                | ClientRequest::EtcdEndpoint
        )
    }

    /// The request's name in metrics (`op` label): a write's command (put, cas, …), else
    /// [`Self::kind`].
    pub fn metric_op(&self) -> &'static str {
        match self {
            ClientRequest::Write { command, .. } | ClientRequest::ShardWrite { command, .. } => match command {
                WriteCommand::Put { .. } => "put",
                WriteCommand::Delete { .. } => "delete",
                WriteCommand::Cas { .. } => "cas",
                WriteCommand::Batch { .. } => "batch",
                WriteCommand::DeletePrefix { .. } => "delete_prefix",
                WriteCommand::Txn { .. } => "txn",
                WriteCommand::LeaseGrant { .. } => "lease_grant",
                WriteCommand::LeaseRevoke { .. } => "lease_revoke",
                WriteCommand::PutLease { .. } => "put_lease",
                WriteCommand::LeaseDrop { .. } => "lease_drop",
                WriteCommand::LeaseForget { .. } => "lease_forget",
                WriteCommand::KvTxn { .. } => "kv_txn",
            },
            other => other.kind(),
        }
    }

    /// The request's name as operators see it in errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientRequest::Get { .. } => "get",
            ClientRequest::Write { .. } => "write",
            ClientRequest::Scan(_) => "scan",
            ClientRequest::ClusterStatus => "cluster status",
            ClientRequest::NodeStatus => "node status",
            ClientRequest::Members => "members",
            ClientRequest::ClusterInit => "cluster init",
            ClientRequest::AddLearner { .. } => "add-learner",
            ClientRequest::Promote { .. } => "promote",
            ClientRequest::Remove { .. } => "remove",
            ClientRequest::Join(_) => "join",
            ClientRequest::AcceptMembership(_) => "accept-membership",
            ClientRequest::ShardScan { .. } => "shard scan",
            ClientRequest::ShardMembership { .. } => "shard membership change",
            ClientRequest::MoveLeader { .. } => "move-leader",
            ClientRequest::MoveLeaderAttempt { .. } => "leader move attempt",
            ClientRequest::TriggerElect { .. } => "election trigger",
            ClientRequest::BalanceLeaders => "balance-leaders",
            ClientRequest::Forwarded { .. } => "forwarded batch",
            ClientRequest::ShardWrite { .. } => "shard write",
            ClientRequest::Departed { .. } => "removal notice",
            ClientRequest::AddLearnerClaimed { .. } => "add-learner",
            ClientRequest::ClaimMembership { .. } => "claim",
            ClientRequest::ClusterInitClaimed { .. } => "cluster init",
            ClientRequest::AuthTokenCreate { .. } => "auth token create",
            ClientRequest::AuthTokenList => "auth token list",
            ClientRequest::AuthTokenRevoke { .. } => "auth token revoke",
            ClientRequest::JoinTokenCreate { .. } => "cluster join-token",
            ClientRequest::Topology => "topology",
            ClientRequest::LeaseKeepAlive { .. } => "lease keepalive",
            ClientRequest::LeaseTimeToLive { .. } => "lease ttl",
            ClientRequest::LeaseList => "lease list",
            ClientRequest::LeaseInfo { .. } => "lease info",
            ClientRequest::ShardLeaseKeys { .. } => "shard lease keys",
            ClientRequest::ShardLeases { .. } => "shard leases",
            ClientRequest::Watch(_) => "watch",
            ClientRequest::ShardBackup { .. } => "snapshot save",
            ClientRequest::AlarmList => "alarm list",
            ClientRequest::AlarmDisarm => "alarm disarm",
            ClientRequest::ShardRange { .. } => "range",
            ClientRequest::ShardRangeAt { .. } => "range at revision",
            ClientRequest::ShardTxnRead { .. } => "txn read",
            ClientRequest::EtcdEndpoint => "etcd endpoint",
            ClientRequest::Defragment { .. } => "defrag",
        }
    }

    /// Whether only the leader can answer this request (the rest are answered locally).
    pub fn needs_leader(&self) -> bool {
        match self {
            ClientRequest::Get { consistency, .. } => *consistency == ReadConsistency::Linearizable,
            ClientRequest::Scan(s) | ClientRequest::ShardScan { scan: s, .. } => {
                s.consistency == ReadConsistency::Linearizable
            }
            ClientRequest::Write { .. }
            | ClientRequest::ShardWrite { .. }
            | ClientRequest::ShardMembership { .. }
            | ClientRequest::MoveLeaderAttempt { .. }
            | ClientRequest::AddLearner { .. }
            | ClientRequest::AddLearnerClaimed { .. }
            | ClientRequest::Promote { .. }
            | ClientRequest::Remove { .. }
            | ClientRequest::Join(_)
            | ClientRequest::LeaseKeepAlive { .. }
            | ClientRequest::LeaseInfo { .. }
            | ClientRequest::ShardLeaseKeys { .. }
            | ClientRequest::ShardLeases { .. }
            | ClientRequest::ShardBackup { .. } => true,
            ClientRequest::ClusterStatus
            | ClientRequest::NodeStatus
            | ClientRequest::Members
            | ClientRequest::ClusterInit
            | ClientRequest::AcceptMembership(_)
            | ClientRequest::MoveLeader { .. }
            | ClientRequest::TriggerElect { .. }
            | ClientRequest::BalanceLeaders
            | ClientRequest::Forwarded { .. }
            | ClientRequest::Departed { .. }
            | ClientRequest::ClaimMembership { .. }
            | ClientRequest::ClusterInitClaimed { .. }
            | ClientRequest::AuthTokenCreate { .. }
            | ClientRequest::AuthTokenList
            | ClientRequest::AuthTokenRevoke { .. }
            | ClientRequest::JoinTokenCreate { .. }
            | ClientRequest::Topology
            | ClientRequest::LeaseTimeToLive { .. }
            | ClientRequest::LeaseList
            | ClientRequest::Watch(_)
            | ClientRequest::AlarmList
            | ClientRequest::AlarmDisarm
            | ClientRequest::Defragment { .. }
            | ClientRequest::EtcdEndpoint => false,
            ClientRequest::ShardRange { consistency, .. }
            | ClientRequest::ShardRangeAt { consistency, .. }
            | ClientRequest::ShardTxnRead { consistency, .. } => *consistency == ReadConsistency::Linearizable,
        }
    }
}

/// The envelope around every client request: protocol version plus the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientEnvelope {
    pub version: u16,
    /// How often this request was forwarded already (a node forwards at most once).
    pub hops: u8,
    pub request: ClientRequest,
    /// The client's token (`None` between members, on the peer ALPN, and to a node that belongs
    /// to no cluster yet).
    pub token: Option<String>,
}

/// A successful answer on the client ALPN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    Get(Option<KeyValue>),
    Write(WriteOutcome),
    Scan(ScanPage),
    ClusterStatus(ClusterStatus),
    NodeStatus(NodeStatus),
    Members(Vec<String>),
    ClusterInit {
        initialized: bool,
    },
    /// Membership changed (add-learner, promote, remove); the shard's view afterwards.
    Membership(ShardStatus),
    Joined(ClusterInfo),
    /// The node adopted the cluster identity; it hosts these shards.
    MembershipAccepted {
        local_shards: Vec<ShardId>,
    },
    /// Leadership after move-leader / balance-leaders: every shard's status on the answering node.
    Leaders(Vec<ShardStatus>),
    ElectionTriggered,
    /// One answer per request of a [`ClientRequest::Forwarded`], in its order.
    Forwarded(Vec<ForwardedAnswer>),
    /// A [`ClientRequest::Departed`] was taken in: the node stops.
    Departing,
    /// A token was issued: what it allows, and the token.
    TokenIssued {
        info: TokenInfo,
        token: String,
    },
    /// [`ClientRequest::AuthTokenList`]: oldest first.
    Tokens(Vec<TokenInfo>),
    /// The token is revoked.
    TokenRevoked {
        id: u64,
    },
    /// [`ClientRequest::Topology`].
    Topology {
        num_shards: u32,
        members: Vec<String>,
    },
    /// [`ClientRequest::LeaseKeepAlive`]: renewed to `ttl_secs`.
    LeaseKeepAlive {
        id: u64,
        ttl_secs: u64,
    },
    /// [`ClientRequest::LeaseTimeToLive`] and [`ClientRequest::LeaseInfo`].
    LeaseStatus(LeaseStatus),
    /// [`ClientRequest::LeaseList`] and [`ClientRequest::ShardLeases`], by id.
    Leases(Vec<LeaseEntry>),
    /// [`ClientRequest::ShardLeaseKeys`], in key order.
    LeaseKeys(Vec<Vec<u8>>),
    /// The watch is in place: it delivers the events after these positions (one per shard).
    WatchCreated {
        positions: Vec<WatchPosition>,
    },
    /// Events of one shard, in order.
    WatchEvents(Vec<WatchEvent>),
    /// Progress of a quiet watch: no event of these shards up to these positions is still to
    /// come, so a resume may start there (a member's history may no longer reach back to the
    /// watch's last event).
    WatchProgress {
        positions: Vec<WatchPosition>,
    },
    /// [`ClientRequest::ShardBackup`].
    BackupChunk(BackupChunk),
    /// [`ClientRequest::AlarmList`] (the raised alarms) and [`ClientRequest::AlarmDisarm`] (the
    /// alarms it cleared).
    Alarms(Vec<AlarmInfo>),
    /// [`ClientRequest::ShardRange`].
    Range(RangePage),
    /// [`ClientRequest::ShardTxnRead`]: the revision of the state read, which branch ran, and
    /// its ops' results.
    KvTxnRead {
        revision: Revision,
        succeeded: bool,
        results: Vec<KvOpResult>,
    },
    /// [`ClientRequest::EtcdEndpoint`]: `ADDR:PORT`, if served (no scheme: see `etcd::server`).
    EtcdEndpoint(Option<String>),
    /// [`ClientRequest::Defragment`].
    Defragmented(DefragReport),
}

/// The typed errors a client can receive. Every variant says what the caller can do next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    /// This node does not lead the shard; `leader` is the node it believes leads, when known.
    #[error("not leader{}", match .leader { Some(l) => format!(" (leader is node {l})"), None => String::new() })]
    NotLeader { leader: Option<NodeId>, leader_ticket: Option<String> },
    /// No leader could be reached within the request timeout.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("{what} too large: {size} bytes (limit {limit})")]
    TooLarge { what: String, size: u64, limit: u64 },
    #[error("unsupported protocol version {got} (this node speaks {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    /// A membership request that must not be retried as is (wrong cluster, duplicate node id…).
    #[error("refused: {0}")]
    Refused(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The node has neither initialized a cluster nor joined one (started with `--no-init`, or
    /// still joining): it holds no data to answer with.
    #[error(
        "node {node_id} is not initialized: run `aspen-cli cluster init` against it, or add it to a \
         cluster (`cluster add-learner`, or restart it with --join TICKET)"
    )]
    NotInitialized { node_id: NodeId },
    /// No token, or one that is malformed, expired, revoked, of another cluster, or whose scope
    /// does not allow the request (the text says which).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The lease does not exist: never granted, expired, or revoked.
    #[error("lease not found: {}", lease::format_lease_id(*.id))]
    LeaseNotFound { id: u64 },
    /// A watch's start lies before the history this node keeps for `shard`.
    #[error(
        "compacted: shard {shard} keeps history from revision {oldest} on; watch from there or a later \
         position"
    )]
    Compacted { shard: ShardId, oldest: u64 },
    /// The watch ended: it fell behind (the client read too slowly), or the node replaced its
    /// state with a snapshot; resume from the last event's position.
    #[error("watch cancelled: {0}")]
    WatchCancelled(String),
    /// A NOSPACE alarm is raised: writes that add data are refused (reads and deletes work)
    /// until space is freed and the alarm disarmed (`aspen-cli alarm disarm`).
    #[error("NOSPACE: {0}")]
    NoSpace(String),
}

impl ApiError {
    /// A stable snake_case name of the error kind (what `aspen-cli --json` prints as `kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::NotLeader { .. } => "not_leader",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Timeout(_) => "timeout",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::UnsupportedVersion { .. } => "unsupported_version",
            ApiError::Refused(_) => "refused",
            ApiError::Internal(_) => "internal",
            ApiError::NotInitialized { .. } => "not_initialized",
            ApiError::PermissionDenied(_) => "permission_denied",
            ApiError::LeaseNotFound { .. } => "lease_not_found",
            ApiError::Compacted { .. } => "compacted",
            ApiError::WatchCancelled(_) => "watch_cancelled",
            ApiError::NoSpace(_) => "no_space",
        }
    }
}

/// The frame a server sends back for each client request.
pub type ClientResult = Result<ClientResponse, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_fields_keep_the_encoding_of_plain_byte_vectors() {
        // Keys and values are (de)serialized as byte strings (`serde_bytes`: one copy, not a
        // visit per byte); postcard writes them exactly as it wrote a `Vec<u8>`, so logs,
        // snapshots and peers of older versions read them unchanged.
        #[derive(Serialize)]
        enum PlainCommand {
            Put { key: Vec<u8>, value: Vec<u8> },
            Delete { key: Vec<u8> },
            Cas { key: Vec<u8>, expected: Option<Vec<u8>>, new_value: Vec<u8> },
        }
        let (key, value) = (b"key".to_vec(), vec![7u8; 300]);
        let pairs = [
            (
                WriteCommand::Put { key: key.clone(), value: value.clone() },
                PlainCommand::Put { key: key.clone(), value: value.clone() },
            ),
            (WriteCommand::Delete { key: key.clone() }, PlainCommand::Delete { key: key.clone() }),
            (
                WriteCommand::Cas { key: key.clone(), expected: Some(value.clone()), new_value: vec![] },
                PlainCommand::Cas { key: key.clone(), expected: Some(value.clone()), new_value: vec![] },
            ),
            (
                WriteCommand::Cas { key: key.clone(), expected: None, new_value: value.clone() },
                PlainCommand::Cas { key: key.clone(), expected: None, new_value: value.clone() },
            ),
        ];
        for (ours, plain) in pairs {
            let bytes = postcard::to_stdvec(&ours).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&plain).unwrap());
            assert_eq!(postcard::from_bytes::<WriteCommand>(&bytes).unwrap(), ours);
        }
    }

    #[test]
    fn new_variants_are_appended_so_older_encodings_keep_their_meaning() {
        // postcard writes an enum variant as its index: logs, snapshots and session records
        // written before these variants existed must decode to the same commands and outcomes.
        let first_byte = |bytes: Vec<u8>| bytes[0];
        let dp = WriteCommand::DeletePrefix { prefix: b"p/".to_vec() };
        let txn = WriteCommand::Txn { compares: vec![], success: vec![], failure: vec![] };
        assert_eq!(first_byte(postcard::to_stdvec(&WriteCommand::Batch { ops: vec![] }).unwrap()), 3);
        assert_eq!(first_byte(postcard::to_stdvec(&dp).unwrap()), 4);
        assert_eq!(first_byte(postcard::to_stdvec(&txn).unwrap()), 5);
        let stale = WriteOutcome::StaleSequence { last_seq: 1 };
        assert_eq!(first_byte(postcard::to_stdvec(&stale).unwrap()), 4);
        let deleted = WriteOutcome::DeletePrefix { revision: 1, deleted: 2 };
        assert_eq!(first_byte(postcard::to_stdvec(&deleted).unwrap()), 5);
        let txn_outcome = WriteOutcome::Txn { revision: 1, succeeded: true, results: vec![] };
        assert_eq!(first_byte(postcard::to_stdvec(&txn_outcome).unwrap()), 6);
        let session = WriteSession { client_id: Id128([1; 16]), seq: 1 };
        let shard_write = ClientRequest::ShardWrite { shard: 2, session, command: dp.clone() };
        let forwarded = ClientRequest::Forwarded { requests: vec![] };
        assert_eq!(
            first_byte(postcard::to_stdvec(&shard_write).unwrap()),
            first_byte(postcard::to_stdvec(&forwarded).unwrap()) + 1
        );
        // A compare's value is a byte string like every other key and value.
        let c = Compare::value("k", CompareOp::Less, vec![7u8; 300]);
        let bytes = postcard::to_stdvec(&c).unwrap();
        assert_eq!(postcard::from_bytes::<Compare>(&bytes).unwrap(), c);
        for w in [dp, txn] {
            assert_eq!(postcard::from_bytes::<WriteCommand>(&postcard::to_stdvec(&w).unwrap()).unwrap(), w);
        }
    }

    #[test]
    fn compares_on_missing_keys_follow_etcd() {
        let kv = KeyValue { key: b"k".to_vec(), value: b"m".to_vec(), create_revision: 3, mod_revision: 5, version: 2 };
        for op in [CompareOp::Equal, CompareOp::NotEqual, CompareOp::Less, CompareOp::Greater] {
            assert!(!Compare::value("k", op, "").holds(None), "{op:?}: a value compare on a missing key fails");
        }
        assert!(Compare::version("k", CompareOp::Equal, 0).holds(None));
        assert!(Compare::create_revision("k", CompareOp::Less, 1).holds(None));
        assert!(!Compare::mod_revision("k", CompareOp::Greater, 0).holds(None));
        assert!(Compare::value("k", CompareOp::Greater, "l").holds(Some(&kv)));
        assert!(Compare::value("k", CompareOp::Less, "mm").holds(Some(&kv)), "bytes compare lexicographically");
        assert!(Compare::version("k", CompareOp::NotEqual, 1).holds(Some(&kv)));
        assert!(Compare::create_revision("k", CompareOp::Equal, 3).holds(Some(&kv)));
        assert!(Compare::mod_revision("k", CompareOp::Less, 6).holds(Some(&kv)));
        let txn = WriteCommand::Txn {
            compares: vec![Compare::version("c", CompareOp::Equal, 0)],
            success: vec![TxnOp::put("s", "v"), TxnOp::get("g")],
            failure: vec![TxnOp::delete("f")],
        };
        assert_eq!(txn.keys(), [&b"c"[..], b"s", b"g", b"f"], "a txn names the keys of both branches");
        assert!(WriteCommand::DeletePrefix { prefix: b"p".to_vec() }.keys().is_empty());
    }

    #[test]
    fn shard_aware_ids_round_trip() {
        assert_eq!(shard_raft_id(0, 7), 7, "shard 0's Raft id is the node id");
        assert_eq!(shard_raft_id(3, 7), (3 << 48) | 7);
        for (shard, node) in [(0, 1), (1, 1), (255, MAX_NODE_ID), (65535, 42)] {
            assert_eq!(split_raft_id(shard_raft_id(shard, node)), (shard, node));
        }
    }

    #[test]
    fn shard_prefix_is_u32_big_endian() {
        assert_eq!(encode_shard_prefix(3), [0, 0, 0, 3]);
        assert_eq!(encode_shard_prefix(0x0102_0304), [1, 2, 3, 4]);
        for s in [0, 1, 255, 256, u32::MAX] {
            assert_eq!(decode_shard_prefix(encode_shard_prefix(s)), s);
        }
        assert_eq!(split_shard_prefix(&[0, 0, 1, 2, 9, 9]), Some((258, &[9, 9][..])));
        assert_eq!(split_shard_prefix(&[0, 0, 1, 2]), Some((258, &[][..])));
        assert_eq!(split_shard_prefix(&[0, 0, 1]), None);
    }
}
