//! The operator HTTP endpoint of a real `aspen-node`, through a real HTTP client (ureq): on by
//! default at TCP 127.0.0.1:<bind port>; `/health`, `/ready` (503 with the reason until the node
//! serves as a member, 200 after), `/status` (this node's status, never a key's value), 404
//! elsewhere; `--http-addr off`; an explicit address in use stops the start with exit 2.

use std::{net::SocketAddr, time::Duration};

use crate::support::{expect_code, stderr, NodeProc, NODE_BIN};

/// GET `path` on `addr`: status code and JSON body (`None`: nothing listens there).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, serde_json::Value)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = match agent.get(format!("http://{addr}{path}")).call() {
        Ok(r) => r,
        Err(ureq::Error::Io(_)) | Err(ureq::Error::ConnectionFailed) => return None,
        Err(e) => panic!("GET {path}: {e}"),
    };
    let code = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    Some((code, serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))))
}

fn http_of(node: &NodeProc) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], node.bind.port()))
}

#[test]
fn health_ready_and_status_over_http() {
    let root = tempfile::tempdir().unwrap();

    // A --no-init node is alive but not ready: no cluster yet.
    let mut waiting = NodeProc::new(root.path(), 7);
    waiting.extra_args = vec!["--no-init".into()];
    waiting.start();
    let (code, health) = get(http_of(&waiting), "/health").expect("the endpoint is on by default");
    assert_eq!((code, health["node_id"].as_u64()), (200, Some(7)), "{health}");
    let (code, ready) = get(http_of(&waiting), "/ready").unwrap();
    assert_eq!(code, 503, "{ready}");
    assert_eq!(ready["ready"], false);
    assert!(ready["reason"].as_str().unwrap().contains("not initialized"), "{ready}");
    // Once it is a cluster of its own, it becomes ready.
    expect_code(&waiting.cli(&["cluster", "init"]), 0, "cluster init");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, ready) = get(http_of(&waiting), "/ready").unwrap();
        if code == 200 {
            assert_eq!(ready["ready"], true);
            assert_eq!(ready["shards"][0]["shard"], 0, "{ready}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not ready 30 s after init: {ready}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // /status: this node's view of its shards (what `cluster status --json` reports for it),
    // and no key or value.
    expect_code(&waiting.cli(&["put", "a-key", "a-secret-value"]), 0, "put");
    let (code, status) = get(http_of(&waiting), "/status").unwrap();
    assert_eq!(code, 200);
    assert_eq!(status["node_id"], 7);
    assert_eq!(status["shards"][0]["role"], "Leader", "{status}");
    assert_eq!(status["shards"][0]["leader"], 7, "{status}");
    assert!(status["shards"][0]["last_applied"].as_u64().unwrap() > 0, "{status}");
    assert!(!status.to_string().contains("a-secret-value"), "{status}");
    let (code, _) = get(http_of(&waiting), "/keys/a-key").unwrap();
    assert_eq!(code, 404);

    // Off: nothing listens.
    let mut off = NodeProc::new(root.path(), 1);
    off.extra_args = vec!["--http-addr".into(), "off".into()];
    off.start();
    assert!(get(http_of(&off), "/health").is_none(), "--http-addr off serves nothing");

    // An explicit address that is in use: exit 2, naming the flag.
    let out = std::process::Command::new(NODE_BIN)
        .args(["--node-id", "2", "--data-dir"])
        .arg(root.path().join("n2"))
        .args(["--bind-addr", &format!("127.0.0.1:{}", aspen_testkit::free_port())])
        .args(["--http-addr", &http_of(&waiting).to_string()])
        .env_remove("ASPEN_TICKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--http-addr"), "{}", stderr(&out));
}

/// GET `path` on `addr` as text: status code, content type and body.
fn get_text(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = agent.get(format!("http://{addr}{path}")).call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let code = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (code, content_type, response.body_mut().read_to_string().unwrap())
}

/// The value of the sample written exactly `series` (name and labels as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Runs `promtool check metrics` on `text` (its format and naming lint); `None`: no promtool.
fn promtool_check(text: &str) -> Option<(bool, String)> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    Some((out.status.success(), format!("{}{}", stderr(&out), crate::support::stdout(&out))))
}

/// `GET /metrics` of a real node: Prometheus text that `promtool check metrics` accepts, whose
/// numbers follow what the node did — its requests by kind and outcome, a refused token, its
/// role and indexes, its batched writes and fsyncs — and that names no key or value.
#[test]
fn metrics_are_prometheus_text_that_counts_what_happened() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 3);
    node.start();
    // The node runs without transparent huge pages (design §6; mimalloc's MIMALLOC_ALLOW_THP
    // would override it). Kernels before 5.0 do not report the flag.
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid().unwrap())).unwrap();
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() && status.contains("THP_enabled:") {
        assert!(status.contains("THP_enabled:\t0"), "{status}");
    }
    for i in 0..5 {
        expect_code(&node.cli(&["put", &format!("metric-key-{i}"), "a-secret-value"]), 0, "put");
    }
    expect_code(&node.cli(&["get", "metric-key-1"]), 0, "get");
    expect_code(&node.cli(&["get", "no-such-key"]), 1, "get of a missing key");
    // A ticket without a token: refused, and counted by reason.
    let ticket = node.ticket().encode();
    let mut cmd = std::process::Command::new(crate::support::CLI_BIN);
    aspen_testkit::clean_env(&mut cmd);
    let o = cmd.current_dir(root.path()).args(["--timeout", "20", "--ticket", &ticket, "get", "x"]).output().unwrap();
    expect_code(&o, 4, "a ticket without a token");

    let (code, content_type, text) = get_text(http_of(&node), "/metrics");
    assert_eq!(code, 200, "{text}");
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    match promtool_check(&text) {
        Some((ok, report)) => assert!(ok && report.trim().is_empty(), "promtool check metrics:\n{report}\n{text}"),
        None => eprintln!("promtool not found: skipping its check of /metrics (scripts/test.sh installs it)"),
    }
    assert!(!text.contains("a-secret-value") && !text.contains("metric-key"), "{text}");

    let at_least = |series: &str, min: f64| {
        let v = sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
        assert!(v >= min, "{series} = {v}, expected ≥ {min}\n{text}");
        v
    };
    at_least("aspen_requests_total{alpn=\"client\",op=\"put\",outcome=\"ok\"}", 5.0);
    at_least("aspen_requests_total{alpn=\"client\",op=\"get\",outcome=\"ok\"}", 2.0);
    at_least("aspen_request_duration_seconds_count{alpn=\"client\",op=\"put\"}", 5.0);
    at_least("aspen_auth_refusals_total{reason=\"no_token\"}", 1.0);
    at_least("aspen_requests_total{alpn=\"client\",op=\"get\",outcome=\"permission_denied\"}", 1.0);
    assert_eq!(sample(&text, "aspen_shard_role{shard=\"0\",role=\"leader\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "aspen_shard_role{shard=\"0\",role=\"follower\"}"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "aspen_shard_leader_id{shard=\"0\"}"), Some(3.0), "{text}");
    assert_eq!(sample(&text, "aspen_shard_voters{shard=\"0\"}"), Some(1.0), "{text}");
    let applied = at_least("aspen_shard_applied_index{shard=\"0\"}", 5.0);
    assert!(at_least("aspen_shard_committed_index{shard=\"0\"}", applied) >= applied, "{text}");
    at_least("aspen_shard_term{shard=\"0\"}", 1.0);
    at_least("aspen_raft_proposals_total{shard=\"0\"}", 5.0);
    at_least("aspen_raft_writes_per_entry_count{shard=\"0\"}", 5.0);
    at_least("aspen_apply_duration_seconds_count{shard=\"0\"}", 5.0);
    at_least("aspen_read_index_rounds_total{shard=\"0\"}", 1.0);
    at_least("aspen_journal_fsync_duration_seconds_count", 5.0);
    at_least("aspen_connections_open{alpn=\"client\"}", 0.0);
    at_least("process_resident_memory_bytes", 1_000_000.0);
    at_least("process_open_fds", 5.0);
    assert_eq!(sample(&text, "aspen_watchers{shard=\"0\"}"), Some(0.0), "{text}");
    assert!(text.contains(&format!("aspen_build_info{{version=\"{}\",node_id=\"3\"}} 1", env!("CARGO_PKG_VERSION"))));

    // Counters only grow: a second scrape after more puts counts them.
    expect_code(&node.cli(&["put", "metric-key-9", "v"]), 0, "put");
    let (_, _, again) = get_text(http_of(&node), "/metrics");
    let series = "aspen_requests_total{alpn=\"client\",op=\"put\",outcome=\"ok\"}";
    assert!(sample(&again, series).unwrap() > sample(&text, series).unwrap(), "{again}");
}
