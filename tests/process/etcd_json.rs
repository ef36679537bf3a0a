//! The etcd API's JSON gateway (`POST /v3/…` on the `--etcd-addr` port) driven by `curl`, as
//! etcd's documentation drives etcd's: a 3-node cluster of one shard, every call sent to node 2
//! (forwarded to the leader): authentication with a token, put/range (prefix, limit, keys and
//! count only, sorting), txn, delete, a streamed watch (from now and from a revision, with
//! previous values, ending on the server when curl goes away), leases (grant, keep-alive,
//! time-to-live with keys, list, revoke), compaction, member list and status without a token,
//! and the errors: etcd's texts with grpc-gateway's HTTP statuses and codes.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    etcd::{b64, Running},
    support::{start_processes, stdout},
};

fn have_curl() -> bool {
    let found = Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: curl is not installed (scripts/test.sh installs it)");
    }
    found
}

/// A 64-bit number as the gateway writes it (a string).
fn num(v: &Value) -> i64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a 64-bit number as a string: {v}"))
}

struct Gateway {
    url: String,
    token: Option<String>,
}

impl Gateway {
    fn command(&self, path: &str, body: &Value) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "-X", "POST"]).arg(format!("{}{path}", self.url));
        if let Some(t) = &self.token {
            cmd.args(["-H", &format!("Authorization: {t}")]);
        }
        cmd.args(["-d", &body.to_string()]);
        cmd
    }

    /// POSTs `body` to `path`: the HTTP status and the JSON answer.
    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let o = self.command(path, &body).args(["-w", "\n%{http_code}"]).output().expect("run curl");
        let out = stdout(&o);
        let (json, code) = out.trim_end().rsplit_once('\n').unwrap_or_else(|| panic!("POST {path}: {out:?}"));
        let v = serde_json::from_str(json).unwrap_or_else(|e| panic!("POST {path}: {e}: {json}"));
        (code.parse().unwrap(), v)
    }

    /// POSTs the contents of `file` to `path`: the HTTP status and the JSON answer.
    fn post_file(&self, path: &str, file: &std::path::Path) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "60", "-X", "POST", "-w", "\n%{http_code}"]).arg(format!("{}{path}", self.url));
        if let Some(t) = &self.token {
            cmd.args(["-H", &format!("Authorization: {t}")]);
        }
        let o = cmd.arg("--data-binary").arg(format!("@{}", file.display())).output().expect("run curl");
        let out = stdout(&o);
        let (json, code) = out.trim_end().rsplit_once('\n').unwrap_or_else(|| panic!("POST {path}: {out:?}"));
        (code.parse().unwrap(), serde_json::from_str(json).unwrap_or_else(|e| panic!("POST {path}: {e}: {json}")))
    }

    /// POSTs `body` to `path` and expects 200: the answer.
    fn ok(&self, path: &str, body: Value) -> Value {
        let (code, v) = self.post(path, body);
        assert_eq!(code, 200, "POST {path}: {v}");
        v
    }

    /// A streaming call (`curl -N`) whose answer lines are collected as they come.
    fn spawn(&self, path: &str, body: Value) -> Streaming {
        let mut cmd = self.command(path, &body);
        cmd.arg("-N");
        Streaming(Running::spawn(cmd))
    }
}

/// A streaming call's answer: its JSON lines.
struct Streaming(Running);

impl Streaming {
    /// Waits (30 s at most) until the JSON lines satisfy `done`; returns them.
    fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let lines = self.0.wait_for(what, |l| done(&json_lines(l)));
        json_lines(&lines)
    }
}

/// The lines that are JSON objects (curl's own messages on stderr are not).
fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The events of a watch's answer lines, as (type, key, value, previous value).
fn events(lines: &[Value]) -> Vec<(String, String, String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    lines
        .iter()
        .flat_map(|l| l["result"]["events"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            let kind = e["type"].as_str().unwrap_or("PUT").to_string();
            (kind, text(&e["kv"]["key"]), text(&e["kv"]["value"]), text(&e["prev_kv"]["value"]))
        })
        .collect()
}

/// `aspen_watchers` of shard 0 on the node behind `url` (its etcd port serves /metrics too).
fn watchers(url: &str) -> u64 {
    let o = Command::new("curl").args(["-sS", &format!("{url}/metrics")]).output().expect("curl /metrics");
    let text = stdout(&o);
    let line = text
        .lines()
        .find(|l| l.starts_with("aspen_watchers{"))
        .unwrap_or_else(|| panic!("no aspen_watchers in {text}"));
    line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64
}

#[test]
fn curl_drives_the_json_gateway() {
    if !have_curl() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| aspen_testkit::free_port()).collect();
    let nodes =
        start_processes(root.path(), |id| vec!["--etcd-addr".into(), format!("127.0.0.1:{}", ports[id as usize - 1])]);
    let url = format!("http://127.0.0.1:{}", ports[1]);
    let admin = nodes[0].admin_token();
    let anon = Gateway { url: url.clone(), token: None };

    // No token: etcd's refusal, as grpc-gateway answers INVALID_ARGUMENT.
    let (code, v) = anon.post("/v3/kv/put", json!({"key": b64("k"), "value": b64("v")}));
    assert_eq!(
        (code, v["code"].as_i64(), v["error"].as_str()),
        (400, Some(3), Some("etcdserver: user name is empty")),
        "{v}"
    );
    // Authenticate: user `token`, an Aspen token as password; the answer's token is sent back as
    // `Authorization`.
    let (code, v) = anon.post("/v3/auth/authenticate", json!({"name": "token", "password": "nope"}));
    assert_eq!(
        (code, v["error"].as_str()),
        (400, Some("etcdserver: authentication failed, invalid user ID or password"))
    );
    let v = anon.ok("/v3/auth/authenticate", json!({"name": "token", "password": admin}));
    let e = Gateway { url: url.clone(), token: Some(v["token"].as_str().expect("a token").to_string()) };

    // Put and range, as etcd's gateway writes them: 64-bit numbers as strings, bytes in base64.
    let first = num(&e.ok("/v3/kv/put", json!({"key": b64("j/a"), "value": b64("1")}))["header"]["revision"]);
    // The watch from that revision (it sees every write after it too), and one from now.
    let from = e.spawn(
        "/v3/watch",
        json!({"create_request": {"key": b64("j/"), "range_end": b64("j0"), "start_revision": first.to_string()}}),
    );
    let live =
        e.spawn("/v3/watch", json!({"create_request": {"key": b64("j/"), "range_end": b64("j0"), "prev_kv": true}}));
    live.wait_for("the watch is created", |l| l.first().is_some_and(|x| x["result"]["created"] == json!(true)));
    let v = e.ok("/v3/kv/put", json!({"key": b64("j/b"), "value": b64("2")}));
    assert!(num(&v["header"]["revision"]) > first);
    let v = e.ok("/v3/kv/put", json!({"key": b64("j/a"), "value": b64("3"), "prev_kv": true}));
    assert_eq!(v["prev_kv"]["value"], json!(b64("1")), "{v}");
    assert_eq!((num(&v["prev_kv"]["version"]), num(&v["prev_kv"]["create_revision"])), (1, first));
    e.ok("/v3/kv/put", json!({"key": b64("j/c"), "value": b64("4")}));
    let all = e.ok("/v3/kv/range", json!({"key": b64("j/"), "range_end": b64("j0")}));
    let keys: Vec<&str> = all["kvs"].as_array().unwrap().iter().map(|kv| kv["key"].as_str().unwrap()).collect();
    assert_eq!((keys, num(&all["count"])), (vec![b64("j/a").as_str(), &b64("j/b"), &b64("j/c")], 3), "{all}");
    let a = &all["kvs"][0];
    assert_eq!(
        (a["value"].as_str(), num(&a["version"]), num(&a["create_revision"])),
        (Some(b64("3").as_str()), 2, first)
    );
    // lowerCamelCase and plain numbers are read too; limit, sorting, keys and count only.
    let page = e.ok(
        "/v3/kv/range",
        json!({"key": b64("j/"), "rangeEnd": b64("j0"), "limit": 2, "sort_order": "DESCEND", "sort_target": "KEY"}),
    );
    let keys: Vec<&str> = page["kvs"].as_array().unwrap().iter().map(|kv| kv["key"].as_str().unwrap()).collect();
    assert_eq!(
        (keys, page["more"].as_bool(), num(&page["count"])),
        (vec![b64("j/c").as_str(), &b64("j/b")], Some(true), 3),
        "{page}"
    );
    let keys_only = e.ok("/v3/kv/range", json!({"key": b64("j/a"), "keys_only": true}));
    assert!(
        keys_only["kvs"][0].get("value").is_none() && keys_only["kvs"][0]["key"] == json!(b64("j/a")),
        "{keys_only}"
    );
    let count_only = e.ok("/v3/kv/range", json!({"key": b64("j/"), "range_end": b64("j0"), "count_only": true}));
    assert!(count_only.get("kvs").is_none() && num(&count_only["count"]) == 3, "{count_only}");

    // Txn: the compare holds, then it does not.
    let txn = |expect: &str| {
        json!({
            "compare": [{"key": b64("j/a"), "result": "EQUAL", "target": "VALUE", "value": b64(expect)}],
            "success": [{"request_put": {"key": b64("j/a"), "value": b64("5")}}],
            "failure": [{"request_range": {"key": b64("j/a")}}],
        })
    };
    let v = e.ok("/v3/kv/txn", txn("3"));
    assert!(v["succeeded"] == json!(true) && v["responses"][0].get("response_put").is_some(), "{v}");
    let v = e.ok("/v3/kv/txn", txn("3"));
    assert!(v.get("succeeded").is_none(), "false is left out, as etcd writes it: {v}");
    assert_eq!(v["responses"][0]["response_range"]["kvs"][0]["value"], json!(b64("5")), "{v}");

    // Delete with previous values; the watches saw everything in order.
    let v = e.ok("/v3/kv/deleterange", json!({"key": b64("j/b"), "prev_kv": true}));
    assert_eq!((num(&v["deleted"]), &v["prev_kvs"][0]["value"]), (1, &json!(b64("2"))), "{v}");
    let want = [
        ("PUT", "j/b", "2", ""),
        ("PUT", "j/a", "3", "1"),
        ("PUT", "j/c", "4", ""),
        ("PUT", "j/a", "5", "3"),
        ("DELETE", "j/b", "", "2"),
    ];
    let want: Vec<(String, String, String, String)> = want
        .iter()
        .map(|(t, k, v, p)| {
            (
                t.to_string(),
                b64(k),
                if v.is_empty() { String::new() } else { b64(v) },
                if p.is_empty() { String::new() } else { b64(p) },
            )
        })
        .collect();
    let lines = live.wait_for("the live watch's events", |l| events(l).len() >= want.len());
    assert_eq!(events(&lines), want, "{lines:#?}");
    let lines = from.wait_for("the watch from a revision", |l| events(l).len() > want.len());
    let mut history = vec![("PUT".to_string(), b64("j/a"), b64("1"), String::new())];
    // Without prev_kv the previous values are not sent.
    history.extend(want.iter().map(|(t, k, v, _)| (t.clone(), k.clone(), v.clone(), String::new())));
    assert_eq!(events(&lines), history, "{lines:#?}");
    // curl going away ends the node's watches (no events are needed to notice).
    assert_eq!(watchers(&url), 2);
    drop(live);
    drop(from);
    let deadline = Instant::now() + Duration::from_secs(30);
    while watchers(&url) != 0 {
        assert!(Instant::now() < deadline, "the node still follows {} watches after curl went away", watchers(&url));
        std::thread::sleep(Duration::from_millis(200));
    }

    // Leases: grant, a key under it, keep-alive (a stream of one answer per request),
    // time-to-live with keys, the list, revoke (its key goes), revoke again (not found).
    let lease = e.ok("/v3/lease/grant", json!({"TTL": 60}));
    let id = num(&lease["ID"]);
    assert_eq!(num(&lease["TTL"]), 60);
    e.ok("/v3/kv/put", json!({"key": b64("l/x"), "value": b64("v"), "lease": id.to_string()}));
    let kept = e.spawn("/v3/lease/keepalive", json!({"ID": id.to_string()}));
    let answer = kept.wait_for("the keep-alive's answer", |l| !l.is_empty())[0].clone();
    assert_eq!((num(&answer["result"]["ID"]), num(&answer["result"]["TTL"])), (id, 60), "{answer}");
    drop(kept);
    let ttl = e.ok("/v3/kv/lease/timetolive", json!({"ID": id, "keys": true}));
    assert_eq!((ttl["keys"].clone(), num(&ttl["grantedTTL"])), (json!([b64("l/x")]), 60), "{ttl}");
    let leases = e.ok("/v3/lease/leases", json!({}));
    assert!(leases["leases"].as_array().unwrap().iter().any(|l| num(&l["ID"]) == id), "{leases}");
    e.ok("/v3/lease/revoke", json!({"ID": id}));
    assert!(e.ok("/v3/kv/range", json!({"key": b64("l/x")})).get("kvs").is_none(), "the lease's key went with it");
    let (code, v) = e.post("/v3/kv/lease/revoke", json!({"ID": id}));
    assert_eq!(
        (code, v["code"].as_i64(), v["error"].as_str()),
        (404, Some(5), Some("etcdserver: requested lease not found"))
    );

    // Compaction: the current revision is taken, a future one refused.
    let now = num(&e.ok("/v3/kv/range", json!({"key": b64("j/a")}))["header"]["revision"]);
    e.ok("/v3/kv/compaction", json!({"revision": now}));
    let (code, v) = e.post("/v3/kv/compaction", json!({"revision": now + 1_000_000}));
    assert_eq!(
        (code, v["code"].as_i64(), v["error"].as_str()),
        (400, Some(11), Some("etcdserver: mvcc: required revision is a future revision"))
    );

    // Members and status need no token (as etcd).
    let members = anon.ok("/v3/cluster/member/list", json!({}));
    assert_eq!(members["members"].as_array().map(Vec::len), Some(3), "{members}");
    let status = anon.ok("/v3/maintenance/status", json!({}));
    assert!(num(&status["leader"]) > 0 && status["version"].is_string(), "{status}");

    // Errors: bad JSON, an RPC Aspen does not have, a path etcd does not have, a read token writing.
    let (code, v) = e.post("/v3/kv/put", json!({"key": 5}));
    assert_eq!((code, v["code"].as_i64()), (400, Some(3)), "{v}");
    let (code, v) = e.post("/v3/auth/user/add", json!({"name": "alice"}));
    assert_eq!((code, v["code"].as_i64()), (501, Some(12)), "{v}");
    let (code, _) = e.post("/v3/kv/nothing", json!({}));
    assert_eq!(code, 404);
    // A stream that fails before its first answer answers the failure's status, with
    // grpc-gateway's error line.
    let (code, v) = e.post("/v3/lease/keepalive", json!("not a request"));
    assert_eq!(
        (code, v["error"]["grpc_code"].as_i64(), v["error"]["http_code"].as_i64()),
        (400, Some(3), Some(400)),
        "{v}"
    );
    // A value over the node's limit, and a body over the gateway's: etcd's "request is too large".
    for mib in [3, 9] {
        let body = json!({"key": b64("big"), "value": b64(&"x".repeat(mib << 20))});
        let file = root.path().join("big.json");
        std::fs::write(&file, body.to_string()).unwrap();
        let (code, v) = e.post_file("/v3/kv/put", &file);
        assert_eq!((code, v["error"].as_str()), (400, Some("etcdserver: request is too large")), "{mib} MiB: {v}");
    }
    assert!(e.ok("/v3/kv/range", json!({"key": b64("big")})).get("kvs").is_none(), "nothing was written");
    let o = nodes[0].cli(&["--json", "auth", "token", "create", "--read"]);
    let reader: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let r = Gateway { url, token: Some(reader["token"].as_str().unwrap().to_string()) };
    assert_eq!(r.ok("/v3/kv/range", json!({"key": b64("j/a")}))["kvs"][0]["value"], json!(b64("5")));
    let (code, v) = r.post("/v3/kv/put", json!({"key": b64("j/a"), "value": b64("6")}));
    assert_eq!(
        (code, v["code"].as_i64(), v["error"].as_str()),
        (403, Some(7), Some("etcdserver: permission denied")),
        "{v}"
    );
}
