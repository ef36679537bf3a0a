//! Who may ask a node for what: tokens ([`token`]) and the node's [`Authority`], which verifies
//! them and decides, per client request, whether the token presented allows it
//! ([`authorize`]).
//!
//! Owns: what a node verifies tokens against — its cluster id, the cluster's signing key, the
//! revoked token ids — and issuing tokens with that key. The cluster layer keeps those current
//! from shard 0's reserved keys (`\x00aspen/cluster-key`, `\x00aspen/revoked/`), which every
//! member replicates; the client ALPN handler asks the authority once per connection and
//! token, and re-checks expiry and revocation on every request (a hash set lookup).
//!
//! Never: store or replicate anything itself.

pub mod token;

use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
};

use iroh::{PublicKey, SecretKey};

pub use token::{Scope, TokenBody, TokenError, TokenKind};

use crate::api::{
    is_reserved_key, ApiError, ClientRequest, ClusterId, KeyRange, KvOp, KvTxn, NodeId, ScanRequest, TxnOp,
    WriteCommand,
};

/// How often a long-lived stream (a watch, a lease keep-alive stream) checks its token again:
/// one that expired or was revoked ends the stream within this long.
pub const STREAM_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// What a node trusts when it verifies a token.
#[derive(Debug, Default)]
struct Trust {
    /// `None`: this node belongs to no cluster yet; nothing is checked (it holds no data).
    cluster_id: Option<ClusterId>,
    /// The cluster's signing key (`None` until this node's replica of shard 0 holds it).
    key: Option<(SecretKey, PublicKey)>,
    revoked: HashSet<u64>,
}

/// A node's token authority. Shared by the client ALPN handler and the cluster layer.
#[derive(Debug)]
pub struct Authority {
    node_id: NodeId,
    trust: RwLock<Trust>,
}

/// A token that verified, as a connection keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub body: TokenBody,
}

impl Verified {
    /// The client scope (`None` for a join token).
    pub fn scope(&self) -> Option<&Scope> {
        match &self.body.kind {
            TokenKind::Client(s) => Some(s),
            TokenKind::Join { .. } => None,
        }
    }
}

impl Authority {
    /// The authority of node `node_id` (no cluster, no key yet).
    pub fn new(node_id: NodeId) -> Arc<Self> {
        Arc::new(Authority { node_id, trust: RwLock::new(Trust::default()) })
    }

    fn trust(&self) -> std::sync::RwLockReadGuard<'_, Trust> {
        self.trust.read().unwrap_or_else(|p| p.into_inner())
    }

    fn trust_mut(&self) -> std::sync::RwLockWriteGuard<'_, Trust> {
        self.trust.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The cluster this node belongs to (`None`: none yet; then no token is required).
    pub fn set_cluster(&self, id: Option<ClusterId>) {
        self.trust_mut().cluster_id = id.filter(|c| *c != ClusterId::default());
    }

    /// Whether tokens are checked: the node belongs to a cluster.
    pub fn enforcing(&self) -> bool {
        self.trust().cluster_id.is_some()
    }

    /// The cluster's signing key: tokens it signed verify, and this node issues with it.
    pub fn set_key(&self, key: SecretKey) {
        let mut trust = self.trust_mut();
        if trust.key.as_ref().map(|k| k.1) != Some(key.public()) {
            let public = key.public();
            trust.key = Some((key, public));
        }
    }

    /// Whether the cluster's signing key is known here yet.
    pub fn has_key(&self) -> bool {
        self.trust().key.is_some()
    }

    /// Whether `body` was signed with the cluster's key (its signature checked already).
    pub fn signed_here(&self, body: &TokenBody) -> bool {
        self.trust().key.as_ref().is_some_and(|k| *k.1.as_bytes() == body.issuer_key)
    }

    /// The revoked token ids (shard 0's `revoked/` keys, as this node applied them).
    pub fn set_revoked(&self, ids: HashSet<u64>) {
        let mut trust = self.trust_mut();
        if trust.revoked != ids {
            trust.revoked = ids;
        }
    }

    /// Refuses token `id` from now on (this node revoked it; the others learn it from shard 0).
    pub fn revoke_now(&self, id: u64) {
        self.trust_mut().revoked.insert(id);
    }

    /// Issues a token of `kind` valid for `ttl_secs` (`None`: until revoked), signed by this node.
    pub fn issue(&self, kind: TokenKind, ttl_secs: Option<u64>) -> Result<(String, TokenBody), TokenError> {
        let (cluster_id, key) = {
            let trust = self.trust();
            let cluster_id =
                trust.cluster_id.ok_or_else(|| TokenError::Invalid("this node belongs to no cluster yet".into()))?;
            let key = trust.key.as_ref().map(|k| k.0.clone()).ok_or(TokenError::NotReady)?;
            (cluster_id, key)
        };
        let body = TokenBody::new(kind, cluster_id, self.node_id, *key.public().as_bytes(), ttl_secs)?;
        Ok((body.sign(&key)?, body))
    }

    /// Decodes and fully checks a token: signature, cluster, signing key, expiry, revocation.
    pub fn verify(&self, text: &str) -> Result<Verified, TokenError> {
        let body = token::decode_and_verify(text)?;
        let verified = Verified { body };
        self.recheck(&verified)?;
        Ok(verified)
    }

    /// What may change while a connection holds a verified token: cluster, signing key, expiry,
    /// revocation. Cheap: run on every request.
    pub fn recheck(&self, v: &Verified) -> Result<(), TokenError> {
        let trust = self.trust();
        let body = &v.body;
        if trust.cluster_id != Some(body.cluster_id) {
            return Err(TokenError::WrongCluster);
        }
        match &trust.key {
            Some((_, public)) if *public.as_bytes() == body.issuer_key => {}
            Some(_) => return Err(TokenError::UnknownIssuer(body.issuer)),
            None => return Err(TokenError::NotReady),
        }
        if body.expired_at(token::unix_now()) {
            return Err(TokenError::Expired);
        }
        if trust.revoked.contains(&body.id) {
            return Err(TokenError::Revoked);
        }
        Ok(())
    }
}

/// A client request's keys under the reserved prefix are refused: that keyspace belongs to the
/// cluster itself (tokens, revocations, used join tokens).
pub fn check_not_reserved(request: &ClientRequest) -> Result<(), ApiError> {
    let reserved = |k: &[u8]| is_reserved_key(k);
    let hit = match request {
        ClientRequest::Get { key, .. } => reserved(key),
        ClientRequest::Write { command, .. } => match command {
            WriteCommand::DeletePrefix { prefix } => reserved(prefix),
            WriteCommand::KvTxn { txn, .. } => txn.spans().into_iter().any(|(key, _)| reserved(key)),
            c => c.keys().into_iter().any(reserved),
        },
        ClientRequest::Watch(w) => reserved(&w.key),
        ClientRequest::Scan(s) => {
            reserved(&s.prefix)
                || s.start.as_deref().is_some_and(reserved)
                || s.continuation.as_deref().is_some_and(reserved)
        }
        _ => false,
    };
    if hit {
        return Err(ApiError::InvalidRequest("keys starting with \\x00aspen/ are reserved for the cluster".into()));
    }
    Ok(())
}

/// Whether `request` needs a token at all. A join carries its own join token, and `cluster
/// init` of a fresh node its claim token.
pub fn needs_token(request: &ClientRequest) -> bool {
    !matches!(request, ClientRequest::Join(_) | ClientRequest::ClusterInit | ClientRequest::ClusterInitClaimed { .. })
}

fn denied(what: String) -> ApiError {
    ApiError::PermissionDenied(what)
}

/// Whether `scope` allows `request` (a request from a client: node-to-node requests never get
/// here). The error names the permission or the key that is missing.
pub fn authorize(scope: &Scope, request: &ClientRequest) -> Result<(), ApiError> {
    let need = |ok: bool, perm: &str| {
        if ok {
            Ok(())
        } else {
            Err(denied(format!("a {} needs a token with {perm} permission", request.kind())))
        }
    };
    let key_in_scope = |key: &[u8]| {
        if scope.covers_key(key) {
            Ok(())
        } else {
            Err(denied(format!("key {:?} is outside the token's prefixes", String::from_utf8_lossy(key))))
        }
    };
    match request {
        ClientRequest::Get { key, .. } => {
            need(scope.read, "read")?;
            key_in_scope(key)
        }
        ClientRequest::Scan(s) => {
            need(scope.read, "read")?;
            check_scan_range(scope, s)
        }
        ClientRequest::Write { command, .. } => {
            need(scope.write, "write")?;
            match command {
                WriteCommand::DeletePrefix { prefix } => {
                    if scope.prefixes.is_empty() || scope.prefixes.iter().any(|p| prefix.starts_with(p)) {
                        Ok(())
                    } else {
                        Err(denied(format!(
                            "prefix {:?} is not inside the token's prefixes",
                            String::from_utf8_lossy(prefix)
                        )))
                    }
                }
                WriteCommand::KvTxn { txn, .. } => authorize_kv_txn(scope, txn),
                WriteCommand::Txn { compares, success, failure } => {
                    // Compares and gets reveal what is stored: they need read.
                    let reads = compares.iter().map(|c| c.key.as_slice()).chain(
                        success.iter().chain(failure).filter_map(|op| match op {
                            TxnOp::Get { key } => Some(key.as_slice()),
                            _ => None,
                        }),
                    );
                    for k in reads {
                        need(scope.read, "read")?;
                        key_in_scope(k)?;
                    }
                    command.keys().into_iter().try_for_each(key_in_scope)
                }
                c => c.keys().into_iter().try_for_each(key_in_scope),
            }
        }
        ClientRequest::Watch(w) => {
            need(scope.read, "read")?;
            if !w.prefix {
                key_in_scope(&w.key)
            } else if scope.prefixes.is_empty() || scope.prefixes.iter().any(|p| w.key.starts_with(p)) {
                Ok(())
            } else {
                Err(denied(format!("prefix {:?} is not inside the token's prefixes", String::from_utf8_lossy(&w.key))))
            }
        }
        // Keep-alives change when keys go; ttl and list only show leases.
        ClientRequest::LeaseKeepAlive { .. } => need(scope.write, "write"),
        ClientRequest::LeaseTimeToLive { .. } | ClientRequest::LeaseList => need(scope.read, "read"),
        ClientRequest::ClusterStatus | ClientRequest::NodeStatus | ClientRequest::Members | ClientRequest::Topology => {
            Ok(())
        }
        ClientRequest::Join(_) | ClientRequest::ClusterInit | ClientRequest::ClusterInitClaimed { .. } => Ok(()),
        // Membership, leader placement, tokens: admin. (Node-to-node requests are refused on the
        // client ALPN before this; they are listed for completeness.)
        _ => need(scope.admin, "admin"),
    }
}

/// Whether `scope` covers every key of `range`.
fn covers(scope: &Scope, range: &KeyRange) -> bool {
    if range.is_single() {
        scope.covers_key(&range.key)
    } else {
        scope.covers_range(&range.key, range.upper())
    }
}

fn range_denied(range: &KeyRange) -> ApiError {
    let what = match &range.end {
        None => format!("key {:?} is", String::from_utf8_lossy(&range.key)),
        Some(end) => format!(
            "range [{:?}, {:?}) is not inside the token's prefixes",
            String::from_utf8_lossy(&range.key),
            String::from_utf8_lossy(end)
        ),
    };
    if range.is_single() {
        denied(format!("{what} outside the token's prefixes"))
    } else {
        denied(what)
    }
}

/// Whether `scope` allows reading `range` (the etcd API's range reads and watches).
pub fn authorize_range(scope: &Scope, range: &KeyRange) -> Result<(), ApiError> {
    if !scope.read {
        return Err(denied("a range read needs a token with read permission".into()));
    }
    if covers(scope, range) {
        Ok(())
    } else {
        Err(range_denied(range))
    }
}

/// Whether `scope` allows an etcd-shaped txn: compares, range reads and previous keys need read,
/// puts and deletes write, on keys and ranges inside the token's prefixes (a read-only txn needs
/// no write permission).
pub fn authorize_kv_txn(scope: &Scope, txn: &KvTxn) -> Result<(), ApiError> {
    let need = |ok: bool, perm: &str, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(denied(format!("a txn's {what} needs a token with {perm} permission")))
        }
    };
    let inside = |range: &KeyRange| if covers(scope, range) { Ok(()) } else { Err(range_denied(range)) };
    for c in &txn.compares {
        need(scope.read, "read", "compare")?;
        inside(&c.range)?;
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            KvOp::Range(q) => {
                need(scope.read, "read", "range read")?;
                inside(&q.range)?;
            }
            KvOp::Put(p) => {
                need(scope.write, "write", "put")?;
                if p.prev_kv || p.ignore_value {
                    need(scope.read, "read", "put with the previous key")?;
                }
                inside(&KeyRange::single(p.key.clone()))?;
            }
            KvOp::DeleteRange { range, prev_kv } => {
                need(scope.write, "write", "delete")?;
                if *prev_kv {
                    need(scope.read, "read", "delete with the previous keys")?;
                }
                inside(range)?;
            }
            KvOp::Txn(t) => authorize_kv_txn(scope, t)?,
        }
    }
    Ok(())
}

fn check_scan_range(scope: &Scope, s: &ScanRequest) -> Result<(), ApiError> {
    if scope.prefixes.is_empty() {
        return Ok(());
    }
    let mut lower = s.prefix.clone();
    if let Some(start) = &s.start {
        lower = lower.max(start.clone());
    }
    let mut upper = if s.prefix.is_empty() { None } else { crate::api::prefix_end(&s.prefix) };
    if let Some(end) = &s.end {
        upper = Some(match upper {
            Some(u) if u < *end => u,
            _ => end.clone(),
        });
    }
    if scope.covers_range(&lower, upper.as_deref()) {
        Ok(())
    } else {
        Err(denied("the scan's range is outside the token's prefixes".into()))
    }
}

/// Binds a write's exactly-once session to the token that sent it: the session id the cluster
/// records is a hash of the token id and the id the client chose. A client so cannot name —
/// and answer or disturb — another token's sessions, whatever ids it picks; its retries (same
/// token, same id) keep finding their session on any node.
pub fn bind_session(token_id: u64, request: &mut ClientRequest) {
    if let ClientRequest::Write { session, .. } | ClientRequest::ShardWrite { session, .. } = request {
        let mut h = crate::api::derive_key_hasher!("aspen session of a token v1");
        h.update(&token_id.to_le_bytes());
        h.update(&session.client_id.0);
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
        session.client_id = crate::api::Id128(id);
    }
}

/// The key of a compare-and-swap request (its answer may need [`redact_cas`]).
pub fn cas_key(request: &ClientRequest) -> Option<&[u8]> {
    match request {
        ClientRequest::Write { command: WriteCommand::Cas { key, .. }, .. } => Some(key),
        _ => None,
    }
}

/// A CAS mismatch answers the current value only to a token that may read the key.
pub fn redact_cas(scope: &Scope, key: &[u8], response: &mut crate::api::ClientResponse) {
    use crate::api::{ClientResponse, WriteOutcome};
    if let ClientResponse::Write(WriteOutcome::Cas { current, .. }) = response {
        if !(scope.read && scope.covers_key(key)) {
            *current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ReadConsistency, WriteSession};

    fn write(command: WriteCommand) -> ClientRequest {
        ClientRequest::Write { session: WriteSession { client_id: crate::api::Id128([1; 16]), seq: 1 }, command }
    }

    #[test]
    fn each_request_needs_its_permission_and_keys_in_scope() {
        let read_a = Scope { read: true, write: false, admin: false, prefixes: vec![b"a/".to_vec()] };
        let get = |k: &[u8]| ClientRequest::Get { key: k.to_vec(), consistency: ReadConsistency::Linearizable };
        assert!(authorize(&read_a, &get(b"a/1")).is_ok());
        assert!(matches!(authorize(&read_a, &get(b"b/1")), Err(ApiError::PermissionDenied(_))));
        let put = write(WriteCommand::Put { key: b"a/1".to_vec(), value: vec![] });
        assert!(matches!(authorize(&read_a, &put), Err(ApiError::PermissionDenied(m)) if m.contains("write")));
        assert!(authorize(&read_a, &ClientRequest::ClusterStatus).is_ok(), "any token may see status");
        assert!(authorize(&read_a, &ClientRequest::BalanceLeaders).is_err());
        assert!(authorize(&Scope::all(), &ClientRequest::Remove { node_id: 2 }).is_ok());
        let rw_a = Scope { write: true, ..read_a.clone() };
        let dp = |p: &[u8]| write(WriteCommand::DeletePrefix { prefix: p.to_vec() });
        assert!(authorize(&rw_a, &dp(b"a/x")).is_ok());
        assert!(authorize(&rw_a, &dp(b"")).is_err(), "an empty prefix deletes keys outside the scope");
        let write_only = Scope { read: false, ..rw_a.clone() };
        let txn = write(WriteCommand::Txn {
            compares: vec![crate::api::Compare::version("a/c", crate::api::CompareOp::Equal, 0)],
            success: vec![TxnOp::put("a/s", "v")],
            failure: vec![],
        });
        assert!(authorize(&rw_a, &txn).is_ok());
        assert!(authorize(&write_only, &txn).is_err(), "a compare reads");
    }

    #[test]
    fn sessions_are_bound_to_their_token() {
        let put = || write(WriteCommand::Put { key: b"k".to_vec(), value: vec![] });
        let session = |r: &ClientRequest| match r {
            ClientRequest::Write { session, .. } => *session,
            _ => unreachable!(),
        };
        let (mut a, mut a_again, mut b) = (put(), put(), put());
        bind_session(1, &mut a);
        bind_session(1, &mut a_again);
        bind_session(2, &mut b);
        assert_eq!(session(&a), session(&a_again), "a retry with the same token finds its session");
        assert_ne!(session(&a).client_id, session(&b).client_id, "another token cannot name it");
        assert_ne!(session(&a).client_id, session(&put()).client_id, "the client's own id is not used as is");
        assert_eq!(session(&a).seq, 1, "the sequence number is kept");
    }

    #[test]
    fn reserved_keys_are_refused_to_clients() {
        let get = ClientRequest::Get { key: b"\x00aspen/revoked/1".to_vec(), consistency: ReadConsistency::Stale };
        assert!(check_not_reserved(&get).is_err());
        assert!(check_not_reserved(&write(WriteCommand::DeletePrefix { prefix: b"\x00aspen".to_vec() })).is_ok());
        assert!(check_not_reserved(&write(WriteCommand::DeletePrefix { prefix: b"\x00aspen/".to_vec() })).is_err());
    }

    #[test]
    fn the_authority_checks_cluster_key_expiry_and_revocation() {
        let a = Authority::new(1);
        assert!(a.issue(TokenKind::Client(Scope::all()), None).is_err(), "no cluster yet");
        let cluster = ClusterId::random();
        a.set_cluster(Some(cluster));
        assert!(a.issue(TokenKind::Client(Scope::all()), None).is_err(), "no key yet");
        let key = SecretKey::from_bytes(&[1; 32]);
        a.set_key(key.clone());
        let (text, body) = a.issue(TokenKind::Client(Scope::all()), None).unwrap();
        let v = a.verify(&text).unwrap();
        assert_eq!(v.body, body);
        // Another node verifies it once it holds the cluster's key.
        let b = Authority::new(2);
        b.set_cluster(Some(cluster));
        assert!(b.verify(&text).is_err(), "no key yet");
        b.set_key(SecretKey::from_bytes(&[2; 32]));
        assert_eq!(b.verify(&text), Err(TokenError::UnknownIssuer(1)), "another cluster key");
        b.set_key(key.clone());
        assert!(b.verify(&text).is_ok());
        b.set_revoked(HashSet::from([body.id]));
        assert_eq!(b.recheck(&v), Err(TokenError::Revoked));
        let c = Authority::new(3);
        c.set_cluster(Some(ClusterId::random()));
        c.set_key(key);
        assert_eq!(c.verify(&text), Err(TokenError::WrongCluster));
    }
}
