//! The state machine: puts, deletes, CAS, batches, prefix deletes and txns with their revisions, and
//! exactly-once sessions.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_put_delete_cas_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    assert_eq!(sm.applied_state().await.unwrap(), (None, StoredMembership::default()));

    let results = apply(&mut sm, vec![blank(1, 1), membership(1, 2, &[1, 2])]).await;
    assert_eq!(results, vec![ApplyResult(vec![]), ApplyResult(vec![])], "Raft's own entries have no outcome");

    // Put: creates, then modifies; mod_revision is the write's revision, version counts writes.
    assert_eq!(apply_write(&mut sm, put(1, 3, "a", b"v1")).await, WriteOutcome::Put { revision: rev(3) });
    assert_eq!(get(&r, "a"), Some(kv("a", b"v1", 3, 3, 1)));
    assert_eq!(apply_write(&mut sm, put(1, 4, "a", b"v2")).await, WriteOutcome::Put { revision: rev(4) });
    assert_eq!(get(&r, "a"), Some(kv("a", b"v2", 3, 4, 2)));

    // Cas with the current value succeeds.
    assert_eq!(
        apply_write(&mut sm, cas(1, 5, "a", Some(b"v2"), b"v3")).await,
        WriteOutcome::Cas { revision: rev(5), succeeded: true, current: None }
    );
    assert_eq!(get(&r, "a"), Some(kv("a", b"v3", 3, 5, 3)));
    // Cas with a stale value fails, reports the current value and changes nothing.
    assert_eq!(
        apply_write(&mut sm, cas(1, 6, "a", Some(b"v2"), b"v4")).await,
        WriteOutcome::Cas { revision: rev(6), succeeded: false, current: Some(b"v3".to_vec()) }
    );
    assert_eq!(get(&r, "a"), Some(kv("a", b"v3", 3, 5, 3)));
    // Cas expecting absence succeeds only when the key is absent.
    assert_eq!(
        apply_write(&mut sm, cas(1, 7, "b", None, b"b1")).await,
        WriteOutcome::Cas { revision: rev(7), succeeded: true, current: None }
    );
    assert_eq!(get(&r, "b"), Some(kv("b", b"b1", 7, 7, 1)));
    assert_eq!(
        apply_write(&mut sm, cas(1, 8, "b", None, b"b2")).await,
        WriteOutcome::Cas { revision: rev(8), succeeded: false, current: Some(b"b1".to_vec()) }
    );
    assert_eq!(get(&r, "b"), Some(kv("b", b"b1", 7, 7, 1)));
    // Cas expecting a value of an absent key fails and does not create it.
    assert_eq!(
        apply_write(&mut sm, cas(1, 9, "c", Some(b"x"), b"c1")).await,
        WriteOutcome::Cas { revision: rev(9), succeeded: false, current: None }
    );
    assert_eq!(get(&r, "c"), None);

    // Delete reports whether the key existed; a put after a delete starts a new life.
    assert_eq!(
        apply_write(&mut sm, delete(2, 10, "a")).await,
        WriteOutcome::Delete { revision: rev(10), deleted: true }
    );
    assert_eq!(get(&r, "a"), None);
    assert_eq!(
        apply_write(&mut sm, delete(2, 11, "a")).await,
        WriteOutcome::Delete { revision: rev(11), deleted: false }
    );
    assert_eq!(apply_write(&mut sm, put(2, 12, "a", b"v5")).await, WriteOutcome::Put { revision: rev(12) });
    assert_eq!(get(&r, "a"), Some(kv("a", b"v5", 12, 12, 1)), "version and create_revision reset");

    // Batch: every op at the batch's revision, in order.
    let ops = vec![bput("x", b"x1"), bput("y", b"y1"), bdel("b"), bput("a", b"v6")];
    assert_eq!(apply_write(&mut sm, batch(2, 13, ops)).await, WriteOutcome::Batch { revision: rev(13) });
    assert_eq!(get(&r, "x"), Some(kv("x", b"x1", 13, 13, 1)));
    assert_eq!(get(&r, "y"), Some(kv("y", b"y1", 13, 13, 1)));
    assert_eq!(get(&r, "b"), None);
    assert_eq!(get(&r, "a"), Some(kv("a", b"v6", 12, 13, 2)));
    let ops = vec![bput("z", b"z1"), bdel("z"), bdel("y"), bput("y", b"y2"), bput("x", b"x2"), bput("x", b"x3")];
    assert_eq!(apply_write(&mut sm, batch(2, 14, ops)).await, WriteOutcome::Batch { revision: rev(14) });
    assert_eq!(get(&r, "z"), None, "put then delete in one batch leaves nothing");
    assert_eq!(get(&r, "y"), Some(kv("y", b"y2", 14, 14, 1)), "delete then put in one batch recreates");
    assert_eq!(get(&r, "x"), Some(kv("x", b"x3", 13, 14, 3)), "each put of a batch counts as a write");

    // Several entries in one apply: one result each, in order, each seeing the ones before.
    let results = apply(
        &mut sm,
        vec![put(3, 15, "m", b"1"), cas(3, 16, "m", Some(b"1"), b"2"), blank(3, 17), delete(3, 18, "m")],
    )
    .await;
    assert_eq!(
        results,
        vec![
            ApplyResult(vec![WriteOutcome::Put { revision: rev(15) }]),
            ApplyResult(vec![WriteOutcome::Cas { revision: rev(16), succeeded: true, current: None }]),
            ApplyResult(vec![]),
            ApplyResult(vec![WriteOutcome::Delete { revision: rev(18), deleted: true }]),
        ]
    );
    assert_eq!(get(&r, "m"), None);

    let (last_applied, stored) = sm.applied_state().await.unwrap();
    assert_eq!(last_applied, Some(log_id(3, 18)));
    assert_eq!(stored, StoredMembership::new(Some(log_id(1, 2)), membership_of(&[1, 2])));
    assert_eq!(r.last_applied().unwrap(), Some(log_id(3, 18)));
    let keys: Vec<Vec<u8>> = all_keys(&r).into_iter().map(|k| k.key).collect();
    assert_eq!(keys, vec![b"a".to_vec(), b"x".to_vec(), b"y".to_vec()]);
    assert_eq!(r.key_count().unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_writes_apply_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    let x = client(1);
    let y = client(2);
    let z = client(3);

    // A CAS that succeeded, retried at a later index: the first outcome again, nothing re-applied
    // (re-applying would now fail the CAS and report the current value).
    let cas_req = request(x, 1, WriteCommand::Cas { key: b"k".to_vec(), expected: None, new_value: b"v1".to_vec() });
    let first = apply_write(&mut sm, normal(1, 1, cas_req.clone())).await;
    assert_eq!(first, WriteOutcome::Cas { revision: rev(1), succeeded: true, current: None });
    assert_eq!(apply_write(&mut sm, normal(1, 2, cas_req.clone())).await, first);
    assert_eq!(get(&r, "k"), Some(kv("k", b"v1", 1, 1, 1)));

    // A put retried does not bump the version or the mod revision.
    let put_req = request(y, 1, put_cmd("p", b"a"));
    assert_eq!(apply_write(&mut sm, normal(1, 3, put_req.clone())).await, WriteOutcome::Put { revision: rev(3) });
    assert_eq!(apply_write(&mut sm, normal(2, 4, put_req.clone())).await, WriteOutcome::Put { revision: rev(3) });
    assert_eq!(get(&r, "p"), Some(kv("p", b"a", 3, 3, 1)));

    // The session moves on; an older sequence number is stale and changes nothing.
    assert_eq!(
        apply_write(&mut sm, normal(2, 5, request(y, 2, put_cmd("p", b"b")))).await,
        WriteOutcome::Put { revision: rev(5) }
    );
    assert_eq!(apply_write(&mut sm, normal(2, 6, put_req.clone())).await, WriteOutcome::StaleSequence { last_seq: 2 });
    assert_eq!(get(&r, "p"), Some(kv("p", b"b", 3, 5, 2)));
    // The current sequence number still answers with its outcome after a stale one.
    assert_eq!(
        apply_write(&mut sm, normal(2, 7, request(y, 2, put_cmd("p", b"b")))).await,
        WriteOutcome::Put { revision: rev(5) }
    );
    assert_eq!(get(&r, "p"), Some(kv("p", b"b", 3, 5, 2)));

    // A retry in the same apply batch as the original is deduplicated too.
    let z_req = request(z, 1, put_cmd("q", b"z"));
    let results = apply(&mut sm, vec![normal(2, 8, z_req.clone()), normal(2, 9, z_req.clone())]).await;
    assert_eq!(results, vec![ApplyResult(vec![WriteOutcome::Put { revision: rev(8) }]); 2]);
    assert_eq!(get(&r, "q"), Some(kv("q", b"z", 8, 8, 1)));

    // One entry carrying several writes (concurrent client writes proposed together): each write
    // gets its own outcome, in order, with a revision of its own (the entry's index and its place
    // in it), and a retry inside the same entry is answered with the first outcome.
    let w = client(0x57);
    let multi = Entry {
        log_id: log_id(2, 10),
        payload: EntryPayload::Normal(WriteBatch(vec![
            request(w, 1, put_cmd("m1", b"a")),
            request(client(0x58), 1, WriteCommand::Delete { key: b"q".to_vec() }),
            request(w, 1, put_cmd("m1", b"a")),
            request(
                client(0x59),
                1,
                WriteCommand::Cas { key: b"m2".to_vec(), expected: None, new_value: b"c".to_vec() },
            ),
        ])),
    };
    let results = apply(&mut sm, vec![multi]).await;
    assert_eq!(
        results,
        vec![ApplyResult(vec![
            WriteOutcome::Put { revision: rev(10) },
            WriteOutcome::Delete { revision: rev(10) + 1, deleted: true },
            WriteOutcome::Put { revision: rev(10) },
            WriteOutcome::Cas { revision: rev(10) + 3, succeeded: true, current: None },
        ])]
    );
    assert!(rev(10) + 3 < rev(11), "an entry's revisions come before the next entry's");
    assert_eq!(get(&r, "m1"), Some(kv("m1", b"a", 10, 10, 1)));
    assert_eq!(get(&r, "q"), None);
    let m2 = get(&r, "m2").unwrap();
    assert_eq!((m2.create_revision, m2.mod_revision, m2.version), (rev(10) + 3, rev(10) + 3, 1));

    // Sessions survive a restart.
    drop((r, sm));
    let mut sm = open_sm(dir.path());
    assert_eq!(apply_write(&mut sm, normal(3, 10, cas_req)).await, first);
    assert_eq!(apply_write(&mut sm, normal(3, 11, put_req)).await, WriteOutcome::StaleSequence { last_seq: 2 });
    assert_eq!(get(&sm.reader(), "k"), Some(kv("k", b"v1", 1, 1, 1)));
    assert_eq!(get(&sm.reader(), "p"), Some(kv("p", b"b", 3, 5, 2)));
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(3, 11)), "deduplicated entries are applied");
}

fn names(reader: &StateReader) -> Vec<Vec<u8>> {
    all_keys(reader).into_iter().map(|kv| kv.key).collect()
}

fn raw_put(index: u64, key: &[u8]) -> Entry {
    let cmd = WriteCommand::Put { key: key.to_vec(), value: b"raw".to_vec() };
    normal(1, index, request(unique_client(index), 1, cmd))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_prefix_deletes_each_key_of_the_prefix_like_delete() {
    let (dir, plain_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut sm, mut plain) = (open_sm(dir.path()), open_sm(plain_dir.path()));
    let r = sm.reader();
    let keys = ["a", "a/1", "a/2", "a/2/x", "a0", "b/1", "b/2"];
    let mut setup: Vec<Entry> = keys.iter().zip(1..).map(|(k, i)| put(1, i, k, b"v")).collect();
    setup.push(put(1, 8, "a/1", b"v2"));
    apply(&mut sm, setup.clone()).await;
    apply(&mut plain, setup).await;

    // Every key with the prefix, in one entry, at its revision; "a" and "a0" do not start with "a/".
    assert_eq!(
        apply_write(&mut sm, delete_prefix(1, 9, b"a/")).await,
        WriteOutcome::DeletePrefix { revision: rev(9), deleted: 3 }
    );
    assert_eq!(names(&r), [&b"a"[..], b"a0", b"b/1", b"b/2"]);
    assert_eq!(get(&r, "a"), Some(kv("a", b"v", 1, 1, 1)), "keys outside the prefix keep their revisions");
    assert_eq!(get(&r, "b/2"), Some(kv("b/2", b"v", 7, 7, 1)));
    // The same state as deleting each key (the plain replica deletes them in one batch).
    let ops = vec![bdel("a/1"), bdel("a/2"), bdel("a/2/x")];
    apply_write(&mut plain, batch(1, 9, ops)).await;
    assert_eq!(all_keys(&r), all_keys(&plain.reader()));
    assert_digest_recounts(&r);

    // Nothing left under the prefix: 0 deleted, nothing changes.
    assert_eq!(
        apply_write(&mut sm, delete_prefix(1, 10, b"a/")).await,
        WriteOutcome::DeletePrefix { revision: rev(10), deleted: 0 }
    );
    apply_write(&mut plain, delete(1, 10, "a/1")).await;
    // A deleted key starts a new life when put again, exactly as after a delete.
    assert_eq!(apply_write(&mut sm, put(1, 11, "a/1", b"v3")).await, WriteOutcome::Put { revision: rev(11) });
    apply_write(&mut plain, put(1, 11, "a/1", b"v3")).await;
    assert_eq!(get(&r, "a/1"), Some(kv("a/1", b"v3", 11, 11, 1)));
    assert_eq!(all_keys(&r), all_keys(&plain.reader()));

    // Prefixes ending in 0xff have no upper bound of the same length: still exactly the prefix.
    for (i, key) in [&[0xff][..], &[0xff, 0xff], &[0xff, 0xff, 0x01], &[0xff, 0xfe], &[0xfe, 0xff]].iter().enumerate() {
        apply_write(&mut sm, raw_put(12 + i as u64, key)).await;
    }
    assert_eq!(
        apply_write(&mut sm, delete_prefix(1, 17, &[0xff, 0xff])).await,
        WriteOutcome::DeletePrefix { revision: rev(17), deleted: 2 }
    );
    assert!(get(&r, "a").is_some());
    let left: Vec<Vec<u8>> = names(&r).into_iter().filter(|k| k[0] >= 0xfe).collect();
    assert_eq!(left, [vec![0xfe, 0xff], vec![0xff], vec![0xff, 0xfe]]);

    // The empty prefix deletes every key of the shard.
    assert_eq!(
        apply_write(&mut sm, delete_prefix(1, 18, b"")).await,
        WriteOutcome::DeletePrefix { revision: rev(18), deleted: 8 }
    );
    assert_eq!(r.key_count().unwrap(), 0);
    assert_digest_recounts(&r);
    assert_eq!(r.last_applied().unwrap(), Some(log_id(1, 18)));
}

/// Applies a txn of one compare with empty branches: whether the compare held.
async fn compare_holds(sm: &mut RedbStateMachine, index: u64, compare: Compare) -> bool {
    match apply_write(sm, txn(1, index, vec![compare.clone()], vec![], vec![])).await {
        WriteOutcome::Txn { revision, succeeded, results } => {
            assert_eq!((revision, results), (rev(index), vec![]), "{compare:?}");
            succeeded
        }
        other => panic!("a txn answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_compares_follow_etcd_semantics() {
    use crate::api::CompareOp::{Equal, Greater, Less, NotEqual};
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    apply(&mut sm, vec![put(1, 1, "k", b"v1"), put(1, 2, "k", b"v2")]).await;
    // "k": value v2, version 2, create revision 1, mod revision 2.
    let cases = [
        (Compare::value("k", Equal, "v2"), true),
        (Compare::value("k", Equal, "v1"), false),
        (Compare::value("k", NotEqual, "v1"), true),
        (Compare::value("k", NotEqual, "v2"), false),
        (Compare::value("k", Less, "v3"), true),
        (Compare::value("k", Less, "v2"), false),
        (Compare::value("k", Greater, "v1"), true),
        (Compare::value("k", Greater, "v"), true),
        (Compare::value("k", Greater, "w"), false),
        (Compare::version("k", Equal, 2), true),
        (Compare::version("k", NotEqual, 2), false),
        (Compare::version("k", Greater, 1), true),
        (Compare::version("k", Less, 2), false),
        (Compare::create_revision("k", Equal, rev(1)), true),
        (Compare::create_revision("k", Greater, rev(1)), false),
        (Compare::mod_revision("k", Equal, rev(2)), true),
        (Compare::mod_revision("k", Less, rev(3)), true),
        (Compare::mod_revision("k", Greater, rev(2)), false),
        // A missing key: every value compare fails, even `!=`; version and revisions are 0.
        (Compare::value("missing", Equal, ""), false),
        (Compare::value("missing", NotEqual, "x"), false),
        (Compare::value("missing", Less, "z"), false),
        (Compare::value("missing", Greater, ""), false),
        (Compare::version("missing", Equal, 0), true),
        (Compare::version("missing", Greater, 0), false),
        (Compare::version("missing", Less, 1), true),
        (Compare::create_revision("missing", Equal, rev(0)), true),
        (Compare::mod_revision("missing", NotEqual, rev(0)), false),
        (Compare::mod_revision("missing", Less, rev(1)), true),
    ];
    for (i, (compare, expected)) in cases.into_iter().enumerate() {
        assert_eq!(compare_holds(&mut sm, 3 + i as u64, compare.clone()).await, expected, "{compare:?}");
    }
    // Compares change nothing.
    assert_eq!(get(&sm.reader(), "k"), Some(kv("k", b"v2", 1, 2, 2)));
    assert_eq!(get(&sm.reader(), "missing"), None);

    // Every compare must hold.
    let both = |version| vec![Compare::value("k", Equal, "v2"), Compare::version("k", Equal, version)];
    let outcome = |index| WriteOutcome::Txn { revision: rev(index), succeeded: false, results: vec![] };
    assert_eq!(apply_write(&mut sm, txn(1, 40, both(1), vec![], vec![])).await, outcome(40));
    let ok = WriteOutcome::Txn { revision: rev(41), succeeded: true, results: vec![] };
    assert_eq!(apply_write(&mut sm, txn(1, 41, both(2), vec![], vec![])).await, ok);
    // No compare at all: the success branch.
    let no_compare = txn(1, 42, vec![], vec![TxnOp::get("k")], vec![]);
    let results = vec![TxnOpResult::Get(Some(kv("k", b"v2", 1, 2, 2)))];
    assert_eq!(
        apply_write(&mut sm, no_compare).await,
        WriteOutcome::Txn { revision: rev(42), succeeded: true, results }
    );
    assert_digest_recounts(&sm.reader());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_runs_one_branch_in_order_with_revisions_of_plain_writes() {
    use crate::api::CompareOp::{Equal, Greater};
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    apply(&mut sm, vec![put(1, 1, "k", b"v1"), put(1, 2, "gone", b"g"), put(1, 3, "other", b"o")]).await;

    // Success: ops in order, each seeing the ones before; every write at the txn's revision.
    let success = vec![
        TxnOp::put("k", "v2"),
        TxnOp::get("k"),
        TxnOp::delete("gone"),
        TxnOp::delete("never"),
        TxnOp::get("gone"),
        TxnOp::put("n", "n1"),
        TxnOp::put("n", "n2"),
        TxnOp::get("n"),
    ];
    let failure = vec![TxnOp::put("k", "failure ran")];
    assert_eq!(
        apply_write(&mut sm, txn(1, 4, vec![Compare::value("k", Equal, "v1")], success, failure)).await,
        WriteOutcome::Txn {
            revision: rev(4),
            succeeded: true,
            results: vec![
                TxnOpResult::Put { revision: rev(4) },
                TxnOpResult::Get(Some(kv("k", b"v2", 1, 4, 2))),
                TxnOpResult::Delete { deleted: true },
                TxnOpResult::Delete { deleted: false },
                TxnOpResult::Get(None),
                TxnOpResult::Put { revision: rev(4) },
                TxnOpResult::Put { revision: rev(4) },
                TxnOpResult::Get(Some(kv("n", b"n2", 4, 4, 2))),
            ],
        }
    );
    // The keys afterwards, as a put, a delete and two puts would leave them.
    assert_eq!(get(&r, "k"), Some(kv("k", b"v2", 1, 4, 2)));
    assert_eq!(get(&r, "gone"), None);
    assert_eq!(get(&r, "n"), Some(kv("n", b"n2", 4, 4, 2)), "each put of a txn counts as a write");
    assert_eq!(get(&r, "other"), Some(kv("other", b"o", 3, 3, 1)));

    // Failure: the failure branch runs, the success branch does not.
    let compares = vec![Compare::mod_revision("k", Greater, rev(4))];
    let success = vec![TxnOp::put("k", "success ran"), TxnOp::delete("other")];
    let failure = vec![TxnOp::get("k"), TxnOp::delete("n"), TxnOp::get("n"), TxnOp::put("gone", "back")];
    assert_eq!(
        apply_write(&mut sm, txn(1, 5, compares, success, failure)).await,
        WriteOutcome::Txn {
            revision: rev(5),
            succeeded: false,
            results: vec![
                TxnOpResult::Get(Some(kv("k", b"v2", 1, 4, 2))),
                TxnOpResult::Delete { deleted: true },
                TxnOpResult::Get(None),
                TxnOpResult::Put { revision: rev(5) },
            ],
        }
    );
    assert_eq!(get(&r, "k"), Some(kv("k", b"v2", 1, 4, 2)), "the success branch did not run");
    assert_eq!(get(&r, "other"), Some(kv("other", b"o", 3, 3, 1)));
    assert_eq!(get(&r, "gone"), Some(kv("gone", b"back", 5, 5, 1)), "deleted, then a new life");
    assert_eq!(get(&r, "n"), None);

    // A txn put and a plain put count alike: create revision kept, mod revision and version move.
    assert_eq!(apply_write(&mut sm, put(1, 6, "k", b"v3")).await, WriteOutcome::Put { revision: rev(6) });
    let txn_put = txn(1, 7, vec![Compare::version("k", Equal, 3)], vec![TxnOp::put("k", "v4")], vec![]);
    let outcome =
        WriteOutcome::Txn { revision: rev(7), succeeded: true, results: vec![TxnOpResult::Put { revision: rev(7) }] };
    assert_eq!(apply_write(&mut sm, txn_put).await, outcome);
    assert_eq!(get(&r, "k"), Some(kv("k", b"v4", 1, 7, 4)));
    assert_eq!(apply_write(&mut sm, delete(1, 8, "k")).await, WriteOutcome::Delete { revision: rev(8), deleted: true });
    // A create-if-absent txn (version = 0) after the delete.
    let create = txn(1, 9, vec![Compare::version("k", Equal, 0)], vec![TxnOp::put("k", "new")], vec![TxnOp::get("k")]);
    let outcome =
        WriteOutcome::Txn { revision: rev(9), succeeded: true, results: vec![TxnOpResult::Put { revision: rev(9) }] };
    assert_eq!(apply_write(&mut sm, create).await, outcome);
    assert_eq!(get(&r, "k"), Some(kv("k", b"new", 9, 9, 1)));
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_prefix_deletes_and_txns_apply_once() {
    use crate::api::CompareOp::Equal;
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    let (x, y) = (client(1), client(2));
    apply(&mut sm, vec![put(1, 1, "p/1", b"a"), put(1, 2, "p/2", b"b")]).await;

    // A prefix delete retried after a new key appeared under the prefix: the first outcome, and
    // the new key stays (a re-apply would delete it and count 1).
    let dp = request(x, 1, WriteCommand::DeletePrefix { prefix: b"p/".to_vec() });
    let first_dp = apply_write(&mut sm, normal(1, 3, dp.clone())).await;
    assert_eq!(first_dp, WriteOutcome::DeletePrefix { revision: rev(3), deleted: 2 });
    apply_write(&mut sm, put(1, 4, "p/3", b"c")).await;
    assert_eq!(apply_write(&mut sm, normal(1, 5, dp.clone())).await, first_dp);
    assert_eq!(get(&r, "p/3"), Some(kv("p/3", b"c", 4, 4, 1)));

    // A txn retried: the first outcome (a re-apply would now fail the compare).
    let t = request(
        y,
        1,
        WriteCommand::Txn {
            compares: vec![Compare::version("p/3", Equal, 1)],
            success: vec![TxnOp::put("p/3", "t"), TxnOp::get("p/3")],
            failure: vec![TxnOp::get("p/3")],
        },
    );
    let first_txn = apply_write(&mut sm, normal(1, 6, t.clone())).await;
    let results = vec![TxnOpResult::Put { revision: rev(6) }, TxnOpResult::Get(Some(kv("p/3", b"t", 4, 6, 2)))];
    assert_eq!(first_txn, WriteOutcome::Txn { revision: rev(6), succeeded: true, results });
    assert_eq!(apply_write(&mut sm, normal(1, 7, t.clone())).await, first_txn);
    assert_eq!(get(&r, "p/3"), Some(kv("p/3", b"t", 4, 6, 2)), "applied once");
    // An older sequence number of the session is stale and changes nothing.
    let old = request(y, 0, WriteCommand::DeletePrefix { prefix: Vec::new() });
    assert_eq!(apply_write(&mut sm, normal(1, 8, old)).await, WriteOutcome::StaleSequence { last_seq: 1 });
    assert_eq!(r.key_count().unwrap(), 1);

    // Sessions survive a restart: retries are still answered with the first outcomes.
    drop((r, sm));
    let mut sm = open_sm(dir.path());
    assert_eq!(apply_write(&mut sm, normal(2, 9, dp)).await, first_dp);
    assert_eq!(apply_write(&mut sm, normal(2, 10, t)).await, first_txn);
    assert_eq!(get(&sm.reader(), "p/3"), Some(kv("p/3", b"t", 4, 6, 2)));
    assert_digest_recounts(&sm.reader());
}

/// A log of prefix deletes and txns gives the same state and digest on a replica that applies it
/// entry by entry and on one that applies it all at once (a prefix delete sends an apply to a
/// blocking thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_deletes_and_txns_replay_to_the_same_state() {
    use crate::api::CompareOp::{Equal, Less};
    let log = vec![
        membership(1, 1, &[1]),
        put(1, 2, "a/1", b"1"),
        put(1, 3, "a/2", b"2"),
        put(1, 4, "b/1", b"3"),
        txn(1, 5, vec![Compare::value("a/1", Equal, "1")], vec![TxnOp::put("a/3", "x"), TxnOp::delete("b/1")], vec![]),
        delete_prefix(1, 6, b"a/"),
        txn(
            1,
            7,
            vec![Compare::create_revision("a/1", Less, rev(1))],
            vec![TxnOp::put("c", "y")],
            vec![TxnOp::get("c")],
        ),
        put(1, 8, "a/9", b"9"),
        delete_prefix(1, 9, b"zzz"),
        txn(1, 10, vec![Compare::value("c", Equal, "nope")], vec![], vec![TxnOp::put("c", "z"), TxnOp::get("a/9")]),
    ];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, mut b) = (open_sm(dir_a.path()), open_sm(dir_b.path()));
    let mut one_by_one = Vec::new();
    for entry in log.clone() {
        one_by_one.extend(apply(&mut a, vec![entry]).await);
    }
    let all_at_once = apply(&mut b, log).await;
    assert_eq!(one_by_one, all_at_once, "the same outcomes");
    assert_eq!(a.reader().digest().unwrap(), b.reader().digest().unwrap());
    assert_digest_recounts(&a.reader());
    assert_eq!(all_keys(&a.reader()), all_keys(&b.reader()));
    assert_eq!(names(&a.reader()), [&b"a/9"[..], b"c"]);
    assert_eq!(get(&a.reader(), "c"), Some(kv("c", b"z", 7, 10, 2)));
    assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
}

/// A session id in namespace (token) `ns`, number `n` within it.
fn token_client(ns: u64, n: u64) -> Id128 {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&ns.to_be_bytes());
    id[8..].copy_from_slice(&n.to_be_bytes());
    Id128(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tokens_sessions_push_out_only_its_own() {
    use crate::storage::state_machine::MAX_SESSIONS_PER_TOKEN;
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    // Another token's session, older than everything the hostile token does.
    let victim = request(token_client(1, 1), 1, put_cmd("v", b"1"));
    assert_eq!(apply_write(&mut sm, normal(1, 1, victim.clone())).await, WriteOutcome::Put { revision: rev(1) });
    // Token 2 opens more sessions than its share, 500 writes per entry.
    let total = MAX_SESSIONS_PER_TOKEN + 50;
    let mut index = 1;
    for chunk in (0..total).collect::<Vec<_>>().chunks(500) {
        index += 1;
        let writes = chunk.iter().map(|n| request(token_client(2, *n), 1, put_cmd("h", b"x"))).collect();
        apply(&mut sm, vec![Entry { log_id: log_id(1, index), payload: EntryPayload::Normal(WriteBatch(writes)) }])
            .await;
    }
    let last_hostile_entry = index;
    // The other token's session is still known: its retry is answered, not applied again.
    index += 1;
    assert_eq!(apply_write(&mut sm, normal(1, index, victim)).await, WriteOutcome::Put { revision: rev(1) });
    // Token 2 holds exactly its share; its newest session is known.
    let reader = sm.reader();
    let digest = reader.digest().unwrap();
    assert_eq!(digest, reader.recompute_digest().unwrap(), "the digest follows the evictions");
    index += 1;
    let newest = request(token_client(2, total - 1), 1, put_cmd("h", b"y"));
    assert_eq!(
        apply_write(&mut sm, normal(1, index, newest)).await,
        WriteOutcome::Put { revision: crate::api::write_revision(last_hostile_entry, (total as usize - 1) % 500) },
        "token 2's newest session is known (its retry is answered)"
    );
    // One of its first sessions was pushed out: a retry of it applies again (at this index).
    index += 1;
    let first = request(token_client(2, 0), 1, put_cmd("h", b"z"));
    assert_eq!(apply_write(&mut sm, normal(1, index, first)).await, WriteOutcome::Put { revision: rev(index) });
    drop((sm, reader));
    // Reopened (and counted again if the counts were missing), the same holds.
    let mut sm = open_sm(dir.path());
    index += 1;
    let victim = request(token_client(1, 1), 1, put_cmd("v", b"1"));
    assert_eq!(apply_write(&mut sm, normal(1, index, victim)).await, WriteOutcome::Put { revision: rev(1) });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_per_shard_session_is_refused_past_its_first_write() {
    use crate::api::STRICT_SEQ_BASE;
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    // A per-shard session's first write is applied, its next one too.
    let first = request(client(1), STRICT_SEQ_BASE + 1, put_cmd("a", b"1"));
    assert_eq!(apply_write(&mut sm, normal(1, 1, first)).await, WriteOutcome::Put { revision: rev(1) });
    let second = request(client(1), STRICT_SEQ_BASE + 2, put_cmd("a", b"2"));
    assert_eq!(apply_write(&mut sm, normal(1, 2, second)).await, WriteOutcome::Put { revision: rev(2) });
    // An unknown per-shard session past its first write: refused, nothing applied or recorded.
    let forgotten = request(client(2), STRICT_SEQ_BASE + 7, put_cmd("a", b"3"));
    assert_eq!(apply_write(&mut sm, normal(1, 3, forgotten.clone())).await, WriteOutcome::UnknownSession { seq: 7 });
    assert_eq!(get(&sm.reader(), "a").map(|kv| kv.value), Some(b"2".to_vec()));
    assert_eq!(apply_write(&mut sm, normal(1, 4, forgotten)).await, WriteOutcome::UnknownSession { seq: 7 });
    // Sessions numbered the old way (older clients, older logs) keep the old rule: applied.
    let old_style = request(client(3), 5, put_cmd("a", b"4"));
    assert_eq!(apply_write(&mut sm, normal(1, 5, old_style)).await, WriteOutcome::Put { revision: rev(5) });
}
