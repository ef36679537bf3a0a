//! Backup and restore, the node's side (docs/operations.md "Backup and restore"; docs/design.md
//! §6.5).
//!
//! Owns: serving [`ClientRequest::ShardBackup`](crate::api::ClientRequest::ShardBackup) on a
//! shard's leader — a session per shard being saved, each holding one consistent read whose
//! snapshot stream a blocking task writes into a small queue of chunks, so a backup holds at
//! most a few chunks in memory whatever the data's size — and [`restore`], which makes a fresh
//! data dir of a backup file: a new one-node cluster (new cluster id; the old cluster's signing
//! key, tokens and revocations left out, so its tokens do not work on the copy) holding every
//! shard's data at the saved index.
//!
//! Never: the backup file's layout (`api::backup`), or writing the file (the client does).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use openraft::storage::RaftLogStorage;

use crate::{
    api::{
        backup::{read_header, verify_body, BackupFileError, BackupHeader},
        raft::{MemberNode, StoredMembership},
        shard_raft_id, ApiError, BackupChunk, ClusterId, ShardId,
    },
    config::NodeConfig,
    raft::node::RaftNode,
    storage::{
        metadata::ClusterIdentity,
        shared_journal::{self, SharedJournal},
        state_machine::backup::{restore_stream, BackupSource},
        MetadataStore, RedbLogStore, StorageError,
    },
    transport::endpoint::load_or_create_key,
};

/// Bytes per chunk answered.
pub const CHUNK_BYTES: usize = 2 << 20;
/// Chunks a session's writer may run ahead of the client.
const QUEUED_CHUNKS: usize = 2;
/// Backups served at once by one node.
const MAX_SESSIONS: usize = 4;
/// A session no chunk was asked of for this long is dropped (its read released).
const IDLE: Duration = Duration::from_secs(60);

/// What a session's writer produces.
enum Piece {
    Bytes(Vec<u8>),
    Done([u8; 32]),
    Failed(String),
}

struct Session {
    shard: ShardId,
    index: u64,
    term: u64,
    leader_raft_id: u64,
    pieces: tokio::sync::mpsc::Receiver<Piece>,
    /// The offset of the next chunk.
    next: u64,
    /// The last chunk answered (sent again if the client asks for its offset again).
    last: Option<BackupChunk>,
    used: Instant,
    /// Whether its stream ended (its read is released; it no longer counts as open).
    finished: bool,
    /// The node's count of open sessions ([`BackupSessions::open`]).
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Session {
    fn finish(&mut self) {
        if !std::mem::replace(&mut self.finished, true) {
            self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The backups this node serves (it leads their shards).
#[derive(Default)]
pub struct BackupSessions {
    sessions: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<Session>>>>,
    /// Sessions whose stream has not ended (a finished one is kept a while only to answer its
    /// last chunk again, and does not count against [`MAX_SESSIONS`]).
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for BackupSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSessions").field("open", &self.lock().len()).finish()
    }
}

impl BackupSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<tokio::sync::Mutex<Session>>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers one chunk request for `shard` (whose local replica is `node`).
    pub async fn chunk(
        &self,
        node: &RaftNode,
        shard: ShardId,
        session: u64,
        offset: u64,
    ) -> Result<BackupChunk, ApiError> {
        self.drop_idle();
        let id = if session == 0 { self.start(node, shard).await? } else { session };
        let Some(s) = self.lock().get(&id).cloned() else {
            // Not here: the leader (which may have changed) holds it, or it is gone.
            if let Some(leader) = node.leader().filter(|l| *l != crate::api::split_raft_id(node.raft_id()).1) {
                return Err(ApiError::NotLeader { leader: Some(leader), leader_ticket: None });
            }
            return Err(ApiError::Refused(format!(
                "backup session {id:016x} of shard {shard} is gone (idle for {} s, or its node restarted or lost the \
                 leadership): save the shard again",
                IDLE.as_secs()
            )));
        };
        let mut s = s.lock().await;
        s.used = Instant::now();
        if s.shard != shard {
            return Err(ApiError::InvalidRequest(format!("backup session {id:016x} is of shard {}", s.shard)));
        }
        if let Some(last) = s.last.as_ref().filter(|l| l.offset == offset) {
            return Ok(last.clone());
        }
        if offset != s.next {
            return Err(ApiError::InvalidRequest(format!(
                "backup session {id:016x} is at offset {}, not {offset}",
                s.next
            )));
        }
        let piece = s.pieces.recv().await.unwrap_or_else(|| Piece::Failed("the backup's writer stopped".into()));
        let (bytes, done, data_digest) = match piece {
            Piece::Bytes(b) => (b, false, None),
            Piece::Done(d) => (Vec::new(), true, Some(d)),
            Piece::Failed(why) => {
                s.finish();
                self.lock().remove(&id);
                return Err(ApiError::Internal(format!("backup of shard {shard}: {why}")));
            }
        };
        let chunk = BackupChunk {
            shard,
            session: id,
            index: s.index,
            term: s.term,
            leader_raft_id: s.leader_raft_id,
            offset,
            done,
            data_digest,
            bytes,
        };
        s.next += chunk.bytes.len() as u64;
        s.last = Some(chunk.clone());
        if done {
            // Kept until idle, so that a lost answer can be asked for again.
            s.finish();
            tracing::info!(shard, index = s.index, bytes = s.next, "backup of shard sent");
        }
        Ok(chunk)
    }

    /// Starts a session: confirms this node leads `shard` (everything acknowledged before is
    /// in the read it takes) and starts writing its stream.
    async fn start(&self, node: &RaftNode, shard: ShardId) -> Result<u64, ApiError> {
        if self.open.load(std::sync::atomic::Ordering::SeqCst) >= MAX_SESSIONS {
            return Err(ApiError::Unavailable(format!(
                "{MAX_SESSIONS} backups are being saved from this node already; retry later"
            )));
        }
        let source = node.begin_backup().await?;
        let last = source
            .last_applied()
            .ok_or_else(|| ApiError::Unavailable(format!("shard {shard} has applied nothing yet")))?;
        let (tx, pieces) = tokio::sync::mpsc::channel(QUEUED_CHUNKS);
        tokio::task::spawn_blocking(move || write_pieces(source, tx));
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 && !self.lock().contains_key(&id) {
                break id;
            }
        };
        let session = Session {
            shard,
            index: last.index,
            term: last.leader_id.term,
            leader_raft_id: last.leader_id.node_id,
            pieces,
            next: 0,
            last: None,
            used: Instant::now(),
            finished: false,
            open: self.open.clone(),
        };
        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.lock().insert(id, Arc::new(tokio::sync::Mutex::new(session)));
        tracing::info!(shard, index = last.index, "backup of shard started");
        Ok(id)
    }

    fn drop_idle(&self) {
        self.lock().retain(|_, s| s.try_lock().map_or(true, |s| s.used.elapsed() < IDLE));
    }
}

/// Writes `source`'s stream as chunks into `tx`, then its data digest (blocking). Stops when
/// the session is dropped (the receiver goes).
fn write_pieces(source: BackupSource, tx: tokio::sync::mpsc::Sender<Piece>) {
    struct Chunks<'a> {
        tx: &'a tokio::sync::mpsc::Sender<Piece>,
        buf: Vec<u8>,
    }
    impl Chunks<'_> {
        fn send(&mut self) -> std::io::Result<()> {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
            self.tx
                .blocking_send(Piece::Bytes(full))
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the backup session ended"))
        }
    }
    impl std::io::Write for Chunks<'_> {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let n = data.len().min(CHUNK_BYTES - self.buf.len());
            self.buf.extend_from_slice(&data[..n]);
            if self.buf.len() == CHUNK_BYTES {
                self.send()?;
            }
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut out = Chunks { tx: &tx, buf: Vec::with_capacity(CHUNK_BYTES) };
    // redb panics on some damaged pages: the session then fails with that (and the hint),
    // rather than with "the backup's writer stopped".
    let written = crate::storage::catch_storage_panic("reading the state machine", || {
        let digest = source.write(&mut out)?;
        if !out.buf.is_empty() {
            out.send()?;
        }
        Ok(digest)
    });
    let last = match written {
        Ok(digest) => Piece::Done(digest),
        Err(e) => {
            if matches!(e, crate::storage::StorageError::Panicked(_)) {
                tracing::error!(error = %e, "a backup's read of the state machine panicked");
            }
            Piece::Failed(format!("{e}{}", e.damage_hint()))
        }
    };
    let _ = tx.blocking_send(last);
}

/// Why a restore was refused or failed (all: exit 2 from `aspen-node restore`).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Backup { path: PathBuf, source: BackupFileError },
    #[error("data dir {0} is not empty: restore makes a new data dir (choose an empty or new one)")]
    NotEmpty(PathBuf),
    #[error(
        "the backup holds {backup} shards, this node is configured for {configured} (set [sharding] num_shards = \
         {backup}, or --sharding-enabled --sharding-num-shards {backup}: a backup restores into as many shards)"
    )]
    NumShards { backup: u32, configured: u32 },
    #[error("a restored node must host every shard; [sharding] local_shards lists only {0:?}")]
    LocalShards(Vec<ShardId>),
    #[error("--bind-addr {0} has port 0: the restored cluster records its member's address, give a fixed port")]
    BindPort(std::net::SocketAddr),
    #[error("shard {shard}: restored data digest {got} differs from the backup's {expected} (the backup is damaged)")]
    Digest { shard: ShardId, expected: String, got: String },
    #[error("shard {shard}: {source}")]
    Storage { shard: ShardId, source: StorageError },
    #[error("{0}")]
    Setup(String),
}

/// What a restore made.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub cluster_id: ClusterId,
    pub header: BackupHeader,
}

/// Makes `config.data_dir` (which must be empty or missing) a new one-node cluster holding the
/// data of the backup at `file`. Checks the whole file (header and body checksums, the number
/// of shards) before it writes anything, and each shard's restored data against the digest the
/// backup recorded. Blocking (run it off the async runtime).
pub fn restore(file: &Path, config: &NodeConfig) -> Result<RestoreReport, RestoreError> {
    let file_err = |source| RestoreError::File { path: file.to_path_buf(), source };
    let backup_err = |source| RestoreError::Backup { path: file.to_path_buf(), source };
    let dir = &config.data_dir;
    if std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false) {
        return Err(RestoreError::NotEmpty(dir.clone()));
    }
    let mut f = std::fs::File::open(file).map_err(file_err)?;
    let (header, body_start) = read_header(&mut std::io::BufReader::new(&mut f)).map_err(backup_err)?;
    let configured = config.sharding.effective_num_shards();
    if header.num_shards != configured {
        return Err(RestoreError::NumShards { backup: header.num_shards, configured });
    }
    let local = config.sharding.local_shard_ids();
    if local.len() != configured as usize {
        return Err(RestoreError::LocalShards(local));
    }
    if config.bind_addr.port() == 0 {
        return Err(RestoreError::BindPort(config.bind_addr));
    }
    f.seek(SeekFrom::Start(body_start)).map_err(file_err)?;
    verify_body(&mut std::io::BufReader::with_capacity(1 << 20, &mut f), &header).map_err(backup_err)?;

    // Built beside it and renamed into place at the end: a restore cut short leaves no data dir
    // that a node would start from.
    let final_dir = dir;
    let name = final_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    let staging = final_dir.with_file_name(format!(".{name}.restoring"));
    match std::fs::remove_dir_all(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(RestoreError::File { path: staging, source }),
    }
    let dir = &staging;
    std::fs::create_dir_all(dir).map_err(file_err)?;
    let setup = |e: &dyn std::fmt::Display| RestoreError::Setup(e.to_string());
    let key = load_or_create_key(dir).map_err(|e| setup(&e))?;
    let me = MemberNode { endpoint_id: *key.public().as_bytes(), addrs: vec![config.bind_addr] };
    let cache = config.storage.cache_split(local.len());
    let journal = SharedJournal::open_file(&dir.join(shared_journal::FILE_NAME)).map_err(|e| setup(&e))?;
    let mut at = body_start;
    for info in &header.shards {
        let shard = info.shard;
        let storage = |source| RestoreError::Storage { shard, source };
        let raft_id = shard_raft_id(shard, config.node_id);
        let shard_dir = dir.join(format!("shard-{shard}"));
        std::fs::create_dir_all(&shard_dir).map_err(file_err)?;
        f.seek(SeekFrom::Start(at)).map_err(file_err)?;
        let mut section = std::io::BufReader::with_capacity(1 << 20, (&mut f).take(info.bytes));
        let membership = |log_id: &crate::api::raft::LogId| {
            let voters = BTreeSet::from([raft_id]);
            let nodes = BTreeMap::from([(raft_id, me.clone())]);
            StoredMembership::new(Some(*log_id), openraft::Membership::new(vec![voters], nodes))
        };
        let restored =
            restore_stream(&shard_dir.join("state-machine.db"), cache.state_machine, &mut section, membership)
                .map_err(storage)?;
        let got = data_encoding::HEXLOWER.encode(&restored.data_digest);
        if got != info.data_digest || restored.last_applied.index != info.index {
            return Err(RestoreError::Digest { shard, expected: info.data_digest.clone(), got });
        }
        // The node's vote starts at the backup's term: its first election is of a later term
        // than every entry it holds.
        let mut log = RedbLogStore::open_shared(
            &shard_dir.join("raft-log.db"),
            &journal,
            shard,
            config.raft.max_append_bytes,
            cache.log,
        )
        .map_err(storage)?;
        let vote = openraft::Vote::new(restored.last_applied.leader_id.term, raft_id);
        futures::executor::block_on(log.save_vote(&vote))
            .map_err(|e| storage(StorageError::Task(format!("save the vote: {e}"))))?;
        at += info.bytes;
    }
    let cluster_id = ClusterId::random();
    let metadata = MetadataStore::open(&dir.join("metadata.db"), cache.metadata).map_err(|e| setup(&e))?;
    metadata
        .set_identity(&ClusterIdentity {
            cluster_id,
            cluster_name: config.cluster_name.clone(),
            node_id: config.node_id,
            num_shards: configured,
        })
        .map_err(|e| setup(&e))?;
    metadata.set_storage_format(crate::storage::metadata::STORAGE_FORMAT).map_err(|e| setup(&e))?;
    drop((metadata, journal));
    crate::storage::sync_dir_of(&dir.join("metadata.db")).map_err(|e| setup(&e))?;
    if final_dir.exists() {
        // Empty (checked above): rename replaces an empty directory.
        std::fs::remove_dir(final_dir).map_err(|source| RestoreError::File { path: final_dir.clone(), source })?;
    }
    std::fs::rename(dir, final_dir).map_err(|source| RestoreError::File { path: final_dir.clone(), source })?;
    crate::storage::sync_dir_of(final_dir).map_err(|e| setup(&e))?;
    Ok(RestoreReport { cluster_id, header })
}
