//! Test harness shared by every integration test binary: spawn real `aspen-node` processes on
//! loopback with their own data dirs, run `aspen-cli` against them, and stop them gracefully or
//! with `kill -9`; in-process nodes ([`InProcNode`]); waiting for convergence and equal replica
//! digests; and the recorded client workload of the fault tests ([`workload`]).
#![allow(dead_code)]

pub mod workload;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use aspen::api::{NodeTicket, StateDigest};
use aspen_testkit::{NodeProcess, NodeSpec, OnDrop, Output as ProcOutput};

pub const NODE_BIN: &str = env!("CARGO_BIN_EXE_aspen-node");
pub const CLI_BIN: &str = env!("CARGO_BIN_EXE_aspen-cli");

pub use aspen_testkit::free_port;

/// One `aspen-node` process of a test and its data dir (test Raft timing, `RUST_LOG=warn`,
/// stderr on the test's stderr; killed with `kill -9` when dropped).
pub struct NodeProc {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub bind: SocketAddr,
    pub extra_args: Vec<String>,
    running: Option<NodeProcess>,
}

impl NodeProc {
    /// A node with a fresh data dir under `root` (not started yet).
    pub fn new(root: &Path, node_id: u64) -> Self {
        NodeProc {
            node_id,
            data_dir: root.join(format!("node-{node_id}")),
            bind: SocketAddr::from(([127, 0, 0, 1], free_port())),
            extra_args: Vec::new(),
            running: None,
        }
    }

    fn spec(&self) -> NodeSpec {
        let mut spec = NodeSpec::new(NODE_BIN, Path::new(""), self.node_id, self.bind);
        spec.data_dir = self.data_dir.clone();
        spec.args = self.extra_args.clone();
        spec
    }

    /// The command that starts this node (for tests that spawn it themselves).
    pub fn command(&self) -> Command {
        let mut cmd = self.spec().command();
        aspen_testkit::clean_env(&mut cmd);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
        cmd
    }

    /// Starts the node and waits until its ticket file names its current address.
    pub fn start(&mut self) {
        assert!(self.running.is_none(), "node {} already running", self.node_id);
        let mut node = NodeProcess::start(self.spec(), &ProcOutput::Inherit, OnDrop::Kill).expect("spawn aspen-node");
        node.wait_ready(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
        self.running = Some(node);
    }

    pub fn read_ticket(&self) -> Option<NodeTicket> {
        self.spec().read_ticket()
    }

    pub fn ticket(&self) -> NodeTicket {
        self.read_ticket().expect("node has a ticket")
    }

    pub fn is_running(&mut self) -> bool {
        self.running.as_mut().is_some_and(|n| n.proc.is_running())
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut n) = self.running.take() {
            n.proc.kill();
        }
    }

    /// The running node's process id.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().and_then(|n| n.proc.pid())
    }

    /// How the node exited, once it exits by itself within `secs` (e.g. "exit status: 2").
    pub fn exited_within(&mut self, secs: u64) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.running.as_mut().and_then(|n| n.proc.exited()) {
                self.running = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut node = self.running.take().expect("node running");
        node.proc.terminate(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `aspen-cli --data-dir <this node> ARGS`.
    /// This node's `admin.token` (written once it belongs to a cluster).
    pub fn admin_token(&self) -> String {
        let text = std::fs::read_to_string(self.data_dir.join("admin.token")).expect("admin.token");
        text.trim().to_string()
    }

    /// A join token from this node (`aspen-cli cluster join-token`).
    pub fn join_token(&self) -> String {
        let out = self.cli(&["cluster", "join-token"]);
        expect_code(&out, 0, "cluster join-token");
        stdout(&out).trim().to_string()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        cli_command(20).arg("--data-dir").arg(&self.data_dir).args(args).output().expect("run aspen-cli")
    }
}

/// `aspen-cli --timeout SECS`, without the harness's `ASPEN_TICKET` / `ASPEN_DATA_DIR`.
fn cli_command(secs: u32) -> Command {
    let mut cmd = Command::new(CLI_BIN);
    cmd.args(["--timeout", &secs.to_string()]);
    aspen_testkit::clean_env(&mut cmd);
    cmd
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, printing stdout/stderr on mismatch.
pub fn expect_code(o: &Output, code: i32, what: &str) {
    assert_eq!(o.status.code(), Some(code), "{what}: stdout={:?} stderr={:?}", stdout(o), stderr(o));
}

/// Runs `aspen-cli ARGS` in `dir` (created), with no data dir of any node: as a user on another
/// machine would.
pub fn cli_in(dir: &Path, args: &[&str]) -> Output {
    std::fs::create_dir_all(dir).unwrap();
    cli_command(20).current_dir(dir).args(args).output().expect("run aspen-cli")
}

/// Runs `aspen-cli` with a custom `--timeout` (seconds).
pub fn cli_with_timeout(node: &NodeProc, secs: u32, args: &[&str]) -> Output {
    cli_command(secs).arg("--data-dir").arg(&node.data_dir).args(args).output().expect("run aspen-cli")
}

/// The flags of a 4-shard node.
pub const SHARD_FLAGS: [&str; 3] = ["--sharding-enabled", "--sharding-num-shards", "4"];

/// Three `aspen-node` processes with 4 shards under `root`: node 1 initializes the cluster, 2
/// and 3 join it with a join token (each started once the one before serves).
pub fn start_sharded_processes(root: &Path) -> Vec<NodeProc> {
    start_processes(root, |_| SHARD_FLAGS.iter().map(|s| s.to_string()).collect())
}

/// Three real nodes under `root`, each started with `flags(node id)`: node 1 initializes the
/// cluster, 2 and 3 join it (one after the other).
pub fn start_processes(root: &Path, flags: impl Fn(u64) -> Vec<String>) -> Vec<NodeProc> {
    let mut nodes: Vec<NodeProc> = (1..=3).map(|id| NodeProc::new(root, id)).collect();
    nodes[0].extra_args = flags(1);
    nodes[0].start();
    let t1 = nodes[0].ticket().encode();
    let join_token = nodes[0].join_token();
    for n in &mut nodes[1..] {
        n.extra_args = flags(n.node_id);
        n.extra_args.extend(["--join".to_string(), t1.clone(), "--join-token".into(), join_token.clone()]);
        n.start();
    }
    nodes
}

/// Three in-process nodes from `configs`: the first initializes a cluster, the other two join
/// it through its ticket (concurrently).
pub async fn start_three(mut configs: Vec<aspen::NodeConfig>) -> [InProcNode; 3] {
    assert_eq!(configs.len(), 3, "three configs");
    let n1 = InProcNode::start(configs[0].clone()).await;
    for c in &mut configs[1..] {
        n1.joins_through(c);
    }
    let (n2, n3) = tokio::join!(InProcNode::start(configs[1].clone()), InProcNode::start(configs[2].clone()));
    [n1, n2, n3]
}

/// Every key of the cluster as text, in key order (one linearizable scan, all pages).
pub async fn all_keys(client: &aspen::AspenClient) -> Vec<String> {
    client
        .scan("", usize::MAX, aspen::api::ReadConsistency::Linearizable)
        .await
        .expect("scan")
        .into_iter()
        .map(|kv| String::from_utf8(kv.key).expect("UTF-8 key"))
        .collect()
}

/// An in-process node: the real bootstrap, endpoint and storage, in this test's runtime.
pub struct InProcNode {
    pub config: aspen::NodeConfig,
    pub handle: Option<aspen::cluster::NodeHandle>,
}

impl InProcNode {
    /// Config for node `node_id` under `root`, on a fixed free port, with test-friendly timing.
    pub fn config(root: &Path, node_id: u64) -> aspen::NodeConfig {
        let mut c = aspen::NodeConfig {
            node_id,
            data_dir: root.join(format!("node-{node_id}")),
            bind_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            ..Default::default()
        };
        c.raft.heartbeat_interval_ms = 400;
        c.raft.election_timeout_min_ms = 1500;
        c.raft.election_timeout_max_ms = 3000;
        c.limits.request_timeout_ms = 20_000;
        c
    }

    pub async fn start(config: aspen::NodeConfig) -> Self {
        let handle = Self::boot(&config).await;
        InProcNode { config, handle: Some(handle) }
    }

    /// Starts the node. A restart binds the port its previous run used: if that is still in use
    /// (seen once in a full run, right after a clean stop: the closed endpoint's socket still
    /// held for a moment, or the port taken by another test binary meanwhile), it tries again
    /// for up to 10 s.
    async fn boot(config: &aspen::NodeConfig) -> aspen::cluster::NodeHandle {
        use aspen::{cluster::BootstrapError, transport::endpoint::EndpointError};
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let booted = if config.sharding.enabled {
                aspen::cluster::bootstrap_sharded_node(config.clone()).await
            } else {
                aspen::cluster::bootstrap_node(config.clone()).await
            };
            match booted {
                Ok(handle) => return handle,
                Err(BootstrapError::Endpoint(EndpointError::AddrInUse(_))) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("node starts: {e:?}"),
            }
        }
    }

    pub fn handle(&self) -> &aspen::cluster::NodeHandle {
        self.handle.as_ref().expect("node running")
    }

    pub fn ticket(&self) -> NodeTicket {
        self.handle().ticket()
    }

    pub fn status(&self) -> aspen::api::ShardStatus {
        self.handle().shard0.status()
    }

    /// Shuts the node down gracefully; a shutdown that does not end fails the test here, naming
    /// the node. Each shutdown step is bounded (`NodeHandle::shutdown_reporting`), so a stop
    /// ends even when a step stalls; a stalled step — rare: iroh-gossip's stop, now
    /// bounded and off the router's path (docs/design.md §12) — is printed here (`--no-capture` shows it) and appended to
    /// `$TMPDIR/aspen-shutdown-stalls.log` rather than failing the test.
    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            let id = self.config.node_id;
            let stalled = tokio::time::timeout(Duration::from_secs(300), h.shutdown_reporting())
                .await
                .unwrap_or_else(|_| panic!("node {id} did not shut down within 300 s"));
            if !stalled.is_empty() {
                let line = format!("SHUTDOWN STALLED: node {id}: {stalled:?}");
                eprintln!("{line}");
                // Passing tests' output is hidden: keep a trail across runs for whoever hunts it.
                let trail = std::env::temp_dir().join("aspen-shutdown-stalls.log");
                if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(trail) {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
            }
        }
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        let id = self.config.node_id;
        let boot = tokio::time::timeout(Duration::from_secs(120), Self::boot(&self.config)).await;
        self.handle = Some(boot.unwrap_or_else(|_| panic!("node {id} did not start again within 120 s")));
    }

    /// A client of this node with its admin token.
    pub async fn client(&self) -> aspen::AspenClient {
        self.client_with(self.admin_token()).await
    }

    /// A client of this node with `token` (a retried write must carry the token of its first
    /// send: sessions are bound to their token).
    pub async fn client_with(&self, token: String) -> aspen::AspenClient {
        let client = aspen::AspenClient::connect(vec![self.ticket()], Duration::from_secs(30)).await.expect("client");
        client.with_token(token)
    }

    /// This node's `admin.token`.
    pub fn admin_token(&self) -> String {
        self.handle().admin_token().expect("a member has an admin.token")
    }

    /// Sets `config` to join the cluster through this node: its ticket and a join token.
    pub fn joins_through(&self, config: &mut aspen::NodeConfig) {
        config.join = vec![self.ticket().encode()];
        config.join_token = Some(self.handle().join_token(3600, false).expect("join token"));
    }
}

/// Polls `check` every 100 ms until it returns true or `secs` pass; panics with `what` then.
pub async fn wait_until(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {secs} s waiting for: {what}");
}

/// Waits until every running node has applied the same index and agrees on one leader.
pub async fn wait_converged(nodes: &[&InProcNode], secs: u64) {
    wait_until(secs, "replicas converge", || {
        let st: Vec<_> = nodes.iter().map(|n| n.status()).collect();
        let leader = st[0].leader;
        leader.is_some()
            && st.iter().all(|s| s.leader == leader && s.last_applied == st[0].last_applied)
            && st.iter().any(|s| s.role == "Leader" && s.last_log_index == s.last_applied)
    })
    .await;
}

/// Waits until, on every shard, all running nodes agree on one leader and have applied the same
/// index.
pub async fn wait_shards_converged(nodes: &[&InProcNode], secs: u64) {
    wait_until(secs, "every shard converges", || {
        let first = nodes[0].handle();
        first.shards.keys().all(|shard| {
            let st: Vec<_> = nodes.iter().map(|n| n.handle().shards[shard].status()).collect();
            st[0].leader.is_some()
                && st.iter().all(|s| s.leader == st[0].leader && s.last_applied == st[0].last_applied)
                && st.iter().any(|s| s.role == "Leader" && s.last_log_index == s.last_applied)
        })
    })
    .await;
}

/// The node id [`admit_as_member`] gives a test's own endpoint.
pub const RAW_MEMBER_ID: u64 = 990;

/// Makes `ep` a member of `node`'s cluster — a learner of shard 0 that never answers — so that
/// the members-only ALPNs admit it: for tests that speak to a node as a (misbehaving) member.
pub async fn admit_as_member(node: &aspen::cluster::NodeHandle, ep: &iroh::Endpoint) {
    let member = aspen::raft::MemberNode { endpoint_id: *ep.id().as_bytes(), addrs: ep.bound_sockets() };
    let raft_id = aspen::api::shard_raft_id(0, RAW_MEMBER_ID);
    node.shard0.raft().add_learner(raft_id, member, false).await.expect("add the test endpoint as a learner");
    let gate = node.base.admission.gate().clone();
    wait_until(30, "the gate admits the test endpoint", || gate.admits(&ep.id())).await;
}

/// A test's own endpoint on 127.0.0.1 (ephemeral key, offline-safe).
pub async fn raw_endpoint() -> iroh::Endpoint {
    aspen::transport::endpoint::bind_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        None,
        iroh::address_lookup::MemoryLookup::new(),
    )
    .await
    .unwrap()
}

/// Raft network clients of our own (one ephemeral endpoint, one pooled connection) to the node
/// behind `ticket`, stamping `cluster_id` on their messages; one client per entry of `shards`
/// (`Some(n)`: `raft-shard` with prefix n; `None`: legacy `raft-rpc`). With `admit`, the
/// endpoint is first made a member of that node's cluster ([`admit_as_member`]).
pub async fn raw_raft_clients(
    ticket: &NodeTicket,
    cluster_id: aspen::api::ClusterId,
    shards: &[Option<u32>],
    admit: Option<&aspen::cluster::NodeHandle>,
) -> (iroh::Endpoint, Vec<aspen::raft::network::IrohNetwork>) {
    use aspen::{
        raft::{IrohNetworkFactory, MemberNode},
        transport::{ConnectionPool, PeerBook},
    };
    use openraft::RaftNetworkFactory;
    let ep = raw_endpoint().await;
    if let Some(node) = admit {
        admit_as_member(node, &ep).await;
    }
    let pool = ConnectionPool::new(ep.clone(), PeerBook::default(), Duration::from_secs(5));
    let cluster = std::sync::Arc::new(std::sync::RwLock::new(cluster_id));
    let member = MemberNode { endpoint_id: *ticket.endpoint_id.as_bytes(), addrs: ticket.addrs.clone() };
    let mut nets = Vec::new();
    for shard in shards {
        let target = aspen::api::shard_raft_id(shard.unwrap_or(0), ticket.node_id);
        nets.push(IrohNetworkFactory::new(pool.clone(), cluster.clone(), *shard).new_client(target, &member).await);
    }
    (ep, nets)
}

/// A client that knows the tickets of `nodes` (and fails over between them).
pub async fn client_of(nodes: &[&InProcNode]) -> aspen::AspenClient {
    let tickets = nodes.iter().map(|n| n.ticket()).collect();
    let client = aspen::AspenClient::connect(tickets, Duration::from_secs(30)).await.expect("client");
    client.with_token(nodes[0].admin_token())
}

/// One node's digest of one shard: the incrementally kept one and a full recount of its items
/// (`None` where the state machine could not be read).
#[derive(Debug)]
pub struct ReplicaDigest {
    pub node_id: u64,
    pub kept: Option<StateDigest>,
    pub recount: Option<StateDigest>,
}

/// Every running node's digest of every shard it hosts, read once, by shard.
pub fn shard_digests(nodes: &[&InProcNode]) -> BTreeMap<u32, Vec<ReplicaDigest>> {
    let mut out: BTreeMap<u32, Vec<_>> = BTreeMap::new();
    for n in nodes {
        for (shard, raft) in &n.handle().shards {
            let reader = raft.reader();
            out.entry(*shard).or_default().push(ReplicaDigest {
                node_id: n.config.node_id,
                kept: reader.digest().ok(),
                recount: reader.recompute_digest().ok(),
            });
        }
    }
    out
}

/// Waits until, on every shard, every running node that hosts it has applied the same index and
/// has the same state digest there (and each node's incremental digest equals a full recount);
/// returns the agreed digest of each shard. Panics after `secs` with every node's digests.
pub async fn wait_digests_equal(nodes: &[&InProcNode], secs: u64) -> BTreeMap<u32, StateDigest> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let all = shard_digests(nodes);
        let agreed: Option<BTreeMap<u32, StateDigest>> = all
            .iter()
            .map(|(shard, views)| {
                let first = views.first().and_then(|v| v.kept)?;
                views.iter().all(|v| v.kept == Some(first) && v.recount == Some(first)).then_some((*shard, first))
            })
            .collect();
        if let Some(agreed) = agreed {
            if !agreed.is_empty() {
                return agreed;
            }
        }
        if Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for equal replica digests: {all:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
