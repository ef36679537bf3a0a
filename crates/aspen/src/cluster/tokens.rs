//! The cluster's side of tokens: the cluster's signing key, issuing client and join tokens
//! (recorded in shard 0), listing and revoking them, spending single-use join tokens, each
//! node's `admin.token`, and keeping the node's [`crate::auth::Authority`] current with what
//! shard 0 holds.
//!
//! Records live in shard 0's reserved keyspace (`crate::api::RESERVED_PREFIX`), written through
//! Raft like any key, so they replicate to every member, survive restarts and travel in
//! snapshots:
//! - `cluster-key` → the cluster's ed25519 signing key (32 bytes), made once by the node that
//!   initializes the cluster (or, for a cluster from before tokens, by shard 0's leader) with a
//!   compare-and-swap; every member holds it, so every member verifies and issues tokens, and
//!   tokens outlive the node that issued them;
//! - `tokens/<id>` → the [`TokenInfo`] of an issued client token (never the token itself);
//! - `revoked/<id>` → the revoked token's expiry (postcard `Option<u64>`);
//! - `join/<id>` → the node id a single-use join token admitted (a compare-and-swap, so a
//!   retried join of that node stays idempotent and any other node is refused).
//!
//! Every node reads `revoked/` from its own replica of shard 0 every [`REFRESH_EVERY`] (when
//! shard 0 applied something new): a revocation is refused by every node within about a
//! second of its commit.
//!
//! Owns: those records and the `admin.token` file. Never: verify a request's token (the client
//! ALPN handler asks the authority).

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::service::NodeService;
use crate::{
    api::{
        ApiError, ClientRequest, ClientResponse, Id128, NodeId, ReadConsistency, ScanRequest, TokenInfo, WriteCommand,
        WriteOutcome, WriteSession, RESERVED_PREFIX,
    },
    auth::{
        token::{self, format_id},
        Scope, TokenBody, TokenKind,
    },
    transport::endpoint::write_private,
};

/// The reserved key of the cluster's signing key.
const CLUSTER_KEY: &str = "cluster-key";
/// A node's admin token file in its data dir (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// How often a node re-reads the revocations from its replica of shard 0.
pub const REFRESH_EVERY: Duration = Duration::from_millis(500);
/// Revocations a node reads per refresh (far more than any cluster should hold: revoke
/// long-lived tokens, let short-lived ones expire).
const MAX_REVOCATIONS: usize = 100_000;
/// Default lifetime of a join token (1 h).
pub const DEFAULT_JOIN_TTL_SECS: u64 = 3600;

/// The reserved key `name` (under [`RESERVED_PREFIX`]).
fn reserved_key(name: &str) -> Vec<u8> {
    [RESERVED_PREFIX, name.as_bytes()].concat()
}

/// The record of token `id` of `kind` (`tokens`, `revoked`, `join`).
pub(super) fn reserved(kind: &str, id: u64) -> Vec<u8> {
    reserved_key(&format!("{kind}/{}", format_id(id)))
}

/// Every record of `kind`.
pub(super) fn reserved_prefix(kind: &str) -> Vec<u8> {
    reserved_key(&format!("{kind}/"))
}

/// The id at the end of a reserved key (`…/<16 hex>`).
pub(super) fn id_of(key: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(key).ok()?;
    token::parse_id(text.rsplit('/').next()?)
}

/// What `auth token list` shows of a token body.
pub fn info_of(body: &TokenBody, note: &str) -> TokenInfo {
    let (kind, scope) = match &body.kind {
        TokenKind::Client(s) => ("client", s.clone()),
        TokenKind::Join { single_use } => (if *single_use { "join (single use)" } else { "join" }, Scope::default()),
    };
    TokenInfo {
        id: body.id,
        kind: kind.into(),
        read: scope.read,
        write: scope.write,
        admin: scope.admin,
        prefixes: scope.prefixes,
        issuer: body.issuer,
        issued_at: body.issued_at,
        expires_at: body.expires_at,
        revoked: false,
        note: note.into(),
    }
}

fn internal_session() -> WriteSession {
    WriteSession { client_id: Id128::random(), seq: 1 }
}

fn token_error(e: crate::auth::TokenError) -> ApiError {
    match e {
        crate::auth::TokenError::NotReady => ApiError::Unavailable(e.to_string()),
        e => ApiError::InvalidRequest(e.to_string()),
    }
}

impl NodeService {
    /// The path of this node's `admin.token`.
    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join(ADMIN_TOKEN_FILE)
    }

    /// Writes `<data-dir>/admin.token` (0600) unless it holds a token of this cluster's key, and
    /// has a new one recorded in shard 0 (by [`Self::follow_revocations`]'s task: the shard may
    /// not take writes yet). `Ok(false)`: the cluster's key is not here yet (a node that is
    /// still catching up); the same task tries again.
    pub fn ensure_admin_token(&self) -> Result<bool, ApiError> {
        if !self.authority.has_key() {
            return Ok(false);
        }
        let path = self.admin_token_path();
        let cluster_id = self.cluster_id();
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(body) = token::decode_and_verify(&text) {
                if body.cluster_id == cluster_id && self.authority.signed_here(&body) {
                    return Ok(true);
                }
            }
        }
        let (text, body) = self.authority.issue(TokenKind::Client(Scope::all()), None).map_err(token_error)?;
        write_private(&path, format!("{text}\n").as_bytes())
            .map_err(|e| ApiError::Internal(format!("cannot write {}: {e}", path.display())))?;
        tracing::info!(id = %format_id(body.id), "wrote {}", path.display());
        let info = info_of(&body, &format!("admin.token of node {}", self.node_id));
        *self.unrecorded.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
        Ok(true)
    }

    /// The cluster's signing key in this node's replica of shard 0, if it is there.
    fn local_cluster_key(&self) -> Option<iroh::SecretKey> {
        let shard0 = self.store.local(0).ok()?;
        // A failed read (a panic included: redb's on a damaged page) is "not there yet": this
        // runs in the task that follows shard 0, which must not end.
        let kv = crate::storage::catch_storage_panic("reading the cluster key", || {
            shard0.reader().get(&reserved_key(CLUSTER_KEY))
        })
        .ok()??;
        let bytes: [u8; 32] = kv.value.as_slice().try_into().ok()?;
        Some(iroh::SecretKey::from_bytes(&bytes))
    }

    /// Loads the cluster's key into the authority: this node's recorded copy (metadata), else
    /// its replica of shard 0 (then recorded). Whether it has the key now.
    fn load_cluster_key(&self) -> bool {
        if let Ok(Some(bytes)) = self.metadata.signing_key() {
            self.authority.set_key(iroh::SecretKey::from_bytes(&bytes));
            return true;
        }
        match self.local_cluster_key() {
            Some(key) => {
                self.keep_cluster_key(&key);
                true
            }
            None => false,
        }
    }

    /// Uses `key` from now on and records it in this node's metadata.
    fn keep_cluster_key(&self, key: &iroh::SecretKey) {
        if let Err(e) = self.metadata.set_signing_key(&key.to_bytes()) {
            tracing::warn!("could not record the cluster's signing key in the metadata store: {e}");
        }
        self.authority.set_key(key.clone());
    }

    /// Makes the cluster's signing key unless there is one (a compare-and-swap on shard 0), and
    /// loads it.
    pub(super) async fn establish_cluster_key(&self) -> Result<(), ApiError> {
        let fresh: [u8; 32] = rand::random();
        let cas = WriteCommand::Cas { key: reserved_key(CLUSTER_KEY), expected: None, new_value: fresh.to_vec() };
        let key = match self.internal_write(cas).await? {
            WriteOutcome::Cas { succeeded: true, .. } => fresh,
            WriteOutcome::Cas { current: Some(v), .. } => {
                v.as_slice().try_into().map_err(|_| ApiError::Internal("the cluster key record is malformed".into()))?
            }
            other => return Err(ApiError::Internal(format!("a compare-and-swap was answered with {other:?}"))),
        };
        self.keep_cluster_key(&iroh::SecretKey::from_bytes(&key));
        Ok(())
    }

    /// Waits (at most `limit`) until this node's replica of shard 0 holds the cluster's key,
    /// then writes `admin.token`. A node that joined holds it once it caught up.
    pub async fn settle_admin_token(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.load_cluster_key() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match self.ensure_admin_token() {
            Ok(true) => {}
            Ok(false) => tracing::info!("the cluster's signing key has not reached this node yet; admin.token follows"),
            Err(e) => tracing::warn!("could not write this node's admin token: {e}"),
        }
    }

    pub(super) async fn internal_write(&self, command: WriteCommand) -> Result<WriteOutcome, ApiError> {
        match self.route(ClientRequest::Write { session: internal_session(), command }, 0).await? {
            ClientResponse::Write(outcome) => Ok(outcome),
            other => Err(ApiError::Internal(format!("a write was answered with {other:?}"))),
        }
    }

    async fn record_token(&self, info: &TokenInfo) -> Result<(), ApiError> {
        let value = postcard::to_stdvec(info).map_err(|e| ApiError::Internal(e.to_string()))?;
        self.internal_write(WriteCommand::Put { key: reserved("tokens", info.id), value }).await.map(|_| ())
    }

    /// Every record under the reserved `kind/`, read linearizably.
    pub(super) async fn reserved_records(&self, kind: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ApiError> {
        let mut out = Vec::new();
        let mut continuation = None;
        loop {
            let req = ScanRequest {
                prefix: reserved_prefix(kind),
                start: None,
                end: None,
                limit: 1000,
                continuation: continuation.take(),
                consistency: ReadConsistency::Linearizable,
            };
            let page = match self.route(ClientRequest::Scan(req), 0).await? {
                ClientResponse::Scan(p) => p,
                other => return Err(ApiError::Internal(format!("a scan was answered with {other:?}"))),
            };
            out.extend(page.entries.into_iter().map(|kv| (kv.key, kv.value)));
            match page.continuation {
                Some(c) => continuation = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// `auth token create`: issues, records, returns the token.
    pub(super) async fn create_token(&self, scope: Scope, ttl_secs: Option<u64>) -> Result<ClientResponse, ApiError> {
        let (text, body) = self.authority.issue(TokenKind::Client(scope), ttl_secs).map_err(token_error)?;
        let info = info_of(&body, "");
        self.record_token(&info).await?;
        Ok(ClientResponse::TokenIssued { info, token: text })
    }

    /// `cluster join-token`: issues a join token (not recorded: it expires, and single-use ones
    /// are recorded when spent).
    pub(super) fn create_join_token(&self, ttl_secs: u64, single_use: bool) -> Result<ClientResponse, ApiError> {
        let (text, body) = self.authority.issue(TokenKind::Join { single_use }, Some(ttl_secs)).map_err(token_error)?;
        Ok(ClientResponse::TokenIssued { info: info_of(&body, ""), token: text })
    }

    /// `auth token list`: every recorded token, oldest first, with whether it is revoked.
    pub(super) async fn list_tokens(&self) -> Result<ClientResponse, ApiError> {
        let revoked: HashSet<u64> =
            self.reserved_records("revoked").await?.iter().filter_map(|(k, _)| id_of(k)).collect();
        let mut list: Vec<TokenInfo> = self
            .reserved_records("tokens")
            .await?
            .iter()
            .filter_map(|(_, v)| postcard::from_bytes::<TokenInfo>(v).ok())
            .map(|mut info| {
                info.revoked = revoked.contains(&info.id);
                info
            })
            .collect();
        list.sort_by_key(|i| (i.issued_at, i.id));
        Ok(ClientResponse::Tokens(list))
    }

    /// `auth token revoke`: records the revocation in shard 0; this node refuses the token at
    /// once, every other node once it applied the record (within [`REFRESH_EVERY`] of that).
    pub(super) async fn revoke_token(&self, id: u64) -> Result<ClientResponse, ApiError> {
        let record = self
            .route(ClientRequest::Get { key: reserved("tokens", id), consistency: ReadConsistency::Linearizable }, 0)
            .await?;
        let info = match record {
            ClientResponse::Get(Some(kv)) => postcard::from_bytes::<TokenInfo>(&kv.value).ok(),
            ClientResponse::Get(None) => None,
            other => return Err(ApiError::Internal(format!("a get was answered with {other:?}"))),
        };
        let Some(info) = info else {
            return Err(ApiError::InvalidRequest(format!(
                "no token with id {} (auth token list shows them)",
                format_id(id)
            )));
        };
        let value = postcard::to_stdvec(&info.expires_at).map_err(|e| ApiError::Internal(e.to_string()))?;
        self.internal_write(WriteCommand::Put { key: reserved("revoked", id), value }).await?;
        self.authority.revoke_now(id);
        tracing::info!(id = %format_id(id), "revoked a token");
        Ok(ClientResponse::TokenRevoked { id })
    }

    /// Checks a joining node's join token; spends a single-use one on `node_id` (again for the
    /// same node: fine, joins retry).
    pub(super) async fn check_join_token(&self, text: &str, node_id: NodeId) -> Result<(), ApiError> {
        let denied = ApiError::PermissionDenied;
        if text.trim().is_empty() {
            return Err(denied(
                "no join token (create one with `aspen-cli cluster join-token` and pass it with --join-token)".into(),
            ));
        }
        let verified = self.authority.verify(text).map_err(|e| denied(e.to_string()))?;
        let TokenKind::Join { single_use } = verified.body.kind else {
            return Err(denied("that is a client token, not a join token (aspen-cli cluster join-token)".into()));
        };
        if !single_use {
            return Ok(());
        }
        let key = reserved("join", verified.body.id);
        let mine = node_id.to_string().into_bytes();
        let cas = WriteCommand::Cas { key, expected: None, new_value: mine.clone() };
        match self.internal_write(cas).await? {
            WriteOutcome::Cas { succeeded: true, .. } => Ok(()),
            WriteOutcome::Cas { current: Some(v), .. } if v == mine => Ok(()),
            WriteOutcome::Cas { current, .. } => Err(denied(format!(
                "the single-use join token was used by node {} already",
                current.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default()
            ))),
            other => Err(ApiError::Internal(format!("a compare-and-swap was answered with {other:?}"))),
        }
    }

    /// Reads the revoked ids from this node's replica of shard 0.
    fn local_revocations(&self) -> Option<HashSet<u64>> {
        let shard0 = self.store.local(0).ok()?;
        let req = ScanRequest {
            prefix: reserved_prefix("revoked"),
            start: None,
            end: None,
            limit: MAX_REVOCATIONS as u32,
            continuation: None,
            consistency: ReadConsistency::Stale,
        };
        let page = crate::storage::catch_storage_panic("reading the revoked tokens", || {
            crate::storage::scan::scan_local(shard0.reader(), &req, MAX_REVOCATIONS, usize::MAX / 2)
        })
        .ok()?;
        Some(page.entries.iter().filter_map(|kv| id_of(&kv.key)).collect())
    }

    /// Keeps the authority in step with shard 0 until `shutdown`: the cluster's key (made by
    /// shard 0's leader if the cluster has none: one from before tokens) and the revocations;
    /// writes `admin.token` once the key is here and records it once shard 0 takes writes.
    pub fn follow_revocations(self: &Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut seen = None;
            let mut tick = 0u64;
            loop {
                tick += 1;
                if this.cluster_id() != crate::api::ClusterId::default() && !this.authority.has_key() {
                    if !this.load_cluster_key() && shard0_led_here(&this) {
                        if let Err(e) = this.establish_cluster_key().await {
                            tracing::debug!("cannot make the cluster's signing key yet: {e}");
                        }
                    }
                    if let Err(e) = this.ensure_admin_token() {
                        tracing::warn!("could not write this node's admin token: {e}");
                    }
                }
                let unrecorded = this.unrecorded.lock().unwrap_or_else(|p| p.into_inner()).clone();
                // An admin token waits to be listed: try now and then (every few seconds).
                if let Some(info) = unrecorded.filter(|_| tick % 4 == 1) {
                    match this.record_token(&info).await {
                        Ok(()) => *this.unrecorded.lock().unwrap_or_else(|p| p.into_inner()) = None,
                        Err(e) => tracing::debug!("cannot record this node's admin token yet: {e}"),
                    }
                }
                if let Ok(shard0) = this.store.local(0) {
                    let applied = shard0.raft().metrics().borrow().last_applied;
                    if seen != Some(applied) {
                        if let Some(ids) = this.local_revocations() {
                            this.authority.set_revoked(ids);
                            // The alarms too (`cluster::alarm`): every node refuses what they forbid.
                            if let Some(alarms) = this.local_alarms() {
                                this.alarms.set(alarms);
                                seen = Some(applied);
                            }
                        }
                    }
                }
                // Faster while a member waits for the cluster's key (an added node that caught up).
                let member = this.cluster_id() != crate::api::ClusterId::default();
                let wait = if member && !this.authority.has_key() { REFRESH_EVERY / 5 } else { REFRESH_EVERY };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    }
}

fn shard0_led_here(service: &NodeService) -> bool {
    service.store.local(0).is_ok_and(|s| s.raft().metrics().borrow().current_leader == Some(s.raft_id()))
}
