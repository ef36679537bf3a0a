//! Sharding: the stable key → shard [`router`] (docs/design.md invariant 3), the node's
//! [`ShardedKeyValueStore`] that sends each request to its shard ([`store`]: routing, leader
//! hints, forwarding decisions, scan and prefix-delete fan-out) and the batched forwarding to peers ([`forward`]).

pub mod forward;
pub mod router;
pub mod store;

pub use router::{jump_consistent_hash, stable_key_hash, ShardRouter};
pub use store::{AnswerHere, BoxedResult, LeaderHint, Route, ShardHints, ShardedKeyValueStore, MAX_HOPS};
