//! Forwarding gets and writes to a shard leader on another node, batched per peer.
//!
//! Owns: one queue and one sender task per peer node. With clients spread over every member,
//! most requests reach a follower and are forwarded to the leader; one QUIC stream, one frame
//! and one task per forwarded request cost the leader as much CPU as the Raft work itself. So a
//! follower queues them per leader and sends everything queued in one
//! [`ClientRequest::Forwarded`] request, with at most [`IN_FLIGHT_PER_PEER`] of those in flight
//! per peer: requests arriving while earlier batches travel gather into the next one (a lone
//! request goes at once, alone). The peer answers each request of a batch exactly as if it had
//! been sent alone ([`answer_forwarded`]).
//!
//! Bounds: a batch holds at most [`max_batch_items`] requests, chosen so that both the batch
//! and its answer fit a frame even when every request carries (or returns) a value of the
//! largest allowed size. Batched requests and answers have their own types
//! ([`ForwardedRequest`], [`crate::api::ForwardedAnswer`]): batches cannot nest, so decoding
//! one never recurses. A peer that does not understand batches (an older version) gets each
//! request alone.
//!
//! Never: decide where a request goes (the service does) or retry (its caller does).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use iroh::EndpointAddr;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::{
    api::{
        ApiError, ClientRequest, ClientResponse, ClientResult, ForwardedAnswer, ForwardedRequest, ForwardedResponse,
        NodeId, MAX_FRAME_BYTES,
    },
    transport::{request::send_request, ConnectionPool, TransportError},
};

/// Why a forwarded request got no answer from the peer. A batch's failure is every one of its
/// requests' failure, so the error is cheap to clone.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Transport(Arc<TransportError>),
    #[error("unexpected answer to {0} forwarded requests")]
    UnexpectedAnswer(usize),
    #[error("the forwarding queue is closed")]
    QueueClosed,
    #[error("the forwarded request was dropped")]
    Dropped,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl From<TransportError> for ForwardError {
    fn from(e: TransportError) -> Self {
        ForwardError::Transport(Arc::new(e))
    }
}

/// Batches of one peer in flight at a time.
pub const IN_FLIGHT_PER_PEER: usize = 2;
/// Requests waiting for one peer before `send` waits too.
const QUEUE: usize = 4096;
/// Upper bound on requests per batch, whatever the value limits.
const MAX_ITEMS: usize = 256;
/// Room for a request's or an answer's own fields besides its key and value.
const ITEM_OVERHEAD: u64 = 1024;

/// Requests per batch such that a batch, and its answer, stay under half a frame even if each
/// request carries, or returns, a key and value of the largest allowed sizes.
pub fn max_batch_items(max_key_bytes: u64, max_value_bytes: u64) -> usize {
    let per_item = max_key_bytes.saturating_add(max_value_bytes).saturating_add(ITEM_OVERHEAD);
    ((MAX_FRAME_BYTES as u64 / 2) / per_item).clamp(1, MAX_ITEMS as u64) as usize
}

struct Item {
    request: ForwardedRequest,
    addr: EndpointAddr,
    deadline: Instant,
    reply: oneshot::Sender<Result<ClientResult, ForwardError>>,
}

/// How much forwarding went out in batches since the node started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Batches of two or more requests sent.
    pub batches: u64,
    /// Requests that travelled in those batches.
    pub batched_requests: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    batched_requests: AtomicU64,
}

/// The per-peer queues of one node.
#[derive(Debug)]
pub struct Forwarder {
    pool: ConnectionPool,
    max_items: usize,
    peers: Mutex<HashMap<NodeId, mpsc::Sender<Item>>>,
    counters: Arc<Counters>,
}

impl Forwarder {
    pub fn new(pool: ConnectionPool, max_items: usize) -> Self {
        Forwarder { pool, max_items: max_items.max(1), peers: Default::default(), counters: Default::default() }
    }

    pub fn stats(&self) -> ForwardStats {
        ForwardStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            batched_requests: self.counters.batched_requests.load(Ordering::Relaxed),
        }
    }

    /// Sends `request` (a get or a write) to node `node` at `addr`, batched with other requests
    /// for that node, and waits up to `timeout` for its answer. Transport failures come back as
    /// `Err`.
    pub async fn send(
        &self,
        node: NodeId,
        addr: &EndpointAddr,
        request: ForwardedRequest,
        timeout: Duration,
    ) -> Result<ClientResult, ForwardError> {
        let (reply, answer) = oneshot::channel();
        let item = Item { request, addr: addr.clone(), deadline: Instant::now() + timeout, reply };
        let queue = self.queue(node);
        tokio::time::timeout(timeout, async {
            queue.send(item).await.map_err(|_| ForwardError::QueueClosed)?;
            answer.await.map_err(|_| ForwardError::Dropped)?
        })
        .await
        .map_err(|_| ForwardError::Timeout(timeout))?
    }

    fn queue(&self, node: NodeId) -> mpsc::Sender<Item> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = peers.get(&node).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(peer_loop(self.pool.clone(), rx, self.max_items, self.counters.clone()));
        peers.insert(node, tx.clone());
        tx
    }
}

/// Sends what is queued for one peer, a batch at a time; ends when the forwarder is dropped.
async fn peer_loop(pool: ConnectionPool, mut rx: mpsc::Receiver<Item>, max_items: usize, counters: Arc<Counters>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_PER_PEER));
    loop {
        // A free slot first: requests arriving meanwhile gather into this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < max_items {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let (pool, counters) = (pool.clone(), counters.clone());
        tokio::spawn(async move {
            send_batch(&pool, batch, &counters).await;
            drop(slot);
        });
    }
}

async fn send_batch(pool: &ConnectionPool, mut batch: Vec<Item>, counters: &Counters) {
    batch.retain(|item| !item.reply.is_closed());
    if batch.len() <= 1 {
        for item in batch {
            send_alone(pool, item).await;
        }
        return;
    }
    let addr = batch[0].addr.clone();
    let deadline = batch.iter().map(|i| i.deadline).max().unwrap_or_else(Instant::now);
    let timeout = deadline.saturating_duration_since(Instant::now());
    let requests: Vec<ForwardedRequest> = batch.iter().map(|i| i.request.clone()).collect();
    let n = requests.len();
    counters.batches.fetch_add(1, Ordering::Relaxed);
    counters.batched_requests.fetch_add(n as u64, Ordering::Relaxed);
    match send_request(pool, &addr, 1, ClientRequest::Forwarded { requests }, timeout).await {
        Ok(Ok(ClientResponse::Forwarded(answers))) if answers.len() == n => {
            for (item, answer) in batch.into_iter().zip(answers) {
                let _ = item.reply.send(Ok(answer.map(ClientResponse::from)));
            }
        }
        // A peer that does not know batches: each request alone.
        Ok(Err(ApiError::InvalidRequest(_) | ApiError::UnsupportedVersion { .. })) => {
            for item in batch {
                send_alone(pool, item).await;
            }
        }
        Ok(Err(e)) => {
            for item in batch {
                let _ = item.reply.send(Ok(Err(e.clone())));
            }
        }
        Ok(Ok(other)) => {
            tracing::warn!("unexpected answer to {n} forwarded requests: {other:?}");
            for item in batch {
                let _ = item.reply.send(Err(ForwardError::UnexpectedAnswer(n)));
            }
        }
        Err(e) => {
            let why = ForwardError::from(e);
            for item in batch {
                let _ = item.reply.send(Err(why.clone()));
            }
        }
    }
}

async fn send_alone(pool: &ConnectionPool, item: Item) {
    let timeout = item.deadline.saturating_duration_since(Instant::now());
    let answer = send_request(pool, &item.addr, 1, item.request.into(), timeout).await;
    let _ = item.reply.send(answer.map_err(ForwardError::from));
}

/// Roughly how many bytes `answer` takes in a frame.
fn answer_bytes(answer: &ForwardedAnswer) -> u64 {
    use crate::api::{TxnOpResult, WriteOutcome};
    let data = match answer {
        Ok(ForwardedResponse::Get(Some(kv))) => kv.key.len() + kv.value.len(),
        Ok(ForwardedResponse::Write(WriteOutcome::Cas { current: Some(v), .. })) => v.len(),
        Ok(ForwardedResponse::Write(WriteOutcome::Txn { results, .. })) => results
            .iter()
            .map(|r| match r {
                TxnOpResult::Get(Some(kv)) => kv.key.len() + kv.value.len() + 32,
                _ => 16,
            })
            .sum(),
        Ok(ForwardedResponse::Range(page)) => page.kvs.iter().map(|kv| kv.key.len() + kv.value.len() + 48).sum(),
        Ok(ForwardedResponse::Write(WriteOutcome::KvTxn { results, .. })) => kv_results_bytes(results),
        _ => 0,
    };
    data as u64 + ITEM_OVERHEAD
}

/// The bytes of keys and values an etcd-shaped txn's answer carries.
fn kv_results_bytes(results: &[crate::api::KvOpResult]) -> usize {
    use crate::api::KvOpResult;
    let kv = |kv: &crate::api::KeyRecord| kv.key.len() + kv.value.len() + 48;
    results
        .iter()
        .map(|r| match r {
            KvOpResult::Range(p) => p.kvs.iter().map(kv).sum(),
            KvOpResult::Put { prev } => prev.as_ref().map_or(16, kv),
            KvOpResult::DeleteRange { prev, .. } => prev.iter().map(kv).sum::<usize>() + 16,
            KvOpResult::Txn { results, .. } => kv_results_bytes(results),
        })
        .sum()
}

/// Checks a forwarded batch before it is answered: at most [`MAX_ITEMS`] requests. `Err`
/// refuses the whole batch.
pub fn check_forwarded(requests: &[ForwardedRequest]) -> Result<(), ApiError> {
    if requests.len() > MAX_ITEMS {
        return Err(ApiError::InvalidRequest(format!(
            "{} forwarded requests in one batch (at most {MAX_ITEMS})",
            requests.len()
        )));
    }
    Ok(())
}

/// Makes the answers of a forwarded batch fit one frame: an answer that would push the total
/// past half a frame (possible only for values stored under a larger value limit than today's)
/// is replaced by a `TooLarge` error; the client can read that key alone.
pub fn fit_answers(mut answers: Vec<ForwardedAnswer>) -> Vec<ForwardedAnswer> {
    let budget = MAX_FRAME_BYTES as u64 / 2;
    let mut total = 0u64;
    for answer in answers.iter_mut() {
        let size = answer_bytes(answer);
        if total + size > budget {
            *answer = Err(ApiError::TooLarge { what: "answer in a forwarded batch".into(), size, limit: budget });
        } else {
            total += size;
        }
    }
    answers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyValue, ReadConsistency};

    #[test]
    fn batch_size_keeps_the_largest_batch_under_half_a_frame() {
        let n = max_batch_items(4 * 1024, 1024 * 1024);
        assert!(n >= 16, "{n}");
        assert!(n as u64 * (4 * 1024 + 1024 * 1024 + ITEM_OVERHEAD) <= MAX_FRAME_BYTES as u64 / 2);
        assert_eq!(max_batch_items(0, 0), MAX_ITEMS, "capped for tiny values");
        assert_eq!(max_batch_items(1024, 1 << 40), 1, "one request at a time for huge values");
    }

    #[test]
    fn only_gets_and_writes_travel_in_batches() {
        let get = ClientRequest::Get { key: b"k".to_vec(), consistency: ReadConsistency::Linearizable };
        let fwd = ForwardedRequest::of(&get).expect("a get travels in batches");
        assert_eq!(ClientRequest::from(fwd.clone()), get, "and arrives unchanged");
        assert_eq!(ForwardedRequest::of(&ClientRequest::BalanceLeaders), None);
        assert_eq!(ForwardedRequest::of(&ClientRequest::Forwarded { requests: vec![fwd.clone()] }), None);
        assert!(check_forwarded(&[fwd.clone(), fwd.clone()]).is_ok());
        let many = vec![fwd; MAX_ITEMS + 1];
        assert!(matches!(check_forwarded(&many), Err(ApiError::InvalidRequest(_))));
    }

    #[test]
    fn oversized_answers_become_errors_and_the_rest_is_kept() {
        let big = |n: usize| -> ForwardedAnswer {
            Ok(ForwardedResponse::Get(Some(KeyValue {
                key: b"k".to_vec(),
                value: vec![0; n],
                create_revision: 1,
                mod_revision: 1,
                version: 1,
            })))
        };
        let half = MAX_FRAME_BYTES / 2;
        let answers = fit_answers(vec![big(half / 2), big(half / 2), Ok(ForwardedResponse::Get(None))]);
        assert!(answers[0].is_ok());
        assert!(matches!(answers[1], Err(ApiError::TooLarge { .. })));
        assert_eq!(answers[2], Ok(ForwardedResponse::Get(None)), "small answers after it still fit");
    }
}
