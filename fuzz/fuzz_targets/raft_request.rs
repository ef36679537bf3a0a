//! The request that opens a legacy `raft-rpc` stream: one `RaftEnvelope` frame (shard 0).
#![no_main]

use aspen::{
    api::frame::encode_frame,
    api::raft_rpc::{decode_raft_request, read_raft_request},
};
use aspen_fuzz::{canonical, poll_ready, split_limit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((limit, input)) = split_limit(data) else { return };
    let pure = decode_raft_request(input, false, limit);
    let streamed = poll_ready(read_raft_request(&mut &input[..], false, limit));
    match (&pure, &streamed) {
        (Ok((s1, a, _)), Ok((s2, b))) => {
            assert_eq!((*s1, *s2), (0, 0), "an unprefixed stream is shard 0");
            assert_eq!(canonical(a), canonical(b), "slice and stream decoders disagree");
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "slice and stream readers refuse differently"),
        (a, b) => panic!("slice decoder says {a:?}, stream reader says {b:?}"),
    }
    if let Some(size) = input.first_chunk::<4>().map(|l| u32::from_be_bytes(*l) as usize) {
        if size > limit {
            assert!(pure.is_err(), "a frame over the limit was accepted");
        }
    }
    let Ok((_, env, rest)) = pure else { return };
    let _ = env.request.kind();
    let frame = encode_frame(&env).expect("a decoded raft request re-encodes");
    assert!(frame.len() <= input.len() - rest.len(), "re-encoding grew the raft request");
    let (shard, again, tail) = decode_raft_request(&frame, false, limit).expect("a re-encoded raft request decodes");
    assert_eq!((shard, tail.len()), (0, 0));
    assert_eq!(canonical(&again), canonical(&env), "decode → encode → decode changed the raft request");
});
