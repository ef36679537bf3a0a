//! Raft RPCs of every shard to one peer on ONE long-lived QUIC stream (ALPN `raft-mux`).
//!
//! Why: with a stream per RPC, every AppendEntries and its answer also cost the stream's
//! opening and closing and the stream credit (MAX_STREAMS) the receiver hands back afterwards,
//! and two shards' RPCs that leave at the same moment still travel as separate streams. On the
//! mux, every shard's requests to one peer are written into one stream, writers taking turns
//! and writing straight into its buffer (no hand-off to a writer task, which would add a task
//! wake-up to every RPC); what several writers buffer while the connection builds its next
//! packet leaves in that packet. Answers come back the same way.
//!
//! Wire format, both directions a sequence of messages on one bi-stream:
//! - request: `id (u64 BE) | shard (u32 BE) | frame(RaftEnvelope)`
//! - answer: `id (u64 BE) | frame(RaftResponse)`
//!
//! where `frame` is [`crate::api::frame`]'s length-prefixed postcard. Ids are chosen by the
//! sender and echoed; answers may come back in any order. A request whose envelope does not
//! decode is answered [`RaftRefusal::Malformed`] under its id and the stream goes on; a message
//! that cannot be delimited (truncated, or longer than the frame limit) ends the stream, and
//! the sender's calls in flight on it fail (openraft retries them).
//!
//! Owns: the sender's links (one per peer endpoint, re-opened when their connection or stream
//! fails), id allocation and the matching of answers to callers, and the receiver's loop that
//! hands each request to the shard it names (bounded: at most [`MAX_IN_FLIGHT`] requests of one
//! stream are being answered at once, the sender waits beyond that; at most
//! [`MAX_IN_FLIGHT_PER_SHARD`] of them for one shard, and no shard's answer awaited longer
//! than [`ANSWER_DEADLINE`], so one stalled shard refuses its own requests instead of holding
//! up every other shard's). Never: decide what a request means (`raft::server` answers it) or
//! retry (openraft does).
//!
//! Large requests (snapshot chunks, catch-up AppendEntries above [`MUX_MAX_REQUEST`]) go on a
//! stream of their own instead, so they cannot hold up other shards' heartbeats behind them.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use iroh::{
    endpoint::{Connection, RecvStream, SendStream, VarInt},
    EndpointAddr, EndpointId,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::{oneshot, Semaphore},
};

use super::{pool::ConnectionPool, TransportError};
use crate::api::{
    frame::{decode, encode_frame, read_one_of_many, split_frame},
    raft_rpc::{RaftRefusal, RaftResponse},
    FrameError, ShardId, MAX_FRAME_BYTES, RAFT_MUX_ALPN,
};

/// Requests of one mux stream being answered at once on the receiving node.
pub const MAX_IN_FLIGHT: usize = 256;
/// Requests of one shard on one mux stream being answered at once; beyond that the shard's
/// requests are refused [`RaftRefusal::Busy`] at once (normally a shard has a handful in flight).
pub const MAX_IN_FLIGHT_PER_SHARD: usize = 32;
/// How long the receiver waits for a shard to answer one request before it answers
/// [`RaftRefusal::Busy`] itself and frees the request's place: longer than any sender's RPC
/// timeout with sane Raft timing (AppendEntries wait a heartbeat interval, votes an election
/// timeout, and `install_snapshot_timeout` is not on the mux), so nobody waits for the answer
/// by then. (An election timeout above 30 s would see its votes refused.)
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(30);
/// Requests whose encoded envelope is larger than this travel on a stream of their own.
pub const MUX_MAX_REQUEST: usize = 256 * 1024;
/// After a peer refused the mux (an older version), how long to use a stream per RPC before
/// trying the mux again.
const NO_MUX_RETRY: Duration = Duration::from_secs(60);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<RaftResponse>>>>;

/// One open mux stream to a peer.
struct Link {
    conn: Connection,
    send: Writer,
    pending: Pending,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
}

impl Link {
    fn alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire) && self.conn.close_reason().is_none()
    }
}

/// Marks a link dead and fails every call waiting on it (their answer channels close).
fn fail_link(dead: &AtomicBool, pending: &Pending) {
    dead.store(true, Ordering::Release);
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// Removes a call's entry when the call ends early (timeout, cancellation).
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

type LinkSlot = Arc<tokio::sync::Mutex<Option<Arc<Link>>>>;

/// The sending side: one link per peer endpoint, shared by every shard of this node.
#[derive(Clone, Default)]
pub struct MuxClient {
    links: Arc<Mutex<HashMap<EndpointId, LinkSlot>>>,
    /// Peers that refused the mux ALPN, and when to try it again.
    refused: Arc<Mutex<HashMap<EndpointId, Instant>>>,
}

impl std::fmt::Debug for MuxClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.links.lock().unwrap_or_else(|p| p.into_inner()).len();
        f.debug_struct("MuxClient").field("links", &n).finish()
    }
}

impl MuxClient {
    /// Whether `peer` is known to refuse the mux (then the caller uses a stream per RPC).
    pub fn refuses(&self, peer: &EndpointId) -> bool {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match refused.get(peer) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                refused.remove(peer);
                false
            }
            None => false,
        }
    }

    /// Sends `envelope` (an encoded frame) for `shard` to `addr` and waits for the answer.
    /// `Err(TransportError::AlpnRefused)` also marks the peer as refusing.
    pub async fn call(
        &self,
        pool: &ConnectionPool,
        addr: &EndpointAddr,
        shard: ShardId,
        envelope: &[u8],
    ) -> Result<RaftResponse, TransportError> {
        let link = self.link(pool, addr).await?;
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        link.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, reply);
        let _guard = PendingGuard { pending: &link.pending, id };
        if !link.alive() {
            // Closed between `link` and the insert: `fail_link` may have run before it.
            return Err(self.broken(pool, addr, &link));
        }
        let msg = encode_request(id, shard, envelope);
        if !write_message(&link.send, &msg, &link.dead, &link.pending).await {
            return Err(self.broken(pool, addr, &link));
        }
        match answer.await {
            Ok(resp) => Ok(resp),
            Err(_) => Err(self.broken(pool, addr, &link)),
        }
    }

    /// The error for a call on a link that failed; forgets the link (and the connection, if it
    /// closed) so the next call opens a new one.
    fn broken(&self, pool: &ConnectionPool, addr: &EndpointAddr, link: &Link) -> TransportError {
        if let Some(reason) = link.conn.close_reason() {
            pool.invalidate(addr.id, RAFT_MUX_ALPN);
            return TransportError::LinkFailed {
                peer: addr.id.fmt_short().to_string(),
                reason: format!("closed: {reason}"),
            };
        }
        TransportError::LinkFailed { peer: addr.id.fmt_short().to_string(), reason: "failed".into() }
    }

    async fn link(&self, pool: &ConnectionPool, addr: &EndpointAddr) -> Result<Arc<Link>, TransportError> {
        let slot = {
            let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            links.entry(addr.id).or_default().clone()
        };
        let mut guard = slot.lock().await;
        if let Some(link) = guard.as_ref() {
            if link.alive() {
                return Ok(link.clone());
            }
        }
        *guard = None;
        let conn = match pool.get(addr, RAFT_MUX_ALPN).await {
            Ok(conn) => conn,
            Err(e @ TransportError::AlpnRefused { .. }) => {
                self.refused.lock().unwrap_or_else(|p| p.into_inner()).insert(addr.id, Instant::now() + NO_MUX_RETRY);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let (send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                pool.invalidate(addr.id, RAFT_MUX_ALPN);
                return Err(TransportError::Open(e));
            }
        };
        let link = Arc::new(Link {
            conn,
            send: Arc::new(tokio::sync::Mutex::new(send)),
            pending: Default::default(),
            next_id: AtomicU64::new(0),
            dead: Default::default(),
        });
        tokio::spawn(read_answers(recv, link.dead.clone(), link.pending.clone()));
        *guard = Some(link.clone());
        Ok(link)
    }
}

/// The sending half of a mux stream, shared by everyone writing on it. Writers take turns and
/// write straight into the stream's buffer (no hand-off to another task); messages written
/// while the connection's packets are being built leave together.
type Writer = Arc<tokio::sync::Mutex<SendStream>>;

/// Writes one whole message; `false` (and the link failed) when the stream is broken.
///
/// Cancel-safe for the stream: a caller dropped half-way through a message (openraft gives up
/// on an RPC after its timeout) would leave a partial message that every later one is read as
/// the continuation of. So if the write does not complete, the stream is reset and the link
/// failed; the next call opens a new stream.
async fn write_message(send: &Writer, msg: &[u8], dead: &AtomicBool, pending: &Pending) -> bool {
    let mut stream = send.lock().await;
    let mut guard = UnfinishedWrite { stream: &mut stream, dead, pending, done: false };
    let ok = guard.stream.write_all(msg).await.is_ok();
    guard.done = true;
    if !ok {
        fail_link(dead, pending);
    }
    ok
}

/// Resets the stream and fails the link if dropped before `done` (see [`write_message`]).
struct UnfinishedWrite<'a> {
    stream: &'a mut SendStream,
    dead: &'a AtomicBool,
    pending: &'a Pending,
    done: bool,
}

impl Drop for UnfinishedWrite<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.stream.reset(VarInt::from_u32(RESET_PARTIAL_WRITE));
            fail_link(self.dead, self.pending);
        }
    }
}

/// Error code of a mux stream reset because a message was only partly written.
const RESET_PARTIAL_WRITE: u32 = 1;

/// Reads `id | frame` messages until the stream ends, handing each to the call waiting for it.
async fn read_answers(mut recv: RecvStream, dead: Arc<AtomicBool>, pending: Pending) {
    loop {
        let mut id = [0u8; 8];
        if recv.read_exact(&mut id).await.is_err() {
            break;
        }
        let id = u64::from_be_bytes(id);
        let response = match read_one_of_many(&mut recv, MAX_FRAME_BYTES).await {
            Ok(bytes) => decode::<RaftResponse>(&bytes)
                .unwrap_or_else(|e| RaftResponse::Refused(RaftRefusal::Malformed(format!("undecodable answer: {e}")))),
            Err(e) => {
                tracing::debug!("raft link: cannot read an answer: {e}");
                break;
            }
        };
        let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(response);
        }
    }
    fail_link(&dead, &pending);
}

/// One request read from a mux stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A request to answer: its id, shard and envelope bytes (one frame's payload).
    Request { id: u64, shard: ShardId, envelope: Vec<u8> },
    /// The stream ended cleanly between messages.
    End,
    /// The stream was reset or its connection closed (the sender stopped or went away, or this
    /// node is stopping): nothing malformed was read, but the stream cannot go on.
    Closed(String),
}

/// Why a mux stream cannot go on: the id of the message that broke it (when its id arrived
/// whole) and what was wrong.
pub type MuxReadError = (Option<u64>, String);

const TRUNCATED_ID: &str = "stream ended inside a request id";
const TRUNCATED_SHARD: &str = "stream ended inside a shard id";

/// Reads the next request of a mux stream. `Err` means the stream cannot go on because of what
/// it carried (truncated message, oversized frame); [`Incoming::Closed`], because it was reset
/// or its connection closed.
pub async fn read_request<R: AsyncRead + Unpin>(recv: &mut R, limit: usize) -> Result<Incoming, MuxReadError> {
    let truncated = |e: &std::io::Error| e.kind() == std::io::ErrorKind::UnexpectedEof;
    let mut id = [0u8; 8];
    match read_exact_or_end(recv, &mut id).await {
        Ok(true) => {}
        Ok(false) => return Ok(Incoming::End),
        Err(e) if truncated(&e) => return Err((None, TRUNCATED_ID.into())),
        Err(e) => return Ok(Incoming::Closed(e.to_string())),
    }
    let id = u64::from_be_bytes(id);
    let mut shard = [0u8; 4];
    match recv.read_exact(&mut shard).await {
        Ok(_) => {}
        Err(e) if truncated(&e) => return Err((Some(id), TRUNCATED_SHARD.to_string())),
        Err(e) => return Ok(Incoming::Closed(e.to_string())),
    }
    let envelope = match read_one_of_many(recv, limit).await {
        Ok(envelope) => envelope,
        Err(FrameError::Io(e)) => return Ok(Incoming::Closed(e.to_string())),
        Err(e) => return Err((Some(id), e.to_string())),
    };
    Ok(Incoming::Request { id, shard: u32::from_be_bytes(shard), envelope })
}

/// A request split off the front of a buffer: id, shard, envelope, and the bytes after it.
pub type SplitRequest<'a> = (u64, ShardId, &'a [u8], &'a [u8]);

/// The in-memory twin of [`read_request`] (same answers, same errors for the same bytes):
/// `Ok(None)` at the end, else the request and the bytes after it.
pub fn split_request(buf: &[u8], limit: usize) -> Result<Option<SplitRequest<'_>>, MuxReadError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let (id, rest) = buf.split_first_chunk::<8>().ok_or_else(|| (None, TRUNCATED_ID.to_string()))?;
    let id = u64::from_be_bytes(*id);
    let (shard, rest) = rest.split_first_chunk::<4>().ok_or_else(|| (Some(id), TRUNCATED_SHARD.to_string()))?;
    let (envelope, rest) = split_frame(rest, limit).map_err(|e| (Some(id), e.to_string()))?;
    Ok(Some((id, u32::from_be_bytes(*shard), envelope, rest)))
}

/// Fills `buf`; `Ok(false)` when the stream ended before its first byte.
async fn read_exact_or_end<R: AsyncRead + Unpin>(recv: &mut R, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = recv.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(true)
}

/// Encodes request `id` for `shard`; `envelope` is an encoded frame (of a `RaftEnvelope`).
pub fn encode_request(id: u64, shard: ShardId, envelope: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + envelope.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&shard.to_be_bytes());
    out.extend_from_slice(envelope);
    out
}

/// Encodes the answer to request `id`.
pub fn encode_answer(id: u64, response: &RaftResponse) -> Result<Vec<u8>, crate::api::FrameError> {
    let frame = encode_frame(response)?;
    let mut out = Vec::with_capacity(8 + frame.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&frame);
    Ok(out)
}

/// How much of a receiver one mux stream may hold.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Requests being answered at once (the stream is not read beyond that).
    pub in_flight: usize,
    /// Requests of one shard being answered at once (more are refused at once).
    pub per_shard: usize,
    /// Longest wait for one answer before the request is refused.
    pub answer_deadline: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self { in_flight: MAX_IN_FLIGHT, per_shard: MAX_IN_FLIGHT_PER_SHARD, answer_deadline: ANSWER_DEADLINE }
    }
}

/// Shards with requests in progress on one stream, and how many places each has left.
struct ShardPlaces {
    per_shard: usize,
    /// Above this many shards, the idle ones are forgotten (more than the stream's places, so
    /// there always are idle ones then).
    forget_above: usize,
    places: HashMap<ShardId, Arc<Semaphore>>,
}

impl ShardPlaces {
    /// A place for one more request of `shard`, or `None` when it has `per_shard` in progress.
    fn take(&mut self, shard: ShardId) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if self.places.len() >= self.forget_above {
            // Forget the shards with nothing in progress (a hostile sender naming many shards
            // must not grow this map without bound).
            let all = self.per_shard;
            self.places.retain(|_, s| s.available_permits() < all);
        }
        let per_shard = self.per_shard;
        self.places.entry(shard).or_insert_with(|| Arc::new(Semaphore::new(per_shard))).clone().try_acquire_owned().ok()
    }
}

/// Serves one mux stream with the default [`ServeLimits`]; see [`serve_stream_with`].
pub async fn serve_stream<F, Fut>(send: SendStream, recv: RecvStream, answer: F)
where
    F: Fn(ShardId, Vec<u8>) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = RaftResponse> + Send + 'static,
{
    serve_stream_with(send, recv, answer, ServeLimits::default()).await
}

/// Serves one mux stream: reads requests, answers each through `answer` (each on its own task,
/// which writes its answer itself, within `limits`), and finishes the stream once the sender
/// finished its side and every answer is written.
pub async fn serve_stream_with<F, Fut>(send: SendStream, mut recv: RecvStream, answer: F, limits: ServeLimits)
where
    F: Fn(ShardId, Vec<u8>) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = RaftResponse> + Send + 'static,
{
    let send: Writer = Arc::new(tokio::sync::Mutex::new(send));
    let dead = Arc::new(AtomicBool::new(false));
    let nobody: Pending = Default::default();
    let in_flight = limits.in_flight.max(1);
    let limit = Arc::new(Semaphore::new(in_flight));
    let per_shard = limits.per_shard.max(1);
    let mut shards = ShardPlaces { per_shard, forget_above: (2 * in_flight).max(1024), places: HashMap::new() };
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { break };
        match read_request(&mut recv, MAX_FRAME_BYTES).await {
            Ok(Incoming::End) => break,
            Ok(Incoming::Closed(why)) => {
                // The sender stopped or went away, or this node is stopping: not worth a warning
                // (a peer that stopped answering is reported by the sender's reachability).
                tracing::debug!("raft mux stream closed: {why}");
                break;
            }
            Ok(Incoming::Request { id, shard, envelope }) => {
                let (send, dead, nobody, answer) = (send.clone(), dead.clone(), nobody.clone(), answer.clone());
                let place = shards.take(shard);
                let deadline = limits.answer_deadline;
                tokio::spawn(async move {
                    let response = match place {
                        None => RaftResponse::Refused(RaftRefusal::Busy {
                            shard,
                            why: format!("{per_shard} requests of this sender in progress"),
                        }),
                        Some(_place) => match tokio::time::timeout(deadline, answer(shard, envelope)).await {
                            Ok(response) => response,
                            Err(_) => RaftResponse::Refused(RaftRefusal::Busy {
                                shard,
                                why: format!("no answer within {deadline:?}"),
                            }),
                        },
                    };
                    match &response {
                        RaftResponse::Refused(r @ RaftRefusal::Busy { .. }) => {
                            tracing::debug!("refused raft request: {r}")
                        }
                        RaftResponse::Refused(r) => tracing::warn!("refused raft request: {r}"),
                        _ => {}
                    }
                    match encode_answer(id, &response) {
                        Ok(bytes) => {
                            write_message(&send, &bytes, &dead, &nobody).await;
                        }
                        Err(e) => tracing::error!("cannot encode raft response: {e}"),
                    }
                    drop(permit);
                });
            }
            Err((id, why)) => {
                tracing::warn!("raft mux stream ends: {why}");
                if let Some(id) = id {
                    let refusal = RaftResponse::Refused(RaftRefusal::Malformed(why));
                    if let Ok(bytes) = encode_answer(id, &refusal) {
                        write_message(&send, &bytes, &dead, &nobody).await;
                    }
                }
                break;
            }
        }
        if dead.load(Ordering::Acquire) {
            break;
        }
    }
    // Every answer in progress is written before the stream is finished.
    let _all = limit.acquire_many(in_flight as u32).await;
    let _ = send.lock().await.finish();
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use iroh::address_lookup::MemoryLookup;

    use super::*;
    use crate::transport::endpoint::{bind_endpoint, listening_addrs};

    /// A peer serving the mux ALPN on loopback, its address, and an endpoint to dial it from.
    async fn two_endpoints() -> (iroh::Endpoint, EndpointAddr, iroh::Endpoint) {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let peer = bind_endpoint(loopback, None, MemoryLookup::new()).await.unwrap();
        peer.set_alpns(vec![RAFT_MUX_ALPN.to_vec()]);
        let addr = EndpointAddr::from_parts(
            peer.id(),
            listening_addrs(&peer, loopback).into_iter().map(iroh::TransportAddr::Ip),
        );
        let me = bind_endpoint(loopback, None, MemoryLookup::new()).await.unwrap();
        (peer, addr, me)
    }

    /// A message whose write is abandoned half-way (the caller timed out while the peer's flow
    /// control held it) must not leave a partial message on the shared stream: the stream is
    /// reset, the link is failed, and the peer's reader sees the reset rather than garbage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_cut_short_resets_the_stream_and_fails_the_link() {
        let (peer, addr, me) = two_endpoints().await;

        let server = tokio::spawn({
            let peer = peer.clone();
            async move {
                let conn = peer.accept().await.expect("incoming").await.expect("connection");
                let (_send, mut recv) = conn.accept_bi().await.expect("stream");
                // Read a little, then stop until the writer gave up, then read on.
                let mut first = [0u8; 16];
                recv.read_exact(&mut first).await.expect("the first bytes arrive");
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut rest = Vec::new();
                let end =
                    tokio::time::timeout(Duration::from_secs(10), AsyncReadExt::read_to_end(&mut recv, &mut rest))
                        .await;
                (conn, end.expect("the reader learns how the stream ended").map(|_| rest.len()))
            }
        });

        let conn = me.connect(addr, RAFT_MUX_ALPN).await.unwrap();
        let (send, _recv) = conn.open_bi().await.unwrap();
        let send: Writer = Arc::new(tokio::sync::Mutex::new(send));
        let (dead, pending): (AtomicBool, Pending) = Default::default();
        let (waiter, answer) = oneshot::channel();
        pending.lock().unwrap().insert(7, waiter);
        // Far more than the peer's stream window: the write waits for credit that never comes.
        let huge = vec![0x5a; 64 << 20];
        let cut = tokio::time::timeout(Duration::from_millis(200), write_message(&send, &huge, &dead, &pending)).await;
        assert!(cut.is_err(), "the write was still waiting for flow-control credit");
        assert!(dead.load(Ordering::Acquire), "the link is failed");
        assert!(answer.await.is_err(), "calls waiting on the link fail at once");

        let (_conn, end) = server.await.unwrap();
        assert!(end.is_err(), "the peer sees a reset, not the end of a (partial) message: read {end:?} bytes");
        me.close().await;
        peer.close().await;
    }

    /// A shard whose core does not answer must not hold up the other shards on the same
    /// stream: beyond its own share of places its requests are refused at once, and the ones it
    /// holds are refused when the answer deadline passes; another shard's request is answered
    /// meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_shard_is_refused_while_other_shards_are_answered() {
        let (peer, addr, me) = two_endpoints().await;
        let limits = ServeLimits { in_flight: 4, per_shard: 2, answer_deadline: Duration::from_secs(2) };
        let server = tokio::spawn({
            let peer = peer.clone();
            async move {
                let conn = peer.accept().await.expect("incoming").await.expect("connection");
                let (send, recv) = conn.accept_bi().await.expect("stream");
                // Shard 1 never answers; shard 2 answers at once.
                let answer = |shard: ShardId, _envelope: Vec<u8>| async move {
                    if shard == 1 {
                        std::future::pending::<()>().await;
                    }
                    RaftResponse::Refused(RaftRefusal::NotReady)
                };
                serve_stream_with(send, recv, answer, limits).await;
                conn
            }
        });

        let conn = me.connect(addr, RAFT_MUX_ALPN).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let envelope = encode_frame(&"any envelope".to_string()).unwrap();
        // Ids 0..6 for the stalled shard (more than the whole stream's 4 places), then id 6 for
        // shard 2.
        for id in 0..6 {
            send.write_all(&encode_request(id, 1, &envelope)).await.unwrap();
        }
        send.write_all(&encode_request(6, 2, &envelope)).await.unwrap();
        send.finish().unwrap();

        let mut answers = HashMap::new();
        while answers.len() < 7 {
            let mut id = [0u8; 8];
            tokio::time::timeout(Duration::from_secs(30), recv.read_exact(&mut id))
                .await
                .expect("every request is answered")
                .expect("the stream stays readable");
            let frame = read_one_of_many(&mut recv, MAX_FRAME_BYTES).await.unwrap();
            let response: RaftResponse = decode(&frame).unwrap();
            let RaftResponse::Refused(refusal) = response else { panic!("unexpected answer {response:?}") };
            answers.insert(u64::from_be_bytes(id), (answers.len(), refusal));
        }
        let busy = |id: u64, text: &str| match &answers[&id].1 {
            RaftRefusal::Busy { shard: 1, why } => why.contains(text),
            _ => false,
        };
        assert_eq!(answers[&6].1, RaftRefusal::NotReady, "shard 2 is answered by its core: {answers:?}");
        for id in 0..2 {
            assert!(busy(id, "no answer within"), "request {id} waited out the deadline: {answers:?}");
            assert!(answers[&id].0 > answers[&6].0, "request {id} was answered after shard 2's: {answers:?}");
        }
        for id in 2..6 {
            assert!(busy(id, "in progress"), "request {id} found no place: {answers:?}");
        }
        let mut end = [0u8; 1];
        assert!(matches!(recv.read(&mut end).await, Ok(None)), "the stream is finished once every answer is written");
        drop(server.await.unwrap());
        me.close().await;
        peer.close().await;
    }
}
