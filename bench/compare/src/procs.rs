//! Child processes of the comparison and free loopback ports: [`aspen_testkit`], the harness
//! the integration tests use too. Every server process is a [`Proc`] that cannot outlive the
//! harness: dropping it (normal end, an error, a panic unwinding, or the Ctrl-C branch of
//! `main` dropping the run) sends SIGTERM, waits [`STOP_GRACE`], then SIGKILL; and the kernel
//! kills it if the harness itself is killed (`PR_SET_PDEATHSIG`). With `--cpu-per-node` each
//! one starts inside its own capped [`Cgroup`] (it joins between fork and exec).

use std::{path::Path, process::Command, time::Duration};

pub use aspen_testkit::{free_tcp_ports, free_udp_addrs, version_line, NodeProcess, NodeSpec, Proc, SIGTERM};
use aspen_testkit::{OnDrop, Output};

use crate::{cgroup::Cgroup, cpu::CpuSource};

/// How long a server process gets to exit after SIGTERM when the harness drops it.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Starts `cmd` with its output in `log`, inside `cgroup` if given (checked in its
/// `cgroup.procs` once started); stopped on drop.
pub fn spawn(name: impl Into<String>, cmd: Command, log: &Path, cgroup: Option<&Cgroup>) -> Result<Proc, String> {
    let (name, output) = (name.into(), log_file(log));
    let start = |cmd| Proc::spawn(name.clone(), cmd, &output, OnDrop::Terminate(STOP_GRACE));
    let Some(cgroup) = cgroup else { return start(cmd) };
    let proc = cgroup.spawn_in(cmd, start)?;
    let pid = proc.pid().ok_or_else(|| format!("{name} has no pid"))?;
    cgroup.check_holds(pid).map_err(|e| format!("{name}: {e}"))?;
    Ok(proc)
}

/// Starts one `aspen-node` with its output in `log`, inside `cgroup` if given; stopped on drop.
/// (As [`NodeProcess::start`], which cannot take a cgroup: a ticket file left from an earlier
/// run is removed first.)
pub fn spawn_node(spec: NodeSpec, log: &Path, cgroup: Option<&Cgroup>) -> Result<NodeProcess, String> {
    let _ = std::fs::remove_file(spec.data_dir.join("node.ticket"));
    let proc = spawn(format!("aspen-node {}", spec.node_id), spec.command(), log, cgroup)?;
    Ok(NodeProcess { spec, proc })
}

/// Where the CPU time of `proc` is read: its cgroup's usage when it has one, else /proc.
pub fn cpu_source(proc: &Proc, cgroup: Option<&Cgroup>) -> Result<CpuSource, String> {
    if let Some(usage) = cgroup.and_then(Cgroup::usage) {
        return Ok(usage.clone());
    }
    proc.pid().map(CpuSource::Proc).ok_or_else(|| format!("{} is not running", proc.name))
}

fn log_file(log: &Path) -> Output {
    Output::File { path: log.to_path_buf(), append: false }
}
