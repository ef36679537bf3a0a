//! `aspen-compare --grow`: the cost curve as the data grows (docs/benchmarks.md, "Data bigger
//! than memory"). Per system — etcd, Aspen with one shard, Aspen with `--shards` shards and
//! balanced leaders — a fresh 3-member cluster is loaded in steps up to each of `--sizes` (MB of
//! live data: keys × (key + value)), the keys written in 100-key batches (Aspen) or transactions
//! (etcd): the load generator's prefill, the same for both. After each step, `--duration`
//! seconds of single-key puts by `--clients` clients over the keys loaded so far (overwrites:
//! the live data stays at the step's size). Reported per step: the load rate, puts/s and p99,
//! each server's peak resident memory since it started (`VmHWM`) and its resident memory now,
//! and each server's data dir size (allocated blocks) over the live data.
//!
//! With `--defrag`: after each load step, before its puts, every member is defragmented (Aspen:
//! `aspen-cli defrag --cluster`; etcd: Defragment, member by member); each server's data dir
//! before and after it and the time it took are reported, and the step's puts run on the
//! defragmented files.
//!
//! Aspen only: after the first step of at least `--catch-up-mb`, one more node joins and catches
//! up — by snapshot, since the leaders purged their logs long before — and the time, the rate
//! (live data / time) and its peak memory are reported. It then stays a member (later steps run
//! with four nodes; the table says so).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aspen_bench::{AspenBackend, BenchBackend, BenchConfig, BenchError, Stop, Workload};

use crate::{
    aspen_cluster::AspenCluster,
    cpu::{self, CpuMeter},
    etcd::{EtcdBackend, EtcdCluster},
};

/// What a `--grow` run does.
pub struct GrowPlan {
    /// Live data after each step, in MB (10^6 bytes), increasing.
    pub sizes_mb: Vec<u64>,
    pub value_size: usize,
    pub clients: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub members: usize,
    pub shards: u32,
    pub timeout: Duration,
    /// Join a node after the first step of at least this many MB (Aspen only).
    pub catch_up_mb: Option<u64>,
    /// etcd's `--quota-backend-bytes`.
    pub etcd_quota: u64,
    /// Measured windows of puts after each step (`--rounds`): the step reports the window with
    /// the median puts/s, and the range over all of them.
    pub windows: usize,
    /// Defragment every member after each load step, before its puts.
    pub defrag: bool,
}

const PREFIX: &str = "grow/";

impl GrowPlan {
    /// Keys holding `mb` MB of live data.
    fn keys_for(&self, mb: u64) -> u64 {
        let per_key = (PREFIX.len() + 8 + self.value_size) as u64;
        (mb * 1_000_000).div_ceil(per_key)
    }

    fn config(&self, key_space: u64) -> BenchConfig {
        BenchConfig {
            clients: self.clients,
            stop: Stop::Duration(self.duration),
            value_size: self.value_size,
            key_space: key_space.max(1),
            workload: Workload::Put,
            warmup: self.warmup,
            key_prefix: PREFIX.into(),
            prefill_concurrency: 32,
            ..BenchConfig::default()
        }
    }
}

/// Memory and disk of one server process.
#[derive(Clone, Debug, Default)]
struct Usage {
    peak_rss: u64,
    rss: u64,
    disk: u64,
}

#[derive(Clone)]
struct Step {
    system: String,
    size_mb: u64,
    members: usize,
    load_mb_per_s: f64,
    puts_per_sec: f64,
    /// Lowest and highest puts/s over the step's windows.
    puts_range: (f64, f64),
    p99_ms: f64,
    errors: u64,
    /// The servers' CPU time per put in the median window (µs), if it could be read.
    cpu_us_per_put: Option<f64>,
    servers: Vec<Usage>,
    /// With `--defrag`: each server's data dir before it, its time (every member, one after
    /// another), and each data dir after it.
    defrag: Option<Defrag>,
}

/// One measured window of puts.
#[derive(Clone, Debug, PartialEq)]
struct Window {
    puts_per_sec: f64,
    p99_ms: f64,
    errors: u64,
    cpu_us_per_put: Option<f64>,
}

#[derive(Clone, Debug)]
struct Defrag {
    before: Vec<u64>,
    secs: f64,
    after: Vec<u64>,
}

struct CatchUp {
    system: String,
    size_mb: u64,
    secs: f64,
    usage: Usage,
}

/// A cluster under test: where its servers are, and its bench backend.
enum Target {
    Etcd(EtcdCluster, EtcdBackend),
    Aspen(AspenCluster, AspenBackend),
}

impl Target {
    fn servers(&self) -> Vec<(Option<u32>, PathBuf)> {
        match self {
            Target::Etcd(c, _) => c.servers(),
            Target::Aspen(c, _) => c.servers(),
        }
    }

    fn cpu_meter(&self) -> Result<CpuMeter, String> {
        match self {
            Target::Etcd(c, _) => c.cpu_meter(),
            Target::Aspen(c, _) => c.cpu_meter(),
        }
    }

    /// Defragments every member; returns each data dir before and after and the time it took.
    async fn defragment(&self) -> Result<Defrag, String> {
        let dirs = || self.servers().iter().map(|(_, dir)| allocated(dir)).collect::<Vec<u64>>();
        let before = dirs();
        let started = Instant::now();
        match self {
            Target::Etcd(c, _) => c.defragment().await?,
            Target::Aspen(c, _) => c.defragment().await?,
        }
        let secs = started.elapsed().as_secs_f64();
        Ok(Defrag { before, secs, after: dirs() })
    }
}

/// A step's windows (at least one) as the step reports them: the window with the median puts/s
/// (the upper one of an even count), the lowest and highest puts/s, and every window's errors.
fn summarize(mut windows: Vec<Window>) -> (Window, (f64, f64), u64) {
    windows.sort_by(|a, b| a.puts_per_sec.total_cmp(&b.puts_per_sec));
    let lowest = windows.first().map_or(0.0, |w| w.puts_per_sec);
    let highest = windows.last().map_or(0.0, |w| w.puts_per_sec);
    let errors = windows.iter().map(|w| w.errors).sum();
    let median = windows.swap_remove(windows.len() / 2);
    (median, (lowest, highest), errors)
}

/// One window of puts on `backend` (warm-up, then `config`'s duration), with the servers' CPU
/// time over the measured part when `meter` is given.
async fn measure<B: BenchBackend>(
    backend: &B,
    config: &BenchConfig,
    meter: Option<&CpuMeter>,
) -> Result<Window, BenchError> {
    let (report, cpu) = match meter {
        Some(meter) => {
            let (report, window) = cpu::run_measured(backend, config, None, meter).await;
            let report = report?;
            let cpu = match window {
                Some(Ok(w)) => w.us_per_op(report.ok),
                Some(Err(e)) => {
                    eprintln!("aspen-compare --grow: warning: cannot read the servers' CPU time: {e}");
                    None
                }
                None => None,
            };
            (report, cpu)
        }
        None => (aspen_bench::run(backend, config, None).await?, None),
    };
    Ok(Window {
        puts_per_sec: report.throughput_ops_per_sec,
        p99_ms: report.latency_us.p99 as f64 / 1000.0,
        errors: report.errors,
        cpu_us_per_put: cpu,
    })
}

/// Runs the plan for each system (`"etcd"`, `"aspen"`, `"aspen-sharded"`); returns the report.
pub async fn run(
    plan: &GrowPlan,
    systems: &[&str],
    etcd: Option<&Path>,
    node: Option<&Path>,
) -> Result<String, String> {
    let mut steps = Vec::new();
    let mut catch_ups = Vec::new();
    for &system in systems {
        let (mut target, label) = match system {
            "etcd" => {
                let etcd = etcd.ok_or("no etcd binary")?;
                let extra = [format!("--quota-backend-bytes={}", plan.etcd_quota)];
                let cluster = EtcdCluster::start_with(etcd, plan.members, None, &extra).await?;
                let backend = EtcdBackend::new(cluster.endpoints.clone(), plan.timeout);
                (Target::Etcd(cluster, backend), "etcd".to_string())
            }
            _ => {
                let node = node.ok_or("no aspen-node binary")?;
                let shards = if system == "aspen" { 1 } else { plan.shards };
                let mut cluster = AspenCluster::start(node, plan.members, shards, None).await?;
                if shards > 1 {
                    cluster.balance_leaders().await?;
                }
                let backend = AspenBackend::new(cluster.tickets.clone(), plan.timeout)
                    .map_err(|e| e.to_string())?
                    .with_token(Some(cluster.token.clone()));
                let label = if shards > 1 { format!("aspen ({shards} shards)") } else { "aspen (1 shard)".into() };
                (Target::Aspen(cluster, backend), label)
            }
        };
        let mut loaded = 0u64;
        let mut caught_up = false;
        for &size_mb in &plan.sizes_mb {
            let keys = plan.keys_for(size_mb);
            let started = Instant::now();
            let config = plan.config(keys);
            let wrote = match &target {
                Target::Etcd(_, b) => aspen_bench::fill(b, &config, loaded..keys, None).await,
                Target::Aspen(_, b) => aspen_bench::fill(b, &config, loaded..keys, None).await,
            }
            .map_err(|e| format!("{label}: loading to {size_mb} MB: {e}"))?;
            let load_secs = started.elapsed().as_secs_f64();
            let load_mb = wrote as f64 * (PREFIX.len() + 8 + plan.value_size) as f64 / 1e6;
            loaded = keys;
            let defrag = if plan.defrag {
                let d = target.defragment().await.map_err(|e| format!("{label}: at {size_mb} MB: {e}"))?;
                eprintln!(
                    "aspen-compare --grow: {label} at {size_mb} MB: defragmented every member in {:.1} s: data dir {} \
                     -> {} MB",
                    d.secs,
                    range(d.before.iter().copied()),
                    range(d.after.iter().copied())
                );
                Some(d)
            } else {
                None
            };
            // Built afresh each step: a node that joined counts from then on.
            let meter = crate::meter_or_warn(target.cpu_meter());
            let mut windows = Vec::with_capacity(plan.windows.max(1));
            for _ in 0..plan.windows.max(1) {
                windows.push(
                    match &target {
                        Target::Etcd(_, b) => measure(b, &config, meter.as_ref()).await,
                        Target::Aspen(_, b) => measure(b, &config, meter.as_ref()).await,
                    }
                    .map_err(|e| format!("{label}: puts at {size_mb} MB: {e}"))?,
                );
            }
            let (median, puts_range, errors) = summarize(windows);
            let servers: Vec<Usage> = target.servers().iter().map(|(pid, dir)| usage(*pid, dir)).collect();
            let step = Step {
                system: label.clone(),
                size_mb,
                members: servers.len(),
                load_mb_per_s: load_mb / load_secs.max(1e-3),
                puts_per_sec: median.puts_per_sec,
                puts_range,
                p99_ms: median.p99_ms,
                errors,
                cpu_us_per_put: median.cpu_us_per_put,
                servers,
                defrag,
            };
            eprintln!("aspen-compare --grow: {}", step_line(&step));
            steps.push(step);

            if let (Target::Aspen(cluster, _), Some(at)) = (&mut target, plan.catch_up_mb) {
                if !caught_up && size_mb >= at {
                    caught_up = true;
                    let started = Instant::now();
                    cluster
                        .add_node(Duration::from_secs(3600))
                        .await
                        .map_err(|e| format!("{label}: a node catching up on {size_mb} MB: {e}"))?;
                    let secs = started.elapsed().as_secs_f64();
                    for line in cluster.snapshot_log_lines() {
                        eprintln!("    {line}");
                    }
                    let (pid, dir) = cluster.servers().pop().ok_or("no servers")?;
                    let usage = usage(pid, &dir);
                    let c = CatchUp { system: label.clone(), size_mb, secs, usage };
                    eprintln!(
                        "aspen-compare --grow: {label}: a new node caught up on {size_mb} MB in {secs:.1} s ({:.1} \
                         MB/s), peak RSS {} MB",
                        size_mb as f64 / secs,
                        mb(c.usage.peak_rss)
                    );
                    catch_ups.push(c);
                }
            }
        }
        drop(target);
    }
    Ok(report(plan, &steps, &catch_ups))
}

fn mb(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / 1e6)
}

fn range(values: impl Iterator<Item = u64>) -> String {
    let v: Vec<u64> = values.collect();
    match (v.iter().min(), v.iter().max()) {
        (Some(lo), Some(hi)) if mb(*lo) == mb(*hi) => mb(*lo),
        (Some(lo), Some(hi)) => format!("{}–{}", mb(*lo), mb(*hi)),
        _ => "?".into(),
    }
}

/// A step's figures, in the table's column order (system first).
fn cells(s: &Step) -> [String; 13] {
    let disk_max = s.servers.iter().map(|u| u.disk).max().unwrap_or(0);
    [
        s.system.clone(),
        s.size_mb.to_string(),
        s.members.to_string(),
        format!("{:.1}", s.load_mb_per_s),
        format!("{:.0}", s.puts_per_sec),
        format!("{:.0}–{:.0}", s.puts_range.0, s.puts_range.1),
        s.cpu_us_per_put.map_or_else(|| "—".into(), |c| format!("{c:.0}")),
        format!("{:.1}", s.p99_ms),
        s.errors.to_string(),
        range(s.servers.iter().map(|u| u.peak_rss)),
        range(s.servers.iter().map(|u| u.rss)),
        range(s.servers.iter().map(|u| u.disk)),
        format!("{:.2}", disk_max as f64 / (s.size_mb as f64 * 1e6)),
    ]
}

/// A step's defragmentation figures: the data dirs before, its time, the data dirs after, and the
/// largest after over the live data.
fn defrag_cells(s: &Step) -> Option<[String; 4]> {
    let d = s.defrag.as_ref()?;
    let max = d.after.iter().copied().max().unwrap_or(0);
    Some([
        range(d.before.iter().copied()),
        format!("{:.1}", d.secs),
        range(d.after.iter().copied()),
        format!("{:.2}", max as f64 / (s.size_mb as f64 * 1e6)),
    ])
}

fn step_line(s: &Step) -> String {
    let c = cells(s);
    let mut line = format!(
        "{} at {} MB: load {} MB/s, {} puts/s ({}), cpu {} µs/put, p99 {} ms, peak RSS {} MB, RSS {} MB, data dir {} MB",
        c[0], c[1], c[3], c[4], c[5], c[6], c[7], c[9], c[10], c[11]
    );
    if let Some(d) = defrag_cells(s) {
        line.push_str(&format!(
            "; defragmented before the puts: {} -> {} MB ({} × live) in {} s",
            d[0], d[2], d[3], d[1]
        ));
    }
    line
}

fn report(plan: &GrowPlan, steps: &[Step], catch_ups: &[CatchUp]) -> String {
    let mut out = format!(
        "{}-byte values, {} clients putting for {:.0} s after each load step ({:.0} s warm-up), {} window(s) per \
         step: puts/s, cpu and p99 are the window with the median puts/s, the range is over all windows (errors: \
         their sum); cpu µs/put = the servers' CPU time (user + system, every process) over the window ÷ its puts; \
         peak RSS = `VmHWM` since the process started; data dir = allocated blocks; per server, min–max over the \
         members.\n\n| system | live data MB | members | load MB/s | puts/s | puts/s range | cpu µs/put | put p99 ms | \
         errors | peak RSS MB | RSS now MB | data dir MB | data dir ÷ live |\n|---|---|---|---|---|---|---|---|---|---|\
         ---|---|---|\n",
        plan.value_size,
        plan.clients,
        plan.duration.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        plan.windows.max(1)
    );
    for s in steps {
        out.push_str(&format!("| {} |\n", cells(s).join(" | ")));
    }
    if steps.iter().any(|s| s.defrag.is_some()) {
        out.push_str(
            "\nAfter each load step, before its puts, every member defragmented (one after another; data dir per \
             server, min–max):\n\n| system | live data MB | data dir before MB | defrag s | data dir after MB | after ÷ \
             live |\n|---|---|---|---|---|---|\n",
        );
        for s in steps {
            if let Some(d) = defrag_cells(s) {
                out.push_str(&format!("| {} | {} | {} |\n", s.system, s.size_mb, d.join(" | ")));
            }
        }
    }
    if !catch_ups.is_empty() {
        out.push_str(
            "\nA node joining afterwards (catches up by snapshot; joined = a voter with the others' applied \
             index):\n\n| system | live data MB | time to join s | MB/s | its peak RSS MB | its data dir MB |\n|---|---|\
             ---|---|---|---|\n",
        );
        for c in catch_ups {
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {} | {} |\n",
                c.system,
                c.size_mb,
                c.secs,
                c.size_mb as f64 / c.secs.max(1e-3),
                mb(c.usage.peak_rss),
                mb(c.usage.disk)
            ));
        }
    }
    out
}

/// Peak and current resident memory of `pid` (0 if it is gone) and the allocated size of `dir`.
fn usage(pid: Option<u32>, dir: &Path) -> Usage {
    let status = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok()).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Usage { peak_rss: field("VmHWM:"), rss: field("VmRSS:"), disk: allocated(dir) }
}

/// Bytes allocated to the files under `dir`.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(puts_per_sec: f64, cpu: Option<f64>, errors: u64) -> Window {
        Window { puts_per_sec, p99_ms: puts_per_sec / 1000.0, errors, cpu_us_per_put: cpu }
    }

    #[test]
    fn a_step_reports_its_median_window_and_the_range() {
        let (median, range, errors) =
            summarize(vec![window(5000.0, Some(300.0), 1), window(3000.0, Some(400.0), 0), window(4000.0, None, 2)]);
        assert_eq!(median, window(4000.0, None, 2));
        assert_eq!(range, (3000.0, 5000.0));
        assert_eq!(errors, 3);
        let (one, range, _) = summarize(vec![window(4200.0, Some(250.0), 0)]);
        assert_eq!(one.cpu_us_per_put, Some(250.0));
        assert_eq!(range, (4200.0, 4200.0));
    }

    #[test]
    fn the_table_row_shows_range_and_cpu() {
        let step = Step {
            system: "aspen (1 shard)".into(),
            size_mb: 100,
            members: 3,
            load_mb_per_s: 15.04,
            puts_per_sec: 6976.4,
            puts_range: (6657.2, 7228.0),
            p99_ms: 22.04,
            errors: 0,
            cpu_us_per_put: Some(221.3),
            servers: vec![Usage { peak_rss: 355_000_000, rss: 302_000_000, disk: 613_000_000 }],
            defrag: None,
        };
        assert_eq!(
            cells(&step).join(" | "),
            "aspen (1 shard) | 100 | 3 | 15.0 | 6976 | 6657–7228 | 221 | 22.0 | 0 | 355 | 302 | 613 | 6.13"
        );
        assert!(!step_line(&step).contains("defrag"));
        let d = Defrag { before: vec![200_000_000, 210_000_000], secs: 12.34, after: vec![150_000_000, 143_000_000] };
        let defragmented = Step { defrag: Some(d), ..step.clone() };
        assert_eq!(defrag_cells(&defragmented).unwrap().join(" | "), "200–210 | 12.3 | 143–150 | 1.50");
        assert!(step_line(&defragmented)
            .ends_with("; defragmented before the puts: 200–210 -> 143–150 MB (1.50 × live) in 12.3 s"));
        let unmeasured = Step { cpu_us_per_put: None, ..step };
        assert_eq!(cells(&unmeasured)[6], "—");
    }
}
