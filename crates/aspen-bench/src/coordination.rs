//! Benchmarks of what coordination workloads use (docs/design.md §16–17), Aspen only:
//!
//! - [`keepalive`]: closed-loop lease keep-alives (`aspen-cli bench --op keepalive`): how many
//!   renewals per second the cluster acknowledges (each a ReadIndex round on the lease's home
//!   shard's leader, no log entry);
//! - [`watch`]: `watchers` watches on one prefix while puts arrive at a fixed rate
//!   (`aspen-cli bench --op watch --watchers N --rate R`): the delay from a put's send to each
//!   watcher's receipt of its event (the put carries its send time), and whether every watcher
//!   got every event.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aspen::{
    api::{WatchRequest, WatchStart},
    client::WatchItem,
};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{AspenBackend, BenchBackend, BenchError};

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// What [`keepalive`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct KeepAliveReport {
    pub clients: usize,
    pub leases: usize,
    pub ops: u64,
    pub errors: u64,
    pub elapsed_secs: f64,
    pub ops_per_sec: f64,
    pub latency: Latency,
}

impl KeepAliveReport {
    pub fn to_text(&self) -> String {
        let l = &self.latency;
        format!(
            "op:          keepalive ({} leases)\nclients:     {}\nops:         {} ({} ok, {} errors)\nelapsed:     {:.2} s\nthroughput:  {:.0} ops/s\nlatency ms:  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
            self.leases,
            self.clients,
            self.ops,
            self.ops - self.errors,
            self.errors,
            self.elapsed_secs,
            self.ops_per_sec,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms
        )
    }
}

/// Grants `leases` leases (TTL `ttl_secs`, `clients` grants at a time), then `clients` clients
/// renew them back to back (client i renews lease i, i + clients, …) for `duration`; the
/// leases are revoked after if `revoke`.
pub async fn keepalive(
    backend: &AspenBackend,
    clients: usize,
    leases: usize,
    ttl_secs: u64,
    duration: Duration,
    revoke: bool,
) -> Result<KeepAliveReport, BenchError> {
    let mut conns = Vec::with_capacity(clients);
    for index in 0..clients {
        let c = backend.connect(index).await.map_err(|e| BenchError::Connect { index, message: e.to_string() })?;
        conns.push(Arc::new(c));
    }
    let grants = (0..clients).map(|c| {
        let conn = conns[c].clone();
        async move {
            let mut mine = Vec::new();
            for _ in (c..leases.max(1)).step_by(clients) {
                mine.push(conn.grant_lease(ttl_secs).await.map(|(id, _)| id)?);
            }
            Ok::<_, aspen::ClientError>(mine)
        }
    });
    let mut ids = Vec::with_capacity(leases);
    for granted in futures::future::join_all(grants).await {
        ids.extend(granted.map_err(|e| BenchError::Prefill {
            done: 0,
            total: leases as u64,
            message: format!("granting a lease: {e}"),
        })?);
    }
    let ids = Arc::new(ids);
    let start = Instant::now();
    let deadline = start + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = conns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (c, ids, errors) = (c.clone(), ids.clone(), errors.clone());
            tokio::spawn(async move {
                let mut h = histogram();
                let mut n = i;
                while Instant::now() < deadline {
                    let id = ids[n % ids.len()];
                    n += clients;
                    let t = Instant::now();
                    match c.keep_alive_once(id).await {
                        Ok(_) => h.saturating_record(t.elapsed().as_micros() as u64),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                h
            })
        })
        .collect();
    let mut all = histogram();
    for t in tasks {
        let h = t.await.map_err(|e| BenchError::Task(e.to_string()))?;
        all.add(&h).map_err(|e| BenchError::Task(e.to_string()))?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    if revoke {
        for id in ids.iter() {
            let _ = conns[0].revoke_lease(*id).await;
        }
    }
    for c in conns {
        if let Some(c) = Arc::into_inner(c) {
            c.close().await;
        }
    }
    backend.finish().await;
    let errors = errors.load(Ordering::Relaxed);
    let ok = all.len();
    Ok(KeepAliveReport {
        clients,
        leases: ids.len(),
        ops: ok + errors,
        errors,
        elapsed_secs: elapsed,
        ops_per_sec: ok as f64 / elapsed.max(1e-9),
        latency: Latency::of(&all),
    })
}

/// What [`watch`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct WatchReport {
    pub watchers: usize,
    pub rate: f64,
    pub puts: u64,
    pub put_errors: u64,
    pub elapsed_secs: f64,
    pub puts_per_sec: f64,
    /// Events every watcher should have got (`puts × watchers`) and those that arrived.
    pub events_expected: u64,
    pub events_received: u64,
    /// From a put's send to a watcher's receipt of its event.
    pub delivery: Latency,
}

impl WatchReport {
    pub fn to_text(&self) -> String {
        let l = &self.delivery;
        format!(
            "op:          watch ({} watchers, puts paced at {:.0}/s)\nputs:        {} ({} errors) in {:.2} s = {:.0}/s\nevents:      {} of {} delivered\ndelivery ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
            self.watchers,
            self.rate,
            self.puts,
            self.put_errors,
            self.elapsed_secs,
            self.puts_per_sec,
            self.events_received,
            self.events_expected,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms
        )
    }
}

/// Opens `watchers` watches of `prefix` (spread over the members), then puts keys under it at
/// `rate` per second (paced over `clients` clients, each put's value starting with its send
/// time) for `duration`, and measures each event's delivery.
pub async fn watch(
    backend: &AspenBackend,
    watchers: usize,
    clients: usize,
    rate: f64,
    duration: Duration,
    value_size: usize,
    prefix: &str,
) -> Result<WatchReport, BenchError> {
    let epoch = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut streams = Vec::with_capacity(watchers);
    let mut watch_clients = Vec::with_capacity(watchers);
    for index in 0..watchers {
        let c =
            Arc::new(backend.connect(index).await.map_err(|e| BenchError::Connect { index, message: e.to_string() })?);
        let request =
            WatchRequest { key: prefix.as_bytes().to_vec(), prefix: true, prev_kv: false, start: WatchStart::Now };
        let mut stream = c.watch(request).await.map_err(|e| BenchError::Connect { index, message: e.to_string() })?;
        let (received, mut stopped) = (received.clone(), stopped.clone());
        streams.push(tokio::spawn(async move {
            let mut h = histogram();
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = stopped.changed() => break,
                };
                let Some(Ok(WatchItem::Events(events))) = item else {
                    if matches!(item, None | Some(Err(_))) {
                        break;
                    }
                    continue;
                };
                let now = epoch.elapsed().as_micros() as u64;
                for e in events {
                    if let Some(sent) = e.value.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) {
                        h.saturating_record(now.saturating_sub(sent).max(1));
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            h
        }));
        watch_clients.push(c);
    }
    let mut writers = Vec::with_capacity(clients);
    for index in 0..clients {
        let c = backend
            .connect(watchers + index)
            .await
            .map_err(|e| BenchError::Connect { index, message: e.to_string() })?;
        writers.push(Arc::new(c));
    }
    let interval = Duration::from_secs_f64(clients as f64 / rate);
    let start = Instant::now();
    let deadline = start + duration;
    let put_errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = writers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (c, put_errors, prefix) = (c.clone(), put_errors.clone(), prefix.to_string());
            tokio::spawn(async move {
                let mut puts = 0u64;
                let mut next = start + interval.mul_f64(i as f64 / clients as f64);
                while next < deadline {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                    let mut value = (epoch.elapsed().as_micros() as u64).to_be_bytes().to_vec();
                    value.resize(value_size.max(8), b'v');
                    let key = format!("{prefix}{:08}", (puts * clients as u64 + i as u64) % 10_000);
                    match c.put(key, value).await {
                        Ok(_) => puts += 1,
                        Err(_) => {
                            put_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                puts
            })
        })
        .collect();
    let mut puts = 0;
    for t in tasks {
        puts += t.await.map_err(|e| BenchError::Task(e.to_string()))?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let the last events arrive (bounded), then stop the watches.
    let expected = puts * watchers as u64;
    let settle = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in writers {
        if let Some(c) = Arc::into_inner(c) {
            c.close().await;
        }
    }
    let _ = stop.send(true);
    let mut all = histogram();
    for s in streams {
        // Each task drops its stream (ending the watch) as it returns.
        let h = s.await.map_err(|e| BenchError::Task(e.to_string()))?;
        all.add(&h).map_err(|e| BenchError::Task(e.to_string()))?;
    }
    for c in watch_clients {
        if let Some(c) = Arc::into_inner(c) {
            c.close().await;
        }
    }
    backend.finish().await;
    Ok(WatchReport {
        watchers,
        rate,
        puts,
        put_errors: put_errors.load(Ordering::Relaxed),
        elapsed_secs: elapsed,
        puts_per_sec: puts as f64 / elapsed.max(1e-9),
        events_expected: expected,
        events_received: received.load(Ordering::Relaxed),
        delivery: Latency::of(&all),
    })
}
