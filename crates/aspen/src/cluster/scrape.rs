//! `GET /metrics`: collects a node's metrics into Prometheus text (docs/operations.md,
//! "Metrics"; the table of every family is there).
//!
//! Owns: which families a scrape reports and where each comes from — the shards (`RaftNode`'s
//! recorded [`crate::metrics::ShardMetrics`] and one read of Raft's own metrics per shard), the
//! node service's [`crate::metrics::NodeMetrics`], gossip's peer book, and `/proc/self`.
//! Never: keys, values or tokens (labels are shard ids, request kinds, outcomes and reasons).

use super::service::NodeService;
use crate::{
    metrics::{process_stats, Exposition},
    raft::node::ShardSample,
};

const ROLES: &[&str] = &["leader", "follower", "candidate", "learner", "shutdown"];

/// The node's metrics as Prometheus text exposition (format 0.0.4).
pub fn render(service: &NodeService) -> String {
    let mut out = Exposition::default();
    out.family("aspen_build_info", "gauge", "Always 1; labels: the Aspen version and this node's id.");
    out.sample(
        "aspen_build_info",
        &[("version", env!("CARGO_PKG_VERSION")), ("node_id", &service.node_id.to_string())],
        1.0,
    );
    let shards: Vec<ShardSample> = service.store.shards().values().map(|n| n.sample()).collect();
    shard_families(&mut out, &shards);
    service.metrics.render(&mut out);
    out.family("aspen_alarms", "gauge", "Raised alarms in the cluster, by kind (as this node's shard 0 shows them).");
    let nospace = service.alarms.list().iter().filter(|a| a.alarm == super::alarm::NOSPACE).count();
    out.sample("aspen_alarms", &[("alarm", "nospace")], nospace as f64);
    out.family(
        "aspen_data_file_bytes",
        "gauge",
        "Sizes of the shards' state-machine files on this node (they do not shrink when data is deleted).",
    );
    out.sample("aspen_data_file_bytes", &[], service.data_file_bytes.load(std::sync::atomic::Ordering::Relaxed) as f64);
    out.family(
        "aspen_stored_bytes",
        "gauge",
        "Data this node stores (keys, values, sessions, leases), last measured against the quota (measured only \
         while the files are larger than the quota; 0 before).",
    );
    out.sample("aspen_stored_bytes", &[], service.stored_bytes.load(std::sync::atomic::Ordering::Relaxed) as f64);
    out.family("aspen_quota_bytes", "gauge", "The storage quota ([limits] quota_bytes).");
    out.sample("aspen_quota_bytes", &[], service.limits.quota_bytes as f64);
    if let Ok(free) = crate::storage::space::free_bytes(&service.data_dir) {
        out.family("aspen_disk_free_bytes", "gauge", "Free bytes on the file system of the data dir.");
        out.sample("aspen_disk_free_bytes", &[], free as f64);
    }
    out.family("aspen_gossip_peers", "gauge", "Peers whose addresses this node learned over gossip.");
    out.sample("aspen_gossip_peers", &[], service.peers.announced_count() as f64);
    let (rss, fds, max_fds) = process_stats();
    if let Some(rss) = rss {
        out.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
        out.sample("process_resident_memory_bytes", &[], rss as f64);
    }
    if let Some(fds) = fds {
        out.family("process_open_fds", "gauge", "Number of open file descriptors.");
        out.sample("process_open_fds", &[], fds as f64);
    }
    if let Some(max) = max_fds {
        out.family("process_max_fds", "gauge", "Maximum number of open file descriptors.");
        out.sample("process_max_fds", &[], max as f64);
    }
    out.finish()
}

/// Writes a per-shard gauge family from `value`.
fn gauge(out: &mut Exposition, shards: &[ShardSample], name: &str, help: &str, value: impl Fn(&ShardSample) -> f64) {
    out.family(name, "gauge", help);
    for s in shards {
        out.sample(name, &[("shard", &s.shard.to_string())], value(s));
    }
}

/// Writes a per-shard counter family from `value`.
fn counter(out: &mut Exposition, shards: &[ShardSample], name: &str, help: &str, value: impl Fn(&ShardSample) -> u64) {
    out.family(name, "counter", help);
    for s in shards {
        out.sample(name, &[("shard", &s.shard.to_string())], value(s) as f64);
    }
}

fn shard_families(out: &mut Exposition, shards: &[ShardSample]) {
    out.family("aspen_shard_role", "gauge", "1 for this node's Raft role in the shard, 0 for the others.");
    for s in shards {
        let shard = s.shard.to_string();
        for role in ROLES {
            out.sample("aspen_shard_role", &[("shard", &shard), ("role", role)], f64::from(u8::from(s.role == *role)));
        }
    }
    gauge(out, shards, "aspen_shard_term", "The shard's current Raft term on this node.", |s| s.term as f64);
    gauge(
        out,
        shards,
        "aspen_shard_leader_id",
        "Node id of the shard's leader as this node knows it (0: none).",
        |s| s.leader.unwrap_or(0) as f64,
    );
    gauge(out, shards, "aspen_shard_voters", "Voters in the shard's membership.", |s| s.voters as f64);
    gauge(out, shards, "aspen_shard_last_log_index", "Index of the last entry in this replica's log.", |s| {
        s.last_log as f64
    });
    gauge(
        out,
        shards,
        "aspen_shard_committed_index",
        "Highest index this replica knows committed (the leader: held by a majority of voters).",
        |s| s.committed as f64,
    );
    gauge(out, shards, "aspen_shard_applied_index", "Highest index applied to this replica's state machine.", |s| {
        s.applied as f64
    });
    gauge(out, shards, "aspen_shard_snapshot_index", "Index the replica's last snapshot covers.", |s| {
        s.snapshot as f64
    });
    gauge(out, shards, "aspen_shard_log_entries_since_snapshot", "Log entries after the last snapshot.", |s| {
        s.last_log.saturating_sub(s.snapshot) as f64
    });
    gauge(out, shards, "aspen_shard_log_bytes", "Encoded bytes of the log entries this replica holds.", |s| {
        s.log_bytes as f64
    });
    counter(out, shards, "aspen_snapshots_built_total", "Snapshots this replica built.", |s| {
        s.metrics.snapshots_built.get()
    });
    counter(out, shards, "aspen_snapshots_installed_total", "Snapshots this replica installed from its leader.", |s| {
        s.metrics.snapshots_installed.get()
    });
    counter(out, shards, "aspen_snapshot_sent_bytes_total", "Bytes of snapshot streams this replica wrote.", |s| {
        s.metrics.snapshot_bytes_sent.get()
    });
    counter(out, shards, "aspen_defrags_total", "Defragmentations of this replica's state machine file.", |s| {
        s.metrics.defrags.get()
    });
    counter(
        out,
        shards,
        "aspen_defrag_reclaimed_bytes_total",
        "Bytes by which defragmentations shrank this replica's state machine file.",
        |s| s.metrics.defrag_reclaimed_bytes.get(),
    );
    counter(out, shards, "aspen_raft_proposals_total", "Log entries the write batcher proposed (as leader).", |s| {
        s.metrics.proposals.get()
    });
    out.family("aspen_raft_writes_per_entry", "histogram", "Client writes batched into each proposed entry.");
    for s in shards {
        out.histogram("aspen_raft_writes_per_entry", &[("shard", &s.shard.to_string())], &s.metrics.writes_per_entry);
    }
    out.family("aspen_apply_duration_seconds", "histogram", "Time to apply each run of committed entries.");
    for s in shards {
        out.histogram("aspen_apply_duration_seconds", &[("shard", &s.shard.to_string())], &s.metrics.apply);
    }
    counter(
        out,
        shards,
        "aspen_read_index_rounds_total",
        "Leadership confirmation (ReadIndex) rounds for linearizable reads.",
        |s| s.metrics.read_index_rounds.get(),
    );
    gauge(out, shards, "aspen_leases", "Live leases whose home is the shard.", |s| s.leases as f64);
    gauge(out, shards, "aspen_watchers", "Watches following the shard on this node.", |s| s.watchers as f64);
    out.family(
        "aspen_watch_lag_batches",
        "histogram",
        "Entries still queued behind each frame a watch sent (how far it trails the shard).",
    );
    for s in shards {
        out.histogram("aspen_watch_lag_batches", &[("shard", &s.shard.to_string())], &s.metrics.watch_lag);
    }
}
