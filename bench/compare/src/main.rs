//! `aspen-compare`: Aspen and etcd side by side on this machine.
//!
//! Starts a 3-member etcd cluster, a 3-node Aspen cluster (one shard) and a 3-node Aspen cluster
//! with `--shards` shards and balanced shard leaders, one after another, each on 127.0.0.1 with
//! fresh temp data dirs and default settings (fsync on), and drives each with the same load
//! generator ([`aspen_bench::run`]) at every `--clients` count for every `--ops` operation.
//! Prints one table (system, op, clients, ops/s, p50, p99, errors, server CPU per request,
//! Aspen/etcd throughput ratio) and writes it with the machine description and the command to
//! `benches/RESULTS.md`. With `--cpu-per-node CORES[,…]` every server process runs in a cgroup
//! of its own with that CPU quota ([`cgroup`]); each setting (`none` = uncapped) gets a table.
//!
//! Every process it starts is stopped, and every temp dir and cgroup removed, when the run
//! ends, fails, panics, or is interrupted (SIGINT, SIGTERM, SIGHUP).
//!
//! `scripts/compare-etcd.sh` installs what is missing (etcd, protoc), builds this and
//! `aspen-node` in release mode and runs it.

mod aspen_cluster;
mod cgroup;
mod cpu;
mod etcd;
mod grow;
mod procs;
mod table;
mod watch;

use std::{
    fmt,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aspen::api::ReadConsistency;
use aspen_bench::{AspenBackend, BenchBackend, BenchConfig, Progress, ProgressFn, Stop, Workload};
use clap::{Parser, ValueEnum};

use crate::{
    aspen_cluster::AspenCluster,
    cgroup::{CgroupError, CpuLimiter},
    cpu::CpuMeter,
    etcd::{EtcdBackend, EtcdCluster},
    table::{Context, Measurement, Row},
};

#[derive(Parser, Debug)]
#[command(
    name = "aspen-compare",
    about = "Aspen and etcd side by side: same load generator, 3-member clusters on 127.0.0.1"
)]
struct Args {
    /// Seconds of measurement per row.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    duration: f64,
    /// Seconds of load before each row's measurement (not counted).
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    warmup: f64,
    /// Numbers of concurrent clients, one row each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64, 256], value_name = "N,…")]
    clients: Vec<usize>,
    /// Operations to measure (`get`: linearizable; `stale`: serializable / local reads).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Op::Put, Op::Get], value_name = "OP,…")]
    ops: Vec<Op>,
    /// Systems to measure, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [System::Etcd, System::AspenEtcd, System::Aspen, System::AspenSharded], value_name = "SYSTEM,…")]
    systems: Vec<System>,
    /// Members (etcd) and nodes (Aspen) per cluster.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Shards of the sharded Aspen cluster.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Bytes per value written.
    #[arg(long, default_value_t = 256, value_name = "BYTES")]
    value_size: usize,
    /// Distinct keys (get rows write them all first, not counted).
    #[arg(long, default_value_t = 1000)]
    key_space: u64,
    /// Seconds one request may take (retries included) before it counts as an error.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    timeout: f64,
    /// Smoke run: 2 s per row after 0.5 s warm-up, 1 and 16 clients (overrides --duration,
    /// --warmup, --clients); writes a file only with an explicit --output.
    #[arg(long)]
    quick: bool,
    /// Where to write the results page [default: benches/RESULTS.md, none with --quick].
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print the table only; write no file.
    #[arg(long, conflicts_with = "output")]
    no_output: bool,
    /// The etcd server binary [default: `etcd` on PATH].
    #[arg(long, value_name = "PATH")]
    etcd_bin: Option<PathBuf>,
    /// The aspen-node binary [default: `aspen-node` next to this binary].
    #[arg(long, value_name = "PATH")]
    node_bin: Option<PathBuf>,
    /// Measure every row this many times, each round starting every system afresh (rounds
    /// interleave the systems in time); each row reports its median round and the range. With
    /// --grow: measured windows of puts after each load step (median window and range).
    #[arg(long, default_value_t = 1, value_name = "N")]
    rounds: usize,
    /// Print ops/s every second while a row runs.
    #[arg(long)]
    progress: bool,
    /// CPU cap of every server process (each Aspen node, each etcd member), in cores, e.g. 0.45:
    /// each runs in a cgroup of its own with that quota (needs a writable cgroup cpu
    /// controller: root, or a delegated cgroup v2 subtree). `none` = uncapped. Several values
    /// measure every row under each, one table per value.
    #[arg(long, value_delimiter = ',', default_value = "none", value_parser = parse_cap, value_name = "CORES|none,…")]
    cpu_per_node: Vec<Cap>,
    /// Instead of the put/get table: watch fan-out ([`watch`]) — per system (etcd, aspen; one
    /// shard), the same paced puts with no watch and with --watchers watches of one prefix;
    /// prints server CPU per put with and without, and event delivery delays. Uses --duration,
    /// --rounds, --value-size, --members, --systems; writes no file.
    #[arg(long)]
    watch: bool,
    /// --watch: watches open during the watched run.
    #[arg(long, default_value_t = 100, value_name = "N")]
    watchers: usize,
    /// --watch: connections the watches share (watch i on connection i % N).
    #[arg(long, default_value_t = 1, value_name = "N")]
    watch_conns: usize,
    /// --watch: clients the paced puts are spread over.
    #[arg(long, default_value_t = 32, value_name = "N")]
    put_clients: usize,
    /// --watch: puts per second.
    #[arg(long, default_value_t = 1000.0, value_name = "PUTS_PER_SEC")]
    rate: f64,
    /// Instead of the put/get table: the cost curve as data grows ([`grow`]) — per system, load
    /// to each of --sizes MB of live data and measure puts there (--clients, --duration,
    /// --warmup, --value-size, default 1024 here), with each server's peak memory and disk; Aspen
    /// also has a node join after --catch-up-mb. Writes no file.
    #[arg(long)]
    grow: bool,
    /// --grow: live data after each load step, in MB.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1000, 4000], value_name = "MB,…")]
    sizes: Vec<u64>,
    /// --grow: a node joins (Aspen) after the first step of at least this many MB; 0: none.
    #[arg(long, default_value_t = 1000, value_name = "MB")]
    catch_up_mb: u64,
    /// --grow: after each load step, before its puts, defragment every member (`aspen-cli
    /// defrag --cluster`; etcd's Defragment, member by member) and report the data dirs before
    /// and after it and its time.
    #[arg(long)]
    defrag: bool,
    /// --grow: etcd's --quota-backend-bytes.
    #[arg(long, default_value_t = 16 << 30, value_name = "BYTES")]
    etcd_quota: u64,
    /// Where the cgroup filesystem is mounted.
    #[arg(long, default_value = cgroup::DEFAULT_ROOT, value_name = "PATH", hide = true)]
    cgroup_root: PathBuf,
}

/// One `--cpu-per-node` value: cores per server process, or `None` for no cap.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cap(Option<f64>);

fn parse_cap(text: &str) -> Result<Cap, String> {
    cgroup::parse_cores(text).map(Cap).map_err(|e| e.to_string())
}

/// Why a run failed, and its exit code.
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// The CPU caps cannot be set up (exit code 2, like a usage error).
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{0}")]
    Other(String),
}

impl From<String> for RunError {
    fn from(s: String) -> Self {
        RunError::Other(s)
    }
}

impl RunError {
    fn exit_code(&self) -> u8 {
        match self {
            RunError::Cgroup(_) => 2,
            RunError::Other(_) => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Op {
    Put,
    Get,
    Stale,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Stale => "stale get",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum System {
    Etcd,
    /// Aspen (one shard) through its etcd API, driven by the same etcd client as etcd.
    AspenEtcd,
    Aspen,
    AspenSharded,
}

/// What every row shares.
struct Plan {
    duration: Duration,
    warmup: Duration,
    clients: Vec<usize>,
    ops: Vec<Op>,
    value_size: usize,
    key_space: u64,
    progress: Option<ProgressFn>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aspen-compare: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(args) => r.map_err(|e| (e.to_string(), e.exit_code())),
            s = shutdown_signal() => Err((format!("{s}: stopped every process started and removed the temp dirs and cgroups"), 130)),
        }
    });
    // Client tasks that were still running when a run was abandoned end with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err((message, code)) => {
            eprintln!("aspen-compare: {message}");
            ExitCode::from(code)
        }
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

fn seconds(flag: &str, v: f64, zero_ok: bool) -> Result<Duration, String> {
    if v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) && v < 1e6 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!(
            "--{flag} must be a {} number of seconds (got {v})",
            if zero_ok { "non-negative" } else { "positive" }
        ))
    }
}

async fn run(args: Args) -> Result<(), RunError> {
    if args.grow {
        if args.sizes.is_empty() || args.sizes.windows(2).any(|w| w[0] >= w[1]) || args.sizes[0] == 0 {
            return Err(RunError::Other("--sizes must be positive and increasing".into()));
        }
        let clients = *args.clients.last().unwrap_or(&64);
        if clients == 0 || args.members == 0 || args.shards < 2 || args.rounds == 0 {
            return Err(RunError::Other(
                "--clients, --members and --rounds must be positive and --shards at least 2".into(),
            ));
        }
        let value_size = if args.value_size == 256 { 1024 } else { args.value_size };
        let plan = grow::GrowPlan {
            sizes_mb: args.sizes.clone(),
            value_size,
            clients,
            duration: seconds("duration", args.duration, false)?,
            warmup: seconds("warmup", args.warmup, true)?,
            members: args.members,
            shards: args.shards,
            timeout: seconds("timeout", args.timeout, false)?,
            catch_up_mb: (args.catch_up_mb > 0).then_some(args.catch_up_mb),
            etcd_quota: args.etcd_quota,
            windows: args.rounds,
            defrag: args.defrag,
        };
        let names: Vec<&str> = args
            .systems
            .iter()
            .map(|s| match s {
                System::Etcd => Ok("etcd"),
                System::Aspen => Ok("aspen"),
                System::AspenSharded => Ok("aspen-sharded"),
                System::AspenEtcd => Err("--grow measures etcd, aspen and aspen-sharded (not aspen-etcd)".to_string()),
            })
            .collect::<Result<_, _>>()?;
        let etcd = if args.systems.contains(&System::Etcd) { Some(find_etcd(args.etcd_bin.as_deref())?) } else { None };
        let node = if args.systems.iter().any(|s| *s != System::Etcd) {
            Some(find_node(args.node_bin.as_deref())?)
        } else {
            None
        };
        eprintln!("aspen-compare: load average {}", load_average());
        let table = grow::run(&plan, &names, etcd.as_deref(), node.as_deref()).await?;
        println!("{table}");
        return Ok(());
    }
    if args.watch {
        if args.rounds == 0 || args.members == 0 || args.watchers == 0 || args.put_clients == 0 || args.watch_conns == 0
        {
            return Err(RunError::Other(
                "--rounds, --members, --watchers, --put-clients and --watch-conns must be at least 1".into(),
            ));
        }
        if !(args.rate.is_finite() && args.rate > 0.0) {
            return Err(RunError::Other(format!("--rate must be a positive number (got {})", args.rate)));
        }
        let plan = watch::WatchPlan {
            watchers: args.watchers,
            conns: args.watch_conns,
            put_clients: args.put_clients,
            rate: args.rate,
            duration: seconds("duration", args.duration, false)?,
            value_size: args.value_size.max(16),
            rounds: args.rounds,
            members: args.members,
            timeout: seconds("timeout", args.timeout, false)?,
        };
        let etcd = if args.systems.contains(&System::Etcd) { Some(find_etcd(args.etcd_bin.as_deref())?) } else { None };
        let node =
            if args.systems.contains(&System::Aspen) { Some(find_node(args.node_bin.as_deref())?) } else { None };
        eprintln!("aspen-compare: load average {}", load_average());
        return Ok(watch::run(&plan, etcd.as_deref(), node.as_deref()).await?);
    }
    let (duration, warmup, clients) = if args.quick {
        (Duration::from_secs(2), Duration::from_millis(500), vec![1, 16])
    } else {
        (seconds("duration", args.duration, false)?, seconds("warmup", args.warmup, true)?, args.clients.clone())
    };
    if clients.is_empty() || clients.contains(&0) || args.ops.is_empty() || args.systems.is_empty() {
        return Err(RunError::Other(
            "--clients, --ops and --systems need at least one value each, and clients must be positive".into(),
        ));
    }
    if args.rounds == 0 {
        return Err(RunError::Other("--rounds must be at least 1".into()));
    }
    if args.members == 0 || args.shards < 2 {
        return Err(RunError::Other("--members must be at least 1 and --shards at least 2".into()));
    }
    let caps: Vec<Option<f64>> = args.cpu_per_node.iter().fold(Vec::new(), |mut v, c| {
        if !v.contains(&c.0) {
            v.push(c.0);
        }
        v
    });
    // Set up (and prove, with a probe cgroup) every cap before anything starts.
    let mut limiters: Vec<(f64, CpuLimiter)> = Vec::new();
    for cores in caps.iter().flatten() {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let limiter = CpuLimiter::setup(&args.cgroup_root, &own, *cores, std::process::id())?;
        for skipped in &limiter.skipped {
            eprintln!("aspen-compare: not used: {skipped}");
        }
        if limiters.is_empty() {
            for stale in limiter.remove_stale(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
                eprintln!("aspen-compare: removed the empty cgroup {} of an earlier run", stale.display());
            }
        }
        eprintln!("aspen-compare: CPU cap: {} ({})", limiter.describe(), limiter.hierarchy);
        limiters.push((*cores, limiter));
    }
    let limiter_for = |cap: Option<f64>| cap.and_then(|c| limiters.iter().find(|(k, _)| *k == c).map(|(_, l)| l));
    let timeout = seconds("timeout", args.timeout, false)?;
    let output = match (&args.output, args.no_output, args.quick) {
        (Some(path), _, _) => Some(path.clone()),
        (None, false, false) => Some(PathBuf::from("benches/RESULTS.md")),
        _ => None,
    };
    let progress: Option<ProgressFn> = args.progress.then(|| {
        Arc::new(|p: &Progress| {
            eprintln!(
                "    [{}] {:>5.1} s  {:>8.0} ops/s  {} done  {} errors",
                p.phase,
                p.elapsed.as_secs_f64(),
                p.ops_per_sec,
                p.ops,
                p.errors
            )
        }) as ProgressFn
    });
    let plan = Plan {
        duration,
        warmup,
        clients,
        ops: args.ops.clone(),
        value_size: args.value_size,
        key_space: args.key_space,
        progress,
    };
    let etcd_bin = if args.systems.contains(&System::Etcd) { Some(find_etcd(args.etcd_bin.as_deref())?) } else { None };
    let node_bin =
        if args.systems.iter().any(|s| *s != System::Etcd) { Some(find_node(args.node_bin.as_deref())?) } else { None };

    let mut ctx = context(&args, &plan, etcd_bin.as_deref(), node_bin.as_deref());
    ctx.caps = limiters.iter().map(|(_, l)| l.describe()).collect();
    eprintln!("aspen-compare: {}", ctx.machine);
    eprintln!(
        "aspen-compare: load average {}; {} s per row after {} s warm-up",
        ctx.load_before,
        plan.duration.as_secs_f64(),
        plan.warmup.as_secs_f64()
    );

    let rounds = if args.quick { 1 } else { args.rounds };
    // Every round's rows, in the order measured; folded into one row per (cap, system, op,
    // clients).
    let mut measured: Vec<Row> = Vec::new();
    // How the servers' CPU was read, per cap (for the page).
    let mut cpu_kinds: Vec<String> = Vec::new();
    for round in 1..=rounds {
        if rounds > 1 {
            eprintln!("aspen-compare: round {round} of {rounds}");
        }
        for &cap in &caps {
            let servers = Servers {
                etcd: etcd_bin.as_deref(),
                node: node_bin.as_deref(),
                timeout,
                cap,
                limiter: limiter_for(cap),
            };
            for system in &args.systems {
                let (rows, kind) = measure_system(*system, &args, &plan, &servers).await;
                measured.extend(rows);
                if let Some(kind) = kind {
                    let kind = format!("{} rows: {kind}", table::cap_label(cap));
                    if !cpu_kinds.contains(&kind) {
                        cpu_kinds.push(kind);
                    }
                }
            }
        }
    }
    ctx.cpu = format!(
        "`{}` = CPU time (user + system, all threads) of the row's server processes, summed over the \
         measured window, ÷ its successful requests; read from {}",
        table::CPU_HEADER,
        if cpu_kinds.is_empty() { "nothing (no system started)".to_string() } else { cpu_kinds.join("; ") },
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut per_row: Vec<Vec<Result<Measurement, String>>> = Vec::new();
    for row in measured {
        match rows
            .iter()
            .position(|r| r.cap == row.cap && r.system == row.system && r.op == row.op && r.clients == row.clients)
        {
            Some(i) => per_row[i].push(row.result),
            None => {
                per_row.push(vec![row.result.clone()]);
                rows.push(row);
            }
        }
    }
    for (row, results) in rows.iter_mut().zip(per_row) {
        row.result = table::median_round(results);
    }

    // Group the rows by cap, then op, then clients, then system, so each Aspen row sits under its
    // etcd row.
    let system_order: Vec<String> = rows.iter().map(|r| r.system.clone()).fold(Vec::new(), |mut v, s| {
        if !v.contains(&s) {
            v.push(s);
        }
        v
    });
    rows.sort_by_key(|r| {
        let op = plan.ops.iter().position(|o| o.to_string() == r.op).unwrap_or(usize::MAX);
        let system = system_order.iter().position(|s| *s == r.system).unwrap_or(usize::MAX);
        let cap = caps.iter().position(|c| *c == r.cap).unwrap_or(usize::MAX);
        (cap, op, r.clients, system)
    });
    let table = table::format_tables(&rows);
    println!("{table}");
    if let Some(path) = output {
        let ctx = Context { load_after: load_average(), ..ctx };
        let previous = std::fs::read_to_string(&path).ok();
        let page = table::keep_notes(table::results_page(&ctx, &rows), previous.as_deref());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        std::fs::write(&path, page).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("aspen-compare: wrote {}", path.display());
    }
    let failed = rows.iter().filter(|r| r.result.is_err()).count();
    if failed > 0 {
        return Err(RunError::Other(format!("{failed} of {} rows failed (see the table)", rows.len())));
    }
    Ok(())
}

/// Where the servers come from and how they run, for one cap.
struct Servers<'a> {
    etcd: Option<&'a Path>,
    node: Option<&'a Path>,
    timeout: Duration,
    cap: Option<f64>,
    limiter: Option<&'a CpuLimiter>,
}

/// Starts `system` afresh (each server in a capped cgroup with a cap), measures every (op,
/// clients) row of `plan` on it, and stops it. Also returns how its CPU time was read.
async fn measure_system(system: System, args: &Args, plan: &Plan, servers: &Servers<'_>) -> (Vec<Row>, Option<String>) {
    let mut rows = Vec::new();
    let cap = servers.cap;
    let each = cap.map(|c| format!(", {c} core each")).unwrap_or_default();
    let mut kind = None;
    match system {
        System::Etcd => {
            let etcd = servers.etcd.expect("resolved before measuring");
            let name = "etcd";
            eprintln!("aspen-compare: starting {} etcd members{each}", args.members);
            match EtcdCluster::start(etcd, args.members, servers.limiter).await {
                Ok(cluster) => {
                    let meter = meter_or_warn(cluster.cpu_meter());
                    kind = meter.as_ref().map(CpuMeter::describe);
                    let backend = EtcdBackend::new(cluster.endpoints.clone(), servers.timeout);
                    measure(&backend, name, true, cap, meter.as_ref(), plan, &mut rows).await;
                }
                Err(e) => fail_all(name, true, cap, plan, &e, &mut rows),
            }
        }
        System::AspenEtcd => {
            let node = servers.node.expect("resolved before measuring");
            let name = "aspen (etcd API)";
            eprintln!("aspen-compare: starting {} aspen-node processes serving the etcd API{each}", args.members);
            match AspenCluster::start_with(node, args.members, 1, servers.limiter, true).await {
                Ok(cluster) => {
                    let meter = meter_or_warn(cluster.cpu_meter());
                    kind = meter.as_ref().map(CpuMeter::describe);
                    let backend =
                        EtcdBackend::aspen(cluster.etcd_endpoints.clone(), servers.timeout, cluster.token.clone());
                    measure(&backend, name, false, cap, meter.as_ref(), plan, &mut rows).await;
                }
                Err(e) => fail_all(name, false, cap, plan, &e, &mut rows),
            }
        }
        System::Aspen | System::AspenSharded => {
            let node = servers.node.expect("resolved before measuring");
            let shards = if system == System::Aspen { 1 } else { args.shards };
            let name = if shards == 1 { "aspen".to_string() } else { format!("aspen ({shards} shards)") };
            eprintln!("aspen-compare: starting {} aspen-node processes ({shards} shard(s){each})", args.members);
            let started = match AspenCluster::start(node, args.members, shards, servers.limiter).await {
                Ok(mut cluster) if shards > 1 => match cluster.balance_leaders().await {
                    Ok(leaders) => {
                        eprintln!("aspen-compare: shard leaders after balance-leaders: {leaders:?}");
                        Ok(cluster)
                    }
                    Err(e) => Err(e),
                },
                other => other,
            };
            match started.and_then(|c| {
                Ok((
                    AspenBackend::new(c.tickets.clone(), servers.timeout)
                        .map_err(|e| e.to_string())?
                        .with_token(Some(c.token.clone())),
                    c,
                ))
            }) {
                Ok((backend, cluster)) => {
                    let meter = meter_or_warn(cluster.cpu_meter());
                    kind = meter.as_ref().map(CpuMeter::describe);
                    measure(&backend, &name, false, cap, meter.as_ref(), plan, &mut rows).await
                }
                Err(e) => fail_all(&name, false, cap, plan, &e, &mut rows),
            }
        }
    }
    (rows, kind)
}

fn meter_or_warn(meter: Result<CpuMeter, String>) -> Option<CpuMeter> {
    meter.map_err(|e| eprintln!("aspen-compare: warning: cannot read the servers' CPU time: {e}")).ok()
}

/// Runs every (op, clients) row of `plan` against `backend`, reading the servers' CPU time
/// with `meter` over each measured window.
async fn measure<B: BenchBackend>(
    backend: &B,
    system: &str,
    baseline: bool,
    cap: Option<f64>,
    meter: Option<&CpuMeter>,
    plan: &Plan,
    rows: &mut Vec<Row>,
) {
    for &op in &plan.ops {
        for &clients in &plan.clients {
            let config = BenchConfig {
                clients,
                stop: Stop::Duration(plan.duration),
                value_size: plan.value_size,
                key_space: plan.key_space,
                workload: if op == Op::Put { Workload::Put } else { Workload::Get },
                consistency: if op == Op::Stale { ReadConsistency::Stale } else { ReadConsistency::Linearizable },
                warmup: plan.warmup,
                ..BenchConfig::default()
            };
            eprint!("aspen-compare: {system:<16} {op:<9} {clients:>4} client(s): ");
            let (report, window) = match meter {
                Some(meter) => cpu::run_measured(backend, &config, plan.progress.clone(), meter).await,
                None => (aspen_bench::run(backend, &config, plan.progress.clone()).await, None),
            };
            let window = match window {
                Some(Ok(w)) => Some(w),
                Some(Err(e)) => {
                    eprint!("(cannot read the servers' CPU time: {e}) ");
                    None
                }
                None => None,
            };
            let result = match report {
                Ok(r) if r.all_failed() => Err(format!(
                    "all {} requests failed: {}",
                    r.ops,
                    r.error_samples.first().map(|e| e.message.as_str()).unwrap_or("none completed")
                )),
                Ok(r) => Ok(Measurement {
                    ops_per_sec: r.throughput_ops_per_sec,
                    p50_us: r.latency_us.p50,
                    p99_us: r.latency_us.p99,
                    ok: r.ok,
                    errors: r.errors,
                    cpu_us_per_op: window.and_then(|w| w.us_per_op(r.ok)),
                    range: None,
                }),
                Err(e) => Err(e.to_string()),
            };
            match &result {
                Ok(m) => eprintln!(
                    "{:>7} ops/s  p50 {:>7} ms  p99 {:>7} ms  {} ok, {} errors  cpu {} µs/op ({} cores)",
                    table::thousands(m.ops_per_sec.round() as u64),
                    table::ms(m.p50_us),
                    table::ms(m.p99_us),
                    m.ok,
                    m.errors,
                    table::cpu_us(m.cpu_us_per_op),
                    window.and_then(|w| w.cores()).map(|c| format!("{c:.2}")).unwrap_or_else(|| "?".into()),
                ),
                Err(e) => eprintln!("FAILED: {e}"),
            }
            rows.push(Row { system: system.to_string(), baseline, op: op.to_string(), clients, cap, result });
        }
    }
}

/// A system that could not be started: every one of its rows failed with `why`.
fn fail_all(system: &str, baseline: bool, cap: Option<f64>, plan: &Plan, why: &str, rows: &mut Vec<Row>) {
    eprintln!("aspen-compare: {system} did not start: {why}");
    let first_line = why.lines().next().unwrap_or(why).to_string();
    for &op in &plan.ops {
        for &clients in &plan.clients {
            rows.push(Row {
                system: system.to_string(),
                baseline,
                op: op.to_string(),
                clients,
                cap,
                result: Err(format!("did not start: {first_line}")),
            });
        }
    }
}

fn find_etcd(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join("etcd")).find(|p| p.is_file()).ok_or_else(|| {
        "no `etcd` on PATH: install it (`apt-get install etcd-server`), pass --etcd-bin, or run scripts/compare-etcd.sh"
            .to_string()
    })
}

fn find_node(given: Option<&Path>) -> Result<PathBuf, String> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => {
            std::env::current_exe().map_err(|e| format!("cannot locate this binary: {e}"))?.with_file_name("aspen-node")
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no aspen-node at {}: build it (`cargo build --release --bin aspen-node`) or pass --node-bin",
            path.display()
        ))
    }
}

/// The page's context: date, command, machine, versions, build and workload.
fn context(args: &Args, plan: &Plan, etcd: Option<&Path>, node: Option<&Path>) -> Context {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB RAM", kib / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown RAM".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let command = std::env::var("ASPEN_COMPARE_COMMAND").ok().filter(|c| !c.trim().is_empty()).unwrap_or_else(|| {
        std::env::args().map(|a| if a.contains(' ') { format!("'{a}'") } else { a }).collect::<Vec<_>>().join(" ")
    });
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let aspen_version = match git(&["describe", "--always", "--dirty"]) {
        Some(rev) => {
            format!("commit {rev}, 3 `aspen-node` processes with default settings (fsync on every Raft log append)")
        }
        None => "3 `aspen-node` processes with default settings (fsync on every Raft log append)".into(),
    };
    let build = format!(
        "{} (`aspen-node`: {})",
        if cfg!(debug_assertions) { "DEBUG build of the harness — not representative" } else { "release" },
        node.map(|p| p.display().to_string()).unwrap_or_else(|| "not used".into())
    );
    let etcd_version = match etcd {
        Some(p) => format!(
            "{} ({}), {} members with default settings (fsync on every commit)",
            procs::version_line(p, "--version").unwrap_or_else(|| "version unknown".into()),
            p.display(),
            args.members
        ),
        None => "not measured".into(),
    };
    let workload = format!(
        "closed loop, {} s measured per row after {} s of warm-up; {}-byte values; {} keys picked uniformly \
         at random (get rows write every key first, not counted); client i has its own connection to member \
         i mod {} and one request in flight; the same load generator (`aspen_bench::run`) for every system, \
         on the same machine as the servers; `aspen ({} shards)` is started with `--sharding-enabled \
         --sharding-num-shards {}` and its shard leaders spread with `cluster balance-leaders`",
        plan.duration.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        plan.value_size,
        plan.key_space,
        args.members,
        args.shards,
        args.shards,
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Context {
        date: table::utc_timestamp(now),
        command,
        machine: format!("{cores} cores (nproc), {model}, {mem_gib}, Linux {kernel}"),
        load_before: load_average(),
        etcd_version,
        aspen_version,
        build,
        workload,
        quick: args.quick,
        rounds: if args.quick { 1 } else { args.rounds },
        ..Context::default()
    }
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
