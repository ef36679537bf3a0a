//! Power-cut tests of one shard's storage: the redb log store and state machine run on simulated
//! disks ([`super::powercut`]) and are driven the way openraft drives them — fsync'd appends
//! acknowledged through the `LogFlushed` callback, votes, non-durable `committed`, applies
//! (non-durable commits, covered by the durable log), snapshots and purges, truncation of an
//! uncommitted tail, a follower's install of a streamed snapshot — while the power is cut at a random I/O call. After each cut the stores are
//! reopened from the durable images and checked:
//!
//! - the log is exactly the acknowledged log, or the acknowledged log with the operation that
//!   was in flight at the cut (appends, truncations and purges are atomic);
//! - the vote is the acknowledged one, or the one being saved at the cut;
//! - `committed` and `last_applied` never run ahead of what was committed, and the log still
//!   holds everything after `last_applied` (nothing needed for replay was purged);
//! - a cut during an install leaves the old state or the new one, never a mix;
//! - openraft's own restart ([`StorageHelper::get_initial_state`]) succeeds, and after it the
//!   state machine, brought up to the commit index, equals a replay of the durable log from
//!   scratch (or from the snapshot, when the log was purged).
//!
//! Then the workload goes on from the recovered state and the power is cut again.
//!
//! The leader's overlap path (`RedbLogStore::overlap_own_appends`: its own appends acknowledged
//! before their fsync, applied only once durable) has its own runs: after a cut, everything the
//! state machine applied is in the durable log, and the log is a prefix of what was appended.
//! A state machine that does not wait for the log is caught by the same check.
//!
//! Seeds: each run prints its base seed; a failure names the seed of its run. Rerun one with
//! `POWERCUT_SEED=<seed> cargo test -p aspen --lib powercut_tests -- --nocapture`; `POWERCUT_RUNS=<n>`
//! changes the number of runs.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{
    storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine, StorageHelper},
    CommittedLeaderId, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tempfile::TempDir;

use super::{
    powercut::{DiskId, LossModel, PowerSwitch},
    shared_journal::SharedJournal,
    RedbLogStore, RedbStateMachine,
};
use crate::api::{
    raft::{Entry, LogId, Vote, WriteRequest},
    BatchOp, Id128, WriteCommand, WriteSession,
};

const LEADER: u64 = 1;
const NO_CAP: u64 = 1 << 30;
/// Operations per epoch when the cut does not come first.
const MAX_OPS: usize = 80;
/// Cuts (epochs) per run: the later ones start from a recovered state.
const EPOCHS: usize = 2;
/// The cut falls at a uniform I/O call in this many calls after the epoch starts (an operation
/// makes about ten: almost every cut falls inside an operation, after 0 to ~50 operations).
const CUT_WINDOW: u64 = 500;
const KEYS: u64 = 6;
/// A small journal, so that runs fill it and its checkpoints happen inside them too.
const JOURNAL_BYTES: u64 = 8 << 10;
const CLIENTS: usize = 4;

type TestResult = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, LEADER), index)
}

/// The index after `id` (0 for none).
fn next(id: Option<LogId>) -> u64 {
    id.map(|l| l.index + 1).unwrap_or(0)
}

fn enc(e: &Entry) -> Vec<u8> {
    postcard::to_stdvec(e).expect("encode entry")
}

/// The stores of one simulated node: two disks on one power switch, snapshots in a tempdir.
struct Rig {
    switch: PowerSwitch,
    log_disk: DiskId,
    journal_disk: DiskId,
    sm_disk: DiskId,
    snap_dir: TempDir,
}

impl Rig {
    fn new(seed: u64, model: LossModel) -> Self {
        let switch = PowerSwitch::new(seed, model);
        let log_disk = switch.add_disk();
        let journal_disk = switch.add_disk();
        let sm_disk = switch.add_disk();
        Rig { switch, log_disk, journal_disk, sm_disk, snap_dir: tempfile::tempdir().expect("tempdir") }
    }

    fn open(&self) -> Result<(RedbLogStore, RedbStateMachine), String> {
        let log = RedbLogStore::open_with_backends(
            self.switch.backend(self.log_disk),
            self.switch.backend(self.journal_disk),
            JOURNAL_BYTES,
            NO_CAP,
        )
        .map_err(|e| format!("reopen log: {e}"))?;
        let sm = RedbStateMachine::open_with_backend(self.switch.backend(self.sm_disk), self.snap_dir.path())
            .map_err(|e| format!("reopen state machine: {e}"))?;
        Ok((log, sm))
    }
}

/// What the driver knows was acknowledged.
#[derive(Clone, Debug, Default)]
struct Model {
    log: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    /// Highest log id handed to the state machine as committed (all of it is in the durable log).
    committed: Option<LogId>,
    applied: Option<LogId>,
    term: u64,
    clock_ms: u64,
    seqs: [u64; CLIENTS],
}

impl Model {
    /// The index the next appended entry gets (openraft's log starts at index 0).
    fn next_index(&self) -> u64 {
        next(self.log.values().next_back().map(|e| e.log_id).or(self.last_purged))
    }

    fn id_at(&self, index: u64) -> Option<LogId> {
        self.log.get(&index).map(|e| e.log_id).or(self.last_purged.filter(|l| l.index == index))
    }
}

/// The operation that was running when the power went out: it may or may not have taken effect.
#[derive(Debug)]
enum InFlight {
    None,
    Append(Vec<Entry>),
    Truncate(u64),
    Purge(LogId),
    Vote(Vote),
    /// A snapshot of the state at this index being installed (the log is not touched).
    Install(u64),
}

/// Log contents as compared: (last purged, index → encoded entry).
type LogImage = (Option<LogId>, Vec<(u64, Vec<u8>)>);

fn image_of(last_purged: Option<LogId>, log: &BTreeMap<u64, Entry>) -> LogImage {
    (last_purged, log.iter().map(|(i, e)| (*i, enc(e))).collect())
}

fn log_candidates(model: &Model, in_flight: &InFlight) -> Vec<LogImage> {
    let mut out = vec![image_of(model.last_purged, &model.log)];
    let mut log = model.log.clone();
    let mut purged = model.last_purged;
    match in_flight {
        InFlight::Append(entries) => {
            for e in entries {
                log.insert(e.log_id.index, e.clone());
            }
        }
        InFlight::Truncate(index) => log.retain(|i, _| i < index),
        InFlight::Purge(id) => {
            log.retain(|i, _| *i > id.index);
            purged = Some(*id);
        }
        InFlight::None | InFlight::Vote(_) | InFlight::Install(_) => return out,
    }
    out.push(image_of(purged, &log));
    out
}

/// A random client write over a small key space: sessions retry, go stale and expire.
fn random_request(rng: &mut StdRng, model: &mut Model) -> WriteRequest {
    let key = |rng: &mut StdRng| format!("k{}", rng.random_range(0..KEYS)).into_bytes();
    let value = |rng: &mut StdRng| format!("v{}", rng.random_range(0..4u8)).into_bytes();
    let command = match rng.random_range(0..10) {
        0..=4 => WriteCommand::Put { key: key(rng), value: value(rng) },
        5 => WriteCommand::Delete { key: key(rng) },
        6..=7 => WriteCommand::Cas {
            key: key(rng),
            expected: if rng.random_bool(0.3) { None } else { Some(value(rng)) },
            new_value: value(rng),
        },
        _ => WriteCommand::Batch {
            ops: (0..rng.random_range(1..4))
                .map(|_| {
                    if rng.random_bool(0.7) {
                        BatchOp::Put { key: key(rng), value: value(rng) }
                    } else {
                        BatchOp::Delete { key: key(rng) }
                    }
                })
                .collect(),
        },
    };
    let c = rng.random_range(0..CLIENTS);
    match rng.random_range(0..10) {
        0 => {}                                                      // a retry of the last write (same seq)
        1 => model.seqs[c] = model.seqs[c].saturating_sub(1).max(1), // stale
        _ => model.seqs[c] += 1,
    }
    model.seqs[c] = model.seqs[c].max(1);
    // Sometimes more than the session TTL passes: sessions expire on every replica alike.
    model.clock_ms += if rng.random_bool(0.05) { 2 * 60 * 60 * 1000 } else { rng.random_range(0..1000) };
    WriteRequest {
        session: WriteSession { client_id: Id128([c as u8 + 1; 16]), seq: model.seqs[c] },
        command,
        timestamp_ms: model.clock_ms,
    }
}

fn random_entries(rng: &mut StdRng, model: &mut Model) -> Vec<Entry> {
    let first = model.next_index();
    (first..first + rng.random_range(1..5))
        .map(|index| {
            let payload = match rng.random_range(0..20) {
                0 => EntryPayload::Blank,
                1 => {
                    let voters: BTreeSet<u64> = (1..=rng.random_range(1..4)).collect();
                    EntryPayload::Membership(Membership::new(vec![voters], None))
                }
                _ => EntryPayload::Normal(random_request(rng, model).into()),
            };
            Entry { log_id: log_id(model.term, index), payload }
        })
        .collect()
}

#[derive(Debug, Default)]
struct Stats {
    epochs: u64,
    mid_op_cuts: u64,
    acked_entries: u64,
    purged_epochs: u64,
    in_flight: BTreeMap<&'static str, u64>,
    io_calls: u64,
    bytes_written: u64,
}

thread_local! {
    static STATS: std::cell::RefCell<Stats> = Default::default();
}

/// Knobs of one run.
#[derive(Clone, Copy, Debug)]
struct RunOpts {
    /// The log disk's fsync lies (to prove the harness notices a missing fsync).
    lying_log_sync: bool,
    /// The loss model; by default it rotates with the seed.
    model: Option<LossModel>,
}

/// One seeded run: `EPOCHS` times, drive the stores until the power is cut, reboot and check.
async fn run(seed: u64, opts: RunOpts) -> TestResult {
    let mut rng = StdRng::seed_from_u64(seed);
    let model_kind =
        opts.model.unwrap_or([LossModel::LoseUnsynced, LossModel::Reordered, LossModel::Torn][(seed % 3) as usize]);
    let rig = Rig::new(seed ^ 0x5eed, model_kind);
    let mut model = Model { term: 1, ..Model::default() };
    let (mut log, mut sm) = rig.open()?;
    if opts.lying_log_sync {
        rig.switch.set_lying_sync(rig.log_disk, true);
    }
    for epoch in 0..EPOCHS {
        let cut_at = rig.switch.io_calls() + rng.random_range(0..CUT_WINDOW);
        rig.switch.cut_at_io(cut_at);
        let mut in_flight = InFlight::None;
        for _ in 0..MAX_OPS {
            match step(&mut rng, &mut model, &mut log, &mut sm).await {
                Ok(()) => {}
                Err((op, e)) => {
                    ensure!(!rig.switch.is_powered(), "epoch {epoch}: storage failed with the power on: {e}");
                    in_flight = op;
                    break;
                }
            }
        }
        STATS.with(|st| {
            let mut st = st.borrow_mut();
            st.epochs += 1;
            st.mid_op_cuts += u64::from(!rig.switch.is_powered());
            st.acked_entries += model.log.len() as u64;
            st.purged_epochs += u64::from(model.last_purged.is_some());
            let kind = match in_flight {
                InFlight::None => "other",
                InFlight::Append(_) => "append",
                InFlight::Truncate(_) => "truncate",
                InFlight::Purge(_) => "purge",
                InFlight::Vote(_) => "vote",
                InFlight::Install(_) => "install",
            };
            *st.in_flight.entry(kind).or_default() += 1;
            st.io_calls = rig.switch.io_calls();
            st.bytes_written = rig.switch.bytes_written();
        });
        rig.switch.cut();
        // The old stores only see I/O errors now; dropping them must not panic.
        drop((log, sm));
        rig.switch.restore();
        (log, sm) = rig.open().map_err(|e| format!("epoch {epoch} ({model_kind:?}): {e}"))?;
        check(&mut model, &in_flight, &mut log, &mut sm)
            .await
            .map_err(|e| format!("epoch {epoch} ({model_kind:?}), in flight {in_flight:?}: {e}"))?;
    }
    Ok(())
}

/// One openraft-like storage operation. On failure, returns what was in flight.
async fn step(
    rng: &mut StdRng,
    model: &mut Model,
    log: &mut RedbLogStore,
    sm: &mut RedbStateMachine,
) -> Result<(), (InFlight, String)> {
    // Everything below `end` is flushed, everything below `committed` is committed.
    let end = model.next_index();
    let committed = next(model.committed);
    match rng.random_range(0..100) {
        // Append; the acknowledgement is the LogFlushed callback (`blocking_append` waits for it).
        0..=44 => {
            let entries = random_entries(rng, model);
            log.blocking_append(entries.clone())
                .await
                .map_err(|e| (InFlight::Append(entries.clone()), e.to_string()))?;
            for e in entries {
                model.log.insert(e.log_id.index, e);
            }
        }
        // Commit up to some flushed index and apply, in one or two batches.
        45..=69 if end > committed => {
            let upto = rng.random_range(committed..end);
            let id = model.id_at(upto).expect("flushed entry");
            // Committed (by the quorum) before it is saved, and saving it is not fsync'd.
            model.committed = Some(id);
            log.save_committed(Some(id)).await.map_err(|e| (InFlight::None, e.to_string()))?;
            let entries = entries_in(&model.log, next(model.applied), upto + 1);
            let split = rng.random_range(0..=entries.len());
            for part in [&entries[..split], &entries[split..]] {
                if let Some(last) = part.last() {
                    sm.apply(part.to_vec()).await.map_err(|e| (InFlight::None, e.to_string()))?;
                    model.applied = Some(last.log_id);
                }
            }
        }
        // A new term: the vote is fsync'd before it counts.
        70..=77 => {
            let vote = Vote::new_committed(model.term + 1, LEADER);
            log.save_vote(&vote).await.map_err(|e| (InFlight::Vote(vote), e.to_string()))?;
            model.vote = Some(vote);
            model.term += 1;
        }
        // A new leader overwrites the uncommitted tail.
        78..=85 if end > committed && model.log.contains_key(&committed) => {
            let at = rng.random_range(committed..end);
            let id = model.id_at(at).expect("entry in log");
            log.truncate(id).await.map_err(|e| (InFlight::Truncate(at), e.to_string()))?;
            model.log.retain(|i, _| *i < at);
            model.term += 1;
        }
        // Snapshot, then purge the log behind it.
        86..=92 => {
            let snap =
                sm.get_snapshot_builder().await.build_snapshot().await.map_err(|e| (InFlight::None, e.to_string()))?;
            let purged = next(model.last_purged);
            if let Some(snap_last) = snap.meta.last_log_id.filter(|l| l.index >= purged) {
                let upto = rng.random_range(purged..=snap_last.index);
                let id = model.id_at(upto).expect("snapshotted entry in log");
                log.purge(id).await.map_err(|e| (InFlight::Purge(id), e.to_string()))?;
                model.log.retain(|i, _| *i > upto);
                model.last_purged = Some(id);
            }
        }
        // A follower catching up: entries are committed and the state at the new commit index
        // arrives as a snapshot (made by another state machine on the real file system) and
        // replaces this one's.
        93..=96 if end > committed => {
            let upto = rng.random_range(committed..end);
            let id = model.id_at(upto).expect("flushed entry");
            model.committed = Some(id);
            log.save_committed(Some(id)).await.map_err(|e| (InFlight::None, e.to_string()))?;
            let stream =
                state_at(sm, &model.log, next(model.applied), upto + 1).await.map_err(|e| (InFlight::None, e))?;
            let meta = stream.meta.clone();
            sm.install_snapshot(&meta, stream.snapshot).await.map_err(|e| (InFlight::Install(upto), e.to_string()))?;
            model.applied = meta.last_log_id;
        }
        // Reads, as the request path and replication do.
        _ => {
            log.try_get_log_entries(..).await.map_err(|e| (InFlight::None, e.to_string()))?;
            sm.applied_state().await.map_err(|e| (InFlight::None, e.to_string()))?;
        }
    }
    Ok(())
}

/// A snapshot of `sm`'s state with `log`'s entries in `from..end` applied after it, made by a
/// state machine on the real file system (its file already written).
async fn state_at(
    sm: &mut RedbStateMachine,
    log: &BTreeMap<u64, Entry>,
    from: u64,
    end: u64,
) -> Result<openraft::Snapshot<crate::api::raft::TypeConfig>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut other = RedbStateMachine::open(&dir.path().join("state-machine.db"), 1 << 20).map_err(|e| e.to_string())?;
    if let Some(snap) = sm.get_current_snapshot().await.map_err(|e| format!("current snapshot: {e}"))? {
        let meta = snap.meta.clone();
        other.install_snapshot(&meta, snap.snapshot).await.map_err(|e| format!("install into the other: {e}"))?;
    }
    other.apply(entries_in(log, from, end)).await.map_err(|e| format!("apply to the other: {e}"))?;
    let snap = other.get_current_snapshot().await.map_err(|e| e.to_string())?.ok_or("nothing applied")?;
    // Made now, while `dir` exists (an unlinked file: it outlives the directory).
    let file = snap.snapshot.into_std().await.map_err(|e| format!("snapshot file: {e}"))?;
    Ok(openraft::Snapshot { meta: snap.meta, snapshot: Box::new(crate::api::raft::SnapshotData::file(file)) })
}

/// Checks the reopened stores against the model, then makes the model the recovered state.
async fn check(
    model: &mut Model,
    in_flight: &InFlight,
    log: &mut RedbLogStore,
    sm: &mut RedbStateMachine,
) -> TestResult {
    // The log: exactly the acknowledged one, or with the in-flight operation done.
    let state = log.get_log_state().await.map_err(|e| format!("log state: {e}"))?;
    let entries = log.try_get_log_entries(..).await.map_err(|e| format!("read log: {e}"))?;
    let durable: BTreeMap<u64, Entry> = entries.into_iter().map(|e| (e.log_id.index, e)).collect();
    let image = image_of(state.last_purged_log_id, &durable);
    let candidates = log_candidates(model, in_flight);
    if !candidates.contains(&image) {
        let expected = image_of(model.last_purged, &model.log);
        let lost: Vec<u64> = expected.1.iter().filter(|e| !image.1.contains(e)).map(|e| e.0).collect();
        return Err(format!(
            "durable log (purged {:?}, indexes {:?}) is not the acknowledged log (purged {:?}, indexes {:?}); \
             acknowledged entries lost or changed: {lost:?}",
            image.0,
            image.1.iter().map(|e| e.0).collect::<Vec<_>>(),
            expected.0,
            expected.1.iter().map(|e| e.0).collect::<Vec<_>>(),
        ));
    }

    // The vote.
    let vote = log.read_vote().await.map_err(|e| format!("read vote: {e}"))?;
    let ok = vote == model.vote || matches!(in_flight, InFlight::Vote(v) if vote == Some(*v));
    ensure!(ok, "durable vote {vote:?}, acknowledged {:?}", model.vote);

    // Nothing ahead of what was committed; nothing needed for replay purged.
    // Entries below `committed_end` are committed.
    let committed_end = next(model.committed);
    let durable_committed = log.read_committed().await.map_err(|e| format!("read committed: {e}"))?;
    ensure!(
        next(durable_committed) <= committed_end,
        "durable committed {durable_committed:?} is ahead of the commit index {:?}",
        model.committed
    );
    let (applied, _) = sm.applied_state().await.map_err(|e| format!("applied state: {e}"))?;
    ensure!(
        next(applied) <= committed_end,
        "last_applied {applied:?} is ahead of the commit index {:?}",
        model.committed
    );
    ensure!(
        applied >= state.last_purged_log_id,
        "last_applied {applied:?} is behind the purged log {:?}: entries needed for replay are gone",
        state.last_purged_log_id
    );
    if let Some(a) = applied {
        ensure!(durable.get(&a.index).is_none_or(|e| e.log_id == a), "last_applied {a} is not the log's entry");
    }
    // An install cut short leaves the old state (what was durably applied before it) or the new.
    if let InFlight::Install(at) = in_flight {
        ensure!(
            applied.map(|a| a.index) == Some(*at) || applied <= model.applied,
            "after a cut while installing the state at {at}, last_applied is {applied:?} (was {:?})",
            model.applied
        );
    }

    // openraft's restart: re-applies the durable log after last_applied up to committed.
    let restarted = StorageHelper::new(log, sm).get_initial_state().await.map_err(|e| format!("restart: {e}"))?;
    let restarted_applied = restarted.committed;
    // The leader commits the rest again: apply up to the commit index.
    let rest = entries_in(&durable, next(restarted_applied), committed_end);
    if !rest.is_empty() {
        sm.apply(rest).await.map_err(|e| format!("apply after restart: {e}"))?;
    }

    // The reference: a replay of the durable log, from the snapshot if the log was purged.
    let reference = replay_reference(sm, &durable, state.last_purged_log_id, committed_end).await?;
    let got = sm.fingerprint().map_err(|e| format!("fingerprint: {e}"))?;
    ensure!(
        got == reference,
        "state after restart (applied {applied:?}, restart applied {restarted_applied:?}) differs from a replay of \
         the durable log up to {:?}",
        model.committed
    );

    // Go on from the recovered state.
    model.log = durable;
    model.last_purged = state.last_purged_log_id;
    model.vote = vote;
    model.applied = model.committed;
    let top_term = model.log.values().map(|e| e.log_id.leader_id.term).max().unwrap_or(0);
    model.term = model.term.max(top_term).max(vote.map(|v| v.leader_id.term).unwrap_or(0));
    Ok(())
}

async fn replay_reference(
    sm: &mut RedbStateMachine,
    durable: &BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    end: u64,
) -> Result<Vec<u8>, String> {
    let switch = PowerSwitch::new(0, LossModel::LoseUnsynced);
    let disk = switch.add_disk();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut reference = RedbStateMachine::open_with_backend(switch.backend(disk), dir.path())
        .map_err(|e| format!("open reference: {e}"))?;
    let mut from = 0;
    if last_purged.is_some() {
        let snap = sm
            .get_current_snapshot()
            .await
            .map_err(|e| format!("read snapshot: {e}"))?
            .ok_or("the log was purged but there is no snapshot")?;
        ensure_ok(snap.meta.last_log_id >= last_purged, || {
            format!("snapshot {:?} is behind the purged log {last_purged:?}", snap.meta.last_log_id)
        })?;
        from = next(snap.meta.last_log_id);
        reference.install_snapshot(&snap.meta, snap.snapshot).await.map_err(|e| format!("install snapshot: {e}"))?;
    }
    let entries = entries_in(durable, from, end);
    let expected = (from..end).count();
    ensure_ok(entries.len() == expected, || {
        format!("the durable log lacks committed entries in {from}..{end} ({} of {expected})", entries.len())
    })?;
    if !entries.is_empty() {
        reference.apply(entries).await.map_err(|e| format!("reference apply: {e}"))?;
    }
    reference.fingerprint().map_err(|e| format!("reference fingerprint: {e}"))
}

/// The entries of `log` in `from..end` (none if `from >= end`).
fn entries_in(log: &BTreeMap<u64, Entry>, from: u64, end: u64) -> Vec<Entry> {
    if from >= end {
        return Vec::new();
    }
    log.range(from..end).map(|(_, e)| e.clone()).collect()
}

fn ensure_ok(cond: bool, msg: impl FnOnce() -> String) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// The seeds to run: `POWERCUT_SEED` alone, or `POWERCUT_RUNS` (default `default_runs`) seeds
/// from a random base that is printed.
fn seeds(default_runs: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("POWERCUT_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let runs = std::env::var("POWERCUT_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_runs);
    let base: u64 = rand::random::<u64>() >> 16;
    println!("power-cut runs: seeds {base}..{} (POWERCUT_SEED=<seed> reruns one)", base + runs);
    (base..base + runs).collect()
}

/// The storage layer under 100 seeded runs of two power cuts each, at random I/O calls, under
/// all three loss models: acknowledged appends and votes survive, and the state machine after
/// openraft's restart equals a replay of the durable log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_power_cuts_at_random_points() {
    let started = std::time::Instant::now();
    for seed in seeds(100) {
        if let Err(e) = run(seed, RunOpts { lying_log_sync: false, model: None }).await {
            panic!("seed {seed}: {e}\n  rerun: POWERCUT_SEED={seed} cargo test -p aspen --lib powercut_tests");
        }
    }
    println!("power-cut runs took {:?}", started.elapsed());
    STATS.with(|st| println!("{:?}", st.borrow()));
}

/// The harness can fail: on a disk whose fsync lies (an append acknowledged before it is
/// durable), the same runs find lost acknowledged entries. (Only unsynced writes are lost here:
/// with a lying fsync, a random subset of writes surviving leaves a corrupt file, and redb 4.6
/// panics on some corrupt files instead of returning an error.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_fsync_is_caught() {
    let seeds = seeds(30);
    let mut caught = Vec::new();
    for &seed in &seeds {
        if let Err(e) = run(seed, RunOpts { lying_log_sync: true, model: Some(LossModel::LoseUnsynced) }).await {
            caught.push((seed, e));
        }
    }
    assert!(
        caught.len() * 10 >= seeds.len() * 7,
        "only {} of {} runs noticed the lying fsync",
        caught.len(),
        seeds.len()
    );
    assert!(
        caught.iter().any(|(_, e)| e.contains("acknowledged entries lost")),
        "the failures name lost acknowledged entries: {caught:?}"
    );
}

/// Regression (first boot): a cut at any I/O call while a store's database is created leaves a
/// node that starts. redb's own `create` is not crash-atomic — some cut points (deterministic:
/// the model loses exactly the unsynced writes) leave a zero-filled file that redb refuses
/// ("magic number mismatch") — so `open_db` builds a new database under `*.creating` and renames
/// it into place. Each image a cut leaves is put where that crash would leave it, and the stores
/// must open from the real file system, empty and writable (every refused image, and a sample).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_while_creating_the_stores_leaves_them_openable() {
    let calls = {
        let rig = Rig::new(0, LossModel::LoseUnsynced);
        let _stores = rig.open().expect("open");
        rig.switch.io_calls()
    };
    let mut refused_by_redb = 0;
    for model in [LossModel::LoseUnsynced, LossModel::Reordered, LossModel::Torn] {
        for cut in 0..calls {
            let rig = Rig::new(cut, model);
            rig.switch.cut_at_io(cut);
            assert!(rig.open().is_err(), "{model:?} cut {cut}: the open failed");
            rig.switch.restore();
            let refused = rig.open().is_err();
            refused_by_redb += u64::from(refused);
            // Real files are slow: check the refused images and a sample of the others.
            if !refused && cut % 8 != 0 {
                continue;
            }
            let dir = tempfile::tempdir().expect("tempdir");
            let log_path = dir.path().join("raft-log.db");
            let sm_path = dir.path().join("state-machine.db");
            for (path, disk) in [(&log_path, rig.log_disk), (&sm_path, rig.sm_disk)] {
                std::fs::write(super::creating_path(path), rig.switch.durable_image(disk)).expect("write image");
            }
            let journal_path = super::journal::path_beside(&log_path);
            std::fs::write(&journal_path, rig.switch.durable_image(rig.journal_disk)).expect("write image");
            let what = format!("{model:?} cut {cut} of {calls}");
            let mut log =
                RedbLogStore::open(&log_path, NO_CAP, 1 << 20).unwrap_or_else(|e| panic!("{what}: open log: {e}"));
            let mut sm = RedbStateMachine::open(&sm_path, 1 << 20).unwrap_or_else(|e| panic!("{what}: open sm: {e}"));
            assert_eq!(log.get_log_state().await.expect("log state").last_log_id, None, "{what}");
            assert_eq!(sm.applied_state().await.expect("applied state").0, None, "{what}");
            log.blocking_append(vec![Entry { log_id: log_id(1, 0), payload: EntryPayload::Blank }])
                .await
                .unwrap_or_else(|e| panic!("{what}: append after reboot: {e}"));
            assert!(!super::creating_path(&log_path).exists(), "{what}: the temporary file is gone");
        }
    }
    assert!(refused_by_redb > 0, "some cut leaves an image redb's create cannot reopen (why open_db renames)");
}

/// One run of the leader-overlap path: the log store acknowledges the leader's own appends
/// before their fsync (`overlap_own_appends`) and the state machine applies an entry only once
/// it is durable (`wait_for_log`, unless `sm_waits` is false: the harness's own check).
/// Appends and applies go on until the power is cut at a random I/O call; after the reboot,
/// everything the state machine applied — all a client could have been told — must be in the
/// durable log, which must hold exactly a prefix of what was appended.
async fn overlap_run(seed: u64, sm_waits: bool) -> TestResult {
    let mut rng = StdRng::seed_from_u64(seed);
    let kind = [LossModel::LoseUnsynced, LossModel::Reordered, LossModel::Torn][(seed % 3) as usize];
    let rig = Rig::new(seed ^ 0x0fe1, kind);
    let (log, sm) = rig.open()?;
    let mut log = log.overlap_own_appends(LEADER);
    let mut sm = if sm_waits { sm.wait_for_log(log.durable()) } else { sm };
    log.save_vote(&Vote::new_committed(1, LEADER)).await.map_err(|e| format!("save vote: {e}"))?;
    let mut model = Model { term: 1, ..Model::default() };
    rig.switch.cut_at_io(rig.switch.io_calls() + rng.random_range(0..CUT_WINDOW));
    let mut appended: Vec<Entry> = Vec::new();
    let mut applied = 0usize;
    for _ in 0..MAX_OPS {
        let first = appended.len() as u64;
        let entries: Vec<Entry> = (first..first + rng.random_range(1..4))
            .map(|i| Entry {
                log_id: log_id(1, i),
                payload: EntryPayload::Normal(random_request(&mut rng, &mut model).into()),
            })
            .collect();
        // The leader's own entries: acknowledged without waiting for the disk, power or not.
        tokio::time::timeout(std::time::Duration::from_secs(20), log.blocking_append(entries.clone()))
            .await
            .map_err(|_| "the leader's own append waited for its fsync".to_string())?
            .map_err(|e| format!("append: {e}"))?;
        appended.extend(entries);
        if rng.random_bool(0.5) {
            let upto = rng.random_range(applied..appended.len()) + 1;
            match sm.apply(appended[applied..upto].to_vec()).await {
                Ok(_) => applied = upto,
                Err(e) => {
                    ensure!(!rig.switch.is_powered(), "apply failed with the power on: {e}");
                    break;
                }
            }
        }
        if !rig.switch.is_powered() && rng.random_bool(0.2) {
            break;
        }
    }
    rig.switch.cut();
    drop((log, sm));
    rig.switch.restore();
    let (mut log, mut sm) = rig.open()?;
    let durable: Vec<Vec<u8>> =
        log.try_get_log_entries(..).await.map_err(|e| format!("read log: {e}"))?.iter().map(enc).collect();
    let sent: Vec<Vec<u8>> = appended.iter().map(enc).collect();
    ensure!(
        durable.len() <= sent.len() && durable[..] == sent[..durable.len()],
        "the durable log ({} entries) is not a prefix of the {} appended ({kind:?})",
        durable.len(),
        sent.len()
    );
    ensure!(
        applied <= durable.len(),
        "applied entries lost: {applied} applied before the cut, {} in the durable log ({kind:?})",
        durable.len()
    );
    let (last_applied, _) = sm.applied_state().await.map_err(|e| format!("applied state: {e}"))?;
    ensure!(
        next(last_applied) as usize <= durable.len(),
        "the state machine's durable last_applied {last_applied:?} passes the durable log ({} entries)",
        durable.len()
    );
    Ok(())
}

/// The leader's early-acknowledged appends under power cuts: nothing applied is ever lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapped_leader_appends_lose_nothing_that_was_applied() {
    for seed in seeds(60) {
        if let Err(e) = overlap_run(seed, true).await {
            panic!(
                "seed {seed}: {e}\n  rerun: POWERCUT_SEED={seed} cargo test -p aspen --lib powercut_tests::overlapped"
            );
        }
    }
}

/// ...and the check can fail: a state machine that does not wait for the leader's log applies
/// entries a power cut then takes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_ahead_of_the_leaders_disk_is_caught() {
    let seeds = seeds(60);
    let mut caught = Vec::new();
    for &seed in &seeds {
        if let Err(e) = overlap_run(seed, false).await {
            caught.push(e);
        }
    }
    // About half the runs cut the power while an applied entry is still unsynced.
    assert!(
        caught.len() * 6 >= seeds.len(),
        "only {} of {} runs noticed applies ahead of the durable log",
        caught.len(),
        seeds.len()
    );
    assert!(caught.iter().all(|e| e.contains("applied entries lost")), "{caught:?}");
}

// ---------------------------------------------------------------------------------------------
// Several shards on the node's journal (`super::shared_journal`)

/// Shards sharing one journal in the shared runs.
const SHARED_SHARDS: usize = 3;
/// A small ring (32 record blocks), so that runs fill it, wrap it and fall back to direct
/// writes into the shards' databases.
const SHARED_JOURNAL_BYTES: u64 = 33 * 512;

/// The stores of several shards of one simulated node: a log and a state-machine disk per
/// shard and ONE journal disk, all on one power switch.
struct SharedRig {
    switch: PowerSwitch,
    journal_disk: DiskId,
    shards: Vec<(DiskId, DiskId, TempDir)>,
}

impl SharedRig {
    fn new(seed: u64, model: LossModel) -> Self {
        let switch = PowerSwitch::new(seed, model);
        let journal_disk = switch.add_disk();
        let shards = (0..SHARED_SHARDS)
            .map(|_| (switch.add_disk(), switch.add_disk(), tempfile::tempdir().expect("tempdir")))
            .collect();
        SharedRig { switch, journal_disk, shards }
    }

    fn open(&self) -> Result<Vec<(RedbLogStore, RedbStateMachine)>, String> {
        let journal = SharedJournal::open(self.switch.backend(self.journal_disk), SHARED_JOURNAL_BYTES)
            .map_err(|e| format!("reopen journal: {e}"))?;
        let mut stores = Vec::new();
        for (shard, (log_disk, sm_disk, dir)) in self.shards.iter().enumerate() {
            let log =
                RedbLogStore::open_shared_with_backend(self.switch.backend(*log_disk), &journal, shard as u32, NO_CAP)
                    .map_err(|e| format!("reopen log of shard {shard}: {e}"))?;
            let sm = RedbStateMachine::open_with_backend(self.switch.backend(*sm_disk), dir.path())
                .map_err(|e| format!("reopen state machine of shard {shard}: {e}"))?;
            stores.push((log, sm));
        }
        ensure_ok(journal.unclaimed().is_empty(), || format!("unclaimed journal records: {:?}", journal.unclaimed()))?;
        Ok(stores)
    }
}

/// One seeded run over several shards on one journal: the single-shard operations on a random
/// shard, and rounds in which every shard appends at once (their records share fsyncs, and a
/// cut can fall in the middle of such a group commit). After each cut every shard is checked
/// as in [`run`]: exactly its acknowledged log (or that with its in-flight operation), and a
/// state machine equal to a replay of it.
async fn shared_run(seed: u64) -> TestResult {
    let mut rng = StdRng::seed_from_u64(seed);
    let kind = [LossModel::LoseUnsynced, LossModel::Reordered, LossModel::Torn][(seed % 3) as usize];
    let rig = SharedRig::new(seed ^ 0x5a4e, kind);
    let mut models: Vec<Model> = (0..SHARED_SHARDS).map(|_| Model { term: 1, ..Model::default() }).collect();
    let mut stores = rig.open()?;
    for epoch in 0..EPOCHS {
        let cut_at = rig.switch.io_calls() + rng.random_range(0..CUT_WINDOW * SHARED_SHARDS as u64);
        rig.switch.cut_at_io(cut_at);
        let mut in_flight: Vec<InFlight> = (0..SHARED_SHARDS).map(|_| InFlight::None).collect();
        for _ in 0..MAX_OPS * SHARED_SHARDS {
            if rng.random_bool(0.4) {
                let batches: Vec<Vec<Entry>> = models.iter_mut().map(|m| random_entries(&mut rng, m)).collect();
                let appends =
                    stores.iter_mut().zip(&batches).map(|((log, _), entries)| log.blocking_append(entries.clone()));
                let results = futures::future::join_all(appends).await;
                let mut failed = None;
                for (shard, result) in results.into_iter().enumerate() {
                    match result {
                        Ok(()) => {
                            for e in &batches[shard] {
                                models[shard].log.insert(e.log_id.index, e.clone());
                            }
                        }
                        Err(e) => {
                            in_flight[shard] = InFlight::Append(batches[shard].clone());
                            failed = Some(e.to_string());
                        }
                    }
                }
                if let Some(e) = failed {
                    ensure!(!rig.switch.is_powered(), "epoch {epoch}: a shared append failed with the power on: {e}");
                    STATS.with(|st| st.borrow_mut().mid_op_cuts += 1);
                    break;
                }
            } else {
                let shard = rng.random_range(0..SHARED_SHARDS);
                let (log, sm) = &mut stores[shard];
                if let Err((op, e)) = step(&mut rng, &mut models[shard], log, sm).await {
                    ensure!(!rig.switch.is_powered(), "epoch {epoch}: shard {shard} failed with the power on: {e}");
                    in_flight[shard] = op;
                    break;
                }
            }
        }
        rig.switch.cut();
        drop(stores);
        rig.switch.restore();
        stores = rig.open().map_err(|e| format!("epoch {epoch} ({kind:?}): {e}"))?;
        for (shard, (log, sm)) in stores.iter_mut().enumerate() {
            check(&mut models[shard], &in_flight[shard], log, sm).await.map_err(|e| {
                format!("epoch {epoch} ({kind:?}), shard {shard}, in flight {:?}: {e}", in_flight[shard])
            })?;
            STATS.with(|st| st.borrow_mut().acked_entries += models[shard].log.len() as u64);
        }
    }
    Ok(())
}

/// Three shards on one node journal under seeded runs of two power cuts each, at random I/O
/// calls (inside group commits too), under all three loss models: each shard recovers exactly
/// its durable prefix, and its state machine equals a replay of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_sharing_the_node_journal_recover_exactly_their_acknowledged_logs() {
    let started = std::time::Instant::now();
    for seed in seeds(40) {
        if let Err(e) = shared_run(seed).await {
            panic!("seed {seed}: {e}\n  rerun: POWERCUT_SEED={seed} cargo test -p aspen --lib powercut_tests::shards_sharing");
        }
    }
    println!("shared-journal power-cut runs took {:?}", started.elapsed());
    STATS.with(|st| println!("{:?}", st.borrow()));
}

/// A cut at any I/O call while the node journal is made leaves a file that opens (empty) after
/// the reboot.
#[test]
fn a_cut_while_making_the_node_journal_leaves_it_openable() {
    let calls = {
        let switch = PowerSwitch::new(0, LossModel::LoseUnsynced);
        let disk = switch.add_disk();
        SharedJournal::open(switch.backend(disk), SHARED_JOURNAL_BYTES).expect("open");
        switch.io_calls()
    };
    for model in [LossModel::LoseUnsynced, LossModel::Reordered, LossModel::Torn] {
        for cut in 0..calls {
            let switch = PowerSwitch::new(cut, model);
            let disk = switch.add_disk();
            switch.cut_at_io(cut);
            assert!(SharedJournal::open(switch.backend(disk), SHARED_JOURNAL_BYTES).is_err(), "{model:?} cut {cut}");
            switch.restore();
            let journal = SharedJournal::open(switch.backend(disk), SHARED_JOURNAL_BYTES)
                .unwrap_or_else(|e| panic!("{model:?} cut {cut}: reopen: {e}"));
            assert!(journal.unclaimed().is_empty(), "{model:?} cut {cut}");
        }
    }
}
