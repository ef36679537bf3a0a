//! The Raft log of one shard in redb (`shard-N/raft-log.db`).
//!
//! Owns: log entries, the vote, the committed log id and the last purged log id. An append is
//! acknowledged to openraft (`log_io_completed`) only after its transaction was committed with
//! `Durability::Immediate` (fsync). The vote is fsync'd before `save_vote` returns. The committed
//! id is written without fsync: losing it only makes a restart re-apply a little less eagerly.
//!
//! Never: interpret entries (that is the state machine's job) or block the async runtime on
//! fsync (writes run on the blocking pool).

use std::{fmt::Debug, ops::RangeBounds, sync::Arc};

use openraft::{
    storage::{LogFlushed, RaftLogStorage},
    ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogId, RaftLogReader,
};
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    begin_write, open_db, open_db_with_backend, to_raft_err, Entry, LogId, OpenraftStorageError, StorageError,
    TypeConfig, Vote,
};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// The redb-backed log store. Cloning shares the database (the clone serves as log reader).
#[derive(Clone, Debug)]
pub struct RedbLogStore {
    db: Arc<redb::Database>,
    /// Cap on the payload bytes returned by one `limited_get_log_entries` (one AppendEntries).
    max_batch_bytes: u64,
}

impl RedbLogStore {
    /// Opens or creates the log at `path`.
    pub fn open(path: &std::path::Path, max_batch_bytes: u64) -> Result<Self, StorageError> {
        Self::from_db(open_db(path)?, max_batch_bytes)
    }

    /// Opens or creates the log on any redb storage backend (tests put it on a simulated disk).
    pub fn open_with_backend(backend: impl redb::StorageBackend, max_batch_bytes: u64) -> Result<Self, StorageError> {
        Self::from_db(open_db_with_backend(backend)?, max_batch_bytes)
    }

    fn from_db(db: redb::Database, max_batch_bytes: u64) -> Result<Self, StorageError> {
        let txn = begin_write(&db, Durability::Immediate)?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(RedbLogStore { db: Arc::new(db), max_batch_bytes })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        match table.get(key)? {
            Some(v) => Ok(Some(postcard::from_bytes(v.value())?)),
            None => Ok(None),
        }
    }

    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
        durability: Durability,
    ) -> Result<(), StorageError> {
        let bytes = postcard::to_stdvec(value)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let txn = begin_write(&db, durability)?;
            txn.open_table(META)?.insert(key, bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await?
    }

    fn read_range<RB: RangeBounds<u64>>(&self, range: RB, byte_cap: Option<u64>) -> Result<Vec<Entry>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for item in table.range(range)? {
            let (_, v) = item?;
            let raw = v.value();
            if let Some(cap) = byte_cap {
                // Always send at least one entry, even if it alone exceeds the cap.
                if !out.is_empty() && bytes + raw.len() as u64 > cap {
                    break;
                }
            }
            bytes += raw.len() as u64;
            out.push(postcard::from_bytes(raw)?);
        }
        Ok(out)
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let last = table.last()?;
        let id = match last {
            Some((_, v)) => Some(*postcard::from_bytes::<Entry>(v.value())?.get_log_id()),
            None => None,
        };
        Ok(id)
    }
}

fn logs_err(verb: ErrorVerb, e: impl std::fmt::Display) -> OpenraftStorageError {
    to_raft_err(ErrorSubject::Logs, verb, e)
}

impl RaftLogReader<TypeConfig> for RedbLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, OpenraftStorageError> {
        self.read_range(range, None).map_err(|e| logs_err(ErrorVerb::Read, e))
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, OpenraftStorageError> {
        self.read_range(start..end, Some(self.max_batch_bytes)).map_err(|e| logs_err(ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for RedbLogStore {
    type LogReader = RedbLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, OpenraftStorageError> {
        let last_purged: Option<LogId> = self.read_meta(KEY_LAST_PURGED).map_err(|e| logs_err(ErrorVerb::Read, e))?;
        let last = self.last_entry_id().map_err(|e| logs_err(ErrorVerb::Read, e))?.or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), OpenraftStorageError> {
        self.write_meta(KEY_VOTE, vote, Durability::Immediate)
            .await
            .map_err(|e| to_raft_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, OpenraftStorageError> {
        self.read_meta(KEY_VOTE).map_err(|e| to_raft_err(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), OpenraftStorageError> {
        self.write_meta(KEY_COMMITTED, &committed, Durability::None)
            .await
            .map_err(|e| to_raft_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, OpenraftStorageError> {
        let c: Option<Option<LogId>> =
            self.read_meta(KEY_COMMITTED).map_err(|e| to_raft_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        Ok(c.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), OpenraftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = postcard::to_stdvec(&entry).map_err(|e| logs_err(ErrorVerb::Write, e))?;
            encoded.push((entry.get_log_id().index, bytes));
        }
        let db = self.db.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let txn = begin_write(&db, Durability::Immediate)?;
            {
                let mut table = txn.open_table(LOG)?;
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(StorageError::from)
        .and_then(|r| r);
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(logs_err(ErrorVerb::Write, e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), OpenraftStorageError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let txn = begin_write(&db, Durability::Immediate)?;
            txn.open_table(LOG)?.retain_in(log_id.index.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(StorageError::from)
        .and_then(|r| r)
        .map_err(|e| logs_err(ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), OpenraftStorageError> {
        let db = self.db.clone();
        let bytes = postcard::to_stdvec(&log_id).map_err(|e| logs_err(ErrorVerb::Delete, e))?;
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let txn = begin_write(&db, Durability::Immediate)?;
            txn.open_table(META)?.insert(KEY_LAST_PURGED, bytes.as_slice())?;
            txn.open_table(LOG)?.retain_in(..=log_id.index, |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(StorageError::from)
        .and_then(|r| r)
        .map_err(|e| logs_err(ErrorVerb::Delete, e))
    }
}
