//! What the etcd API (`crate::etcd`) needs of a node beyond its requests: the members with the
//! URLs they serve the etcd API on, and this node's status as etcd shows it.

use std::{sync::atomic::Ordering, time::Duration};

use super::service::NodeService;
use crate::{
    api::{ClientRequest, ClientResponse},
    etcd::{EtcdMember, EtcdNode, EtcdStatus},
    raft::node::RaftNode,
    transport::request::send_request,
};

impl EtcdNode for NodeService {
    fn node_id(&self) -> u64 {
        self.node_id
    }

    fn etcd_cluster_id(&self) -> u64 {
        let id = self.cluster_id();
        u64::from_be_bytes(id.0[..8].try_into().unwrap_or_default())
    }

    fn num_shards(&self) -> u32 {
        self.store.num_shards()
    }

    async fn etcd_members(&self) -> Vec<EtcdMember> {
        let shard0 = self.store.shards().get(&0).map(RaftNode::status);
        let learners = shard0.map(|s| s.learners).unwrap_or_default();
        let timeout = self.limits.request_timeout().min(Duration::from_secs(2));
        let asks = self.store.known_nodes().into_iter().map(|(node_id, member)| {
            let learner = learners.contains(&node_id);
            async move {
                let peer_urls = member.addrs.iter().map(|a| format!("quic://{a}")).collect();
                let endpoint = if node_id == self.node_id {
                    self.etcd_endpoint()
                } else {
                    match member.endpoint_addr() {
                        Some(addr) => {
                            match send_request(self.store.pool(), &addr, 1, ClientRequest::EtcdEndpoint, timeout).await
                            {
                                Ok(Ok(ClientResponse::EtcdEndpoint(url))) => url,
                                _ => None,
                            }
                        }
                        None => None,
                    }
                };
                EtcdMember {
                    id: node_id,
                    name: format!("node-{node_id}"),
                    peer_urls,
                    client_urls: endpoint.into_iter().collect(),
                    is_learner: learner,
                }
            }
        });
        futures::future::join_all(asks).await
    }

    fn raft_term(&self) -> u64 {
        self.store.shards().get(&0).map_or(0, RaftNode::term)
    }

    fn serving(&self) -> bool {
        self.readiness().ready()
    }

    fn metrics_text(&self) -> String {
        super::scrape::render(self)
    }

    async fn watch_asked(
        &self,
        request: crate::api::WatchRequest,
        asked: tokio::sync::watch::Receiver<u64>,
    ) -> Result<tokio::sync::mpsc::Receiver<crate::api::ClientResult>, crate::api::ApiError> {
        let asks = super::watch::WatchAsks { position: Some(asked), ..Default::default() };
        self.start_watch_asked(request, asks).await
    }

    fn data_dir(&self) -> std::path::PathBuf {
        self.data_dir.clone()
    }

    fn state_digests(&self) -> Vec<(crate::api::ShardId, crate::api::StateDigest)> {
        self.store.shards().iter().filter_map(|(shard, node)| Some((*shard, node.digest()?))).collect()
    }

    fn etcd_status(&self) -> EtcdStatus {
        let Some(s) = self.store.shards().get(&0).map(RaftNode::status) else { return EtcdStatus::default() };
        EtcdStatus {
            leader: s.leader.unwrap_or(0),
            raft_index: s.last_log_index,
            raft_term: s.term,
            raft_applied_index: s.last_applied,
            db_size: self.data_file_bytes.load(Ordering::Relaxed),
            quota_bytes: self.limits.quota_bytes,
            is_learner: s.learners.contains(&self.node_id),
            alarms: self.alarms.list().into_iter().map(|a| (a.node_id, a.alarm)).collect(),
        }
    }
}
