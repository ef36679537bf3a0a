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
//! Aspen only: after the first step of at least `--catch-up-mb`, one more node joins and catches
//! up — by snapshot, since the leaders purged their logs long before — and the time, the rate
//! (live data / time) and its peak memory are reported. It then stays a member (later steps run
//! with four nodes; the table says so).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aspen_bench::{AspenBackend, BenchConfig, Stop, Workload};

use crate::{
    aspen_cluster::AspenCluster,
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

struct Step {
    system: String,
    size_mb: u64,
    members: usize,
    load_mb_per_s: f64,
    puts_per_sec: f64,
    p99_ms: f64,
    errors: u64,
    servers: Vec<Usage>,
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
            let report = match &target {
                Target::Etcd(_, b) => aspen_bench::run(b, &config, None).await,
                Target::Aspen(_, b) => aspen_bench::run(b, &config, None).await,
            }
            .map_err(|e| format!("{label}: puts at {size_mb} MB: {e}"))?;
            let servers: Vec<Usage> = target.servers().iter().map(|(pid, dir)| usage(*pid, dir)).collect();
            let step = Step {
                system: label.clone(),
                size_mb,
                members: servers.len(),
                load_mb_per_s: load_mb / load_secs.max(1e-3),
                puts_per_sec: report.throughput_ops_per_sec,
                p99_ms: report.latency_us.p99 as f64 / 1000.0,
                errors: report.errors,
                servers,
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
fn cells(s: &Step) -> [String; 11] {
    let disk_max = s.servers.iter().map(|u| u.disk).max().unwrap_or(0);
    [
        s.system.clone(),
        s.size_mb.to_string(),
        s.members.to_string(),
        format!("{:.1}", s.load_mb_per_s),
        format!("{:.0}", s.puts_per_sec),
        format!("{:.1}", s.p99_ms),
        s.errors.to_string(),
        range(s.servers.iter().map(|u| u.peak_rss)),
        range(s.servers.iter().map(|u| u.rss)),
        range(s.servers.iter().map(|u| u.disk)),
        format!("{:.2}", disk_max as f64 / (s.size_mb as f64 * 1e6)),
    ]
}

fn step_line(s: &Step) -> String {
    let c = cells(s);
    format!(
        "{} at {} MB: load {} MB/s, {} puts/s, p99 {} ms, peak RSS {} MB, RSS {} MB, data dir {} MB",
        c[0], c[1], c[3], c[4], c[5], c[7], c[8], c[9]
    )
}

fn report(plan: &GrowPlan, steps: &[Step], catch_ups: &[CatchUp]) -> String {
    let mut out = format!(
        "{}-byte values, {} clients putting for {:.0} s after each load step ({:.0} s warm-up); peak RSS = `VmHWM` \
         since the process started; data dir = allocated blocks; per server, min–max over the members.\n\n| system \
         | live data MB | members | load MB/s | puts/s | put p99 ms | errors | peak RSS MB | RSS now MB | data dir MB | \
         data dir ÷ live |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        plan.value_size,
        plan.clients,
        plan.duration.as_secs_f64(),
        plan.warmup.as_secs_f64()
    );
    for s in steps {
        out.push_str(&format!("| {} |\n", cells(s).join(" | ")));
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
