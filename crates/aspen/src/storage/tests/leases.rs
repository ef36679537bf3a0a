//! Leases in one shard's state machine: grants, keys attached and detached, revocation at the
//! home shard and on the others (tombstones), puts the shard cannot judge, snapshots, digests.

use super::*;
use crate::storage::leases::{LeaseRecord, TOMBSTONE_TTL_MS};

const NODE: WriteSession = WriteSession { client_id: Id128([0; 16]), seq: 0 };

fn lease_cmd(index: u64, command: WriteCommand) -> Entry {
    normal(1, index, request(unique_client(index), 1, command))
}

fn node_step(index: u64, command: WriteCommand) -> Entry {
    normal(1, index, WriteRequest { session: NODE, command, timestamp_ms: 0 })
}

fn grant(index: u64, id: u64, ttl_secs: u64) -> Entry {
    lease_cmd(index, WriteCommand::LeaseGrant { id, ttl_secs })
}

fn put_lease(index: u64, key: &str, lease: u64, checked: bool) -> Entry {
    lease_cmd(index, WriteCommand::PutLease { key: key.into(), value: b"v".to_vec(), lease, checked })
}

fn keys_of(r: &StateReader, lease: u64) -> Vec<String> {
    r.lease_keys(lease).unwrap().into_iter().map(|k| String::from_utf8(k).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_at_their_home_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    let deadlines = sm.deadlines();
    assert_eq!(
        apply_write(&mut sm, grant(1, 7, 10)).await,
        WriteOutcome::LeaseGranted { revision: rev(1), id: 7, ttl_secs: 10 }
    );
    assert_eq!(apply_write(&mut sm, grant(2, 7, 30)).await, WriteOutcome::LeaseExists { id: 7 });
    assert_eq!(r.lease(7).unwrap(), Some(LeaseRecord { ttl_secs: 10, revoking: false }));
    assert_eq!(deadlines.live_count(), 1, "apply told the deadlines");

    // Attach two keys; a put without the lease detaches one (etcd); a delete forgets another.
    assert_eq!(apply_write(&mut sm, put_lease(3, "a", 7, false)).await, WriteOutcome::Put { revision: rev(3) });
    assert_eq!(apply_write(&mut sm, put_lease(4, "b", 7, false)).await, WriteOutcome::Put { revision: rev(4) });
    assert_eq!(apply_write(&mut sm, put_lease(5, "c", 7, false)).await, WriteOutcome::Put { revision: rev(5) });
    assert_eq!(keys_of(&r, 7), ["a", "b", "c"]);
    apply_write(&mut sm, put(1, 6, "b", b"plain")).await;
    apply_write(&mut sm, delete(1, 7, "c")).await;
    assert_eq!(keys_of(&r, 7), ["a"]);
    assert_digest_recounts(&r);

    // Revoke: the home's keys go, the record stays as revoking, puts with it are refused.
    assert_eq!(
        apply_write(&mut sm, lease_cmd(8, WriteCommand::LeaseRevoke { id: 7 })).await,
        WriteOutcome::LeaseRevoked { revision: rev(8), deleted: 1 }
    );
    assert_eq!(get(&r, "a"), None);
    assert_eq!(get(&r, "b").map(|kv| kv.value), Some(b"plain".to_vec()), "a detached key stays");
    assert_eq!(r.lease(7).unwrap(), Some(LeaseRecord { ttl_secs: 10, revoking: true }));
    assert_eq!(deadlines.revoking(), vec![7]);
    assert_eq!(deadlines.renew(7, std::time::Instant::now()), None, "no renewal once revoking");
    assert_eq!(apply_write(&mut sm, put_lease(9, "d", 7, true)).await, WriteOutcome::LeaseNotFound { id: 7 });
    assert_eq!(
        apply_write(&mut sm, lease_cmd(10, WriteCommand::LeaseRevoke { id: 7 })).await,
        WriteOutcome::LeaseNotFound { id: 7 },
        "a second revoke finds nothing"
    );
    // Forget: the record goes; the tombstone keeps the id from being granted again.
    assert_eq!(
        apply_write(&mut sm, node_step(11, WriteCommand::LeaseForget { id: 7 })).await,
        WriteOutcome::LeaseRevoked { revision: rev(11), deleted: 0 }
    );
    assert_eq!(r.lease(7).unwrap(), None);
    assert!(deadlines.revoking().is_empty());
    assert_eq!(apply_write(&mut sm, grant(12, 7, 10)).await, WriteOutcome::LeaseExists { id: 7 });
    assert_eq!(apply_write(&mut sm, put_lease(13, "e", 7, true)).await, WriteOutcome::LeaseNotFound { id: 7 });
    assert_digest_recounts(&r);

    // A live lease is never forgotten; a put naming a lease unknown here is not applied.
    apply_write(&mut sm, grant(14, 8, 5)).await;
    assert_eq!(
        apply_write(&mut sm, node_step(15, WriteCommand::LeaseForget { id: 8 })).await,
        WriteOutcome::LeaseNotFound { id: 8 }
    );
    assert_eq!(apply_write(&mut sm, put_lease(16, "f", 99, false)).await, WriteOutcome::LeaseUnchecked { id: 99 });
    assert_eq!(get(&r, "f"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_on_a_shard_that_is_not_their_home() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    // Unknown here: the node must check the home first; checked, the key attaches.
    assert_eq!(apply_write(&mut sm, put_lease(1, "x", 5, false)).await, WriteOutcome::LeaseUnchecked { id: 5 });
    assert_eq!(apply_write(&mut sm, put_lease(2, "x", 5, true)).await, WriteOutcome::Put { revision: rev(2) });
    // Known now (a key of it is here): later puts need no check.
    assert_eq!(apply_write(&mut sm, put_lease(3, "y", 5, false)).await, WriteOutcome::Put { revision: rev(3) });
    // The same session retried gets the same answer, applied once.
    let retry = put_lease(4, "z", 5, false);
    assert_eq!(apply_write(&mut sm, retry.clone()).await, WriteOutcome::Put { revision: rev(4) });
    let mut again = retry;
    again.log_id = log_id(1, 5);
    assert_eq!(apply_write(&mut sm, again).await, WriteOutcome::Put { revision: rev(4) });
    assert_eq!(keys_of(&r, 5), ["x", "y", "z"]);

    // The revocation reaches this shard: its keys go, a late put (checked before the
    // revocation at the home) is refused.
    assert_eq!(
        apply_write(&mut sm, node_step(6, WriteCommand::LeaseDrop { id: 5 })).await,
        WriteOutcome::LeaseRevoked { revision: rev(6), deleted: 3 }
    );
    assert!(all_keys(&r).is_empty());
    assert_eq!(apply_write(&mut sm, put_lease(7, "late", 5, true)).await, WriteOutcome::LeaseNotFound { id: 5 });
    // Dropping again is harmless (a retried or doubled revocation).
    assert_eq!(
        apply_write(&mut sm, node_step(8, WriteCommand::LeaseDrop { id: 5 })).await,
        WriteOutcome::LeaseRevoked { revision: rev(8), deleted: 0 }
    );
    assert_digest_recounts(&r);
    // Sessionless steps leave no session behind.
    assert_eq!(r.digest().unwrap(), r.recompute_digest().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_forgotten_after_an_hour_of_the_shard_clock() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open_sm(dir.path());
    let r = sm.reader();
    let at = |index: u64, ms: u64, command: WriteCommand| {
        normal(1, index, WriteRequest { session: NODE, command, timestamp_ms: ms })
    };
    apply_write(&mut sm, at(1, 1_000, WriteCommand::LeaseDrop { id: 1 })).await;
    apply_write(&mut sm, at(2, 2_000, WriteCommand::LeaseDrop { id: 2 })).await;
    assert_eq!(apply_write(&mut sm, put_lease(3, "k", 1, true)).await, WriteOutcome::LeaseNotFound { id: 1 });
    // An hour after the first: the next tombstone written forgets it, not the second.
    apply_write(&mut sm, at(4, 1_001 + TOMBSTONE_TTL_MS, WriteCommand::LeaseDrop { id: 3 })).await;
    assert_eq!(apply_write(&mut sm, put_lease(5, "k", 1, true)).await, WriteOutcome::Put { revision: rev(5) });
    assert_eq!(apply_write(&mut sm, put_lease(6, "k2", 2, true)).await, WriteOutcome::LeaseNotFound { id: 2 });
    assert_digest_recounts(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_travel_with_snapshots_and_replay_alike() {
    let log = vec![
        membership(1, 1, &[1]),
        grant(2, 11, 10),
        grant(3, 12, 20),
        put_lease(4, "a", 11, false),
        put_lease(5, "b", 12, false),
        put_lease(6, "c", 40, true),
        lease_cmd(7, WriteCommand::LeaseRevoke { id: 12 }),
        node_step(8, WriteCommand::LeaseDrop { id: 41 }),
        delete_prefix(1, 9, b"zz"),
    ];
    let (dir_a, dir_b, dir_c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, mut b) = (open_sm(dir_a.path()), open_sm(dir_b.path()));
    for entry in log.clone() {
        apply(&mut a, vec![entry]).await;
    }
    apply(&mut b, log).await;
    assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap(), "one by one = all at once");

    let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut c = open_sm(dir_c.path());
    apply(&mut c, vec![put(1, 1, "only-in-c", b"x"), grant(2, 99, 5)]).await;
    let meta = snap.meta.clone();
    let rx = receive(&mut c, &snapshot_bytes(snap).await).await;
    c.install_snapshot(&meta, rx).await.unwrap();
    assert_eq!(c.reader().digest().unwrap(), a.reader().digest().unwrap());
    assert_digest_recounts(&c.reader());
    assert_eq!(c.reader().lease(99).unwrap(), None, "leases absent from the snapshot go");
    assert_eq!(c.reader().lease(11).unwrap(), Some(LeaseRecord { ttl_secs: 10, revoking: false }));
    assert_eq!(keys_of(&c.reader(), 11), ["a"]);
    assert_eq!(keys_of(&c.reader(), 40), ["c"], "attachments are rebuilt from the keys");
    assert_eq!(c.deadlines().live_count(), 1, "deadlines follow the installed state");
    assert_eq!(c.deadlines().revoking(), vec![12]);
    // The tombstones came along too.
    assert_eq!(apply_write(&mut c, put_lease(10, "late", 41, true)).await, WriteOutcome::LeaseNotFound { id: 41 });
    // A restart reads the leases back.
    drop(c);
    let c = open_sm(dir_c.path());
    assert_eq!(c.deadlines().live_count(), 1);
    assert_eq!(c.deadlines().revoking(), vec![12]);
}
