//! Process tests of a single node: the real `aspen-node` and `aspen-cli` binaries, every CLI
//! command and exit code, graceful shutdown, and `kill -9` during writes.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::support::{expect_code, stderr, stdout, NodeProc, NODE_BIN, SHARD_FLAGS};
use aspen::{api::ReadConsistency, AspenClient};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[test]
fn cli_commands_and_exit_codes() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    std::fs::write(&config, "[limits]\nmax_scan_page = 3\nmax_value_bytes = 2048\n").unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    node.extra_args = vec!["--config".into(), config.display().to_string()];
    node.start();

    let o = node.cli(&["put", "greeting", "hello"]);
    expect_code(&o, 0, "put");
    assert_eq!(stdout(&o).trim(), "OK");

    let o = node.cli(&["get", "greeting"]);
    expect_code(&o, 0, "get");
    assert_eq!(stdout(&o), "hello\n");

    let o = node.cli(&["get", "greeting", "--stale"]);
    expect_code(&o, 0, "get --stale");
    assert_eq!(stdout(&o), "hello\n");

    let o = node.cli(&["--json", "get", "greeting"]);
    expect_code(&o, 0, "get --json");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["value"], "hello");
    assert_eq!(v["version"], 1);

    let o = node.cli(&["get", "missing"]);
    expect_code(&o, 1, "get missing");
    assert_eq!(stdout(&o), "");
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));

    // CAS: match, mismatch (current value on stderr), absent.
    let o = node.cli(&["cas", "greeting", "hi", "--expected", "hello"]);
    expect_code(&o, 0, "cas match");
    let o = node.cli(&["cas", "greeting", "yo", "--expected", "hello"]);
    expect_code(&o, 1, "cas mismatch");
    assert!(stderr(&o).contains("hi"), "current value on stderr: {}", stderr(&o));
    assert_eq!(stdout(&node.cli(&["get", "greeting"])), "hi\n");
    let o = node.cli(&["cas", "fresh", "v1", "--absent"]);
    expect_code(&o, 0, "cas absent on missing key");
    let o = node.cli(&["cas", "fresh", "v2", "--absent"]);
    expect_code(&o, 1, "cas absent on present key");
    assert!(stderr(&o).contains("v1"), "{}", stderr(&o));

    // delete
    let o = node.cli(&["delete", "fresh"]);
    expect_code(&o, 0, "delete");
    assert_eq!(stdout(&o).trim(), "1");
    expect_code(&node.cli(&["get", "fresh"]), 1, "get after delete");
    let o = node.cli(&["delete", "fresh"]);
    expect_code(&o, 0, "delete of a missing key");
    assert_eq!(stdout(&o).trim(), "0");

    // scan: several pages (page size 3 on the node), sorted, limited.
    for i in (0..10).rev() {
        expect_code(&node.cli(&["put", &format!("scan/{i:02}"), &format!("v{i}")]), 0, "put scan key");
    }
    let o = node.cli(&["scan", "--prefix", "scan/"]);
    expect_code(&o, 0, "scan");
    let lines: Vec<String> = stdout(&o).lines().map(String::from).collect();
    let want: Vec<String> = (0..10).map(|i| format!("scan/{i:02}\tv{i}")).collect();
    assert_eq!(lines, want);
    let o = node.cli(&["scan", "--prefix", "scan/", "--limit", "7"]);
    expect_code(&o, 0, "scan --limit");
    assert_eq!(stdout(&o).lines().count(), 7);
    assert_eq!(stdout(&o).lines().last(), Some("scan/06\tv6"));
    let o = node.cli(&["scan"]);
    assert_eq!(stdout(&o).lines().count(), 11, "all keys: {}", stdout(&o));

    // cluster status --json
    let o = node.cli(&["--json", "cluster", "status"]);
    expect_code(&o, 0, "cluster status");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["node_id"], 1);
    let shard = &v["shards"][0];
    assert_eq!(shard["shard"], 0);
    assert_eq!(shard["leader"], 1);
    assert_eq!(shard["voters"], serde_json::json!([1]));
    assert_eq!(shard["learners"], serde_json::json!([]));
    assert!(shard["last_applied"].as_u64().unwrap() >= 15);
    expect_code(&node.cli(&["cluster", "status"]), 0, "cluster status (table)");

    // Usage errors: exit 2.
    expect_code(&node.cli(&["put"]), 2, "put without a key");
    expect_code(&node.cli(&["cas", "k", "v"]), 2, "cas without --expected/--absent");
    expect_code(&node.cli(&["frobnicate"]), 2, "unknown command");
    let o = node.cli(&["--ticket", "not-a-ticket", "get", "x"]);
    expect_code(&o, 2, "invalid ticket");
    // Too large a value: typed error, exit 2; the node keeps serving.
    let big = "x".repeat(4096);
    let o = node.cli(&["put", "big", &big]);
    expect_code(&o, 2, "oversized value");
    assert!(stderr(&o).contains("too large"), "{}", stderr(&o));
    expect_code(&node.cli(&["get", "greeting"]), 0, "still serving");

    // cluster init on an initialized node is a no-op.
    let o = node.cli(&["cluster", "init"]);
    expect_code(&o, 0, "cluster init");
    assert!(stdout(&o).contains("already"), "{}", stdout(&o));

    // Node down: cluster error, exit 3.
    let status = node.terminate();
    assert!(status.success(), "SIGTERM exit status {status}");
    let o = crate::support::cli_with_timeout(&node, 2, &["get", "greeting"]);
    expect_code(&o, 3, "get from a stopped node");
    // One line that names who did not answer; no ERROR from iroh about the client's endpoint
    // (its close gives up on the dead peer and drops it).
    let err = stderr(&o);
    assert!(err.contains("could not reach any node: ") && err.contains("node 1"), "{err}");
    assert!(!err.contains("ERROR") && !err.contains("no tickets"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn identity_is_stable_and_private() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    node.start();
    let key = node.data_dir.join("node.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "node.key must be private");
    }
    let first = node.ticket();
    assert_ne!(first.cluster_id, aspen::api::ClusterId::default(), "a fresh node initializes a cluster");
    assert!(node.terminate().success());
    node.start();
    let second = node.ticket();
    assert_eq!(first.endpoint_id, second.endpoint_id, "endpoint id survives restarts");
    assert_eq!(first.cluster_id, second.cluster_id, "cluster id survives restarts");
    assert_eq!(first.node_id, 1);
}

#[test]
fn no_init_node_waits_for_cluster_init() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 7);
    node.extra_args = vec!["--no-init".into(), "--request-timeout-ms".into(), "1500".into()];
    node.start();
    let o = crate::support::cli_with_timeout(&node, 5, &["put", "k", "v"]);
    expect_code(&o, 3, "write before init");
    assert!(stderr(&o).contains("node 7 is not initialized"), "{}", stderr(&o));
    // It waits with a private claim token: `cluster init` from elsewhere (only its ticket) or
    // with a wrong token is refused; from its data dir (the CLI reads the token) it works.
    let claim = node.data_dir.join("claim.token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&claim).unwrap().permissions().mode() & 0o777, 0o600, "claim.token is private");
    }
    let ticket = node.ticket().encode();
    let elsewhere = root.path().join("elsewhere");
    let o = crate::support::cli_in(&elsewhere, &["--ticket", &ticket, "cluster", "init"]);
    expect_code(&o, 2, "cluster init without the claim token");
    assert!(stderr(&o).contains("claim token"), "{}", stderr(&o));
    let o =
        crate::support::cli_in(&elsewhere, &["--ticket", &ticket, "cluster", "init", "--claim-token", &"0".repeat(64)]);
    expect_code(&o, 2, "cluster init with a wrong claim token");
    assert!(stderr(&o).contains("wrong claim token"), "{}", stderr(&o));
    let o = node.cli(&["cluster", "init"]);
    expect_code(&o, 0, "cluster init");
    assert!(!claim.exists(), "the claim token is spent once the node belongs to a cluster");
    assert!(stdout(&o).contains("initialized a new cluster"), "{}", stdout(&o));
    expect_code(&node.cli(&["put", "k", "v"]), 0, "write after init");
    assert_eq!(stdout(&node.cli(&["get", "k"])), "v\n");
    // The ticket now carries the new cluster id, and restarts keep it.
    let before = node.ticket().cluster_id;
    assert_ne!(before, aspen::api::ClusterId::default());
    assert!(node.terminate().success());
    node.start();
    assert_eq!(node.ticket().cluster_id, before);
    assert_eq!(stdout(&node.cli(&["get", "k"])), "v\n");
}

#[test]
fn config_errors_exit_2_with_one_line() {
    let root = tempfile::tempdir().unwrap();
    let node = NodeProc::new(root.path(), 1);
    let bad_toml = root.path().join("bad.toml");
    std::fs::write(&bad_toml, "node_id = \"one\"\n").unwrap();
    let cases: Vec<Vec<String>> = vec![
        vec!["--node-id".into(), "0".into()],
        vec!["--node-id".into(), "281474976710656".into()],
        vec!["--election-timeout-min-ms".into(), "10".into()],
        vec!["--config".into(), bad_toml.display().to_string()],
        vec!["--config".into(), root.path().join("missing.toml").display().to_string()],
        vec!["--bind-addr".into(), "not-an-addr".into()],
        // `--join "$(cat n1/node.ticket)"` before the file exists: refused, not a new cluster.
        vec!["--join".into(), "".into()],
    ];
    for args in cases {
        let out = std::process::Command::new(crate::support::NODE_BIN)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(!err.trim().is_empty(), "{args:?}: no message");
    }
    // ASPEN_* variables are read, and flags beat them.
    let out = std::process::Command::new(crate::support::NODE_BIN)
        .env("ASPEN_NODE_ID", "0")
        .arg("--data-dir")
        .arg(&node.data_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "ASPEN_NODE_ID=0: {}", stderr(&out));
    assert!(stderr(&out).contains("node_id"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "one line: {}", stderr(&out));
}

#[test]
fn restart_with_another_node_id_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 3);
    node.start();
    expect_code(&node.cli(&["put", "a", "1"]), 0, "put");
    assert!(node.terminate().success());
    let out = std::process::Command::new(crate::support::NODE_BIN)
        .args(["--node-id", "4", "--bind-addr", &node.bind.to_string()])
        .arg("--data-dir")
        .arg(&node.data_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("belongs to node 3"), "{}", stderr(&out));
    node.start();
    assert_eq!(stdout(&node.cli(&["get", "a"])), "1\n");
}

/// The data dir's storage format: recorded at start; a newer one is refused (exit 2, naming the
/// format) with nothing changed; an older one (format 0: before formats were recorded) is
/// served and brought up to this version's.
#[test]
fn data_dirs_of_newer_formats_are_refused_and_older_ones_upgraded() {
    use aspen::storage::metadata::{MetadataStore, STORAGE_FORMAT};
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 3);
    node.start();
    expect_code(&node.cli(&["put", "a", "1"]), 0, "put");
    assert!(node.terminate().success());
    let metadata = node.data_dir.join("metadata.db");
    let set = |format: u32| MetadataStore::open(&metadata, 1 << 20).unwrap().set_storage_format(format).unwrap();
    let get = || MetadataStore::open(&metadata, 1 << 20).unwrap().storage_format().unwrap();
    assert_eq!(get(), Some(STORAGE_FORMAT));

    set(STORAGE_FORMAT + 1);
    let out = std::process::Command::new(crate::support::NODE_BIN)
        .args(["--node-id", "3", "--bind-addr", &node.bind.to_string()])
        .arg("--data-dir")
        .arg(&node.data_dir)
        .env_remove("ASPEN_TICKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let said = format!("storage format {}, written by a newer Aspen", STORAGE_FORMAT + 1);
    assert!(stderr(&out).contains(&said), "{}", stderr(&out));
    assert_eq!(get(), Some(STORAGE_FORMAT + 1), "a refused data dir is left as it was");

    set(0);
    node.start();
    assert_eq!(stdout(&node.cli(&["get", "a"])), "1\n");
    assert!(node.terminate().success());
    assert_eq!(get(), Some(STORAGE_FORMAT));
}

/// A damaged file in the data dir (a shard's database overwritten at its header, or pages in the
/// middle of it; the metadata store; the log journal) stops the start with exit 2 — which the
/// systemd unit does not restart — and one line naming the file and what to do, instead of a
/// panic (redb panics on some damaged pages) or a restart loop. Nothing is changed: with the
/// file put back, the node starts and serves its data.
#[test]
fn a_damaged_file_in_the_data_dir_stops_the_start_naming_it() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    // Sharded: a damaged shard 2 fails after shards 0 and 1 opened, which must be closed again.
    node.extra_args = SHARD_FLAGS.map(String::from).to_vec();
    node.start();
    for i in 0..200 {
        expect_code(&node.cli(&["put", &format!("k{i:03}"), &"v".repeat(300)]), 0, "put");
    }
    assert!(node.terminate().success());
    let damage = |file: &str, at: u64, len: usize| {
        use std::io::{Seek, Write};
        let path = node.data_dir.join(file);
        let original = std::fs::read(&path).unwrap();
        assert!(original.len() as u64 > at + len as u64, "{file} is {} bytes", original.len());
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(std::io::SeekFrom::Start(at)).unwrap();
        f.write_all(&vec![0xA5; len]).unwrap();
        (path, original)
    };
    let cases = [
        ("shard-2/state-machine.db", 0, 512),
        ("shard-2/state-machine.db", 3 * 4096, 4 * 4096),
        ("shard-3/raft-log.db", 2 * 4096, 4 * 4096),
        ("metadata.db", 0, 512),
        ("node-log.journal", 0, 512),
    ];
    for (file, at, len) in cases {
        let (path, original) = damage(file, at, len);
        let damaged = std::fs::read(&path).unwrap();
        // A node that does start (damage its opening did not read) is stopped after a minute.
        let errors = root.path().join("stderr");
        let mut child = std::process::Command::new(crate::support::NODE_BIN)
            .args(["--node-id", "1", "--bind-addr", &node.bind.to_string()])
            .args(&node.extra_args)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .env_remove("ASPEN_TICKET")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&errors).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{file} damaged at {at}: the node started anyway");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let err = std::fs::read_to_string(&errors).unwrap();
        assert_eq!(status.code(), Some(2), "{file} damaged at {at}: {err}");
        assert!(std::fs::read(&path).unwrap() == damaged, "{file} damaged at {at}: the refused start changed it");
        let said = err.lines().find(|l| l.starts_with("aspen-node: ")).unwrap_or_default();
        assert!(said.contains(&path.display().to_string()), "{file} at {at}: names the file: {err}");
        assert!(said.contains("damaged"), "{file} at {at}: says it is (or may be) damaged: {err}");
        assert!(!err.contains("ERROR"), "{file} at {at}: closed what it opened: {err}");
        std::fs::write(&path, original).unwrap();
    }
    node.start();
    assert_eq!(stdout(&node.cli(&["get", "k199"])), format!("{}\n", "v".repeat(300)));
}

/// `kill -9` at random moments of heavy write traffic (several concurrent writers), twenty
/// times: after each restart every acknowledged write is present with its value. The kill
/// moments come from a seed that is printed; `KILL9_SEED=<seed>` replays the same moments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_loses_no_acknowledged_write() {
    const ROUNDS: usize = 20;
    const WRITERS: usize = 4;
    let seed: u64 = std::env::var("KILL9_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("kill -9 test seed {seed} (KILL9_SEED={seed} replays the kill moments)");
    let mut rng = StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Default::default();
    for round in 0..ROUNDS {
        node.start();
        // Reads wait for the restarted node to elect itself; the writers' short timeout makes
        // them give up soon after the kill (each round would otherwise wait it out).
        let reader = AspenClient::connect(vec![node.ticket()], Duration::from_secs(30))
            .await
            .unwrap()
            .with_token(node.admin_token());
        let client = Arc::new(
            AspenClient::connect(vec![node.ticket()], Duration::from_secs(1))
                .await
                .unwrap()
                .with_token(node.admin_token()),
        );
        // Everything acknowledged in earlier rounds survived the crash.
        let stored = stored_under(&reader, "k/").await;
        for (k, v) in acked.lock().unwrap().iter() {
            assert_eq!(stored.get(k), Some(v), "seed {seed} round {round}: acknowledged write {k} lost");
        }
        reader.close().await;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let acked = acked.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    for i in 0.. {
                        let key = format!("k/{round:02}/{w}/{i:06}");
                        let value = format!("v{round}-{w}-{i}");
                        match client.put(key.clone(), value.clone()).await {
                            Ok(_) => {
                                acked.lock().unwrap().insert(key, value);
                            }
                            Err(_) => break,
                        }
                    }
                })
            })
            .collect();
        let delay = rng.random_range(150..1350);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        node.kill();
        for w in writers {
            w.await.unwrap();
        }
        if let Ok(client) = Arc::try_unwrap(client) {
            client.close().await;
        }
    }
    node.start();
    let client = AspenClient::connect(vec![node.ticket()], Duration::from_secs(30))
        .await
        .unwrap()
        .with_token(node.admin_token());
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > ROUNDS * WRITERS, "the writers made progress ({} writes)", acked.len());
    // Every acknowledged write, by one linearizable scan, and every 50th by a get of its own.
    let stored = stored_under(&client, "k/").await;
    for (i, (k, v)) in acked.iter().enumerate() {
        assert_eq!(stored.get(k), Some(v), "seed {seed}: acknowledged write {k} lost");
        if i % 50 == 0 {
            let got = client.get(k.clone()).await.unwrap().map(|kv| String::from_utf8(kv.value).unwrap());
            assert_eq!(got.as_ref(), Some(v), "seed {seed}: acknowledged write {k} lost (get)");
        }
    }
    println!("{} acknowledged writes survived {ROUNDS} kills", acked.len());
    client.close().await;
}

/// Every key under `prefix` with its value, by one linearizable scan.
async fn stored_under(client: &AspenClient, prefix: &str) -> BTreeMap<String, String> {
    client
        .scan(prefix, usize::MAX, ReadConsistency::Linearizable)
        .await
        .unwrap()
        .into_iter()
        .map(|kv| (String::from_utf8(kv.key).unwrap(), String::from_utf8(kv.value).unwrap()))
        .collect()
}

#[test]
fn sigterm_as_soon_as_the_ticket_appears_stops_the_node_cleanly() {
    // The ticket file is written during bootstrap, before the node is done starting. A
    // supervisor that sends SIGTERM the moment it sees the file must get a graceful stop (exit
    // 0), not a process killed half-started: the node catches signals from its first moment.
    for round in 0..30 {
        let root = tempfile::tempdir().unwrap();
        let node = NodeProc::new(root.path(), 1);
        let mut child = node.command().spawn().expect("spawn aspen-node");
        let ticket = node.data_dir.join("node.ticket");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !ticket.exists() {
            assert!(std::time::Instant::now() < deadline, "round {round}: no ticket within 30 s");
            assert!(child.try_wait().unwrap().is_none(), "round {round}: the node exited during start-up");
            std::thread::sleep(Duration::from_millis(1));
        }
        let pid = child.id().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = child.wait().unwrap();
        assert!(status.success(), "round {round}: SIGTERM right after start-up gave {status}");
    }
}

/// Clients on one shared endpoint (what `aspen-cli bench` uses) each have a connection of
/// their own: closing one client closes only its connection, and the others keep working until
/// the endpoint is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_a_shared_endpoint_close_independently() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    node.start();
    let endpoint = aspen::ClientEndpoint::bind(&[node.ticket()]).await.unwrap();
    let clients: Vec<AspenClient> = (0..3)
        .map(|_| {
            AspenClient::on_endpoint(&endpoint, vec![node.ticket()], Duration::from_secs(10))
                .unwrap()
                .with_token(node.admin_token())
        })
        .collect();
    for (i, c) in clients.iter().enumerate() {
        c.put(format!("shared/{i}"), format!("v{i}")).await.unwrap();
    }
    let mut clients = clients.into_iter();
    let first = clients.next().unwrap();
    let first_conn = first.transport_stats().await.is_some();
    assert!(first_conn, "the client used a connection");
    first.close().await;
    for (i, c) in clients.enumerate() {
        let i = i + 1;
        let got = c.get("shared/0").await.unwrap();
        assert_eq!(got.map(|kv| kv.value), Some(b"v0".to_vec()), "client {i} still reads after client 0 closed");
        c.put(format!("shared/{i}"), "again").await.unwrap();
        c.close().await;
    }
    // A client on an empty ticket list is refused, shared endpoint or not.
    assert!(matches!(
        AspenClient::on_endpoint(&endpoint, vec![], Duration::from_secs(1)),
        Err(aspen::ClientError::NoTickets)
    ));
    endpoint.close().await;

    // The load generator shares one endpoint between a run's clients and closes it at the end
    // of the run: a second run on the same backend (as `aspen-compare` does, row after row)
    // gets a new one.
    let backend = aspen_bench::AspenBackend::new(vec![node.ticket()], Duration::from_secs(10))
        .unwrap()
        .with_token(Some(node.admin_token()));
    let config = aspen_bench::BenchConfig {
        clients: 3,
        stop: aspen_bench::Stop::Requests(30),
        warmup: Duration::ZERO,
        ..Default::default()
    };
    for run in 0..2 {
        let report = aspen_bench::run(&backend, &config, None).await.unwrap();
        assert_eq!(report.errors, 0, "run {run}: {report:?}");
        assert!(report.ok >= 30, "run {run}: {report:?}");
    }
    assert!(node.terminate().success(), "the node stops cleanly");
}

/// A node whose stderr goes to a file (or journald) writes no colour codes, even at info level
/// and without `NO_COLOR`.
#[test]
fn logs_into_a_file_have_no_colour_codes() {
    use aspen_testkit::{free_port, NodeSpec, OnDrop, Output, Proc};
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("node.log");
    let mut spec = NodeSpec::new(NODE_BIN, root.path(), 1, std::net::SocketAddr::from(([127, 0, 0, 1], free_port())));
    spec.rust_log = "info".into();
    let mut cmd = spec.command();
    cmd.env_remove("NO_COLOR");
    let output = Output::File { path: log.clone(), append: false };
    let mut node = Proc::spawn("aspen-node 1", cmd, &output, OnDrop::Kill).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while spec.read_ticket().is_none() {
        assert!(node.is_running(), "the node exited: {}", node.log_tail(20));
        assert!(std::time::Instant::now() < deadline, "no ticket within 30 s: {}", node.log_tail(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    node.terminate(Duration::from_secs(30)).expect("stops on SIGTERM");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("node is serving"), "info lines are logged: {text}");
    assert!(!text.contains('\x1b'), "colour codes in a log file: {text:?}");
}

/// What a restart cannot fix exits 2 (the systemd unit does not restart on 2) with a message
/// that names the problem: an address another node listens on, a data dir another node has open.
#[test]
fn permanent_start_failures_exit_2_and_say_why() {
    let root = tempfile::tempdir().unwrap();
    let mut first = NodeProc::new(root.path(), 1);
    first.start();
    let run = |data_dir: &std::path::Path, bind: std::net::SocketAddr| {
        std::process::Command::new(NODE_BIN)
            .args(["--node-id", "1", "--data-dir"])
            .arg(data_dir)
            .arg("--bind-addr")
            .arg(bind.to_string())
            .env_remove("ASPEN_TICKET")
            .output()
            .unwrap()
    };
    let out = run(&root.path().join("other"), first.bind);
    assert_eq!(out.status.code(), Some(2), "address in use: {}", stderr(&out));
    assert!(stderr(&out).contains(&format!("address {} is in use", first.bind)), "{}", stderr(&out));

    let elsewhere = std::net::SocketAddr::from(([127, 0, 0, 1], aspen_testkit::free_port()));
    let out = run(&first.data_dir, elsewhere);
    assert_eq!(out.status.code(), Some(2), "data dir in use: {}", stderr(&out));
    assert!(stderr(&out).contains("already open"), "{}", stderr(&out));
    assert!(first.is_running(), "the first node is unharmed");
    expect_code(&first.cli(&["put", "k", "v"]), 0, "the first node still serves");
}

/// `aspen-cli wait` returns once the node serves, even when started before the node wrote its
/// ticket; it exits 3 when the timeout passes first and 2 for an invalid ticket.
#[test]
fn wait_returns_once_the_node_serves() {
    let root = tempfile::tempdir().unwrap();
    let node = NodeProc::new(root.path(), 1);
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(crate::support::CLI_BIN);
        aspen_testkit::clean_env(&mut cmd);
        cmd.arg("--data-dir").arg(&node.data_dir).args(args).output().unwrap()
    };
    // Nothing there: exit 3 after the timeout, saying what it waited for.
    let o = cli(&["--timeout", "1", "wait"]);
    expect_code(&o, 3, "wait on a data dir without a node");
    assert!(stderr(&o).contains("node.ticket does not exist yet"), "{}", stderr(&o));

    // Started in the background, waited for, then used at once.
    let mut child = node.command().spawn().expect("spawn aspen-node");
    let o = cli(&["--timeout", "60", "wait"]);
    expect_code(&o, 0, "wait for a starting node");
    expect_code(&node.cli(&["put", "k", "v"]), 0, "put right after wait");
    let o = cli(&["--ticket", "aspenaaaa", "wait"]);
    expect_code(&o, 2, "wait with an invalid ticket");
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    let _ = child.kill();
    let _ = child.wait();
}

/// `put KEY` without VALUE reads the value from stdin, byte for byte: values larger than a
/// command line can hold and values that are not text; one over the limit is refused (exit 2).
#[test]
fn put_reads_the_value_from_stdin() {
    use std::io::Write;
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    node.start();
    let put_stdin = |key: &str, value: &[u8]| {
        let mut cmd = std::process::Command::new(crate::support::CLI_BIN);
        aspen_testkit::clean_env(&mut cmd);
        let mut child = cmd
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--timeout", "20", "put", key])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let value = value.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&value);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    };
    // 300 KiB, more than one command-line argument may hold, with every byte value in it.
    let big: Vec<u8> = (0..300 * 1024).map(|i| (i % 256) as u8).collect();
    let o = put_stdin("big", &big);
    expect_code(&o, 0, "put from stdin");
    assert_eq!(stdout(&o).trim(), "OK");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt.block_on(async {
        let client = AspenClient::connect(vec![node.ticket()], Duration::from_secs(10))
            .await
            .unwrap()
            .with_token(node.admin_token());
        let got = client.get("big").await.unwrap().map(|kv| kv.value);
        client.close().await;
        got
    });
    assert_eq!(got.as_deref(), Some(&big[..]), "stored byte for byte");
    let o = put_stdin("empty", b"");
    expect_code(&o, 0, "an empty value from stdin");
    let o = put_stdin("huge", &vec![b'x'; 1024 * 1024 + 1]);
    expect_code(&o, 2, "a value over the limit");
}

/// Client tokens from the command line: a ticket alone is refused (exit 4), the data dir's
/// admin.token is admin, a scoped token allows exactly its scope, the precedence of `--token`,
/// `ASPEN_TOKEN` and `--token-file`, listing, revoking, join tokens.
#[test]
fn client_tokens_from_the_cli() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    node.start();
    let ticket = node.ticket().encode();
    // The admin token is private to the node's user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.data_dir.join("admin.token")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin.token is 0600");
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    // `aspen-cli` with only a ticket (no data dir, so no admin.token): refused, exit 4.
    let cli = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = std::process::Command::new(crate::support::CLI_BIN);
        aspen_testkit::clean_env(&mut cmd);
        cmd.current_dir(&elsewhere).args(["--timeout", "20", "--ticket", &ticket]).envs(env.iter().copied());
        cmd.args(args).output().unwrap()
    };
    expect_code(&node.cli(&["put", "app/x", "1"]), 0, "put with the data dir's admin.token");
    let o = cli(&[], &["--json", "get", "app/x"]);
    expect_code(&o, 4, "a ticket without a token");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["error"]["kind"], "permission_denied", "{v}");

    // A read-only token for app/.
    let o = node.cli(&["--json", "auth", "token", "create", "--read", "--prefix", "app/", "--ttl", "3600"]);
    expect_code(&o, 0, "token create");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let (id, token) = (v["id"].as_str().unwrap().to_string(), v["token"].as_str().unwrap().to_string());
    assert_eq!(id.len(), 16, "{v}");
    assert!(token.starts_with("aspentoken1"), "{v}");
    assert_eq!(v["prefixes"], serde_json::json!(["app/"]));
    let o = cli(&[], &["--token", &token, "get", "app/x"]);
    expect_code(&o, 0, "read in scope");
    assert_eq!(stdout(&o), "1\n");
    expect_code(&cli(&[], &["--token", &token, "put", "app/x", "2"]), 4, "a write with a read-only token");
    expect_code(&cli(&[], &["--token", &token, "get", "other"]), 4, "a read outside the prefix");
    expect_code(&cli(&[], &["--token", &token, "cluster", "join-token"]), 4, "admin with a read token");
    expect_code(&cli(&[("ASPEN_TOKEN", &token)], &["get", "app/x"]), 0, "ASPEN_TOKEN");
    let file = root.path().join("tok");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    expect_code(&cli(&[], &["--token-file", file.to_str().unwrap(), "get", "app/x"]), 0, "--token-file");
    // Precedence: --token beats ASPEN_TOKEN, which beats --token-file.
    let o = cli(&[("ASPEN_TOKEN", "aspentoken1garbage")], &["--token", &token, "get", "app/x"]);
    expect_code(&o, 0, "--token beats ASPEN_TOKEN");
    let o = cli(&[("ASPEN_TOKEN", "aspentoken1garbage")], &["--token-file", file.to_str().unwrap(), "get", "app/x"]);
    expect_code(&o, 4, "ASPEN_TOKEN beats --token-file");
    // --token beats the data dir's admin.token too.
    expect_code(&node.cli(&["--token", &token, "put", "app/x", "3"]), 4, "--token beats admin.token");
    expect_code(&cli(&[], &["--token-file", "/nonexistent", "get", "app/x"]), 2, "an unreadable --token-file");

    // List, revoke, and the token is refused from then on.
    let o = node.cli(&["auth", "token", "list"]);
    expect_code(&o, 0, "token list");
    assert!(stdout(&o).lines().any(|l| l.starts_with(&id) && l.contains("read\tapp/")), "{}", stdout(&o));
    assert!(!stdout(&o).contains("aspentoken1"), "list never shows tokens: {}", stdout(&o));
    expect_code(&node.cli(&["auth", "token", "revoke", &id]), 0, "revoke");
    let o = cli(&[], &["--json", "--token", &token, "get", "app/x"]);
    expect_code(&o, 4, "a revoked token");
    assert!(stdout(&o).contains("revoked"), "{}", stdout(&o));
    let o = node.cli(&["--json", "auth", "token", "list"]);
    let list: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(list.as_array().unwrap().iter().any(|t| t["id"] == id.as_str() && t["revoked"] == true), "{list}");
    expect_code(&node.cli(&["auth", "token", "revoke", "00000000000000ab"]), 1, "revoke an unknown id");
    expect_code(&node.cli(&["auth", "token", "revoke", "xyz"]), 2, "revoke a malformed id");
    expect_code(&node.cli(&["auth", "token", "create"]), 2, "a token without permissions");

    // Join tokens.
    let o = node.cli(&["cluster", "join-token", "--ttl", "60", "--single-use"]);
    expect_code(&o, 0, "join-token");
    assert!(stdout(&o).trim().starts_with("aspenjoin1"), "{}", stdout(&o));
    let o = cli(&[], &["--token", stdout(&o).trim(), "get", "app/x"]);
    expect_code(&o, 4, "a join token is no client token");
    assert!(node.terminate().success());
}

/// Shell completions and man pages come from the clap definitions, need no node, and cover
/// every command (and aspen-node's flags).
#[test]
fn completions_and_man_pages_are_generated() {
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(crate::support::CLI_BIN);
        aspen_testkit::clean_env(&mut cmd);
        cmd.args(args).output().unwrap()
    };
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef aspen-cli"), ("fish", "complete -c aspen-cli")] {
        let o = run(&["completions", shell]);
        expect_code(&o, 0, shell);
        let script = stdout(&o);
        assert!(script.contains(marker), "{shell}: {script}");
        for command in ["put", "get", "watch", "lease", "cluster", "completions"] {
            assert!(script.contains(command), "{shell} completes {command}");
        }
    }
    expect_code(&run(&["completions", "powershell-classic"]), 2, "an unknown shell");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let o = run(&["man", "--out-dir", out.to_str().unwrap()]);
    expect_code(&o, 0, "man");
    let page = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let cli = page("aspen-cli.1");
    assert!(cli.contains(".TH aspen-cli") && cli.contains("Talk to an Aspen cluster"), "{cli}");
    assert!(page("aspen-cli-put.1").contains("VALUE"));
    assert!(page("aspen-cli-cluster-status.1").contains(".TH"));
    let node = page("aspen-node.1");
    assert!(node.contains("http\\-addr") && node.contains("cache\\-bytes"), "{node}");
}
