//! Watches over three in-process nodes with four shards: every write to watched keys (puts,
//! deletes, prefix deletes, lease revocations) arrives once, in order, with previous values;
//! a watch resumes on another node exactly after its last event; a start older than the
//! history fails as compacted; a watcher that stops reading is cancelled while writes go on; a
//! watch served by a node removed from the cluster moves to a member; a stopping node tells its
//! watches where they stand, so they resume on a member that restarted a moment ago.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use crate::support::{start_three, wait_shards_converged, wait_until, InProcNode};
use aspen::{
    api::{EventKind, WatchEvent, WatchPosition, WatchRequest, WatchStart},
    client::{WatchItem, WatchStream},
    sharding::ShardRouter,
    ApiError, ClientError,
};

fn config(root: &std::path::Path, id: u64) -> aspen::NodeConfig {
    let mut c = InProcNode::config(root, id);
    c.sharding.enabled = true;
    c.sharding.num_shards = 4;
    // The node's history, split among its 4 shards: 200 events each.
    c.watch.history_entries = 800;
    c.watch.max_lag = 64;
    c
}

fn prefix_watch(prefix: &str, prev_kv: bool, start: WatchStart) -> WatchRequest {
    WatchRequest { key: prefix.into(), prefix: true, prev_kv, start }
}

/// Reads events until `n` arrived (panics after 60 s or on an error).
async fn take_events(stream: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(Ok(WatchItem::Events(events)))) => out.extend(events),
            Ok(Some(Ok(WatchItem::Created(_)))) => {}
            other => panic!("after {} of {n} events: {other:?}", out.len()),
        }
    }
    out
}

/// (kind, key, value) of each event, per key in arrival order.
fn per_key(events: &[WatchEvent]) -> BTreeMap<String, Vec<(EventKind, String)>> {
    let mut map: BTreeMap<String, Vec<(EventKind, String)>> = BTreeMap::new();
    for e in events {
        let key = String::from_utf8(e.key.clone()).unwrap();
        map.entry(key).or_default().push((e.kind, String::from_utf8(e.value.clone()).unwrap()));
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_see_every_write_once_in_order_and_resume_anywhere() {
    let root = tempfile::tempdir().unwrap();
    let nodes = start_three((1..=3).map(|id| config(root.path(), id)).collect()).await;
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    let writer = nodes[0].client().await;
    writer.balance_leaders().await.unwrap();
    let watcher = Arc::new(nodes[1].client().await);
    let router = ShardRouter::new(4);

    // A prefix watch through node 2, with previous values; a key watch through node 3.
    let mut all = watcher.watch(prefix_watch("w/", true, WatchStart::Now)).await.unwrap();
    let created = match all.next().await {
        Some(Ok(WatchItem::Created(p))) => p,
        other => panic!("a watch starts with its positions: {other:?}"),
    };
    assert_eq!(created.iter().map(|p| p.shard).collect::<Vec<_>>(), [0, 1, 2, 3], "a prefix watch covers every shard");
    let one_client = Arc::new(nodes[2].client().await);
    let mut one = one_client
        .watch(WatchRequest { key: b"w/k0".to_vec(), prefix: false, prev_kv: false, start: WatchStart::Now })
        .await
        .unwrap();
    let mut expected: Vec<(String, EventKind, String)> = Vec::new();
    for round in 0..3 {
        for k in 0..12 {
            let (key, value) = (format!("w/k{k}"), format!("r{round}"));
            writer.put(key.clone(), value.clone()).await.unwrap();
            expected.push((key, EventKind::Put, value));
        }
    }
    writer.put("other/x", "not watched").await.unwrap();
    assert!(writer.delete("w/k3").await.unwrap());
    expected.push(("w/k3".into(), EventKind::Delete, String::new()));
    // A lease's revocation shows up as deletes of its keys.
    let (lease, _) = writer.grant_lease(60).await.unwrap();
    writer.put_with_lease("w/leased", "l", lease).await.unwrap();
    expected.push(("w/leased".into(), EventKind::Put, "l".into()));
    writer.revoke_lease(lease).await.unwrap();
    expected.push(("w/leased".into(), EventKind::Delete, String::new()));
    // …and so does its expiry: with no keep-alive the key goes after the TTL.
    let (short, _) = writer.grant_lease(2).await.unwrap();
    writer.put_with_lease("w/expiring", "e", short).await.unwrap();
    expected.push(("w/expiring".into(), EventKind::Put, "e".into()));
    expected.push(("w/expiring".into(), EventKind::Delete, String::new()));
    // A prefix delete over every shard: one delete per key that existed.
    let deleted = writer.delete_prefix("w/k1").await.unwrap();
    assert_eq!(deleted, 3, "w/k1, w/k10, w/k11");
    for k in ["w/k1", "w/k10", "w/k11"] {
        expected.push((k.into(), EventKind::Delete, String::new()));
    }

    let got = take_events(&mut all, expected.len()).await;
    let mut want: BTreeMap<String, Vec<(EventKind, String)>> = BTreeMap::new();
    for (k, kind, v) in &expected {
        want.entry(k.clone()).or_default().push((*kind, v.clone()));
    }
    assert_eq!(per_key(&got), want, "every write to a watched key once, in order per key");
    for e in &got {
        assert_eq!(e.shard, router.shard_for_key(&e.key), "event of {:?} in its key's shard", e.key);
        let k = String::from_utf8(e.key.clone()).unwrap();
        match (e.kind, k.as_str()) {
            (EventKind::Put, _) if e.value == b"r0" => assert_eq!(e.prev_value, None, "{e:?}"),
            (EventKind::Put, "w/leased") => assert_eq!(e.lease, lease),
            (EventKind::Put, "w/expiring") => assert_eq!(e.lease, short),
            (EventKind::Put, _) => assert!(e.prev_value.is_some(), "{e:?}"),
            (EventKind::Delete, _) => assert!(e.prev_value.is_some(), "a delete carries the value it removed: {e:?}"),
        }
    }
    // Per shard, positions only grow.
    for s in 0..4 {
        let pos: Vec<(u64, u32)> = got.iter().filter(|e| e.shard == s).map(|e| (e.revision, e.index)).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "shard {s}: {pos:?}");
    }
    let single = take_events(&mut one, 3).await;
    assert!(single.iter().all(|e| e.key == b"w/k0" && e.prev_value.is_none()), "{single:?}");
    // A write to another key of w/k0's shard, after its last event: the quiet key watch is told
    // its progress, so it could resume past it (on a member whose history starts later).
    let k0_shard = router.shard_for_key(b"w/k0");
    let other = (0..).map(|i| format!("other/{i}")).find(|k| router.shard_for_key(k.as_bytes()) == k0_shard).unwrap();
    let later = writer.put(other, "x").await.unwrap();
    assert!(later > single[2].revision);
    wait_until(30, "the key watch's position passes a later write to another key", || {
        one.positions().iter().any(|p| p.shard == k0_shard && p.revision >= later)
    })
    .await;

    // The stream knows where it stands: at the last event of each shard, or past it once the
    // shard's progress (later entries without a watched event) was reported.
    for p in all.positions() {
        let last = got.iter().rfind(|e| e.shard == p.shard).expect("events in every shard").position();
        assert!(p == last || last.precedes(p.revision, p.index), "{p:?} before the last event {last:?}");
    }
    // Resume on another node after the first half: exactly the second half follows.
    let half = got.len() / 2;
    let mut at: Vec<WatchPosition> = created.clone();
    for e in &got[..half] {
        let p = at.iter_mut().find(|p| p.shard == e.shard).unwrap();
        *p = e.position();
    }
    let resumer = Arc::new(nodes[2].client().await);
    let mut resumed = resumer.watch(prefix_watch("w/", true, WatchStart::After(at.clone()))).await.unwrap();
    let rest = take_events(&mut resumed, got.len() - half).await;
    let mut want_rest = got[half..].to_vec();
    let mut rest_sorted = rest.clone();
    want_rest.sort_by_key(|e| (e.shard, e.revision, e.index));
    rest_sorted.sort_by_key(|e| (e.shard, e.revision, e.index));
    assert_eq!(rest_sorted, want_rest, "resumed exactly after the first half, on another node");

    // History keeps 200 events per shard (800 on the node): 300 more writes to one shard compact
    // the old start.
    let hot = (0..10_000).map(|i| format!("hot/{i}")).find(|k| router.shard_for_key(k.as_bytes()) == 1).unwrap();
    for i in 0..300 {
        writer.put(hot.clone(), format!("{i}")).await.unwrap();
    }
    let old = at.iter().find(|p| p.shard == 1).copied().unwrap();
    match resumer.watch(prefix_watch("w/", false, WatchStart::After(at.clone()))).await {
        Err(ClientError::Api(ApiError::Compacted { shard: 1, oldest })) => assert!(oldest > old.revision),
        other => panic!("expected compacted for shard 1, got {other:?}"),
    }

    // A watcher that stops reading: cancelled once 64 writes behind; writes never wait for it.
    let slow_client = Arc::new(nodes[1].client().await);
    let mut slow = slow_client.watch(prefix_watch("slow/", false, WatchStart::Now)).await.unwrap();
    let big = "x".repeat(64 * 1024);
    let started = std::time::Instant::now();
    for i in 0..400 {
        writer.put(format!("slow/{}", i % 7), big.clone()).await.unwrap();
    }
    println!("400 writes of 64 KiB with a stalled watcher: {:?}", started.elapsed());
    let mut cancelled = None;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(60), slow.next()).await {
        if let Err(e) = item {
            cancelled = Some(e);
            break;
        }
    }
    match cancelled {
        Some(ClientError::Api(ApiError::WatchCancelled(why))) => assert!(why.contains("behind"), "{why}"),
        other => panic!("the stalled watcher was not cancelled: {other:?}"),
    }
    // The other watchers were not disturbed.
    writer.put("w/after", "1").await.unwrap();
    let after = take_events(&mut all, 1).await;
    assert_eq!(after[0].key, b"w/after");
}

/// A node removed from the cluster while it serves a watch gets no more entries, so the watch
/// would go quiet while the others move on (until the history its resume needs rolled away: a
/// fault scenario saw exactly that). The node ends it once cut off, and the client resumes on a
/// member: the writes after the removal arrive, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_served_by_a_removed_node_moves_to_a_member() {
    let root = tempfile::tempdir().unwrap();
    let nodes = start_three((1..=3).map(|id| config(root.path(), id)).collect()).await;
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    let writer = nodes[1].client().await;
    // Node 1's ticket first: the watch is served there.
    let watcher = Arc::new(crate::support::client_of(&[&nodes[0], &nodes[1], &nodes[2]]).await);
    let mut watch = watcher.watch(prefix_watch("m/", false, WatchStart::Now)).await.unwrap();
    for i in 0..8 {
        writer.put(format!("m/before/{i}"), "b").await.unwrap();
    }
    let before = take_events(&mut watch, 8).await;
    assert!(before.iter().all(|e| e.key.starts_with(b"m/before/")), "{before:?}");

    writer.remove(1).await.expect("remove node 1");
    wait_until(60, "node 1 out of every shard's voters on nodes 2 and 3", || {
        nodes[1..].iter().all(|n| n.handle().shards.values().all(|s| !s.status().voters.contains(&1)))
    })
    .await;
    // Node 1 keeps running; these writes never reach it.
    for i in 0..8 {
        writer.put(format!("m/after/{i}"), "a").await.unwrap();
    }
    let after = take_events(&mut watch, 8).await;
    let keys: std::collections::BTreeSet<Vec<u8>> = after.iter().map(|e| e.key.clone()).collect();
    assert_eq!(keys.len(), 8, "each write after the removal once: {after:?}");
    assert!(keys.iter().all(|k| k.starts_with(b"m/after/")), "{after:?}");
}

/// A node that stops gracefully first tells each watch it serves where it stands in every shard,
/// then says it is shutting down. A watch of a quiet key otherwise learns its shard's progress
/// only every couple of seconds, and a rolling restart moves faster than that: its next server,
/// restarted a moment ago, may keep history only from its restart, and resuming from the last
/// event would be refused as compacted on every member (a fault scenario saw exactly that).
/// Without the final report the raw stream's check fails whenever the writes and the stop take
/// less than those two seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_node_tells_its_watches_where_they_stand() {
    use aspen::api::{
        frame::{decode, encode_frame, read_frame_len, read_frame_payload},
        ClientEnvelope, ClientRequest, ClientResponse, ClientResult, CLIENT_ALPN, CLIENT_PROTOCOL_VERSION,
        MAX_FRAME_BYTES,
    };
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_three((1..=3).map(|id| config(root.path(), id)).collect()).await;
    wait_shards_converged(&[&nodes[0], &nodes[1], &nodes[2]], 60).await;
    let writer = nodes[0].client().await;
    let router = ShardRouter::new(4);
    let shard = router.shard_for_key(b"q/k");
    let request = WatchRequest { key: b"q/k".to_vec(), prefix: false, prev_kv: false, start: WatchStart::Now };

    // The same watch through node 2 twice: on a raw stream, to see its frames, and through the
    // client, which resumes it elsewhere.
    let ep = aspen::transport::endpoint::bind_endpoint(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        None,
        iroh::address_lookup::MemoryLookup::new(),
    )
    .await
    .unwrap();
    let conn = ep.connect(nodes[1].ticket().endpoint_addr(), CLIENT_ALPN).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let envelope = ClientEnvelope {
        version: CLIENT_PROTOCOL_VERSION,
        hops: 0,
        request: ClientRequest::Watch(request.clone()),
        token: Some(nodes[1].admin_token()),
    };
    send.write_all(&encode_frame(&envelope).unwrap()).await.unwrap();
    // Read as they come, and end our side after an error frame (the watch's last), as a client
    // does: the stopping node waits for that before it closes the connection, which would
    // discard what we had not read yet.
    let (frames_tx, mut frames) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let read = async {
                let size = read_frame_len(&mut recv, MAX_FRAME_BYTES).await?;
                read_frame_payload(&mut recv, size).await
            };
            let frame = match read.await {
                Ok(payload) => decode::<ClientResult>(&payload).map_err(|e| format!("an undecodable frame: {e}")),
                Err(e) => Err(format!("the stream ended: {e}")),
            };
            let last = !matches!(frame, Ok(Ok(_)));
            if last {
                let _ = send.finish();
            }
            if frames_tx.send(frame).is_err() || last {
                return;
            }
        }
    });
    let mut next_frame = async || -> ClientResult {
        tokio::time::timeout(Duration::from_secs(60), frames.recv())
            .await
            .expect("a frame within 60 s")
            .expect("the reader sends every frame and why the stream ended")
            .unwrap_or_else(|why| panic!("a frame before the stream ended: {why}"))
    };
    assert!(matches!(next_frame().await, Ok(ClientResponse::WatchCreated { .. })));
    let watcher = Arc::new(nodes[1].client().await);
    let mut watch = watcher.watch(request.clone()).await.unwrap();

    writer.put("q/k", "1").await.unwrap();
    assert!(matches!(next_frame().await, Ok(ClientResponse::WatchEvents(e)) if e.len() == 1));
    take_events(&mut watch, 1).await;
    // Writes to other keys of the shard: the watched key stays quiet.
    let others: Vec<String> = (0..)
        .map(|i| format!("q/other/{i}"))
        .filter(|k| router.shard_for_key(k.as_bytes()) == shard)
        .take(20)
        .collect();
    let mut last = 0;
    for k in &others {
        last = writer.put(k.clone(), "x").await.unwrap();
    }

    // As an operator's rolling restart would: node 2 has applied them.
    wait_until(60, "node 2 applied the writes", || {
        nodes[1].handle().shards[&shard].status().last_applied >= aspen::api::revision_entry(last)
    })
    .await;
    nodes[1].stop().await;
    // The raw stream: where the watch stands (past those writes), then the reason it ends.
    let mut told = None;
    loop {
        match next_frame().await {
            Ok(ClientResponse::WatchProgress { positions }) => told = positions.into_iter().find(|p| p.shard == shard),
            Err(ApiError::Unavailable(why)) => {
                assert!(why.contains("shutting down"), "{why}");
                break;
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    let told = told.expect("the stopping node said where the watch stands");
    assert!(told.revision >= last, "told where it stood, past the writes to other keys ({last}): {told:?}");

    // The client's watch resumed on another member: the next write arrives, once.
    writer.put("q/k", "2").await.unwrap();
    let next = take_events(&mut watch, 1).await;
    assert_eq!((next[0].key.as_slice(), next[0].value.as_slice()), (&b"q/k"[..], &b"2"[..]));
    assert!(watch.positions().iter().any(|p| p.shard == shard && p.revision > last), "{:?}", watch.positions());
    nodes[1].restart().await;
    writer.put("q/k", "3").await.unwrap();
    let next = take_events(&mut watch, 1).await;
    assert_eq!(next[0].value, b"3", "each write once: {next:?}");
}
