//! etcd's Watch service: one bidirectional stream carries many watchers, created and cancelled
//! by the client, each served by a watch of the node (docs/design.md §17, §18).
//!
//! A watcher's range becomes the node's key or prefix watch (a range that is neither watches the
//! longest prefix its two ends share, and the events outside it are dropped here). A start
//! revision is the node's `FromRevision` (one-shard clusters; a sharded cluster refuses it,
//! since revisions are per shard). The node's progress frames become etcd's progress
//! notifications for watchers that asked for them. A previous key (`prev_kv`) is the key as it
//! was: value, revisions, version and lease.
//!
//! A progress request of the stream is answered with the revision every shard stood at when it
//! came (a linearizable read), once every watcher of the stream has queued all its events up to
//! there: each watcher keeps where its answers stand, and asks its node watch to report its
//! position until it has moved past that revision (etcd's promise: no event at or before a
//! progress answer's revision is still to come on the stream).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{stream::BoxStream, StreamExt};
use tokio::{
    sync::{mpsc, watch, Notify},
    task::JoinHandle,
};
use tonic::{Request, Response, Status, Streaming};

use super::{
    gateway::{errors, key_range, kv_of, revision_i64, revision_u64, status_of, Caller, EtcdNode, Gateway},
    proto::{
        etcdserverpb::{
            watch_create_request::FilterType, watch_request::RequestUnion, watch_server::Watch, WatchCreateRequest,
            WatchRequest as EtcdWatchRequest, WatchResponse,
        },
        mvccpb::{self, event::EventType},
    },
};
use crate::{
    api::{
        is_reserved_key, prefix_end, ApiError, ClientResponse, EventKind, KeyRange, KeyRecord, Revision, ShardId,
        WatchEvent, WatchPosition, WatchRequest, WatchStart,
    },
    auth,
};

/// etcd's Watch service over a node.
#[derive(Debug)]
pub struct WatchService<N: EtcdNode>(pub Arc<Gateway<N>>);

type Answers = mpsc::Sender<Result<WatchResponse, Status>>;

/// etcd's id for a progress answer to a whole stream (`clientv3.InvalidWatchID`).
const STREAM_PROGRESS_ID: i64 = -1;
/// How often a progress request asks the watchers still short of its revision again.
const PROGRESS_ASK_EVERY: Duration = Duration::from_millis(20);

/// Where one watcher's answers stand: per shard it covers, the position up to which its node
/// watch's frames are handled and their answers queued on the stream (`None` until created).
type Reached = Arc<Mutex<Option<Vec<WatchPosition>>>>;

/// What a watcher's task keeps up to date for its stream's progress answers.
struct Tracked {
    stream: Arc<Stream>,
    reached: Reached,
    /// Changed when a progress request wants the node watch to report where it stands.
    asked: watch::Receiver<u64>,
}

/// One watcher of a stream.
struct Watcher {
    task: JoinHandle<()>,
    reached: Reached,
    /// Bumped to have the node watch report where it stands.
    asked: watch::Sender<u64>,
}

/// The watchers of one stream, shared by its request loop and its progress answers.
#[derive(Default)]
struct Stream {
    watchers: Mutex<HashMap<i64, Watcher>>,
    /// Notified whenever a watcher's position moves.
    moved: Notify,
}

impl Stream {
    fn watchers(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Watcher>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that a watcher's answers reached `positions` (later positions of the same shard
    /// replace earlier ones).
    fn reach(&self, reached: &Reached, positions: &[WatchPosition]) {
        if positions.is_empty() {
            return;
        }
        {
            let mut at = reached.lock().unwrap_or_else(|p| p.into_inner());
            let at = at.get_or_insert_with(Vec::new);
            for p in positions {
                match at.iter_mut().find(|q| q.shard == p.shard) {
                    Some(q) if *q < *p => *q = *p,
                    Some(_) => {}
                    None => at.push(*p),
                }
            }
        }
        self.moved.notify_waiters();
    }
}

/// The last position of each shard among `events` (in order).
fn last_positions(events: &[WatchEvent]) -> Vec<WatchPosition> {
    let mut last: Vec<WatchPosition> = Vec::new();
    for e in events {
        match last.iter_mut().find(|p| p.shard == e.shard) {
            Some(p) => *p = e.position(),
            None => last.push(e.position()),
        }
    }
    last
}

/// The node's watch for an etcd range: key, prefix.
fn node_watch(range: &KeyRange) -> (Vec<u8>, bool) {
    match &range.end {
        None => (range.key.clone(), false),
        Some(end) if prefix_end(&range.key).as_deref() == Some(end.as_slice()) => (range.key.clone(), true),
        Some(end) if end.is_empty() => (Vec::new(), true),
        Some(end) => {
            let shared = range.key.iter().zip(end).take_while(|(a, b)| a == b).count();
            (range.key[..shared].to_vec(), true)
        }
    }
}

fn event_of(e: WatchEvent, prev_kv: bool) -> mvccpb::Event {
    // As etcd: a put that creates the key (its create revision is the event's) has no previous
    // key, even if the txn deleted one first.
    let creates = e.kind == EventKind::Put && e.create_revision == e.revision;
    let prev = match (prev_kv && !creates, e.prev_value) {
        (true, Some(value)) => {
            let m = e.prev_meta.unwrap_or_default();
            Some(kv_of(KeyRecord {
                key: e.key.clone(),
                value,
                create_revision: m.create_revision,
                mod_revision: m.mod_revision,
                version: m.version,
                lease: m.lease,
            }))
        }
        _ => None,
    };
    let kind = match e.kind {
        EventKind::Put => EventType::Put,
        EventKind::Delete => EventType::Delete,
    };
    let kv = KeyRecord {
        key: e.key,
        value: e.value,
        create_revision: e.create_revision,
        mod_revision: e.revision,
        version: e.version,
        lease: e.lease,
    };
    mvccpb::Event { r#type: kind as i32, kv: Some(kv_of(kv)), prev_kv: prev }
}

impl<N: EtcdNode> WatchService<N> {
    /// Serves one watcher until its node watch ends or it is cancelled (aborted), recording in
    /// `tracked` where its answers stand.
    async fn serve(
        gw: Arc<Gateway<N>>,
        id: i64,
        create: WatchCreateRequest,
        range: KeyRange,
        answers: Answers,
        tracked: Tracked,
    ) {
        let Tracked { stream, reached, asked } = tracked;
        let respond = |r: WatchResponse| {
            let answers = answers.clone();
            async move { answers.send(Ok(r)).await.is_ok() }
        };
        let cancel = |reason: String, compact: i64| WatchResponse {
            header: gw.header(0),
            watch_id: id,
            canceled: true,
            compact_revision: compact,
            cancel_reason: reason,
            ..Default::default()
        };
        let (key, prefix) = node_watch(&range);
        let start = match revision_u64(create.start_revision) {
            0 => WatchStart::Now,
            r => WatchStart::FromRevision(r),
        };
        let no_put = create.filters.contains(&(FilterType::Noput as i32));
        let no_delete = create.filters.contains(&(FilterType::Nodelete as i32));
        let request = WatchRequest { key, prefix, prev_kv: create.prev_kv, start };
        let mut frames = match gw.node.watch_asked(request, asked).await {
            Ok(frames) => frames,
            Err(e) => {
                for a in refused(&gw, id, e) {
                    let _ = answers.send(a).await;
                }
                return;
            }
        };
        let mut created = false;
        while let Some(frame) = frames.recv().await {
            // The answer to queue, if any, and the positions the watcher reaches once it is queued.
            let (answer, positions) = match frame {
                Ok(ClientResponse::WatchCreated { positions }) => {
                    created = true;
                    let revision = positions.iter().map(|p| p.revision).max().unwrap_or(0);
                    let answer = WatchResponse {
                        header: gw.header(revision),
                        watch_id: id,
                        created: true,
                        ..Default::default()
                    };
                    (Some(answer), positions)
                }
                Ok(ClientResponse::WatchEvents(events)) => {
                    let revision = events.iter().map(|e| e.revision).max().unwrap_or(0);
                    let positions = last_positions(&events);
                    let events: Vec<mvccpb::Event> = events
                        .into_iter()
                        .filter(|e| range.contains(&e.key) && !is_reserved_key(&e.key))
                        .filter(|e| match e.kind {
                            EventKind::Put => !no_put,
                            EventKind::Delete => !no_delete,
                        })
                        .map(|e| event_of(e, create.prev_kv))
                        .collect();
                    let answer = (!events.is_empty()).then(|| WatchResponse {
                        header: gw.header(revision),
                        watch_id: id,
                        events,
                        ..Default::default()
                    });
                    (answer, positions)
                }
                Ok(ClientResponse::WatchProgress { positions }) => {
                    let revision = positions.iter().map(|p| p.revision).max().unwrap_or(0);
                    let answer = create.progress_notify.then(|| WatchResponse {
                        header: gw.header(revision),
                        watch_id: id,
                        ..Default::default()
                    });
                    (answer, positions)
                }
                Ok(other) => (Some(cancel(format!("the node's watch sent {other:?}"), 0)), Vec::new()),
                Err(e) if !created => {
                    for a in refused(&gw, id, e) {
                        let _ = answers.send(a).await;
                    }
                    return;
                }
                Err(e) => {
                    let _ = answers.send(ended(&cancel, e)).await;
                    return;
                }
            };
            if let Some(answer) = answer {
                if !respond(answer).await {
                    return;
                }
            }
            stream.reach(&reached, &positions);
        }
        // The node stopped serving it: end the stream, so that the client resumes elsewhere.
        let _ = answers.send(Err(Status::unavailable(format!("{} (the node's watch ended)", errors::NO_LEADER)))).await;
    }
}

/// What ends a watcher that was created, on the node's error `e`: a compaction is etcd's
/// compaction answer; anything else ends the whole stream with the error, so that etcd's
/// clients resume their watches (on another member) after the last revision they saw.
fn ended(cancel: &impl Fn(String, i64) -> WatchResponse, e: ApiError) -> Result<WatchResponse, Status> {
    match e {
        ApiError::Compacted { oldest, .. } => Ok(cancel(errors::COMPACTED.into(), revision_i64(oldest))),
        other => Err(status_of(other)),
    }
}

/// The answers to a watch the node would not start: created and cancelled at once, with the
/// reason (etcd's clients show it); a compaction as etcd reports one (created, then cancelled
/// with the compaction revision, which clients hand to the caller as `ErrCompacted`).
fn refused<N: EtcdNode>(gw: &Gateway<N>, id: i64, e: ApiError) -> Vec<Result<WatchResponse, Status>> {
    let created = WatchResponse { header: gw.header(0), watch_id: id, created: true, ..Default::default() };
    match e {
        ApiError::Compacted { oldest, .. } => vec![
            Ok(created),
            Ok(WatchResponse {
                header: gw.header(0),
                watch_id: id,
                canceled: true,
                compact_revision: revision_i64(oldest),
                cancel_reason: errors::COMPACTED.into(),
                ..Default::default()
            }),
        ],
        ApiError::Unavailable(_) | ApiError::NotLeader { .. } | ApiError::Timeout(_) => vec![Err(status_of(e))],
        other => vec![Ok(WatchResponse { canceled: true, cancel_reason: other.to_string(), ..created })],
    }
}

/// What a stream's request loop holds: its watchers, the next id to give, and the progress
/// requests still being answered; dropping it stops them all.
struct Watchers {
    stream: Arc<Stream>,
    next: i64,
    progress: Vec<JoinHandle<()>>,
}

impl Watchers {
    fn stop_all(&mut self) {
        for (_, w) in self.stream.watchers().drain() {
            w.task.abort();
        }
        for t in self.progress.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Answers a progress request of `stream`: the revision each shard stands at now, once every
/// watcher still running has queued its answers up to it.
async fn answer_progress<N: EtcdNode>(gw: Arc<Gateway<N>>, stream: Arc<Stream>, answers: Answers) {
    let mut targets: Vec<(ShardId, Revision)> = Vec::new();
    for shard in 0..gw.router().num_shards() {
        loop {
            match gw.revision_of(shard).await {
                Ok(r) => break targets.push((shard, r)),
                // No leader for now: the answer waits for one (the stream goes on meanwhile).
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let caught_up = |at: &[WatchPosition]| {
        at.iter().all(|p| targets.iter().find(|(s, _)| *s == p.shard).is_none_or(|(_, r)| !p.precedes(*r, u32::MAX)))
    };
    loop {
        let moved = stream.moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        let mut behind = 0;
        for w in stream.watchers().values().filter(|w| !w.task.is_finished()) {
            let reached = w.reached.lock().unwrap_or_else(|p| p.into_inner());
            if !reached.as_deref().is_some_and(caught_up) {
                behind += 1;
                w.asked.send_modify(|n| *n += 1);
            }
        }
        if behind == 0 {
            break;
        }
        tokio::select! {
            _ = moved => {}
            _ = tokio::time::sleep(PROGRESS_ASK_EVERY) => {}
        }
    }
    let revision = targets.iter().map(|(_, r)| *r).max().unwrap_or(0);
    let answer = WatchResponse { header: gw.header(revision), watch_id: STREAM_PROGRESS_ID, ..Default::default() };
    let _ = answers.send(Ok(answer)).await;
}

type WatchAnswers = BoxStream<'static, Result<WatchResponse, Status>>;

#[tonic::async_trait]
impl<N: EtcdNode> Watch for WatchService<N> {
    type WatchStream = WatchAnswers;

    async fn watch(
        &self,
        request: Request<Streaming<EtcdWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.0.caller(request.metadata())?;
        Ok(Response::new(self.serve_stream(caller, request.into_inner())))
    }
}

impl<N: EtcdNode> WatchService<N> {
    /// Serves one stream of watch requests for `caller` (a gRPC stream, or the JSON gateway's):
    /// its answers, until `incoming` ends or fails, the node stops, or the caller's token does.
    pub(crate) fn serve_stream(
        &self,
        caller: Caller,
        mut incoming: impl futures::Stream<Item = Result<EtcdWatchRequest, Status>> + Send + Unpin + 'static,
    ) -> WatchAnswers {
        let (answers, rx) = mpsc::channel::<Result<WatchResponse, Status>>(64);
        let gw = self.0.clone();
        tokio::spawn(async move {
            let mut watchers = Watchers { stream: Arc::new(Stream::default()), next: 0, progress: Vec::new() };
            let mut recheck = tokio::time::interval(auth::STREAM_RECHECK);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let item = tokio::select! {
                    item = incoming.next() => item,
                    _ = gw.stop.cancelled() => None,
                    // The client went away (nobody reads the answers any more).
                    _ = answers.closed() => None,
                    _ = recheck.tick() => {
                        // A token revoked or expired while the stream runs ends it.
                        if let Err(refused) = gw.recheck(&caller) {
                            let _ = answers.send(Err(refused)).await;
                            break;
                        }
                        continue;
                    }
                };
                let Some(Ok(request)) = item else { break };
                watchers.stream.watchers().retain(|_, w| !w.task.is_finished());
                watchers.progress.retain(|t| !t.is_finished());
                let answer = match request.request_union {
                    Some(RequestUnion::CreateRequest(create)) => {
                        create_watcher(&gw, &caller, &mut watchers, create, &answers)
                    }
                    Some(RequestUnion::CancelRequest(c)) => {
                        if let Some(w) = watchers.stream.watchers().remove(&c.watch_id) {
                            w.task.abort();
                        }
                        Some(WatchResponse {
                            header: gw.header(0),
                            watch_id: c.watch_id,
                            canceled: true,
                            ..Default::default()
                        })
                    }
                    Some(RequestUnion::ProgressRequest(_)) => {
                        let task = answer_progress(gw.clone(), watchers.stream.clone(), answers.clone());
                        watchers.progress.push(tokio::spawn(task));
                        None
                    }
                    None => None,
                };
                if let Some(a) = answer {
                    if answers.send(Ok(a)).await.is_err() {
                        break;
                    }
                }
            }
            watchers.stop_all();
        });
        super::gateway::stream_of(rx)
    }
}

/// Starts a watcher; the answer to send at once if it cannot start.
fn create_watcher<N: EtcdNode>(
    gw: &Arc<Gateway<N>>,
    caller: &Caller,
    watchers: &mut Watchers,
    create: WatchCreateRequest,
    answers: &Answers,
) -> Option<WatchResponse> {
    let mut all = watchers.stream.watchers();
    let id = if create.watch_id != 0 {
        create.watch_id
    } else {
        while all.contains_key(&watchers.next) {
            watchers.next += 1;
        }
        watchers.next
    };
    let refuse = |reason: String| {
        Some(WatchResponse {
            header: gw.header(0),
            watch_id: id,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..Default::default()
        })
    };
    if all.contains_key(&id) {
        return refuse(format!("watch id {id} is in use on this stream"));
    }
    if create.key.is_empty() && create.range_end.is_empty() {
        return refuse(errors::EMPTY_KEY.into());
    }
    if is_reserved_key(&create.key) {
        return refuse("keys starting with \\x00aspen/ are reserved for the cluster".into());
    }
    let range = key_range(create.key.clone(), create.range_end.clone());
    if let Err(denied) = caller.may_read(&range) {
        return refuse(denied.message().to_string());
    }
    let reached = Reached::default();
    let (asked, asked_rx) = watch::channel(0);
    let tracked = Tracked { stream: watchers.stream.clone(), reached: reached.clone(), asked: asked_rx };
    let serve = WatchService::serve(gw.clone(), id, create, range, answers.clone(), tracked);
    all.insert(id, Watcher { task: tokio::spawn(serve), reached, asked });
    drop(all);
    if id == watchers.next {
        watchers.next += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_the_nodes_key_and_prefix_watches() {
        assert_eq!(node_watch(&KeyRange::single("a")), (b"a".to_vec(), false));
        assert_eq!(node_watch(&KeyRange::prefix("app/")), (b"app/".to_vec(), true));
        assert_eq!(node_watch(&key_range(b"k".to_vec(), vec![0])), (vec![], true));
        assert_eq!(node_watch(&key_range(b"foo1".to_vec(), b"foo5".to_vec())), (b"foo".to_vec(), true));
    }
}
