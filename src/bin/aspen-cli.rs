//! `aspen-cli`: an etcdctl-like command line over [`aspen::AspenClient`].
//!
//! Exit codes (README, "Exit codes"): 0 ok; 1 not found, compare failed; 2 usage, invalid or
//! refused request; 3 unavailable, unreachable, timeout, not initialized, a member that does
//! not answer `cluster status`; 4 permission denied (no token, or one that is expired, revoked
//! or does not allow the request). With `--json`, an error is one object on stdout,
//! `{"error":{"kind":"<snake_case>","message":"..."}}`, besides the message on stderr.

use std::{
    io::{IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use aspen::{
    api::{
        format_lease_id, parse_lease_id,
        watch::{format_resume, parse_resume},
        ApiError, ClientRequest, ClientResponse, EventKind, KeyValue, NodeTicket, ReadConsistency, ShardStatus,
        TokenInfo, TxnOpResult, TxnResponse, WatchRequest, WatchStart,
    },
    auth::token::{format_id, parse_id},
    client::{AspenClient, CasOutcome, ClientError, WatchItem},
};
use aspen_bench::{AspenBackend, BenchConfig, BenchError, Progress, ProgressFn, Stop, Workload};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde_json::json;

#[path = "../cli/txn.rs"]
mod txn;

/// mimalloc: glibc malloc was ~10 % of a node's cycles under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "aspen-cli", version, about = "Talk to an Aspen cluster")]
struct Cli {
    /// Ticket of a cluster member (repeat or comma-separate for several).
    #[arg(long, global = true, env = "ASPEN_TICKET", value_delimiter = ',')]
    ticket: Vec<String>,
    /// Read the ticket from DIR/node.ticket when no --ticket is given.
    #[arg(long, global = true, env = "ASPEN_DATA_DIR", default_value = "./aspen-data")]
    data_dir: PathBuf,
    /// Token sent with every request (beats ASPEN_TOKEN, --token-file and the data dir's
    /// admin.token).
    #[arg(long, global = true, env = "ASPEN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from FILE (when neither --token nor ASPEN_TOKEN is given).
    #[arg(long, global = true, env = "ASPEN_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Give up after this many seconds: bounds one request including its failover to other
    /// members (and `wait` as a whole).
    #[arg(long, global = true, env = "ASPEN_TIMEOUT", default_value_t = 10.0, value_name = "SECONDS")]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Set KEY to VALUE (or to what stdin holds when VALUE is left out).
    Put {
        /// The key (any UTF-8 text).
        key: String,
        /// The value to store; left out, it is read from stdin byte for byte (as etcdctl does),
        /// so values of any size up to the node's limit and binary values can be written.
        value: Option<String>,
        /// Attach the key to lease ID (1 to 16 hex digits): it goes when the lease does. Exit 1
        /// if the lease does not exist.
        #[arg(long, value_name = "ID", conflicts_with = "ttl")]
        lease: Option<String>,
        /// Grant a lease of SECONDS and attach the key to it (`--json` prints the lease id).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        ttl: Option<u64>,
    },
    /// Stream the changes of KEY (or of every key under --prefix) until interrupted.
    ///
    /// One line per event, flushed at once: PUT<TAB>KEY<TAB>VALUE or DELETE<TAB>KEY (with
    /// --prev-kv, a last field holds the previous value), escaped as `scan` escapes them. With
    /// --json: one object per line, first {"type":"created",...}, then one per event with its
    /// `resume` token. Exit 2 if the start lies before the history the node keeps (compacted).
    Watch {
        /// The key to watch.
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        key: Option<String>,
        /// Watch every key that starts with P (empty: every key).
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
        /// Add each event's previous value.
        #[arg(long)]
        prev_kv: bool,
        /// Start with the events of revision R and later (a cluster of one shard).
        #[arg(long, value_name = "R", conflicts_with = "resume", value_parser = clap::value_parser!(u64).range(1..))]
        from_revision: Option<u64>,
        /// Start after the position in TOKEN (an event's `resume` from `--json`), on any node.
        #[arg(long, value_name = "TOKEN")]
        resume: Option<String>,
    },
    /// Leases: keys that go when their lease expires or is revoked.
    Lease {
        #[command(subcommand)]
        command: LeaseCommand,
    },
    /// Print the value of KEY (linearizable unless --stale).
    Get {
        /// The key to read.
        key: String,
        /// Read this node's local state (may be behind the leader).
        #[arg(long)]
        stale: bool,
    },
    /// Delete KEY (prints 1 if it existed, else 0), or every key under --prefix (prints how many).
    Delete {
        /// The key to delete.
        #[arg(required_unless_present_any = ["prefix", "all"], conflicts_with_all = ["prefix", "all"])]
        key: Option<String>,
        /// Delete every key that starts with P instead, atomically on each shard (as `etcdctl del
        /// --prefix`); an empty P is refused unless --all is given too.
        #[arg(long, value_name = "P")]
        prefix: Option<String>,
        /// Delete every key of the cluster (alone, or to allow an empty --prefix).
        #[arg(long)]
        all: bool,
    },
    /// Atomic transaction read from stdin in etcdctl's txn grammar: compares, a blank line, the
    /// operations run if they all hold, a blank line, the operations run otherwise.
    ///
    /// Compares: value("K") = "V", version("K") > "0", create("K") = "5", mod("K") < "9" (=, !=,
    /// <, >). Operations: put K V, get K, del K. Every key must be in one shard. Prints SUCCESS
    /// or FAILURE, then one result per operation (put: OK, del: 1 or 0, get: KEY and VALUE
    /// lines); exit 0 on SUCCESS, 1 on FAILURE.
    Txn,
    /// Set KEY to NEW only if its value is --expected OLD, or only if it is --absent.
    Cas {
        /// The key to compare and set.
        key: String,
        /// The value to set when the comparison holds.
        new: String,
        /// Swap only if the current value is exactly this (exit 1 otherwise).
        #[arg(long, value_name = "OLD", conflicts_with = "absent", required_unless_present = "absent")]
        expected: Option<String>,
        /// Swap only if the key does not exist (exit 1 otherwise).
        #[arg(long)]
        absent: bool,
    },
    /// List keys (and values) in key order.
    Scan {
        /// Only keys that start with this (default: every key).
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many keys in total [default: all].
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Read this node's local state of every shard (may be behind the leaders).
        #[arg(long)]
        stale: bool,
    },
    /// Cluster administration.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Closed-loop load generator: N clients, one connection and one request in flight each.
    ///
    /// Prints a summary (ops, errors, elapsed, throughput, latency p50/p90/p99/p99.9/max of
    /// successful requests); with --json exactly one JSON object on stdout. Exits 3 if no
    /// request succeeded.
    Bench(BenchArgs),
    /// Alarms (admin): NOSPACE, raised when a node's stored data exceeds its quota or its disk
    /// fills; while one is raised the cluster refuses writes that add data (exit 3, "NOSPACE").
    Alarm {
        #[command(subcommand)]
        command: AlarmCommand,
    },
    /// Defragment (admin): rewrite each shard's state machine file on a node in key order and
    /// swap it in, so that it takes no more room than its data needs (etcdctl's `defrag`).
    /// That node's writes to a shard wait while the shard is copied (reads go on); do one node
    /// at a time. Needs free disk space for the copy (up to the file's size; the data it holds,
    /// with slack, is enough). Prints one line per shard: node, shard, bytes before and after,
    /// keys, seconds. Waits up to an hour per node (not `--timeout`).
    Defrag {
        /// The node to defragment (default: the node that answers).
        #[arg(long, value_name = "NODE_ID", conflicts_with = "cluster")]
        node: Option<u64>,
        /// Every member, one after another (stops at the first that fails).
        #[arg(long)]
        cluster: bool,
    },
    /// Backups: save every shard to a file (admin), or check a saved file.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Client tokens: create, list, revoke.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Wait until the node behind --data-dir (its ticket file may not exist yet) or each node
    /// named by --ticket serves: it answers, and every shard it hosts has a leader (a node in no
    /// cluster yet, started with --no-init, only has to answer).
    ///
    /// Exits 0 once it does, 3 when --timeout passes first, 2 for an invalid ticket, 4 when the
    /// node refuses the token.
    Wait,
    /// Print a shell completion script for aspen-cli on stdout, e.g.
    /// `aspen-cli completions bash > /etc/bash_completion.d/aspen-cli`.
    Completions {
        /// The shell.
        shell: CompletionShell,
    },
    /// Write man pages generated from the command-line definitions into DIR: aspen-cli.1, one
    /// aspen-cli-<command>.1 per command (and per subcommand), and aspen-node.1.
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        out_dir: PathBuf,
    },
}

/// Shells `aspen-cli completions` writes scripts for.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Concurrent clients, each with its own connection; client i dials ticket i % tickets first.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=aspen_bench::MAX_CLIENTS as u64))]
    clients: u64,
    /// Stop after this many requests in total (not counting warm-up).
    #[arg(long, conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Stop after this many seconds of measurement [default: 10, unless --requests].
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Bytes per value written.
    #[arg(long, default_value_t = 256, value_name = "BYTES")]
    value_size: usize,
    /// Number of distinct keys (KEY_PREFIX + an 8-digit number).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    key_space: u64,
    /// Request mix; get and mixed pre-populate the key space first (not counted).
    #[arg(long, value_enum, default_value_t = BenchOp::Put)]
    op: BenchOp,
    /// Fraction of gets for --op mixed (0..1).
    #[arg(long, default_value_t = 0.5, value_name = "R")]
    read_ratio: f64,
    /// Consistency of the gets.
    #[arg(long, value_enum, default_value_t = BenchConsistency::Linearizable)]
    consistency: BenchConsistency,
    /// Seconds to run the workload before measuring (not counted).
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    warmup: f64,
    /// Use keys in order (0, 1, 2, … wrapping) instead of uniformly at random.
    #[arg(long)]
    sequential_keys: bool,
    /// Prefix of the keys the benchmark writes and reads.
    #[arg(long, default_value = "bench/")]
    key_prefix: String,
    /// Print ops/s every second on stderr even when stderr is not a terminal.
    #[arg(long)]
    progress: bool,
    /// --op watch: watches of KEY_PREFIX open during the run (spread over the members; 0: the
    /// same paced puts with no watch, the baseline).
    #[arg(long, default_value_t = 100, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=10_000))]
    watchers: u64,
    /// --op watch: connections the watches share (watch i on connection i % N, each watch a
    /// stream of its own) [default: one per watch].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    watch_conns: Option<u64>,
    /// --op watch: puts per second under KEY_PREFIX (paced over --clients).
    #[arg(long, default_value_t = 1000.0, value_name = "PUTS_PER_SEC")]
    rate: f64,
    /// --op keepalive: leases renewed in turn [default: one per client].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    leases: Option<u64>,
    /// --op keepalive: leave the leases granted (TTL 600 s) instead of revoking them (to
    /// measure what idle leases cost).
    #[arg(long)]
    keep_leases: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BenchOp {
    Put,
    Get,
    Mixed,
    /// Lease keep-alives, closed loop (leases granted first, revoked after).
    Keepalive,
    /// --watchers watches of the prefix while puts arrive at --rate: event delivery delay.
    Watch,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BenchConsistency {
    Linearizable,
    Stale,
}

impl BenchArgs {
    fn to_config(&self) -> Result<BenchConfig, String> {
        let seconds = |flag: &str, v: f64, zero_ok: bool| {
            if v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) && v < 1e9 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(format!(
                    "--{flag} must be a {} number of seconds (got {v})",
                    if zero_ok { "non-negative" } else { "positive" }
                ))
            }
        };
        let stop = match (self.requests, self.duration) {
            (Some(n), _) => Stop::Requests(n),
            (None, Some(d)) => Stop::Duration(seconds("duration", d, false)?),
            (None, None) => Stop::Duration(Duration::from_secs(10)),
        };
        if !(0.0..=1.0).contains(&self.read_ratio) {
            return Err(format!("--read-ratio must be between 0 and 1 (got {})", self.read_ratio));
        }
        let config = BenchConfig {
            clients: self.clients as usize,
            stop,
            value_size: self.value_size,
            key_space: self.key_space,
            workload: match self.op {
                BenchOp::Put | BenchOp::Keepalive | BenchOp::Watch => Workload::Put,
                BenchOp::Get => Workload::Get,
                BenchOp::Mixed => Workload::Mixed,
            },
            read_ratio: self.read_ratio,
            consistency: match self.consistency {
                BenchConsistency::Linearizable => ReadConsistency::Linearizable,
                BenchConsistency::Stale => ReadConsistency::Stale,
            },
            warmup: seconds("warmup", self.warmup, true)?,
            sequential_keys: self.sequential_keys,
            key_prefix: self.key_prefix.clone(),
            ..BenchConfig::default()
        };
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Leader, term, voters, learners and last applied index of every shard.
    Status,
    /// Make a node started with --no-init a one-node cluster (with its claim token: read from
    /// DIR/claim.token of --data-dir unless --claim-token is given).
    Init {
        /// The node's claim token (its data dir's `claim.token`).
        #[arg(long, value_name = "TOKEN")]
        claim_token: Option<String>,
    },
    /// Add the node behind TICKET as a learner (it catches up, but does not vote).
    AddLearner {
        /// The new member's ticket (its `node.ticket`).
        #[arg(value_name = "TICKET")]
        member_ticket: String,
        /// A node started with --no-init joins only with its claim token (its `claim.token`).
        #[arg(long, value_name = "TOKEN")]
        claim_token: Option<String>,
    },
    /// Make learner ID a voter.
    Promote {
        /// The node id of the learner.
        #[arg(value_name = "ID")]
        node_id: u64,
    },
    /// Remove node ID from the cluster.
    Remove {
        /// The node id of the member to remove.
        #[arg(value_name = "ID")]
        node_id: u64,
    },
    /// Move the leadership of SHARD to voter NODE.
    MoveLeader {
        /// The shard (0 when not sharded).
        shard: u32,
        /// The node id of the voter that should lead it.
        #[arg(value_name = "NODE")]
        node_id: u64,
    },
    /// Spread shard leaders evenly over the voters.
    BalanceLeaders,
    /// Print a join token for `aspen-node --join TICKET --join-token TOKEN` (admin).
    JoinToken {
        /// Seconds the token is valid for.
        #[arg(long, value_name = "SECONDS", default_value_t = aspen::cluster::tokens::DEFAULT_JOIN_TTL_SECS, value_parser = clap::value_parser!(u64).range(1..))]
        ttl: u64,
        /// Admit one node only (joins of that node may retry with it).
        #[arg(long)]
        single_use: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AuthCommand {
    /// Client tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

/// How long `defrag` waits for one node.
const DEFRAG_WAIT: Duration = Duration::from_secs(3600);

#[derive(Subcommand, Debug)]
enum AlarmCommand {
    /// List the raised alarms: one line each (node, alarm, reason); nothing when none is.
    List,
    /// Clear every alarm, once space is freed (writes resume at once); a node whose condition
    /// persists raises its alarm again within seconds. Prints the alarms cleared.
    Disarm,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Save a backup of every shard to FILE (admin): each shard at one applied index that
    /// includes every write acknowledged before the save began, with a header (cluster, shards,
    /// indexes, data digests, Aspen version) and checksums; written to a temp file beside FILE
    /// and renamed into place. `aspen-node restore FILE --data-dir DIR` makes a new cluster of
    /// it. Prints one line per shard (with --json, the header as JSON).
    Save {
        /// Where to write the backup (replaced if it exists).
        file: PathBuf,
    },
    /// Check FILE (header, checksums: the whole file is read) and print what it holds; exit 2
    /// if it is not a complete, undamaged backup. Needs no cluster.
    Status {
        /// The backup file.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum LeaseCommand {
    /// Grant a lease of TTL_SECONDS; prints its id (16 hex digits).
    Grant {
        /// Seconds the lease lives without a keep-alive.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        ttl_seconds: u64,
    },
    /// Keep lease ID alive until interrupted, printing its TTL on each refresh (every third of
    /// it). Exit 1 once the lease does not exist (expired or revoked).
    Keepalive {
        /// The lease's id (1 to 16 hex digits).
        id: String,
        /// Refresh once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Revoke lease ID and delete every key attached to it (exit 1 if there is no such lease).
    Revoke {
        /// The lease's id (1 to 16 hex digits).
        id: String,
    },
    /// Print the seconds lease ID has left; with --keys, then its keys, one per line.
    Ttl {
        /// The lease's id (1 to 16 hex digits).
        id: String,
        /// Also list the keys attached to it (every shard).
        #[arg(long)]
        keys: bool,
    },
    /// List every lease (one id per line).
    List,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a new token (admin): read = get and scan; write = put, delete, cas, txn; admin =
    /// membership, leader moves, tokens, join tokens.
    Create {
        /// Allow reads (get, scan).
        #[arg(long)]
        read: bool,
        /// Allow writes (put, delete, cas, txn, prefix delete).
        #[arg(long)]
        write: bool,
        /// Allow administration (membership, leader moves, tokens, join tokens).
        #[arg(long)]
        admin: bool,
        /// Only keys starting with P (repeat for several; default: every key).
        #[arg(long = "prefix", value_name = "P")]
        prefixes: Vec<String>,
        /// Seconds the token is valid for (default: until revoked).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        ttl: Option<u64>,
    },
    /// List the issued tokens (ids, permissions, prefixes, expiry; never the tokens).
    List,
    /// Revoke the token ID (16 hex digits, as `list` shows): every node refuses it within 2 s.
    Revoke {
        /// The token's id.
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Offline commands: nothing to connect to.
    match &cli.command {
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "aspen-cli", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Snapshot { command: SnapshotCommand::Status { file } } => return snapshot_status(cli.json, file),
        Command::Man { out_dir } => {
            return match write_man_pages(out_dir) {
                Ok(n) => {
                    if !cli.json {
                        println!("wrote {n} man pages to {}", out_dir.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => report(cli.json, "usage", &format!("man: {}: {e}", out_dir.display()), 2),
            };
        }
        _ => {}
    }
    if !(cli.timeout.is_finite() && cli.timeout > 0.0 && cli.timeout < 1e9) {
        return report(cli.json, "usage", "--timeout must be a positive number of seconds", 2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Not iroh's socket: when a member did not answer, the client's close gives up
                // after a moment (it would wait seconds for the dead peer to acknowledge) and iroh
                // then logs an ERROR about an endpoint dropped before its close ended — noise for
                // a command that reports its own outcome and exits. RUST_LOG shows it.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,iroh::socket=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let bench = match &cli.command {
        Command::Bench(args) if matches!(args.op, BenchOp::Keepalive | BenchOp::Watch) => {
            if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 1e6) {
                return report(cli.json, "usage", "bench: --rate must be between 0 and 1000000 puts per second", 2);
            }
            None
        }
        Command::Bench(args) => match args.to_config() {
            Ok(config) => Some((config, args.progress || std::io::stderr().is_terminal())),
            Err(msg) => return report(cli.json, "usage", &format!("bench: {msg}"), 2),
        },
        _ => None,
    };
    if let Command::Wait = cli.command {
        return match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt.block_on(wait_until_serving(&cli)),
            Err(e) => report(cli.json, "internal", &format!("cannot start runtime: {e}"), 3),
        };
    }
    let tickets = match resolve_tickets(&cli) {
        Ok(t) => t,
        Err(msg) => return report(cli.json, "invalid_ticket", &msg, 2),
    };
    let token = match resolve_token(&cli) {
        Ok(t) => t,
        Err(msg) => return report(cli.json, "usage", &msg, 2),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report(cli.json, "internal", &format!("cannot start runtime: {e}"), 3),
    };
    if let Some((config, progress)) = bench {
        return runtime.block_on(run_bench(tickets, token, &cli, config, progress));
    }
    if let Command::Bench(args) = &cli.command {
        return runtime.block_on(run_coordination_bench(tickets, token, &cli, args));
    }
    runtime.block_on(async move {
        let client = match AspenClient::connect(tickets, Duration::from_secs_f64(cli.timeout)).await {
            Ok(c) => with_token(c, token),
            Err(e) => return fail(cli.json, &e),
        };
        if let Command::Watch { .. } = &cli.command {
            let client = Arc::new(client);
            let code = match run_watch(&client, &cli).await {
                Ok(code) => code,
                Err(e) => fail(cli.json, &e),
            };
            if let Ok(client) = Arc::try_unwrap(client) {
                client.close().await;
            }
            return code;
        }
        let code = match run(&client, &cli).await {
            Ok(code) => code,
            Err(e) => fail(cli.json, &e),
        };
        client.close().await;
        code
    })
}

/// Writes the man pages of aspen-cli (one per command and subcommand) and aspen-node into `dir`;
/// returns how many.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut written = 0;
    let mut pages = vec![("aspen-cli".to_string(), Cli::command())];
    pages.push(("aspen-node".to_string(), aspen::config::NodeArgs::command()));
    while let Some((name, cmd)) = pages.pop() {
        if name != "aspen-node" {
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let sub_name = format!("{name}-{}", sub.get_name());
                pages.push((sub_name.clone(), sub.clone().name(sub_name)));
            }
        }
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out)?;
        written += 1;
    }
    Ok(written)
}

/// `aspen-cli bench`: runs the load generator of [`aspen_bench`] and prints its report.
async fn run_bench(
    tickets: Vec<NodeTicket>,
    token: Option<String>,
    cli: &Cli,
    config: BenchConfig,
    progress: bool,
) -> ExitCode {
    let backend = match AspenBackend::new(tickets, Duration::from_secs_f64(cli.timeout)) {
        Ok(b) => b.with_token(token),
        Err(e) => return report(cli.json, "usage", &format!("bench: {e}"), 2),
    };
    let tty = std::io::stderr().is_terminal();
    let progress: Option<ProgressFn> = progress.then(|| {
        Arc::new(move |p: &Progress| {
            let target = p.target.map(|t| format!("/{t}")).unwrap_or_default();
            let line = format!(
                "[{}] {:>5.1} s  {:>8.0} ops/s  {}{target} done  {} errors",
                p.phase,
                p.elapsed.as_secs_f64(),
                p.ops_per_sec,
                p.ops,
                p.errors
            );
            if tty {
                eprint!("\r\x1b[K{line}");
            } else {
                eprintln!("{line}");
            }
        }) as ProgressFn
    });
    let result = aspen_bench::run(&backend, &config, progress).await;
    if tty && std::io::stderr().is_terminal() {
        eprint!("\r\x1b[K");
    }
    match result {
        Err(e @ BenchError::Config(_)) => report(cli.json, "usage", &format!("bench: {e}"), 2),
        Err(e) => report(cli.json, "unavailable", &format!("bench: {e}"), 3),
        Ok(report) => {
            if cli.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            if report.all_failed() {
                let why = report.error_samples.first().map(|e| e.message.as_str()).unwrap_or("no request completed");
                eprintln!("aspen-cli bench: all {} requests failed: {why}", report.ops);
                let denied = report.error_samples.iter().any(|e| e.message.contains("permission denied"));
                return ExitCode::from(if denied { 4 } else { 3 });
            }
            ExitCode::SUCCESS
        }
    }
}

/// `aspen-cli bench --op keepalive|watch` ([`aspen_bench::coordination`]).
async fn run_coordination_bench(
    tickets: Vec<NodeTicket>,
    token: Option<String>,
    cli: &Cli,
    args: &BenchArgs,
) -> ExitCode {
    let backend = match AspenBackend::new(tickets, Duration::from_secs_f64(cli.timeout)) {
        Ok(b) => b.with_token(token),
        Err(e) => return report(cli.json, "usage", &format!("bench: {e}"), 2),
    };
    let duration = Duration::from_secs_f64(args.duration.unwrap_or(10.0).clamp(0.1, 1e6));
    let clients = args.clients as usize;
    let (text, json, ok) = if args.op == BenchOp::Keepalive {
        let leases = args.leases.map_or(clients, |l| l as usize);
        let (ttl, revoke) = if args.keep_leases { (600, false) } else { (60, true) };
        match aspen_bench::coordination::keepalive(&backend, clients, leases, ttl, duration, revoke).await {
            Ok(r) => (r.to_text(), serde_json::to_string(&r).unwrap_or_default(), r.ops > r.errors),
            Err(e) => return report(cli.json, "unavailable", &format!("bench: {e}"), 3),
        }
    } else {
        let prefix = format!("{}watch/", args.key_prefix);
        let watchers = args.watchers as usize;
        match aspen_bench::coordination::watch(
            &backend,
            watchers,
            args.watch_conns.map_or(watchers, |c| c as usize),
            clients,
            args.rate,
            duration,
            args.value_size,
            &prefix,
        )
        .await
        {
            Ok(r) => (r.to_text(), serde_json::to_string(&r).unwrap_or_default(), r.puts > 0),
            Err(e) => return report(cli.json, "unavailable", &format!("bench: {e}"), 3),
        }
    };
    if cli.json {
        println!("{json}");
    } else {
        print!("{text}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("aspen-cli bench: no request succeeded");
        ExitCode::from(3)
    }
}

/// `aspen-cli wait`: polls until every named node serves, at most `--timeout`.
async fn wait_until_serving(cli: &Cli) -> ExitCode {
    let deadline = Instant::now() + Duration::from_secs_f64(cli.timeout);
    let ticket_file = cli.data_dir.join("node.ticket");
    let mut last = String::new();
    loop {
        let tickets = if cli.ticket.iter().any(|t| !t.trim().is_empty()) || ticket_file.exists() {
            match resolve_tickets(cli) {
                Ok(t) => t,
                Err(msg) => return report(cli.json, "invalid_ticket", &msg, 2),
            }
        } else {
            last = format!("{} does not exist yet", ticket_file.display());
            Vec::new()
        };
        if !tickets.is_empty() {
            let token = match resolve_token(cli) {
                Ok(t) => t,
                Err(msg) => return report(cli.json, "usage", &msg, 2),
            };
            match not_serving(&tickets, token, deadline).await {
                Ok(None) => return ExitCode::SUCCESS,
                Ok(Some(why)) => last = why,
                // Waiting longer cannot help.
                Err(e) => return fail(cli.json, &e),
            }
        }
        if Instant::now() >= deadline {
            let msg = format!("timed out after {}s waiting for the node to serve: {last}", cli.timeout);
            return report(cli.json, "timeout", &msg, 3);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Why one of the nodes behind `tickets` does not serve yet (`None`: they all do); an error
/// when a node refuses the token.
async fn not_serving(
    tickets: &[NodeTicket],
    token: Option<String>,
    deadline: Instant,
) -> Result<Option<String>, ClientError> {
    for ticket in tickets {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), Duration::from_secs(2));
        let client = match AspenClient::connect(vec![ticket.clone()], left).await {
            Ok(c) => with_token(c, token.clone()),
            Err(e) => return Ok(Some(format!("node {}: {e}", ticket.node_id))),
        };
        let answer = tokio::time::timeout(left, client.request(aspen::api::ClientRequest::NodeStatus)).await;
        client.close().await;
        let why = match answer {
            Err(_) => format!("node {} did not answer within {left:?}", ticket.node_id),
            Ok(Err(e @ ClientError::Api(ApiError::PermissionDenied(_)))) => return Err(e),
            Ok(Err(e)) => format!("node {}: {e}", ticket.node_id),
            // Another member may answer after a failover: only the node itself counts.
            // A node that is in no cluster yet (`--no-init`, waiting for `cluster init` or
            // `add-learner`) serves as soon as it answers: no leader will come by itself.
            Ok(Ok(aspen::api::ClientResponse::NodeStatus(st)))
                if st.node_id == ticket.node_id && st.shards.iter().all(|s| s.voters.is_empty()) =>
            {
                continue
            }
            Ok(Ok(aspen::api::ClientResponse::NodeStatus(st))) if st.node_id == ticket.node_id => {
                match st.shards.iter().find(|s| s.leader.is_none()) {
                    Some(s) => format!("shard {} of node {} has no leader yet", s.shard, st.node_id),
                    None => continue,
                }
            }
            Ok(Ok(other)) => format!("node {}: unexpected answer {other:?}", ticket.node_id),
        };
        return Ok(Some(why));
    }
    Ok(None)
}

fn with_token(client: AspenClient, token: Option<String>) -> AspenClient {
    match token {
        Some(t) => client.with_token(t),
        None => client,
    }
}

/// The token to send: `--token` (or `ASPEN_TOKEN`), else `--token-file`, else — when the
/// ticket comes from the data dir — the node's `admin.token` there (local access is admin
/// access). `None`: send none.
fn resolve_token(cli: &Cli) -> Result<Option<String>, String> {
    if let Some(t) = cli.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(Some(t.to_string()));
    }
    if let Some(path) = &cli.token_file {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?;
        let t = text.trim();
        if t.is_empty() {
            return Err(format!("--token-file {} is empty", path.display()));
        }
        return Ok(Some(t.to_string()));
    }
    let ticket_from_data_dir = !cli.ticket.iter().any(|t| !t.trim().is_empty());
    if ticket_from_data_dir {
        if let Ok(text) = std::fs::read_to_string(cli.data_dir.join(aspen::cluster::tokens::ADMIN_TOKEN_FILE)) {
            let t = text.trim();
            if !t.is_empty() {
                return Ok(Some(t.to_string()));
            }
        }
    }
    Ok(None)
}

/// A value from stdin, at most one frame's worth (a larger one could never be written).
fn read_value_from_stdin() -> Result<Vec<u8>, ClientError> {
    use std::io::Read;
    let limit = aspen::api::MAX_FRAME_BYTES as u64;
    let mut value = Vec::new();
    std::io::stdin()
        .take(limit + 1)
        .read_to_end(&mut value)
        .map_err(|e| ClientError::Api(ApiError::InvalidRequest(format!("cannot read the value from stdin: {e}"))))?;
    if value.len() as u64 > limit {
        return Err(ClientError::Api(ApiError::TooLarge {
            what: "value from stdin".into(),
            size: value.len() as u64,
            limit,
        }));
    }
    Ok(value)
}

fn resolve_tickets(cli: &Cli) -> Result<Vec<NodeTicket>, String> {
    let raw: Vec<String> = if cli.ticket.iter().any(|t| !t.trim().is_empty()) {
        cli.ticket.iter().filter(|t| !t.trim().is_empty()).cloned().collect()
    } else {
        let path = cli.data_dir.join("node.ticket");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!("no --ticket given and cannot read {}: {e} (is a node running there?)", path.display())
        })?;
        text.split([',', '\n']).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
    };
    raw.iter().map(|t| NodeTicket::decode(t).map_err(|e| format!("invalid ticket {t:?}: {e}"))).collect()
}

/// Reports an error: the message on stderr and, under `--json`, one error object on stdout.
fn report(json: bool, kind: &str, message: &str, code: u8) -> ExitCode {
    eprintln!("aspen-cli: {message}");
    if json {
        println!("{}", json!({ "error": { "kind": kind, "message": message } }));
    }
    ExitCode::from(code)
}

fn fail(json: bool, e: &ClientError) -> ExitCode {
    let usage = matches!(
        e,
        ClientError::NoTickets
            | ClientError::Api(
                ApiError::InvalidRequest(_)
                    | ApiError::TooLarge { .. }
                    | ApiError::UnsupportedVersion { .. }
                    | ApiError::Refused(_)
            )
    );
    let code = match e {
        ClientError::Api(ApiError::PermissionDenied(_)) => 4,
        ClientError::Api(ApiError::Compacted { .. }) => 2,
        ClientError::Api(ApiError::LeaseNotFound { .. }) => 1,
        _ if usage => 2,
        _ => 3,
    };
    report(json, e.kind(), &e.to_string(), code)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Adds `bytes` to `obj` as `name` when they are UTF-8, else as `name_base64` (standard
/// alphabet, padded): JSON output never alters a key or value.
fn put_bytes(obj: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => obj.insert(name.to_string(), s.into()),
        Err(_) => obj.insert(format!("{name}_base64"), data_encoding::BASE64.encode(bytes).into()),
    };
}

fn kv_json(kv: &KeyValue) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    put_bytes(&mut obj, "key", &kv.key);
    put_bytes(&mut obj, "value", &kv.value);
    obj.insert("create_revision".into(), kv.create_revision.into());
    obj.insert("mod_revision".into(), kv.mod_revision.into());
    obj.insert("version".into(), kv.version.into());
    serde_json::Value::Object(obj)
}

/// Bytes for one field of plain `scan` output (`KEY<TAB>VALUE` lines): backslash, tab,
/// newline and carriage return become `\\`, `\t`, `\n`, `\r`, other control bytes and bytes
/// that are not UTF-8 become `\xNN`, so each entry is exactly one line with one tab.
fn escaped(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.extend_from_slice(b"\\\\"),
                '\t' => out.extend_from_slice(b"\\t"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                c if c.is_ascii_control() => out.extend_from_slice(format!("\\x{:02x}", c as u32).as_bytes()),
                c => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        for b in chunk.invalid() {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
    }
    out
}

fn shard_json(s: &ShardStatus) -> serde_json::Value {
    json!({
        "shard": s.shard,
        "leader": s.leader,
        "term": s.term,
        "voters": s.voters,
        "learners": s.learners,
        "last_applied": s.last_applied,
        "last_log_index": s.last_log_index,
        "role": s.role,
        // The replica's state digest and the applied index it describes (equal on replicas
        // that applied the same index).
        "digest": s.digest.map(|d| d.hex()),
        "digest_index": s.digest.map(|d| d.applied_index),
        "health": {
            "healthy": s.health.healthy,
            "leader_known": s.health.leader_known,
            "heartbeat_age_ms": s.health.heartbeat_age_ms,
            "apply_lag": s.health.apply_lag,
            "reason": s.health.reason,
        },
    })
}

fn print_membership(cli: &Cli, s: &ShardStatus) {
    if cli.json {
        println!("{}", shard_json(s));
    } else {
        let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        println!("voters: {}  learners: {}", ids(&s.voters), ids(&s.learners));
    }
}

fn print_leaders(cli: &Cli, shards: &[ShardStatus]) {
    if cli.json {
        println!("{}", serde_json::Value::Array(shards.iter().map(shard_json).collect()));
    } else {
        for s in shards {
            let leader = s.leader.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
            println!("shard {}: leader {leader} (term {})", s.shard, s.term);
        }
    }
}

/// `txn` output: SUCCESS or FAILURE, then each operation's result after a blank line (as
/// etcdctl prints it); `--json`: one object with `succeeded`, `revision` and `results`.
fn print_txn(cli: &Cli, answer: &TxnResponse) {
    if cli.json {
        let results: Vec<serde_json::Value> = answer
            .results
            .iter()
            .map(|r| match r {
                TxnOpResult::Put { revision } => json!({ "put": { "revision": revision } }),
                TxnOpResult::Delete { deleted } => json!({ "delete": { "deleted": deleted } }),
                TxnOpResult::Get(kv) => json!({ "get": kv.as_ref().map(kv_json) }),
            })
            .collect();
        println!("{}", json!({ "succeeded": answer.succeeded, "revision": answer.revision, "results": results }));
        return;
    }
    println!("{}", if answer.succeeded { "SUCCESS" } else { "FAILURE" });
    for r in &answer.results {
        println!();
        match r {
            TxnOpResult::Put { .. } => println!("OK"),
            TxnOpResult::Delete { deleted } => println!("{}", u8::from(*deleted)),
            TxnOpResult::Get(Some(kv)) => {
                print_line(&kv.key);
                print_line(&kv.value);
            }
            TxnOpResult::Get(None) => {}
        }
    }
}

fn print_line(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.write_all(b"\n");
}

async fn run(client: &AspenClient, cli: &Cli) -> Result<ExitCode, ClientError> {
    let consistency = |stale: bool| {
        if stale {
            ReadConsistency::Stale
        } else {
            ReadConsistency::Linearizable
        }
    };
    match &cli.command {
        Command::Put { key, value, lease, ttl } => {
            let lease = lease.as_deref().map(lease_id).transpose()?;
            let value = match value {
                Some(v) => v.clone().into_bytes(),
                None => read_value_from_stdin()?,
            };
            let (revision, lease) = match (lease, ttl) {
                (Some(id), _) => (client.put_with_lease(key.as_bytes(), value, id).await?, Some(id)),
                (None, Some(ttl)) => {
                    let (id, _) = client.grant_lease(*ttl).await?;
                    (client.put_with_lease(key.as_bytes(), value, id).await?, Some(id))
                }
                (None, None) => (client.put(key.as_bytes(), value).await?, None),
            };
            if cli.json {
                match lease {
                    Some(id) => println!("{}", json!({ "revision": revision, "lease": format_lease_id(id) })),
                    None => println!("{}", json!({ "revision": revision })),
                }
            } else {
                println!("OK");
            }
        }
        Command::Lease { command } => return run_lease(client, cli, command).await,
        Command::Get { key, stale } => match client.get_with(key.as_bytes(), consistency(*stale)).await? {
            Some(kv) if cli.json => println!("{}", kv_json(&kv)),
            Some(kv) => print_line(&kv.value),
            None => return Ok(report(cli.json, "not_found", &format!("key {key:?} not found"), 1)),
        },
        Command::Delete { key: Some(key), .. } => {
            let deleted = client.delete(key.as_bytes()).await?;
            if cli.json {
                println!("{}", json!({ "deleted": deleted }));
            } else {
                println!("{}", u8::from(deleted));
            }
        }
        Command::Delete { key: None, prefix, all } => {
            let prefix = prefix.as_deref().unwrap_or("");
            if prefix.is_empty() && !all {
                let msg = "an empty --prefix deletes every key; add --all if that is what you want";
                return Ok(report(cli.json, "usage", msg, 2));
            }
            let deleted = client.delete_prefix(prefix.as_bytes()).await?;
            if cli.json {
                println!("{}", json!({ "deleted": deleted }));
            } else {
                println!("{deleted}");
            }
        }
        Command::Txn => {
            use std::io::Read;
            let mut input = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut input) {
                return Ok(report(cli.json, "usage", &format!("cannot read the txn from stdin: {e}"), 2));
            }
            let parsed = match txn::parse(&input) {
                Ok(t) => t,
                Err(e) => return Ok(report(cli.json, "usage", &format!("txn: {e}"), 2)),
            };
            let answer = client.txn(parsed.compares, parsed.success, parsed.failure).await?;
            print_txn(cli, &answer);
            if !answer.succeeded {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Cas { key, new, expected, absent } => {
            let expected = if *absent { None } else { expected.as_ref().map(|e| e.as_bytes().to_vec()) };
            match client.cas(key.as_bytes(), expected, new.as_bytes()).await? {
                CasOutcome::Swapped(revision) => {
                    if cli.json {
                        println!("{}", json!({ "succeeded": true, "revision": revision }));
                    } else {
                        println!("OK");
                    }
                }
                CasOutcome::Mismatch(current) => {
                    if cli.json {
                        let mut obj = serde_json::Map::new();
                        obj.insert("succeeded".into(), false.into());
                        match &current {
                            Some(v) => put_bytes(&mut obj, "current", v),
                            None => {
                                obj.insert("current".into(), serde_json::Value::Null);
                            }
                        }
                        println!("{}", serde_json::Value::Object(obj));
                    }
                    match current {
                        Some(v) => eprintln!("{}", text(&v)),
                        None => eprintln!("not found"),
                    }
                    return Ok(ExitCode::from(1));
                }
            }
        }
        Command::Scan { prefix, limit, stale } => {
            let entries = client.scan(prefix.as_bytes(), limit.unwrap_or(usize::MAX), consistency(*stale)).await?;
            if cli.json {
                println!("{}", serde_json::Value::Array(entries.iter().map(kv_json).collect()));
            } else {
                let mut out = std::io::stdout().lock();
                for kv in entries {
                    let _ = out.write_all(&escaped(&kv.key));
                    let _ = out.write_all(b"\t");
                    let _ = out.write_all(&escaped(&kv.value));
                    let _ = out.write_all(b"\n");
                }
            }
        }
        Command::Cluster { command: ClusterCommand::Status } => {
            let status = client.cluster_status().await?;
            if cli.json {
                let nodes: Vec<_> = status
                    .nodes
                    .iter()
                    .map(|n| {
                        json!({
                            "node_id": n.node_id,
                            "reachable": n.status.is_some(),
                            "error": n.error,
                            "shards": n.status.as_ref().map(|s| s.shards.iter().map(shard_json).collect::<Vec<_>>()),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    json!({
                        "node_id": status.node_id,
                        "cluster_id": status.cluster_id.to_string(),
                        "cluster_name": status.cluster_name,
                        "shards": status.shards.iter().map(shard_json).collect::<Vec<_>>(),
                        "nodes": nodes,
                    })
                );
            } else {
                println!(
                    "cluster {} ({}), answered by node {}",
                    status.cluster_name, status.cluster_id, status.node_id
                );
                println!(
                    "{:>5}  {:>5}  {:>6}  {:>5}  {:<9}  {:<16}  {:<16}  {:>12}  {:<24}  health",
                    "node", "shard", "leader", "term", "role", "voters", "learners", "last_applied", "digest"
                );
                for n in &status.nodes {
                    let Some(ns) = &n.status else {
                        println!("{:>5}  unreachable: {}", n.node_id, n.error.as_deref().unwrap_or("?"));
                        continue;
                    };
                    for s in &ns.shards {
                        let leader = s.leader.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
                        let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
                        println!(
                            "{:>5}  {:>5}  {:>6}  {:>5}  {:<9}  {:<16}  {:<16}  {:>12}  {:<24}  {}",
                            n.node_id,
                            s.shard,
                            leader,
                            s.term,
                            s.role,
                            ids(&s.voters),
                            ids(&s.learners),
                            s.last_applied,
                            s.digest
                                .map(|d| format!("{}@{}", &d.hex()[..12], d.applied_index))
                                .unwrap_or_else(|| "-".into()),
                            if s.health.healthy { "ok".to_string() } else { s.health.reason.clone() }
                        );
                    }
                }
            }
            // The table is printed either way; a member that did not answer makes it exit 3.
            let unreachable: Vec<u64> = status.nodes.iter().filter(|n| n.status.is_none()).map(|n| n.node_id).collect();
            if !unreachable.is_empty() {
                // The table (or JSON document) is the output; only the message goes to stderr.
                eprintln!("aspen-cli: unreachable member(s): {unreachable:?}");
                return Ok(ExitCode::from(3));
            }
        }
        Command::Cluster { command: ClusterCommand::AddLearner { member_ticket, claim_token } } => {
            let ticket = NodeTicket::decode(member_ticket)
                .map_err(|e| ClientError::Api(ApiError::InvalidRequest(format!("ticket: {e}"))))?;
            let status = match claim_token {
                Some(token) => client.add_learner_claimed(&ticket, token).await?,
                None => client.add_learner(&ticket).await?,
            };
            print_membership(cli, &status);
        }
        Command::Cluster { command: ClusterCommand::Promote { node_id } } => {
            print_membership(cli, &client.promote(*node_id).await?);
        }
        Command::Cluster { command: ClusterCommand::Remove { node_id } } => {
            print_membership(cli, &client.remove(*node_id).await?);
        }
        Command::Cluster { command: ClusterCommand::MoveLeader { shard, node_id } } => {
            print_leaders(cli, &client.move_leader(*shard, *node_id).await?);
        }
        Command::Cluster { command: ClusterCommand::BalanceLeaders } => {
            print_leaders(cli, &client.balance_leaders().await?);
        }
        Command::Cluster { command: ClusterCommand::Init { claim_token } } => {
            // The token from the flag, else from the node's data dir (local access).
            let local = std::fs::read_to_string(cli.data_dir.join(aspen::cluster::claim::FILE_NAME)).ok();
            let initialized = match claim_token.clone().or(local) {
                Some(token) => client.cluster_init_claimed(&token).await?,
                None => client.cluster_init().await?,
            };
            if cli.json {
                println!("{}", json!({ "initialized": initialized }));
            } else if initialized {
                println!("initialized a new cluster");
            } else {
                println!("already initialized");
            }
        }
        Command::Cluster { command: ClusterCommand::JoinToken { ttl, single_use } } => {
            let (info, token) = client.create_join_token(*ttl, *single_use).await?;
            if cli.json {
                println!(
                    "{}",
                    json!({ "id": format_id(info.id), "token": token, "expires_at": info.expires_at, "single_use": single_use })
                );
            } else {
                println!("{token}");
            }
        }
        Command::Auth { command: AuthCommand::Token { command } } => return run_token(client, cli, command).await,
        // Run without a shared client, in `run_bench` and `wait_until_serving`; `run_watch`.
        Command::Bench(_) | Command::Wait | Command::Watch { .. } => {}
        Command::Snapshot { command: SnapshotCommand::Save { file } } => return snapshot_save(client, cli, file).await,
        Command::Defrag { node, cluster } => {
            let nodes: Vec<Option<u64>> = if *cluster {
                client.cluster_status().await?.nodes.iter().map(|n| Some(n.node_id)).collect()
            } else {
                vec![*node]
            };
            let mut reports = Vec::new();
            for id in nodes {
                let report = client.defragment(id, DEFRAG_WAIT).await?;
                if !cli.json {
                    for s in &report.shards {
                        println!(
                            "node {} shard {}: {} -> {} bytes, {} keys, {:.1} s",
                            report.node_id,
                            s.shard,
                            s.before_bytes,
                            s.after_bytes,
                            s.keys,
                            s.millis as f64 / 1000.0
                        );
                    }
                }
                reports.push(report);
            }
            if cli.json {
                let nodes: Vec<_> = reports
                    .iter()
                    .map(|r| {
                        let shards: Vec<_> = r
                            .shards
                            .iter()
                            .map(|s| {
                                json!({ "shard": s.shard, "before_bytes": s.before_bytes, "after_bytes": s.after_bytes,
                                        "keys": s.keys, "millis": s.millis })
                            })
                            .collect();
                        json!({ "node_id": r.node_id, "shards": shards })
                    })
                    .collect();
                println!("{}", json!({ "nodes": nodes }));
            }
        }
        Command::Alarm { command } => {
            let request = match command {
                AlarmCommand::List => ClientRequest::AlarmList,
                AlarmCommand::Disarm => ClientRequest::AlarmDisarm,
            };
            let alarms = match client.request(request).await? {
                ClientResponse::Alarms(a) => a,
                other => return Err(ClientError::Protocol(format!("unexpected answer {other:?}"))),
            };
            if cli.json {
                let list: Vec<_> = alarms
                    .iter()
                    .map(|a| json!({ "node_id": a.node_id, "alarm": a.alarm, "reason": a.reason, "raised_unix_ms": a.raised_unix_ms }))
                    .collect();
                println!("{}", json!({ "alarms": list }));
            } else {
                for a in &alarms {
                    println!("node {}: {} ({})", a.node_id, a.alarm, a.reason);
                }
            }
        }
        // Answered in `main` before any connection.
        Command::Completions { .. }
        | Command::Man { .. }
        | Command::Snapshot { command: SnapshotCommand::Status { .. } } => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a backup's shards: one line each (with --json, the header).
fn print_backup(json: bool, header: &aspen::api::backup::BackupHeader, what: &str) {
    if json {
        println!("{}", serde_json::to_string(header).unwrap_or_default());
        return;
    }
    println!(
        "{what}: cluster {} ({}), {} shard(s), {} bytes, Aspen {}",
        header.cluster_id, header.cluster_name, header.num_shards, header.body_bytes, header.aspen_version
    );
    for s in &header.shards {
        println!(
            "shard {}: index {}, term {}, {} bytes, data digest {}",
            s.shard, s.index, s.term, s.bytes, s.data_digest
        );
    }
}

/// `aspen-cli snapshot save FILE`.
async fn snapshot_save(client: &AspenClient, cli: &Cli, file: &std::path::Path) -> Result<ExitCode, ClientError> {
    let terminal = std::io::stderr().is_terminal();
    let progress = |p: aspen::client::SaveProgress| {
        if terminal {
            eprint!(
                "\rsaving shard {}/{}: {:.1} MiB (total {:.1} MiB)   ",
                p.shard + 1,
                p.num_shards,
                p.shard_bytes as f64 / 1048576.0,
                p.total_bytes as f64 / 1048576.0
            );
        }
    };
    let saved = client.save_backup(file, progress).await;
    if terminal {
        eprintln!();
    }
    match saved {
        Ok(header) => {
            print_backup(cli.json, &header, &format!("saved {}", file.display()));
            Ok(ExitCode::SUCCESS)
        }
        Err(aspen::client::SaveError::Client(e)) => Err(e),
        Err(e) => Ok(report(cli.json, "io", &format!("snapshot save: {e}"), 2)),
    }
}

/// `aspen-cli snapshot status FILE`: checks the whole file.
fn snapshot_status(json: bool, file: &std::path::Path) -> ExitCode {
    use aspen::api::backup::{read_header, verify_body};
    let checked = std::fs::File::open(file).map_err(|e| e.to_string()).and_then(|f| {
        let mut r = std::io::BufReader::with_capacity(1 << 20, f);
        let (header, _) = read_header(&mut r).map_err(|e| e.to_string())?;
        verify_body(&mut r, &header).map_err(|e| e.to_string())?;
        Ok(header)
    });
    match checked {
        Ok(header) => {
            print_backup(json, &header, &format!("{} is a complete backup", file.display()));
            ExitCode::SUCCESS
        }
        Err(e) => report(json, "invalid_backup", &format!("{}: {e}", file.display()), 2),
    }
}

/// `aspen-cli watch`: streams events until interrupted or the watch ends.
async fn run_watch(client: &Arc<AspenClient>, cli: &Cli) -> Result<ExitCode, ClientError> {
    let Command::Watch { key, prefix, prev_kv, from_revision, resume } = &cli.command else {
        return Ok(ExitCode::SUCCESS);
    };
    let start = match (from_revision, resume) {
        (Some(r), _) => WatchStart::FromRevision(*r),
        (None, Some(token)) => {
            WatchStart::After(parse_resume(token).map_err(|e| ClientError::Api(ApiError::InvalidRequest(e)))?)
        }
        (None, None) => WatchStart::Now,
    };
    let (key, is_prefix) = match (key, prefix) {
        (_, Some(p)) => (p.clone().into_bytes(), true),
        (Some(k), None) => (k.clone().into_bytes(), false),
        (None, None) => return Ok(report(cli.json, "usage", "give a KEY or --prefix P", 2)),
    };
    let request = WatchRequest { key, prefix: is_prefix, prev_kv: *prev_kv, start };
    let mut stream = client.watch(request).await?;
    let mut out = std::io::stdout().lock();
    // Where the printed events stand: each event's `resume` is the token right after it.
    let mut at = Vec::new();
    while let Some(item) = stream.next().await {
        match item? {
            WatchItem::Created(positions) => {
                at = positions.clone();
                if cli.json {
                    let line = json!({ "type": "created", "resume": format_resume(&positions) });
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
            }
            WatchItem::Events(events) => {
                for e in &events {
                    match at.iter_mut().find(|p: &&mut aspen::api::WatchPosition| p.shard == e.shard) {
                        Some(p) => *p = e.position(),
                        None => at.push(e.position()),
                    }
                    if cli.json {
                        let mut obj = serde_json::Map::new();
                        let kind = if e.kind == EventKind::Put { "put" } else { "delete" };
                        obj.insert("type".into(), kind.into());
                        put_bytes(&mut obj, "key", &e.key);
                        if e.kind == EventKind::Put {
                            put_bytes(&mut obj, "value", &e.value);
                        }
                        if *prev_kv {
                            if let Some(prev) = &e.prev_value {
                                put_bytes(&mut obj, "prev_value", prev);
                            }
                        }
                        obj.insert("mod_revision".into(), e.revision.into());
                        obj.insert("shard".into(), e.shard.into());
                        obj.insert("resume".into(), format_resume(&at).into());
                        let _ = writeln!(out, "{}", serde_json::Value::Object(obj));
                    } else {
                        let mut line = Vec::new();
                        match e.kind {
                            EventKind::Put => {
                                line.extend_from_slice(b"PUT\t");
                                line.extend(escaped(&e.key));
                                line.push(b'\t');
                                line.extend(escaped(&e.value));
                            }
                            EventKind::Delete => {
                                line.extend_from_slice(b"DELETE\t");
                                line.extend(escaped(&e.key));
                            }
                        }
                        if *prev_kv {
                            line.push(b'\t');
                            line.extend(escaped(e.prev_value.as_deref().unwrap_or_default()));
                        }
                        line.push(b'\n');
                        let _ = out.write_all(&line);
                    }
                    // Flushed per event: a script reading the pipe sees each one at once.
                    if out.flush().is_err() {
                        // The reader went away (a closed pipe): the watch is over.
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A lease id as commands take it: 1 to 16 hex digits, either case (a malformed one: exit 2).
fn lease_id(text: &str) -> Result<u64, ClientError> {
    parse_lease_id(text).map_err(|e| ClientError::Api(ApiError::InvalidRequest(e)))
}

/// `aspen-cli lease …`.
async fn run_lease(client: &AspenClient, cli: &Cli, command: &LeaseCommand) -> Result<ExitCode, ClientError> {
    match command {
        LeaseCommand::Grant { ttl_seconds } => {
            let (id, ttl) = client.grant_lease(*ttl_seconds).await?;
            if cli.json {
                println!("{}", json!({ "id": format_lease_id(id), "ttl": ttl }));
            } else {
                println!("{}", format_lease_id(id));
            }
        }
        LeaseCommand::Keepalive { id, once } => {
            let id = lease_id(id)?;
            loop {
                let every = match client.keep_alive_once(id).await {
                    Ok(ttl) => {
                        if cli.json {
                            println!("{}", json!({ "id": format_lease_id(id), "ttl": ttl }));
                        } else {
                            println!("{ttl}");
                        }
                        let _ = std::io::stdout().flush();
                        if *once {
                            break;
                        }
                        Duration::from_millis(ttl.max(1) * 1000 / 3)
                    }
                    // Gone, refused, or malformed: say so and stop.
                    Err(e @ ClientError::Api(_)) => return Err(e),
                    Err(e) if *once => return Err(e),
                    // Unreachable for now: keep trying while the lease may still live.
                    Err(e) => {
                        eprintln!("aspen-cli: keep-alive failed, retrying: {e}");
                        Duration::from_millis(500)
                    }
                };
                tokio::time::sleep(every).await;
            }
        }
        LeaseCommand::Revoke { id } => {
            let id = lease_id(id)?;
            let deleted = client.revoke_lease(id).await?;
            if cli.json {
                println!("{}", json!({ "revoked": format_lease_id(id), "deleted": deleted }));
            } else {
                println!("OK");
            }
        }
        LeaseCommand::Ttl { id, keys } => {
            let status = client.lease_ttl(lease_id(id)?, *keys).await?;
            if cli.json {
                // `keys` is empty without --keys.
                let key_list: Vec<serde_json::Value> = status
                    .keys
                    .iter()
                    .map(|k| match std::str::from_utf8(k) {
                        Ok(s) => s.into(),
                        Err(_) => json!({ "key_base64": data_encoding::BASE64.encode(k) }),
                    })
                    .collect();
                let obj = json!({
                    "id": format_lease_id(status.id),
                    "ttl": status.ttl_secs,
                    "granted_ttl": status.granted_ttl_secs,
                    "keys": key_list,
                });
                println!("{obj}");
            } else {
                println!("{}", status.ttl_secs);
                for k in &status.keys {
                    print_line(&escaped(k));
                }
            }
        }
        LeaseCommand::List => {
            let leases = client.leases().await?;
            if cli.json {
                let list: Vec<serde_json::Value> = leases
                    .iter()
                    .map(|l| json!({ "id": format_lease_id(l.id), "granted_ttl": l.granted_ttl_secs }))
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                for l in &leases {
                    println!("{}", format_lease_id(l.id));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn token_json(info: &TokenInfo) -> serde_json::Value {
    let prefixes: Vec<String> = info.prefixes.iter().map(|p| text(p)).collect();
    json!({
        "id": format_id(info.id),
        "kind": info.kind,
        "read": info.read,
        "write": info.write,
        "admin": info.admin,
        "prefixes": prefixes,
        "issuer": info.issuer,
        "issued_at": info.issued_at,
        "expires_at": info.expires_at,
        "revoked": info.revoked,
        "note": info.note,
    })
}

fn permissions(info: &TokenInfo) -> String {
    aspen::api::permission_names(info.read, info.write, info.admin)
}

/// `aspen-cli auth token …`.
async fn run_token(client: &AspenClient, cli: &Cli, command: &TokenCommand) -> Result<ExitCode, ClientError> {
    match command {
        TokenCommand::Create { read, write, admin, prefixes, ttl } => {
            if !(*read || *write || *admin) {
                return Err(ClientError::Api(ApiError::InvalidRequest(
                    "give at least one of --read, --write, --admin".into(),
                )));
            }
            let prefixes = prefixes.iter().map(|p| p.as_bytes().to_vec()).collect();
            let (info, token) = client.create_token(*read, *write, *admin, prefixes, *ttl).await?;
            if cli.json {
                let mut obj = token_json(&info);
                obj["token"] = token.into();
                println!("{obj}");
            } else {
                println!("{token}");
            }
        }
        TokenCommand::List => {
            let list = client.list_tokens().await?;
            if cli.json {
                println!("{}", serde_json::Value::Array(list.iter().map(token_json).collect()));
            } else {
                for info in &list {
                    let prefixes: Vec<String> = info.prefixes.iter().map(|p| text(p)).collect();
                    let expires = info.expires_at.map(|e| e.to_string()).unwrap_or_else(|| "never".into());
                    println!(
                        "{}\t{}\t{}\texpires={}{}{}",
                        format_id(info.id),
                        permissions(info),
                        if prefixes.is_empty() { "*".to_string() } else { prefixes.join(",") },
                        expires,
                        if info.revoked { "\trevoked" } else { "" },
                        if info.note.is_empty() { String::new() } else { format!("\t{}", info.note) },
                    );
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let Some(parsed) = parse_id(id) else {
                return Err(ClientError::Api(ApiError::InvalidRequest(format!(
                    "{id:?} is not a token id (1 to 16 hex digits, as auth token list shows)"
                ))));
            };
            match client.revoke_token(parsed).await {
                Err(ClientError::Api(ApiError::InvalidRequest(m))) if m.starts_with("no token with id") => {
                    // Not found: exit 1, as for a missing key.
                    return Ok(report(cli.json, "not_found", &m, 1));
                }
                r => r?,
            }
            if cli.json {
                println!("{}", json!({ "revoked": format_id(parsed) }));
            } else {
                println!("revoked {}", format_id(parsed));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag and positional argument of every command says what it is for in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path}: {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "aspen-cli", &mut missing);
        assert!(missing.is_empty(), "arguments without help text:\n{}", missing.join("\n"));
    }
}
