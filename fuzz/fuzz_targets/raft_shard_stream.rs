//! The opening of a `raft-shard` stream: a 4-byte big-endian shard id, then one `RaftEnvelope`
//! frame. Every shard id decodes (the handler refuses shards it does not host); the prefix is
//! never confused with the frame.
#![no_main]

use aspen::{
    api::raft_rpc::{decode_raft_request, read_raft_request, RaftRefusal},
    api::{encode_shard_prefix, frame::encode_frame},
};
use aspen_fuzz::{canonical, poll_ready, split_limit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((limit, input)) = split_limit(data) else { return };
    let pure = decode_raft_request(input, true, limit);
    let streamed = poll_ready(read_raft_request(&mut &input[..], true, limit));
    match (&pure, &streamed) {
        (Ok((s1, a, _)), Ok((s2, b))) => {
            assert_eq!(s1, s2, "slice and stream decoders read different shards");
            assert_eq!(canonical(a), canonical(b), "slice and stream decoders disagree");
        }
        (Err(a), Err(b)) => assert!(
            matches!((a, b), (RaftRefusal::Malformed(_), RaftRefusal::Malformed(_))),
            "undecodable streams are Malformed: {a} / {b}"
        ),
        (a, b) => panic!("slice decoder says {a:?}, stream reader says {b:?}"),
    }
    if input.len() < 4 {
        assert!(pure.is_err(), "a stream without a full shard prefix was accepted");
    }
    if let Some(size) = input.get(4..8).map(|l| u32::from_be_bytes(l.try_into().expect("4 bytes")) as usize) {
        if size > limit {
            assert!(pure.is_err(), "a frame over the limit was accepted");
        }
    }
    let Ok((shard, env, rest)) = pure else { return };
    assert_eq!(encode_shard_prefix(shard), input[..4], "the shard id is the big-endian prefix");
    let mut stream = encode_shard_prefix(shard).to_vec();
    stream.extend(encode_frame(&env).expect("a decoded raft request re-encodes"));
    assert!(stream.len() <= input.len() - rest.len(), "re-encoding grew the stream");
    let (again_shard, again, tail) = decode_raft_request(&stream, true, limit).expect("a re-encoded stream decodes");
    assert_eq!((again_shard, tail.len()), (shard, 0));
    assert_eq!(canonical(&again), canonical(&env), "decode → encode → decode changed the raft request");
});
