//! The first hour as a user (issue "first hour"): a node stops on SIGTERM/SIGINT in every state
//! and logs its join retries; `--join` on a data dir of another cluster is refused; a `--no-init`
//! node says it is not initialized; the CLI fails over from a dead ticket with one dial each;
//! `--json` errors and binary values; plain `scan` escaping; TOML errors keep their diagram.

use std::{path::Path, time::Duration};

use crate::support::{expect_code, stderr, stdout, NodeProc, CLI_BIN, NODE_BIN};
use aspen_testkit::{free_port, NodeSpec, OnDrop, Output, Proc};

/// A node whose stderr goes to `log` at the product's default log filter.
fn spawn_logged(root: &Path, node_id: u64, args: &[String], log: &Path) -> (NodeSpec, Proc) {
    let mut spec = NodeSpec::new(NODE_BIN, root, node_id, std::net::SocketAddr::from(([127, 0, 0, 1], free_port())));
    // The data dir NodeProc::new(root, node_id) uses.
    spec.data_dir = root.join(format!("node-{node_id}"));
    spec.args = args.to_vec();
    let mut cmd = spec.command();
    aspen_testkit::clean_env(&mut cmd);
    // The real default filter, not the tests' `warn`.
    cmd.env_remove("RUST_LOG");
    let output = Output::File { path: log.to_path_buf(), append: true };
    let proc = Proc::spawn(format!("aspen-node {node_id}"), cmd, &output, OnDrop::Kill).expect("spawn aspen-node");
    (spec, proc)
}

/// Waits (at most 60 s, a hang detector) until `log` contains `needle`.
fn wait_for_log(proc: &mut Proc, log: &Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(proc.is_running(), "the node exited before logging {needle:?}: {text}");
        assert!(std::time::Instant::now() < deadline, "no {needle:?} in the log within 60 s: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A ticket of a node that is not running any more (its port is closed).
fn dead_ticket(root: &Path, node_id: u64) -> String {
    let mut dead = NodeProc::new(root, node_id);
    dead.start();
    let ticket = dead.ticket().encode();
    dead.kill();
    ticket
}

/// A node joining an unreachable cluster reports why, at most once per 10 s, and stops at once
/// on SIGTERM (exit 0); one waiting for `cluster init` stops on SIGINT the same way.
#[test]
fn a_joining_node_logs_its_retries_and_stops_on_sigterm() {
    let root = tempfile::tempdir().unwrap();
    let ticket = dead_ticket(root.path(), 1);
    let log = root.path().join("joiner.log");
    let started = std::time::Instant::now();
    // The join token is checked by the cluster, which is unreachable: the node retries.
    let args = ["--join".into(), ticket, "--join-token".into(), "aspenjoin1aaaa".into()];
    let (_spec, mut joiner) = spawn_logged(root.path(), 2, &args, &log);
    wait_for_log(&mut joiner, &log, "cannot join the cluster yet");
    // Let it retry a while: the reason is repeated at most once per 10 s, not per attempt.
    std::thread::sleep(Duration::from_secs(4));
    let status = joiner.terminate(Duration::from_secs(20)).expect("a joining node stops on SIGTERM");
    let elapsed = started.elapsed().as_secs();
    assert!(status.success(), "exit status {status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("joining the cluster through node 1"), "{text}");
    let retries = text.matches("cannot join the cluster yet").count() as u64;
    assert!(retries <= 1 + elapsed / 10, "{retries} retry lines in {elapsed} s: {text}");
    assert!(text.contains("SIGTERM before the node served: stopped"), "{text}");
    assert!(!text.contains("initialized a new cluster"), "a joining node never makes a cluster: {text}");

    let log = root.path().join("noinit.log");
    let (spec, mut waiting) = spawn_logged(root.path(), 3, &["--no-init".into()], &log);
    wait_for_log(&mut waiting, &log, "node is serving");
    // It says it is not initialized, at once, instead of timing out.
    let o = std::process::Command::new(CLI_BIN)
        .arg("--data-dir")
        .arg(&spec.data_dir)
        .args(["--timeout", "20", "--json", "get", "k"])
        .output()
        .unwrap();
    expect_code(&o, 3, "get from a --no-init node");
    assert!(stderr(&o).contains("node 3 is not initialized"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON error object");
    assert_eq!(v["error"]["kind"], "not_initialized", "{v}");
    waiting.signal(aspen_testkit::SIGINT).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = waiting.exited() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "no exit within 20 s of SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status, "exit status: 0", "SIGINT stops a --no-init node gracefully");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("SIGINT: shutting down"), "{text}");
}

/// A fresh node's join without a join token, or with one the cluster refuses, stops at once
/// with exit 2 and one line saying why (no endless retry); with a valid one it joins.
#[test]
fn a_join_needs_a_valid_join_token() {
    let root = tempfile::tempdir().unwrap();
    let mut n1 = NodeProc::new(root.path(), 1);
    n1.start();
    let ticket = n1.ticket().encode();
    let expired = {
        let o = n1.cli(&["cluster", "join-token", "--ttl", "1"]);
        expect_code(&o, 0, "join-token --ttl 1");
        stdout(&o).trim().to_string()
    };
    std::thread::sleep(Duration::from_millis(2100));
    let cases: [(&[&str], &str); 4] = [
        (&[], "no join token"),
        (&["--join-token", "aspenjoin1nonsense"], "malformed token"),
        (&["--join-token", &expired], "the token expired"),
        (&["--join-token", &n1.admin_token()], "not a join token"),
    ];
    for (i, (extra, why)) in cases.iter().enumerate() {
        let node = NodeProc::new(root.path(), 10 + i as u64);
        // No HTTP endpoint: its default port (the node's UDP port number, on TCP) may be taken by
        // another program's connection, and the warning would be a second line.
        let out = node
            .command()
            .args(["--http-addr", "off", "--join", &ticket])
            .args(*extra)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{why}: {err}");
        assert!(err.contains("join refused") && err.contains(why), "{why}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let mut n2 = NodeProc::new(root.path(), 2);
    n2.extra_args = vec!["--join".into(), ticket, "--join-token".into(), n1.join_token()];
    n2.start();
    expect_code(&n2.cli(&["put", "k", "v"]), 0, "the joined node serves, with its own admin.token");
}

/// `--join` on a data dir that already belongs to a cluster: another cluster's ticket is refused
/// (exit 2, saying what to do); its own cluster's ticket is ignored with a log line.
#[test]
fn join_on_an_initialized_data_dir() {
    let root = tempfile::tempdir().unwrap();
    let mut other = NodeProc::new(root.path(), 1);
    other.start();
    let mut node = NodeProc::new(root.path(), 2);
    node.start();
    let own = node.ticket().encode();
    assert!(node.terminate().success());

    let out = node
        .command()
        .args(["--http-addr", "off", "--join", &other.ticket().encode()])
        .stderr(std::process::Stdio::piped())
        .output();
    let out = out.unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("belongs to cluster") && err.contains("drop --join"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let log = root.path().join("rejoin.log");
    let (_spec, mut again) = spawn_logged(root.path(), 2, &["--join".to_string(), own], &log);
    let text = wait_for_log(&mut again, &log, "node is serving");
    assert!(text.contains("already a member of this cluster; --join ignored"), "{text}");
    assert!(again.terminate(Duration::from_secs(30)).unwrap().success());
    expect_code(&other.cli(&["put", "k", "v"]), 0, "the other cluster is unharmed");
}

/// With a dead member's ticket first, the CLI dials it once, then the live one (one dial each),
/// and answers; `--timeout` covers the failover; a dead node alone ends in exit 3.
#[test]
fn cli_fails_over_from_a_dead_ticket_with_one_dial_each() {
    let root = tempfile::tempdir().unwrap();
    let dead = dead_ticket(root.path(), 9);
    let mut live = NodeProc::new(root.path(), 1);
    live.start();
    expect_code(&live.cli(&["put", "k", "v"]), 0, "put");
    let token = live.admin_token();
    let cli = |timeout: &str, tickets: &str, args: &[&str]| {
        let mut cmd = std::process::Command::new(CLI_BIN);
        aspen_testkit::clean_env(&mut cmd);
        cmd.env("RUST_LOG", "aspen::client=debug").args(["--timeout", timeout, "--ticket", tickets]);
        cmd.args(["--token", &token]);
        cmd.args(args).output().unwrap()
    };
    let both = format!("{dead},{}", live.ticket().encode());
    for timeout in ["20", "3"] {
        let o = cli(timeout, &both, &["get", "k"]);
        expect_code(&o, 0, &format!("get with a dead first ticket, --timeout {timeout}"));
        assert_eq!(stdout(&o), "v\n");
        let dials = stderr(&o).matches("dialing").count();
        assert_eq!(dials, 2, "one dial to the dead member, one to the live one: {}", stderr(&o));
    }
    let o = cli("20", &both, &["put", "k2", "v2"]);
    expect_code(&o, 0, "put with a dead first ticket");
    let o = cli("1", &dead, &["--json", "get", "k"]);
    expect_code(&o, 3, "a dead node alone");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON error object");
    assert!(["unreachable", "timeout"].contains(&v["error"]["kind"].as_str().unwrap_or("")), "{v}");
    assert!(stderr(&o).matches("dialing").count() >= 1, "{}", stderr(&o));
}

/// `--json`: errors are one object on stdout; values that are not UTF-8 come as `value_base64`.
/// Plain `scan` prints one line per entry, control characters escaped.
#[test]
fn json_errors_binary_values_and_scan_escaping() {
    use std::io::Write;
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    std::fs::write(&config, "[limits]\nmax_value_bytes = 2048\n").unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    node.extra_args = vec!["--config".into(), config.display().to_string()];
    node.start();
    let o = node.cli(&["--json", "get", "missing"]);
    expect_code(&o, 1, "get missing --json");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON error object");
    assert_eq!(v["error"]["kind"], "not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains("missing"), "{v}");
    let o = node.cli(&["--json", "--ticket", "aspenaaaa", "get", "k"]);
    expect_code(&o, 2, "invalid ticket --json");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON error object");
    assert_eq!(v["error"]["kind"], "invalid_ticket");
    assert!(v["error"]["message"].as_str().unwrap().contains("truncated"), "{v}");
    let o = node.cli(&["--json", "put", "big", &"x".repeat(4096)]);
    expect_code(&o, 2, "oversized value --json");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON error object");
    assert_eq!(v["error"]["kind"], "too_large");

    // A binary value, written from stdin.
    let binary: Vec<u8> = vec![0xff, 0x00, b'a', 0x80];
    let mut child = std::process::Command::new(CLI_BIN)
        .arg("--data-dir")
        .arg(&node.data_dir)
        .args(["--timeout", "20", "put", "bin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&binary).unwrap();
    assert!(child.wait().unwrap().success());
    let o = node.cli(&["--json", "get", "bin"]);
    expect_code(&o, 0, "get binary --json");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(v.get("value").is_none(), "{v}");
    let decoded = data_encoding::BASE64.decode(v["value_base64"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(decoded, binary);
    assert_eq!(v["key"], "bin");

    expect_code(&node.cli(&["put", "text", "tab\there\nnew line\\"]), 0, "put text with control characters");
    let o = node.cli(&["scan"]);
    expect_code(&o, 0, "scan");
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, vec!["bin\t\\xff\\x00a\\x80", "text\ttab\\there\\nnew line\\\\"], "{}", stdout(&o));
    let o = node.cli(&["--json", "scan"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v[1]["value"], "tab\there\nnew line\\", "JSON keeps the value as it is");
}

/// A TOML mistake is shown with toml's caret diagram (several lines), still exit 2.
#[test]
fn toml_errors_keep_their_caret_diagram() {
    let root = tempfile::tempdir().unwrap();
    let bad = root.path().join("bad.toml");
    std::fs::write(&bad, "node_id = 1\n[raft]\nheartbeat_interval_ms = \"fast\"\n").unwrap();
    let node = NodeProc::new(root.path(), 1);
    let out = node.command().arg("--config").arg(&bad).stderr(std::process::Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.lines().count() >= 3, "a diagram over several lines: {err}");
    assert!(err.contains("line 3") && err.contains('^'), "{err}");
    assert!(err.contains("heartbeat_interval_ms = \"fast\""), "the offending line is quoted: {err}");
}

/// Runs `aspen-cli --data-dir <node> ARGS` with `input` on stdin.
fn cli_stdin(node: &NodeProc, args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(CLI_BIN)
        .arg("--data-dir")
        .arg(&node.data_dir)
        .args(["--timeout", "20"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `delete --prefix` (over every shard, printing the count; an empty prefix only with --all)
/// and `txn` in etcdctl's grammar (SUCCESS exit 0, FAILURE exit 1, keys of two shards refused),
/// on a node with 4 shards.
#[test]
fn delete_prefix_and_txn_from_the_cli() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    node.extra_args = ["--sharding-enabled", "--sharding-num-shards", "4"].map(String::from).to_vec();
    node.start();
    for i in 0..20 {
        expect_code(&node.cli(&["put", &format!("app/{i:02}"), "x"]), 0, "put app/*");
    }
    expect_code(&node.cli(&["put", "apple", "keep"]), 0, "put apple");
    expect_code(&node.cli(&["put", "other", "keep"]), 0, "put other");
    let o = node.cli(&["delete", "--prefix", "app/"]);
    expect_code(&o, 0, "delete --prefix");
    assert_eq!(stdout(&o), "20\n", "the count over all shards");
    assert_eq!(stdout(&node.cli(&["scan"])), "apple\tkeep\nother\tkeep\n");
    let o = node.cli(&["delete", "--prefix", ""]);
    expect_code(&o, 2, "an empty prefix without --all");
    assert!(stderr(&o).contains("--all"), "{}", stderr(&o));
    assert_eq!(stdout(&node.cli(&["scan"])).lines().count(), 2, "nothing deleted");
    expect_code(&node.cli(&["delete"]), 2, "delete without a key or --prefix");
    expect_code(&node.cli(&["delete", "k", "--prefix", "a"]), 2, "a key and --prefix");

    // txn: compare and swap a key, then the failure branch, on keys of one shard.
    expect_code(&node.cli(&["put", "mode", "blue"]), 0, "put mode");
    let o = cli_stdin(&node, &["txn"], "value(\"mode\") = \"blue\"\n\nput mode green\nget mode\n\nget mode\n");
    expect_code(&o, 0, "txn SUCCESS");
    assert_eq!(stdout(&o), "SUCCESS\n\nOK\n\nmode\ngreen\n");
    let o = cli_stdin(&node, &["txn"], "value(\"mode\") = \"blue\"\n\nput mode red\n\nget mode\ndel mode\n");
    expect_code(&o, 1, "txn FAILURE");
    assert_eq!(stdout(&o), "FAILURE\n\nmode\ngreen\n\n1\n");
    expect_code(&node.cli(&["get", "mode"]), 1, "the failure branch deleted it");
    let o = cli_stdin(&node, &["--json", "txn"], "version(\"mode\") = \"0\"\n\nput mode v1\n\n");
    expect_code(&o, 0, "txn --json");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["succeeded"], true);
    assert!(v["results"][0]["put"]["revision"].as_u64().unwrap() > 0, "{v}");
    let o = cli_stdin(&node, &["txn"], "value(\"mode\") = \n");
    expect_code(&o, 2, "a txn that does not parse");
    assert!(stderr(&o).contains("line 1"), "{}", stderr(&o));

    // Keys of two shards: refused with a clear message, nothing written.
    let keys: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
    let router = aspen::sharding::ShardRouter::new(4);
    let first = router.shard_for_key(keys[0].as_bytes());
    let other = keys.iter().find(|k| router.shard_for_key(k.as_bytes()) != first).unwrap();
    let o = cli_stdin(&node, &["txn"], &format!("\nput {} a\nput {other} b\n\n", keys[0]));
    expect_code(&o, 2, "a txn over two shards");
    assert!(stderr(&o).contains("one shard"), "{}", stderr(&o));
    expect_code(&node.cli(&["get", &keys[0]]), 1, "nothing written");
}
