//! Watches from the client's side (docs/design.md §17): [`WatchStream`] reads a watch's frames
//! in the background and, when the node serving it dies or the connection breaks, resumes on
//! another member from the last delivered position of every shard — so each key's events
//! arrive in order, with no gap and no duplicate, across failovers.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{AspenClient, ClientError};
use crate::api::{
    frame::{decode, encode_frame, read_frame_len, read_frame_payload},
    ApiError, ClientEnvelope, ClientRequest, ClientResponse, ClientResult, WatchEvent, WatchPosition, WatchRequest,
    WatchStart, CLIENT_PROTOCOL_VERSION, MAX_FRAME_BYTES,
};

/// What a watch yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchItem {
    /// The watch is in place (once, first).
    Created(Vec<WatchPosition>),
    /// Events of one shard, in order.
    Events(Vec<WatchEvent>),
}

/// A running watch. Dropping it ends the watch.
#[derive(Debug)]
pub struct WatchStream {
    items: mpsc::Receiver<Result<WatchItem, ClientError>>,
    positions: Arc<Mutex<Vec<WatchPosition>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WatchStream {
    /// The next item; `None` once the watch ended (after an error item).
    pub async fn next(&mut self) -> Option<Result<WatchItem, ClientError>> {
        self.items.recv().await
    }

    /// Where the watch stands: every delivered event's shard at its last event (what a resume
    /// token carries).
    pub fn positions(&self) -> Vec<WatchPosition> {
        self.positions.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How one connection's watch ended.
enum Ended {
    /// The connection or node went away (after the watch was in place there, or not): resume
    /// elsewhere.
    Broken { why: String, was_serving: bool },
    /// The cluster refused or ended it: tell the caller.
    Refused(ApiError),
    /// This node's history does not reach back to the watch's position (it restarted, say):
    /// another member's may.
    Compacted(ApiError),
    /// The caller dropped the stream.
    Gone,
}

impl AspenClient {
    /// Starts a watch (see [`WatchStream`]). Fails at once if no member accepts it within the
    /// client's timeout, or with the cluster's error (compacted start, permission, …).
    pub async fn watch(self: &Arc<Self>, request: WatchRequest) -> Result<WatchStream, ClientError> {
        let (tx, items) = mpsc::channel(16);
        let positions = Arc::new(Mutex::new(Vec::new()));
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run_watch(self.clone(), request, tx, positions.clone(), first_tx));
        match first_rx.await {
            Ok(Ok(())) => Ok(WatchStream { items, positions, task }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Protocol("the watch task ended before it started".into())),
        }
    }
}

/// Runs a watch: connects, streams, and resumes on another member after a broken connection,
/// until the caller drops the stream or the cluster ends the watch.
async fn run_watch(
    client: Arc<AspenClient>,
    mut request: WatchRequest,
    tx: mpsc::Sender<Result<WatchItem, ClientError>>,
    positions: Arc<Mutex<Vec<WatchPosition>>>,
    first: tokio::sync::oneshot::Sender<Result<(), ClientError>>,
) {
    let mut first = Some(first);
    let mut failing_since: Option<Instant> = None;
    let mut compacted = 0;
    loop {
        let ended = watch_once(&client, &request, &tx, &positions, &mut first).await;
        let ended = match ended {
            // Every member said so (or there is no other): the position is gone.
            Ended::Compacted(e) => {
                compacted += 1;
                if compacted >= client.tickets().len() {
                    Ended::Refused(e)
                } else {
                    Ended::Broken { why: e.to_string(), was_serving: false }
                }
            }
            other => other,
        };
        match ended {
            Ended::Gone => return,
            Ended::Refused(e) | Ended::Compacted(e) => return fail(&mut first, &tx, ClientError::Api(e)).await,
            Ended::Broken { why, was_serving } => {
                if was_serving {
                    failing_since = None;
                    compacted = 0;
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > client.timeout {
                    return fail(&mut first, &tx, ClientError::Unreachable(format!("watch: {why}"))).await;
                }
                tracing::debug!("watch broken, resuming: {why}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Resume after what was delivered (or where it was created).
        let at = positions.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !at.is_empty() {
            request.start = WatchStart::After(at);
        }
    }
}

/// Ends a watch with `e`: to the caller of [`AspenClient::watch`] if it has not started yet,
/// else as the stream's last item.
async fn fail(
    first: &mut Option<tokio::sync::oneshot::Sender<Result<(), ClientError>>>,
    tx: &mpsc::Sender<Result<WatchItem, ClientError>>,
    e: ClientError,
) {
    match first.take() {
        Some(f) => {
            let _ = f.send(Err(e));
        }
        None => {
            let _ = tx.send(Err(e)).await;
        }
    }
}

/// One connection's part of a watch.
async fn watch_once(
    client: &AspenClient,
    request: &WatchRequest,
    tx: &mpsc::Sender<Result<WatchItem, ClientError>>,
    positions: &Mutex<Vec<WatchPosition>>,
    first: &mut Option<tokio::sync::oneshot::Sender<Result<(), ClientError>>>,
) -> Ended {
    let deadline = Instant::now() + client.timeout;
    let (i, conn) = match client.connection(deadline).await {
        Ok(c) => c,
        Err(why) => return Ended::Broken { why, was_serving: false },
    };
    let envelope = ClientEnvelope {
        version: CLIENT_PROTOCOL_VERSION,
        hops: 0,
        request: ClientRequest::Watch(request.clone()),
        token: client.token.clone(),
    };
    let frame = match encode_frame(&envelope) {
        Ok(f) => f,
        Err(e) => return Ended::Refused(ApiError::InvalidRequest(e.to_string())),
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            client.fail_over(i).await;
            return Ended::Broken { why: e.to_string(), was_serving: false };
        }
    };
    // The send side stays open: closing it ends the watch on the node.
    if let Err(e) = send.write_all(&frame).await {
        client.fail_over(i).await;
        return Ended::Broken { why: e.to_string(), was_serving: false };
    }
    let mut created = false;
    loop {
        let read = async {
            let size = read_frame_len(&mut recv, MAX_FRAME_BYTES).await?;
            let bytes = read_frame_payload(&mut recv, size).await?;
            decode::<ClientResult>(&bytes)
        };
        let frame = tokio::select! {
            frame = read => frame,
            _ = tx.closed() => return Ended::Gone,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                client.fail_over(i).await;
                return Ended::Broken { why: format!("watch stream: {e}"), was_serving: created };
            }
        };
        match frame {
            Ok(ClientResponse::WatchCreated { positions: at }) if !created => {
                created = true;
                let fresh = {
                    let mut known = positions.lock().unwrap_or_else(|p| p.into_inner());
                    let fresh = known.is_empty();
                    if fresh {
                        *known = at.clone();
                    }
                    fresh
                };
                if fresh {
                    if let Some(f) = first.take() {
                        let _ = f.send(Ok(()));
                    }
                    if tx.send(Ok(WatchItem::Created(at))).await.is_err() {
                        return Ended::Gone;
                    }
                }
            }
            Ok(ClientResponse::WatchEvents(events)) if created => {
                {
                    let mut known = positions.lock().unwrap_or_else(|p| p.into_inner());
                    for e in &events {
                        match known.iter_mut().find(|p| p.shard == e.shard) {
                            Some(p) => *p = e.position(),
                            None => known.push(e.position()),
                        }
                    }
                }
                if tx.send(Ok(WatchItem::Events(events))).await.is_err() {
                    return Ended::Gone;
                }
            }
            // A quiet watch's progress: resume from there (nothing for the caller).
            Ok(ClientResponse::WatchProgress { positions: at }) if created => {
                let mut known = positions.lock().unwrap_or_else(|p| p.into_inner());
                for p in at {
                    match known.iter_mut().find(|k| k.shard == p.shard) {
                        Some(k) if k.precedes(p.revision, p.index) => *k = p,
                        Some(_) => {}
                        None => known.push(p),
                    }
                }
            }
            Ok(other) => {
                return Ended::Refused(ApiError::Internal(format!("unexpected watch frame {other:?}")));
            }
            // The node cannot serve it (it hosts too few shards, it is not initialized):
            // another member may.
            Err(e @ ApiError::Compacted { .. }) if client.tickets().len() > 1 => {
                client.fail_over(i).await;
                return Ended::Compacted(e);
            }
            Err(e @ (ApiError::Unavailable(_) | ApiError::NotInitialized { .. })) if client.tickets().len() > 1 => {
                client.fail_over(i).await;
                return Ended::Broken { why: e.to_string(), was_serving: created };
            }
            Err(e) => return Ended::Refused(e),
        }
    }
}
