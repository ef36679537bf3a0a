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

/// Writes a snapshot's whole stream into a sink: run once, on a blocking thread, when the bytes
/// are first needed.
pub type WriteSnapshot = Box<dyn FnOnce(&mut dyn io::Write) -> io::Result<()> + Send>;

/// Opens a new temp file (already unlinked) to hold a snapshot's stream when it is asked for as a
/// file.
pub type OpenTempFile = Box<dyn FnOnce() -> io::Result<std::fs::File> + Send>;

/// A snapshot's bytes (docs/design.md §6.4). A snapshot to send starts as a recipe
/// ([`SnapshotData::lazy`]) that writes the stream from one consistent read of the state machine,
/// so asking for the current snapshot (openraft does at every start, for its metadata only) costs
/// nothing until someone sends it. Aspen's network sends it with [`SnapshotData::into_chunks`]:
/// the stream is written by a blocking thread straight into chunks while earlier chunks are on
/// the wire, never to a file. A snapshot received by Aspen's network is already written into the
/// receiving state machine's staging tables when openraft installs it
/// ([`SnapshotData::staged`]). The async I/O traits (which openraft's own chunked transport and
/// the tests use) see a file: a recipe writes it on first read or seek ([`SnapshotData::file`]
/// for one that exists).
pub struct SnapshotData {
    state: DataState,
    /// A seek asked for before the file existed, started once it does.
    pending_seek: Option<SeekFrom>,
}

enum DataState {
    Lazy {
        write: WriteSnapshot,
        temp: OpenTempFile,
    },
    Making(tokio::task::JoinHandle<io::Result<std::fs::File>>),
    Ready(tokio::fs::File),
    /// Received into the state machine's staging tables, under this transfer number.
    Staged(u64),
    /// Making the file failed; every later call fails too.
    Failed(io::ErrorKind, String),
    /// Only while moving between states.
    Empty,
}

/// The chunks of a snapshot's stream, in order; an error ends it (the sender then gives up this
/// transfer).
pub type SnapshotChunks = tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>;

impl SnapshotData {
    /// A snapshot whose stream `write` writes when the bytes are first needed: into chunks when
    /// sent ([`Self::into_chunks`]), or into a file from `temp` when read as a file.
    pub fn lazy(write: WriteSnapshot, temp: OpenTempFile) -> Self {
        SnapshotData { state: DataState::Lazy { write, temp }, pending_seek: None }
    }

    /// A snapshot held in an open file (read and written from its current position).
    pub fn file(file: std::fs::File) -> Self {
        SnapshotData { state: DataState::Ready(tokio::fs::File::from_std(file)), pending_seek: None }
    }

    /// A snapshot already received into the state machine's staging tables by transfer
    /// `transfer`: installing it moves them in place.
    pub fn staged(transfer: u64) -> Self {
        SnapshotData { state: DataState::Staged(transfer), pending_seek: None }
    }

    /// The transfer number, if this snapshot is one already staged.
    pub fn as_staged(&self) -> Option<u64> {
        match self.state {
            DataState::Staged(t) => Some(t),
            _ => None,
        }
    }

    /// The stream in chunks of `chunk_bytes` (the last may be shorter), produced by a blocking
    /// thread at most two chunks ahead of the reader; dropping the receiver stops it. A recipe's
    /// stream is written straight into the chunks (no file); a file is read from its start.
    pub async fn into_chunks(mut self, chunk_bytes: usize) -> io::Result<SnapshotChunks> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let chunk_bytes = chunk_bytes.max(1);
        match std::mem::replace(&mut self.state, DataState::Empty) {
            DataState::Lazy { write, .. } => {
                tokio::task::spawn_blocking(move || {
                    let mut sink = ChunkSink { buf: Vec::with_capacity(chunk_bytes), chunk_bytes, tx };
                    let written = write(&mut sink).and_then(|()| sink.send_buf());
                    if let Err(e) = written {
                        // Nobody to tell if the reader is gone already.
                        let _ = sink.tx.blocking_send(Err(e));
                    }
                });
            }
            DataState::Staged(_) => return Err(io::Error::other("a snapshot received into staging cannot be sent")),
            other => {
                self.state = other;
                let mut file = self.into_std().await?;
                tokio::task::spawn_blocking(move || {
                    use std::io::{Read, Seek};
                    let read = (|| -> io::Result<()> {
                        file.rewind()?;
                        loop {
                            let mut buf = Vec::with_capacity(chunk_bytes);
                            (&mut file).take(chunk_bytes as u64).read_to_end(&mut buf)?;
                            if buf.is_empty() {
                                return Ok(());
                            }
                            if tx.blocking_send(Ok(buf)).is_err() {
                                return Ok(());
                            }
                        }
                    })();
                    if let Err(e) = read {
                        let _ = tx.blocking_send(Err(e));
                    }
                });
            }
        }
        Ok(rx)
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
                DataState::Lazy { write, temp } => {
                    self.state = DataState::Making(tokio::task::spawn_blocking(move || {
                        use std::io::{Seek, Write};
                        let mut file = temp()?;
                        let mut out = io::BufWriter::with_capacity(1 << 20, &mut file);
                        write(&mut out)?;
                        out.flush()?;
                        drop(out);
                        file.rewind()?;
                        Ok(file)
                    }))
                }
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
                DataState::Staged(t) => {
                    self.state = DataState::Staged(t);
                    return Poll::Ready(Err(io::Error::other("a snapshot received into staging has no file")));
                }
                DataState::Empty => return Poll::Ready(Err(io::Error::other("snapshot data used after it failed"))),
            }
        }
    }
}

impl fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            DataState::Lazy { .. } => "not made yet",
            DataState::Staged(_) => "staged",
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

/// Cuts a stream written into it into chunks for [`SnapshotData::into_chunks`].
struct ChunkSink {
    buf: Vec<u8>,
    chunk_bytes: usize,
    tx: tokio::sync::mpsc::Sender<io::Result<Vec<u8>>>,
}

impl ChunkSink {
    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_bytes));
        self.tx
            .blocking_send(Ok(full))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the snapshot's reader went away"))
    }
}

impl io::Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk_bytes - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk_bytes {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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
