//! The operator HTTP endpoint (docs/operations.md, "Probes and status"): plain HTTP/1.1 on TCP,
//! by default at 127.0.0.1:<the node's bind port> (`--http-addr`, `off` disables it).
//!
//! Owns: `GET /health` (200 while the process serves), `GET /ready` (200 when every local shard
//! is ready — a member with a known, recently heard leader, having applied what was committed a
//! second ago, [`RaftNode::readiness`] — else 503 naming each shard that is not and why) and
//! `GET /status` (this node's status as JSON: what `aspen-cli cluster status --json` reports for
//! it) and `GET /metrics` (Prometheus text, [`super::scrape`]). Other answers are JSON.
//!
//! Never: keys, values, tokens or writes. It is for operators and probes and asks for no token,
//! so keep it on loopback or a management network (the default binds loopback only).

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::service::NodeService;
use crate::api::{NodeId, ShardId};

/// The endpoint, serving until its shutdown token is cancelled.
#[derive(Debug)]
pub struct HttpEndpoint {
    task: tokio::task::JoinHandle<()>,
}

impl HttpEndpoint {
    /// Binds `addr` (before the node serves anything, so a bad address stops the start).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
        TcpListener::bind(addr).await
    }

    /// Serves on `listener` until `stop` is cancelled.
    pub fn serve(listener: TcpListener, service: Arc<NodeService>, stop: CancellationToken) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/status", get(status))
            .route("/metrics", get(metrics))
            .fallback(not_found)
            .with_state(service);
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
            if let Err(e) = served {
                tracing::warn!("http endpoint on {addr}: {e}");
            }
        });
        tracing::info!(%addr, "http endpoint: /health /ready /status /metrics");
        Ok(HttpEndpoint { task })
    }

    /// Stops serving (open connections are dropped).
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    node_id: NodeId,
}

async fn health(State(service): State<Arc<NodeService>>) -> Json<Health> {
    Json(Health { status: "serving", node_id: service.node_id })
}

/// One local shard's readiness.
#[derive(Serialize)]
struct ShardReadiness {
    shard: ShardId,
    ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    node_id: NodeId,
    /// Why the node as a whole is not ready (not initialized yet), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    shards: Vec<ShardReadiness>,
    /// Raised alarms (a NOSPACE alarm does not make the node unready: reads and deletes work).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    alarms: Vec<crate::api::AlarmInfo>,
}

async fn ready(State(service): State<Arc<NodeService>>) -> impl IntoResponse {
    let found = service.readiness();
    let ready = found.ready();
    let node_reason = found.node;
    let shards: Vec<ShardReadiness> = found
        .shards
        .into_iter()
        .map(|(shard, reason)| ShardReadiness { shard, ready: reason.is_none(), reason })
        .collect();
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let alarms = service.alarms.list();
    (code, Json(Readiness { ready, node_id: service.node_id, reason: node_reason, shards, alarms }))
}

async fn status(State(service): State<Arc<NodeService>>) -> impl IntoResponse {
    Json(service.node_status())
}

async fn metrics(State(service): State<Arc<NodeService>>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], super::scrape::render(&service))
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, Json(serde_json::json!({ "error": "not found: GET /health, /ready, /status or /metrics" })))
}
