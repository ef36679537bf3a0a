//! etcd's plain HTTP endpoints on the etcd API's port, as etcd serves them on its client URLs
//! for load balancers, probes and scrapers (docs/etcd.md, "HTTP endpoints"): `GET /health`,
//! `GET /version`, `GET /metrics`, no token (as etcd), and the JSON gateway's `POST /v3/…`
//! (`etcd::json`). Served beside the gRPC services on the same listener: HTTP/1.1 or HTTP/2, in
//! the clear or over TLS (whose ALPN offers both: `etcd::server`).
//!
//! `/health` is etcd 3.5's check: healthy (200 `{"health":"true","reason":""}`) unless an alarm
//! is raised (`?exclude=NOSPACE` ignores that one), a shard this node hosts has no leader it
//! heard from lately (`EtcdNode::serving`, what gRPC health and `GET /ready` check), or — unless
//! `?serializable=true` — a linearizable read of shard 0 through this node fails within the
//! request timeout; then 503 with `"health":"false"` and etcd's reason text.

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Json, Router,
};

use super::{
    admin::ETCD_API_VERSION,
    gateway::{EtcdNode, Gateway},
};

/// The HTTP routes, over `gw`.
/// With etcd's JSON gateway (`POST /v3/…`, `etcd::json`) for messages up to `max_request_bytes`.
pub fn routes<N: EtcdNode>(gw: Arc<Gateway<N>>, max_request_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(health::<N>))
        .route("/version", get(version))
        .route("/metrics", get(metrics::<N>))
        .with_state(gw.clone())
        .merge(super::json::routes(gw, max_request_bytes))
        .fallback(elsewhere)
}

/// Anything else: a gRPC call of a service this server does not have gets gRPC's UNIMPLEMENTED
/// (as tonic answers), an HTTP request 404.
async fn elsewhere(request: axum::extract::Request) -> axum::response::Response {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        let unknown = format!("unknown service or method {}", request.uri().path());
        return tonic::Status::unimplemented(unknown).into_http();
    }
    (StatusCode::NOT_FOUND, Json(serde_json::json!({ "error": "not found: GET /health, /version, /metrics, or POST /v3/… (the JSON gateway)" })))
        .into_response()
}

/// The checks before the read: a raised alarm (its name) not excluded (each `exclude` value may
/// list several, comma-separated), then a node that is not serving.
fn verdict(alarms: &[String], exclude: &[&str], serving: bool) -> Option<String> {
    let excluded: Vec<&str> = exclude.iter().flat_map(|e| e.split(',')).map(str::trim).collect();
    if let Some(alarm) = alarms.iter().find(|a| !excluded.contains(&a.as_str())) {
        return Some(format!("ALARM {alarm}"));
    }
    (!serving).then(|| "RAFT NO LEADER".into())
}

/// Why this node is not healthy, in etcd's words; `None`: healthy.
async fn unhealthy<N: EtcdNode>(gw: &Gateway<N>, params: &[(String, String)]) -> Option<String> {
    fn values<'a>(params: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> {
        params.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    let alarms: Vec<String> = gw.node.etcd_status().alarms.into_iter().map(|(_, alarm)| alarm).collect();
    let exclude: Vec<&str> = values(params, "exclude").collect();
    if let Some(reason) = verdict(&alarms, &exclude, gw.node.serving()) {
        return Some(reason);
    }
    if !values(params, "serializable").any(|v| v == "true") {
        if let Err(e) = gw.revision_of(0).await {
            return Some(format!("QGET ERROR:{}", e.message()));
        }
    }
    None
}

async fn health<N: EtcdNode>(
    State(gw): State<Arc<Gateway<N>>>,
    Query(params): Query<Vec<(String, String)>>,
) -> impl IntoResponse {
    match unhealthy(&gw, &params).await {
        None => (StatusCode::OK, Json(serde_json::json!({ "health": "true", "reason": "" }))),
        Some(reason) => {
            tracing::debug!("etcd /health: {reason}");
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "health": "false", "reason": reason })))
        }
    }
}

/// etcd's `/version` body, its keys in etcd's order.
#[derive(serde::Serialize)]
struct Versions {
    etcdserver: &'static str,
    etcdcluster: &'static str,
}

async fn version() -> impl IntoResponse {
    Json(Versions { etcdserver: ETCD_API_VERSION, etcdcluster: ETCD_API_VERSION })
}

async fn metrics<N: EtcdNode>(State(gw): State<Arc<Gateway<N>>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], gw.node.metrics_text())
}

#[cfg(test)]
mod tests {
    use super::verdict;

    #[test]
    fn an_alarm_makes_a_node_unhealthy_unless_excluded() {
        let nospace = vec!["NOSPACE".to_string()];
        assert_eq!(verdict(&[], &[], true), None);
        assert_eq!(verdict(&nospace, &[], true).as_deref(), Some("ALARM NOSPACE"));
        assert_eq!(verdict(&nospace, &["NOSPACE"], true), None);
        assert_eq!(verdict(&nospace, &["CORRUPT, NOSPACE"], true), None);
        assert_eq!(verdict(&nospace, &["CORRUPT", "NOSPACE"], true), None);
        assert_eq!(verdict(&nospace, &["NOSPACE"], false).as_deref(), Some("RAFT NO LEADER"));
        assert_eq!(verdict(&[], &[], false).as_deref(), Some("RAFT NO LEADER"));
    }
}
