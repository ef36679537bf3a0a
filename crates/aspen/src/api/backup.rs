//! The backup file (`aspen-cli snapshot save FILE`, `aspen-node restore FILE`; docs/operations.md
//! "Backup and restore", docs/design.md §6.5).
//!
//! Owns: the file's layout, its header, and checking a file before anything is restored from it.
//!
//! Layout (integers little-endian): the 8 bytes `ASPENBK1`; the format version (`u32`, 1); the
//! header block's length H (`u32`, the whole block, these 16 bytes included); the BLAKE3 hash of
//! the header's JSON (32 bytes); the header as JSON, padded with spaces to H bytes; then the
//! body: each shard's snapshot stream (docs/design.md §6.4, itself ending in its own hash), in
//! shard order, of the lengths the header lists. The header holds the BLAKE3 hash and length
//! of the body, so a truncated or damaged file is refused before anything is restored. The
//! header block is written last (its room is kept at the start), then the file is renamed into
//! place: a reader never sees a half-written file under the final name.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use super::ShardId;

pub const MAGIC: &[u8; 8] = b"ASPENBK1";
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the header's JSON: magic, version, block length, hash.
const PREFIX: usize = 8 + 4 + 4 + 32;

/// What a backup holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    pub format: u32,
    /// The Aspen version that wrote it.
    pub aspen_version: String,
    pub cluster_id: String,
    pub cluster_name: String,
    pub num_shards: u32,
    /// When the save began (ms since the Unix epoch).
    pub created_unix_ms: u64,
    /// Length and BLAKE3 hash (hex) of the body.
    pub body_bytes: u64,
    pub body_blake3: String,
    pub shards: Vec<ShardBackupInfo>,
}

/// One shard's part of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardBackupInfo {
    pub shard: ShardId,
    /// The applied index the shard's state is at, and that entry's term.
    pub index: u64,
    pub term: u64,
    /// Bytes of its snapshot stream in the body.
    pub bytes: u64,
    /// The digest of the shard's data at `index` (hex; what `aspen-node restore` checks the
    /// restored state against).
    pub data_digest: String,
}

/// Why a file is not a usable backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupFileError {
    #[error("not an Aspen backup (no ASPENBK1 magic)")]
    NotABackup,
    #[error("backup format version {0}; this Aspen reads version {FORMAT_VERSION}")]
    Version(u32),
    #[error("the backup's header is damaged: {0}")]
    Header(String),
    #[error("the backup is truncated: {got} bytes of data where its header lists {expected}")]
    Truncated { expected: u64, got: u64 },
    #[error("the backup's data does not match its checksum (the file is damaged)")]
    Checksum,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The header block's length for `num_shards` shards (room for the header written last).
pub fn header_block_len(num_shards: u32) -> usize {
    4096 + 512 * num_shards as usize
}

/// The header block of `header`, `len` bytes long.
pub fn encode_header_block(header: &BackupHeader, len: usize) -> Result<Vec<u8>, BackupFileError> {
    let json = serde_json::to_vec(header).map_err(|e| BackupFileError::Header(e.to_string()))?;
    if PREFIX + json.len() > len {
        return Err(BackupFileError::Header(format!("{} bytes of header do not fit in {len}", json.len())));
    }
    let mut block = Vec::with_capacity(len);
    block.extend_from_slice(MAGIC);
    block.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    block.extend_from_slice(&(len as u32).to_le_bytes());
    block.extend_from_slice(blake3::hash(&json).as_bytes());
    block.extend_from_slice(&json);
    block.resize(len, b' ');
    Ok(block)
}

/// Reads and checks the header block at the start of `r`; returns the header and the block's
/// length (where the body starts).
pub fn read_header(r: &mut impl Read) -> Result<(BackupHeader, u64), BackupFileError> {
    let mut prefix = [0u8; PREFIX];
    r.read_exact(&mut prefix).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => BackupFileError::NotABackup,
        _ => BackupFileError::Io(e),
    })?;
    if &prefix[..8] != MAGIC {
        return Err(BackupFileError::NotABackup);
    }
    let version = u32::from_le_bytes(prefix[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(BackupFileError::Version(version));
    }
    let len = u32::from_le_bytes(prefix[12..16].try_into().expect("4 bytes")) as usize;
    if !(PREFIX..=64 << 20).contains(&len) {
        return Err(BackupFileError::Header(format!("a header block of {len} bytes")));
    }
    let mut rest = vec![0u8; len - PREFIX];
    r.read_exact(&mut rest).map_err(|_| BackupFileError::Header("the file ends inside it".into()))?;
    let json_len = rest.iter().rposition(|b| *b != b' ').map_or(0, |i| i + 1);
    let json = &rest[..json_len];
    if blake3::hash(json).as_bytes() != &prefix[16..48] {
        return Err(BackupFileError::Header("its checksum does not match".into()));
    }
    let header: BackupHeader = serde_json::from_slice(json).map_err(|e| BackupFileError::Header(e.to_string()))?;
    let listed: u64 = header.shards.iter().map(|s| s.bytes).sum();
    if listed != header.body_bytes || header.shards.len() != header.num_shards as usize {
        return Err(BackupFileError::Header("its shard list does not add up".into()));
    }
    for (i, s) in header.shards.iter().enumerate() {
        if s.shard as usize != i {
            return Err(BackupFileError::Header(format!("shard {} listed in place {i}", s.shard)));
        }
    }
    Ok((header, len as u64))
}

/// The most bytes an etcd trailer adds after the body: zeros to a 512-byte boundary, then a
/// SHA-256 (what etcdctl expects at the end of a snapshot; the etcd API's `Snapshot` appends it).
pub const MAX_ETCD_TRAILER: u64 = 511 + 32;

/// Reads the body from `r` (positioned after the header block) to its end and checks its length
/// and hash against `header`. An etcd trailer after the body (zeros, then 32 bytes; at most
/// [`MAX_ETCD_TRAILER`]) is passed over: the body's own hash covers the data.
pub fn verify_body(r: &mut impl Read, header: &BackupHeader) -> Result<(), BackupFileError> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let mut trailer = Vec::new();
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let body_part = (header.body_bytes.saturating_sub(got)).min(n as u64) as usize;
        hasher.update(&buf[..body_part]);
        got += body_part as u64;
        trailer.extend_from_slice(&buf[body_part..n]);
        if trailer.len() as u64 > MAX_ETCD_TRAILER {
            break;
        }
    }
    let trailer_ok = trailer.is_empty()
        || (trailer.len() >= 32
            && trailer.len() as u64 <= MAX_ETCD_TRAILER
            && trailer[..trailer.len() - 32].iter().all(|b| *b == 0));
    if got != header.body_bytes || !trailer_ok {
        return Err(BackupFileError::Truncated { expected: header.body_bytes, got: got + trailer.len() as u64 });
    }
    if hasher.finalize().to_hex().as_str() != header.body_blake3 {
        return Err(BackupFileError::Checksum);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(body: &[u8]) -> BackupHeader {
        BackupHeader {
            format: FORMAT_VERSION,
            aspen_version: "0.1.0".into(),
            cluster_id: "c".into(),
            cluster_name: "aspen".into(),
            num_shards: 2,
            created_unix_ms: 1,
            body_bytes: body.len() as u64,
            body_blake3: blake3::hash(body).to_hex().to_string(),
            shards: vec![
                ShardBackupInfo { shard: 0, index: 5, term: 1, bytes: 3, data_digest: "d0".into() },
                ShardBackupInfo { shard: 1, index: 7, term: 2, bytes: body.len() as u64 - 3, data_digest: "d1".into() },
            ],
        }
    }

    #[test]
    fn a_file_round_trips_and_damage_is_refused() {
        let body = b"0123456789".to_vec();
        let h = header(&body);
        let mut file = encode_header_block(&h, header_block_len(2)).unwrap();
        file.extend_from_slice(&body);
        let mut r = &file[..];
        let (read, start) = read_header(&mut r).unwrap();
        assert_eq!((read.clone(), start), (h.clone(), header_block_len(2) as u64));
        verify_body(&mut r, &read).unwrap();

        // Truncated body, flipped body byte, flipped header byte, other magic.
        let cut = &file[..file.len() - 2];
        let mut r = cut;
        let (read, _) = read_header(&mut r).unwrap();
        assert!(matches!(verify_body(&mut r, &read), Err(BackupFileError::Truncated { expected: 10, got: 8 })));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let mut r = &flipped[..];
        let (read, _) = read_header(&mut r).unwrap();
        assert!(matches!(verify_body(&mut r, &read), Err(BackupFileError::Checksum)));
        let mut bad = file.clone();
        bad[60] ^= 1;
        assert!(matches!(read_header(&mut &bad[..]), Err(BackupFileError::Header(_))));
        assert!(matches!(
            read_header(&mut &b"ASPNSNAP and more bytes than that"[..]),
            Err(BackupFileError::NotABackup)
        ));
        assert!(matches!(read_header(&mut &b"short"[..]), Err(BackupFileError::NotABackup)));

        // An etcd trailer (zeros to a 512-byte boundary, then 32 bytes) is passed over; other
        // trailing bytes are not.
        let mut etcd = file.clone();
        etcd.resize(file.len().div_ceil(512) * 512, 0);
        etcd.extend_from_slice(&[7u8; 32]);
        let mut r = &etcd[..];
        let (read, _) = read_header(&mut r).unwrap();
        verify_body(&mut r, &read).unwrap();
        let mut junk = file.clone();
        junk.extend_from_slice(&[1u8; 40]);
        let mut r = &junk[..];
        let (read, _) = read_header(&mut r).unwrap();
        assert!(matches!(verify_body(&mut r, &read), Err(BackupFileError::Truncated { .. })));
        let mut long = file.clone();
        long.extend_from_slice(&vec![0u8; 4096]);
        let mut r = &long[..];
        let (read, _) = read_header(&mut r).unwrap();
        assert!(verify_body(&mut r, &read).is_err(), "more than a trailer");
    }
}
