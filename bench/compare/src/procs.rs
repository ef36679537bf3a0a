//! Child processes that cannot outlive the harness, and free loopback ports.
//!
//! Every server process is a [`Proc`]: dropping it (normal end, an error, a panic unwinding, or
//! the Ctrl-C branch of `main` dropping the run) sends SIGTERM, waits a few seconds, then sends
//! SIGKILL and reaps it. As a last resort for a harness killed with SIGKILL, children are started
//! with `PR_SET_PDEATHSIG` so the kernel kills them when the harness's main thread dies.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running child process with its log file; stopped and reaped on drop.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `cmd` with stdin from /dev/null, stdout and stderr appended to `log`, and no
    /// `ASPEN_*` / `ETCD_*` variables of ours leaking into its configuration.
    pub fn spawn(name: impl Into<String>, mut cmd: Command, log: &Path) -> Result<Proc, String> {
        let name = name.into();
        let out = File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("ASPEN_") || k.starts_with("ETCD_") {
                cmd.env_remove(&key);
            }
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err));
        // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
        // async-signal-safe; it allocates nothing and touches no locks.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc { name, log: log.to_path_buf(), child: Some(child) })
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(format!("cannot wait: {e}")),
            None => Some("already stopped".into()),
            Some(Ok(None)) => None,
        }
    }

    /// The last `lines` lines of the process's log (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(None) = child.try_wait() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// `n` distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
pub fn free_tcp_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free TCP port: {e}"))?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())).collect()
}

/// `n` distinct free UDP addresses on 127.0.0.1 (all bound at once, then released).
pub fn free_udp_addrs(n: usize) -> Result<Vec<SocketAddr>, String> {
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot find a free UDP port: {e}"))?;
    sockets.iter().map(|s| s.local_addr().map_err(|e| e.to_string())).collect()
}

/// The first line that `program --version` prints, if it runs.
pub fn version_line(program: &Path, arg: &str) -> Option<String> {
    let out = Command::new(program).arg(arg).stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines().map(str::trim).find(|l| !l.is_empty()).map(String::from)
}
