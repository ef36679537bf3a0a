//! Range reads at a past revision of one shard (docs/design.md §18): the state read now, with
//! every change after that revision undone from the shard's watch history on this node.
//!
//! Owns: [`Undo`] — for each key a change reached between the asked revision and the state
//! read, the key as it was at that revision and as it is now — and turning a page of the
//! current state into the page the shard would have answered at the asked revision (keys,
//! count, limit, filters, the answer's byte budget).
//!
//! Never: reach back further than the history is complete: the caller takes the changes from
//! [`WatchHub::changes_after`](super::watch::WatchHub::changes_after), which refuses a revision
//! whose later changes it no longer holds.

use std::{collections::BTreeMap, sync::Arc};

use super::{state_machine::MAX_RANGE_ANSWER_BYTES, watch::EventBatch};
use crate::api::{is_reserved_key, EventKind, KeyRecord, RangePage, RangeQuery, Revision, WatchEvent};

/// What changed in a range between a revision and a later read of the state.
#[derive(Debug, Default)]
pub struct Undo {
    /// Per key: the key at the asked revision, and as the state read holds it (`None`: absent).
    keys: BTreeMap<Vec<u8>, (Option<KeyRecord>, Option<KeyRecord>)>,
}

fn before(e: &WatchEvent) -> Option<KeyRecord> {
    let meta = e.prev_meta?;
    Some(KeyRecord {
        key: e.key.clone(),
        value: e.prev_value.clone().unwrap_or_default(),
        create_revision: meta.create_revision,
        mod_revision: meta.mod_revision,
        version: meta.version,
        lease: meta.lease,
    })
}

fn after(e: &WatchEvent) -> Option<KeyRecord> {
    (e.kind == EventKind::Put).then(|| KeyRecord {
        key: e.key.clone(),
        value: e.value.clone(),
        create_revision: e.create_revision,
        mod_revision: e.revision,
        version: e.version,
        lease: e.lease,
    })
}

/// Whether `key` is one `q` reads (its range, after its `after`, and not a reserved key unless
/// the range starts among them), as the state machine's range read decides.
fn in_scope(q: &RangeQuery, key: &[u8]) -> bool {
    if !q.range.contains(key) {
        return false;
    }
    if q.range.is_single() && q.after.is_some() {
        return false;
    }
    if q.after.as_deref().is_some_and(|a| key <= a) {
        return false;
    }
    is_reserved_key(&q.range.key) || !is_reserved_key(key)
}

impl Undo {
    /// The changes of `batches` to keys `q` reads, made after revision `at` and at or before
    /// `now` (the revision of the state read). Events come in the order they were applied.
    pub fn new(batches: &[Arc<EventBatch>], q: &RangeQuery, at: Revision, now: Revision) -> Self {
        let mut keys: BTreeMap<Vec<u8>, (Option<KeyRecord>, Option<KeyRecord>)> = BTreeMap::new();
        for e in batches.iter().flat_map(|b| b.events.iter()) {
            if e.revision <= at || e.revision > now || !in_scope(q, &e.key) {
                continue;
            }
            match keys.get_mut(&e.key) {
                // Seen before: only how it is now moves on.
                Some(entry) => entry.1 = after(e),
                None => {
                    keys.insert(e.key.clone(), (before(e), after(e)));
                }
            }
        }
        Undo { keys }
    }

    /// Keys changed since the revision: how many more keys a read of the state now must return
    /// to hold the first `limit` keys at the revision.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The page at the revision, from `now`: `q` read from the state at `now`'s revision with its
    /// limit raised by [`Self::len`] (or none). The answer keeps `now`'s revision (an etcd read
    /// at a past revision answers with the current one in its header), and `more` if keys may
    /// follow its last one.
    pub fn apply(&self, q: &RangeQuery, now: RangePage) -> RangePage {
        // etcd's count: the range's keys at the revision, whatever the filters.
        let mut count = now.count;
        for (then, current) in self.keys.values() {
            count = count.saturating_sub(u64::from(current.is_some())) + u64::from(then.is_some());
        }
        let mut page = RangePage { kvs: Vec::new(), count, more: false, revision: now.revision };
        if q.count_only {
            return page;
        }
        // A read cut short (by its limit or its size) says nothing of the keys after its last
        // one: changed keys past it wait for the next page.
        let cut = now.more;
        let last = now.kvs.last().map(|kv| kv.key.clone());
        let mut kvs: Vec<KeyRecord> = now.kvs.into_iter().filter(|kv| !self.keys.contains_key(&kv.key)).collect();
        for (key, (then, _)) in &self.keys {
            if cut && last.as_ref().is_none_or(|l| key > l) {
                break;
            }
            if let Some(r) = then.as_ref().filter(|r| q.admits(r)) {
                let mut r = r.clone();
                if q.keys_only {
                    r.value = Vec::new();
                }
                kvs.push(r);
            }
        }
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        let mut more = cut;
        if q.limit > 0 && kvs.len() as u64 > q.limit {
            kvs.truncate(q.limit as usize);
            more = true;
        }
        let mut budget = MAX_RANGE_ANSWER_BYTES;
        let mut keep = 0;
        for kv in &kvs {
            let size = kv.key.len() + kv.value.len() + 64;
            if size > budget && keep > 0 {
                more = true;
                break;
            }
            budget = budget.saturating_sub(size);
            keep += 1;
        }
        kvs.truncate(keep);
        page.kvs = kvs;
        page.more = more;
        page
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::{KeyRange, PrevMeta};

    /// A shard's keys at every revision, the watch events between them, and reads checked
    /// against the recorded states.
    struct Model {
        state: BTreeMap<Vec<u8>, KeyRecord>,
        history: Vec<BTreeMap<Vec<u8>, KeyRecord>>,
        events: Vec<WatchEvent>,
        revision: u64,
    }

    impl Model {
        fn new() -> Self {
            Model { state: BTreeMap::new(), history: vec![BTreeMap::new()], events: Vec::new(), revision: 0 }
        }

        fn write(&mut self, key: &str, value: Option<&str>) {
            self.revision += 1;
            let key = key.as_bytes().to_vec();
            let prev = self.state.get(&key).cloned();
            let prev_meta = prev.as_ref().map(|p| PrevMeta {
                create_revision: p.create_revision,
                mod_revision: p.mod_revision,
                version: p.version,
                lease: p.lease,
            });
            let (kind, now) = match value {
                Some(v) => {
                    let r = KeyRecord {
                        key: key.clone(),
                        value: v.as_bytes().to_vec(),
                        create_revision: prev.as_ref().map_or(self.revision, |p| p.create_revision),
                        mod_revision: self.revision,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        lease: 0,
                    };
                    self.state.insert(key.clone(), r.clone());
                    (EventKind::Put, Some(r))
                }
                None => {
                    self.state.remove(&key);
                    (EventKind::Delete, None)
                }
            };
            if kind == EventKind::Delete && prev.is_none() {
                self.history.push(self.state.clone());
                return;
            }
            self.events.push(WatchEvent {
                kind,
                key,
                value: now.as_ref().map(|r| r.value.clone()).unwrap_or_default(),
                prev_value: prev.map(|p| p.value),
                prev_meta,
                shard: 0,
                revision: self.revision,
                index: 0,
                create_revision: now.as_ref().map_or(0, |r| r.create_revision),
                version: now.as_ref().map_or(0, |r| r.version),
                lease: 0,
            });
            self.history.push(self.state.clone());
        }

        /// What the state machine's range read answers now.
        fn read_now(&self, q: &RangeQuery) -> RangePage {
            let mut page = RangePage { kvs: Vec::new(), count: 0, more: false, revision: self.revision };
            for r in self.state.values().filter(|r| in_scope(q, &r.key)) {
                page.count += 1;
                if q.count_only || !q.admits(r) {
                    continue;
                }
                if q.limit > 0 && page.kvs.len() as u64 >= q.limit {
                    page.more = true;
                    continue;
                }
                let mut r = r.clone();
                if q.keys_only {
                    r.value.clear();
                }
                page.kvs.push(r);
            }
            page
        }

        fn read_at(&self, q: &RangeQuery, at: u64) -> RangePage {
            let batch = Arc::new(EventBatch { revision: self.revision, events: self.events.clone(), gap: false });
            let undo = Undo::new(&[batch], q, at, self.revision);
            let mut raw = q.clone();
            if raw.limit > 0 {
                raw.limit += undo.len() as u64;
            }
            undo.apply(q, self.read_now(&raw))
        }

        fn expected(&self, q: &RangeQuery, at: u64) -> (Vec<KeyRecord>, u64) {
            let in_range = self.history[at as usize].values().filter(|r| in_scope(q, &r.key));
            let count = in_range.clone().count() as u64;
            let then: Vec<KeyRecord> = in_range
                .filter(|r| q.admits(r))
                .cloned()
                .map(|mut r| {
                    if q.keys_only {
                        r.value.clear();
                    }
                    r
                })
                .collect();
            let mut kvs = if q.count_only { Vec::new() } else { then };
            if q.limit > 0 {
                kvs.truncate(q.limit as usize);
            }
            (kvs, count)
        }
    }

    fn query(range: KeyRange, limit: u64) -> RangeQuery {
        let mut q = RangeQuery::all(range);
        q.limit = limit;
        q
    }

    #[test]
    fn a_read_at_a_revision_sees_the_state_of_that_revision() {
        let mut m = Model::new();
        // A reserved key too: a client's range never shows it.
        let reserved = format!("{}k", String::from_utf8_lossy(crate::api::RESERVED_PREFIX));
        let keys = ["a", "b", "c", "d", "e", reserved.as_str()];
        // A deterministic mix of creates, updates and deletes (and deletes of absent keys).
        let mut x: u64 = 7;
        for _ in 0..60 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let key = keys[(x >> 33) as usize % keys.len()];
            let value = format!("v{}", m.revision + 1);
            m.write(key, ((x >> 40) % 3 != 0).then_some(value.as_str()));
        }
        let ranges =
            [KeyRange::prefix(""), KeyRange::single("c"), KeyRange { key: b"b".to_vec(), end: Some(b"e".to_vec()) }];
        for range in ranges {
            for (limit, after) in [(0, None), (1, None), (2, None), (10, None), (0, Some("b")), (2, Some("a"))] {
                for at in 0..=m.revision {
                    let mut q = query(range.clone(), limit);
                    q.after = after.map(|a: &str| a.as_bytes().to_vec());
                    let got = m.read_at(&q, at);
                    let (kvs, count) = m.expected(&q, at);
                    assert_eq!(
                        (&got.kvs, got.count),
                        (&kvs, count),
                        "range {range:?} limit {limit} after {after:?} at {at}"
                    );
                    assert!(got.kvs.iter().all(|kv| !is_reserved_key(&kv.key)), "a reserved key shown");
                    assert_eq!(got.more, count > got.kvs.len() as u64, "more: range {range:?} limit {limit} at {at}");
                    assert_eq!(got.revision, m.revision, "the header keeps the current revision");
                    q.keys_only = true;
                    q.min_mod_revision = at / 2;
                    let got = m.read_at(&q, at);
                    let (kvs, count) = m.expected(&q, at);
                    assert_eq!((&got.kvs, got.count), (&kvs, count), "keys only, filtered, at {at}");
                    q.count_only = true;
                    assert_eq!(m.read_at(&q, at).count, count, "count only at {at}");
                }
            }
        }
    }

    #[test]
    fn a_page_cut_short_leaves_later_changed_keys_to_the_next_page() {
        let mut m = Model::new();
        for k in ["a", "b", "c", "d"] {
            m.write(k, Some("1"));
        }
        let at = m.revision;
        m.write("d", None);
        m.write("b", Some("2"));
        let q = query(KeyRange::prefix(""), 0);
        // The state now, read in pages of one key; each page turned into the page at `at`.
        let batch = Arc::new(EventBatch { revision: m.revision, events: m.events.clone(), gap: false });
        let mut seen = Vec::new();
        let mut q1 = q.clone();
        loop {
            let undo = Undo::new(std::slice::from_ref(&batch), &q1, at, m.revision);
            let mut raw = q1.clone();
            raw.limit = 1;
            let page = undo.apply(&q1, m.read_now(&raw));
            seen.extend(page.kvs.iter().map(|kv| (kv.key.clone(), kv.value.clone())));
            match page.kvs.last() {
                Some(last) if page.more => q1.after = Some(last.key.clone()),
                _ => break,
            }
        }
        let want: Vec<(Vec<u8>, Vec<u8>)> =
            ["a", "b", "c", "d"].iter().map(|k| (k.as_bytes().to_vec(), b"1".to_vec())).collect();
        assert_eq!(seen, want);
    }
}
