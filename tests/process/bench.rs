//! Process tests of `aspen-cli bench`: the real binary against a real single `aspen-node`. The
//! counts in the JSON report must add up and the written keys must be there afterwards; no
//! assertion is made on timing.

use crate::support::{expect_code, stderr, stdout, NodeProc};
use serde_json::Value;

/// Runs `aspen-cli --json bench ARGS` against `node` and parses its one JSON object.
fn bench_json(node: &NodeProc, args: &[&str]) -> Value {
    let mut all = vec!["--json", "bench"];
    all.extend_from_slice(args);
    let o = node.cli(&all);
    expect_code(&o, 0, &format!("bench {args:?}"));
    let out = stdout(&o);
    assert_eq!(out.trim().lines().count(), 1, "exactly one JSON line on stdout: {out:?}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bench --json output is not JSON ({e}): {out:?}"))
}

fn u(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("{field} is not a number in {v}"))
}

/// `ops == requests`, no errors, `latency_us.count == ok`, percentiles in order.
fn assert_counts(r: &Value, requests: u64) {
    assert_eq!(u(r, "requests"), requests, "{r}");
    assert_eq!(u(r, "ops"), requests, "{r}");
    assert_eq!(u(r, "ok"), requests, "{r}");
    assert_eq!(u(r, "errors"), 0, "{r}");
    assert_eq!(r["error_samples"], serde_json::json!([]), "{r}");
    let lat = &r["latency_us"];
    assert_eq!(u(lat, "count"), requests, "{r}");
    let (min, p50, p90, p99, p999, max) =
        (u(lat, "min"), u(lat, "p50"), u(lat, "p90"), u(lat, "p99"), u(lat, "p999"), u(lat, "max"));
    assert!(0 < min && min <= p50 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max, "ordered: {lat}");
    let by_op_total: u64 = r["by_op"].as_object().expect("by_op").values().map(|o| u(o, "ops")).sum();
    assert_eq!(by_op_total, requests, "per-op counts add up: {r}");
    assert!(r["elapsed_secs"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["throughput_ops_per_sec"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn bench_put_get_mixed_counts_add_up_and_keys_are_written() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    node.start();

    // put: 40 sequential keys over 4 clients, no warm-up, so exactly bench/00000000..39 are written.
    let r = bench_json(
        &node,
        &[
            "--op",
            "put",
            "--requests",
            "40",
            "--clients",
            "4",
            "--key-space",
            "40",
            "--sequential-keys",
            "--warmup",
            "0",
            "--value-size",
            "32",
        ],
    );
    assert_counts(&r, 40);
    assert_eq!(r["op"], "put");
    assert_eq!(u(&r, "clients"), 4);
    assert_eq!(u(&r, "prefilled"), 0);
    assert_eq!(u(&r["by_op"]["put"], "ok"), 40);
    assert!(r["by_op"].get("get").is_none(), "a put run sends no get: {r}");

    let o = node.cli(&["scan", "--prefix", "bench/"]);
    expect_code(&o, 0, "scan bench keys");
    let lines: Vec<String> = stdout(&o).lines().map(String::from).collect();
    assert_eq!(lines.len(), 40, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        let (key, value) = line.split_once('\t').expect("key<TAB>value");
        assert_eq!(key, format!("bench/{i:08}"));
        assert_eq!(value.len(), 32, "value size of {key}");
    }
    for key in ["bench/00000000", "bench/00000039"] {
        let o = node.cli(&["get", key]);
        expect_code(&o, 0, &format!("get {key}"));
        assert_eq!(stdout(&o).trim_end().len(), 32);
    }

    // get: the key space is pre-populated (not counted), every read finds its key.
    let r =
        bench_json(&node, &["--op", "get", "--requests", "30", "--clients", "2", "--key-space", "50", "--warmup", "0"]);
    assert_counts(&r, 30);
    assert_eq!(u(&r, "prefilled"), 50);
    assert_eq!(u(&r, "not_found"), 0);
    assert_eq!(r["consistency"], "linearizable");
    assert_eq!(u(&r["by_op"]["get"], "ok"), 30);
    assert!(r["by_op"].get("put").is_none(), "a get run sends no put: {r}");
    let o = node.cli(&["get", "bench/00000049"]);
    expect_code(&o, 0, "prefilled key");
    assert_eq!(stdout(&o).trim_end().len(), 256, "default value size");

    // mixed, stale reads, with a short warm-up (excluded from the counts).
    let r = bench_json(
        &node,
        &[
            "--op",
            "mixed",
            "--read-ratio",
            "0.5",
            "--consistency",
            "stale",
            "--requests",
            "30",
            "--clients",
            "3",
            "--key-space",
            "50",
            "--warmup",
            "0.2",
        ],
    );
    assert_counts(&r, 30);
    assert_eq!(r["consistency"], "stale");
    assert_eq!(r["read_ratio"].as_f64(), Some(0.5));
    assert_eq!(u(&r, "not_found"), 0);

    // Without --json: a readable summary.
    let o = node.cli(&["bench", "--requests", "5", "--warmup", "0"]);
    expect_code(&o, 0, "bench (text)");
    let text = stdout(&o);
    for word in ["ops:", "5 ok, 0 errors", "throughput:", "p99.9", "max"] {
        assert!(text.contains(word), "{word:?} missing from {text:?}");
    }

    // No node: every request fails → exit 3 with a message that says so.
    assert!(node.terminate().success());
    let o = crate::support::cli_with_timeout(&node, 1, &["bench", "--requests", "2", "--warmup", "0"]);
    expect_code(&o, 3, "bench against a stopped node");
    assert!(stderr(&o).contains("all 2 requests failed"), "{}", stderr(&o));
}

#[test]
fn bench_bad_flags_exit_2_with_a_clear_message() {
    let root = tempfile::tempdir().unwrap();
    let node = NodeProc::new(root.path(), 1); // never started: flags are checked first
    let cases: &[(&[&str], &str)] = &[
        (&["--clients", "0"], "--clients"),
        (&["--read-ratio", "1.5", "--op", "mixed"], "--read-ratio"),
        (&["--duration", "0"], "--duration"),
        (&["--warmup=-1"], "--warmup"),
        (&["--requests", "0"], "--requests"),
        (&["--key-space", "0"], "--key-space"),
        (&["--requests", "5", "--duration", "2"], "--duration"),
        (&["--op", "delete"], "--op"),
    ];
    for (args, flag) in cases {
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        let o = node.cli(&all);
        expect_code(&o, 2, &format!("bench {args:?}"));
        assert!(stderr(&o).contains(flag), "bench {args:?}: message names {flag}: {}", stderr(&o));
        assert_eq!(stdout(&o), "", "nothing on stdout for {args:?}");
    }
}

/// `bench --op watch` and `--op keepalive` end to end on one node: every watcher (three, over
/// two connections) gets every put's event, the put and delivery latencies are counted, and
/// the keep-alive bench renews and revokes its leases.
#[test]
fn bench_watch_and_keepalive_deliver_and_count() {
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProc::new(root.path(), 1);
    node.start();

    let r = bench_json(
        &node,
        &[
            "--op",
            "watch",
            "--watchers",
            "3",
            "--watch-conns",
            "2",
            "--clients",
            "2",
            "--rate",
            "50",
            "--duration",
            "1",
        ],
    );
    assert_eq!(u(&r, "watchers"), 3, "{r}");
    assert_eq!(u(&r, "conns"), 2, "{r}");
    let puts = u(&r, "puts");
    assert!(puts > 0, "some puts went through: {r}");
    assert_eq!(u(&r, "put_errors"), 0, "{r}");
    assert_eq!(u(&r, "events_expected"), puts * 3, "{r}");
    assert_eq!(u(&r, "events_received"), puts * 3, "every watcher got every event: {r}");
    for field in ["put_latency", "delivery", "delivery_after_ack"] {
        let l = &r[field];
        let (p50, p99, max) =
            (l["p50_ms"].as_f64().unwrap(), l["p99_ms"].as_f64().unwrap(), l["max_ms"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{field} percentiles in order: {r}");
    }
    // The watched keys are there.
    let o = node.cli(&["get", "bench/watch/00000000"]);
    expect_code(&o, 0, "a key the watch bench wrote");

    let r = bench_json(&node, &["--op", "keepalive", "--clients", "2", "--leases", "3", "--duration", "0.5"]);
    assert!(u(&r, "ops") > 0 && u(&r, "errors") == 0, "{r}");
    let o = node.cli(&["lease", "list"]);
    expect_code(&o, 0, "lease list after the keep-alive bench");
    assert_eq!(stdout(&o), "", "the bench revoked its leases");
}
