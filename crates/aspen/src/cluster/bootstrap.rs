//! Bringing a node up and down.
//!
//! [`bootstrap_base_node`] builds what every shard shares: the data dir, the node key and iroh
//! endpoint, the metadata store (checked against the config), the peer address book, the
//! connection pool and Raft network factory, and the shutdown token. [`bootstrap_node`] adds
//! shard 0 (`shard-0/raft-log.db`, `shard-0/state-machine.db`), the client and Raft protocol
//! handlers, and — for a fresh data dir without `--no-init` — initializes a one-node cluster.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use iroh::{address_lookup::MemoryLookup, protocol::Router, Endpoint, SecretKey};
use tokio_util::sync::CancellationToken;

use crate::{
    api::{
        shard_raft_id, ApiError, ClientRequest, ClientResponse, ClusterId, JoinRequest, NodeTicket, ShardId,
        CLIENT_ALPN, PEER_ALPN, RAFT_ALPN, RAFT_MUX_ALPN, RAFT_SHARDED_ALPN,
    },
    client::{AspenClient, ClientError},
    cluster::{
        admission::Admission,
        alarm::SpaceReserve,
        claim::Claim,
        gossip::{AnnounceContext, GossipDiscovery},
        http::HttpEndpoint,
        service::NodeService,
        supervisor::Supervisor,
    },
    config::{HttpAddr, NodeConfig},
    etcd::{EtcdEndpoint, EtcdTls},
    raft::{
        network::SharedClusterId,
        node::{RaftNodeError, ShardFiles},
        IrohNetworkFactory, MemberNode, RaftNode, RaftProtocolHandler, RaftWire, ShardRegistry,
    },
    storage::{
        log_store,
        metadata::{ClusterIdentity, MetadataStore, STORAGE_FORMAT},
        shared_journal::{self, SharedJournal},
        StorageError,
    },
    transport::{
        client_alpn::{Origin, RequestMemory},
        endpoint::{bind_endpoint_gated, listening_addrs, load_or_create_key, EndpointError},
        gate::PeerGate,
        shutdowns::Shutdowns,
        ClientProtocolHandler, ConnectionPool, PeerBook,
    },
};

/// Why a node could not start. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("data dir {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("metadata store: {0}")]
    Metadata(StorageError),
    #[error("metadata store {}: {source}{}", path.display(), source.damage_hint())]
    MetadataOpen { path: std::path::PathBuf, source: StorageError },
    #[error("log journal {}: {source}{}", path.display(), source.damage_hint())]
    Journal { path: std::path::PathBuf, source: StorageError },
    #[error(
        "data dir {path} belongs to node {recorded}, but this node was started as node {configured}; \
         use --node-id {recorded} or another --data-dir"
    )]
    NodeIdMismatch { path: std::path::PathBuf, recorded: u64, configured: u64 },
    #[error(
        "data dir {path} belongs to cluster {recorded:?}, but --cluster-name is {configured:?}; \
         use --cluster-name {recorded} or another --data-dir"
    )]
    ClusterNameMismatch { path: std::path::PathBuf, recorded: String, configured: String },
    #[error(transparent)]
    Shard(#[from] RaftNodeError),
    #[error("cluster init: {0}")]
    Init(crate::api::ApiError),
    #[error("join refused: {0}")]
    JoinRefused(String),
    #[error("--join tickets name different clusters ({0} and {1}); give tickets of one cluster")]
    JoinTicketsDisagree(ClusterId, ClusterId),
    #[error("invalid --join ticket: {0}")]
    JoinTicket(crate::api::TicketError),
    #[error("sharding: {0}")]
    Sharding(String),
    #[error(
        "data dir {path} belongs to cluster {recorded}, but the --join ticket names cluster {ticket}; \
         drop --join to restart this node in its own cluster, or use an empty --data-dir to join the other one"
    )]
    JoinOtherCluster { path: std::path::PathBuf, recorded: ClusterId, ticket: ClusterId },
    #[error("--http-addr {addr}: {source}")]
    Http { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("--etcd-addr {addr}: {source}")]
    Etcd { addr: std::net::SocketAddr, source: crate::etcd::EtcdServeError },
    /// SIGTERM/SIGINT (the `stop` token) arrived before the node served: it stopped cleanly.
    #[error("stopped before the node started serving")]
    Interrupted,
    #[error(
        "data dir {path} was initialized with {recorded} shard(s), but this node is configured for {configured}; \
         the number of shards cannot change (use --sharding-num-shards {recorded})"
    )]
    NumShardsMismatch { path: std::path::PathBuf, recorded: u32, configured: u32 },
    #[error(
        "data dir {path} has storage format {found}, written by a newer Aspen; this version reads formats up to \
         {supported} (run the newer version, or restore a backup into a new data dir)"
    )]
    NewerFormat { path: std::path::PathBuf, found: u32, supported: u32 },
}

impl BootstrapError {
    /// Whether restarting the node unchanged cannot help (a wrong configuration, an address in
    /// use, a data dir that is locked, unreadable or not writable, a refused join): `aspen-node`
    /// exits 2 for these, which the systemd unit does not restart.
    pub fn is_permanent(&self) -> bool {
        match self {
            BootstrapError::DataDir { .. }
            | BootstrapError::NodeIdMismatch { .. }
            | BootstrapError::ClusterNameMismatch { .. }
            | BootstrapError::JoinRefused(_)
            | BootstrapError::JoinTicketsDisagree(..)
            | BootstrapError::JoinTicket(_)
            | BootstrapError::Sharding(_)
            | BootstrapError::NumShardsMismatch { .. }
            | BootstrapError::JoinOtherCluster { .. }
            | BootstrapError::NewerFormat { .. }
            | BootstrapError::Http { .. }
            | BootstrapError::Etcd { .. } => true,
            BootstrapError::Endpoint(e) => e.is_permanent(),
            BootstrapError::Metadata(e) | BootstrapError::MetadataOpen { source: e, .. } => e.is_permanent(),
            BootstrapError::Journal { source, .. } => source.is_permanent(),
            BootstrapError::Shard(RaftNodeError::Storage { source, .. })
            | BootstrapError::Shard(RaftNodeError::Open { source, .. }) => source.is_permanent(),
            BootstrapError::Shard(RaftNodeError::Config { .. }) => true,
            BootstrapError::Shard(_) | BootstrapError::Init(_) | BootstrapError::Interrupted => false,
        }
    }
}

/// What every shard of a node shares.
#[derive(Debug)]
pub struct BaseNodeResources {
    pub config: NodeConfig,
    pub metadata_store: Arc<MetadataStore>,
    /// The recorded identity at start-up (`None`: fresh node that has not initialized or joined).
    pub identity: Option<ClusterIdentity>,
    pub secret_key: SecretKey,
    pub endpoint: Endpoint,
    pub peers: PeerBook,
    pub pool: ConnectionPool,
    pub cluster_id: SharedClusterId,
    /// Raft network factory for shard 0 on the legacy `raft-rpc` ALPN.
    pub network_factory: IrohNetworkFactory,
    /// Signed address/leader announcements over iroh-gossip (`None` when `[gossip] enabled = false`).
    pub gossip_discovery: Option<Arc<GossipDiscovery>>,
    /// Who may connect to the members-only ALPNs, and whether this node was removed.
    pub admission: Admission,
    /// The claim token of a fresh `--no-init` node (nothing pending otherwise).
    pub claim: Arc<Claim>,
    /// Issues and verifies this node's tokens (`crate::auth`).
    pub authority: Arc<crate::auth::Authority>,
    pub shutdown_token: CancellationToken,
}

impl BaseNodeResources {
    /// The gossip topic of this node's cluster (`None` before init or join, or with gossip off).
    pub fn gossip_topic_id(&self) -> Option<iroh_gossip::TopicId> {
        self.gossip_discovery.as_ref().and_then(|g| g.topic_id())
    }

    /// This node as a Raft member: endpoint id plus the addresses it listens on.
    pub fn member(&self) -> MemberNode {
        MemberNode {
            endpoint_id: *self.endpoint.id().as_bytes(),
            addrs: listening_addrs(&self.endpoint, self.config.bind_addr),
        }
    }

    /// This node's ticket.
    pub fn ticket(&self) -> NodeTicket {
        NodeTicket {
            cluster_id: *self.cluster_id.read().unwrap_or_else(|p| p.into_inner()),
            node_id: self.config.node_id,
            endpoint_id: self.endpoint.id(),
            addrs: listening_addrs(&self.endpoint, self.config.bind_addr),
        }
    }
}

/// Refuses a data dir of a newer storage format than this version's; records this version's
/// in a new or older one (format 0, from before formats were recorded, needs no conversion: the
/// opening code of each store fills in what older versions did not keep).
fn settle_storage_format(dir: &std::path::Path, metadata: &MetadataStore) -> Result<(), BootstrapError> {
    match metadata.storage_format().map_err(BootstrapError::Metadata)? {
        Some(found) if found > STORAGE_FORMAT => {
            Err(BootstrapError::NewerFormat { path: dir.to_path_buf(), found, supported: STORAGE_FORMAT })
        }
        Some(found) if found == STORAGE_FORMAT => Ok(()),
        older => {
            let fresh = metadata.identity().map_err(BootstrapError::Metadata)?.is_none() && older.is_none();
            metadata.set_storage_format(STORAGE_FORMAT).map_err(BootstrapError::Metadata)?;
            if !fresh {
                tracing::info!(
                    from = older.unwrap_or(0),
                    to = STORAGE_FORMAT,
                    "data dir {}: storage format upgraded",
                    dir.display()
                );
            }
            Ok(())
        }
    }
}

/// Creates the data dir, identity, endpoint, metadata store and Raft network of a node.
pub async fn bootstrap_base_node(config: NodeConfig) -> Result<BaseNodeResources, BootstrapError> {
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| BootstrapError::DataDir { path: dir.clone(), source })?;
    // On a full disk, make room to open the databases (`cluster::alarm`).
    SpaceReserve::new(&dir, config.storage.reserve_bytes).at_start();
    let secret_key = load_or_create_key(&dir)?;
    let cache = config.storage.cache_split(config.sharding.local_shard_ids().len());
    // Opened and first read with redb's panics on damaged pages caught (`storage::open_guarded`).
    let metadata_path = dir.join("metadata.db");
    let metadata_err = |source| BootstrapError::MetadataOpen { path: metadata_path.clone(), source };
    let metadata_store = Arc::new(
        crate::storage::open_guarded(|| MetadataStore::open(&metadata_path, cache.metadata)).map_err(metadata_err)?,
    );
    crate::storage::open_guarded(|| Ok(settle_storage_format(&dir, &metadata_store))).map_err(metadata_err)??;
    let identity = crate::storage::open_guarded(|| metadata_store.identity()).map_err(metadata_err)?;
    if let Some(id) = &identity {
        if id.node_id != config.node_id {
            return Err(BootstrapError::NodeIdMismatch { path: dir, recorded: id.node_id, configured: config.node_id });
        }
        if id.num_shards != config.sharding.effective_num_shards() {
            return Err(BootstrapError::NumShardsMismatch {
                path: dir,
                recorded: id.num_shards,
                configured: config.sharding.effective_num_shards(),
            });
        }
        if id.cluster_name != config.cluster_name {
            return Err(BootstrapError::ClusterNameMismatch {
                path: dir,
                recorded: id.cluster_name.clone(),
                configured: config.cluster_name.clone(),
            });
        }
        if !config.join.is_empty() {
            // A member already: --join cannot move it to another cluster (that would mix two
            // clusters' data), and is pointless for its own.
            for ticket in join_tickets(&config)? {
                if ticket.cluster_id != id.cluster_id {
                    return Err(BootstrapError::JoinOtherCluster {
                        path: dir,
                        recorded: id.cluster_id,
                        ticket: ticket.cluster_id,
                    });
                }
            }
            tracing::info!(
                cluster_id = %id.cluster_id,
                "data dir {} is already a member of this cluster; --join ignored",
                dir.display()
            );
        }
    }
    // A fresh node that waits to be added or initialized can be claimed only with this token.
    let claim = if identity.is_none() && config.no_init && config.join.is_empty() {
        Claim::load_or_create(&dir).map_err(|source| BootstrapError::DataDir { path: dir.clone(), source })?
    } else {
        Claim::default()
    };
    let lookup = MemoryLookup::new();
    let authority = crate::auth::Authority::new(config.node_id);
    authority.set_cluster(identity.as_ref().map(|i| i.cluster_id));
    let admission = Admission::new(PeerGate::new(config.limits.max_connections as usize));
    let endpoint =
        bind_endpoint_gated(config.bind_addr, Some(secret_key.clone()), lookup.clone(), Some(admission.gate().clone()))
            .await?;
    let peers = PeerBook::new(lookup);
    let connect_timeout = Duration::from_millis(config.raft.election_timeout_min_ms.max(1000));
    let pool = ConnectionPool::new(endpoint.clone(), peers.clone(), connect_timeout);
    let cluster_id: SharedClusterId =
        Arc::new(std::sync::RwLock::new(identity.as_ref().map(|i| i.cluster_id).unwrap_or_default()));
    let network_factory = IrohNetworkFactory::new(pool.clone(), cluster_id.clone(), None);
    let gossip_discovery = config.gossip.enabled.then(|| {
        Arc::new(GossipDiscovery::new(&endpoint, cluster_id.clone(), Duration::from_millis(config.gossip.interval_ms)))
    });
    Ok(BaseNodeResources {
        config,
        metadata_store,
        identity,
        secret_key,
        endpoint,
        peers,
        pool,
        cluster_id,
        network_factory,
        gossip_discovery,
        admission,
        authority,
        claim: Arc::new(claim),
        shutdown_token: CancellationToken::new(),
    })
}

/// A running node (non-sharded: shard 0 only).
#[derive(Debug)]
pub struct NodeHandle {
    pub base: BaseNodeResources,
    /// Shard 0 (in sharded mode: when hosted here).
    pub shard0: RaftNode,
    /// Every shard this node hosts.
    pub shards: BTreeMap<ShardId, RaftNode>,
    pub service: Arc<NodeService>,
    router: Router,
    /// Which of the router's protocol handlers are still stopping (named when a stop stalls).
    shutdowns: Shutdowns,
    supervisor: Supervisor,
    /// Follows shard 0's token records (`cluster::tokens`); holds the service until stopped.
    follower: tokio::task::JoinHandle<()>,
    /// Revokes expired leases of the shards this node leads (`cluster::leases`).
    expiry: tokio::task::JoinHandle<()>,
    /// Watches the quota and the disk, raising NOSPACE alarms (`cluster::alarm`).
    space: tokio::task::JoinHandle<()>,
    /// The operator HTTP endpoint (`cluster::http`), unless it is off.
    http: Option<HttpEndpoint>,
    /// The etcd API (`crate::etcd`), if `--etcd-addr` is given.
    etcd: Option<EtcdEndpoint>,
}

impl NodeHandle {
    /// This node's current ticket.
    pub fn ticket(&self) -> NodeTicket {
        self.service.ticket()
    }

    /// The cluster id this node belongs to (all zeros before init or join).
    pub fn cluster_id(&self) -> ClusterId {
        *self.base.cluster_id.read().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's admin token (its data dir's `admin.token`), once it belongs to a cluster.
    pub fn admin_token(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.service.admin_token_path()).ok()?;
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
    }

    /// Issues a join token as `aspen-cli cluster join-token` does (for nodes started in the
    /// same process, e.g. by tests).
    pub fn join_token(&self, ttl_secs: u64, single_use: bool) -> Result<String, ApiError> {
        let kind = crate::auth::TokenKind::Join { single_use };
        let issued = self.base.authority.issue(kind, Some(ttl_secs));
        issued.map(|(text, _)| text).map_err(|e| ApiError::InvalidRequest(e.to_string()))
    }

    /// Cancelled once this node has been removed from the cluster (shard 0's membership no
    /// longer lists it); the node should then be shut down.
    pub fn removed(&self) -> CancellationToken {
        self.base.admission.removed()
    }

    /// Graceful shutdown: stop accepting requests, let in-flight ones finish, close the endpoint,
    /// stop Raft and close the databases.
    pub async fn shutdown(self) {
        self.shutdown_reporting().await;
    }

    /// [`Self::shutdown`], returning the steps that did not finish in time. Each step is bounded
    /// ([`SHUTDOWN_STEP_LIMIT`], plus the request timeout for draining client requests): one
    /// that stalls is logged as an error and skipped, so a stop always ends and the databases
    /// are closed (every acknowledged write is durable in the Raft log already).
    pub async fn shutdown_reporting(self) -> Vec<String> {
        let node = self.base.config.node_id;
        let mut stalled = Vec::new();
        self.base.shutdown_token.cancel();
        self.supervisor.abort();
        // It holds the service (and so the databases) while it runs: end it before they close.
        self.follower.abort();
        let _ = self.follower.await;
        self.expiry.abort();
        let _ = self.expiry.await;
        self.space.abort();
        let _ = self.space.await;
        if let Some(http) = self.http {
            http.stop().await;
        }
        if let Some(etcd) = self.etcd {
            etcd.stop().await;
        }
        if let Some(g) = &self.base.gossip_discovery {
            bounded(node, &mut stalled, "gossip shutdown".into(), SHUTDOWN_STEP_LIMIT, g.shutdown()).await;
        }
        let drain = self.base.config.limits.request_timeout() + SHUTDOWN_STEP_LIMIT;
        let serving = Serving {
            router: &self.router,
            shutdowns: &self.shutdowns,
            endpoint: &self.base.endpoint,
            shards: &self.shards,
        };
        close_serving_parts(node, &mut stalled, serving, drain).await;
        stalled
    }
}

/// What a node serves with, as its stop closes it.
struct Serving<'a> {
    router: &'a Router,
    shutdowns: &'a Shutdowns,
    endpoint: &'a Endpoint,
    shards: &'a BTreeMap<ShardId, RaftNode>,
}

/// The last steps of every stop, each bounded: the router (draining client requests for up to
/// `drain`), the endpoint, then each shard's Raft (the databases close with their last handle).
async fn close_serving_parts(node: u64, stalled: &mut Vec<String>, serving: Serving<'_>, drain: Duration) {
    let Serving { router, shutdowns, endpoint, shards } = serving;
    let stop = async {
        if let Err(e) = router.shutdown().await {
            tracing::warn!("router shutdown: {e}");
        }
    };
    if tokio::time::timeout(drain, stop).await.is_err() {
        let name = format!("router shutdown (draining requests): {}", shutdowns.describe());
        tracing::error!(node, "shutdown: {name}: not finished within {drain:?}; going on without it");
        stalled.push(name);
    }
    bounded(node, stalled, "endpoint close".into(), SHUTDOWN_STEP_LIMIT, endpoint.close()).await;
    for (id, shard) in shards {
        bounded(node, stalled, format!("raft shutdown of shard {id}"), SHUTDOWN_STEP_LIMIT, shard.shutdown()).await;
    }
}

/// Runs one step of a node's shutdown for at most `limit`; a step that does not finish in time
/// is logged, named in `stalled`, and left behind (the stop goes on without it).
async fn bounded<F: std::future::Future>(node: u64, stalled: &mut Vec<String>, name: String, limit: Duration, step: F) {
    if tokio::time::timeout(limit, step).await.is_err() {
        tracing::error!(node, "shutdown: {name} did not finish within {limit:?}; going on without it");
        stalled.push(name);
    }
}

/// Longest a single step of [`NodeHandle::shutdown`] may take before it is given up on.
pub const SHUTDOWN_STEP_LIMIT: Duration = Duration::from_secs(30);

/// Starts a non-sharded node: shard 0 only, served on `aspen-client` and `raft-rpc`.
pub async fn bootstrap_node(config: NodeConfig) -> Result<NodeHandle, BootstrapError> {
    if config.sharding.enabled {
        return Err(BootstrapError::Sharding(
            "bootstrap_node starts non-sharded nodes; use bootstrap_sharded_node".into(),
        ));
    }
    start_node(config, CancellationToken::new()).await
}

/// Starts a sharded node: every local shard in `shard-N/`, Raft on `raft-shard` (and legacy
/// `raft-rpc` for shard 0), keys routed to their shard.
pub async fn bootstrap_sharded_node(config: NodeConfig) -> Result<NodeHandle, BootstrapError> {
    if !config.sharding.enabled {
        return Err(BootstrapError::Sharding("sharding is not enabled in this config".into()));
    }
    config.validate().map_err(|e| BootstrapError::Sharding(e.to_string()))?;
    start_node(config, CancellationToken::new()).await
}

/// Starts a node, sharded or not as the config says, unless `stop` is cancelled first: a node
/// still joining (retrying an unreachable cluster, say) then closes what it opened and returns
/// [`BootstrapError::Interrupted`]. What `aspen-node` runs, with `stop` cancelled by SIGTERM/SIGINT.
pub async fn bootstrap_until(config: NodeConfig, stop: CancellationToken) -> Result<NodeHandle, BootstrapError> {
    if config.sharding.enabled {
        config.validate().map_err(|e| BootstrapError::Sharding(e.to_string()))?;
    }
    if stop.is_cancelled() {
        return Err(BootstrapError::Interrupted);
    }
    start_node(config, stop).await
}

/// Binds the operator HTTP endpoint's address (`--http-addr`). At the default address (the bind
/// port on 127.0.0.1) a port taken by another program is logged and the node serves without it;
/// an address given explicitly must be bound.
async fn bind_http(config: &NodeConfig) -> Result<Option<tokio::net::TcpListener>, BootstrapError> {
    let Some(addr) = config.http_listen_addr() else { return Ok(None) };
    match HttpEndpoint::bind(addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if config.http_addr == HttpAddr::Auto => {
            tracing::warn!(
                "http endpoint: cannot bind {addr} ({e}); serving without /health, /ready, /status and /metrics (choose an \
                 address with --http-addr)"
            );
            Ok(None)
        }
        Err(source) => Err(BootstrapError::Http { addr, source }),
    }
}

/// Decodes the `--join` tickets; they must all name one cluster.
fn join_tickets(config: &NodeConfig) -> Result<Vec<NodeTicket>, BootstrapError> {
    let tickets: Vec<NodeTicket> = config
        .join
        .iter()
        .map(|t| NodeTicket::decode(t))
        .collect::<Result<_, _>>()
        .map_err(BootstrapError::JoinTicket)?;
    if let Some(first) = tickets.first() {
        if let Some(other) = tickets.iter().find(|t| t.cluster_id != first.cluster_id) {
            return Err(BootstrapError::JoinTicketsDisagree(first.cluster_id, other.cluster_id));
        }
    }
    Ok(tickets)
}

/// Opens the node's journal and the Raft node of every shard it hosts (into `shards`, so that
/// the caller can close those opened before a failure).
async fn open_shards(
    base: &BaseNodeResources,
    shards: &mut BTreeMap<ShardId, RaftNode>,
) -> Result<SharedJournal, BootstrapError> {
    let config = &base.config;
    let sharded = config.sharding.enabled;
    // One journal for every shard's new log entries: one fsync for all of them.
    let journal_path = config.data_dir.join(shared_journal::FILE_NAME);
    let journal = crate::storage::open_guarded(|| SharedJournal::open_file(&journal_path))
        .map_err(|source| BootstrapError::Journal { path: journal_path.clone(), source })?;
    for shard in config.sharding.local_shard_ids() {
        // Sharded nodes send every shard's Raft traffic on `raft-shard` with its own prefix;
        // a non-sharded node uses the base factory (legacy `raft-rpc`, shard 0).
        let network = if sharded {
            IrohNetworkFactory::new(base.pool.clone(), base.cluster_id.clone(), Some(shard))
        } else {
            base.network_factory.clone()
        };
        let node = RaftNode::open(
            shard,
            shard_raft_id(shard, config.node_id),
            ShardFiles { dir: &config.data_dir.join(format!("shard-{shard}")), journal: &journal },
            config,
            network,
        )
        .await?;
        shards.insert(shard, node);
    }
    // Records of shards this node no longer hosts (its `local_shards` changed): moved into
    // their own logs, so that they do not hold the journal's room.
    log_store::settle_unclaimed(&journal, &config.data_dir, config.raft.max_append_bytes)
        .map_err(|source| BootstrapError::Journal { path: journal_path.clone(), source })?;
    Ok(journal)
}

async fn start_node(config: NodeConfig, stop: CancellationToken) -> Result<NodeHandle, BootstrapError> {
    // First, so that an address that cannot be bound stops the start before anything opens.
    let http = bind_http(&config).await?;
    let etcd = match config.etcd_addr {
        Some(addr) => {
            let listener =
                EtcdEndpoint::bind(addr).await.map_err(|e| BootstrapError::Etcd { addr, source: e.into() })?;
            // The certificate and key too: read and checked before the node opens anything.
            let tls = match (&config.etcd_cert, &config.etcd_key) {
                (Some(cert), Some(key)) => Some(
                    crate::etcd::server::acceptor(&EtcdTls { cert: cert.clone(), key: key.clone() })
                        .map_err(|source| BootstrapError::Etcd { addr, source })?,
                ),
                _ => None,
            };
            Some((listener, tls))
        }
        None => None,
    };
    let base = bootstrap_base_node(config).await?;
    let config = &base.config;
    let sharded = config.sharding.enabled;
    let mut shards = BTreeMap::new();
    let opened = open_shards(&base, &mut shards).await.and_then(|journal| {
        let shard0 = shards.get(&0).cloned();
        Ok((journal, shard0.ok_or_else(|| BootstrapError::Sharding("every node hosts shard 0".into()))?))
    });
    let (journal, shard0) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            // Close what was opened (the shards so far, the endpoint) before reporting.
            for shard in shards.values() {
                let _ = tokio::time::timeout(SHUTDOWN_STEP_LIMIT, shard.shutdown()).await;
            }
            let _ = tokio::time::timeout(SHUTDOWN_STEP_LIMIT, base.endpoint.close()).await;
            return Err(e);
        }
    };
    // Before any protocol is served: from here on, only members reach the members-only ALPNs.
    base.admission.start(config.node_id, &shard0, base.shutdown_token.child_token());
    base.admission.check_periodically(
        config.node_id,
        shard0.clone(),
        base.pool.clone(),
        base.shutdown_token.child_token(),
    );

    let metrics = Arc::new(crate::metrics::NodeMetrics::new(journal.fsync_times()));
    let service = Arc::new(NodeService::new(&base, shards.clone(), metrics.clone()));
    let registry = ShardRegistry::default();
    for (id, node) in &shards {
        registry.insert(*id, node.clone());
    }
    // One budget of request memory for both handlers.
    let memory = RequestMemory::new(config.limits.request_memory(), config.max_client_frame());
    let client_handler =
        ClientProtocolHandler::new(service.clone(), config.max_client_frame(), config.limits.request_timeout())
            .with_memory(memory.clone())
            .with_authority(base.authority.clone())
            .with_metrics(metrics.clone());
    let peer_handler = ClientProtocolHandler::with_origin(
        service.clone(),
        config.max_client_frame(),
        config.limits.request_timeout(),
        Origin::Peer,
    )
    .with_memory(memory)
    .with_metrics(metrics.clone());
    let raft_handler =
        |wire| RaftProtocolHandler::new(registry.clone(), base.cluster_id.clone(), wire).with_metrics(metrics.clone());
    // Each handler's shutdown is recorded: a stop that stalls names what holds it.
    let shutdowns = Shutdowns::default();
    let mut builder = Router::builder(base.endpoint.clone())
        .accept(CLIENT_ALPN, shutdowns.track("aspen-client", client_handler))
        .accept(PEER_ALPN, shutdowns.track("aspen-peer", peer_handler))
        .accept(RAFT_ALPN, shutdowns.track("raft-rpc", raft_handler(RaftWire::Legacy)))
        .accept(RAFT_MUX_ALPN, shutdowns.track("raft-mux", raft_handler(RaftWire::Mux)));
    if sharded {
        builder = builder.accept(RAFT_SHARDED_ALPN, shutdowns.track("raft-shard", raft_handler(RaftWire::Sharded)));
    }
    if let Some(g) = &base.gossip_discovery {
        builder = builder.accept(iroh_gossip::ALPN, shutdowns.track("iroh-gossip", g.protocol()));
    }
    let router = builder.spawn();
    // Probes see the node from here on: alive, and not ready until it is a member that serves.
    let http = match http {
        Some(listener) => Some(
            HttpEndpoint::serve(listener, service.clone(), base.shutdown_token.child_token())
                .map_err(|source| BootstrapError::DataDir { path: config.data_dir.clone(), source })?,
        ),
        None => None,
    };
    let etcd = match etcd {
        Some((listener, tls)) => {
            let addr = listener
                .local_addr()
                .map_err(|e| BootstrapError::DataDir { path: config.data_dir.clone(), source: e })?;
            let served = EtcdEndpoint::serve(
                listener,
                tls,
                service.clone(),
                base.authority.clone(),
                config.max_client_frame(),
                base.shutdown_token.child_token(),
            )
            .map_err(|source| BootstrapError::Etcd { addr, source })?;
            let advertised = config.etcd_advertise_addr.clone().unwrap_or_else(|| served.advertised.clone());
            tracing::info!(url = %served.url, advertised = %advertised, "serving the etcd API");
            if config.etcd_advertise_addr.is_none() && addr.ip().is_unspecified() {
                tracing::warn!(
                    "the etcd API is bound to {addr}: etcd's member list shows that address, which clients that find                      members through it (etcdctl --cluster, auto-sync) cannot dial; set --etcd-advertise-addr"
                );
            }
            service.set_etcd_endpoint(advertised);
            Some(served)
        }
        None => None,
    };

    let become_member = async {
        if base.identity.is_none() && !config.join.is_empty() {
            join_cluster(&base, &service).await
        } else if base.identity.is_none() && !config.no_init {
            service.init_cluster().await.map(|_| ()).map_err(BootstrapError::Init)
        } else {
            Ok(())
        }
    };
    let outcome = tokio::select! {
        r = become_member => r,
        _ = stop.cancelled() => Err(BootstrapError::Interrupted),
    };
    if let Err(e) = outcome {
        // Close what was opened (endpoint, Raft cores, databases) before reporting.
        base.shutdown_token.cancel();
        let mut stalled = Vec::new();
        let serving = Serving { router: &router, shutdowns: &shutdowns, endpoint: &base.endpoint, shards: &shards };
        close_serving_parts(config.node_id, &mut stalled, serving, SHUTDOWN_STEP_LIMIT).await;
        return Err(e);
    }
    if let Some(g) = &base.gossip_discovery {
        // Waits for a cluster id when the node has neither initialized nor joined yet.
        g.start(
            AnnounceContext {
                node_id: config.node_id,
                secret_key: base.secret_key.clone(),
                endpoint: base.endpoint.clone(),
                bind_addr: config.bind_addr,
                cluster_id: base.cluster_id.clone(),
                peers: base.peers.clone(),
                service: service.clone(),
            },
            base.shutdown_token.child_token(),
        );
    }
    if service.cluster_id() != ClusterId::default() {
        // A member (initialized, joined, or restarted): its data dir gives local admin access,
        // once its replica of shard 0 holds the cluster's key (a joined node caught up already).
        let wait = if base.identity.is_none() { Duration::from_secs(30) } else { Duration::ZERO };
        service.settle_admin_token(wait).await;
    }
    let follower = service.follow_revocations(base.shutdown_token.child_token());
    let expiry = service.expire_leases(base.shutdown_token.child_token());
    let space = service.watch_space(
        SpaceReserve::new(&config.data_dir, config.storage.reserve_bytes),
        config.limits.quota_bytes,
        base.shutdown_token.child_token(),
    );
    service.write_ticket_file().map_err(|source| BootstrapError::DataDir { path: config.data_dir.clone(), source })?;
    tracing::info!(node_id = config.node_id, shards = shards.len(), ticket = %service.ticket(), "node is serving");
    let supervisor = Supervisor::spawn(config.node_id, shards.clone(), base.shutdown_token.clone());
    Ok(NodeHandle { base, shard0, shards, service, router, shutdowns, supervisor, follower, expiry, space, http, etcd })
}

/// Joins the cluster named by the `--join` tickets: asks it (through any member; requests are
/// forwarded to the leader) to add this node as a learner, catch it up and promote it. Retries
/// with backoff while the cluster is unreachable; a refusal (wrong cluster, duplicate node id)
/// ends the start-up with that message. This node never initializes a cluster of its own.
async fn join_cluster(base: &BaseNodeResources, service: &NodeService) -> Result<(), BootstrapError> {
    let config = &base.config;
    let tickets = join_tickets(config)?;
    let Some(cluster_id) = tickets.first().map(|t| t.cluster_id) else {
        return Err(BootstrapError::JoinRefused("no --join ticket".into()));
    };
    let Some(join_token) = config.join_token.clone().filter(|t| !t.is_empty()) else {
        return Err(BootstrapError::JoinRefused(
            "no join token: --join needs --join-token TOKEN (or ASPEN_JOIN_TOKEN, or join_token in the config \
             file); `aspen-cli cluster join-token` on a member prints one"
                .into(),
        ));
    };
    // Accept Raft messages of that cluster from now on: the leader starts replicating to us
    // while it handles the join.
    *base.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = cluster_id;
    let me = base.member();
    let request = JoinRequest {
        cluster_id,
        cluster_name: config.cluster_name.clone(),
        node_id: config.node_id,
        endpoint_id: me.endpoint_id,
        addrs: me.addrs,
        num_shards: config.sharding.effective_num_shards(),
        local_shards: config.sharding.local_shard_ids(),
        join_token: join_token.clone(),
    };
    // Joining waits for this node to catch up, which can take longer than one request.
    let timeout = config.limits.request_timeout().max(Duration::from_secs(60));
    let through: Vec<String> = tickets.iter().map(|t| format!("node {}", t.node_id)).collect();
    tracing::info!(%cluster_id, "joining the cluster through {}", through.join(", "));
    // The join token lets this node look up the members and ask to join, nothing else.
    let client = AspenClient::connect(tickets, timeout)
        .await
        .map_err(|e| BootstrapError::JoinRefused(format!("cannot create client: {e}")))?
        .with_token(join_token);
    let mut backoff = Duration::from_millis(500);
    // Retries are logged with their reason, at most one line per JOIN_LOG_EVERY.
    let mut last_logged: Option<std::time::Instant> = None;
    let mut attempts = 0u32;
    let result = loop {
        attempts += 1;
        // Reachability first, with a short budget, so that an unreachable cluster is reported
        // within seconds; the join itself may wait long for this node to catch up.
        let reached = client.request_within(ClientRequest::Members, JOIN_PROBE_TIMEOUT).await;
        let answer = match reached {
            Ok(_) => client.request(ClientRequest::Join(request.clone())).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(ClientResponse::Joined(info)) => break Ok(info),
            Ok(other) => break Err(BootstrapError::JoinRefused(format!("unexpected answer {other:?}"))),
            Err(ClientError::Api(ApiError::Refused(msg))) => break Err(BootstrapError::JoinRefused(msg)),
            Err(ClientError::Api(
                e @ (ApiError::InvalidRequest(_) | ApiError::UnsupportedVersion { .. } | ApiError::PermissionDenied(_)),
            )) => break Err(BootstrapError::JoinRefused(e.to_string())),
            Err(e) => {
                if last_logged.is_none_or(|t| t.elapsed() >= JOIN_LOG_EVERY) {
                    tracing::warn!(
                        attempts,
                        "cannot join the cluster yet ({e}); still trying (stop with Ctrl-C/SIGTERM)"
                    );
                    last_logged = Some(std::time::Instant::now());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    };
    client.close().await;
    let info = result?;
    service.adopt_identity(&info, false).map_err(BootstrapError::Init)?;
    tracing::info!(cluster_id = %info.cluster_id, "joined the cluster");
    Ok(())
}

/// Budget of the reachability check before each join attempt.
const JOIN_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// At most one "cannot join yet" line per this interval.
const JOIN_LOG_EVERY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stalled_shutdown_step_is_named_and_left_behind() {
        let mut stalled = Vec::new();
        let limit = Duration::from_millis(50);
        bounded(1, &mut stalled, "quick step".into(), limit, async {}).await;
        bounded(1, &mut stalled, "stuck step".into(), limit, std::future::pending::<()>()).await;
        bounded(1, &mut stalled, "step after it".into(), limit, async {}).await;
        assert_eq!(stalled, vec!["stuck step".to_string()], "only the step that never finished is reported");
    }
}
