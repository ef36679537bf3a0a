//! What every etcd service shares (docs/design.md §18): the node behind it, token checks,
//! exactly-once write sessions, range reads merged over shards, and etcd's error texts.
//!
//! Owns: the mapping of etcd requests onto the node's own requests (`ClientService::handle`, in
//! process: routing and forwarding to shard leaders happen there, as for the native protocol),
//! and the checks the native client protocol does on its connections (tokens, scopes, reserved
//! keys), which in-process requests skip.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tonic::{metadata::MetadataMap, Status};

use super::proto::{etcdserverpb::ResponseHeader, mvccpb};
use crate::{
    api::{
        routing::ShardRouter, ApiError, ClientRequest, ClientResponse, ClientResult, Id128, KeyRange, KeyRecord,
        KvOpResult, KvTxn, NodeId, RangePage, RangeQuery, ReadConsistency, Revision, ShardId, WatchRequest,
        WriteCommand, WriteOutcome, WriteSession, STRICT_SEQ_BASE,
    },
    auth::{self, Authority, Scope, Verified},
    transport::ClientService,
};

/// What the etcd API needs of the node besides answering requests (implemented by
/// `cluster::NodeService`).
pub trait EtcdNode: ClientService {
    fn node_id(&self) -> NodeId;
    /// The cluster id as etcd shows it (its first 8 bytes; 0 before the node is a member).
    fn etcd_cluster_id(&self) -> u64;
    fn num_shards(&self) -> u32;
    /// Every member, with the URL it serves the etcd API on (asked of each, briefly).
    fn etcd_members(&self) -> impl std::future::Future<Output = Vec<EtcdMember>> + Send;
    /// This node's status as etcd's `Status` shows it.
    fn etcd_status(&self) -> EtcdStatus;
    /// The state digest of every shard this node hosts, as applied here (`Hash`, `HashKV`).
    fn state_digests(&self) -> Vec<(ShardId, crate::api::StateDigest)>;
    /// The node's data dir (a `Snapshot` is staged there).
    fn data_dir(&self) -> std::path::PathBuf;
    /// The Raft term of shard 0 on this node (etcd's `header.raft_term`).
    fn raft_term(&self) -> u64;
    /// Whether this node can serve: every shard it hosts is ready (a member with a leader that
    /// was heard from lately: `RaftNode::readiness`, as `GET /ready`). gRPC health's SERVING.
    fn serving(&self) -> bool;
    /// The node's metrics, as `GET /metrics` on its HTTP endpoint renders them (Prometheus text).
    fn metrics_text(&self) -> String;
    /// A watch of the node whose shard tasks, each time `asked` changes, report where they
    /// stand once they have handled every applied entry (`NodeService::start_watch_asked`).
    fn watch_asked(
        &self,
        request: WatchRequest,
        asked: tokio::sync::watch::Receiver<u64>,
    ) -> impl std::future::Future<Output = Result<tokio::sync::mpsc::Receiver<ClientResult>, ApiError>> + Send;
}

/// A member as etcd's `MemberList` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdMember {
    pub id: NodeId,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// This node as etcd's `Status` shows it (shard 0's Raft state).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdStatus {
    pub leader: NodeId,
    pub raft_index: u64,
    pub raft_term: u64,
    pub raft_applied_index: u64,
    pub db_size: u64,
    /// `[limits] quota_bytes`.
    pub quota_bytes: u64,
    pub is_learner: bool,
    /// The raised alarms: the member that raised each, and its name (`NOSPACE`).
    pub alarms: Vec<(NodeId, String)>,
}

/// etcd's error texts (Go clients map errors by them: `rpctypes`).
pub mod errors {
    pub const USER_EMPTY: &str = "etcdserver: user name is empty";
    pub const AUTH_FAILED: &str = "etcdserver: authentication failed, invalid user ID or password";
    pub const INVALID_AUTH_TOKEN: &str = "etcdserver: invalid auth token";
    pub const PERMISSION_DENIED: &str = "etcdserver: permission denied";
    pub const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
    pub const LEASE_EXISTS: &str = "etcdserver: lease already exists";
    pub const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
    pub const FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
    pub const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";
    pub const TIMEOUT: &str = "etcdserver: request timed out";
    pub const NO_LEADER: &str = "etcdserver: no leader";
    pub const KEY_NOT_FOUND: &str = "etcdserver: key not found";
    pub const EMPTY_KEY: &str = "etcdserver: key is not provided";
    pub const VALUE_PROVIDED: &str = "etcdserver: value is provided";
    pub const LEASE_PROVIDED: &str = "etcdserver: lease is provided";
    pub const TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";
    pub const DUPLICATE_KEY: &str = "etcdserver: duplicate key given in txn request";
    pub const REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
    pub const TTL_TOO_LARGE: &str = "etcdserver: too large lease TTL";
}

/// A node's error as etcd's client libraries expect it: etcd's exact text where etcd has a typed
/// error for it (Go clients map errors by their text, `rpctypes`), with Aspen's detail logged.
pub fn status_of(e: ApiError) -> Status {
    use errors::*;
    let typed = |code: tonic::Code, text: &str, e: &ApiError| {
        tracing::debug!("etcd API: {text}: {e}");
        Status::new(code, text)
    };
    match &e {
        ApiError::NotLeader { .. } | ApiError::Unavailable(_) | ApiError::NotInitialized { .. } => {
            typed(tonic::Code::Unavailable, NO_LEADER, &e)
        }
        ApiError::Timeout(_) => typed(tonic::Code::Unavailable, TIMEOUT, &e),
        ApiError::TooLarge { what, .. } if what.starts_with("txn (") => {
            typed(tonic::Code::InvalidArgument, TOO_MANY_OPS, &e)
        }
        ApiError::TooLarge { .. } => typed(tonic::Code::InvalidArgument, REQUEST_TOO_LARGE, &e),
        ApiError::PermissionDenied(_) => typed(tonic::Code::PermissionDenied, PERMISSION_DENIED, &e),
        ApiError::LeaseNotFound { .. } => typed(tonic::Code::NotFound, LEASE_NOT_FOUND, &e),
        ApiError::Compacted { .. } => typed(tonic::Code::OutOfRange, COMPACTED, &e),
        ApiError::NoSpace(_) => typed(tonic::Code::ResourceExhausted, NO_SPACE, &e),
        ApiError::InvalidRequest(m) => Status::invalid_argument(m.clone()),
        ApiError::Refused(m) => Status::failed_precondition(m.clone()),
        ApiError::WatchCancelled(m) => Status::cancelled(m.clone()),
        ApiError::UnsupportedVersion { .. } | ApiError::Internal(_) => Status::internal(e.to_string()),
    }
}

/// A write whose outcome says it may or may not have been applied (a session the shard forgot).
pub fn unknown_outcome(outcome: WriteOutcome) -> Status {
    tracing::debug!("etcd API: a write's outcome is unknown: {outcome:?}");
    Status::unavailable(errors::TIMEOUT)
}

fn unexpected(what: &str, answer: impl std::fmt::Debug) -> Status {
    Status::internal(format!("the node answered {what} with {answer:?}"))
}

/// Who is calling: the token's id and scope (`None`: the node enforces no tokens yet — it is not
/// a member of a cluster).
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: u64,
    pub scope: Option<Scope>,
    /// The token as verified (`None` while tokens are not enforced): streams check it again
    /// while they run ([`Gateway::recheck`]).
    pub verified: Option<Arc<Verified>>,
}

impl Caller {
    /// Checks a range read against the scope.
    pub fn may_read(&self, range: &KeyRange) -> Result<(), Status> {
        match &self.scope {
            Some(s) => auth::authorize_range(s, range).map_err(status_of),
            None => Ok(()),
        }
    }

    /// Checks a txn (puts, deletes, compares, ranges) against the scope.
    pub fn may_run(&self, txn: &KvTxn) -> Result<(), Status> {
        match &self.scope {
            Some(s) => auth::authorize_kv_txn(s, txn).map_err(status_of),
            None => Ok(()),
        }
    }

    /// Checks a permission (`read`, `write`, `admin`) for an operation named `what`.
    pub fn needs(&self, what: &str, perm: fn(&Scope) -> bool, name: &str) -> Result<(), Status> {
        match &self.scope {
            Some(s) if !perm(s) => {
                tracing::debug!("etcd API: a {what} needs a token with {name} permission");
                Err(Status::permission_denied(errors::PERMISSION_DENIED))
            }
            _ => Ok(()),
        }
    }
}

/// Most tokens whose verification is kept (a client presents the same token on every call).
const TOKEN_CACHE: usize = 1024;

/// The state every etcd service shares.
#[derive(Debug)]
pub struct Gateway<N: EtcdNode> {
    pub node: Arc<N>,
    authority: Arc<Authority>,
    router: ShardRouter,
    /// Write sessions not in use, by (token id, shard): each has at most one write in flight,
    /// numbered per shard from [`STRICT_SEQ_BASE`] (`api::WriteSession`).
    sessions: Mutex<HashMap<(u64, ShardId), Vec<WriteSession>>>,
    tokens: Mutex<HashMap<String, Arc<Verified>>>,
    /// Cancelled when the endpoint stops: streams (watches, keep-alives) end.
    pub stop: tokio_util::sync::CancellationToken,
}

impl<N: EtcdNode> Gateway<N> {
    pub fn new(node: Arc<N>, authority: Arc<Authority>, stop: tokio_util::sync::CancellationToken) -> Self {
        let router = ShardRouter::new(node.num_shards());
        Gateway { node, authority, router, sessions: Default::default(), tokens: Default::default(), stop }
    }

    /// Whether the node requires tokens (it is a member of a cluster).
    pub fn enforcing(&self) -> bool {
        self.authority.enforcing()
    }

    pub fn router(&self) -> &ShardRouter {
        &self.router
    }

    /// A response header at `revision`.
    pub fn header(&self, revision: Revision) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.node.etcd_cluster_id(),
            member_id: self.node.node_id(),
            revision: revision_i64(revision),
            raft_term: self.node.raft_term(),
        })
    }

    /// The caller of a request, from its `token` metadata (what etcd clients send after
    /// `Authenticate`; `authorization` too). Refused as etcd refuses: no token while tokens
    /// are required, or a bad one.
    pub fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        if !self.authority.enforcing() {
            return Ok(Caller { token_id: 0, scope: None, verified: None });
        }
        let token = ["token", "authorization"]
            .iter()
            .find_map(|k| metadata.get(*k).and_then(|v| v.to_str().ok()))
            .map(|t| t.trim_start_matches("Bearer ").trim().to_string());
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(Status::invalid_argument(errors::USER_EMPTY));
        };
        let verified = self.verify(&token).map_err(|e| {
            tracing::debug!("etcd API: a token was refused: {e}");
            match e {
                auth::TokenError::NotReady => Status::unavailable(errors::NO_LEADER),
                _ => Status::unauthenticated(errors::INVALID_AUTH_TOKEN),
            }
        })?;
        match verified.scope() {
            Some(scope) => {
                Ok(Caller { token_id: verified.body.id, scope: Some(scope.clone()), verified: Some(verified.clone()) })
            }
            // A join token is for aspen-node --join-token, not for requests.
            None => Err(Status::permission_denied(errors::PERMISSION_DENIED)),
        }
    }

    /// Checks the caller's token again (expiry, revocation, the cluster's key): what a stream
    /// does while it runs, every [`auth::STREAM_RECHECK`] or per message. Refused as a bad
    /// token is refused at the start.
    pub fn recheck(&self, caller: &Caller) -> Result<(), Status> {
        let Some(v) = &caller.verified else { return Ok(()) };
        match self.authority.recheck(v) {
            Ok(()) => Ok(()),
            // The node cannot check tokens for now: the stream goes on.
            Err(e) if e.reason().is_none() => Ok(()),
            Err(e) => {
                tracing::debug!("etcd API: a stream's token is no longer valid: {e}");
                Err(Status::unauthenticated(errors::INVALID_AUTH_TOKEN))
            }
        }
    }

    /// Verifies a token (once per token; expiry and revocation every time).
    pub fn verify(&self, token: &str) -> Result<Arc<Verified>, auth::TokenError> {
        let cached = self.tokens.lock().unwrap_or_else(|p| p.into_inner()).get(token).cloned();
        if let Some(v) = cached {
            self.authority.recheck(&v)?;
            return Ok(v);
        }
        let v = Arc::new(self.authority.verify(token)?);
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= TOKEN_CACHE {
            tokens.clear();
        }
        tokens.insert(token.to_string(), v.clone());
        Ok(v)
    }

    /// Sends a request to the node (routed and forwarded there).
    pub async fn ask(&self, request: ClientRequest) -> Result<ClientResponse, Status> {
        self.node.handle(request, 0).await.map_err(status_of)
    }

    /// The shards a range may have keys in.
    pub fn shards_of(&self, range: &KeyRange) -> Vec<ShardId> {
        if range.is_single() {
            vec![self.router.shard_for_key(&range.key)]
        } else {
            (0..self.router.num_shards()).collect()
        }
    }

    /// Reads `query` from every shard its range reaches, merged in key order; `limit` keys at
    /// most (0: all), `count` over every shard, `revision` the highest any shard saw.
    pub async fn range(&self, query: RangeQuery, consistency: ReadConsistency) -> Result<RangePage, Status> {
        let shards = self.shards_of(&query.range);
        let reads = shards.iter().map(|shard| self.range_of_shard(*shard, query.clone(), consistency));
        let pages = futures::future::try_join_all(reads).await?;
        Ok(merge_pages(pages, query.limit, query.count_only))
    }

    /// `query` at revision `at` of its shard, if its range is in one shard (a single key, or
    /// any range of a one-shard cluster; else `None`: a revision is a position in one shard's
    /// history): the keys as they were at `at`, served from the state now and the serving
    /// node's watch history (`storage::past`; older than that history: etcd's compaction error).
    /// The answer's revision is the state read's: `at` after it is a future revision.
    pub async fn range_at(
        &self,
        query: RangeQuery,
        consistency: ReadConsistency,
        at: Revision,
    ) -> Result<Option<RangePage>, Status> {
        let [shard] = self.shards_of(&query.range)[..] else { return Ok(None) };
        let (limit, count_only) = (query.limit, query.count_only);
        let page = self.pages_of_shard(shard, query, consistency, Some(at)).await?;
        // Pages read on after one cut short by its size each hold up to `limit` keys.
        Ok(Some(merge_pages(vec![page], limit, count_only)))
    }

    /// Every page of one shard's part of `query` (a page stops at a quarter frame).
    pub async fn range_of_shard(
        &self,
        shard: ShardId,
        query: RangeQuery,
        consistency: ReadConsistency,
    ) -> Result<RangePage, Status> {
        self.pages_of_shard(shard, query, consistency, None).await
    }

    /// Every page of one shard's part of `query`, now or at revision `at`.
    async fn pages_of_shard(
        &self,
        shard: ShardId,
        mut query: RangeQuery,
        consistency: ReadConsistency,
        at: Option<Revision>,
    ) -> Result<RangePage, Status> {
        let mut all: Option<RangePage> = None;
        loop {
            let request = match at {
                None => ClientRequest::ShardRange { shard, query: query.clone(), consistency },
                Some(revision) => ClientRequest::ShardRangeAt { shard, query: query.clone(), consistency, revision },
            };
            let page = match self.ask(request).await? {
                ClientResponse::Range(p) => p,
                other => return Err(unexpected("a range read", other)),
            };
            // A page read before `at` is the state then, not at `at` (a replica behind it, a
            // serializable read): every page must have reached it.
            if at.is_some_and(|at| at > page.revision) {
                return Err(Status::out_of_range(errors::FUTURE_REV));
            }
            let acc = all.get_or_insert_with(|| RangePage {
                kvs: Vec::new(),
                count: page.count,
                more: false,
                revision: page.revision,
            });
            acc.kvs.extend(page.kvs);
            acc.revision = acc.revision.max(page.revision);
            let reached = query.limit > 0 && acc.kvs.len() as u64 >= query.limit;
            match acc.kvs.last() {
                Some(last) if page.more && !reached && !query.count_only => query.after = Some(last.key.clone()),
                _ => {
                    let over = query.limit > 0 && acc.kvs.len() as u64 > query.limit;
                    acc.more = !query.count_only && (page.more || over);
                    break;
                }
            }
        }
        Ok(all.unwrap_or(RangePage { kvs: Vec::new(), count: 0, more: false, revision: 0 }))
    }

    /// Evaluates a txn that writes nothing on `shard`, linearizably, as a read (the revision
    /// read, the branch taken, its results).
    pub async fn read_txn(&self, shard: ShardId, txn: KvTxn) -> Result<(Revision, bool, Vec<KvOpResult>), Status> {
        let consistency = ReadConsistency::Linearizable;
        match self.ask(ClientRequest::ShardTxnRead { shard, txn, consistency }).await? {
            ClientResponse::KvTxnRead { revision, succeeded, results } => Ok((revision, succeeded, results)),
            other => Err(unexpected("a txn read", other)),
        }
    }

    /// The current revision of `shard` (as a linearizable read sees it).
    pub async fn revision_of(&self, shard: ShardId) -> Result<Revision, Status> {
        let mut q = RangeQuery::all(KeyRange::single(Vec::new()));
        q.count_only = true;
        let page = match self
            .ask(ClientRequest::ShardRange { shard, query: q, consistency: ReadConsistency::Linearizable })
            .await?
        {
            ClientResponse::Range(p) => p,
            other => return Err(unexpected("a range read", other)),
        };
        Ok(page.revision)
    }

    /// Runs `txn` on `shard` as one write, exactly once (a session of the caller's token),
    /// checking a lease this shard knows nothing of with its home shard first.
    pub async fn write(
        &self,
        caller: &Caller,
        shard: ShardId,
        txn: KvTxn,
    ) -> Result<(Revision, bool, Vec<KvOpResult>), Status> {
        let session = self.next_session(caller.token_id, shard);
        let result = self.write_txn(caller, shard, session, txn).await;
        // The next write of this session takes the next number, whatever happened.
        self.give_back(caller.token_id, shard, session);
        result
    }

    async fn write_txn(
        &self,
        caller: &Caller,
        shard: ShardId,
        session: WriteSession,
        txn: KvTxn,
    ) -> Result<(Revision, bool, Vec<KvOpResult>), Status> {
        let mut leases_checked = false;
        loop {
            let command = WriteCommand::KvTxn { txn: txn.clone(), leases_checked };
            return match self.send_write(caller, shard, session, false, command).await? {
                WriteOutcome::KvTxn { revision, succeeded, results } => Ok((revision, succeeded, results)),
                WriteOutcome::LeaseNotFound { .. } => Err(Status::not_found(errors::LEASE_NOT_FOUND)),
                WriteOutcome::KeyNotFound { .. } => Err(Status::invalid_argument(errors::KEY_NOT_FOUND)),
                WriteOutcome::LeaseUnchecked { id } if !leases_checked => {
                    // Neither applied nor recorded: ask the lease's home, then resend as checked
                    // with the same session number.
                    match self.node.handle(ClientRequest::LeaseInfo { id }, 0).await {
                        Ok(ClientResponse::LeaseStatus(_)) => {
                            leases_checked = true;
                            continue;
                        }
                        Err(ApiError::LeaseNotFound { .. }) => Err(Status::not_found(errors::LEASE_NOT_FOUND)),
                        Err(e) => Err(status_of(e)),
                        Ok(other) => Err(unexpected("a lease lookup", other)),
                    }
                }
                other => Err(unknown_outcome(other)),
            };
        }
    }

    /// Whether lease `id` is live (its home shard's leader says, after a ReadIndex round).
    pub async fn lease_exists(&self, id: u64) -> Result<bool, Status> {
        match self.node.handle(ClientRequest::LeaseInfo { id }, 0).await {
            Ok(ClientResponse::LeaseStatus(_)) => Ok(true),
            Err(ApiError::LeaseNotFound { .. }) => Ok(false),
            Err(e) => Err(status_of(e)),
            Ok(other) => Err(unexpected("a lease lookup", other)),
        }
    }

    /// Sends one write of `shard` with a session of the caller's token (exactly once: the node
    /// retries it with the same number). `routed`: sent as a plain write, which the node routes
    /// and may coordinate (a lease revocation); else as a write of `shard`.
    pub async fn write_command(
        &self,
        caller: &Caller,
        shard: ShardId,
        routed: bool,
        command: WriteCommand,
    ) -> Result<WriteOutcome, Status> {
        let session = self.next_session(caller.token_id, shard);
        let answer = self.send_write(caller, shard, session, routed, command).await;
        self.give_back(caller.token_id, shard, session);
        answer
    }

    async fn send_write(
        &self,
        caller: &Caller,
        shard: ShardId,
        session: WriteSession,
        routed: bool,
        command: WriteCommand,
    ) -> Result<WriteOutcome, Status> {
        let mut request = if routed {
            ClientRequest::Write { session, command }
        } else {
            ClientRequest::ShardWrite { shard, session, command }
        };
        if caller.scope.is_some() {
            auth::bind_session(caller.token_id, &mut request);
        }
        match self.ask(request).await? {
            ClientResponse::Write(o) => Ok(o),
            other => Err(unexpected("a write", other)),
        }
    }

    /// A session of the caller's token for `shard`, numbered for its next write.
    fn next_session(&self, token_id: u64, shard: ShardId) -> WriteSession {
        let mut session = self.take_session(token_id, shard);
        session.seq += 1;
        session
    }

    fn take_session(&self, token_id: u64, shard: ShardId) -> WriteSession {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get_mut(&(token_id, shard))
            .and_then(Vec::pop)
            .unwrap_or(WriteSession { client_id: Id128::random(), seq: STRICT_SEQ_BASE })
    }

    fn give_back(&self, token_id: u64, shard: ShardId, session: WriteSession) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).entry((token_id, shard)).or_default().push(session);
    }
}

/// Merges shards' pages of one range in key order, keeping `limit` keys (0: all).
pub fn merge_pages(pages: Vec<RangePage>, limit: u64, count_only: bool) -> RangePage {
    let count = pages.iter().map(|p| p.count).sum();
    let revision = pages.iter().map(|p| p.revision).max().unwrap_or(0);
    let mut more = !count_only && pages.iter().any(|p| p.more);
    let mut kvs: Vec<KeyRecord> = pages.into_iter().flat_map(|p| p.kvs).collect();
    kvs.sort_by(|a, b| a.key.cmp(&b.key));
    if limit > 0 && kvs.len() as u64 > limit {
        kvs.truncate(limit as usize);
        more = !count_only;
    }
    RangePage { kvs, count, more, revision }
}

/// A server-streaming answer fed by a task through `rx`: it ends when the task drops its sender.
pub fn stream_of<T: Send + 'static>(rx: tokio::sync::mpsc::Receiver<T>) -> futures::stream::BoxStream<'static, T> {
    use futures::StreamExt;
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|a| (a, rx)) }).boxed()
}

/// A revision as etcd's signed fields carry it.
pub fn revision_i64(r: Revision) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

/// A revision from etcd's signed fields (negative: 0).
pub fn revision_u64(r: i64) -> Revision {
    u64::try_from(r).unwrap_or(0)
}

/// A key as etcd shows it.
pub fn kv_of(r: KeyRecord) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: r.key,
        create_revision: revision_i64(r.create_revision),
        mod_revision: revision_i64(r.mod_revision),
        version: i64::try_from(r.version).unwrap_or(i64::MAX),
        value: r.value,
        lease: i64::try_from(r.lease).unwrap_or(0),
    }
}

/// etcd's key range: `range_end` empty → the key alone; `"\0"` → every key from `key` on; else
/// `[key, range_end)`. An empty key with `"\0"` is every key.
pub fn key_range(key: Vec<u8>, range_end: Vec<u8>) -> KeyRange {
    if range_end.is_empty() {
        KeyRange { key, end: None }
    } else if range_end == [0] {
        KeyRange { key, end: Some(Vec::new()) }
    } else {
        KeyRange { key, end: Some(range_end) }
    }
}
