//! The token format: client capability tokens and join tokens, signed by the member that
//! issued them.
//!
//! A token is a prefix — [`CLIENT_PREFIX`] (`aspentoken1`) or [`JOIN_PREFIX`] (`aspenjoin1`) —
//! then lower-case unpadded base32 of `postcard(TokenBody) ‖ ed25519 signature (64 bytes)`. The
//! signature covers [`SIGNING_CONTEXT`] ‖ the body bytes and is made with the cluster's signing
//! key (made at cluster init, replicated in shard 0), whose public half the body names; any
//! member verifies a token without a round trip: the signature, that the key is its cluster's,
//! the cluster id, the expiry and the revocation set (`super::Authority`).
//!
//! Owns: encoding, decoding and signature checks. Never: decide which key is the cluster's or
//! what is revoked (the cluster layer feeds that into the authority).

use iroh::{PublicKey, SecretKey, Signature};
use serde::{Deserialize, Serialize};

use crate::api::{ClusterId, NodeId};

/// Client capability tokens start with this.
pub const CLIENT_PREFIX: &str = "aspentoken1";
/// Join tokens start with this.
pub const JOIN_PREFIX: &str = "aspenjoin1";
/// What the signature covers before the body: a token cannot be mistaken for another signed
/// message of the same key (gossip announcements sign with it too).
pub const SIGNING_CONTEXT: &[u8] = b"aspen token v1\0";
/// Tokens longer than this are refused before decoding.
pub const MAX_TOKEN_CHARS: usize = 8192;
/// At most this many key prefixes in one token.
pub const MAX_PREFIXES: usize = 16;
/// At most this many bytes per key prefix of a token.
pub const MAX_PREFIX_BYTES: usize = 1024;
/// The longest lifetime a token may be issued with (10 years).
pub const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
const BODY_VERSION: u8 = 1;
const SIGNATURE_BYTES: usize = 64;

/// What a client token lets its holder do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// get, scan (and watch).
    pub read: bool,
    /// put, delete, cas, batch, prefix delete, txn (and leases).
    pub write: bool,
    /// Membership, leader moves, tokens, join tokens (and snapshots, alarms).
    pub admin: bool,
    /// Every key of a request must start with one of these; empty: any key.
    pub prefixes: Vec<Vec<u8>>,
}

impl Scope {
    /// Read, write and admin on every key: the scope of a node's `admin.token`.
    pub fn all() -> Self {
        Scope { read: true, write: true, admin: true, prefixes: Vec::new() }
    }

    /// Whether `key` falls under the token's prefixes.
    pub fn covers_key(&self, key: &[u8]) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| key.starts_with(p))
    }

    /// Whether every key in `[lower, upper)` (`upper` `None`: no end) falls under one prefix.
    pub fn covers_range(&self, lower: &[u8], upper: Option<&[u8]>) -> bool {
        if self.prefixes.is_empty() {
            return true;
        }
        self.prefixes.iter().any(|p| {
            lower >= p.as_slice()
                && match crate::api::prefix_end(p) {
                    // Every key is below the end of an all-0xff prefix… only if it starts with it.
                    None => lower.starts_with(p),
                    Some(end) => upper.is_some_and(|u| u <= end.as_slice()),
                }
        })
    }

    /// Checks the limits a token's scope must keep.
    pub fn check(&self) -> Result<(), TokenError> {
        if !(self.read || self.write || self.admin) {
            return Err(TokenError::Invalid("a token needs at least one of read, write, admin".into()));
        }
        if self.prefixes.len() > MAX_PREFIXES {
            return Err(TokenError::Invalid(format!("at most {MAX_PREFIXES} key prefixes per token")));
        }
        if self.prefixes.iter().any(|p| p.is_empty() || p.len() > MAX_PREFIX_BYTES) {
            return Err(TokenError::Invalid(format!("a key prefix must hold 1 to {MAX_PREFIX_BYTES} bytes")));
        }
        Ok(())
    }
}

/// Which kind of token, with what it carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenKind {
    /// A client's capability.
    Client(Scope),
    /// Lets a node join (`aspen-node --join-token`); single-use tokens admit one node id.
    Join { single_use: bool },
}

/// The signed part of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBody {
    pub version: u8,
    pub kind: TokenKind,
    /// Random, non-zero; printed as 16 hex digits; what revocation names.
    pub id: u64,
    pub cluster_id: ClusterId,
    /// The member that issued it.
    pub issuer: NodeId,
    /// The public half of the key that signed it: the cluster's signing key.
    pub issuer_key: [u8; 32],
    /// Seconds since the Unix epoch.
    pub issued_at: u64,
    /// Seconds since the Unix epoch; `None`: until revoked.
    pub expires_at: Option<u64>,
}

/// Why a token was not accepted. The text is what the refused caller reads.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token was issued for another cluster")]
    WrongCluster,
    #[error("the token (issued by node {0}) was not signed with this cluster's key")]
    UnknownIssuer(NodeId),
    #[error("the token expired")]
    Expired,
    #[error("the token was revoked")]
    Revoked,
    #[error("{0}")]
    Invalid(String),
    /// This node cannot check tokens yet (it has not received the cluster's signing key).
    #[error("this node does not hold the cluster's signing key yet; retry")]
    NotReady,
}

impl TokenError {
    /// The refusal's reason in metrics (`aspen_auth_refusals_total`); `None`: not a refusal
    /// (the node cannot check tokens yet).
    pub fn reason(&self) -> Option<&'static str> {
        Some(match self {
            TokenError::Malformed(_) => "malformed",
            TokenError::BadSignature => "bad_signature",
            TokenError::WrongCluster => "wrong_cluster",
            TokenError::UnknownIssuer(_) => "unknown_issuer",
            TokenError::Expired => "expired",
            TokenError::Revoked => "revoked",
            TokenError::Invalid(_) => "invalid",
            TokenError::NotReady => return None,
        })
    }
}

/// A token id as printed: 16 lower-case hex digits.
pub fn format_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Parses a token id: 1–16 hex digits, either case.
pub fn parse_id(text: &str) -> Option<u64> {
    let t = text.trim();
    if t.is_empty() || t.len() > 16 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(t, 16).ok().filter(|id| *id != 0)
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TokenBody {
    /// A fresh body of `kind`, issued now by `issuer` for `ttl_secs` (`None`: no expiry).
    pub fn new(
        kind: TokenKind,
        cluster_id: ClusterId,
        issuer: NodeId,
        issuer_key: [u8; 32],
        ttl_secs: Option<u64>,
    ) -> Result<Self, TokenError> {
        if let TokenKind::Client(scope) = &kind {
            scope.check()?;
        }
        let now = unix_now();
        let expires_at = match ttl_secs {
            None => None,
            Some(0) => return Err(TokenError::Invalid("a token's TTL must be at least 1 second".into())),
            Some(t) if t > MAX_TTL_SECS => {
                return Err(TokenError::Invalid(format!("a token's TTL may be at most {MAX_TTL_SECS} seconds")))
            }
            Some(t) => Some(now + t),
        };
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        Ok(TokenBody { version: BODY_VERSION, kind, id, cluster_id, issuer, issuer_key, issued_at: now, expires_at })
    }

    fn prefix(&self) -> &'static str {
        match self.kind {
            TokenKind::Client(_) => CLIENT_PREFIX,
            TokenKind::Join { .. } => JOIN_PREFIX,
        }
    }

    /// Signs the body with `key` (whose public half must be `issuer_key`) and encodes the token.
    pub fn sign(&self, key: &SecretKey) -> Result<String, TokenError> {
        let body = postcard::to_stdvec(self).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let mut message = SIGNING_CONTEXT.to_vec();
        message.extend_from_slice(&body);
        let mut bytes = body;
        bytes.extend_from_slice(&key.sign(&message).to_bytes());
        let text = format!("{}{}", self.prefix(), data_encoding::BASE32_NOPAD.encode(&bytes).to_ascii_lowercase());
        if text.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::Invalid(format!("the token would be longer than {MAX_TOKEN_CHARS} characters")));
        }
        Ok(text)
    }

    /// Whether it expired at `now` (seconds since the epoch).
    pub fn expired_at(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }
}

/// Decodes `text` and checks its signature against the issuer key it names. Says nothing yet
/// about whether that issuer is trusted, the cluster, expiry or revocation.
pub fn decode_and_verify(text: &str) -> Result<TokenBody, TokenError> {
    let text = text.trim();
    if text.len() > MAX_TOKEN_CHARS {
        return Err(TokenError::Malformed(format!("longer than {MAX_TOKEN_CHARS} characters")));
    }
    let (prefix, body) = if let Some(rest) = text.strip_prefix(CLIENT_PREFIX) {
        (CLIENT_PREFIX, rest)
    } else if let Some(rest) = text.strip_prefix(JOIN_PREFIX) {
        (JOIN_PREFIX, rest)
    } else {
        return Err(TokenError::Malformed(format!("a token starts with {CLIENT_PREFIX} or {JOIN_PREFIX}")));
    };
    let bytes = data_encoding::BASE32_NOPAD
        .decode(body.to_ascii_uppercase().as_bytes())
        .map_err(|_| TokenError::Malformed("not valid base32 (copy the whole token)".into()))?;
    if bytes.len() <= SIGNATURE_BYTES {
        return Err(TokenError::Malformed("truncated (copy the whole token)".into()));
    }
    let (body_bytes, sig_bytes) = bytes.split_at(bytes.len() - SIGNATURE_BYTES);
    let (parsed, rest) = postcard::take_from_bytes::<TokenBody>(body_bytes)
        .map_err(|e| TokenError::Malformed(format!("unreadable body: {e}")))?;
    if !rest.is_empty() {
        return Err(TokenError::Malformed("trailing bytes".into()));
    }
    if parsed.version != BODY_VERSION {
        return Err(TokenError::Malformed(format!("token version {} is not supported", parsed.version)));
    }
    if parsed.prefix() != prefix {
        return Err(TokenError::Malformed("the prefix does not match the token's kind".into()));
    }
    let sig: [u8; SIGNATURE_BYTES] = sig_bytes.try_into().map_err(|_| TokenError::BadSignature)?;
    let key = PublicKey::from_bytes(&parsed.issuer_key).map_err(|_| TokenError::BadSignature)?;
    let mut message = SIGNING_CONTEXT.to_vec();
    message.extend_from_slice(body_bytes);
    key.verify(&message, &Signature::from_bytes(&sig)).map_err(|_| TokenError::BadSignature)?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_bytes(&[7u8; 32])
    }

    fn body(kind: TokenKind, ttl: Option<u64>) -> TokenBody {
        TokenBody::new(kind, ClusterId::random(), 1, *key().public().as_bytes(), ttl).unwrap()
    }

    #[test]
    fn tokens_round_trip_and_any_change_breaks_the_signature() {
        let scope = Scope { read: true, write: false, admin: false, prefixes: vec![b"app/".to_vec()] };
        let b = body(TokenKind::Client(scope), Some(60));
        let text = b.sign(&key()).unwrap();
        assert!(text.starts_with(CLIENT_PREFIX));
        assert_eq!(decode_and_verify(&text).unwrap(), b);
        assert_eq!(decode_and_verify(&format!("  {text}\n")).unwrap(), b, "surrounding whitespace is ignored");
        // Flip each base32 character of the body in turn: nothing decodes to a valid token.
        let chars: Vec<char> = text.chars().collect();
        for i in CLIENT_PREFIX.len()..chars.len() {
            let mut c = chars.clone();
            c[i] = if c[i] == 'a' { 'b' } else { 'a' };
            let tampered: String = c.into_iter().collect();
            assert!(decode_and_verify(&tampered).is_err(), "changed char {i} still verifies");
        }
        // Signed by another key than the one named: refused.
        let other = SecretKey::from_bytes(&[8u8; 32]);
        assert_eq!(decode_and_verify(&b.sign(&other).unwrap()), Err(TokenError::BadSignature));
        // Truncated, wrong prefix, garbage.
        assert!(decode_and_verify(&text[..text.len() - 10]).is_err());
        assert!(decode_and_verify(&text.replacen(CLIENT_PREFIX, JOIN_PREFIX, 1)).is_err());
        for junk in ["", "aspentoken1", "aspentoken1!!!", "hello", &"aspentoken1a".repeat(1000)] {
            assert!(decode_and_verify(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn join_tokens_expire_and_carry_their_kind() {
        let b = body(TokenKind::Join { single_use: true }, Some(3600));
        let text = b.sign(&key()).unwrap();
        assert!(text.starts_with(JOIN_PREFIX));
        let back = decode_and_verify(&text).unwrap();
        assert_eq!(back.kind, TokenKind::Join { single_use: true });
        assert!(!back.expired_at(back.issued_at));
        assert!(back.expired_at(back.issued_at + 3600));
        assert!(
            TokenBody::new(TokenKind::Join { single_use: false }, ClusterId::random(), 1, [0; 32], Some(0)).is_err()
        );
    }

    #[test]
    fn scopes_cover_keys_and_ranges_only_under_their_prefixes() {
        let s = Scope { read: true, write: true, admin: false, prefixes: vec![b"a/".to_vec(), b"b".to_vec()] };
        assert!(s.covers_key(b"a/x") && s.covers_key(b"b") && s.covers_key(b"bz"));
        assert!(!s.covers_key(b"a") && !s.covers_key(b"c"));
        assert!(s.covers_range(b"a/", Some(b"a0")));
        assert!(s.covers_range(b"a/m", Some(b"a/z")));
        assert!(!s.covers_range(b"a/", None), "unbounded above leaves the prefix");
        assert!(!s.covers_range(b"a/", Some(b"a1")), "a/ ends at a0");
        assert!(!s.covers_range(b"", Some(b"a0")), "starts before the prefix");
        assert!(Scope::all().covers_range(b"", None));
        assert!(Scope { prefixes: vec![vec![0xff]], ..Scope::all() }.covers_range(&[0xff, 1], None));
        assert_eq!(crate::api::permission_names(s.read, s.write, s.admin), "read,write");
        assert!(Scope::default().check().is_err(), "no permission at all");
        assert!(Scope { prefixes: vec![Vec::new()], ..Scope::all() }.check().is_err(), "empty prefix");
    }

    #[test]
    fn ids_parse_from_one_to_sixteen_hex_digits() {
        assert_eq!(parse_id("00000000000000ff"), Some(255));
        assert_eq!(parse_id("FF"), Some(255));
        assert_eq!(parse_id(&format_id(u64::MAX)), Some(u64::MAX));
        for bad in ["", "0", "g", "12345678901234567", "-1"] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }
}
