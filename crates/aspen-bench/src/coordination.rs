//! Benchmarks of what coordination workloads use (docs/design.md §16–17), Aspen only:
//!
//! - [`keepalive`]: closed-loop lease keep-alives (`aspen-cli bench --op keepalive`): how many
//!   renewals per second the cluster acknowledges (each a ReadIndex round on the lease's home
//!   shard's leader, no log entry);
//! - [`watch`]: `watchers` watches on one prefix while puts arrive at a fixed rate
//!   (`aspen-cli bench --op watch --watchers N --rate R`, and `aspen-compare --watch` for etcd
//!   beside Aspen, through [`WatchBackend`]): the delay from a put's send and from its
//!   acknowledgement to each watcher's receipt of its event, and whether every watcher got
//!   every event.

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

use crate::{AspenBackend, BenchBackend, BenchClient, BenchError, OpError};

/// A store whose clients can watch a prefix: what [`watch`] needs beyond puts (Aspen here,
/// etcd in the comparison tool, so both are measured by the same code).
pub trait WatchBackend: BenchBackend {
    /// One open watch.
    type Watch: Send + 'static;
    /// Opens a watch of every key under `prefix` from now on, on `client`'s connection (a
    /// stream of its own, beside the client's other watches).
    fn open_watch(
        &self,
        client: &Arc<Self::Client>,
        prefix: &[u8],
    ) -> impl std::future::Future<Output = Result<Self::Watch, OpError>> + Send;
    /// The values of the watch's next events (an empty list for a message without events);
    /// `None` once it ended.
    fn next_values(
        watch: &mut Self::Watch,
    ) -> impl std::future::Future<Output = Option<Result<Vec<Vec<u8>>, OpError>>> + Send;
}

impl WatchBackend for AspenBackend {
    type Watch = aspen::client::WatchStream;

    async fn open_watch(&self, client: &Arc<aspen::AspenClient>, prefix: &[u8]) -> Result<Self::Watch, OpError> {
        let request = WatchRequest { key: prefix.to_vec(), prefix: true, prev_kv: false, start: WatchStart::Now };
        Ok(client.watch(request).await?)
    }

    async fn next_values(watch: &mut Self::Watch) -> Option<Result<Vec<Vec<u8>>, OpError>> {
        match watch.next().await? {
            Ok(WatchItem::Events(events)) => Some(Ok(events.into_iter().map(|e| e.value).collect())),
            Ok(WatchItem::Created(_)) => Some(Ok(Vec::new())),
            Err(e) => Some(Err(e.into())),
        }
    }
}

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
    /// Connections the watches share (watch i on connection i % conns).
    pub conns: usize,
    pub rate: f64,
    pub puts: u64,
    pub put_errors: u64,
    pub elapsed_secs: f64,
    pub puts_per_sec: f64,
    /// From a put's send to its acknowledgement.
    pub put_latency: Latency,
    /// Events every watcher should have got (`puts × watchers`) and those that arrived.
    pub events_expected: u64,
    pub events_received: u64,
    /// From a put's send to a watcher's receipt of its event (the put's commit included).
    pub delivery: Latency,
    /// From the put's acknowledgement to the receipt (as etcd's `benchmark watch-latency`
    /// counts; an event that came before the acknowledgement counts as 1 µs).
    pub delivery_after_ack: Latency,
}

impl WatchReport {
    pub fn to_text(&self) -> String {
        let (p, l, a) = (&self.put_latency, &self.delivery, &self.delivery_after_ack);
        format!(
            "op:          watch ({} watchers on {} connections, puts paced at {:.0}/s)\nputs:        {} ({} errors) in {:.2} s = {:.0}/s\nput ms:      p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\nevents:      {} of {} delivered\ndelivery ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}   (from the put's send)\nafter ack:   p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}   (from the put's acknowledgement)\n",
            self.watchers,
            self.conns,
            self.rate,
            self.puts,
            self.put_errors,
            self.elapsed_secs,
            self.puts_per_sec,
            p.p50_ms,
            p.p90_ms,
            p.p99_ms,
            p.p999_ms,
            p.max_ms,
            self.events_received,
            self.events_expected,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            a.p50_ms,
            a.p90_ms,
            a.p99_ms,
            a.p999_ms,
            a.max_ms
        )
    }
}

/// Opens `watchers` watches of `prefix` over `conns` connections (spread over the members;
/// watch i on connection i % conns, each watch a stream of its own, as etcd's `benchmark
/// watch-latency` opens its watchers over `--conns` connections), then puts keys under it at
/// `rate` per second (paced over `clients` clients, each put's value starting with its send
/// time) for `duration`, and measures each event's delivery.
#[allow(clippy::too_many_arguments)]
pub async fn watch<B: WatchBackend>(
    backend: &B,
    watchers: usize,
    conns: usize,
    clients: usize,
    rate: f64,
    duration: Duration,
    value_size: usize,
    prefix: &str,
) -> Result<WatchReport, BenchError> {
    let epoch = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    // When each put was acknowledged (µs after `epoch`, 0: not yet), by its sequence number.
    let slots = (rate * duration.as_secs_f64()) as usize + clients + 16;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..slots).map(|_| AtomicU64::new(0)).collect());
    let sequence = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut streams = Vec::with_capacity(watchers);
    let conns = conns.clamp(1, watchers.max(1));
    let mut watch_clients = Vec::with_capacity(conns);
    for index in 0..conns.min(watchers) {
        let c = backend.connect(index).await.map_err(|e| BenchError::Connect { index, message: e.to_string() })?;
        watch_clients.push(Arc::new(c));
    }
    for index in 0..watchers {
        let c = &watch_clients[index % conns];
        let mut stream = backend
            .open_watch(c, prefix.as_bytes())
            .await
            .map_err(|e| BenchError::Connect { index, message: e.to_string() })?;
        let (received, mut stopped) = (received.clone(), stopped.clone());
        streams.push(tokio::spawn(async move {
            let mut from_send = histogram();
            // (put sequence number, µs after `epoch` the event arrived)
            let mut arrivals: Vec<(u64, u64)> = Vec::new();
            loop {
                let item = tokio::select! {
                    item = B::next_values(&mut stream) => item,
                    _ = stopped.changed() => break,
                };
                let Some(Ok(values)) = item else { break };
                let now = epoch.elapsed().as_micros() as u64;
                for value in values {
                    let word = |i: usize| value.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
                    if let (Some(sent), Some(seq)) = (word(0), word(8)) {
                        from_send.saturating_record(now.saturating_sub(sent).max(1));
                        arrivals.push((seq, now));
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (from_send, arrivals)
        }));
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
            let (acked, sequence) = (acked.clone(), sequence.clone());
            tokio::spawn(async move {
                let mut puts = 0u64;
                let mut latency = histogram();
                let mut next = start + interval.mul_f64(i as f64 / clients as f64);
                while next < deadline {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                    let seq = sequence.fetch_add(1, Ordering::Relaxed);
                    let sent = epoch.elapsed().as_micros() as u64;
                    let mut value = sent.to_be_bytes().to_vec();
                    value.extend_from_slice(&seq.to_be_bytes());
                    value.resize(value_size.max(16), b'v');
                    let key = format!("{prefix}{:08}", (puts * clients as u64 + i as u64) % 10_000);
                    match c.put(key.into_bytes(), value).await {
                        Ok(_) => {
                            puts += 1;
                            let ack = epoch.elapsed().as_micros() as u64;
                            latency.saturating_record(ack.saturating_sub(sent).max(1));
                            if let Some(slot) = acked.get(seq as usize) {
                                slot.store(ack, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            put_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                (puts, latency)
            })
        })
        .collect();
    let mut puts = 0;
    let mut put_latency = histogram();
    for t in tasks {
        let (n, h) = t.await.map_err(|e| BenchError::Task(e.to_string()))?;
        puts += n;
        put_latency.add(&h).map_err(|e| BenchError::Task(e.to_string()))?;
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
    let mut all_from_ack = histogram();
    for s in streams {
        // Each task drops its stream (ending the watch) as it returns.
        let (h, arrivals) = s.await.map_err(|e| BenchError::Task(e.to_string()))?;
        all.add(&h).map_err(|e| BenchError::Task(e.to_string()))?;
        for (seq, at) in arrivals {
            // As etcd's `benchmark watch-latency` counts: from the put's acknowledgement (an
            // event that came first: 1 µs).
            match acked.get(seq as usize).map(|a| a.load(Ordering::Relaxed)) {
                Some(ack) if ack > 0 => all_from_ack.saturating_record(at.saturating_sub(ack).max(1)),
                _ => {}
            }
        }
    }
    for c in watch_clients {
        if let Some(c) = Arc::into_inner(c) {
            c.close().await;
        }
    }
    backend.finish().await;
    Ok(WatchReport {
        watchers,
        conns,
        rate,
        puts,
        put_errors: put_errors.load(Ordering::Relaxed),
        elapsed_secs: elapsed,
        puts_per_sec: puts as f64 / elapsed.max(1e-9),
        put_latency: Latency::of(&put_latency),
        events_expected: expected,
        events_received: received.load(Ordering::Relaxed),
        delivery: Latency::of(&all),
        delivery_after_ack: Latency::of(&all_from_ack),
    })
}
