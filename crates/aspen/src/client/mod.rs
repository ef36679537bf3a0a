//! [`AspenClient`]: the Rust client used by `aspen-cli`, tests and benchmarks.
//!
//! Owns: an ephemeral, offline-safe iroh endpoint (its own, or a [`ClientEndpoint`] several
//! clients share, each still with its own connection); the list of member tickets it may talk to;
//! one cached connection (re-dialled, or failed over to another member, when it breaks or a
//! request through it got no answer in time); and a
//! pool of write sessions for exactly-once writes. A session has at most one write in flight, and
//! every retry of that write — after a timeout, a broken connection or a failover — carries the
//! same client id and sequence number, so the cluster applies it at most once.

use std::{
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use iroh::{address_lookup::MemoryLookup, endpoint::Connection, Endpoint};

pub mod backup;
mod lease;
mod watch;
pub use backup::{SaveError, SaveProgress};
pub use lease::{KeepAliveState, LeaseKeepAlive};
pub use watch::{WatchItem, WatchStream};

use crate::{
    api::{
        frame::{encode_frame, read_frame},
        ApiError, BatchOp, ClientEnvelope, ClientRequest, ClientResponse, ClientResult, ClusterStatus, DefragReport,
        Id128, KeyValue, NodeId, NodeTicket, ReadConsistency, Revision, ScanPage, ScanRequest, ShardId, ShardStatus,
        TokenInfo, WriteCommand, WriteOutcome, WriteSession, CLIENT_ALPN, CLIENT_PROTOCOL_VERSION, MAX_FRAME_BYTES,
        STRICT_SEQ_BASE,
    },
    transport::endpoint::bind_endpoint,
};

/// Errors a client call can end with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cluster answered with a typed error.
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("no node ticket given (use --ticket, ASPEN_TICKET or --data-dir)")]
    NoTickets,
    /// No member could be reached before the deadline.
    #[error("could not reach any node: {0}")]
    Unreachable(String),
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("cannot create client endpoint: {0}")]
    Endpoint(String),
}

impl ClientError {
    /// A stable snake_case name of the error kind (what `aspen-cli --json` prints as `kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Api(e) => e.kind(),
            ClientError::NoTickets => "no_ticket",
            ClientError::Unreachable(_) => "unreachable",
            ClientError::Timeout(_) => "timeout",
            ClientError::Protocol(_) => "protocol",
            ClientError::Endpoint(_) => "endpoint",
        }
    }

    /// Whether the cluster (not the caller) is at fault: unavailable, unreachable, timed out.
    pub fn is_cluster_error(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable(_)
                | ClientError::Timeout(_)
                | ClientError::Protocol(_)
                | ClientError::Api(
                    ApiError::Unavailable(_)
                        | ApiError::Timeout(_)
                        | ApiError::NotLeader { .. }
                        | ApiError::NotInitialized { .. }
                )
                | ClientError::Api(ApiError::Internal(_))
        )
    }
}

/// The result of a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The swap happened at this revision.
    Swapped(Revision),
    /// The current value did not match; it is this (`None`: absent).
    Mismatch(Option<Vec<u8>>),
}

/// Failures of one attempt, split by whether another attempt may help.
enum Attempt {
    Retry(String),
    Done(Result<ClientResponse, ClientError>),
}

/// An ephemeral, offline-safe iroh endpoint that several [`AspenClient`]s can share (one UDP
/// socket and one set of endpoint tasks; every client still dials its own QUIC connection).
/// Load generators with many clients use one so that the clients' transport does not cost
/// more CPU than the connections themselves.
#[derive(Clone, Debug)]
pub struct ClientEndpoint {
    endpoint: Endpoint,
    lookup: MemoryLookup,
}

impl ClientEndpoint {
    /// Binds an endpoint able to reach the members named by `tickets` (IPv6-only tickets get
    /// an IPv6 socket).
    pub async fn bind(tickets: &[NodeTicket]) -> Result<Self, ClientError> {
        let bind: SocketAddr = if !tickets.is_empty() && tickets.iter().flat_map(|t| &t.addrs).all(|a| a.is_ipv6()) {
            "[::]:0".parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
        } else {
            SocketAddr::from(([0, 0, 0, 0], 0))
        };
        let lookup = MemoryLookup::new();
        for t in tickets {
            lookup.add_endpoint_info(t.endpoint_addr());
        }
        let endpoint =
            bind_endpoint(bind, None, lookup.clone()).await.map_err(|e| ClientError::Endpoint(e.to_string()))?;
        Ok(ClientEndpoint { endpoint, lookup })
    }

    /// Closes the endpoint and with it every connection of every client on it.
    pub async fn close(&self) {
        self.endpoint.close().await;
    }
}

/// A client of an Aspen cluster.
#[derive(Debug)]
pub struct AspenClient {
    endpoint: ClientEndpoint,
    /// Whether `close` closes the endpoint (it is this client's own) or only the connection.
    owns_endpoint: bool,
    tickets: Mutex<Vec<NodeTicket>>,
    /// Index into `tickets` and the connection to that member.
    current: tokio::sync::Mutex<Option<(usize, Connection)>>,
    next: Mutex<usize>,
    /// Idle write sessions by shard: a session numbers its writes per shard (1, 2, …), so a
    /// shard that does not know a session with a number past 1 knows it forgot it.
    sessions: Mutex<std::collections::HashMap<ShardId, Vec<WriteSession>>>,
    /// The cluster's number of shards (learned from the first node reached; 0: not yet).
    num_shards: std::sync::atomic::AtomicU32,
    timeout: Duration,
    /// Whether the member list was fetched from a node yet (done once, on the first connection).
    discovered: std::sync::atomic::AtomicBool,
    /// The token (`aspen-cli auth token create`, or a node's `admin.token`): sent with the
    /// requests of a connection until the node has answered one of them (it then keeps the
    /// verified token with the connection), so later requests do not carry its bytes.
    token: Option<String>,
    /// The connection (`stable_id`) on which the node took the token.
    token_taken_on: Mutex<Option<usize>>,
}

impl AspenClient {
    /// A client that talks to the members named by `tickets` (at least one).
    /// The client has an endpoint of its own.
    pub async fn connect(tickets: Vec<NodeTicket>, timeout: Duration) -> Result<Self, ClientError> {
        if tickets.is_empty() {
            return Err(ClientError::NoTickets);
        }
        let endpoint = ClientEndpoint::bind(&tickets).await?;
        Ok(Self::new(endpoint, true, tickets, timeout))
    }

    /// A client on a shared `endpoint` with a connection of its own; closing it closes only
    /// that connection.
    pub fn on_endpoint(
        endpoint: &ClientEndpoint,
        tickets: Vec<NodeTicket>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        if tickets.is_empty() {
            return Err(ClientError::NoTickets);
        }
        for t in &tickets {
            endpoint.lookup.add_endpoint_info(t.endpoint_addr());
        }
        Ok(Self::new(endpoint.clone(), false, tickets, timeout))
    }

    fn new(endpoint: ClientEndpoint, owns_endpoint: bool, tickets: Vec<NodeTicket>, timeout: Duration) -> Self {
        AspenClient {
            endpoint,
            owns_endpoint,
            tickets: Mutex::new(tickets),
            current: tokio::sync::Mutex::new(None),
            next: Mutex::new(0),
            sessions: Mutex::new(Default::default()),
            num_shards: std::sync::atomic::AtomicU32::new(0),
            timeout,
            discovered: std::sync::atomic::AtomicBool::new(false),
            token: None,
            token_taken_on: Mutex::new(None),
        }
    }

    /// Sends `token` with every request (a cluster refuses requests without a valid token
    /// with [`ApiError::PermissionDenied`]).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        let token: String = token.into();
        self.token = Some(token.trim().to_string());
        self
    }

    /// The token this client sends, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The tickets this client may fail over to.
    pub fn tickets(&self) -> Vec<NodeTicket> {
        self.tickets.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds members (e.g. learned from `cluster status`) to fail over to.
    pub fn add_tickets(&self, more: impl IntoIterator<Item = NodeTicket>) {
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        for t in more {
            if !tickets.iter().any(|x| x.endpoint_id == t.endpoint_id) {
                self.endpoint.lookup.add_endpoint_info(t.endpoint_addr());
                tickets.push(t);
            }
        }
    }

    async fn connection(&self, deadline: Instant) -> Result<(usize, Connection), String> {
        let mut current = self.current.lock().await;
        if let Some((i, conn)) = current.as_ref() {
            if conn.close_reason().is_none() {
                return Ok((*i, conn.clone()));
            }
        }
        *current = None;
        let tickets = self.tickets();
        let start = *self.next.lock().unwrap_or_else(|p| p.into_inner());
        let (i, conn) = self.dial_any(&tickets, start, deadline).await?;
        *current = Some((i, conn.clone()));
        if !self.discovered.load(std::sync::atomic::Ordering::SeqCst) && self.discover(&conn, deadline).await {
            self.discovered.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok((i, conn))
    }

    /// Dials the members "happy eyeballs" style: ticket `start` first, the next one when no
    /// answer came within [`DIAL_STAGGER`] (or at once when a dial failed), and so on; the first
    /// connection wins and the other dials are dropped. A dead member so costs at most
    /// `DIAL_STAGGER`, not a connect timeout, and every member is tried before the deadline.
    async fn dial_any(
        &self,
        tickets: &[NodeTicket],
        start: usize,
        deadline: Instant,
    ) -> Result<(usize, Connection), String> {
        if tickets.is_empty() {
            return Err("no tickets".into());
        }
        let mut dials = tokio::task::JoinSet::new();
        let mut next = 0usize;
        // Until a dial fails, what a timeout says: who was dialled and did not answer.
        let mut last_err = String::new();
        // What a timeout after `dialled` dials says.
        let timed_out = |last_err: String, dialled: usize| {
            if !last_err.is_empty() {
                return format!("{last_err}; connect timed out");
            }
            let who: Vec<String> = (0..dialled)
                .map(|k| {
                    let t = &tickets[(start + k) % tickets.len()];
                    let addrs: Vec<String> = t.addrs.iter().map(ToString::to_string).collect();
                    format!("node {} ({})", t.node_id, addrs.join(", "))
                })
                .collect();
            format!("no answer from {}; connect timed out", who.join(", "))
        };
        loop {
            if next < tickets.len() {
                let i = (start + next) % tickets.len();
                next += 1;
                let endpoint = self.endpoint.endpoint.clone();
                let addr = tickets[i].endpoint_addr();
                let node = tickets[i].node_id;
                tracing::debug!(node, "dialing");
                dials.spawn(async move { (i, node, endpoint.connect(addr, CLIENT_ALPN).await) });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(last_err, next));
            }
            // Wait for an outcome; start the next dial after the stagger if nothing came.
            let wait = if next < tickets.len() { left.min(DIAL_STAGGER) } else { left };
            match tokio::time::timeout(wait, dials.join_next()).await {
                Ok(Some(Ok((i, _, Ok(conn))))) => return Ok((i, conn)),
                Ok(Some(Ok((_, node, Err(e))))) => last_err = format!("node {node}: {e}"),
                Ok(Some(Err(e))) => last_err = format!("dial task: {e}"),
                Ok(None) => {
                    if next >= tickets.len() {
                        return Err(last_err);
                    }
                }
                Err(_) if next >= tickets.len() => {
                    return Err(timed_out(last_err, next));
                }
                Err(_) => {}
            }
        }
    }

    /// Moves to the next member after a failure of member `i`.
    async fn fail_over(&self, i: usize) {
        let mut current = self.current.lock().await;
        if matches!(current.as_ref(), Some((j, _)) if *j == i) {
            *current = None;
        }
        let n = self.tickets().len().max(1);
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = (i + 1) % n;
    }

    /// Learns the number of shards and the other members (for failover) from a node we reached
    /// (best effort). Returns whether it got an answer.
    async fn discover(&self, conn: &Connection, deadline: Instant) -> bool {
        let Ok(frame) = encode_frame(&ClientEnvelope {
            version: CLIENT_PROTOCOL_VERSION,
            hops: 0,
            request: ClientRequest::Topology,
            token: self.token.clone(),
        }) else {
            return false;
        };
        let left = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(2));
        match tokio::time::timeout(left, exchange(conn, &frame)).await {
            Ok(Ok(Ok(ClientResponse::Topology { num_shards, members }))) => {
                if self.token.is_some() {
                    *self.token_taken_on.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.stable_id());
                }
                self.num_shards.store(num_shards, std::sync::atomic::Ordering::SeqCst);
                self.add_tickets(members.iter().filter_map(|t| NodeTicket::decode(t).ok()));
                true
            }
            _ => false,
        }
    }

    /// The shard a write goes to, as the cluster routes it (its first key's; 0 before the
    /// number of shards is known: a session then may meet a shard mid-sequence, which the
    /// shard refuses and [`Self::write`] answers with a fresh session).
    fn shard_of(&self, command: &WriteCommand) -> ShardId {
        let router = crate::api::routing::ShardRouter::new(self.num_shards.load(std::sync::atomic::Ordering::SeqCst));
        if let Some(id) = command.lease_home() {
            // A grant or a revocation: numbered in the lease's home shard, where it applies first.
            return router.shard_for_lease(id);
        }
        command.keys().first().map_or(0, |k| router.shard_for_key(k))
    }

    async fn attempt(&self, frame: &[u8], deadline: Instant, timeout: Duration) -> Attempt {
        let (i, conn) = match self.connection(deadline).await {
            Ok(c) => c,
            Err(e) => return Attempt::Retry(e),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let taken = *self.token_taken_on.lock().unwrap_or_else(|p| p.into_inner()) == Some(conn.stable_id());
        let with_token = match (&self.token, taken) {
            (Some(token), false) => match with_token_appended(frame, token) {
                Ok(f) => Some(f),
                Err(e) => return Attempt::Done(Err(ClientError::Protocol(e))),
            },
            _ => None,
        };
        let answer = tokio::time::timeout(left, exchange(&conn, with_token.as_deref().unwrap_or(frame))).await;
        match &answer {
            // The node answered a request that carried the token: it keeps it with this
            // connection from now on.
            Ok(Ok(Ok(_))) if with_token.is_some() => {
                *self.token_taken_on.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.stable_id());
            }
            // Sent without the token, refused: the node does not hold it (it was not yet in a
            // cluster when it took the token, say). Send it again, with the token.
            Ok(Ok(Err(ApiError::PermissionDenied(_)))) if with_token.is_none() && self.token.is_some() => {
                *self.token_taken_on.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return Attempt::Retry("the node asked for the token again".into());
            }
            _ => {}
        }
        match answer {
            // No answer in the whole time: the next request starts at another member. A member
            // that takes requests and answers none (removed from the cluster, cut off from the
            // shards' leaders, wedged) would otherwise get every request of this client until
            // its connection broke — a lease kept alive through it would expire meanwhile.
            Err(_) => {
                self.fail_over(i).await;
                Attempt::Done(Err(ClientError::Timeout(timeout)))
            }
            Ok(Err(e)) => {
                self.fail_over(i).await;
                Attempt::Retry(e)
            }
            Ok(Ok(Ok(resp))) => Attempt::Done(Ok(resp)),
            Ok(Ok(Err(ApiError::NotLeader { leader, .. }))) => {
                // Prefer the member the node named as leader, if we know it; else the next one.
                let tickets = self.tickets();
                match leader.and_then(|l| tickets.iter().position(|t| t.node_id == l)) {
                    Some(pos) if pos != i => {
                        self.fail_over(i).await;
                        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = pos;
                        Attempt::Retry(format!("node {} is not the leader", tickets[i].node_id))
                    }
                    _ => Attempt::Done(Err(ApiError::NotLeader { leader, leader_ticket: None }.into())),
                }
            }
            Ok(Ok(Err(ApiError::Unavailable(msg)))) if self.tickets().len() > 1 => {
                self.fail_over(i).await;
                Attempt::Retry(msg)
            }
            Ok(Ok(Err(e))) => Attempt::Done(Err(e.into())),
        }
    }

    /// Sends one request, retrying on other members until it gets an answer or the timeout
    /// passes. Retries resend the identical frame (same write session and sequence number).
    pub async fn request(&self, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        self.request_within(request, self.timeout).await
    }

    /// [`Self::request`] with its own time budget instead of the client's timeout.
    pub async fn request_within(
        &self,
        request: ClientRequest,
        timeout: Duration,
    ) -> Result<ClientResponse, ClientError> {
        self.request_counted(request, timeout).await.0
    }

    /// [`Self::request_within`], also saying how many attempts it took.
    async fn request_counted(
        &self,
        request: ClientRequest,
        timeout: Duration,
    ) -> (Result<ClientResponse, ClientError>, u32) {
        // Without the token: it is the envelope's last field, added by `attempt` when needed.
        let frame =
            match encode_frame(&ClientEnvelope { version: CLIENT_PROTOCOL_VERSION, hops: 0, request, token: None }) {
                Ok(f) => f,
                Err(e) => return (Err(ClientError::Protocol(e.to_string())), 0),
            };
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.attempt(&frame, deadline, timeout).await {
                Attempt::Done(r) => return (r, attempts),
                Attempt::Retry(why) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return (Err(ClientError::Unreachable(why)), attempts);
                    }
                    // The last retry gets what is left, not nothing.
                    let backoff_now = backoff.min(left);
                    tracing::debug!("retrying request: {why}");
                    tokio::time::sleep(backoff_now).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// How the cluster routes keys to shards (asked of the cluster if this client does not know
    /// yet; one shard if it cannot). A batch must keep to one shard: group its operations with
    /// this.
    pub async fn shard_router(&self) -> crate::api::routing::ShardRouter {
        self.learn_topology().await;
        crate::api::routing::ShardRouter::new(self.num_shards.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Asks for the cluster's shards and members if the first connection's discovery did not
    /// answer.
    async fn learn_topology(&self) {
        if self.num_shards.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            if let Ok(ClientResponse::Topology { num_shards, members }) = self.request(ClientRequest::Topology).await {
                self.num_shards.store(num_shards, std::sync::atomic::Ordering::SeqCst);
                self.add_tickets(members.iter().filter_map(|t| NodeTicket::decode(t).ok()));
            }
        }
    }

    /// Runs one write with a session from the pool (exactly-once across retries). Sessions are
    /// pooled by shard and number their writes there 1, 2, …; a prefix delete (every shard)
    /// takes a session of its own.
    pub async fn write(&self, command: WriteCommand) -> Result<WriteOutcome, ClientError> {
        self.learn_topology().await;
        let shard = (!matches!(command, WriteCommand::DeletePrefix { .. })).then(|| self.shard_of(&command));
        let fresh = || WriteSession { client_id: Id128::random(), seq: STRICT_SEQ_BASE };
        let mut session = match shard {
            Some(s) => {
                let mut pools = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                pools.get_mut(&s).and_then(Vec::pop).unwrap_or_else(fresh)
            }
            None => fresh(),
        };
        session.seq += 1;
        let (mut result, mut attempts) =
            self.request_counted(ClientRequest::Write { session, command: command.clone() }, self.timeout).await;
        if attempts == 1
            && session.seq > 1
            && matches!(result, Ok(ClientResponse::Write(WriteOutcome::UnknownSession { .. })))
        {
            // Sent once and refused: this session was forgotten while it sat in the pool, and
            // the write was not applied. A fresh session sends it again.
            session = WriteSession { client_id: Id128::random(), seq: STRICT_SEQ_BASE + 1 };
            (result, attempts) = self.request_counted(ClientRequest::Write { session, command }, self.timeout).await;
        }
        // Whatever happened, the next write of this session uses the next sequence number: a
        // late arrival of this one is then either applied once or refused as stale.
        if let Some(s) = shard {
            self.sessions.lock().unwrap_or_else(|p| p.into_inner()).entry(s).or_default().push(session);
        }
        match result? {
            ClientResponse::Write(WriteOutcome::StaleSequence { last_seq }) => Err(ClientError::Protocol(format!(
                "write superseded (session at sequence {last_seq}); its outcome is unknown"
            ))),
            ClientResponse::Write(WriteOutcome::UnknownSession { seq }) => Err(ClientError::Protocol(format!(
                "the cluster forgot this write's session (idle over an hour, or pushed out) before \
                 write {seq} of it was retried ({attempts} attempts); its outcome is unknown"
            ))),
            ClientResponse::Write(outcome) => Ok(outcome),
            other => Err(unexpected(other)),
        }
    }

    /// Linearizable read of one key.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>, ClientError> {
        self.get_with(key, ReadConsistency::Linearizable).await
    }

    /// Read of one key with the given consistency.
    pub async fn get_with(
        &self,
        key: impl Into<Vec<u8>>,
        consistency: ReadConsistency,
    ) -> Result<Option<KeyValue>, ClientError> {
        match self.request(ClientRequest::Get { key: key.into(), consistency }).await? {
            ClientResponse::Get(kv) => Ok(kv),
            other => Err(unexpected(other)),
        }
    }

    /// Sets `key` to `value`; returns the write's revision.
    pub async fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<Revision, ClientError> {
        match self.write(WriteCommand::Put { key: key.into(), value: value.into() }).await? {
            WriteOutcome::Put { revision } => Ok(revision),
            other => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<bool, ClientError> {
        match self.write(WriteCommand::Delete { key: key.into() }).await? {
            WriteOutcome::Delete { deleted, .. } => Ok(deleted),
            other => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Sets `key` to `new_value` if its value is `expected` (`None`: if it is absent).
    pub async fn cas(
        &self,
        key: impl Into<Vec<u8>>,
        expected: Option<Vec<u8>>,
        new_value: impl Into<Vec<u8>>,
    ) -> Result<CasOutcome, ClientError> {
        match self.write(WriteCommand::Cas { key: key.into(), expected, new_value: new_value.into() }).await? {
            WriteOutcome::Cas { succeeded: true, revision, .. } => Ok(CasOutcome::Swapped(revision)),
            WriteOutcome::Cas { succeeded: false, current, .. } => Ok(CasOutcome::Mismatch(current)),
            other => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Applies puts and deletes atomically; returns the batch's revision.
    pub async fn batch(&self, ops: Vec<BatchOp>) -> Result<Revision, ClientError> {
        match self.write(WriteCommand::Batch { ops }).await? {
            WriteOutcome::Batch { revision } => Ok(revision),
            other => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }

    /// One page of a scan.
    pub async fn scan_page(&self, req: ScanRequest) -> Result<ScanPage, ClientError> {
        match self.request(ClientRequest::Scan(req)).await? {
            ClientResponse::Scan(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// All keys with `prefix` (following pages), at most `limit` of them, in key order.
    pub async fn scan(
        &self,
        prefix: impl Into<Vec<u8>>,
        limit: usize,
        consistency: ReadConsistency,
    ) -> Result<Vec<KeyValue>, ClientError> {
        let prefix = prefix.into();
        let mut out = Vec::new();
        let mut continuation = None;
        while out.len() < limit {
            let want = (limit - out.len()).min(u32::MAX as usize) as u32;
            let page = self
                .scan_page(ScanRequest {
                    prefix: prefix.clone(),
                    start: None,
                    end: None,
                    limit: want,
                    continuation: continuation.take(),
                    consistency,
                })
                .await?;
            out.extend(page.entries);
            match page.continuation {
                Some(c) => continuation = Some(c),
                None => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// The cluster as the answering node sees it.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        match self.request(ClientRequest::ClusterStatus).await? {
            ClientResponse::ClusterStatus(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Defragments the state machines of node `node_id` (`None`: the node that answers), one
    /// shard after another, waiting up to `timeout` (admin; docs/operations.md, "Defragmenting").
    pub async fn defragment(&self, node_id: Option<NodeId>, timeout: Duration) -> Result<DefragReport, ClientError> {
        match self.request_within(ClientRequest::Defragment { node_id }, timeout).await? {
            ClientResponse::Defragmented(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Adds the node behind `ticket` as a learner; returns shard 0's membership afterwards.
    pub async fn add_learner(&self, ticket: &NodeTicket) -> Result<ShardStatus, ClientError> {
        self.membership(ClientRequest::AddLearner { ticket: ticket.encode() }).await
    }

    /// Adds a node started with `--no-init` as a learner, with the claim token from its data dir
    /// (`claim.token`); without the token such a node refuses to be added.
    pub async fn add_learner_claimed(
        &self,
        ticket: &NodeTicket,
        claim_token: &str,
    ) -> Result<ShardStatus, ClientError> {
        let claim_token = claim_token.trim().to_string();
        self.membership(ClientRequest::AddLearnerClaimed { ticket: ticket.encode(), claim_token }).await
    }

    /// Makes learner `node_id` a voter.
    pub async fn promote(&self, node_id: NodeId) -> Result<ShardStatus, ClientError> {
        self.membership(ClientRequest::Promote { node_id }).await
    }

    /// Removes `node_id` from the cluster.
    pub async fn remove(&self, node_id: NodeId) -> Result<ShardStatus, ClientError> {
        self.membership(ClientRequest::Remove { node_id }).await
    }

    async fn membership(&self, req: ClientRequest) -> Result<ShardStatus, ClientError> {
        match self.request(req).await? {
            ClientResponse::Membership(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Moves the leadership of `shard` to `node_id`; returns every shard's status afterwards.
    pub async fn move_leader(&self, shard: ShardId, node_id: NodeId) -> Result<Vec<ShardStatus>, ClientError> {
        self.leaders(ClientRequest::MoveLeader { shard, node_id }).await
    }

    /// Spreads shard leaders evenly over the voters; returns every shard's status afterwards.
    pub async fn balance_leaders(&self) -> Result<Vec<ShardStatus>, ClientError> {
        self.leaders(ClientRequest::BalanceLeaders).await
    }

    async fn leaders(&self, req: ClientRequest) -> Result<Vec<ShardStatus>, ClientError> {
        match self.request(req).await? {
            ClientResponse::Leaders(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Makes a node started with `--no-init` a one-node cluster. Returns whether it did.
    pub async fn cluster_init(&self) -> Result<bool, ClientError> {
        match self.request(ClientRequest::ClusterInit).await? {
            ClientResponse::ClusterInit { initialized } => Ok(initialized),
            other => Err(unexpected(other)),
        }
    }

    /// [`Self::cluster_init`] of a node started with `--no-init`, with its claim token.
    pub async fn cluster_init_claimed(&self, claim_token: &str) -> Result<bool, ClientError> {
        let claim_token = claim_token.trim().to_string();
        match self.request(ClientRequest::ClusterInitClaimed { claim_token }).await? {
            ClientResponse::ClusterInit { initialized } => Ok(initialized),
            other => Err(unexpected(other)),
        }
    }

    /// Issues a client token (admin): `read`/`write`/`admin` permissions, for keys under
    /// `prefixes` (empty: every key), valid for `ttl_secs` (`None`: until revoked).
    pub async fn create_token(
        &self,
        read: bool,
        write: bool,
        admin: bool,
        prefixes: Vec<Vec<u8>>,
        ttl_secs: Option<u64>,
    ) -> Result<(TokenInfo, String), ClientError> {
        match self.request(ClientRequest::AuthTokenCreate { read, write, admin, prefixes, ttl_secs }).await? {
            ClientResponse::TokenIssued { info, token } => Ok((info, token)),
            other => Err(unexpected(other)),
        }
    }

    /// Every issued client token, oldest first (admin).
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        match self.request(ClientRequest::AuthTokenList).await? {
            ClientResponse::Tokens(list) => Ok(list),
            other => Err(unexpected(other)),
        }
    }

    /// Revokes the client token `id` (admin); every node refuses it within 2 s.
    pub async fn revoke_token(&self, id: u64) -> Result<(), ClientError> {
        match self.request(ClientRequest::AuthTokenRevoke { id }).await? {
            ClientResponse::TokenRevoked { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Issues a join token (admin) for `aspen-node --join-token`, valid for `ttl_secs`;
    /// `single_use`: it admits one node id.
    pub async fn create_join_token(&self, ttl_secs: u64, single_use: bool) -> Result<(TokenInfo, String), ClientError> {
        match self.request(ClientRequest::JoinTokenCreate { ttl_secs, single_use }).await? {
            ClientResponse::TokenIssued { info, token } => Ok((info, token)),
            other => Err(unexpected(other)),
        }
    }

    /// Transport counters (UDP datagrams, QUIC frames by type) of the connection this client
    /// currently uses, if it has one: what `aspen-cli bench` reports as datagrams per request.
    pub async fn transport_stats(&self) -> Option<iroh::endpoint::ConnectionStats> {
        self.current.lock().await.as_ref().map(|(_, conn)| conn.stats())
    }

    /// Closes the client's connection, and its endpoint if it is the client's own. Bounded by
    /// [`CLOSE_LIMIT`]: the close frame is sent at once; waiting for a peer that does not
    /// answer (a dead member dialled during failover) must not hold up the caller.
    pub async fn close(self) {
        if let Some((_, conn)) = self.current.lock().await.take() {
            conn.close(0u32.into(), b"client closed");
        }
        if self.owns_endpoint {
            let _ = tokio::time::timeout(CLOSE_LIMIT, self.endpoint.close()).await;
        }
    }

    /// Deletes every key starting with `prefix` (empty: every key); returns how many it deleted.
    /// Atomic within each shard; on a sharded cluster the node receiving it sends it to every
    /// shard and sums the counts. Exactly-once like every write: a retry (same session and
    /// sequence number) is answered by each shard that applied it already, so on an error some
    /// shards may have deleted their keys; calling again deletes the rest.
    pub async fn delete_prefix(&self, prefix: impl Into<Vec<u8>>) -> Result<u64, ClientError> {
        match self.write(WriteCommand::DeletePrefix { prefix: prefix.into() }).await? {
            WriteOutcome::DeletePrefix { deleted, .. } => Ok(deleted),
            other => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }

    /// An etcd-style transaction, atomic within one shard: if every compare holds, runs
    /// `success`, else `failure`; returns which ran and one result per op of that branch. On a
    /// sharded cluster all its keys must fall into one shard (else `InvalidRequest`).
    pub async fn txn(
        &self,
        compares: Vec<crate::api::Compare>,
        success: Vec<crate::api::TxnOp>,
        failure: Vec<crate::api::TxnOp>,
    ) -> Result<crate::api::TxnResponse, ClientError> {
        match self.write(WriteCommand::Txn { compares, success, failure }).await? {
            WriteOutcome::Txn { revision, succeeded, results } => {
                Ok(crate::api::TxnResponse { revision, succeeded, results })
            }
            other => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }
}

/// How long a dial waits for an answer before the next member is dialled too.
pub const DIAL_STAGGER: Duration = Duration::from_millis(300);
/// The longest [`AspenClient::close`] waits for its endpoint to close.
const CLOSE_LIMIT: Duration = Duration::from_millis(250);

/// One request/response exchange on a new stream of `conn`.
/// `frame` (a client envelope whose token is `None`, its last field) with `token` instead.
fn with_token_appended(frame: &[u8], token: &str) -> Result<Vec<u8>, String> {
    let Some((&0, body)) = frame.get(4..).and_then(<[u8]>::split_last) else {
        return Err("a request frame must end with an empty token".into());
    };
    let mut out = Vec::with_capacity(frame.len() + token.len() + 10);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(body);
    out.extend_from_slice(&postcard::to_stdvec(&Some(token)).map_err(|e| e.to_string())?);
    let len = u32::try_from(out.len() - 4).map_err(|_| "request frame too large".to_string())?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

async fn exchange(conn: &Connection, frame: &[u8]) -> Result<ClientResult, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(frame).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    read_frame::<_, ClientResult>(&mut recv, MAX_FRAME_BYTES).await.map_err(|e| e.to_string())
}

fn unexpected(resp: ClientResponse) -> ClientError {
    ClientError::Protocol(format!("unexpected response {resp:?}"))
}

#[cfg(test)]
mod token_frame_tests {
    use super::*;
    use crate::api::frame::decode_frame;

    #[test]
    fn the_token_is_appended_as_the_envelopes_last_field() {
        let request = ClientRequest::Get { key: b"k".to_vec(), consistency: ReadConsistency::Stale };
        let bare = ClientEnvelope { version: CLIENT_PROTOCOL_VERSION, hops: 0, request, token: None };
        let frame = encode_frame(&bare).unwrap();
        let token = "aspentoken1".to_string() + &"a".repeat(300);
        let with = with_token_appended(&frame, &token).unwrap();
        let (back, rest) = decode_frame::<ClientEnvelope>(&with, MAX_FRAME_BYTES).unwrap();
        assert!(rest.is_empty());
        assert_eq!(back, ClientEnvelope { token: Some(token.clone()), ..bare.clone() });
        assert_eq!(with, encode_frame(&ClientEnvelope { token: Some(token), ..bare }).unwrap());
        assert!(with_token_appended(&[0, 0], "t").is_err(), "no panic on a short frame");
    }
}
