//! `aspen-cli defrag` with real processes (docs/operations.md, "Defragmenting"): three nodes
//! with four shards loaded by concurrent clients in random key order; `defrag --cluster`
//! rewrites every member's state machine files smaller, one node after another, while the
//! cluster keeps its data (replicas converge to the same digests) and takes writes; the JSON
//! report matches the files on disk and the nodes' metrics count it; bad flags exit 2; a
//! non-admin token is refused (exit 4).

use std::time::{Duration, Instant};

use crate::{
    quota::http_get,
    sharded::{converged, status_json},
    support::{expect_code, stderr, stdout, NodeProc},
};

fn wait_converged(node: &NodeProc, secs: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = status_json(node).filter(converged) {
            return s;
        }
        assert!(Instant::now() < deadline, "replicas did not converge within {secs} s");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn defrag_shrinks_every_members_state_machines_and_keeps_the_data() {
    let root = tempfile::tempdir().unwrap();
    let nodes = crate::support::start_sharded_processes(root.path());
    let entry = &nodes[0];
    // Random keys from 16 clients at once: the B-trees fill out of order (half-full leaves).
    let o = entry.cli(&[
        "bench",
        "--clients",
        "16",
        "--requests",
        "12000",
        "--warmup",
        "0",
        "--value-size",
        "1024",
        "--key-space",
        "6000",
    ]);
    expect_code(&o, 0, "bench load");
    expect_code(&entry.cli(&["put", "defrag/probe", "before"]), 0, "put");
    // A reader-only token may not.
    let o = entry.cli(&["auth", "token", "create", "--read"]);
    expect_code(&o, 0, "token create");
    let reader = stdout(&o).trim().to_string();
    let o = entry.cli(&["--token", &reader, "defrag"]);
    expect_code(&o, 4, "defrag with a read token");
    assert!(stderr(&o).contains("admin"), "{}", stderr(&o));
    expect_code(&entry.cli(&["defrag", "--node", "2", "--cluster"]), 2, "defrag --node with --cluster");
    let before = wait_converged(entry, 60);

    let o = entry.cli(&["--json", "defrag", "--cluster"]);
    expect_code(&o, 0, "defrag --cluster");
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let reported = report["nodes"].as_array().unwrap();
    assert_eq!(reported.iter().map(|n| n["node_id"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3], "{report}");
    for (node, r) in nodes.iter().zip(reported) {
        let shards = r["shards"].as_array().unwrap();
        assert_eq!(shards.len(), 4, "{report}");
        let mut keys = 0;
        for s in shards {
            let (shard, before, after) =
                (s["shard"].as_u64().unwrap(), s["before_bytes"].as_u64().unwrap(), s["after_bytes"].as_u64().unwrap());
            assert!(after < before, "node {} shard {shard}: {before} -> {after} bytes: {report}", node.node_id);
            let file = node.data_dir.join(format!("shard-{shard}")).join("state-machine.db");
            assert_eq!(std::fs::metadata(&file).unwrap().len(), after, "{}", file.display());
            keys += s["keys"].as_u64().unwrap();
        }
        assert!(keys > 5_000, "node {}: {keys} keys copied: {report}", node.node_id);
        let (b, a): (u64, u64) = shards.iter().fold((0, 0), |(b, a), s| {
            (b + s["before_bytes"].as_u64().unwrap(), a + s["after_bytes"].as_u64().unwrap())
        });
        eprintln!("defrag of node {}: state machines {b} -> {a} bytes ({keys} keys)", node.node_id);
        // The node's metrics count it, per shard, with the bytes given back.
        let (code, text) = http_get(std::net::SocketAddr::from(([127, 0, 0, 1], node.bind.port())), "/metrics");
        assert_eq!(code, 200);
        let sample = |name: &str, shard: u64| -> u64 {
            let prefix = format!("{name}{{shard=\"{shard}\"}} ");
            let line =
                text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix} in /metrics"));
            line[prefix.len()..].parse::<f64>().unwrap() as u64
        };
        for s in shards {
            let shard = s["shard"].as_u64().unwrap();
            let gave = s["before_bytes"].as_u64().unwrap() - s["after_bytes"].as_u64().unwrap();
            assert_eq!(sample("aspen_defrags_total", shard), 1, "node {} shard {shard}", node.node_id);
            assert_eq!(
                sample("aspen_defrag_reclaimed_bytes_total", shard),
                gave,
                "node {} shard {shard}",
                node.node_id
            );
        }
    }

    // Same data: the same digests at the same indexes as before, on every replica.
    let after = wait_converged(entry, 60);
    for s in 0..4 {
        for n in 0..3 {
            let (was, is) = (&before["nodes"][n]["shards"][s], &after["nodes"][n]["shards"][s]);
            assert_eq!((&was["digest"], &was["digest_index"]), (&is["digest"], &is["digest_index"]), "shard {s}");
        }
    }
    // And the cluster goes on: reads and writes on every node.
    for node in &nodes {
        let o = node.cli(&["get", "defrag/probe"]);
        expect_code(&o, 0, "get after defrag");
        assert_eq!(stdout(&o).trim(), "before");
        let key = format!("defrag/after-{}", node.node_id);
        expect_code(&node.cli(&["put", &key, "written"]), 0, "put after defrag");
    }
    wait_converged(entry, 60);

    // One node by id, text output: one line per shard.
    let o = nodes[2].cli(&["defrag", "--node", "1"]);
    expect_code(&o, 0, "defrag --node 1");
    let text = stdout(&o);
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.lines().all(|l| l.starts_with("node 1 shard ") && l.contains(" bytes, ")), "{text}");
    expect_code(&entry.cli(&["get", "defrag/after-3"]), 0, "get after the second defrag");
    let o = entry.cli(&["defrag", "--node", "9"]);
    expect_code(&o, 2, "defrag of a node that is not a member");
    assert!(stderr(&o).contains("node 9 is not a member"), "{}", stderr(&o));
}
