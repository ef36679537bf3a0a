//! Key → shard routing: the functions live in [`crate::api::routing`] (clients route too); this
//! module keeps the name the sharding layer has always used.

pub use crate::api::routing::{jump_consistent_hash, stable_key_hash, ShardRouter};
