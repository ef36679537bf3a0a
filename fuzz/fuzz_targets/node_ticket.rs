//! `NodeTicket::decode` on arbitrary strings (tickets come from users, files and peers).
#![no_main]

use aspen::api::{NodeTicket, TicketError, MAX_NODE_ID};
use libfuzzer_sys::fuzz_target;

/// `NodeTicket::decode` refuses longer tickets before decoding.
const MAX_TICKET_CHARS: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let decoded = NodeTicket::decode(s);
    let trimmed = s.trim();
    if trimmed.len() > MAX_TICKET_CHARS {
        assert_eq!(decoded, Err(TicketError::TooLong(trimmed.len())));
    }
    let Ok(ticket) = decoded else {
        if let Err(e) = decoded {
            let _ = e.to_string();
        }
        return;
    };
    assert!((1..=MAX_NODE_ID).contains(&ticket.node_id), "node id {} accepted", ticket.node_id);
    assert!(!ticket.addrs.is_empty(), "a ticket without addresses was accepted");
    let encoded = ticket.encode();
    assert!(encoded.starts_with("aspen"));
    assert!(encoded.len() <= trimmed.len(), "the canonical ticket is longer than the one decoded");
    assert_eq!(NodeTicket::decode(&encoded).as_ref(), Ok(&ticket), "decode → encode → decode changed the ticket");
    assert_eq!(encoded.parse::<NodeTicket>().as_ref(), Ok(&ticket));
    // The base32 body is case-insensitive, and surrounding whitespace is ignored.
    let shouted = format!("  aspen{}\n", encoded["aspen".len()..].to_ascii_uppercase());
    assert_eq!(NodeTicket::decode(&shouted).as_ref(), Ok(&ticket));
    let addr = ticket.endpoint_addr();
    assert_eq!(addr.id, ticket.endpoint_id);
});
