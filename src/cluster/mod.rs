//! Everything that makes a set of shards a running node: bootstrap (identity, endpoint,
//! metadata, shards, protocol handlers), the metadata store, and the client-facing service that
//! validates requests and routes them to shards.

pub mod bootstrap;
pub mod endpoint;
pub mod forward;
pub mod gossip;
pub mod metadata;
pub mod service;
pub mod supervisor;

pub use bootstrap::{
    bootstrap_base_node, bootstrap_node, bootstrap_sharded_node, BaseNodeResources, BootstrapError, NodeHandle,
    ShardedNodeHandle,
};
pub use metadata::MetadataStore;
