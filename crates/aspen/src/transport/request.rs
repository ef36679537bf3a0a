//! One request/answer exchange with another node on the members-only peer ALPN (forwarded
//! requests, shard scans, membership and leader moves; the client wire format): a request frame
//! on a fresh bi-stream of the pooled connection, its answer frame back. Fault-injection hooks
//! sit on both legs.

use std::time::Duration;

use iroh::EndpointAddr;

use super::{fault, pool::ConnectionPool, TransportError};
use crate::api::{
    frame::{encode_frame, read_frame},
    ClientEnvelope, ClientRequest, ClientResult, CLIENT_PROTOCOL_VERSION, MAX_FRAME_BYTES, PEER_ALPN,
};

/// Sends one request to another node over a pooled connection. Transport failures come back as
/// `Err`; the peer's answer (which may itself be an error) as `Ok`.
pub async fn send_request(
    pool: &ConnectionPool,
    addr: &EndpointAddr,
    hops: u8,
    request: ClientRequest,
    timeout: Duration,
) -> Result<ClientResult, TransportError> {
    let frame = encode_frame(&ClientEnvelope { version: CLIENT_PROTOCOL_VERSION, hops, request, token: None })?;
    let me = pool.endpoint().id();
    let exchange = async {
        fault::on_send(me, addr.id, None).await?;
        let conn = pool.get(addr, PEER_ALPN).await?;
        let result = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(TransportError::Open)?;
            send.write_all(&frame).await?;
            send.finish()?;
            let reply = read_frame::<_, ClientResult>(&mut recv, MAX_FRAME_BYTES).await?;
            fault::on_reply(me, addr.id, None).await?;
            Ok(reply)
        }
        .await;
        if result.is_err() {
            if let Some(reason) = conn.close_reason() {
                pool.invalidate(addr.id, PEER_ALPN);
                if super::gate::is_refusal(&reason) {
                    return Err(TransportError::NotAMember { peer: addr.id.fmt_short().to_string() });
                }
            }
        }
        result
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| TransportError::Timeout(timeout))?
}
