//! # Aspen
//!
//! A sharded Raft key-value node daemon. One `aspen-node` process runs on each server and hosts
//! one or more shards; each shard is an independent openraft group with its own redb files. All
//! shards on a node share one iroh QUIC endpoint (the node's identity), one Raft network factory
//! and one metadata store.
//!
//! ```text
//! aspen-cli / Rust client ──(QUIC, ALPN aspen-client)──▶ any aspen-node
//!    client handler ─▶ key-value service ── shard = jump_hash(stable_hash(key), num_shards)
//!         │ shard local and led here ─▶ RaftNode(shard) ─▶ openraft ─▶ redb (shard-N/*.db)
//!         └ otherwise ─▶ forward to the shard's leader ─▶ reply
//! openraft replication ──(ALPN raft-rpc / raft-shard)──▶ peer's RaftNode(shard)
//! ```
//!
//! Layers, top to bottom (a lower one never imports a higher one):
//! binaries → [`cluster`] → [`protocol`] → [`raft`] / [`client`] → [`api`], [`config`].
//! [`checker`] (linearizability checking of recorded client histories, for tests) stands apart and imports none.
//! [`bench`] (the load generator behind `aspen-cli bench`) sits beside the binaries, on [`client`].

pub mod api;
pub mod bench;
pub mod checker;
pub mod client;
pub mod cluster;
pub mod config;
pub mod fault;
pub mod protocol;
pub mod raft;
pub mod sharding;

pub use api::{ApiError, KeyValue, NodeTicket};

pub use client::{AspenClient, ClientEndpoint, ClientError};
pub use config::NodeConfig;
