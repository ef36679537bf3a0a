//! [`RaftNode`]: one shard on this node — its openraft instance, its storage and the read path.
//!
//! Owns: opening the shard's redb files, the openraft `Config` of the shard, turning client
//! writes into log entries, serving reads (linearizable through `ensure_linearizable`, or stale
//! from local state), and mapping openraft errors onto [`ApiError`]. It never forwards requests
//! to other nodes: callers above it do that with the leader hint in [`ApiError::NotLeader`].

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use openraft::{
    error::{ChangeMembershipError, ClientWriteError, InitializeError, RaftError},
    ChangeMembers, Config, ServerState, SnapshotPolicy,
};

use super::{
    batcher::{forward_to, not_leader, ReadGate, WriteBatcher},
    IrohNetworkFactory,
};
use crate::{
    api::{
        raft::{MemberNode, Raft, WriteRequest},
        split_raft_id, ApiError, KeyValue, LeaseEntry, LeaseStatus, NodeId, ReadConsistency, ScanPage, ScanRequest,
        ShardHealth, ShardId, ShardStatus, StateDigest, WriteCommand, WriteOutcome, WriteSession,
    },
    config::{NodeConfig, RaftConfig},
    metrics::ShardMetrics,
    storage::{
        leases::LeaseDeadlines,
        scan::scan_local,
        shared_journal::SharedJournal,
        space::SpaceGate,
        state_machine::{backup::BackupSource, StateReader},
        watch::WatchHub,
        RedbLogStore, RedbStateMachine, StorageError,
    },
};

/// Why a shard could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RaftNodeError {
    #[error("storage of shard {shard}: {source}")]
    Storage { shard: ShardId, source: StorageError },
    /// One of the shard's files could not be opened (damaged, unreadable, locked).
    #[error("shard {shard}: {}: {source}{}", path.display(), source.damage_hint())]
    Open { shard: ShardId, path: std::path::PathBuf, source: StorageError },
    #[error("raft config of shard {shard}: {message}")]
    Config { shard: ShardId, message: String },
    #[error("raft of shard {shard} failed to start: {message}")]
    Start { shard: ShardId, message: String },
}

/// One shard's Raft group member on this node.
#[derive(Clone)]
pub struct RaftNode {
    shard: ShardId,
    raft_id: u64,
    raft: Raft,
    reader: StateReader,
    /// Concurrent writes share log entries (see [`super::batcher`]).
    writes: WriteBatcher,
    /// Concurrent linearizable reads share ReadIndex rounds.
    reads: ReadGate,
    request_timeout: Duration,
    /// When this node last received AppendEntries for this shard (ms since `epoch`; 0: never).
    leader_contact_ms: Arc<AtomicU64>,
    epoch: Instant,
    /// What this replica knows is committed, sampled once a second (readiness, [`Self::readiness`]).
    commits: Arc<CommitSamples>,
    /// Set while this node hands the shard's leadership to another voter: new writes and
    /// linearizable reads wait (they would send AppendEntries, which renew the followers' leader
    /// lease, and no follower would then vote for the hand-over's target).
    handover: Arc<std::sync::atomic::AtomicBool>,
    /// The session clock this node stamps writes with while it leads: the applied clock when
    /// it became leader of `term`, plus the time its monotonic clock has run since.
    stamp: Arc<std::sync::Mutex<Option<LeaderClock>>>,
    /// When the leases whose home is this shard expire (counted while this node leads).
    deadlines: Arc<LeaseDeadlines>,
    /// This shard's recent events on this node, for watches.
    watch_hub: Arc<WatchHub>,
    /// What this shard records for `GET /metrics` (the rest is read from Raft at scrape time).
    metrics: Arc<ShardMetrics>,
    /// Snapshots when the log grows past its share of `[raft] snapshot_log_bytes`
    /// ([`snapshot_by_size`]).
    size_task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// Ends that task when the last clone of this node is dropped without a shutdown (it holds
    /// a Raft handle and the log, which must not outlive the node).
    _size_stop: Arc<tokio_util::sync::DropGuard>,
    /// Snapshot transfers to this node for this shard.
    snapshots_in: super::snapshot_transfer::SnapshotReceiver,
    /// The log (a reader clone): its size.
    log: RedbLogStore,
    /// Fault injection only: serve linearizable reads from local state without ReadIndex.
    #[cfg(feature = "fault-injection")]
    broken_reads: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode").field("shard", &self.shard).field("raft_id", &self.raft_id).finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How a leader stamps writes with the shard's session clock (§7): from the clock its state
/// machine had applied when it took over, advanced by its own monotonic clock. A leader whose
/// wall clock is far off cannot move the session clock faster than time passes (it would
/// expire every idle session at once); only a cluster's first leader reads its wall clock.
#[derive(Clone, Copy, Debug)]
struct LeaderClock {
    term: u64,
    base_ms: u64,
    since: Instant,
}

impl LeaderClock {
    /// The stamp at `now` in `term`: `applied()` (the applied clock; 0: none yet, then
    /// `wall()`) when the term is new to `slot`, else the term's base plus the time since.
    fn stamp(
        slot: &mut Option<LeaderClock>,
        term: u64,
        applied: impl FnOnce() -> u64,
        wall: impl FnOnce() -> u64,
        now: Instant,
    ) -> u64 {
        match *slot {
            Some(c) if c.term == term => c.base_ms + now.saturating_duration_since(c.since).as_millis() as u64,
            _ => {
                let base_ms = match applied() {
                    0 => wall(),
                    a => a,
                };
                *slot = Some(LeaderClock { term, base_ms, since: now });
                base_ms
            }
        }
    }
}

/// Resumes writes and linearizable reads paused by [`RaftNode::pause_for_handover`] when dropped.
pub(crate) struct HandoverGuard(Arc<std::sync::atomic::AtomicBool>);

impl Drop for HandoverGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Builds the openraft config of one shard from the node's Raft settings.
pub fn openraft_config(cluster_name: &str, shard: ShardId, cfg: &RaftConfig) -> Result<Config, String> {
    let config = Config {
        cluster_name: format!("{cluster_name}-shard-{shard}"),
        heartbeat_interval: cfg.heartbeat_interval_ms,
        election_timeout_min: cfg.election_timeout_min_ms,
        election_timeout_max: cfg.election_timeout_max_ms,
        // Per snapshot chunk; the last one's answer waits for the install, which takes ~15 s per
        // GB of state here (docs/design.md §6.4): a shorter limit made the leader start the
        // whole transfer over while the follower was still installing the first.
        install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS.max(cfg.election_timeout_max_ms * 2),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_threshold),
        max_in_snapshot_log_to_keep: cfg.max_in_snapshot_log_to_keep,
        max_payload_entries: cfg.max_append_entries,
        // Fewer, larger RPCs: each chunk is one request with its own stream and round trip
        // (docs/design.md §6.4); well below the 64 MiB frame limit.
        snapshot_max_chunk_size: 8 * 1024 * 1024,
        ..Default::default()
    };
    config.validate().map_err(|e| e.to_string())
}

/// Where a shard's files are: its directory (`raft-log.db`, `state-machine.db`, snapshots) and
/// the node's journal its new log entries go to.
#[derive(Clone, Copy, Debug)]
pub struct ShardFiles<'a> {
    pub dir: &'a Path,
    pub journal: &'a SharedJournal,
}

impl RaftNode {
    /// Opens the shard stored in `files` and starts its Raft.
    pub async fn open(
        shard: ShardId,
        raft_id: u64,
        files: ShardFiles<'_>,
        node: &NodeConfig,
        network: IrohNetworkFactory,
    ) -> Result<Self, RaftNodeError> {
        let (cluster_name, raft_cfg, watch) = (&node.cluster_name, &node.raft, &node.watch);
        let request_timeout = node.limits.request_timeout();
        let ShardFiles { dir, journal } = files;
        let config = openraft_config(cluster_name, shard, raft_cfg)
            .map_err(|message| RaftNodeError::Config { shard, message })?;
        // The leader's fsync overlaps replication; the state machine and the commit index sent
        // to followers wait for it (see `log_store`).
        // This shard's share of the node's budgets: cache ([storage] cache_bytes), log
        // ([raft] snapshot_log_bytes) and watch history ([watch]).
        let hosted = node.sharding.local_shard_ids().len();
        let cache = node.storage.cache_split(hosted);
        let (history_entries, history_bytes) = watch.history_per_shard(hosted);
        // Database writes wait for room on the disk rather than fail (`storage::space`): a
        // quarter of the reserve stays free (`cluster::alarm` raises NOSPACE at all of it).
        let gate = SpaceGate::new(&node.data_dir, node.storage.reserve_bytes / 4);
        let log_path = dir.join("raft-log.db");
        let log = crate::storage::open_guarded(|| {
            RedbLogStore::open_shared(&log_path, journal, shard, raft_cfg.max_append_bytes, cache.log)
        })
        .map_err(|source| RaftNodeError::Open { shard, path: log_path, source })?
        .overlap_own_appends(raft_id)
        .wait_for_space(gate.clone());
        let metrics = Arc::new(ShardMetrics::default());
        let sm_path = dir.join("state-machine.db");
        let mut sm = crate::storage::open_guarded(|| RedbStateMachine::open(&sm_path, cache.state_machine))
            .map_err(|source| RaftNodeError::Open { shard, path: sm_path.clone(), source })?
            .wait_for_log(log.durable())
            .with_metrics(metrics.clone())
            .wait_for_space(gate);
        let watch_hub =
            crate::storage::open_guarded(|| sm.watch(shard, history_entries, history_bytes, watch.max_lag as usize))
                .map_err(|source| RaftNodeError::Open { shard, path: sm_path, source })?;
        let network = network.cap_commit_at(log.durable());
        let reader = sm.reader();
        let deadlines = sm.deadlines();
        let log_sizes = log.clone();
        // Raft reads the log and the state machine as it starts: redb's panics on a damaged page
        // are caught as in the opens above.
        let raft = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(Raft::new(
            raft_id,
            Arc::new(config),
            network,
            log,
            sm,
        )))
        .await
        .map_err(|panic| RaftNodeError::Open {
            shard,
            path: dir.to_path_buf(),
            source: StorageError::Panicked(format!(
                "starting Raft panicked: {}",
                crate::storage::panic_message(&*panic)
            )),
        })?
        .map_err(|e| RaftNodeError::Start { shard, message: e.to_string() })?;
        let size_stop = tokio_util::sync::CancellationToken::new();
        let commits = Arc::new(CommitSamples::default());
        let size_task = tokio::spawn(snapshot_by_size(
            raft.clone(),
            log_sizes.clone(),
            commits.clone(),
            raft_cfg.log_bytes_per_shard(hosted),
            shard,
            size_stop.clone(),
        ));
        let size_task = Arc::new(std::sync::Mutex::new(Some(size_task)));
        let writes = WriteBatcher::start(raft.clone(), shard, metrics.clone());
        let reads = ReadGate::new(raft.clone(), shard, request_timeout, metrics.clone());
        Ok(RaftNode {
            shard,
            raft_id,
            raft,
            reader,
            writes,
            reads,
            request_timeout,
            leader_contact_ms: Arc::new(AtomicU64::new(0)),
            commits,
            epoch: Instant::now(),
            handover: Default::default(),
            stamp: Default::default(),
            deadlines,
            watch_hub,
            size_task,
            _size_stop: Arc::new(size_stop.drop_guard()),
            snapshots_in: Default::default(),
            log: log_sizes,
            metrics,
            #[cfg(feature = "fault-injection")]
            broken_reads: Default::default(),
        })
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn raft_id(&self) -> u64 {
        self.raft_id
    }

    /// Encoded bytes of the log entries this node holds for the shard.
    pub fn log_bytes(&self) -> u64 {
        self.log.bytes_after(None)
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Initializes a new group with the given members (Raft ids → addresses). Returns `false`
    /// if the group was initialized before (a restart), `true` if this call initialized it.
    pub async fn initialize(&self, members: BTreeMap<u64, MemberNode>) -> Result<bool, ApiError> {
        if self.raft.is_initialized().await.map_err(|e| ApiError::Unavailable(e.to_string()))? {
            return Ok(false);
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(true),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(e) => Err(ApiError::Internal(format!("initialize shard {}: {e}", self.shard))),
        }
    }

    /// The node id (not Raft id) that leads this shard, as this node knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader.map(|id| split_raft_id(id).1)
    }

    /// Resolves once this node believes the shard's leader is no longer `node_id` (a new
    /// election happened, or this node lost track of it).
    pub async fn leader_changed_from(&self, node_id: NodeId) {
        let mut rx = self.raft.metrics();
        loop {
            if rx.borrow_and_update().current_leader.map(|id| split_raft_id(id).1) != Some(node_id) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Holds new writes and linearizable reads of this shard until the guard is dropped (they
    /// wait, then go to whichever node leads by then). Used while handing the leadership over.
    pub(crate) fn pause_for_handover(&self) -> HandoverGuard {
        self.handover.store(true, Ordering::SeqCst);
        HandoverGuard(self.handover.clone())
    }

    fn handing_over(&self) -> bool {
        self.handover.load(Ordering::SeqCst)
    }

    /// Waits until this node, as leader, knows that member `raft_id` holds every entry of its
    /// log, or the deadline passes. Returns whether it did.
    pub(crate) async fn wait_replicated_to(&self, raft_id: u64, deadline: Instant) -> bool {
        self.wait_metrics(deadline, |m| {
            let matched = m.replication.as_ref().and_then(|r| r.get(&raft_id).cloned()).flatten();
            m.last_log_index.is_some() && matched.map(|l| l.index) >= m.last_log_index
        })
        .await
    }

    /// Waits until some leader is known or the deadline passes.
    pub(crate) async fn wait_for_leader(&self, deadline: Instant) -> bool {
        self.wait_metrics(deadline, |m| m.current_leader.is_some()).await
    }

    /// Waits until `holds` is true of this shard's Raft metrics or the deadline passes; returns
    /// whether it held.
    async fn wait_metrics(
        &self,
        deadline: Instant,
        holds: impl Fn(&openraft::RaftMetrics<u64, MemberNode>) -> bool,
    ) -> bool {
        let mut rx = self.raft.metrics();
        loop {
            if holds(&rx.borrow_and_update()) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }

    /// Runs `op` until it succeeds, fails with something other than "no leader yet", or the
    /// request timeout passes. `op` returns `Ok(None)` for "no leader known yet".
    async fn with_leader<T, F, Fut>(&self, mut op: F) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, ApiError>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, op()).await {
                Err(_) => return Err(ApiError::Timeout(self.request_timeout.as_millis() as u64)),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Some(v))) => return Ok(v),
                Ok(Ok(None)) => {
                    if !self.wait_for_leader(deadline).await {
                        return Err(ApiError::Unavailable(format!(
                            "shard {} has no leader after {} ms",
                            self.shard,
                            self.request_timeout.as_millis()
                        )));
                    }
                    // A leader may be known but its view still settling, or a membership change
                    // still committing: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// For answers only the leader's view makes exact: `Ok` if this node leads the shard;
    /// `NotLeader` naming the leader if another node is known to lead it; `Unavailable` if no
    /// leader is known (the caller retries, or its client asks another member).
    pub fn refer_to_leader(&self) -> Result<(), ApiError> {
        self.not_leader()?;
        let m = self.raft.metrics().borrow().clone();
        if m.state == openraft::ServerState::Leader {
            return Ok(());
        }
        Err(ApiError::Unavailable(format!(
            "shard {} has no leader known to node {}",
            self.shard,
            split_raft_id(self.raft_id).1
        )))
    }

    /// `NotLeader` at once when this node follows a known leader: a request for the leader
    /// goes to it without a trip through this node's write queue and Raft core (which would
    /// answer the same). A node that leads, or knows no leader, lets Raft decide.
    fn not_leader(&self) -> Result<(), ApiError> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        match m.current_leader {
            Some(leader) if leader != self.raft_id && m.state != openraft::ServerState::Leader => {
                Err(not_leader(leader))
            }
            _ => Ok(()),
        }
    }

    /// The session clock for a write proposed now (see [`LeaderClock`]).
    fn session_clock(&self) -> u64 {
        let term = self.raft.metrics().borrow().current_term;
        let mut stamp = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        LeaderClock::stamp(&mut stamp, term, || self.reader.clock().unwrap_or(0), now_ms, Instant::now())
    }

    /// Proposes a write and waits for its outcome (applied on this node, committed on a quorum).
    /// Concurrent writes are proposed together, in one log entry.
    pub async fn write(&self, session: WriteSession, command: WriteCommand) -> Result<WriteOutcome, ApiError> {
        self.with_leader(|| {
            let req = WriteRequest { session, command: command.clone(), timestamp_ms: self.session_clock() };
            async move {
                if self.handing_over() {
                    return Ok(None);
                }
                self.not_leader()?;
                self.writes.submit(req).await
            }
        })
        .await
    }

    /// Proposes a write only if this node leads the shard now: no waiting for a leader, no
    /// retry, never forwarded (a leader's own decisions, such as a lease's expiry).
    pub async fn propose_here(&self, session: WriteSession, command: WriteCommand) -> Result<WriteOutcome, ApiError> {
        if self.handing_over() || self.leading_term().is_none() {
            return Err(ApiError::NotLeader { leader: self.leader(), leader_ticket: None });
        }
        let req = WriteRequest { session, command, timestamp_ms: self.session_clock() };
        self.writes
            .submit(req)
            .await?
            .ok_or_else(|| ApiError::Unavailable(format!("shard {} lost its leader", self.shard)))
    }

    /// Adds (or updates) a learner and waits until it has caught up with the leader's log.
    pub async fn add_learner(&self, raft_id: u64, member: MemberNode) -> Result<(), ApiError> {
        self.with_leader(|| {
            let member = member.clone();
            async move { map_membership(self.raft.add_learner(raft_id, member, true).await) }
        })
        .await
    }

    /// As this shard's leader, waits until the entries up to `index` are replicated to
    /// `raft_id` (for a learner whose log was purged: until its snapshot is installed), at most
    /// `limit`. Returns whether they are; `false` at once if this node does not lead.
    pub async fn wait_replicated(&self, raft_id: u64, index: u64, limit: Duration) -> bool {
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let reached = match &metrics.borrow().replication {
                None => return false,
                Some(r) => r.get(&raft_id).copied().flatten().is_some_and(|l| l.index >= index),
            };
            if reached {
                return true;
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    /// Applies a membership change (promote learners, remove voters or nodes).
    pub async fn change_membership(&self, change: ChangeMembers<u64, MemberNode>) -> Result<(), ApiError> {
        self.with_leader(|| {
            let change = change.clone();
            async move { map_membership(self.raft.change_membership(change, false).await) }
        })
        .await
    }

    /// Every member of this shard: Raft id, address, and whether it votes.
    pub fn members(&self) -> Vec<(u64, MemberNode, bool)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: std::collections::BTreeSet<u64> = m.membership().voter_ids().collect();
        m.nodes().map(|(id, node)| (*id, node.clone(), voters.contains(id))).collect()
    }

    /// The address of a member, by Raft id.
    pub fn member(&self, raft_id: u64) -> Option<MemberNode> {
        self.raft.metrics().borrow().membership_config.nodes().find(|(id, _)| **id == raft_id).map(|(_, n)| n.clone())
    }

    /// Confirms leadership with a quorum and waits until the state machine caught up with it.
    /// Concurrent callers share one confirmation round (one that started after they called).
    pub async fn ensure_linearizable(&self) -> Result<(), ApiError> {
        self.with_leader(|| async {
            if self.handing_over() {
                return Ok(None);
            }
            self.not_leader()?;
            self.reads.confirm().await
        })
        .await
    }

    /// A consistent read of this shard for a backup, taken once this node confirmed it leads:
    /// every write acknowledged before the call is in it.
    pub async fn begin_backup(&self) -> Result<BackupSource, ApiError> {
        self.ensure_linearizable().await?;
        self.read_state("backup read", || self.reader.backup())
    }

    /// Reads one key.
    pub async fn get(&self, key: &[u8], consistency: ReadConsistency) -> Result<Option<KeyValue>, ApiError> {
        if consistency == ReadConsistency::Linearizable && !self.reads_broken() {
            self.ensure_linearizable().await?;
        }
        self.read_state("read", || self.reader.get(key))
    }

    /// Fault injection only: a deliberately wrong read mode in which this replica answers
    /// linearizable reads from its local state without confirming leadership (no ReadIndex).
    /// It exists so the linearizability checker's self-test can show that it catches stale reads.
    #[cfg(feature = "fault-injection")]
    pub fn set_broken_reads(&self, on: bool) {
        self.broken_reads.store(on, Ordering::SeqCst);
    }

    fn reads_broken(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.broken_reads.load(Ordering::SeqCst)
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            false
        }
    }

    /// Reads one page of a scan; `page_limit` caps its keys and `max_bytes` its keys' and
    /// values' bytes.
    pub async fn scan(&self, req: &ScanRequest, page_limit: usize, max_bytes: usize) -> Result<ScanPage, ApiError> {
        if req.consistency == ReadConsistency::Linearizable {
            self.ensure_linearizable().await?;
        }
        self.read_state("scan", || scan_local(&self.reader, req, page_limit, max_bytes))
    }

    /// An etcd-shaped range read of this shard (`api::kv`), with the revision it saw.
    pub async fn range(
        &self,
        query: &crate::api::RangeQuery,
        consistency: ReadConsistency,
    ) -> Result<crate::api::RangePage, ApiError> {
        if consistency == ReadConsistency::Linearizable && !self.reads_broken() {
            self.ensure_linearizable().await?;
        }
        self.read_state("range read", || self.reader.kv_range(query))
    }

    /// [`Self::range`] at revision `at` of this shard: the state read now with every change after
    /// `at` undone from this node's watch history (`storage::past`); [`ApiError::Compacted`] if
    /// the history no longer holds them all (unless nothing in the shard changed since `at`, or
    /// the range is one key that last changed at or before it). At or after the state read: the
    /// state read (a future revision is the caller's to refuse: the answer's revision tells it).
    pub async fn range_at(
        &self,
        query: &crate::api::RangeQuery,
        consistency: ReadConsistency,
        at: crate::api::Revision,
    ) -> Result<crate::api::RangePage, ApiError> {
        use crate::storage::past::Undo;
        if consistency == ReadConsistency::Linearizable && !self.reads_broken() {
            self.ensure_linearizable().await?;
        }
        let read = |q: &crate::api::RangeQuery| self.read_state("range read", || self.reader.kv_range(q));
        // Each changed key may hide one key of the page at `at`: read that many more (again if
        // more changes came between the reads; after a few tries, without a limit).
        let mut extra = 0usize;
        let mut query = query.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut raw = query.clone();
            if raw.limit > 0 {
                raw.limit = if attempt <= 4 { raw.limit.saturating_add(extra as u64) } else { 0 };
            }
            let now = read(&raw)?;
            if at >= now.revision {
                return Ok(now);
            }
            // Nothing changed in the shard after `at` (as far back as this node saw every
            // change, since it started or installed a snapshot): the state now is the state then.
            // A change published after the read only makes this claim narrower.
            let (published, last_change) = self.watch_hub.changes();
            if published >= now.revision && last_change <= at {
                return Ok(now);
            }
            let batches = match self.history_through(at, now.revision).await {
                Ok(batches) => batches,
                // Older than the history, but one key that exists now and last changed at or
                // before `at` was the same then.
                Err(ApiError::Compacted { .. })
                    if query.range.is_single() && now.kvs.first().is_some_and(|kv| kv.mod_revision <= at) =>
                {
                    return Ok(now);
                }
                Err(e) => return Err(e),
            };
            let undo = Undo::new(&batches, &query, at, now.revision);
            if raw.limit > 0 && !query.count_only && undo.len() > extra {
                extra = undo.len();
                continue;
            }
            let cut = now.more;
            let last = now.kvs.last().map(|kv| kv.key.clone());
            let page = undo.apply(&query, now);
            match last {
                // Every key of this page changed and none existed at `at`: read on after it.
                Some(last) if cut && page.kvs.is_empty() && !query.count_only => {
                    let count = page.count;
                    query.after = Some(last);
                    let mut next = Box::pin(self.range_at(&query, ReadConsistency::Stale, at)).await?;
                    next.count = count;
                    return Ok(next);
                }
                _ => return Ok(page),
            }
        }
    }

    /// The watch history's batches with changes after `at`, once it holds every change up to
    /// `through` (it is published right after the state machine commits, so a read can run a
    /// moment ahead of it).
    async fn history_through(
        &self,
        at: crate::api::Revision,
        through: crate::api::Revision,
    ) -> Result<Vec<Arc<crate::storage::watch::EventBatch>>, ApiError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let (batches, published) = self.watch_hub.changes_after(at)?;
            if published >= through {
                return Ok(batches);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::Unavailable(format!(
                    "shard {}: the watch history is behind the state read (revision {published} < {through})",
                    self.shard
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// A txn that writes nothing (`api::KvTxn::is_read_only`), evaluated like a range read:
    /// after a ReadIndex round if linearizable, on one read of this replica's state.
    pub async fn txn_read(
        &self,
        txn: crate::api::KvTxn,
        consistency: ReadConsistency,
    ) -> Result<(crate::api::Revision, bool, Vec<crate::api::KvOpResult>), ApiError> {
        if consistency == ReadConsistency::Linearizable && !self.reads_broken() {
            self.ensure_linearizable().await?;
        }
        self.read_state("txn read", || self.reader.kv_txn_read(txn))
    }

    /// The deadlines of the leases whose home is this shard.
    pub fn lease_deadlines(&self) -> &LeaseDeadlines {
        &self.deadlines
    }

    /// This shard's recent events on this node (watches are served from it).
    pub fn watch_hub(&self) -> &Arc<WatchHub> {
        &self.watch_hub
    }

    /// The shard's current term as this node knows it.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// The term this node leads the shard in, if it leads it.
    pub fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.state == ServerState::Leader).then_some(m.current_term)
    }

    /// Lease `id` as the leader sees it once it confirmed its leadership (ReadIndex) and
    /// applied up to it: its record, and its deadline counted in this leader's term.
    async fn confirmed_lease(&self, id: u64) -> Result<(u64, Instant), ApiError> {
        self.ensure_linearizable().await?;
        let term = self
            .leading_term()
            .ok_or_else(|| ApiError::Unavailable(format!("node lost the leadership of shard {}", self.shard)))?;
        let live = self.read_state("lease read", || self.reader.lease(id))?.is_some_and(|r| !r.revoking);
        if !live {
            return Err(ApiError::LeaseNotFound { id });
        }
        self.deadlines.lead(term, Instant::now());
        Ok((term, Instant::now()))
    }

    /// Renews lease `id` (this shard is its home) to its granted TTL: only once this node
    /// confirmed it leads (a deposed leader cannot acknowledge a renewal the new one never
    /// saw). Returns the TTL in seconds.
    pub async fn lease_keepalive(&self, id: u64) -> Result<u64, ApiError> {
        let (_, now) = self.confirmed_lease(id).await?;
        self.deadlines.renew(id, now).ok_or(ApiError::LeaseNotFound { id })
    }

    /// Lease `id` (this shard is its home): seconds left (rounded up) and its granted TTL.
    pub async fn lease_info(&self, id: u64) -> Result<LeaseStatus, ApiError> {
        let (_, now) = self.confirmed_lease(id).await?;
        let (left, granted) = self.deadlines.remaining(id, now).ok_or(ApiError::LeaseNotFound { id })?;
        let ttl_secs = left.as_millis().div_ceil(1000) as u64;
        Ok(LeaseStatus { id, ttl_secs, granted_ttl_secs: granted, keys: Vec::new() })
    }

    /// This shard's keys attached to lease `id` (linearizable).
    pub async fn lease_keys(&self, id: u64) -> Result<Vec<Vec<u8>>, ApiError> {
        self.ensure_linearizable().await?;
        self.read_state("lease keys read", || self.reader.lease_keys(id))
    }

    /// The live leases whose home is this shard (linearizable).
    pub async fn leases(&self) -> Result<Vec<LeaseEntry>, ApiError> {
        self.ensure_linearizable().await?;
        let all = self.read_state("leases read", || self.reader.leases())?;
        Ok(all
            .into_iter()
            .filter(|(_, r)| !r.revoking)
            .map(|(id, r)| LeaseEntry { id, granted_ttl_secs: r.ttl_secs })
            .collect())
    }

    /// Runs `read` of this replica's state machine (`what`: what it reads). A panic inside it —
    /// redb panics on some damaged pages instead of returning an error, or a bug — is caught and
    /// logged, and answers `Unavailable` naming the file, so that the client asks another member
    /// (whose copy is its own) instead of seeing its stream break; any other failure is
    /// `Internal`.
    fn read_state<T>(
        &self,
        what: &str,
        read: impl FnOnce() -> Result<T, crate::storage::StorageError>,
    ) -> Result<T, ApiError> {
        match crate::storage::catch_storage_panic(what, read) {
            Ok(v) => Ok(v),
            Err(crate::storage::StorageError::Panicked(msg)) => {
                let file =
                    self.reader.file_path().map_or_else(|| "its state machine".into(), |p| p.display().to_string());
                tracing::error!(
                    shard = self.shard,
                    file,
                    "{msg}: the file may be damaged (docs/operations.md, \"A damaged data dir\"), or this is a bug"
                );
                Err(ApiError::Unavailable(format!(
                    "shard {}: {msg} on this node ({file} may be damaged); ask another member",
                    self.shard
                )))
            }
            Err(e) => Err(ApiError::Internal(format!("{what} of shard {}: {e}", self.shard))),
        }
    }

    /// Handles one chunk of a snapshot the shard's leader sends this node (docs/design.md §6.4).
    pub async fn receive_snapshot_chunk(
        &self,
        req: openraft::raft::InstallSnapshotRequest<super::TypeConfig>,
    ) -> crate::api::raft_rpc::RaftResponse {
        self.snapshots_in.receive(&self.raft, &self.reader, req).await
    }

    /// Records that AppendEntries (a heartbeat or entries) for this shard arrived from a leader.
    /// `leader_commit`: the commit index the leader sent with it.
    pub fn record_leader_contact(&self, leader_commit: Option<u64>) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.leader_contact_ms.store(ms.max(1), Ordering::Relaxed);
        if let Some(c) = leader_commit {
            self.commits.reported.fetch_max(c, Ordering::Relaxed);
        }
    }

    /// Why this replica of the shard is cut off from the group, if it is: it is no longer a
    /// member, or (with other voters) it heard from no leader — or, leading, from no quorum —
    /// for 3 election timeouts (as etcd's require-leader watches). A watch served from a
    /// cut-off replica would stall while the others move on (docs/design.md §17).
    pub fn cut_off(&self) -> Option<String> {
        let contact = self.contact(&self.raft.metrics().borrow());
        let (shard, node) = (self.shard, split_raft_id(self.raft_id).1);
        if !contact.member {
            return Some(format!("node {node} is not a member of shard {shard}"));
        }
        let (age, limit) = (contact.quiet_ms?, 3 * self.raft.config().election_timeout_max);
        (age > limit).then(|| format!("node {node} heard from no leader of shard {shard} for {age} ms"))
    }

    /// How this replica stands in its group, from one read of the metrics.
    fn contact(&self, m: &openraft::RaftMetrics<u64, MemberNode>) -> GroupContact {
        let membership = m.membership_config.membership();
        let member = membership.voter_ids().chain(membership.learner_ids()).any(|id| id == self.raft_id);
        let quiet_ms = (membership.voter_ids().count() > 1).then(|| {
            if m.state == ServerState::Leader {
                m.millis_since_quorum_ack.unwrap_or(0)
            } else {
                let now = self.epoch.elapsed().as_millis() as u64;
                now.saturating_sub(self.leader_contact_ms.load(Ordering::Relaxed))
            }
        });
        GroupContact { member, leading: m.state == ServerState::Leader, quiet_ms }
    }

    /// Whether this replica is ready to serve (`/ready`, docs/operations.md): its Raft runs, it
    /// is a member, a leader is known and was heard from (leading: a quorum acknowledged it)
    /// within the election timeout, and it has applied everything its leader reported
    /// committed a second ago (the leader: everything in its log a second ago). `Err` says why
    /// not.
    pub fn readiness(&self) -> Result<(), String> {
        let m = self.raft.metrics().borrow().clone();
        if let Err(fatal) = &m.running_state {
            return Err(format!("Raft stopped: {fatal}"));
        }
        let contact = self.contact(&m);
        if !contact.member {
            return Err("not a member of the shard (yet)".into());
        }
        if m.current_leader.is_none() {
            return Err("no leader known".into());
        }
        match contact.quiet_ms {
            Some(age) if age > self.raft.config().election_timeout_max => {
                return Err(if contact.leading {
                    format!("no quorum acknowledged this leader for {age} ms")
                } else {
                    format!("no word from the leader for {age} ms")
                });
            }
            _ => {}
        }
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let committed = self.commits.a_second_ago.load(Ordering::Relaxed);
        if applied < committed {
            return Err(format!("applied up to {applied}, behind the {committed} committed a second ago"));
        }
        Ok(())
    }

    /// What `GET /metrics` reports of this shard: its recorded metrics and, from one read of
    /// Raft's, where it stands now.
    pub fn sample(&self) -> ShardSample {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let last_log = m.last_log_index.unwrap_or(0);
        let committed = if m.state == ServerState::Leader {
            // The highest index a majority of the voters hold (this leader: its log's end).
            let mut held: Vec<u64> = membership
                .voter_ids()
                .map(|id| {
                    if id == self.raft_id {
                        last_log
                    } else {
                        m.replication.as_ref().and_then(|r| r.get(&id).copied().flatten()).map_or(0, |l| l.index)
                    }
                })
                .collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            held.get(held.len() / 2).copied().unwrap_or(0)
        } else {
            self.commits.reported.load(Ordering::Relaxed)
        };
        let snapshot = m.snapshot.map_or(0, |l| l.index);
        ShardSample {
            shard: self.shard,
            role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            },
            term: m.current_term,
            leader: m.current_leader.map(|id| split_raft_id(id).1),
            last_log,
            committed,
            applied: m.last_applied.map_or(0, |l| l.index),
            snapshot,
            log_bytes: self.log_bytes(),
            voters: membership.voter_ids().count(),
            leases: self.deadlines.live_count(),
            watchers: self.watch_hub.watchers(),
            metrics: self.metrics.clone(),
        }
    }

    /// What this shard records for `GET /metrics` (watches record their lag into it).
    pub fn metrics(&self) -> &Arc<ShardMetrics> {
        &self.metrics
    }

    /// The shard's health on this node: Raft running, a leader known, recent heartbeats, and
    /// everything committed a second ago applied (as [`Self::readiness`] checks).
    pub fn health(&self) -> ShardHealth {
        let m = self.raft.metrics().borrow().clone();
        let election_max = self.raft.config().election_timeout_max;
        let leader_known = m.current_leader.is_some();
        let heartbeat_age_ms = if m.state == ServerState::Leader {
            m.millis_since_quorum_ack
        } else {
            match self.leader_contact_ms.load(Ordering::Relaxed) {
                0 => None,
                at => Some((self.epoch.elapsed().as_millis() as u64).saturating_sub(at)),
            }
        };
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let apply_lag = m.last_log_index.unwrap_or(0).saturating_sub(applied);
        // What `/ready` checks too: a stuck apply shows even when few entries wait behind it.
        let committed = self.commits.a_second_ago.load(Ordering::Relaxed);
        let voters = m.membership_config.membership().voter_ids().count();
        let reason = if let Err(fatal) = &m.running_state {
            format!("Raft stopped: {fatal}")
        } else if !leader_known {
            "no leader known".to_string()
        } else if voters > 1 && heartbeat_age_ms.is_none_or(|a| a > 2 * election_max) {
            format!("no heartbeat for {} ms", heartbeat_age_ms.map(|a| a.to_string()).unwrap_or_else(|| "ever".into()))
        } else if applied < committed {
            format!("applied up to {applied}, behind the {committed} committed a second ago")
        } else {
            String::new()
        };
        ShardHealth { healthy: reason.is_empty(), leader_known, heartbeat_age_ms, apply_lag, reason }
    }

    /// The digest of this replica's state machine at the index it has applied (one read
    /// transaction, O(1)); `None` (logged) if the state machine cannot be read.
    pub fn digest(&self) -> Option<StateDigest> {
        match self.read_state("state digest read", || self.reader.digest()) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(shard = self.shard, "state digest: {e}");
                None
            }
        }
    }

    /// This shard as seen from this node.
    pub fn status(&self) -> ShardStatus {
        let digest = self.digest();
        let health = self.health();
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let role = match m.state {
            ServerState::Leader => "Leader",
            ServerState::Follower => "Follower",
            ServerState::Candidate => "Candidate",
            ServerState::Learner => "Learner",
            ServerState::Shutdown => "Shutdown",
        };
        ShardStatus {
            shard: self.shard,
            leader: m.current_leader.map(|id| split_raft_id(id).1),
            term: m.current_term,
            voters: membership.voter_ids().map(|id| split_raft_id(id).1).collect(),
            learners: membership.learner_ids().map(|id| split_raft_id(id).1).collect(),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            role: role.to_string(),
            health,
            digest,
        }
    }

    /// Stops this shard's Raft (storage is closed when the last handle drops).
    pub async fn shutdown(&self) {
        // Stopped and gone before the shard's databases may be opened again.
        let task = self.size_task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(shard = self.shard, "raft shutdown: {e}");
        }
    }
}

/// How long one snapshot chunk may take to be answered, the last one's install included.
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// A replica's standing in its group ([`RaftNode::contact`]).
struct GroupContact {
    /// A voter or learner of the shard.
    member: bool,
    leading: bool,
    /// With other voters: ms since it heard from the group — leading, since a quorum
    /// acknowledged it; following, since the leader's last AppendEntries (since start if never).
    quiet_ms: Option<u64>,
}

/// One shard's numbers for `GET /metrics` ([`RaftNode::sample`]).
#[derive(Debug)]
pub struct ShardSample {
    pub shard: ShardId,
    /// leader, follower, candidate, learner or shutdown.
    pub role: &'static str,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log: u64,
    /// What this replica knows is committed (leading: held by a majority of the voters).
    pub committed: u64,
    pub applied: u64,
    /// The index the last snapshot covers.
    pub snapshot: u64,
    /// Encoded bytes of the log entries held.
    pub log_bytes: u64,
    pub voters: usize,
    /// Live leases whose home is this shard.
    pub leases: usize,
    /// Watches following this shard on this node.
    pub watchers: usize,
    pub metrics: Arc<ShardMetrics>,
}

/// What a replica knows is committed: the highest commit index its leaders reported (followers)
/// and, sampled by [`snapshot_by_size`]'s tick, what it knew a second earlier.
#[derive(Debug, Default)]
struct CommitSamples {
    reported: AtomicU64,
    a_second_ago: AtomicU64,
}

/// How often a shard compares its log's size with its share of `[raft] snapshot_log_bytes`
/// (and samples what it knows is committed).
const LOG_SIZE_CHECK: Duration = Duration::from_secs(1);
/// How long a snapshot asked for may take before it is asked for again.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(60);

/// Builds a snapshot (after which openraft purges the log behind it) whenever the entries after
/// the last snapshot hold `limit` encoded bytes: openraft's own policy counts entries only, and
/// an entry may batch many writes (docs/design.md §6). A snapshot copies nothing (§6.4), so it
/// costs a durable commit whatever the state's size. openraft keeps
/// `max_in_snapshot_log_to_keep` entries behind a snapshot for lagging followers; when those
/// hold more than `limit` bytes, this purges the older ones, so the log holds at most about
/// 2 × `limit` bytes whatever the batching. Runs until the shard stops.
async fn snapshot_by_size(
    raft: Raft,
    log: RedbLogStore,
    commits: Arc<CommitSamples>,
    limit: u64,
    shard: ShardId,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(LOG_SIZE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The applied index when a snapshot was last asked for, and when.
    let mut asked: Option<(u64, Instant)> = None;
    // The last purge asked for.
    let mut purged: Option<u64> = None;
    // What was known committed at the last tick (leading: the log's end).
    let mut known = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let (snapshot, applied, leading, last_log) = {
            let m = raft.metrics();
            let m = m.borrow();
            let leading = m.state == ServerState::Leader;
            (m.snapshot.map(|l| l.index), m.last_applied.map(|l| l.index), leading, m.last_log_index.unwrap_or(0))
        };
        commits.a_second_ago.store(known, Ordering::Relaxed);
        known = if leading { last_log } else { commits.reported.load(Ordering::Relaxed) };
        if let Some(upto) = snapshot.and_then(|s| log.purge_point(s, limit)) {
            if purged.is_none_or(|p| p < upto) {
                purged = Some(upto);
                tracing::debug!(shard, upto, "the log kept behind the snapshot passed {limit} bytes: purging");
                if let Err(e) = raft.trigger().purge_log(upto).await {
                    tracing::debug!(shard, "purge by log size: {e}");
                    return;
                }
            }
        }
        let Some(applied) = applied else { continue };
        if log.bytes_after(snapshot) < limit {
            continue;
        }
        // The snapshot asked for covers at least what was applied then: wait for it.
        if let Some((at, when)) = asked {
            if snapshot.is_none_or(|s| s < at) && when.elapsed() < SNAPSHOT_RETRY {
                continue;
            }
        }
        asked = Some((applied, Instant::now()));
        tracing::debug!(shard, "the log after the last snapshot passed {limit} bytes: building a snapshot");
        if let Err(e) = raft.trigger().snapshot().await {
            tracing::debug!(shard, "snapshot by log size: {e}");
            return;
        }
    }
}

fn map_membership<T>(r: Result<T, RaftError<u64, ClientWriteError<u64, MemberNode>>>) -> Result<Option<()>, ApiError> {
    match r {
        Ok(_) => Ok(Some(())),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => forward_to(f.leader_id),
        // Another change is still being committed: wait and try again (until the timeout).
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_)))) => {
            Ok(None)
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => Err(ApiError::Refused(e.to_string())),
        Err(RaftError::Fatal(f)) => Err(ApiError::Unavailable(f.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaders_wall_clock_cannot_move_the_session_clock() {
        let start = Instant::now();
        let years_ahead = || 10 * 365 * 24 * 3_600_000 + now_ms();
        let mut slot = None;
        // A new leader starts from the applied clock, whatever its wall clock says.
        assert_eq!(LeaderClock::stamp(&mut slot, 3, || 5_000, years_ahead, start), 5_000);
        // Then it advances with its monotonic clock only.
        let later = start + Duration::from_millis(1_500);
        assert_eq!(LeaderClock::stamp(&mut slot, 3, || unreachable!(), years_ahead, later), 6_500);
        // The next term starts again from what was applied.
        assert_eq!(LeaderClock::stamp(&mut slot, 4, || 6_000, years_ahead, later), 6_000);
        // Only a cluster's very first leader (nothing applied) reads its wall clock.
        let mut fresh = None;
        assert_eq!(LeaderClock::stamp(&mut fresh, 1, || 0, || 42, start), 42);
    }
}
