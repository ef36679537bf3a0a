//! One shard's Raft group: the openraft type configuration, the redb log store, the redb state
//! machine, the Raft RPC messages and the iroh network factory that carries them, and
//! [`RaftNode`], the handle the rest of the node uses to read and write one shard.
//!
//! This module knows nothing about protocol handlers, sharding or bootstrap; they call into it.

pub mod batcher;
pub mod journal;
pub mod log_store;
pub mod mux;
pub mod network;
pub mod node;
#[cfg(any(test, feature = "fault-injection"))]
pub mod powercut;
pub mod rpc;
pub mod state_machine;

use std::{fmt, io::Cursor, net::SocketAddr};

use serde::{Deserialize, Serialize};

use crate::api::{WriteCommand, WriteOutcome, WriteSession};

pub use log_store::RedbLogStore;
pub use network::{IrohNetworkFactory, PeerBook};
pub use node::RaftNode;
pub use state_machine::RedbStateMachine;

/// One client write plus the leader's clock when it was queued (used to expire idle client
/// sessions deterministically on every replica).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRequest {
    pub session: WriteSession,
    pub command: WriteCommand,
    pub timestamp_ms: u64,
}

impl fmt::Display for WriteRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "write(client={}, seq={})", self.session.client_id, self.session.seq)
    }
}

/// What a Raft log entry carries: the client writes proposed together (see
/// [`batcher`]), applied in order. Writes in one entry never touch the same key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteBatch(pub Vec<WriteRequest>);

impl From<WriteRequest> for WriteBatch {
    fn from(req: WriteRequest) -> Self {
        WriteBatch(vec![req])
    }
}

impl fmt::Display for WriteBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => one.fmt(f),
            many => write!(f, "{} writes", many.len()),
        }
    }
}

/// The state machine's answer for one applied entry: one outcome per write of a
/// [`WriteBatch`], in order; empty for the entries Raft makes itself (blank and membership).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult(pub Vec<WriteOutcome>);

/// Parses an endpoint id, remembering the answer: checking that 32 bytes are a curve point
/// costs tens of microseconds, and a follower resolves its shard leader's address on every
/// request it forwards. The ids seen are the members' (a handful); the memory is dropped if it
/// ever holds more than [`MAX_REMEMBERED_IDS`].
fn parse_endpoint_id(bytes: &[u8; 32]) -> Option<iroh::EndpointId> {
    use std::{collections::HashMap, sync::Mutex};
    static SEEN: Mutex<Option<HashMap<[u8; 32], Option<iroh::EndpointId>>>> = Mutex::new(None);
    if let Some(id) = SEEN.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|seen| seen.get(bytes)) {
        return *id;
    }
    // Parsed outside the lock: other threads' hits need not wait for it.
    let id = iroh::EndpointId::from_bytes(bytes).ok();
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.get_or_insert_with(HashMap::new);
    if seen.len() >= MAX_REMEMBERED_IDS {
        seen.clear();
    }
    seen.insert(*bytes, id);
    id
}

/// See [`parse_endpoint_id`].
const MAX_REMEMBERED_IDS: usize = 1024;

/// A member as recorded in Raft membership: how to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberNode {
    /// iroh endpoint id (32 bytes of ed25519 public key).
    pub endpoint_id: [u8; 32],
    /// Direct socket addresses.
    pub addrs: Vec<SocketAddr>,
}

impl fmt::Display for MemberNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match iroh::EndpointId::from_bytes(&self.endpoint_id) {
            Ok(id) => write!(f, "{}@{:?}", id.fmt_short(), self.addrs),
            Err(_) => write!(f, "<invalid endpoint>@{:?}", self.addrs),
        }
    }
}

impl MemberNode {
    /// The iroh address to dial; `None` if the recorded endpoint id is not a valid key.
    pub fn endpoint_addr(&self) -> Option<iroh::EndpointAddr> {
        let id = parse_endpoint_id(&self.endpoint_id)?;
        Some(iroh::EndpointAddr::from_parts(id, self.addrs.iter().copied().map(iroh::TransportAddr::Ip)))
    }
}

openraft::declare_raft_types!(
    /// openraft type configuration of every Aspen shard.
    pub TypeConfig:
        D = WriteBatch,
        R = ApplyResult,
        NodeId = u64,
        Node = MemberNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Vote = openraft::Vote<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, MemberNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, MemberNode>;
pub type OpenraftStorageError = openraft::StorageError<u64>;

/// Errors of the storage layer (redb and encoding), before they are handed to openraft.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    #[error("encoding: {0}")]
    Codec(#[from] postcard::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage task failed: {0}")]
    Task(String),
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Redb(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<tokio::task::JoinError> for StorageError {
    fn from(e: tokio::task::JoinError) -> Self {
        StorageError::Task(e.to_string())
    }
}

/// Converts a storage error into openraft's, naming what was being done.
pub(crate) fn to_raft_err(
    subject: openraft::ErrorSubject<u64>,
    verb: openraft::ErrorVerb,
    e: impl fmt::Display,
) -> OpenraftStorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}

/// Opens (or creates) a redb database with the settings every Aspen database uses.
pub(crate) fn open_db(path: &std::path::Path) -> Result<redb::Database, StorageError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if !path.try_exists()? {
        create_db_atomically(path)?;
    }
    Ok(redb::Database::builder().create(path)?)
}

/// The name a new database is built under before it is renamed into place.
pub(crate) fn creating_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".creating");
    path.with_file_name(name)
}

/// Creates an empty database at `path` so that a crash leaves either no file or a complete one.
///
/// redb's `create` is not crash-atomic: it makes the file's length durable before the header,
/// so a power cut in between leaves a zero-filled file that every later open refuses ("magic
/// number mismatch") and the node could never start again (found by the power-cut tests,
/// `raft::powercut_tests::a_cut_while_creating_the_stores_leaves_them_openable`). So the database
/// is built under a temporary name, synced, renamed into place, and the directory synced.
fn create_db_atomically(path: &std::path::Path) -> Result<(), StorageError> {
    let tmp = creating_path(path);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    drop(redb::Database::builder().create(&tmp)?);
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Opens (or creates) a redb database over any storage backend, with the same settings as
/// [`open_db`]. Tests use it to put the storage on a simulated disk.
pub(crate) fn open_db_with_backend(backend: impl redb::StorageBackend) -> Result<redb::Database, StorageError> {
    Ok(redb::Database::builder().create_with_backend(backend)?)
}

/// Starts a write transaction of the state machine: quick repair on (a crash never makes a
/// restart walk the whole, possibly large, database), with the given durability.
pub(crate) fn begin_write(
    db: &redb::Database,
    durability: redb::Durability,
) -> Result<redb::WriteTransaction, StorageError> {
    begin(db, durability, true)
}

/// Starts a write transaction of the Raft log: quick repair off. Quick repair saves the
/// allocator state and forces a two-phase commit (two fsyncs) on every commit; without it a
/// durable commit is one fsync (redb's checksummed one-phase commit) and writes fewer pages. The
/// price, a full check of the file when it is opened after a crash, is small for the log: it
/// is purged behind every snapshot.
pub(crate) fn begin_log_write(
    db: &redb::Database,
    durability: redb::Durability,
) -> Result<redb::WriteTransaction, StorageError> {
    begin(db, durability, false)
}

fn begin(
    db: &redb::Database,
    durability: redb::Durability,
    quick_repair: bool,
) -> Result<redb::WriteTransaction, StorageError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability)?;
    txn.set_quick_repair(quick_repair);
    Ok(txn)
}

#[cfg(test)]
mod powercut_tests;
#[cfg(test)]
mod tests;
