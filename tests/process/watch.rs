//! `aspen-cli watch` against three real sharded `aspen-node` processes: the plain and `--json`
//! output contract, every event exactly once and in order across a `kill -9` of the node serving
//! the watch (the CLI resumes on another member), `--resume` from a printed token, and the
//! "compacted" exit code.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::support::{expect_code, start_sharded_processes, stdout, NodeProc, CLI_BIN};

/// A running `aspen-cli watch …` and its stdout, line by line.
struct Watcher {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Watcher {
    fn start(tickets: &[String], token: &str, args: &[&str]) -> Watcher {
        let mut cmd = Command::new(CLI_BIN);
        aspen_testkit::clean_env(&mut cmd);
        cmd.args(["--timeout", "30", "--ticket", &tickets.join(","), "--token", token]).args(args);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn aspen-cli watch");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watcher { child, lines }
    }

    fn line(&self) -> String {
        self.lines.recv_timeout(Duration::from_secs(60)).expect("a watch line within 60 s")
    }

    fn json(&self) -> serde_json::Value {
        let line = self.line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn watch_streams_every_event_once_across_a_kill_9_of_its_node() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_sharded_processes(root.path());
    let token = nodes[0].admin_token();
    let tickets: Vec<String> = nodes.iter().map(|n| n.ticket().encode()).collect();

    // Plain output: one line per event, escaped like scan, with --prev-kv a last field. (Started
    // from a token taken first, so that no write can precede the watch.)
    let probe = Watcher::start(&tickets, &token, &["--json", "watch", "plain/k"]);
    let start = probe.json()["resume"].as_str().unwrap().to_string();
    drop(probe);
    let plain = Watcher::start(&tickets, &token, &["watch", "plain/k", "--prev-kv", "--resume", &start]);
    expect_code(&nodes[1].cli(&["put", "plain/k", "v\n1"]), 0, "put");
    expect_code(&nodes[2].cli(&["put", "plain/k", "v2"]), 0, "put");
    expect_code(&nodes[0].cli(&["put", "plain/other", "x"]), 0, "put");
    expect_code(&nodes[0].cli(&["delete", "plain/k"]), 0, "delete");
    assert_eq!(plain.line(), "PUT\tplain/k\tv\\n1\t");
    assert_eq!(plain.line(), "PUT\tplain/k\tv2\tv\\n1");
    assert_eq!(plain.line(), "DELETE\tplain/k\tv2");
    drop(plain);

    // --json through node 2 first; node 2 is then killed mid-stream.
    let order = [tickets[1].clone(), tickets[0].clone(), tickets[2].clone()];
    let w = Watcher::start(&order, &token, &["--json", "watch", "--prefix", "app/", "--prev-kv"]);
    let created = w.json();
    assert_eq!(created["type"], "created", "{created}");
    let first_token = created["resume"].as_str().unwrap().to_string();
    let mut expected = Vec::new();
    for i in 0..20 {
        let (k, v) = (format!("app/{}", i % 5), format!("v{i}"));
        expect_code(&nodes[(i % 3) as usize].cli(&["put", &k, &v]), 0, "put");
        expected.push(("put".to_string(), k, v));
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(w.json());
    }
    nodes[1].kill();
    for i in 20..40 {
        let (k, v) = (format!("app/{}", i % 5), format!("v{i}"));
        let via = [0, 2][i % 2];
        let deadline = Instant::now() + Duration::from_secs(60);
        while !nodes[via].cli(&["put", &k, &v]).status.success() {
            assert!(Instant::now() < deadline, "writes through the survivors");
            std::thread::sleep(Duration::from_millis(200));
        }
        expected.push(("put".to_string(), k, v));
    }
    expect_code(&nodes[0].cli(&["delete", "app/0"]), 0, "delete");
    expected.push(("delete".to_string(), "app/0".to_string(), String::new()));
    while got.len() < expected.len() {
        got.push(w.json());
    }
    // Exactly the writes, once each, in order per key; previous values chain.
    for key in (0..5).map(|i| format!("app/{i}")) {
        let want: Vec<(String, String)> =
            expected.iter().filter(|e| e.1 == key).map(|e| (e.0.clone(), e.2.clone())).collect();
        let seen: Vec<(String, String)> = got
            .iter()
            .filter(|e| e["key"] == key.as_str())
            .map(|e| (e["type"].as_str().unwrap().to_string(), e["value"].as_str().unwrap_or("").to_string()))
            .collect();
        assert_eq!(seen, want, "events of {key} across the kill -9");
        let prevs: Vec<&str> =
            got.iter().filter(|e| e["key"] == key.as_str()).filter_map(|e| e["prev_value"].as_str()).collect();
        let values: Vec<&str> = want.iter().map(|w| w.1.as_str()).collect();
        assert_eq!(prevs, values[..values.len() - 1].to_vec(), "each event carries the value before it ({key})");
    }
    for e in &got {
        assert!(e["mod_revision"].as_u64().is_some() && e["shard"].as_u64().is_some(), "{e}");
        assert!(e["resume"].as_str().is_some_and(|t| t.split(',').count() == 4), "a position per shard: {e}");
    }
    assert!(w.lines.recv_timeout(Duration::from_secs(2)).is_err(), "no duplicate after the failover");
    drop(w);

    // --resume from the created token replays all of it, on another node, then goes on live.
    let again =
        Watcher::start(&tickets[2..], &token, &["--json", "watch", "--prefix", "app/", "--resume", &first_token]);
    assert_eq!(again.json()["type"], "created");
    let replayed: Vec<serde_json::Value> = (0..expected.len()).map(|_| again.json()).collect();
    let per_key = |events: &[serde_json::Value]| -> std::collections::BTreeMap<String, Vec<String>> {
        let mut m: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for e in events {
            let v = format!("{}:{}", e["type"].as_str().unwrap(), e["value"].as_str().unwrap_or(""));
            m.entry(e["key"].as_str().unwrap().to_string()).or_default().push(v);
        }
        m
    };
    assert_eq!(per_key(&replayed), per_key(&got), "a replay from the start token, per key in order");
    // Resumed from the middle: only what came after.
    let mid = got[24]["resume"].as_str().unwrap().to_string();
    let tail = Watcher::start(&tickets[..1], &token, &["--json", "watch", "--prefix", "app/", "--resume", &mid]);
    assert_eq!(tail.json()["type"], "created");
    let mut rest = Vec::new();
    for _ in 25..got.len() {
        rest.push(tail.json());
    }
    let key_values = |v: &[serde_json::Value]| -> Vec<(String, String)> {
        let mut kv: Vec<(String, String)> =
            v.iter().map(|e| (e["key"].as_str().unwrap().to_string(), e["mod_revision"].to_string())).collect();
        kv.sort();
        kv
    };
    assert_eq!(key_values(&rest), key_values(&got[25..]), "exactly the events after the token");

    // A start revision names a position in one shard's history: refused for a prefix watch of
    // every shard (exit 2).
    let o = Command::new("timeout")
        .args(["60", CLI_BIN, "--timeout", "20", "--ticket", &nodes[2].ticket().encode(), "--token", &token])
        .args(["watch", "--prefix", "app/", "--from-revision", "1"])
        .output()
        .unwrap();
    expect_code(&o, 2, "--from-revision on a sharded cluster");
    // (Compaction, exit 2: `watch_from_a_revision_on_one_shard`. Here the CLI would resume on a
    // member that still has the history.)
    nodes[1].start();
    for n in &mut nodes {
        assert!(n.terminate().success(), "node {} exits 0", n.node_id);
    }
}

#[test]
fn watch_from_a_revision_on_one_shard() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    // A history of 10 events: the start of the node's life is compacted away below.
    let config = root.path().join("history.toml");
    std::fs::write(&config, "[watch]\nhistory_entries = 10\n").unwrap();
    node.extra_args = vec!["--config".into(), config.display().to_string()];
    node.start();
    let token = node.admin_token();
    let mut revisions = Vec::new();
    for i in 0..4 {
        let o = node.cli(&["--json", "put", &format!("fr/{i}"), &format!("v{i}")]);
        expect_code(&o, 0, "put");
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        revisions.push(v["revision"].as_u64().unwrap());
    }
    // From the third put's revision: the third and fourth, then what comes live.
    let from = revisions[2].to_string();
    let w = Watcher::start(
        &[node.ticket().encode()],
        &token,
        &["--json", "watch", "--prefix", "fr/", "--from-revision", &from],
    );
    assert_eq!(w.json()["type"], "created");
    for (i, rev) in [(2, revisions[2]), (3, revisions[3])] {
        let e = w.json();
        assert_eq!(
            (e["key"].as_str().unwrap(), e["mod_revision"].as_u64().unwrap()),
            (format!("fr/{i}").as_str(), rev)
        );
    }
    expect_code(&node.cli(&["put", "fr/live", "x"]), 0, "put");
    assert_eq!(w.json()["key"], "fr/live");
    drop(w);
    // Ten more writes push the first ones out of the history: a start there is compacted.
    for i in 0..10 {
        expect_code(&node.cli(&["put", &format!("fr/more{i}"), "x"]), 0, "put");
    }
    let o = Command::new("timeout")
        .args(["60", CLI_BIN, "--timeout", "20", "--ticket", &node.ticket().encode(), "--token", &token])
        .args(["--json", "watch", "--prefix", "fr/", "--from-revision", &from])
        .output()
        .unwrap();
    expect_code(&o, 2, "watch from a compacted revision");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["error"]["kind"], "compacted", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("from revision"), "names the oldest revision: {v}");
    assert!(node.terminate().success());
}
