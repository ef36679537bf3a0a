//! Leases across shards, as one node coordinates them (docs/design.md §16): revocations fanned
//! out to every shard, puts whose lease lives in another shard, `lease ttl` and `lease list`
//! gathered from every shard, and the expiry task that revokes the leases whose home shard
//! this node leads once their deadline passed.
//!
//! Owns: the order of a revocation's steps — the home shard first (the lease is marked
//! revoking: no renewal, no new key), then every other shard (its keys go, a tombstone stays),
//! then the home shard forgets the record. A revocation interrupted half-way (the node died)
//! is completed by the home shard's leader, which keeps every revoking lease in its list.
//!
//! Never: decide that a lease expired anywhere but on the leader of its home shard, in the term
//! whose deadlines said so (a leader proposes its expiries itself, never forwarded).

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::service::NodeService;
use crate::{
    api::{
        ApiError, ClientRequest, ClientResponse, ClientResult, Id128, LeaseEntry, ShardId, WriteCommand, WriteOutcome,
        WriteSession,
    },
    raft::RaftNode,
};

/// The session of a node's own lease steps: none (they are idempotent; nothing is recorded).
pub const SESSIONLESS: WriteSession = WriteSession { client_id: Id128([0; 16]), seq: 0 };

/// How often the expiry task looks at the deadlines (a lease expires at most this late).
const EXPIRY_TICK: Duration = Duration::from_millis(250);
/// How often a revocation that could not complete is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Most lease revocations one node runs at once.
const MAX_CONCURRENT_REVOCATIONS: usize = 64;

impl NodeService {
    fn lease_home(&self, id: u64) -> ShardId {
        self.store.router().shard_for_lease(id)
    }

    /// A write routed to `shard`, as a node step (forwarded to its leader as needed).
    async fn shard_write(
        &self,
        shard: ShardId,
        session: WriteSession,
        command: WriteCommand,
    ) -> Result<WriteOutcome, ApiError> {
        match self.route(ClientRequest::ShardWrite { shard, session, command }, 0).await? {
            ClientResponse::Write(outcome) => Ok(outcome),
            other => Err(ApiError::Internal(format!("a shard answered a lease step with {other:?}"))),
        }
    }

    /// A client's `lease revoke`: the home shard with the client's session, then the rest.
    pub(super) async fn revoke_lease(&self, session: WriteSession, id: u64) -> ClientResult {
        let outcome = self.shard_write(self.lease_home(id), session, WriteCommand::LeaseRevoke { id }).await?;
        Ok(ClientResponse::Write(match outcome {
            WriteOutcome::LeaseRevoked { revision, deleted } => {
                let elsewhere = self.complete_revocation(id).await?;
                WriteOutcome::LeaseRevoked { revision, deleted: deleted + elsewhere }
            }
            other => other,
        }))
    }

    /// The steps of a revocation after its home shard's: every other shard drops the lease's keys,
    /// then the home shard forgets it. Idempotent. Returns the keys deleted.
    pub(super) async fn complete_revocation(&self, id: u64) -> Result<u64, ApiError> {
        let home = self.lease_home(id);
        let drops = (0..self.store.num_shards())
            .filter(|s| *s != home)
            .map(|s| self.shard_write(s, SESSIONLESS, WriteCommand::LeaseDrop { id }));
        let mut deleted = 0;
        for outcome in futures::future::join_all(drops).await {
            match outcome? {
                WriteOutcome::LeaseRevoked { deleted: d, .. } => deleted += d,
                other => return Err(ApiError::Internal(format!("a shard answered a lease drop with {other:?}"))),
            }
        }
        match self.shard_write(home, SESSIONLESS, WriteCommand::LeaseForget { id }).await? {
            WriteOutcome::LeaseRevoked { .. } => Ok(deleted),
            other => Err(ApiError::Internal(format!("lease {id:016x}'s home answered its forget with {other:?}"))),
        }
    }

    /// A put attached to a lease, on the leader of the key's shard (routing brought it here).
    /// If that shard knows nothing of the lease, asks the lease's home whether it lives and
    /// resends the put as checked (same session: the first try was not recorded).
    pub(super) async fn put_with_lease(&self, session: WriteSession, command: WriteCommand) -> ClientResult {
        let outcome = self.store.write_here(session, command.clone()).await?;
        let WriteOutcome::LeaseUnchecked { id } = outcome else { return Ok(ClientResponse::Write(outcome)) };
        match self.route(ClientRequest::LeaseInfo { id }, 0).await {
            Ok(ClientResponse::LeaseStatus(_)) => {}
            Err(ApiError::LeaseNotFound { id }) => {
                return Ok(ClientResponse::Write(WriteOutcome::LeaseNotFound { id }))
            }
            Err(e) => return Err(e),
            Ok(other) => return Err(ApiError::Internal(format!("lease info answered with {other:?}"))),
        }
        let WriteCommand::PutLease { key, value, lease, .. } = command else {
            return Err(ApiError::Internal("not a put with a lease".into()));
        };
        let checked = WriteCommand::PutLease { key, value, lease, checked: true };
        self.store.write_here(session, checked).await.map(ClientResponse::Write)
    }

    /// `lease ttl`: the lease from its home shard's leader, and with `keys` its keys of every
    /// shard in key order.
    pub(super) async fn lease_time_to_live(&self, id: u64, keys: bool) -> ClientResult {
        let mut status = match self.route(ClientRequest::LeaseInfo { id }, 0).await? {
            ClientResponse::LeaseStatus(s) => s,
            other => return Err(ApiError::Internal(format!("lease info answered with {other:?}"))),
        };
        if keys {
            let asks =
                (0..self.store.num_shards()).map(|shard| self.route(ClientRequest::ShardLeaseKeys { shard, id }, 0));
            for answer in futures::future::join_all(asks).await {
                match answer? {
                    ClientResponse::LeaseKeys(k) => status.keys.extend(k),
                    other => return Err(ApiError::Internal(format!("a shard answered lease keys with {other:?}"))),
                }
            }
            status.keys.sort();
        }
        Ok(ClientResponse::LeaseStatus(status))
    }

    /// `lease list`: the live leases of every shard, by id.
    pub(super) async fn list_leases(&self) -> ClientResult {
        let asks = (0..self.store.num_shards()).map(|shard| self.route(ClientRequest::ShardLeases { shard }, 0));
        let mut all: Vec<LeaseEntry> = Vec::new();
        for answer in futures::future::join_all(asks).await {
            match answer? {
                ClientResponse::Leases(l) => all.extend(l),
                other => return Err(ApiError::Internal(format!("a shard answered lease list with {other:?}"))),
            }
        }
        all.sort_by_key(|l| l.id);
        Ok(ClientResponse::Leases(all))
    }

    /// Revokes, on every hosted shard this node leads, the leases whose deadline passed, and
    /// completes revocations left half-way; until `shutdown`. Idle, it costs a look at each
    /// shard's deadlines every [`EXPIRY_TICK`].
    pub fn expire_leases(self: &Arc<Self>, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut last_retry = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(EXPIRY_TICK) => {}
                    _ = shutdown.cancelled() => return,
                }
                let retry = last_retry.elapsed() >= RETRY_EVERY;
                if retry {
                    last_retry = tokio::time::Instant::now();
                }
                let shards: Vec<RaftNode> = this.store.shards().values().cloned().collect();
                for shard in shards {
                    this.expire_on(&shard, retry).await;
                }
            }
        })
    }

    /// One look at `shard`'s deadlines (see [`Self::expire_leases`]); `retry`: also complete
    /// revocations left half-way.
    async fn expire_on(&self, shard: &RaftNode, retry: bool) {
        let Some(term) = shard.leading_term() else { return };
        let deadlines = shard.lease_deadlines();
        let now = std::time::Instant::now();
        deadlines.lead(term, now);
        let expired = deadlines.take_expired(now);
        let revoking = if retry { deadlines.revoking() } else { Vec::new() };
        if expired.is_empty() && revoking.is_empty() {
            return;
        }
        let expiries = futures::stream::iter(expired).for_each_concurrent(MAX_CONCURRENT_REVOCATIONS, |id| async move {
            // Proposed by this leader itself, in the term that decided it (never forwarded: a
            // new leader counts its own deadlines).
            if shard.leading_term() != Some(term) {
                return;
            }
            match shard.propose_here(SESSIONLESS, WriteCommand::LeaseRevoke { id }).await {
                Ok(WriteOutcome::LeaseRevoked { deleted, .. }) => {
                    tracing::debug!(lease = %format!("{id:016x}"), deleted, "lease expired");
                    if let Err(e) = self.complete_revocation(id).await {
                        tracing::debug!(lease = %format!("{id:016x}"), "expired lease's other shards: {e}; retrying");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(lease = %format!("{id:016x}"), "could not revoke an expired lease: {e}"),
            }
        });
        expiries.await;
        futures::stream::iter(revoking)
            .for_each_concurrent(MAX_CONCURRENT_REVOCATIONS, |id| async move {
                if let Err(e) = self.complete_revocation(id).await {
                    tracing::debug!(lease = %format!("{id:016x}"), "completing a revocation: {e}; retrying");
                }
            })
            .await;
    }
}
