//! `aspen-compare --watch`: watch fan-out, etcd and Aspen measured by the same code
//! ([`aspen_bench::coordination::watch`]). For each system and round: a fresh cluster, the same
//! paced puts with no watch (the baseline), then with `--watchers` watches of one prefix over
//! `--watch-conns` connections (each watch a stream of its own, as etcd's `benchmark
//! watch-latency` opens them). Reports the server CPU per put with and without watchers, and
//! each event's delivery delay from the put's acknowledgement (etcd's definition) and from its
//! send.

use std::{path::Path, time::Duration};

use aspen_bench::{
    coordination::{self, WatchBackend, WatchReport},
    AspenBackend, OpError,
};
use etcd_client::WatchOptions;

use crate::{
    aspen_cluster::AspenCluster,
    cpu::CpuMeter,
    etcd::{EtcdBackend, EtcdClient, EtcdCluster},
};

impl WatchBackend for EtcdBackend {
    type Watch = etcd_client::WatchStream;

    async fn open_watch(&self, client: &std::sync::Arc<EtcdClient>, prefix: &[u8]) -> Result<Self::Watch, OpError> {
        let mut watch = client.client.watch_client();
        Ok(watch.watch(prefix.to_vec(), Some(WatchOptions::new().with_prefix())).await?)
    }

    async fn next_values(watch: &mut Self::Watch) -> Option<Result<Vec<Vec<u8>>, OpError>> {
        match watch.message().await {
            Ok(Some(resp)) if resp.canceled() => {
                Some(Err(format!("etcd cancelled the watch: {}", resp.cancel_reason()).into()))
            }
            Ok(Some(resp)) => {
                Some(Ok(resp.events().iter().filter_map(|e| e.kv().map(|kv| kv.value().to_vec())).collect()))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        }
    }
}

/// What a watch comparison runs.
pub struct WatchPlan {
    pub watchers: usize,
    pub conns: usize,
    pub put_clients: usize,
    pub rate: f64,
    pub duration: Duration,
    pub value_size: usize,
    pub rounds: usize,
    pub members: usize,
    pub timeout: Duration,
}

/// One measured run.
struct WatchRow {
    system: &'static str,
    round: usize,
    watchers: usize,
    report: WatchReport,
    cpu_us_per_put: Option<f64>,
}

/// Runs the comparison and prints a markdown table per round and the ratios; `Err` if a
/// system did not start or a run failed.
pub async fn run(plan: &WatchPlan, etcd: Option<&Path>, node: Option<&Path>) -> Result<(), String> {
    let mut rows: Vec<WatchRow> = Vec::new();
    for round in 1..=plan.rounds {
        if let Some(etcd) = etcd {
            eprintln!("aspen-compare: round {round}: starting {} etcd members", plan.members);
            let cluster = EtcdCluster::start(etcd, plan.members, None).await?;
            let meter = cluster.cpu_meter()?;
            let backend = EtcdBackend::new(cluster.endpoints.clone(), plan.timeout);
            measure_pair("etcd", round, &backend, &meter, plan, &mut rows).await?;
        }
        if let Some(node) = node {
            eprintln!("aspen-compare: round {round}: starting {} aspen-node processes", plan.members);
            let cluster = AspenCluster::start(node, plan.members, 1, None).await?;
            let meter = cluster.cpu_meter()?;
            let backend = AspenBackend::new(cluster.tickets.clone(), plan.timeout)
                .map_err(|e| e.to_string())?
                .with_token(Some(cluster.token.clone()));
            measure_pair("aspen", round, &backend, &meter, plan, &mut rows).await?;
        }
    }
    println!("{}", table(&rows, plan));
    Ok(())
}

/// The baseline (no watch) and the watched run on one cluster; odd rounds run the baseline
/// first, even rounds second (a fresh cluster's first run may pay for warming up).
async fn measure_pair<B: WatchBackend>(
    system: &'static str,
    round: usize,
    backend: &B,
    meter: &CpuMeter,
    plan: &WatchPlan,
    rows: &mut Vec<WatchRow>,
) -> Result<(), String> {
    let order = if round % 2 == 1 { [0, plan.watchers] } else { [plan.watchers, 0] };
    for watchers in order {
        let before = meter.sample().map_err(|e| e.to_string())?;
        let report = coordination::watch(
            backend,
            watchers,
            plan.conns,
            plan.put_clients,
            plan.rate,
            plan.duration,
            plan.value_size,
            "compare/watch/",
        )
        .await
        .map_err(|e| format!("{system}, {watchers} watchers: {e}"))?;
        let after = meter.sample().map_err(|e| e.to_string())?;
        let cpu_us_per_put = crate::cpu::cpu_us_per_op(before, after, report.puts);
        let d = &report.delivery_after_ack;
        eprintln!(
            "aspen-compare: {system:<6} {watchers:>4} watchers: {:>5.0} puts/s, {} of {} events, after ack p50 {:.2} ms \
             p99 {:.2} ms, cpu {} µs/put",
            report.puts_per_sec,
            report.events_received,
            report.events_expected,
            d.p50_ms,
            d.p99_ms,
            cpu_us_per_put.map(|c| format!("{c:.0}")).unwrap_or_else(|| "?".into())
        );
        rows.push(WatchRow { system, round, watchers, report, cpu_us_per_put });
    }
    Ok(())
}

fn table(rows: &[WatchRow], plan: &WatchPlan) -> String {
    let mut out = format!(
        "{} watchers of one prefix over {} connection(s), puts paced at {:.0}/s by {} clients, {}-byte values, \
         {:.0} s per run\n\n| system | round | watchers | puts/s | put p99 ms | events delivered | delivery after ack \
         p50 / p99 ms | from send p50 / p99 ms | server CPU µs/put | ÷ no watchers |\n|---|---|---|---|---|---|---|---|---|---|\n",
        plan.watchers,
        plan.conns,
        plan.rate,
        plan.put_clients,
        plan.value_size,
        plan.duration.as_secs_f64()
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.system == r.system && b.round == r.round && b.watchers == 0)
            .and_then(|b| b.cpu_us_per_put);
        let ratio = match (r.watchers, r.cpu_us_per_put, base) {
            (0, _, _) => "—".to_string(),
            (_, Some(c), Some(b)) if b > 0.0 => format!("{:.2}", c / b),
            _ => "?".to_string(),
        };
        let (a, s, p) = (&r.report.delivery_after_ack, &r.report.delivery, &r.report.put_latency);
        let delivery = |l: &coordination::Latency| {
            if r.watchers == 0 {
                "—".to_string()
            } else {
                format!("{:.2} / {:.2}", l.p50_ms, l.p99_ms)
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.2} | {} of {} | {} | {} | {} | {} |\n",
            r.system,
            r.round,
            r.watchers,
            r.report.puts_per_sec,
            p.p99_ms,
            r.report.events_received,
            r.report.events_expected,
            delivery(a),
            delivery(s),
            r.cpu_us_per_put.map(|c| format!("{c:.0}")).unwrap_or_else(|| "?".into()),
            ratio
        ));
    }
    out
}
