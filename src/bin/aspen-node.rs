//! `aspen-node`: parse the configuration, bootstrap the node, serve until SIGINT/SIGTERM, then
//! shut down gracefully.

use std::process::ExitCode;

use aspen::{
    cluster::{bootstrap_node, BootstrapError},
    config::{NodeArgs, NodeConfig},
};
use clap::Parser;

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
    let node = match bootstrap_node(config).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("aspen-node: {e}");
            let usage = matches!(e, BootstrapError::NodeIdMismatch { .. } | BootstrapError::ClusterNameMismatch { .. });
            return ExitCode::from(if usage { 2 } else { 1 });
        }
    };
    println!("ticket: {}", node.ticket());
    let signal = wait_for_signal().await;
    tracing::info!("{signal}: shutting down");
    node.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return "SIGINT";
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
