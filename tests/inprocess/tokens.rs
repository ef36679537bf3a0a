//! Client tokens (docs/security.md): a client with a valid ticket but no token, a garbled one,
//! one of another cluster, an expired, a revoked or an out-of-scope one is refused every request
//! kind with `PermissionDenied` and changes nothing; a revocation reaches every node; a CAS
//! mismatch shows the current value only to a reader; the cluster's reserved keys are out of
//! every client's reach.

use std::time::{Duration, Instant};

use aspen::{
    api::{
        ApiError, BatchOp, ClientRequest, ClientResponse, Compare, CompareOp, Id128, ReadConsistency, ScanRequest,
        TxnOp, WatchRequest, WatchStart, WriteCommand, WriteSession,
    },
    client::WatchItem,
    AspenClient, ClientError,
};

use crate::support::{start_three, wait_digests_equal, InProcNode};

fn session() -> WriteSession {
    WriteSession { client_id: Id128::random(), seq: 1 }
}

fn write(command: WriteCommand) -> ClientRequest {
    ClientRequest::Write { session: session(), command }
}

fn scan(prefix: &str) -> ClientRequest {
    ClientRequest::Scan(ScanRequest {
        prefix: prefix.as_bytes().to_vec(),
        start: None,
        end: None,
        limit: 100,
        continuation: None,
        consistency: ReadConsistency::Linearizable,
    })
}

/// Every kind of request a client may send (node-to-node ones are refused on the client ALPN
/// anyway, tested in `peers`), with keys outside `app/`.
fn every_request(ticket: &str) -> Vec<ClientRequest> {
    let get = |k: &str| ClientRequest::Get { key: k.into(), consistency: ReadConsistency::Linearizable };
    vec![
        get("x"),
        ClientRequest::Get { key: b"x".to_vec(), consistency: ReadConsistency::Stale },
        write(WriteCommand::Put { key: b"x".to_vec(), value: b"evil".to_vec() }),
        write(WriteCommand::Delete { key: b"k0".to_vec() }),
        write(WriteCommand::Cas { key: b"k0".to_vec(), expected: None, new_value: b"evil".to_vec() }),
        write(WriteCommand::Batch { ops: vec![BatchOp::Put { key: b"x".to_vec(), value: b"evil".to_vec() }] }),
        write(WriteCommand::DeletePrefix { prefix: Vec::new() }),
        write(WriteCommand::Txn {
            compares: vec![Compare::version("k0", CompareOp::Greater, 0)],
            success: vec![TxnOp::delete("k0")],
            failure: vec![TxnOp::put("x", "evil")],
        }),
        scan(""),
        ClientRequest::ClusterStatus,
        ClientRequest::NodeStatus,
        ClientRequest::Members,
        ClientRequest::AddLearner { ticket: ticket.to_string() },
        ClientRequest::Promote { node_id: 2 },
        ClientRequest::Remove { node_id: 3 },
        ClientRequest::MoveLeader { shard: 1, node_id: 2 },
        ClientRequest::BalanceLeaders,
        ClientRequest::AuthTokenCreate { read: true, write: true, admin: true, prefixes: vec![], ttl_secs: None },
        ClientRequest::AuthTokenList,
        ClientRequest::AuthTokenRevoke { id: 1 },
        ClientRequest::JoinTokenCreate { ttl_secs: 60, single_use: false },
    ]
}

async fn client(node: &InProcNode, token: Option<&str>) -> AspenClient {
    let c = AspenClient::connect(vec![node.ticket()], Duration::from_secs(30)).await.expect("client");
    match token {
        Some(t) => c.with_token(t),
        None => c,
    }
}

fn denied(r: &Result<ClientResponse, ClientError>) -> Option<&str> {
    match r {
        Err(ClientError::Api(ApiError::PermissionDenied(m))) => Some(m),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_are_refused_every_request_and_change_nothing() {
    let root = tempfile::tempdir().unwrap();
    let configs = (1..=3)
        .map(|id| {
            let mut c = InProcNode::config(root.path(), id);
            c.sharding.enabled = true;
            c.sharding.num_shards = 2;
            c
        })
        .collect();
    let nodes = start_three(configs).await;
    let refs: Vec<&InProcNode> = nodes.iter().collect();
    let admin = nodes[0].client().await;
    for i in 0..10 {
        admin.put(format!("k{i}"), format!("v{i}")).await.unwrap();
    }
    // Every node writes its admin.token and records it: three records.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = admin.list_tokens().await.unwrap_or_default();
        if list.iter().filter(|t| t.note.contains("admin.token")).count() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "every node's admin token is recorded: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The hostile tokens: a read-only token for app/ (out of scope for everything below), an
    // expired one, a revoked one, one of another cluster, a garbled one, and none.
    let (ro_info, read_app) = admin.create_token(true, false, false, vec![b"app/".to_vec()], None).await.unwrap();
    assert!(ro_info.read && !ro_info.write && !ro_info.admin);
    let (_, expiring) = admin.create_token(true, true, true, vec![], Some(1)).await.unwrap();
    let (revoked_info, revoked) = admin.create_token(true, true, true, vec![], None).await.unwrap();
    // A connection that verified the token before the revocation is refused after it too.
    let early = client(&nodes[2], Some(&revoked)).await;
    early.get("k0").await.expect("valid before the revocation");
    admin.revoke_token(revoked_info.id).await.unwrap();
    let other_root = tempfile::tempdir().unwrap();
    let other = InProcNode::start(InProcNode::config(other_root.path(), 1)).await;
    let foreign = other.admin_token();
    let mut garbled = nodes[0].admin_token();
    garbled.replace_range(20..24, "aaaa");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let list = admin.list_tokens().await.unwrap();
    assert!(list.iter().any(|t| t.id == revoked_info.id && t.revoked), "list shows the revocation: {list:?}");
    assert!(list.iter().any(|t| t.id == ro_info.id && !t.revoked && t.prefixes == [b"app/".to_vec()]));

    let before = wait_digests_equal(&refs, 60).await;
    let ticket = other.ticket().encode();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("garbled", Some(garbled)),
        ("another cluster's", Some(foreign)),
        ("expired", Some(expiring)),
        ("revoked", Some(revoked)),
        ("read-only for app/", Some(read_app.clone())),
    ];
    let mut refusals = 0;
    for (what, token) in &cases {
        for node in &nodes {
            let c = client(node, token.as_deref()).await;
            for request in every_request(&ticket) {
                let kind = request.kind();
                let status = matches!(
                    request,
                    ClientRequest::ClusterStatus | ClientRequest::NodeStatus | ClientRequest::Members
                );
                let r = c.request(request).await;
                if *what == "read-only for app/" && status {
                    // Any valid token may see the cluster's status.
                    assert!(r.is_ok(), "{what} token, {kind}: {r:?}");
                    continue;
                }
                let why =
                    denied(&r).unwrap_or_else(|| panic!("{what} token, {kind} on node {}: {r:?}", node.config.node_id));
                assert!(!why.is_empty());
                refusals += 1;
            }
            c.close().await;
        }
    }
    let r = early.get("k0").await;
    assert!(matches!(r, Err(ClientError::Api(ApiError::PermissionDenied(ref m))) if m.contains("revoked")), "{r:?}");
    println!("{refusals} refusals");

    // Nothing changed on any replica of any shard.
    let after = wait_digests_equal(&refs, 60).await;
    assert_eq!(before, after, "a refused request changed a replica");
    for n in &nodes {
        assert_eq!(n.handle().shard0.status().voters, vec![1, 2, 3]);
    }

    // In scope, the read-only token reads; a CAS mismatch shows the value only to a reader.
    admin.put("app/a", "1").await.unwrap();
    let reader = client(&nodes[1], Some(&read_app)).await;
    assert_eq!(reader.get("app/a").await.unwrap().map(|kv| kv.value), Some(b"1".to_vec()));
    assert_eq!(reader.scan("app/", 10, ReadConsistency::Linearizable).await.unwrap().len(), 1);
    let (_, write_app) = admin.create_token(false, true, false, vec![b"app/".to_vec()], None).await.unwrap();
    let writer = client(&nodes[2], Some(&write_app)).await;
    let hidden = writer.cas("app/a", Some(b"wrong".to_vec()), "2").await.unwrap();
    assert_eq!(hidden, aspen::client::CasOutcome::Mismatch(None), "a writer without read sees no value");
    let shown = admin.cas("app/a", Some(b"wrong".to_vec()), "2").await.unwrap();
    assert_eq!(shown, aspen::client::CasOutcome::Mismatch(Some(b"1".to_vec())));
    writer.put("app/b", "2").await.expect("write in scope");
    let r = writer.get("app/b").await;
    assert!(matches!(r, Err(ClientError::Api(ApiError::PermissionDenied(_)))), "{r:?}");

    // Revocation reaches every node: each refuses the token once it applied the record.
    let (info, t) = admin.create_token(true, false, false, vec![], None).await.unwrap();
    let clients: Vec<AspenClient> = futures::future::join_all(nodes.iter().map(|n| client(n, Some(&t)))).await;
    for c in &clients {
        c.get("k0").await.expect("valid before the revocation");
    }
    // A watch opened with the token is a stream that outlives its check: it ends too.
    let watcher = std::sync::Arc::new(client(&nodes[0], Some(&t)).await);
    let mut watch = watcher
        .watch(WatchRequest { key: b"rv/".to_vec(), prefix: true, prev_kv: false, start: WatchStart::Now })
        .await
        .expect("a watch before the revocation");
    assert!(matches!(watch.next().await, Some(Ok(WatchItem::Created(_)))));
    admin.revoke_token(info.id).await.unwrap();
    let revoked_at = Instant::now();
    admin.put("rv/after", "x").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match watch.next().await {
                // Events written before the revocation reached this node may still come.
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch ends after its token's revocation");
    assert!(
        matches!(ended, Some(Err(ClientError::Api(ApiError::PermissionDenied(ref m)))) if m.contains("revoked")),
        "{ended:?}"
    );
    for (i, c) in clients.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while denied(&c.request(ClientRequest::NodeStatus).await).is_none() {
            assert!(Instant::now() < deadline, "node {} still takes a revoked token", i + 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("node {} refuses the revoked token {:?} after the revocation", i + 1, revoked_at.elapsed());
    }
    let r = admin.revoke_token(0x1234).await;
    assert!(matches!(r, Err(ClientError::Api(ApiError::InvalidRequest(ref m))) if m.contains("no token")), "{r:?}");

    // Sessions are bound to their token: another token naming the same session id and sequence
    // number gets its own session (its write applies), not the first one's recorded answer.
    let (_, other_writer) = admin.create_token(true, true, false, vec![], None).await.unwrap();
    let other_writer = client(&nodes[1], Some(&other_writer)).await;
    let shared = WriteSession { client_id: Id128([42; 16]), seq: 1 };
    let put = |v: &str| ClientRequest::Write {
        session: shared,
        command: WriteCommand::Put { key: b"sess".to_vec(), value: v.as_bytes().to_vec() },
    };
    admin.request(put("from-admin")).await.unwrap();
    other_writer.request(put("from-other")).await.unwrap();
    assert_eq!(admin.get("sess").await.unwrap().map(|kv| kv.value), Some(b"from-other".to_vec()));
    // The same token retrying the same session and number is answered, not applied again.
    admin.request(put("from-admin")).await.unwrap();
    assert_eq!(admin.get("sess").await.unwrap().map(|kv| kv.value), Some(b"from-other".to_vec()));
    other_writer.close().await;

    // The reserved keyspace: not readable or writable by any client, not in scans, and a delete
    // of every key leaves the cluster's records (tokens keep working).
    let reserved = b"\x00aspen/cluster-key".to_vec();
    let r = admin.get(reserved.clone()).await;
    assert!(matches!(r, Err(ClientError::Api(ApiError::InvalidRequest(ref m))) if m.contains("reserved")), "{r:?}");
    let r = admin.put(reserved, "mine").await;
    assert!(matches!(r, Err(ClientError::Api(ApiError::InvalidRequest(_)))), "{r:?}");
    let all = admin.scan("", usize::MAX, ReadConsistency::Linearizable).await.unwrap();
    assert!(all.iter().all(|kv| !kv.key.starts_with(b"\x00")), "a scan shows reserved keys");
    admin.delete_prefix("").await.unwrap();
    assert!(admin.scan("", usize::MAX, ReadConsistency::Linearizable).await.unwrap().is_empty());
    reader.get("app/a").await.expect("tokens survive a delete of every key");
    admin.list_tokens().await.expect("so do their records");

    for c in clients {
        c.close().await;
    }
    for c in [admin, reader, writer, early] {
        c.close().await;
    }
}
