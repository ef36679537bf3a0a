//! The client protocol handler (ALPN `aspen-client`): one request frame and one response frame
//! per bi-stream, many streams per connection, each served on its own task. The same handler
//! serves the members-only peer ALPN (`aspen-peer/1`, [`Origin::Peer`]), where the node-to-node
//! requests are answered too; on the client ALPN those are refused
//! ([`ClientRequest::is_node_to_node`]). Who may connect to the peer ALPN is decided before any
//! stream opens (`transport::gate`).
//!
//! Memory: a request's bytes are reserved when its length prefix arrives, before they are read,
//! from the connection's budget (1/[`CONNECTION_SHARE`] of the node's) and the node's
//! ([`NODE_REQUEST_MEMORY`] by default, shared by both ALPNs), and held until the answer is sent; a request
//! that does not fit is refused with a retryable [`ApiError::Unavailable`] and its bytes are never
//! read. A request must arrive, and its answer be taken, within the request timeout.
//!
//! Tokens (client ALPN only): once the node belongs to a cluster, every request but a join or
//! `cluster init` needs a token ([`crate::auth`]). A connection verifies a token once (signature,
//! cluster, signing key) and keeps it — a request without a token on that connection is then
//! the same client's (the Rust client stops sending it once the node answered one) —; every
//! request re-checks expiry and revocation, and whether the token's scope allows it. Refusals are
//! [`ApiError::PermissionDenied`]. Keys under the reserved prefix are refused to clients. A
//! write's session id is bound to its token ([`auth::bind_session`]) before it is routed.
//!
//! Bad input (random bytes, a truncated or oversized frame, an unknown request variant, an old
//! protocol version) gets a typed [`ApiError`] on that stream, or that stream closed; the
//! connection and every other connection keep working.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use iroh::{
    endpoint::{Connection, RecvStream, SendStream},
    protocol::{AcceptError, ProtocolHandler},
};
use tokio_util::task::TaskTracker;

use crate::{
    api::{
        frame::{
            decode, drain_to_end, encode_frame, read_frame_len, read_single_payload, FrameError, REQUEST_END_WAIT,
        },
        ApiError, ClientEnvelope, ClientRequest, ClientResult, WatchRequest, CLIENT_PROTOCOL_VERSION,
    },
    auth::{self, Authority, Verified},
    metrics::{GaugeGuard, Histogram, NodeMetrics},
};

/// What answers client requests (implemented by the cluster layer).
pub trait ClientService: Send + Sync + std::fmt::Debug + 'static {
    /// Answers one request. `hops` counts how often it was forwarded already.
    fn handle(&self, request: ClientRequest, hops: u8) -> impl Future<Output = ClientResult> + Send;

    /// Starts a watch: the frames to stream back, until the receiver ends (or yields an error,
    /// which ends the stream). Once `finish` is cancelled (the node is stopping) the watch
    /// reports where it stands in every shard and its frames end.
    fn watch(
        &self,
        request: WatchRequest,
        finish: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = Result<tokio::sync::mpsc::Receiver<ClientResult>, ApiError>> + Send;
}

/// How long a stopping node's watch streams take to pass on where they stand before they end.
const WATCH_FINISH: Duration = Duration::from_secs(2);

/// QUIC error code used when this node resets a stream whose frame it will not read.
const STREAM_REFUSED: u32 = 1;

/// Request bytes one node holds at once over all its client and peer connections, unless
/// configured (`[limits] request_memory_mib`).
pub const NODE_REQUEST_MEMORY: usize = 256 * 1024 * 1024;
/// A connection holds at most this share of the node's request memory.
pub const CONNECTION_SHARE: usize = 8;

/// A budget of request bytes, counted in KiB (at least one frame of the largest size fits).
#[derive(Clone, Debug)]
pub struct RequestMemory {
    kib: Arc<Semaphore>,
    total_kib: usize,
    max_frame: usize,
}

impl RequestMemory {
    /// A budget of `bytes`, raised to hold at least one frame of `max_frame` bytes.
    pub fn new(bytes: usize, max_frame: usize) -> Self {
        let total_kib = bytes.max(max_frame + 1024) / 1024;
        RequestMemory { kib: Arc::new(Semaphore::new(total_kib)), total_kib, max_frame }
    }

    /// A connection's budget: its share of this (node's) budget.
    fn for_connection(&self) -> Self {
        RequestMemory::new(self.total_kib * 1024 / CONNECTION_SHARE, self.max_frame)
    }

    /// Reserves room for a frame of `size` bytes, if there is room now.
    fn reserve(&self, size: usize) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(size / 1024 + 1).ok()?;
        self.kib.clone().try_acquire_many_owned(kib).ok()
    }

    fn total_mib(&self) -> usize {
        self.total_kib / 1024
    }
}

/// Which ALPN a [`ClientProtocolHandler`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `aspen-client`: anyone; node-to-node requests are refused.
    Client,
    /// `aspen-peer/1`: members only (the endpoint's gate); every request is answered.
    Peer,
}

impl Origin {
    /// The `alpn` label of this origin's metrics.
    fn alpn_label(self) -> &'static str {
        match self {
            Origin::Client => "client",
            Origin::Peer => "peer",
        }
    }
}

/// Serves the client ALPN (or the peer ALPN, see [`Origin`]).
#[derive(Debug)]
pub struct ClientProtocolHandler<S> {
    service: Arc<S>,
    max_frame: usize,
    tracker: TaskTracker,
    drain_timeout: Duration,
    /// A request frame must arrive, and its answer be taken, within this long (the request
    /// timeout): a peer that opens a stream and never sends, or never reads, does not hold the
    /// stream and its task for longer.
    stream_deadline: Duration,
    origin: Origin,
    /// The node's request memory (shared with the node's other handler).
    memory: RequestMemory,
    /// Checks client tokens (`None`: every request is answered, as on the peer ALPN).
    authority: Option<Arc<Authority>>,
    /// Cancelled at shutdown: open watches end at once (their clients resume elsewhere) instead
    /// of holding the drain until their connections time out.
    stopping: tokio_util::sync::CancellationToken,
    /// Where requests, connections, streams and token refusals are counted (the node's).
    metrics: Arc<NodeMetrics>,
}

impl<S: ClientService> ClientProtocolHandler<S> {
    pub fn new(service: Arc<S>, max_frame: usize, drain_timeout: Duration) -> Self {
        Self::with_origin(service, max_frame, drain_timeout, Origin::Client)
    }

    /// A handler for `origin`'s ALPN.
    pub fn with_origin(service: Arc<S>, max_frame: usize, drain_timeout: Duration, origin: Origin) -> Self {
        ClientProtocolHandler {
            service,
            max_frame,
            tracker: TaskTracker::new(),
            drain_timeout,
            stream_deadline: drain_timeout,
            origin,
            memory: RequestMemory::new(NODE_REQUEST_MEMORY, max_frame),
            authority: None,
            stopping: Default::default(),
            metrics: Arc::new(NodeMetrics::new(Arc::new(Histogram::durations()))),
        }
    }

    /// Requires tokens, verified by `authority`, once the node belongs to a cluster.
    pub fn with_authority(mut self, authority: Arc<Authority>) -> Self {
        self.authority = Some(authority);
        self
    }

    /// Counts into `metrics` (the node's, which `GET /metrics` reports).
    pub fn with_metrics(mut self, metrics: Arc<NodeMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Draws request memory from `memory` (one budget for every handler of a node).
    pub fn with_memory(mut self, memory: RequestMemory) -> Self {
        self.memory = memory;
        self
    }
}

impl<S: ClientService> ProtocolHandler for ClientProtocolHandler<S> {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let remote = conn.remote_id().fmt_short().to_string();
        let conn_memory = self.memory.for_connection();
        let alpn = self.origin.alpn_label();
        let _open = self.metrics.connection(alpn);
        let conn_auth = self.authority.clone().map(|authority| {
            Arc::new(ConnectionAuth { authority, cached: Default::default(), metrics: self.metrics.clone() })
        });
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%remote, "client connection ended: {e}");
                    return Ok(());
                }
            };
            if self.tracker.is_closed() {
                // Shutting down: refuse new requests, let in-flight ones finish.
                let (mut send, mut recv) = (send, recv);
                let _ = recv.stop(STREAM_REFUSED.into());
                let _ = reply(&mut send, &Err(ApiError::Unavailable("node is shutting down".into()))).await;
                continue;
            }
            let stream = Stream {
                max_frame: self.max_frame,
                origin: self.origin,
                deadline: self.stream_deadline,
                memory: [conn_memory.clone(), self.memory.clone()],
                auth: conn_auth.clone(),
                stopping: self.stopping.clone(),
                metrics: self.metrics.clone(),
                _open: self.metrics.stream(alpn),
            };
            self.tracker.spawn(serve_stream(self.service.clone(), send, recv, stream));
        }
    }

    async fn shutdown(&self) {
        self.tracker.close();
        self.stopping.cancel();
        if tokio::time::timeout(self.drain_timeout, self.tracker.wait()).await.is_err() {
            tracing::warn!(
                open = self.tracker.len(),
                "{:?} requests still running after {:?}; stopping anyway",
                self.origin,
                self.drain_timeout
            );
        }
    }
}

/// Streams a watch's frames until it ends or the client closes its side (the watch's tasks
/// see the receiver go and stop). `deadline` bounds sending a refusal only. `token`: the token
/// the watch was started with, checked again every [`auth::STREAM_RECHECK`] (expiry,
/// revocation, a new cluster key): once it fails the watch ends with `PermissionDenied`.
async fn serve_watch<S: ClientService>(
    service: &S,
    mut send: SendStream,
    mut recv: RecvStream,
    request: WatchRequest,
    deadline: Duration,
    stopping: tokio_util::sync::CancellationToken,
    token: Option<(Arc<Authority>, Arc<Verified>)>,
) {
    let mut frames = match service.watch(request, stopping.clone()).await {
        Ok(rx) => rx,
        Err(e) => {
            let _ = tokio::time::timeout(deadline, reply(&mut send, &Err(e))).await;
            return;
        }
    };
    let mut recheck = tokio::time::interval(auth::STREAM_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => frame,
            _ = recheck.tick(), if token.is_some() => {
                let Some((authority, verified)) = &token else { continue };
                match authority.recheck(verified) {
                    // Not ready: the node is catching up; the token may be fine.
                    Ok(()) => continue,
                    Err(e) if e.reason().is_none() => continue,
                    Err(e) => {
                        let ended = ApiError::PermissionDenied(format!("{e}: the watch ended"));
                        let _ = tokio::time::timeout(deadline, reply(&mut send, &Err(ended))).await;
                        return;
                    }
                }
            }
            // The client closed or reset its side: it is gone.
            _ = drain_to_end(&mut recv, Duration::MAX) => return,
            // The node is stopping: pass on where the watch stands in each shard (its shard
            // tasks report it and end), say so, and end: the client resumes on another member.
            _ = stopping.cancelled() => {
                let last_positions = async {
                    while let Some(Ok(frame)) = frames.recv().await {
                        let Ok(bytes) = encode_frame(&ClientResult::Ok(frame)) else { return };
                        if send.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout(WATCH_FINISH, last_positions).await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    reply(&mut send, &Err(ApiError::Unavailable("the node is shutting down".into()))),
                )
                .await;
                // Until the client has it all: it ends its side of the stream once it has read
                // the last frame. The endpoint closes next, and a closed connection discards
                // what its peer has not read yet, acknowledged or not.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = send.stopped().await;
                    drain_to_end(&mut recv, Duration::MAX).await;
                })
                .await;
                return;
            }
        };
        let Some(frame) = frame else {
            let _ = send.finish();
            return;
        };
        let last = frame.is_err();
        let bytes = match encode_frame(&frame) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("a watch frame could not be encoded: {e}");
                let _ = send.reset(STREAM_REFUSED.into());
                return;
            }
        };
        // No deadline: a watcher that reads slowly holds only this frame and a few queued ones
        // (its shard tasks stop reading and cancel it); a dead one goes with its connection.
        if send.write_all(&bytes).await.is_err() {
            return;
        }
        if last {
            let _ = send.finish();
            return;
        }
    }
}

async fn reply(send: &mut SendStream, result: &ClientResult) -> Result<(), FrameError> {
    let bytes = encode_frame(result)?;
    send.write_all(&bytes).await.map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    send.finish().map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    Ok(())
}

/// How one stream is served.
struct Stream {
    max_frame: usize,
    origin: Origin,
    deadline: Duration,
    /// The connection's budget, then the node's.
    memory: [RequestMemory; 2],
    auth: Option<Arc<ConnectionAuth>>,
    stopping: tokio_util::sync::CancellationToken,
    metrics: Arc<NodeMetrics>,
    /// Counts the stream as open until it ends.
    _open: GaugeGuard,
}

/// A connection's token check: the last token that verified on it, kept so that a client
/// sending the same token on every request pays for one signature check per connection.
#[derive(Debug)]
struct ConnectionAuth {
    authority: Arc<Authority>,
    cached: std::sync::Mutex<Option<(Arc<str>, Arc<Verified>)>>,
    metrics: Arc<NodeMetrics>,
}

impl ConnectionAuth {
    /// The scope `token` gives, if the request needs one; `Ok(None)`: nothing to check.
    fn check(&self, token: Option<&str>, request: &ClientRequest) -> Result<Option<Arc<Verified>>, ApiError> {
        let refused = |reason: &str, e: ApiError| {
            if matches!(e, ApiError::PermissionDenied(_)) {
                self.metrics.auth_refused(reason);
            }
            e
        };
        auth::check_not_reserved(request).map_err(|e| refused("reserved_key", e))?;
        if !self.authority.enforcing() || !auth::needs_token(request) {
            return Ok(None);
        }
        let denied = |e: auth::TokenError| match e.reason() {
            // Retryable: the node is catching up, the token may be fine.
            None => ApiError::Unavailable(e.to_string()),
            Some(reason) => refused(reason, ApiError::PermissionDenied(e.to_string())),
        };
        let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let verified = match (token, cached) {
            // The token this connection presented before (a client sends it until the node has
            // answered a request that carried it).
            (None, Some((_, v))) => {
                self.authority.recheck(&v).map_err(denied)?;
                v
            }
            (None, None) => {
                return Err(refused(
                    "no_token",
                    ApiError::PermissionDenied(format!(
                        "a {} needs a token (aspen-cli: --token, ASPEN_TOKEN, --token-file, or a data dir's \
                         admin.token)",
                        request.kind()
                    )),
                ))
            }
            (Some(t), Some((c, v))) if *c == *t => {
                self.authority.recheck(&v).map_err(denied)?;
                v
            }
            (Some(t), _) => {
                let v = Arc::new(self.authority.verify(t).map_err(denied)?);
                *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((Arc::from(t), v.clone()));
                v
            }
        };
        let Some(scope) = verified.scope() else {
            // A joining node sends its join token: it may look up the members (and join).
            if matches!(request, ClientRequest::Members) {
                return Ok(None);
            }
            return Err(refused(
                "join_token",
                ApiError::PermissionDenied("a join token is for aspen-node --join-token, not for requests".into()),
            ));
        };
        auth::authorize(scope, request).map_err(|e| refused("scope", e))?;
        Ok(Some(verified))
    }
}

/// Reads the request: its length, then — once its bytes are reserved — its bytes. `Ok(Err(..))`:
/// refused before its bytes were read (the reservation failed).
async fn read_request(
    recv: &mut RecvStream,
    stream: &Stream,
) -> Result<Result<(Vec<u8>, Vec<OwnedSemaphorePermit>), ApiError>, FrameError> {
    let size = read_frame_len(recv, stream.max_frame).await?;
    let mut permits = Vec::with_capacity(2);
    for (budget, whose) in stream.memory.iter().zip(["this connection", "this node"]) {
        match budget.reserve(size) {
            Some(p) => permits.push(p),
            None => {
                return Ok(Err(ApiError::Unavailable(format!(
                    "the request memory of {whose} ({} MiB) is taken by other requests; retry",
                    budget.total_mib()
                ))))
            }
        }
    }
    Ok(Ok((read_single_payload(recv, size).await?, permits)))
}

async fn serve_stream<S: ClientService>(service: Arc<S>, mut send: SendStream, mut recv: RecvStream, stream: Stream) {
    let (origin, deadline, conn_auth) = (stream.origin, stream.deadline, stream.auth.clone());
    let stopping = stream.stopping.clone();
    let Ok(read) = tokio::time::timeout(deadline, read_request(&mut recv, &stream)).await else {
        tracing::debug!("a request frame did not arrive within {deadline:?}: stream reset");
        let _ = recv.stop(STREAM_REFUSED.into());
        let _ = send.reset(STREAM_REFUSED.into());
        return;
    };
    // Held until the answer is sent.
    let mut _permits = Vec::new();
    let read = match read {
        Ok(Ok((bytes, permits))) => {
            _permits = permits;
            Ok(bytes)
        }
        Ok(Err(refusal)) => {
            let _ = recv.stop(STREAM_REFUSED.into());
            let _ = tokio::time::timeout(deadline, reply(&mut send, &Err(refusal))).await;
            return;
        }
        Err(e) => Err(e),
    };
    let started = std::time::Instant::now();
    // The request's kind, once known (a watch and an undecodable frame are not counted).
    let mut op: Option<&'static str> = None;
    let result: ClientResult = match read {
        Ok(bytes) => match decode::<ClientEnvelope>(&bytes) {
            Ok(env) if env.version != CLIENT_PROTOCOL_VERSION => {
                Err(ApiError::UnsupportedVersion { got: env.version, supported: CLIENT_PROTOCOL_VERSION })
            }
            Ok(env) if origin == Origin::Client && env.request.is_node_to_node() => {
                op = Some(env.request.metric_op());
                Err(ApiError::Refused(format!(
                    "a {} is sent between the members of a cluster only, not by clients",
                    env.request.kind()
                )))
            }
            Ok(ClientEnvelope { request: ClientRequest::Watch(watch), token, .. }) => {
                let checked = conn_auth
                    .as_ref()
                    .map(|a| a.check(token.as_deref(), &ClientRequest::Watch(watch.clone())))
                    .transpose();
                match checked {
                    Err(e) => Err(e),
                    Ok(verified) => {
                        // Long-lived: its request bytes are not held while it runs, and its
                        // token is checked again while it does.
                        drop(_permits);
                        let token = conn_auth.as_ref().zip(verified.flatten()).map(|(a, v)| (a.authority.clone(), v));
                        serve_watch(&*service, send, recv, watch, deadline, stopping, token).await;
                        return;
                    }
                }
            }
            Ok(env) => {
                op = Some(env.request.metric_op());
                stream.metrics.forwarded(env.hops);
                let checked = conn_auth.as_ref().map(|a| a.check(env.token.as_deref(), &env.request));
                match checked {
                    Some(Err(e)) => Err(e),
                    Some(Ok(Some(verified))) => {
                        let cas_key = auth::cas_key(&env.request).map(<[u8]>::to_vec);
                        let mut request = env.request;
                        auth::bind_session(verified.body.id, &mut request);
                        let mut answer = service.handle(request, env.hops).await;
                        if let (Some(key), Ok(response), Some(scope)) = (cas_key, answer.as_mut(), verified.scope()) {
                            auth::redact_cas(scope, &key, response);
                        }
                        answer
                    }
                    Some(Ok(None)) | None => service.handle(env.request, env.hops).await,
                }
            }
            Err(e) => match postcard::take_from_bytes::<u16>(&bytes) {
                // An older (or newer) client's envelope: say so rather than "malformed".
                Ok((version, _)) if version != CLIENT_PROTOCOL_VERSION => {
                    Err(ApiError::UnsupportedVersion { got: version, supported: CLIENT_PROTOCOL_VERSION })
                }
                _ => {
                    tracing::debug!("malformed client request: {e}");
                    Err(ApiError::InvalidRequest(format!("malformed request frame: {e}")))
                }
            },
        },
        Err(FrameError::TooLarge { size, limit }) => {
            let _ = recv.stop(STREAM_REFUSED.into());
            Err(ApiError::TooLarge { what: "request frame".into(), size: size as u64, limit: limit as u64 })
        }
        Err(FrameError::Truncated) => Err(ApiError::InvalidRequest("truncated request frame".into())),
        Err(e) => {
            tracing::debug!("client stream failed: {e}");
            return;
        }
    };
    if let Some(op) = op {
        stream.metrics.op(origin.alpn_label(), op).record(started, result.as_ref().map(|_| ()).map_err(ApiError::kind));
    }
    match tokio::time::timeout(deadline, reply(&mut send, &result)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!("could not send client response: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("the answer was not taken within {deadline:?}: stream reset");
            let _ = send.reset(STREAM_REFUSED.into());
            return;
        }
    }
    drain_to_end(&mut recv, REQUEST_END_WAIT).await;
}
