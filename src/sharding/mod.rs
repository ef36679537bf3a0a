//! Sharding: the stable key → shard router (and, as sharding grows, the sharded key-value store
//! that sends each request to its shard).

pub mod router;

pub use router::{jump_consistent_hash, stable_key_hash, ShardRouter};
