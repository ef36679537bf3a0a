//! `/ready` follows the cluster (docs/operations.md, "Probes and status"): 200 on every member
//! of a healthy three-node cluster; on a node whose shard lost its quorum, 503 naming the shard
//! and why; 200 again once the others are back.

use std::{net::SocketAddr, time::Duration};

use crate::support::{start_three, wait_converged, InProcNode};

/// GET /ready on `node`'s HTTP endpoint (on by default at its bind port): status and JSON body.
async fn ready(node: &InProcNode) -> (u16, serde_json::Value) {
    let addr = SocketAddr::from(([127, 0, 0, 1], node.config.bind_addr.port()));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut r = agent.get(format!("http://{addr}/ready")).call().expect("GET /ready");
        let text = r.body_mut().read_to_string().unwrap();
        (r.status().as_u16(), serde_json::from_str(&text).unwrap())
    })
    .await
    .unwrap()
}

/// Polls /ready on `node` until its status is `code` (panics after `secs`).
async fn wait_ready_code(node: &InProcNode, code: u16, secs: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let (got, body) = ready(node).await;
        if got == code {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "node {}: /ready {got}, not {code}: {body}", node.config.node_id);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_follows_the_quorum() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_three((1..=3).map(|id| InProcNode::config(root.path(), id)).collect()).await;
    wait_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    let client = nodes[0].client().await;
    client.put("k", "v").await.unwrap();
    client.close().await;
    for n in &nodes {
        let body = wait_ready_code(n, 200, 60).await;
        assert_eq!(body["shards"][0]["ready"], true, "{body}");
    }

    // Two of three gone: the survivor's shard has no quorum (and, soon, no leader).
    let [first, second, third] = &mut nodes;
    second.stop().await;
    third.stop().await;
    let body = wait_ready_code(first, 503, 60).await;
    assert_eq!(body["ready"], false);
    assert_eq!(body["shards"][0]["shard"], 0, "{body}");
    assert_eq!(body["shards"][0]["ready"], false, "{body}");
    let reason = body["shards"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("leader") || reason.contains("quorum"), "{body}");

    second.restart().await;
    third.restart().await;
    for n in [&*first, &*second, &*third] {
        wait_ready_code(n, 200, 90).await;
    }
}
