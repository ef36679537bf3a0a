//! Room on the disk for a database write (docs/operations.md, "Storage quota and a full disk";
//! docs/design.md §12).
//!
//! Owns: [`SpaceGate`], which a write to a database waits at while the data dir's file system
//! has less free space than the write may need. redb refuses every write after one that failed
//! (until the database is reopened), and openraft stops a shard on any storage error: so the Raft
//! log's checkpoints and the state machine's applies wait for room rather than fail. The node's
//! space task (`cluster::alarm`) raises the NOSPACE alarm and releases its space reserve at the
//! same threshold, which usually makes the room at once.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How often a waiting write looks again.
const RECHECK: Duration = Duration::from_millis(200);
/// How often a write still waiting says so.
const REMIND: Duration = Duration::from_secs(30);

/// Free bytes for an unprivileged writer on the file system of `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Free space a write needs: `floor` bytes plus twice what it writes (copy-on-write pages).
#[derive(Debug, Clone)]
pub struct SpaceGate {
    dir: PathBuf,
    floor: u64,
}

impl SpaceGate {
    /// A gate for writes under `dir` that keeps `floor` bytes free.
    pub fn new(dir: &Path, floor: u64) -> Self {
        SpaceGate { dir: dir.to_path_buf(), floor }
    }

    /// Whether a write of about `bytes` fits now (`true` when free space cannot be read).
    pub fn room_for(&self, bytes: u64) -> bool {
        free_bytes(&self.dir).map_or(true, |free| free >= self.floor.saturating_add(bytes.saturating_mul(2)))
    }

    /// Blocks until a write of about `bytes` fits (`what` names it in the log), or `give_up`
    /// says to stop waiting (the store is closing: the write then fails as it would have).
    pub fn wait_blocking(&self, bytes: u64, what: &str, give_up: impl Fn() -> bool) {
        let mut waiting = Waiting::default();
        while !self.room_for(bytes) && !give_up() {
            waiting.say(self, bytes, what);
            std::thread::sleep(RECHECK);
        }
        waiting.done(self, what);
    }

    /// [`Self::wait_blocking`] for async callers.
    pub async fn wait(&self, bytes: u64, what: &str) {
        let mut waiting = Waiting::default();
        while !self.room_for(bytes) {
            waiting.say(self, bytes, what);
            tokio::time::sleep(RECHECK).await;
        }
        waiting.done(self, what);
    }
}

/// What a waiting write said in the log, and when.
#[derive(Default)]
struct Waiting(Option<Instant>);

impl Waiting {
    fn say(&mut self, gate: &SpaceGate, bytes: u64, what: &str) {
        if self.0.is_none_or(|t| t.elapsed() >= REMIND) {
            tracing::warn!("{what} waits for free disk space under {} ({bytes} bytes)", gate.dir.display());
            self.0 = Some(Instant::now());
        }
    }

    fn done(self, gate: &SpaceGate, what: &str) {
        if self.0.is_some() {
            tracing::info!("{what}: disk space available again under {}", gate.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_opens_for_writes_that_fit() {
        let dir = tempfile::tempdir().unwrap();
        assert!(SpaceGate::new(dir.path(), 0).room_for(1024));
        assert!(!SpaceGate::new(dir.path(), u64::MAX / 2).room_for(1024));
        assert!(!SpaceGate::new(dir.path(), 0).room_for(u64::MAX / 2));
    }
}
