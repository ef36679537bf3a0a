//! Node configuration: defaults, the TOML file, `ASPEN_*` environment variables and command-line
//! flags, merged with the precedence CLI > env > TOML > defaults, then validated.
//!
//! This module owns parsing and validation only; it never opens files other than the config
//! file itself and never touches the network.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::api::{NodeId, MAX_NODE_ID};

/// Why a configuration was refused. Each message is one line an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}:\n{message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

/// Raft timing and log-compaction settings (per shard).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftConfig {
    /// Leader heartbeat interval. openraft 0.9 also uses it as the timeout of one AppendEntries
    /// round trip, so it must cover sending `max_append_bytes` and the follower's fsync.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log before it) after this many applied entries.
    pub snapshot_threshold: u64,
    /// … or once the log entries after the last snapshot hold this many bytes (encoded), so
    /// that the log's size is bounded whatever the batching puts in an entry. A budget of the
    /// node: split evenly among the shards it hosts ([`RaftConfig::log_bytes_per_shard`]).
    #[serde(default = "default_snapshot_log_bytes")]
    pub snapshot_log_bytes: u64,
    /// Log entries kept after a snapshot so that lagging followers can catch up without one.
    pub max_in_snapshot_log_to_keep: u64,
    /// Most entries in one AppendEntries message.
    pub max_append_entries: u64,
    /// Most payload bytes in one AppendEntries message (a single larger entry still goes alone).
    pub max_append_bytes: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_threshold: 20_000,
            snapshot_log_bytes: default_snapshot_log_bytes(),
            max_in_snapshot_log_to_keep: 1_000,
            max_append_entries: 512,
            max_append_bytes: 1024 * 1024,
        }
    }
}

impl RaftConfig {
    /// Each hosted shard's share of `snapshot_log_bytes`: a node's logs together hold about
    /// as much (and as much disk) whatever its number of shards.
    pub fn log_bytes_per_shard(&self, hosted_shards: usize) -> u64 {
        (self.snapshot_log_bytes / hosted_shards.max(1) as u64).max(1)
    }
}

fn default_snapshot_log_bytes() -> u64 {
    64 * 1024 * 1024
}

/// Storage settings of the whole node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageConfig {
    /// Memory for the databases' page caches, shared by every database the node opens (see
    /// [`StorageConfig::cache_split`]).
    pub cache_bytes: u64,
    /// Disk space kept in reserve (`space.reserve` files in the data dir, half released when
    /// free space falls under this, half at a start on a full disk) and the free space under
    /// which the node raises a NOSPACE alarm; 0: neither (docs/operations.md, "Storage quota").
    #[serde(default = "default_reserve_bytes")]
    pub reserve_bytes: u64,
}

fn default_reserve_bytes() -> u64 {
    64 * 1024 * 1024
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { cache_bytes: 256 * 1024 * 1024, reserve_bytes: default_reserve_bytes() }
    }
}

/// Checks an advertised `HOST:PORT` (a name, an IPv4 address or a bracketed IPv6 address).
fn check_host_port(a: &str) -> Result<(), String> {
    if a.contains("://") {
        return Err("give HOST:PORT without a scheme (clients choose TLS by their own flags)".into());
    }
    let Some((host, port)) = a.rsplit_once(':') else { return Err("give HOST:PORT".into()) };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("{port:?} is not a port number (1-65535)"));
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let host_ok = if bracketed {
        host[1..host.len() - 1].parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    if !host_ok {
        return Err(format!("{host:?} is not a host name or address (IPv6: [ADDR]:PORT)"));
    }
    Ok(())
}

/// How [`StorageConfig::cache_bytes`] is shared: the page cache of each database a node opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSplit {
    /// `metadata.db` (a few records).
    pub metadata: usize,
    /// Each hosted shard's `raft-log.db`.
    pub log: usize,
    /// Each hosted shard's `state-machine.db`.
    pub state_machine: usize,
}

/// The share of [`StorageConfig::cache_bytes`] given to redb as cache sizes: redb counts the
/// bytes of the pages it caches, but each page is an allocation of its own with its bookkeeping,
/// and a node's resident memory grew by ~1.4 × the cache size it set (benches/RESULTS.md,
/// Session 16). Two thirds keeps the caches' real memory within the budget.
pub const CACHE_SHARE_NUM: usize = 2;
pub const CACHE_SHARE_DEN: usize = 3;

impl StorageConfig {
    /// The databases' cache sizes together are two thirds of the budget
    /// ([`CACHE_SHARE_NUM`]/[`CACHE_SHARE_DEN`]: what they cost in memory is about the
    /// budget). Of that, the metadata store gets 1 MiB (at most an eighth); the rest is split
    /// evenly among the hosted shards, and each shard's share a quarter to its log (recent
    /// entries, read back only to replicate them) and three quarters to its state machine
    /// (the keys clients read).
    pub fn cache_split(&self, hosted_shards: usize) -> CacheSplit {
        let budget = usize::try_from(self.cache_bytes).unwrap_or(usize::MAX);
        let total = budget / CACHE_SHARE_DEN * CACHE_SHARE_NUM;
        let metadata = (1024 * 1024).min(total / 8);
        let per_shard = (total - metadata) / hosted_shards.max(1);
        let log = per_shard / 4;
        CacheSplit { metadata, log, state_machine: per_shard - log }
    }
}

/// Request size limits and time limits enforced at the client protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsConfig {
    pub max_key_bytes: u64,
    pub max_value_bytes: u64,
    /// Most operations in one atomic batch.
    pub max_batch_ops: u64,
    /// Most keys one scan page returns (larger limits are clamped and paged).
    pub max_scan_page: u64,
    /// How long a request may wait for a leader, a quorum or the state machine.
    pub request_timeout_ms: u64,
    /// Request bytes the node holds at once over all client and peer connections (one
    /// connection: an eighth of it); a request that does not fit is refused, retryably, before
    /// its bytes are read. Always at least one request of the largest size.
    pub request_memory_mib: u64,
    /// Client connections open at once; more are refused until some close. Members'
    /// connections do not count.
    pub max_connections: u64,
    /// Bytes of data (every shard's keys, values, sessions and leases, as redb stores them) over
    /// which the node raises a NOSPACE alarm: the cluster then refuses writes that add data.
    #[serde(default = "default_quota_bytes")]
    pub quota_bytes: u64,
}

fn default_quota_bytes() -> u64 {
    8 * 1024 * 1024 * 1024
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_key_bytes: 4 * 1024,
            max_value_bytes: 1024 * 1024,
            max_batch_ops: 1024,
            max_scan_page: 1_000,
            request_timeout_ms: 10_000,
            request_memory_mib: 256,
            max_connections: 1024,
            quota_bytes: default_quota_bytes(),
        }
    }
}

impl LimitsConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The node's request memory in bytes.
    pub fn request_memory(&self) -> usize {
        usize::try_from(self.request_memory_mib.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
    }
}

/// Sharding: how many shards the cluster has and which of them this node hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardingConfig {
    /// Run several shards (Raft groups) on this node, routed by key hash.
    pub enabled: bool,
    /// Number of shards of the whole cluster (1..=256), recorded at first start.
    pub num_shards: u32,
    /// Shards this node hosts; `None`: all of them.
    pub local_shards: Option<Vec<u32>>,
}

impl Default for ShardingConfig {
    fn default() -> Self {
        ShardingConfig { enabled: false, num_shards: 1, local_shards: None }
    }
}

/// Gossip discovery: signed address and leader announcements among the cluster's members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipConfig {
    /// Announce this node and learn peers' current addresses and shard leaders over iroh-gossip.
    pub enabled: bool,
    /// How often this node announces itself.
    pub interval_ms: u64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig { enabled: true, interval_ms: 1000 }
    }
}

/// What each shard keeps for watches (docs/design.md §17): the events of its most recently
/// applied writes, so that a watch can start from, or resume at, a recent position on any node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchConfig {
    /// Most events kept on the node (0: none; watches then start only from now), split evenly
    /// among the shards it hosts ([`WatchConfig::history_per_shard`]).
    pub history_entries: u64,
    /// Most bytes of keys and values kept on the node, split the same way.
    pub history_bytes: u64,
    /// Writes (applied entries with events) a watcher may fall behind before it is cancelled.
    pub max_lag: u64,
}

impl WatchConfig {
    /// Each hosted shard's share of the history (events, bytes): the node's memory for it does
    /// not grow with its number of shards. A shard keeps at least one event unless the history
    /// is off.
    pub fn history_per_shard(&self, hosted_shards: usize) -> (usize, usize) {
        let n = hosted_shards.max(1) as u64;
        let at_least = |total: u64| if total == 0 { 0 } else { (total / n).max(1) };
        let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        (to_usize(at_least(self.history_entries)), to_usize(at_least(self.history_bytes)))
    }
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig { history_entries: 10_000, history_bytes: 16 * 1024 * 1024, max_lag: 4096 }
    }
}

/// How `aspen-node` writes its log lines (stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event for people: time, level, target, message and fields.
    #[default]
    Text,
    /// One JSON object per line for log pipelines: `timestamp`, `level`, `target`, `fields`
    /// (with `message`), and `span`/`spans` when inside one.
    Json,
}

/// Where `aspen-node` serves its operator HTTP endpoint (`/health`, `/ready`, `/status`;
/// docs/operations.md, "Probes and status"): written `ADDR:PORT`, `off`, or `auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HttpAddr {
    /// TCP on 127.0.0.1 at the port number of `bind_addr` (UDP), so that several nodes on one
    /// machine each get their own without extra flags.
    #[default]
    Auto,
    /// No HTTP endpoint.
    Off,
    /// This TCP address.
    At(SocketAddr),
}

impl std::str::FromStr for HttpAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "off" => Ok(HttpAddr::Off),
            "auto" => Ok(HttpAddr::Auto),
            a => a.parse().map(HttpAddr::At).map_err(|_| format!("{a:?} is not ADDR:PORT, off or auto")),
        }
    }
}

impl std::fmt::Display for HttpAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpAddr::Auto => f.write_str("auto"),
            HttpAddr::Off => f.write_str("off"),
            HttpAddr::At(a) => write!(f, "{a}"),
        }
    }
}

impl TryFrom<String> for HttpAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<HttpAddr> for String {
    fn from(a: HttpAddr) -> String {
        a.to_string()
    }
}

/// Most shards a cluster can have.
pub const MAX_SHARDS: u32 = 256;

impl ShardingConfig {
    /// Number of shards in effect (1 when sharding is disabled).
    pub fn effective_num_shards(&self) -> u32 {
        if self.enabled {
            self.num_shards
        } else {
            1
        }
    }

    /// The shards this node hosts, sorted.
    pub fn local_shard_ids(&self) -> Vec<u32> {
        match (&self.local_shards, self.enabled) {
            (_, false) => vec![0],
            (None, true) => (0..self.num_shards).collect(),
            (Some(l), true) => {
                let mut l = l.clone();
                l.sort_unstable();
                l
            }
        }
    }
}

/// The complete, validated configuration of one `aspen-node`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub bind_addr: SocketAddr,
    pub cluster_name: String,
    /// Do not initialize a fresh data dir as a one-node cluster (wait for `cluster init` or a join).
    pub no_init: bool,
    /// Tickets of existing members to join through (used by multi-node clusters).
    pub join: Vec<String>,
    /// The join token that lets this node join (`aspen-cli cluster join-token`). A secret: never
    /// printed with the configuration.
    #[serde(skip_serializing, default)]
    pub join_token: Option<String>,
    pub raft: RaftConfig,
    pub limits: LimitsConfig,
    pub sharding: ShardingConfig,
    pub gossip: GossipConfig,
    #[serde(default)]
    pub watch: WatchConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(default)]
    pub http_addr: HttpAddr,
    /// Where to serve etcd's v3 gRPC API (`--etcd-addr`); off unless given (docs/etcd.md).
    #[serde(default)]
    pub etcd_addr: Option<SocketAddr>,
    /// PEM certificate chain and private key: the etcd API is served over TLS (both or neither).
    #[serde(default)]
    pub etcd_cert: Option<PathBuf>,
    #[serde(default)]
    pub etcd_key: Option<PathBuf>,
    /// `HOST:PORT` the member list shows as this node's etcd client URL
    /// (`--etcd-advertise-addr`; default: the bound address).
    #[serde(default)]
    pub etcd_advertise_addr: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 1,
            data_dir: PathBuf::from("./aspen-data"),
            bind_addr: SocketAddr::from(([127, 0, 0, 1], 7600)),
            cluster_name: "aspen".to_string(),
            no_init: false,
            join: Vec::new(),
            join_token: None,
            raft: RaftConfig::default(),
            limits: LimitsConfig::default(),
            sharding: ShardingConfig::default(),
            gossip: GossipConfig::default(),
            watch: WatchConfig::default(),
            storage: StorageConfig::default(),
            log_format: LogFormat::Text,
            http_addr: HttpAddr::Auto,
            etcd_addr: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_advertise_addr: None,
        }
    }
}

impl NodeConfig {
    /// The TCP address of the operator HTTP endpoint, if it is on.
    pub fn http_listen_addr(&self) -> Option<SocketAddr> {
        match self.http_addr {
            HttpAddr::Auto => Some(SocketAddr::from(([127, 0, 0, 1], self.bind_addr.port()))),
            HttpAddr::Off => None,
            HttpAddr::At(a) => Some(a),
        }
    }
}

/// `aspen-node` command line. Every flag also reads an `ASPEN_*` environment variable.
/// `aspen-node` subcommands (offline operations; without one, the node serves).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum NodeCommand {
    /// Make a new data dir (--data-dir, empty or missing) from a backup FILE written by
    /// `aspen-cli snapshot save`: a new one-node cluster (new cluster id and signing key; the
    /// old cluster's tokens do not work on it) holding every shard's data at the saved index,
    /// with this node's --node-id, --cluster-name, --bind-addr and sharding settings (the
    /// number of shards must be the backup's). Checks the whole file first. Exit 0 when done,
    /// 2 when refused (not empty, damaged or truncated file, other number of shards). Then
    /// `aspen-node --data-dir DIR` serves it and other nodes --join it.
    Restore {
        /// The backup file.
        file: std::path::PathBuf,
    },
}

#[derive(Parser, Debug, Default, Clone)]
#[command(name = "aspen-node", version, about = "Run one Aspen key-value node")]
pub struct NodeArgs {
    /// TOML config file (flags and ASPEN_* variables override it).
    #[arg(long, global = true, env = "ASPEN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's id (1 ..= 2^48-1), unique in the cluster. [default: 1]
    #[arg(long, global = true, env = "ASPEN_NODE_ID")]
    pub node_id: Option<NodeId>,
    /// Directory for keys, tickets and databases. [default: ./aspen-data]
    #[arg(long, global = true, env = "ASPEN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// UDP address the QUIC endpoint binds. [default: 127.0.0.1:7600]
    #[arg(long, global = true, env = "ASPEN_BIND_ADDR")]
    pub bind_addr: Option<SocketAddr>,
    /// Cluster name, recorded at init. [default: aspen]
    #[arg(long, global = true, env = "ASPEN_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Do not initialize a fresh data dir as a one-node cluster.
    #[arg(long, global = true, env = "ASPEN_NO_INIT")]
    pub no_init: bool,
    /// Ticket of a member to join through (repeat or comma-separate for several).
    #[arg(long, global = true, env = "ASPEN_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Join token for --join (`aspen-cli cluster join-token` on a member prints one).
    #[arg(long, global = true, env = "ASPEN_JOIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Raft heartbeat interval in milliseconds. [default: 100]
    #[arg(long, global = true, env = "ASPEN_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Minimum election timeout in milliseconds. [default: 1000]
    #[arg(long, global = true, env = "ASPEN_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Maximum election timeout in milliseconds. [default: 2000]
    #[arg(long, global = true, env = "ASPEN_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// Snapshot after this many applied log entries. [default: 20000]
    #[arg(long, global = true, env = "ASPEN_SNAPSHOT_THRESHOLD")]
    pub snapshot_threshold: Option<u64>,
    /// … or once the log after the last snapshot holds this many bytes. [default: 67108864]
    #[arg(long, global = true, env = "ASPEN_SNAPSHOT_LOG_BYTES")]
    pub snapshot_log_bytes: Option<u64>,
    /// Memory for the databases' page caches, shared by all of them. [default: 268435456]
    #[arg(long, global = true, env = "ASPEN_CACHE_BYTES")]
    pub cache_bytes: Option<u64>,
    /// Disk space kept in reserve, and the free space under which a NOSPACE alarm is raised
    /// (0: none). [default: 67108864]
    #[arg(long, global = true, env = "ASPEN_RESERVE_BYTES")]
    pub reserve_bytes: Option<u64>,
    /// Bytes of stored data over which the node raises a NOSPACE alarm (writes that add data are
    /// refused cluster-wide until `aspen-cli alarm disarm`). [default: 8589934592]
    #[arg(long, global = true, env = "ASPEN_QUOTA_BYTES")]
    pub quota_bytes: Option<u64>,
    /// Log lines as `text` (for people) or `json` (one object per line). [default: text]
    #[arg(long, global = true, env = "ASPEN_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Operator HTTP endpoint (/health, /ready, /status): ADDR:PORT, or off. [default: TCP
    /// 127.0.0.1 at the --bind-addr port]
    #[arg(long, global = true, env = "ASPEN_HTTP_ADDR", value_name = "ADDR|off")]
    pub http_addr: Option<HttpAddr>,
    /// Serve etcd's v3 gRPC API (etcdctl, etcd client libraries) on ADDR:PORT, e.g.
    /// 127.0.0.1:2379. [default: off]
    #[arg(long, global = true, env = "ASPEN_ETCD_ADDR", value_name = "ADDR:PORT")]
    pub etcd_addr: Option<SocketAddr>,
    /// PEM certificate chain for the etcd API's TLS (with --etcd-key).
    #[arg(long, global = true, env = "ASPEN_ETCD_CERT", value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key for the etcd API's TLS (with --etcd-cert).
    #[arg(long, global = true, env = "ASPEN_ETCD_KEY", value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// HOST:PORT that etcd's member list shows as this node's client URL, for clients that
    /// find members through it (etcdctl --cluster, auto-sync), e.g. node1.example:2379.
    /// [default: the --etcd-addr address as bound]
    #[arg(long, global = true, env = "ASPEN_ETCD_ADVERTISE_ADDR", value_name = "HOST:PORT")]
    pub etcd_advertise_addr: Option<String>,
    /// Largest key in bytes. [default: 4096]
    #[arg(long, global = true, env = "ASPEN_MAX_KEY_BYTES")]
    pub max_key_bytes: Option<u64>,
    /// Largest value in bytes. [default: 1048576]
    #[arg(long, global = true, env = "ASPEN_MAX_VALUE_BYTES")]
    pub max_value_bytes: Option<u64>,
    /// Request timeout in milliseconds. [default: 10000]
    #[arg(long, global = true, env = "ASPEN_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Request bytes held at once over all connections, in MiB. [default: 256]
    #[arg(long, global = true, env = "ASPEN_REQUEST_MEMORY_MIB")]
    pub request_memory_mib: Option<u64>,
    /// Client connections open at once (members' do not count). [default: 1024]
    #[arg(long, global = true, env = "ASPEN_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    /// Run several shards (Raft groups) on this node.
    #[arg(long, global = true, env = "ASPEN_SHARDING_ENABLED")]
    pub sharding_enabled: bool,
    /// Number of shards in the cluster (1..=256). [default: 1]
    #[arg(long, global = true, env = "ASPEN_SHARDING_NUM_SHARDS")]
    pub sharding_num_shards: Option<u32>,
    /// Shards this node hosts, comma-separated. [default: all]
    #[arg(long, global = true, env = "ASPEN_SHARDING_LOCAL_SHARDS", value_delimiter = ',')]
    pub sharding_local_shards: Option<Vec<u32>>,
    /// Instead of serving: an offline operation on the data dir (`restore`).
    #[command(subcommand)]
    pub command: Option<NodeCommand>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<NodeId>,
    data_dir: Option<PathBuf>,
    bind_addr: Option<SocketAddr>,
    cluster_name: Option<String>,
    no_init: Option<bool>,
    join: Option<Vec<String>>,
    join_token: Option<String>,
    raft: Option<FileRaft>,
    limits: Option<FileLimits>,
    sharding: Option<FileSharding>,
    gossip: Option<FileGossip>,
    watch: Option<FileWatch>,
    storage: Option<FileStorage>,
    log_format: Option<LogFormat>,
    http_addr: Option<HttpAddr>,
    etcd_addr: Option<SocketAddr>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    etcd_advertise_addr: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileStorage {
    cache_bytes: Option<u64>,
    reserve_bytes: Option<u64>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileWatch {
    history_entries: Option<u64>,
    history_bytes: Option<u64>,
    max_lag: Option<u64>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileGossip {
    enabled: Option<bool>,
    interval_ms: Option<u64>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileSharding {
    enabled: Option<bool>,
    num_shards: Option<u32>,
    local_shards: Option<Vec<u32>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileRaft {
    heartbeat_interval_ms: Option<u64>,
    election_timeout_min_ms: Option<u64>,
    election_timeout_max_ms: Option<u64>,
    snapshot_threshold: Option<u64>,
    snapshot_log_bytes: Option<u64>,
    max_in_snapshot_log_to_keep: Option<u64>,
    max_append_entries: Option<u64>,
    max_append_bytes: Option<u64>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_key_bytes: Option<u64>,
    max_value_bytes: Option<u64>,
    max_batch_ops: Option<u64>,
    max_scan_page: Option<u64>,
    request_timeout_ms: Option<u64>,
    request_memory_mib: Option<u64>,
    max_connections: Option<u64>,
    quota_bytes: Option<u64>,
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

impl NodeConfig {
    /// Builds the configuration from parsed flags (which already include `ASPEN_*` variables),
    /// the TOML file they name, and defaults; then validates it.
    pub fn from_args(args: &NodeArgs) -> Result<NodeConfig, ConfigError> {
        let mut cfg = NodeConfig::default();
        if let Some(path) = &args.config {
            cfg.apply_file(&load_file(path)?);
        }
        set(&mut cfg.node_id, args.node_id);
        set(&mut cfg.data_dir, args.data_dir.clone());
        set(&mut cfg.bind_addr, args.bind_addr);
        set(&mut cfg.cluster_name, args.cluster_name.clone());
        cfg.no_init |= args.no_init;
        if !args.join.is_empty() {
            let tickets: Vec<String> = args.join.iter().map(|s| s.trim().to_string()).collect();
            if tickets.iter().any(String::is_empty) {
                // `--join "$(cat n1/node.ticket)"` run before node 1 wrote its ticket: without
                // this refusal the node would start a cluster of its own.
                return Err(invalid(
                    "join",
                    "an empty ticket was given (was the member's node.ticket written yet?); \
                     wait until the file exists, then pass its contents",
                ));
            }
            cfg.join = tickets;
        }
        if let Some(t) = &args.join_token {
            cfg.join_token = Some(t.trim().to_string());
        }
        set(&mut cfg.raft.heartbeat_interval_ms, args.heartbeat_interval_ms);
        set(&mut cfg.raft.election_timeout_min_ms, args.election_timeout_min_ms);
        set(&mut cfg.raft.election_timeout_max_ms, args.election_timeout_max_ms);
        set(&mut cfg.raft.snapshot_threshold, args.snapshot_threshold);
        set(&mut cfg.raft.snapshot_log_bytes, args.snapshot_log_bytes);
        set(&mut cfg.storage.cache_bytes, args.cache_bytes);
        set(&mut cfg.storage.reserve_bytes, args.reserve_bytes);
        set(&mut cfg.limits.quota_bytes, args.quota_bytes);
        set(&mut cfg.log_format, args.log_format);
        set(&mut cfg.http_addr, args.http_addr);
        if args.etcd_addr.is_some() {
            cfg.etcd_addr = args.etcd_addr;
        }
        if args.etcd_cert.is_some() {
            cfg.etcd_cert = args.etcd_cert.clone();
        }
        if args.etcd_key.is_some() {
            cfg.etcd_key = args.etcd_key.clone();
        }
        if args.etcd_advertise_addr.is_some() {
            cfg.etcd_advertise_addr = args.etcd_advertise_addr.clone();
        }
        set(&mut cfg.limits.max_key_bytes, args.max_key_bytes);
        set(&mut cfg.limits.max_value_bytes, args.max_value_bytes);
        set(&mut cfg.limits.request_timeout_ms, args.request_timeout_ms);
        set(&mut cfg.limits.request_memory_mib, args.request_memory_mib);
        set(&mut cfg.limits.max_connections, args.max_connections);
        cfg.sharding.enabled |= args.sharding_enabled;
        set(&mut cfg.sharding.num_shards, args.sharding_num_shards);
        if args.sharding_local_shards.is_some() {
            cfg.sharding.local_shards = args.sharding_local_shards.clone();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a TOML document (as found in a config file) over the defaults and validates it.
    pub fn from_toml_str(text: &str) -> Result<NodeConfig, ConfigError> {
        let file = parse_file(text, Path::new("<string>"))?;
        let mut cfg = NodeConfig::default();
        cfg.apply_file(&file);
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_file(&mut self, f: &FileConfig) {
        set(&mut self.node_id, f.node_id);
        set(&mut self.data_dir, f.data_dir.clone());
        set(&mut self.bind_addr, f.bind_addr);
        set(&mut self.cluster_name, f.cluster_name.clone());
        set(&mut self.no_init, f.no_init);
        set(&mut self.log_format, f.log_format);
        set(&mut self.http_addr, f.http_addr);
        if f.etcd_addr.is_some() {
            self.etcd_addr = f.etcd_addr;
        }
        if f.etcd_cert.is_some() {
            self.etcd_cert = f.etcd_cert.clone();
        }
        if f.etcd_key.is_some() {
            self.etcd_key = f.etcd_key.clone();
        }
        if f.etcd_advertise_addr.is_some() {
            self.etcd_advertise_addr = f.etcd_advertise_addr.clone();
        }
        set(&mut self.join, f.join.clone());
        if let Some(t) = &f.join_token {
            self.join_token = Some(t.trim().to_string());
        }
        if let Some(r) = &f.raft {
            set(&mut self.raft.heartbeat_interval_ms, r.heartbeat_interval_ms);
            set(&mut self.raft.election_timeout_min_ms, r.election_timeout_min_ms);
            set(&mut self.raft.election_timeout_max_ms, r.election_timeout_max_ms);
            set(&mut self.raft.snapshot_threshold, r.snapshot_threshold);
            set(&mut self.raft.snapshot_log_bytes, r.snapshot_log_bytes);
            set(&mut self.raft.max_in_snapshot_log_to_keep, r.max_in_snapshot_log_to_keep);
            set(&mut self.raft.max_append_entries, r.max_append_entries);
            set(&mut self.raft.max_append_bytes, r.max_append_bytes);
        }
        if let Some(sh) = &f.sharding {
            set(&mut self.sharding.enabled, sh.enabled);
            set(&mut self.sharding.num_shards, sh.num_shards);
            if sh.local_shards.is_some() {
                self.sharding.local_shards = sh.local_shards.clone();
            }
        }
        if let Some(g) = &f.gossip {
            set(&mut self.gossip.enabled, g.enabled);
            set(&mut self.gossip.interval_ms, g.interval_ms);
        }
        if let Some(w) = &f.watch {
            set(&mut self.watch.history_entries, w.history_entries);
            set(&mut self.watch.history_bytes, w.history_bytes);
            set(&mut self.watch.max_lag, w.max_lag);
        }
        if let Some(st) = &f.storage {
            set(&mut self.storage.cache_bytes, st.cache_bytes);
            set(&mut self.storage.reserve_bytes, st.reserve_bytes);
        }
        if let Some(l) = &f.limits {
            set(&mut self.limits.max_key_bytes, l.max_key_bytes);
            set(&mut self.limits.max_value_bytes, l.max_value_bytes);
            set(&mut self.limits.max_batch_ops, l.max_batch_ops);
            set(&mut self.limits.max_scan_page, l.max_scan_page);
            set(&mut self.limits.request_timeout_ms, l.request_timeout_ms);
            set(&mut self.limits.request_memory_mib, l.request_memory_mib);
            set(&mut self.limits.max_connections, l.max_connections);
            set(&mut self.limits.quota_bytes, l.quota_bytes);
        }
    }

    /// Checks every value; the error names the field and what is wrong with it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 || self.node_id > MAX_NODE_ID {
            return Err(invalid("node_id", format!("{} is out of range 1..=2^48-1", self.node_id)));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let name_ok = !self.cluster_name.is_empty()
            && self.cluster_name.len() <= 64
            && self.cluster_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !name_ok {
            return Err(invalid(
                "cluster_name",
                format!("{:?}: use 1-64 characters from a-z A-Z 0-9 - _ .", self.cluster_name),
            ));
        }
        for t in &self.join {
            crate::api::NodeTicket::decode(t).map_err(|e| invalid("join", format!("{e}")))?;
        }
        match (&self.etcd_cert, &self.etcd_key) {
            (Some(_), None) => return Err(invalid("etcd_key", "etcd_cert is given: give its private key too")),
            (None, Some(_)) => return Err(invalid("etcd_cert", "etcd_key is given: give its certificate too")),
            (Some(_), Some(_)) if self.etcd_addr.is_none() => {
                return Err(invalid(
                    "etcd_addr",
                    "a TLS certificate is given for the etcd API, but no address to serve it on",
                ))
            }
            _ => {}
        }
        if let Some(a) = &self.etcd_advertise_addr {
            if self.etcd_addr.is_none() {
                return Err(invalid("etcd_advertise_addr", "given, but no etcd_addr to serve the etcd API on"));
            }
            check_host_port(a).map_err(|why| invalid("etcd_advertise_addr", format!("{a:?}: {why}")))?;
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 {
            return Err(invalid("heartbeat_interval_ms", "must be greater than 0"));
        }
        if r.election_timeout_min_ms <= r.heartbeat_interval_ms {
            return Err(invalid(
                "election_timeout_min_ms",
                format!(
                    "{} must be greater than heartbeat_interval_ms ({})",
                    r.election_timeout_min_ms, r.heartbeat_interval_ms
                ),
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "election_timeout_max_ms",
                format!(
                    "{} must be greater than election_timeout_min_ms ({})",
                    r.election_timeout_max_ms, r.election_timeout_min_ms
                ),
            ));
        }
        if r.snapshot_threshold == 0 {
            return Err(invalid("snapshot_threshold", "must be greater than 0"));
        }
        if r.snapshot_log_bytes < 64 * 1024 {
            return Err(invalid("snapshot_log_bytes", "must be at least 65536 (64 KiB)"));
        }
        if self.storage.cache_bytes < 1024 * 1024 || self.storage.cache_bytes > 1 << 40 {
            return Err(invalid("cache_bytes", "must be between 1048576 (1 MiB) and 1099511627776 (1 TiB)"));
        }
        if r.max_append_entries == 0 {
            return Err(invalid("max_append_entries", "must be greater than 0"));
        }
        if r.max_append_bytes < 64 * 1024 || r.max_append_bytes > (crate::api::MAX_FRAME_BYTES / 2) as u64 {
            return Err(invalid("max_append_bytes", "must be between 64 KiB and 32 MiB"));
        }
        if self.gossip.interval_ms < 100 || self.gossip.interval_ms > 600_000 {
            return Err(invalid("gossip.interval_ms", "must be between 100 and 600000"));
        }
        let sh = &self.sharding;
        if sh.num_shards == 0 || sh.num_shards > MAX_SHARDS {
            return Err(invalid("num_shards", format!("{} is out of range 1..={MAX_SHARDS}", sh.num_shards)));
        }
        if !sh.enabled && (sh.num_shards != 1 || sh.local_shards.is_some()) {
            return Err(invalid(
                "sharding",
                "num_shards and local_shards need sharding enabled (--sharding-enabled or [sharding] enabled = true)",
            ));
        }
        if let Some(local) = &sh.local_shards {
            if local.is_empty() {
                return Err(invalid("local_shards", "must name at least one shard"));
            }
            if !local.contains(&0) {
                return Err(invalid("local_shards", "must include shard 0, which records the cluster's members"));
            }
            let mut seen = std::collections::BTreeSet::new();
            for &s in local {
                if s >= sh.num_shards {
                    return Err(invalid(
                        "local_shards",
                        format!(
                            "shard {s} does not exist (num_shards is {}, shards are 0..={})",
                            sh.num_shards,
                            sh.num_shards - 1
                        ),
                    ));
                }
                if !seen.insert(s) {
                    return Err(invalid("local_shards", format!("shard {s} is listed twice")));
                }
            }
        }
        let l = &self.limits;
        if l.max_key_bytes == 0 || l.max_key_bytes > 64 * 1024 {
            return Err(invalid("max_key_bytes", format!("{} is out of range 1..=65536", l.max_key_bytes)));
        }
        if l.max_value_bytes == 0 || l.max_value_bytes > 16 * 1024 * 1024 {
            return Err(invalid("max_value_bytes", format!("{} is out of range 1..=16 MiB", l.max_value_bytes)));
        }
        if l.max_batch_ops == 0 {
            return Err(invalid("max_batch_ops", "must be greater than 0"));
        }
        if l.max_scan_page == 0 {
            return Err(invalid("max_scan_page", "must be greater than 0"));
        }
        if l.request_timeout_ms < 10 {
            return Err(invalid("request_timeout_ms", "must be at least 10"));
        }
        if l.request_memory_mib == 0 || l.request_memory_mib > 1024 * 1024 {
            return Err(invalid("request_memory_mib", "must be between 1 and 1048576"));
        }
        if l.quota_bytes < 1024 * 1024 {
            return Err(invalid("quota_bytes", "must be at least 1048576 (1 MiB)"));
        }
        if self.storage.reserve_bytes > 1 << 40 {
            return Err(invalid("reserve_bytes", "must be at most 1099511627776 (1 TiB)"));
        }
        if l.max_connections == 0 || l.max_connections > 1_000_000 {
            return Err(invalid("max_connections", "must be between 1 and 1000000"));
        }
        let w = &self.watch;
        if w.history_entries > 10_000_000 {
            return Err(invalid("history_entries", "must be at most 10000000"));
        }
        if w.history_bytes > 16 * 1024 * 1024 * 1024 {
            return Err(invalid("history_bytes", "must be at most 16 GiB"));
        }
        if w.max_lag == 0 || w.max_lag > 1_000_000 {
            return Err(invalid("max_lag", "must be between 1 and 1000000"));
        }
        Ok(())
    }

    /// Largest client frame this configuration can legitimately produce (a full batch of maximal
    /// values plus envelope overhead), capped at the global frame limit.
    pub fn max_client_frame(&self) -> usize {
        let per_op = self.limits.max_key_bytes + self.limits.max_value_bytes + 64;
        let want = per_op.saturating_mul(4).max(per_op) + 4096;
        (want as usize).min(crate::api::MAX_FRAME_BYTES)
    }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile { path: path.to_path_buf(), source })?;
    parse_file(&text, path)
}

fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        // toml's message is a caret diagram over several lines (line, column, the offending
        // text underlined): kept as is, it shows the operator exactly where the mistake is.
        message: e.to_string().trim_end().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_join_ticket_is_refused() {
        use clap::Parser;
        for join in ["", " ", "aspenxyz,"] {
            let args = NodeArgs::try_parse_from(["aspen-node", "--join", join]).expect("parses");
            let err = NodeConfig::from_args(&args).expect_err(join).to_string();
            assert!(err.contains("empty ticket"), "{join:?}: {err}");
        }
        let args = NodeArgs::try_parse_from(["aspen-node"]).unwrap();
        assert!(NodeConfig::from_args(&args).unwrap().join.is_empty(), "no --join: no join");
    }

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().unwrap();
    }

    #[test]
    fn precedence_cli_over_file_over_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, "node_id = 5\ncluster_name = \"filec\"\n[raft]\nheartbeat_interval_ms = 200\n").unwrap();
        let args = NodeArgs { config: Some(path), node_id: Some(7), ..Default::default() };
        let cfg = NodeConfig::from_args(&args).unwrap();
        assert_eq!(cfg.node_id, 7);
        assert_eq!(cfg.cluster_name, "filec");
        assert_eq!(cfg.raft.heartbeat_interval_ms, 200);
        assert_eq!(cfg.bind_addr, NodeConfig::default().bind_addr);
    }

    #[test]
    fn storage_budget_and_log_bytes_parse_validate_and_split() {
        let cfg = NodeConfig::from_toml_str("[storage]\ncache_bytes = 67108864\n[raft]\nsnapshot_log_bytes = 1048576")
            .unwrap();
        assert_eq!((cfg.storage.cache_bytes, cfg.raft.snapshot_log_bytes), (64 << 20, 1 << 20));
        let d = NodeConfig::default();
        assert_eq!((d.storage.cache_bytes, d.raft.snapshot_log_bytes), (256 << 20, 64 << 20));
        assert_eq!(d.log_format, LogFormat::Text);
        assert_eq!(NodeConfig::from_toml_str("log_format = \"json\"").unwrap().log_format, LogFormat::Json);
        assert!(NodeConfig::from_toml_str("log_format = \"xml\"").unwrap_err().to_string().contains("log_format"));
        // The HTTP endpoint: at the bind port by default, an address, or off.
        assert_eq!(d.http_listen_addr(), Some("127.0.0.1:7600".parse().unwrap()));
        let at = NodeConfig::from_toml_str("http_addr = \"0.0.0.0:9000\"").unwrap();
        assert_eq!(at.http_listen_addr(), Some("0.0.0.0:9000".parse().unwrap()));
        assert_eq!(NodeConfig::from_toml_str("http_addr = \"off\"").unwrap().http_listen_addr(), None);
        assert!(NodeConfig::from_toml_str("http_addr = \"nowhere\"").unwrap_err().to_string().contains("http_addr"));
        let args = NodeArgs { http_addr: Some("off".parse().unwrap()), ..Default::default() };
        assert_eq!(NodeConfig::from_args(&args).unwrap().http_addr, HttpAddr::Off);
        let args = NodeArgs { cache_bytes: Some(32 << 20), snapshot_log_bytes: Some(1 << 17), ..Default::default() };
        let cfg = NodeConfig::from_args(&args).unwrap();
        assert_eq!((cfg.storage.cache_bytes, cfg.raft.snapshot_log_bytes), (32 << 20, 1 << 17));
        for (toml, field) in [
            ("[storage]\ncache_bytes = 1000", "cache_bytes"),
            ("[storage]\ncache_bytes = 2199023255552", "cache_bytes"),
            ("[storage]\nbogus = 1", "bogus"),
            ("[raft]\nsnapshot_log_bytes = 100", "snapshot_log_bytes"),
        ] {
            let err = NodeConfig::from_toml_str(toml).unwrap_err().to_string();
            assert!(err.contains(field), "{toml}: {err}");
        }
        // The budget covers every database: metadata + per shard (log + state machine).
        for shards in [1, 4, 256] {
            let split = StorageConfig::default().cache_split(shards);
            assert_eq!(split.metadata, 1 << 20);
            let sum = split.metadata + shards * (split.log + split.state_machine);
            assert!(sum <= (256 << 20) * 2 / 3 && sum > (256 << 20) * 2 / 3 - shards * 4, "{shards}: {split:?}");
            assert!(split.state_machine >= 3 * split.log, "{split:?}");
        }
        let tiny = StorageConfig { cache_bytes: 1 << 20, ..Default::default() }.cache_split(4);
        assert_eq!(tiny.metadata, (1 << 20) / 3 * 2 / 8, "at most an eighth for metadata");
        assert!(tiny.metadata + 4 * (tiny.log + tiny.state_machine) <= (1 << 20) * 2 / 3);
        // The log and watch-history budgets are the node's too: split among its shards.
        let d = NodeConfig::default();
        assert_eq!(d.raft.log_bytes_per_shard(1), 64 << 20);
        assert_eq!(d.raft.log_bytes_per_shard(4), 16 << 20);
        assert_eq!(d.watch.history_per_shard(1), (10_000, 16 << 20));
        assert_eq!(d.watch.history_per_shard(4), (2_500, 4 << 20));
        let small = WatchConfig { history_entries: 3, history_bytes: 10, max_lag: 1 };
        assert_eq!(small.history_per_shard(4), (1, 2), "a shard keeps at least one event");
        let off = WatchConfig { history_entries: 0, ..small };
        assert_eq!(off.history_per_shard(4).0, 0, "history off stays off");
    }

    #[test]
    fn rejects_bad_values() {
        let err = NodeConfig::from_toml_str("node_id = 0").unwrap_err().to_string();
        assert!(err.contains("node_id"), "{err}");
        let err = NodeConfig::from_toml_str("node_id = 281474976710656").unwrap_err().to_string();
        assert!(err.contains("node_id"), "{err}");
        let err = NodeConfig::from_toml_str("bogus = 1").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = NodeConfig::from_toml_str("[raft]\nelection_timeout_min_ms = 50").unwrap_err().to_string();
        assert!(err.contains("election_timeout_min_ms"), "{err}");
        let err = NodeConfig::from_toml_str("cluster_name = \"a b\"").unwrap_err().to_string();
        assert!(err.contains("cluster_name"), "{err}");
        let err = NodeConfig::from_toml_str("join = [\"nope\"]").unwrap_err().to_string();
        assert!(err.contains("join"), "{err}");
    }

    #[test]
    fn sharding_validation() {
        let ok =
            NodeConfig::from_toml_str("[sharding]\nenabled = true\nnum_shards = 4\nlocal_shards = [2, 0]").unwrap();
        assert_eq!(ok.sharding.local_shard_ids(), vec![0, 2]);
        assert_eq!(ok.sharding.effective_num_shards(), 4);
        let all = NodeConfig::from_toml_str("[sharding]\nenabled = true\nnum_shards = 3").unwrap();
        assert_eq!(all.sharding.local_shard_ids(), vec![0, 1, 2]);
        assert_eq!(NodeConfig::default().sharding.local_shard_ids(), vec![0]);
        for (toml, field) in [
            ("[sharding]\nenabled = true\nnum_shards = 0", "num_shards"),
            ("[sharding]\nenabled = true\nnum_shards = 257", "num_shards"),
            ("[sharding]\nenabled = true\nnum_shards = 4\nlocal_shards = [0, 1, 1]", "listed twice"),
            ("[sharding]\nenabled = true\nnum_shards = 4\nlocal_shards = [0, 4]", "does not exist"),
            ("[sharding]\nenabled = true\nnum_shards = 4\nlocal_shards = []", "at least one"),
            ("[sharding]\nnum_shards = 4", "sharding enabled"),
        ] {
            let err = NodeConfig::from_toml_str(toml).unwrap_err().to_string();
            assert!(err.contains(field), "{toml:?}: {err}");
        }
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../config/aspen-node.toml");
        let cfg = NodeConfig::from_toml_str(text).unwrap();
        assert_eq!(cfg.node_id, 1);
        assert_eq!(cfg.gossip, GossipConfig::default());
        let off = NodeConfig::from_toml_str("[gossip]\nenabled = false\ninterval_ms = 500").unwrap();
        assert_eq!(off.gossip, GossipConfig { enabled: false, interval_ms: 500 });
        let err = NodeConfig::from_toml_str("[gossip]\ninterval_ms = 5").unwrap_err().to_string();
        assert!(err.contains("gossip.interval_ms"), "{err}");
    }

    #[test]
    fn the_etcd_advertised_address_is_host_and_port() {
        let with = |a: &str| {
            NodeConfig::from_toml_str(&format!("etcd_addr = \"127.0.0.1:2379\"\netcd_advertise_addr = \"{a}\""))
        };
        for good in ["node1.example:2379", "10.0.0.5:2379", "[::1]:2379", "localhost:1"] {
            assert_eq!(with(good).unwrap().etcd_advertise_addr.as_deref(), Some(good));
        }
        for bad in ["http://node1:2379", "node1", "node1:0", "node1:http", ":2379", "a b:1", "[zz]:1"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("etcd_advertise_addr"), "{bad}: {err}");
        }
        let err = NodeConfig::from_toml_str("etcd_advertise_addr = \"n:1\"").unwrap_err().to_string();
        assert!(err.contains("no etcd_addr"), "{err}");
    }
}
