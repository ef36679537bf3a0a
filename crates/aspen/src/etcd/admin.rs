//! etcd's Cluster, Maintenance and Auth services (docs/design.md §18).
//!
//! Cluster: `MemberList` (every member, with the URL each serves the etcd API on); membership
//! changes are Aspen's own (`aspen-cli cluster …`). Maintenance: `Status` (shard 0's Raft state),
//! `Alarm` (Aspen's NOSPACE alarms), `Defragment` (this node's state machine files rewritten in key order, `aspen-cli defrag`),
//! `MoveLeader` (shard 0), `Hash`/`HashKV` (the member's state digests, hashed). Auth: `Authenticate` maps etcd's user and password onto Aspen tokens —
//! user `token`, password an Aspen token — and answers with that token, which clients then send
//! with every call; users and roles are Aspen's token scopes (`aspen-cli auth token create`).
//! `Status`, `MemberList`, `AuthStatus` and `Authenticate` need no token, as in etcd.

use std::sync::Arc;

use futures::stream::BoxStream;
use tonic::{Request, Response, Status};

use super::{
    gateway::{errors, status_of, EtcdNode, Gateway},
    proto::etcdserverpb::{
        alarm_request::AlarmAction, auth_server::Auth, cluster_server::Cluster, maintenance_server::Maintenance,
        AlarmMember, AlarmRequest, AlarmResponse, AlarmType, AuthDisableRequest, AuthDisableResponse,
        AuthEnableRequest, AuthEnableResponse, AuthRoleAddRequest, AuthRoleAddResponse, AuthRoleDeleteRequest,
        AuthRoleDeleteResponse, AuthRoleGetRequest, AuthRoleGetResponse, AuthRoleGrantPermissionRequest,
        AuthRoleGrantPermissionResponse, AuthRoleListRequest, AuthRoleListResponse, AuthRoleRevokePermissionRequest,
        AuthRoleRevokePermissionResponse, AuthStatusRequest, AuthStatusResponse, AuthUserAddRequest,
        AuthUserAddResponse, AuthUserChangePasswordRequest, AuthUserChangePasswordResponse, AuthUserDeleteRequest,
        AuthUserDeleteResponse, AuthUserGetRequest, AuthUserGetResponse, AuthUserGrantRoleRequest,
        AuthUserGrantRoleResponse, AuthUserListRequest, AuthUserListResponse, AuthUserRevokeRoleRequest,
        AuthUserRevokeRoleResponse, AuthenticateRequest, AuthenticateResponse, DefragmentRequest, DefragmentResponse,
        DowngradeRequest, DowngradeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse, Member,
        MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
        MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
        MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
    },
};
use crate::api::{applied_revision, ApiError, ClientRequest, ClientResponse, Revision, ShardId, StateDigest};

/// The etcd version whose API this one answers as (clients read it from `Status`).
pub const ETCD_API_VERSION: &str = "3.5.0";

const USERS: &str = "Aspen has no users or roles: access is by token (aspen-cli auth token create); authenticate \
                     with user name `token` and a token as password";

fn membership(how: &str) -> String {
    format!("Aspen changes its membership itself; use {how}")
}

/// `Hash` and `HashKV`: a 32-bit hash of the state digests of every shard this member hosts, as
/// applied here (docs/design.md §6.3: replicas that applied the same entries have the same
/// digest), and the revision they describe (the highest of the shards'). Members that host the
/// same shards and have applied the same entries answer the same hash.
fn state_hash(digests: &[(ShardId, StateDigest)]) -> Result<(u32, Revision), Status> {
    if digests.is_empty() {
        return Err(Status::unavailable(errors::NO_LEADER));
    }
    let mut sorted = digests.to_vec();
    sorted.sort_by_key(|(shard, _)| *shard);
    let mut h = blake3::Hasher::new_derive_key("aspen etcd HashKV v1");
    for (shard, d) in &sorted {
        h.update(&shard.to_le_bytes());
        h.update(&d.applied_index.to_le_bytes());
        h.update(&d.digest);
    }
    let bytes = h.finalize();
    let hash = u32::from_le_bytes(bytes.as_bytes()[..4].try_into().unwrap_or_default());
    let revision = sorted.iter().map(|(_, d)| applied_revision(d.applied_index)).max().unwrap_or(0);
    Ok((hash, revision))
}

/// etcd's Cluster service over a node.
#[derive(Debug)]
pub struct ClusterService<N: EtcdNode>(pub Arc<Gateway<N>>);

#[tonic::async_trait]
impl<N: EtcdNode> Cluster for ClusterService<N> {
    async fn member_list(&self, _: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let members = self.0.node.etcd_members().await;
        Ok(Response::new(MemberListResponse {
            header: self.0.header(0),
            members: members
                .into_iter()
                .map(|m| Member {
                    id: m.id,
                    name: m.name,
                    peer_ur_ls: m.peer_urls,
                    client_ur_ls: m.client_urls,
                    is_learner: m.is_learner,
                })
                .collect(),
        }))
    }

    async fn member_add(&self, _: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        Err(Status::unimplemented(membership("aspen-cli cluster add-learner TICKET (or aspen-node --join)")))
    }

    async fn member_remove(&self, _: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(Status::unimplemented(membership("aspen-cli cluster remove NODE_ID")))
    }

    async fn member_update(&self, _: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Status::unimplemented(membership("nothing: a member's addresses come with its ticket")))
    }

    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(Status::unimplemented(membership("aspen-cli cluster promote NODE_ID")))
    }
}

/// etcd's Maintenance service over a node.
#[derive(Debug)]
pub struct MaintenanceService<N: EtcdNode>(pub Arc<Gateway<N>>);

type SnapshotStream = BoxStream<'static, Result<SnapshotResponse, Status>>;

#[tonic::async_trait]
impl<N: EtcdNode> Maintenance for MaintenanceService<N> {
    async fn alarm(&self, request: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("alarm", |s| s.admin, "admin")?;
        let r = request.into_inner();
        let asked = match AlarmAction::try_from(r.action) {
            Ok(AlarmAction::Get) => ClientRequest::AlarmList,
            Ok(AlarmAction::Deactivate) => ClientRequest::AlarmDisarm,
            _ => return Err(Status::unimplemented("alarms are raised by the nodes themselves (NOSPACE)")),
        };
        match self.0.ask(asked).await? {
            ClientResponse::Alarms(alarms) => Ok(Response::new(AlarmResponse {
                header: self.0.header(0),
                alarms: alarms
                    .into_iter()
                    .map(|a| AlarmMember { member_id: a.node_id, alarm: AlarmType::Nospace as i32 })
                    .collect(),
            })),
            other => Err(Status::internal(format!("alarms were answered with {other:?}"))),
        }
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = self.0.node.etcd_status();
        Ok(Response::new(StatusResponse {
            header: self.0.header(crate::api::applied_revision(s.raft_applied_index)),
            version: ETCD_API_VERSION.into(),
            db_size: s.db_size as i64,
            leader: s.leader,
            raft_index: s.raft_index,
            raft_term: s.raft_term,
            raft_applied_index: s.raft_applied_index,
            errors: s.alarms.iter().map(|(member, alarm)| format!("memberID:{member} alarm:{alarm}")).collect(),
            db_size_in_use: s.db_size as i64,
            is_learner: s.is_learner,
            storage_version: String::new(),
            db_size_quota: s.quota_bytes as i64,
            downgrade_info: None,
        }))
    }

    async fn defragment(&self, request: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("defragment", |s| s.admin, "admin")?;
        // Like etcd's: the member answering, every shard it hosts.
        match self.0.node.handle(ClientRequest::Defragment { node_id: None }, 0).await {
            Ok(ClientResponse::Defragmented(_)) => Ok(Response::new(DefragmentResponse { header: self.0.header(0) })),
            Ok(other) => Err(Status::internal(format!("a defrag was answered with {other:?}"))),
            // Not etcd's "database space exceeded" (that is the NOSPACE alarm's): the node's words.
            Err(ApiError::NoSpace(m)) => Err(Status::resource_exhausted(m)),
            Err(e) => Err(super::gateway::status_of(e)),
        }
    }

    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("hash", |s| s.admin, "admin")?;
        let (hash, revision) = state_hash(&self.0.node.state_digests())?;
        Ok(Response::new(HashResponse { header: self.0.header(revision), hash }))
    }

    async fn hash_kv(&self, request: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("hash", |s| s.admin, "admin")?;
        let asked = request.get_ref().revision;
        let (hash, revision) = state_hash(&self.0.node.state_digests())?;
        let at = super::gateway::revision_i64(revision);
        if asked > at {
            return Err(Status::out_of_range(errors::FUTURE_REV));
        }
        if asked > 0 && asked < at {
            return Err(Status::unimplemented(format!(
                "Aspen hashes a member's state as it stands (revision {at} here), not at a past revision: ask for revision 0"
            )));
        }
        Ok(Response::new(HashKvResponse {
            header: self.0.header(revision),
            hash,
            compact_revision: 0,
            hash_revision: at,
        }))
    }

    type SnapshotStream = SnapshotStream;

    /// A backup of every shard (`aspen-cli snapshot save`'s file, docs/operations.md "Backup and
    /// restore"): saved into the data dir first, then streamed in 1 MiB pieces. `aspen-node
    /// restore` makes a data dir of it; it is not an etcd (bbolt) database.
    async fn snapshot(&self, request: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("snapshot", |s| s.admin, "admin")?;
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.0.node.data_dir().join(format!(".etcd-snapshot-{n}.tmp"));
        crate::client::backup::save_backup(&NodeSource(&*self.0.node), &path, |_| {})
            .await
            .map_err(|e| Status::unavailable(format!("{} (saving the backup: {e})", errors::NO_LEADER)))?;
        let opened = std::fs::File::open(&path);
        // Unlinked at once: the open file stays readable, and nothing is left behind.
        let _ = std::fs::remove_file(&path);
        let file = opened.map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
        let len = file.metadata().map_err(|e| Status::internal(e.to_string()))?.len();
        // etcdctl checks that a snapshot ends in a SHA-256 after a whole number of 512-byte
        // blocks (etcd appends one to its database): zeros to the next block, then the hash of
        // everything before it. Aspen's readers ignore this trailer (api::backup).
        let padding = (512 - len % 512) % 512;
        let total = len + padding + 32;
        let header = self.0.header(0);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<SnapshotResponse, Status>>(2);
        tokio::task::spawn_blocking(move || {
            use sha2::Digest;
            use std::io::Read;
            let (mut file, mut sent, mut hash) = (file, 0u64, sha2::Sha256::new());
            let piece = |blob: Vec<u8>, sent: u64| SnapshotResponse {
                header,
                remaining_bytes: total - sent,
                blob,
                version: String::new(),
            };
            while sent < len {
                let mut blob = vec![0u8; (len - sent).min(1 << 20) as usize];
                if let Err(e) = file.read_exact(&mut blob) {
                    let _ = tx.blocking_send(Err(Status::internal(format!("reading the backup: {e}"))));
                    return;
                }
                hash.update(&blob);
                sent += blob.len() as u64;
                if tx.blocking_send(Ok(piece(blob, sent))).is_err() {
                    return;
                }
            }
            let mut tail = vec![0u8; padding as usize];
            hash.update(&tail);
            tail.extend_from_slice(&hash.finalize());
            let _ = tx.blocking_send(Ok(piece(tail, total)));
        });
        Ok(Response::new(super::gateway::stream_of(rx)))
    }

    async fn move_leader(&self, request: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        let caller = self.0.caller(request.metadata())?;
        caller.needs("move-leader", |s| s.admin, "admin")?;
        let node_id = request.into_inner().target_id;
        self.0.node.handle(ClientRequest::MoveLeader { shard: 0, node_id }, 0).await.map_err(status_of)?;
        Ok(Response::new(MoveLeaderResponse { header: self.0.header(0) }))
    }

    async fn downgrade(&self, _: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        Err(Status::unimplemented("Aspen has no cluster version to downgrade (docs/operations.md, \"Upgrades\")"))
    }
}

/// The node in process as the source of a backup.
struct NodeSource<'a, N>(&'a N);

impl<N: EtcdNode> crate::client::backup::BackupSource for NodeSource<'_, N> {
    async fn ask(&self, request: ClientRequest) -> Result<ClientResponse, crate::client::ClientError> {
        self.0.handle(request, 0).await.map_err(crate::client::ClientError::Api)
    }
}

/// etcd's Auth service over a node.
#[derive(Debug)]
pub struct AuthService<N: EtcdNode>(pub Arc<Gateway<N>>);

#[tonic::async_trait]
impl<N: EtcdNode> Auth for AuthService<N> {
    async fn auth_status(&self, _: Request<AuthStatusRequest>) -> Result<Response<AuthStatusResponse>, Status> {
        Ok(Response::new(AuthStatusResponse {
            header: self.0.header(0),
            enabled: self.0.enforcing(),
            auth_revision: 0,
        }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let r = request.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument(errors::USER_EMPTY));
        }
        if r.name != "token" {
            return Err(Status::invalid_argument(errors::AUTH_FAILED));
        }
        match self.0.verify(&r.password) {
            Ok(v) if v.scope().is_some() => {
                Ok(Response::new(AuthenticateResponse { header: self.0.header(0), token: r.password }))
            }
            Ok(_) => Err(Status::invalid_argument(errors::AUTH_FAILED)),
            Err(crate::auth::TokenError::NotReady) => Err(Status::unavailable(errors::NO_LEADER)),
            Err(_) => Err(Status::invalid_argument(errors::AUTH_FAILED)),
        }
    }

    async fn auth_enable(&self, _: Request<AuthEnableRequest>) -> Result<Response<AuthEnableResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn auth_disable(&self, _: Request<AuthDisableRequest>) -> Result<Response<AuthDisableResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn user_add(&self, _: Request<AuthUserAddRequest>) -> Result<Response<AuthUserAddResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn user_get(&self, _: Request<AuthUserGetRequest>) -> Result<Response<AuthUserGetResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn user_list(&self, _: Request<AuthUserListRequest>) -> Result<Response<AuthUserListResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn user_delete(&self, _: Request<AuthUserDeleteRequest>) -> Result<Response<AuthUserDeleteResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn user_change_password(
        &self,
        _: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn user_grant_role(
        &self,
        _: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn user_revoke_role(
        &self,
        _: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn role_add(&self, _: Request<AuthRoleAddRequest>) -> Result<Response<AuthRoleAddResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn role_get(&self, _: Request<AuthRoleGetRequest>) -> Result<Response<AuthRoleGetResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn role_list(&self, _: Request<AuthRoleListRequest>) -> Result<Response<AuthRoleListResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn role_delete(&self, _: Request<AuthRoleDeleteRequest>) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn role_grant_permission(
        &self,
        _: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }

    async fn role_revoke_permission(
        &self,
        _: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        Err(Status::unimplemented(USERS))
    }
}
