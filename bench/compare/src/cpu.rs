//! Server CPU per operation: the CPU time (user + system, every thread) the server processes
//! of a row spent during that row's measured window, divided by the window's successful
//! requests.
//!
//! The CPU time of a process comes from its capped cgroup when that cgroup reports usage
//! (`cpuacct.usage` in ns, or `usage_usec` of a v2 `cpu.stat`), otherwise from
//! `/proc/<pid>/stat` (fields 14 and 15, `utime` and `stime`, in clock ticks: the totals of all
//! the process's threads, exited ones included). [`run_measured`] samples it when the
//! load generator's measurement begins and when it ends (not during prefill or warm-up).

use std::{
    fs,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use aspen::api::ReadConsistency;
use aspen_bench::{BenchBackend, BenchClient, BenchConfig, BenchError, BenchReport, OpError, ProgressFn, Stop};

/// Why a CPU time could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatError {
    #[error("no `(comm)` field")]
    NoComm,
    #[error("field {0} is missing")]
    MissingField(usize),
    #[error("field {field} is not a number: `{text}`")]
    BadNumber { field: usize, text: String },
    #[error("no `usage_usec` line")]
    NoUsage,
}

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: StatError,
    },
}

/// `utime` and `stime` of a `/proc/<pid>/stat` line, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcTimes {
    pub utime: u64,
    pub stime: u64,
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid …`, where `comm` may hold spaces and
/// parentheses (so fields are counted from the last `)`), `utime` is field 14 and `stime` 15.
pub fn parse_proc_stat(text: &str) -> Result<ProcTimes, StatError> {
    let open = text.find('(').ok_or(StatError::NoComm)?;
    let close = text.rfind(')').filter(|&c| c > open).ok_or(StatError::NoComm)?;
    // Field 3 (state) is the first after the command name.
    let fields: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    let field = |n: usize| -> Result<u64, StatError> {
        let text = fields.get(n - 3).ok_or(StatError::MissingField(n))?;
        text.parse().map_err(|_| StatError::BadNumber { field: n, text: text.to_string() })
    };
    Ok(ProcTimes { utime: field(14)?, stime: field(15)? })
}

/// `usage_usec` of a cgroup v2 `cpu.stat`, in microseconds.
pub fn parse_cpu_stat_usage(text: &str) -> Result<u64, StatError> {
    let value = text.lines().find_map(|l| l.strip_prefix("usage_usec").map(str::trim)).ok_or(StatError::NoUsage)?;
    value.parse().map_err(|_| StatError::BadNumber { field: 1, text: value.to_string() })
}

/// Clock ticks → nanoseconds.
pub fn ticks_to_ns(ticks: u64, ticks_per_sec: u64) -> u64 {
    (u128::from(ticks) * 1_000_000_000 / u128::from(ticks_per_sec.max(1))).min(u128::from(u64::MAX)) as u64
}

/// The kernel's clock ticks per second for `/proc` times (`sysconf(_SC_CLK_TCK)`, nearly always
/// 100).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Where one server process's CPU time is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuSource {
    /// `/proc/<pid>/stat` utime + stime (clock ticks).
    Proc(u32),
    /// A v1 cgroup's `cpuacct.usage` (ns).
    CpuacctUsage(PathBuf),
    /// A v2 cgroup's `cpu.stat`, `usage_usec`.
    CpuStat(PathBuf),
}

impl CpuSource {
    /// CPU time so far, in nanoseconds.
    pub fn read_ns(&self, ticks_per_sec: u64) -> Result<u64, CpuError> {
        let (path, text) = match self {
            CpuSource::Proc(pid) => read(PathBuf::from(format!("/proc/{pid}/stat")))?,
            CpuSource::CpuacctUsage(p) | CpuSource::CpuStat(p) => read(p.clone())?,
        };
        let parse = |source| CpuError::Parse { path: path.clone(), source };
        match self {
            CpuSource::Proc(_) => {
                let t = parse_proc_stat(&text).map_err(parse)?;
                Ok(ticks_to_ns(t.utime.saturating_add(t.stime), ticks_per_sec))
            }
            CpuSource::CpuacctUsage(_) => {
                let v = text.trim();
                v.parse().map_err(|_| parse(StatError::BadNumber { field: 1, text: v.to_string() }))
            }
            CpuSource::CpuStat(_) => Ok(parse_cpu_stat_usage(&text).map_err(parse)?.saturating_mul(1000)),
        }
    }

    /// How this source measures, for the results page.
    pub fn kind(&self, ticks_per_sec: u64) -> String {
        match self {
            CpuSource::Proc(_) => format!("utime + stime of /proc/<pid>/stat (clock ticks of 1/{ticks_per_sec} s)"),
            CpuSource::CpuacctUsage(_) => "the cgroup's cpuacct.usage (ns)".into(),
            CpuSource::CpuStat(_) => "usage_usec of the cgroup's cpu.stat".into(),
        }
    }
}

fn read(path: PathBuf) -> Result<(PathBuf, String), CpuError> {
    match fs::read_to_string(&path) {
        Ok(text) => Ok((path, text)),
        Err(source) => Err(CpuError::Read { path, source }),
    }
}

/// The CPU time of every server process of a system under test.
#[derive(Clone, Debug, Default)]
pub struct CpuMeter {
    pub sources: Vec<CpuSource>,
    pub ticks_per_sec: u64,
}

impl CpuMeter {
    pub fn new(sources: Vec<CpuSource>) -> CpuMeter {
        CpuMeter { sources, ticks_per_sec: clock_ticks_per_sec() }
    }

    /// The sum over all sources, in nanoseconds.
    pub fn sample(&self) -> Result<u64, CpuError> {
        self.sources.iter().try_fold(0u64, |sum, s| Ok(sum.saturating_add(s.read_ns(self.ticks_per_sec)?)))
    }

    /// [`Self::sample`] and when it was taken.
    fn sample_now(&self) -> Result<(Instant, u64), CpuError> {
        let ns = self.sample()?;
        Ok((Instant::now(), ns))
    }

    /// How the sources measure (distinct kinds, joined), for the results page.
    pub fn describe(&self) -> String {
        let mut kinds: Vec<String> = Vec::new();
        for s in &self.sources {
            let kind = s.kind(self.ticks_per_sec);
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        kinds.join(", ")
    }
}

/// The servers' CPU time over a measured window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuWindow {
    /// Summed CPU time of every server process at the start and at the end, in nanoseconds.
    pub before_ns: u64,
    pub after_ns: u64,
    /// Wall time between the two samples.
    pub wall: Duration,
}

impl CpuWindow {
    /// Server CPU per successful request in microseconds: `None` without requests, or if the
    /// counters went backwards (a process replaced).
    pub fn us_per_op(&self, ok: u64) -> Option<f64> {
        cpu_us_per_op(self.before_ns, self.after_ns, ok)
    }

    /// Cores the servers used on average over the window (e.g. 1.35 for three processes capped
    /// at 0.45 core each and saturated).
    pub fn cores(&self) -> Option<f64> {
        let secs = self.wall.as_secs_f64();
        (secs > 0.0 && self.after_ns >= self.before_ns).then(|| (self.after_ns - self.before_ns) as f64 / 1e9 / secs)
    }
}

/// (after − before) nanoseconds of CPU ÷ `ok` requests, in microseconds per request.
pub fn cpu_us_per_op(before_ns: u64, after_ns: u64, ok: u64) -> Option<f64> {
    (ok > 0 && after_ns >= before_ns).then(|| (after_ns - before_ns) as f64 / 1000.0 / ok as f64)
}

/// Runs `aspen_bench::run` on `backend` and samples `meter` when its measured window begins and
/// ends: returns the report and the window, `None` if the run ended before measuring began.
///
/// `aspen_bench::run` prefills (get rows), then starts its clock, warms up for
/// `config.warmup` and measures for the duration; the measured requests are those started in
/// `[clock + warmup, clock + warmup + duration)`. The clock is not visible from outside, so the
/// backend is wrapped: its clients note the first `put`/`get` (the prefill uses `put_many`),
/// which the driver sends right after starting its clock. The samples are taken at that
/// instant + warmup and + duration (steady state: the CPU spent on requests in flight at
/// either edge balances out); if the run ends earlier, at its end.
pub async fn run_measured<B: BenchBackend>(
    backend: &B,
    config: &BenchConfig,
    progress: Option<ProgressFn>,
    meter: &CpuMeter,
) -> (Result<BenchReport, BenchError>, Option<Result<CpuWindow, CpuError>>) {
    let first = Arc::new(FirstOp::default());
    let windowed = Windowed { inner: backend, first: first.clone() };
    let run = aspen_bench::run(&windowed, config, progress);
    tokio::pin!(run);
    let started = tokio::select! {
        r = &mut run => return (r, None),
        at = first.wait() => at,
    };
    let from = started + config.warmup;
    tokio::select! {
        r = &mut run => return (r, None),
        () = tokio::time::sleep_until(from.into()) => {}
    }
    let before = match meter.sample_now() {
        Ok(b) => b,
        Err(e) => return (run.await, Some(Err(e))),
    };
    let deadline = match config.stop {
        Stop::Duration(d) => from.checked_add(d),
        Stop::Requests(_) => None,
    };
    let (report, after) = tokio::select! {
        r = &mut run => (r, meter.sample_now()),
        () = sleep_until_opt(deadline) => {
            let after = meter.sample_now();
            (run.await, after)
        }
    };
    let window =
        after.map(|(at, ns)| CpuWindow { before_ns: before.1, after_ns: ns, wall: at.duration_since(before.0) });
    (report, Some(window))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The instant the first measured-phase request (`put` or `get`) was sent.
#[derive(Default)]
struct FirstOp {
    at: OnceLock<Instant>,
    notify: tokio::sync::Notify,
}

impl FirstOp {
    fn mark(&self) {
        if self.at.get().is_none() && self.at.set(Instant::now()).is_ok() {
            self.notify.notify_one();
        }
    }

    async fn wait(&self) -> Instant {
        loop {
            if let Some(at) = self.at.get() {
                return *at;
            }
            self.notify.notified().await;
        }
    }
}

/// A backend whose clients report their first `put` or `get` to [`FirstOp`].
struct Windowed<'a, B> {
    inner: &'a B,
    first: Arc<FirstOp>,
}

struct WindowedClient<C> {
    inner: C,
    first: Arc<FirstOp>,
}

impl<B: BenchBackend> BenchBackend for Windowed<'_, B> {
    type Client = WindowedClient<B::Client>;

    fn name(&self) -> String {
        self.inner.name()
    }

    async fn connect(&self, index: usize) -> Result<Self::Client, OpError> {
        let inner = self.inner.connect(index).await?;
        Ok(WindowedClient { inner, first: self.first.clone() })
    }

    async fn finish(&self) {
        self.inner.finish().await
    }
}

impl<C: BenchClient> BenchClient for WindowedClient<C> {
    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        self.first.mark();
        self.inner.put(key, value).await
    }

    async fn get(&self, key: Vec<u8>, consistency: ReadConsistency) -> Result<bool, OpError> {
        self.first.mark();
        self.inner.get(key, consistency).await
    }

    async fn put_many(&self, kvs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), OpError> {
        self.inner.put_many(kvs).await
    }

    async fn close(self) {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    };

    use aspen_bench::Workload;

    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        // A real line of `cat /proc/self/stat`, with utime 12 and stime 34.
        let plain = "4242 (aspen-node) S 1 4242 4242 0 -1 4194560 1024 0 0 0 12 34 0 0 20 0 9 0 123 4096 512 \
                     18446744073709551615 1 1 0 0 0 0 0 4096 17664 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_proc_stat(plain), Ok(ProcTimes { utime: 12, stime: 34 }));
        // A command name with spaces and parentheses, as a process may set it.
        let odd = "77 (tokio) (worker 1) R 1 77 77 0 -1 0 0 0 0 0 500 250 1 1 20 0 1 0 9 0 0";
        assert_eq!(parse_proc_stat(odd), Ok(ProcTimes { utime: 500, stime: 250 }));
        let empty_name = "5 () S 1 5 5 0 -1 0 0 0 0 0 3 4 0 0";
        assert_eq!(parse_proc_stat(empty_name), Ok(ProcTimes { utime: 3, stime: 4 }));

        assert_eq!(parse_proc_stat(""), Err(StatError::NoComm));
        assert_eq!(parse_proc_stat("12 no-parens S 1"), Err(StatError::NoComm));
        assert_eq!(parse_proc_stat("12 )x( S 1"), Err(StatError::NoComm));
        assert_eq!(parse_proc_stat("12 (x) S 1 2 3"), Err(StatError::MissingField(14)));
        assert_eq!(
            parse_proc_stat("1 (x) S 1 1 1 0 -1 0 0 0 0 0 7 -3"),
            Err(StatError::BadNumber { field: 15, text: "-3".into() })
        );
        // This very process: readable, and its times only grow.
        let me = CpuSource::Proc(std::process::id());
        let a = me.read_ns(clock_ticks_per_sec()).unwrap();
        let b = me.read_ns(clock_ticks_per_sec()).unwrap();
        assert!(b >= a);
        assert!(matches!(CpuSource::Proc(u32::MAX).read_ns(100), Err(CpuError::Read { .. })));
    }

    #[test]
    fn cgroup_usage_files_are_read_in_nanoseconds() {
        assert_eq!(parse_cpu_stat_usage("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"), Ok(1500));
        assert_eq!(parse_cpu_stat_usage("nr_periods 0\n"), Err(StatError::NoUsage));
        let t = tempfile::tempdir().unwrap();
        let stat = t.path().join("cpu.stat");
        fs::write(&stat, "usage_usec 2500\nuser_usec 2000\n").unwrap();
        assert_eq!(CpuSource::CpuStat(stat).read_ns(100).unwrap(), 2_500_000);
        let usage = t.path().join("cpuacct.usage");
        fs::write(&usage, "123456789\n").unwrap();
        assert_eq!(CpuSource::CpuacctUsage(usage.clone()).read_ns(100).unwrap(), 123_456_789);
        fs::write(&usage, "garbage\n").unwrap();
        assert!(matches!(CpuSource::CpuacctUsage(usage).read_ns(100), Err(CpuError::Parse { .. })));
    }

    #[test]
    fn cpu_per_op_is_window_cpu_over_successful_requests() {
        assert_eq!(ticks_to_ns(150, 100), 1_500_000_000);
        assert_eq!(ticks_to_ns(1, 250), 4_000_000);
        assert_eq!(ticks_to_ns(u64::MAX, 1), u64::MAX, "saturates");
        // 1.5 s of CPU over 3,000 requests = 500 µs each.
        assert_eq!(cpu_us_per_op(2_000_000_000, 3_500_000_000, 3000), Some(500.0));
        assert_eq!(cpu_us_per_op(0, 1_000, 4), Some(0.25));
        assert_eq!(cpu_us_per_op(5, 5, 10), Some(0.0));
        assert_eq!(cpu_us_per_op(0, 1_000, 0), None, "no successful request");
        assert_eq!(cpu_us_per_op(2_000, 1_000, 10), None, "counters went backwards");
        let w = CpuWindow { before_ns: 1_000_000_000, after_ns: 3_700_000_000, wall: Duration::from_secs(2) };
        assert_eq!(w.us_per_op(1350), Some(2000.0));
        assert_eq!(w.cores(), Some(1.35));
        assert_eq!(CpuWindow { wall: Duration::ZERO, ..w }.cores(), None);

        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        fs::write(&a, "1000\n").unwrap();
        fs::write(&b, "usage_usec 2\n").unwrap();
        let meter = CpuMeter::new(vec![CpuSource::CpuacctUsage(a), CpuSource::CpuStat(b)]);
        assert_eq!(meter.sample().unwrap(), 3000, "summed over the servers");
        assert_eq!(meter.describe(), "the cgroup's cpuacct.usage (ns), usage_usec of the cgroup's cpu.stat");
        let procs = CpuMeter { sources: vec![CpuSource::Proc(1), CpuSource::Proc(2)], ticks_per_sec: 100 };
        assert_eq!(procs.describe(), "utime + stime of /proc/<pid>/stat (clock ticks of 1/100 s)");
    }

    /// A backend that counts requests and whose "server CPU" (a file the test's meter reads)
    /// grows by 1 µs per put, so the window's CPU is exactly the puts it saw.
    struct Fake {
        puts: Arc<AtomicU64>,
        usage: PathBuf,
        lock: Arc<Mutex<()>>,
    }
    struct FakeClient {
        puts: Arc<AtomicU64>,
        usage: PathBuf,
        lock: Arc<Mutex<()>>,
    }
    impl BenchBackend for Fake {
        type Client = FakeClient;
        fn name(&self) -> String {
            "fake".into()
        }
        async fn connect(&self, _index: usize) -> Result<FakeClient, OpError> {
            Ok(FakeClient { puts: self.puts.clone(), usage: self.usage.clone(), lock: self.lock.clone() })
        }
    }
    impl BenchClient for FakeClient {
        async fn put(&self, _key: Vec<u8>, _value: Vec<u8>) -> Result<(), OpError> {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let _g = self.lock.lock().unwrap();
            let n = self.puts.fetch_add(1, Ordering::SeqCst) + 1;
            fs::write(&self.usage, format!("{}\n", n * 1000))?;
            Ok(())
        }
        async fn get(&self, _key: Vec<u8>, _c: ReadConsistency) -> Result<bool, OpError> {
            Ok(true)
        }
        async fn put_many(&self, _kvs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), OpError> {
            panic!("puts never prefill")
        }
        async fn close(self) {}
    }

    #[tokio::test]
    async fn the_window_excludes_the_warmup() {
        let t = tempfile::tempdir().unwrap();
        let usage = t.path().join("cpuacct.usage");
        fs::write(&usage, "0\n").unwrap();
        let puts = Arc::new(AtomicU64::new(0));
        let backend = Fake { puts: puts.clone(), usage: usage.clone(), lock: Default::default() };
        let meter = CpuMeter::new(vec![CpuSource::CpuacctUsage(usage)]);
        let config = BenchConfig {
            clients: 1,
            stop: Stop::Duration(Duration::from_millis(300)),
            workload: Workload::Put,
            warmup: Duration::from_millis(200),
            ..BenchConfig::default()
        };
        let (report, window) = run_measured(&backend, &config, None, &meter).await;
        let report = report.unwrap();
        let w = window.expect("measured").unwrap();
        let total = puts.load(Ordering::SeqCst);
        let in_window = (w.after_ns - w.before_ns) / 1000;
        assert!(report.ok > 0 && report.ok < total, "warm-up requests exist: {} of {total}", report.ok);
        assert!(w.before_ns > 0, "the first sample came after the warm-up's requests");
        // The window's "CPU" is its puts, give or take the ones at the edges (and a few more if
        // a busy machine delays the samples).
        let slack = (report.ok / 10).max(2);
        assert!(in_window.abs_diff(report.ok) <= slack, "{in_window} vs {}", report.ok);
        let per_op = w.us_per_op(report.ok).unwrap();
        assert!((per_op - 1.0).abs() <= 0.1, "{per_op}");
        // Without the wrapper's window the warm-up's puts would be in it too.
        assert!(total - in_window >= slack, "{total} puts in all, {in_window} in the window");
        // The planned 300 ms, give or take the timer (generous: the machine may be busy).
        assert!(w.wall >= Duration::from_millis(250) && w.wall <= Duration::from_millis(1500), "{:?}", w.wall);
    }
}
