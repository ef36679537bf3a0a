//! The etcd v3 gRPC API (docs/design.md §18; docs/etcd.md for what is supported): etcdctl and
//! etcd's client libraries work against Aspen.
//!
//! Owns: the gRPC endpoint (`--etcd-addr`, optional rustls TLS) with etcd's HTTP endpoints and
//! JSON gateway beside it ([`http`], [`json`]), the translation of etcd's KV,
//! Watch, Lease, Cluster, Maintenance, Auth, Lock and Election services onto the node's own requests
//! ([`gateway`]), and etcd's error texts. It depends on the node only through
//! [`gateway::EtcdNode`] (implemented by `cluster::NodeService`), so requests take the same
//! routes as the native protocol's: forwarded to shard leaders, checked against token scopes.

pub mod admin;
pub mod election;
pub mod gateway;
pub mod health;
pub mod http;
pub mod json;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod proto;
pub mod server;
pub mod watch;

pub use gateway::{EtcdMember, EtcdNode, EtcdStatus, Gateway};
pub use server::{EtcdEndpoint, EtcdServeError, EtcdTls};
