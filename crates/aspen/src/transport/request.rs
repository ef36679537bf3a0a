//! One request/answer exchange with another node on the client ALPN (forwarded requests,
//! shard scans, membership and leader moves): a request frame on a fresh bi-stream of the
//! pooled connection, its answer frame back. Fault-injection hooks sit on both legs.

use std::time::Duration;

use iroh::EndpointAddr;

use super::{fault, pool::ConnectionPool, TransportError};
use crate::api::{
    frame::{encode_frame, read_frame},
    ClientEnvelope, ClientRequest, ClientResult, CLIENT_ALPN, CLIENT_PROTOCOL_VERSION, MAX_FRAME_BYTES,
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
    let frame = encode_frame(&ClientEnvelope { version: CLIENT_PROTOCOL_VERSION, hops, request })?;
    let me = pool.endpoint().id();
    let exchange = async {
        fault::on_send(me, addr.id, None).await?;
        let conn = pool.get(addr, CLIENT_ALPN).await?;
        let result = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(TransportError::Open)?;
            send.write_all(&frame).await?;
            send.finish()?;
            let reply = read_frame::<_, ClientResult>(&mut recv, MAX_FRAME_BYTES).await?;
            fault::on_reply(me, addr.id, None).await?;
            Ok(reply)
        }
        .await;
        if result.is_err() && conn.close_reason().is_some() {
            pool.invalidate(addr.id, CLIENT_ALPN);
        }
        result
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| TransportError::Timeout(timeout))?
}
