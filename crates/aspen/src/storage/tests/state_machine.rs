//! The state machine: puts, deletes, CAS and batches with their revisions, and exactly-once sessions.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_put_delete_cas_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    assert_eq!(sm.applied_state().await.unwrap(), (None, StoredMembership::default()));

    let results = apply(&mut sm, vec![blank(1, 1), membership(1, 2, &[1, 2])]).await;
    assert_eq!(results, vec![ApplyResult(vec![]), ApplyResult(vec![])], "Raft's own entries have no outcome");

    // Put: creates, then modifies; mod_revision is the log index, version counts writes.
    assert_eq!(apply_write(&mut sm, put(1, 3, "a", b"v1")).await, WriteOutcome::Put { revision: 3 });
    assert_eq!(get(&r, "a"), Some(kv("a", b"v1", 3, 3, 1)));
    assert_eq!(apply_write(&mut sm, put(1, 4, "a", b"v2")).await, WriteOutcome::Put { revision: 4 });
    assert_eq!(get(&r, "a"), Some(kv("a", b"v2", 3, 4, 2)));

    // Cas with the current value succeeds.
    assert_eq!(
        apply_write(&mut sm, cas(1, 5, "a", Some(b"v2"), b"v3")).await,
        WriteOutcome::Cas { revision: 5, succeeded: true, current: None }
    );
    assert_eq!(get(&r, "a"), Some(kv("a", b"v3", 3, 5, 3)));
    // Cas with a stale value fails, reports the current value and changes nothing.
    assert_eq!(
        apply_write(&mut sm, cas(1, 6, "a", Some(b"v2"), b"v4")).await,
        WriteOutcome::Cas { revision: 6, succeeded: false, current: Some(b"v3".to_vec()) }
    );
    assert_eq!(get(&r, "a"), Some(kv("a", b"v3", 3, 5, 3)));
    // Cas expecting absence succeeds only when the key is absent.
    assert_eq!(
        apply_write(&mut sm, cas(1, 7, "b", None, b"b1")).await,
        WriteOutcome::Cas { revision: 7, succeeded: true, current: None }
    );
    assert_eq!(get(&r, "b"), Some(kv("b", b"b1", 7, 7, 1)));
    assert_eq!(
        apply_write(&mut sm, cas(1, 8, "b", None, b"b2")).await,
        WriteOutcome::Cas { revision: 8, succeeded: false, current: Some(b"b1".to_vec()) }
    );
    assert_eq!(get(&r, "b"), Some(kv("b", b"b1", 7, 7, 1)));
    // Cas expecting a value of an absent key fails and does not create it.
    assert_eq!(
        apply_write(&mut sm, cas(1, 9, "c", Some(b"x"), b"c1")).await,
        WriteOutcome::Cas { revision: 9, succeeded: false, current: None }
    );
    assert_eq!(get(&r, "c"), None);

    // Delete reports whether the key existed; a put after a delete starts a new life.
    assert_eq!(apply_write(&mut sm, delete(2, 10, "a")).await, WriteOutcome::Delete { revision: 10, deleted: true });
    assert_eq!(get(&r, "a"), None);
    assert_eq!(apply_write(&mut sm, delete(2, 11, "a")).await, WriteOutcome::Delete { revision: 11, deleted: false });
    assert_eq!(apply_write(&mut sm, put(2, 12, "a", b"v5")).await, WriteOutcome::Put { revision: 12 });
    assert_eq!(get(&r, "a"), Some(kv("a", b"v5", 12, 12, 1)), "version and create_revision reset");

    // Batch: every op at the batch's revision, in order.
    let ops = vec![bput("x", b"x1"), bput("y", b"y1"), bdel("b"), bput("a", b"v6")];
    assert_eq!(apply_write(&mut sm, batch(2, 13, ops)).await, WriteOutcome::Batch { revision: 13 });
    assert_eq!(get(&r, "x"), Some(kv("x", b"x1", 13, 13, 1)));
    assert_eq!(get(&r, "y"), Some(kv("y", b"y1", 13, 13, 1)));
    assert_eq!(get(&r, "b"), None);
    assert_eq!(get(&r, "a"), Some(kv("a", b"v6", 12, 13, 2)));
    let ops = vec![bput("z", b"z1"), bdel("z"), bdel("y"), bput("y", b"y2"), bput("x", b"x2"), bput("x", b"x3")];
    assert_eq!(apply_write(&mut sm, batch(2, 14, ops)).await, WriteOutcome::Batch { revision: 14 });
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
            ApplyResult(vec![WriteOutcome::Put { revision: 15 }]),
            ApplyResult(vec![WriteOutcome::Cas { revision: 16, succeeded: true, current: None }]),
            ApplyResult(vec![]),
            ApplyResult(vec![WriteOutcome::Delete { revision: 18, deleted: true }]),
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
    assert_eq!(first, WriteOutcome::Cas { revision: 1, succeeded: true, current: None });
    assert_eq!(apply_write(&mut sm, normal(1, 2, cas_req.clone())).await, first);
    assert_eq!(get(&r, "k"), Some(kv("k", b"v1", 1, 1, 1)));

    // A put retried does not bump the version or the mod revision.
    let put_req = request(y, 1, put_cmd("p", b"a"));
    assert_eq!(apply_write(&mut sm, normal(1, 3, put_req.clone())).await, WriteOutcome::Put { revision: 3 });
    assert_eq!(apply_write(&mut sm, normal(2, 4, put_req.clone())).await, WriteOutcome::Put { revision: 3 });
    assert_eq!(get(&r, "p"), Some(kv("p", b"a", 3, 3, 1)));

    // The session moves on; an older sequence number is stale and changes nothing.
    assert_eq!(
        apply_write(&mut sm, normal(2, 5, request(y, 2, put_cmd("p", b"b")))).await,
        WriteOutcome::Put { revision: 5 }
    );
    assert_eq!(apply_write(&mut sm, normal(2, 6, put_req.clone())).await, WriteOutcome::StaleSequence { last_seq: 2 });
    assert_eq!(get(&r, "p"), Some(kv("p", b"b", 3, 5, 2)));
    // The current sequence number still answers with its outcome after a stale one.
    assert_eq!(
        apply_write(&mut sm, normal(2, 7, request(y, 2, put_cmd("p", b"b")))).await,
        WriteOutcome::Put { revision: 5 }
    );
    assert_eq!(get(&r, "p"), Some(kv("p", b"b", 3, 5, 2)));

    // A retry in the same apply batch as the original is deduplicated too.
    let z_req = request(z, 1, put_cmd("q", b"z"));
    let results = apply(&mut sm, vec![normal(2, 8, z_req.clone()), normal(2, 9, z_req.clone())]).await;
    assert_eq!(results, vec![ApplyResult(vec![WriteOutcome::Put { revision: 8 }]); 2]);
    assert_eq!(get(&r, "q"), Some(kv("q", b"z", 8, 8, 1)));

    // One entry carrying several writes (concurrent client writes proposed together): each write
    // gets its own outcome, in order, with the entry's index as revision, and a retry inside the
    // same entry is answered with the first outcome.
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
            WriteOutcome::Put { revision: 10 },
            WriteOutcome::Delete { revision: 10, deleted: true },
            WriteOutcome::Put { revision: 10 },
            WriteOutcome::Cas { revision: 10, succeeded: true, current: None },
        ])]
    );
    assert_eq!(get(&r, "m1"), Some(kv("m1", b"a", 10, 10, 1)));
    assert_eq!(get(&r, "q"), None);
    assert_eq!(get(&r, "m2"), Some(kv("m2", b"c", 10, 10, 1)));

    // Sessions survive a restart.
    drop((r, sm));
    let mut sm = open_sm(dir.path());
    assert_eq!(apply_write(&mut sm, normal(3, 10, cas_req)).await, first);
    assert_eq!(apply_write(&mut sm, normal(3, 11, put_req)).await, WriteOutcome::StaleSequence { last_seq: 2 });
    assert_eq!(get(&sm.reader(), "k"), Some(kv("k", b"v1", 1, 1, 1)));
    assert_eq!(get(&sm.reader(), "p"), Some(kv("p", b"b", 3, 5, 2)));
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(3, 11)), "deduplicated entries are applied");
}
