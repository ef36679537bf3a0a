//! Server-side protocol handlers registered on the node's iroh `Router`: the client protocol
//! (`aspen-client`) and the Raft protocols (`raft-rpc`, legacy and unprefixed, for shard 0;
//! `raft-shard`, with a 4-byte shard prefix).
//!
//! Handlers decode frames, refuse bad input with a typed error on that stream only, and call
//! into a service (client) or a shard's `Raft` (Raft RPC). They hold no state of their own
//! beyond what they route to.

pub mod client;
pub mod raft;

pub use client::{ClientProtocolHandler, ClientService};
pub use raft::{RaftProtocolHandler, RaftWire, ShardRegistry};
