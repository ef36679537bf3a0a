//! `aspen-node`: parse the configuration, bootstrap the node, serve until SIGINT/SIGTERM, then
//! shut down gracefully.

use std::process::ExitCode;

use aspen::{
    cluster::{bootstrap_node, bootstrap_sharded_node},
    config::{NodeArgs, NodeConfig},
};
use clap::Parser;

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,iroh=warn,noq=warn,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: never into files or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
    // Caught from the start: the ticket file appears during bootstrap, and a SIGTERM sent as soon
    // as it does must still shut the node down gracefully, not kill it half-started.
    let signals = Signals::new();
    let started =
        if config.sharding.enabled { bootstrap_sharded_node(config).await } else { bootstrap_node(config).await };
    let node = match started {
        Ok(n) => n,
        Err(e) => {
            eprintln!("aspen-node: {e}");
            // 2: restarting unchanged cannot help (the systemd unit does not restart on 2).
            return ExitCode::from(if e.is_permanent() { 2 } else { 1 });
        }
    };
    println!("ticket: {}", node.ticket());
    let signal = signals.wait().await;
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

    async fn wait(self) -> &'static str {
        #[cfg(unix)]
        {
            async fn next(s: Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(mut s) => {
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
                _ = next(self.int) => "SIGINT",
                _ = next(self.term) => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
