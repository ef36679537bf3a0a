//! One shard's Raft group: [`RaftNode`] (the handle the rest of the node uses to read and write
//! one shard: proposals through the [`batcher`], linearizable reads, membership), openraft's
//! network factory over the node's transport ([`network`]), and the server side of the Raft
//! ALPNs that hands incoming RPCs to the right shard ([`server`]).
//!
//! The types every layer shares (the openraft type configuration, log entry payloads, member
//! records) live in [`crate::api::raft`]; the log store and state machine in
//! [`crate::storage`]. This module knows nothing about sharding, client requests or bootstrap;
//! they call into it.

pub mod batcher;
pub mod network;
pub mod node;
pub mod server;
pub mod snapshot_transfer;

pub use crate::api::raft::{
    ApplyResult, Entry, LogId, MemberNode, Raft, SnapshotMeta, StoredMembership, TypeConfig, Vote, WriteBatch,
    WriteRequest,
};
pub use network::IrohNetworkFactory;
pub use node::RaftNode;
pub use server::{RaftProtocolHandler, RaftWire, ShardRegistry};
