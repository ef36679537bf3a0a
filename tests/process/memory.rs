//! Memory a hostile client cannot grow: request bytes are reserved before they are read
//! (`[limits] request_memory_mib`), so many streams that each announce a request of the largest
//! size and send all of it but its last byte leave the node's resident memory within its budget;
//! the requests that do not fit are refused (retryably) without their bytes being read.

use std::time::Duration;

use aspen::{api::CLIENT_ALPN, transport::endpoint::CONNECTION_RECEIVE_WINDOW};

use crate::support::{expect_code, raw_endpoint, stdout, NodeProc};

/// The node's resident set in KiB (`VmRSS` of /proc/<pid>/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS in kB")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_memory_stays_bounded_under_many_large_unfinished_requests() {
    const BUDGET_MIB: u64 = 32;
    const CONNECTIONS: usize = 12;
    const STREAMS: usize = 4;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    // A long request timeout: the unfinished requests must still be held when RSS is read.
    node.extra_args =
        vec!["--request-memory-mib".into(), BUDGET_MIB.to_string(), "--request-timeout-ms".into(), "120000".into()];
    node.start();
    expect_code(&node.cli(&["put", "k", "v"]), 0, "put before");
    let pid = node.pid().expect("node running");
    let before = rss_kib(pid);

    let max_frame = aspen::NodeConfig::default().max_client_frame();
    let offered = (CONNECTIONS * STREAMS * max_frame) as u64;
    assert!(offered > 4 * BUDGET_MIB * 1024 * 1024, "the attack offers several budgets");
    let ep = raw_endpoint().await;
    let addr = node.ticket().endpoint_addr();
    let mut conns = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let conn = ep.connect(addr.clone(), CLIENT_ALPN).await.expect("connect");
        for _ in 0..STREAMS {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
                let mut bytes = (max_frame as u32).to_be_bytes().to_vec();
                bytes.resize(4 + max_frame - 1, 0);
                // All but the last byte: the node waits for it, holding what it read.
                let sent = tokio::time::timeout(Duration::from_secs(60), send.write_all(&bytes)).await;
                let refused = match sent {
                    Ok(Ok(())) => false,
                    // Stopped by the node: it refused the request before reading it.
                    Ok(Err(_)) => true,
                    Err(_) => panic!("a write neither finished nor was stopped within 60 s"),
                };
                if refused {
                    let answer = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(64 * 1024)).await;
                    let text = format!("{answer:?}");
                    assert!(!text.contains("Elapsed"), "a refused request got no answer: {text}");
                }
                (send, recv, refused)
            }));
        }
        conns.push(conn);
    }
    let mut held = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (send, recv, r) = t.await.expect("attack task");
        refused += usize::from(r);
        held.push((send, recv));
    }
    let during = rss_kib(pid);
    let grown_mib = during.saturating_sub(before) / 1024;
    println!(
        "offered {} MiB in {} requests; refused {refused}; node RSS {} → {} MiB (+{grown_mib} MiB)",
        offered >> 20,
        CONNECTIONS * STREAMS,
        before / 1024,
        during / 1024
    );
    assert!(refused > 0, "with {} MiB offered, some requests must be refused", offered >> 20);
    // The request budget, plus what QUIC buffers before the node reads or refuses a stream
    // (each stream's window, 1.25 MB, at most the connection window), plus 32 MiB of room for
    // the allocator and everything else.
    let quic_mib = (CONNECTIONS * (STREAMS * 1_250_000).min(CONNECTION_RECEIVE_WINDOW as usize)) as u64 >> 20;
    let bound = BUDGET_MIB + quic_mib + 32;
    assert!(
        grown_mib < bound,
        "node RSS grew by {grown_mib} MiB under {} MiB of unfinished requests (bound {bound} MiB: budget \
         {BUDGET_MIB} MiB + QUIC windows {quic_mib} MiB + 32)",
        offered >> 20
    );

    // The node still serves, and gives the memory back once the attacker is gone.
    drop(held);
    for c in &conns {
        c.close(0u32.into(), b"done");
    }
    ep.close().await;
    expect_code(&node.cli(&["put", "k", "after"]), 0, "put after");
    assert_eq!(stdout(&node.cli(&["get", "k"])), "after\n");
    assert!(node.terminate().success(), "node exits 0");
}
