//! One shard's recent events on this node (docs/design.md §17): what apply changed, kept in a
//! bounded history and broadcast to the watches served here.
//!
//! Owns: the history — the events of the last applied entries, at most `[watch]
//! history_entries` events and `history_bytes` bytes, oldest dropped first — and the point
//! after which it is complete (`complete_after`: every event of a later revision is in it or
//! still to come). A node that starts knows only what it applies from then on; a snapshot
//! install breaks the history (the watches of this shard are cancelled, a resume elsewhere or
//! later picks them up).
//!
//! Never: slow apply down for a watcher. Apply publishes into the history and a broadcast
//! channel and moves on; a watcher that falls more than `max_lag` batches behind loses its
//! place (its watch is cancelled with a clear error) instead of holding events for it.

use std::{collections::VecDeque, sync::Arc};

use tokio::sync::broadcast;

use crate::api::{applied_revision, ApiError, ShardId, WatchEvent, WatchPosition};

/// The events of one applied entry (or a break in the history: `gap`).
#[derive(Debug)]
pub struct EventBatch {
    /// The shard's revision once the entry is applied ([`applied_revision`]): at or after each
    /// of its events'.
    pub revision: u64,
    pub events: Vec<WatchEvent>,
    /// The history broke here (a snapshot was installed): watches must stop.
    pub gap: bool,
}

#[derive(Debug)]
struct History {
    batches: VecDeque<Arc<EventBatch>>,
    events: usize,
    bytes: usize,
    /// Every event of a revision after this is in `batches` or still to come.
    complete_after: u64,
    /// The revision of the last applied entry published (events or not).
    applied: u64,
    /// The revision of the last change published (or, before any, of the state the hub
    /// started from: no change after it is unknown to it).
    last_change: u64,
}

/// One shard's history and live feed on this node.
#[derive(Debug)]
pub struct WatchHub {
    shard: ShardId,
    max_events: usize,
    max_bytes: usize,
    max_lag: usize,
    inner: std::sync::Mutex<History>,
    live: broadcast::Sender<Arc<EventBatch>>,
}

/// Where a watch of one shard starts: the retained events after its position, then the live
/// feed (subscribed under the same lock, so nothing falls between them).
#[derive(Debug)]
pub struct Subscription {
    pub backlog: Vec<Arc<EventBatch>>,
    pub live: broadcast::Receiver<Arc<EventBatch>>,
    /// The position it starts after.
    pub start: WatchPosition,
    /// Batches it may fall behind the live feed before it loses its place.
    pub max_lag: usize,
}

impl WatchHub {
    /// A hub for `shard` whose state machine has applied up to `applied`, keeping at most
    /// `max_events` events and `max_bytes` bytes (0 events: no history, live events only); a
    /// watcher may fall `max_lag` batches behind the live feed.
    pub fn new(shard: ShardId, applied: u64, max_events: usize, max_bytes: usize, max_lag: usize) -> Self {
        let (live, _) = broadcast::channel(max_lag.max(1));
        WatchHub {
            shard,
            max_events,
            max_bytes,
            max_lag: max_lag.max(1),
            inner: std::sync::Mutex::new(History {
                batches: VecDeque::new(),
                events: 0,
                bytes: 0,
                // Nothing applied yet: no event can come before the history's first (entry 0
                // holds none), so it is complete from the start — a watch or read from
                // revision 1 on a shard this node has followed since its beginning is served,
                // as etcd serves it on a new cluster.
                complete_after: if applied == 0 { 0 } else { applied_revision(applied) },
                applied: applied_revision(applied),
                last_change: applied_revision(applied),
            }),
            live,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// Takes in what an apply produced: the events of each entry (its log index, events without
    /// their shard set), and the last index it applied.
    pub fn publish(&self, batches: Vec<(u64, Vec<WatchEvent>)>, applied: u64) {
        let mut h = self.lock();
        h.applied = h.applied.max(applied_revision(applied));
        for (index, mut events) in batches {
            if events.is_empty() {
                continue;
            }
            let revision = applied_revision(index);
            h.last_change = h.last_change.max(events.iter().map(|e| e.revision).max().unwrap_or(0));
            for e in &mut events {
                e.shard = self.shard;
            }
            let batch = Arc::new(EventBatch { revision, events, gap: false });
            if self.max_events > 0 {
                h.events += batch.events.len();
                h.bytes += batch.events.iter().map(WatchEvent::bytes).sum::<usize>();
                h.batches.push_back(batch.clone());
                while h.events > self.max_events || h.bytes > self.max_bytes {
                    let Some(old) = h.batches.pop_front() else { break };
                    h.events -= old.events.len();
                    h.bytes -= old.events.iter().map(WatchEvent::bytes).sum::<usize>();
                    h.complete_after = h.complete_after.max(old.revision);
                }
            } else {
                h.complete_after = h.complete_after.max(revision);
            }
            // No receiver is fine: nobody watches.
            let _ = self.live.send(batch);
        }
    }

    /// The state was replaced by a snapshot up to `applied`: the history before it is gone,
    /// and the watches that were following it end.
    pub fn reset(&self, applied: u64) {
        let applied = applied_revision(applied);
        let mut h = self.lock();
        h.batches.clear();
        h.events = 0;
        h.bytes = 0;
        h.complete_after = applied;
        h.applied = applied;
        h.last_change = applied;
        let _ = self.live.send(Arc::new(EventBatch { revision: applied, events: Vec::new(), gap: true }));
    }

    /// The revision of the last applied entry published, and of the last change among them:
    /// the state at a revision after that change (and no later than the first) is the state now
    /// (`etcd` reads at a revision).
    pub fn changes(&self) -> (u64, u64) {
        let h = self.lock();
        (h.applied, h.last_change)
    }

    /// Watches following this shard's live feed on this node.
    pub fn watchers(&self) -> usize {
        self.live.receiver_count()
    }

    /// Where a watch of this shard stands if it starts now.
    pub fn now(&self) -> WatchPosition {
        WatchPosition::after_revision(self.shard, self.lock().applied)
    }

    /// Starts a watch after `after` (this shard's position): [`ApiError::Compacted`] if the
    /// history no longer holds every event after it.
    pub fn subscribe(&self, after: WatchPosition) -> Result<Subscription, ApiError> {
        let h = self.lock();
        let covered =
            after.revision > h.complete_after || (after.revision == h.complete_after && after.index == u32::MAX);
        if !covered {
            return Err(ApiError::Compacted { shard: self.shard, oldest: h.complete_after + 1 });
        }
        let backlog = h.batches.iter().filter(|b| b.revision >= after.revision).cloned().collect();
        Ok(Subscription { backlog, live: self.live.subscribe(), start: after, max_lag: self.max_lag })
    }

    /// Every retained batch with an event after `revision`, and the revision of the last
    /// applied entry published ([`Self::changes`]): [`ApiError::Compacted`] if the history no
    /// longer holds every event after `revision` (what a read at that revision undoes,
    /// `storage::past`).
    pub fn changes_after(&self, revision: u64) -> Result<(Vec<Arc<EventBatch>>, u64), ApiError> {
        let h = self.lock();
        if revision < h.complete_after {
            return Err(ApiError::Compacted { shard: self.shard, oldest: h.complete_after + 1 });
        }
        let batches = h.batches.iter().filter(|b| b.revision > revision).cloned().collect();
        Ok((batches, h.applied))
    }

    /// Where a watch fed by `live` stands if it has handled every batch it received: after
    /// the last applied index, when `live` holds nothing more (checked under the lock that
    /// publishing takes, so no batch at or before that index can still be on its way).
    pub fn progress(&self, live: &broadcast::Receiver<Arc<EventBatch>>) -> Option<WatchPosition> {
        let h = self.lock();
        live.is_empty().then(|| WatchPosition::after_revision(self.shard, h.applied))
    }

    /// Events and bytes held, and the revision after which the history is complete.
    pub fn held(&self) -> (usize, usize, u64) {
        let h = self.lock();
        (h.events, h.bytes, h.complete_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::EventKind;

    fn ev(key: &str, index: u32) -> WatchEvent {
        WatchEvent {
            kind: EventKind::Put,
            key: key.into(),
            value: b"v".to_vec(),
            prev_value: None,
            prev_meta: None,
            shard: 0,
            revision: 0,
            index,
            create_revision: 0,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn history_is_bounded_and_says_what_it_lost() {
        let r = applied_revision;
        let hub = WatchHub::new(2, 10, 3, usize::MAX, 16);
        // Before anything was applied here: only "after entry 10" can be served.
        assert!(matches!(
            hub.subscribe(WatchPosition { shard: 2, revision: r(10) - 1, index: 0 }),
            Err(ApiError::Compacted { oldest, .. }) if oldest == r(10) + 1
        ));
        let sub = hub.subscribe(hub.now()).unwrap();
        assert!(sub.backlog.is_empty());
        hub.publish(vec![(11, vec![ev("a", 0), ev("b", 1)]), (12, vec![]), (13, vec![ev("c", 0)])], 13);
        assert_eq!(hub.held().0, 3);
        // A fourth event drops entry 11 (two events): history now complete after it.
        hub.publish(vec![(14, vec![ev("d", 0)])], 14);
        assert_eq!(hub.held(), (2, hub.held().1, r(11)));
        assert!(matches!(
            hub.subscribe(WatchPosition { shard: 2, revision: r(11), index: 0 }),
            Err(ApiError::Compacted { shard: 2, oldest }) if oldest == r(11) + 1
        ));
        let s = hub.subscribe(WatchPosition::after_revision(2, r(11))).unwrap();
        let revs: Vec<u64> = s.backlog.iter().map(|b| b.revision).collect();
        assert_eq!(revs, [r(13), r(14)]);
        assert!(s.backlog.iter().all(|b| b.events.iter().all(|e| e.shard == 2)), "events carry their shard");
        let mut live = sub.live;
        let got: Vec<u64> = (0..3).map(|_| live.try_recv().unwrap().revision).collect();
        assert_eq!(got, [r(11), r(13), r(14)], "the live feed got every batch with events");
        // A snapshot install breaks the history: watchers see a gap.
        hub.reset(100);
        assert!(live.try_recv().unwrap().gap);
        assert!(hub.subscribe(WatchPosition::after_revision(2, r(14))).is_err());
        assert!(hub.subscribe(hub.now()).is_ok());
    }

    #[test]
    fn a_shard_followed_from_its_beginning_serves_every_revision() {
        let r = applied_revision;
        let hub = WatchHub::new(0, 0, 100, usize::MAX, 16);
        hub.publish(vec![(1, vec![ev("a", 0)]), (2, vec![ev("b", 0)])], 2);
        // From revision 1 (after revision 0): every event since the shard began.
        let s = hub.subscribe(WatchPosition::after_revision(0, 0)).expect("from the beginning");
        let revs: Vec<u64> = s.backlog.iter().map(|b| b.revision).collect();
        assert_eq!(revs, [r(1), r(2)]);
        let (batches, _) = hub.changes_after(1).expect("a read at revision 1");
        assert_eq!(batches.len(), 2, "a read at revision 1 undoes every change");
        // Once the bound drops the first entry's events, its start is gone.
        let small = WatchHub::new(0, 0, 1, usize::MAX, 16);
        small.publish(vec![(1, vec![ev("a", 0)]), (2, vec![ev("b", 0)])], 2);
        assert!(matches!(
            small.subscribe(WatchPosition::after_revision(0, 0)),
            Err(ApiError::Compacted { oldest, .. }) if oldest == r(1) + 1
        ));
    }
}
