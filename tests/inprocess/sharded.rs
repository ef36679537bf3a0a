//! Three nodes × four shards in one process over real iroh: keys of every shard written and
//! read (linearizably) through every node, per-shard replication over `raft-shard`, scans merged
//! across shards with exact paging, single-shard batches, failover of every shard.

use std::collections::BTreeMap;
use std::ops::Bound::Unbounded;

use crate::support::{wait_digests_equal, wait_shards_converged, wait_until, InProcNode};
use aspen::{
    api::{BatchOp, ReadConsistency, ScanRequest},
    sharding::ShardRouter,
    ApiError, ClientError,
};

fn sharded_config(root: &std::path::Path, id: u64) -> aspen::NodeConfig {
    let mut c = InProcNode::config(root, id);
    c.sharding.enabled = true;
    c.sharding.num_shards = 4;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_four_shards() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_three(root.path(), None).await;
    for n in &nodes {
        assert_eq!(n.handle().shards.len(), 4);
        for (shard, node) in &n.handle().shards {
            assert_eq!(node.status().voters, vec![1, 2, 3], "node {} shard {shard}", n.config.node_id);
        }
    }

    // Writes through every node, for keys of every shard; each shard gets a different number of
    // entries, so per-shard convergence below shows each shard's log reached its own peers.
    let router = ShardRouter::new(4);
    let clients = [nodes[0].client().await, nodes[1].client().await, nodes[2].client().await];
    let mut acked = BTreeMap::new();
    let mut per_shard = [0usize; 4];
    for i in 0..120 {
        let key = format!("key/{i:03}");
        let shard = router.shard_for_key(key.as_bytes()) as usize;
        per_shard[shard] += 1;
        clients[i % 3].put(key.clone(), format!("v{i}")).await.unwrap();
        acked.insert(key, format!("v{i}"));
    }
    assert!(per_shard.iter().all(|&n| n > 10), "keys spread over all shards: {per_shard:?}");
    // Linearizable reads of every key through every node (followers forward to the leader).
    for (i, (k, v)) in acked.iter().enumerate() {
        let got = clients[i % 3].get(k.clone()).await.unwrap().map(|kv| kv.value);
        assert_eq!(got, Some(v.clone().into_bytes()), "key {k}");
    }
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    let applied: Vec<u64> = (0..4).map(|s| nodes[2].handle().shards[&s].status().last_applied).collect();
    assert!(applied.windows(2).any(|w| w[0] != w[1]), "shards have independent logs: {applied:?}");
    // Every replica of every shard holds the same state at the same index; the shards differ.
    let digests = wait_digests_equal(&[&nodes[0], &nodes[1], &nodes[2]], 30).await;
    assert_eq!(digests.len(), 4);
    let distinct: std::collections::BTreeSet<_> = digests.values().map(|d| d.digest).collect();
    assert_eq!(distinct.len(), 4, "{digests:?}");
    // `cluster status` (fanned out over the client protocol) reports them for every node.
    let status = clients[0].cluster_status().await.unwrap();
    assert_eq!(status.nodes.len(), 3);
    for report in &status.nodes {
        let shards = &report.status.as_ref().expect("every node answers").shards;
        assert_eq!(shards.len(), 4, "node {}", report.node_id);
        for s in shards {
            assert_eq!(s.digest, Some(digests[&s.shard]), "node {} shard {}", report.node_id, s.shard);
        }
    }
    for n in &nodes {
        for (k, v) in &acked {
            let shard = &n.handle().shards[&router.shard_for_key(k.as_bytes())];
            let got = shard.get(k.as_bytes(), ReadConsistency::Stale).await.unwrap().map(|kv| kv.value);
            assert_eq!(got, Some(v.clone().into_bytes()), "node {} key {k}", n.config.node_id);
        }
    }

    // Scans merge all shards in key order; paging with small pages is exact.
    let all = clients[1].scan("key/", usize::MAX, ReadConsistency::Linearizable).await.unwrap();
    let keys: Vec<String> = all.iter().map(|kv| String::from_utf8(kv.key.clone()).unwrap()).collect();
    assert_eq!(keys, acked.keys().cloned().collect::<Vec<_>>());
    let mut paged = Vec::new();
    let mut continuation = None;
    loop {
        let page = clients[2]
            .scan_page(ScanRequest {
                prefix: b"key/".to_vec(),
                start: None,
                end: None,
                limit: 7,
                continuation: continuation.take(),
                consistency: ReadConsistency::Stale,
            })
            .await
            .unwrap();
        assert!(page.entries.len() <= 7);
        paged.extend(page.entries.into_iter().map(|kv| String::from_utf8(kv.key).unwrap()));
        match page.continuation {
            Some(c) => continuation = Some(c),
            None => break,
        }
    }
    assert_eq!(paged, keys, "pages of 7 cover every key exactly once, in order");
    assert_eq!(clients[0].scan("key/", 13, ReadConsistency::Stale).await.unwrap().len(), 13);

    // A batch within one shard is atomic; a batch spanning shards is refused with a reason.
    let same: Vec<String> =
        (0..1000).map(|i| format!("b/{i}")).filter(|k| router.shard_for_key(k.as_bytes()) == 2).take(3).collect();
    let ops = same.iter().map(|k| BatchOp::Put { key: k.clone().into_bytes(), value: b"1".to_vec() }).collect();
    clients[0].batch(ops).await.unwrap();
    let other = (0..1000).map(|i| format!("b/{i}")).find(|k| router.shard_for_key(k.as_bytes()) == 1).unwrap();
    let err = clients[0]
        .batch(vec![
            BatchOp::Put { key: same[0].clone().into_bytes(), value: b"2".to_vec() },
            BatchOp::Put { key: other.into_bytes(), value: b"2".to_vec() },
        ])
        .await
        .unwrap_err();
    assert!(matches!(&err, ClientError::Api(ApiError::InvalidRequest(m)) if m.contains("within one shard")), "{err:?}");
    assert_eq!(clients[1].get(same[0].clone()).await.unwrap().unwrap().value, b"1");
    for c in clients {
        c.close().await;
    }

    // Stop the node leading shard 0: every shard it led re-elects; writes to every shard continue.
    let leader = nodes[0].handle().shards[&0].status().leader.unwrap();
    let li = (leader - 1) as usize;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let client = crate::support::client_of(&survivors.iter().map(|&i| &nodes[i]).collect::<Vec<_>>()).await;
    nodes[li].stop().await;
    wait_until(60, "every shard has a leader among the survivors", || {
        nodes[survivors[0]].handle().shards.values().all(|s| s.status().leader.is_some_and(|l| l != leader))
    })
    .await;
    for i in 120..200 {
        let key = format!("key/{i:03}");
        client.put(key.clone(), format!("v{i}")).await.unwrap();
        acked.insert(key, format!("v{i}"));
    }
    client.close().await;
    nodes[li].restart().await;
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 90).await;
    let after = wait_digests_equal(&[&nodes[0], &nodes[1], &nodes[2]], 30).await;
    assert!((0..4).all(|s| after[&s].applied_index > digests[&s].applied_index), "{after:?}");
    for (k, v) in &acked {
        let shard = &nodes[li].handle().shards[&router.shard_for_key(k.as_bytes())];
        let got = shard.get(k.as_bytes(), ReadConsistency::Stale).await.unwrap().map(|kv| kv.value);
        assert_eq!(got, Some(v.clone().into_bytes()), "restarted node: key {k}");
    }
    for n in &mut nodes {
        n.stop().await;
    }
}

/// Node 1 initializes a 4-shard cluster; nodes 2 and 3 join it at once (node 3 hosting only
/// `node3_shards`, if given).
async fn start_three(root: &std::path::Path, node3_shards: Option<Vec<u32>>) -> [InProcNode; 3] {
    let mut configs: Vec<_> = (1..=3).map(|id| sharded_config(root, id)).collect();
    configs[2].sharding.local_shards = node3_shards;
    crate::support::start_three(configs).await
}

fn leader_of(node: &InProcNode, shard: u32) -> Option<u64> {
    node.handle().shards[&shard].status().leader
}

fn key_in_shard(shard: u32, tag: &str) -> String {
    let router = ShardRouter::new(4);
    (0..10_000).map(|i| format!("{tag}/{i}")).find(|k| router.shard_for_key(k.as_bytes()) == shard).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaders_balance_and_shards_fail_independently() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_three(root.path(), None).await;
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    let client = nodes[1].client().await;

    // balance-leaders: no node leads more than ceil(4 / 3) = 2 shards.
    client.balance_leaders().await.unwrap();
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    let mut count = BTreeMap::new();
    for s in 0..4 {
        *count.entry(leader_of(&nodes[0], s).unwrap()).or_insert(0) += 1;
    }
    assert!(count.values().all(|&c| c <= 2), "leaders per node after balancing: {count:?}");
    assert!(count.len() >= 2, "leadership spread over several nodes: {count:?}");

    // Make sure the node leading shard 1 does not lead shard 2 (move-leader if it does).
    let l1 = leader_of(&nodes[0], 1).unwrap();
    if leader_of(&nodes[0], 2) == Some(l1) {
        let other = [1, 2, 3].into_iter().find(|&n| n != l1).unwrap();
        let after = client.move_leader(2, other).await.unwrap();
        assert_eq!(after.iter().find(|s| s.shard == 2).unwrap().leader, Some(other));
    }
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    let l2 = leader_of(&nodes[0], 2).unwrap();
    assert_ne!(l1, l2);
    let term2 = nodes[0].handle().shards[&2].status().term;
    client.close().await;

    // Stop the node leading shard 1: shard 1 re-elects, shard 2's leader and term stay and it
    // keeps serving.
    let li = (l1 - 1) as usize;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    let client = crate::support::client_of(&survivors.iter().map(|&i| &nodes[i]).collect::<Vec<_>>()).await;
    nodes[li].stop().await;
    client.put(key_in_shard(2, "during"), "x").await.unwrap();
    wait_until(60, "shard 1 elects a new leader", || leader_of(&nodes[survivors[0]], 1).is_some_and(|l| l != l1)).await;
    let s2 = nodes[survivors[0]].handle().shards[&2].status();
    assert_eq!(s2.leader, Some(l2), "shard 2's leader unchanged");
    assert_eq!(s2.term, term2, "shard 2 held no election");
    client.put(key_in_shard(1, "after"), "y").await.unwrap();
    assert_eq!(client.get(key_in_shard(2, "during")).await.unwrap().unwrap().value, b"x");
    client.close().await;
    for n in &mut nodes {
        n.stop().await;
    }
}

/// On `raft-shard`, a stream for a shard this node does not host gets a typed refusal, and the
/// same connection keeps carrying other shards' streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_shard_is_refused_and_connection_stays_up() {
    use openraft::{network::RPCOption, RaftNetwork};

    let root = tempfile::tempdir().unwrap();
    let mut n1 = InProcNode::start(sharded_config(root.path(), 1)).await;
    let t1 = n1.ticket();
    let ttl = RPCOption::new(std::time::Duration::from_secs(5));
    // A vote for a term far in the past: a hosted shard answers it (and rejects the vote).
    let stale_vote = || openraft::raft::VoteRequest::new(openraft::Vote::new(0, 99), None);

    let (ep, mut nets) =
        crate::support::raw_raft_clients(&t1, t1.cluster_id, &[Some(9), Some(3)], Some(n1.handle())).await;
    let (unknown, shard3) = nets.split_at_mut(1);
    let (unknown, shard3) = (&mut unknown[0], &mut shard3[0]);
    let err = unknown.vote(stale_vote(), ttl.clone()).await.unwrap_err();
    assert!(err.to_string().contains("shard 9 is not hosted"), "{err}");

    let resp = shard3.vote(stale_vote(), ttl.clone()).await.expect("shard 3 answers on the same connection");
    assert!(!resp.vote_granted);
    assert!(resp.vote.leader_id().term >= 1, "answered by shard 3's Raft: {resp:?}");
    ep.close().await;
    n1.stop().await;
}

/// Node 3 hosts only shards 0 and 1 and still serves keys of shards 2 and 3 by forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_hosting_a_subset_serves_every_key() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_three(root.path(), Some(vec![0, 1])).await;
    assert_eq!(nodes[2].handle().shards.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    // Node 3 is a voter of shards 0 and 1 only.
    let s1 = nodes[0].handle().shards[&1].status();
    let s2 = nodes[0].handle().shards[&2].status();
    assert_eq!(s1.voters, vec![1, 2, 3]);
    assert_eq!(s2.voters, vec![1, 2]);

    let client = nodes[2].client().await; // talks to node 3 only (plus discovered members)
    let router = ShardRouter::new(4);
    let mut acked = BTreeMap::new();
    for shard in 0..4 {
        for i in 0..5 {
            let key = key_in_shard(shard, &format!("s{shard}-{i}"));
            client.put(key.clone(), format!("v{shard}{i}")).await.unwrap();
            acked.insert(key, format!("v{shard}{i}"));
        }
    }
    // Reads of keys in shards 2 and 3 through node 3: linearizable and stale.
    for (k, v) in &acked {
        assert!(router.shard_for_key(k.as_bytes()) < 4);
        for consistency in [ReadConsistency::Linearizable, ReadConsistency::Stale] {
            let kv = client.get_with(k.clone(), consistency).await.unwrap();
            assert_eq!(kv.map(|kv| kv.value), Some(v.clone().into_bytes()), "key {k} ({consistency:?})");
        }
    }
    // A scan through node 3 covers every shard.
    let all = client.scan("", usize::MAX, ReadConsistency::Linearizable).await.unwrap();
    let keys: Vec<String> = all.into_iter().map(|kv| String::from_utf8(kv.key).unwrap()).collect();
    assert_eq!(keys, acked.keys().cloned().collect::<Vec<_>>());
    // cluster status through node 3 lists each node's own shards.
    let status = client.cluster_status().await.unwrap();
    let n3 = status.nodes.iter().find(|n| n.node_id == 3).unwrap();
    assert_eq!(n3.status.as_ref().unwrap().shards.len(), 2);
    client.close().await;
    for n in &mut nodes {
        n.stop().await;
    }
}

/// Gossip discovery: node 3 restarts on another port with no reconfiguration anywhere; the other
/// nodes learn its new address from its signed announcement, every shard's leader reaches it
/// again (it catches up on writes made while it was away), and member discovery hands clients
/// the new address. Identity still comes from Raft: membership keeps node 3's endpoint id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_restarted_on_a_new_port_is_found_again_by_gossip() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_three(root.path(), None).await;
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    let topic = nodes[0].handle().base.gossip_topic_id().expect("gossip topic once in a cluster");
    assert_eq!(Some(topic), nodes[2].handle().base.gossip_topic_id(), "one topic per cluster");
    let endpoint3 = nodes[2].handle().base.endpoint.id();

    nodes[2].stop().await;
    let old_addr = nodes[2].config.bind_addr;
    let new_addr = std::net::SocketAddr::from(([127, 0, 0, 1], crate::support::free_port()));
    assert_ne!(old_addr, new_addr);
    nodes[2].config.bind_addr = new_addr;
    let client = crate::support::client_of(&[&nodes[0], &nodes[1]]).await;
    let mut acked = BTreeMap::new();
    for shard in 0..4 {
        for i in 0..5 {
            let key = key_in_shard(shard, &format!("moved-{shard}-{i}"));
            client.put(key.clone(), format!("v{i}")).await.unwrap();
            acked.insert(key, format!("v{i}"));
        }
    }
    nodes[2].restart().await;
    assert_eq!(nodes[2].handle().base.endpoint.id(), endpoint3, "same node key after restart");

    // Nodes 1 and 2 learn the new address from gossip...
    wait_until(60, "peers learn node 3's new address", || {
        nodes[..2].iter().all(|n| n.handle().base.peers.announced(&endpoint3) == Some(vec![new_addr]))
    })
    .await;
    // ...and every shard's leader replicates to node 3 there.
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 90).await;
    let router = ShardRouter::new(4);
    for (k, v) in &acked {
        let shard = &nodes[2].handle().shards[&router.shard_for_key(k.as_bytes())];
        let got = shard.get(k.as_bytes(), ReadConsistency::Stale).await.unwrap().map(|kv| kv.value);
        assert_eq!(got, Some(v.clone().into_bytes()), "node 3 caught up on {k}");
    }
    // Member discovery through node 1 hands out node 3's new address; membership keeps its key.
    let members = match client.request(aspen::api::ClientRequest::Members).await.unwrap() {
        aspen::api::ClientResponse::Members(m) => m,
        other => panic!("unexpected {other:?}"),
    };
    let t3 = members
        .iter()
        .map(|t| aspen::api::NodeTicket::decode(t).unwrap())
        .find(|t| t.node_id == 3)
        .expect("node 3 listed");
    assert_eq!(t3.addrs, vec![new_addr]);
    assert_eq!(t3.endpoint_id, endpoint3);
    // A fresh client that knows only node 3's new ticket reaches the cluster.
    let c3 = nodes[2].client().await;
    c3.put(key_in_shard(2, "after-move"), "ok").await.unwrap();
    c3.close().await;
    client.close().await;
    for n in &mut nodes {
        n.stop().await;
    }
}

/// Removing a node that leads shards: it hands each shard it leads to another voter first and
/// the new leader removes it (openraft 0.9 trips a leadership check when a leader removes
/// itself). Found by the fault scenario `membership_change_sharded`, seed 1795700311242370844. No Raft core panics, the
/// cluster keeps serving every shard, and the removed node is gone from every membership.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_node_that_leads_shards_hands_them_over_first() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_three(root.path(), None).await;
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    // Node 1 initialized the cluster, so it leads every shard.
    for shard in 0..4 {
        assert_eq!(leader_of(&nodes[0], shard), Some(1), "shard {shard}");
    }
    let client = crate::support::client_of(&[&nodes[1], &nodes[2]]).await;
    client.remove(1).await.expect("remove the leader of every shard");
    for n in &nodes {
        for (shard, node) in &n.handle().shards {
            let metrics = node.raft().metrics().borrow().clone();
            assert!(
                metrics.running_state.is_ok(),
                "node {} shard {shard}: {:?}",
                n.config.node_id,
                metrics.running_state
            );
        }
    }
    wait_until(60, "node 1 left every shard", || {
        nodes[1..].iter().all(|n| {
            n.handle().shards.values().all(|s| {
                let st = s.status();
                st.voters == vec![2, 3] && !st.learners.contains(&1) && st.leader.is_some_and(|l| l != 1)
            })
        })
    })
    .await;
    for shard in 0..4 {
        client.put(key_in_shard(shard, "after-removal"), "ok").await.unwrap();
    }
    client.close().await;
    for n in &mut nodes {
        n.stop().await;
    }
}

/// A prefix delete on a sharded cluster reaches every shard — including those the receiving node
/// does not host — each atomic on its shard, and the count is the sum; a resent prefix delete
/// (same session and sequence number) is answered by each shard from its session table, never
/// applied twice. Txns run within one shard; a txn over shards is refused, naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefix_deletes_fan_out_to_every_shard_and_txns_stay_in_one() {
    use aspen::api::{
        ClientRequest, ClientResponse, Compare, CompareOp, Id128, TxnOp, TxnOpResult, WriteCommand, WriteOutcome,
        WriteSession,
    };
    let root = tempfile::tempdir().unwrap();
    // Node 3 hosts shards 0 and 1 only: its fan-out reaches shards 2 and 3 through other nodes.
    let mut nodes = start_three(root.path(), Some(vec![0, 1])).await;
    let client = nodes[2].client().await;
    let router = ShardRouter::new(4);

    let mut shards_hit = std::collections::BTreeSet::new();
    for i in 0..40 {
        let key = format!("dp/{i:02}");
        shards_hit.insert(router.shard_for_key(key.as_bytes()));
        client.put(key, "v").await.unwrap();
    }
    assert_eq!(shards_hit.len(), 4, "the prefix has keys in every shard");
    let others: Vec<String> = (0..12).map(|i| format!("other/{i:02}")).collect();
    for k in &others {
        client.put(k.clone(), "stay").await.unwrap();
    }
    assert_eq!(client.delete_prefix("dp/").await.unwrap(), 40);
    assert!(client.scan("dp/", usize::MAX, ReadConsistency::Linearizable).await.unwrap().is_empty());
    let left = crate::support::all_keys(&client).await;
    assert_eq!(left, others, "keys outside the prefix are intact");
    assert_eq!(client.delete_prefix("dp/").await.unwrap(), 0);

    // Exactly once across the fan-out: the same session and sequence number sent again after a
    // new key appeared under the prefix answers the first outcome, and the new key stays.
    for i in 0..10 {
        client.put(format!("dup/{i}"), "v").await.unwrap();
    }
    let session = WriteSession { client_id: Id128::random(), seq: 1 };
    let request = ClientRequest::Write { session, command: WriteCommand::DeletePrefix { prefix: b"dup/".to_vec() } };
    let first = client.request(request.clone()).await.unwrap();
    let ClientResponse::Write(WriteOutcome::DeletePrefix { deleted: 10, .. }) = first else {
        panic!("unexpected answer {first:?}");
    };
    client.put("dup/new", "v").await.unwrap();
    let other_client = nodes[0].client_with(nodes[2].admin_token()).await;
    assert_eq!(other_client.request(request).await.unwrap(), first, "a retry through another node, too");
    assert!(client.get("dup/new").await.unwrap().is_some(), "the retry deleted nothing");

    // A txn within one shard (shard 2, not hosted by node 3): both branches.
    let (a, b) = (key_in_shard(2, "txn-a"), key_in_shard(2, "txn-b"));
    let guarded = |expected: &str| {
        (
            vec![Compare::value(a.clone(), CompareOp::Equal, expected.to_string())],
            vec![TxnOp::put(b.clone(), "from success"), TxnOp::get(b.clone())],
            vec![TxnOp::get(a.clone())],
        )
    };
    client.put(a.clone(), "ready").await.unwrap();
    let (c, s, f) = guarded("ready");
    let ok = client.txn(c, s, f).await.unwrap();
    assert!(ok.succeeded);
    assert!(
        matches!(ok.results.as_slice(), [TxnOpResult::Put { .. }, TxnOpResult::Get(Some(kv))] if kv.value == b"from success")
    );
    let (c, s, f) = guarded("not ready");
    let failed = client.txn(c, s, f).await.unwrap();
    assert!(!failed.succeeded);
    assert!(matches!(failed.results.as_slice(), [TxnOpResult::Get(Some(kv))] if kv.value == b"ready"));

    // A txn whose keys fall into shards 1 and 3 is refused, and nothing of it is applied.
    let (x, y) = (key_in_shard(1, "span-x"), key_in_shard(3, "span-y"));
    let err = client
        .txn(
            vec![Compare::version(x.clone(), CompareOp::Equal, 0)],
            vec![TxnOp::put(x.clone(), "1")],
            vec![TxnOp::put(y.clone(), "1")],
        )
        .await
        .unwrap_err();
    match &err {
        ClientError::Api(ApiError::InvalidRequest(m)) => {
            assert_eq!(m, "txn keys span shards 1 and 3; a txn is atomic within one shard only")
        }
        other => panic!("a txn over shards must be refused: {other:?}"),
    }
    assert_eq!(client.get(x).await.unwrap(), None);
    assert_eq!(client.get(y).await.unwrap(), None);

    // The empty prefix empties every shard.
    let count = client.scan("", usize::MAX, ReadConsistency::Linearizable).await.unwrap().len() as u64;
    assert_eq!(count, 12 + 1 + 2, "other/*, dup/new, the txn's two keys");
    assert_eq!(client.delete_prefix("").await.unwrap(), count);
    assert!(client.scan("", usize::MAX, ReadConsistency::Linearizable).await.unwrap().is_empty());
    // Every replica of every shard (node 3 hosts two of them) holds the same, empty, state.
    wait_digests_equal(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    for n in &nodes {
        for (shard, raft) in &n.handle().shards {
            // Only the cluster's own (reserved) keys are left, in shard 0.
            let left = raft.reader().range_filtered(Unbounded, Unbounded, usize::MAX, usize::MAX, true).unwrap();
            assert!(left.is_empty(), "node {} shard {shard}: {left:?}", n.config.node_id);
        }
    }
    client.close().await;
    other_client.close().await;
    for n in &mut nodes {
        n.stop().await;
    }
}
