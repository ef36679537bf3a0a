//! The Raft group's shared types: the openraft type configuration of every shard, what a log
//! entry carries ([`WriteBatch`] of [`WriteRequest`]s), what applying it answers
//! ([`ApplyResult`]) and how a member is recorded ([`MemberNode`]). They are written to disk
//! (log entries, membership) and sent between nodes (Raft RPCs, `super::raft_rpc`), so the
//! storage, transport and Raft layers all speak them.

use std::{
    fmt,
    future::Future,
    io,
    io::SeekFrom,
    net::SocketAddr,
    pin::Pin,
    task::{ready, Context, Poll},
};

use serde::{Deserialize, Serialize};

use super::{WriteCommand, WriteOutcome, WriteSession};

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
        SnapshotData = SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Makes a snapshot's file: run once, on a blocking thread, when the bytes are first needed.
pub type MakeSnapshotFile = Box<dyn FnOnce() -> io::Result<std::fs::File> + Send>;

/// A snapshot's bytes (docs/design.md §6.4): a file, read and written through tokio's async I/O
/// traits as openraft streams it in chunks. A snapshot to send starts as a recipe
/// ([`SnapshotData::lazy`]) that writes the file on first read or seek, so asking for the current
/// snapshot (openraft does at every start, for its metadata only) costs nothing until someone
/// actually sends it, and the writing runs off the state machine's task. A snapshot being
/// received is a file from the start ([`SnapshotData::file`]).
pub struct SnapshotData {
    state: DataState,
    /// A seek asked for before the file existed, started once it does.
    pending_seek: Option<SeekFrom>,
}

enum DataState {
    Lazy(MakeSnapshotFile),
    Making(tokio::task::JoinHandle<io::Result<std::fs::File>>),
    Ready(tokio::fs::File),
    /// Making the file failed; every later call fails too.
    Failed(io::ErrorKind, String),
    /// Only while moving between states.
    Empty,
}

impl SnapshotData {
    /// A snapshot whose file `make` writes when the bytes are first needed.
    pub fn lazy(make: MakeSnapshotFile) -> Self {
        SnapshotData { state: DataState::Lazy(make), pending_seek: None }
    }

    /// A snapshot held in an open file (read and written from its current position).
    pub fn file(file: std::fs::File) -> Self {
        SnapshotData { state: DataState::Ready(tokio::fs::File::from_std(file)), pending_seek: None }
    }

    /// The file, made first if need be, with every write so far flushed to it.
    pub async fn into_std(mut self) -> io::Result<std::fs::File> {
        std::future::poll_fn(|cx| self.poll_file(cx).map_ok(|_| ())).await?;
        match std::mem::replace(&mut self.state, DataState::Empty) {
            DataState::Ready(mut f) => {
                tokio::io::AsyncWriteExt::flush(&mut f).await?;
                Ok(f.into_std().await)
            }
            _ => Err(io::Error::other("snapshot file not ready")),
        }
    }

    /// Drives the recipe until the file exists, then starts a seek asked for before that.
    fn poll_file(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut tokio::fs::File>> {
        loop {
            match std::mem::replace(&mut self.state, DataState::Empty) {
                DataState::Lazy(make) => self.state = DataState::Making(tokio::task::spawn_blocking(make)),
                DataState::Making(mut task) => match Pin::new(&mut task).poll(cx) {
                    Poll::Pending => {
                        self.state = DataState::Making(task);
                        return Poll::Pending;
                    }
                    Poll::Ready(made) => {
                        self.state = match made.map_err(io::Error::other).and_then(|r| r) {
                            Ok(f) => DataState::Ready(tokio::fs::File::from_std(f)),
                            Err(e) => DataState::Failed(e.kind(), e.to_string()),
                        }
                    }
                },
                DataState::Ready(mut f) => {
                    let started = match self.pending_seek.take() {
                        Some(pos) => tokio::io::AsyncSeek::start_seek(Pin::new(&mut f), pos),
                        None => Ok(()),
                    };
                    self.state = DataState::Ready(f);
                    started?;
                    let DataState::Ready(f) = &mut self.state else { unreachable!("set just above") };
                    return Poll::Ready(Ok(f));
                }
                DataState::Failed(kind, msg) => {
                    let err = io::Error::new(kind, format!("making the snapshot file failed: {msg}"));
                    self.state = DataState::Failed(kind, msg);
                    return Poll::Ready(Err(err));
                }
                DataState::Empty => return Poll::Ready(Err(io::Error::other("snapshot data used after it failed"))),
            }
        }
    }
}

impl fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            DataState::Lazy(_) => "not made yet",
            DataState::Making(_) => "being made",
            DataState::Ready(_) => "file",
            DataState::Failed(..) => "failed",
            DataState::Empty => "empty",
        };
        f.debug_struct("SnapshotData").field("state", &state).finish()
    }
}

impl tokio::io::AsyncRead for SnapshotData {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        let f = ready!(self.get_mut().poll_file(cx))?;
        Pin::new(f).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SnapshotData {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let f = ready!(self.get_mut().poll_file(cx))?;
        Pin::new(f).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let f = ready!(self.get_mut().poll_file(cx))?;
        Pin::new(f).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let f = ready!(self.get_mut().poll_file(cx))?;
        Pin::new(f).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        match &mut this.state {
            DataState::Ready(f) => Pin::new(f).start_seek(position),
            // Started once the file exists (`poll_complete` drives it there).
            _ => {
                this.pending_seek = Some(position);
                Ok(())
            }
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let f = ready!(self.get_mut().poll_file(cx))?;
        Pin::new(f).poll_complete(cx)
    }
}

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Vote = openraft::Vote<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, MemberNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, MemberNode>;
pub type OpenraftStorageError = openraft::StorageError<u64>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A member's address comes from its recorded endpoint id, parsed once and then remembered:
    /// the same answer every time, for valid and for invalid ids.
    #[test]
    fn member_addresses_parse_the_same_every_time() {
        let key = iroh::SecretKey::generate().public();
        let member = MemberNode { endpoint_id: *key.as_bytes(), addrs: vec!["127.0.0.1:7600".parse().unwrap()] };
        for _ in 0..3 {
            let addr = member.endpoint_addr().expect("a valid id gives an address");
            assert_eq!(addr.id, key);
            assert_eq!(addr.ip_addrs().copied().collect::<Vec<_>>(), member.addrs);
        }
        let invalid = (0..=255u8)
            .map(|b| [b; 32])
            .find(|bytes| iroh::EndpointId::from_bytes(bytes).is_err())
            .expect("some 32-byte strings are not curve points");
        let bad = MemberNode { endpoint_id: invalid, addrs: member.addrs.clone() };
        for _ in 0..3 {
            assert!(bad.endpoint_addr().is_none(), "an invalid id never gives an address");
        }
    }
}
