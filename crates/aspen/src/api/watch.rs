//! Watch on the wire (docs/design.md §17 "Watch"): what a watch asks for, the events it streams,
//! and positions — where a watch stands in each shard's history, and the resume token that
//! carries them from one connection (or node) to the next.
//!
//! Every write applied to a shard at log index `r` (its revision) yields zero or more events,
//! numbered `0, 1, …` within the entry (writes batched into one entry share a revision). A
//! position `(shard, r, i)` means "every event of that shard up to event `i` of revision `r`
//! has been delivered"; a watch that starts after it gets exactly the events that follow, on
//! any node, since every replica applies the same log.

use serde::{Deserialize, Serialize};

use super::ShardId;

/// Where a watch stands in one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WatchPosition {
    pub shard: ShardId,
    pub revision: u64,
    /// The last delivered event's index within `revision` ([`u32::MAX`]: all of it).
    pub index: u32,
}

impl WatchPosition {
    /// The position after every event of `revision` and before.
    pub fn after_revision(shard: ShardId, revision: u64) -> Self {
        WatchPosition { shard, revision, index: u32::MAX }
    }

    /// Whether the event at (`revision`, `index`) comes after this position.
    pub fn precedes(&self, revision: u64, index: u32) -> bool {
        (revision, index) > (self.revision, self.index)
    }
}

/// Where a watch starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchStart {
    /// With the next write applied on the serving node.
    Now,
    /// With the first event at or after this revision (a cluster of one shard only).
    FromRevision(u64),
    /// After these positions (a resume token's), one per shard the watch covers.
    After(Vec<WatchPosition>),
}

/// A watch of one key or of every key under a prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// `key` is a prefix (empty: every key).
    pub prefix: bool,
    /// Send each event's previous value.
    pub prev_kv: bool,
    pub start: WatchStart,
}

/// What happened to a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change of one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub kind: EventKind,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The new value (empty for a delete).
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// The value before, if the key existed and the watch asked for it.
    #[serde(with = "serde_bytes")]
    pub prev_value: Option<Vec<u8>>,
    /// The rest of the key as it was, alongside `prev_value`: what the etcd API's `prev_kv`
    /// shows. Kept in process only (the node's own watch protocol does not carry it).
    #[serde(skip)]
    pub prev_meta: Option<PrevMeta>,
    pub shard: ShardId,
    /// The write's revision (the key's mod revision).
    pub revision: u64,
    /// The event's index within its revision.
    pub index: u32,
    /// The key's create revision and version after the write (0 for a delete).
    pub create_revision: u64,
    pub version: u64,
    /// The lease the key is attached to (0: none).
    pub lease: u64,
}

/// A key's revisions, version and lease before an event changed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrevMeta {
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
    pub lease: u64,
}

impl WatchEvent {
    pub fn position(&self) -> WatchPosition {
        WatchPosition { shard: self.shard, revision: self.revision, index: self.index }
    }

    /// Bytes it holds (what history limits count).
    pub fn bytes(&self) -> usize {
        self.key.len() + self.value.len() + self.prev_value.as_ref().map_or(0, Vec::len) + 96
    }
}

/// A resume token: `shard:revision.index` for every shard, comma-separated (`0:1234.2`).
pub fn format_resume(positions: &[WatchPosition]) -> String {
    let parts: Vec<String> = positions
        .iter()
        .map(|p| {
            let index = if p.index == u32::MAX { "*".to_string() } else { p.index.to_string() };
            format!("{}:{}.{index}", p.shard, p.revision)
        })
        .collect();
    parts.join(",")
}

/// Reads a resume token written by [`format_resume`].
pub fn parse_resume(text: &str) -> Result<Vec<WatchPosition>, String> {
    let bad = || format!("malformed resume token {text:?}: expected shard:revision.index[,…] as watch prints it");
    let mut out: Vec<WatchPosition> = Vec::new();
    for part in text.trim().split(',') {
        let (shard, rest) = part.split_once(':').ok_or_else(bad)?;
        let (revision, index) = rest.split_once('.').ok_or_else(bad)?;
        let position = WatchPosition {
            shard: shard.parse().map_err(|_| bad())?,
            revision: revision.parse().map_err(|_| bad())?,
            index: if index == "*" { u32::MAX } else { index.parse().map_err(|_| bad())? },
        };
        if out.iter().any(|p| p.shard == position.shard) {
            return Err(format!("resume token {text:?} names shard {} twice", position.shard));
        }
        out.push(position);
    }
    if out.is_empty() || out.len() > 4096 {
        return Err(bad());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_tokens_round_trip_and_refuse_garbage() {
        let p = vec![WatchPosition { shard: 0, revision: 12, index: 3 }, WatchPosition::after_revision(3, 40)];
        let text = format_resume(&p);
        assert_eq!(text, "0:12.3,3:40.*");
        assert_eq!(parse_resume(&text).unwrap(), p);
        for bad in ["", "0", "0:1", "x:1.2", "0:1.2,0:3.4", "0:1.2,", "0:-1.2", "0:1.99999999999"] {
            assert!(parse_resume(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn positions_order_events() {
        let p = WatchPosition { shard: 0, revision: 5, index: 1 };
        assert!(!p.precedes(5, 1) && !p.precedes(4, 9) && p.precedes(5, 2) && p.precedes(6, 0));
        assert!(!WatchPosition::after_revision(0, 5).precedes(5, 7));
    }
}
