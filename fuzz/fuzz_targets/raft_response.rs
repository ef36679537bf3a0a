//! The answer frame of a Raft stream (`RaftResponse`), as the Raft network client reads it.
#![no_main]

use aspen::{
    api::frame::{decode_frame, encode_frame, read_frame},
    api::raft_rpc::RaftResponse,
};
use aspen_fuzz::{canonical, check_limit, error_kind, poll_ready, split_limit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((limit, input)) = split_limit(data) else { return };
    let pure = decode_frame::<RaftResponse>(input, limit);
    let streamed = poll_ready(read_frame::<_, RaftResponse>(&mut &input[..], limit));
    check_limit(input, limit, &pure);
    match (&pure, &streamed) {
        (Ok((a, _)), Ok(b)) => assert_eq!(canonical(a), canonical(b), "slice and stream decoders disagree"),
        (Err(a), Err(b)) => assert_eq!(error_kind(a), error_kind(b), "slice and stream readers fail differently"),
        (a, b) => panic!("slice decoder says {a:?}, stream reader says {b:?}"),
    }
    let Ok((response, rest)) = pure else { return };
    let payload_len = input.len() - 4 - rest.len();
    let frame = encode_frame(&response).expect("a decoded raft response re-encodes");
    assert!(frame.len() - 4 <= payload_len, "re-encoding grew the raft response");
    let (again, tail) = decode_frame::<RaftResponse>(&frame, limit).expect("a re-encoded raft response decodes");
    assert_eq!(canonical(&again), canonical(&response), "decode → encode → decode changed the raft response");
    assert!(tail.is_empty());
    // Refusals and openraft errors are logged: formatting them must not panic.
    let _ = format!("{response:?}");
    if let RaftResponse::Refused(r) = &response {
        let _ = r.to_string();
    }
});
