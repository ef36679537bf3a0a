//! Unit and randomized tests of the checker: hand-written histories it must reject or accept, the recorder,
//! randomized histories generated from a real model, and a cross-check against a brute-force oracle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::search::check_with;
use super::*;

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn get(k: &str) -> Op {
    Op::Get { key: b(k) }
}

fn put(k: &str, v: &str) -> Op {
    Op::Put { key: b(k), value: b(v) }
}

fn del(k: &str) -> Op {
    Op::Delete { key: b(k) }
}

fn cas(k: &str, expected: Option<&str>, new: Option<&str>) -> Op {
    Op::Cas { key: b(k), expected: expected.map(b), new: new.map(b) }
}

fn saw(v: Option<&str>) -> OpResult {
    OpResult::Get(v.map(b))
}

/// Builds histories with explicit logical times.
#[derive(Default)]
struct Builder {
    ops: Vec<Operation>,
}

impl Builder {
    fn push(&mut self, client: ClientId, invoke: u64, op: Op, outcome: Outcome) -> &mut Self {
        let id = self.ops.len() as u64;
        self.ops.push(Operation { id, client, op, invoke, invoke_micros: invoke, outcome });
        self
    }

    /// A completed op, invoked at `invoke` and returning `result` at `ret`.
    fn ok(&mut self, client: ClientId, invoke: u64, ret: u64, op: Op, result: OpResult) -> &mut Self {
        self.push(client, invoke, op, Outcome::Ok { ret, ret_micros: ret, result })
    }

    /// An op whose outcome the client does not know, invoked at `invoke`.
    fn unknown(&mut self, client: ClientId, invoke: u64, op: Op) -> &mut Self {
        self.push(client, invoke, op, Outcome::Unknown { noticed: invoke + 1, noticed_micros: invoke + 1 })
    }

    fn result(&self) -> CheckResult {
        verdict(&self.ops)
    }
}

/// Checks with and without dropping unobservable unknown ops; both must agree.
fn verdict(ops: &[Operation]) -> CheckResult {
    let config = CheckConfig::default();
    let pruned = match check_with(ops, &config, true) {
        Ok(report) => report.result,
        Err(e) => panic!("malformed test history: {e}"),
    };
    let full = match check_with(ops, &config, false) {
        Ok(report) => report.result,
        Err(e) => panic!("malformed test history: {e}"),
    };
    assert_eq!(pruned.is_ok(), full.is_ok(), "pruning changed the verdict:\n{pruned}\n{full}");
    pruned
}

#[track_caller]
fn assert_accepts(h: &Builder) {
    let r = h.result();
    assert!(r.is_ok(), "expected linearizable, got:\n{r}\n{}", describe_all(&h.ops));
}

#[track_caller]
fn assert_rejects(h: &Builder) -> String {
    match h.result() {
        CheckResult::Violation { explanation, .. } => explanation,
        r => panic!("expected a violation, got {r:?}\n{}", describe_all(&h.ops)),
    }
}

fn describe_all(ops: &[Operation]) -> String {
    let mut keys: Vec<&[u8]> = ops.iter().map(|o| o.op.key()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().map(|k| describe_key(ops, k)).collect()
}

// ---- histories that must be rejected ----

#[test]
fn rejects_stale_read_of_absent() {
    let mut h = Builder::default();
    h.ok(1, 0, 10, put("a", "1"), OpResult::Put).ok(2, 20, 30, get("a"), saw(None));
    let explanation = assert_rejects(&h);
    assert!(explanation.contains("#1"), "explanation names the read:\n{explanation}");
    assert!(explanation.contains("\"1\""), "explanation shows the state:\n{explanation}");
}

#[test]
fn rejects_stale_read_of_old_value() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).ok(1, 2, 3, put("a", "2"), OpResult::Put).ok(
        2,
        4,
        5,
        get("a"),
        saw(Some("1")),
    );
    assert_rejects(&h);
}

#[test]
fn rejects_read_of_value_never_written() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, get("a"), saw(Some("ghost")));
    assert_rejects(&h);
    let mut h = Builder::default();
    h.ok(1, 0, 10, put("a", "1"), OpResult::Put).ok(2, 5, 15, get("a"), saw(Some("2")));
    assert_rejects(&h);
}

#[test]
fn rejects_lost_acknowledged_write() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put)
        .ok(1, 2, 3, put("a", "2"), OpResult::Put)
        .ok(2, 4, 5, get("a"), saw(Some("1")))
        .ok(3, 6, 7, get("a"), saw(Some("1")));
    assert_rejects(&h);
    // The acknowledged put vanishes entirely.
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).ok(2, 2, 3, get("a"), saw(None)).ok(2, 4, 5, get("a"), saw(None));
    assert_rejects(&h);
}

#[test]
fn rejects_cas_succeeding_on_wrong_value() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).ok(1, 2, 3, cas("a", Some("2"), Some("3")), OpResult::Cas(true));
    assert_rejects(&h);
    // Expecting absence while the key exists.
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).ok(1, 2, 3, cas("a", None, Some("3")), OpResult::Cas(true));
    assert_rejects(&h);
}

#[test]
fn rejects_cas_failing_on_right_value() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).ok(1, 2, 3, cas("a", Some("1"), Some("3")), OpResult::Cas(false));
    assert_rejects(&h);
}

#[test]
fn rejects_two_sequential_cas_from_same_expected() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).ok(1, 2, 3, cas("a", Some("1"), Some("2")), OpResult::Cas(true)).ok(
        2,
        4,
        5,
        cas("a", Some("1"), Some("3")),
        OpResult::Cas(true),
    );
    assert_rejects(&h);
}

#[test]
fn rejects_two_concurrent_cas_from_same_expected() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).ok(1, 2, 10, cas("a", Some("1"), Some("2")), OpResult::Cas(true)).ok(
        2,
        3,
        11,
        cas("a", Some("1"), Some("3")),
        OpResult::Cas(true),
    );
    assert_rejects(&h);
}

#[test]
fn rejects_delete_not_existing_when_key_existed() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).ok(2, 2, 3, del("a"), OpResult::Delete(Some(false)));
    assert_rejects(&h);
    let mut h = Builder::default();
    h.ok(1, 0, 1, del("a"), OpResult::Delete(Some(true)));
    assert_rejects(&h);
}

#[test]
fn rejects_read_of_unknown_write_before_its_invocation() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, get("a"), saw(Some("1"))).unknown(2, 2, put("a", "1"));
    assert_rejects(&h);
}

#[test]
fn rejects_unknown_write_seen_then_unseen() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).unknown(2, 2, put("a", "2")).ok(3, 3, 4, get("a"), saw(Some("2"))).ok(
        3,
        5,
        6,
        get("a"),
        saw(Some("1")),
    );
    assert_rejects(&h);
}

#[test]
fn rejects_failed_write_that_shows_up() {
    let mut h = Builder::default();
    h.push(1, 0, put("a", "1"), Outcome::Failed { ret: 1, ret_micros: 1 }).ok(2, 2, 3, get("a"), saw(Some("1")));
    assert_rejects(&h);
}

#[test]
fn rejects_when_one_key_of_many_violates() {
    let mut h = Builder::default();
    for k in 0..20u64 {
        let key = format!("k{k}");
        h.ok(k, 10 * k, 10 * k + 1, put(&key, "v"), OpResult::Put).ok(
            k,
            10 * k + 2,
            10 * k + 3,
            get(&key),
            saw(Some("v")),
        );
    }
    h.ok(99, 1000, 1001, get("k7"), saw(None));
    let report = check(&h.ops, &CheckConfig::default()).expect("well-formed");
    assert!(matches!(&report.result, CheckResult::Violation { key, .. } if key == b"k7"), "{}", report.result);
    assert_eq!(report.per_key.values().filter(|r| r.is_ok()).count(), 19);
}

// ---- histories that must be accepted ----

#[test]
fn accepts_empty_history() {
    assert_accepts(&Builder::default());
}

#[test]
fn accepts_concurrent_put_and_get_seeing_either_value() {
    for seen in [Some("1"), Some("2")] {
        let mut h = Builder::default();
        h.ok(1, 0, 1, put("a", "1"), OpResult::Put).ok(1, 2, 10, put("a", "2"), OpResult::Put).ok(
            2,
            3,
            4,
            get("a"),
            saw(seen),
        );
        assert_accepts(&h);
    }
}

#[test]
fn accepts_overlapping_ops_in_any_valid_order() {
    // Reads see 2 then 1 then 3 while three puts overlap each other and the reads.
    let mut h = Builder::default();
    h.ok(1, 0, 20, put("a", "1"), OpResult::Put)
        .ok(2, 1, 21, put("a", "2"), OpResult::Put)
        .ok(3, 2, 22, put("a", "3"), OpResult::Put)
        .ok(4, 3, 5, get("a"), saw(Some("2")))
        .ok(4, 6, 8, get("a"), saw(Some("1")))
        .ok(4, 9, 30, get("a"), saw(Some("3")))
        .ok(5, 10, 12, cas("a", Some("1"), Some("4")), OpResult::Cas(false))
        .ok(5, 25, 26, cas("a", Some("3"), None), OpResult::Cas(true))
        .ok(5, 27, 28, get("a"), saw(None))
        .ok(6, 27, 40, del("a"), OpResult::Delete(Some(false)));
    assert_accepts(&h);
}

#[test]
fn accepts_ops_touching_at_the_same_tick_as_concurrent() {
    let mut h = Builder::default();
    h.ok(1, 0, 5, put("a", "1"), OpResult::Put).ok(2, 5, 6, get("a"), saw(None));
    assert_accepts(&h);
}

#[test]
fn accepts_unknown_put_that_later_shows_up() {
    let mut h = Builder::default();
    h.unknown(1, 0, put("a", "1")).ok(2, 5, 6, get("a"), saw(Some("1")));
    assert_accepts(&h);
}

#[test]
fn accepts_unknown_put_that_never_shows_up() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).unknown(1, 2, put("a", "2"));
    for t in 0..10 {
        h.ok(2, 10 + 2 * t, 11 + 2 * t, get("a"), saw(Some("1")));
    }
    assert_accepts(&h);
}

#[test]
fn accepts_unknown_put_that_shows_up_only_after_a_long_time() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put).unknown(1, 2, put("a", "2"));
    for t in 0..200 {
        h.ok(2 + t % 3, 10 + 2 * t, 11 + 2 * t, get("a"), saw(Some("1")));
    }
    h.ok(5, 5000, 5001, get("a"), saw(Some("2"))).ok(6, 5002, 5003, get("a"), saw(Some("2")));
    assert_accepts(&h);
}

#[test]
fn accepts_read_of_unknown_write_then_consistent_reads() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put)
        .unknown(2, 2, put("a", "2"))
        .ok(3, 3, 4, get("a"), saw(Some("2")))
        .ok(4, 5, 6, get("a"), saw(Some("2")))
        .ok(4, 7, 8, cas("a", Some("2"), Some("3")), OpResult::Cas(true))
        .ok(3, 9, 10, get("a"), saw(Some("3")));
    assert_accepts(&h);
}

#[test]
fn accepts_unknown_delete_and_cas_taking_effect_late() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, put("a", "1"), OpResult::Put)
        .unknown(2, 2, del("a"))
        .unknown(3, 3, cas("a", None, Some("x")))
        .ok(4, 4, 5, get("a"), saw(Some("1")))
        .ok(4, 6, 7, get("a"), saw(None))
        .ok(4, 8, 9, get("a"), saw(Some("x")));
    assert_accepts(&h);
}

#[test]
fn accepts_pending_op_as_unknown() {
    let mut h = Builder::default();
    h.push(1, 0, put("a", "1"), Outcome::Pending).ok(2, 5, 6, get("a"), saw(Some("1")));
    assert_accepts(&h);
}

#[test]
fn accepts_unknown_put_needed_by_a_delete_or_failed_cas() {
    // The unknown put is never read, but it is the only explanation of `existed` and of the failed cas.
    let mut h = Builder::default();
    h.unknown(1, 0, put("a", "1")).ok(2, 5, 6, del("a"), OpResult::Delete(Some(true)));
    assert_accepts(&h);
    let mut h = Builder::default();
    h.unknown(1, 0, put("a", "1")).ok(2, 5, 6, cas("a", None, Some("2")), OpResult::Cas(false));
    assert_accepts(&h);
}

#[test]
fn accepts_delete_with_unknown_existence() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, del("a"), OpResult::Delete(None))
        .ok(1, 2, 3, put("a", "1"), OpResult::Put)
        .ok(1, 4, 5, del("a"), OpResult::Delete(None))
        .ok(1, 6, 7, get("a"), saw(None));
    assert_accepts(&h);
}

#[test]
fn accepts_cas_creating_and_deleting() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, cas("a", None, Some("1")), OpResult::Cas(true))
        .ok(1, 2, 3, get("a"), saw(Some("1")))
        .ok(1, 4, 5, cas("a", Some("1"), None), OpResult::Cas(true))
        .ok(1, 6, 7, get("a"), saw(None));
    assert_accepts(&h);
}

#[test]
fn accepts_histories_over_many_keys() {
    let mut h = Builder::default();
    for k in 0..50u64 {
        let key = format!("k{k}");
        let t = 100 * k;
        h.ok(k % 8, t, t + 10, put(&key, "1"), OpResult::Put)
            .ok(k % 8 + 8, t + 5, t + 6, get(&key), saw(if k % 2 == 0 { None } else { Some("1") }))
            .ok(k % 8, t + 11, t + 12, get(&key), saw(Some("1")));
    }
    let report = check(&h.ops, &CheckConfig::default()).expect("well-formed");
    assert!(report.is_ok(), "{}", report.result);
    assert_eq!(report.per_key.len(), 50);
}

// ---- malformed histories, budget, recorder, serialization ----

#[test]
fn malformed_histories_are_errors() {
    let mut h = Builder::default();
    h.ok(1, 0, 1, get("a"), OpResult::Put);
    assert!(matches!(check(&h.ops, &CheckConfig::default()), Err(CheckError::ResultMismatch { id: 0, .. })));
    let mut h = Builder::default();
    h.ok(1, 5, 4, get("a"), saw(None));
    assert!(matches!(check(&h.ops, &CheckConfig::default()), Err(CheckError::ReturnBeforeInvoke { id: 0, .. })));
    let mut h = Builder::default();
    h.ok(1, 0, 1, get("a"), saw(None)).ok(1, 2, 3, get("a"), saw(None));
    h.ops[1].id = 0;
    assert!(matches!(check(&h.ops, &CheckConfig::default()), Err(CheckError::DuplicateId(0))));
}

#[test]
fn budget_exhaustion_is_incomplete_not_a_verdict() {
    // Many concurrent puts and a read no order explains: the search must try many subsets before giving up.
    let mut h = Builder::default();
    for c in 0..12 {
        h.ok(c, c, 100 + c, put("a", &format!("v{c}")), OpResult::Put);
    }
    h.ok(99, 200, 201, get("a"), saw(Some("nope")));
    let config = CheckConfig { max_states_per_key: 50, ..CheckConfig::default() };
    let report = check(&h.ops, &config).expect("well-formed");
    assert!(matches!(report.result, CheckResult::Incomplete { .. }), "{}", report.result);
    assert!(!report.is_ok());
    // With the default budget the same history is decided.
    assert!(check(&h.ops, &CheckConfig::default()).expect("well-formed").result.is_violation());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_from_many_tasks_over_a_linearizable_store() {
    let history = History::new();
    let store: Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>> = Arc::default();
    let mut tasks = vec![];
    for client in 0..8u64 {
        let history = history.clone();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(client);
            for i in 0..100 {
                let key = format!("k{}", rng.random_range(0..4)).into_bytes();
                let op = match rng.random_range(0..4) {
                    0 => Op::Get { key },
                    1 => Op::Put { key, value: format!("{client}-{i}").into_bytes() },
                    2 => Op::Delete { key },
                    _ => Op::Cas { key, expected: None, new: Some(format!("{client}-{i}").into_bytes()) },
                };
                let handle = history.invoke(client, op.clone());
                tokio::task::yield_now().await;
                if i % 17 == 5 {
                    handle.unknown();
                    continue;
                }
                let result = {
                    let mut map = store.lock().unwrap_or_else(|p| p.into_inner());
                    apply(&mut map, &op)
                };
                tokio::task::yield_now().await;
                handle.ok(result);
            }
            // Left pending: never completed.
            let _pending = history.invoke(client, Op::Get { key: b"k0".to_vec() });
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(history.len(), 808);
    let report = history.check(&CheckConfig::default()).expect("well-formed");
    assert!(report.is_ok(), "{}", report.result);
}

#[test]
fn recorder_orders_ops_on_one_clock_and_catches_a_stale_read() {
    let history = History::new();
    let w = history.invoke(1, put("a", "1"));
    assert_eq!(w.id(), 0);
    w.ok(OpResult::Put);
    history.invoke(2, get("a")).ok(saw(None));
    let dropped = history.invoke(3, put("a", "2"));
    dropped.failed();
    let ops = history.operations();
    assert_eq!(ops[0].invoke, 1);
    assert!(matches!(ops[0].outcome, Outcome::Ok { ret: 2, .. }));
    assert_eq!(ops[1].invoke, 3);
    assert!(matches!(ops[2].outcome, Outcome::Failed { .. }));
    assert!(history.check(&CheckConfig::default()).expect("well-formed").result.is_violation());
    let listing = history.describe_key(b"a");
    assert!(listing.contains("#1 client 2 [t 3..4]"), "{listing}");
    assert!(listing.contains("get \"a\" -> absent"), "{listing}");
}

#[test]
fn json_round_trip_keeps_the_history_readable() {
    let history = History::new();
    history.invoke(1, put("key\n\"1\"", "v")).ok(OpResult::Put);
    history.invoke(2, Op::Cas { key: vec![0, 255, b'\\'], expected: None, new: Some(b("x")) }).unknown();
    history.invoke(2, get("plain")).ok(saw(Some("v")));
    history.invoke(3, del("plain")).ok(OpResult::Delete(None));
    let _pending = history.invoke(4, get("plain"));
    let json = history.to_json().expect("serializes");
    assert!(json.contains(r#""key": "plain""#), "{json}");
    assert!(json.contains(r#""key": "\\x00\\xff\\\\""#), "{json}");
    let back = History::from_json(&json).expect("parses");
    assert_eq!(back.operations(), history.operations());
    // Recording continues after the loaded ops on the same clock.
    let next = back.invoke(5, get("plain"));
    next.ok(saw(None));
    let ops = back.operations();
    assert!(ops[5].invoke > ops[3].invoke);
    assert!(History::from_json("{").is_err());
    assert!(History::from_json(r#"[{"id":0,"client":1,"op":{"type":"get","key":"\\q"},"invoke":1,"invoke_micros":0,"outcome":{"status":"pending"}}]"#).is_err());
}

#[test]
fn escape_round_trips_all_bytes() {
    let all: Vec<u8> = (0..=255).collect();
    let text = escape_bytes(&all);
    assert_eq!(format::unescape_bytes(&text), Ok(all));
    assert!(format::unescape_bytes("\\x").is_err());
    assert!(format::unescape_bytes("\\xzz").is_err());
    assert!(format::unescape_bytes("tail\\").is_err());
}

// ---- randomized histories ----

/// The reference register store the generated histories are executed against.
fn apply(map: &mut HashMap<Vec<u8>, Vec<u8>>, op: &Op) -> OpResult {
    match op {
        Op::Get { key } => OpResult::Get(map.get(key).cloned()),
        Op::Put { key, value } => {
            map.insert(key.clone(), value.clone());
            OpResult::Put
        }
        Op::Delete { key } => OpResult::Delete(Some(map.remove(key).is_some())),
        Op::Cas { key, expected, new } => {
            if map.get(key) != expected.as_ref() {
                return OpResult::Cas(false);
            }
            match new {
                Some(v) => map.insert(key.clone(), v.clone()),
                None => map.remove(key),
            };
            OpResult::Cas(true)
        }
    }
}

struct GenConfig {
    clients: u64,
    ops_per_client: usize,
    keys: usize,
    unknown_prob: f64,
    /// Longest time between an op's invocation and its return; 0 makes the history sequential.
    max_latency: u64,
}

/// A random history whose results come from executing each op against [`apply`] at a random point inside
/// its interval (unknown ops: at a random, possibly much later point, or never), so it is linearizable.
fn generate(rng: &mut StdRng, g: &GenConfig) -> Vec<Operation> {
    let mut planned: Vec<(Operation, Option<u64>)> = vec![];
    let mut written: Vec<Vec<Vec<u8>>> = vec![vec![]; g.keys];
    let mut sequential_clock = 0;
    for client in 0..g.clients {
        let mut t = rng.random_range(0..10);
        for i in 0..g.ops_per_client {
            let k = rng.random_range(0..g.keys);
            let key = format!("k{k}").into_bytes();
            let value = format!("c{client}-{i}").into_bytes();
            let op = match rng.random_range(0..10) {
                0..=3 => Op::Get { key },
                4..=6 => Op::Put { key, value: value.clone() },
                7 => Op::Delete { key },
                _ => {
                    let expected = if written[k].is_empty() || rng.random_bool(0.2) {
                        None
                    } else {
                        Some(written[k][rng.random_range(0..written[k].len())].clone())
                    };
                    Op::Cas { key, expected, new: if rng.random_bool(0.15) { None } else { Some(value.clone()) } }
                }
            };
            if matches!(op, Op::Put { .. } | Op::Cas { new: Some(_), .. }) {
                written[k].push(value);
            }
            let (invoke, lin, ret) = if g.max_latency == 0 {
                // Sequential: one op at a time over all clients (ticks spaced so lin is strictly inside).
                sequential_clock += 3;
                (sequential_clock, sequential_clock + 1, sequential_clock + 2)
            } else {
                let lin = t + rng.random_range(1..=g.max_latency);
                (t, lin, lin + rng.random_range(1..=g.max_latency))
            };
            let id = planned.len() as u64;
            let mut operation = Operation { id, client, op, invoke, invoke_micros: invoke, outcome: Outcome::Pending };
            if rng.random_bool(g.unknown_prob) {
                operation.outcome = Outcome::Unknown { noticed: ret, noticed_micros: ret };
                let lin = if rng.random_bool(0.5) { None } else { Some(invoke + 1 + rng.random_range(0..500)) };
                planned.push((operation, lin));
            } else {
                operation.outcome = Outcome::Ok { ret, ret_micros: ret, result: OpResult::Put };
                planned.push((operation, Some(lin)));
            }
            t = ret + rng.random_range(1..=3);
        }
    }
    let mut order: Vec<(u64, u64, usize)> =
        planned.iter().enumerate().filter_map(|(i, (_, lin))| lin.map(|l| (l, rng.random::<u64>(), i))).collect();
    order.sort_unstable();
    let mut map = HashMap::new();
    for (_, _, i) in order {
        let (operation, _) = &mut planned[i];
        let mut result = apply(&mut map, &operation.op);
        if let (OpResult::Delete(existed), true) = (&mut result, rng.random_bool(0.3)) {
            *existed = None;
        }
        if let Outcome::Ok { result: slot, .. } = &mut operation.outcome {
            *slot = result;
        }
    }
    planned.into_iter().map(|(o, _)| o).collect()
}

/// Makes one known read return a value nobody wrote; returns false when the history has no known read.
fn corrupt_one_read(rng: &mut StdRng, ops: &mut [Operation]) -> bool {
    let reads: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o.outcome, Outcome::Ok { result: OpResult::Get(_), .. }))
        .map(|(i, _)| i)
        .collect();
    if reads.is_empty() {
        return false;
    }
    let i = reads[rng.random_range(0..reads.len())];
    if let Outcome::Ok { result, .. } = &mut ops[i].outcome {
        *result = OpResult::Get(Some(b"never-written".to_vec()));
    }
    true
}

#[test]
fn random_sequential_histories_accepted_and_corrupted_rejected() {
    let mut rng = StdRng::seed_from_u64(7);
    for case in 0..200 {
        let g = GenConfig { clients: 3, ops_per_client: 20, keys: 3, unknown_prob: 0.0, max_latency: 0 };
        let mut ops = generate(&mut rng, &g);
        let r = verdict(&ops);
        assert!(r.is_ok(), "case {case}: {r}\n{}", describe_all(&ops));
        if corrupt_one_read(&mut rng, &mut ops) {
            assert!(verdict(&ops).is_violation(), "case {case}: corrupted read accepted\n{}", describe_all(&ops));
        }
    }
}

#[test]
fn random_concurrent_histories_accepted_and_corrupted_rejected() {
    let mut rng = StdRng::seed_from_u64(11);
    for case in 0..100 {
        let g = GenConfig {
            clients: rng.random_range(2..=8),
            ops_per_client: rng.random_range(5..=30),
            keys: rng.random_range(1..=4),
            unknown_prob: [0.0, 0.05, 0.2][case % 3],
            max_latency: rng.random_range(1..=30),
        };
        let mut ops = generate(&mut rng, &g);
        let r = verdict(&ops);
        assert!(r.is_ok(), "case {case}: {r}\n{}", describe_all(&ops));
        if corrupt_one_read(&mut rng, &mut ops) {
            assert!(verdict(&ops).is_violation(), "case {case}: corrupted read accepted\n{}", describe_all(&ops));
        }
    }
}

#[test]
fn large_concurrent_history_is_checked_within_budget() {
    // ~10k ops over 20 keys from 16 clients, 2% unknown.
    let mut rng = StdRng::seed_from_u64(2024);
    let g = GenConfig { clients: 16, ops_per_client: 640, keys: 20, unknown_prob: 0.02, max_latency: 40 };
    let mut ops = generate(&mut rng, &g);
    assert_eq!(ops.len(), 10_240);
    let report = check(&ops, &CheckConfig::default()).expect("well-formed");
    assert!(report.is_ok(), "{}", report.result);
    assert!(corrupt_one_read(&mut rng, &mut ops));
    assert!(check(&ops, &CheckConfig::default()).expect("well-formed").result.is_violation());
}

// ---- cross-check against a brute-force oracle ----

/// The definition, searched naively: some order of all known ops and any subset of unknown ops that respects
/// real time (an op that returned before another was invoked comes first) and the register's semantics.
fn brute_force_linearizable(ops: &[Operation]) -> bool {
    fn ret(o: &Operation) -> Option<u64> {
        match &o.outcome {
            Outcome::Ok { ret, .. } => Some(*ret),
            _ => None,
        }
    }
    fn legal(map: &mut HashMap<Vec<u8>, Vec<u8>>, o: &Operation) -> bool {
        let got = apply(map, &o.op);
        match (&o.outcome, got) {
            (Outcome::Ok { result: OpResult::Delete(None), .. }, OpResult::Delete(_)) => true,
            (Outcome::Ok { result, .. }, got) => *result == got,
            _ => true,
        }
    }
    fn search(ops: &[&Operation], used: &mut Vec<bool>, map: &HashMap<Vec<u8>, Vec<u8>>) -> bool {
        if ops.iter().zip(used.iter()).all(|(o, &u)| u || ret(o).is_none()) {
            return true;
        }
        for i in 0..ops.len() {
            if used[i] {
                continue;
            }
            // Every op placed after this one must not have returned before this one was invoked.
            let respects_real_time = ops
                .iter()
                .zip(used.iter())
                .enumerate()
                .all(|(j, (o, &u))| u || j == i || ret(o).is_none_or(|r| r >= ops[i].invoke));
            if !respects_real_time {
                continue;
            }
            let mut next = map.clone();
            if legal(&mut next, ops[i]) {
                used[i] = true;
                if search(ops, used, &next) {
                    return true;
                }
                used[i] = false;
            }
        }
        false
    }
    let live: Vec<&Operation> = ops.iter().filter(|o| !matches!(o.outcome, Outcome::Failed { .. })).collect();
    search(&live, &mut vec![false; live.len()], &HashMap::new())
}

fn random_result(rng: &mut StdRng, op: &Op) -> OpResult {
    let values = [None, Some(b("1")), Some(b("2"))];
    match op {
        Op::Get { .. } => OpResult::Get(values[rng.random_range(0..3)].clone()),
        Op::Put { .. } => OpResult::Put,
        Op::Delete { .. } => OpResult::Delete([None, Some(true), Some(false)][rng.random_range(0..3)]),
        Op::Cas { .. } => OpResult::Cas(rng.random_bool(0.5)),
    }
}

#[test]
fn agrees_with_brute_force_on_small_histories() {
    let mut rng = StdRng::seed_from_u64(99);
    let (mut yes, mut no) = (0, 0);
    for case in 0..3000 {
        let g = GenConfig {
            clients: if case % 2 == 0 { rng.random_range(1..=3) } else { 4 },
            ops_per_client: if case % 2 == 0 { rng.random_range(1..=3) } else { 2 },
            keys: 1,
            unknown_prob: [0.1, 0.3, 0.5][case % 3],
            max_latency: rng.random_range(1..=6),
        };
        let mut ops = generate(&mut rng, &g);
        // Small value domain so that random results are sometimes right.
        for o in &mut ops {
            match &mut o.op {
                Op::Put { value, .. } => *value = b(["1", "2"][rng.random_range(0..2)]),
                Op::Cas { expected, new, .. } => {
                    *expected = [None, Some(b("1")), Some(b("2"))][rng.random_range(0..3)].clone();
                    *new = [None, Some(b("1")), Some(b("2"))][rng.random_range(0..3)].clone();
                }
                _ => {}
            }
            if rng.random_bool(0.5) {
                let fresh = random_result(&mut rng, &o.op);
                if let Outcome::Ok { result, .. } = &mut o.outcome {
                    *result = fresh;
                }
            } else if let Outcome::Ok { result, .. } = &mut o.outcome {
                // Keep the result's variant consistent with the (possibly rewritten) op.
                if std::mem::discriminant(result) != std::mem::discriminant(&random_result(&mut rng, &o.op)) {
                    *result = random_result(&mut rng, &o.op);
                }
            }
        }
        let expected = brute_force_linearizable(&ops);
        let got = verdict(&ops);
        assert_eq!(got.is_ok(), expected, "case {case}: checker says {got}\n{}", describe_all(&ops));
        assert!(got.is_ok() || got.is_violation(), "case {case}: {got}");
        if expected {
            yes += 1;
        } else {
            no += 1;
        }
    }
    assert!(yes > 500 && no > 500, "both verdicts exercised: {yes} linearizable, {no} not");
}
