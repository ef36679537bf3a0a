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

pub(crate) fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
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
    // Puts until the alarm refuses them (node 3 measures its data every few seconds).
    let mut written = 0;
    for i in 0..200 {
        let o = entry.cli(&["put", &format!("big/{i:03}"), &value]);
        if o.status.code() == Some(3) && stderr(&o).contains("NOSPACE") {
            break;
        }
        expect_code(&o, 0, "put under the quota");
        written += 1;
        if written >= 24 {
            break;
        }
    }
    assert!(written >= 16, "refused before 1 MiB was written: {written} puts of 64 KiB");
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
    let o = entry.cli(&["--json", "cas", "big/000", "y", "--expected", &value]);
    expect_code(&o, 3, "cas during a NOSPACE alarm");
    assert!(stdout(&o).contains("no_space"), "{}", stdout(&o));
    assert_eq!(stdout(&entry.cli(&["get", "big/003"])).trim_end(), value);
    // Ready (reads work), and the body names the alarm; the metrics count it.
    let http = SocketAddr::from(([127, 0, 0, 1], entry.bind.port()));
    let (code, body) = http_get(http, "/ready");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("NOSPACE"), "{body}");
    let (_, metrics) = http_get(http, "/metrics");
    assert!(metrics.lines().any(|l| l == "aspen_alarms{alarm=\"nospace\"} 1"), "{metrics}");

    // Free space (deletes work), disarm: writes resume, no restart.
    for i in 0..written {
        expect_code(&entry.cli(&["delete", &format!("big/{i:03}")]), 0, "delete during a NOSPACE alarm");
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

/// A node (id 1) serving from a 96 MiB tmpfs mounted at `mount`; `None` (with one line saying
/// `what` did not run) where mounting is not allowed.
fn node_on_tmpfs(mount: &Path, what: &str) -> Option<(Tmpfs, NodeProc)> {
    let Some(tmpfs) = Tmpfs::mount(mount, 96) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root): {what} did not run");
        return None;
    };
    let mut node = NodeProc::new(mount, 1);
    // The reserve covers what the node writes after the alarm: entries in flight, the log's
    // checkpoints of the journal into its database, the log until compacted (4 MiB here).
    node.extra_args = vec![
        "--reserve-bytes".into(),
        (24u64 << 20).to_string(),
        "--snapshot-log-bytes".into(),
        (4u64 << 20).to_string(),
    ];
    node.start();
    Some((tmpfs, node))
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
    let Some((_tmpfs, mut node)) = node_on_tmpfs(&mount, "the full-disk test") else { return };
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
    // A defragmentation needs room for its copy: refused (exit 3, `no_space`), nothing changed.
    let o = node.cli(&["defrag"]);
    expect_code(&o, 3, "defrag on a full disk");
    assert!(
        stderr(&o).contains("defrag refused, nothing changed") && stderr(&o).contains("free bytes"),
        "{}",
        stderr(&o)
    );
    let o = node.cli(&["--json", "defrag"]);
    assert!(stdout(&o).contains("\"no_space\"") || stderr(&o).contains("\"no_space\""), "{}{}", stdout(&o), stderr(&o));

    // Space freed, alarm disarmed: writes resume. Deletes alone free no disk space (the files
    // keep their size; a busy machine raises the alarm late, with the disk fuller, and the
    // disarmed alarm would rightly come back): a defragmentation gives the room back.
    std::fs::remove_file(filler).unwrap();
    for key in acked.iter().skip(1) {
        expect_code(&node.cli(&["delete", key]), 0, "delete");
    }
    expect_code(&node.cli(&["defrag"]), 0, "defrag once space is freed");
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

/// Another program fills the disk to the last byte (past the alarm's threshold, eating the
/// reserve the node released) while a client writes: the node's database writes wait for
/// room instead of failing, the alarm refuses new writes, and once the other program's file is
/// gone every acknowledged write reads back, the shard is healthy, and writes resume after a
/// disarm — no shard stopped, no restart.
#[test]
fn a_disk_filled_by_another_program_stalls_writes_without_stopping_the_shard() {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    };
    let root = tempfile::tempdir().unwrap();
    let mount = root.path().join("disk");
    let Some((_tmpfs, mut node)) = node_on_tmpfs(&mount, "the disk-filled-by-another-program test") else { return };
    let stop = Arc::new(AtomicBool::new(false));
    // Each acknowledged key with the moment its put was sent.
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Default::default();
    let value = "e".repeat(16 * 1024);
    let writer = {
        let (stop, acked, value, dir) = (stop.clone(), acked.clone(), value.clone(), node.data_dir.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("w{i:05}");
                let sent = Instant::now();
                let mut cmd = std::process::Command::new(crate::support::CLI_BIN);
                aspen_testkit::clean_env(&mut cmd);
                let o =
                    cmd.args(["--timeout", "5", "--data-dir"]).arg(&dir).args(["put", &key, &value]).output().unwrap();
                if o.status.success() {
                    acked.lock().unwrap().push((key, sent));
                }
                i += 1;
            }
        })
    };
    while acked.lock().unwrap().len() < 50 {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The other program: fills the disk to the last byte.
    let filler = fill_disk(&mount);
    // New writes are refused (once the alarm is recorded), the node runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = node.cli(&["put", "probe", "x"]);
        if o.status.code() == Some(3) && stderr(&o).contains("NOSPACE") {
            break;
        }
        assert!(Instant::now() < deadline, "no NOSPACE refusal with the disk full: {}", stderr(&o));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(node.is_running());
    // Deletes are allowed; on this full disk a prefix delete of many keys (a large copy-on-write
    // transaction) has no room: it waits (the client gives up after its timeout) instead of
    // failing the shard, and completes once there is room.
    let deleted: Vec<String> =
        acked.lock().unwrap().iter().map(|(k, _)| k).filter(|k| k.starts_with("w000")).cloned().collect();
    let mut cmd = std::process::Command::new(crate::support::CLI_BIN);
    aspen_testkit::clean_env(&mut cmd);
    let o = cmd
        .args(["--timeout", "3", "--data-dir"])
        .arg(&node.data_dir)
        .args(["delete", "--prefix", "w000"])
        .output()
        .unwrap();
    assert!(matches!(o.status.code(), Some(0) | Some(3)), "delete --prefix: {}", stderr(&o));
    let delete_done = o.status.success().then(Instant::now);
    // The other program's file goes: what waited completes; nothing acknowledged is lost.
    std::fs::remove_file(&filler).unwrap();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    eprintln!("disk filled by another program: {} puts acknowledged", acked.len());
    for (key, sent) in acked.iter().filter(|(k, _)| !deleted.contains(k)) {
        let o = node.cli(&["get", key]);
        // A put under the prefix sent before the delete finished (it waited for room, then was
        // acknowledged after `deleted` was taken) may be ordered before the delete: gone, or
        // there whole. Every other acknowledged put is there.
        let raced = key.starts_with("w000") && delete_done.is_none_or(|done| *sent < done);
        if raced && o.status.code() == Some(1) {
            continue;
        }
        expect_code(&o, 0, &format!("get {key}"));
        assert_eq!(stdout(&o).trim_end(), value, "{key}");
    }
    assert!(deleted.len() >= 50, "{} keys under w000", deleted.len());
    for key in &deleted {
        expect_code(&node.cli(&["get", key]), 1, "a key deleted on the full disk, once there is room");
    }
    let http = SocketAddr::from(([127, 0, 0, 1], node.bind.port()));
    let (code, body) = http_get(http, "/ready");
    assert_eq!(code, 200, "the shard is healthy: {body}");
    expect_code(&node.cli(&["alarm", "disarm"]), 0, "alarm disarm");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = node.cli(&["put", "after", "x"]);
        if o.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "writes did not resume: {}", stderr(&o));
        std::thread::sleep(Duration::from_millis(500));
    }
}
