//! Leases over three in-process nodes, on one shard and on four with keys in every shard: a
//! revocation removes every key everywhere, keep-alives keep keys past their TTL, an expired
//! lease takes its keys with it on every node (stale reads included), a new leader restarts the
//! TTL, and a gone lease refuses puts, renewals and lookups.

use std::{sync::Arc, time::Duration};

use crate::support::{start_three, wait_shards_converged, wait_until, InProcNode};
use aspen::{
    api::{lease::MAX_LEASE_ID, ReadConsistency},
    client::KeepAliveState,
    sharding::ShardRouter,
    ApiError, ClientError,
};
use tokio::time::Instant;

/// Two keys in each shard.
fn keys_in_every_shard(router: &ShardRouter, tag: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for shard in 0..router.num_shards() {
        keys.extend(
            (0..100_000).map(|i| format!("{tag}/{i}")).filter(|k| router.shard_for_key(k.as_bytes()) == shard).take(2),
        );
    }
    keys.sort();
    keys
}

fn is_lease_not_found<T: std::fmt::Debug>(r: Result<T, ClientError>, id: u64) {
    match r {
        Err(ClientError::Api(ApiError::LeaseNotFound { id: got })) => assert_eq!(got, id),
        other => panic!("expected lease not found, got {other:?}"),
    }
}

/// Whether no node's own replica (stale read) holds any of `keys`.
async fn gone_everywhere(nodes: &[InProcNode; 3], router: &ShardRouter, keys: &[String]) -> bool {
    for n in nodes {
        for k in keys {
            let shard = &n.handle().shards[&router.shard_for_key(k.as_bytes())];
            if shard.get(k.as_bytes(), ReadConsistency::Stale).await.expect("stale read").is_some() {
                return false;
            }
        }
    }
    true
}

async fn leases_on(shards: u32) {
    let root = tempfile::tempdir().unwrap();
    let configs = (1..=3)
        .map(|id| {
            let mut c = InProcNode::config(root.path(), id);
            if shards > 1 {
                c.sharding.enabled = true;
                c.sharding.num_shards = shards;
            }
            c
        })
        .collect();
    let nodes = start_three(configs).await;
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    let clients = [nodes[0].client().await, nodes[1].client().await, nodes[2].client().await];
    if shards > 1 {
        // Shards led by different nodes: a lease's home and its keys' shards on different leaders.
        clients[0].balance_leaders().await.unwrap();
    }
    let router = ShardRouter::new(shards);

    // --- Revocation: every key of every shard goes, on every node.
    let (id, ttl) = clients[0].grant_lease(60).await.unwrap();
    assert_eq!(ttl, 60);
    assert!((1..=MAX_LEASE_ID).contains(&id));
    let keys = keys_in_every_shard(&router, "rev");
    for (i, k) in keys.iter().enumerate() {
        clients[i % 3].put_with_lease(k.clone(), format!("v{i}"), id).await.unwrap();
    }
    let status = clients[1].lease_ttl(id, true).await.unwrap();
    let listed: Vec<String> = status.keys.iter().map(|k| String::from_utf8(k.clone()).unwrap()).collect();
    assert_eq!(listed, keys, "lease ttl --keys lists the keys of every shard");
    assert_eq!(status.granted_ttl_secs, 60);
    assert!((1..=60).contains(&status.ttl_secs), "{status:?}");
    assert!(clients[2].leases().await.unwrap().iter().any(|l| l.id == id && l.granted_ttl_secs == 60));
    assert_eq!(clients[2].revoke_lease(id).await.unwrap(), keys.len() as u64, "every key deleted");
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(clients[i % 3].get(k.clone()).await.unwrap(), None, "{k} readable after the revoke returned");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gone_everywhere(&nodes, &router, &keys).await {
        assert!(Instant::now() < deadline, "revoked keys still on some replica after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Gone: puts, renewals, lookups and a second revoke are refused.
    is_lease_not_found(clients[0].put_with_lease(keys[0].clone(), "late", id).await, id);
    is_lease_not_found(clients[1].keep_alive_once(id).await, id);
    is_lease_not_found(clients[2].lease_ttl(id, false).await, id);
    is_lease_not_found(clients[0].revoke_lease(id).await, id);
    assert!(!clients[0].leases().await.unwrap().iter().any(|l| l.id == id));
    assert_eq!(clients[0].get(keys[0].clone()).await.unwrap(), None, "the refused put wrote nothing");
    is_lease_not_found(clients[0].put_with_lease("never", "x", 0x1234_5678).await, 0x1234_5678);

    // --- A new leader of the lease's home restarts its TTL (etcd's rule).
    let (id, _) = clients[0].grant_lease(60).await.unwrap();
    let home = router.shard_for_lease(id);
    let term = || nodes[0].handle().shards[&home].status().term;
    let term_at_grant = term();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = clients[1].lease_ttl(id, false).await.unwrap().ttl_secs;
    // 5 s passed (a leader that took office just before the grant restarts every TTL on its
    // expiry task's next tick, ≤ 250 ms later: hence 56, not 55) — unless the home shard
    // changed leader meanwhile on its own (a busy machine), which restarts it by the same rule.
    if term() == term_at_grant {
        assert!(before <= 56, "5 s passed: {before} s left");
    }
    let leader = nodes[0].handle().shards[&home].status().leader.expect("home shard has a leader");
    let other = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    clients[0].move_leader(home, other).await.unwrap();
    let after = clients[1].lease_ttl(id, false).await.unwrap().ttl_secs;
    assert!(after >= 55, "the new leader restarted the TTL: {after} s left (was {before})");
    clients[0].revoke_lease(id).await.unwrap();

    // --- Keep-alives keep keys past their TTL; without them the lease expires everywhere.
    let client = Arc::new(nodes[1].client().await);
    let (id, ttl) = client.grant_lease(5).await.unwrap();
    let keys = keys_in_every_shard(&router, "ttl");
    for k in &keys {
        client.put_with_lease(k.clone(), "alive", id).await.unwrap();
    }
    let keeper = client.keep_alive(id, ttl);
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(matches!(keeper.state(), KeepAliveState::Alive { ttl_secs: 5 }), "{:?}", keeper.state());
    for (i, k) in keys.iter().enumerate() {
        assert!(clients[i % 3].get(k.clone()).await.unwrap().is_some(), "{k} kept alive past its TTL");
    }
    drop(keeper);
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(60);
    while !gone_everywhere(&nodes, &router, &keys).await {
        assert!(Instant::now() < deadline, "expired lease's keys still on some replica after 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{shards} shard(s): keys of a 5 s lease gone on every replica {:?} after its keep-alive stopped",
        stopped.elapsed()
    );
    is_lease_not_found(client.keep_alive_once(id).await, id);
    is_lease_not_found(client.put_with_lease(keys[0].clone(), "late", id).await, id);
    assert!(clients[0].leases().await.unwrap().is_empty(), "no lease left");
    // Nothing left half-done: every revocation completes (no revoking record anywhere).
    wait_until(30, "every revocation completed on every replica", || {
        nodes.iter().all(|n| n.handle().shards.values().all(|s| s.lease_deadlines().revoking().is_empty()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_on_one_shard() {
    leases_on(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_on_four_shards_with_keys_in_every_shard() {
    leases_on(4).await;
}
