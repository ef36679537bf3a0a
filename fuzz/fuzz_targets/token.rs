//! Token decoding and verification on arbitrary strings (tokens come from users, files,
//! environment variables and every client request): never a panic; whatever verifies was signed
//! with the key it names, and with the authority's key when the authority accepts it; a
//! verified client token's scope is checked against requests without a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use aspen::{
    api::{ClientRequest, ReadConsistency, ScanRequest},
    auth::{
        authorize,
        token::{decode_and_verify, MAX_TOKEN_CHARS},
        Authority,
    },
};
use aspen_fuzz::seeds::{TOKEN_CLUSTER, TOKEN_KEY};
use libfuzzer_sys::fuzz_target;

fn authority() -> &'static Arc<Authority> {
    static A: OnceLock<Arc<Authority>> = OnceLock::new();
    A.get_or_init(|| {
        let a = Authority::new(1);
        a.set_cluster(Some(TOKEN_CLUSTER));
        a.set_key(iroh::SecretKey::from_bytes(&TOKEN_KEY));
        a
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match decode_and_verify(s) {
        Ok(body) => {
            assert!(s.trim().len() <= MAX_TOKEN_CHARS, "an over-long token decoded");
            let _ = body.expired_at(u64::MAX);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let Ok(verified) = authority().verify(s) else { return };
    let key = iroh::SecretKey::from_bytes(&TOKEN_KEY);
    assert_eq!(&verified.body.issuer_key, key.public().as_bytes(), "accepted a token of another key");
    assert_eq!(verified.body.cluster_id, TOKEN_CLUSTER);
    if let Some(scope) = verified.scope() {
        let requests = [
            ClientRequest::Get { key: s.as_bytes().to_vec(), consistency: ReadConsistency::Stale },
            ClientRequest::Scan(ScanRequest {
                prefix: s.as_bytes().iter().take(3).copied().collect(),
                start: Some(s.as_bytes().to_vec()),
                end: Some(s.as_bytes().iter().rev().copied().collect()),
                limit: 1,
                continuation: None,
                consistency: ReadConsistency::Linearizable,
            }),
            ClientRequest::BalanceLeaders,
        ];
        for r in &requests {
            let _ = authorize(scope, r);
        }
    }
});
