//! Three nodes in one process over real iroh on 127.0.0.1, formed through the real join path:
//! replication (proved by stale reads on every node), leader failover, restart and catch-up
//! through a snapshot after log purge, 1 MiB values, and refused joins.

mod support;

use std::{collections::BTreeMap, time::Duration};

use aspen::{
    api::{ClusterId, ReadConsistency},
    cluster::{bootstrap_node, BootstrapError},
};
use support::{wait_converged, wait_until, InProcNode};

async fn stale_get(node: &InProcNode, key: &str) -> Option<Vec<u8>> {
    node.handle().shard0.get(key.as_bytes(), ReadConsistency::Stale).await.unwrap().map(|kv| kv.value)
}

async fn assert_all_present(node: &InProcNode, acked: &BTreeMap<String, Vec<u8>>, when: &str) {
    for (k, v) in acked {
        assert_eq!(stale_get(node, k).await.as_ref(), Some(v), "node {} {when}: key {k}", node.config.node_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_fail_over_and_catch_up_by_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let mut configs: Vec<_> = (1..=3).map(|id| InProcNode::config(root.path(), id)).collect();
    for c in &mut configs {
        // Small snapshots, nothing kept behind them: a node that misses entries needs a snapshot.
        c.raft.snapshot_threshold = 40;
        c.raft.max_in_snapshot_log_to_keep = 0;
    }
    let n1 = InProcNode::start(configs[0].clone()).await;
    let t1 = n1.ticket();
    configs[1].join = vec![t1.encode()];
    configs[2].join = vec![t1.encode()];
    let (n2, n3) = tokio::join!(InProcNode::start(configs[1].clone()), InProcNode::start(configs[2].clone()));
    let mut nodes = [n1, n2, n3];

    let status = nodes[0].status();
    assert_eq!(status.voters, vec![1, 2, 3], "all three joined as voters");
    assert!(status.learners.is_empty());

    // Writes through every node (followers forward to the leader).
    let mut acked = BTreeMap::new();
    let clients = [nodes[0].client().await, nodes[1].client().await, nodes[2].client().await];
    for i in 0..60 {
        let (k, v) = (format!("key/{i:03}"), format!("value-{i}").into_bytes());
        clients[i % 3].put(k.clone(), v.clone()).await.unwrap();
        acked.insert(k, v);
    }
    // A 1 MiB value replicates too (byte-capped AppendEntries).
    let big = vec![0xAB; 1024 * 1024];
    clients[1].put("big", big.clone()).await.unwrap();
    acked.insert("big".into(), big);

    wait_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    for n in &nodes {
        assert_all_present(n, &acked, "after convergence").await;
    }
    for c in clients {
        c.close().await;
    }

    // Stop the leader: a new one is elected and writes continue.
    let old_leader = nodes[0].status().leader.unwrap();
    let li = nodes.iter().position(|n| n.config.node_id == old_leader).unwrap();
    nodes[li].stop().await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let stopped_at = 0;
    let _ = stopped_at;
    wait_until(60, "a new leader among the survivors", || {
        let s = nodes[survivors[0]].status();
        s.leader.is_some() && s.leader != Some(old_leader)
    })
    .await;
    let client =
        aspen::AspenClient::connect(survivors.iter().map(|&i| nodes[i].ticket()).collect(), Duration::from_secs(30))
            .await
            .unwrap();
    for i in 60..200 {
        let (k, v) = (format!("key/{i:03}"), format!("value-{i}").into_bytes());
        client.put(k.clone(), v.clone()).await.unwrap();
        acked.insert(k, v);
    }
    client.close().await;

    // Enough entries went by that the leader snapshotted and purged its log past the stopped
    // node's last entry: the restarted node can only catch up through a snapshot.
    let new_leader = nodes[survivors[0]].status().leader.unwrap();
    let ni = nodes.iter().position(|n| n.config.node_id == new_leader).unwrap();
    let purged = nodes[ni].handle().shard0.raft().metrics().borrow().purged.map(|l| l.index).unwrap_or(0);
    assert!(purged > 62, "leader purged its log up to {purged}");

    nodes[li].restart().await;
    wait_converged(&[&nodes[0], &nodes[1], &nodes[2]], 90).await;
    let snap = nodes[li].handle().shard0.raft().metrics().borrow().snapshot.map(|l| l.index).unwrap_or(0);
    assert!(snap > 62, "restarted node installed a snapshot (at {snap})");
    for n in &nodes {
        assert_all_present(n, &acked, "after restart and catch-up").await;
    }
    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_joins_leave_the_cluster_unaffected() {
    let root = tempfile::tempdir().unwrap();
    let n1 = InProcNode::start(InProcNode::config(root.path(), 1)).await;
    let t1 = n1.ticket();
    let mut c2 = InProcNode::config(root.path(), 2);
    c2.join = vec![t1.encode()];
    let n2 = InProcNode::start(c2).await;
    let client = n1.client().await;
    client.put("before", "1").await.unwrap();

    // A different node (new data dir, new endpoint) claiming node id 2.
    let mut dup = InProcNode::config(root.path(), 2);
    dup.data_dir = root.path().join("impostor");
    dup.join = vec![t1.encode()];
    let err = bootstrap_node(dup).await.expect_err("duplicate node id must be refused");
    assert!(matches!(err, BootstrapError::JoinRefused(_)), "{err}");
    assert!(err.to_string().contains("node id 2 is already a member"), "{err}");

    // A ticket of another cluster (same node, wrong cluster id).
    let mut foreign = t1.clone();
    foreign.cluster_id = ClusterId::random();
    let mut other = InProcNode::config(root.path(), 9);
    other.join = vec![foreign.encode()];
    let err = bootstrap_node(other).await.expect_err("wrong cluster id must be refused");
    assert!(err.to_string().contains("names cluster"), "{err}");

    // The cluster is unaffected: same voters, still writable, nothing learned.
    let s = n1.status();
    assert_eq!(s.voters, vec![1, 2]);
    assert!(s.learners.is_empty());
    client.put("after", "2").await.unwrap();
    assert_eq!(client.get("before").await.unwrap().map(|kv| kv.value), Some(b"1".to_vec()));
    wait_converged(&[&n1, &n2], 30).await;
    client.close().await;
    let (mut n1, mut n2) = (n1, n2);
    n2.stop().await;
    n1.stop().await;
}
