//! gRPC's health checking service (`grpc.health.v1.Health`), as etcd serves it on its client
//! port for load balancers, probes (`grpc_health_probe`) and clients that check health
//! (docs/etcd.md): the server as a whole (service `""`) is SERVING while every shard this node
//! hosts is ready — a member with a leader it heard from lately, as `GET /ready` — and
//! NOT_SERVING otherwise. No token is needed, as with etcd. Any other service name: NOT_FOUND
//! (Check) or SERVICE_UNKNOWN (Watch), as gRPC's own health server answers.

use std::{sync::Arc, time::Duration};

use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::{
    gateway::{EtcdNode, Gateway},
    proto::health::{
        health_check_response::ServingStatus, health_server::Health, HealthCheckRequest, HealthCheckResponse,
    },
};

/// How often a health Watch looks at the node's readiness.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// gRPC's Health service over a node.
#[derive(Debug)]
pub struct HealthService<N: EtcdNode>(pub Arc<Gateway<N>>);

/// The status of `service` on `node`; `None`: a service this server does not know.
fn status_of<N: EtcdNode>(node: &N, service: &str) -> Option<ServingStatus> {
    if !service.is_empty() {
        return None;
    }
    Some(if node.serving() { ServingStatus::Serving } else { ServingStatus::NotServing })
}

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: status as i32 }
}

type WatchStream = BoxStream<'static, Result<HealthCheckResponse, Status>>;

#[tonic::async_trait]
impl<N: EtcdNode> Health for HealthService<N> {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match status_of(&*self.0.node, &service) {
            Some(status) => Ok(Response::new(answer(status))),
            None => Err(Status::not_found("unknown service")),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let gw = self.0.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut sent = None;
            let mut every = tokio::time::interval(WATCH_EVERY);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = tx.closed() => return,
                    _ = gw.stop.cancelled() => return,
                }
                let status = status_of(&*gw.node, &service).unwrap_or(ServingStatus::ServiceUnknown);
                if sent != Some(status) {
                    sent = Some(status);
                    if tx.send(Ok(answer(status))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(super::gateway::stream_of(rx)))
    }
}
