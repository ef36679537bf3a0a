//! Hostile input at the client ALPN: random bytes, truncated frames, unknown request variants,
//! old protocol versions, oversized frames and values. Each gets a typed error on its stream
//! (or that stream closed); the node keeps serving, on the same connection and on a second,
//! concurrent client connection.
//!
//! Then every ALPN of a sharded node at once (`aspen-client`, `raft-rpc`, `raft-shard`,
//! `raft-mux`, gossip), from an endpoint that is a member (the members-only ALPNs refuse anyone
//! else before any stream: `peers.rs`):
//! seeded random, truncated, oversized-length and wrong-shard streams while a well-behaved client
//! writes and reads; afterwards every acknowledged write is there and every ALPN still answers.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use aspen::{
    api::raft_rpc::{RaftEnvelope, RaftRefusal, RaftRequest, RaftResponse},
    api::{
        encode_shard_prefix,
        frame::{decode, encode_frame, read_frame, read_one_of_many},
        shard_raft_id, ApiError, ClientEnvelope, ClientRequest, ClientResult, ClusterId, NodeTicket, ReadConsistency,
        ShardId, CLIENT_ALPN, CLIENT_PROTOCOL_VERSION, MAX_FRAME_BYTES, RAFT_ALPN, RAFT_MUX_ALPN, RAFT_SHARDED_ALPN,
    },
    cluster::{bootstrap_node, bootstrap_sharded_node},
    transport::endpoint::bind_endpoint,
    AspenClient, ClientError, NodeConfig,
};
use iroh::{address_lookup::MemoryLookup, endpoint::Connection, Endpoint};
use openraft::raft::VoteRequest;
use rand::{rngs::StdRng, Rng, SeedableRng};

async fn start_node(dir: &std::path::Path) -> aspen::cluster::NodeHandle {
    let config = NodeConfig {
        data_dir: dir.to_path_buf(),
        bind_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        limits: aspen::config::LimitsConfig {
            max_value_bytes: 64 * 1024,
            // Short, so that step 9 (a silent stream is reset after it) is quick.
            request_timeout_ms: 3_000,
            ..Default::default()
        },
        ..Default::default()
    };
    bootstrap_node(config).await.expect("node starts")
}

/// A one-node cluster with two shards in `dir`, requests timing out after `request_timeout_ms`.
async fn start_two_shard_node(dir: &std::path::Path, request_timeout_ms: u64) -> aspen::cluster::NodeHandle {
    let mut config = NodeConfig {
        data_dir: dir.to_path_buf(),
        bind_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Default::default()
    };
    config.sharding.enabled = true;
    config.sharding.num_shards = 2;
    config.limits.request_timeout_ms = request_timeout_ms;
    bootstrap_sharded_node(config).await.expect("sharded node starts")
}

/// A client of `node` with its admin token, giving each request `timeout_secs`.
async fn admin_client(node: &aspen::cluster::NodeHandle, timeout_secs: u64) -> AspenClient {
    let admin = node.admin_token().expect("admin.token");
    AspenClient::connect(vec![node.ticket()], Duration::from_secs(timeout_secs)).await.unwrap().with_token(&admin)
}

/// Sends raw bytes on a new stream and returns what came back: `Ok(Some(result))` for a
/// response frame, `Ok(None)` if the stream was closed without one.
async fn raw_exchange(conn: &Connection, bytes: &[u8]) -> Option<ClientResult> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    // The server may stop reading early (oversized frames); a failed write is fine then.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    tokio::time::timeout(Duration::from_secs(10), read_frame::<_, ClientResult>(&mut recv, MAX_FRAME_BYTES))
        .await
        .ok()?
        .ok()
}

fn frame_of_raw_payload(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_typed_errors_and_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let ticket = node.ticket();

    // A well-behaved client, connected before the garbage starts and used throughout.
    let admin = node.admin_token().expect("admin.token");
    let good = AspenClient::connect(vec![ticket.clone()], Duration::from_secs(10)).await.unwrap().with_token(&admin);
    good.put("stable", "yes").await.unwrap();

    let lookup = MemoryLookup::new();
    let ep = bind_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), None, lookup).await.unwrap();
    let conn = ep.connect(ticket.endpoint_addr(), CLIENT_ALPN).await.unwrap();

    let check_good = |what: &'static str| {
        let good = &good;
        async move {
            let v = good.get("stable").await.unwrap_or_else(|e| panic!("after {what}: {e}"));
            assert_eq!(v.map(|kv| kv.value), Some(b"yes".to_vec()), "after {what}");
        }
    };

    // 1. Random bytes (a length prefix that points past the end, then noise).
    for _ in 0..20 {
        let len = 1 + rand::random::<u32>() as usize % 300;
        let noise: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
        match raw_exchange(&conn, &noise).await {
            None => {}
            Some(Err(
                ApiError::InvalidRequest(_) | ApiError::TooLarge { .. } | ApiError::UnsupportedVersion { .. },
            )) => {}
            Some(other) => panic!("random bytes answered with {other:?}"),
        }
    }
    check_good("random bytes").await;

    // 2. Random payload inside a correct length prefix.
    for _ in 0..20 {
        let payload: Vec<u8> = (0..1 + rand::random::<u8>() as usize).map(|_| rand::random::<u8>()).collect();
        match raw_exchange(&conn, &frame_of_raw_payload(&payload)).await {
            None => {}
            Some(Err(ApiError::InvalidRequest(_) | ApiError::UnsupportedVersion { .. })) => {}
            Some(other) => panic!("random payload answered with {other:?}"),
        }
    }
    check_good("random payload").await;

    // 3. A truncated frame: typed error.
    let full = encode_frame(&ClientEnvelope {
        version: CLIENT_PROTOCOL_VERSION,
        hops: 0,
        request: ClientRequest::Get { key: b"stable".to_vec(), consistency: ReadConsistency::Stale },
        token: Some(admin.clone()),
    })
    .unwrap();
    let resp = raw_exchange(&conn, &full[..full.len() - 3]).await;
    assert!(matches!(resp, Some(Err(ApiError::InvalidRequest(ref m))) if m.contains("truncated")), "{resp:?}");
    // ...and the same connection still serves a complete one.
    let resp = raw_exchange(&conn, &full).await;
    assert!(matches!(resp, Some(Ok(_))), "{resp:?}");

    // 4. An unknown request variant (the current version, hops 0, variant index 200).
    let resp = raw_exchange(&conn, &frame_of_raw_payload(&[CLIENT_PROTOCOL_VERSION as u8, 0, 200, 1, 0])).await;
    assert!(matches!(resp, Some(Err(ApiError::InvalidRequest(_)))), "{resp:?}");

    // 5. An unsupported protocol version.
    let mut newer =
        encode_frame(&ClientEnvelope { version: 2, hops: 0, request: ClientRequest::ClusterStatus, token: None })
            .unwrap();
    newer[4] = 9; // postcard varint of the version
    let resp = raw_exchange(&conn, &newer).await;
    assert!(matches!(resp, Some(Err(ApiError::UnsupportedVersion { got: 9, .. }))), "{resp:?}");

    // 6. An oversized frame (length prefix far above the limit): typed error, nothing allocated.
    let mut huge = (u32::MAX).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0u8; 64]);
    let resp = raw_exchange(&conn, &huge).await;
    assert!(matches!(resp, None | Some(Err(ApiError::TooLarge { .. }))), "{resp:?}");
    check_good("oversized frame").await;

    // 7. An oversized value inside a valid frame: typed TooLarge, nothing written.
    let err = good.put("big", vec![b'x'; 64 * 1024 + 1]).await.unwrap_err();
    assert!(matches!(err, ClientError::Api(ApiError::TooLarge { ref what, .. }) if what == "value"), "{err:?}");
    let err = good.put(vec![b'k'; 5000], "v").await.unwrap_err();
    assert!(matches!(err, ClientError::Api(ApiError::TooLarge { ref what, .. }) if what == "key"), "{err:?}");
    let err = good.put("", "v").await.unwrap_err();
    assert!(matches!(err, ClientError::Api(ApiError::InvalidRequest(_))), "{err:?}");
    assert_eq!(good.get("big").await.unwrap(), None);
    // A value exactly at the limit is fine.
    good.put("big", vec![b'x'; 64 * 1024]).await.unwrap();

    // 8. A peer that opens streams and never sends anything does not block others.
    let (_idle_send, _idle_recv) = conn.open_bi().await.unwrap();
    check_good("idle stream").await;

    // 9. ...and the node does not keep such a stream (and its task) forever: a stream that
    //    announces a frame and then goes silent is reset once the request timeout passes.
    let (mut stalled_send, mut stalled_recv) = conn.open_bi().await.unwrap();
    stalled_send.write_all(&100u32.to_be_bytes()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(60), stalled_recv.read_to_end(1024))
        .await
        .expect("the node never gave up on a silent stream");
    assert!(got.is_err(), "a silent stream must be reset, not answered: {got:?}");
    check_good("stalled stream").await;

    ep.close().await;
    check_good("closed garbage connection").await;
    good.close().await;
    node.shutdown().await;
}

/// Panics anywhere in this process (the node's tasks included): hostile input must cause none.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
}

/// The five ALPNs of a sharded node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alpn {
    Client,
    Raft,
    RaftShard,
    RaftMux,
    Gossip,
}

impl Alpn {
    fn bytes(self) -> &'static [u8] {
        match self {
            Alpn::Client => CLIENT_ALPN,
            Alpn::Raft => RAFT_ALPN,
            Alpn::RaftShard => RAFT_SHARDED_ALPN,
            Alpn::RaftMux => RAFT_MUX_ALPN,
            Alpn::Gossip => iroh_gossip::ALPN,
        }
    }
}

/// One hostile stream and the answers it may get.
struct Hostile {
    what: String,
    bytes: Vec<u8>,
    /// The answer must be this refusal (`None`: any refusal, or the stream closed).
    expect_unknown_shard: Option<ShardId>,
    /// On `raft-mux`: a harmless vote sent after the hostile message, under this id, must be
    /// answered (the stream survives an undecodable envelope).
    then_vote: Option<u64>,
}

fn hostile(what: impl Into<String>, bytes: Vec<u8>) -> Hostile {
    Hostile { what: what.into(), bytes, expect_unknown_shard: None, then_vote: None }
}

/// One `raft-mux` message: id, shard, then the frame.
fn mux_message(id: u64, shard: ShardId, frame: &[u8]) -> Vec<u8> {
    aspen::transport::mux::encode_request(id, shard, frame)
}

/// Reads `raft-mux` answers (`id | frame`) until the stream ends or `wait` passes; `None` if it
/// stayed open that long.
async fn mux_answers(recv: &mut iroh::endpoint::RecvStream, wait: Duration) -> Option<Vec<(u64, RaftResponse)>> {
    tokio::time::timeout(wait, async {
        let mut out = Vec::new();
        loop {
            let mut id = [0u8; 8];
            if recv.read_exact(&mut id).await.is_err() {
                return out;
            }
            // Several frames on one stream: read exactly one, nothing after it.
            match read_one_of_many(recv, MAX_FRAME_BYTES).await.and_then(|b| decode::<RaftResponse>(&b)) {
                Ok(r) => out.push((u64::from_be_bytes(id), r)),
                Err(_) => return out,
            }
        }
    })
    .await
    .ok()
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let len = rng.random_range(0..=max);
    (0..len).map(|_| rng.random()).collect()
}

/// A Vote that no node grants (term 0 is below every vote a running shard holds).
fn harmless_vote(cluster_id: ClusterId, shard: ShardId) -> Vec<u8> {
    let env = RaftEnvelope {
        cluster_id,
        request: RaftRequest::Vote(VoteRequest {
            vote: openraft::Vote::new(0, shard_raft_id(shard, 77)),
            last_log_id: None,
        }),
    };
    encode_frame(&env).unwrap()
}

/// The hostile streams thrown at one ALPN (a seeded mix of random, truncated, oversized-length
/// and, on `raft-shard`, wrong-shard input).
fn hostile_streams(rng: &mut StdRng, alpn: Alpn, cluster_id: ClusterId) -> Vec<Hostile> {
    let mut out = Vec::new();
    for i in 0..15 {
        out.push(hostile(format!("random bytes #{i}"), random_bytes(rng, 400)));
    }
    if alpn == Alpn::Gossip {
        // iroh-gossip frames its own messages: anything of ours is garbage to it.
        for i in 0..5 {
            let mut b = (rng.random_range(0..1024u32)).to_be_bytes().to_vec();
            b.extend(random_bytes(rng, 300));
            out.push(hostile(format!("random framed bytes #{i}"), b));
        }
        return out;
    }
    if alpn == Alpn::RaftMux {
        return hostile_mux_streams(rng, cluster_id, out);
    }
    // A frame that is valid on this ALPN (after the prefix, on raft-shard).
    let (prefix, valid) = match alpn {
        Alpn::Client => {
            let env = ClientEnvelope {
                version: CLIENT_PROTOCOL_VERSION,
                hops: 0,
                request: ClientRequest::Get { key: b"good/0".to_vec(), consistency: ReadConsistency::Stale },
                token: None,
            };
            (Vec::new(), encode_frame(&env).unwrap())
        }
        Alpn::Raft => (Vec::new(), harmless_vote(cluster_id, 0)),
        Alpn::RaftShard => (encode_shard_prefix(1).to_vec(), harmless_vote(cluster_id, 1)),
        Alpn::RaftMux | Alpn::Gossip => unreachable!(),
    };
    let with_prefix = |body: &[u8]| [prefix.as_slice(), body].concat();
    for i in 0..5 {
        // A correct length prefix around random bytes; the first payload byte is never a valid
        // client protocol version, so no random request is ever served.
        let mut payload = random_bytes(rng, 200);
        payload.insert(0, rng.random_range(CLIENT_PROTOCOL_VERSION as u8 + 1..=127));
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend(payload);
        out.push(hostile(format!("random payload #{i}"), with_prefix(&frame)));
    }
    for cut in [1, 3, valid.len() / 2, valid.len() - 1] {
        out.push(hostile(format!("truncated by {cut}"), with_prefix(&valid[..valid.len() - cut])));
    }
    for len in [u32::MAX, MAX_FRAME_BYTES as u32 + 1, MAX_FRAME_BYTES as u32 - 1, 1 << 20] {
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend(random_bytes(rng, 64));
        out.push(hostile(format!("length prefix {len}"), with_prefix(&frame)));
    }
    if alpn == Alpn::RaftShard {
        out.push(hostile("short shard prefix", vec![0, 0]));
        out.push(hostile("prefix only", encode_shard_prefix(1).to_vec()));
        for shard in [2, 99, 65_536, u32::MAX, rng.random_range(3..u32::MAX)] {
            let mut b = encode_shard_prefix(shard).to_vec();
            b.extend(harmless_vote(cluster_id, shard));
            out.push(Hostile {
                what: format!("wrong shard {shard}"),
                bytes: b,
                expect_unknown_shard: Some(shard),
                then_vote: None,
            });
        }
    }
    out
}

/// `raft-mux` streams: random payloads and oversized or truncated messages under a valid id,
/// unknown shards, and undecodable envelopes followed by a valid request on the same stream.
fn hostile_mux_streams(rng: &mut StdRng, cluster_id: ClusterId, mut out: Vec<Hostile>) -> Vec<Hostile> {
    let valid = mux_message(5, 1, &harmless_vote(cluster_id, 1));
    for i in 0..5 {
        let payload = random_bytes(rng, 200);
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend(payload);
        let mut bytes = mux_message(i, 1, &frame);
        bytes.extend(mux_message(1000 + i, 1, &harmless_vote(cluster_id, 1)));
        out.push(Hostile {
            what: format!("random envelope #{i}, then a vote"),
            bytes,
            expect_unknown_shard: None,
            then_vote: Some(1000 + i),
        });
    }
    for cut in [1, 5, 9, 13, valid.len() / 2, valid.len() - 1] {
        out.push(hostile(format!("mux message truncated by {cut}"), valid[..valid.len() - cut].to_vec()));
    }
    for len in [u32::MAX, MAX_FRAME_BYTES as u32 + 1, MAX_FRAME_BYTES as u32 - 1, 1 << 20] {
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend(random_bytes(rng, 64));
        out.push(hostile(format!("mux length prefix {len}"), mux_message(7, 0, &frame)));
    }
    for shard in [2, 99, u32::MAX, rng.random_range(3..u32::MAX)] {
        out.push(Hostile {
            what: format!("mux wrong shard {shard}"),
            bytes: mux_message(9, shard, &harmless_vote(cluster_id, shard)),
            expect_unknown_shard: Some(shard),
            then_vote: None,
        });
    }
    out
}

/// Opens a connection to `ticket` on `alpn`, reusing `slot` while it lives.
async fn connection(ep: &Endpoint, ticket: &NodeTicket, alpn: Alpn, slot: &mut Option<Connection>) -> Connection {
    if let Some(c) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
        return c.clone();
    }
    let c = ep.connect(ticket.endpoint_addr(), alpn.bytes()).await.unwrap_or_else(|e| panic!("{alpn:?}: connect: {e}"));
    *slot = Some(c.clone());
    c
}

/// Throws one hostile stream at the node and checks what came back.
async fn throw(conn: &Connection, alpn: Alpn, h: &Hostile) {
    let Ok((mut send, mut recv)) = conn.open_bi().await else { return };
    // The node may stop reading early (oversized frames); a failed write is fine then.
    let _ = send.write_all(&h.bytes).await;
    let _ = send.finish();
    let wait = Duration::from_secs(if alpn == Alpn::Gossip { 1 } else { 10 });
    match alpn {
        Alpn::Client => {
            let resp = tokio::time::timeout(wait, read_frame::<_, ClientResult>(&mut recv, MAX_FRAME_BYTES)).await;
            match resp {
                Ok(Err(_)) => {} // stream closed without an answer
                Ok(Ok(Err(
                    ApiError::InvalidRequest(_) | ApiError::TooLarge { .. } | ApiError::UnsupportedVersion { .. },
                ))) => {}
                Ok(Ok(other)) => panic!("client ALPN, {}: answered {other:?}", h.what),
                Err(_) => panic!("client ALPN, {}: no answer and the stream stayed open", h.what),
            }
        }
        Alpn::Raft | Alpn::RaftShard => {
            let resp = tokio::time::timeout(wait, read_frame::<_, RaftResponse>(&mut recv, MAX_FRAME_BYTES)).await;
            match (resp, h.expect_unknown_shard) {
                (Ok(Ok(RaftResponse::Refused(RaftRefusal::UnknownShard(s)))), Some(want)) => {
                    assert_eq!(s, want, "{alpn:?}, {}", h.what)
                }
                (other, Some(_)) => panic!("{alpn:?}, {}: expected UnknownShard, got {other:?}", h.what),
                (Ok(Err(_)), None) => {}
                (Ok(Ok(RaftResponse::Refused(RaftRefusal::Malformed(_) | RaftRefusal::WrongCluster { .. }))), None) => {
                }
                (Ok(Ok(other)), None) => panic!("{alpn:?}, {}: answered {other:?}", h.what),
                (Err(_), None) => panic!("{alpn:?}, {}: no answer and the stream stayed open", h.what),
            }
        }
        Alpn::RaftMux => {
            let answers = mux_answers(&mut recv, wait)
                .await
                .unwrap_or_else(|| panic!("raft-mux, {}: the stream stayed open after its end", h.what));
            for (id, answer) in &answers {
                match answer {
                    RaftResponse::Refused(RaftRefusal::UnknownShard(s)) if Some(*s) == h.expect_unknown_shard => {}
                    RaftResponse::Refused(RaftRefusal::Malformed(_) | RaftRefusal::WrongCluster { .. })
                        if h.expect_unknown_shard.is_none() => {}
                    RaftResponse::Vote(Ok(v)) if Some(*id) == h.then_vote => {
                        assert!(!v.vote_granted, "raft-mux, {}: a term-0 vote was granted", h.what)
                    }
                    other => panic!("raft-mux, {}: answered {other:?} under id {id}", h.what),
                }
            }
            if let Some(want) = h.expect_unknown_shard {
                assert!(
                    answers
                        .iter()
                        .any(|(_, a)| matches!(a, RaftResponse::Refused(RaftRefusal::UnknownShard(s)) if *s == want)),
                    "raft-mux, {}: {answers:?}",
                    h.what
                );
            }
            if let Some(vote) = h.then_vote {
                assert!(
                    answers.iter().any(|(id, _)| *id == vote),
                    "raft-mux, {}: the vote after it went unanswered: {answers:?}",
                    h.what
                );
            }
        }
        Alpn::Gossip => {
            // Whatever iroh-gossip does with garbage (close the stream or the connection) is fine.
            let _ = tokio::time::timeout(wait, recv.read_to_end(1 << 16)).await;
        }
    }
}

/// One raw request/response exchange on a Raft ALPN.
async fn raft_exchange(ep: &Endpoint, ticket: &NodeTicket, alpn: Alpn, bytes: &[u8]) -> RaftResponse {
    let conn = ep.connect(ticket.endpoint_addr(), alpn.bytes()).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv, MAX_FRAME_BYTES)).await;
    resp.expect("raft answer in time").expect("raft answer decodes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_on_every_alpn_while_a_client_writes() {
    count_panics();
    let seed: u64 =
        std::env::var("ASPEN_BAD_INPUT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("hostile input seed: {seed} (rerun with ASPEN_BAD_INPUT_SEED={seed})");

    let dir = tempfile::tempdir().unwrap();
    let node = start_two_shard_node(dir.path(), 20_000).await;
    let ticket = node.ticket();
    let cluster_id = node.cluster_id();
    assert!(node.base.gossip_discovery.is_some(), "gossip is on by default");

    // The well-behaved client: its own connection, writes and reads until the garbage is over.
    let admin = node.admin_token().expect("admin.token");
    let good = AspenClient::connect(vec![ticket.clone()], Duration::from_secs(20)).await.unwrap().with_token(&admin);
    let done = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let done = done.clone();
        async move {
            let mut acked = BTreeMap::new();
            for i in 0..5_000u32 {
                if done.load(Ordering::SeqCst) && i >= 20 {
                    break;
                }
                let (key, value) = (format!("good/{i}"), format!("v{i}"));
                good.put(key.clone(), value.clone()).await.unwrap_or_else(|e| panic!("good put {key}: {e}"));
                acked.insert(key.clone(), value.clone());
                let got = good.get(key.clone()).await.unwrap_or_else(|e| panic!("good get {key}: {e}"));
                assert_eq!(got.map(|kv| kv.value), Some(value.into_bytes()), "good read of {key}");
            }
            good.close().await;
            acked
        }
    });

    // The hostile client: one endpoint, a connection per ALPN (re-opened if the node closes it).
    // It is a member (a learner of shard 0), so every ALPN lets it in: garbage from a member
    // must not hurt either (a non-member is refused before any stream: tests/inprocess/peers.rs).
    let mut rng = StdRng::seed_from_u64(seed);
    let ep = bind_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), None, MemoryLookup::new()).await.unwrap();
    crate::support::admit_as_member(&node, &ep).await;
    let alpns = [Alpn::Client, Alpn::Raft, Alpn::RaftShard, Alpn::RaftMux, Alpn::Gossip];
    let mut plan: Vec<(Alpn, Hostile)> =
        alpns.iter().flat_map(|&a| hostile_streams(&mut rng, a, cluster_id).into_iter().map(move |h| (a, h))).collect();
    // Interleave the ALPNs so that every handler is busy with garbage at once.
    for i in (1..plan.len()).rev() {
        plan.swap(i, rng.random_range(0..=i));
    }
    let mut conns: BTreeMap<usize, Option<Connection>> = BTreeMap::new();
    for (alpn, h) in &plan {
        let slot = conns.entry(*alpn as usize).or_default();
        let conn = connection(&ep, &ticket, *alpn, slot).await;
        throw(&conn, *alpn, h).await;
    }
    // Uni streams of garbage as well (gossip and the request/response ALPNs never expect them).
    for alpn in alpns {
        let slot = conns.entry(alpn as usize).or_default();
        let conn = connection(&ep, &ticket, alpn, slot).await;
        if let Ok(mut send) = conn.open_uni().await {
            let _ = send.write_all(&random_bytes(&mut rng, 500)).await;
            let _ = send.finish();
        }
    }
    done.store(true, Ordering::SeqCst);
    let acked = writer.await.expect("the well-behaved client never failed");
    println!("{} hostile streams thrown, {} writes acknowledged meanwhile", plan.len(), acked.len());

    // Every acknowledged write is there, read by a fresh client.
    let fresh = AspenClient::connect(vec![ticket.clone()], Duration::from_secs(20)).await.unwrap().with_token(&admin);
    for (k, v) in &acked {
        let got = fresh.get(k.clone()).await.unwrap().map(|kv| kv.value);
        assert_eq!(got, Some(v.clone().into_bytes()), "acknowledged write {k}");
    }
    fresh.put("after", "hostile").await.unwrap();
    fresh.close().await;

    // Every Raft ALPN still gives typed answers to a raw client: a vote nobody grants, another
    // cluster, a shard not hosted here.
    for (alpn, prefix, shard) in [(Alpn::Raft, None, 0), (Alpn::RaftShard, Some(0), 0), (Alpn::RaftShard, Some(1), 1)] {
        let mut bytes = prefix.map(|s: u32| encode_shard_prefix(s).to_vec()).unwrap_or_default();
        bytes.extend(harmless_vote(cluster_id, shard));
        match raft_exchange(&ep, &ticket, alpn, &bytes).await {
            RaftResponse::Vote(Ok(v)) => assert!(!v.vote_granted, "{alpn:?} shard {shard}: a term-0 vote was granted"),
            other => panic!("{alpn:?} shard {shard}: {other:?}"),
        }
    }
    let resp = raft_exchange(&ep, &ticket, Alpn::Raft, &harmless_vote(aspen::api::Id128([9; 16]), 0)).await;
    assert!(matches!(resp, RaftResponse::Refused(RaftRefusal::WrongCluster { .. })), "{resp:?}");
    let mut bytes = encode_shard_prefix(7).to_vec();
    bytes.extend(harmless_vote(cluster_id, 7));
    let resp = raft_exchange(&ep, &ticket, Alpn::RaftShard, &bytes).await;
    assert!(matches!(resp, RaftResponse::Refused(RaftRefusal::UnknownShard(7))), "{resp:?}");
    // The mux answers several requests on one stream, each under its own id.
    let conn = ep.connect(ticket.endpoint_addr(), RAFT_MUX_ALPN).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut bytes = mux_message(1, 0, &harmless_vote(cluster_id, 0));
    bytes.extend(mux_message(2, 1, &harmless_vote(cluster_id, 1)));
    bytes.extend(mux_message(3, 7, &harmless_vote(cluster_id, 7)));
    bytes.extend(mux_message(4, 0, &harmless_vote(aspen::api::Id128([9; 16]), 0)));
    send.write_all(&bytes).await.unwrap();
    send.finish().unwrap();
    let mut answers = mux_answers(&mut recv, Duration::from_secs(10)).await.expect("mux stream ends after its answers");
    answers.sort_by_key(|(id, _)| *id);
    assert_eq!(answers.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2, 3, 4], "{answers:?}");
    assert!(matches!(&answers[0].1, RaftResponse::Vote(Ok(v)) if !v.vote_granted), "{answers:?}");
    assert!(matches!(&answers[1].1, RaftResponse::Vote(Ok(v)) if !v.vote_granted), "{answers:?}");
    assert!(matches!(&answers[2].1, RaftResponse::Refused(RaftRefusal::UnknownShard(7))), "{answers:?}");
    assert!(matches!(&answers[3].1, RaftResponse::Refused(RaftRefusal::WrongCluster { .. })), "{answers:?}");
    // ...and the gossip ALPN still accepts connections.
    ep.connect(ticket.endpoint_addr(), iroh_gossip::ALPN).await.expect("gossip ALPN still accepts");

    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "hostile input made something panic (see the log above)");
    ep.close().await;
    node.shutdown().await;
}

/// An apply that fails inside the state machine (redb panics on a damaged page; here a put of
/// the fault-injection key that panics the same way) stops that shard on the node, loudly: the
/// write is answered `unavailable` with the reason, status names it (role Shutdown, the health
/// that `/ready` reports) — and the node's other shard and its other answers go on (before,
/// the shard hung: writes timed out and status said "ok").
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_apply_stops_its_shard_loudly_not_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_two_shard_node(dir.path(), 10_000).await;
    let client = admin_client(&node, 20).await;
    let poison = aspen::storage::state_machine::PANIC_IN_APPLY_KEY.to_vec();
    let router = aspen::sharding::ShardRouter::new(2);
    let poisoned = router.shard_for_key(&poison);
    // A key of each shard, written before.
    let keys: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
    let of = |shard| keys.iter().find(|k| router.shard_for_key(k.as_bytes()) == shard).unwrap().clone();
    let (stopped_key, other_key) = (of(poisoned), of(1 - poisoned));
    client.put(stopped_key.clone(), "1").await.expect("put");
    client.put(other_key.clone(), "1").await.expect("put");

    match client.put(poison, "x").await {
        Err(ClientError::Api(ApiError::Unavailable(msg))) => {
            assert!(msg.contains("applying entries panicked"), "{msg}")
        }
        other => panic!("the put whose apply fails: {other:?}"),
    }
    let st = node.shards[&poisoned].status();
    assert_eq!(st.role, "Shutdown", "{st:?}");
    assert!(format!("{:?}", st.health).contains("applying entries panicked"), "{:?}", st.health);
    match client.get(stopped_key.clone()).await {
        Err(ClientError::Api(ApiError::Unavailable(_))) => {}
        other => panic!("a read of the stopped shard: {other:?}"),
    }
    // The other shard serves on, and so does the node.
    assert_eq!(node.shards[&(1 - poisoned)].status().role, "Leader");
    client.put(other_key.clone(), "2").await.expect("a put to the other shard");
    assert_eq!(client.get(other_key).await.expect("get").map(|kv| kv.value), Some(b"2".to_vec()));
    let status = client.cluster_status().await.expect("cluster status");
    assert_eq!(status.nodes.len(), 1);
    client.close().await;
    node.shutdown().await;
}

/// An apply that is stuck (a hung disk; here the fault-injection key whose apply waits) shows
/// in `cluster status` as it does in `/ready` — the shard's health names how far it applied and
/// what was committed a second ago — however few entries wait behind it (before, status counted
/// the entries not applied and said "ok" below 10,000); once the apply goes on, the write is
/// acknowledged and the shard is healthy again.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_apply_shows_in_status_however_few_entries_wait() {
    use aspen::storage::state_machine::{STALL_APPLY, STALL_APPLY_KEY};
    let dir = tempfile::tempdir().unwrap();
    let node = start_two_shard_node(dir.path(), 120_000).await;
    let client = Arc::new(admin_client(&node, 120).await);
    let stalled = aspen::sharding::ShardRouter::new(2).shard_for_key(STALL_APPLY_KEY);
    let health_of = |status: &aspen::api::ClusterStatus, shard: ShardId| {
        status.shards.iter().find(|s| s.shard == shard).map(|s| s.health.clone()).expect("the shard in status")
    };
    let before = client.cluster_status().await.expect("status");
    assert!(health_of(&before, stalled).healthy, "{before:?}");

    STALL_APPLY.store(true, Ordering::SeqCst);
    let writer = client.clone();
    let put = tokio::spawn(async move { writer.put(STALL_APPLY_KEY.to_vec(), "x").await });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let status = client.cluster_status().await.expect("status while the apply is stuck");
        let h = health_of(&status, stalled);
        if !h.healthy {
            break (h, status);
        }
        assert!(std::time::Instant::now() < deadline, "the stuck apply never showed in status: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (h, status) = seen;
    assert!(h.reason.contains("committed a second ago"), "{h:?}");
    assert!(h.apply_lag < 10, "few entries wait behind the stuck one: {h:?}");
    assert!(health_of(&status, 1 - stalled).healthy, "the other shard is fine: {status:?}");
    assert!(node.shards[&stalled].readiness().is_err(), "/ready says so too");
    assert!(!put.is_finished(), "the write waits for its apply");

    STALL_APPLY.store(false, Ordering::SeqCst);
    put.await.unwrap().expect("the write is acknowledged once its apply goes on");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = client.cluster_status().await.expect("status");
        if health_of(&status, stalled).healthy {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the shard never turned healthy again: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(node.shards[&stalled].readiness().is_ok());
    node.shutdown().await;
}

/// A read that fails inside the state machine (redb panics on some damaged pages; here a get of
/// the fault-injection key that panics the same way) answers `unavailable` naming the file —
/// a client with other members asks them — and the node, the shard and every other read go
/// on (before, the panic ended the request's task and the client saw its stream break).
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_read_answers_unavailable_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_two_shard_node(dir.path(), 10_000).await;
    let client = admin_client(&node, 20).await;
    let poison = aspen::storage::state_machine::PANIC_IN_READ_KEY.to_vec();
    let shard = aspen::sharding::ShardRouter::new(2).shard_for_key(&poison);
    client.put("k", "v").await.expect("put");
    for consistency in [ReadConsistency::Linearizable, ReadConsistency::Stale] {
        match client.get_with(poison.clone(), consistency).await {
            Err(ClientError::Api(ApiError::Unavailable(msg))) => {
                assert!(msg.contains("panicked") && msg.contains("state-machine.db"), "{msg}");
                assert!(msg.contains(&format!("shard {shard}")), "{msg}");
            }
            other => panic!("a read that fails in the state machine ({consistency:?}): {other:?}"),
        }
    }
    // Everything else serves on: other reads, writes, the shard's health.
    assert_eq!(client.get("k").await.expect("get").map(|kv| kv.value), Some(b"v".to_vec()));
    client.put("k", "w").await.expect("put after");
    assert_eq!(client.get("k").await.expect("get").map(|kv| kv.value), Some(b"w".to_vec()));
    let st = node.shards[&shard].status();
    assert_eq!(st.role, "Leader", "{st:?}");
    assert!(st.health.healthy, "{st:?}");
    client.close().await;
    node.shutdown().await;
}

/// A backup whose read of the state machine fails (the fault-injection key, stored, panics the
/// stream that reaches it as a damaged page would) fails with that reason and the hint, not
/// "the backup's writer stopped"; once the key is gone the same node saves a whole backup.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_read_fails_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_two_shard_node(dir.path(), 10_000).await;
    let client = admin_client(&node, 20).await;
    let poison = aspen::storage::state_machine::PANIC_IN_READ_KEY.to_vec();
    client.put(poison.clone(), "x").await.expect("put");
    client.put("k", "v").await.expect("put");
    let path = dir.path().join("backup.aspen");
    match client.save_backup(&path, |_| {}).await {
        Err(aspen::client::backup::SaveError::Client(ClientError::Api(ApiError::Internal(msg)))) => {
            assert!(msg.contains("panicked") && msg.contains("damaged"), "{msg}");
        }
        other => panic!("a backup whose read fails: {other:?}"),
    }
    assert!(!path.exists(), "no backup file from a failed save");
    client.delete(poison).await.expect("delete");
    let header = client.save_backup(&path, |_| {}).await.expect("a backup once the key is gone");
    assert_eq!(header.num_shards, 2);
    assert!(path.exists());
    client.close().await;
    node.shutdown().await;
}
