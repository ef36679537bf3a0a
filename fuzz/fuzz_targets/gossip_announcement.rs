//! Gossip announcements as they arrive on the topic: `SignedAnnouncement::decode`, then `verify`
//! against a fixed cluster and membership. The first input byte picks the membership: even, the
//! fixed members 1 and 2 (the only announcements that verify are exactly those their keys sign);
//! odd, a membership that trusts whatever endpoint id the announcement claims (so arbitrary keys
//! and signatures reach the signature check).
#![no_main]

use aspen::cluster::gossip::{Announcement, GossipError, SignedAnnouncement, MAX_ANNOUNCEMENT_BYTES};
use aspen_fuzz::{member_endpoint, member_key, GOSSIP_CLUSTER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else { return };
    let decoded = SignedAnnouncement::decode(bytes);
    if bytes.len() > MAX_ANNOUNCEMENT_BYTES {
        assert_eq!(decoded, Err(GossipError::TooLarge(bytes.len())));
    }
    let Ok(signed) = decoded else { return };
    let wire = signed.encode().expect("a decoded announcement re-encodes under the size limit");
    assert!(wire.len() <= bytes.len(), "re-encoding grew the announcement");
    assert_eq!(SignedAnnouncement::decode(&wire).as_ref(), Ok(&signed), "decode → encode → decode changed it");

    if mode % 2 == 0 {
        let Ok(a) = signed.verify(GOSSIP_CLUSTER, member_endpoint) else { return };
        check_accepted(&a);
        let key = member_key(a.node_id).expect("only members verify");
        assert_eq!(Some(a.endpoint_id), member_endpoint(a.node_id), "endpoint id differs from membership");
        // Ed25519 signing is deterministic and our payloads canonical: the only (payload,
        // signature) pair that verifies is the one the member's key produces itself.
        let resigned = SignedAnnouncement::sign(&a, &key).expect("re-sign");
        assert_eq!(resigned, signed, "an announcement verified that its member's key did not make");
    } else {
        let claimed = postcard::from_bytes::<Announcement>(&signed.payload).ok().map(|a| a.endpoint_id);
        let Ok(a) = signed.verify(GOSSIP_CLUSTER, |_| claimed) else { return };
        check_accepted(&a);
        assert_eq!(Some(a.endpoint_id), claimed);
    }
});

fn check_accepted(a: &Announcement) {
    assert_eq!(a.cluster_id, GOSSIP_CLUSTER, "an announcement of another cluster verified");
    assert!(a.addrs.len() <= 16, "too many addresses accepted");
    let _ = format!("{a:?}");
}
