//! The client request envelope as the `aspen-client` handler reads it: one length-prefixed frame
//! under the node's frame limit, then a `ClientEnvelope`.
#![no_main]

use aspen::api::{
    frame::{decode_frame, encode_frame, read_frame},
    ClientEnvelope,
};
use aspen_fuzz::{check_limit, error_kind, poll_ready, split_limit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((limit, input)) = split_limit(data) else { return };
    let pure = decode_frame::<ClientEnvelope>(input, limit);
    let streamed = poll_ready(read_frame::<_, ClientEnvelope>(&mut &input[..], limit));
    check_limit(input, limit, &pure);
    match (&pure, &streamed) {
        (Ok((a, _)), Ok(b)) => assert_eq!(a, b, "slice and stream decoders disagree"),
        (Err(a), Err(b)) => assert_eq!(error_kind(a), error_kind(b), "slice and stream readers fail differently"),
        (a, b) => panic!("slice decoder says {a:?}, stream reader says {b:?}"),
    }
    let Ok((env, rest)) = pure else { return };
    let payload_len = input.len() - 4 - rest.len();
    let frame = encode_frame(&env).expect("a decoded request re-encodes");
    assert!(frame.len() - 4 <= payload_len, "re-encoding grew the request past what was received");
    let (again, tail) = decode_frame::<ClientEnvelope>(&frame, limit).expect("a re-encoded request decodes");
    assert_eq!(again, env, "decode → encode → decode changed the request");
    assert!(tail.is_empty());
    let _ = env.request.needs_leader();
});
