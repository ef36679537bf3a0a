//! Clusters in one process over real iroh on 127.0.0.1: replication, failover, snapshots and
//! joins ([`cluster`]), sharding ([`sharded`]), hostile input at every ALPN ([`bad_input`]) and
//! who may connect at all ([`peers`]), client tokens ([`tokens`]), leases ([`leases`]), watches ([`watch`]),
//! readiness over HTTP ([`ready`]).
//! One test binary (one link on a 2-core CI); the tests run one at a time (`.config/nextest.toml`).

#[path = "../support/mod.rs"]
mod support;

mod bad_input;
mod cluster;
mod leases;
mod peers;
mod ready;
mod sharded;
mod tokens;
mod watch;
