//! Leases on the wire: ids, their text form, where a lease lives, and what lease requests answer
//! (docs/design.md §16 "Leases").
//!
//! A lease id is a number in `1..=2^63−1` (etcd clients parse lease ids as signed 64-bit),
//! printed as 16 lowercase hex digits and read from 1–16 hex digits in either case. A lease
//! lives in its **home shard**, `jump_consistent_hash(stable_key_hash(id as 8 big-endian
//! bytes), num_shards)` — fixed forever like key routing (invariant 3); keys attached to it may
//! live in any shard.

use serde::{Deserialize, Serialize};

use super::{routing::ShardRouter, ShardId};

/// The largest lease id (etcd's ids are signed 64-bit).
pub const MAX_LEASE_ID: u64 = i64::MAX as u64;

/// The longest TTL a lease may be granted (etcd's limit: 9,000,000,000 s; ours is a year, which
/// keeps deadlines far from any clock's overflow).
pub const MAX_LEASE_TTL_SECS: u64 = 365 * 24 * 3600;

/// The text form of a lease id: 16 lowercase hex digits.
pub fn format_lease_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Reads a lease id from 1–16 hex digits (either case); refuses 0 and ids above
/// [`MAX_LEASE_ID`].
pub fn parse_lease_id(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() || t.len() > 16 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("malformed lease id {text:?}: expected 1 to 16 hex digits"));
    }
    let id = u64::from_str_radix(t, 16).map_err(|e| format!("malformed lease id {text:?}: {e}"))?;
    check_lease_id(id).map(|()| id)
}

/// Whether `id` may name a lease.
pub fn check_lease_id(id: u64) -> Result<(), String> {
    if id == 0 || id > MAX_LEASE_ID {
        return Err(format!("lease id {id:#x} is out of range (1 to {MAX_LEASE_ID:#x})"));
    }
    Ok(())
}

/// Whether `ttl_secs` may be granted.
pub fn check_lease_ttl(ttl_secs: u64) -> Result<(), String> {
    if ttl_secs == 0 || ttl_secs > MAX_LEASE_TTL_SECS {
        return Err(format!("lease TTL {ttl_secs} s is out of range (1 to {MAX_LEASE_TTL_SECS} s)"));
    }
    Ok(())
}

/// A random lease id in `1..=MAX_LEASE_ID`.
pub fn random_lease_id() -> u64 {
    loop {
        let id = rand::random::<u64>() >> 1;
        if id != 0 {
            return id;
        }
    }
}

impl ShardRouter {
    /// The home shard of lease `id`: where its record, deadline and keep-alives live.
    pub fn shard_for_lease(&self, id: u64) -> ShardId {
        if self.num_shards() == 1 {
            return 0;
        }
        super::routing::jump_consistent_hash(super::routing::stable_key_hash(&id.to_be_bytes()), self.num_shards())
    }
}

/// What `lease ttl` shows of a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub id: u64,
    /// Seconds left before it expires without a keep-alive (rounded up), as its home shard's
    /// leader counts them.
    pub ttl_secs: u64,
    /// The TTL it was granted (every keep-alive renews it to this).
    pub granted_ttl_secs: u64,
    /// Its keys in every shard, in key order (only when asked for).
    pub keys: Vec<Vec<u8>>,
}

/// One lease of `lease list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEntry {
    pub id: u64,
    pub granted_ttl_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_print_as_16_hex_digits_and_parse_in_any_case() {
        assert_eq!(format_lease_id(0x2a), "000000000000002a");
        assert_eq!(parse_lease_id("2A").unwrap(), 0x2a);
        assert_eq!(parse_lease_id("000000000000002a").unwrap(), 0x2a);
        assert_eq!(parse_lease_id("7fffffffffffffff").unwrap(), MAX_LEASE_ID);
        for bad in ["", "0", "8000000000000000", "ffffffffffffffff", "12345678901234567", "xyz", "-1", "0x2a"] {
            assert!(parse_lease_id(bad).is_err(), "{bad:?} accepted");
        }
        for _ in 0..1000 {
            let id = random_lease_id();
            assert_eq!(parse_lease_id(&format_lease_id(id)).unwrap(), id);
        }
    }

    #[test]
    fn lease_homes_are_pinned_and_spread_over_shards() {
        // Pinned: changing the lease → shard function would strand every lease's keep-alives.
        let r = ShardRouter::new(4);
        let homes: Vec<ShardId> = (1..=8).map(|id| r.shard_for_lease(id)).collect();
        assert_eq!(homes, PINNED_HOMES);
        let mut seen = [0u32; 4];
        for id in 1..=4000u64 {
            seen[r.shard_for_lease(id) as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 800), "{seen:?}");
        assert_eq!(ShardRouter::new(1).shard_for_lease(12345), 0);
    }

    /// `shard_for_lease(1..=8)` over 4 shards.
    const PINNED_HOMES: [ShardId; 8] = [0, 2, 1, 2, 1, 0, 3, 0];
}
