//! Unit tests of the routing layer without a cluster: key → shard → where the request goes,
//! the hop limit, the hint cache, and exact paging of scans merged over shards.

use std::collections::BTreeSet;

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;
use crate::api::{BatchOp, Id128, KeyValue, MembershipChange};

const ME: NodeId = 7;

fn get(key: &[u8], consistency: ReadConsistency) -> ClientRequest {
    ClientRequest::Get { key: key.to_vec(), consistency }
}

fn put(key: &[u8]) -> ClientRequest {
    ClientRequest::Write {
        session: WriteSession { client_id: Id128([1; 16]), seq: 1 },
        command: WriteCommand::Put { key: key.to_vec(), value: b"v".to_vec() },
    }
}

/// A key of each shard of `router`.
fn key_of_each_shard(router: &ShardRouter) -> Vec<Vec<u8>> {
    (0..router.num_shards())
        .map(|s| {
            (0..10_000u32)
                .map(|i| format!("key-{i}").into_bytes())
                .find(|k| router.shard_for_key(k) == s)
                .expect("some key falls into every shard")
        })
        .collect()
}

#[test]
fn a_key_goes_to_its_shard_here_or_to_a_host() {
    let router = ShardRouter::new(4);
    let hosted: BTreeSet<ShardId> = [0, 2].into();
    let is_hosted = |s| hosted.contains(&s);
    for (shard, key) in key_of_each_shard(&router).iter().enumerate() {
        let shard = shard as ShardId;
        let lin = plan(ME, &router, is_hosted, &get(key, ReadConsistency::Linearizable), 0).unwrap();
        let stale = plan(ME, &router, is_hosted, &get(key, ReadConsistency::Stale), 0).unwrap();
        let write = plan(ME, &router, is_hosted, &put(key), 0).unwrap();
        if hosted.contains(&shard) {
            assert_eq!(lin, Route::ToLeader(shard), "a linearizable get needs the leader of shard {shard}");
            assert_eq!(stale, Route::Here, "a stale get is answered by the local replica");
            assert_eq!(write, Route::ToLeader(shard));
        } else {
            for route in [lin, stale, write] {
                assert_eq!(route, Route::ViaHost(shard), "shard {shard} is not hosted here");
            }
        }
    }
}

#[test]
fn requests_for_no_shard_are_coordinated_on_shard_0() {
    let router = ShardRouter::new(4);
    let promote = ClientRequest::Promote { node_id: 3 };
    assert_eq!(plan(ME, &router, |_| true, &promote, 0).unwrap(), Route::ToLeader(0));
    assert_eq!(plan(ME, &router, |s| s != 0, &promote, 0).unwrap(), Route::ViaHost(0));
    assert_eq!(plan(ME, &router, |_| true, &ClientRequest::NodeStatus, 0).unwrap(), Route::Here);
    let scan = ClientRequest::Scan(ScanRequest {
        prefix: vec![],
        start: None,
        end: None,
        limit: 10,
        continuation: None,
        consistency: ReadConsistency::Linearizable,
    });
    assert_eq!(plan(ME, &router, |_| false, &scan, 0).unwrap(), Route::Here, "a scan fans out from here");
    let change = ClientRequest::ShardMembership { shard: 3, change: MembershipChange::AddVoter { node_id: 2 } };
    assert_eq!(plan(ME, &router, |_| true, &change, 0).unwrap(), Route::ToLeader(3));
}

#[test]
fn requests_travel_at_most_two_hops() {
    let router = ShardRouter::new(4);
    let key = &key_of_each_shard(&router)[1];
    for hops in 0..MAX_HOPS {
        assert_eq!(plan(ME, &router, |s| s != 1, &put(key), hops).unwrap(), Route::ViaHost(1), "hops {hops}");
    }
    match plan(ME, &router, |s| s != 1, &put(key), MAX_HOPS) {
        Err(ApiError::Unavailable(m)) => assert!(m.contains("shard 1 is not hosted on node 7"), "{m}"),
        other => panic!("a third hop must be refused: {other:?}"),
    }
    // A node that hosts the shard still answers (or asks its own Raft leader) after two hops.
    assert_eq!(plan(ME, &router, |_| true, &put(key), MAX_HOPS).unwrap(), Route::ToLeader(1));
}

#[test]
fn shards_that_do_not_exist_and_batches_over_shards_are_refused() {
    let router = ShardRouter::new(4);
    let scan = ScanRequest {
        prefix: vec![],
        start: None,
        end: None,
        limit: 1,
        continuation: None,
        consistency: ReadConsistency::Stale,
    };
    let bad = ClientRequest::ShardScan { shard: 4, scan };
    assert!(matches!(plan(ME, &router, |_| true, &bad, 0), Err(ApiError::InvalidRequest(m)) if m.contains("shard 4")));
    let keys = key_of_each_shard(&router);
    let ops = vec![
        BatchOp::Put { key: keys[0].clone(), value: vec![] },
        BatchOp::Put { key: keys[1].clone(), value: vec![] },
    ];
    assert!(matches!(write_shard(&router, &WriteCommand::Batch { ops }), Err(ApiError::InvalidRequest(_))));
    let ops = vec![BatchOp::Delete { key: keys[2].clone() }, BatchOp::Put { key: keys[2].clone(), value: vec![] }];
    assert_eq!(write_shard(&router, &WriteCommand::Batch { ops }).unwrap(), 2);
}

#[test]
fn txns_over_shards_are_refused_naming_them() {
    use crate::api::{Compare, CompareOp, TxnOp};
    let router = ShardRouter::new(4);
    let keys = key_of_each_shard(&router);
    let txn = |compares, success, failure| WriteCommand::Txn { compares, success, failure };
    let one = txn(
        vec![Compare::version(keys[3].clone(), CompareOp::Equal, 0)],
        vec![TxnOp::put(keys[3].clone(), "v")],
        vec![TxnOp::get(keys[3].clone())],
    );
    assert_eq!(write_shard(&router, &one).unwrap(), 3);
    let request = ClientRequest::Write { session: WriteSession { client_id: Id128([1; 16]), seq: 1 }, command: one };
    assert_eq!(plan(ME, &router, |_| true, &request, 0).unwrap(), Route::ToLeader(3));
    // A key of another shard in any part of the txn, even the branch that may not run.
    let spans = [
        (
            txn(
                vec![Compare::version(keys[1].clone(), CompareOp::Equal, 0)],
                vec![TxnOp::get(keys[3].clone())],
                vec![],
            ),
            "1 and 3",
        ),
        (txn(vec![], vec![TxnOp::get(keys[3].clone())], vec![TxnOp::delete(keys[1].clone())]), "1 and 3"),
        (
            txn(
                vec![Compare::value(keys[2].clone(), CompareOp::Equal, "x")],
                vec![TxnOp::put(keys[0].clone(), "v")],
                vec![TxnOp::get(keys[3].clone())],
            ),
            "0, 2 and 3",
        ),
    ];
    for (command, shards) in spans {
        let want = format!("txn keys span shards {shards}; a txn is atomic within one shard only");
        match write_shard(&router, &command) {
            Err(ApiError::InvalidRequest(m)) => assert_eq!(m, want),
            other => panic!("a txn over shards {shards} must be refused: {other:?}"),
        }
        let request = ClientRequest::Write { session: WriteSession { client_id: Id128([1; 16]), seq: 1 }, command };
        assert!(matches!(plan(ME, &router, |_| true, &request, 0), Err(ApiError::InvalidRequest(m)) if m == want));
    }
}

#[test]
fn prefix_deletes_fan_out_from_here_and_shard_writes_go_to_their_shard() {
    let session = WriteSession { client_id: Id128([1; 16]), seq: 1 };
    let dp = || WriteCommand::DeletePrefix { prefix: b"p/".to_vec() };
    let write = ClientRequest::Write { session, command: dp() };
    let sharded = ShardRouter::new(4);
    assert!(fans_out(&sharded, &write));
    for hops in 0..=MAX_HOPS {
        assert_eq!(plan(ME, &sharded, |_| false, &write, hops).unwrap(), Route::Here, "coordinated where it arrives");
    }
    assert!(matches!(write_shard(&sharded, &dp()), Err(ApiError::InvalidRequest(m)) if m.contains("all 4 shards")));
    // Without sharding it is an ordinary write of shard 0.
    let single = ShardRouter::new(1);
    assert!(!fans_out(&single, &write));
    assert_eq!(plan(ME, &single, |_| true, &write, 0).unwrap(), Route::ToLeader(0));
    assert_eq!(write_shard(&single, &dp()).unwrap(), 0);
    // Each shard's part goes to that shard's leader, or to a node hosting it.
    let part = |shard| ClientRequest::ShardWrite { shard, session, command: dp() };
    assert_eq!(plan(ME, &sharded, |_| true, &part(2), 0).unwrap(), Route::ToLeader(2));
    assert_eq!(plan(ME, &sharded, |s| s != 2, &part(2), 0).unwrap(), Route::ViaHost(2));
    assert!(
        matches!(plan(ME, &sharded, |_| true, &part(4), 0), Err(ApiError::InvalidRequest(m)) if m.contains("shard 4"))
    );
    assert!(!fans_out(&sharded, &part(1)), "a shard's part never fans out again");
}

#[test]
fn prefix_delete_outcomes_are_summed_over_shards() {
    let dp = |revision, deleted| WriteOutcome::DeletePrefix { revision, deleted };
    assert_eq!(merge_delete_prefix([dp(7, 2), dp(3, 0), dp(12, 5), dp(1, 1)]).unwrap(), dp(12, 8));
    assert_eq!(merge_delete_prefix([dp(4, 0)]).unwrap(), dp(4, 0));
    // One shard's part superseded: the outcome of the whole is unknown.
    let stale = |last_seq| WriteOutcome::StaleSequence { last_seq };
    assert_eq!(merge_delete_prefix([dp(7, 2), stale(5), stale(9)]).unwrap(), stale(9));
    assert!(matches!(merge_delete_prefix([dp(1, 1), WriteOutcome::Put { revision: 1 }]), Err(ApiError::Internal(_))));
}

#[test]
fn hints_follow_answers_and_the_newest_announced_term() {
    let hints = ShardHints::default();
    assert_eq!(hints.known_host(1, ME), None);
    hints.set(1, Some(3));
    assert_eq!(hints.known_host(1, ME), Some(3), "a NotLeader answer's leader is remembered");
    hints.set(1, None);
    assert_eq!(hints.known_host(1, ME), None, "an unreachable host is forgotten");

    let lead = |shard, leader, term| LeaderHint { shard, leader, term };
    hints.note_announcement(2, &[0, 1], &[lead(1, 2, 5)], |s| s == 0);
    assert_eq!(hints.leader(1), Some(2));
    hints.note_announcement(4, &[0, 1], &[lead(1, 4, 4)], |s| s == 0);
    assert_eq!(hints.leader(1), Some(2), "an older term does not replace a newer one");
    hints.note_announcement(4, &[0, 1], &[lead(1, 4, 6)], |s| s == 0);
    assert_eq!(hints.leader(1), Some(4), "a newer term does");
    hints.note_announcement(4, &[0, 1], &[lead(0, 4, 9)], |s| s == 0);
    assert_eq!(hints.leader(0), None, "hints for shards hosted here are ignored: Raft knows their leaders");

    // Without a leader hint, a node that announced hosting the shard, never this node.
    hints.set(1, None);
    hints.note_announcement(ME, &[2], &[], |_| false);
    assert_eq!(hints.known_host(2, ME), None, "this node is no host to forward to");
    hints.note_announcement(9, &[2], &[], |_| false);
    assert_eq!(hints.known_host(2, ME), Some(9));
    hints.note_announcement(9, &[3], &[], |_| false);
    assert_eq!(hints.known_host(2, ME), None, "a new announcement replaces the node's old shard list");
    assert_eq!(hints.known_host(3, ME), Some(9));
}

fn kv(key: &[u8]) -> KeyValue {
    // Values of a few sizes, fixed per key, so byte caps cut pages at different places.
    let size = (key.iter().map(|b| *b as usize).sum::<usize>() % 4) * 10;
    KeyValue { key: key.to_vec(), value: vec![b'v'; size], create_revision: 1, mod_revision: 1, version: 1 }
}

/// What one shard answers: the keys after the continuation, at most `limit` — fewer when the
/// page is cut short by its byte cap (`cut`) — and a continuation when more may follow (as
/// `storage::scan::scan_local` does).
fn shard_page(keys: &BTreeSet<Vec<u8>>, after: Option<&Vec<u8>>, limit: usize, cut: Option<usize>) -> ScanPage {
    let mut rest = keys.iter().filter(|k| after.is_none_or(|a| *k > a)).peekable();
    let take = cut.map_or(limit, |c| c.clamp(1, limit));
    let entries: Vec<KeyValue> = rest.by_ref().take(take).map(|k| kv(k)).collect();
    let continuation = if rest.peek().is_some() { entries.last().map(|e| e.key.clone()) } else { None };
    ScanPage { entries, continuation }
}

#[test]
fn merged_scan_pages_cover_every_key_once_in_order_within_their_byte_cap() {
    let mut rng = StdRng::seed_from_u64(0x5ca9);
    for round in 0..200 {
        let shards = rng.random_range(1..=5usize);
        let limit = rng.random_range(1..=8usize);
        let mut per_shard = vec![BTreeSet::new(); shards];
        // Each key lives in one shard (picked at random, as a hash would).
        let home: Vec<usize> = (0..200).map(|_| rng.random_range(0..shards)).collect();
        for _ in 0..rng.random_range(0..60) {
            let n = rng.random_range(0..200usize);
            per_shard[home[n]].insert(format!("k{n:03}").into_bytes());
        }
        let everything: Vec<Vec<u8>> =
            per_shard.iter().flatten().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        let mut seen = Vec::new();
        let mut continuation: Option<Vec<u8>> = None;
        for _page in 0..=everything.len() * 2 + 1 {
            let pages: Vec<ScanPage> = per_shard
                .iter()
                .map(|keys| {
                    let cut = rng.random_bool(0.3).then(|| rng.random_range(1..=limit));
                    shard_page(keys, continuation.as_ref(), limit, cut)
                })
                .collect();
            let max_bytes = if rng.random_bool(0.5) { usize::MAX } else { rng.random_range(1..=80usize) };
            let merged = merge_scan_pages(pages, limit, max_bytes);
            assert!(merged.entries.len() <= limit, "round {round}: a page holds at most {limit} keys");
            let sizes: Vec<usize> = merged.entries.iter().map(|e| e.key.len() + e.value.len()).collect();
            let before_last: usize = sizes.iter().rev().skip(1).sum();
            assert!(before_last < max_bytes, "round {round}: the page went on after reaching {max_bytes} bytes");
            seen.extend(merged.entries.iter().map(|e| e.key.clone()));
            match merged.continuation {
                Some(c) => {
                    assert!(!merged.entries.is_empty(), "round {round}: a page that promises more holds keys");
                    continuation = Some(c);
                }
                None => break,
            }
        }
        assert_eq!(seen, everything, "round {round}: every key once, in order ({shards} shards, limit {limit})");
    }
}
