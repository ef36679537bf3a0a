//! Key → shard routing, fixed by this crate so that every node, every client and every release
//! agrees forever (docs/design.md invariant 3). In `api` (the bottom layer) because clients
//! route too: the Rust client numbers each session's writes per shard.
//!
//! `shard = jump_consistent_hash(stable_key_hash(key), num_shards)` where
//! - `stable_key_hash` is 64-bit FNV-1a over the key bytes followed by the MurmurHash3 `fmix64`
//!   finalizer (FNV alone mixes its high bits poorly, and jump hash reads the high bits), and
//! - `jump_consistent_hash` is Lamping & Veach's jump consistent hash (2014), which moves only
//!   `1/n` of the keys when a shard is added.
//!
//! Never change either function: the pinned test vectors below guard them.

use super::ShardId;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The stable 64-bit hash of a key.
pub fn stable_key_hash(key: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in key {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    fmix64(h)
}

/// MurmurHash3's 64-bit finalizer: every input bit affects every output bit.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Jump consistent hash: a bucket in `0..buckets` for `key` (`buckets` ≥ 1).
pub fn jump_consistent_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = buckets.max(1) as i64;
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// Routes keys to shards for a fixed number of shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardRouter {
    num_shards: u32,
}

impl ShardRouter {
    /// A router over `num_shards` shards (at least 1).
    pub fn new(num_shards: u32) -> Self {
        ShardRouter { num_shards: num_shards.max(1) }
    }

    pub fn num_shards(&self) -> u32 {
        self.num_shards
    }

    /// The shard that owns `key`.
    pub fn shard_for_key(&self, key: &[u8]) -> ShardId {
        // The cluster's own keys live in shard 0, which every node hosts: every node reads
        // tokens and revocations locally.
        if self.num_shards == 1 || super::is_reserved_key(key) {
            return 0;
        }
        jump_consistent_hash(stable_key_hash(key), self.num_shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned outputs: if this test fails, routing changed and existing clusters would lose keys.
    #[test]
    fn hash_test_vectors_are_pinned() {
        let vectors: [(&[u8], u64); 5] = [
            (b"", 0xefd0_1f60_ba99_2926),
            (b"a", 0x82a2_a958_a9be_ce5b),
            (b"hello", 0xe9c5_62c0_fdb2_3244),
            (b"user/42", 0xab51_e013_121d_86fd),
            (&[0u8, 255, 7], 0x361e_9cbd_eabe_f2e8),
        ];
        for (k, want) in vectors {
            assert_eq!(stable_key_hash(k), want, "key {k:?}: got {:#018x}", stable_key_hash(k));
        }
    }

    #[test]
    fn jump_hash_vectors_are_pinned() {
        // Pinned when routing was first released; the last also matches other implementations of
        // the published algorithm.
        assert_eq!(jump_consistent_hash(0, 1), 0);
        assert_eq!(jump_consistent_hash(1, 2), 0);
        assert_eq!(jump_consistent_hash(256, 1024), 520);
        let r = ShardRouter::new(4);
        let pinned: Vec<ShardId> =
            ["a", "b", "c", "user/1", "user/2", "zzz"].iter().map(|k| r.shard_for_key(k.as_bytes())).collect();
        assert_eq!(pinned, PINNED_4);
    }

    const PINNED_4: [ShardId; 6] = [3, 0, 1, 2, 0, 2];

    #[test]
    fn balance_within_ten_percent() {
        for shards in [4u32, 16] {
            let r = ShardRouter::new(shards);
            let mut counts = vec![0u32; shards as usize];
            let n = 100_000u32;
            for i in 0..n {
                counts[r.shard_for_key(format!("key-{i}").as_bytes()) as usize] += 1;
            }
            let ideal = n as f64 / shards as f64;
            for (s, c) in counts.iter().enumerate() {
                let dev = (*c as f64 - ideal).abs() / ideal;
                assert!(dev <= 0.10, "{shards} shards: shard {s} has {c} keys ({:.1}% off)", dev * 100.0);
            }
        }
    }

    #[test]
    fn growing_moves_few_keys() {
        let (r4, r5) = (ShardRouter::new(4), ShardRouter::new(5));
        let moved = (0..10_000).filter(|i| {
            let k = format!("k{i}");
            r4.shard_for_key(k.as_bytes()) != r5.shard_for_key(k.as_bytes())
        });
        // Ideal is 1/5 of the keys; all of them move to the new shard.
        let moved: Vec<_> = moved.collect();
        assert!(moved.len() < 2_400, "{} keys moved", moved.len());
        for i in moved {
            assert_eq!(r5.shard_for_key(format!("k{i}").as_bytes()), 4);
        }
    }

    #[test]
    fn one_shard_takes_everything() {
        let r = ShardRouter::new(1);
        assert_eq!(r.shard_for_key(b"anything"), 0);
        assert_eq!(ShardRouter::new(0).num_shards(), 1);
    }
}
