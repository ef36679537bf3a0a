//! Snapshot transfer between the nodes of one shard (docs/design.md §6.4), streamed end to end:
//! the leader writes the stream from one read transaction straight into chunks
//! ([`crate::api::raft::SnapshotData::into_chunks`]) while earlier chunks are on the wire, and the
//! follower writes each chunk's records into its staging tables
//! ([`crate::storage::state_machine::IncomingSnapshot`]) while the next chunk arrives. Neither side
//! writes a file or holds more than a few chunks; openraft installs the staged tables at the end.
//!
//! Owns: [`send`] (openraft's `full_snapshot` for Aspen's network: chunks as `InstallSnapshot`
//! RPCs, each retried a few times on a transient error, the transfer given up otherwise, and
//! openraft then starts a new one) and [`SnapshotReceiver`] (one per shard: the transfer in
//! progress, its order and idempotence checks, handing the staged snapshot to openraft).
//! Never: decide when a snapshot is sent (openraft does) or parse the stream (storage does).

use std::{future::Future, sync::Arc, time::Duration};

use openraft::{
    error::{
        Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, ReplicationClosed, SnapshotMismatch,
        StreamingError,
    },
    network::RPCOption,
    raft::{InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse},
    ErrorSubject, ErrorVerb, RaftNetwork, Snapshot, SnapshotSegmentId, StorageIOError,
};
use tokio::sync::{mpsc, Mutex};

use crate::{
    api::{
        raft::{SnapshotData, TypeConfig},
        raft_rpc::{RaftRefusal, RaftResponse},
    },
    raft::{Raft, Vote},
    storage::{
        state_machine::{IncomingSnapshot, StateReader},
        StorageError,
    },
};

/// Chunk size when openraft does not say (it does: `snapshot_max_chunk_size`).
const DEFAULT_CHUNK: usize = 8 << 20;
/// Consecutive transient failures of one chunk before the transfer is given up.
const CHUNK_RETRIES: u32 = 5;
/// Chunks a follower holds while its staging is behind the network.
const STAGE_QUEUE: usize = 1;

/// Sends `snapshot` to `net`'s peer for openraft (`RaftNetwork::full_snapshot`): the stream in
/// chunks as it is written, each answered before the next is sent; stops at once if the peer's
/// vote is higher or `cancel` fires.
pub async fn send<N: RaftNetwork<TypeConfig>>(
    net: &mut N,
    vote: Vote,
    snapshot: Snapshot<TypeConfig>,
    cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
    option: RPCOption,
) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
    let meta = snapshot.meta.clone();
    let read_err = |e: std::io::Error| {
        StreamingError::StorageError(
            StorageIOError::new(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, &e).into(),
        )
    };
    let chunk_bytes = option.snapshot_chunk_size().unwrap_or(DEFAULT_CHUNK);
    let mut chunks = snapshot.snapshot.into_chunks(chunk_bytes).await.map_err(read_err)?;
    let mut cancel = std::pin::pin!(cancel);
    let started = std::time::Instant::now();

    let mut next = tokio::select! {
        closed = &mut cancel => return Err(closed.into()),
        c = chunks.recv() => c,
    };
    let mut offset = 0u64;
    loop {
        let data = match next.take() {
            Some(Ok(data)) => data,
            Some(Err(e)) => return Err(read_err(e)),
            None => return Err(read_err(std::io::Error::other("the snapshot stream ended before its first chunk"))),
        };
        // One chunk ahead: whether this one is the last.
        next = tokio::select! {
            closed = &mut cancel => return Err(closed.into()),
            c = chunks.recv() => c,
        };
        let done = next.is_none();
        let len = data.len() as u64;
        let req = InstallSnapshotRequest { vote, meta: meta.clone(), offset, data, done };
        let mut failures = 0;
        let resp = loop {
            let sent = tokio::select! {
                closed = &mut cancel => return Err(closed.into()),
                r = tokio::time::timeout(option.hard_ttl(), net.install_snapshot(req.clone(), option.clone())) => r,
            };
            let err = match sent {
                Ok(Ok(resp)) => break resp,
                Err(_) => NetworkError::new(&std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("snapshot chunk not answered in {:?}", option.hard_ttl()),
                ))
                .into(),
                Ok(Err(RPCError::Network(e))) => StreamingError::Network(e),
                Ok(Err(RPCError::Timeout(e))) => StreamingError::Timeout(e),
                // Refused (the transfer is over on the peer's side) or down: openraft backs off
                // and starts a new transfer.
                Ok(Err(RPCError::Unreachable(e))) => return Err(StreamingError::Unreachable(e)),
                Ok(Err(RPCError::PayloadTooLarge(e))) => {
                    return Err(NetworkError::new(&std::io::Error::other(e.to_string())).into())
                }
                Ok(Err(RPCError::RemoteError(e))) => {
                    return Err(match e.source {
                        RaftError::Fatal(f) => StreamingError::RemoteError(openraft::error::RemoteError {
                            target: e.target,
                            target_node: e.target_node,
                            source: f,
                        }),
                        // The peer lost the transfer (it restarted, or another replaced it).
                        RaftError::APIError(api) => NetworkError::new(&api).into(),
                    });
                }
            };
            failures += 1;
            tracing::debug!(offset, failures, "snapshot chunk not answered: {err}");
            if failures >= CHUNK_RETRIES {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(10 << failures.min(4))).await;
        };
        if resp.vote > vote {
            return Ok(SnapshotResponse::new(resp.vote));
        }
        offset += len;
        if done {
            tracing::info!(
                snapshot = %meta.snapshot_id,
                bytes = offset,
                secs = started.elapsed().as_secs_f64(),
                "snapshot sent and installed by the peer"
            );
            return Ok(SnapshotResponse::new(resp.vote));
        }
    }
}

/// The transfer a follower's shard is receiving.
struct Transfer {
    vote: Vote,
    snapshot_id: String,
    /// The next offset expected, and the last chunk staged (offset, length), so that a chunk
    /// resent because its answer was lost is answered again rather than refused.
    next_offset: u64,
    last_chunk: (u64, u64),
    queue: mpsc::Sender<Vec<u8>>,
    /// Stages the queued chunks; ends with the transfer number once the queue closes and the
    /// stream is whole.
    worker: tokio::task::JoinHandle<Result<u64, StorageError>>,
    abort: Arc<std::sync::atomic::AtomicBool>,
    started: std::time::Instant,
}

impl Transfer {
    /// Stops staging (at most the chunk being staged finishes) and waits for the worker, so that
    /// nothing more is written into the staging tables.
    async fn abort(self) {
        self.abort.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(self.queue);
        let _ = self.worker.await;
    }

    /// The worker's error, once it has stopped early.
    async fn failure(&mut self) -> Option<String> {
        if !self.worker.is_finished() {
            return None;
        }
        match (&mut self.worker).await {
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
            Ok(Ok(_)) => Some("the transfer ended early".into()),
        }
    }
}

/// The last transfer installed: a resent final chunk is answered with its response.
struct Installed {
    snapshot_id: String,
    end: u64,
    vote: Vote,
}

#[derive(Default)]
struct ReceiverState {
    transfer: Option<Transfer>,
    installed: Option<Installed>,
}

/// The receiving side of one shard's snapshot transfers on this node.
#[derive(Clone, Default)]
pub struct SnapshotReceiver {
    state: Arc<Mutex<ReceiverState>>,
}

impl std::fmt::Debug for SnapshotReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReceiver").finish_non_exhaustive()
    }
}

fn mismatch(id: &str, expect: u64, got: u64) -> RaftResponse {
    RaftResponse::InstallSnapshot(Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
        expect: SnapshotSegmentId { id: id.to_string(), offset: expect },
        got: SnapshotSegmentId { id: id.to_string(), offset: got },
    }))))
}

impl SnapshotReceiver {
    /// Handles one chunk for the shard `raft` runs, whose state machine `reader` reads: a chunk at
    /// offset 0 starts a transfer (giving up any other), each later one must continue it, and the
    /// last installs the staged snapshot through openraft. A chunk from a leader older than this
    /// node's vote is answered with the vote and not used. A stream that is not a valid snapshot
    /// ends the transfer with a refusal; the live state never changes before the install.
    pub async fn receive(
        &self,
        raft: &Raft,
        reader: &StateReader,
        req: InstallSnapshotRequest<TypeConfig>,
    ) -> RaftResponse {
        let my_vote = raft.metrics().borrow().vote;
        if req.vote < my_vote {
            return RaftResponse::InstallSnapshot(Ok(InstallSnapshotResponse { vote: my_vote }));
        }
        let mut state = self.state.lock().await;
        let id = req.meta.snapshot_id.clone();
        let len = req.data.len() as u64;
        if req.offset == 0 {
            if let Some(old) = state.transfer.take() {
                old.abort().await;
            }
            if state.installed.as_ref().is_some_and(|i| i.snapshot_id == id && req.done && i.end == len) {
                return RaftResponse::InstallSnapshot(Ok(InstallSnapshotResponse {
                    vote: state.installed.as_ref().expect("checked").vote,
                }));
            }
            let (reader, meta) = (reader.clone(), req.meta.clone());
            let incoming = match tokio::task::spawn_blocking(move || reader.receive_snapshot(meta)).await {
                Ok(Ok(i)) => i,
                Ok(Err(e)) => return refused(&id, &e.to_string()),
                Err(e) => return refused(&id, &e.to_string()),
            };
            tracing::info!(snapshot = %id, "receiving a snapshot");
            state.transfer = Some(start(incoming, req.vote));
        } else if let Some(i) = &state.installed {
            if state.transfer.is_none() && i.snapshot_id == id && req.done && req.offset + len == i.end {
                return RaftResponse::InstallSnapshot(Ok(InstallSnapshotResponse { vote: i.vote }));
            }
        }
        let Some(transfer) = state.transfer.as_mut() else { return mismatch(&id, 0, req.offset) };
        if transfer.snapshot_id != id || transfer.vote != req.vote {
            return mismatch(&id, 0, req.offset);
        }
        if req.offset != transfer.next_offset {
            if (req.offset, len) == transfer.last_chunk && !req.done {
                return RaftResponse::InstallSnapshot(Ok(InstallSnapshotResponse { vote: my_vote }));
            }
            return mismatch(&id, transfer.next_offset, req.offset);
        }
        if let Some(why) = transfer.failure().await {
            state.transfer = None;
            return refused(&id, &why);
        }
        if transfer.queue.send(req.data).await.is_err() {
            let why = transfer.failure().await.unwrap_or_else(|| "staging stopped".into());
            state.transfer = None;
            return refused(&id, &why);
        }
        transfer.last_chunk = (req.offset, len);
        transfer.next_offset += len;
        if !req.done {
            return RaftResponse::InstallSnapshot(Ok(InstallSnapshotResponse { vote: my_vote }));
        }

        let transfer = state.transfer.take().expect("checked above");
        let (end, started) = (transfer.next_offset, transfer.started);
        drop(transfer.queue);
        let staged = match transfer.worker.await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return refused(&id, &e.to_string()),
            Err(e) => return refused(&id, &e.to_string()),
        };
        let staged_secs = started.elapsed().as_secs_f64();
        let snapshot = Snapshot { meta: req.meta.clone(), snapshot: Box::new(SnapshotData::staged(staged)) };
        match raft.install_full_snapshot(req.vote, snapshot).await {
            Ok(resp) => {
                tracing::info!(
                    snapshot = %id,
                    bytes = end,
                    received_secs = staged_secs,
                    secs = started.elapsed().as_secs_f64(),
                    "snapshot received and installed"
                );
                state.installed = Some(Installed { snapshot_id: id, end, vote: resp.vote });
                RaftResponse::InstallSnapshot(Ok(InstallSnapshotResponse { vote: resp.vote }))
            }
            Err(fatal) => RaftResponse::InstallSnapshot(Err(RaftError::Fatal(fatal))),
        }
    }
}

/// Starts the worker that stages `incoming`'s chunks as they are queued.
fn start(mut incoming: IncomingSnapshot, vote: Vote) -> Transfer {
    let (queue, mut chunks) = mpsc::channel::<Vec<u8>>(STAGE_QUEUE);
    let abort = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = abort.clone();
    let snapshot_id = incoming.meta().snapshot_id.clone();
    let worker = tokio::task::spawn_blocking(move || {
        while let Some(chunk) = chunks.blocking_recv() {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StorageError::Task("transfer given up".into()));
            }
            incoming.push(&chunk)?;
        }
        incoming.finish()
    });
    Transfer {
        vote,
        snapshot_id,
        next_offset: 0,
        last_chunk: (u64::MAX, 0),
        queue,
        worker,
        abort,
        started: std::time::Instant::now(),
    }
}

fn refused(id: &str, why: &str) -> RaftResponse {
    tracing::warn!(snapshot = %id, "snapshot transfer given up: {why}");
    RaftResponse::Refused(RaftRefusal::Malformed(format!("snapshot {id}: {why}")))
}
