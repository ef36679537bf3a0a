//! `aspen-node`: parse the configuration, bootstrap the node, serve until SIGINT/SIGTERM, then
//! shut down gracefully.

use std::{process::ExitCode, sync::Arc};

use aspen::{
    cluster::{bootstrap_until, BootstrapError},
    config::{LogFormat, NodeArgs, NodeConfig},
};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc: glibc malloc was ~10 % of a node's cycles under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = NodeArgs::parse();
    let config = match NodeConfig::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aspen-node: {e}");
            return ExitCode::from(2);
        }
    };
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aspen-node: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(config))
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
    let removed = node.removed();
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = removed.cancelled() => {
            tracing::error!(
                "node {} was removed from the cluster: stopping (to add this machine again, start it with an \
                 empty --data-dir and --join)",
                node_id
            );
            node.shutdown().await;
            // 2: restarting unchanged cannot help (the systemd unit does not restart on 2).
            return ExitCode::from(2);
        }
    }
    let signal = received.get().copied().unwrap_or("signal");
    tracing::info!("{signal}: shutting down");
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
