//! `aspen-node`: parse the configuration, bootstrap the node, serve until SIGINT/SIGTERM, then
//! shut down gracefully.

use std::{process::ExitCode, sync::Arc};

use aspen::{
    cluster::{bootstrap_until, BootstrapError},
    config::{LogFormat, NodeArgs, NodeCommand, NodeConfig},
};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc: glibc malloc was ~10 % of a node's cycles under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its place in the `mi_option_t` enum, the same in mimalloc
/// v2 and v3; checked by a test against the option's defaults: 1,000 ms in v3, which the
/// `mimalloc` crate builds, 10 ms in v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Gives memory that mimalloc freed back to the system at once rather than after a second (ten
/// for its arenas): under a write load a node's peak RSS was ~100 MB lower with 4 shards
/// (benches/RESULTS.md, Session 17) and its CPU per op no higher. `MIMALLOC_PURGE_DELAY` in the
/// environment still wins.
fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator; no memory is touched.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
    }
}

/// Transparent huge pages off for the node's process (`PR_SET_THP_DISABLE`): mimalloc asks for
/// them on its arenas (`MADV_HUGEPAGE`), and a huge page is faulted in, zeroed and resident as a
/// whole 2 MiB however little of it is used; with freed memory given back at once (above), a node
/// under writes kept faulting in fresh ones. Without them a node's peak RSS was ~100 MB lower
/// with 4 shards at 4 GB of data, at no higher CPU per put (benches/RESULTS.md, Session 25).
/// `MIMALLOC_ALLOW_THP` in the environment still wins (mimalloc itself reads it: 0 turns them
/// off, 1 leaves them on). Returns whether they are off.
fn no_transparent_huge_pages() -> bool {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return false;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with integer arguments only; sets a flag of this process's memory map.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

fn main() -> ExitCode {
    return_freed_memory_at_once();
    let huge_pages_off = no_transparent_huge_pages();
    let args = NodeArgs::parse();
    let config = match NodeConfig::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aspen-node: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(NodeCommand::Restore { file }) = &args.command {
        return restore(file, &config);
    }
    // RUST_LOG replaces the default filter as a whole; unset or empty, the default applies.
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&s).unwrap_or_else(|e| {
            eprintln!("aspen-node: ignoring RUST_LOG={s:?} ({e}); using the default filter");
            tracing_subscriber::EnvFilter::new(aspen::logging::DEFAULT_LOG_FILTER)
        }),
        _ => tracing_subscriber::EnvFilter::new(aspen::logging::DEFAULT_LOG_FILTER),
    };
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log_format {
        // Colour only for a person at a terminal: never into files or journald.
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    tracing::debug!(transparent_huge_pages_off = huge_pages_off, "allocator set up");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aspen-node: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(config))
}

/// `aspen-node restore FILE --data-dir DIR`: exit 0 once DIR holds the backup as a new
/// one-node cluster, 2 when refused.
fn restore(file: &std::path::Path, config: &NodeConfig) -> ExitCode {
    match aspen::cluster::backup::restore(file, config) {
        Ok(report) => {
            println!(
                "restored {} into {}: a new cluster {} ({}), node {}, {} shard(s)",
                file.display(),
                config.data_dir.display(),
                report.cluster_id,
                config.cluster_name,
                config.node_id,
                report.header.num_shards
            );
            for s in &report.header.shards {
                println!("shard {}: index {}, data digest {} (matches the backup)", s.shard, s.index, s.data_digest);
            }
            println!("serve it with: aspen-node --data-dir {}", config.data_dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aspen-node: restore: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(config: NodeConfig) -> ExitCode {
    let node_id = config.node_id;
    // Caught from the start, in every state (opening, joining, serving): the first SIGTERM or
    // SIGINT stops the node gracefully and it exits 0; a second one ends the process at once.
    let mut signals = Signals::new();
    let stop = CancellationToken::new();
    let received = Arc::new(std::sync::OnceLock::new());
    {
        let (stop, received) = (stop.clone(), received.clone());
        tokio::spawn(async move {
            let first = signals.next().await;
            let _ = received.set(first);
            stop.cancel();
            let second = signals.next().await;
            eprintln!("aspen-node: {second} again: exiting without a graceful shutdown");
            std::process::exit(1);
        });
    }
    let node = match bootstrap_until(config, stop.clone()).await {
        Ok(n) => n,
        Err(BootstrapError::Interrupted) => {
            let signal = received.get().copied().unwrap_or("signal");
            tracing::info!("{signal} before the node served: stopped");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("aspen-node: {e}");
            // 2: restarting unchanged cannot help (the systemd unit does not restart on 2).
            return ExitCode::from(if e.is_permanent() { 2 } else { 1 });
        }
    };
    println!("ticket: {}", node.ticket());
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let removed = node.removed();
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = removed.cancelled() => {
            tracing::error!(
                "node {} was removed from the cluster: stopping (to add this machine again, start it with an \
                 empty --data-dir and --join)",
                node_id
            );
            notify_systemd(&[sd_notify::NotifyState::Stopping]);
            node.shutdown().await;
            // 2: restarting unchanged cannot help (the systemd unit does not restart on 2).
            return ExitCode::from(2);
        }
    }
    let signal = received.get().copied().unwrap_or("signal");
    tracing::info!("{signal}: shutting down");
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    node.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// SIGTERM and SIGINT, registered when made (a signal that arrives before `wait` is kept).
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Signals { term: signal(SignalKind::terminate()).ok(), int: signal(SignalKind::interrupt()).ok() }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            if self.term.is_none() && self.int.is_none() {
                let _ = tokio::signal::ctrl_c().await;
                return "SIGINT";
            }
            tokio::select! {
                _ = one(&mut self.int) => "SIGINT",
                _ = one(&mut self.term) => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// Tells systemd (a `Type=notify` unit, config/aspen-node.service) that the node serves or
/// stops; nothing without `$NOTIFY_SOCKET`. A failure is logged: the node serves regardless.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, state) {
            tracing::warn!("systemd notification failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads and sets one integer option of the allocator.
        unsafe {
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                let default = libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY);
                assert!(default == 1000 || default == 10, "mimalloc's default purge delay (v3, v2): {default}");
            }
            return_freed_memory_at_once();
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 0);
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn transparent_huge_pages_are_off_unless_the_environment_says() {
        let off = no_transparent_huge_pages();
        // SAFETY: prctl with integer arguments only; reads a flag of this process's memory map.
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            assert!(off, "PR_SET_THP_DISABLE failed");
            assert_eq!(flag, 1, "the process still allows transparent huge pages");
        } else {
            assert!(!off);
        }
    }
}
