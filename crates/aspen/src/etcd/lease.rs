//! etcd's Lease service: Grant, Revoke, KeepAlive (a stream), TimeToLive and Leases, on the
//! node's leases (docs/design.md §16, §18). Ids are etcd's: signed 64-bit, positive.

use std::sync::Arc;

use futures::{stream::BoxStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{
    gateway::{errors, status_of, unknown_outcome, Caller, EtcdNode, Gateway},
    proto::etcdserverpb::{
        lease_server::Lease, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
        LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
        LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
    },
};
use crate::api::{
    lease::{check_lease_id, random_lease_id, MAX_LEASE_TTL_SECS},
    ApiError, ClientRequest, ClientResponse, WriteCommand, WriteOutcome,
};

/// etcd's Lease service over a node.
#[derive(Debug)]
pub struct LeaseService<N: EtcdNode>(pub Arc<Gateway<N>>);

/// A lease id from etcd's signed field.
fn lease_id(id: i64) -> Result<u64, Status> {
    let id = u64::try_from(id).map_err(|_| Status::not_found(errors::LEASE_NOT_FOUND))?;
    check_lease_id(id).map_err(|_| Status::not_found(errors::LEASE_NOT_FOUND))?;
    Ok(id)
}

impl<N: EtcdNode> Gateway<N> {
    /// Grants lease `id` (its home shard's write): (revision, id, TTL); `None`: the id is taken.
    pub async fn grant(&self, caller: &Caller, id: u64, ttl: u64) -> Result<Option<(u64, u64, u64)>, Status> {
        let home = self.router().shard_for_lease(id);
        match self.write_command(caller, home, false, WriteCommand::LeaseGrant { id, ttl_secs: ttl }).await? {
            WriteOutcome::LeaseGranted { revision, id, ttl_secs } => Ok(Some((revision, id, ttl_secs))),
            WriteOutcome::LeaseExists { .. } => Ok(None),
            other => Err(unknown_outcome(other)),
        }
    }

    /// Grants a lease of a random id (a random 63-bit id is taken with negligible odds; three
    /// tries): (revision, id, TTL).
    pub async fn grant_random(&self, caller: &Caller, ttl: u64) -> Result<(u64, u64, u64), Status> {
        for _ in 0..3 {
            if let Some(g) = self.grant(caller, random_lease_id(), ttl).await? {
                return Ok(g);
            }
        }
        Err(Status::internal("three random lease ids in a row were taken"))
    }

    /// A lease of `ttl` seconds for the caller (a random id); its id.
    pub async fn grant_lease(&self, caller: &Caller, ttl: u64) -> Result<u64, Status> {
        caller.needs("lease grant", |s| s.write, "write")?;
        Ok(self.grant_random(caller, ttl).await?.1)
    }
}

impl<N: EtcdNode> LeaseService<N> {
    /// Serves one stream of keep-alives for `caller` (a gRPC stream, or the JSON gateway's),
    /// whose `write` permission is checked already.
    pub(crate) fn keep_alive(
        &self,
        caller: Caller,
        incoming: impl futures::Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send + 'static,
    ) -> KeepAliveStream {
        let gateway = self.0.clone();
        let caller = Arc::new(caller);
        // One answer per request, in order (as etcd's server does per stream), each with the
        // token checked again (one revoked or expired meanwhile ends the stream).
        let answers = incoming.then(move |item| {
            let gateway = gateway.clone();
            let caller = caller.clone();
            async move {
                let r = item?;
                gateway.recheck(&caller)?;
                let Ok(id) = lease_id(r.id) else {
                    return Ok(LeaseKeepAliveResponse { header: gateway.header(0), id: r.id, ttl: 0 });
                };
                let ttl = match gateway.node.handle(ClientRequest::LeaseKeepAlive { id }, 0).await {
                    Ok(ClientResponse::LeaseKeepAlive { ttl_secs, .. }) => ttl_secs as i64,
                    // etcd answers a lease that is gone with TTL 0 (clients then stop).
                    Err(ApiError::LeaseNotFound { .. }) => 0,
                    Err(e) => return Err(status_of(e)),
                    Ok(other) => return Err(Status::internal(format!("a keep-alive was answered with {other:?}"))),
                };
                Ok(LeaseKeepAliveResponse { header: gateway.header(0), id: r.id, ttl })
            }
        });
        answers.take_until(self.0.stop.clone().cancelled_owned()).boxed()
    }
}

type KeepAliveStream = BoxStream<'static, Result<LeaseKeepAliveResponse, Status>>;

#[tonic::async_trait]
impl<N: EtcdNode> Lease for LeaseService<N> {
    async fn lease_grant(&self, request: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("lease grant", |s| s.write, "write")?;
        let r = request.into_inner();
        if r.ttl > MAX_LEASE_TTL_SECS as i64 {
            return Err(Status::out_of_range(errors::TTL_TOO_LARGE));
        }
        // etcd raises a TTL below its minimum to it; Aspen's minimum is one second.
        let ttl = r.ttl.max(1) as u64;
        let granted = if r.id != 0 {
            let id = u64::try_from(r.id).map_err(|_| Status::invalid_argument("a lease id must be positive"))?;
            match self.0.grant(&caller, id, ttl).await? {
                Some(g) => g,
                None => return Err(Status::failed_precondition(errors::LEASE_EXISTS)),
            }
        } else {
            self.0.grant_random(&caller, ttl).await?
        };
        let (revision, id, ttl) = granted;
        Ok(Response::new(LeaseGrantResponse {
            header: self.0.header(revision),
            id: id as i64,
            ttl: ttl as i64,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("lease revoke", |s| s.write, "write")?;
        let id = lease_id(request.into_inner().id)?;
        let home = self.0.router().shard_for_lease(id);
        // Sent as a plain write: the node coordinates the revocation over every shard.
        match self.0.write_command(&caller, home, true, WriteCommand::LeaseRevoke { id }).await? {
            WriteOutcome::LeaseRevoked { revision, .. } => {
                Ok(Response::new(LeaseRevokeResponse { header: self.0.header(revision) }))
            }
            WriteOutcome::LeaseNotFound { .. } => Err(Status::not_found(errors::LEASE_NOT_FOUND)),
            other => Err(unknown_outcome(other)),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("lease keep-alive", |s| s.write, "write")?;
        Ok(Response::new(self.keep_alive(caller, request.into_inner())))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("lease time-to-live", |s| s.read, "read")?;
        let r = request.into_inner();
        let gone =
            LeaseTimeToLiveResponse { header: self.0.header(0), id: r.id, ttl: -1, granted_ttl: 0, keys: vec![] };
        let Ok(id) = lease_id(r.id) else { return Ok(Response::new(gone)) };
        match self.0.node.handle(ClientRequest::LeaseTimeToLive { id, keys: r.keys }, 0).await {
            Ok(ClientResponse::LeaseStatus(s)) => Ok(Response::new(LeaseTimeToLiveResponse {
                header: self.0.header(0),
                id: r.id,
                ttl: s.ttl_secs as i64,
                granted_ttl: s.granted_ttl_secs as i64,
                keys: s.keys,
            })),
            // etcd: a lease that is gone has TTL -1.
            Err(ApiError::LeaseNotFound { .. }) => Ok(Response::new(gone)),
            Err(e) => Err(status_of(e)),
            Ok(other) => Err(Status::internal(format!("lease time-to-live was answered with {other:?}"))),
        }
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("lease list", |s| s.read, "read")?;
        match self.0.ask(ClientRequest::LeaseList).await? {
            ClientResponse::Leases(leases) => Ok(Response::new(LeaseLeasesResponse {
                header: self.0.header(0),
                leases: leases.into_iter().map(|l| LeaseStatus { id: l.id as i64 }).collect(),
            })),
            other => Err(Status::internal(format!("lease list was answered with {other:?}"))),
        }
    }
}
