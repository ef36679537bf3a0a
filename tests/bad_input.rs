//! Hostile input at the client ALPN: random bytes, truncated frames, unknown request variants,
//! old protocol versions, oversized frames and values. Each gets a typed error on its stream
//! (or that stream closed); the node keeps serving, on the same connection and on a second,
//! concurrent client connection.

use std::{net::SocketAddr, time::Duration};

use aspen::{
    api::{
        frame::{encode_frame, read_frame},
        ApiError, ClientEnvelope, ClientRequest, ClientResult, ReadConsistency, CLIENT_ALPN, MAX_FRAME_BYTES,
    },
    cluster::{bootstrap_node, endpoint::bind_endpoint},
    AspenClient, ClientError, NodeConfig,
};
use iroh::{address_lookup::MemoryLookup, endpoint::Connection};

async fn start_node(dir: &std::path::Path) -> aspen::cluster::NodeHandle {
    let config = NodeConfig {
        data_dir: dir.to_path_buf(),
        bind_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        limits: aspen::config::LimitsConfig { max_value_bytes: 64 * 1024, ..Default::default() },
        ..Default::default()
    };
    bootstrap_node(config).await.expect("node starts")
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
    let good = AspenClient::connect(vec![ticket.clone()], Duration::from_secs(10)).await.unwrap();
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
        version: 1,
        hops: 0,
        request: ClientRequest::Get { key: b"stable".to_vec(), consistency: ReadConsistency::Stale },
    })
    .unwrap();
    let resp = raw_exchange(&conn, &full[..full.len() - 3]).await;
    assert!(matches!(resp, Some(Err(ApiError::InvalidRequest(ref m))) if m.contains("truncated")), "{resp:?}");
    // ...and the same connection still serves a complete one.
    let resp = raw_exchange(&conn, &full).await;
    assert!(matches!(resp, Some(Ok(_))), "{resp:?}");

    // 4. An unknown request variant (version 1, hops 0, variant index 200).
    let resp = raw_exchange(&conn, &frame_of_raw_payload(&[1, 0, 200, 1, 0])).await;
    assert!(matches!(resp, Some(Err(ApiError::InvalidRequest(_)))), "{resp:?}");

    // 5. An unsupported protocol version.
    let mut newer =
        encode_frame(&ClientEnvelope { version: 1, hops: 0, request: ClientRequest::ClusterStatus }).unwrap();
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

    ep.close().await;
    check_good("closed garbage connection").await;
    good.close().await;
    node.shutdown().await;
}
