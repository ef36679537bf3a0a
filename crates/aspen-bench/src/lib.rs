//! Closed-loop load generator behind `aspen-cli bench`, written against a small backend
//! abstraction so that the same driver can measure another store (etcd) side by side.
//!
//! Owns: the workload (put / get / mixed over a key space of `bench/NNNNNNNN` keys), the
//! closed loop (each client has one request in flight and sends the next when the answer is
//! back), the phases (concurrent prefill of the key space for reads, warm-up, measurement), the
//! latency histograms (HDR, microseconds, successful requests only) and the [`BenchReport`].
//!
//! A backend plugs in through two traits: [`BenchBackend`] makes the `i`-th client connection
//! ([`BenchBackend::connect`]), and each connection ([`BenchClient`]) can `put` and `get`.
//! [`AspenBackend`] is the Aspen one: one [`AspenClient`] (own QUIC connection, on one shared endpoint)
//! per client, client `i` dialling ticket `i % tickets` first.
//!
//! Errors of single requests are counted and sampled in the report, never fatal; whether a run
//! in which every request failed is a failure is the caller's decision ([`BenchReport::all_failed`]).
//! Only a failure to connect, to pre-populate the key space, or an invalid configuration ends
//! [`run`] with an error.
//!
//! Never: print (progress goes to a caller-supplied callback, the report is returned), or make
//! timing claims of its own.

pub mod coordination;

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use aspen::{
    api::{BatchOp, NodeTicket, ReadConsistency},
    client::{AspenClient, ClientEndpoint},
};

/// The error of one request, as a backend reports it (only its message is kept).
pub type OpError = Box<dyn std::error::Error + Send + Sync>;

/// One client connection of a store under test: it can put and get single keys. Every client
/// has at most one request in flight during measurement; the prefill may share one client
/// between several concurrent tasks, so implementations must allow concurrent calls.
pub trait BenchClient: Send + Sync + 'static {
    /// Sets `key` to `value`, durably as the store defines it; returns once acknowledged.
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> impl Future<Output = Result<(), OpError>> + Send;
    /// Reads `key` with the given consistency (`Stale`: the store's serializable / local read).
    /// Returns whether the key exists.
    fn get(&self, key: Vec<u8>, consistency: ReadConsistency) -> impl Future<Output = Result<bool, OpError>> + Send;
    /// Writes several keys; used only by the prefill, so it need not be atomic. The default
    /// puts them one after another; a store with batches or transactions should use them.
    fn put_many(&self, kvs: Vec<(Vec<u8>, Vec<u8>)>) -> impl Future<Output = Result<(), OpError>> + Send {
        async move {
            for (key, value) in kvs {
                self.put(key, value).await?;
            }
            Ok(())
        }
    }
    /// Closes the connection at the end of a run.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// A store under test: makes client connections.
pub trait BenchBackend: Send + Sync {
    type Client: BenchClient;
    /// Short name for the report (`"aspen"`, `"etcd"`).
    fn name(&self) -> String;
    /// Opens the `index`-th client's connection (0-based; backends spread clients over their
    /// endpoints by it).
    fn connect(&self, index: usize) -> impl Future<Output = Result<Self::Client, OpError>> + Send;
    /// Releases what the clients shared, after every client is closed (default: nothing).
    fn finish(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Aspen as a [`BenchBackend`]: one [`AspenClient`] per bench client, each with its own QUIC
/// connection, all on one shared [`ClientEndpoint`] (as etcd's clients in one process each
/// have their own TCP connection but share the process's network stack).
#[derive(Clone, Debug)]
pub struct AspenBackend {
    tickets: Vec<NodeTicket>,
    timeout: Duration,
    /// The endpoint of the current run's clients: bound by the run's first client, closed and
    /// forgotten by [`BenchBackend::finish`] (so the next run on this backend binds a new one).
    /// Runs on one backend (or its clones, which share this slot) must not overlap: the first
    /// to finish would close the other's endpoint.
    endpoint: Arc<tokio::sync::Mutex<Option<ClientEndpoint>>>,
    /// The token every client sends.
    token: Option<String>,
}

impl AspenBackend {
    /// Clients will know all of `tickets` (for failover); client `i` dials `tickets[i % len]`
    /// first. `timeout` bounds each request, retries included.
    pub fn new(tickets: Vec<NodeTicket>, timeout: Duration) -> Result<Self, BenchError> {
        if tickets.is_empty() {
            return Err(BenchError::Config("no node ticket given".into()));
        }
        Ok(AspenBackend { tickets, timeout, endpoint: Default::default(), token: None })
    }

    /// Every client sends `token` (a token with read and write permission on the keys used).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }
}

impl BenchBackend for AspenBackend {
    type Client = AspenClient;

    fn name(&self) -> String {
        "aspen".into()
    }

    async fn connect(&self, index: usize) -> Result<AspenClient, OpError> {
        let n = self.tickets.len();
        let rotated = (0..n).map(|k| self.tickets[(index + k) % n].clone()).collect();
        let endpoint = {
            let mut slot = self.endpoint.lock().await;
            match slot.as_ref() {
                Some(endpoint) => endpoint.clone(),
                None => slot.insert(ClientEndpoint::bind(&self.tickets).await?).clone(),
            }
        };
        let client = AspenClient::on_endpoint(&endpoint, rotated, self.timeout)?;
        Ok(match &self.token {
            Some(t) => client.with_token(t.clone()),
            None => client,
        })
    }

    async fn finish(&self) {
        let endpoint = self.endpoint.lock().await.take();
        if let Some(endpoint) = endpoint {
            endpoint.close().await;
        }
    }
}

impl BenchClient for AspenClient {
    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        AspenClient::put(self, key, value).await?;
        Ok(())
    }

    async fn get(&self, key: Vec<u8>, consistency: ReadConsistency) -> Result<bool, OpError> {
        Ok(self.get_with(key, consistency).await?.is_some())
    }

    /// One atomic batch; if the cluster refuses it (with sharding, a batch must stay within one
    /// shard), every key's put at once (the nodes batch them again per shard).
    async fn put_many(&self, kvs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), OpError> {
        // A batch keeps to one shard: one batch per shard the keys route to.
        let router = self.shard_router().await;
        let mut by_shard: std::collections::BTreeMap<_, Vec<BatchOp>> = Default::default();
        for (key, value) in kvs {
            by_shard.entry(router.shard_for_key(&key)).or_default().push(BatchOp::Put { key, value });
        }
        futures::future::try_join_all(by_shard.into_values().map(|ops| self.batch(ops))).await?;
        Ok(())
    }

    async fn close(self) {
        AspenClient::close(self).await
    }
}

/// What the clients send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Puts only.
    Put,
    /// Gets only (the key space is pre-populated first).
    Get,
    /// Gets with probability `read_ratio`, puts otherwise (pre-populated first).
    Mixed,
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::Mixed => "mixed",
        })
    }
}

/// When the measurement ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stop {
    /// After exactly this many requests (over all clients; warm-up requests not included).
    Requests(u64),
    /// After this long (requests in flight at the end still complete and count).
    Duration(Duration),
}

/// A run's parameters. [`BenchConfig::validate`] says what is accepted.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Concurrent clients, each with its own connection and one request in flight.
    pub clients: usize,
    pub stop: Stop,
    /// Bytes per value written (prefill and puts).
    pub value_size: usize,
    /// Number of distinct keys: `{key_prefix}{n:08}` for n in `0..key_space`.
    pub key_space: u64,
    pub workload: Workload,
    /// Fraction of gets in a [`Workload::Mixed`] run (0..=1); ignored otherwise.
    pub read_ratio: f64,
    pub consistency: ReadConsistency,
    /// Run the workload this long before measuring (not counted).
    pub warmup: Duration,
    /// Keys in order (0, 1, 2, … wrapping at `key_space`) instead of uniformly at random.
    pub sequential_keys: bool,
    pub key_prefix: String,
    /// Concurrent puts of the prefill (at least `clients`).
    pub prefill_concurrency: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            clients: 1,
            stop: Stop::Duration(Duration::from_secs(10)),
            value_size: 256,
            key_space: 10_000,
            workload: Workload::Put,
            read_ratio: 0.5,
            consistency: ReadConsistency::Linearizable,
            warmup: Duration::from_secs(1),
            sequential_keys: false,
            key_prefix: "bench/".into(),
            prefill_concurrency: 32,
        }
    }
}

/// Most clients one run may start (each with a QUIC connection of its own).
pub const MAX_CLIENTS: usize = 10_000;

impl BenchConfig {
    /// Checks the parameters; the message names the flag-like field at fault.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Config(m));
        if self.clients == 0 || self.clients > MAX_CLIENTS {
            return bad(format!("clients must be between 1 and {MAX_CLIENTS} (got {})", self.clients));
        }
        match self.stop {
            Stop::Requests(0) => return bad("requests must be at least 1".into()),
            Stop::Duration(d) if d.is_zero() => return bad("duration must be positive".into()),
            _ => {}
        }
        if self.key_space == 0 {
            return bad("key-space must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.read_ratio) {
            return bad(format!("read-ratio must be between 0 and 1 (got {})", self.read_ratio));
        }
        if self.value_size > 64 * 1024 * 1024 {
            return bad(format!("value-size {} is too large (at most 64 MiB)", self.value_size));
        }
        Ok(())
    }

    /// The probability that a request is a get.
    pub fn read_fraction(&self) -> f64 {
        match self.workload {
            Workload::Put => 0.0,
            Workload::Get => 1.0,
            Workload::Mixed => self.read_ratio,
        }
    }

    /// Whether the key space is pre-populated before the run (whenever there are reads).
    pub fn needs_prefill(&self) -> bool {
        self.read_fraction() > 0.0
    }

    /// The `n`-th key.
    pub fn key(&self, n: u64) -> Vec<u8> {
        format!("{}{n:08}", self.key_prefix).into_bytes()
    }
}

/// Why a run could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid bench configuration: {0}")]
    Config(String),
    #[error("cannot open client {index}: {message}")]
    Connect { index: usize, message: String },
    #[error("cannot pre-populate the key space ({done} of {total} keys written): {message}")]
    Prefill { done: u64, total: u64, message: String },
    #[error("a client task failed: {0}")]
    Task(String),
}

/// The phase a [`Progress`] report belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Warmup,
    Measure,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Prefill => "prefill",
            Phase::Warmup => "warmup",
            Phase::Measure => "measure",
        })
    }
}

/// Once a second during a run.
#[derive(Clone, Debug)]
pub struct Progress {
    pub phase: Phase,
    /// Since the phase began.
    pub elapsed: Duration,
    /// Requests completed in the last interval, per second.
    pub ops_per_sec: f64,
    /// Requests completed in this phase so far (errors included).
    pub ops: u64,
    pub errors: u64,
    /// The number of requests the phase will make, when known.
    pub target: Option<u64>,
}

/// Receives [`Progress`] once a second.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Latency percentiles of successful requests, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: f64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            mean: (h.mean() * 10.0).round() / 10.0,
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Counts and latencies of one kind of request.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OpSummary {
    pub ops: u64,
    pub ok: u64,
    pub errors: u64,
    pub latency_us: LatencySummary,
}

/// One distinct error message and how often it occurred.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorSample {
    pub message: String,
    pub count: u64,
}

/// The result of a run (its JSON form is what `aspen-cli bench --json` prints).
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub op: Workload,
    pub clients: usize,
    /// Fraction of gets requested (0 for put, 1 for get).
    pub read_ratio: f64,
    pub consistency: &'static str,
    pub value_size: usize,
    pub key_space: u64,
    pub sequential_keys: bool,
    pub warmup_secs: f64,
    /// The requested number of requests (`--requests`), if the run was bounded by count.
    pub requests: Option<u64>,
    /// The requested duration (`--duration`), if the run was bounded by time.
    pub duration_secs: Option<f64>,
    /// Keys written before the run (not counted).
    pub prefilled: u64,
    /// Requests completed in the measured interval, errors included.
    pub ops: u64,
    pub ok: u64,
    pub errors: u64,
    /// Gets that found no value (successful, counted in `ok`).
    pub not_found: u64,
    /// From the start of measurement to the end of its last request.
    pub elapsed_secs: f64,
    /// Successful requests per second of `elapsed_secs`.
    pub throughput_ops_per_sec: f64,
    /// All successful requests.
    pub latency_us: LatencySummary,
    /// Per kind of request (`put`, `get`), for the kinds the workload sends.
    pub by_op: BTreeMap<String, OpSummary>,
    /// The most frequent error messages (at most 5).
    pub error_samples: Vec<ErrorSample>,
}

impl BenchReport {
    /// Whether the run produced no successful request at all.
    pub fn all_failed(&self) -> bool {
        self.ok == 0
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"cannot encode report: {e}\"}}"))
    }

    /// A few human-readable lines (what `aspen-cli bench` prints without `--json`).
    pub fn to_text(&self) -> String {
        use fmt::Write;
        let ms = |us: u64| us as f64 / 1000.0;
        let lat = |l: &LatencySummary| {
            format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms",
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max)
            )
        };
        let mut s = String::new();
        let reads = match self.op {
            Workload::Put => String::new(),
            Workload::Get => format!(", {} reads", self.consistency),
            Workload::Mixed => format!(", {:.0}% {} reads", self.read_ratio * 100.0, self.consistency),
        };
        let _ = writeln!(
            s,
            "{} bench: {}{reads}, {} client(s), {}-byte values, {} keys{}",
            self.backend,
            self.op,
            self.clients,
            self.value_size,
            self.key_space,
            if self.prefilled > 0 { format!(" (prefilled {})", self.prefilled) } else { String::new() }
        );
        let _ = writeln!(s, "ops:        {} ({} ok, {} errors)", self.ops, self.ok, self.errors);
        let _ = writeln!(s, "elapsed:    {:.3} s (after {:.1} s warm-up)", self.elapsed_secs, self.warmup_secs);
        let _ = writeln!(s, "throughput: {:.0} ops/s", self.throughput_ops_per_sec);
        let _ = writeln!(s, "latency:    {}", lat(&self.latency_us));
        if self.by_op.len() > 1 {
            for (name, op) in &self.by_op {
                let _ = writeln!(s, "  {name:<4}      {} ok, {} errors; {}", op.ok, op.errors, lat(&op.latency_us));
            }
        }
        if self.not_found > 0 {
            let _ = writeln!(s, "not found:  {}", self.not_found);
        }
        for e in &self.error_samples {
            let _ = writeln!(s, "error ×{}: {}", e.count, e.message);
        }
        s
    }
}

/// Runs the benchmark described by `config` against `backend`: opens the clients, prefills the
/// key space if the workload reads, warms up, measures, closes the clients and reports.
pub async fn run<B: BenchBackend>(
    backend: &B,
    config: &BenchConfig,
    progress: Option<ProgressFn>,
) -> Result<BenchReport, BenchError> {
    config.validate()?;
    let config = Arc::new(config.clone());
    let mut clients = Vec::with_capacity(config.clients);
    let result = match connect_all(backend, config.clients, &mut clients).await {
        Ok(()) => drive(&config, &clients, progress).await,
        Err(e) => Err(e),
    };
    close_all(backend, clients).await;
    let (prefilled, stats) = result?;
    Ok(report(backend.name(), &config, prefilled, stats))
}

/// Closes every client no task holds any more, then what the backend's clients shared.
async fn close_all<B: BenchBackend>(backend: &B, clients: Vec<Arc<B::Client>>) {
    for client in clients {
        if let Some(client) = Arc::into_inner(client) {
            client.close().await;
        }
    }
    backend.finish().await;
}

/// Opens `n` clients into `out`; stops at the first that fails (those opened stay in `out`, to
/// be closed by the caller).
async fn connect_all<B: BenchBackend>(backend: &B, n: usize, out: &mut Vec<Arc<B::Client>>) -> Result<(), BenchError> {
    for index in 0..n {
        let client = backend.connect(index).await.map_err(|e| BenchError::Connect { index, message: e.to_string() })?;
        out.push(Arc::new(client));
    }
    Ok(())
}

/// Counters the progress ticker reads.
#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    errors: AtomicU64,
}

async fn drive<C: BenchClient>(
    config: &Arc<BenchConfig>,
    clients: &[Arc<C>],
    progress: Option<ProgressFn>,
) -> Result<(u64, Measured), BenchError> {
    let prefilled =
        if config.needs_prefill() { prefill(config, clients, 0..config.key_space, progress.clone()).await? } else { 0 };

    let start = Instant::now();
    let measure_from = start + config.warmup;
    let shared = Arc::new(Shared {
        config: config.clone(),
        measure_from,
        deadline: match config.stop {
            Stop::Duration(d) => Some(measure_from + d),
            Stop::Requests(_) => None,
        },
        claimed: AtomicU64::new(0),
        next_key: AtomicU64::new(0),
        warmup: Counters::default(),
        measured: Counters::default(),
    });
    let ticker = progress.map(|report| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
            let mut last = (Instant::now(), 0u64, Phase::Warmup);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let (phase, counters, since) = if now < shared.measure_from {
                    (Phase::Warmup, &shared.warmup, start)
                } else {
                    (Phase::Measure, &shared.measured, shared.measure_from)
                };
                if now.duration_since(since) < Duration::from_millis(100) {
                    continue; // the phase just began: nothing to say yet
                }
                let ops = counters.ops.load(Ordering::Relaxed);
                let base = if phase == last.2 { last.1 } else { 0 };
                let base_time = if phase == last.2 { last.0 } else { since };
                let secs = now.duration_since(base_time).as_secs_f64().max(1e-3);
                report(&Progress {
                    phase,
                    elapsed: now.duration_since(since),
                    ops_per_sec: ops.saturating_sub(base) as f64 / secs,
                    ops,
                    errors: counters.errors.load(Ordering::Relaxed),
                    target: match (phase, shared.config.stop) {
                        (Phase::Measure, Stop::Requests(n)) => Some(n),
                        _ => None,
                    },
                });
                last = (now, ops, phase);
            }
        })
    });

    let tasks: Vec<_> = clients
        .iter()
        .map(|client| {
            let client = client.clone();
            let shared = shared.clone();
            tokio::spawn(async move { client_loop(&*client, &shared).await })
        })
        .collect();
    let mut measured = Measured::new();
    let mut failure = None;
    for task in tasks {
        match task.await {
            Ok(m) => measured.merge(m),
            Err(e) => failure = Some(BenchError::Task(e.to_string())),
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(e) = failure {
        return Err(e);
    }
    measured.start = measure_from;
    Ok((prefilled, measured))
}

/// Keys per prefill write (fewer for large values).
const PREFILL_CHUNK_KEYS: u64 = 100;
/// Value bytes per prefill write.
const PREFILL_CHUNK_BYTES: u64 = 256 * 1024;

/// Writes the keys numbered `keys` once each (the keys of `config`: its prefix, its value size),
/// in chunks as the prefill does, over `config.clients` clients with `prefill_concurrency`
/// chunks in flight; returns how many it wrote. For loading data without measuring requests
/// (`aspen-compare --grow`).
pub async fn fill<B: BenchBackend>(
    backend: &B,
    config: &BenchConfig,
    keys: std::ops::Range<u64>,
    progress: Option<ProgressFn>,
) -> Result<u64, BenchError> {
    config.validate()?;
    let config = Arc::new(config.clone());
    let mut clients = Vec::with_capacity(config.clients);
    let result = match connect_all(backend, config.clients, &mut clients).await {
        Ok(()) => prefill(&config, &clients, keys, progress).await,
        Err(e) => Err(e),
    };
    close_all(backend, clients).await;
    result
}

/// Writes every key numbered in `keys` once, in chunks ([`BenchClient::put_many`]), with
/// `prefill_concurrency` chunks in flight spread over the clients. Stops at the first error.
async fn prefill<C: BenchClient>(
    config: &Arc<BenchConfig>,
    clients: &[Arc<C>],
    keys: std::ops::Range<u64>,
    progress: Option<ProgressFn>,
) -> Result<u64, BenchError> {
    let (base, total) = (keys.start, keys.end.saturating_sub(keys.start));
    let next = Arc::new(AtomicU64::new(0));
    let counters = Arc::new(Counters::default());
    let failed = Arc::new(AtomicBool::new(false));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let value = Arc::new(value_bytes(config.value_size, 0));
    let start = Instant::now();
    let ticker = progress.map(|report| {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
            let mut last = (Instant::now(), 0u64);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let ops = counters.ops.load(Ordering::Relaxed);
                report(&Progress {
                    phase: Phase::Prefill,
                    elapsed: now.duration_since(start),
                    ops_per_sec: ops.saturating_sub(last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3),
                    ops,
                    errors: counters.errors.load(Ordering::Relaxed),
                    target: Some(total),
                });
                last = (now, ops);
            }
        })
    });
    let workers = config.prefill_concurrency.max(config.clients);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let client = clients[w % clients.len()].clone();
            let (next, counters, failed, first_error, value, config) =
                (next.clone(), counters.clone(), failed.clone(), first_error.clone(), value.clone(), config.clone());
            tokio::spawn(async move {
                let chunk = (PREFILL_CHUNK_BYTES / (config.value_size as u64 + 16)).clamp(1, PREFILL_CHUNK_KEYS);
                while !failed.load(Ordering::Relaxed) {
                    let first = next.fetch_add(chunk, Ordering::Relaxed);
                    if first >= total {
                        break;
                    }
                    let keys = base + first..base + (first + chunk).min(total);
                    let len = keys.end - keys.start;
                    let kvs = keys.map(|n| (config.key(n), value.to_vec())).collect();
                    match client.put_many(kvs).await {
                        Ok(()) => {
                            counters.ops.fetch_add(len, Ordering::Relaxed);
                        }
                        Err(e) => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e.to_string());
                        }
                    }
                }
            })
        })
        .collect();
    let mut task_error = None;
    for t in tasks {
        if let Err(e) = t.await {
            task_error = Some(e.to_string());
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    let done = counters.ops.load(Ordering::Relaxed);
    let message = first_error.lock().unwrap_or_else(|p| p.into_inner()).take().or(task_error);
    match message {
        Some(message) => Err(BenchError::Prefill { done, total, message }),
        None => Ok(done),
    }
}

/// What every client task shares.
struct Shared {
    config: Arc<BenchConfig>,
    measure_from: Instant,
    deadline: Option<Instant>,
    /// Measured requests handed out so far (for [`Stop::Requests`]).
    claimed: AtomicU64,
    /// Next key number in sequential mode.
    next_key: AtomicU64,
    warmup: Counters,
    measured: Counters,
}

/// Most distinct error messages one client keeps.
const MAX_ERROR_KINDS: usize = 20;

/// Measurements of one kind of request.
struct OpStats {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
}

impl OpStats {
    fn new() -> Self {
        // 1 µs .. 1 hour at 3 significant digits; larger values saturate at the top.
        let hist = Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).unwrap());
        OpStats { hist, ok: 0, errors: 0 }
    }

    fn merge(&mut self, other: OpStats) {
        self.ok += other.ok;
        self.errors += other.errors;
        // Same bounds everywhere, so adding cannot fail; a failure would only lose samples.
        let _ = self.hist.add(&other.hist);
    }

    fn summary(&self) -> OpSummary {
        OpSummary {
            ops: self.ok + self.errors,
            ok: self.ok,
            errors: self.errors,
            latency_us: LatencySummary::of(&self.hist),
        }
    }
}

/// What the clients measured.
struct Measured {
    puts: OpStats,
    gets: OpStats,
    not_found: u64,
    start: Instant,
    /// End of the last measured request.
    end: Option<Instant>,
    errors: BTreeMap<String, u64>,
}

impl Measured {
    fn new() -> Self {
        Measured {
            puts: OpStats::new(),
            gets: OpStats::new(),
            not_found: 0,
            start: Instant::now(),
            end: None,
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Measured) {
        self.puts.merge(other.puts);
        self.gets.merge(other.gets);
        self.not_found += other.not_found;
        self.end = self.end.max(other.end);
        for (message, count) in other.errors {
            *self.errors.entry(message).or_default() += count;
        }
    }

    fn record_error(&mut self, e: &OpError) {
        let mut message = e.to_string();
        if message.len() > 200 {
            let mut cut = 200;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        if self.errors.len() >= MAX_ERROR_KINDS && !self.errors.contains_key(&message) {
            message = "(other errors)".into();
        }
        *self.errors.entry(message).or_default() += 1;
    }
}

/// A value of `size` printable bytes, varied by `seed`.
fn value_bytes(size: usize, seed: u64) -> Vec<u8> {
    (0..size as u64).map(|i| b'a' + ((i + seed) % 26) as u8).collect()
}

/// One client: requests back to back until the run ends.
async fn client_loop<C: BenchClient>(client: &C, shared: &Shared) -> Measured {
    let config = &shared.config;
    let mut rng = StdRng::from_rng(&mut rand::rng());
    let value = value_bytes(config.value_size, rng.random_range(0..26));
    let read_fraction = config.read_fraction();
    let mut m = Measured::new();
    loop {
        let now = Instant::now();
        let measuring = now >= shared.measure_from;
        if measuring {
            match config.stop {
                Stop::Requests(n) => {
                    if shared.claimed.fetch_add(1, Ordering::Relaxed) >= n {
                        break;
                    }
                }
                Stop::Duration(_) => {
                    if shared.deadline.is_some_and(|d| now >= d) {
                        break;
                    }
                }
            }
        }
        let n = if config.sequential_keys {
            shared.next_key.fetch_add(1, Ordering::Relaxed) % config.key_space
        } else {
            rng.random_range(0..config.key_space)
        };
        let key = config.key(n);
        let is_get = read_fraction >= 1.0 || (read_fraction > 0.0 && rng.random_bool(read_fraction));
        let started = Instant::now();
        let result = if is_get {
            client.get(key, config.consistency).await.map(Some)
        } else {
            client.put(key, value.clone()).await.map(|()| None)
        };
        let ended = Instant::now();
        let counters = if measuring { &shared.measured } else { &shared.warmup };
        counters.ops.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        if !measuring {
            continue;
        }
        m.end = Some(ended);
        let stats = if is_get { &mut m.gets } else { &mut m.puts };
        match result {
            Ok(found) => {
                stats.ok += 1;
                let micros = u64::try_from(ended.duration_since(started).as_micros()).unwrap_or(u64::MAX);
                stats.hist.saturating_record(micros.max(1));
                if found == Some(false) {
                    m.not_found += 1;
                }
            }
            Err(e) => {
                stats.errors += 1;
                m.record_error(&e);
            }
        }
    }
    m
}

fn report(backend: String, config: &BenchConfig, prefilled: u64, m: Measured) -> BenchReport {
    let mut all = OpStats::new();
    let (puts, gets) = (m.puts.summary(), m.gets.summary());
    all.merge(m.puts);
    all.merge(m.gets);
    let elapsed = m.end.map(|e| e.saturating_duration_since(m.start)).unwrap_or_default().as_secs_f64();
    let mut by_op = BTreeMap::new();
    if config.read_fraction() < 1.0 {
        by_op.insert("put".to_string(), puts);
    }
    if config.read_fraction() > 0.0 {
        by_op.insert("get".to_string(), gets);
    }
    let mut samples: Vec<ErrorSample> =
        m.errors.into_iter().map(|(message, count)| ErrorSample { message, count }).collect();
    samples.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.message.cmp(&b.message)));
    samples.truncate(5);
    BenchReport {
        backend,
        op: config.workload,
        clients: config.clients,
        read_ratio: config.read_fraction(),
        consistency: match config.consistency {
            ReadConsistency::Linearizable => "linearizable",
            ReadConsistency::Stale => "stale",
        },
        value_size: config.value_size,
        key_space: config.key_space,
        sequential_keys: config.sequential_keys,
        warmup_secs: config.warmup.as_secs_f64(),
        requests: match config.stop {
            Stop::Requests(n) => Some(n),
            Stop::Duration(_) => None,
        },
        duration_secs: match config.stop {
            Stop::Duration(d) => Some(d.as_secs_f64()),
            Stop::Requests(_) => None,
        },
        prefilled,
        ops: all.ok + all.errors,
        ok: all.ok,
        errors: all.errors,
        not_found: m.not_found,
        elapsed_secs: elapsed,
        throughput_ops_per_sec: if elapsed > 0.0 { all.ok as f64 / elapsed } else { 0.0 },
        latency_us: LatencySummary::of(&all.hist),
        by_op,
        error_samples: samples,
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Mutex};

    use super::*;

    /// An in-memory store; `fail_every` makes every n-th request fail.
    #[derive(Default)]
    struct MemBackend {
        map: Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>,
        fail_every: u64,
        calls: Arc<AtomicU64>,
    }

    struct MemClient {
        map: Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>,
        fail_every: u64,
        calls: Arc<AtomicU64>,
    }

    impl MemClient {
        fn maybe_fail(&self) -> Result<(), OpError> {
            let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
            if self.fail_every > 0 && n % self.fail_every == 0 {
                return Err("injected failure".into());
            }
            Ok(())
        }
    }

    impl BenchClient for MemClient {
        async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
            self.maybe_fail()?;
            tokio::task::yield_now().await;
            self.map.lock().unwrap().insert(key, value);
            Ok(())
        }

        async fn get(&self, key: Vec<u8>, _c: ReadConsistency) -> Result<bool, OpError> {
            self.maybe_fail()?;
            tokio::task::yield_now().await;
            Ok(self.map.lock().unwrap().contains_key(&key))
        }

        async fn close(self) {}
    }

    impl BenchBackend for MemBackend {
        type Client = MemClient;

        fn name(&self) -> String {
            "mem".into()
        }

        async fn connect(&self, _index: usize) -> Result<MemClient, OpError> {
            Ok(MemClient { map: self.map.clone(), fail_every: self.fail_every, calls: self.calls.clone() })
        }
    }

    fn config(workload: Workload, requests: u64) -> BenchConfig {
        BenchConfig {
            clients: 4,
            stop: Stop::Requests(requests),
            workload,
            key_space: 100,
            value_size: 16,
            warmup: Duration::ZERO,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn put_run_counts_exactly_the_requested_ops() {
        let backend = MemBackend::default();
        let mut c = config(Workload::Put, 250);
        c.sequential_keys = true;
        let r = run(&backend, &c, None).await.unwrap();
        assert_eq!((r.ops, r.ok, r.errors, r.prefilled), (250, 250, 0, 0));
        assert_eq!(r.latency_us.count, 250);
        assert!(r.latency_us.p50 <= r.latency_us.p99 && r.latency_us.p99 <= r.latency_us.max);
        assert_eq!(r.by_op.keys().collect::<Vec<_>>(), vec!["put"]);
        let map = backend.map.lock().unwrap();
        assert_eq!(map.len(), 100, "sequential keys cover the key space");
        assert_eq!(map[&c.key(0)].len(), 16);
        assert!(map.contains_key(b"bench/00000099".as_slice()));
    }

    #[tokio::test]
    async fn get_run_prefills_and_finds_every_key() {
        let backend = MemBackend::default();
        let r = run(&backend, &config(Workload::Get, 300), None).await.unwrap();
        assert_eq!(r.prefilled, 100);
        assert_eq!((r.ops, r.ok, r.not_found), (300, 300, 0));
        assert_eq!(r.by_op["get"].ok, 300);
    }

    #[tokio::test]
    async fn mixed_run_splits_reads_and_writes() {
        let backend = MemBackend::default();
        let mut c = config(Workload::Mixed, 2000);
        c.read_ratio = 0.5;
        let r = run(&backend, &c, None).await.unwrap();
        assert_eq!(r.ops, 2000);
        let (puts, gets) = (r.by_op["put"].ok, r.by_op["get"].ok);
        assert_eq!(puts + gets, 2000);
        assert!(puts > 700 && gets > 700, "about half each: {puts} puts, {gets} gets");
    }

    #[tokio::test]
    async fn errors_are_counted_not_fatal() {
        let backend = MemBackend { fail_every: 10, ..Default::default() };
        let r = run(&backend, &config(Workload::Put, 200), None).await.unwrap();
        assert_eq!(r.ops, 200);
        assert_eq!(r.errors, 20);
        assert_eq!(r.ok, 180);
        assert_eq!(r.error_samples, vec![ErrorSample { message: "injected failure".into(), count: 20 }]);
        assert!(!r.all_failed());
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["errors"], 20);
    }

    #[tokio::test]
    async fn duration_run_with_warmup_reports_progress() {
        let backend = MemBackend::default();
        let mut c = config(Workload::Put, 1);
        c.stop = Stop::Duration(Duration::from_millis(1200));
        c.warmup = Duration::from_millis(300);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let progress: ProgressFn = Arc::new(move |p: &Progress| sink.lock().unwrap().push(p.phase));
        let r = run(&backend, &c, Some(progress)).await.unwrap();
        assert!(r.ops > 0 && r.errors == 0);
        assert!(r.elapsed_secs >= 1.2, "{}", r.elapsed_secs);
        assert!(seen.lock().unwrap().contains(&Phase::Measure));
    }

    #[tokio::test]
    async fn prefill_failure_is_an_error() {
        let backend = MemBackend { fail_every: 1, ..Default::default() };
        let err = run(&backend, &config(Workload::Get, 10), None).await.unwrap_err();
        assert!(matches!(err, BenchError::Prefill { done: 0, total: 100, .. }), "{err}");
    }

    #[test]
    fn invalid_configs_are_refused() {
        for c in [
            BenchConfig { clients: 0, ..Default::default() },
            BenchConfig { stop: Stop::Requests(0), ..Default::default() },
            BenchConfig { key_space: 0, ..Default::default() },
            BenchConfig { read_ratio: 1.5, ..Default::default() },
        ] {
            assert!(matches!(c.validate(), Err(BenchError::Config(_))), "{c:?}");
        }
        assert!(BenchConfig::default().validate().is_ok());
    }
}
