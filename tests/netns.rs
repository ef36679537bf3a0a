//! Real `aspen-node` processes in Linux network namespaces, with faults injected by nftables and
//! signals, checked for linearizability.
//!
//! Each test builds its own network: one `ip netns` per node (`aspen-nt<pid><tag>-n<i>`), a veth
//! pair per node into a bridge in the root namespace. The bridge has `10.201.X.254/24`, so this
//! test process is a client of the nodes at `10.201.X.1..3`; nothing else is addressed. Three
//! nodes start with `ip netns exec`, node 1 initializes and 2, 3 `--join` it. Concurrent clients
//! run get/put/cas/delete on a small key space and record every op in an
//! [`aspen_checker::History`], while a seeded schedule injects, one after the other and healed
//! in between: a node cut off from its peers (client path up), a node cut off from everyone, 20–35 %
//! random loss on every node, `kill -9` and a restart from the data dir, and `SIGSTOP`/`SIGCONT` of
//! a leader. After healing: every shard has one leader and replicas with equal applied indexes
//! and state digests, final linearizable reads of every key go into the history, the history is
//! linearizable, stale reads of every key on every node (each through a client that only
//! knows that node) agree with them, and a watch of every key that ran through the faults
//! delivered each acknowledged write exactly once, in order, and nothing else.
//!
//! Each test prints its seed; `ASPEN_NETNS_SEED=<seed>` replays the schedule. The tests print one
//! `skipping netns test: …` line and pass when not root, when `ip netns add` fails or when `nft` is
//! missing. A guard removes namespaces, links, processes and data dirs even when a test panics;
//! every test first removes what earlier runs that died (their pid is gone) left behind.

mod support;

use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aspen::{
    api::{ClusterStatus, NodeTicket, ReadConsistency},
    AspenClient,
};
use aspen_checker::{CheckConfig, Op, OpResult};
use aspen_testkit::{NodeProcess, NodeSpec, OnDrop, Output as ProcOutput, SIGCONT, SIGSTOP};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use support::{
    workload::{check_watch, key, watch_failure_report, WatchRecorder, Workload, KEYS},
    NODE_BIN,
};

/// Network namespace names start with this (then the pid of the test process).
const NS_PREFIX: &str = "aspen-nt";
/// Host-side link names (bridge, veths) start with this (then the pid); at most 15 bytes in all.
const LINK_PREFIX: &str = "asnt";
const NODES: usize = 3;
const CLIENTS: usize = 5;

// ---------------------------------------------------------------------------------------------
// Shell helpers

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).stdin(Stdio::null()).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`{cmd} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

/// Loads an nft script inside namespace `ns`.
fn nft(ns: &str, script: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft in {ns}: {e}"))?;
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft in {ns}: {}\n{script}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid embedded after `prefix` in `name` (`aspen-nt1234a-n1` → 1234).
fn pid_in(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn netns_names() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

fn link_names() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n).to_string()))
        .collect()
}

/// Kills every process inside `ns` and deletes it. A process that enters the namespace while
/// it is being deleted (`ip netns exec` between listing and removal) would keep it alive
/// unnamed, so after the removal every process still in a namespace with its inode is killed.
fn delete_netns(ns: &str) {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(format!("/run/netns/{ns}")).ok().map(|m| (m.dev(), m.ino()));
    for pid in ip(&["netns", "pids", ns]).unwrap_or_default().split_whitespace() {
        let _ = run("kill", &["-KILL", pid]);
    }
    let _ = ip(&["netns", "del", ns]);
    let Some(inode) = inode else { return };
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    for entry in procs.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let in_ns = std::fs::metadata(entry.path().join("ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == inode);
        if in_ns {
            let _ = run("kill", &["-KILL", &name]);
        }
    }
}

/// Waits (up to 10 s) until a process is inside `ns`, as a node's process would be.
fn wait_until_occupied(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && ip(&["netns", "pids", ns]).unwrap_or_default().trim().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes namespaces and links that earlier runs of this test left behind (their pid is gone).
fn cleanup_leftovers() {
    for ns in netns_names() {
        if pid_in(&ns, NS_PREFIX).is_some_and(|pid| !pid_alive(pid)) {
            println!("removing leftover namespace {ns}");
            delete_netns(&ns);
        }
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if pid_in(&name, NS_PREFIX).is_some_and(|pid| !pid_alive(pid)) {
                println!("removing leftover data dir {}", entry.path().display());
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    for link in link_names() {
        if pid_in(&link, LINK_PREFIX).is_some_and(|pid| !pid_alive(pid)) {
            println!("removing leftover link {link}");
            let _ = ip(&["link", "del", &link]);
        }
    }
}

/// Why this machine cannot run the test, if it cannot.
fn skip_reason() -> Option<String> {
    if effective_uid() != Some(0) {
        return Some("not running as root".into());
    }
    if run("nft", &["--version"]).is_err() {
        return Some("nft (nftables) is not installed".into());
    }
    if run("ip", &["-V"]).is_err() {
        return Some("ip (iproute2) is not installed".into());
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The network and its guard

/// One `aspen-node` process inside its namespace.
struct Node {
    id: u64,
    ns: String,
    addr: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    running: Option<NodeProcess>,
    /// The log's length when the node was last started (what the current run wrote follows).
    log_from: usize,
}

/// A frame of the one known way a node dies here that is not Aspen's: noq-proto 1.4.0 (iroh's
/// QUIC) builds the packet that closes a connection by writing the (PATH_)ACK frames of every
/// path first without checking that they fit (n0-computer/noq#367), can run out of room under
/// heavy loss and panics; its connection's destructor then finds the lock that panic poisoned
/// and the process aborts. Seen in 2 of about 40 runs of the sharded scenario (its 20–35 % loss).
/// A node that died of exactly that is restarted, as systemd would (`Restart=on-failure`), the
/// run goes on and says so; any other death still fails it.
const NOQ_CLOSE_PACKET_ABORT: &str = "noq_proto::connection::packet_builder::PacketBuilder::write_frame";

impl Node {
    fn spawn(&mut self) {
        assert!(self.running.is_none(), "node {} already running", self.id);
        let mut spec = NodeSpec::new(NODE_BIN, Path::new(""), self.id, self.addr);
        spec.data_dir = self.data_dir.clone();
        // Backtraces in the log (the post-mortem, and recognising the known noq abort).
        spec.wrapper = ["ip", "netns", "exec", &self.ns, "env", "RUST_BACKTRACE=1"].map(Into::into).to_vec();
        spec.args = ["--request-timeout-ms", "8000"].map(String::from).to_vec();
        spec.args.extend(self.args.iter().cloned());
        self.log_from = std::fs::metadata(&self.log).map(|m| m.len() as usize).unwrap_or(0);
        let output = ProcOutput::File { path: self.log.clone(), append: true };
        let node = NodeProcess::start(spec, &output, OnDrop::Kill).expect("spawn ip netns exec aspen-node");
        self.running = Some(node);
    }

    /// Waits until the node wrote a ticket naming its address.
    async fn wait_ready(&mut self) {
        let node = self.running.as_mut().expect("node started");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match node.poll_ready() {
                Ok(Some(_)) => return,
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("{e} (log {})", self.log.display()),
            }
        }
        panic!("aspen-node {} wrote no ticket within 60 s (log {})", self.id, self.log.display());
    }

    fn read_ticket(&self) -> Option<NodeTicket> {
        let text = std::fs::read_to_string(self.data_dir.join("node.ticket")).ok()?;
        NodeTicket::decode(text.trim()).ok()
    }

    fn ticket(&self) -> NodeTicket {
        self.read_ticket().expect("node has a ticket")
    }

    fn signal(&self, signal: i32) {
        self.running.as_ref().expect("node running").proc.signal(signal).expect("kill");
    }

    /// `None` while the node runs (or the test stopped it); else its exit status and whether it
    /// is the known noq abort: SIGABRT, and the first panic since it was last started is
    /// [`NOQ_CLOSE_PACKET_ABORT`] (in the panic's backtrace).
    fn death(&mut self) -> Option<(String, bool)> {
        let status = self.running.as_mut()?.proc.exited()?;
        let log = std::fs::read(&self.log).unwrap_or_default();
        let known = status.contains("SIGABRT")
            && first_panic_is_known_noq_abort(&String::from_utf8_lossy(&log[self.log_from.min(log.len())..]));
        Some((status, known))
    }

    /// `kill -9` (also works on a stopped process).
    fn kill(&mut self) {
        if let Some(mut n) = self.running.take() {
            n.proc.kill();
        }
    }
}

/// Whether the first panic in `log` has [`NOQ_CLOSE_PACKET_ABORT`] in its backtrace.
fn first_panic_is_known_noq_abort(log: &str) -> bool {
    let lines: Vec<&str> = log.lines().collect();
    let Some(first) = lines.iter().position(|l| l.contains("panicked at")) else { return false };
    let backtrace = lines[first + 1..].iter().take_while(|l| !l.contains("panicked at")).take(60);
    backtrace.into_iter().any(|l| l.contains(NOQ_CLOSE_PACKET_ABORT))
}

/// The namespaces, bridge, veths and node processes of one test; [`Drop`] removes them all.
struct Net {
    name: String,
    subnet: u8,
    namespaces: Vec<String>,
    bridge: Option<String>,
    veths: Vec<String>,
    nodes: Vec<Node>,
    /// Nodes restarted after the known noq abort ([`NOQ_CLOSE_PACKET_ABORT`]), as said in the output.
    restarts: Vec<String>,
    root: Option<tempfile::TempDir>,
}

impl Net {
    /// Creates namespaces `<name>-n1..n{count}` joined by a bridge. `Err` when `ip netns add`
    /// fails (the caller skips); panics on later failures (after the guard exists).
    fn create(tag: char, count: usize) -> Result<Net, String> {
        let pid = std::process::id();
        let name = format!("{NS_PREFIX}{pid}{tag}");
        let links = format!("{LINK_PREFIX}{pid}{tag}");
        let mut net = Net {
            name: name.clone(),
            subnet: pick_subnet(pid, tag),
            namespaces: Vec::new(),
            bridge: None,
            veths: Vec::new(),
            nodes: Vec::new(),
            restarts: Vec::new(),
            root: Some(tempfile::Builder::new().prefix(&format!("{name}-")).tempdir().expect("tempdir")),
        };
        let first = format!("{name}-n1");
        ip(&["netns", "add", &first])?;
        net.namespaces.push(first);
        let bridge = format!("{links}br");
        ip(&["link", "add", &bridge, "type", "bridge"]).expect("bridge");
        net.bridge = Some(bridge.clone());
        ip(&["addr", "add", &format!("{}/24", net.client_ip()), "dev", &bridge]).expect("bridge address");
        ip(&["link", "set", &bridge, "up"]).expect("bridge up");
        for i in 0..count {
            let ns = format!("{name}-n{}", i + 1);
            if i > 0 {
                ip(&["netns", "add", &ns]).expect("netns add");
                net.namespaces.push(ns.clone());
            }
            let (host, peer) = (format!("{links}v{}", i + 1), format!("{links}p{}", i + 1));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]).expect("veth");
            net.veths.push(host.clone());
            ip(&["link", "set", &peer, "netns", &ns]).expect("veth into netns");
            ip(&["link", "set", &host, "master", &bridge, "up"]).expect("veth on bridge");
            let addr = format!("{}/24", net.node_ip(i));
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]).expect("lo up");
            ip(&["netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &peer]).expect("node address");
            ip(&["netns", "exec", &ns, "ip", "link", "set", &peer, "up"]).expect("node link up");
        }
        Ok(net)
    }

    fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.subnet, i as u8 + 1)
    }

    fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.subnet, 254)
    }

    fn root(&self) -> PathBuf {
        self.root.as_ref().expect("root dir").path().to_path_buf()
    }

    /// Adds (not starts) node `i + 1` in namespace `i`, on a fixed port.
    fn add_node(&mut self, i: usize, args: Vec<String>) {
        let root = self.root();
        self.nodes.push(Node {
            id: i as u64 + 1,
            ns: self.namespaces[i].clone(),
            addr: SocketAddr::V4(SocketAddrV4::new(self.node_ip(i), 7400 + i as u16)),
            data_dir: root.join(format!("node-{}", i + 1)),
            log: root.join(format!("node-{}.log", i + 1)),
            args,
            running: None,
            log_from: 0,
        });
    }

    /// Replaces the firewall of node `i`'s namespace: drop traffic from and to `cut`, and drop
    /// `loss_pct` % of incoming packets at random.
    fn firewall(&self, i: usize, cut: &[Ipv4Addr], loss_pct: u32) {
        let mut input = String::new();
        let mut output = String::new();
        if loss_pct > 0 {
            input.push_str(&format!("    numgen random mod 100 < {loss_pct} drop\n"));
        }
        if !cut.is_empty() {
            let set = cut.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
            input.push_str(&format!("    ip saddr {{ {set} }} drop\n"));
            output.push_str(&format!("    ip daddr {{ {set} }} drop\n"));
        }
        let script = format!(
            "flush ruleset\ntable inet aspen {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n{input}  }}\n  chain output {{\n    type filter hook output priority 0; policy accept;\n{output}  }}\n}}\n"
        );
        nft(&self.namespaces[i], &script).expect("load nft rules");
    }

    /// What a CI log needs to tell why nodes `ids` did not answer: whether each process still
    /// runs, the firewall left in its namespace, its threads' stacks (with gdb, if installed:
    /// a node that runs but answers nothing is stuck somewhere) and the end of its log.
    fn post_mortem(&mut self, ids: &[u64]) -> String {
        let mut out = String::new();
        for node in self.nodes.iter_mut().filter(|n| ids.contains(&n.id)) {
            let Some(p) = node.running.as_mut() else {
                out += &format!("--- node {}: not running (killed by the test)\n", node.id);
                continue;
            };
            let pid = p.proc.pid();
            match p.proc.exited() {
                Some(status) => out += &format!("--- node {} (pid {pid:?}): EXITED: {status}\n", node.id),
                None => out += &format!("--- node {} (pid {pid:?}): still running\n", node.id),
            }
            let rules = Command::new("ip").args(["netns", "exec", &node.ns, "nft", "list", "ruleset"]).output();
            if let Ok(o) = rules {
                out += &format!("firewall: {:?}\n", String::from_utf8_lossy(&o.stdout).trim());
            }
            if let (Some(pid), true) = (pid, p.proc.is_running()) {
                out += &stacks(pid);
            }
            // A panic's message and where it happened (a backtrace pushes them out of the tail).
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            for (i, _) in lines.iter().enumerate().filter(|(_, l)| l.contains("panicked at")).take(3) {
                out += &format!("panic in the log:\n{}\n", lines[i..(i + 12).min(lines.len())].join("\n"));
            }
            out += &format!("log tail:\n{}\n", p.proc.log_tail(25));
        }
        out
    }

    /// Restarts every node that died of the known noq abort ([`NOQ_CLOSE_PACKET_ABORT`]) and
    /// records it; a node that died of anything else fails the test at once, with its
    /// post-mortem.
    async fn restart_known_aborts(&mut self) {
        for i in 0..self.nodes.len() {
            let Some((status, known)) = self.nodes[i].death() else { continue };
            let id = self.nodes[i].id;
            if !known {
                panic!("node {id} died ({status}):\n{}", self.post_mortem(&[id]));
            }
            let node = &mut self.nodes[i];
            let what = format!(
                "node {id} aborted in noq's close-packet builder (n0-computer/noq#367), restarted as systemd would"
            );
            eprintln!("netns: {what}; its log: {}", node.log.display());
            self.restarts.push(what);
            node.running = None;
            node.spawn();
            node.wait_ready().await;
        }
    }

    fn heal_firewalls(&self) {
        for ns in &self.namespaces {
            nft(ns, "flush ruleset\n").expect("flush nft rules");
        }
    }

    fn teardown(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = std::fs::read_to_string(&n.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- node {} log (last {} lines)", n.id, tail.len());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for ns in self.namespaces.drain(..) {
            delete_netns(&ns);
        }
        for v in self.veths.drain(..) {
            // Usually gone with its peer's namespace already.
            let _ = ip(&["link", "del", &v]);
        }
        if let Some(b) = self.bridge.take() {
            let _ = ip(&["link", "del", &b]);
        }
        if let Some(root) = self.root.take() {
            if std::thread::panicking() {
                // The whole logs and data dirs, for the post-mortem (a temp dir: the OS cleans it).
                // Renamed out of the `aspen-nt<pid>` pattern, so a later run's clean-up of dead
                // runs' leftovers does not remove it.
                let kept = root.keep();
                let name = kept.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let safe = kept.with_file_name(format!("kept-{name}"));
                let shown = if std::fs::rename(&kept, &safe).is_ok() { safe } else { kept };
                eprintln!("--- logs and data kept in {}", shown.display());
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A third octet for `10.201.X.0/24` that no interface or route here uses yet.
fn pick_subnet(pid: u32, tag: char) -> u8 {
    let used = format!("{}{}", ip(&["-4", "-o", "addr"]).unwrap_or_default(), ip(&["-4", "route"]).unwrap_or_default());
    let start = (pid.wrapping_mul(7).wrapping_add(tag as u32)) % 240;
    (0..240)
        .map(|k| 10 + ((start + k) % 240) as u8)
        .find(|x| !used.contains(&format!("10.201.{x}.")))
        .expect("a free 10.201.X.0/24")
}

// ---------------------------------------------------------------------------------------------
// Cluster status

async fn cluster_status(client: &AspenClient) -> Option<ClusterStatus> {
    tokio::time::timeout(Duration::from_secs(10), client.cluster_status()).await.ok()?.ok()
}

/// The node that reports itself leader of shard 0, if any.
fn shard0_leader(st: &ClusterStatus) -> Option<u64> {
    st.nodes
        .iter()
        .filter_map(|n| n.status.as_ref())
        .find_map(|s| s.shards.iter().any(|sh| sh.shard == 0 && sh.role == "Leader").then_some(s.node_id))
}

/// Every node reports `shards` shards; on each, all agree on one leader, have applied the same
/// index with equal state digests, and the leader has applied its whole log.
fn converged(st: &ClusterStatus, shards: u32) -> bool {
    let views: Vec<_> = st.nodes.iter().filter_map(|n| n.status.as_ref()).collect();
    if views.len() != NODES || views.iter().any(|v| v.shards.len() != shards as usize) {
        return false;
    }
    (0..shards as usize).all(|s| {
        let sh: Vec<_> = views.iter().map(|v| &v.shards[s]).collect();
        sh[0].leader.is_some()
            && sh.iter().all(|x| x.leader == sh[0].leader && x.last_applied == sh[0].last_applied)
            && sh.iter().any(|x| x.role == "Leader" && x.last_log_index == x.last_applied)
            && sh.iter().all(|x| x.digest.is_some() && x.digest == sh[0].digest)
    })
}

/// The stacks of process `pid`'s threads, as far as they are in Aspen's code or in a blocking
/// call (gdb's full output is long; the kept data dir gets all of it). Empty without gdb.
fn stacks(pid: u32) -> String {
    let Ok(o) = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .output()
    else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&o.stdout);
    // Thread headers, and the frames in this workspace's code (cut short).
    let interesting: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("Thread ") || l.contains(" at crates/") || l.contains(" at src/"))
        .map(|l| l.chars().take(160).collect())
        .take(80)
        .collect();
    format!("threads ({} lines of gdb output):\n{}\n", text.lines().count(), interesting.join("\n"))
}

/// The admin token of the current cluster's node 1 (read once it initialized the cluster).
static TOKEN: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

fn token() -> String {
    TOKEN.lock().unwrap().clone()
}

/// A client with node 1's admin token.
async fn connect(tickets: Vec<NodeTicket>, timeout: Duration) -> Result<AspenClient, aspen::ClientError> {
    Ok(AspenClient::connect(tickets, timeout).await?.with_token(token()))
}

/// Waits until every shard converged ([`converged`]); panics after `secs` with the last status
/// and a post-mortem of every node that did not answer ([`Net::post_mortem`]).
async fn wait_converged(net: &mut Net, tickets: &[NodeTicket], shards: u32, secs: u64) -> ClusterStatus {
    let admin = connect(tickets.to_vec(), Duration::from_secs(10)).await.expect("admin client");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    while Instant::now() < deadline {
        net.restart_known_aborts().await;
        if let Some(st) = cluster_status(&admin).await {
            if converged(&st, shards) {
                admin.close().await;
                return st;
            }
            last = Some(st);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let silent: Vec<u64> = match &last {
        Some(st) => st.nodes.iter().filter(|n| n.status.is_none()).map(|n| n.node_id).collect(),
        None => net.nodes.iter().map(|n| n.id).collect(),
    };
    panic!(
        "shards did not converge within {secs} s; last status:\n{}{}",
        last.as_ref().map_or("none\n".into(), views),
        net.post_mortem(&silent)
    );
}

/// One line per node and shard (what each node says of it), short enough for a CI log.
fn views(st: &ClusterStatus) -> String {
    let mut out = String::new();
    for n in &st.nodes {
        let Some(s) = &n.status else {
            out += &format!("node {}: unreachable: {}\n", n.node_id, n.error.as_deref().unwrap_or("?"));
            continue;
        };
        for sh in &s.shards {
            let digest = sh
                .digest
                .as_ref()
                .map(|d| format!("{}@{}", &d.hex()[..10], d.applied_index))
                .unwrap_or_else(|| "-".into());
            out += &format!(
                "node {} shard {}: {} leader {:?} term {} log {} applied {} voters {:?} learners {:?} digest {} {}\n",
                n.node_id,
                sh.shard,
                sh.role,
                sh.leader,
                sh.term,
                sh.last_log_index,
                sh.last_applied,
                sh.voters,
                sh.learners,
                digest,
                sh.health.reason
            );
        }
    }
    out
}

async fn leader_node(tickets: &[NodeTicket]) -> Option<u64> {
    let admin = connect(tickets.to_vec(), Duration::from_secs(10)).await.ok()?;
    let st = cluster_status(&admin).await;
    admin.close().await;
    shard0_leader(&st?)
}

// ---------------------------------------------------------------------------------------------
// Faults

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Node cut off from the other nodes; clients still reach it.
    PartitionFromPeers,
    /// Node cut off from the other nodes and from clients.
    Isolate,
    /// Random loss of incoming packets on every node.
    RandomLoss,
    /// `kill -9`, then a restart from the data dir on the same address.
    KillRestart,
    /// `SIGSTOP` of the shard-0 leader, then `SIGCONT`.
    StopLeader,
}

const FAULTS: [Fault; 5] =
    [Fault::PartitionFromPeers, Fault::Isolate, Fault::RandomLoss, Fault::KillRestart, Fault::StopLeader];

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Runs every fault once, in seeded order, healing after each. Returns what it did.
async fn inject(net: &mut Net, tickets: &[NodeTicket], rng: &mut StdRng) -> Vec<String> {
    let mut order = FAULTS.to_vec();
    order.shuffle(rng);
    let mut log = Vec::new();
    for fault in order {
        net.restart_known_aborts().await;
        // Half the time the victim is the leader of shard 0, else any node.
        let random_node = rng.random_range(0..NODES);
        let prefer_leader = rng.random_bool(0.5);
        let hold = rng.random_range(3000..6000);
        let victim = if prefer_leader || matches!(fault, Fault::StopLeader) {
            match leader_node(tickets).await {
                Some(l) => l as usize - 1,
                None => random_node,
            }
        } else {
            random_node
        };
        let peers: Vec<Ipv4Addr> = (0..NODES).filter(|&j| j != victim).map(|j| net.node_ip(j)).collect();
        match fault {
            Fault::PartitionFromPeers => {
                net.firewall(victim, &peers, 0);
                log.push(format!("node {} cut from its peers for {hold} ms", victim + 1));
                sleep_ms(hold).await;
            }
            Fault::Isolate => {
                let mut all = peers.clone();
                all.push(net.client_ip());
                net.firewall(victim, &all, 0);
                log.push(format!("node {} isolated (clients too) for {hold} ms", victim + 1));
                sleep_ms(hold).await;
            }
            Fault::RandomLoss => {
                let pct = rng.random_range(20..=35);
                for i in 0..NODES {
                    net.firewall(i, &[], pct);
                }
                log.push(format!("{pct}% loss on every node for {hold} ms"));
                sleep_ms(hold).await;
            }
            Fault::KillRestart => {
                net.nodes[victim].kill();
                log.push(format!("kill -9 node {}, restart after {hold} ms", victim + 1));
                sleep_ms(hold).await;
                net.nodes[victim].spawn();
                net.nodes[victim].wait_ready().await;
            }
            Fault::StopLeader => {
                net.nodes[victim].signal(SIGSTOP);
                log.push(format!("SIGSTOP leader node {} for {hold} ms", victim + 1));
                sleep_ms(hold).await;
                net.nodes[victim].signal(SIGCONT);
            }
        }
        net.heal_firewalls();
        sleep_ms(rng.random_range(1000..2500)).await;
    }
    net.restart_known_aborts().await;
    log
}

// ---------------------------------------------------------------------------------------------
// The scenario

fn seed() -> u64 {
    std::env::var("ASPEN_NETNS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        t.as_nanos() as u64 ^ ((std::process::id() as u64) << 20)
    })
}

/// Sets up the network (or says why not); `None`: skip.
fn setup(tag: char) -> Option<Net> {
    if let Some(why) = skip_reason() {
        println!("skipping netns test: {why}");
        return None;
    }
    cleanup_leftovers();
    let net = match Net::create(tag, NODES) {
        Ok(net) => net,
        Err(e) => {
            println!("skipping netns test: cannot create a network namespace: {e}");
            return None;
        }
    };
    // nft must work inside the namespaces too (the kernel may lack nf_tables).
    if let Err(e) = nft(&net.namespaces[0], "table inet aspen_probe { }\ndelete table inet aspen_probe\n") {
        println!("skipping netns test: nftables does not work in a namespace: {e}");
        return None;
    }
    Some(net)
}

async fn run_netns_scenario(tag: char, shards: u32) {
    let Some(mut net) = setup(tag) else { return };
    let seed = seed();
    println!(
        "netns shards {shards} seed {seed} (replay: ASPEN_NETNS_SEED={seed}); nodes at {}..{} in {}-n*",
        net.node_ip(0),
        net.node_ip(NODES - 1),
        net.name
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let shard_args: Vec<String> = if shards > 1 {
        vec!["--sharding-enabled".into(), "--sharding-num-shards".into(), shards.to_string()]
    } else {
        Vec::new()
    };
    net.add_node(0, shard_args.clone());
    net.nodes[0].spawn();
    net.nodes[0].wait_ready().await;
    let t1 = net.nodes[0].ticket().encode();
    let admin = std::fs::read_to_string(net.nodes[0].data_dir.join("admin.token")).expect("admin.token");
    *TOKEN.lock().unwrap() = admin.trim().to_string();
    let join_token = {
        let c = connect(vec![net.nodes[0].ticket()], Duration::from_secs(20)).await.unwrap();
        let (_, t) = c.create_join_token(3600, false).await.expect("join token");
        c.close().await;
        t
    };
    for i in 1..NODES {
        let mut args = shard_args.clone();
        args.extend(["--join".to_string(), t1.clone(), "--join-token".into(), join_token.clone()]);
        net.add_node(i, args);
        net.nodes[i].spawn();
    }
    for i in 1..NODES {
        net.nodes[i].wait_ready().await;
    }
    let tickets: Vec<NodeTicket> = net.nodes.iter().map(|n| n.ticket()).collect();
    wait_converged(&mut net, &tickets, shards, 120).await;
    if shards > 1 {
        let admin = connect(tickets.clone(), Duration::from_secs(20)).await.unwrap();
        admin.balance_leaders().await.expect("balance leaders");
        admin.close().await;
    }
    println!("cluster up after {:?}", started.elapsed());

    // A watch of every workload key, in place before the first write, through the faults.
    let watch = WatchRecorder::start(tickets.clone(), token()).await;
    let workload = Workload::start(tickets.clone(), token(), CLIENTS, rng.random()).await;
    sleep_ms(1500).await;
    let what = inject(&mut net, &tickets, &mut rng).await;
    println!("faults: {}", what.join("; "));
    let acked = workload.acked();
    let history = workload.finish().await;
    wait_converged(&mut net, &tickets, shards, 120).await;

    // Final linearizable reads of every key, recorded: a lost acknowledged write shows up as a
    // read the history cannot explain.
    let reader = connect(tickets.clone(), Duration::from_secs(20)).await.unwrap();
    let mut finals = BTreeMap::new();
    for k in 0..KEYS {
        let h = history.invoke(1000, Op::Get { key: key(k) });
        let v = reader.get(key(k)).await.expect("final read after heal").map(|kv| kv.value);
        h.ok(OpResult::Get(v.clone()));
        finals.insert(k, v);
    }
    let events = watch.finish(&reader, shards, 120).await.unwrap_or_else(|e| panic!("watch (seed {seed}): {e}"));
    if let Err(e) = check_watch(&events, &history, &finals) {
        let report = watch_failure_report(&format!("netns-{shards}-{seed}"), &events, &history);
        panic!("netns shards {shards} seed {seed}: watch: {e}\n{report}");
    }
    println!("{} watch events, complete", events.len());
    reader.close().await;

    // The replicas agree: same applied index per shard (and one leader) before and after, and
    // every node's own state machine holds the final values.
    let before = wait_converged(&mut net, &tickets, shards, 60).await;
    for (i, t) in tickets.iter().enumerate() {
        let one = connect(vec![t.clone()], Duration::from_secs(10)).await.unwrap();
        for (k, v) in &finals {
            let got = one.get_with(key(*k), ReadConsistency::Stale).await.expect("stale read").map(|kv| kv.value);
            assert_eq!(&got, v, "node {} key k{k} (seed {seed})", i + 1);
        }
        one.close().await;
    }
    let after = wait_converged(&mut net, &tickets, shards, 60).await;
    let applied = |st: &ClusterStatus| -> Vec<Vec<u64>> {
        st.nodes
            .iter()
            .filter_map(|n| n.status.as_ref())
            .map(|s| s.shards.iter().map(|sh| sh.last_applied).collect())
            .collect()
    };
    assert_eq!(applied(&before), applied(&after), "nothing applied during the replica comparison (seed {seed})");

    let report = history.check(&CheckConfig::default()).expect("well-formed history");
    if !report.is_ok() {
        let path = std::env::temp_dir().join(format!("aspen-netns-history-{shards}-{seed}.json"));
        let _ = std::fs::write(&path, history.to_json().unwrap_or_default());
        panic!("netns shards {shards} seed {seed}: {}\nhistory written to {}", report.result, path.display());
    }
    println!(
        "{} ops, {acked} acknowledged writes, linearizable ({} states); {:?} in all",
        history.len(),
        report.states_explored,
        started.elapsed()
    );
    if !net.restarts.is_empty() {
        println!("known upstream aborts (seed {seed}): {}", net.restarts.join("; "));
    }
    assert!(acked > 0, "the workload made progress (seed {seed})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_faults_non_sharded() {
    run_netns_scenario('a', 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_faults_sharded() {
    run_netns_scenario('b', 4).await;
}

/// The guard removes namespaces, links and processes when a test panics, and start-up removes
/// what a run that died without unwinding left behind.
#[test]
fn netns_guard_cleans_up_after_panics_and_dead_runs() {
    let Some(net) = setup('c') else { return };
    let names = net.namespaces.clone();
    let bridge = net.bridge.clone().unwrap();
    // A process inside a namespace, as a node would be.
    let mut sleeper = Command::new("ip").args(["netns", "exec", &names[1], "sleep", "600"]).spawn().unwrap();
    wait_until_occupied(&names[1]);
    println!("injecting a panic (its message and backtrace below are expected)");
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _net = net;
        panic!("injected panic");
    }));
    assert!(panicked.is_err());
    let left = netns_names();
    assert!(names.iter().all(|n| !left.contains(n)), "namespaces left after a panic: {left:?}");
    assert!(!link_names().contains(&bridge), "bridge left after a panic");
    assert!(exits_soon(&mut sleeper), "process in the namespace killed");

    // Leftovers of a run whose pid is gone: a namespace with a process in it, and a link.
    let pid_max: u32 =
        std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(32768);
    let dead = (2..pid_max).rev().find(|p| !pid_alive(*p)).unwrap();
    let ns = format!("{NS_PREFIX}{dead}x-n1");
    let link = format!("{LINK_PREFIX}{dead}xbr");
    ip(&["netns", "add", &ns]).unwrap();
    ip(&["link", "add", &link, "type", "bridge"]).unwrap();
    let dir = std::env::temp_dir().join(format!("{NS_PREFIX}{dead}x-data"));
    std::fs::create_dir_all(dir.join("node-1")).unwrap();
    let mut orphan = Command::new("ip").args(["netns", "exec", &ns, "sleep", "600"]).spawn().unwrap();
    wait_until_occupied(&ns);
    cleanup_leftovers();
    assert!(!netns_names().contains(&ns), "leftover namespace removed");
    assert!(!link_names().contains(&link), "leftover link removed");
    assert!(!dir.exists(), "leftover data dir removed");
    assert!(exits_soon(&mut orphan), "process in the leftover namespace killed");
}

/// Whether `child` exits within 10 s.
fn exits_soon(child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Only the known noq abort is forgiven: its first panic must be in noq's packet builder.
#[test]
fn only_the_known_noq_abort_is_restarted() {
    let noq = "2026-12-05T15:06:16Z  WARN openraft: heartbeat error\n\
thread 'tokio-rt-worker' (24900) panicked at bytes-1.12.2/src/lib.rs:207:5:\n\
advance out of bounds: the len is 0 but advancing by 4\n\
stack backtrace:\n\
   3: <noq_proto::varint::VarInt as noq_proto::coding::Encodable>::encode\n\
   5: noq_proto::connection::packet_builder::PacketBuilder::write_frame\n\
   6: noq_proto::connection::Connection::poll_transmit_path_space\n\
thread 'tokio-rt-worker' (24900) panicked at noq-1.4.0/src/mutex.rs:138:42:\n\
called `Result::unwrap()` on an `Err` value: PoisonError { .. }\n\
thread 'tokio-rt-worker' (24900) panicked at core/src/panicking.rs:233:5:\n\
panic in a destructor during cleanup\n";
    assert!(first_panic_is_known_noq_abort(noq));
    // Aspen's own panic first (noq's frames only in a later one): not forgiven.
    let ours = "thread 'tokio-rt-worker' panicked at crates/aspen/src/raft/node.rs:10:5:\n\
index out of bounds\n\
   1: aspen::raft::node::RaftNode::write\n\
thread 'tokio-rt-worker' panicked at noq-1.4.0/src/mutex.rs:138:42:\n\
   5: noq_proto::connection::packet_builder::PacketBuilder::write_frame\n";
    assert!(!first_panic_is_known_noq_abort(ours));
    assert!(!first_panic_is_known_noq_abort("killed by signal 9, no panic\n"));
}
