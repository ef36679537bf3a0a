//! Backup and restore with real processes: `aspen-cli snapshot save` from a three-node cluster
//! of four shards while clients write, `aspen-cli snapshot status`, `aspen-node restore`'s
//! refusals (a non-empty data dir, a truncated or damaged file, another number of shards: exit
//! 2), then the restored node serving the backup as a new cluster — a new cluster id, the old
//! cluster's admin token refused, every write acknowledged before the save began readable, each
//! shard's data digest the one the source had at the saved index — that two fresh nodes join.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use aspen::AspenClient;

use crate::support::{expect_code, start_sharded_processes, stderr, stdout, NodeProc, NODE_BIN, SHARD_FLAGS};

/// `aspen-node restore FILE --data-dir DIR` for `node` (its id, bind address and `flags`).
fn restore(node: &NodeProc, file: &Path, flags: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(NODE_BIN);
    aspen_testkit::clean_env(&mut cmd);
    cmd.arg("restore")
        .arg(file)
        .arg("--data-dir")
        .arg(&node.data_dir)
        .args(["--node-id", &node.node_id.to_string(), "--bind-addr", &node.bind.to_string()])
        .args(flags);
    cmd.output().unwrap()
}

/// `aspen-cli --data-dir DIR ARGS` (the node's ticket and admin token from DIR).
fn cli_at(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(crate::support::CLI_BIN);
    aspen_testkit::clean_env(&mut cmd);
    cmd.args(["--timeout", "60", "--data-dir"]).arg(dir).args(args).output().unwrap()
}

fn shard_flags() -> Vec<String> {
    SHARD_FLAGS.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_saved_under_writes_restores_into_a_new_cluster() {
    let root = tempfile::tempdir().unwrap();
    let source = start_sharded_processes(root.path());
    let admin = source[0].admin_token();
    let tickets: Vec<_> = source.iter().map(|n| n.ticket()).collect();
    let source_cluster = tickets[0].cluster_id;

    // Large values first: every shard's stream spans several chunks (2 MiB each).
    let filler = AspenClient::connect(tickets.clone(), Duration::from_secs(30)).await.unwrap().with_token(&admin);
    for i in 0..200 {
        filler.put(format!("big/{i:04}"), vec![b'a' + (i % 26) as u8; 64 * 1024]).await.unwrap();
    }
    filler.close().await;
    // Writers on every node, each key written once; acknowledged writes are recorded with the
    // time their answer arrived.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(Instant, String, String)>>> = Default::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = AspenClient::connect(vec![tickets[w % 3].clone()], Duration::from_secs(30))
            .await
            .unwrap()
            .with_token(&admin);
        let (stop, acked) = (stop.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let (key, value) = (format!("w{w}/{i:06}"), format!("value-{w}-{i}"));
                if client.put(key.clone(), value.clone()).await.is_ok() {
                    acked.lock().unwrap().push((Instant::now(), key, value));
                }
                i += 1;
            }
            client.close().await;
            i
        }));
    }
    // Let the writers get going, then save while they write.
    while acked.lock().unwrap().len() < 300 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let file = root.path().join("backup.aspen");
    let save_began = Instant::now();
    let saver = {
        let (dir, file) = (source[1].data_dir.clone(), file.clone());
        tokio::task::spawn_blocking(move || cli_at(&dir, &["--json", "snapshot", "save", file.to_str().unwrap()]))
    };
    let saved = saver.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut attempted = Vec::new();
    for w in writers {
        attempted.push(w.await.unwrap());
    }
    expect_code(&saved, 0, "snapshot save");
    let header: serde_json::Value = serde_json::from_str(stdout(&saved).trim()).unwrap();
    assert_eq!(header["num_shards"], 4, "{header}");
    assert_eq!(header["cluster_id"], source_cluster.to_string(), "{header}");
    let acked = acked.lock().unwrap().clone();
    let before: BTreeMap<String, String> =
        acked.iter().filter(|(t, _, _)| *t < save_began).map(|(_, k, v)| (k.clone(), v.clone())).collect();
    let written: BTreeMap<String, String> = acked.iter().map(|(_, k, v)| (k.clone(), v.clone())).collect();
    assert!(before.len() >= 300 && written.len() > before.len(), "{} before, {} in all", before.len(), written.len());
    assert!(!std::fs::read_dir(root.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp")));

    // `snapshot status` reads the same header back, checking the whole file.
    let status = crate::support::cli_in(root.path(), &["--json", "snapshot", "status", file.to_str().unwrap()]);
    expect_code(&status, 0, "snapshot status");
    assert_eq!(serde_json::from_str::<serde_json::Value>(stdout(&status).trim()).unwrap(), header);

    // Refusals, each exit 2 with a message that says why, and nothing left behind.
    let copy_root = root.path().join("copy");
    let mut r1 = NodeProc::new(&copy_root, 1);
    std::fs::create_dir_all(&r1.data_dir).unwrap();
    std::fs::write(r1.data_dir.join("something"), b"x").unwrap();
    let o = restore(&r1, &file, &SHARD_FLAGS);
    expect_code(&o, 2, "restore into a non-empty dir");
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    std::fs::remove_dir_all(&r1.data_dir).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let truncated = root.path().join("truncated.aspen");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let o = restore(&r1, &truncated, &SHARD_FLAGS);
    expect_code(&o, 2, "restore of a truncated file");
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    let damaged = root.path().join("damaged.aspen");
    let mut flipped = bytes.clone();
    let at = bytes.len() - 5000;
    flipped[at] ^= 0x20;
    std::fs::write(&damaged, &flipped).unwrap();
    let o = restore(&r1, &damaged, &SHARD_FLAGS);
    expect_code(&o, 2, "restore of a damaged file");
    assert!(stderr(&o).contains("checksum"), "{}", stderr(&o));
    let o = crate::support::cli_in(root.path(), &["snapshot", "status", damaged.to_str().unwrap()]);
    expect_code(&o, 2, "snapshot status of a damaged file");
    let o = restore(&r1, &file, &[]);
    expect_code(&o, 2, "restore into one shard");
    assert!(stderr(&o).contains("holds 4 shards"), "{}", stderr(&o));
    assert!(!r1.data_dir.exists(), "a refused restore leaves no data dir");

    // The restore: each shard's data digest checked against the one the source recorded.
    let o = restore(&r1, &file, &SHARD_FLAGS);
    expect_code(&o, 0, "restore");
    for shard in header["shards"].as_array().unwrap() {
        let line = format!(
            "shard {}: index {}, data digest {} (matches the backup)",
            shard["shard"],
            shard["index"],
            shard["data_digest"].as_str().unwrap()
        );
        assert!(stdout(&o).contains(&line), "no {line:?} in\n{}", stdout(&o));
    }
    for n in source {
        drop(n);
    }

    // It serves as a new cluster: a new id, the old admin token refused, a new one of its own.
    r1.extra_args = shard_flags();
    r1.start();
    let t1 = r1.ticket();
    assert_ne!(t1.cluster_id, source_cluster);
    // The restored cluster makes its own signing key, then the node writes its admin.token.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !r1.data_dir.join("admin.token").exists() {
        assert!(Instant::now() < deadline, "no admin.token 60 s after the restored node started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old = AspenClient::connect(vec![t1.clone()], Duration::from_secs(20)).await.unwrap().with_token(&admin);
    let refused = old.get("w0/000000").await.unwrap_err();
    assert_eq!(refused.kind(), "permission_denied", "{refused}");
    old.close().await;
    let new_admin = r1.admin_token();
    assert_ne!(new_admin, admin);

    // Two fresh nodes join it.
    let join_token = r1.join_token();
    let mut joined = Vec::new();
    for id in [2, 3] {
        let mut n = NodeProc::new(&copy_root, id);
        n.extra_args = shard_flags();
        n.extra_args.extend(["--join".to_string(), t1.encode(), "--join-token".into(), join_token.clone()]);
        n.start();
        joined.push(n);
    }
    let all: Vec<_> = std::iter::once(t1).chain(joined.iter().map(|n| n.ticket())).collect();
    let client = AspenClient::connect(all, Duration::from_secs(30)).await.unwrap().with_token(&new_admin);
    // Every write acknowledged before the save began is there; nothing that was never written.
    for i in 0..200 {
        let got = client.get(format!("big/{i:04}")).await.unwrap().expect("a large value restored");
        assert_eq!(got.value, vec![b'a' + (i % 26) as u8; 64 * 1024]);
    }
    for (k, v) in &before {
        let got = client.get(k.clone()).await.unwrap().unwrap_or_else(|| panic!("{k} missing from the restore"));
        assert_eq!(String::from_utf8_lossy(&got.value), *v, "{k}");
    }
    eprintln!(
        "backup: {} writes acknowledged before the save, {} in all, {} keys restored; shards {}",
        before.len(),
        written.len(),
        crate::support::all_keys(&client).await.len(),
        header["shards"]
    );
    // Nothing else: every key is one a writer sent (acknowledged, or in flight when it stopped).
    let restored = crate::support::all_keys(&client).await;
    assert!(
        restored.len() >= before.len(),
        "{} keys restored, {} acknowledged before the save",
        restored.len(),
        before.len()
    );
    for k in &restored {
        if k.starts_with("big/") {
            continue;
        }
        let sent = k
            .strip_prefix('w')
            .and_then(|r| r.split_once('/'))
            .and_then(|(w, i)| Some((w.parse::<usize>().ok()?, i.parse::<u64>().ok()?)))
            .is_some_and(|(w, i)| w < attempted.len() && i < attempted[w]);
        assert!(sent, "a key no writer sent: {k}");
    }
    // The joined nodes hold the same data: every shard's replicas reach the same state digest.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let o = cli_at(&r1.data_dir, &["--json", "cluster", "status"]);
        let converged = o.status.success()
            && serde_json::from_str::<serde_json::Value>(stdout(&o).trim()).is_ok_and(|s| {
                let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
                nodes.len() == 3
                    && (0..4).all(|shard| {
                        let views: Vec<&serde_json::Value> = nodes.iter().map(|n| &n["shards"][shard]).collect();
                        views.iter().all(|v| v["digest"].is_string() && v["digest"] == views[0]["digest"])
                    })
            });
        if converged {
            break;
        }
        assert!(Instant::now() < deadline, "the restored cluster's replicas did not converge: {}", stdout(&o));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    client.close().await;
}

/// One node leading eight shards saves them all in one go: a shard's finished session (kept a
/// minute to answer its last chunk again) does not count against the node's limit of backups
/// being saved at once.
#[test]
fn a_node_leading_many_shards_saves_them_all() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    node.extra_args = vec!["--sharding-enabled".into(), "--sharding-num-shards".into(), "8".into()];
    node.start();
    for i in 0..32 {
        expect_code(&node.cli(&["put", &format!("k{i}"), "v"]), 0, "put");
    }
    let file = root.path().join("eight.aspen");
    let o = cli_at(&node.data_dir, &["--json", "snapshot", "save", file.to_str().unwrap()]);
    expect_code(&o, 0, "snapshot save of eight shards led by one node");
    let header: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(header["shards"].as_array().map(Vec::len), Some(8), "{header}");
}
