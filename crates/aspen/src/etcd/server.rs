//! The etcd API's gRPC endpoint: a tonic server on a TCP listener, with rustls TLS when a
//! certificate and key are given (tokens travel in the clear otherwise), and etcd's plain HTTP
//! endpoints beside it (`etcd::http`).

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    service::Routes,
    transport::{server::TcpIncoming, Identity, Server, ServerTlsConfig},
};

use super::{
    admin::{AuthService, ClusterService, MaintenanceService},
    election::ElectionService,
    gateway::{EtcdNode, Gateway},
    health::HealthService,
    kv::KvService,
    lease::LeaseService,
    lock::LockService,
    proto::etcdserverpb::{
        auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
        maintenance_server::MaintenanceServer, watch_server::WatchServer,
    },
    proto::{
        health::health_server::HealthServer, v3electionpb::election_server::ElectionServer,
        v3lockpb::lock_server::LockServer,
    },
    watch::WatchService,
};
use crate::auth::Authority;

/// A PEM certificate chain and private key for the endpoint's TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EtcdServeError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A serving etcd endpoint.
#[derive(Debug)]
pub struct EtcdEndpoint {
    /// `http://ADDR` or `https://ADDR` (logged).
    pub url: String,
    /// `ADDR:PORT`: what the member list shows as the member's client URL. Without a scheme:
    /// etcdctl 3.4 dials a member's URL as it is, and an `:authority` of `http://…` is not
    /// valid HTTP/2 (the server resets the stream); clients choose TLS by their own flags.
    pub advertised: String,
    task: tokio::task::JoinHandle<()>,
}

impl EtcdEndpoint {
    /// Binds `addr` (before the node serves anything, so a bad address stops the start).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
        TcpListener::bind(addr).await
    }

    /// Serves etcd's services for `node` on `listener` until `stop` is cancelled. Requests up to
    /// `max_request_bytes` are read.
    pub fn serve<N: EtcdNode>(
        listener: TcpListener,
        tls: Option<&EtcdTls>,
        node: Arc<N>,
        authority: Arc<Authority>,
        max_request_bytes: usize,
        stop: CancellationToken,
    ) -> Result<Self, EtcdServeError> {
        let addr = listener.local_addr()?;
        let mut builder = Server::builder();
        if let Some(tls) = tls {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| EtcdServeError::Read { path: path.clone(), source })
            };
            let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(identity))
                .map_err(|e| EtcdServeError::Tls(e.to_string()))?;
        }
        // Snapshots staged by a node that stopped while streaming them.
        if let Ok(entries) = std::fs::read_dir(node.data_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".") && name.contains(".etcd-snapshot-") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let gw = Arc::new(Gateway::new(node, authority, stop.clone()));
        // etcd's HTTP endpoints (/health, /version, /metrics, the JSON gateway's /v3/…) beside the
        // gRPC services: HTTP/1.1
        // is accepted too (gRPC is HTTP/2 either way).
        let routes = Routes::from(super::http::routes(gw.clone(), max_request_bytes))
            .add_service(KvServer::new(KvService(gw.clone())).max_decoding_message_size(max_request_bytes))
            .add_service(WatchServer::new(WatchService(gw.clone())).max_decoding_message_size(max_request_bytes))
            .add_service(LeaseServer::new(LeaseService(gw.clone())))
            .add_service(LockServer::new(LockService(gw.clone())))
            .add_service(ElectionServer::new(ElectionService(gw.clone())))
            .add_service(HealthServer::new(HealthService(gw.clone())))
            .add_service(ClusterServer::new(ClusterService(gw.clone())))
            .add_service(MaintenanceServer::new(MaintenanceService(gw.clone())))
            .add_service(AuthServer::new(AuthService(gw)));
        let router = builder.accept_http1(true).add_routes(routes);
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let task = tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await {
                tracing::warn!("etcd endpoint on {addr}: {e}");
            }
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(EtcdEndpoint { url: format!("{scheme}://{addr}"), advertised: addr.to_string(), task })
    }

    /// Stops the endpoint (its `stop` token must be cancelled already, which ends its streams):
    /// waits a moment for calls in flight, then drops the rest.
    pub async fn stop(mut self) {
        if tokio::time::timeout(std::time::Duration::from_secs(2), &mut self.task).await.is_err() {
            self.task.abort();
            let _ = self.task.await;
        }
    }
}
