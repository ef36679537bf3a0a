//! The claim token of a node started with `--no-init`: written to `<data-dir>/claim.token`
//! (mode 0600) when the node starts without a cluster, and required to make it a member
//! (`cluster add-learner TICKET --claim-token T`) or a cluster of its own (`cluster init`, which
//! `aspen-cli` sends with the token it reads from the node's data dir). Without it, whoever
//! reaches a fresh node first could make it part of their cluster. The file is removed once the
//! node belongs to a cluster.
//!
//! Owns: the file and the comparison. Never: decide what claiming does (membership does).

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::api::ApiError;

/// The claim token file in a data dir.
pub const FILE_NAME: &str = "claim.token";

/// A node's pending claim (none once it belongs to a cluster).
#[derive(Debug, Default)]
pub struct Claim {
    pending: Mutex<Option<(String, PathBuf)>>,
}

impl Claim {
    /// The claim of a fresh `--no-init` node: the token in `<data_dir>/claim.token`, made (mode
    /// 0600) if the file does not exist yet, so a restart keeps the token.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<Self> {
        let path = data_dir.join(FILE_NAME);
        let token = match std::fs::read_to_string(&path) {
            Ok(text) if is_token(text.trim()) => text.trim().to_string(),
            Ok(_) | Err(_) => {
                let bytes: [u8; 32] = rand::random();
                let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                crate::transport::endpoint::write_private(&path, format!("{token}\n").as_bytes())?;
                token
            }
        };
        Ok(Claim { pending: Mutex::new(Some((token, path))) })
    }

    /// Whether the node still waits to be claimed.
    pub fn is_pending(&self) -> bool {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Checks `offered` against the pending token; `Ok` when nothing is pending.
    pub fn check(&self, node_id: u64, offered: Option<&str>) -> Result<(), ApiError> {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Some((token, _)) = pending.as_ref() else { return Ok(()) };
        match offered {
            Some(t) if equal_in_constant_time(t.trim().as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::Refused(format!("wrong claim token for node {node_id}"))),
            None => Err(ApiError::Refused(format!(
                "node {node_id} was started with --no-init and is claimed only with its claim token \
                 (its data dir's {FILE_NAME}): cluster add-learner TICKET --claim-token TOKEN, or \
                 cluster init on its machine"
            ))),
        }
    }

    /// The node belongs to a cluster now: the token is spent and its file removed.
    pub fn settle(&self) {
        if let Some((_, path)) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("could not remove {}: {e}", path.display());
            }
        }
    }
}

fn is_token(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_kept_across_restarts_checked_and_spent() {
        let dir = tempfile::tempdir().unwrap();
        let claim = Claim::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(FILE_NAME);
        let token = std::fs::read_to_string(&path).unwrap().trim().to_string();
        assert!(is_token(&token));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let again = Claim::load_or_create(dir.path()).unwrap();
        assert!(again.check(4, Some(&token)).is_ok(), "a restart keeps the token");
        assert!(claim.check(4, None).is_err());
        assert!(claim.check(4, Some("00")).is_err());
        let mut wrong = token.clone().into_bytes();
        wrong[63] = if wrong[63] == b'0' { b'1' } else { b'0' };
        assert!(claim.check(4, Some(std::str::from_utf8(&wrong).unwrap())).is_err());
        assert!(claim.check(4, Some(&format!("{token}\n"))).is_ok(), "surrounding whitespace is fine");
        claim.settle();
        assert!(!claim.is_pending() && !path.exists(), "spent and removed");
        assert!(claim.check(4, None).is_ok(), "nothing pending");
    }
}
