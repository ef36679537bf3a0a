//! Whether this node's peers answer its Raft messages: one record per peer node, shared by every
//! shard of the node (it lives in the [`super::ConnectionPool`]), fed with the outcome of every
//! Raft RPC by `raft::network`.
//!
//! Why: openraft reports every failed RPC of every shard, heartbeats included; with a peer down
//! and four shards that was ~100 lines a second. The node's default log filter
//! (`logging::DEFAULT_LOG_FILTER`) drops those reports, and this module says what an operator
//! needs instead, per peer: `peer unreachable` (warn) once it has not answered for
//! [`DOWN_AFTER`], `peer still unreachable` (warn) at most every [`REMINDER_EVERY`] while that
//! lasts, and `peer reachable again` (info) at its first answer.
//!
//! Owns: the per-peer state and those log lines. Never: retry or decide anything for Raft
//! (openraft does); the network only asks [`Reachability::is_down`] so that it can report
//! failures to a peer that is down as `Unreachable`, which makes openraft back off instead of
//! retrying at every heartbeat.

use std::{
    collections::HashMap,
    fmt::Display,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use super::TransportError;
use crate::api::{FrameError, NodeId};

/// How long a peer must have answered nothing (every RPC to it failing) before it is reported
/// unreachable: one lost heartbeat, or a burst of timeouts under load, is not worth a line.
pub const DOWN_AFTER: Duration = Duration::from_secs(2);
/// While a peer stays unreachable, a reminder at most this often.
pub const REMINDER_EVERY: Duration = Duration::from_secs(30);

/// What one outcome changed, worth a line in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The peer has answered nothing for `silent_for` (at least [`DOWN_AFTER`]).
    Down { silent_for: Duration, failures: u64 },
    /// Still nothing, `REMINDER_EVERY` or more after the last line about it.
    StillDown { silent_for: Duration, failures: u64 },
    /// It answered again after `down_for` and `failures` failed RPCs.
    Up { down_for: Duration, failures: u64 },
}

#[derive(Debug, Default)]
struct Peer {
    /// Since when every RPC to the peer failed (`None`: its last RPC was answered).
    failing_since: Option<Instant>,
    /// RPCs that failed since then.
    failures: u64,
    /// When the peer was reported unreachable, and when last reminded (`None`: not reported).
    reported: Option<(Instant, Instant)>,
}

/// The reachability of every peer of this node (cheap to clone; clones share the state).
#[derive(Clone, Debug, Default)]
pub struct Reachability {
    peers: Arc<Mutex<HashMap<NodeId, Peer>>>,
    /// Peers with an RPC failing: while 0, an answer needs no lock.
    failing: Arc<AtomicUsize>,
}

impl Reachability {
    /// An RPC to `peer` (endpoint `endpoint`, for the log) was answered.
    pub fn answered(&self, peer: NodeId, endpoint: impl Display) {
        if let Some(Change::Up { down_for, failures }) = self.answered_at(peer, Instant::now()) {
            tracing::info!(
                peer,
                %endpoint,
                down_for = ?Rounded(down_for),
                failed_rpcs = failures,
                "peer reachable again"
            );
        }
    }

    /// An RPC to `peer` failed with `error` (see [`counts_as_silence`] for which errors count).
    pub fn failed(&self, peer: NodeId, endpoint: impl Display, error: &TransportError) {
        match self.failed_at(peer, Instant::now()) {
            Some(Change::Down { silent_for, failures }) => tracing::warn!(
                peer,
                %endpoint,
                silent_for = ?Rounded(silent_for),
                failed_rpcs = failures,
                %error,
                "peer unreachable"
            ),
            Some(Change::StillDown { silent_for, failures }) => tracing::warn!(
                peer,
                %endpoint,
                silent_for = ?Rounded(silent_for),
                failed_rpcs = failures,
                %error,
                "peer still unreachable"
            ),
            _ => {}
        }
    }

    /// Whether `peer` has been reported unreachable and has not answered since.
    pub fn is_down(&self, peer: NodeId) -> bool {
        if self.failing.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.lock().get(&peer).is_some_and(|p| p.reported.is_some())
    }

    /// The peers reported unreachable, in id order.
    pub fn down(&self) -> Vec<NodeId> {
        let mut down: Vec<NodeId> =
            self.lock().iter().filter(|(_, p)| p.reported.is_some()).map(|(id, _)| *id).collect();
        down.sort_unstable();
        down
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Self::answered`] at `now`: `Some(Up)` if the peer had been reported unreachable.
    pub fn answered_at(&self, peer: NodeId, now: Instant) -> Option<Change> {
        if self.failing.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut peers = self.lock();
        let p = peers.get_mut(&peer)?;
        let since = p.failing_since.take()?;
        self.failing.fetch_sub(1, Ordering::AcqRel);
        let failures = std::mem::take(&mut p.failures);
        p.reported.take().map(|_| Change::Up { down_for: now.saturating_duration_since(since), failures })
    }

    /// [`Self::failed`] at `now`: `Some(Down)` when the peer has now been silent for
    /// [`DOWN_AFTER`], `Some(StillDown)` when the last line about it is [`REMINDER_EVERY`] old.
    pub fn failed_at(&self, peer: NodeId, now: Instant) -> Option<Change> {
        let mut peers = self.lock();
        let p = peers.entry(peer).or_default();
        let since = match p.failing_since {
            Some(since) => since,
            None => {
                self.failing.fetch_add(1, Ordering::AcqRel);
                *p.failing_since.insert(now)
            }
        };
        p.failures += 1;
        let silent_for = now.saturating_duration_since(since);
        match &mut p.reported {
            None if silent_for >= DOWN_AFTER => {
                p.reported = Some((now, now));
                Some(Change::Down { silent_for, failures: p.failures })
            }
            Some((_, last)) if now.saturating_duration_since(*last) >= REMINDER_EVERY => {
                *last = now;
                Some(Change::StillDown { silent_for, failures: p.failures })
            }
            _ => None,
        }
    }
}

/// Whether `error` means the peer did not answer (it is down, cut off, or too slow to answer in
/// time), as opposed to an answer that was a refusal or made no sense, which proves it is up.
pub fn counts_as_silence(error: &TransportError) -> bool {
    match error {
        TransportError::NoAddress
        | TransportError::ConnectTimeout { .. }
        | TransportError::Connect { .. }
        | TransportError::Open(_)
        | TransportError::Write(_)
        | TransportError::Finish(_)
        | TransportError::LinkFailed { .. }
        | TransportError::Timeout(_)
        | TransportError::Dropped(_) => true,
        TransportError::Frame(FrameError::Io(_) | FrameError::Truncated) => true,
        TransportError::Frame(_)
        | TransportError::AlpnRefused { .. }
        | TransportError::Refused(_)
        | TransportError::NotAMember { .. }
        | TransportError::UnexpectedResponse => false,
    }
}

/// A duration printed to a tenth of a second (`2.1s`, not `2.100345127s`).
struct Rounded(Duration);

impl std::fmt::Debug for Rounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}s", self.0.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that stops answering: nothing for the first failures, one `Down` once it has been
    /// silent for `DOWN_AFTER`, nothing for the next heartbeats of every shard, one reminder
    /// per `REMINDER_EVERY`, and one `Up` at its first answer; another peer is unaffected.
    #[test]
    fn one_line_when_a_peer_goes_down_a_reminder_and_one_when_it_is_back() {
        let r = Reachability::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(r.answered_at(3, at(0)), None);
        // Four shards' heartbeats every 100 ms, all failing.
        let mut changes = Vec::new();
        for tick in 0..700u64 {
            for _shard in 0..4 {
                if let Some(c) = r.failed_at(3, at(tick * 100)) {
                    changes.push((tick * 100, c));
                }
            }
            assert_eq!(r.answered_at(2, at(tick * 100)), None, "peer 2 answers all along");
        }
        assert_eq!(
            changes,
            [
                (2_000, Change::Down { silent_for: Duration::from_secs(2), failures: 81 }),
                (32_000, Change::StillDown { silent_for: Duration::from_secs(32), failures: 1281 }),
                (62_000, Change::StillDown { silent_for: Duration::from_secs(62), failures: 2481 }),
            ]
        );
        assert!(r.is_down(3) && !r.is_down(2));
        assert_eq!(r.down(), [3]);
        assert_eq!(
            r.answered_at(3, at(70_000)),
            Some(Change::Up { down_for: Duration::from_secs(70), failures: 2800 })
        );
        assert_eq!(r.answered_at(3, at(70_100)), None, "one line, at the first answer");
        assert!(!r.is_down(3));
        assert!(r.down().is_empty());
    }

    /// Failures that an answer interrupts before `DOWN_AFTER` (a lost heartbeat, timeouts under
    /// load) are never reported, and the silence is measured from the last answer.
    #[test]
    fn a_blip_is_not_reported() {
        let r = Reachability::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for round in 0..10u64 {
            let start = round * 2_000;
            assert_eq!(r.failed_at(3, at(start)), None);
            assert_eq!(r.failed_at(3, at(start + 1_900)), None);
            assert_eq!(r.answered_at(3, at(start + 1_950)), None);
        }
        assert!(!r.is_down(3));
        assert_eq!(r.failing.load(Ordering::Acquire), 0, "no peer is failing after an answer");
    }

    #[test]
    fn refusals_prove_the_peer_is_up_and_timeouts_do_not() {
        use crate::api::raft_rpc::RaftRefusal;
        assert!(counts_as_silence(&TransportError::Timeout(Duration::from_millis(100))));
        assert!(counts_as_silence(&TransportError::LinkFailed { peer: "p".into(), reason: "closed".into() }));
        assert!(counts_as_silence(&TransportError::Frame(FrameError::Truncated)));
        assert!(!counts_as_silence(&TransportError::Refused(RaftRefusal::NotReady)));
        assert!(!counts_as_silence(&TransportError::AlpnRefused { peer: "p".into(), alpn: "a".into() }));
        assert!(!counts_as_silence(&TransportError::UnexpectedResponse));
    }
}
