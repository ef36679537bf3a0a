//! The comparison table: rows of measurements, the Aspen/etcd throughput ratio per row, the
//! server CPU per request, the markdown tables (one per `--cpu-per-node` setting) and the
//! `benches/RESULTS.md` page around them. Pure functions, unit-tested.

use std::fmt::Write;

/// What one successful run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// Successful requests per second.
    pub ops_per_sec: f64,
    /// Latency percentiles of successful requests, in microseconds.
    pub p50_us: u64,
    pub p99_us: u64,
    pub ok: u64,
    pub errors: u64,
    /// CPU time of the row's server processes during the measured window ÷ `ok`, in
    /// microseconds (`None` when it could not be read).
    pub cpu_us_per_op: Option<f64>,
    /// With several rounds: the lowest and highest ops/s any round measured (this measurement
    /// is the median round's).
    pub range: Option<(f64, f64)>,
}

/// Folds the rounds of one row into one measurement: the round with the median throughput (the
/// lower of the two middle rounds for an even count), with the range over all rounds. A row
/// fails when any of its rounds failed (the first failure is kept): a median must not hide one.
pub fn median_round(rounds: Vec<Result<Measurement, String>>) -> Result<Measurement, String> {
    let mut ok = Vec::with_capacity(rounds.len());
    for (i, round) in rounds.into_iter().enumerate() {
        match round {
            Ok(m) => ok.push(m),
            Err(e) => return Err(if i == 0 { e } else { format!("round {}: {e}", i + 1) }),
        }
    }
    if ok.is_empty() {
        return Err("not measured".into());
    }
    ok.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
    let range = (ok.len() > 1).then(|| (ok[0].ops_per_sec, ok[ok.len() - 1].ops_per_sec));
    let mut median = ok.swap_remove((ok.len() - 1) / 2);
    median.range = range;
    Ok(median)
}

/// One line of the table: a system, an operation and a number of clients.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// As shown, e.g. `etcd`, `aspen`, `aspen (4 shards)`.
    pub system: String,
    /// Whether this is the system the others are compared with (etcd).
    pub baseline: bool,
    /// As shown, e.g. `put`, `get`.
    pub op: String,
    pub clients: usize,
    /// The CPU cap of every server process, in cores (`None`: uncapped).
    pub cap: Option<f64>,
    /// The measurement, or why the run failed.
    pub result: Result<Measurement, String>,
}

/// The ratio of `row`'s throughput to the baseline row with the same op, clients and CPU cap: `None`
/// for a baseline row, or when either run failed, or the baseline measured nothing.
pub fn ratio(row: &Row, rows: &[Row]) -> Option<f64> {
    if row.baseline {
        return None;
    }
    let mine = row.result.as_ref().ok()?;
    let base = rows.iter().find(|r| r.baseline && r.op == row.op && r.clients == row.clients && r.cap == row.cap)?;
    let base = base.result.as_ref().ok()?;
    (base.ops_per_sec > 0.0).then(|| mine.ops_per_sec / base.ops_per_sec)
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Microseconds as milliseconds with two decimals.
pub fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// Server CPU per request in microseconds: whole numbers from 100 on, one decimal below.
pub fn cpu_us(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v >= 99.95 => thousands(v.round() as u64),
        Some(v) if v.is_finite() && v >= 0.0 => format!("{v:.1}"),
        _ => "—".into(),
    }
}

/// The cap's name: `uncapped` or `0.45 core per server process`.
pub fn cap_label(cap: Option<f64>) -> String {
    match cap {
        None => "uncapped".into(),
        Some(c) => format!("{c} core per server process"),
    }
}

pub const CPU_HEADER: &str = "cpu µs/op";

pub const HEADER: [&str; 9] =
    ["system", "op", "clients", "ops/s", "p50 ms", "p99 ms", "errors", CPU_HEADER, "Aspen/etcd"];

/// The column added after `ops/s` when rows were measured in several rounds.
pub const RANGE_HEADER: &str = "ops/s range";

/// Whether any row carries a range over several rounds (the table then has [`RANGE_HEADER`]).
fn has_ranges(rows: &[Row]) -> bool {
    rows.iter().any(|r| matches!(&r.result, Ok(m) if m.range.is_some()))
}

/// The header: [`HEADER`], with [`RANGE_HEADER`] after `ops/s` when `ranges`.
pub fn header(ranges: bool) -> Vec<&'static str> {
    let mut h = HEADER.to_vec();
    if ranges {
        h.insert(4, RANGE_HEADER);
    }
    h
}

/// The cells of one row, in [`header`] order.
pub fn cells(row: &Row, rows: &[Row]) -> Vec<String> {
    let mut cells = base_cells(row, rows).to_vec();
    if has_ranges(rows) {
        let range = match &row.result {
            Ok(Measurement { range: Some((lo, hi)), .. }) => {
                format!("{}–{}", thousands(lo.round() as u64), thousands(hi.round() as u64))
            }
            _ => "—".into(),
        };
        cells.insert(4, range);
    }
    cells
}

fn base_cells(row: &Row, rows: &[Row]) -> [String; 9] {
    let ratio = match (row.baseline, ratio(row, rows)) {
        (true, _) => "—".to_string(),
        (false, Some(r)) => format!("{r:.2}×"),
        (false, None) => "n/a".to_string(),
    };
    match &row.result {
        Ok(m) => [
            row.system.clone(),
            row.op.clone(),
            row.clients.to_string(),
            thousands(m.ops_per_sec.round() as u64),
            ms(m.p50_us),
            ms(m.p99_us),
            thousands(m.errors),
            cpu_us(m.cpu_us_per_op),
            ratio,
        ],
        Err(e) => [
            row.system.clone(),
            row.op.clone(),
            row.clients.to_string(),
            format!("failed: {}", e.replace('|', "/").replace('\n', " ")),
            "—".into(),
            "—".into(),
            "—".into(),
            "—".into(),
            ratio,
        ],
    }
}

/// A markdown table of `rows` in the given order, columns padded to line up in a terminal
/// (text left-aligned, numbers right-aligned).
pub fn format_table(rows: &[Row]) -> String {
    let header = header(has_ranges(rows));
    let body: Vec<Vec<String>> = rows.iter().map(|r| cells(r, rows)).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for line in &body {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let numeric = |col: usize| col >= 2;
    let pad = |col: usize, text: &str| {
        let fill = " ".repeat(widths[col] - text.chars().count());
        if numeric(col) {
            format!("{fill}{text}")
        } else {
            format!("{text}{fill}")
        }
    };
    let mut out = String::new();
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    out += &line(header.iter().enumerate().map(|(c, h)| pad(c, h)).collect());
    out += &line(
        (0..header.len())
            .map(|c| {
                let dashes = "-".repeat(widths[c] - 1);
                if numeric(c) {
                    format!("{dashes}:")
                } else {
                    format!("{dashes}-")
                }
            })
            .collect(),
    );
    for cells in &body {
        out += &line(cells.iter().enumerate().map(|(c, t)| pad(c, t)).collect());
    }
    out
}

/// The caps of `rows` in order of first appearance.
pub fn caps(rows: &[Row]) -> Vec<Option<f64>> {
    let mut caps: Vec<Option<f64>> = Vec::new();
    for r in rows {
        if !caps.contains(&r.cap) {
            caps.push(r.cap);
        }
    }
    caps
}

/// One table per CPU cap (in order of first appearance), each under a `### <cap>` heading; a
/// run with no cap at all is just the one table, as before caps existed.
pub fn format_tables(rows: &[Row]) -> String {
    let caps = caps(rows);
    if caps == [None] {
        return format_table(rows);
    }
    let mut out = String::new();
    for (i, cap) in caps.into_iter().enumerate() {
        let group: Vec<Row> = rows.iter().filter(|r| r.cap == cap).cloned().collect();
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "### {}\n", upper_first(&cap_label(cap)));
        out += &format_table(&group);
    }
    out
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The line after which `benches/RESULTS.md` holds hand-written notes (the performance history)
/// that a new run keeps.
pub const KEEP_MARKER: &str = "<!-- kept by aspen-compare: everything below this line -->";

/// `page` followed by the part of `previous` (the page being replaced) from [`KEEP_MARKER`] on.
pub fn keep_notes(page: String, previous: Option<&str>) -> String {
    match previous.and_then(|p| p.find(KEEP_MARKER).map(|i| &p[i..])) {
        Some(kept) => format!("{page}\n{kept}"),
        None => page,
    }
}

/// Everything `benches/RESULTS.md` says besides the table.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub date: String,
    pub command: String,
    pub machine: String,
    pub load_before: String,
    pub load_after: String,
    pub etcd_version: String,
    pub aspen_version: String,
    pub build: String,
    pub workload: String,
    /// How the servers' CPU time was read (the `cpu µs/op` column).
    pub cpu: String,
    /// How each CPU cap was applied (empty: no cap).
    pub caps: Vec<String>,
    pub quick: bool,
    /// Rounds per row (see [`median_round`]).
    pub rounds: usize,
}

/// The `benches/RESULTS.md` page.
pub fn results_page(ctx: &Context, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Aspen and etcd side by side\n");
    if ctx.quick {
        let _ = writeln!(s, "**Quick smoke run (`--quick`): too short to be a measurement.**\n");
    }
    let _ = writeln!(
        s,
        "Written by `aspen-compare` (`bench/compare/`) on {}. Reproduce from a clean checkout with:\n",
        ctx.date
    );
    let _ = writeln!(s, "```sh\n{}\n```\n", ctx.command);
    let _ = writeln!(s, "- Machine: {}", ctx.machine);
    let _ = writeln!(
        s,
        "- Load average (1/5/15 min) when the run started: {}; when it ended: {} (the machine is shared: \
         other jobs' load is in these numbers)",
        ctx.load_before, ctx.load_after
    );
    let _ = writeln!(s, "- etcd: {}", ctx.etcd_version);
    let _ = writeln!(s, "- Aspen: {}", ctx.aspen_version);
    let _ = writeln!(s, "- Build: {}", ctx.build);
    let _ = writeln!(s, "- Workload: {}", ctx.workload);
    for cap in &ctx.caps {
        let _ = writeln!(s, "- CPU cap: {cap}");
    }
    let _ = writeln!(s, "- Server CPU: {}\n", ctx.cpu);
    s += &format_tables(rows);
    let _ = writeln!(
        s,
        "\nops/s counts successful requests; p50/p99 are their latencies (HDR histogram). \
         Aspen/etcd is the row's throughput divided by etcd's for the same op and clients \
         (above 1: Aspen is faster). `get` is a linearizable read on both systems. {CPU_HEADER} is \
         the CPU time (user + system, all threads) of the row's server processes (every etcd member \
         or every aspen-node, summed) during the measured window, divided by the window's successful \
         requests; the load generator's own CPU is not in it."
    );
    if caps(rows).iter().any(Option::is_some) {
        let _ = writeln!(
            s,
            "\nA capped table's servers each ran in a cgroup of their own with that CPU quota (the load \
             generator ran uncapped); its Aspen/etcd ratios compare rows of the same cap."
        );
    }
    if has_ranges(rows) {
        let _ = writeln!(
            s,
            "\nEvery row was measured in {} rounds: each round started every system afresh, one \
             after another, so the systems' rounds interleave in time and share the machine's \
             background load. A row shows the round with the median throughput (with that round's \
             p50/p99 and errors) and, under `{RANGE_HEADER}`, the lowest and highest throughput of \
             all its rounds.",
            ctx.rounds
        );
    }
    s
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Seconds since the Unix epoch → `YYYY-MM-DD HH:MM UTC`.
pub fn utc_timestamp(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_below_the_marker_survive_a_new_run() {
        let old = format!("# old table\n\n{KEEP_MARKER}\n## History\n- a change: 2x\n");
        let page = keep_notes("# new table\n".to_string(), Some(&old));
        assert!(page.starts_with("# new table\n"));
        assert!(page.ends_with(&format!("{KEEP_MARKER}\n## History\n- a change: 2x\n")));
        assert!(!page.contains("old table"));
        assert_eq!(keep_notes("# new\n".to_string(), Some("# no marker\n")), "# new\n");
        assert_eq!(keep_notes("# new\n".to_string(), None), "# new\n");
    }

    fn row(system: &str, baseline: bool, op: &str, clients: usize, ops: f64) -> Row {
        Row {
            system: system.into(),
            baseline,
            op: op.into(),
            clients,
            cap: None,
            result: Ok(Measurement {
                ops_per_sec: ops,
                p50_us: 1090,
                p99_us: 5300,
                ok: 8050,
                errors: 0,
                cpu_us_per_op: Some(1234.4),
                range: None,
            }),
        }
    }

    #[test]
    fn ratio_is_against_the_baseline_row_of_the_same_op_and_clients() {
        let rows = vec![
            row("etcd", true, "put", 1, 800.0),
            row("etcd", true, "put", 16, 3000.0),
            row("etcd", true, "get", 1, 1250.0),
            row("aspen", false, "put", 1, 200.0),
            row("aspen", false, "put", 16, 4500.0),
            row("aspen", false, "get", 1, 2500.0),
            row("aspen", false, "get", 64, 100.0),
        ];
        assert_eq!(ratio(&rows[0], &rows), None, "baseline rows have no ratio");
        assert_eq!(ratio(&rows[3], &rows), Some(0.25));
        assert_eq!(ratio(&rows[4], &rows), Some(1.5));
        assert_eq!(ratio(&rows[5], &rows), Some(2.0), "get compares with get, not put");
        assert_eq!(ratio(&rows[6], &rows), None, "no etcd row with 64 clients");

        let mut failed = rows.clone();
        failed[0].result = Err("connect refused".into());
        assert_eq!(ratio(&failed[3], &failed), None, "failed baseline");
        failed[1].result = Ok(Measurement {
            ops_per_sec: 0.0,
            p50_us: 0,
            p99_us: 0,
            ok: 0,
            errors: 5,
            cpu_us_per_op: None,
            range: None,
        });
        assert_eq!(ratio(&failed[4], &failed), None, "baseline measured nothing");
    }

    #[test]
    fn numbers_are_formatted_for_reading() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(4707), "4,707");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(ms(1090), "1.09");
        assert_eq!(ms(46_000), "46.00");
        assert_eq!(ms(5), "0.01");
    }

    #[test]
    fn table_has_aligned_columns_ratios_and_failures() {
        let mut rows = vec![row("etcd", true, "put", 1, 805.4), row("aspen (4 shards)", false, "put", 1, 161.08)];
        rows.push(Row {
            system: "aspen".into(),
            baseline: false,
            op: "put".into(),
            clients: 1,
            cap: None,
            result: Err("cannot open client 0: refused | gone\nreally".into()),
        });
        let table = format_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines[0].starts_with("| system           | op  | clients | "), "{}", lines[0]);
        assert!(lines[0].ends_with("  ops/s | p50 ms | p99 ms | errors | cpu µs/op | Aspen/etcd |"), "{}", lines[0]);
        assert!(lines[1].starts_with("| ---------------- | --- | ------: |"), "{}", lines[1]);
        assert!(lines[1].ends_with("| ---------: |"), "{}", lines[1]);
        assert!(lines[2].starts_with("| etcd             | put |       1 |"), "{}", lines[2]);
        assert!(lines[2].contains(" 805 |"), "{}", lines[2]);
        assert!(lines[3].contains(" 161 |"), "{}", lines[3]);
        assert!(lines[2].ends_with("|   1.09 |   5.30 |      0 |     1,234 |          — |"), "{}", lines[2]);
        assert!(lines[3].ends_with("|   1.09 |   5.30 |      0 |     1,234 |      0.20× |"), "{}", lines[3]);
        assert!(
            lines[4].contains("failed: cannot open client 0: refused / gone really |"),
            "no pipe or newline may break the table: {}",
            lines[4]
        );
        assert!(lines[4].ends_with("|      — |      — |      — |         — |        n/a |"), "{}", lines[4]);
        // Every line has the same width and the same number of cells.
        let width = lines[0].chars().count();
        for l in &lines {
            assert_eq!(l.chars().count(), width, "{l}");
            assert_eq!(l.matches('|').count(), 10, "{l}");
        }
    }

    #[test]
    fn results_page_carries_the_context_and_the_table() {
        let rows = vec![row("etcd", true, "put", 1, 800.0), row("aspen", false, "put", 1, 400.0)];
        let ctx = Context {
            date: "2026-11-26 14:00 UTC".into(),
            command: "scripts/compare-etcd.sh".into(),
            machine: "2 cores".into(),
            quick: true,
            ..Default::default()
        };
        let page = results_page(&ctx, &rows);
        assert!(page.starts_with("# Aspen and etcd side by side\n"));
        assert!(page.contains("Quick smoke run"));
        assert!(page.contains("```sh\nscripts/compare-etcd.sh\n```"));
        assert!(page.contains("on 2026-11-26 14:00 UTC"));
        assert!(page.contains("- Machine: 2 cores"));
        assert!(page.contains(&format_table(&rows)));
        assert!(page.contains("0.50×"));
    }

    #[test]
    fn rounds_fold_into_the_median_with_their_range() {
        let m = |ops: f64, p50_us: u64| Measurement {
            ops_per_sec: ops,
            p50_us,
            p99_us: 9,
            ok: 1,
            errors: 0,
            cpu_us_per_op: Some(p50_us as f64),
            range: None,
        };
        let one = median_round(vec![Ok(m(500.0, 1))]).unwrap();
        assert_eq!(one, m(500.0, 1), "one round: as measured, no range");
        let three = median_round(vec![Ok(m(900.0, 1)), Ok(m(300.0, 2)), Ok(m(600.0, 3))]).unwrap();
        assert_eq!((three.ops_per_sec, three.p50_us, three.range), (600.0, 3, Some((300.0, 900.0))));
        assert_eq!(three.cpu_us_per_op, Some(3.0), "the median round's own CPU per request");
        let four = median_round(vec![Ok(m(4.0, 4)), Ok(m(1.0, 1)), Ok(m(3.0, 3)), Ok(m(2.0, 2))]).unwrap();
        assert_eq!((four.ops_per_sec, four.range), (2.0, Some((1.0, 4.0))), "even: the lower middle");
        let failed = median_round(vec![Ok(m(900.0, 1)), Err("refused".into()), Ok(m(600.0, 3))]);
        assert_eq!(failed, Err("round 2: refused".into()), "a failed round fails the row");
        assert!(median_round(vec![]).is_err());

        let mut rows = vec![row("etcd", true, "put", 64, 2500.0), row("aspen", false, "put", 64, 3750.0)];
        let plain = format_table(&rows);
        assert!(!plain.contains(RANGE_HEADER), "{plain}");
        if let Ok(r) = &mut rows[1].result {
            r.range = Some((3100.4, 4012.0));
        }
        let table = format_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("| ops/s | ops/s range | p50 ms |"), "{}", lines[0]);
        assert!(lines[2].contains("| 2,500 |           — |"), "{}", lines[2]);
        assert!(lines[3].contains("| 3,750 | 3,100–4,012 |"), "{}", lines[3]);
        assert!(lines[3].ends_with("|      1.50× |"), "{}", lines[3]);
        let ctx = Context { rounds: 3, ..Default::default() };
        assert!(results_page(&ctx, &rows).contains("measured in 3 rounds"));
        assert!(!results_page(&ctx, &rows[..1]).contains("rounds"));
    }

    #[test]
    fn cpu_per_request_is_a_column_and_each_cap_its_own_table() {
        assert_eq!(cpu_us(Some(1234.4)), "1,234");
        assert_eq!(cpu_us(Some(99.96)), "100");
        assert_eq!(cpu_us(Some(57.25)), "57.2");
        assert_eq!(cpu_us(Some(0.0)), "0.0");
        assert_eq!(cpu_us(None), "—");
        assert_eq!(cpu_us(Some(f64::NAN)), "—");
        assert_eq!(cap_label(None), "uncapped");
        assert_eq!(cap_label(Some(0.45)), "0.45 core per server process");

        let capped = |mut r: Row, ops: f64| {
            r.cap = Some(0.45);
            if let Ok(m) = &mut r.result {
                m.ops_per_sec = ops;
                m.cpu_us_per_op = Some(610.0);
            }
            r
        };
        let rows = vec![
            row("etcd", true, "put", 16, 2000.0),
            row("aspen", false, "put", 16, 3000.0),
            capped(row("etcd", true, "put", 16, 0.0), 1000.0),
            capped(row("aspen", false, "put", 16, 0.0), 500.0),
        ];
        assert_eq!(ratio(&rows[1], &rows), Some(1.5));
        assert_eq!(ratio(&rows[3], &rows), Some(0.5), "compared with etcd under the same cap");
        assert_eq!(caps(&rows), vec![None, Some(0.45)]);
        let tables = format_tables(&rows);
        let uncapped = tables.find("### Uncapped\n\n").expect(&tables);
        let capped_at = tables.find("### 0.45 core per server process\n\n").expect(&tables);
        assert!(uncapped < capped_at, "{tables}");
        assert!(tables[capped_at..].contains("|       610 |      0.50× |"), "{tables}");
        assert!(tables[..capped_at].contains("|     1,234 |      1.50× |"), "{tables}");
        assert_eq!(format_tables(&rows[..2]), format_table(&rows[..2]), "no cap: one plain table");

        let ctx = Context { caps: vec!["0.45 core per server process: cgroup".into()], ..Default::default() };
        let page = results_page(&ctx, &rows);
        assert!(page.contains("- CPU cap: 0.45 core per server process: cgroup\n"), "{page}");
        assert!(page.contains(&tables));
        assert!(page.contains("cpu µs/op is the CPU time"), "{page}");
        assert!(page.contains("same cap"), "{page}");
        assert!(!results_page(&Context::default(), &rows[..2]).contains("same cap"));
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(utc_timestamp(0), "1970-01-01 00:00 UTC");
        // 2026-11-26 13:54:34 UTC
        assert_eq!(utc_timestamp(1_795_701_274), "2026-11-26 13:54 UTC");
    }
}
