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

/// A watch over the workload's keys, through any member (it fails over with the client),
/// recording every event it sees until [`WatchRecorder::finish`].
pub struct WatchRecorder {
    events: Arc<std::sync::Mutex<Vec<aspen::api::WatchEvent>>>,
    task: tokio::task::JoinHandle<Option<String>>,
}

impl WatchRecorder {
    /// Starts watching every key the workload touches (prefix `k`), from now: returns once the
    /// watch is in place, so every later write is in its scope.
    pub async fn start(tickets: Vec<NodeTicket>, token: String) -> WatchRecorder {
        use aspen::{
            api::{WatchRequest, WatchStart},
            client::WatchItem,
        };
        let client = Arc::new(
            AspenClient::connect(tickets, Duration::from_secs(10)).await.expect("watch client").with_token(&token),
        );
        let request = WatchRequest { key: b"k".to_vec(), prefix: true, prev_kv: false, start: WatchStart::Now };
        let mut stream = client.watch(request.clone()).await.expect("watch in place");
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = events.clone();
        let task = tokio::spawn(async move {
            // A cancelled watch (a snapshot installed under it, say) resumes from its last
            // positions, as an application would; the check then shows nothing was lost.
            let mut resumes = 0;
            loop {
                match stream.next().await {
                    Some(Ok(WatchItem::Events(batch))) => seen.lock().unwrap().extend(batch),
                    Some(Ok(WatchItem::Created(_))) => {}
                    Some(Err(ClientError::Api(ApiError::WatchCancelled(why)))) if resumes < 20 => {
                        resumes += 1;
                        let mut again = request.clone();
                        again.start = WatchStart::After(stream.positions());
                        stream = match client.watch(again).await {
                            Ok(s) => s,
                            Err(e) => return Some(format!("resuming after \"{why}\": {e}")),
                        };
                    }
                    Some(Err(e)) => return Some(format!("watch failed: {e}")),
                    None => return Some("the watch ended".into()),
                }
            }
        });
        WatchRecorder { events, task }
    }

    /// Writes one last key in every shard and waits (up to `secs`) until the watch delivered
    /// them: each shard's events come in order, so every earlier event has arrived too. Returns
    /// every event seen, without the markers.
    pub async fn finish(
        self,
        client: &AspenClient,
        num_shards: u32,
        secs: u64,
    ) -> Result<Vec<aspen::api::WatchEvent>, String> {
        let router = aspen::sharding::ShardRouter::new(num_shards);
        let markers: Vec<Vec<u8>> = (0..num_shards)
            .map(|s| {
                (0..100_000)
                    .map(|i| format!("k-end-{i}").into_bytes())
                    .find(|k| router.shard_for_key(k) == s)
                    .expect("a marker key in every shard")
            })
            .collect();
        for m in &markers {
            client.put(m.clone(), "end").await.map_err(|e| format!("marker write: {e}"))?;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let all_seen = {
                let ev = self.events.lock().unwrap();
                markers.iter().all(|m| ev.iter().any(|e| &e.key == m))
            };
            if all_seen {
                break;
            }
            if self.task.is_finished() {
                return Err(self.task.await.ok().flatten().unwrap_or_else(|| "the watch task ended".into()));
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("the watch did not deliver the end markers within {secs} s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.task.abort();
        let events = self.events.lock().unwrap().clone();
        Ok(events.into_iter().filter(|e| !markers.contains(&e.key)).collect())
    }
}

/// What to print when [`check_watch`] failed: whether the history itself is linearizable (a
/// write missing from the watch could also be a write lost from the data) and where the
/// history (JSON) and the watch's events (one per line) were written for a closer look.
pub fn watch_failure_report(name: &str, events: &[aspen::api::WatchEvent], history: &History) -> String {
    let verdict = match history.check(&aspen_checker::CheckConfig::default()) {
        Ok(report) => report.result.to_string(),
        Err(e) => format!("history not checkable: {e}"),
    };
    let dir = std::env::temp_dir();
    let (hist, evs) = (dir.join(format!("aspen-{name}-history.json")), dir.join(format!("aspen-{name}-watch.txt")));
    let _ = std::fs::write(&hist, history.to_json().unwrap_or_default());
    let _ = std::fs::write(&evs, events.iter().map(|e| format!("{e:?}\n")).collect::<String>());
    format!(
        "linearizability of the history: {verdict}; history in {}, watch events in {}",
        hist.display(),
        evs.display()
    )
}

/// Checks a watch's events against the recorded history of the workload it watched and the
/// final value of each key: no event twice, each shard's in order; every acknowledged put and
/// swap appears exactly once, every event is a write that was sent (acknowledged or of unknown
/// outcome, never one that failed), acknowledged deletes of existing keys appear, and each
/// key's last event leaves the key's final value.
pub fn check_watch(
    events: &[aspen::api::WatchEvent],
    history: &History,
    finals: &BTreeMap<usize, Option<Vec<u8>>>,
) -> Result<(), String> {
    use aspen::api::EventKind;
    use aspen_checker::Outcome;
    let mut seen = std::collections::HashSet::new();
    let mut last_pos: BTreeMap<u32, (u64, u32)> = BTreeMap::new();
    for e in events {
        if !seen.insert((e.shard, e.revision, e.index)) {
            return Err(format!("event delivered twice: {e:?}"));
        }
        let pos = (e.revision, e.index);
        if let Some(prev) = last_pos.insert(e.shard, pos) {
            if prev >= pos {
                return Err(format!("shard {} events out of order: {prev:?} then {pos:?}", e.shard));
            }
        }
    }
    // Values are unique per write (client and sequence number).
    let mut sent: BTreeMap<Vec<u8>, (Vec<u8>, bool)> = BTreeMap::new();
    let mut acked_deletes: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for op in history.operations() {
        let acked = matches!(op.outcome, Outcome::Ok { .. });
        let swapped = matches!(op.outcome, Outcome::Ok { result: OpResult::Cas(true), .. });
        let maybe = matches!(op.outcome, Outcome::Unknown { .. } | Outcome::Pending);
        match &op.op {
            Op::Put { key, value } if acked || maybe => {
                sent.insert(value.clone(), (key.clone(), acked));
            }
            Op::Cas { key, new: Some(value), .. } if swapped || maybe => {
                sent.insert(value.clone(), (key.clone(), swapped));
            }
            Op::Delete { key } if matches!(op.outcome, Outcome::Ok { result: OpResult::Delete(Some(true)), .. }) => {
                *acked_deletes.entry(key.clone()).or_default() += 1;
            }
            _ => {}
        }
    }
    let mut put_events: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    let mut delete_events: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for e in events {
        match e.kind {
            EventKind::Put => {
                match sent.get(&e.value) {
                    Some((key, _)) if *key == e.key => {}
                    _ => return Err(format!("an event for a write that was never sent (or failed): {e:?}")),
                }
                *put_events.entry(e.value.clone()).or_default() += 1;
            }
            EventKind::Delete => *delete_events.entry(e.key.clone()).or_default() += 1,
        }
    }
    for (value, (key, acked)) in &sent {
        let n = put_events.get(value).copied().unwrap_or(0);
        if *acked && n != 1 {
            return Err(format!(
                "the acknowledged write {:?} = {:?} appears {n} times",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(value)
            ));
        }
    }
    for (key, n) in &acked_deletes {
        let got = delete_events.get(key).copied().unwrap_or(0);
        if got < *n {
            return Err(format!("{n} acknowledged deletes of {:?}, {got} delete events", String::from_utf8_lossy(key)));
        }
    }
    for (k, want) in finals {
        let last = events.iter().rfind(|e| e.key == key(*k));
        let left = match last {
            Some(e) if e.kind == EventKind::Put => Some(e.value.clone()),
            _ => None,
        };
        // Without any event the key was never written during the watch: it stayed absent.
        if &left != want {
            return Err(format!("key k{k}: the watch ends at {left:?}, the final read gave {want:?}"));
        }
    }
    Ok(())
}
