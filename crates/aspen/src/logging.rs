//! What a node logs when nobody asked for more: [`DEFAULT_LOG_FILTER`], the `tracing` filter
//! `aspen-node` uses when `RUST_LOG` is not set (docs/operations.md, "What the logs say").
//!
//! Owns: that filter string and the reasons behind each directive. Never: install a subscriber
//! (the binaries do), or depend on any other module of the crate.
//!
//! The rule: at the default level every line means something changed that an operator may act
//! on. openraft reports every failed RPC of every shard, heartbeats included — with four shards
//! and one of three nodes down that was ~100 lines a second. Those reports are dropped here, and
//! the node's Raft network says instead, once per peer and not per shard, that a peer stopped
//! answering, reminds every 30 s while it stays so, and says when it answers again
//! (`transport::reachability`). Real failures still show: a shard whose Raft stopped on a
//! storage error (the supervisor's `shard stopped`, and openraft's own errors at every call into
//! it), broken invariants, panics.

/// The default `tracing` filter of `aspen-node` (`RUST_LOG` replaces it as a whole). Directive
/// by directive:
///
/// - `info`: Aspen's own lines (start-up, joins, peers unreachable and back, shard health,
///   shutdown).
/// - `iroh=warn,noq=warn`: the QUIC stack is chatty at info.
/// - `iroh::protocol=error`: drops a warning per incoming connection that failed before it was
///   served (`Ignoring connection: invalid handshake`, `Accepting incoming connection ended with
///   error`), which a peer that stops or gives up a dial at that moment causes. A panicking
///   handler is an error and stays.
/// - `iroh_gossip=error`: gossip only finds addresses; its warnings are about its own
///   connections to peers (`dial failed`, `failed to send: connection task send loop
///   terminated`), which come and go with the peers.
/// - `openraft=warn`: openraft's warnings and errors not named below, among them
///   `openraft::raft::raft_inner`'s errors at every call into a shard whose Raft stopped.
/// - `openraft::replication=off`: the per-RPC reports of every replication stream:
///   `error replication to target=…` (warn), `RPCError` (error), `backoff mode: drain events…`
///   (warn), failed snapshot sends (warn). A storage error met while replicating stops the
///   shard, reported below.
/// - `openraft::engine::handler::replication_handler=error`: drops the per-heartbeat
///   `update progress error` and `heartbeat error: …, no update to inflight data` (warn); its
///   one error (`update_matching`, a broken invariant) stays.
/// - `openraft::core::raft_core=off`: warnings about stale messages, expected while members
///   join or leaders change (`membership_log_id changed … ignore when (UpdateReplicationMatched)`,
///   `A message will be ignored because vote changed`), and an error for every vote and
///   leadership check (linearizable read) that a peer did not answer (`while requesting vote`,
///   `timeout`, `timeout while confirming leadership for read request`): several a second per
///   shard while a quorum is lost. Its one report worth an operator's time, `quit RaftCore::main
///   on error` (a storage error stopped the shard), the supervisor makes instead: `shard stopped`
///   (error).
pub const DEFAULT_LOG_FILTER: &str = "info,iroh=warn,iroh::protocol=error,iroh_gossip=error,noq=warn,openraft=warn,\
                                      openraft::replication=off,\
                                      openraft::engine::handler::replication_handler=error,\
                                      openraft::core::raft_core=off";

#[cfg(test)]
mod tests {
    use super::*;

    /// Every directive parses (an `EnvFilter` built from a bad string would be refused, and a
    /// binary falling back to something else would hide that), and none has stray spaces.
    #[test]
    fn the_default_filter_parses_directive_by_directive() {
        assert!(!DEFAULT_LOG_FILTER.contains(char::is_whitespace), "{DEFAULT_LOG_FILTER:?}");
        for directive in DEFAULT_LOG_FILTER.split(',') {
            directive
                .parse::<tracing_subscriber::filter::Directive>()
                .unwrap_or_else(|e| panic!("directive {directive:?}: {e}"));
        }
        tracing_subscriber::EnvFilter::try_new(DEFAULT_LOG_FILTER).expect("the default filter parses");
    }

    /// The filter lets through what an operator must see and drops the per-RPC noise: checked
    /// by running events of those targets through a subscriber with the filter.
    #[test]
    fn the_default_filter_drops_openraft_noise_and_keeps_errors() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::{layer::SubscriberExt, Layer};

        #[derive(Clone, Default)]
        struct Seen(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> Layer<S> for Seen {
            fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
                let m = event.metadata();
                self.0.lock().unwrap().push(format!("{} {}", m.level(), m.target()));
            }
        }
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(seen.clone().with_filter(tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "openraft::replication", "error replication to target=3");
            tracing::error!(target: "openraft::replication", "RPCError");
            tracing::warn!(target: "openraft::engine::handler::replication_handler", "heartbeat error");
            tracing::error!(target: "openraft::engine::handler::replication_handler", "update_matching");
            tracing::warn!(target: "openraft::core::raft_core", "membership_log_id changed");
            tracing::error!(target: "openraft::core::raft_core", "while requesting vote");
            tracing::error!(target: "openraft::raft::raft_inner", "core_call fatal error");
            tracing::error!(target: "openraft::core::sm::worker", "kept");
            tracing::warn!(target: "openraft::core::tick", "kept");
            tracing::info!(target: "openraft::core::raft_core", "dropped");
            tracing::info!(target: "iroh::endpoint", "dropped");
            tracing::warn!(target: "iroh_gossip::net", "dial failed");
            tracing::error!(target: "iroh_gossip::net", "kept");
            tracing::warn!(target: "iroh::protocol", "Ignoring connection: invalid handshake");
            tracing::error!(target: "iroh::protocol", "Task panicked");
            tracing::warn!(target: "iroh::endpoint", "kept");
            tracing::info!(target: "aspen::transport::reachability", "peer reachable again");
            tracing::debug!(target: "aspen::transport::mux", "dropped");
        });
        let seen = seen.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "ERROR openraft::engine::handler::replication_handler",
                "ERROR openraft::raft::raft_inner",
                "ERROR openraft::core::sm::worker",
                "WARN openraft::core::tick",
                "ERROR iroh_gossip::net",
                "ERROR iroh::protocol",
                "WARN iroh::endpoint",
                "INFO aspen::transport::reachability",
            ]
        );
    }
}
