//! Seed inputs: valid encodings of every message kind, so the fuzzer starts from inputs that
//! reach deep into the decoders instead of failing at the first byte. `examples/seeds.rs` writes
//! them to `corpus/<target>/`.

use std::collections::{BTreeMap, BTreeSet};

use aspen::{
    api::raft_rpc::{RaftEnvelope, RaftRefusal, RaftRequest, RaftResponse},
    api::{
        encode_shard_prefix, frame::encode_frame, ApiError, BatchOp, ClientEnvelope, ClientRequest, ClientResponse,
        ClientResult, Compare, CompareOp, Id128, JoinRequest, KeyValue, NodeTicket, ReadConsistency, ScanPage,
        ScanRequest, TxnOp, TxnOpResult, WriteCommand, WriteOutcome, WriteSession, CLIENT_PROTOCOL_VERSION,
    },
    api::{EventKind, LeaseEntry, LeaseStatus, WatchEvent, WatchPosition, WatchRequest, WatchStart},
    cluster::gossip::{Announcement, LeaderHint, SignedAnnouncement, ANNOUNCEMENT_VERSION},
    raft::{Entry, LogId, MemberNode, SnapshotMeta, StoredMembership, Vote, WriteRequest},
};
use openraft::{
    error::{Fatal, RaftError},
    raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest, VoteResponse},
    CommittedLeaderId, EntryPayload, Membership,
};

use crate::{member_key, GOSSIP_CLUSTER};

/// The limit prefix of frame-target seeds (`split_limit`): the largest the fuzzer can express.
const NO_LIMIT: [u8; 2] = [0xff, 0xff];

fn with_limit(frame: Vec<u8>) -> Vec<u8> {
    let mut out = NO_LIMIT.to_vec();
    out.extend(frame);
    out
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn member() -> MemberNode {
    MemberNode { endpoint_id: [5; 32], addrs: vec!["127.0.0.1:7601".parse().expect("addr")] }
}

fn write() -> WriteRequest {
    WriteRequest {
        session: WriteSession { client_id: Id128([1; 16]), seq: 3 },
        command: WriteCommand::Cas { key: b"k".to_vec(), expected: Some(b"old".to_vec()), new_value: b"new".to_vec() },
        timestamp_ms: 1_700_000_000_000,
    }
}

fn raft_requests() -> Vec<RaftRequest> {
    let membership = Membership::new(vec![BTreeSet::from([1, 2])], BTreeMap::from([(1, member()), (2, member())]));
    vec![
        RaftRequest::Vote(VoteRequest { vote: Vote::new(4, 2), last_log_id: Some(log_id(3, 9)) }),
        RaftRequest::AppendEntries(AppendEntriesRequest {
            vote: Vote::new_committed(4, 1),
            prev_log_id: Some(log_id(4, 10)),
            entries: vec![
                Entry { log_id: log_id(4, 11), payload: EntryPayload::Normal(write().into()) },
                Entry { log_id: log_id(4, 12), payload: EntryPayload::Membership(membership.clone()) },
                Entry { log_id: log_id(4, 13), payload: EntryPayload::Blank },
            ],
            leader_commit: Some(log_id(4, 10)),
        }),
        RaftRequest::InstallSnapshot(InstallSnapshotRequest {
            vote: Vote::new_committed(4, 1),
            meta: SnapshotMeta {
                last_log_id: Some(log_id(4, 20)),
                last_membership: StoredMembership::new(Some(log_id(4, 12)), membership),
                snapshot_id: "4-20-1".into(),
            },
            offset: 0,
            data: vec![1, 2, 3, 4],
            done: true,
        }),
    ]
}

fn raft_envelopes() -> Vec<RaftEnvelope> {
    raft_requests().into_iter().map(|request| RaftEnvelope { cluster_id: Id128([3; 16]), request }).collect()
}

fn client_requests() -> Vec<ClientRequest> {
    let scan = ScanRequest {
        prefix: b"p/".to_vec(),
        start: Some(b"p/a".to_vec()),
        end: None,
        limit: 10,
        continuation: Some(b"p/b".to_vec()),
        consistency: ReadConsistency::Linearizable,
    };
    vec![
        ClientRequest::Get { key: b"key".to_vec(), consistency: ReadConsistency::Stale },
        ClientRequest::Write { session: write().session, command: write().command },
        ClientRequest::Write {
            session: write().session,
            command: WriteCommand::Batch {
                ops: vec![
                    BatchOp::Put { key: b"a".to_vec(), value: b"1".to_vec() },
                    BatchOp::Delete { key: b"b".to_vec() },
                ],
            },
        },
        ClientRequest::Write {
            session: write().session,
            command: WriteCommand::Txn {
                compares: vec![
                    Compare::value(b"a".to_vec(), CompareOp::Equal, b"1".to_vec()),
                    Compare::mod_revision(b"b".to_vec(), CompareOp::Less, 7),
                ],
                success: vec![TxnOp::put(b"a".to_vec(), b"2".to_vec()), TxnOp::get(b"b".to_vec())],
                failure: vec![TxnOp::delete(b"a".to_vec())],
            },
        },
        ClientRequest::ShardWrite {
            shard: 2,
            session: write().session,
            command: WriteCommand::DeletePrefix { prefix: b"p/".to_vec() },
        },
        ClientRequest::Scan(scan.clone()),
        ClientRequest::ShardScan { shard: 3, scan },
        ClientRequest::Join(JoinRequest {
            cluster_id: Id128([3; 16]),
            cluster_name: "aspen".into(),
            node_id: 4,
            endpoint_id: [5; 32],
            addrs: member().addrs,
            num_shards: 4,
            local_shards: vec![0, 1, 2, 3],
            join_token: String::from_utf8(tokens()[2].clone()).expect("UTF-8"),
        }),
        ClientRequest::AddLearner { ticket: ticket().encode() },
        ClientRequest::ClusterStatus,
        ClientRequest::AuthTokenCreate {
            read: true,
            write: false,
            admin: false,
            prefixes: vec![b"app/".to_vec()],
            ttl_secs: Some(60),
        },
        ClientRequest::AuthTokenRevoke { id: 0x1234 },
        ClientRequest::Write { session: write().session, command: WriteCommand::LeaseGrant { id: 0x2a, ttl_secs: 10 } },
        ClientRequest::Write {
            session: write().session,
            command: WriteCommand::PutLease { key: b"svc/a".to_vec(), value: b"up".to_vec(), lease: 0x2a, checked: false },
        },
        ClientRequest::Write { session: write().session, command: WriteCommand::LeaseRevoke { id: 0x2a } },
        ClientRequest::ShardWrite { shard: 1, session: write().session, command: WriteCommand::LeaseDrop { id: 0x2a } },
        ClientRequest::ShardWrite { shard: 0, session: write().session, command: WriteCommand::LeaseForget { id: 0x2a } },
        ClientRequest::LeaseKeepAlive { id: 0x2a },
        ClientRequest::LeaseTimeToLive { id: 0x2a, keys: true },
        ClientRequest::LeaseList,
        ClientRequest::LeaseInfo { id: 0x2a },
        ClientRequest::ShardLeaseKeys { shard: 2, id: 0x2a },
        ClientRequest::ShardLeases { shard: 3 },
        ClientRequest::Watch(WatchRequest {
            key: b"app/".to_vec(),
            prefix: true,
            prev_kv: true,
            start: WatchStart::After(vec![WatchPosition { shard: 1, revision: 40, index: 2 }]),
        }),
        ClientRequest::Watch(WatchRequest {
            key: b"k".to_vec(),
            prefix: false,
            prev_kv: false,
            start: WatchStart::FromRevision(7),
        }),
    ]
}

fn client_results() -> Vec<ClientResult> {
    let kv = KeyValue { key: b"k".to_vec(), value: b"v".to_vec(), create_revision: 3, mod_revision: 7, version: 2 };
    vec![
        Ok(ClientResponse::Get(Some(kv.clone()))),
        Ok(ClientResponse::Write(WriteOutcome::Cas { revision: 9, succeeded: false, current: Some(b"x".to_vec()) })),
        Ok(ClientResponse::Write(WriteOutcome::DeletePrefix { revision: 9, deleted: 4 })),
        Ok(ClientResponse::Write(WriteOutcome::Txn {
            revision: 9,
            succeeded: true,
            results: vec![
                TxnOpResult::Put { revision: 9 },
                TxnOpResult::Get(Some(kv.clone())),
                TxnOpResult::Delete { deleted: false },
            ],
        })),
        Ok(ClientResponse::Scan(ScanPage { entries: vec![kv], continuation: Some(b"k".to_vec()) })),
        Ok(ClientResponse::Members(vec![ticket().encode()])),
        Err(ApiError::NotLeader { leader: Some(2), leader_ticket: Some(ticket().encode()) }),
        Err(ApiError::TooLarge { what: "value".into(), size: 70_000, limit: 65_536 }),
        Ok(ClientResponse::Write(WriteOutcome::LeaseGranted { revision: 4, id: 0x2a, ttl_secs: 10 })),
        Ok(ClientResponse::Write(WriteOutcome::LeaseRevoked { revision: 5, deleted: 3 })),
        Ok(ClientResponse::Write(WriteOutcome::LeaseUnchecked { id: 0x2a })),
        Ok(ClientResponse::LeaseKeepAlive { id: 0x2a, ttl_secs: 10 }),
        Ok(ClientResponse::LeaseStatus(LeaseStatus { id: 0x2a, ttl_secs: 7, granted_ttl_secs: 10, keys: vec![b"k".to_vec()] })),
        Ok(ClientResponse::Leases(vec![LeaseEntry { id: 0x2a, granted_ttl_secs: 10 }])),
        Ok(ClientResponse::WatchCreated { positions: vec![WatchPosition { shard: 0, revision: 9, index: u32::MAX }] }),
        Ok(ClientResponse::WatchEvents(vec![WatchEvent {
            kind: EventKind::Put,
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            prev_value: Some(b"u".to_vec()),
            prev_meta: None,
            shard: 0,
            revision: 10,
            index: 1,
            create_revision: 3,
            version: 4,
            lease: 0x2a,
        }])),
        Err(ApiError::LeaseNotFound { id: 0x2a }),
        Err(ApiError::Compacted { shard: 2, oldest: 77 }),
        Err(ApiError::WatchCancelled("slow".into())),
    ]
}

fn raft_responses() -> Vec<RaftResponse> {
    vec![
        RaftResponse::Vote(Ok(VoteResponse { vote: Vote::new(4, 2), vote_granted: true, last_log_id: None })),
        RaftResponse::AppendEntries(Ok(AppendEntriesResponse::Success)),
        RaftResponse::AppendEntries(Ok(AppendEntriesResponse::HigherVote(Vote::new(5, 3)))),
        RaftResponse::AppendEntries(Err(RaftError::Fatal(Fatal::Stopped))),
        RaftResponse::Refused(RaftRefusal::UnknownShard(9)),
        RaftResponse::Refused(RaftRefusal::WrongCluster { expected: Id128([1; 16]), got: Id128([2; 16]) }),
    ]
}

fn ticket() -> NodeTicket {
    NodeTicket {
        cluster_id: Id128([3; 16]),
        node_id: 4,
        endpoint_id: iroh::SecretKey::from_bytes(&[4; 32]).public(),
        addrs: vec!["127.0.0.1:7601".parse().expect("addr"), "[::1]:7601".parse().expect("addr")],
    }
}

fn announcements() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for node in [1, 2] {
        let key = member_key(node).expect("member");
        let a = Announcement {
            version: ANNOUNCEMENT_VERSION,
            cluster_id: GOSSIP_CLUSTER,
            node_id: node,
            endpoint_id: *key.public().as_bytes(),
            addrs: vec!["127.0.0.1:7601".parse().expect("addr")],
            local_shards: vec![0, 1],
            leaders: vec![LeaderHint { shard: 1, leader: node, term: 3 }],
            seq: 1_700_000_000_000_000,
        };
        let bytes = SignedAnnouncement::sign(&a, &key).and_then(|s| s.encode()).expect("sign");
        // First byte: the membership mode of the target (0: fixed members, 1: trust the claim).
        for mode in [0u8, 1] {
            let mut seed = vec![mode];
            seed.extend_from_slice(&bytes);
            out.push(seed);
        }
    }
    out
}

/// The signing key of the `token` target's authority and seeds.
pub const TOKEN_KEY: [u8; 32] = [7; 32];
/// The cluster of the `token` target's authority and seeds.
pub const TOKEN_CLUSTER: aspen::api::ClusterId = aspen::api::Id128([9; 16]);

/// Tokens signed with [`TOKEN_KEY`] for [`TOKEN_CLUSTER`]: a scoped client token, an admin one
/// with an expiry, a single-use join token.
fn tokens() -> Vec<Vec<u8>> {
    use aspen::auth::{Scope, TokenBody, TokenKind};
    let key = iroh::SecretKey::from_bytes(&TOKEN_KEY);
    let public = *key.public().as_bytes();
    let scoped = Scope { read: true, write: true, admin: false, prefixes: vec![b"app/".to_vec(), vec![0xff, 0]] };
    [
        (TokenKind::Client(scoped), None),
        (TokenKind::Client(Scope::all()), Some(3600)),
        (TokenKind::Join { single_use: true }, Some(60)),
    ]
    .into_iter()
    .map(|(kind, ttl)| {
        let body = TokenBody::new(kind, TOKEN_CLUSTER, 1, public, ttl).expect("token body");
        body.sign(&key).expect("sign").into_bytes()
    })
    .collect()
}

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let frame = |v: &dyn Fn() -> Vec<u8>| with_limit(v());
    let client_request = client_requests()
        .into_iter()
        .map(|request| {
            frame(&|| {
                encode_frame(&ClientEnvelope {
                    version: CLIENT_PROTOCOL_VERSION,
                    hops: 0,
                    request: request.clone(),
                    token: None,
                })
                .expect("encode")
            })
        })
        .collect();
    let client_response = client_results().iter().map(|r| with_limit(encode_frame(r).expect("encode"))).collect();
    let raft_request = raft_envelopes().iter().map(|e| with_limit(encode_frame(e).expect("encode"))).collect();
    let raft_response = raft_responses().iter().map(|r| with_limit(encode_frame(r).expect("encode"))).collect();
    let raft_shard_stream = raft_envelopes()
        .iter()
        .zip([0u32, 3, 65_535])
        .map(|(e, shard)| {
            let mut stream = encode_shard_prefix(shard).to_vec();
            stream.extend(encode_frame(e).expect("encode"));
            with_limit(stream)
        })
        .collect();
    // Mux streams: several requests of different shards back to back, each `id | shard | frame`.
    let mux_message = |id: u64, shard: u32, e: &RaftEnvelope| {
        aspen::transport::mux::encode_request(id, shard, &encode_frame(e).expect("encode"))
    };
    let envelopes = raft_envelopes();
    let raft_mux_stream = (1..=envelopes.len())
        .map(|n| {
            let stream: Vec<u8> = envelopes
                .iter()
                .take(n)
                .enumerate()
                .flat_map(|(i, e)| mux_message(i as u64, i as u32 * 3, e))
                .collect();
            with_limit(stream)
        })
        .collect();
    let node_ticket = vec![ticket().encode().into_bytes()];
    vec![
        ("client_request", client_request),
        ("client_response", client_response),
        ("raft_request", raft_request),
        ("raft_response", raft_response),
        ("raft_shard_stream", raft_shard_stream),
        ("raft_mux_stream", raft_mux_stream),
        ("node_ticket", node_ticket),
        ("gossip_announcement", announcements()),
        ("token", tokens()),
    ]
}
