//! etcd under test: a 3-member cluster of real `etcd` processes on 127.0.0.1, and etcd as an
//! [`aspen_bench::BenchBackend`].

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use aspen::api::ReadConsistency;
use aspen_bench::{BenchBackend, BenchClient, OpError};
use etcd_client::{Client, ConnectOptions, GetOptions, Txn, TxnOp};

use crate::{
    cgroup::{Cgroup, CpuLimiter},
    cpu::CpuMeter,
    procs::{self, free_tcp_ports, Proc},
};

/// A running etcd cluster; its processes are stopped, then their cgroups (if capped) and data
/// dirs removed on drop.
pub struct EtcdCluster {
    /// `http://127.0.0.1:PORT` of each member, in member order.
    pub endpoints: Vec<String>,
    // Field order matters: the processes stop before their cgroups and data dirs are removed.
    members: Vec<Proc>,
    cgroups: Vec<Cgroup>,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdCluster {
    /// SIGTERM to every process at once, so their shutdowns overlap; each field's drop then
    /// waits for its process (SIGKILL after the grace), then removes the cgroups and data dirs.
    fn drop(&mut self) {
        for n in &self.members {
            let _ = n.signal(procs::SIGTERM);
        }
    }
}

impl EtcdCluster {
    /// Starts `n` members with fresh data dirs (etcd's defaults otherwise: fsync on, 100 ms
    /// heartbeat, 1 s election timeout) and waits until every member knows the leader. With
    /// `limiter`, each member runs in a capped cgroup of its own.
    pub async fn start(etcd: &Path, n: usize, limiter: Option<&CpuLimiter>) -> Result<EtcdCluster, String> {
        Self::start_with(etcd, n, limiter, &[]).await
    }

    /// As [`EtcdCluster::start`], with `extra` flags for every member.
    pub async fn start_with(
        etcd: &Path,
        n: usize,
        limiter: Option<&CpuLimiter>,
        extra: &[String],
    ) -> Result<EtcdCluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("aspen-compare-etcd-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let ports = free_tcp_ports(2 * n)?;
        let (client_ports, peer_ports) = ports.split_at(n);
        let name = |i: usize| format!("m{i}");
        let initial_cluster =
            (0..n).map(|i| format!("{}=http://127.0.0.1:{}", name(i), peer_ports[i])).collect::<Vec<_>>().join(",");
        let token = format!("aspen-compare-{}", std::process::id());
        let endpoints = client_ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        let mut cluster = EtcdCluster { endpoints, members: Vec::new(), cgroups: Vec::new(), _dir: dir };
        let root = cluster._dir.path().to_path_buf();
        for i in 0..n {
            let client_url = format!("http://127.0.0.1:{}", client_ports[i]);
            let peer_url = format!("http://127.0.0.1:{}", peer_ports[i]);
            let data_dir: PathBuf = root.join(name(i));
            let mut cmd = Command::new(etcd);
            cmd.arg("--name")
                .arg(name(i))
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial_cluster, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .args(extra);
            if let Some(limiter) = limiter {
                cluster.cgroups.push(limiter.create(&format!("etcd-{}", name(i))).map_err(|e| e.to_string())?);
            }
            let log = root.join(format!("{}.log", name(i)));
            let member = procs::spawn(format!("etcd {}", name(i)), cmd, &log, cluster.cgroups.get(i))?;
            cluster.members.push(member);
        }
        cluster.wait_ready(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// Each member's process id and data dir.
    pub fn servers(&self) -> Vec<(Option<u32>, PathBuf)> {
        (0..self.members.len()).map(|i| (self.members[i].pid(), self._dir.path().join(format!("m{i}")))).collect()
    }

    /// Reads the CPU time of every member.
    pub fn cpu_meter(&self) -> Result<CpuMeter, String> {
        let sources = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| procs::cpu_source(m, self.cgroups.get(i)))
            .collect::<Result<_, _>>()?;
        Ok(CpuMeter::new(sources))
    }

    /// Waits until every member reports the same leader and accepts a put.
    async fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            for m in &mut self.members {
                if let Some(status) = m.exited() {
                    return Err(format!("{} exited during start-up ({status}):\n{}", m.name, m.log_tail(20)));
                }
            }
            let last_error = match self.check_ready().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(format!("etcd cluster not ready within {limit:?}: {last_error}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Defragments every member, one after another (`etcdctl defrag --cluster`).
    pub async fn defragment(&self) -> Result<(), String> {
        for endpoint in &self.endpoints {
            let options = ConnectOptions::new().with_timeout(Duration::from_secs(3600));
            let mut client =
                Client::connect([endpoint], Some(options)).await.map_err(|e| format!("{endpoint}: {e}"))?;
            client.defragment().await.map_err(|e| format!("defrag of {endpoint}: {e}"))?;
        }
        Ok(())
    }

    async fn check_ready(&self) -> Result<(), String> {
        let mut leaders = Vec::new();
        for endpoint in &self.endpoints {
            let options = ConnectOptions::new().with_timeout(Duration::from_secs(2));
            let mut client =
                Client::connect([endpoint], Some(options)).await.map_err(|e| format!("{endpoint}: {e}"))?;
            let status = client.status().await.map_err(|e| format!("{endpoint}: {e}"))?;
            if status.leader() == 0 {
                return Err(format!("{endpoint}: no leader yet"));
            }
            leaders.push(status.leader());
        }
        if leaders.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!("members disagree on the leader: {leaders:?}"));
        }
        let options = ConnectOptions::new().with_timeout(Duration::from_secs(2));
        let mut client = Client::connect(&self.endpoints, Some(options)).await.map_err(|e| e.to_string())?;
        client.put("aspen-compare/ready", "1", None).await.map_err(|e| format!("test put: {e}"))?;
        Ok(())
    }
}

/// etcd as a bench backend: client `i` is its own [`etcd_client::Client`] (one HTTP/2
/// connection) to member `i % members`. Puts are `Put`; linearizable gets are etcd's default
/// `Range`; stale gets are serializable (member-local) `Range`s.
pub struct EtcdBackend {
    endpoints: Vec<String>,
    timeout: Duration,
    name: String,
    /// etcd user and password (Aspen's etcd API: user `token`, an Aspen token as password).
    user: Option<(String, String)>,
}

impl EtcdBackend {
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> EtcdBackend {
        EtcdBackend { endpoints, timeout, name: "etcd".into(), user: None }
    }

    /// The same client code against Aspen's etcd API (`--etcd-addr`), authenticated with an
    /// Aspen token.
    pub fn aspen(endpoints: Vec<String>, timeout: Duration, token: String) -> EtcdBackend {
        EtcdBackend { endpoints, timeout, name: "aspen (etcd API)".into(), user: Some(("token".into(), token)) }
    }
}

pub struct EtcdClient {
    pub(crate) client: Client,
}

impl BenchBackend for EtcdBackend {
    type Client = EtcdClient;

    fn name(&self) -> String {
        self.name.clone()
    }

    async fn connect(&self, index: usize) -> Result<EtcdClient, OpError> {
        let endpoint = &self.endpoints[index % self.endpoints.len()];
        let mut options = ConnectOptions::new().with_timeout(self.timeout).with_connect_timeout(self.timeout);
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let client = Client::connect([endpoint], Some(options)).await?;
        Ok(EtcdClient { client })
    }
}

impl BenchClient for EtcdClient {
    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        // The generated KV client is a cheap handle on the shared connection; cloning it lets
        // the prefill share one connection between tasks.
        self.client.kv_client().put(key, value, None).await?;
        Ok(())
    }

    async fn get(&self, key: Vec<u8>, consistency: ReadConsistency) -> Result<bool, OpError> {
        let options = match consistency {
            ReadConsistency::Linearizable => None,
            ReadConsistency::Stale => Some(GetOptions::new().with_serializable()),
        };
        Ok(!self.client.kv_client().get(key, options).await?.kvs().is_empty())
    }

    /// One transaction per chunk (the prefill writes at most 100 keys at a time, below etcd's
    /// default limit of 128 operations per transaction).
    async fn put_many(&self, kvs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), OpError> {
        let ops: Vec<TxnOp> = kvs.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect();
        self.client.kv_client().txn(Txn::new().and_then(ops)).await?;
        Ok(())
    }

    async fn close(self) {}
}
