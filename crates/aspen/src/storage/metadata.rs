//! The node's metadata store (`<data-dir>/metadata.db`, redb): cluster id and name, node id and
//! `num_shards`, recorded when the node initializes or joins a cluster and checked on restart;
//! and this node's copy of the cluster's token signing key (kept in shard 0, which a restarted
//! node may not have re-applied yet: tokens verify from the first request after a restart).
//!
//! It also records the data dir's storage format ([`STORAGE_FORMAT`]): a node refuses a data dir
//! written by a newer format and brings an older one up to its own (docs/operations.md,
//! "Upgrades").
//!
//! Every write is durable (fsync): this is the node's identity in the cluster.

use std::path::Path;

use redb::{Durability, ReadableDatabase, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    api::{ClusterId, NodeId},
    storage::{begin_write, open_db, StorageError},
};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_CLUSTER_ID: &str = "cluster_id";
const KEY_CLUSTER_NAME: &str = "cluster_name";
const KEY_NODE_ID: &str = "node_id";
const KEY_NUM_SHARDS: &str = "num_shards";
const KEY_SIGNING_KEY: &str = "signing_key";
const KEY_STORAGE_FORMAT: &str = "storage_format";

/// The storage format of the data dir this version writes (metadata, shard databases, journal,
/// snapshot staging). Version 1 is the first recorded one; a data dir without a record is of
/// format 0 (written before formats were recorded), which version 1 reads as it is — its opening
/// code fills in what older versions did not keep (digest sums, per-token session counts, a
/// shard's own journal moved into the node's). Version 2 numbers revisions per write (log index ×
/// 1024 + the write's place in its entry, `api::write_revision`): an older Aspen would number new
/// writes below the revisions already stored, so it must not open a format-2 data dir; format 1
/// needs no conversion (its revisions are log indexes, below every format-2 revision).
pub const STORAGE_FORMAT: u32 = 2;

/// What the metadata store records about this node's cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterIdentity {
    pub cluster_id: ClusterId,
    pub cluster_name: String,
    pub node_id: NodeId,
    pub num_shards: u32,
}

/// The metadata store of one node.
#[derive(Debug)]
pub struct MetadataStore {
    db: redb::Database,
}

impl MetadataStore {
    /// Opens or creates the store at `path` with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StorageError> {
        let db = open_db(path, cache_bytes)?;
        let txn = begin_write(&db, Durability::Immediate)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(MetadataStore { db })
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        let v = table.get(key)?;
        match v {
            Some(v) => Ok(Some(postcard::from_bytes(v.value())?)),
            None => Ok(None),
        }
    }

    /// The recorded identity, if this node has initialized or joined a cluster.
    pub fn identity(&self) -> Result<Option<ClusterIdentity>, StorageError> {
        let Some(cluster_id) = self.get::<ClusterId>(KEY_CLUSTER_ID)? else {
            return Ok(None);
        };
        Ok(Some(ClusterIdentity {
            cluster_id,
            cluster_name: self.get(KEY_CLUSTER_NAME)?.unwrap_or_default(),
            node_id: self.get(KEY_NODE_ID)?.unwrap_or_default(),
            num_shards: self.get(KEY_NUM_SHARDS)?.unwrap_or(1),
        }))
    }

    /// The data dir's recorded storage format (`None`: none recorded — a new data dir, or one
    /// written before formats were recorded).
    pub fn storage_format(&self) -> Result<Option<u32>, StorageError> {
        self.get(KEY_STORAGE_FORMAT)
    }

    /// Records the data dir's storage format (durably).
    pub fn set_storage_format(&self, format: u32) -> Result<(), StorageError> {
        let txn = begin_write(&self.db, Durability::Immediate)?;
        txn.open_table(META)?.insert(KEY_STORAGE_FORMAT, postcard::to_stdvec(&format)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// This node's copy of the cluster's signing key, if it recorded one.
    pub fn signing_key(&self) -> Result<Option<[u8; 32]>, StorageError> {
        self.get(KEY_SIGNING_KEY)
    }

    /// Records this node's copy of the cluster's signing key (durably).
    pub fn set_signing_key(&self, key: &[u8; 32]) -> Result<(), StorageError> {
        let txn = begin_write(&self.db, Durability::Immediate)?;
        txn.open_table(META)?.insert(KEY_SIGNING_KEY, postcard::to_stdvec(key)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Records the identity (durably, in one transaction).
    pub fn set_identity(&self, id: &ClusterIdentity) -> Result<(), StorageError> {
        fn put<T: Serialize>(t: &mut redb::Table<'_, &str, &[u8]>, k: &str, v: &T) -> Result<(), StorageError> {
            t.insert(k, postcard::to_stdvec(v)?.as_slice())?;
            Ok(())
        }
        let txn = begin_write(&self.db, Durability::Immediate)?;
        {
            let mut t = txn.open_table(META)?;
            put(&mut t, KEY_CLUSTER_ID, &id.cluster_id)?;
            put(&mut t, KEY_CLUSTER_NAME, &id.cluster_name)?;
            put(&mut t, KEY_NODE_ID, &id.node_id)?;
            put(&mut t, KEY_NUM_SHARDS, &id.num_shards)?;
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.db");
        let store = MetadataStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.identity().unwrap(), None);
        let id =
            ClusterIdentity { cluster_id: ClusterId::random(), cluster_name: "c".into(), node_id: 4, num_shards: 1 };
        store.set_identity(&id).unwrap();
        drop(store);
        let store = MetadataStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.identity().unwrap(), Some(id));
        assert_eq!(store.signing_key().unwrap(), None);
        store.set_signing_key(&[7; 32]).unwrap();
        drop(store);
        assert_eq!(MetadataStore::open(&path, 1 << 20).unwrap().signing_key().unwrap(), Some([7; 32]));
    }
}
