//! `aspen-cli snapshot save`: a backup of every shard into one file (docs/operations.md "Backup
//! and restore"; the file's layout is `api::backup`).
//!
//! Each shard's leader serves its shard's snapshot stream in chunks from one consistent read
//! (`cluster::backup`); this writes them one after another into a temp file beside the target,
//! hashing as it goes, then the header with the checksums at the start, fsyncs and renames the
//! file into place. A shard whose session breaks (its leader changed, say) is saved again from
//! its start, a few times at most. Memory: one chunk.

use std::{
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use super::{unexpected, AspenClient, ClientError};
use crate::api::{
    backup::{encode_header_block, header_block_len, BackupHeader, ShardBackupInfo, FORMAT_VERSION},
    ApiError, ClientRequest, ClientResponse, ShardId,
};

/// How often one shard is started over before the save fails.
const SHARD_ATTEMPTS: u32 = 3;

/// Where a save stands, for a progress display.
#[derive(Clone, Copy, Debug)]
pub struct SaveProgress {
    pub shard: ShardId,
    pub num_shards: u32,
    /// Bytes of this shard written so far, and of the whole file.
    pub shard_bytes: u64,
    pub total_bytes: u64,
}

/// Why a save failed (the target file is untouched).
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
}

/// What a save asks its requests of: a client of the cluster ([`AspenClient`]), or a node in
/// process (the etcd API's `Snapshot`).
pub trait BackupSource: Sync {
    fn ask(
        &self,
        request: ClientRequest,
    ) -> impl std::future::Future<Output = Result<ClientResponse, ClientError>> + Send;
}

impl BackupSource for AspenClient {
    async fn ask(&self, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        self.request(request).await
    }
}

impl AspenClient {
    /// Saves a backup of every shard to `path` (replaced atomically), calling `progress` after
    /// each chunk. Needs an admin token.
    pub async fn save_backup(
        &self,
        path: &Path,
        progress: impl FnMut(SaveProgress),
    ) -> Result<BackupHeader, SaveError> {
        save_backup(self, path, progress).await
    }
}

/// Saves a backup of every shard of the cluster `source` reaches to `path` (replaced
/// atomically), calling `progress` after each chunk.
pub async fn save_backup(
    source: &impl BackupSource,
    path: &Path,
    mut progress: impl FnMut(SaveProgress),
) -> Result<BackupHeader, SaveError> {
    let created_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let status = match source.ask(ClientRequest::ClusterStatus).await? {
        ClientResponse::ClusterStatus(s) => s,
        other => return Err(unexpected(other).into()),
    };
    let num_shards = match source.ask(ClientRequest::Topology).await? {
        ClientResponse::Topology { num_shards, .. } => num_shards,
        other => return Err(unexpected(other).into()),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "backup".into());
    let temp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SaveError::File { path: p, source }
    };
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&temp).map_err(io(&temp))?;
    let saved = async {
        let block = header_block_len(num_shards);
        file.write_all(&vec![0u8; block]).map_err(io(&temp))?;
        let mut hasher = blake3::Hasher::new();
        let mut shards = Vec::new();
        let mut total = 0u64;
        for shard in 0..num_shards {
            let start = file.stream_position().map_err(io(&temp))?;
            let mut attempt = 0;
            let info = loop {
                attempt += 1;
                let mut shard_hasher = hasher.clone();
                let mut report = |shard_bytes| {
                    progress(SaveProgress { shard, num_shards, shard_bytes, total_bytes: total + shard_bytes })
                };
                match save_shard(source, shard, (&mut file, &temp), &mut shard_hasher, &mut report).await {
                    Ok(info) => {
                        hasher = shard_hasher;
                        tracing::debug!(shard, index = info.index, bytes = info.bytes, "shard saved");
                        break info;
                    }
                    Err(SaveError::Client(ClientError::Api(e)))
                        if attempt < SHARD_ATTEMPTS && !matches!(e, ApiError::PermissionDenied(_)) =>
                    {
                        tracing::warn!(shard, "saving shard {shard} again: {e}");
                        // Another save may hold the leader's sessions, or it is changing.
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        file.set_len(start).map_err(io(&temp))?;
                        file.seek(SeekFrom::Start(start)).map_err(io(&temp))?;
                    }
                    Err(e) => return Err(e),
                }
            };
            total += info.bytes;
            shards.push(info);
        }
        let header = BackupHeader {
            format: FORMAT_VERSION,
            aspen_version: env!("CARGO_PKG_VERSION").to_string(),
            cluster_id: status.cluster_id.to_string(),
            cluster_name: status.cluster_name.clone(),
            num_shards,
            created_unix_ms,
            body_bytes: total,
            body_blake3: hasher.finalize().to_hex().to_string(),
            shards,
        };
        let block = encode_header_block(&header, block)
            .map_err(|e| SaveError::File { path: temp.clone(), source: std::io::Error::other(e.to_string()) })?;
        file.seek(SeekFrom::Start(0)).map_err(io(&temp))?;
        file.write_all(&block).map_err(io(&temp))?;
        file.sync_all().map_err(io(&temp))?;
        Ok(header)
    }
    .await;
    let header = match saved {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
    };
    drop(file);
    if let Err(source) = std::fs::rename(&temp, path) {
        let _ = std::fs::remove_file(&temp);
        return Err(SaveError::File { path: path.to_path_buf(), source });
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
    Ok(header)
}

/// Writes one shard's stream at the file's position; returns what the header lists of it.
async fn save_shard(
    source: &impl BackupSource,
    shard: ShardId,
    (file, path): (&mut std::fs::File, &Path),
    hasher: &mut blake3::Hasher,
    progress: &mut impl FnMut(u64),
) -> Result<ShardBackupInfo, SaveError> {
    let (mut session, mut offset) = (0u64, 0u64);
    loop {
        let chunk = match source.ask(ClientRequest::ShardBackup { shard, session, offset }).await? {
            ClientResponse::BackupChunk(c) => c,
            other => return Err(unexpected(other).into()),
        };
        if chunk.shard != shard || chunk.offset != offset || (session != 0 && chunk.session != session) {
            return Err(ClientError::Protocol(format!(
                "asked for shard {shard} at {offset}, got shard {} at {}",
                chunk.shard, chunk.offset
            ))
            .into());
        }
        session = chunk.session;
        file.write_all(&chunk.bytes).map_err(|source| SaveError::File { path: path.to_path_buf(), source })?;
        hasher.update(&chunk.bytes);
        offset += chunk.bytes.len() as u64;
        progress(offset);
        if chunk.done {
            let digest = chunk
                .data_digest
                .ok_or_else(|| ClientError::Protocol("the last chunk carries no data digest".into()))?;
            let info = ShardBackupInfo {
                shard,
                index: chunk.index,
                term: chunk.term,
                bytes: offset,
                data_digest: data_encoding::HEXLOWER.encode(&digest),
            };
            return Ok(info);
        }
    }
}
