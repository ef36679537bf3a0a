//! # Aspen
//!
//! A sharded Raft key-value node daemon. One `aspen-node` process runs on each server and hosts
//! one or more shards; each shard is an independent openraft group with its own redb files. All
//! shards on a node share one iroh QUIC endpoint (the node's identity), one Raft network factory
//! and one metadata store. docs/design.md is the design: data path, invariants, storage layout.
//!
//! ```text
//! aspen-cli / Rust client ──(QUIC, ALPN aspen-client)──▶ any aspen-node
//!   transport::client_alpn ─▶ cluster::service ─▶ sharding::ShardedKeyValueStore
//!     shard = jump_hash(stable_hash(key), num_shards)
//!     │ shard local and led here ─▶ raft::RaftNode ─▶ openraft ─▶ storage (redb, shard-N/)
//!     └ otherwise ─▶ sharding::forward ─▶ the shard's leader ─▶ reply
//! openraft replication ──(raft-mux / raft-rpc / raft-shard)──▶ raft::server on the peer
//! ```
//!
//! Layers by rank; a module imports only from lower ranks (checked by the `layering` unit tests):
//!
//! | rank | module | owns |
//! |--:|---|---|
//! | 0 | [`api`] | wire and disk types: client requests, frames, tickets, the openraft type config, Raft RPC messages |
//! | 0 | [`logging`] | the node's default log filter ([`logging::DEFAULT_LOG_FILTER`]) |
//! | 1 | [`auth`] | token format, signing and verification, the node's token authority, what each request needs |
//! | 1 | [`config`] | the node's configuration (flags, environment, TOML) |
//! | 2 | [`storage`] | redb log store, log journal, state machine, metadata store |
//! | 2 | [`transport`] | iroh endpoint, connection pool, peer book, peer reachability, raft mux, request/answer exchange, client ALPN server, fault injection |
//! | 3 | [`raft`] | `RaftNode`, batcher, openraft network factory, Raft ALPN server |
//! | 3 | [`client`] | the Rust client |
//! | 4 | [`sharding`] | router, `ShardedKeyValueStore` (routing, hints, forwarding decisions, scan fan-out), batched forwarding |
//! | 5 | [`cluster`] | bootstrap, the client service (dispatcher), membership, leader placement, gossip, supervisor |
//!
//! Test and benchmark tooling lives outside this crate: `aspen-checker` (linearizability
//! checker), `aspen-bench` (load generator), `aspen-testkit` (the process harness), `aspen-bin`
//! (the binaries and integration tests).

pub mod api;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod etcd;
pub mod logging;
pub mod metrics;
pub mod raft;
pub mod sharding;
pub mod storage;
pub mod transport;

#[cfg(test)]
mod layering;

pub use api::{ApiError, KeyValue, NodeTicket};

pub use client::{AspenClient, ClientEndpoint, ClientError};
pub use config::NodeConfig;
