//! The client-facing service of a node: validates every request against the configured limits,
//! then answers it from the shard that owns the key.
//!
//! Owns: request validation, `cluster init` (making a fresh node a one-node cluster) and
//! `cluster status`. Reads and writes go to [`RaftNode`]; nothing here touches storage directly.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use crate::{
    api::{
        ApiError, BatchOp, ClientRequest, ClientResponse, ClientResult, ClusterId, ClusterStatus, NodeId, NodeTicket,
        ScanRequest, WriteCommand,
    },
    cluster::{
        endpoint::write_file_atomic,
        metadata::{ClusterIdentity, MetadataStore},
    },
    config::{LimitsConfig, NodeConfig},
    protocol::ClientService,
    raft::{network::SharedClusterId, MemberNode, RaftNode},
};

/// Serves client requests for one node.
#[derive(Debug)]
pub struct NodeService {
    node_id: NodeId,
    cluster_name: String,
    data_dir: PathBuf,
    limits: LimitsConfig,
    shard0: RaftNode,
    metadata: Arc<MetadataStore>,
    cluster_id: SharedClusterId,
    /// This node as a Raft member (endpoint id + addresses).
    me: MemberNode,
    ticket: RwLock<NodeTicket>,
    init_lock: tokio::sync::Mutex<()>,
}

impl NodeService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &NodeConfig,
        shard0: RaftNode,
        metadata: Arc<MetadataStore>,
        cluster_id: SharedClusterId,
        me: MemberNode,
        ticket: NodeTicket,
    ) -> Self {
        NodeService {
            node_id: config.node_id,
            cluster_name: config.cluster_name.clone(),
            data_dir: config.data_dir.clone(),
            limits: config.limits.clone(),
            shard0,
            metadata,
            cluster_id,
            me,
            ticket: RwLock::new(ticket),
            init_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn ticket(&self) -> NodeTicket {
        self.ticket.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Writes the current ticket to `<data-dir>/node.ticket`.
    pub fn write_ticket_file(&self) -> std::io::Result<()> {
        let ticket = self.ticket().encode();
        write_file_atomic(&self.data_dir.join("node.ticket"), format!("{ticket}\n").as_bytes())
    }

    /// Makes this node a one-node cluster, unless it already belongs to one.
    /// Returns whether this call initialized it.
    pub async fn init_cluster(&self) -> Result<bool, ApiError> {
        let _guard = self.init_lock.lock().await;
        let internal = |e: crate::raft::StorageError| ApiError::Internal(format!("metadata: {e}"));
        if self.metadata.identity().map_err(internal)?.is_some() {
            return Ok(false);
        }
        let raft = self.shard0.raft();
        if raft
            .is_initialized()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
        {
            // Identity is recorded after Raft is initialized; a crash in between leaves a one-node
            // group of our own, which we adopt. Anything else belongs to someone else's cluster.
            let voters: Vec<u64> = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            if voters != [self.shard0.raft_id()] {
                return Err(ApiError::InvalidRequest(
                    "this node's Raft state belongs to a cluster already".into(),
                ));
            }
        }
        let cluster_id = ClusterId::random();
        let members = BTreeMap::from([(self.shard0.raft_id(), self.me.clone())]);
        self.shard0.initialize(members).await?;
        self.metadata
            .set_identity(&ClusterIdentity {
                cluster_id,
                cluster_name: self.cluster_name.clone(),
                node_id: self.node_id,
                num_shards: 1,
            })
            .map_err(internal)?;
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = cluster_id;
        self.ticket.write().unwrap_or_else(|p| p.into_inner()).cluster_id = cluster_id;
        if let Err(e) = self.write_ticket_file() {
            tracing::warn!("could not rewrite node.ticket: {e}");
        }
        tracing::info!(%cluster_id, "initialized a new cluster");
        Ok(true)
    }

    fn check_key(&self, key: &[u8]) -> Result<(), ApiError> {
        if key.is_empty() {
            return Err(ApiError::InvalidRequest("key must not be empty".into()));
        }
        if key.len() as u64 > self.limits.max_key_bytes {
            return Err(ApiError::TooLarge {
                what: "key".into(),
                size: key.len() as u64,
                limit: self.limits.max_key_bytes,
            });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), ApiError> {
        if value.len() as u64 > self.limits.max_value_bytes {
            return Err(ApiError::TooLarge {
                what: "value".into(),
                size: value.len() as u64,
                limit: self.limits.max_value_bytes,
            });
        }
        Ok(())
    }

    /// Checks a write against the limits before it reaches the log.
    pub fn validate_write(&self, command: &WriteCommand) -> Result<(), ApiError> {
        match command {
            WriteCommand::Put { key, value } => {
                self.check_key(key)?;
                self.check_value(value)
            }
            WriteCommand::Delete { key } => self.check_key(key),
            WriteCommand::Cas {
                key,
                expected,
                new_value,
            } => {
                self.check_key(key)?;
                if let Some(e) = expected {
                    self.check_value(e)?;
                }
                self.check_value(new_value)
            }
            WriteCommand::Batch { ops } => {
                if ops.is_empty() {
                    return Err(ApiError::InvalidRequest(
                        "batch must hold at least one operation".into(),
                    ));
                }
                if ops.len() as u64 > self.limits.max_batch_ops {
                    return Err(ApiError::TooLarge {
                        what: "batch".into(),
                        size: ops.len() as u64,
                        limit: self.limits.max_batch_ops,
                    });
                }
                let mut total = 0u64;
                for op in ops {
                    self.check_key(op.key())?;
                    if let BatchOp::Put { value, .. } = op {
                        self.check_value(value)?;
                        total += value.len() as u64;
                    }
                }
                let cap = self.limits.max_value_bytes * 4;
                if total > cap {
                    return Err(ApiError::TooLarge {
                        what: "batch values".into(),
                        size: total,
                        limit: cap,
                    });
                }
                Ok(())
            }
        }
    }

    fn validate_scan(&self, req: &ScanRequest) -> Result<(), ApiError> {
        if req.limit == 0 {
            return Err(ApiError::InvalidRequest("scan limit must be at least 1".into()));
        }
        for k in [
            Some(&req.prefix),
            req.start.as_ref(),
            req.end.as_ref(),
            req.continuation.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if k.len() as u64 > self.limits.max_key_bytes {
                return Err(ApiError::TooLarge {
                    what: "scan bound".into(),
                    size: k.len() as u64,
                    limit: self.limits.max_key_bytes,
                });
            }
        }
        Ok(())
    }

    fn status(&self) -> Result<ClusterStatus, ApiError> {
        let identity = self
            .metadata
            .identity()
            .map_err(|e| ApiError::Internal(format!("metadata: {e}")))?;
        let (cluster_id, cluster_name) = match identity {
            Some(i) => (i.cluster_id, i.cluster_name),
            None => (ClusterId::default(), self.cluster_name.clone()),
        };
        Ok(ClusterStatus {
            node_id: self.node_id,
            cluster_id,
            cluster_name,
            shards: vec![self.shard0.status()],
            members: vec![self.ticket().encode()],
        })
    }
}

impl ClientService for NodeService {
    async fn handle(&self, request: ClientRequest) -> ClientResult {
        match request {
            ClientRequest::Get { key, consistency } => {
                self.check_key(&key)?;
                self.shard0.get(&key, consistency).await.map(ClientResponse::Get)
            }
            ClientRequest::Write { session, command } => {
                self.validate_write(&command)?;
                self.shard0.write(session, command).await.map(ClientResponse::Write)
            }
            ClientRequest::Scan(req) => {
                self.validate_scan(&req)?;
                self.shard0
                    .scan(&req, self.limits.max_scan_page as usize)
                    .await
                    .map(ClientResponse::Scan)
            }
            ClientRequest::ClusterStatus => self.status().map(ClientResponse::ClusterStatus),
            ClientRequest::ClusterInit => self
                .init_cluster()
                .await
                .map(|initialized| ClientResponse::ClusterInit { initialized }),
        }
    }
}
