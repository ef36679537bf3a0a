//! The etcd API's gRPC endpoint: a tonic server on a TCP listener, with rustls TLS when a
//! certificate and key are given (tokens travel in the clear otherwise), and etcd's plain HTTP
//! endpoints and JSON gateway beside it (`etcd::http`, `etcd::json`).
//!
//! TLS is this module's own acceptor rather than tonic's, which offers only `h2` by ALPN and so
//! refuses clients that offer only `http/1.1` (curl `--http1.1`, Python's HTTP clients, probes):
//! it offers both, and the server tells the protocols apart by the connection's first bytes (as
//! on a plain connection). Handshakes run in their own tasks, bounded in time, so a slow or
//! silent client holds up no one else.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{rustls, server::TlsStream, TlsAcceptor};
use tokio_util::sync::CancellationToken;
use tonic::{service::Routes, transport::server::TcpIncoming};

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
    /// `max_request_bytes` are read; with `acceptor` ([`acceptor`]), over TLS.
    pub fn serve<N: EtcdNode>(
        listener: TcpListener,
        acceptor: Option<TlsAcceptor>,
        node: Arc<N>,
        authority: Arc<Authority>,
        max_request_bytes: usize,
        stop: CancellationToken,
    ) -> Result<Self, EtcdServeError> {
        let addr = listener.local_addr()?;
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
        // gRPC services: HTTP/1.1 is accepted too (gRPC is HTTP/2 either way).
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
        let router = tonic::transport::Server::builder().accept_http1(true).add_routes(routes);
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let task = match acceptor {
            None => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                tokio::spawn(async move {
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await {
                        tracing::warn!("etcd endpoint on {addr}: {e}");
                    }
                })
            }
            Some(acceptor) => {
                let incoming = tls_incoming(listener, acceptor, stop.clone());
                tokio::spawn(async move {
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await {
                        tracing::warn!("etcd endpoint on {addr}: {e}");
                    }
                })
            }
        };
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

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; more connections wait in the listen backlog (so clients that
/// open connections and send nothing cannot grow the node's memory without bound).
const MAX_HANDSHAKES: usize = 256;

/// The TLS acceptor for `tls`'s certificate chain and key (PEM): TLS 1.2 and 1.3, no client
/// certificates, ALPN `h2` then `http/1.1`. Built before the node opens anything, so that a bad
/// file stops the start cleanly.
pub fn acceptor(tls: &EtcdTls) -> Result<TlsAcceptor, EtcdServeError> {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let read =
        |path: &PathBuf| std::fs::read(path).map_err(|source| EtcdServeError::Read { path: path.clone(), source });
    let chain = CertificateDer::pem_slice_iter(&read(&tls.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EtcdServeError::Tls(format!("{}: not a PEM certificate chain: {e}", tls.cert.display())))?;
    if chain.is_empty() {
        return Err(EtcdServeError::Tls(format!("{}: no certificate in it", tls.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&tls.key)?)
        .map_err(|e| EtcdServeError::Tls(format!("{}: no usable PEM private key in it: {e}", tls.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| EtcdServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| EtcdServeError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The TLS connections of `listener`, each handshake in a task of its own (at most
/// [`HANDSHAKE_TIMEOUT`], [`MAX_HANDSHAKES`] at once); failed handshakes are logged at debug
/// level and dropped. Ends when `stop` is cancelled.
fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    stop: CancellationToken,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsStream<TcpStream>>>(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = async {
                    let slot = slots.clone().acquire_owned().await;
                    (listener.accept().await, slot)
                } => a,
                _ = tx.closed() => return,
                _ = stop.cancelled() => return,
            };
            let (accepted, Ok(slot)) = accepted else { return };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!("etcd endpoint: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("etcd endpoint: TLS handshake with {peer}: {e}"),
                    Err(_) => tracing::debug!("etcd endpoint: TLS handshake with {peer} timed out"),
                }
            });
        }
    });
    super::gateway::stream_of(rx)
}
