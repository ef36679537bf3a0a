//! Everything that makes a set of shards a running node: [`bootstrap`] (identity, endpoint,
//! metadata, shards, protocol handlers, join), the client-facing [`service`] (a dispatcher over
//! the sharded store), request [`validate`]ion, cluster [`membership`], leader [`placement`],
//! [`gossip`] discovery, the shard health [`supervisor`] and the membership watch that tells the
//! endpoint's gate who may connect ([`admission`]), and the claim token of a `--no-init` node
//! ([`claim`]), and tokens: issuing, revoking, join tokens, `admin.token` ([`tokens`]), and the
//! operator HTTP endpoint ([`http`]: health, readiness, status).

pub mod admission;
pub mod alarm;
pub mod backup;
pub mod bootstrap;
pub mod claim;
pub mod etcd_node;
pub mod gossip;
pub mod http;
pub mod leases;
pub mod membership;
pub mod placement;
pub mod scrape;
pub mod service;
pub mod supervisor;
pub mod tokens;
pub mod validate;
pub mod watch;

pub use crate::storage::MetadataStore;
pub use bootstrap::{
    bootstrap_base_node, bootstrap_node, bootstrap_sharded_node, bootstrap_until, BaseNodeResources, BootstrapError,
    NodeHandle,
};
