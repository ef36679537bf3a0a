//! systemd readiness (`Type=notify`, config/aspen-node.service): `aspen-node` sends `READY=1`
//! to `$NOTIFY_SOCKET` once it serves — after its ticket is written and it answers requests —
//! and `STOPPING=1` when SIGTERM starts its shutdown; without `$NOTIFY_SOCKET` it sends nothing.

use std::{os::unix::net::UnixDatagram, time::Duration};

use crate::support::{expect_code, NodeProc};

/// The datagrams received within `secs`, until one contains `want` (panics otherwise).
fn wait_for(socket: &UnixDatagram, want: &str, secs: u64) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = text.lines().any(|l| l == want);
            got.push(text);
            if done {
                return got;
            }
        }
    }
    panic!("no {want} within {secs} s; received {got:?}");
}

#[test]
fn ready_and_stopping_are_notified_to_systemd() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let node = NodeProc::new(root.path(), 1);
    let mut child = node.command().env("NOTIFY_SOCKET", &path).spawn().expect("spawn aspen-node");

    let got = wait_for(&socket, "READY=1", 30);
    // Ready means serving: the ticket is there and a request is answered.
    assert!(node.data_dir.join("node.ticket").exists(), "READY=1 before the ticket: {got:?}");
    expect_code(&node.cli(&["put", "k", "v"]), 0, "put after READY=1");
    assert!(!got.iter().any(|d| d.contains("STOPPING=1")), "{got:?}");

    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_for(&socket, "STOPPING=1", 30);
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM: {status}");
}

/// The shipped unit passes `systemd-analyze verify` (with `ExecStart` pointing at the binary
/// under test), saying nothing: it warns about what it ignores but still exits 0.
#[test]
fn the_unit_file_verifies() {
    let Ok(version) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        println!("skipped: no systemd-analyze on this machine");
        return;
    };
    assert!(version.status.success());
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/aspen-node.service")).unwrap();
    assert!(unit.contains("\nType=notify\n"), "the unit waits for READY=1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aspen-node.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/aspen-node", crate::support::NODE_BIN)).unwrap();
    let out = std::process::Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}
