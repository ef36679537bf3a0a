//! Node tickets: one copy-pasteable string that tells a client or a joining node how to reach a
//! member of a cluster — cluster id, node id, iroh endpoint id and direct socket addresses.
//!
//! Format: `aspen` followed by lower-case RFC 4648 base32 (no padding) of a postcard-encoded
//! [`NodeTicket`]. The leading version byte inside the payload keeps the format extensible.

use std::{fmt, net::SocketAddr, str::FromStr};

use iroh::{EndpointAddr, EndpointId, TransportAddr};
use serde::{Deserialize, Serialize};

use super::{ClusterId, NodeId};

const PREFIX: &str = "aspen";
const TICKET_VERSION: u8 = 1;
/// Tickets longer than this are refused before decoding.
const MAX_TICKET_CHARS: usize = 4096;
/// The fewest payload bytes any ticket has: version, cluster id, node id (at least one byte),
/// endpoint id. A shorter payload is a ticket cut off while being copied.
const MIN_PAYLOAD_BYTES: usize = 1 + 16 + 1 + 32;

/// How to reach one member of one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTicket {
    pub cluster_id: ClusterId,
    pub node_id: NodeId,
    pub endpoint_id: EndpointId,
    pub addrs: Vec<SocketAddr>,
}

#[derive(Serialize, Deserialize)]
struct WireTicket {
    version: u8,
    cluster_id: ClusterId,
    node_id: NodeId,
    endpoint_id: [u8; 32],
    addrs: Vec<SocketAddr>,
}

/// Why a string is not a valid ticket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket must start with \"{PREFIX}\"")]
    Prefix,
    #[error("ticket is too long ({0} characters)")]
    TooLong(usize),
    #[error("ticket is not valid base32")]
    Base32,
    #[error("ticket is truncated (copy the whole ticket, e.g. from the node's node.ticket file)")]
    Truncated,
    #[error("ticket payload is malformed")]
    Payload,
    #[error("ticket version {0} is not supported")]
    Version(u8),
    #[error("ticket holds an invalid endpoint id")]
    EndpointId,
    #[error("ticket holds no addresses")]
    NoAddrs,
    #[error("ticket holds node id {0}, outside 1..=2^48-1")]
    NodeId(u64),
}

impl NodeTicket {
    /// The iroh address to dial.
    pub fn endpoint_addr(&self) -> EndpointAddr {
        EndpointAddr::from_parts(self.endpoint_id, self.addrs.iter().copied().map(TransportAddr::Ip))
    }

    /// Encodes the ticket as a string.
    pub fn encode(&self) -> String {
        let wire = WireTicket {
            version: TICKET_VERSION,
            cluster_id: self.cluster_id,
            node_id: self.node_id,
            endpoint_id: *self.endpoint_id.as_bytes(),
            addrs: self.addrs.clone(),
        };
        // Serializing plain data into a Vec cannot fail.
        let bytes = postcard::to_stdvec(&wire).unwrap_or_default();
        format!("{PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&bytes).to_ascii_lowercase())
    }

    /// Parses a ticket string (surrounding whitespace is ignored).
    pub fn decode(s: &str) -> Result<Self, TicketError> {
        let s = s.trim();
        if s.len() > MAX_TICKET_CHARS {
            return Err(TicketError::TooLong(s.len()));
        }
        let body = s.strip_prefix(PREFIX).ok_or(TicketError::Prefix)?;
        let bytes =
            data_encoding::BASE32_NOPAD.decode(body.to_ascii_uppercase().as_bytes()).map_err(|e| match e.kind {
                // Every character is base32, but the text ends inside a byte: cut off.
                data_encoding::DecodeKind::Length => TicketError::Truncated,
                _ => TicketError::Base32,
            })?;
        if bytes.len() < MIN_PAYLOAD_BYTES {
            return Err(TicketError::Truncated);
        }
        let version = bytes[0];
        if version != TICKET_VERSION {
            return Err(TicketError::Version(version));
        }
        let wire: WireTicket = postcard::from_bytes(&bytes).map_err(|_| TicketError::Payload)?;
        let endpoint_id = EndpointId::from_bytes(&wire.endpoint_id).map_err(|_| TicketError::EndpointId)?;
        if wire.addrs.is_empty() {
            return Err(TicketError::NoAddrs);
        }
        if wire.node_id == 0 || wire.node_id > super::MAX_NODE_ID {
            return Err(TicketError::NodeId(wire.node_id));
        }
        Ok(NodeTicket { cluster_id: wire.cluster_id, node_id: wire.node_id, endpoint_id, addrs: wire.addrs })
    }
}

impl fmt::Display for NodeTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl FromStr for NodeTicket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeTicket::decode(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Id128;

    fn sample() -> NodeTicket {
        NodeTicket {
            cluster_id: Id128([7; 16]),
            node_id: 3,
            endpoint_id: iroh::SecretKey::from_bytes(&[9; 32]).public(),
            addrs: vec!["127.0.0.1:7601".parse().unwrap(), "[::1]:7601".parse().unwrap()],
        }
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let s = t.encode();
        assert!(s.starts_with("aspen"));
        assert_eq!(NodeTicket::decode(&s).unwrap(), t);
        assert_eq!(format!(" {s}\n").parse::<NodeTicket>().unwrap(), t);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(NodeTicket::decode("hello"), Err(TicketError::Prefix));
        assert_eq!(NodeTicket::decode("aspen!!!!!!!!"), Err(TicketError::Base32));
        assert_eq!(NodeTicket::decode("aspenaaaa"), Err(TicketError::Truncated));
        assert_eq!(NodeTicket::decode("aspen"), Err(TicketError::Truncated));
        let s = sample().encode();
        assert_eq!(NodeTicket::decode(&s[..37]), Err(TicketError::Truncated), "cut off while copied");
        assert_eq!(NodeTicket::decode(&s[..40]), Err(TicketError::Truncated), "cut off inside a byte");
        let s = sample().encode();
        assert!(NodeTicket::decode(&s[..s.len() - 8]).is_err());
        assert_eq!(NodeTicket::decode(&"a".repeat(5000)), Err(TicketError::TooLong(5000)));
        let mut t = sample();
        t.node_id = 0;
        assert_eq!(NodeTicket::decode(&t.encode()), Err(TicketError::NodeId(0)));
        t.node_id = 1 << 48;
        assert_eq!(NodeTicket::decode(&t.encode()), Err(TicketError::NodeId(1 << 48)));
    }
}
