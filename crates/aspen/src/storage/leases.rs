//! Leases in one shard (docs/design.md §16): the replicated tables, how lease commands change
//! them, and the in-memory deadlines a leader counts.
//!
//! Owns, in `state-machine.db`:
//! - `leases`: the leases whose **home** is this shard (id → granted TTL, revoking flag);
//! - `lease_keys`: (lease id, key) for every key of this shard attached to a lease (derived from
//!   the keys' records, which carry their lease; kept in the same transaction);
//! - `lease_tombstones` (+ `lease_tombstone_age`): leases revoked here within the last
//!   [`TOMBSTONE_TTL_MS`] (by the shard's session clock), at most [`MAX_TOMBSTONES`]. A put with
//!   a tombstoned lease is refused: it may have checked the lease at its home before the
//!   revocation reached this shard.
//!
//! And [`LeaseDeadlines`]: when each lease of this shard expires, counted by the shard's leader
//! from its own monotonic clock — never replicated, never decided by a follower. Apply tells it
//! about grants and revocations; a node that starts leading restarts every lease's TTL (etcd's
//! rule: a new leader cannot know the old one's renewals).
//!
//! Never: decide expiry inside apply (apply is deterministic; expiry is a leader's write).

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::StorageError;

/// Leases whose home is this shard: id → postcard [`LeaseRecord`].
pub(super) const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
/// (lease id, key) → (): this shard's keys attached to each lease.
pub(super) const LEASE_KEYS: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("lease_keys");
/// Revoked lease id → the session clock (ms) when this shard learned it.
pub(super) const TOMBSTONES: TableDefinition<u64, u64> = TableDefinition::new("lease_tombstones");
/// (clock ms, lease id) → (): tombstones oldest first.
pub(super) const TOMBSTONE_AGE: TableDefinition<(u64, u64), ()> = TableDefinition::new("lease_tombstone_age");

/// How long a shard remembers a revoked lease (session clock). A put with the lease that
/// checked it at its home before the revocation and arrives later than this is accepted.
pub const TOMBSTONE_TTL_MS: u64 = 60 * 60 * 1000;
/// At most this many tombstones per shard; the oldest go first.
pub const MAX_TOMBSTONES: u64 = 100_000;

const DIGEST_LEASE_CONTEXT: &str = "aspen state digest v1 lease";
const DIGEST_TOMBSTONE_CONTEXT: &str = "aspen state digest v1 lease tombstone";

/// A lease as its home shard stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub ttl_secs: u64,
    /// Revoked here; its other shards may still hold keys until the revocation completes.
    pub revoking: bool,
}

/// The digest item of a lease record.
pub(super) fn lease_item_hash(id: u64, rec: &LeaseRecord) -> [u8; 32] {
    let mut h = crate::api::derive_key_hasher!(DIGEST_LEASE_CONTEXT);
    h.update(&id.to_le_bytes());
    h.update(&rec.ttl_secs.to_le_bytes());
    h.update(&[rec.revoking as u8]);
    *h.finalize().as_bytes()
}

/// The digest item of a tombstone.
pub(super) fn tombstone_item_hash(id: u64, clock_ms: u64) -> [u8; 32] {
    let mut h = crate::api::derive_key_hasher!(DIGEST_TOMBSTONE_CONTEXT);
    h.update(&id.to_le_bytes());
    h.update(&clock_ms.to_le_bytes());
    *h.finalize().as_bytes()
}

pub(super) fn decode_record(bytes: &[u8]) -> Result<LeaseRecord, StorageError> {
    Ok(postcard::from_bytes(bytes)?)
}

/// The bounds of lease `id`'s entries in `lease_keys` (ids are at most `i64::MAX`).
pub(super) fn key_range(id: u64) -> std::ops::Range<(u64, &'static [u8])> {
    (id, &[][..])..(id.saturating_add(1), &[][..])
}

/// Whether this shard holds any key attached to lease `id`.
pub(super) fn has_keys(
    lease_keys: &impl ReadableTable<(u64, &'static [u8]), ()>,
    id: u64,
) -> Result<bool, StorageError> {
    Ok(lease_keys.range(key_range(id))?.next().is_some())
}

/// This shard's keys attached to lease `id`, in key order.
pub(super) fn keys_of(
    lease_keys: &impl ReadableTable<(u64, &'static [u8]), ()>,
    id: u64,
) -> Result<Vec<Vec<u8>>, StorageError> {
    let mut out = Vec::new();
    for item in lease_keys.range(key_range(id))? {
        out.push(item?.0.value().1.to_vec());
    }
    Ok(out)
}

/// Forgets tombstones older than [`TOMBSTONE_TTL_MS`] before `clock` and the oldest beyond
/// [`MAX_TOMBSTONES`]; returns the digest items removed.
pub(super) fn expire_tombstones(
    tombs: &mut redb::Table<'_, u64, u64>,
    ages: &mut redb::Table<'_, (u64, u64), ()>,
    clock: u64,
) -> Result<Vec<[u8; 32]>, StorageError> {
    let cutoff = clock.saturating_sub(TOMBSTONE_TTL_MS);
    let mut removed = Vec::new();
    loop {
        let over = tombs.len()? > MAX_TOMBSTONES;
        let Some((at, id)) = ages.first()?.map(|(k, _)| k.value()) else { break };
        if at >= cutoff && !over {
            break;
        }
        ages.remove((at, id))?;
        if tombs.remove(id)?.is_some() {
            removed.push(tombstone_item_hash(id, at));
        }
    }
    Ok(removed)
}

/// What apply tells [`LeaseDeadlines`] once its transaction committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    Granted {
        id: u64,
        ttl_secs: u64,
    },
    /// Revoked at its home: no longer renewable; its other shards still need telling.
    Revoking {
        id: u64,
    },
    /// The revocation completed everywhere.
    Forgotten {
        id: u64,
    },
}

/// One live lease's deadline.
#[derive(Clone, Copy, Debug)]
struct Live {
    ttl: Duration,
    deadline: Instant,
    /// Chosen for expiry: no renewal is acknowledged any more (the revocation may be applied
    /// at any moment).
    expiring: bool,
}

#[derive(Debug, Default)]
struct Deadlines {
    live: HashMap<u64, Live>,
    /// (deadline, id) of the live leases not yet expiring.
    order: BTreeSet<(Instant, u64)>,
    /// Revoked at home, not yet forgotten: the leader completes their revocation.
    revoking: BTreeSet<u64>,
    /// The term whose leader counts these deadlines (a new term restarts them).
    term: Option<u64>,
}

impl Deadlines {
    fn set(&mut self, id: u64, ttl: Duration, deadline: Instant) {
        if let Some(old) = self.live.insert(id, Live { ttl, deadline, expiring: false }) {
            self.order.remove(&(old.deadline, id));
        }
        self.order.insert((deadline, id));
    }

    fn remove(&mut self, id: u64) {
        if let Some(old) = self.live.remove(&id) {
            self.order.remove(&(old.deadline, id));
        }
    }
}

/// When each live lease of a shard expires, as the shard's leader counts it (see the module
/// docs). Every replica keeps the list (from apply) so that a new leader has it at once.
#[derive(Debug, Default)]
pub struct LeaseDeadlines {
    inner: Mutex<Deadlines>,
}

impl LeaseDeadlines {
    fn lock(&self) -> std::sync::MutexGuard<'_, Deadlines> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces everything with `leases` (after opening the database or installing a snapshot):
    /// every live lease gets its full TTL from now.
    pub(super) fn reset(&self, leases: impl IntoIterator<Item = (u64, LeaseRecord)>) {
        let now = Instant::now();
        let mut d = self.lock();
        let term = d.term;
        *d = Deadlines { term, ..Default::default() };
        for (id, rec) in leases {
            if rec.revoking {
                d.revoking.insert(id);
            } else {
                let ttl = Duration::from_secs(rec.ttl_secs);
                d.set(id, ttl, now + ttl);
            }
        }
    }

    /// Takes in what an apply changed.
    pub(super) fn applied(&self, changes: &[LeaseChange]) {
        if changes.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut d = self.lock();
        for change in changes {
            match *change {
                LeaseChange::Granted { id, ttl_secs } => {
                    let ttl = Duration::from_secs(ttl_secs);
                    d.set(id, ttl, now + ttl);
                }
                LeaseChange::Revoking { id } => {
                    d.remove(id);
                    d.revoking.insert(id);
                }
                LeaseChange::Forgotten { id } => {
                    d.remove(id);
                    d.revoking.remove(&id);
                }
            }
        }
    }

    /// Called by the shard's leader, with its term, before it uses a deadline: a term it has not
    /// counted in restarts every live lease's TTL (and forgets which were chosen for expiry:
    /// the new term decides again).
    pub fn lead(&self, term: u64, now: Instant) {
        let mut d = self.lock();
        if d.term == Some(term) {
            return;
        }
        d.term = Some(term);
        let ids: Vec<(u64, Duration)> = d.live.iter().map(|(id, l)| (*id, l.ttl)).collect();
        d.order.clear();
        for (id, ttl) in ids {
            d.set(id, ttl, now + ttl);
        }
    }

    /// Renews lease `id` to its full TTL from `now`; its TTL in seconds, or `None` if the lease is
    /// not live here (unknown, revoked, or chosen for expiry).
    pub fn renew(&self, id: u64, now: Instant) -> Option<u64> {
        let mut d = self.lock();
        let live = *d.live.get(&id)?;
        if live.expiring {
            return None;
        }
        d.set(id, live.ttl, now + live.ttl);
        Some(live.ttl.as_secs())
    }

    /// Time left before lease `id` expires, and its TTL; `None` if it is not live here.
    pub fn remaining(&self, id: u64, now: Instant) -> Option<(Duration, u64)> {
        let d = self.lock();
        let live = d.live.get(&id)?;
        if live.expiring {
            return None;
        }
        Some((live.deadline.saturating_duration_since(now), live.ttl.as_secs()))
    }

    /// The leases whose deadline passed by `now`, now marked expiring, plus those marked before
    /// whose revocation has not been applied yet (to try again).
    pub fn take_expired(&self, now: Instant) -> Vec<u64> {
        let mut d = self.lock();
        let mut out: Vec<u64> = d.live.iter().filter(|(_, l)| l.expiring).map(|(id, _)| *id).collect();
        while let Some(&(deadline, id)) = d.order.first() {
            if deadline > now {
                break;
            }
            d.order.pop_first();
            if let Some(l) = d.live.get_mut(&id) {
                l.expiring = true;
                out.push(id);
            }
        }
        out
    }

    /// Leases revoked at home whose revocation has not completed.
    pub fn revoking(&self) -> Vec<u64> {
        self.lock().revoking.iter().copied().collect()
    }

    /// The earliest deadline of a live lease not yet expiring.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().order.first().map(|(t, _)| *t)
    }

    /// How many live leases this shard is home to.
    pub fn live_count(&self) -> usize {
        self.lock().live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_follow_grants_renewals_terms_and_revocations() {
        let d = LeaseDeadlines::default();
        let t0 = Instant::now();
        d.applied(&[LeaseChange::Granted { id: 1, ttl_secs: 10 }, LeaseChange::Granted { id: 2, ttl_secs: 30 }]);
        d.lead(5, t0);
        assert!(d.take_expired(t0 + Duration::from_secs(9)).is_empty());
        // A renewal at 5 s moves lease 1 to 15 s.
        assert_eq!(d.renew(1, t0 + Duration::from_secs(5)), Some(10));
        assert!(d.take_expired(t0 + Duration::from_secs(14)).is_empty());
        assert_eq!(d.take_expired(t0 + Duration::from_secs(15)), vec![1]);
        // Chosen for expiry: neither renewable nor shown, but offered again until revoked.
        assert_eq!(d.renew(1, t0 + Duration::from_secs(15)), None);
        assert_eq!(d.remaining(1, t0), None);
        assert_eq!(d.take_expired(t0 + Duration::from_secs(16)), vec![1]);
        // A new term restarts every TTL (lease 2 had 30 s from t0; now 30 s from 20 s).
        d.lead(6, t0 + Duration::from_secs(20));
        assert_eq!(d.remaining(2, t0 + Duration::from_secs(20)), Some((Duration::from_secs(30), 30)));
        assert_eq!(d.remaining(1, t0 + Duration::from_secs(20)), Some((Duration::from_secs(10), 10)));
        assert!(d.take_expired(t0 + Duration::from_secs(29)).is_empty());
        // Revoked: gone from the deadlines, listed as revoking until forgotten.
        d.applied(&[LeaseChange::Revoking { id: 1 }]);
        assert_eq!(d.renew(1, t0 + Duration::from_secs(21)), None);
        assert_eq!(d.revoking(), vec![1]);
        d.applied(&[LeaseChange::Forgotten { id: 1 }]);
        assert!(d.revoking().is_empty());
        assert_eq!(d.live_count(), 1);
        assert_eq!(d.take_expired(t0 + Duration::from_secs(50)), vec![2]);
    }

    #[test]
    fn a_reset_restarts_every_ttl_and_keeps_the_revoking_ones() {
        let d = LeaseDeadlines::default();
        d.reset([(7, LeaseRecord { ttl_secs: 5, revoking: false }), (8, LeaseRecord { ttl_secs: 5, revoking: true })]);
        assert_eq!(d.revoking(), vec![8]);
        assert_eq!(d.live_count(), 1);
        assert!(d.next_deadline().is_some());
    }
}
