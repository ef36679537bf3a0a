//! What an operator reads in the logs of three real nodes with four shards each, at the node's
//! default log filter ([`aspen::logging::DEFAULT_LOG_FILTER`]): joining is quiet; with one node
//! killed, each survivor says so once (not once per heartbeat of every shard: that was about
//! 1,000 lines in 10 s at the product's Raft timing); the node's return is one line; a clean stop
//! logs no warning. Counts, not timings, are asserted.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::support::{stdout, CLI_BIN, NODE_BIN};
use aspen_testkit::{free_port, NodeProcess, NodeSpec, OnDrop, Output, SIGTERM};

const SHARD_FLAGS: [&str; 3] = ["--sharding-enabled", "--sharding-num-shards", "4"];

/// One node whose output (stdout and stderr, across restarts) goes to `log`.
struct LoggedNode {
    spec: NodeSpec,
    log: PathBuf,
    running: Option<NodeProcess>,
}

impl LoggedNode {
    fn new(root: &Path, node_id: u64, args: Vec<String>) -> Self {
        let mut spec = NodeSpec::new(NODE_BIN, root, node_id, ([127, 0, 0, 1], free_port()).into());
        spec.args = SHARD_FLAGS.iter().map(|s| s.to_string()).chain(args).collect();
        // An empty RUST_LOG: the binary's own default filter, as an operator gets it.
        spec.rust_log = String::new();
        LoggedNode { spec, log: root.join(format!("node-{node_id}.log")), running: None }
    }

    fn start(&mut self) {
        let output = Output::File { path: self.log.clone(), append: true };
        let mut node = NodeProcess::start(self.spec.clone(), &output, OnDrop::Kill).expect("spawn aspen-node");
        node.wait_ready(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
        self.running = Some(node);
    }

    fn proc(&mut self) -> &mut aspen_testkit::Proc {
        &mut self.running.as_mut().expect("node running").proc
    }

    /// Every line the node has logged so far.
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().map(String::from).collect()
    }

    /// The lines after the first `from`.
    fn lines_since(&self, from: usize) -> Vec<String> {
        let mut lines = self.lines();
        lines.split_off(from.min(lines.len()))
    }

    /// Waits (at most 60 s, a hang detector) until the node has logged a line with `needle`
    /// after line `from`.
    fn wait_for(&self, from: usize, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.lines_since(from).iter().any(|l| l.contains(needle)) {
            assert!(Instant::now() < deadline, "node {}: no {needle:?} within 60 s:\n{}", self.id(), self.text(from));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn id(&self) -> u64 {
        self.spec.node_id
    }

    fn text(&self, from: usize) -> String {
        self.lines_since(from).join("\n")
    }
}

/// The level of a log line (`2026-…Z  WARN target: message`), if it is a `tracing` line.
fn level(line: &str) -> Option<&str> {
    line.split_whitespace().nth(1).filter(|l| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(l))
}

fn alarms(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| matches!(level(l), Some("WARN" | "ERROR"))).collect()
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

/// True once node 1 reports 3 nodes, each with 4 shards that have a leader and voters 1, 2, 3.
fn converged(node: &LoggedNode) -> bool {
    let out = Command::new(CLI_BIN)
        .arg("--data-dir")
        .arg(&node.spec.data_dir)
        .args(["--timeout", "5", "--json", "cluster", "status"])
        .env_remove("ASPEN_TICKET")
        .env_remove("ASPEN_DATA_DIR")
        .output()
        .expect("run aspen-cli");
    let Ok(status) = serde_json::from_str::<serde_json::Value>(stdout(&out).trim()) else { return false };
    let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
    nodes.len() == 3
        && nodes.iter().all(|n| {
            let shards = n["shards"].as_array().cloned().unwrap_or_default();
            shards.len() == 4
                && shards.iter().all(|s| !s["leader"].is_null() && s["voters"] == serde_json::json!([1, 2, 3]))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_peer_is_one_line_not_one_per_heartbeat_and_a_clean_stop_no_warning() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = vec![LoggedNode::new(root.path(), 1, Vec::new())];
    nodes[0].start();
    let ticket = nodes[0].spec.read_ticket().expect("node 1 has a ticket").encode();
    let out = crate::support::cli_in(&nodes[0].spec.data_dir, &["--data-dir", ".", "cluster", "join-token"]);
    crate::support::expect_code(&out, 0, "cluster join-token");
    let join_token = crate::support::stdout(&out).trim().to_string();
    let admin = std::fs::read_to_string(nodes[0].spec.data_dir.join("admin.token")).expect("admin.token");
    for id in 2..=3 {
        let args = vec!["--join".into(), ticket.clone(), "--join-token".into(), join_token.clone()];
        let mut n = LoggedNode::new(root.path(), id, args);
        n.start();
        nodes.push(n);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !converged(&nodes[0]) {
        assert!(Instant::now() < deadline, "the three nodes did not converge:\n{}", nodes[0].text(0));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Joining is quiet: no warning (openraft's "membership_log_id changed" and "message will be
    // ignored because vote changed" were five of them), except a documented join retry.
    for n in &nodes {
        let lines = n.lines();
        let unexpected: Vec<_> = alarms(&lines)
            .into_iter()
            .filter(|l| !l.contains("join not done yet") && !l.contains("cannot join the cluster yet"))
            .collect();
        assert!(unexpected.is_empty(), "node {} warned while joining: {unexpected:#?}", n.id());
    }

    // kill -9 node 3, keep writing and reading (linearizably) through the survivors for 10 s.
    let before: Vec<usize> = nodes.iter().map(|n| n.lines().len()).collect();
    nodes[2].proc().kill();
    let killed = Instant::now();
    let tickets = nodes[..2].iter().map(|n| n.spec.read_ticket().expect("ticket")).collect();
    let client =
        aspen::AspenClient::connect(tickets, Duration::from_secs(10)).await.expect("client").with_token(admin.trim());
    let mut i = 0u32;
    while killed.elapsed() < Duration::from_secs(10) {
        // Errors while shards led by node 3 elect a new leader are fine here.
        let _ = client.put(format!("k{}", i % 50), format!("v{i}")).await;
        let _ = client.get(format!("k{}", (i + 25) % 50)).await;
        i += 1;
    }
    client.close().await;
    let mut reported = Vec::new();
    for (n, from) in nodes[..2].iter().zip(&before) {
        let window = n.lines_since(*from);
        eprintln!(
            "node {}: {} lines in the 10 s after node 3 was killed:\n{}",
            n.id(),
            window.len(),
            window.join("\n")
        );
        let down = count(&window, "peer unreachable peer=3 ");
        assert!(down <= 1, "node {}: one line when the peer goes down, not {down}:\n{}", n.id(), window.join("\n"));
        assert_eq!(
            count(&window, "openraft"),
            0,
            "node {}: openraft's per-RPC reports:\n{}",
            n.id(),
            window.join("\n")
        );
        // Not one line per heartbeat (2.5 a second, per shard): the peer's line, at most a few of
        // the supervisor's about shards that lost their leader, and the odd retry.
        assert!(window.len() <= 12, "node {}: {} lines in 10 s:\n{}", n.id(), window.len(), window.join("\n"));
        if down == 1 {
            reported.push(n.id());
        }
    }
    // Every shard now has its leader on a survivor, which replicates to node 3 and notices.
    assert!(!reported.is_empty(), "no survivor said that node 3 is unreachable");

    // Node 3 comes back: one line on each survivor that had reported it, and its own start is quiet.
    let before: Vec<usize> = nodes.iter().map(|n| n.lines().len()).collect();
    nodes[2].start();
    for n in nodes[..2].iter().filter(|n| reported.contains(&n.id())) {
        n.wait_for(before[n.id() as usize - 1], "peer reachable again peer=3 ");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !converged(&nodes[0]) {
        assert!(Instant::now() < deadline, "node 3 did not rejoin:\n{}", nodes[2].text(0));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for (n, from) in nodes.iter().zip(&before) {
        let lines = n.lines_since(*from);
        assert!(count(&lines, "peer reachable again") <= 1, "node {}:\n{}", n.id(), lines.join("\n"));
        let unexpected: Vec<_> = alarms(&lines).into_iter().filter(|l| !l.contains("peer=3 ")).collect();
        assert!(unexpected.is_empty(), "node {} warned while node 3 restarted: {unexpected:#?}", n.id());
    }
    assert!(alarms(&nodes[2].lines_since(before[2])).is_empty(), "node 3 restarted quietly:\n{}", nodes[2].text(0));

    // A clean stop (SIGTERM) logs no warning: first node 2 alone, then nodes 1 and 3 together.
    // (Between the two, nodes 1 and 3 may say that node 2 is unreachable: it is.)
    let stopping = nodes[1].lines().len();
    let status = nodes[1].proc().terminate(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "node 2 exits 0 on SIGTERM: {status}\n{}", nodes[1].text(stopping));
    let stop = nodes[1].lines_since(stopping);
    assert!(count(&stop, "stopped") == 1 && alarms(&stop).is_empty(), "node 2's clean stop:\n{}", stop.join("\n"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stopping: Vec<usize> = nodes.iter().map(|n| n.lines().len()).collect();
    for i in [0, 2] {
        nodes[i].proc().signal(SIGTERM).unwrap();
    }
    for i in [0, 2] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = nodes[i].proc().exited() {
                break status;
            }
            assert!(Instant::now() < deadline, "node {} did not stop within 60 s of SIGTERM", i + 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let stop = nodes[i].lines_since(stopping[i]);
        assert!(status.contains("exit status: 0"), "node {} exits 0 on SIGTERM: {status}\n{}", i + 1, stop.join("\n"));
        assert!(alarms(&stop).is_empty(), "node {}'s clean stop warned:\n{}", i + 1, stop.join("\n"));
    }
    // Nothing of openraft's, start to end, at the default filter.
    for n in &nodes {
        assert_eq!(count(&n.lines(), "openraft"), 0, "node {}:\n{}", n.id(), n.text(0));
    }
}

/// `--log-format json`: every line the node writes, from start-up to a clean stop, is one JSON
/// object with a timestamp, a level, a target and the event's fields (its message among them).
#[test]
fn json_log_lines_are_one_object_each() {
    let root = tempfile::tempdir().unwrap();
    let mut node = LoggedNode::new(root.path(), 1, vec!["--log-format".into(), "json".into()]);
    node.start();
    let status = node.proc().terminate(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "exits 0 on SIGTERM: {status}");
    // The file has stdout too: its one line is the ticket (the binary's stdout contract).
    let all = node.lines();
    assert_eq!(all.iter().filter(|l| l.starts_with("ticket: aspen")).count(), 1, "{all:?}");
    let lines: Vec<&String> = all.iter().filter(|l| !l.starts_with("ticket: aspen")).collect();
    assert!(lines.len() >= 2, "start-up and shutdown lines: {lines:?}");
    let mut messages = Vec::new();
    for line in lines.iter().copied() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line:?}"));
        for field in ["timestamp", "level", "target"] {
            assert!(v[field].is_string(), "{field} in {line}");
        }
        assert!(["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&v["level"].as_str().unwrap()), "{line}");
        messages
            .push(v["fields"]["message"].as_str().unwrap_or_else(|| panic!("fields.message in {line}")).to_string());
    }
    assert!(!lines.iter().any(|l| l.contains('\u{1b}')), "no colour codes");
    assert!(messages.iter().any(|m| m.contains("shut")), "a shutdown line among {messages:?}");
}
