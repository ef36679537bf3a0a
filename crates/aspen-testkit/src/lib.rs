//! The one way Aspen's tooling runs real processes: the integration tests (`tests/support`), the
//! network-namespace tests (`tests/netns.rs`) and the etcd comparison tool (`bench/compare`) all
//! start `aspen-node` (and etcd) through this crate.
//!
//! Owns: [`Proc`], a child process that cannot outlive its harness (stopped and reaped on drop,
//! and killed by the kernel when the thread that started it ends, which for every caller here
//! is the test's or the tool's main thread: `PR_SET_PDEATHSIG`; so never start one from a
//! short-lived thread such as tokio's `spawn_blocking`), with its output in a log file or on
//! the harness's stderr and no `ASPEN_*`/`ETCD_*` variables of the harness leaking into it; [`NodeSpec`], how one `aspen-node` is started (id, data dir, address, Raft timing,
//! extra flags, an optional wrapper such as `ip netns exec NS`); [`NodeProcess`], a running
//! node and its ticket file; and free loopback ports.
//!
//! Never: assert (callers decide what a failure means; errors come back as text that names the
//! process and the end of its log), or talk to a node (callers use `aspen::AspenClient`).

use std::{
    ffi::OsString,
    fs::OpenOptions,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use aspen::api::NodeTicket;
/// Signals for [`Proc::signal`].
pub use libc::{SIGCONT, SIGINT, SIGKILL, SIGSTOP, SIGTERM};

/// Where a process's output goes.
#[derive(Clone, Debug)]
pub enum Output {
    /// stdout discarded, stderr to the harness's stderr.
    Inherit,
    /// stdout and stderr into this file (created, or appended to with `append`).
    File { path: PathBuf, append: bool },
}

/// What dropping a [`Proc`] does to a process that still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDrop {
    /// `kill -9` (a test's node: nothing to save).
    Kill,
    /// SIGTERM, this long to exit, then SIGKILL.
    Terminate(Duration),
}

/// A running child process; stopped and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    log: Option<PathBuf>,
    on_drop: OnDrop,
    child: Option<Child>,
}

impl Proc {
    /// Starts `cmd` with stdin from /dev/null and its output as `output` says, without the
    /// harness's `ASPEN_*` / `ETCD_*` variables ([`clean_env`]; set such a variable for the
    /// child with `cmd.env` only if the harness does not have it too).
    pub fn spawn(name: impl Into<String>, mut cmd: Command, output: &Output, on_drop: OnDrop) -> Result<Proc, String> {
        let name = name.into();
        clean_env(&mut cmd);
        cmd.stdin(Stdio::null());
        let log = match output {
            Output::Inherit => {
                cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
                None
            }
            Output::File { path, append } => {
                let out = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(*append)
                    .truncate(!*append)
                    .open(path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let err = out.try_clone().map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
                Some(path.clone())
            }
        };
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, getppid
        // and _exit, which are async-signal-safe; it allocates nothing and touches no locks.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The harness died between fork and prctl: nothing would kill this child later.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc { name, log, on_drop, child: Some(child) })
    }

    /// The process id, while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` if the process has exited (or was stopped by this handle).
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(format!("cannot wait: {e}")),
            None => Some("already stopped".into()),
            Some(Ok(None)) => None,
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// The last `lines` lines of the process's log (empty when its output is not in a file).
    pub fn log_tail(&self, lines: usize) -> String {
        let Some(log) = &self.log else { return String::new() };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to a process that has not been reaped.
    pub fn signal(&self, signal: i32) -> Result<(), String> {
        let pid = self.pid().ok_or_else(|| format!("{} is not running", self.name))?;
        let pid = i32::try_from(pid).map_err(|e| e.to_string())?;
        // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(format!("kill({pid}, {signal}): {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// `kill -9`, then reaps (also works on a stopped process).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `grace`: `Ok(status)` if the process exited by itself in time,
    /// `Err` (after SIGKILL and reaping) if it did not.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else { return Err(format!("{} is not running", self.name)) };
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("{} did not exit within {grace:?} of SIGTERM", self.name))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        match self.on_drop {
            OnDrop::Kill => self.kill(),
            OnDrop::Terminate(grace) => {
                let _ = self.terminate(grace);
            }
        }
    }
}

/// Raft timing for nodes on two busy cores: heartbeats every 400 ms, elections after 1.5–3 s.
pub const TEST_RAFT_TIMING: [&str; 6] =
    ["--heartbeat-interval-ms", "400", "--election-timeout-min-ms", "1500", "--election-timeout-max-ms", "3000"];

/// How to start one `aspen-node`.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The `aspen-node` binary.
    pub bin: PathBuf,
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub bind: SocketAddr,
    /// Flags after the standard ones (`--join`, sharding, ...).
    pub args: Vec<String>,
    /// [`TEST_RAFT_TIMING`] instead of the product's defaults.
    pub test_timing: bool,
    /// A command the node runs under, e.g. `ip netns exec NS`.
    pub wrapper: Vec<OsString>,
    /// `RUST_LOG` of the node.
    pub rust_log: String,
}

impl NodeSpec {
    /// Node `node_id` with its data dir `node-<id>` under `root`, listening on `bind`, with test
    /// Raft timing and `RUST_LOG=warn`.
    pub fn new(bin: impl Into<PathBuf>, root: &Path, node_id: u64, bind: SocketAddr) -> NodeSpec {
        NodeSpec {
            bin: bin.into(),
            node_id,
            data_dir: root.join(format!("node-{node_id}")),
            bind,
            args: Vec::new(),
            test_timing: true,
            wrapper: Vec::new(),
            rust_log: "warn".into(),
        }
    }

    /// The command that starts the node (not yet spawned).
    pub fn command(&self) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("--node-id")
            .arg(self.node_id.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--bind-addr")
            .arg(self.bind.to_string());
        if self.test_timing {
            cmd.args(TEST_RAFT_TIMING);
        }
        cmd.args(&self.args).env("RUST_LOG", &self.rust_log);
        cmd
    }

    /// The ticket the node wrote into its data dir, if any.
    pub fn read_ticket(&self) -> Option<NodeTicket> {
        let text = std::fs::read_to_string(self.data_dir.join("node.ticket")).ok()?;
        NodeTicket::decode(text.trim()).ok()
    }
}

/// A running `aspen-node`.
#[derive(Debug)]
pub struct NodeProcess {
    pub spec: NodeSpec,
    pub proc: Proc,
}

impl NodeProcess {
    /// Starts the node described by `spec` (a ticket file left from an earlier run is removed
    /// first, so that [`Self::poll_ready`] sees this run's).
    pub fn start(spec: NodeSpec, output: &Output, on_drop: OnDrop) -> Result<NodeProcess, String> {
        let _ = std::fs::remove_file(spec.data_dir.join("node.ticket"));
        let proc = Proc::spawn(format!("aspen-node {}", spec.node_id), spec.command(), output, on_drop)?;
        Ok(NodeProcess { spec, proc })
    }

    /// `Ok(Some(ticket))` once the node serves (its ticket file names its bind address),
    /// `Ok(None)` while it starts, `Err` if it exited.
    pub fn poll_ready(&mut self) -> Result<Option<NodeTicket>, String> {
        if let Some(t) = self.spec.read_ticket().filter(|t| t.addrs.contains(&self.spec.bind)) {
            return Ok(Some(t));
        }
        match self.proc.exited() {
            Some(status) => {
                Err(format!("{} exited during start-up ({status})\n{}", self.proc.name, self.proc.log_tail(20)))
            }
            None => Ok(None),
        }
    }

    /// Waits (blocking this thread) until the node serves, at most `limit`.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<NodeTicket, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(t) = self.poll_ready()? {
                return Ok(t);
            }
            if Instant::now() > deadline {
                return Err(format!("{} wrote no ticket within {limit:?}\n{}", self.proc.name, self.proc.log_tail(20)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Removes the harness's `ASPEN_*` and `ETCD_*` variables from `cmd`'s environment, so that a
/// developer's settings (an `ASPEN_CONFIG`, say) never reach a process a test starts.
pub fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("ASPEN_") || k.starts_with("ETCD_") {
            cmd.env_remove(&key);
        }
    }
}

/// A free UDP port on 127.0.0.1 whose TCP port is free too (bound and released; good enough
/// for serial tests). Panics if the machine has none (a test cannot go on without one).
pub fn free_port() -> u16 {
    match free_udp_addrs(1) {
        Ok(addrs) => addrs[0].port(),
        Err(e) => panic!("{e}"),
    }
}

/// `n` distinct free UDP addresses on 127.0.0.1 (all bound at once, then released), each with
/// its TCP port free as well: a node serves its HTTP endpoint on the TCP port of its bind
/// address unless told otherwise, and a UDP port says nothing about the TCP port of the same
/// number (another test's outgoing connection may hold it: a node then started without
/// `/metrics`).
pub fn free_udp_addrs(n: usize) -> Result<Vec<SocketAddr>, String> {
    let mut held: Vec<(UdpSocket, TcpListener)> = Vec::with_capacity(n);
    let mut tries = 0;
    while held.len() < n {
        tries += 1;
        if tries > 100 * n + 100 {
            return Err(format!("cannot find {n} free ports (UDP and TCP) on 127.0.0.1"));
        }
        let udp = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("cannot find a free UDP port: {e}"))?;
        let port = udp.local_addr().map_err(|e| e.to_string())?.port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            held.push((udp, tcp));
        }
    }
    held.iter().map(|(s, _)| s.local_addr().map_err(|e| e.to_string())).collect()
}

/// `n` distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
pub fn free_tcp_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free TCP port: {e}"))?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())).collect()
}

/// The first line that `program ARG` prints (`--version`, say), if it runs.
pub fn version_line(program: &Path, arg: &str) -> Option<String> {
    let out = Command::new(program).arg(arg).stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines().map(str::trim).find(|l| !l.is_empty()).map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_process_logs_to_its_file_and_is_stopped_on_drop() {
        let dir = std::env::temp_dir().join(format!("aspen-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("p.log");
        let output = Output::File { path: log.clone(), append: false };
        let mut p = Proc::spawn("sleeper", sh("echo started; exec sleep 600"), &output, OnDrop::Kill).unwrap();
        let pid = p.pid().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.log_tail(1) != "started" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(p.log_tail(1), "started");
        assert!(p.is_running());
        drop(p);
        // Killed and reaped: no process has that pid any more.
        // SAFETY: kill(2) with signal 0 only checks whether the pid exists.
        assert_ne!(unsafe { libc::kill(pid as i32, 0) }, 0, "the process is gone after drop");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn terminate_reports_how_the_process_ended() {
        let mut quick = Proc::spawn("quick", sh("exec sleep 600"), &Output::Inherit, OnDrop::Kill).unwrap();
        let status = quick.terminate(Duration::from_secs(10)).expect("exits on SIGTERM");
        assert!(!status.success());
        let mut stubborn =
            Proc::spawn("stubborn", sh("trap '' TERM; while true; do sleep 0.1; done"), &Output::Inherit, OnDrop::Kill)
                .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let err = stubborn.terminate(Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("did not exit"), "{err}");
        assert!(stubborn.exited().is_some(), "killed and reaped after the grace period");
    }

    #[test]
    fn a_node_command_carries_the_wrapper_timing_and_flags() {
        let mut spec = NodeSpec::new("/bin/aspen-node", Path::new("/tmp/x"), 3, "127.0.0.1:7000".parse().unwrap());
        spec.wrapper = vec!["ip".into(), "netns".into(), "exec".into(), "ns1".into()];
        spec.args = vec!["--join".into(), "T".into()];
        let cmd = spec.command();
        assert_eq!(cmd.get_program(), "ip");
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(&args[..4], ["netns", "exec", "ns1", "/bin/aspen-node"]);
        let joined = args.join(" ");
        assert!(joined.contains("--node-id 3 --data-dir /tmp/x/node-3 --bind-addr 127.0.0.1:7000"), "{joined}");
        assert!(joined.contains("--election-timeout-max-ms 3000"), "{joined}");
        assert!(joined.ends_with("--join T"), "{joined}");
        spec.test_timing = false;
        let plain: Vec<String> = spec.command().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(!plain.iter().any(|a| a.contains("election")), "{plain:?}");
    }
}
