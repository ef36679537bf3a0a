//! Child processes of the comparison and free loopback ports: [`aspen_testkit`], the harness
//! the integration tests use too. Every server process is a [`Proc`] that cannot outlive the
//! harness: dropping it (normal end, an error, a panic unwinding, or the Ctrl-C branch of
//! `main` dropping the run) sends SIGTERM, waits [`STOP_GRACE`], then SIGKILL; and the kernel
//! kills it if the harness itself is killed (`PR_SET_PDEATHSIG`).

use std::{path::Path, process::Command, time::Duration};

pub use aspen_testkit::{free_tcp_ports, free_udp_addrs, version_line, NodeProcess, NodeSpec, Proc};
use aspen_testkit::{OnDrop, Output};

/// How long a server process gets to exit after SIGTERM when the harness drops it.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Starts `cmd` with its output in `log`; stopped on drop.
pub fn spawn(name: impl Into<String>, cmd: Command, log: &Path) -> Result<Proc, String> {
    Proc::spawn(name, cmd, &log_file(log), OnDrop::Terminate(STOP_GRACE))
}

/// Starts one `aspen-node` with its output in `log`; stopped on drop.
pub fn spawn_node(spec: NodeSpec, log: &Path) -> Result<NodeProcess, String> {
    NodeProcess::start(spec, &log_file(log), OnDrop::Terminate(STOP_GRACE))
}

fn log_file(log: &Path) -> Output {
    Output::File { path: log.to_path_buf(), append: false }
}
