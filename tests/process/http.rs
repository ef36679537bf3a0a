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
