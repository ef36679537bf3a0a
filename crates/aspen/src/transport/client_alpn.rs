//! The client protocol handler (ALPN `aspen-client`): one request frame and one response frame
//! per bi-stream, many streams per connection, each served on its own task. The same handler
//! serves the members-only peer ALPN (`aspen-peer/1`, [`Origin::Peer`]), where the node-to-node
//! requests are answered too; on the client ALPN those are refused
//! ([`ClientRequest::is_node_to_node`]). Who may connect to the peer ALPN is decided before any
//! stream opens (`transport::gate`).
//!
//! Bad input (random bytes, a truncated or oversized frame, an unknown request variant, an old
//! protocol version) gets a typed [`ApiError`] on that stream, or that stream closed; the
//! connection and every other connection keep working.

use std::{future::Future, sync::Arc, time::Duration};

use iroh::{
    endpoint::{Connection, RecvStream, SendStream},
    protocol::{AcceptError, ProtocolHandler},
};
use tokio_util::task::TaskTracker;

use crate::api::{
    frame::{decode, drain_to_end, encode_frame, read_frame_bytes, FrameError, REQUEST_END_WAIT},
    ApiError, ClientEnvelope, ClientRequest, ClientResult, CLIENT_PROTOCOL_VERSION,
};

/// What answers client requests (implemented by the cluster layer).
pub trait ClientService: Send + Sync + std::fmt::Debug + 'static {
    /// Answers one request. `hops` counts how often it was forwarded already.
    fn handle(&self, request: ClientRequest, hops: u8) -> impl Future<Output = ClientResult> + Send;
}

/// QUIC error code used when this node resets a stream whose frame it will not read.
const STREAM_REFUSED: u32 = 1;

/// Which ALPN a [`ClientProtocolHandler`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `aspen-client`: anyone; node-to-node requests are refused.
    Client,
    /// `aspen-peer/1`: members only (the endpoint's gate); every request is answered.
    Peer,
}

/// Serves the client ALPN (or the peer ALPN, see [`Origin`]).
#[derive(Debug)]
pub struct ClientProtocolHandler<S> {
    service: Arc<S>,
    max_frame: usize,
    tracker: TaskTracker,
    drain_timeout: Duration,
    /// A request frame must arrive, and its answer be taken, within this long (the request
    /// timeout): a peer that opens a stream and never sends, or never reads, does not hold the
    /// stream and its task for longer.
    stream_deadline: Duration,
    origin: Origin,
}

impl<S: ClientService> ClientProtocolHandler<S> {
    pub fn new(service: Arc<S>, max_frame: usize, drain_timeout: Duration) -> Self {
        Self::with_origin(service, max_frame, drain_timeout, Origin::Client)
    }

    /// A handler for `origin`'s ALPN.
    pub fn with_origin(service: Arc<S>, max_frame: usize, drain_timeout: Duration, origin: Origin) -> Self {
        ClientProtocolHandler {
            service,
            max_frame,
            tracker: TaskTracker::new(),
            drain_timeout,
            stream_deadline: drain_timeout,
            origin,
        }
    }
}

impl<S: ClientService> ProtocolHandler for ClientProtocolHandler<S> {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        let remote = conn.remote_id().fmt_short().to_string();
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%remote, "client connection ended: {e}");
                    return Ok(());
                }
            };
            if self.tracker.is_closed() {
                // Shutting down: refuse new requests, let in-flight ones finish.
                let (mut send, mut recv) = (send, recv);
                let _ = recv.stop(STREAM_REFUSED.into());
                let _ = reply(&mut send, &Err(ApiError::Unavailable("node is shutting down".into()))).await;
                continue;
            }
            let service = self.service.clone();
            let max_frame = self.max_frame;
            self.tracker.spawn(serve_stream(service, send, recv, max_frame, self.origin, self.stream_deadline));
        }
    }

    async fn shutdown(&self) {
        self.tracker.close();
        if tokio::time::timeout(self.drain_timeout, self.tracker.wait()).await.is_err() {
            tracing::warn!("client requests still running after {:?}; stopping anyway", self.drain_timeout);
        }
    }
}

async fn reply(send: &mut SendStream, result: &ClientResult) -> Result<(), FrameError> {
    let bytes = encode_frame(result)?;
    send.write_all(&bytes).await.map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    send.finish().map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    Ok(())
}

async fn serve_stream<S: ClientService>(
    service: Arc<S>,
    mut send: SendStream,
    mut recv: RecvStream,
    max_frame: usize,
    origin: Origin,
    deadline: Duration,
) {
    let Ok(read) = tokio::time::timeout(deadline, read_frame_bytes(&mut recv, max_frame)).await else {
        tracing::debug!("a request frame did not arrive within {deadline:?}: stream reset");
        let _ = recv.stop(STREAM_REFUSED.into());
        let _ = send.reset(STREAM_REFUSED.into());
        return;
    };
    let result: ClientResult = match read {
        Ok(bytes) => match decode::<ClientEnvelope>(&bytes) {
            Ok(env) if env.version != CLIENT_PROTOCOL_VERSION => {
                Err(ApiError::UnsupportedVersion { got: env.version, supported: CLIENT_PROTOCOL_VERSION })
            }
            Ok(env) if origin == Origin::Client && env.request.is_node_to_node() => Err(ApiError::Refused(format!(
                "a {} is sent between the members of a cluster only, not by clients",
                env.request.kind()
            ))),
            Ok(env) => service.handle(env.request, env.hops).await,
            Err(e) => {
                tracing::debug!("malformed client request: {e}");
                Err(ApiError::InvalidRequest(format!("malformed request frame: {e}")))
            }
        },
        Err(FrameError::TooLarge { size, limit }) => {
            let _ = recv.stop(STREAM_REFUSED.into());
            Err(ApiError::TooLarge { what: "request frame".into(), size: size as u64, limit: limit as u64 })
        }
        Err(FrameError::Truncated) => Err(ApiError::InvalidRequest("truncated request frame".into())),
        Err(e) => {
            tracing::debug!("client stream failed: {e}");
            return;
        }
    };
    match tokio::time::timeout(deadline, reply(&mut send, &result)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!("could not send client response: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("the answer was not taken within {deadline:?}: stream reset");
            let _ = send.reset(STREAM_REFUSED.into());
            return;
        }
    }
    drain_to_end(&mut recv, REQUEST_END_WAIT).await;
}
