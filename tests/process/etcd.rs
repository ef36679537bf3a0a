//! The etcd v3 API (`--etcd-addr`) driven by the real `etcdctl` (Debian's `etcd-client`, 3.4;
//! scripts/test.sh installs it): a 3-node cluster of one shard and one of 4 shards, every
//! scenario of docs/etcd.md's "Tested with etcdctl" — put/get (prefix, limit, keys only,
//! sorting, `-w json`), del, txn, watch (`--rev`, `--prev-kv`), leases, member list, endpoint
//! status and health, tokens as etcd users, and `etcdctl lock` (etcd's lock recipe: create
//! revisions, txns with leases, watches of deletes) with concurrent lockers.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::support::{expect_code, start_processes, stderr, stdout, NodeProc, SHARD_FLAGS};

/// A free TCP port on 127.0.0.1 (bound, then released).
fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn have_etcdctl() -> bool {
    let found = Command::new("etcdctl").arg("version").output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: etcdctl is not installed (scripts/test.sh installs Debian's etcd-client)");
    }
    found
}

/// Three nodes serving the etcd API (each its own port), with `extra` flags.
fn start_cluster(root: &Path, extra: &[&str]) -> (Vec<NodeProc>, Vec<String>) {
    let ports: Vec<u16> = (0..3).map(|_| free_tcp_port()).collect();
    let nodes = start_processes(root, |id| {
        let mut flags: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        flags.extend(["--etcd-addr".to_string(), format!("127.0.0.1:{}", ports[id as usize - 1])]);
        flags
    });
    let endpoints = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    (nodes, endpoints)
}

/// `etcdctl` against `endpoints` as etcd user `token` with password `token` (none: no user).
struct Etcdctl {
    endpoints: String,
    user: Option<String>,
}

impl Etcdctl {
    fn new(endpoints: &[String], token: Option<&str>) -> Self {
        Etcdctl { endpoints: endpoints.join(","), user: token.map(|t| format!("token:{t}")) }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints))
            .args(["--dial-timeout=5s", "--command-timeout=20s"]);
        if let Some(u) = &self.user {
            cmd.arg(format!("--user={u}"));
        }
        cmd.args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().expect("run etcdctl")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "etcdctl {args:?} failed: {}{}", stdout(&o), stderr(&o));
        stdout(&o)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-w", "json"]);
        let out = self.ok(&all);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}: {out}"))
    }

    /// `etcdctl txn` with `script` on stdin (compares, blank line, success ops, blank, failure).
    fn txn(&self, script: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command(&["txn"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcdctl txn");
        child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write txn");
        child.wait_with_output().expect("etcdctl txn")
    }

    /// A long-running `etcdctl` (a watch) whose output lines are collected as they come.
    fn spawn(&self, args: &[&str]) -> Running {
        Running::spawn(self.command(args))
    }
}

/// A running command whose stdout and stderr lines are collected as they come (killed when
/// dropped).
pub(crate) struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Running {
    pub(crate) fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Running { child, lines }
    }

    /// Waits until the output satisfies `done` (30 s at most); returns the lines.
    pub(crate) fn wait_for(&self, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let lines = self.lines.lock().unwrap().clone();
            if done(&lines) {
                return lines;
            }
            assert!(Instant::now() < deadline, "{what}: not seen within 30 s; output so far: {lines:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (how `-w json` shows keys and values).
pub(crate) fn b64(s: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { ABC[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// The header revision of one member's row of `endpoint hashkv -w json`.
fn header_revision_of_hashkv(row: &Value) -> u64 {
    row["HashKV"]["header"]["revision"].as_u64().unwrap_or_else(|| panic!("no header revision: {row}"))
}

/// The header revision of a `-w json` answer.
fn header_revision(v: &Value) -> u64 {
    v["header"]["revision"].as_u64().unwrap_or_else(|| panic!("no header revision: {v}"))
}

/// Starts a watch and waits until it delivers (probe puts until one shows), so that what the
/// test writes next is seen. Returns the running watch and the number of lines to skip.
fn live_watch(e: &Etcdctl, prefix: &str, extra: &[&str]) -> (Running, usize) {
    let mut args = vec!["watch", "--prefix", prefix];
    args.extend(extra);
    let w = e.spawn(&args);
    let probe = format!("{prefix}probe");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        e.ok(&["put", &probe, "p"]);
        std::thread::sleep(Duration::from_millis(300));
        let lines = w.lines.lock().unwrap().clone();
        if let Some(i) = lines.iter().rposition(|l| *l == "p") {
            return (w, i + 1);
        }
        assert!(Instant::now() < deadline, "the watch never delivered: {lines:?}");
    }
}

#[test]
fn etcdctl_drives_a_three_node_cluster() {
    if !have_etcdctl() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (nodes, endpoints) = start_cluster(root.path(), &[]);
    let token = nodes[0].admin_token();
    // Node 2's endpoint alone: its writes and linearizable reads are forwarded to the leader.
    let e = Etcdctl::new(&endpoints[1..2], Some(&token));

    // Calls without a token, or with a bad one, are refused as etcd refuses them.
    let anon = Etcdctl::new(&endpoints, None);
    let o = anon.run(&["put", "k", "v"]);
    assert!(!o.status.success() && stderr(&o).contains("user name is empty"), "{}", stderr(&o));
    let o = Etcdctl::new(&endpoints, Some("not-a-token")).run(&["get", "k"]);
    assert!(!o.status.success() && stderr(&o).contains("authentication failed"), "{}", stderr(&o));

    // put / get, with etcd's revisions and versions.
    for (k, v) in [("a/1", "v1"), ("a/2", "v2"), ("a/3", "v3")] {
        assert_eq!(e.ok(&["put", k, v]).trim(), "OK");
    }
    let got = e.json(&["get", "a/1"]);
    let kv = &got["kvs"][0];
    assert_eq!(
        (kv["value"].as_str(), kv["version"].as_u64(), got["count"].as_u64()),
        (Some(b64("v1").as_str()), Some(1), Some(1)),
        "{got}"
    );
    let first = kv["create_revision"].as_u64().unwrap();
    assert_eq!(kv["mod_revision"].as_u64(), Some(first));
    assert!(header_revision(&got) >= first, "{got}");
    let put = e.json(&["put", "a/1", "v1b"]);
    let again = e.json(&["get", "a/1"]);
    let kv = &again["kvs"][0];
    assert_eq!(kv["create_revision"].as_u64(), Some(first), "the create revision stays: {again}");
    assert_eq!(kv["mod_revision"].as_u64(), Some(header_revision(&put)), "mod revision is the put's: {again}");
    assert_eq!(kv["version"].as_u64(), Some(2));

    // Prefix, limit, keys only, count only, sort order.
    let page = e.json(&["get", "--prefix", "a/", "--limit", "2"]);
    assert_eq!(
        (page["count"].as_u64(), page["more"].as_bool(), page["kvs"].as_array().map(Vec::len)),
        (Some(3), Some(true), Some(2)),
        "{page}"
    );
    assert_eq!(
        e.ok(&["get", "--prefix", "a/", "--keys-only"]).split_whitespace().collect::<Vec<_>>(),
        ["a/1", "a/2", "a/3"]
    );
    assert_eq!(e.json(&["get", "--prefix", "a/", "--keys-only"])["count"].as_u64(), Some(3));
    let newest = e.ok(&["get", "--prefix", "a/", "--sort-by", "MODIFY", "--order", "DESCEND", "--limit", "1"]);
    assert_eq!(newest.lines().collect::<Vec<_>>(), ["a/1", "v1b"], "a/1 was written last");
    let from = e.ok(&["get", "--from-key", "a/2", "--keys-only"]);
    assert_eq!(from.split_whitespace().collect::<Vec<_>>(), ["a/2", "a/3"]);
    // The previous key of a put; reads at past revisions see the keys as they were then (from
    // the serving node's watch history, which holds every change since the cluster began, as
    // etcd's does until compacted).
    let prev = e.ok(&["put", "--prev-kv", "a/3", "v3b"]);
    assert_eq!(prev.lines().collect::<Vec<_>>(), ["OK", "a/3", "v3"], "{prev}");
    let then = e.json(&["get", "a/1", &format!("--rev={first}")]);
    let kv = &then["kvs"][0];
    assert_eq!((kv["value"].as_str(), kv["version"].as_u64()), (Some(b64("v1").as_str()), Some(1)), "{then}");
    assert!(header_revision(&then) > first, "the header carries the current revision: {then}");
    let then = e.ok(&["get", "--prefix", "a/", &format!("--rev={first}")]);
    assert_eq!(then.lines().collect::<Vec<_>>(), ["a/1", "v1"], "only a/1 existed at its first put");
    assert_eq!(e.ok(&["get", "--prefix", "a/", "--rev=1"]), "", "nothing existed at revision 1");

    // Txn: compares decide the branch; both branches' ops run atomically.
    let o = e.txn("value(\"a/1\") = \"v1b\"\n\nput a/ok yes\nget a/2\n\nput a/bad no\n\n");
    expect_code(&o, 0, "txn");
    assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), ["SUCCESS", "", "OK", "", "a/2", "v2"], "{}", stdout(&o));
    let o = e.txn("mod(\"a/1\") < \"1\"\n\nput a/bad no\n\nput a/else yes\n\n");
    assert_eq!(stdout(&o).lines().next(), Some("FAILURE"), "{}", stdout(&o));
    assert_eq!(e.ok(&["get", "a/else", "--print-value-only"]).trim(), "yes");
    assert!(e.ok(&["get", "a/bad"]).trim().is_empty(), "the branch that did not run wrote nothing");

    // Watch from a revision, with previous values: history, then live events.
    let start = header_revision(&e.json(&["put", "w/1", "one"]));
    e.ok(&["put", "w/1", "uno"]);
    let w = e.spawn(&["watch", "--prefix", "w/", "--prev-kv", &format!("--rev={start}")]);
    e.ok(&["put", "w/2", "two"]);
    e.ok(&["del", "w/1"]);
    let lines = w.wait_for("the watch's events", |l| l.iter().any(|x| x == "DELETE"));
    let want =
        ["PUT", "w/1", "one", "PUT", "w/1", "one", "w/1", "uno", "PUT", "w/2", "two", "DELETE", "w/1", "uno", "w/1"];
    assert_eq!(lines[..want.len()], want, "{lines:#?}");
    drop(w);
    // From revision 1: every event since the cluster began, as on a new etcd.
    let w = e.spawn(&["watch", "w/1", "--rev=1"]);
    let lines = w.wait_for("a watch from revision 1", |l| l.iter().any(|x| x == "DELETE"));
    assert_eq!(lines[..7], ["PUT", "w/1", "one", "PUT", "w/1", "uno", "DELETE"], "{lines:#?}");
    drop(w);

    // Deletes: one key, then a prefix.
    assert_eq!(e.ok(&["del", "a/2"]).trim(), "1");
    assert_eq!(e.ok(&["del", "--prefix", "a/"]).trim(), "4", "a/1, a/3, a/ok, a/else");
    assert_eq!(e.json(&["get", "--prefix", "a/"])["count"].as_u64(), None, "nothing left (count 0 is left out)");

    // Leases: grant, attach, time-to-live with keys, keep-alive, list, revoke.
    let granted = e.ok(&["lease", "grant", "60"]);
    let id = granted.split_whitespace().nth(1).unwrap_or_else(|| panic!("{granted}")).to_string();
    e.ok(&["put", "--lease", &id, "leased/k", "v"]);
    let ttl = e.ok(&["lease", "timetolive", &id, "--keys"]);
    assert!(ttl.contains("granted with TTL(60s)") && ttl.contains("attached keys([leased/k])"), "{ttl}");
    assert!(e.ok(&["lease", "keep-alive", "--once", &id]).contains("keepalived with TTL(60)"));
    assert!(e.ok(&["lease", "list"]).contains(&id));
    assert!(e.ok(&["lease", "revoke", &id]).contains("revoked"));
    assert!(e.ok(&["get", "leased/k"]).trim().is_empty(), "the lease's key went with it");
    assert!(e.ok(&["lease", "timetolive", &id]).contains("already expired"));
    let o = e.run(&["put", "--lease", &id, "leased/k", "v"]);
    assert!(!o.status.success() && stderr(&o).contains("requested lease not found"), "{}", stderr(&o));

    // Members, status and health of every member (found through the member list).
    let all = Etcdctl::new(&endpoints, Some(&token));
    let members = all.json(&["member", "list"]);
    let mut urls: Vec<String> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["clientURLs"][0].as_str().unwrap().to_string())
        .collect();
    urls.sort();
    let mut want = endpoints.clone();
    want.sort();
    assert_eq!(urls, want, "{members}");
    let status = anon.json(&["endpoint", "status", "--cluster"]);
    let rows = status.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{status}");
    let leaders: Vec<u64> = rows.iter().map(|r| r["Status"]["leader"].as_u64().unwrap()).collect();
    assert!(leaders.iter().all(|l| *l == leaders[0] && *l != 0), "one leader: {status}");
    let health = all.run(&["endpoint", "health", "--cluster"]);
    expect_code(&health, 0, "endpoint health");
    assert_eq!(stdout(&health).matches("is healthy").count() + stderr(&health).matches("is healthy").count(), 3);
    // `endpoint hashkv`: members that applied the same entries answer the same hash (of their
    // state digests); a write changes it; a future revision is refused.
    let hashes = |what: &str| -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = all.json(&["endpoint", "hashkv", "--cluster"]);
            let rows = v.as_array().unwrap();
            assert_eq!(rows.len(), 3, "{v}");
            let hs: Vec<u64> = rows.iter().map(|r| r["HashKV"]["hash"].as_u64().unwrap_or(0)).collect();
            let revs: Vec<u64> = rows.iter().map(header_revision_of_hashkv).collect();
            if hs.iter().all(|h| *h == hs[0]) && revs.iter().all(|r| *r == revs[0]) {
                return (hs[0], revs[0]);
            }
            assert!(Instant::now() < deadline, "{what}: the members' hashes never agreed: {v}");
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let (h1, r1) = hashes("hashkv");
    e.ok(&["put", "hashed", "1"]);
    let (h2, r2) = hashes("hashkv after a put");
    assert!(h2 != h1 && r2 > r1, "{h1}@{r1} then {h2}@{r2}");
    let o = all.run(&["endpoint", "hashkv", &format!("--rev={}", r2 + 1_000_000)]);
    assert!(!o.status.success() && stderr(&o).contains("future revision"), "{}", stderr(&o));

    // A read-only token reads but cannot write.
    let o = nodes[0].cli(&["--json", "auth", "token", "create", "--read"]);
    let reader: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let r = Etcdctl::new(&endpoints, reader["token"].as_str());
    assert!(r.run(&["get", "w/2"]).status.success());
    let o = r.run(&["put", "w/2", "x"]);
    assert!(!o.status.success() && stderr(&o).contains("permission denied"), "{}", stderr(&o));
    let o = r.run(&["endpoint", "hashkv"]);
    assert!(!o.status.success() && stderr(&o).contains("permission denied"), "{}", stderr(&o));

    // etcd's lock recipe (etcdctl lock): concurrent lockers each add one to a counter.
    e.ok(&["put", "counter", "0"]);
    let script = format!(
        "v=$(etcdctl --endpoints={ep} --user=token:{token} get counter --print-value-only); \
         etcdctl --endpoints={ep} --user=token:{token} put counter $((v+1)) >/dev/null",
        ep = endpoints.join(",")
    );
    let lockers: Vec<Child> = (0..5)
        .map(|_| {
            all.command(&["lock", "counter-lock", "--", "sh", "-c", &script])
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn etcdctl lock")
        })
        .collect();
    for l in lockers {
        let out = l.wait_with_output().expect("etcdctl lock");
        assert!(out.status.success(), "a locker failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(e.ok(&["get", "counter", "--print-value-only"]).trim(), "5", "each locker held the lock alone");

    // etcdctl snapshot save writes Aspen's backup file (aspen-node restore reads it).
    let file = root.path().join("etcd-snapshot.db");
    let saved = Etcdctl::new(&endpoints[..1], Some(&token)).ok(&["snapshot", "save", &file.display().to_string()]);
    assert!(saved.contains("Snapshot saved"), "{saved}");
    let o = nodes[0].cli(&["--json", "snapshot", "status", &file.display().to_string()]);
    expect_code(&o, 0, "snapshot status of etcdctl's file");
    assert!(stdout(&o).contains("\"num_shards\":1"), "{}", stdout(&o));

    // etcdctl defrag rewrites every member's state machine files (admin only); the data stays.
    let o = r.run(&["defrag"]);
    assert!(!o.status.success() && stderr(&o).contains("permission denied"), "{}", stderr(&o));
    let done = all.ok(&["defrag", "--cluster"]);
    assert_eq!(done.matches("Finished defragmenting etcd member[").count(), 3, "{done}");
    assert_eq!(e.ok(&["get", "counter", "--print-value-only"]).trim(), "5");
    e.ok(&["put", "after-defrag", "yes"]);
}

#[test]
fn etcdctl_on_four_shards() {
    if !have_etcdctl() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (nodes, endpoints) = start_cluster(root.path(), &SHARD_FLAGS);
    let token = nodes[0].admin_token();
    let e = Etcdctl::new(&endpoints, Some(&token));

    // Single keys anywhere; a prefix read merges every shard in key order, limits and counts.
    let (w, skip) = live_watch(&e, "s/", &[]);
    let keys: Vec<String> = (0..12).map(|i| format!("s/{i:02}")).collect();
    for k in &keys {
        e.ok(&["put", k, &format!("v{k}")]);
    }
    let mut want = vec!["s/probe".to_string()];
    want.extend(keys.iter().cloned());
    want.sort();
    assert_eq!(e.ok(&["get", "--prefix", "s/", "--keys-only"]).split_whitespace().collect::<Vec<_>>(), want);
    let page = e.json(&["get", "--prefix", "s/", "--limit", "5"]);
    assert_eq!((page["count"].as_u64(), page["kvs"].as_array().map(Vec::len)), (Some(13), Some(5)), "{page}");
    let lines = w.wait_for("a watch over every shard", |l| l.len() >= skip + keys.len() * 3);
    let seen: Vec<&String> = lines[skip..].iter().filter(|l| l.starts_with("s/")).collect();
    for k in &keys {
        assert!(seen.contains(&k), "the watch saw every put: {k} missing from {lines:#?}");
    }
    drop(w);

    // A txn within one key's shard runs; one whose keys span shards is refused, naming them.
    let o = e.txn("version(\"s/00\") = \"1\"\n\nput s/00 again\n\n\n");
    assert_eq!(stdout(&o).lines().next(), Some("SUCCESS"), "{}{}", stdout(&o), stderr(&o));
    let o = e.txn("\n\nput s/00 x\nput s/01 y\nput s/02 z\nput s/03 w\nput s/04 v\n\n\n");
    assert!(!o.status.success() && stderr(&o).contains("atomic within one shard only"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("key range"), "single keys: no range to blame: {}", stderr(&o));
    // A range inside counts as every shard, and the refusal says so.
    let o = e.txn("\n\nput s/00 x\nget s/ --prefix\n\n\n");
    assert!(!o.status.success() && stderr(&o).contains("a key range reaches every shard"), "{}", stderr(&o));
    // A start revision names a position in one shard's history: refused for a prefix watch of
    // every shard.
    let w = e.spawn(&["watch", "--prefix", "s/", "--rev", "1"]);
    w.wait_for("a refused start revision", |l| {
        l.iter().any(|x| x.contains("watch was canceled") && x.contains("shard"))
    });
    drop(w);
    // A single key's watch covers one shard: it starts at a revision of that shard.
    let from = header_revision(&e.json(&["put", "s/00", "from-here"]));
    let w = e.spawn(&["watch", "s/00", &format!("--rev={from}")]);
    w.wait_for("a key's watch from its shard's revision", |l| l.iter().any(|x| x == "from-here"));
    drop(w);
    // So does a read of one key at a revision: its shard's.
    e.ok(&["put", "s/00", "later"]);
    assert_eq!(e.ok(&["get", "s/00", "--print-value-only", &format!("--rev={from}")]).trim(), "from-here");

    // A lease's keys in every shard go with it (puts on shards that are not its home check
    // it there first).
    let granted = e.ok(&["lease", "grant", "60"]);
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    for k in &keys {
        e.ok(&["put", "--lease", &id, &format!("l/{k}"), "v"]);
    }
    assert_eq!(e.json(&["get", "--prefix", "l/", "--keys-only"])["count"].as_u64(), Some(12));
    e.ok(&["lease", "revoke", &id]);
    assert_eq!(e.json(&["get", "--prefix", "l/", "--keys-only"])["count"].as_u64(), None, "every key went");

    // A prefix delete reaches every shard.
    assert_eq!(e.ok(&["del", "--prefix", "s/"]).trim(), "13");
    assert_eq!(e.json(&["member", "list"])["members"].as_array().map(Vec::len), Some(3));
    expect_code(&e.run(&["endpoint", "health", "--cluster"]), 0, "endpoint health");
}

/// A self-signed certificate for 127.0.0.1 (and its key) written by `openssl` into `dir`.
fn self_signed(dir: &Path) -> Option<(String, String)> {
    let (cert, key) = (dir.join("etcd.crt"), dir.join("etcd.key"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=aspen-test", "-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        eprintln!("skipped: openssl cannot make a test certificate here");
        return None;
    }
    Some((cert.display().to_string(), key.display().to_string()))
}

#[test]
fn the_etcd_api_over_tls() {
    if !have_etcdctl() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let Some((cert, key)) = self_signed(root.path()) else { return };
    let port = free_tcp_port();
    let mut node = NodeProc::new(root.path(), 1);
    // A certificate without its key is a configuration error: exit 2, naming the field.
    node.extra_args = vec!["--etcd-addr".into(), format!("127.0.0.1:{port}"), "--etcd-cert".into(), cert.clone()];
    let o = node.command().stderr(Stdio::piped()).output().expect("run aspen-node");
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("etcd_key"), "{}", String::from_utf8_lossy(&o.stderr));
    // A file that holds no certificate: exit 2 naming it, before the node opened anything (no
    // ERROR from an endpoint dropped unclosed).
    let garbage = root.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let first = std::mem::take(&mut node.extra_args);
    node.extra_args = vec![
        "--etcd-addr".into(),
        format!("127.0.0.1:{port}"),
        "--etcd-cert".into(),
        garbage.display().to_string(),
        "--etcd-key".into(),
        key.clone(),
    ];
    let o = node.command().stderr(Stdio::piped()).output().expect("run aspen-node");
    let said = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{said}");
    assert!(said.contains("garbage.pem: no certificate in it") && !said.contains("ERROR"), "{said}");
    node.extra_args = first;
    node.extra_args.extend(["--etcd-key".into(), key]);
    // An advertised address with a scheme is refused too; a name is what the member list shows.
    node.extra_args.extend(["--etcd-advertise-addr".into(), format!("https://localhost:{port}")]);
    let o = node.command().stderr(Stdio::piped()).output().expect("run aspen-node");
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("etcd_advertise_addr"));
    node.extra_args.pop();
    node.extra_args.push(format!("localhost:{port}"));
    node.start();
    let token = node.admin_token();
    let endpoint = format!("https://127.0.0.1:{port}");
    let tls = |args: &[&str]| {
        let mut cmd = Etcdctl::new(std::slice::from_ref(&endpoint), Some(&token)).command(args);
        cmd.arg(format!("--cacert={cert}"));
        cmd.stdin(Stdio::null()).output().expect("etcdctl")
    };
    expect_code(&tls(&["put", "secret", "s3"]), 0, "put over TLS");
    let members = stdout(&tls(&["member", "list"]));
    assert!(members.contains(&format!(", localhost:{port}")), "the advertised client URL: {members}");
    assert_eq!(stdout(&tls(&["get", "secret", "--print-value-only"])).trim(), "s3");
    // A client that does not trust the certificate does not get through.
    let o = Etcdctl::new(std::slice::from_ref(&endpoint), Some(&token)).run(&[
        "get",
        "secret",
        "--dial-timeout=2s",
        "--command-timeout=4s",
    ]);
    assert!(!o.status.success(), "an untrusted certificate was accepted: {}", stdout(&o));

    // Clients that connect and never start their handshake hold up no one else.
    let silent: Vec<std::net::TcpStream> =
        (0..32).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect")).collect();
    assert_eq!(stdout(&tls(&["get", "secret", "--print-value-only"])).trim(), "s3");
    drop(silent);

    // HTTP over the same TLS port, HTTP/1.1 (ALPN offers it too) and HTTP/2: etcd's /health and
    // the JSON gateway. Plain HTTP is not spoken there.
    let curl = |args: &[&str]| {
        let o = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert", &cert, "-w", "\n%{http_code} %{http_version}"])
            .args(args)
            .output()
            .expect("run curl");
        stdout(&o).trim().to_string()
    };
    if Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success()) {
        for (version, value) in [("--http1.1", "h1"), ("--http2", "h2")] {
            let health = curl(&[version, &format!("{endpoint}/health")]);
            let want = if version == "--http1.1" { "200 1.1" } else { "200 2" };
            assert!(health.starts_with(r#"{"health":"true""#) && health.ends_with(want), "{version}: {health}");
            let versions = curl(&[version, &format!("{endpoint}/version")]);
            let etcd_s = r#"{"etcdserver":"3.5.0","etcdcluster":"3.5.0"}"#;
            assert_eq!(versions, format!("{etcd_s}\n{want}"), "{version}: etcd's /version, its keys in etcd's order");
            let put = curl(&[
                version,
                "-H",
                &format!("Authorization: {token}"),
                "-X",
                "POST",
                &format!("{endpoint}/v3/kv/put"),
                "-d",
                &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("over-tls"), b64(value)),
            ]);
            assert!(put.ends_with(want), "{version}: {put}");
            assert_eq!(stdout(&tls(&["get", "over-tls", "--print-value-only"])).trim(), value);
        }
        let plain = Command::new("curl")
            .args(["-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}/health")])
            .output()
            .expect("run curl");
        assert!(!plain.status.success(), "plain HTTP answered on the TLS port: {}", stdout(&plain));
    }
}
