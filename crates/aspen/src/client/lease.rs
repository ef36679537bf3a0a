//! Leases from the client's side (docs/design.md §16): grant, attach keys, renew, revoke, look
//! up, list, and [`LeaseKeepAlive`], which renews a lease in the background (failing over to
//! other members like every request) until it is dropped or the lease is gone.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{unexpected, AspenClient, ClientError};
use crate::api::{
    lease::random_lease_id, ApiError, ClientRequest, ClientResponse, LeaseEntry, LeaseStatus, Revision, WriteCommand,
    WriteOutcome,
};

/// What a [`LeaseKeepAlive`] last saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepAliveState {
    /// Not renewed yet.
    Starting,
    /// Renewed: the lease has `ttl_secs` from that renewal.
    Alive { ttl_secs: u64 },
    /// The last renewal failed for a reason that may pass (no leader, unreachable); it retries.
    Retrying(String),
    /// The lease does not exist any more (expired or revoked): the keep-alive stopped.
    Lost,
}

/// Renews a lease in the background every third of its TTL (as etcd's clients do) until dropped
/// or the lease is gone. Each renewal is one request, failed over to other members like any.
#[derive(Debug)]
pub struct LeaseKeepAlive {
    id: u64,
    state: watch::Receiver<KeepAliveState>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeepAlive {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The state now.
    pub fn state(&self) -> KeepAliveState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every change of state.
    pub fn watch(&self) -> watch::Receiver<KeepAliveState> {
        self.state.clone()
    }
}

impl Drop for LeaseKeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AspenClient {
    /// Grants a lease of `ttl_secs` with a fresh random id; returns its id and TTL.
    pub async fn grant_lease(&self, ttl_secs: u64) -> Result<(u64, u64), ClientError> {
        // A random 63-bit id is taken (or revoked within the hour) with negligible odds; try
        // another if it is.
        for _ in 0..3 {
            match self.grant_lease_with_id(random_lease_id(), ttl_secs).await? {
                Some(granted) => return Ok(granted),
                None => continue,
            }
        }
        Err(ClientError::Protocol("three random lease ids in a row were taken".into()))
    }

    /// Grants lease `id` (1..=2^63−1) of `ttl_secs`; `None` if that id is taken.
    pub async fn grant_lease_with_id(&self, id: u64, ttl_secs: u64) -> Result<Option<(u64, u64)>, ClientError> {
        match self.write(WriteCommand::LeaseGrant { id, ttl_secs }).await? {
            WriteOutcome::LeaseGranted { id, ttl_secs, .. } => Ok(Some((id, ttl_secs))),
            WriteOutcome::LeaseExists { .. } => Ok(None),
            other => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Sets `key` to `value`, attached to lease `lease` (the key goes when the lease does).
    /// [`ApiError::LeaseNotFound`] if the lease does not exist.
    pub async fn put_with_lease(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: u64,
    ) -> Result<Revision, ClientError> {
        let command = WriteCommand::PutLease { key: key.into(), value: value.into(), lease, checked: false };
        match self.write(command).await? {
            WriteOutcome::Put { revision } => Ok(revision),
            WriteOutcome::LeaseNotFound { id } => Err(ApiError::LeaseNotFound { id }.into()),
            other => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Grants a lease of `ttl_secs` and sets `key` to `value` attached to it; returns the lease id.
    pub async fn put_with_ttl(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        ttl_secs: u64,
    ) -> Result<u64, ClientError> {
        let (id, _) = self.grant_lease(ttl_secs).await?;
        self.put_with_lease(key, value, id).await?;
        Ok(id)
    }

    /// Revokes lease `id`: once this returns, none of its keys is readable anywhere. Returns how
    /// many keys went; [`ApiError::LeaseNotFound`] if there is no such lease.
    pub async fn revoke_lease(&self, id: u64) -> Result<u64, ClientError> {
        match self.write(WriteCommand::LeaseRevoke { id }).await? {
            WriteOutcome::LeaseRevoked { deleted, .. } => Ok(deleted),
            WriteOutcome::LeaseNotFound { id } => Err(ApiError::LeaseNotFound { id }.into()),
            other => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Renews lease `id` once; returns its TTL (the time it now has).
    pub async fn keep_alive_once(&self, id: u64) -> Result<u64, ClientError> {
        match self.request(ClientRequest::LeaseKeepAlive { id }).await? {
            ClientResponse::LeaseKeepAlive { ttl_secs, .. } => Ok(ttl_secs),
            other => Err(unexpected(other)),
        }
    }

    /// Lease `id`: seconds left, granted TTL and, with `keys`, its keys in every shard.
    pub async fn lease_ttl(&self, id: u64, keys: bool) -> Result<LeaseStatus, ClientError> {
        match self.request(ClientRequest::LeaseTimeToLive { id, keys }).await? {
            ClientResponse::LeaseStatus(status) => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    /// Every live lease of the cluster, by id.
    pub async fn leases(&self) -> Result<Vec<LeaseEntry>, ClientError> {
        match self.request(ClientRequest::LeaseList).await? {
            ClientResponse::Leases(leases) => Ok(leases),
            other => Err(unexpected(other)),
        }
    }

    /// Keeps lease `id` alive in the background (see [`LeaseKeepAlive`]); `ttl_secs` is its TTL
    /// (renewals go every third of it).
    pub fn keep_alive(self: &Arc<Self>, id: u64, ttl_secs: u64) -> LeaseKeepAlive {
        let (tx, state) = watch::channel(KeepAliveState::Starting);
        let client = self.clone();
        let task = tokio::spawn(async move {
            let mut every = Duration::from_millis(ttl_secs.max(1) * 1000 / 3);
            loop {
                match client.keep_alive_once(id).await {
                    Ok(ttl) => {
                        every = Duration::from_millis(ttl.max(1) * 1000 / 3);
                        tx.send_replace(KeepAliveState::Alive { ttl_secs: ttl });
                    }
                    Err(ClientError::Api(ApiError::LeaseNotFound { .. })) => {
                        tx.send_replace(KeepAliveState::Lost);
                        return;
                    }
                    Err(e) => {
                        tx.send_replace(KeepAliveState::Retrying(e.to_string()));
                        // Try again soon: the lease keeps its time only while renewals arrive.
                        tokio::time::sleep(Duration::from_millis(200).min(every)).await;
                        continue;
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
        LeaseKeepAlive { id, state, task }
    }
}
