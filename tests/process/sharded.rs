//! Three real `aspen-node` processes with four shards each, joined with `--join`: 1,000 keys
//! through random nodes, `kill -9` of one node, every key readable through the survivors,
//! restart, per-shard status, stale reads on every node, and an exact ordered scan.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::support::{expect_code, stderr, stdout, NodeProc};
use aspen::{api::ReadConsistency, AspenClient};

const SHARD_FLAGS: [&str; 3] = ["--sharding-enabled", "--sharding-num-shards", "4"];

pub(crate) fn status_json(node: &NodeProc) -> Option<serde_json::Value> {
    let o = crate::support::cli_with_timeout(node, 5, &["--json", "cluster", "status"]);
    o.status.success().then(|| serde_json::from_str(stdout(&o).trim()).ok()).flatten()
}

/// True when every node reports 4 shards, each shard has one leader agreed by all, 3 voters,
/// the same last applied index on every node, and the same state digest at the same index.
pub(crate) fn converged(status: &serde_json::Value) -> bool {
    let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
    if nodes.len() != 3 || nodes.iter().any(|n| n["shards"].as_array().map(|s| s.len()) != Some(4)) {
        return false;
    }
    (0..4).all(|s| {
        let views: Vec<&serde_json::Value> = nodes.iter().map(|n| &n["shards"][s]).collect();
        views.iter().all(|v| {
            v["leader"] == views[0]["leader"]
                && !v["leader"].is_null()
                && v["last_applied"] == views[0]["last_applied"]
                && v["voters"] == serde_json::json!([1, 2, 3])
                && v["digest"].is_string()
                && v["digest"] == views[0]["digest"]
                && v["digest_index"] == views[0]["digest_index"]
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_processes_survive_kill_9() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes: Vec<NodeProc> = (1..=3).map(|id| NodeProc::new(root.path(), id)).collect();
    nodes[0].extra_args = SHARD_FLAGS.iter().map(|s| s.to_string()).collect();
    nodes[0].start();
    let t1 = nodes[0].ticket().encode();
    let join_token = nodes[0].join_token();
    let admin = nodes[0].admin_token();
    for n in &mut nodes[1..] {
        n.extra_args = SHARD_FLAGS.iter().map(|s| s.to_string()).collect();
        n.extra_args.extend(["--join".to_string(), t1.clone(), "--join-token".into(), join_token.clone()]);
        n.start();
    }

    // 1,000 keys through random nodes (one client per node, each knowing only its node).
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(AspenClient::connect(vec![n.ticket()], Duration::from_secs(30)).await.unwrap().with_token(&admin));
    }
    let mut acked = BTreeMap::new();
    for i in 0..1000u32 {
        let (k, v) = (format!("key/{i:04}"), format!("value-{i}"));
        clients[rand::random::<u32>() as usize % 3].put(k.clone(), v.clone()).await.unwrap();
        acked.insert(k, v);
    }
    for c in clients {
        c.close().await;
    }

    // kill -9 one node; every key stays readable (linearizably) through the survivors.
    let victim = 1 + rand::random::<u32>() as usize % 3;
    nodes[victim - 1].kill();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim - 1).collect();
    let client = AspenClient::connect(survivors.iter().map(|&i| nodes[i].ticket()).collect(), Duration::from_secs(60))
        .await
        .unwrap()
        .with_token(&admin);
    let all = client.scan("key/", usize::MAX, ReadConsistency::Linearizable).await.unwrap();
    let got: BTreeMap<String, String> =
        all.into_iter().map(|kv| (String::from_utf8(kv.key).unwrap(), String::from_utf8(kv.value).unwrap())).collect();
    assert_eq!(got, acked, "every key readable through the survivors");
    for k in acked.keys().step_by(97) {
        assert!(client.get(k.clone()).await.unwrap().is_some(), "get {k}");
    }
    client.close().await;

    // Restart; every shard has a leader and three voters, and all replicas agree.
    nodes[victim - 1].start();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "shards did not converge after the restart");
        if let Some(status) = status_json(&nodes[victim - 1]).filter(converged) {
            // The node killed with -9 replayed its log (or took a snapshot) to the very same state.
            let digests: std::collections::BTreeSet<_> =
                (0..4).map(|s| status["nodes"][0]["shards"][s]["digest"].to_string()).collect();
            assert_eq!(digests.len(), 4, "each shard has its own state: {status}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Stale reads on every node return every key; scan returns exactly the 1,000 keys in order.
    for n in &nodes {
        let o = n.cli(&["scan", "--stale", "--prefix", "key/"]);
        expect_code(&o, 0, "stale scan");
        let lines: Vec<String> = stdout(&o).lines().map(String::from).collect();
        let want: Vec<String> = acked.iter().map(|(k, v)| format!("{k}\t{v}")).collect();
        assert_eq!(lines.len(), 1000, "node {}", n.node_id);
        assert_eq!(lines, want, "node {}: stale scan in key order", n.node_id);
        let o = n.cli(&["get", "--stale", "key/0500"]);
        assert_eq!(stdout(&o), "value-500\n");
    }
    let o = nodes[0].cli(&["scan", "--prefix", "key/"]);
    assert_eq!(stdout(&o).lines().count(), 1000);

    // A restart with another number of shards is refused with a reason (exit 2).
    assert!(nodes[2].terminate().success());
    nodes[2].extra_args = ["--sharding-enabled", "--sharding-num-shards", "2"].map(String::from).to_vec();
    let out = nodes[2].command().stderr(std::process::Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("initialized with 4 shard"), "{}", stderr(&out));
}
