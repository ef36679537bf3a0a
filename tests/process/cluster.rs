//! Three real `aspen-node` processes joined with `--join`: writes through different nodes,
//! `kill -9` of the leader, writes through the survivors, restart, and every acknowledged key on
//! every node by stale reads.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::support::{expect_code, stderr, stdout, NodeProc};

fn status_json(node: &NodeProc) -> Option<serde_json::Value> {
    let o = crate::support::cli_with_timeout(node, 5, &["--json", "cluster", "status"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_str(stdout(&o).trim()).ok()
}

/// Node ids that report themselves leader of shard 0, and the last applied index per node.
fn leaders_and_applied(status: &serde_json::Value) -> (Vec<u64>, Vec<Option<u64>>) {
    let mut leaders = Vec::new();
    let mut applied = Vec::new();
    for n in status["nodes"].as_array().cloned().unwrap_or_default() {
        let shard = &n["shards"][0];
        if shard["role"] == "Leader" {
            leaders.push(n["node_id"].as_u64().unwrap());
        }
        applied.push(shard["last_applied"].as_u64());
    }
    (leaders, applied)
}

fn put_via(node: &NodeProc, key: &str, value: &str) -> bool {
    let o = node.cli(&["put", key, value]);
    if !o.status.success() {
        eprintln!("put {key} via node {} failed: {}", node.node_id, stderr(&o));
    }
    o.status.success()
}

#[test]
fn three_processes_survive_kill_9_of_the_leader() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes: Vec<NodeProc> = (1..=3).map(|id| NodeProc::new(root.path(), id)).collect();
    nodes[0].start();
    let t1 = nodes[0].ticket().encode();
    let join_token = nodes[0].join_token();
    for n in &mut nodes[1..] {
        n.extra_args = vec!["--join".into(), t1.clone(), "--join-token".into(), join_token.clone()];
    }
    // Start both joiners at once: concurrent joins must both succeed.
    nodes[1].start();
    nodes[2].start();

    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..200 {
        let (k, v) = (format!("k{i:03}"), format!("v{i}"));
        assert!(put_via(&nodes[i % 3], &k, &v), "write {k} through node {}", i % 3 + 1);
        acked.insert(k, v);
    }

    let status = status_json(&nodes[1]).expect("cluster status");
    let (leaders, _) = leaders_and_applied(&status);
    assert_eq!(leaders.len(), 1, "one leader: {status}");
    let leader = leaders[0];
    let li = (leader - 1) as usize;
    nodes[li].kill();

    // Keep writing through the survivors; a write may fail only while the election runs.
    let survivors: Vec<usize> = (0..3).filter(|&i| i != li).collect();
    // A member that does not answer: the table is still printed, and the exit code is 3.
    let o = crate::support::cli_with_timeout(&nodes[survivors[0]], 20, &["cluster", "status"]);
    expect_code(&o, 3, "cluster status with a member down");
    assert!(stdout(&o).contains("unreachable"), "the table names the member: {}", stdout(&o));
    let mut i = 200;
    let deadline = Instant::now() + Duration::from_secs(120);
    while i < 300 {
        assert!(Instant::now() < deadline, "survivors did not accept writes");
        let (k, v) = (format!("k{i:03}"), format!("v{i}"));
        if put_via(&nodes[survivors[i % 2]], &k, &v) {
            acked.insert(k, v);
            i += 1;
        }
    }

    // The killed leader restarts (still with --join in its flags for joiners: it just restarts).
    nodes[li].start();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "replicas did not converge");
        if let Some(status) = status_json(&nodes[li]) {
            let (leaders, applied) = leaders_and_applied(&status);
            let all_equal = applied.len() == 3 && applied.iter().all(|a| a.is_some() && *a == applied[0]);
            if leaders.len() == 1 && all_equal {
                let voters = &status["shards"][0]["voters"];
                assert_eq!(voters, &serde_json::json!([1, 2, 3]), "{status}");
                assert_eq!(status["shards"][0]["learners"], serde_json::json!([]), "{status}");
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    // A joined node restarted with --join still in its flags simply restarts.
    let ji = if li == 2 { 1 } else { 2 };
    assert!(nodes[ji].terminate().success());
    nodes[ji].start();
    let o = nodes[ji].cli(&["put", "k-after-restart", "yes"]);
    expect_code(&o, 0, "write through the restarted joiner");
    acked.insert("k-after-restart".into(), "yes".into());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "replicas did not converge after the joiner restart");
        if let Some(status) = status_json(&nodes[ji]) {
            let (leaders, applied) = leaders_and_applied(&status);
            if leaders.len() == 1 && applied.len() == 3 && applied.iter().all(|a| a.is_some() && *a == applied[0]) {
                assert_eq!(status["shards"][0]["voters"], serde_json::json!([1, 2, 3]), "{status}");
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    // Every acknowledged key is on every node, read from each node's local state.
    for n in &nodes {
        let o = n.cli(&["scan", "--stale", "--prefix", "k"]);
        expect_code(&o, 0, "stale scan");
        let got: BTreeMap<String, String> = stdout(&o)
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in &acked {
            assert_eq!(got.get(k), Some(v), "node {}: key {k}", n.node_id);
        }
        let o = n.cli(&["get", "--stale", "k250"]);
        expect_code(&o, 0, "get --stale");
        assert_eq!(stdout(&o), "v250\n");
    }
    for n in &mut nodes {
        assert!(n.terminate().success(), "node {} exits 0 on SIGTERM", n.node_id);
    }
}

#[test]
fn membership_commands_add_learner_promote_remove() {
    let root = tempfile::tempdir().unwrap();
    let mut n1 = NodeProc::new(root.path(), 1);
    n1.extra_args = vec!["--request-timeout-ms".into(), "8000".into()];
    n1.start();
    let mut n2 = NodeProc::new(root.path(), 2);
    n2.extra_args = vec!["--no-init".into(), "--request-timeout-ms".into(), "8000".into()];
    n2.start();
    expect_code(&n1.cli(&["put", "a", "1"]), 0, "put");

    let t2 = n2.ticket().encode();
    // Node 2 (--no-init) is claimed only with the token in its data dir.
    let o = n1.cli(&["cluster", "add-learner", &t2]);
    expect_code(&o, 2, "add-learner without the claim token");
    assert!(stderr(&o).contains("claim token"), "{}", stderr(&o));
    let claim = std::fs::read_to_string(n2.data_dir.join("claim.token")).expect("claim.token of a --no-init node");
    let o = n1.cli(&["--json", "cluster", "add-learner", &t2, "--claim-token", claim.trim()]);
    expect_code(&o, 0, "add-learner");
    assert!(!n2.data_dir.join("claim.token").exists(), "the claim token is spent");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["voters"], serde_json::json!([1]));
    assert_eq!(v["learners"], serde_json::json!([2]));
    // The learner has the data (its log caught up before add-learner returned; it applies the
    // entries a moment later) and its ticket now names the cluster it joined. Once it applied
    // the cluster's signing key it writes its admin.token (what the CLI uses with --data-dir).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !n2.data_dir.join("admin.token").exists() {
        assert!(Instant::now() < deadline, "the learner never wrote its admin.token");
        std::thread::sleep(Duration::from_millis(50));
    }
    loop {
        let o = n2.cli(&["get", "--stale", "a"]);
        if o.status.code() == Some(0) {
            assert_eq!(stdout(&o), "1\n");
            break;
        }
        expect_code(&o, 1, "stale read on the learner: found, or not applied yet");
        assert!(Instant::now() < deadline, "the learner never applied the key it replicated");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(n2.ticket().cluster_id, n1.ticket().cluster_id);

    let o = n2.cli(&["--json", "cluster", "promote", "2"]);
    expect_code(&o, 0, "promote (sent to the learner, forwarded to the leader)");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["voters"], serde_json::json!([1, 2]));

    // Adding a node id that is taken by another endpoint is refused with a reason.
    let mut impostor = NodeProc::new(root.path(), 2);
    impostor.data_dir = root.path().join("impostor");
    impostor.extra_args = vec!["--no-init".into()];
    impostor.start();
    let o = n1.cli(&["cluster", "add-learner", &impostor.ticket().encode()]);
    expect_code(&o, 2, "duplicate node id");
    assert!(stderr(&o).contains("already a member"), "{}", stderr(&o));
    drop(impostor);

    // With node 2 down, 1 of 2 voters is no quorum: writes fail with a cluster error (exit 3).
    n2.kill();
    let o = crate::support::cli_with_timeout(&n1, 20, &["put", "b", "2"]);
    expect_code(&o, 3, "write without quorum");
    n2.start();
    // Let the two-voter cluster settle (node 2 may campaign after its restart) before removing.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "cluster did not settle after node 2 restarted");
        if let Some(status) = status_json(&n1) {
            let (leaders, applied) = leaders_and_applied(&status);
            if leaders.len() == 1 && applied.len() == 2 && applied.iter().all(|a| a.is_some() && *a == applied[0]) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let o = n1.cli(&["--json", "cluster", "remove", "2"]);
    expect_code(&o, 0, "remove");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["voters"], serde_json::json!([1]));
    assert_eq!(v["learners"], serde_json::json!([]));
    // The removed node is told so and stops: exit code 2, restarting cannot help.
    let exit = n2.exited_within(60);
    assert!(exit.as_deref().is_some_and(|s| s.contains("exit status: 2")), "removed node 2 exited with {exit:?}");
    expect_code(&n1.cli(&["put", "c", "3"]), 0, "write after remove");
    expect_code(&n1.cli(&["cluster", "remove", "1"]), 2, "removing the last voter is refused");
    // 2^48 + 1 would alias node 1 in the shard-aware id: refused, not masked.
    expect_code(&n1.cli(&["cluster", "remove", "281474976710657"]), 2, "node id out of range");
    expect_code(&n1.cli(&["cluster", "promote", "0"]), 2, "node id 0");
}
