//! Aspen under test: a 3-node cluster of real `aspen-node` processes on 127.0.0.1 (one shard,
//! or several with `--sharding-enabled`), formed with `--join` exactly as the README shows.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use aspen::{api::NodeTicket, AspenClient};

use crate::{
    cgroup::{Cgroup, CpuLimiter},
    cpu::CpuMeter,
    procs::{self, free_udp_addrs, NodeProcess, NodeSpec},
};

/// Nodes log warnings, and when a snapshot is made to send or installed (with its size and time).
const SNAPSHOT_LOGS: &str =
    "warn,aspen::storage::state_machine=info,aspen::raft::snapshot_transfer=info,openraft::replication=info";

/// A running Aspen cluster; its processes are stopped, then their cgroups (if capped) and data
/// dirs removed on drop.
pub struct AspenCluster {
    /// Node tickets in node id order (node 1 first).
    pub tickets: Vec<NodeTicket>,
    /// Node 1's admin token (its data dir's `admin.token`).
    pub token: String,
    pub num_shards: u32,
    /// `http://127.0.0.1:PORT` of each node's etcd API, when started with it.
    pub etcd_endpoints: Vec<String>,
    // Field order matters: the processes stop before their cgroups and data dirs are removed.
    nodes: Vec<NodeProcess>,
    cgroups: Vec<Cgroup>,
    _dir: tempfile::TempDir,
}

impl Drop for AspenCluster {
    /// SIGTERM to every process at once, so their shutdowns overlap; each field's drop then
    /// waits for its process (SIGKILL after the grace), then removes the cgroups and data dirs.
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = n.proc.signal(procs::SIGTERM);
        }
    }
}

impl AspenCluster {
    /// Starts node 1 (which initializes the cluster), then nodes 2..=n with `--join` through
    /// node 1's ticket, and waits until every node votes in every shard and all agree on each
    /// shard's leader. `num_shards > 1` starts every node with `--sharding-enabled
    /// --sharding-num-shards N`. Raft timing and everything else are the product's defaults.
    /// With `limiter`, each node runs in a capped cgroup of its own.
    pub async fn start(
        node_bin: &Path,
        n: usize,
        num_shards: u32,
        limiter: Option<&CpuLimiter>,
    ) -> Result<AspenCluster, String> {
        Self::start_with(node_bin, n, num_shards, limiter, false).await
    }

    /// As [`AspenCluster::start`]; with `etcd_api`, every node also serves etcd's API
    /// (`--etcd-addr` on a free port; [`AspenCluster::etcd_endpoints`]).
    pub async fn start_with(
        node_bin: &Path,
        n: usize,
        num_shards: u32,
        limiter: Option<&CpuLimiter>,
        etcd_api: bool,
    ) -> Result<AspenCluster, String> {
        // ASPEN_COMPARE_KEEP=1 keeps the data dirs and logs (for a post-mortem).
        let dir = tempfile::Builder::new()
            .prefix("aspen-compare-aspen-")
            .disable_cleanup(std::env::var_os("ASPEN_COMPARE_KEEP").is_some())
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let addrs = free_udp_addrs(n)?;
        let mut cluster = AspenCluster {
            tickets: Vec::new(),
            token: String::new(),
            num_shards,
            etcd_endpoints: Vec::new(),
            nodes: Vec::new(),
            cgroups: Vec::new(),
            _dir: dir,
        };
        let mut join_token = String::new();
        let root = cluster._dir.path().to_path_buf();
        for (i, addr) in addrs.iter().enumerate() {
            let node_id = i as u64 + 1;
            // The product's defaults (Raft timing and all), only where it lives and listens.
            let mut spec = NodeSpec::new(node_bin, &root, node_id, *addr);
            spec.test_timing = false;
            spec.rust_log = SNAPSHOT_LOGS.into();
            if num_shards > 1 {
                spec.args
                    .extend(["--sharding-enabled", "--sharding-num-shards", &num_shards.to_string()].map(String::from));
            }
            if etcd_api {
                let port = procs::free_tcp_ports(1)?[0];
                spec.args.extend(["--etcd-addr".to_string(), format!("127.0.0.1:{port}")]);
                cluster.etcd_endpoints.push(format!("http://127.0.0.1:{port}"));
            }
            if let Some(first) = cluster.tickets.first() {
                spec.args.extend(["--join".to_string(), first.encode(), "--join-token".into(), join_token.clone()]);
            }
            if let Some(limiter) = limiter {
                let label = format!("aspen{num_shards}-node-{node_id}");
                cluster.cgroups.push(limiter.create(&label).map_err(|e| e.to_string())?);
            }
            let log = root.join(format!("node-{node_id}.log"));
            cluster.nodes.push(procs::spawn_node(spec, &log, cluster.cgroups.get(i))?);
            let ticket = wait_for_ticket(cluster.nodes.last_mut().expect("just pushed")).await?;
            cluster.tickets.push(ticket);
            if node_id == 1 {
                // Node 1 initialized the cluster: its admin token, and a join token for the rest.
                let path = root.join("node-1").join("admin.token");
                let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                cluster.token = text.trim().to_string();
                let client = cluster.client().await?;
                let made = client.create_join_token(3600, false).await.map_err(|e| format!("join token: {e}"));
                client.close().await;
                join_token = made?.1;
            }
        }
        cluster.wait_converged(Duration::from_secs(120)).await?;
        Ok(cluster)
    }

    /// The lines of every node's log that mention snapshots.
    pub fn snapshot_log_lines(&self) -> Vec<String> {
        let root = self._dir.path();
        (1..=self.nodes.len())
            .flat_map(|id| {
                let text = std::fs::read_to_string(root.join(format!("node-{id}.log"))).unwrap_or_default();
                text.lines().filter(|l| l.contains("snapshot")).map(|l| format!("node {id}: {l}")).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Each node's process id and data dir, in node id order.
    pub fn servers(&self) -> Vec<(Option<u32>, std::path::PathBuf)> {
        self.nodes.iter().map(|n| (n.proc.pid(), n.spec.data_dir.clone())).collect()
    }

    /// Starts one more node, joining through node 1 (it catches up from the log or, if the
    /// log behind the leaders was purged, by snapshot), and waits until it votes in every shard
    /// with the same applied index as the others, or `limit` passes. (Its peak memory while
    /// catching up is its `VmHWM` afterwards.)
    pub async fn add_node(&mut self, limit: Duration) -> Result<(), String> {
        let node_id = self.nodes.len() as u64 + 1;
        let root = self._dir.path().to_path_buf();
        let addr = free_udp_addrs(1)?[0];
        let client = self.client().await?;
        let made = client.create_join_token(3600, false).await.map_err(|e| format!("join token: {e}"));
        client.close().await;
        let join_token = made?.1;
        let mut spec = NodeSpec::new(self.nodes[0].spec.bin.clone(), &root, node_id, addr);
        spec.test_timing = false;
        spec.rust_log = SNAPSHOT_LOGS.into();
        if self.num_shards > 1 {
            spec.args.extend(
                ["--sharding-enabled", "--sharding-num-shards", &self.num_shards.to_string()].map(String::from),
            );
        }
        spec.args.extend(["--join".to_string(), self.tickets[0].encode(), "--join-token".into(), join_token]);
        let log = root.join(format!("node-{node_id}.log"));
        self.nodes.push(procs::spawn_node(spec, &log, None)?);
        // The ticket comes once the node has joined (as a learner caught up, then a voter).
        let deadline = Instant::now() + limit;
        let node = self.nodes.last_mut().expect("just pushed");
        let ticket = loop {
            if let Some(ticket) = node.poll_ready()? {
                break ticket;
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not join within {limit:?}:\n{}", node.proc.name, node.proc.log_tail(20)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.tickets.push(ticket);
        self.wait_converged(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(10)))
            .await
            .map(|_| ())
    }

    /// Reads the CPU time of every node.
    pub fn cpu_meter(&self) -> Result<CpuMeter, String> {
        let sources = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| procs::cpu_source(&n.proc, self.cgroups.get(i)))
            .collect::<Result<_, _>>()?;
        Ok(CpuMeter::new(sources))
    }

    /// Spreads the shard leaders over the nodes (`aspen-cli cluster balance-leaders`, through the
    /// same client call) and waits for the cluster to settle; returns the leader of each shard.
    pub async fn balance_leaders(&mut self) -> Result<BTreeMap<u32, u64>, String> {
        let client = self.client().await?;
        let result = client.balance_leaders().await.map_err(|e| format!("balance-leaders: {e}"));
        client.close().await;
        result?;
        self.wait_converged(Duration::from_secs(60)).await
    }

    /// Defragments every node's state machines, one node after another (`aspen-cli defrag
    /// --cluster`).
    pub async fn defragment(&self) -> Result<(), String> {
        let client = self.client().await?;
        let mut result = Ok(());
        for node_id in 1..=self.nodes.len() as u64 {
            if let Err(e) = client.defragment(Some(node_id), Duration::from_secs(3600)).await {
                result = Err(format!("defrag of node {node_id}: {e}"));
                break;
            }
        }
        client.close().await;
        result
    }

    async fn client(&self) -> Result<AspenClient, String> {
        AspenClient::connect(self.tickets.clone(), Duration::from_secs(10))
            .await
            .map(|c| c.with_token(&self.token))
            .map_err(|e| format!("cannot connect to the Aspen cluster: {e}"))
    }

    /// Waits until every node reports every shard with all nodes as voters, one agreed leader
    /// and the same applied index; returns the leader of each shard.
    async fn wait_converged(&mut self, limit: Duration) -> Result<BTreeMap<u32, u64>, String> {
        let deadline = Instant::now() + limit;
        let client = self.client().await?;
        let result = loop {
            if let Some(e) = self.exited_node() {
                break Err(e);
            }
            let last = match client.cluster_status().await {
                Ok(status) => match self.leaders_if_converged(&status) {
                    Ok(leaders) => break Ok(leaders),
                    Err(e) => e,
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                break Err(format!("Aspen cluster did not converge within {limit:?}: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        client.close().await;
        result
    }

    fn leaders_if_converged(&self, status: &aspen::api::ClusterStatus) -> Result<BTreeMap<u32, u64>, String> {
        let want_voters: Vec<u64> = (1..=self.nodes.len() as u64).collect();
        if status.nodes.len() != self.nodes.len() {
            return Err(format!("{} of {} nodes are members", status.nodes.len(), self.nodes.len()));
        }
        let mut leaders = BTreeMap::new();
        for shard in 0..self.num_shards {
            let mut seen = None;
            for report in &status.nodes {
                let node = report.status.as_ref().ok_or_else(|| {
                    format!("node {} unreachable: {}", report.node_id, report.error.clone().unwrap_or_default())
                })?;
                let s = node
                    .shards
                    .iter()
                    .find(|s| s.shard == shard)
                    .ok_or_else(|| format!("node {} does not host shard {shard} yet", report.node_id))?;
                let mut voters = s.voters.clone();
                voters.sort_unstable();
                if voters != want_voters || s.leader.is_none() {
                    return Err(format!(
                        "shard {shard} on node {}: voters {voters:?}, leader {:?}",
                        report.node_id, s.leader
                    ));
                }
                match seen {
                    None => seen = Some((s.leader, s.last_applied)),
                    Some(v) if v == (s.leader, s.last_applied) => {}
                    Some(v) => {
                        return Err(format!(
                            "shard {shard}: nodes disagree ({v:?} vs {:?})",
                            (s.leader, s.last_applied)
                        ))
                    }
                }
            }
            if let Some((Some(leader), _)) = seen {
                leaders.insert(shard, leader);
            }
        }
        Ok(leaders)
    }

    fn exited_node(&mut self) -> Option<String> {
        self.nodes.iter_mut().find_map(|n| {
            n.proc.exited().map(|status| format!("{} exited ({status}):\n{}", n.proc.name, n.proc.log_tail(20)))
        })
    }
}

/// Waits until the node has written a ticket naming its bind address.
async fn wait_for_ticket(node: &mut NodeProcess) -> Result<NodeTicket, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(ticket) = node.poll_ready()? {
            return Ok(ticket);
        }
        if Instant::now() > deadline {
            return Err(format!("{} wrote no ticket within 60 s:\n{}", node.proc.name, node.proc.log_tail(20)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
