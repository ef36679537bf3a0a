//! NOSPACE alarms with real processes: a node whose data exceeds its `--quota-bytes` raises an
//! alarm that every node enforces (writes that add data exit 3 with "NOSPACE"; reads, deletes
//! and `/ready` keep working; `alarm list` names it; `alarm disarm` after freeing space lets
//! writes resume without a restart); and a data dir on a small tmpfs filled by clients' writes,
//! then restarted on a disk filled to the last byte (root only: skipped with one line
//! otherwise).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::support::{expect_code, stderr, stdout, NodeProc};

fn wait_for_alarm(node: &NodeProc, secs: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let o = node.cli(&["--json", "alarm", "list"]);
        expect_code(&o, 0, "alarm list");
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        if !v["alarms"].as_array().unwrap().is_empty() {
            return v;
        }
        assert!(Instant::now() < deadline, "no alarm within {secs} s");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut r = agent.get(format!("http://{addr}{path}")).call().unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

#[test]
fn a_node_over_its_quota_makes_the_cluster_refuse_writes_until_disarmed() {
    let root = tempfile::tempdir().unwrap();
    // Only node 3 has a small quota: its alarm stops writes on every node.
    let nodes = crate::support::start_processes(root.path(), |id| {
        if id == 3 {
            vec!["--quota-bytes".into(), "1048576".into()]
        } else {
            Vec::new()
        }
    });
    let entry = &nodes[0];
    let value = "v".repeat(64 * 1024);
    for i in 0..24 {
        expect_code(&entry.cli(&["put", &format!("big/{i:02}"), &value]), 0, "put under the quota");
    }
    let alarms = wait_for_alarm(entry, 60);
    let alarm = &alarms["alarms"][0];
    assert_eq!((alarm["node_id"].as_u64(), alarm["alarm"].as_str()), (Some(3), Some("NOSPACE")), "{alarms}");
    assert!(alarm["reason"].as_str().unwrap().contains("over the quota of 1048576 bytes"), "{alarms}");

    // Writes that add data fail on every node (each learns of the alarm from its replica of
    // shard 0, within about a second), exit 3, naming NOSPACE; the rest works.
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        let o = loop {
            let o = n.cli(&["put", "more", "x"]);
            if o.status.code() != Some(0) || Instant::now() > deadline {
                break o;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        expect_code(&o, 3, "put during a NOSPACE alarm");
        assert!(stderr(&o).contains("NOSPACE"), "{}", stderr(&o));
    }
    let o = entry.cli(&["--json", "cas", "big/00", "y", "--expected", &value]);
    expect_code(&o, 3, "cas during a NOSPACE alarm");
    assert!(stdout(&o).contains("no_space"), "{}", stdout(&o));
    assert_eq!(stdout(&entry.cli(&["get", "big/03"])).trim_end(), value);
    // Ready (reads work), and the body names the alarm; the metrics count it.
    let http = SocketAddr::from(([127, 0, 0, 1], entry.bind.port()));
    let (code, body) = http_get(http, "/ready");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("NOSPACE"), "{body}");
    let (_, metrics) = http_get(http, "/metrics");
    assert!(metrics.lines().any(|l| l == "aspen_alarms{alarm=\"nospace\"} 1"), "{metrics}");

    // Free space (deletes work), disarm: writes resume, no restart.
    for i in 0..24 {
        expect_code(&entry.cli(&["delete", &format!("big/{i:02}")]), 0, "delete during a NOSPACE alarm");
    }
    // Node 3 measures its data again (every few seconds) before the disarm: until then it
    // would raise the alarm again.
    std::thread::sleep(Duration::from_secs(6));
    let o = entry.cli(&["--json", "alarm", "disarm"]);
    expect_code(&o, 0, "alarm disarm");
    assert!(stdout(&o).contains("NOSPACE"), "the disarmed alarm is listed: {}", stdout(&o));
    // Every node takes writes again (each within about a second).
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = n.cli(&["put", &format!("after-{}", n.node_id), "1"]);
            if o.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "writes did not resume after the disarm: {}", stderr(&o));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    std::thread::sleep(Duration::from_secs(4));
    let o = entry.cli(&["--json", "alarm", "list"]);
    assert_eq!(stdout(&o).trim(), "{\"alarms\":[]}", "under the quota now: not raised again");
}

/// A tmpfs of `mib` MiB mounted at `dir` (unmounted when dropped); `None` where mounting is not
/// allowed (not root).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` to its last byte with a file there; returns its path.
fn fill_disk(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![1u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    let small = [1u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    path
}

#[test]
fn a_full_disk_raises_the_alarm_and_a_restart_on_it_serves_reads() {
    let root = tempfile::tempdir().unwrap();
    let mount = root.path().join("disk");
    let Some(_tmpfs) = Tmpfs::mount(&mount, 96) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root): the full-disk test did not run");
        return;
    };
    let mut node = NodeProc::new(&mount, 1);
    // The reserve covers what the node writes after the alarm: entries in flight, the log's
    // checkpoints of the journal into its database, the log until compacted (4 MiB here).
    node.extra_args = vec![
        "--reserve-bytes".into(),
        (24u64 << 20).to_string(),
        "--snapshot-log-bytes".into(),
        (4u64 << 20).to_string(),
    ];
    node.start();
    let value = "d".repeat(32 * 1024);
    let mut acked = Vec::new();
    let refusal = loop {
        let key = format!("k{:05}", acked.len());
        let o = node.cli(&["put", &key, &value]);
        match o.status.code() {
            Some(0) => acked.push(key),
            Some(3) if stderr(&o).contains("NOSPACE") => break stderr(&o),
            other => panic!("put {key} after {} acked: exit {other:?}: {}", acked.len(), stderr(&o)),
        }
        assert!(acked.len() < 20_000, "96 MiB of tmpfs never filled");
    };
    eprintln!("full disk: {} puts of {} bytes acknowledged before the alarm", acked.len(), value.len());
    assert!(refusal.contains("free on the disk"), "{refusal}");
    assert!(node.is_running(), "the node keeps running on a full disk");
    // Everything acknowledged reads back; deletes work.
    for key in acked.iter().step_by(97) {
        assert_eq!(stdout(&node.cli(&["get", key])).trim_end(), value, "{key}");
    }
    expect_code(&node.cli(&["delete", &acked[0]]), 0, "delete on a full disk");

    // Restart on a disk full to the last byte: it starts and serves reads.
    assert!(node.terminate().success());
    let filler = fill_disk(&mount);
    node.start();
    for key in acked.iter().skip(1).step_by(97) {
        assert_eq!(stdout(&node.cli(&["get", key])).trim_end(), value, "{key} after a restart on a full disk");
    }
    expect_code(&node.cli(&["put", "more", "x"]), 3, "put on a full disk");

    // Space freed, alarm disarmed: writes resume.
    std::fs::remove_file(filler).unwrap();
    for key in acked.iter().skip(1).take(acked.len() / 2) {
        expect_code(&node.cli(&["delete", key]), 0, "delete");
    }
    expect_code(&node.cli(&["alarm", "disarm"]), 0, "alarm disarm");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = node.cli(&["put", "more", "x"]);
        if o.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "writes did not resume: {}", stderr(&o));
        std::thread::sleep(Duration::from_millis(500));
    }
}
