//! Leases through `aspen-cli` against three real sharded `aspen-node` processes: the command
//! contract (ids, `--json`, exit codes), and a `lease keepalive` that keeps keys of every shard
//! alive across a `kill -9` of the node leading the lease's home shard — then, stopped, lets the
//! lease expire on every node, the killed one included once it is back.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aspen::sharding::ShardRouter;

use crate::support::{expect_code, start_sharded_processes, stderr, stdout, NodeProc, CLI_BIN};

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(stdout(o).trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", stdout(o)))
}

/// One key in each of the 4 shards.
fn keys_in_every_shard(tag: &str) -> Vec<String> {
    let router = ShardRouter::new(4);
    (0..4)
        .map(|s| (0..10_000).map(|i| format!("{tag}/{i}")).find(|k| router.shard_for_key(k.as_bytes()) == s).unwrap())
        .collect()
}

#[test]
fn lease_commands_keep_their_contract() {
    let root = tempfile::tempdir().unwrap();
    let nodes = start_sharded_processes(root.path());
    let n = &nodes[1];

    let o = n.cli(&["lease", "grant", "30"]);
    expect_code(&o, 0, "lease grant");
    let id = stdout(&o).trim().to_string();
    assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id:?}");
    let o = n.cli(&["--json", "lease", "grant", "30"]);
    expect_code(&o, 0, "lease grant --json");
    let v = json(&o);
    assert_eq!(v["ttl"], 30, "{v}");
    assert_eq!(v["id"].as_str().unwrap().len(), 16, "{v}");

    // Keys of every shard on the lease; ids in any case, leading zeros optional.
    let keys = keys_in_every_shard("svc");
    let short_upper = id.trim_start_matches('0').to_uppercase();
    for (i, k) in keys.iter().enumerate() {
        let id_text = if i % 2 == 0 { id.as_str() } else { short_upper.as_str() };
        let o = nodes[i % 3].cli(&["put", k, "up", "--lease", id_text]);
        expect_code(&o, 0, "put --lease");
        assert_eq!(stdout(&o), "OK\n");
    }
    let o = n.cli(&["--json", "put", "solo", "x", "--ttl", "30"]);
    expect_code(&o, 0, "put --ttl");
    let v = json(&o);
    assert!(v["revision"].as_u64().is_some() && v["lease"].as_str().unwrap().len() == 16, "{v}");
    expect_code(&n.cli(&["put", "solo2", "x", "--ttl", "30"]), 0, "put --ttl (plain)");

    let o = n.cli(&["lease", "ttl", &id, "--keys"]);
    expect_code(&o, 0, "lease ttl --keys");
    let out = stdout(&o);
    let mut lines = out.lines();
    let left: u64 = lines.next().unwrap().parse().unwrap();
    assert!((1..=30).contains(&left), "{out}");
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(lines.map(String::from).collect::<Vec<_>>(), sorted, "one key per line, every shard");
    let v = json(&n.cli(&["--json", "lease", "ttl", &id, "--keys"]));
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["granted_ttl"], 30);
    assert!(v["ttl"].as_u64().unwrap() <= 30);
    assert_eq!(v["keys"], serde_json::json!(sorted));
    let o = n.cli(&["lease", "list"]);
    expect_code(&o, 0, "lease list");
    assert!(stdout(&o).lines().any(|l| l == id), "{}", stdout(&o));
    assert_eq!(stdout(&o).lines().count(), 4, "four leases granted: {}", stdout(&o));
    let o = n.cli(&["lease", "keepalive", &id, "--once"]);
    expect_code(&o, 0, "keepalive --once");
    assert_eq!(stdout(&o), "30\n");

    // A read-only token looks at leases; granting, renewing, attaching and revoking need write.
    let o = n.cli(&["--json", "auth", "token", "create", "--read"]);
    expect_code(&o, 0, "token create --read");
    let reader = json(&o)["token"].as_str().unwrap().to_string();
    let as_reader = |args: &[&str]| {
        let mut all = vec!["--token", reader.as_str()];
        all.extend_from_slice(args);
        n.cli(&all)
    };
    expect_code(&as_reader(&["lease", "ttl", &id]), 0, "lease ttl with a read token");
    expect_code(&as_reader(&["lease", "list"]), 0, "lease list with a read token");
    for denied in [
        &["lease", "grant", "5"][..],
        &["lease", "keepalive", &id, "--once"],
        &["lease", "revoke", &id],
        &["put", "svc/x", "v", "--lease", &id],
    ] {
        expect_code(&as_reader(denied), 4, &format!("{denied:?} with a read token"));
    }

    // Revoke: every key gone; the lease is unknown to every command after (exit 1).
    let o = nodes[2].cli(&["lease", "revoke", &id]);
    expect_code(&o, 0, "lease revoke");
    assert_eq!(stdout(&o), "OK\n");
    for k in &keys {
        expect_code(&nodes[0].cli(&["get", k]), 1, "a revoked lease's key");
    }
    let o = n.cli(&["put", "late", "x", "--lease", &id]);
    expect_code(&o, 1, "put with a revoked lease");
    assert!(stderr(&o).contains("lease not found"), "{}", stderr(&o));
    expect_code(&nodes[0].cli(&["get", "late"]), 1, "the refused put wrote nothing");
    expect_code(&n.cli(&["lease", "revoke", &id]), 1, "revoke twice");
    expect_code(&n.cli(&["lease", "keepalive", &id, "--once"]), 1, "keepalive of a revoked lease");
    expect_code(&n.cli(&["lease", "keepalive", &id]), 1, "keepalive loop of a revoked lease");
    expect_code(&n.cli(&["lease", "ttl", &id]), 1, "ttl of a revoked lease");
    let v = json(&n.cli(&["--json", "lease", "ttl", &id]));
    assert_eq!(v["error"]["kind"], "lease_not_found", "{v}");
    // Malformed ids and TTLs: usage, exit 2.
    for bad in [&["lease", "ttl", "zz"][..], &["lease", "revoke", "0"], &["lease", "keepalive", "8000000000000000"]] {
        expect_code(&n.cli(bad), 2, &format!("{bad:?}"));
    }
    expect_code(&n.cli(&["put", "k", "v", "--lease", "12345678901234567"]), 2, "a 17-digit id");
    expect_code(&n.cli(&["lease", "grant", "0"]), 2, "a zero TTL");
    expect_code(&n.cli(&["put", "k", "v", "--lease", "1", "--ttl", "5"]), 2, "--lease with --ttl");
}

/// The node ids leading each shard, from `cluster status --json` of any node.
fn shard_leader(nodes: &[NodeProc], alive: &[usize], shard: u32) -> Option<u64> {
    for &i in alive {
        let o = crate::support::cli_with_timeout(&nodes[i], 5, &["--json", "cluster", "status"]);
        let Ok(v) = serde_json::from_str::<serde_json::Value>(stdout(&o).trim()) else { continue };
        for s in v["shards"].as_array().cloned().unwrap_or_default() {
            if s["shard"] == shard {
                if let Some(l) = s["leader"].as_u64() {
                    return Some(l);
                }
            }
        }
    }
    None
}

#[test]
fn keepalive_survives_a_kill_9_of_the_leases_leader_and_expiry_reaches_every_node() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_sharded_processes(root.path());
    let o = nodes[0].cli(&["lease", "grant", "6"]);
    expect_code(&o, 0, "grant");
    let id = stdout(&o).trim().to_string();
    let keys = keys_in_every_shard("alive");
    for k in &keys {
        expect_code(&nodes[0].cli(&["put", k, "v", "--lease", &id]), 0, "put --lease");
    }
    let home = ShardRouter::new(4).shard_for_lease(aspen::api::parse_lease_id(&id).unwrap());
    let leader = shard_leader(&nodes, &[0, 1, 2], home).expect("the home shard has a leader");
    let victim = (leader - 1) as usize;

    // `lease keepalive` knows every member; it fails over when the leader dies.
    let tickets: Vec<String> = nodes.iter().map(|n| n.ticket().encode()).collect();
    let token = nodes[0].admin_token();
    let mut cmd = Command::new(CLI_BIN);
    aspen_testkit::clean_env(&mut cmd);
    cmd.args(["--timeout", "5", "--ticket", &tickets.join(","), "--token", &token, "lease", "keepalive", &id]);
    let mut keeper = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn lease keepalive");
    std::thread::sleep(Duration::from_secs(2));
    nodes[victim].kill();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    // Three TTLs with the home shard's leader dead at the start: the keys stay.
    std::thread::sleep(Duration::from_secs(18));
    assert!(keeper.try_wait().unwrap().is_none(), "lease keepalive exited while the lease should live");
    for k in &keys {
        let o = nodes[survivors[0]].cli(&["get", k]);
        expect_code(&o, 0, &format!("{k} kept alive across the kill -9 of node {leader}"));
    }
    let new_leader = shard_leader(&nodes, &survivors, home);
    assert!(new_leader.is_some() && new_leader != Some(leader), "a new leader of shard {home}: {new_leader:?}");

    // Stop renewing: the lease expires and takes every key with it.
    keeper.kill().unwrap();
    let out = keeper.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(printed.lines().count() >= 5 && printed.lines().all(|l| l == "6"), "one TTL per refresh: {printed:?}");
    let stopped = Instant::now();
    loop {
        let gone = keys.iter().all(|k| nodes[survivors[0]].cli(&["get", k]).status.code() == Some(1));
        if gone {
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(60), "keys of an expired lease still readable after 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("expired lease's keys gone {:?} after the keep-alive stopped", stopped.elapsed());
    expect_code(&nodes[survivors[1]].cli(&["lease", "ttl", &id]), 1, "expired lease");
    // The killed node comes back and catches up: its own replicas hold none of the keys.
    nodes[victim].start();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stale_gone = keys.iter().all(|k| nodes[victim].cli(&["get", "--stale", k]).status.code() == Some(1));
        if stale_gone {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted node still serves an expired lease's key");
        std::thread::sleep(Duration::from_millis(300));
    }
    for n in &mut nodes {
        assert!(n.terminate().success(), "node {} exits 0 on SIGTERM", n.node_id);
    }
}
