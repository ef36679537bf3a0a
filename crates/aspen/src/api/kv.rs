//! Key ranges and etcd-shaped key operations (docs/design.md §18): range reads with counts,
//! limits and revision filters, and txns whose ops are range reads, puts (with a lease, the
//! previous key, or the current value or lease kept) and range deletes, nested txns included.
//! What the etcd API (`crate::etcd`) sends; one [`KvTxn`] is one write of one shard, applied
//! atomically at one revision. The native API's simpler commands stay as they are.

use serde::{Deserialize, Serialize};

use super::{CompareOp, Revision};

/// A set of keys, etcd style: `key` alone (`end` is `None`), every key at or after `key` (`end`
/// is empty), or `[key, end)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// `key` alone.
    pub fn single(key: impl Into<Vec<u8>>) -> Self {
        KeyRange { key: key.into(), end: None }
    }

    /// Every key starting with `prefix` (every key if it is empty).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let key = prefix.into();
        let end = crate::api::prefix_end(&key).unwrap_or_default();
        KeyRange { key, end: Some(end) }
    }

    /// Whether this names one key.
    pub fn is_single(&self) -> bool {
        self.end.is_none()
    }

    /// The exclusive upper bound (`None`: unbounded, or the key alone — see [`Self::is_single`]).
    pub fn upper(&self) -> Option<&[u8]> {
        self.end.as_deref().filter(|e| !e.is_empty())
    }

    /// Whether `k` is in the range.
    pub fn contains(&self, k: &[u8]) -> bool {
        match &self.end {
            None => k == self.key.as_slice(),
            Some(end) => k >= self.key.as_slice() && (end.is_empty() || k < end.as_slice()),
        }
    }

    /// Whether the range holds no key at all (`[a, b)` with `b <= a`).
    pub fn is_empty(&self) -> bool {
        matches!(self.upper(), Some(end) if end <= self.key.as_slice())
    }
}

/// A key as the etcd API shows it: value, revisions, version and lease (0: none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: u64,
    pub lease: u64,
}

/// A range read of one shard. Keys come in key order; `limit` 0 is none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeQuery {
    pub range: KeyRange,
    pub limit: u64,
    /// Values left empty.
    pub keys_only: bool,
    /// No keys, only the count.
    pub count_only: bool,
    /// Only keys whose revisions are within these bounds (0: no bound), as etcd's
    /// `min/max_mod/create_revision`.
    pub min_mod_revision: Revision,
    pub max_mod_revision: Revision,
    pub min_create_revision: Revision,
    pub max_create_revision: Revision,
    /// Only keys after this one (the next page of a range too large for one answer).
    #[serde(with = "serde_bytes")]
    pub after: Option<Vec<u8>>,
}

impl RangeQuery {
    /// Every key of `range`, values included.
    pub fn all(range: KeyRange) -> Self {
        RangeQuery {
            range,
            limit: 0,
            keys_only: false,
            count_only: false,
            min_mod_revision: 0,
            max_mod_revision: 0,
            min_create_revision: 0,
            max_create_revision: 0,
            after: None,
        }
    }

    /// Whether a key passes the revision filters.
    pub fn admits(&self, kv: &KeyRecord) -> bool {
        let within = |v: Revision, min: Revision, max: Revision| v >= min && (max == 0 || v <= max);
        within(kv.mod_revision, self.min_mod_revision, self.max_mod_revision)
            && within(kv.create_revision, self.min_create_revision, self.max_create_revision)
    }
}

/// One shard's answer to a [`RangeQuery`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangePage {
    pub kvs: Vec<KeyRecord>,
    /// Keys of the range (after `after`, if given), whatever the limit — and, as etcd counts,
    /// whatever the revision filters.
    pub count: u64,
    /// More keys that pass the filters follow the last one returned (the limit, or the answer's
    /// size, cut it).
    pub more: bool,
    /// The shard's revision the read saw (`api::applied_revision` of its applied index).
    pub revision: Revision,
}

/// Which field of the keys of a range a [`KvCompare`] reads, and its target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCompareTarget {
    Version(u64),
    CreateRevision(Revision),
    ModRevision(Revision),
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Lease(u64),
}

/// A condition of a [`KvTxn`], etcd v3 semantics: it holds when it holds for every key of the
/// range; a range without keys is compared as one missing key (version, revisions and lease 0),
/// except that a value compare on it fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCompare {
    pub range: KeyRange,
    pub op: CompareOp,
    pub target: KvCompareTarget,
}

impl KvCompare {
    /// Whether it holds for one key of its range (`None`: the range has no key).
    pub fn holds_for(&self, kv: Option<&KeyRecord>) -> bool {
        let field = |f: fn(&KeyRecord) -> u64| kv.map_or(0, f);
        match &self.target {
            KvCompareTarget::Value(v) => kv.is_some_and(|kv| self.op.holds(kv.value.as_slice(), v.as_slice())),
            KvCompareTarget::Version(v) => self.op.holds(&field(|k| k.version), v),
            KvCompareTarget::CreateRevision(r) => self.op.holds(&field(|k| k.create_revision), r),
            KvCompareTarget::ModRevision(r) => self.op.holds(&field(|k| k.mod_revision), r),
            KvCompareTarget::Lease(l) => self.op.holds(&field(|k| k.lease), l),
        }
    }
}

/// A put, etcd style.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvPut {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Attach to this lease (0: none; the key leaves the lease it had).
    pub lease: u64,
    /// Answer with the key as it was.
    pub prev_kv: bool,
    /// Keep the current value (the key must exist; `value` must be empty).
    pub ignore_value: bool,
    /// Keep the current lease (the key must exist; `lease` must be 0).
    pub ignore_lease: bool,
}

/// One op of a [`KvTxn`] branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    Range(RangeQuery),
    Put(KvPut),
    DeleteRange { range: KeyRange, prev_kv: bool },
    Txn(KvTxn),
}

/// If every compare holds, `success` runs, else `failure`; ops in order, each seeing the ones
/// before. Every key it names must be of one shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvTxn {
    pub compares: Vec<KvCompare>,
    pub success: Vec<KvOp>,
    pub failure: Vec<KvOp>,
}

impl KvTxn {
    /// A txn of one op and no compare (a plain put or delete).
    pub fn op(op: KvOp) -> Self {
        KvTxn { compares: Vec::new(), success: vec![op], failure: Vec::new() }
    }

    /// Whether it writes nothing whichever branches run: only range reads, nested txns
    /// included (the etcd API evaluates such a txn on a read, not through the log).
    pub fn is_read_only(&self) -> bool {
        self.success.iter().chain(&self.failure).all(|op| match op {
            KvOp::Range(_) => true,
            KvOp::Txn(t) => t.is_read_only(),
            KvOp::Put(_) | KvOp::DeleteRange { .. } => false,
        })
    }

    /// Every key or range it names, as ([`KeyRange::key`], [`KeyRange::end`]): compares and
    /// both branches, nested txns included.
    pub fn spans(&self) -> Vec<(&[u8], Option<&[u8]>)> {
        let mut out: Vec<(&[u8], Option<&[u8]>)> =
            self.compares.iter().map(|c| (c.range.key.as_slice(), c.range.end.as_deref())).collect();
        for op in self.success.iter().chain(&self.failure) {
            match op {
                KvOp::Range(q) => out.push((q.range.key.as_slice(), q.range.end.as_deref())),
                KvOp::Put(p) => out.push((p.key.as_slice(), None)),
                KvOp::DeleteRange { range, .. } => out.push((range.key.as_slice(), range.end.as_deref())),
                KvOp::Txn(t) => out.extend(t.spans()),
            }
        }
        out
    }

    /// Ops of both branches, nested ones included, and the compares.
    pub fn size(&self) -> usize {
        self.compares.len()
            + self
                .success
                .iter()
                .chain(&self.failure)
                .map(|op| if let KvOp::Txn(t) = op { 1 + t.size() } else { 1 })
                .sum::<usize>()
    }

    /// Bytes of keys and values it carries.
    pub fn bytes(&self) -> usize {
        let range = |r: &KeyRange| r.key.len() + r.end.as_ref().map_or(0, Vec::len);
        let compare =
            |c: &KvCompare| range(&c.range) + if let KvCompareTarget::Value(v) = &c.target { v.len() } else { 8 };
        self.compares.iter().map(compare).sum::<usize>()
            + self
                .success
                .iter()
                .chain(&self.failure)
                .map(|op| match op {
                    KvOp::Range(q) => range(&q.range),
                    KvOp::Put(p) => p.key.len() + p.value.len(),
                    KvOp::DeleteRange { range: r, .. } => range(r),
                    KvOp::Txn(t) => t.bytes(),
                })
                .sum::<usize>()
    }
}

/// What one [`KvOp`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOpResult {
    Range(RangePage),
    /// The key before the put, if asked for and present.
    Put {
        prev: Option<KeyRecord>,
    },
    /// How many keys went, and (if asked for) each as it was.
    DeleteRange {
        deleted: u64,
        prev: Vec<KeyRecord>,
    },
    Txn {
        succeeded: bool,
        results: Vec<KvOpResult>,
    },
}
