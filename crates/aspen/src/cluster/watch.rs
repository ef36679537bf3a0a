//! Watches, as the node a client talks to serves them (docs/design.md §17): from each watched
//! shard's [`WatchHub`] on this node — its applied state, so never ahead of what is committed —
//! the retained events after the watch's start, then the live ones, filtered to the key or
//! prefix, one task per shard feeding the client's stream.
//!
//! Owns: where a watch starts in each shard (now, a revision on a one-shard cluster, or a
//! resume token's positions), and ending a watch with a clear error when it cannot stay
//! complete: its start was compacted away, it fell behind the live feed, the node replaced
//! a shard's state with a snapshot, or the node is cut off from a shard's group.
//!
//! Never: hold events for a slow watcher. Its frames wait in a small channel; once that is
//! full its shard tasks stop reading the live feed, fall behind, and the watch is cancelled.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{service::NodeService, validate};
use crate::{
    api::{
        is_reserved_key, ApiError, ClientResponse, ClientResult, ShardId, WatchEvent, WatchPosition, WatchRequest,
        WatchStart,
    },
    raft::node::RaftNode,
    storage::watch::{EventBatch, Subscription, WatchHub},
};

/// Frames a watch may have waiting for the client before its shard tasks stop reading.
const STREAM_BUFFER: usize = 8;
/// How often a shard task waiting for the client looks at how far the live feed ran ahead.
const LAG_CHECK: std::time::Duration = std::time::Duration::from_millis(100);
/// How long a watch's shard task goes without sending the client anything before it reports
/// its progress (if it moved: writes to other keys, leader changes): a watch whose keys are
/// quiet keeps a recent position, so it can resume on a member whose history starts later than
/// its last event (a member that restarted, say).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// Most key and value bytes in one events frame (a prefix delete's events are split).
const MAX_FRAME_EVENT_BYTES: usize = 1024 * 1024;

/// What a watch matches and sends.
#[derive(Clone, Debug)]
struct Filter {
    key: Vec<u8>,
    prefix: bool,
    prev_kv: bool,
}

impl Filter {
    fn matches(&self, key: &[u8]) -> bool {
        !is_reserved_key(key) && if self.prefix { key.starts_with(&self.key) } else { key == self.key.as_slice() }
    }
}

/// What the one serving a watch may ask of its shard tasks while the watch runs.
#[derive(Clone, Debug, Default)]
pub struct WatchAsks {
    /// Each time it changes, every shard task of the watch that has handled all the shard's
    /// applied entries reports where it stands at once (a [`ClientResponse::WatchProgress`], if
    /// it moved since it last told the client): what etcd's progress requests need, which
    /// promise that no event at or before the revision they answer is still to come.
    pub position: Option<watch::Receiver<u64>>,
    /// Once cancelled (the node is stopping), every shard task reports where it stands (if it
    /// moved) and ends; the frames end once all have. A client resumes on another member from
    /// there, so a watch whose keys were quiet does not resume from a position older than that
    /// member's history (one restarted a moment ago keeps history only from its restart).
    pub finish: CancellationToken,
}

impl NodeService {
    /// Starts a watch: checks it, subscribes to every shard it covers on this node, and returns
    /// the frames to stream (the first is [`ClientResponse::WatchCreated`]).
    pub async fn start_watch(&self, request: WatchRequest) -> Result<mpsc::Receiver<ClientResult>, ApiError> {
        self.start_watch_asked(request, WatchAsks::default()).await
    }

    /// [`Self::start_watch`], answering what `asks` asks while it runs.
    pub async fn start_watch_asked(
        &self,
        request: WatchRequest,
        asks: WatchAsks,
    ) -> Result<mpsc::Receiver<ClientResult>, ApiError> {
        if self.cluster_id() == crate::api::ClusterId::default() {
            return Err(ApiError::NotInitialized { node_id: self.node_id });
        }
        self.refuse_if_removed()?;
        validate::check_key_or_prefix(&self.limits, &request.key, request.prefix)?;
        let router = *self.store.router();
        let shards: Vec<ShardId> = if request.prefix && router.num_shards() > 1 {
            (0..router.num_shards()).collect()
        } else {
            vec![router.shard_for_key(&request.key)]
        };
        let mut subscriptions = Vec::with_capacity(shards.len());
        for shard in &shards {
            let node = self.store.shards().get(shard).ok_or_else(|| {
                ApiError::Unavailable(format!(
                    "node {} does not host shard {shard}: watch through a node that hosts every shard the watch covers",
                    self.node_id
                ))
            })?;
            let hub = node.watch_hub();
            let start = match &request.start {
                WatchStart::Now => hub.now(),
                WatchStart::FromRevision(r) => {
                    // A key's watch covers one shard: its revisions are that shard's.
                    if shards.len() > 1 {
                        return Err(ApiError::InvalidRequest(
                            "a start revision names a position in one shard's history, and this prefix \
                             watch covers every shard of a sharded cluster: watch a single key from a \
                             revision, or resume with a token (--resume)"
                                .into(),
                        ));
                    }
                    WatchPosition::after_revision(*shard, r.saturating_sub(1))
                }
                WatchStart::After(positions) => *positions.iter().find(|p| p.shard == *shard).ok_or_else(|| {
                    ApiError::InvalidRequest(format!("the resume token has no position for shard {shard}"))
                })?,
            };
            subscriptions.push((hub.subscribe(start)?, hub.clone(), node.clone()));
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let positions = subscriptions.iter().map(|(s, _, _)| s.start).collect();
        // Room for it: the channel is new.
        let _ = tx.try_send(Ok(ClientResponse::WatchCreated { positions }));
        let filter = Filter { key: request.key, prefix: request.prefix, prev_kv: request.prev_kv };
        for (sub, hub, node) in subscriptions {
            tokio::spawn(follow_shard(sub, hub, node, filter.clone(), tx.clone(), asks.clone()));
        }
        Ok(rx)
    }
}

/// How sending one frame went.
enum Sent {
    Ok,
    /// The client is gone.
    Gone,
    /// The client reads too slowly: the live feed ran `max_lag` batches ahead meanwhile.
    Lagged,
}

/// Delivers one shard's events after the subscription's start until the client goes away or
/// the watch cannot stay complete (then an error frame ends it). While idle it also checks that
/// this replica still hears from the shard's leader: one cut off from the group (removed, or
/// partitioned away) would keep the watch quiet while the others move on and the history its
/// resume needs rolls away; it ends the watch instead, and the client resumes on another member.
async fn follow_shard(
    sub: Subscription,
    hub: Arc<WatchHub>,
    node: RaftNode,
    filter: Filter,
    tx: mpsc::Sender<ClientResult>,
    asks: WatchAsks,
) {
    let WatchAsks { position: mut asked, finish } = asks;
    let Subscription { backlog, mut live, start, max_lag } = sub;
    let shard = start.shard;
    let mut at = start;
    // What the client knows (its last event or progress), and since when.
    let mut reported = start;
    let mut reported_at = tokio::time::Instant::now();
    let lagged = |n: u64| {
        ApiError::WatchCancelled(format!(
            "the watcher fell {n} writes behind shard {shard}'s live feed (it reads too slowly); resume from the \
             last event's position"
        ))
    };
    match send_batches(&backlog, &filter, &mut at, &mut reported, &tx, &live, max_lag).await {
        Sent::Ok => {}
        Sent::Gone => return,
        Sent::Lagged => return end(&tx, lagged(max_lag as u64)).await,
    }
    loop {
        let first = tokio::select! {
            next = live.recv() => next,
            _ = tx.closed() => return,
            _ = finish.cancelled() => {
                // Where it stands: after every applied entry if it handled every batch it
                // received, else as far as it got (the client resumes from there).
                catch_up(&hub, &live, &mut at);
                if reported != at {
                    let _ = send_progress(&tx, at, &live, max_lag).await;
                }
                return;
            }
            _ = tokio::time::sleep_until(reported_at + PROGRESS_EVERY) => {
                if let Some(why) = node.cut_off() {
                    return end(&tx, ApiError::Unavailable(format!("{why}; resume the watch on another member"))).await;
                }
                // Idle: everything applied so far is handled (entries without events included).
                catch_up(&hub, &live, &mut at);
                if reported != at {
                    match send_progress(&tx, at, &live, max_lag).await {
                        Sent::Ok => reported = at,
                        Sent::Gone => return,
                        Sent::Lagged => return end(&tx, lagged(max_lag as u64)).await,
                    }
                }
                reported_at = tokio::time::Instant::now();
                continue;
            }
            changed = async {
                match asked.as_mut() {
                    Some(a) => a.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                if !changed {
                    // Nobody asks any more.
                    asked = None;
                    continue;
                }
                // Asked where it stands: after every applied entry if it handled every batch it
                // received, else as far as it got (the loop handles the rest, and the asker asks
                // again until the position is far enough: under a stream of writes this watch
                // does not match, that is how it learns it).
                catch_up(&hub, &live, &mut at);
                if reported != at {
                    match send_progress(&tx, at, &live, max_lag).await {
                        Sent::Ok => (reported, reported_at) = (at, tokio::time::Instant::now()),
                        Sent::Gone => return,
                        Sent::Lagged => return end(&tx, lagged(max_lag as u64)).await,
                    }
                }
                continue;
            }
        };
        // Whatever else is there already goes into the same frame: a watcher that fell a
        // little behind catches up with fewer, larger frames.
        let mut pending: Vec<Arc<EventBatch>> = Vec::new();
        let mut bytes = 0;
        let mut next = first;
        let stop = loop {
            match next {
                Ok(batch) if !batch.gap => {
                    bytes += batch.events.iter().map(WatchEvent::bytes).sum::<usize>();
                    pending.push(batch);
                    if bytes >= MAX_FRAME_EVENT_BYTES {
                        break None;
                    }
                    next = match live.try_recv() {
                        Ok(b) => Ok(b),
                        Err(broadcast::error::TryRecvError::Empty) => break None,
                        Err(broadcast::error::TryRecvError::Lagged(n)) => Err(broadcast::error::RecvError::Lagged(n)),
                        Err(broadcast::error::TryRecvError::Closed) => Err(broadcast::error::RecvError::Closed),
                    };
                }
                other => break Some(other),
            }
        };
        // Batches still queued behind this frame: how far the watch is behind the live feed.
        node.metrics().watch_lag.observe(live.len() as u64);
        let before = reported;
        match send_batches(&pending, &filter, &mut at, &mut reported, &tx, &live, max_lag).await {
            Sent::Ok => {
                // Every event of these entries is handled, matching or not.
                if let Some(last) = pending.last() {
                    let done = WatchPosition::after_revision(shard, last.revision);
                    if at.precedes(done.revision, done.index) {
                        at = done;
                    }
                }
                let now = tokio::time::Instant::now();
                if reported != before {
                    reported_at = now;
                } else if reported != at && now >= reported_at + PROGRESS_EVERY {
                    // A busy shard whose writes all miss this watch: say how far it got.
                    match send_progress(&tx, at, &live, max_lag).await {
                        Sent::Ok => (reported, reported_at) = (at, now),
                        Sent::Gone => return,
                        Sent::Lagged => return end(&tx, lagged(max_lag as u64)).await,
                    }
                }
            }
            Sent::Gone => return,
            Sent::Lagged => return end(&tx, lagged(max_lag as u64)).await,
        }
        let Some(last) = stop else { continue };
        let error = match last {
            Ok(batch) if batch.gap => ApiError::WatchCancelled(format!(
                "this node replaced shard {shard}'s state with a snapshot (revision {}); resume from the last \
                 event's position",
                batch.revision
            )),
            // Not produced: every batch but a gap went into the frame.
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(n)) => lagged(n),
            Err(broadcast::error::RecvError::Closed) => {
                ApiError::Unavailable(format!("shard {shard} stopped on this node"))
            }
        };
        return end(&tx, error).await;
    }
}

/// Moves `at` past every applied entry of the shard if the task handled every batch it received
/// (entries without events included): where a quiet or busy-elsewhere watch stands.
fn catch_up(hub: &WatchHub, live: &broadcast::Receiver<Arc<EventBatch>>, at: &mut WatchPosition) {
    if let Some(p) = hub.progress(live) {
        if at.precedes(p.revision, p.index) {
            *at = p;
        }
    }
}

/// Ends the watch with `error` (after the frames already queued), unless the client is gone.
async fn end(tx: &mpsc::Sender<ClientResult>, error: ApiError) {
    tokio::select! {
        _ = tx.send(Err(error)) => {}
        _ = tx.closed() => {}
    }
}

/// Queues one frame; while the client does not take frames, watches how far the live feed
/// runs ahead, and gives up once it is `max_lag` batches ahead (this watcher lost its place).
async fn send_frame(
    tx: &mpsc::Sender<ClientResult>,
    frame: ClientResult,
    live: &broadcast::Receiver<Arc<EventBatch>>,
    max_lag: usize,
) -> Sent {
    // Room at once (the usual case): no timer.
    let frame = match tx.try_send(frame) {
        Ok(()) => return Sent::Ok,
        Err(mpsc::error::TrySendError::Closed(_)) => return Sent::Gone,
        Err(mpsc::error::TrySendError::Full(frame)) => frame,
    };
    let mut check = tokio::time::interval(LAG_CHECK);
    loop {
        tokio::select! {
            permit = tx.reserve() => {
                return match permit {
                    Ok(p) => {
                        p.send(frame);
                        Sent::Ok
                    }
                    Err(_) => Sent::Gone,
                };
            }
            _ = check.tick() => {
                if live.len() >= max_lag {
                    return Sent::Lagged;
                }
            }
        }
    }
}

/// Tells the client its watch of `at`'s shard stands at `at` (no event there or before is to come).
async fn send_progress(
    tx: &mpsc::Sender<ClientResult>,
    at: WatchPosition,
    live: &broadcast::Receiver<Arc<EventBatch>>,
    max_lag: usize,
) -> Sent {
    send_frame(tx, Ok(ClientResponse::WatchProgress { positions: vec![at] }), live, max_lag).await
}

/// Sends the events of `batches` after `at` that match, in frames of bounded size; advances `at`
/// (past every event handled) and `reported` (to the last event sent).
#[allow(clippy::too_many_arguments)]
async fn send_batches(
    batches: &[Arc<EventBatch>],
    filter: &Filter,
    at: &mut WatchPosition,
    reported: &mut WatchPosition,
    tx: &mpsc::Sender<ClientResult>,
    live: &broadcast::Receiver<Arc<EventBatch>>,
    max_lag: usize,
) -> Sent {
    let mut frame: Vec<WatchEvent> = Vec::new();
    let mut bytes = 0;
    for e in batches.iter().flat_map(|b| &b.events) {
        if !at.precedes(e.revision, e.index) {
            continue;
        }
        *at = e.position();
        if !filter.matches(&e.key) {
            continue;
        }
        let mut e = e.clone();
        if !filter.prev_kv {
            e.prev_value = None;
            e.prev_meta = None;
        }
        bytes += e.bytes();
        frame.push(e);
        if bytes >= MAX_FRAME_EVENT_BYTES {
            let last = frame.last().map(WatchEvent::position);
            match send_frame(tx, Ok(ClientResponse::WatchEvents(std::mem::take(&mut frame))), live, max_lag).await {
                Sent::Ok => {
                    bytes = 0;
                    *reported = last.unwrap_or(*reported);
                }
                other => return other,
            }
        }
    }
    let Some(last) = frame.last().map(WatchEvent::position) else { return Sent::Ok };
    let sent = send_frame(tx, Ok(ClientResponse::WatchEvents(frame)), live, max_lag).await;
    if matches!(sent, Sent::Ok) {
        *reported = last;
    }
    sent
}
