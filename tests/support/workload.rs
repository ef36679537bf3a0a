//! The recorded workload of the fault and netns tests: concurrent clients doing gets, puts,
//! compare-and-swaps and deletes on a few keys, every operation recorded (invocation and
//! outcome) into an [`aspen_checker::History`] for the linearizability check.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use aspen::{api::NodeTicket, client::CasOutcome, ApiError, AspenClient, ClientError};
use aspen_checker::{History, Op, OpResult};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Keys the workload touches (few, so that clients contend).
pub const KEYS: usize = 6;

pub fn key(i: usize) -> Vec<u8> {
    format!("k{i}").into_bytes()
}

/// Concurrent clients recording every op into `history` until `finish`.
pub struct Workload {
    history: History,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Writes acknowledged so far.
    pub acked: Arc<AtomicU64>,
}

impl Workload {
    /// Starts `clients` clients; client c starts at ticket `c % n` (and fails over to the
    /// members it discovers).
    pub async fn start(tickets: Vec<NodeTicket>, token: String, clients: usize, seed: u64) -> Workload {
        let history = History::new();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let mut tickets = tickets.clone();
            let n = tickets.len();
            tickets.rotate_left(c % n);
            let client =
                AspenClient::connect(tickets, Duration::from_secs(8)).await.expect("client").with_token(&token);
            let (history, stop, acked) = (history.clone(), stop.clone(), acked.clone());
            let mut rng = StdRng::seed_from_u64(seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                let mut last_seen: BTreeMap<usize, Option<Vec<u8>>> = BTreeMap::new();
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let op = NextOp {
                        k: rng.random_range(0..KEYS),
                        value: format!("c{c}-{n}").into_bytes(),
                        roll: rng.random_range(0..100),
                    };
                    run_op(&client, &history, c as u64, op, &mut last_seen, &acked).await;
                }
                client.close().await;
            }));
        }
        Workload { history, stop, tasks, acked }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops the clients and hands back the history.
    pub async fn finish(self) -> History {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        self.history
    }
}

/// Whether a failed write may still have taken effect.
pub fn write_outcome_unknown(e: &ClientError) -> bool {
    !matches!(e, ClientError::Api(ApiError::InvalidRequest(_) | ApiError::TooLarge { .. }))
}

/// One operation: on key `k`, with `value` for writes; `roll` (0..100) picks the kind
/// (45 % get, 35 % put, 10 % cas, 10 % delete).
struct NextOp {
    k: usize,
    value: Vec<u8>,
    roll: u32,
}

async fn run_op(
    client: &AspenClient,
    history: &History,
    c: u64,
    op: NextOp,
    last_seen: &mut BTreeMap<usize, Option<Vec<u8>>>,
    acked: &AtomicU64,
) {
    let NextOp { k, value, roll } = op;
    let key = key(k);
    if roll < 45 {
        let h = history.invoke(c, Op::Get { key: key.clone() });
        match client.get(key).await {
            Ok(kv) => {
                let v = kv.map(|kv| kv.value);
                last_seen.insert(k, v.clone());
                h.ok(OpResult::Get(v));
            }
            // A read that failed had no effect.
            Err(_) => h.failed(),
        }
    } else if roll < 80 {
        let h = history.invoke(c, Op::Put { key: key.clone(), value: value.clone() });
        match client.put(key, value).await {
            Ok(_) => {
                acked.fetch_add(1, Ordering::Relaxed);
                h.ok(OpResult::Put)
            }
            Err(e) if write_outcome_unknown(&e) => h.unknown(),
            Err(_) => h.failed(),
        }
    } else if roll < 90 {
        let expected = last_seen.get(&k).cloned().flatten();
        let h = history.invoke(c, Op::Cas { key: key.clone(), expected: expected.clone(), new: Some(value.clone()) });
        match client.cas(key, expected, value).await {
            Ok(CasOutcome::Swapped(_)) => {
                acked.fetch_add(1, Ordering::Relaxed);
                h.ok(OpResult::Cas(true))
            }
            Ok(CasOutcome::Mismatch(_)) => h.ok(OpResult::Cas(false)),
            Err(e) if write_outcome_unknown(&e) => h.unknown(),
            Err(_) => h.failed(),
        }
    } else {
        let h = history.invoke(c, Op::Delete { key: key.clone() });
        match client.delete(key).await {
            Ok(existed) => {
                acked.fetch_add(1, Ordering::Relaxed);
                h.ok(OpResult::Delete(Some(existed)))
            }
            Err(e) if write_outcome_unknown(&e) => h.unknown(),
            Err(_) => h.failed(),
        }
    }
}
