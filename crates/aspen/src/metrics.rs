//! Metrics: the counters, gauges and histograms the node's parts keep, and their rendering as
//! Prometheus text exposition (format 0.0.4) for `GET /metrics` (docs/operations.md, "Metrics";
//! docs/design.md §12).
//!
//! Owns: the primitives ([`Counter`], [`Gauge`], [`Histogram`]), the node-wide request, transport
//! and auth metrics ([`NodeMetrics`]), each shard's ([`ShardMetrics`]), and the text writer
//! ([`Exposition`]).
//!
//! There is no global registry: every part keeps its own metrics (a shard's in its `RaftNode`,
//! the journal's fsync times in the journal, the node's in its service), and a scrape walks them
//! — so several nodes in one process (the in-process tests) keep separate numbers. Values that
//! already exist elsewhere (Raft indexes, roles, watchers, leases) are read at scrape time, not
//! copied on every change. Recording costs an atomic add or two: no locks on the hot path but a
//! read lock to find a request kind's counters.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down (open connections, say).
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }

    /// Counts one more until the returned guard drops.
    pub fn track(self: &Arc<Self>) -> GaugeGuard {
        self.0.fetch_add(1, Relaxed);
        GaugeGuard(self.clone())
    }
}

/// Holds one unit of a [`Gauge`] (see [`Gauge::track`]).
#[derive(Debug)]
pub struct GaugeGuard(Arc<Gauge>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Relaxed);
    }
}

/// Bucket bounds of durations, in nanoseconds: 50 µs to 10 s.
pub const DURATION_BOUNDS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Bucket bounds of small counts (writes per entry, batches of lag): powers of two to 1024.
pub const COUNT_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// A histogram with fixed buckets over integer observations (nanoseconds for durations).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// Observations per bucket (not cumulative); the last one is above every bound.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    /// What one unit of an observation is in the exported unit (1e-9: nanoseconds → seconds).
    scale: f64,
}

impl Histogram {
    /// A histogram of durations, exported in seconds.
    pub fn durations() -> Self {
        Self::new(DURATION_BOUNDS, 1e-9)
    }

    /// A histogram of counts.
    pub fn counts() -> Self {
        Self::new(COUNT_BOUNDS, 1.0)
    }

    fn new(bounds: &'static [u64], scale: f64) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            scale,
        }
    }

    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Observes the time since `start`.
    pub fn observe_since(&self, start: Instant) {
        self.observe_duration(start.elapsed());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }
}

/// How a request ended, as the `outcome` label: `ok` or an [`crate::api::ApiError::kind`].
pub const OUTCOMES: &[&str] = &[
    "ok",
    "not_leader",
    "unavailable",
    "timeout",
    "invalid_request",
    "too_large",
    "unsupported_version",
    "refused",
    "internal",
    "not_initialized",
    "permission_denied",
    "lease_not_found",
    "compacted",
    "watch_cancelled",
    "no_space",
];

/// Why a token check refused a request, as the `reason` label.
pub const AUTH_REFUSALS: &[&str] = &[
    "no_token",
    "malformed",
    "bad_signature",
    "wrong_cluster",
    "unknown_issuer",
    "expired",
    "revoked",
    "invalid",
    "join_token",
    "scope",
    "reserved_key",
];

/// The protocols whose connections and streams are counted, as the `alpn` label.
pub const ALPNS: &[&str] = &["client", "peer", "raft"];

/// Forwarded requests are counted by hop up to this (the last label is "`N`+").
const MAX_HOP_LABEL: usize = 4;

/// One request kind's counts and latency (on one ALPN).
#[derive(Debug)]
pub struct OpMetrics {
    outcomes: [Counter; OUTCOMES.len()],
    latency: Histogram,
}

impl OpMetrics {
    fn new() -> Self {
        OpMetrics { outcomes: Default::default(), latency: Histogram::durations() }
    }

    /// Records one request that took since `start` and ended with `outcome`.
    pub fn record(&self, start: Instant, outcome: Result<(), &'static str>) {
        let label = outcome.err().unwrap_or("ok");
        let i = OUTCOMES
            .iter()
            .position(|o| *o == label)
            .unwrap_or(OUTCOMES.iter().position(|o| *o == "internal").unwrap_or(0));
        self.outcomes[i].inc();
        self.latency.observe_since(start);
    }
}

/// The node-wide metrics: requests by ALPN, kind and outcome; forwarded requests by hop;
/// connections and streams; token refusals; the journal's fsync times.
#[derive(Debug)]
pub struct NodeMetrics {
    /// (alpn, request kind) → its counts. Kinds are `&'static` names (`ClientRequest::kind`,
    /// a write's command), so the map stays small.
    ops: RwLock<HashMap<(&'static str, &'static str), Arc<OpMetrics>>>,
    forwarded: [Counter; MAX_HOP_LABEL],
    connections: [Arc<Gauge>; ALPNS.len()],
    streams: [Arc<Gauge>; ALPNS.len()],
    auth_refusals: [Counter; AUTH_REFUSALS.len()],
    journal_fsync: Arc<Histogram>,
}

impl NodeMetrics {
    /// `journal_fsync`: the node journal's fsync times (kept by the journal).
    pub fn new(journal_fsync: Arc<Histogram>) -> Self {
        NodeMetrics {
            ops: Default::default(),
            forwarded: Default::default(),
            connections: Default::default(),
            streams: Default::default(),
            auth_refusals: Default::default(),
            journal_fsync,
        }
    }

    /// The counters of request kind `op` on `alpn`.
    pub fn op(&self, alpn: &'static str, op: &'static str) -> Arc<OpMetrics> {
        if let Some(m) = self.ops.read().unwrap_or_else(|p| p.into_inner()).get(&(alpn, op)) {
            return m.clone();
        }
        let mut ops = self.ops.write().unwrap_or_else(|p| p.into_inner());
        ops.entry((alpn, op)).or_insert_with(|| Arc::new(OpMetrics::new())).clone()
    }

    /// A request that arrived after `hops` forwards.
    pub fn forwarded(&self, hops: u8) {
        if hops > 0 {
            self.forwarded[(hops as usize).min(MAX_HOP_LABEL) - 1].inc();
        }
    }

    fn alpn_index(alpn: &str) -> usize {
        ALPNS.iter().position(|a| *a == alpn).unwrap_or(0)
    }

    /// Counts an open connection of `alpn` until the guard drops.
    pub fn connection(&self, alpn: &str) -> GaugeGuard {
        self.connections[Self::alpn_index(alpn)].track()
    }

    /// Counts an open stream of `alpn` until the guard drops.
    pub fn stream(&self, alpn: &str) -> GaugeGuard {
        self.streams[Self::alpn_index(alpn)].track()
    }

    /// A request refused by the token check, for `reason` (one of [`AUTH_REFUSALS`]).
    pub fn auth_refused(&self, reason: &str) {
        if let Some(i) = AUTH_REFUSALS.iter().position(|r| *r == reason) {
            self.auth_refusals[i].inc();
        }
    }

    /// Writes the node-wide families.
    pub fn render(&self, out: &mut Exposition) {
        let ops: Vec<((&str, &str), Arc<OpMetrics>)> = {
            let map = self.ops.read().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<_> = map.iter().map(|(k, m)| (*k, m.clone())).collect();
            v.sort_by_key(|(k, _)| *k);
            v
        };
        out.family("aspen_requests_total", "counter", "Requests answered, by ALPN, kind and outcome.");
        for ((alpn, op), m) in &ops {
            let op = op.replace(' ', "_");
            for (outcome, c) in OUTCOMES.iter().zip(&m.outcomes) {
                let n = c.get();
                if n > 0 {
                    out.sample("aspen_requests_total", &[("alpn", alpn), ("op", &op), ("outcome", outcome)], n as f64);
                }
            }
        }
        out.family("aspen_request_duration_seconds", "histogram", "Time from a request's arrival to its answer.");
        for ((alpn, op), m) in &ops {
            out.histogram(
                "aspen_request_duration_seconds",
                &[("alpn", alpn), ("op", &op.replace(' ', "_"))],
                &m.latency,
            );
        }
        out.family(
            "aspen_forwarded_requests_received_total",
            "counter",
            "Requests that reached this node after being forwarded, by hops.",
        );
        for (i, c) in self.forwarded.iter().enumerate() {
            let hops = if i + 1 == MAX_HOP_LABEL { format!("{}+", i + 1) } else { (i + 1).to_string() };
            out.sample("aspen_forwarded_requests_received_total", &[("hops", &hops)], c.get() as f64);
        }
        out.family("aspen_connections_open", "gauge", "Open QUIC connections, by ALPN.");
        for (alpn, g) in ALPNS.iter().zip(&self.connections) {
            out.sample("aspen_connections_open", &[("alpn", alpn)], g.get() as f64);
        }
        out.family("aspen_streams_open", "gauge", "Open request streams, by ALPN.");
        for (alpn, g) in ALPNS.iter().zip(&self.streams) {
            out.sample("aspen_streams_open", &[("alpn", alpn)], g.get() as f64);
        }
        out.family("aspen_auth_refusals_total", "counter", "Requests refused by the token check, by reason.");
        for (reason, c) in AUTH_REFUSALS.iter().zip(&self.auth_refusals) {
            out.sample("aspen_auth_refusals_total", &[("reason", reason)], c.get() as f64);
        }
        out.family(
            "aspen_journal_fsync_duration_seconds",
            "histogram",
            "Time of each fsync of the node's log journal (shared by its shards).",
        );
        out.histogram("aspen_journal_fsync_duration_seconds", &[], &self.journal_fsync);
    }
}

/// One shard's metrics on this node (its `RaftNode` holds them; its batcher, read gate and state
/// machine record into them).
#[derive(Debug)]
pub struct ShardMetrics {
    /// Log entries the write batcher proposed.
    pub proposals: Counter,
    /// Writes per proposed entry.
    pub writes_per_entry: Histogram,
    /// Time to apply each run of entries to the state machine (after they are durable).
    pub apply: Histogram,
    /// Linearizable-read (ReadIndex) rounds run.
    pub read_index_rounds: Counter,
    /// Snapshots this replica built, and installed from its leader.
    pub snapshots_built: Counter,
    pub snapshots_installed: Counter,
    /// Bytes of snapshot streams this replica wrote (sent to followers).
    pub snapshot_bytes_sent: Counter,
    /// How many batches behind the live feed a watch was when it sent a frame.
    pub watch_lag: Histogram,
    /// Defragmentations of this replica's state machine file, and the bytes they gave back.
    pub defrags: Counter,
    pub defrag_reclaimed_bytes: Counter,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            proposals: Counter::default(),
            writes_per_entry: Histogram::counts(),
            apply: Histogram::durations(),
            read_index_rounds: Counter::default(),
            snapshots_built: Counter::default(),
            snapshots_installed: Counter::default(),
            snapshot_bytes_sent: Counter::default(),
            watch_lag: Histogram::counts(),
            defrags: Counter::default(),
            defrag_reclaimed_bytes: Counter::default(),
        }
    }
}

/// Prometheus text exposition (format 0.0.4) being written: one family after another, each with
/// its `# HELP` and `# TYPE` lines, then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// The content type of [`Exposition`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Exposition {
    /// Starts family `name` of `kind` (counter, gauge, histogram); its samples follow.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    /// A histogram's samples (`_bucket` per bound and `+Inf`, `_sum`, `_count`).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0u64;
        let counts: Vec<u64> = h.buckets.iter().map(|b| b.load(Relaxed)).collect();
        for (i, n) in counts.iter().enumerate() {
            cumulative += n;
            let le = match h.bounds.get(i) {
                Some(b) => format_value(*b as f64 * h.scale),
                None => "+Inf".to_string(),
            };
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let _ = write!(self.out, "{name}_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", format_value(h.sum.load(Relaxed) as f64 * h.scale));
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {cumulative}");
    }

    /// The text written so far.
    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

/// A sample value as Prometheus reads it: integers without a fraction, others in Rust's
/// shortest round-tripping form.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// This process's resident memory and open and allowed file descriptors, from `/proc/self`
/// (Linux; `None` where it cannot be read).
pub fn process_stats() -> (Option<u64>, Option<u64>, Option<u64>) {
    let rss = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    let fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
    let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    });
    (rss, fds, max_fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let h = Histogram::durations();
        h.observe_duration(Duration::from_micros(30));
        h.observe_duration(Duration::from_micros(700));
        h.observe_duration(Duration::from_secs(20));
        let mut out = Exposition::default();
        out.family("x_seconds", "histogram", "x");
        out.histogram("x_seconds", &[("shard", "1")], &h);
        let text = out.finish();
        assert!(text.contains("x_seconds_bucket{shard=\"1\",le=\"0.00005\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{shard=\"1\",le=\"0.001\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{shard=\"1\",le=\"10\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{shard=\"1\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_count{shard=\"1\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_sum{shard=\"1\"} 20.00073\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition::default();
        out.sample("m", &[("a", "x\"y\\z\nw")], 1.5);
        assert_eq!(out.finish(), "m{a=\"x\\\"y\\\\z\\nw\"} 1.5\n");
    }

    #[test]
    fn requests_count_by_outcome_and_forwards_by_hop() {
        let m = NodeMetrics::new(Arc::new(Histogram::durations()));
        let put = m.op("client", "put");
        put.record(Instant::now(), Ok(()));
        put.record(Instant::now(), Err("not_leader"));
        m.op("client", "cluster status").record(Instant::now(), Ok(()));
        m.forwarded(1);
        m.forwarded(9);
        let _open = m.connection("peer");
        m.auth_refused("expired");
        let mut out = Exposition::default();
        m.render(&mut out);
        let text = out.finish();
        for line in [
            "aspen_requests_total{alpn=\"client\",op=\"put\",outcome=\"ok\"} 1",
            "aspen_requests_total{alpn=\"client\",op=\"put\",outcome=\"not_leader\"} 1",
            "aspen_requests_total{alpn=\"client\",op=\"cluster_status\",outcome=\"ok\"} 1",
            "aspen_request_duration_seconds_count{alpn=\"client\",op=\"put\"} 2",
            "aspen_forwarded_requests_received_total{hops=\"1\"} 1",
            "aspen_forwarded_requests_received_total{hops=\"4+\"} 1",
            "aspen_connections_open{alpn=\"peer\"} 1",
            "aspen_auth_refusals_total{reason=\"expired\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        drop(_open);
        let mut out = Exposition::default();
        m.render(&mut out);
        assert!(out.finish().lines().any(|l| l == "aspen_connections_open{alpn=\"peer\"} 0"));
    }
}
