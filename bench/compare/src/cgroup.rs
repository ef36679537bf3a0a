//! CPU caps per server process (`--cpu-per-node CORES`) with Linux cgroups.
//!
//! Every server process the comparison starts (each `aspen-node`, each etcd member) gets a
//! cgroup of its own, named `aspen-compare-<harness pid>-<n>-<label>`, with a CPU quota of
//! CORES × the period (100 ms). The child puts itself into its cgroup between fork and exec
//! ([`Cgroup::spawn_in`]: a `pre_exec` hook writes its pid into `cgroup.procs` through a file
//! the harness opened), so none of its work runs uncapped. The cgroup is removed (rmdir) when
//! its [`Cgroup`] is dropped, after the process it held was stopped.
//!
//! Two layouts are supported, detected under a root that tests replace with a temp dir:
//!
//! - cgroup v2 (unified: `<root>/cgroup.controllers` exists): `cpu.max` = `QUOTA PERIOD`, under
//!   the root, or else under the parent of this process's own cgroup (a delegated subtree); the
//!   parent must offer the `cpu` controller and have it in `cgroup.subtree_control` (written
//!   with `+cpu` when missing). CPU usage is read from the cgroup's `cpu.stat` (`usage_usec`).
//! - cgroup v1: the `cpu` controller's hierarchy at `<root>/cpu` (`cpu.cfs_period_us`,
//!   `cpu.cfs_quota_us`). CPU usage comes from `cpuacct.usage` (nanoseconds) when `cpuacct` is
//!   mounted with `cpu`, or from a second cgroup of the same name in a separate `<root>/cpuacct`
//!   hierarchy; without either the caller falls back to `/proc/<pid>/stat`.
//!
//! Never: touch a cgroup it did not create, except empty leftovers of an earlier run of this
//! tool whose process is gone ([`CpuLimiter::remove_stale`]).

use std::{
    fmt,
    fs::{self, File, OpenOptions},
    io,
    os::unix::{io::AsRawFd, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::cpu::CpuSource;

/// Where the cgroup filesystem is mounted on a normal Linux system.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";
/// The CFS period every cap uses (the kernel's default), in microseconds.
pub const PERIOD_US: u64 = 100_000;
/// The smallest cap: the kernel refuses quotas under 1 ms.
pub const MIN_CORES: f64 = 0.01;
/// The largest cap accepted.
pub const MAX_CORES: f64 = 1024.0;
/// The start of every cgroup name this tool creates.
pub const NAME_PREFIX: &str = "aspen-compare-";

/// Why a CPU cap could not be set up or applied.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("--cpu-per-node takes a number of cores from {MIN_CORES} to {MAX_CORES}, or `none` (got `{0}`)")]
    BadCores(String),
    #[error(
        "cannot cap the CPU of the server processes: no cgroup with a writable cpu controller under {}{}. Tried:\n{}",
        root.display(),
        if *not_root { " (this process is not root: run it as root, e.g. with sudo, or in a delegated cgroup v2 subtree)" } else { "" },
        tried.iter().map(|t| format!("  - {t}")).collect::<Vec<_>>().join("\n")
    )]
    Unavailable { root: PathBuf, not_root: bool, tried: Vec<String> },
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("process {pid} is not in cgroup {} after it started (cgroup.procs holds: {found})", path.display())]
    NotAttached { pid: u32, path: PathBuf, found: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { op, path: path.to_path_buf(), source }
}

/// Parses one `--cpu-per-node` value: a number of cores, or `none` / `off` / `unlimited` for
/// no cap (`Ok(None)`).
pub fn parse_cores(text: &str) -> Result<Option<f64>, CgroupError> {
    let t = text.trim();
    if ["none", "off", "unlimited", "uncapped"].iter().any(|w| t.eq_ignore_ascii_case(w)) {
        return Ok(None);
    }
    let cores: f64 = t.parse().map_err(|_| CgroupError::BadCores(text.to_string()))?;
    Quota::from_cores(cores).map(|_| Some(cores)).map_err(|_| CgroupError::BadCores(text.to_string()))
}

/// A CPU quota per [`PERIOD_US`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub quota_us: u64,
    pub period_us: u64,
}

impl Quota {
    pub fn from_cores(cores: f64) -> Result<Quota, CgroupError> {
        if !(cores.is_finite() && (MIN_CORES..=MAX_CORES).contains(&cores)) {
            return Err(CgroupError::BadCores(cores.to_string()));
        }
        Ok(Quota { quota_us: (cores * PERIOD_US as f64).round() as u64, period_us: PERIOD_US })
    }
}

/// Where usage (CPU time) of a v1 cgroup can be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cpuacct {
    /// `cpuacct` is mounted together with `cpu`: `cpuacct.usage` in the same directory.
    Comounted,
    /// A separate `cpuacct` hierarchy at this path: the process joins a cgroup there too.
    Separate(PathBuf),
    /// Not available: usage comes from `/proc/<pid>/stat`.
    Unavailable,
}

/// A place where this tool can create capped cgroups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v1: children of the `cpu` hierarchy's directory `cpu`.
    V1 { cpu: PathBuf, cpuacct: Cpuacct },
    /// cgroup v2: children of `parent`.
    V2 { parent: PathBuf },
}

impl fmt::Display for Hierarchy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hierarchy::V1 { cpu, cpuacct } => {
                write!(f, "cgroup v1 cpu controller at {}", cpu.display())?;
                match cpuacct {
                    Cpuacct::Comounted => write!(f, " (with cpuacct)"),
                    Cpuacct::Separate(p) => write!(f, " with cpuacct at {}", p.display()),
                    Cpuacct::Unavailable => write!(f, " (without cpuacct)"),
                }
            }
            Hierarchy::V2 { parent } => write!(f, "cgroup v2 under {}", parent.display()),
        }
    }
}

/// The cgroup v2 path of this process from the text of `/proc/self/cgroup` (its `0::` line).
pub fn own_v2_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(str::trim)
}

/// The places to try, best first, under `root` (the cgroup mount, normally [`DEFAULT_ROOT`]);
/// `proc_self_cgroup` is the text of `/proc/self/cgroup`. `Err` says why there is none.
pub fn detect(root: &Path, proc_self_cgroup: &str) -> Result<Vec<Hierarchy>, Vec<String>> {
    if !root.is_dir() {
        return Err(vec![format!("no cgroup filesystem at {}", root.display())]);
    }
    if root.join("cgroup.controllers").is_file() {
        // Unified hierarchy (v2).
        let mut out = vec![Hierarchy::V2 { parent: root.to_path_buf() }];
        if let Some(own) = own_v2_path(proc_self_cgroup) {
            let rel = own.trim_start_matches('/');
            if let Some(parent) = Path::new(rel).parent().filter(|p| !p.as_os_str().is_empty()) {
                if !parent.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                    out.push(Hierarchy::V2 { parent: root.join(parent) });
                }
            }
        }
        return Ok(out);
    }
    let cpu = root.join("cpu");
    if !cpu.join("cpu.cfs_quota_us").is_file() {
        return Err(vec![format!(
            "cgroup v1 (no {}): the cpu controller is not mounted at {} (no cpu.cfs_quota_us)",
            root.join("cgroup.controllers").display(),
            cpu.display()
        )]);
    }
    if cpu.join("cpuacct.usage").is_file() {
        return Ok(vec![Hierarchy::V1 { cpu, cpuacct: Cpuacct::Comounted }]);
    }
    let acct = root.join("cpuacct");
    let separate = acct.join("cpuacct.usage").is_file()
        && match (fs::canonicalize(&acct), fs::canonicalize(&cpu)) {
            (Ok(a), Ok(c)) => a != c,
            _ => false,
        };
    let mut out = Vec::new();
    if separate {
        out.push(Hierarchy::V1 { cpu: cpu.clone(), cpuacct: Cpuacct::Separate(acct) });
    }
    out.push(Hierarchy::V1 { cpu, cpuacct: Cpuacct::Unavailable });
    Ok(out)
}

/// Creates capped cgroups for the server processes of one `--cpu-per-node` value.
#[derive(Debug)]
pub struct CpuLimiter {
    pub hierarchy: Hierarchy,
    pub cores: f64,
    pub quota: Quota,
    /// `aspen-compare-<pid>`.
    prefix: String,
    next: AtomicU64,
    /// Places tried before this one, and why they failed (to print as warnings).
    pub skipped: Vec<String>,
}

impl CpuLimiter {
    /// Finds where to create cgroups under `root` ([`detect`]) and proves it by creating,
    /// configuring and removing a probe cgroup, so a run fails before it starts anything when
    /// caps cannot be set. Cgroup names start with `aspen-compare-<pid>`.
    pub fn setup(root: &Path, proc_self_cgroup: &str, cores: f64, pid: u32) -> Result<CpuLimiter, CgroupError> {
        let quota = Quota::from_cores(cores)?;
        let not_root = {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let euid = unsafe { libc::geteuid() };
            euid != 0
        };
        let unavailable = |tried| CgroupError::Unavailable { root: root.to_path_buf(), not_root, tried };
        let candidates = detect(root, proc_self_cgroup).map_err(unavailable)?;
        let mut tried = Vec::new();
        for hierarchy in candidates {
            let limiter = CpuLimiter {
                hierarchy,
                cores,
                quota,
                prefix: format!("{NAME_PREFIX}{pid}"),
                next: AtomicU64::new(0),
                skipped: tried.clone(),
            };
            match limiter.prepare().and_then(|()| limiter.create("probe").map(drop)) {
                Ok(()) => return Ok(limiter),
                Err(e) => tried.push(format!("{}: {e}", limiter.hierarchy)),
            }
        }
        Err(unavailable(tried))
    }

    /// v2: the parent must offer `cpu` and delegate it to its children.
    fn prepare(&self) -> Result<(), CgroupError> {
        let Hierarchy::V2 { parent } = &self.hierarchy else { return Ok(()) };
        let controllers_file = parent.join("cgroup.controllers");
        let controllers = fs::read_to_string(&controllers_file).map_err(io_err("read", &controllers_file))?;
        if !controllers.split_whitespace().any(|c| c == "cpu") {
            return Err(CgroupError::Unsupported(format!(
                "the cpu controller is not available in {} (it lists: {})",
                controllers_file.display(),
                controllers.trim()
            )));
        }
        let subtree_file = parent.join("cgroup.subtree_control");
        let subtree = fs::read_to_string(&subtree_file).map_err(io_err("read", &subtree_file))?;
        if !subtree.split_whitespace().any(|c| c == "cpu" || c == "+cpu") {
            fs::write(&subtree_file, "+cpu\n").map_err(io_err("enable cpu (write +cpu) in", &subtree_file))?;
        }
        Ok(())
    }

    /// A new capped cgroup named `aspen-compare-<pid>-<n>-<label>`.
    pub fn create(&self, label: &str) -> Result<Cgroup, CgroupError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{n}-{label}", self.prefix);
        let q = self.quota;
        let base = match &self.hierarchy {
            Hierarchy::V1 { cpu, .. } => cpu,
            Hierarchy::V2 { parent } => parent,
        };
        let dir = base.join(&name);
        fs::create_dir(&dir).map_err(io_err("create cgroup", &dir))?;
        // From here on, dropping `cgroup` removes what was created.
        let mut cgroup = Cgroup { name, dirs: vec![dir.clone()], procs: Vec::new(), usage: None };
        match &self.hierarchy {
            Hierarchy::V1 { cpuacct, .. } => {
                write_file(&dir.join("cpu.cfs_period_us"), &format!("{}\n", q.period_us))?;
                write_file(&dir.join("cpu.cfs_quota_us"), &format!("{}\n", q.quota_us))?;
                cgroup.procs.push(open_procs(&dir)?);
                match cpuacct {
                    Cpuacct::Comounted => cgroup.usage = Some(CpuSource::CpuacctUsage(dir.join("cpuacct.usage"))),
                    Cpuacct::Separate(acct) => {
                        let adir = acct.join(&cgroup.name);
                        fs::create_dir(&adir).map_err(io_err("create cgroup", &adir))?;
                        cgroup.dirs.push(adir.clone());
                        cgroup.procs.push(open_procs(&adir)?);
                        cgroup.usage = Some(CpuSource::CpuacctUsage(adir.join("cpuacct.usage")));
                    }
                    Cpuacct::Unavailable => {}
                }
            }
            Hierarchy::V2 { .. } => {
                write_file(&dir.join("cpu.max"), &format!("{} {}\n", q.quota_us, q.period_us))?;
                cgroup.procs.push(open_procs(&dir)?);
                cgroup.usage = Some(CpuSource::CpuStat(dir.join("cpu.stat")));
            }
        }
        Ok(cgroup)
    }

    /// The directories this limiter creates cgroups in.
    pub fn parents(&self) -> Vec<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V1 { cpu, cpuacct: Cpuacct::Separate(acct) } => vec![cpu.clone(), acct.clone()],
            Hierarchy::V1 { cpu, .. } => vec![cpu.clone()],
            Hierarchy::V2 { parent } => vec![parent.clone()],
        }
    }

    /// Removes empty cgroups `aspen-compare-<pid>-…` left by runs whose process is gone
    /// (`alive(pid)` is false; e.g. a harness killed with SIGKILL); returns their paths.
    pub fn remove_stale(&self, alive: impl Fn(u32) -> bool) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for parent in self.parents() {
            let Ok(entries) = fs::read_dir(&parent) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(stale_pid) else { continue };
                if !alive(pid) && entry.path().is_dir() && fs::remove_dir(entry.path()).is_ok() {
                    removed.push(entry.path());
                }
            }
        }
        removed
    }

    /// How the caps are set, for the results page.
    pub fn describe(&self) -> String {
        let q = self.quota;
        match &self.hierarchy {
            Hierarchy::V1 { .. } => format!(
                "{} core per server process: each in its own cgroup (v1 `cpu` controller, `cpu.cfs_quota_us` {} per \
                 `cpu.cfs_period_us` {})",
                self.cores, q.quota_us, q.period_us
            ),
            Hierarchy::V2 { .. } => format!(
                "{} core per server process: each in its own cgroup (v2, `cpu.max` = `{} {}`)",
                self.cores, q.quota_us, q.period_us
            ),
        }
    }
}

/// The harness pid in a cgroup name `aspen-compare-<pid>-…`.
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

fn write_file(path: &Path, contents: &str) -> Result<(), CgroupError> {
    fs::write(path, contents).map_err(io_err("write", path))
}

fn open_procs(dir: &Path) -> Result<File, CgroupError> {
    let path = dir.join("cgroup.procs");
    // `create` only matters for a stand-in directory (tests): cgroupfs has the file already.
    OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(io_err("open", &path))
}

/// One server process's cgroup (one directory per hierarchy); removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    pub name: String,
    /// The cgroup's directories: the capped one first.
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each directory, open for the child to write its pid into.
    procs: Vec<File>,
    /// Where the cgroup's CPU usage can be read, if anywhere.
    usage: Option<CpuSource>,
}

impl Cgroup {
    /// The capped directory.
    pub fn path(&self) -> &Path {
        &self.dirs[0]
    }

    /// Where the cgroup's CPU usage (all its processes and threads) can be read, if it can.
    pub fn usage(&self) -> Option<&CpuSource> {
        self.usage.as_ref()
    }

    /// Calls `spawn(cmd)` with a hook added to `cmd` that, in the child between fork and exec,
    /// writes the child's pid into this cgroup's `cgroup.procs` files (a failed write makes the
    /// spawn fail). The files are open for as long as `self` lives, and `self` outlives `spawn`.
    pub fn spawn_in<T>(&self, mut cmd: Command, spawn: impl FnOnce(Command) -> T) -> T {
        let fds: Vec<i32> = self.procs.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: the hook runs in the forked child before exec. It calls only getpid and write
        // (async-signal-safe), allocates nothing (the pid is formatted into a stack buffer, the
        // fd list was allocated before the fork) and takes no locks. The fds stay open until
        // `spawn` returns because `self` owns them and is borrowed for the whole call.
        unsafe {
            cmd.pre_exec(move || {
                let mut buf = [0u8; 24];
                let len = format_pid(libc::getpid() as u32, &mut buf);
                for &fd in &fds {
                    let written = libc::write(fd, buf.as_ptr().cast(), len);
                    if written < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if written as usize != len {
                        return Err(io::Error::from_raw_os_error(libc::EIO));
                    }
                }
                Ok(())
            });
        }
        spawn(cmd)
    }

    /// The pids in the capped directory's `cgroup.procs`.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let path = self.path().join("cgroup.procs");
        let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        Ok(text.split_whitespace().filter_map(|p| p.parse().ok()).collect())
    }

    /// `Ok` if `pid` is in the capped directory's `cgroup.procs`.
    pub fn check_holds(&self, pid: u32) -> Result<(), CgroupError> {
        let pids = self.pids()?;
        if pids.contains(&pid) {
            Ok(())
        } else {
            let found = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
            Err(CgroupError::NotAttached { pid, path: self.path().to_path_buf(), found })
        }
    }
}

impl Drop for Cgroup {
    /// Removes the directories (the processes must have exited: a cgroup that still holds one
    /// cannot be removed, and a warning says so). Retries briefly while the kernel still counts
    /// an exiting process (EBUSY).
    fn drop(&mut self) {
        self.procs.clear();
        for dir in self.dirs.iter().rev() {
            let mut attempts = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempts < 50 => {
                        attempts += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        eprintln!("aspen-compare: warning: cannot remove cgroup {}: {e}", dir.display());
                        break;
                    }
                }
            }
        }
    }
}

/// Writes `pid` and a newline into `buf` in decimal; returns the length. No allocation (it runs
/// between fork and exec).
pub fn format_pid(pid: u32, buf: &mut [u8; 24]) -> usize {
    let mut digits = [0u8; 10];
    let mut n = pid;
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..count {
        buf[i] = digits[count - 1 - i];
    }
    buf[count] = b'\n';
    count + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, contents: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    /// A stand-in v1 layout: `cpu` (and optionally a separate `cpuacct`) hierarchy.
    fn fake_v1(root: &Path, cpuacct: bool) {
        touch(&root.join("cpu/cpu.cfs_quota_us"), "-1\n");
        touch(&root.join("cpu/cpu.cfs_period_us"), "100000\n");
        touch(&root.join("cpu/cgroup.procs"), "");
        if cpuacct {
            touch(&root.join("cpuacct/cpuacct.usage"), "0\n");
        }
    }

    /// The files cgroupfs would remove itself on rmdir.
    fn clear_files(dir: &Path) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            fs::remove_file(e.path()).unwrap();
        }
    }

    #[test]
    fn cores_parse_into_quotas() {
        assert_eq!(parse_cores("0.45").unwrap(), Some(0.45));
        assert_eq!(parse_cores("none").unwrap(), None);
        assert_eq!(parse_cores("Unlimited").unwrap(), None);
        for bad in ["0", "-1", "abc", "nan", "inf", "0.001", "5000", ""] {
            assert!(matches!(parse_cores(bad), Err(CgroupError::BadCores(_))), "{bad}");
        }
        assert_eq!(Quota::from_cores(0.45).unwrap(), Quota { quota_us: 45_000, period_us: 100_000 });
        assert_eq!(Quota::from_cores(2.0).unwrap(), Quota { quota_us: 200_000, period_us: 100_000 });
        assert_eq!(Quota::from_cores(0.01).unwrap().quota_us, 1_000, "the kernel's minimum");
        assert!(Quota::from_cores(f64::NAN).is_err());
    }

    #[test]
    fn detects_v1_and_its_cpuacct() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        assert!(detect(&root.join("missing"), "").unwrap_err()[0].contains("no cgroup filesystem"));
        // Mounted, but no cpu controller.
        touch(&root.join("memory/cgroup.procs"), "");
        let why = detect(root, "").unwrap_err();
        assert!(why[0].contains("cpu controller is not mounted"), "{why:?}");

        fake_v1(root, false);
        let cpu = root.join("cpu");
        assert_eq!(detect(root, "").unwrap(), vec![Hierarchy::V1 { cpu: cpu.clone(), cpuacct: Cpuacct::Unavailable }]);
        fake_v1(root, true);
        assert_eq!(
            detect(root, "").unwrap(),
            vec![
                Hierarchy::V1 { cpu: cpu.clone(), cpuacct: Cpuacct::Separate(root.join("cpuacct")) },
                Hierarchy::V1 { cpu: cpu.clone(), cpuacct: Cpuacct::Unavailable },
            ],
            "a separate cpuacct hierarchy first, without it as the fallback"
        );
        touch(&cpu.join("cpuacct.usage"), "0\n");
        assert_eq!(detect(root, "").unwrap(), vec![Hierarchy::V1 { cpu, cpuacct: Cpuacct::Comounted }]);
    }

    #[test]
    fn detects_v2_with_the_own_cgroups_parent_as_second_choice() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        touch(&root.join("cgroup.controllers"), "cpuset cpu io memory pids\n");
        touch(&root.join("cpu/cpu.cfs_quota_us"), "-1\n"); // ignored: v2 wins
        let own = "0::/user.slice/user-1000.slice/session-3.scope\n";
        assert_eq!(
            detect(root, own).unwrap(),
            vec![
                Hierarchy::V2 { parent: root.to_path_buf() },
                Hierarchy::V2 { parent: root.join("user.slice/user-1000.slice") },
            ]
        );
        assert_eq!(detect(root, "0::/\n").unwrap(), vec![Hierarchy::V2 { parent: root.to_path_buf() }]);
        assert_eq!(detect(root, "0::/a/../../etc\n").unwrap().len(), 1, "no escape from the root");
        assert_eq!(own_v2_path("12:cpu:/x\n0::/a/b\n"), Some("/a/b"));
        assert_eq!(own_v2_path("1:cpu:/\n"), None);
    }

    #[test]
    fn v1_cgroup_gets_the_quota_and_the_child_joins_it_before_exec() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fake_v1(root, true);
        let limiter = CpuLimiter::setup(root, "", 0.45, 4242).unwrap();
        assert!(matches!(limiter.hierarchy, Hierarchy::V1 { cpuacct: Cpuacct::Separate(_), .. }));
        assert!(limiter.skipped.is_empty());
        // The probe was created and removed again (here its files are not virtual, so its
        // directory stays: that is the stand-in's limit, not the code's).
        let probe = root.join("cpu/aspen-compare-4242-0-probe");
        assert_eq!(fs::read_to_string(probe.join("cpu.cfs_quota_us")).unwrap(), "45000\n");

        let cg = limiter.create("etcd-m0").unwrap();
        assert_eq!(cg.name, "aspen-compare-4242-1-etcd-m0");
        let dir = root.join("cpu/aspen-compare-4242-1-etcd-m0");
        let acct = root.join("cpuacct/aspen-compare-4242-1-etcd-m0");
        assert_eq!(cg.path(), dir);
        assert_eq!(fs::read_to_string(dir.join("cpu.cfs_period_us")).unwrap(), "100000\n");
        assert_eq!(fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap(), "45000\n");
        assert_eq!(cg.usage(), Some(&CpuSource::CpuacctUsage(acct.join("cpuacct.usage"))));

        let mut child = cg.spawn_in(Command::new("true"), |mut c| c.spawn()).unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.procs")).unwrap(), format!("{pid}\n"));
        assert_eq!(fs::read_to_string(acct.join("cgroup.procs")).unwrap(), format!("{pid}\n"));
        cg.check_holds(pid).unwrap();
        assert!(matches!(cg.check_holds(pid + 1), Err(CgroupError::NotAttached { .. })));

        clear_files(&dir);
        clear_files(&acct);
        drop(cg);
        assert!(!dir.exists() && !acct.exists(), "removed on drop");
        assert!(limiter.describe().contains("`cpu.cfs_quota_us` 45000 per `cpu.cfs_period_us` 100000"));
    }

    #[test]
    fn a_failed_join_fails_the_spawn() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), false);
        let limiter = CpuLimiter::setup(t.path(), "", 1.0, 7).unwrap();
        let mut cg = limiter.create("x").unwrap();
        // A read-only `cgroup.procs`: the child's write fails, so must the spawn.
        let path = cg.path().join("cgroup.procs");
        cg.procs = vec![File::open(&path).unwrap()];
        let spawned = cg.spawn_in(Command::new("true"), |mut c| c.spawn());
        assert!(spawned.is_err(), "{spawned:?}");
        clear_files(cg.path());
    }

    #[test]
    fn v2_cgroup_gets_cpu_max_and_the_parent_delegates_cpu() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        touch(&root.join("cgroup.controllers"), "cpuset cpu io memory\n");
        touch(&root.join("cgroup.subtree_control"), "memory\n");
        let limiter = CpuLimiter::setup(root, "0::/\n", 0.45, 99).unwrap();
        assert_eq!(limiter.hierarchy, Hierarchy::V2 { parent: root.to_path_buf() });
        assert_eq!(fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(), "+cpu\n");
        let cg = limiter.create("aspen-node-1").unwrap();
        let dir = root.join("aspen-compare-99-1-aspen-node-1");
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).unwrap(), "45000 100000\n");
        assert_eq!(cg.usage(), Some(&CpuSource::CpuStat(dir.join("cpu.stat"))));
        assert!(limiter.describe().contains("`cpu.max` = `45000 100000`"));
        clear_files(&dir);
        drop(cg);
        assert!(!dir.exists());
    }

    #[test]
    fn no_usable_controller_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        // v2 without the cpu controller, at the root and at the own cgroup's parent.
        touch(&root.join("cgroup.controllers"), "memory pids\n");
        touch(&root.join("a/cgroup.controllers"), "memory\n");
        let e = CpuLimiter::setup(root, "0::/a/b\n", 0.45, 1).unwrap_err();
        let text = e.to_string();
        assert!(matches!(&e, CgroupError::Unavailable { tried, .. } if tried.len() == 2), "{text}");
        assert!(text.contains("cannot cap the CPU"), "{text}");
        assert!(text.contains("cpu controller is not available"), "{text}");
        assert!(text.contains(&root.join("a/cgroup.controllers").display().to_string()), "{text}");

        // A root that is not a directory.
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("cpu/cpu.cfs_quota_us"), "-1\n");
        let e = CpuLimiter::setup(&t.path().join("cpu/cpu.cfs_quota_us"), "", 0.45, 1).unwrap_err();
        assert!(e.to_string().contains("no cgroup filesystem"), "{e}");

        // v1 where the probe cgroup cannot be created (here: a file in its place).
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), false);
        touch(&t.path().join("cpu/aspen-compare-5-0-probe"), "");
        let e = CpuLimiter::setup(t.path(), "", 0.45, 5).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("cgroup v1 cpu controller at"), "{text}");
        assert!(text.contains("create cgroup") && text.contains("aspen-compare-5-0-probe"), "{text}");
        assert!(matches!(CpuLimiter::setup(t.path(), "", 0.0, 1), Err(CgroupError::BadCores(_))));
    }

    #[test]
    fn stale_cgroups_of_dead_runs_are_removed() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), false);
        let limiter = CpuLimiter::setup(t.path(), "", 0.5, 10).unwrap();
        let cpu = t.path().join("cpu");
        for name in ["aspen-compare-11-0-etcd-m0", "aspen-compare-10-5-x", "other", "aspen-compare-x-1"] {
            fs::create_dir(cpu.join(name)).unwrap();
        }
        let removed = limiter.remove_stale(|pid| pid == 10);
        assert_eq!(removed, vec![cpu.join("aspen-compare-11-0-etcd-m0")]);
        assert!(cpu.join("aspen-compare-10-5-x").exists() && cpu.join("other").exists());
        assert_eq!(stale_pid("aspen-compare-123-4-probe"), Some(123));
        assert_eq!(stale_pid("aspen-compare-"), None);
    }

    #[test]
    fn pids_are_formatted_without_allocating() {
        let mut buf = [0u8; 24];
        for pid in [0u32, 7, 10, 4_194_304, u32::MAX] {
            let n = format_pid(pid, &mut buf);
            assert_eq!(&buf[..n], format!("{pid}\n").as_bytes());
        }
    }
}
