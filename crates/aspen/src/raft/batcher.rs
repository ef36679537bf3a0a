//! Write batching and read coalescing for one shard.
//!
//! Owns: the queue of client writes waiting to be proposed and the linearizable reads waiting
//! for a leadership confirmation (ReadIndex) round.
//!
//! openraft 0.9 turns every `client_write` into its own log entry and its own pass through the
//! Raft core, and every `ensure_linearizable` into its own heartbeat round to a quorum. Under
//! concurrent load both dominate. So:
//!
//! - **Writes**: [`WriteBatcher`] queues each write; a proposer task takes everything queued (up
//!   to [`MAX_WRITES`] writes or [`MAX_BATCH_BYTES`]) into ONE log entry ([`WriteBatch`]). At most
//!   [`MAX_IN_FLIGHT`] entry is in flight per shard, so writes that arrive while an earlier one
//!   replicates gather into the next entry (group commit; a single writer waits for nobody). Two
//!   writes touching the same key never share an entry: a key's revision (the log index of the
//!   entry that changed it) stays unique; a prefix delete, which names no key, goes alone.
//!   Writes queued together are concurrent from the clients' point of view, so any order
//!   between them is linearizable; the state machine applies them in queue order, each with
//!   its own session deduplication.
//! - **Reads**: [`ReadGate`] runs one `ensure_linearizable` round at a time and answers every
//!   read that was waiting when the round STARTED. A read arriving during a round waits for the
//!   next one: a round that began after the read was invoked confirms leadership and waits for
//!   the commit index seen at its start, which is what a linearizable read needs.
//!
//! Never: decide where a request goes (the service does) or retry (the caller's `with_leader`
//! does, with its deadline).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{ApplyResult, Raft, WriteBatch, WriteRequest};
use crate::{
    api::{split_raft_id, ApiError, ShardId, WriteCommand, WriteOutcome},
    metrics::ShardMetrics,
};

/// Most writes in one log entry.
pub const MAX_WRITES: usize = 512;
// Each write of an entry gets a revision of its own (`api::write_revision`).
const _: () = assert!(MAX_WRITES as u64 <= crate::api::REVISIONS_PER_ENTRY);
/// Most bytes of keys and values in one log entry (a larger single write goes alone).
pub const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Most entries of one shard proposed and not yet applied at a time. One: everything that
/// arrives during a round goes into the next entry. (Measured at 64 clients on 3 nodes: 1 slot
/// beat 2, 4 and 8 — each entry has a fixed cost on every replica, so bigger entries win.)
pub const MAX_IN_FLIGHT: usize = 1;
/// Writes waiting for a proposer slot before `submit` waits too.
const QUEUE: usize = 8192;

/// What a queued write or read is answered: done, "no leader known yet" (`Ok(None)`: the caller
/// waits for one and retries), or an error.
pub type Answer<T> = Result<Option<T>, ApiError>;

/// openraft's "forward to the leader" as an answer: `NotLeader` naming the leader's node, or
/// "no leader known yet".
pub fn forward_to<T>(leader: Option<u64>) -> Answer<T> {
    match leader {
        Some(raft_id) => Err(not_leader(raft_id)),
        None => Ok(None),
    }
}

/// `NotLeader` naming the node of the member with Raft id `leader`.
pub fn not_leader(leader: u64) -> ApiError {
    ApiError::NotLeader { leader: Some(split_raft_id(leader).1), leader_ticket: None }
}

struct Queued {
    req: WriteRequest,
    reply: oneshot::Sender<Answer<WriteOutcome>>,
}

impl Queued {
    fn bytes(&self) -> usize {
        command_bytes(&self.req.command)
    }
}

/// The bytes of keys and values `command` carries (what [`MAX_BATCH_BYTES`] counts).
fn command_bytes(command: &WriteCommand) -> usize {
    command.payload_bytes()
}

/// Whether `command` goes alone in its entry: a prefix delete touches keys it does not name, so
/// the key check cannot see which writes it conflicts with (a key's revision must stay unique).
fn goes_alone(command: &WriteCommand) -> bool {
    // A lease's revocation deletes the keys attached to it, which it does not name either.
    // So does an etcd-shaped txn with a range (a read or a delete of keys it does not name).
    match command {
        WriteCommand::DeletePrefix { .. } | WriteCommand::LeaseRevoke { .. } | WriteCommand::LeaseDrop { .. } => true,
        WriteCommand::KvTxn { txn, .. } => txn.spans().iter().any(|(_, end)| end.is_some()),
        _ => false,
    }
}

/// The write queue of one shard; cloning shares it. The proposer task ends when every clone
/// is dropped.
#[derive(Clone)]
pub struct WriteBatcher {
    tx: mpsc::Sender<Queued>,
}

impl WriteBatcher {
    /// Starts the proposer task of `shard` on the current tokio runtime.
    pub fn start(raft: Raft, shard: ShardId, metrics: Arc<ShardMetrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(propose_loop(raft, shard, rx, metrics));
        WriteBatcher { tx }
    }

    /// Queues `req` and waits for its entry to be committed and applied on this node.
    pub async fn submit(&self, req: WriteRequest) -> Answer<WriteOutcome> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Queued { req, reply })
            .await
            .map_err(|_| ApiError::Unavailable("the shard is shutting down".into()))?;
        answer.await.unwrap_or_else(|_| Err(ApiError::Unavailable("the shard is shutting down".into())))
    }
}

async fn propose_loop(raft: Raft, shard: ShardId, mut rx: mpsc::Receiver<Queued>, metrics: Arc<ShardMetrics>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carry: Option<Queued> = None;
    loop {
        // Wait for a free slot first: writes arriving meanwhile gather into this entry.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut keys: HashSet<Vec<u8>> = first.req.command.keys().into_iter().map(<[u8]>::to_vec).collect();
        let mut bytes = first.bytes();
        let alone = goes_alone(&first.req.command);
        let mut batch = vec![first];
        while batch.len() < MAX_WRITES && !alone {
            let Ok(next) = rx.try_recv() else { break };
            let next_keys = next.req.command.keys();
            if goes_alone(&next.req.command)
                || bytes + next.bytes() > MAX_BATCH_BYTES
                || next_keys.iter().any(|k| keys.contains(*k))
            {
                carry = Some(next);
                break;
            }
            keys.extend(next_keys.into_iter().map(<[u8]>::to_vec));
            bytes += next.bytes();
            batch.push(next);
        }
        metrics.proposals.inc();
        metrics.writes_per_entry.observe(batch.len() as u64);
        let raft = raft.clone();
        tokio::spawn(async move {
            propose(&raft, shard, batch).await;
            drop(slot);
        });
    }
}

/// Proposes one entry and answers each of its writes.
async fn propose(raft: &Raft, shard: ShardId, batch: Vec<Queued>) {
    let (reqs, replies): (Vec<WriteRequest>, Vec<_>) = batch.into_iter().map(|q| (q.req, q.reply)).unzip();
    let n = reqs.len();
    let answer: Result<Vec<WriteOutcome>, Answer<WriteOutcome>> = match raft.client_write(WriteBatch(reqs)).await {
        Ok(resp) => match resp.data {
            ApplyResult(outcomes) if outcomes.len() == n => Ok(outcomes),
            ApplyResult(outcomes) => {
                Err(Err(ApiError::Internal(format!("an entry of {n} writes produced {} outcomes", outcomes.len()))))
            }
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(forward_to(f.leader_id)),
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
            Err(Err(ApiError::InvalidRequest(e.to_string())))
        }
        Err(RaftError::Fatal(f)) => Err(Err(ApiError::Unavailable(format!("shard {shard}: {f}")))),
    };
    match answer {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(Some(outcome)));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(e.clone());
            }
        }
    }
}

/// Linearizable-read rounds of one shard; cloning shares them.
#[derive(Clone)]
pub struct ReadGate {
    raft: Raft,
    shard: ShardId,
    /// Bound on one round: a round that hangs (no quorum) must not hold every later read.
    round_timeout: Duration,
    state: Arc<Mutex<GateState>>,
    metrics: Arc<ShardMetrics>,
}

#[derive(Default)]
struct GateState {
    waiting: Vec<oneshot::Sender<Answer<()>>>,
    running: bool,
}

impl ReadGate {
    pub fn new(raft: Raft, shard: ShardId, round_timeout: Duration, metrics: Arc<ShardMetrics>) -> Self {
        ReadGate { raft, shard, round_timeout, state: Default::default(), metrics }
    }

    /// Waits for a leadership-confirmation round that starts after this call, and for this
    /// node's state machine to catch up with the commit index that round saw.
    pub async fn confirm(&self) -> Answer<()> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.waiting.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            let gate = self.clone();
            tokio::spawn(async move { gate.drive().await });
        }
        rx.await.unwrap_or_else(|_| Err(ApiError::Unavailable("read round abandoned".into())))
    }

    async fn drive(self) {
        loop {
            let waiting = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.waiting.is_empty() {
                    st.running = false;
                    return;
                }
                std::mem::take(&mut st.waiting)
            };
            self.metrics.read_index_rounds.inc();
            let answer = match tokio::time::timeout(self.round_timeout, self.raft.ensure_linearizable()).await {
                Err(_) => Err(ApiError::Timeout(self.round_timeout.as_millis() as u64)),
                Ok(Ok(_)) => Ok(Some(())),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => forward_to(f.leader_id),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                    Err(ApiError::Unavailable(format!("shard {}: {e}", self.shard)))
                }
                Ok(Err(RaftError::Fatal(f))) => Err(ApiError::Unavailable(format!("shard {}: {f}", self.shard))),
            };
            for w in waiting {
                let _ = w.send(answer.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Compare, CompareOp, TxnOp};

    #[test]
    fn entry_size_counts_every_key_and_value_a_write_carries() {
        let txn = WriteCommand::Txn {
            compares: vec![Compare::value("ab", CompareOp::Equal, "xyz"), Compare::version("c", CompareOp::Less, 9)],
            success: vec![TxnOp::put("de", "1234"), TxnOp::get("f")],
            failure: vec![TxnOp::delete("gh")],
        };
        assert_eq!(command_bytes(&txn), (2 + 3) + 1 + (2 + 4) + 1 + 2);
        assert_eq!(command_bytes(&WriteCommand::DeletePrefix { prefix: b"p/".to_vec() }), 2);
        assert!(goes_alone(&WriteCommand::DeletePrefix { prefix: Vec::new() }));
        assert!(!goes_alone(&txn), "a txn names its keys: the key check keeps it apart");
    }
}
