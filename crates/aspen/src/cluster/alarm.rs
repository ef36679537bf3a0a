//! NOSPACE alarms: the storage quota and a full disk (docs/operations.md, "Storage quota and a
//! full disk"; docs/design.md §12).
//!
//! Owns: watching this node's space — its stored data against `[limits] quota_bytes`, the free
//! disk space of its data dir against `[storage] reserve_bytes` — raising a NOSPACE alarm when
//! either is exceeded, the alarm records (shard 0's reserved keyspace, `alarms/<node id>`, so
//! every member sees them), this node's copy of them ([`AlarmBook`], refreshed with the token
//! records), refusing the writes an alarm forbids, `alarm list` / `alarm disarm`, and the
//! space reserve files.
//!
//! While an alarm is raised, writes that add data (put, cas, batches and transactions with a
//! put, puts with a lease, lease grants) are refused with [`ApiError::NoSpace`] on every node;
//! reads, deletes, prefix deletes, lease revocations and keep-alives work, and Aspen's own
//! records are still written. The alarm stays until disarmed; a node whose condition persists
//! raises it again.
//!
//! A node short of space refuses those writes itself at once, before its alarm is recorded: the
//! record is a write through Raft, and applying it may have to wait for room on the disk
//! (`storage::space`).
//!
//! The reserve: two files of half `reserve_bytes` each in the data dir. When free space falls
//! under `reserve_bytes`, the first is deleted, so that what is in flight (the alarm's own
//! record, entries being applied, log compaction) finds room; a node started on a full disk
//! deletes the second before it opens its databases, so that it can start and serve reads.
//! Both are made again once there is room for them.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio_util::sync::CancellationToken;

use super::{service::NodeService, tokens};
use crate::api::{
    is_reserved_key, AlarmInfo, ApiError, BatchOp, ClientResponse, NodeId, ReadConsistency, ScanRequest, TxnOp,
    WriteCommand,
};
use crate::storage::space::free_bytes;

pub const NOSPACE: &str = "NOSPACE";
/// How often free disk space is checked.
const SPACE_CHECK: Duration = Duration::from_secs(1);
/// Stored bytes are measured (reading every page of the data tables) only while the databases'
/// files are larger than the quota, at most this often; the time between measures grows with
/// what a measure costs (50 × its duration, so at most 2 % of a core).
const QUOTA_CHECK_MIN: Duration = Duration::from_secs(2);
/// The reserve files: released while running, released at a start on a full disk.
const RESERVE_RUNNING: &str = "space.reserve.running";
const RESERVE_START: &str = "space.reserve.start";

/// The alarms raised in the cluster, as this node's replica of shard 0 last showed them.
#[derive(Debug, Default)]
pub struct AlarmBook {
    alarms: RwLock<Vec<AlarmInfo>>,
}

impl AlarmBook {
    pub fn set(&self, alarms: Vec<AlarmInfo>) {
        *self.alarms.write().unwrap_or_else(|p| p.into_inner()) = alarms;
    }

    pub fn list(&self) -> Vec<AlarmInfo> {
        self.alarms.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The first NOSPACE alarm, if one is raised.
    pub fn nospace(&self) -> Option<AlarmInfo> {
        self.alarms.read().unwrap_or_else(|p| p.into_inner()).iter().find(|a| a.alarm == NOSPACE).cloned()
    }

    fn raised_by(&self, node_id: NodeId) -> bool {
        self.alarms.read().unwrap_or_else(|p| p.into_inner()).iter().any(|a| a.node_id == node_id)
    }
}

/// Whether `command` adds data (what a NOSPACE alarm refuses).
pub fn adds_data(command: &WriteCommand) -> bool {
    let reserved_only = !command.keys().is_empty() && command.keys().iter().all(|k| is_reserved_key(k));
    if reserved_only {
        return false;
    }
    match command {
        WriteCommand::Put { .. }
        | WriteCommand::Cas { .. }
        | WriteCommand::PutLease { .. }
        | WriteCommand::LeaseGrant { .. } => true,
        WriteCommand::Batch { ops } => ops.iter().any(|op| matches!(op, BatchOp::Put { .. })),
        WriteCommand::Txn { success, failure, .. } => {
            success.iter().chain(failure).any(|op| matches!(op, TxnOp::Put { .. }))
        }
        WriteCommand::KvTxn { txn, .. } => kv_txn_puts(txn),
        WriteCommand::Delete { .. }
        | WriteCommand::DeletePrefix { .. }
        | WriteCommand::LeaseRevoke { .. }
        | WriteCommand::LeaseDrop { .. }
        | WriteCommand::LeaseForget { .. } => false,
    }
}

/// Whether an etcd-shaped txn may put a key (either branch, nested txns included).
fn kv_txn_puts(txn: &crate::api::KvTxn) -> bool {
    use crate::api::KvOp;
    txn.success.iter().chain(&txn.failure).any(|op| match op {
        KvOp::Put(_) => true,
        KvOp::Txn(t) => kv_txn_puts(t),
        KvOp::Range(_) | KvOp::DeleteRange { .. } => false,
    })
}

/// The space reserve of a data dir (see the module docs).
#[derive(Debug, Clone)]
pub struct SpaceReserve {
    dir: PathBuf,
    /// `[storage] reserve_bytes`: the two files hold half each.
    bytes: u64,
}

impl SpaceReserve {
    pub fn new(dir: &Path, bytes: u64) -> Self {
        SpaceReserve { dir: dir.to_path_buf(), bytes }
    }

    /// Before the databases open: on a disk with less free space than the reserve, deletes the
    /// start half (so that the node can open its databases and serve reads).
    pub fn at_start(&self) {
        if self.bytes == 0 {
            return;
        }
        if free_bytes(&self.dir).is_ok_and(|f| f < self.bytes) && self.release(RESERVE_START) {
            tracing::warn!("data dir {}: disk nearly full at start; released the start reserve", self.dir.display());
        }
    }

    /// Deletes reserve file `name`; whether it was there.
    fn release(&self, name: &str) -> bool {
        std::fs::remove_file(self.dir.join(name)).is_ok()
    }

    /// Makes the missing reserve files while there is room for them (each leaves at least the
    /// whole reserve free, so that making it raises no alarm).
    fn replenish(&self) {
        for name in [RESERVE_RUNNING, RESERVE_START] {
            let path = self.dir.join(name);
            if path.exists() || !free_bytes(&self.dir).is_ok_and(|f| f >= self.bytes + self.bytes / 2) {
                continue;
            }
            if let Err(e) = fill(&path, self.bytes / 2) {
                tracing::warn!("cannot make the space reserve {}: {e}", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// A file of `len` allocated bytes (not a sparse one: the space is really taken).
fn fill(path: &Path, len: u64) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    if rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len).is_err() {
        // A file system without fallocate: write the bytes.
        let zeros = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
    }
    file.sync_all()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl NodeService {
    /// Refuses `command` if it adds data while a NOSPACE alarm is raised — or while this node
    /// is short of space itself, before its alarm is recorded (recording it may wait for room).
    pub(super) fn check_space(&self, command: &WriteCommand) -> Result<(), ApiError> {
        let (node, reason) = match self.alarms.nospace() {
            Some(alarm) => (alarm.node_id, alarm.reason),
            None => match self.space_low.read().unwrap_or_else(|p| p.into_inner()).clone() {
                Some(reason) => (self.node_id, reason),
                None => return Ok(()),
            },
        };
        if !adds_data(command) {
            return Ok(());
        }
        Err(ApiError::NoSpace(format!(
            "writes that add data are refused: node {node} raised a NOSPACE alarm ({reason}); reads and deletes \
             work — free space, then `aspen-cli alarm disarm`"
        )))
    }

    /// The alarm records in this node's replica of shard 0 (`None`: not readable here).
    pub(super) fn local_alarms(&self) -> Option<Vec<AlarmInfo>> {
        let shard0 = self.store.local(0).ok()?;
        let req = ScanRequest {
            prefix: tokens::reserved_prefix("alarms"),
            start: None,
            end: None,
            limit: 10_000,
            continuation: None,
            consistency: ReadConsistency::Stale,
        };
        // A failed read (a panic included) is "unknown": the alarm task must not end.
        let page = crate::storage::catch_storage_panic("reading the alarms", || {
            crate::storage::scan::scan_local(shard0.reader(), &req, 10_000, usize::MAX / 2)
        })
        .ok()?;
        Some(page.entries.iter().filter_map(|kv| postcard::from_bytes(&kv.value).ok()).collect())
    }

    /// `alarm list`: the raised alarms, read linearizably.
    pub(super) async fn list_alarms(&self) -> Result<ClientResponse, ApiError> {
        let records = self.reserved_records("alarms").await?;
        Ok(ClientResponse::Alarms(records.iter().filter_map(|(_, v)| postcard::from_bytes(v).ok()).collect()))
    }

    /// `alarm disarm`: clears every alarm record; returns the alarms cleared.
    pub(super) async fn disarm_alarms(&self) -> Result<ClientResponse, ApiError> {
        let records = self.reserved_records("alarms").await?;
        let mut cleared = Vec::new();
        for (key, value) in records {
            self.internal_write(WriteCommand::Delete { key }).await?;
            if let Ok(alarm) = postcard::from_bytes::<AlarmInfo>(&value) {
                tracing::info!(node = alarm.node_id, reason = %alarm.reason, "alarm disarmed");
                cleared.push(alarm);
            }
        }
        if let Some(alarms) = self.local_alarms() {
            self.alarms.set(alarms);
        }
        Ok(ClientResponse::Alarms(cleared))
    }

    /// Records this node's NOSPACE alarm in shard 0 (unless it is raised already).
    async fn raise_nospace(&self, reason: String) {
        if self.alarms.raised_by(self.node_id) {
            return;
        }
        let alarm = AlarmInfo { node_id: self.node_id, alarm: NOSPACE.into(), reason, raised_unix_ms: now_ms() };
        let value = match postcard::to_stdvec(&alarm) {
            Ok(v) => v,
            Err(e) => return tracing::error!("cannot encode an alarm: {e}"),
        };
        let key = tokens::reserved("alarms", self.node_id);
        match self.internal_write(WriteCommand::Put { key, value }).await {
            Ok(_) => {
                tracing::error!(reason = %alarm.reason, "NOSPACE alarm raised: the cluster refuses writes that add data");
                let mut all = self.alarms.list();
                all.push(alarm);
                self.alarms.set(all);
            }
            Err(e) => tracing::warn!("cannot record the NOSPACE alarm yet ({}): {e}", alarm.reason),
        }
    }

    /// Bytes of the shards' state-machine files (cheap: their sizes; never less than the data
    /// stored in them).
    fn data_file_bytes(&self) -> u64 {
        self.store
            .shards()
            .keys()
            .filter_map(|shard| {
                let path = self.data_dir.join(format!("shard-{shard}")).join("state-machine.db");
                std::fs::metadata(path).ok().map(|m| m.len())
            })
            .sum()
    }

    /// Watches this node's space until `stop` (see the module docs).
    pub fn watch_space(
        self: &Arc<Self>,
        reserve: SpaceReserve,
        quota: u64,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut next_measure = Instant::now();
            // Over the quota at the last measure (kept until the next one).
            let mut over_quota: Option<String> = None;
            let mut tick = tokio::time::interval(SPACE_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                if this.cluster_id() == crate::api::ClusterId::default() {
                    continue;
                }
                let mut reasons = Vec::new();
                if reserve.bytes > 0 {
                    match free_bytes(&reserve.dir) {
                        Ok(free) if free < reserve.bytes => {
                            if reserve.release(RESERVE_RUNNING) {
                                tracing::warn!("disk nearly full: released the running space reserve");
                            }
                            reasons.push(format!(
                                "{free} bytes free on the disk of {}, under the reserve of {} bytes",
                                reserve.dir.display(),
                                reserve.bytes
                            ));
                        }
                        Ok(_) => {
                            if this.alarms.nospace().is_none() {
                                let r = reserve.clone();
                                let _ = tokio::task::spawn_blocking(move || r.replenish()).await;
                            }
                        }
                        Err(e) => tracing::debug!("free space of {}: {e}", reserve.dir.display()),
                    }
                }
                // The files never hold less than what is stored in them: while they are under the
                // quota, so is the data, and nothing is read.
                let files = this.data_file_bytes();
                this.data_file_bytes.store(files, std::sync::atomic::Ordering::Relaxed);
                if files > quota && Instant::now() >= next_measure {
                    let shards: Vec<_> = this.store.shards().values().map(|n| n.reader().clone()).collect();
                    let started = Instant::now();
                    let measured = tokio::task::spawn_blocking(move || {
                        shards
                            .iter()
                            .try_fold(0u64, |sum, r| Ok::<_, crate::storage::StorageError>(sum + r.stored_bytes()?))
                    })
                    .await;
                    let took = started.elapsed();
                    next_measure = Instant::now() + QUOTA_CHECK_MIN.max(took * 50);
                    match measured {
                        Ok(Ok(stored)) => {
                            this.stored_bytes.store(stored, std::sync::atomic::Ordering::Relaxed);
                            over_quota = (stored > quota)
                                .then(|| format!("{stored} bytes of data stored, over the quota of {quota} bytes"));
                        }
                        Ok(Err(e)) => tracing::warn!("cannot measure the stored data: {e}"),
                        Err(e) => tracing::warn!("cannot measure the stored data: {e}"),
                    }
                }
                if files <= quota {
                    over_quota = None;
                }
                reasons.extend(over_quota.clone());
                let reason = (!reasons.is_empty()).then(|| reasons.join("; "));
                *this.space_low.write().unwrap_or_else(|p| p.into_inner()) = reason.clone();
                if let Some(reason) = reason {
                    this.raise_nospace(reason).await;
                }
            }
        })
    }
}
