//! One page of a key-range scan over a shard's local state: the bounds a request covers (prefix,
//! start, end, continuation) and a page capped in keys and in bytes, with the continuation that
//! resumes exactly after it. Scans over several shards merge these pages
//! (`crate::sharding::store`).

use std::ops::Bound;

use super::{state_machine::StateReader, StorageError};
use crate::api::{ScanPage, ScanRequest};

/// Most key+value bytes in one scan page (a quarter of the frame limit).
pub const SCAN_PAGE_MAX_BYTES: usize = crate::api::MAX_FRAME_BYTES / 4;

pub use crate::api::prefix_end;

/// The key bounds a scan request covers, taking prefix, start, end and continuation together.
pub fn scan_bounds(req: &ScanRequest) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let mut lower: Bound<Vec<u8>> = Bound::Included(req.prefix.clone());
    if let Some(start) = &req.start {
        if start.as_slice() > req.prefix.as_slice() {
            lower = Bound::Included(start.clone());
        }
    }
    if let Some(cont) = &req.continuation {
        let after = match &lower {
            Bound::Included(l) => cont >= l,
            _ => true,
        };
        if after {
            lower = Bound::Excluded(cont.clone());
        }
    }
    let mut upper = match prefix_end(&req.prefix) {
        Some(e) if !req.prefix.is_empty() => Bound::Excluded(e),
        _ => Bound::Unbounded,
    };
    if let Some(end) = &req.end {
        let tighter = match &upper {
            Bound::Excluded(u) => end < u,
            _ => true,
        };
        if tighter {
            upper = Bound::Excluded(end.clone());
        }
    }
    (lower, upper)
}

/// One scan page from local state: at most `min(req.limit, page_limit)` keys, cut once its keys
/// and values reach `max_bytes` (at least one key), plus a continuation token when more keys may
/// follow.
pub fn scan_local(
    reader: &StateReader,
    req: &ScanRequest,
    page_limit: usize,
    max_bytes: usize,
) -> Result<ScanPage, StorageError> {
    let limit = (req.limit as usize).min(page_limit).max(1);
    let (lower, upper) = scan_bounds(req);
    if let (Bound::Excluded(l) | Bound::Included(l), Bound::Excluded(u)) = (&lower, &upper) {
        if l >= u {
            return Ok(ScanPage { entries: Vec::new(), continuation: None });
        }
    }
    // One more than asked tells whether more keys follow; the byte cap keeps a page of large
    // values well inside one frame (the page then ends early, with a continuation).
    // The cluster's own keys are not part of any client's scan (clients cannot name the
    // reserved prefix; the cluster's own scans do).
    let skip_reserved = !crate::api::is_reserved_key(&req.prefix);
    let mut entries =
        reader.range_filtered(bound_ref(&lower), bound_ref(&upper), limit + 1, max_bytes, skip_reserved)?;
    let continuation = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|kv| kv.key.clone())
    } else if entries.iter().map(|kv| kv.key.len() + kv.value.len()).sum::<usize>() >= max_bytes {
        // Cut by bytes: more keys may follow.
        entries.last().map(|kv| kv.key.clone())
    } else {
        None
    };
    Ok(ScanPage { entries, continuation })
}

fn bound_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(v) => Bound::Included(v.as_slice()),
        Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}
