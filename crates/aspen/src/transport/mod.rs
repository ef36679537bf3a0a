//! Transport: how this node reaches other nodes and is reached by clients, over one iroh QUIC
//! endpoint (docs/design.md, "ALPNs").
//!
//! Owns: the node's identity and offline-safe endpoint ([`endpoint`], invariant 5), the pooled
//! connections to peers and the peer address book ([`pool`]), whether each peer answers and the
//! log lines when one stops or starts answering ([`reachability`]), the raft mux stream that carries
//! every shard's small Raft RPCs to a peer ([`mux`]), one request/answer exchange with a peer
//! on the peer ALPN ([`request`]), who may connect to which ALPN ([`gate`]), the server side of the client ALPN ([`client_alpn`]), which
//! protocol handlers are still stopping ([`shutdowns`]) and
//! the fault-injection hooks tests use ([`fault`]). Every failure is a [`TransportError`].
//!
//! Never: decide what a message means (the Raft layer and the client service do), or retry
//! (callers do: openraft, the forwarder's caller, the client).

pub mod client_alpn;
pub mod endpoint;
pub mod fault;
pub mod gate;
pub mod mux;
pub mod pool;
pub mod reachability;
pub mod request;
pub mod shutdowns;

use std::time::Duration;

use iroh::endpoint::{ConnectError, ConnectingError, ConnectionError, TransportErrorCode};

use crate::api::{raft_rpc::RaftRefusal, FrameError};

pub use client_alpn::{ClientProtocolHandler, ClientService};
pub use pool::{ConnectionPool, PeerBook, RaftTransportStats};

/// Why a message to or from a peer did not make it.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("peer has no valid endpoint address")]
    NoAddress,
    #[error("connect to {peer}: timed out after {after:?}")]
    ConnectTimeout { peer: String, after: Duration },
    /// The peer does not serve the ALPN asked for: TLS alert 120, `no_application_protocol`. An
    /// older version without that protocol answers so, and so does any node in the moment
    /// between binding its endpoint and registering its protocols while it starts.
    #[error("connect to {peer}: the peer does not serve ALPN {alpn}")]
    AlpnRefused { peer: String, alpn: String },
    #[error("connect to {peer}: {source}")]
    Connect {
        peer: String,
        #[source]
        source: ConnectError,
    },
    #[error("open a stream: {0}")]
    Open(#[source] ConnectionError),
    #[error("write: {0}")]
    Write(#[from] iroh::endpoint::WriteError),
    #[error("finish the stream: {0}")]
    Finish(#[from] iroh::endpoint::ClosedStream),
    /// A shared stream (the raft mux) to the peer failed; calls in flight on it fail with it.
    #[error("raft link to {peer} {reason}")]
    LinkFailed { peer: String, reason: String },
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("peer refused: {0}")]
    Refused(#[from] RaftRefusal),
    /// The peer's gate closed the connection: in the peer's view of the membership this node
    /// is not a member ([`gate::REFUSED_CODE`]).
    #[error("{peer} does not admit this node: not a member in its view of the cluster")]
    NotAMember { peer: String },
    #[error("unexpected response kind")]
    UnexpectedResponse,
    #[error(transparent)]
    Dropped(#[from] fault::Dropped),
}

impl TransportError {
    /// A failed connect: an ALPN refusal becomes [`TransportError::AlpnRefused`].
    pub(crate) fn connect(peer: String, alpn: &[u8], source: ConnectError) -> Self {
        let closed = match &source {
            ConnectError::Connection { source, .. } => Some(source),
            ConnectError::Connecting { source: ConnectingError::ConnectionError { source, .. }, .. } => Some(source),
            _ => None,
        };
        if closed.is_some_and(gate::is_refusal) {
            return TransportError::NotAMember { peer };
        }
        if is_alpn_refusal(&source) {
            return TransportError::AlpnRefused { peer, alpn: String::from_utf8_lossy(alpn).into_owned() };
        }
        TransportError::Connect { peer, source }
    }

    /// Whether the peer could not be reached at all (as opposed to a message lost on the way or
    /// refused by a peer that was reached).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            TransportError::NoAddress
                | TransportError::ConnectTimeout { .. }
                | TransportError::AlpnRefused { .. }
                | TransportError::Connect { .. }
        )
    }
}

/// TLS alert 120 (`no_application_protocol`) as a QUIC transport error code.
const ALPN_REFUSED_ALERT: u8 = 120;

/// Whether a failed connect says the ALPN asked for is not served: the peer closed the
/// connection with the alert (how an iroh peer refuses), or this side's TLS raised it.
fn is_alpn_refusal(e: &ConnectError) -> bool {
    let failed = match e {
        ConnectError::Connection { source, .. } => source,
        ConnectError::Connecting { source: ConnectingError::ConnectionError { source, .. }, .. } => source,
        _ => return false,
    };
    let alert = TransportErrorCode::crypto(ALPN_REFUSED_ALERT);
    match failed {
        ConnectionError::ConnectionClosed(close) => close.error_code == alert,
        ConnectionError::TransportError(local) => local.code == alert,
        _ => false,
    }
}
