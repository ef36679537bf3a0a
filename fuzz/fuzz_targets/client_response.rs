//! The client response frame (`Result<ClientResponse, ApiError>`) as the client and forwarding
//! nodes read it from a peer.
#![no_main]

use aspen::api::{
    frame::{decode_frame, encode_frame, read_frame},
    ClientResult,
};
use aspen_fuzz::{check_limit, error_kind, poll_ready, split_limit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((limit, input)) = split_limit(data) else { return };
    let pure = decode_frame::<ClientResult>(input, limit);
    let streamed = poll_ready(read_frame::<_, ClientResult>(&mut &input[..], limit));
    check_limit(input, limit, &pure);
    match (&pure, &streamed) {
        (Ok((a, _)), Ok(b)) => assert_eq!(a, b, "slice and stream decoders disagree"),
        (Err(a), Err(b)) => assert_eq!(error_kind(a), error_kind(b), "slice and stream readers fail differently"),
        (a, b) => panic!("slice decoder says {a:?}, stream reader says {b:?}"),
    }
    let Ok((result, rest)) = pure else { return };
    let payload_len = input.len() - 4 - rest.len();
    let frame = encode_frame(&result).expect("a decoded response re-encodes");
    assert!(frame.len() - 4 <= payload_len, "re-encoding grew the response past what was received");
    let (again, tail) = decode_frame::<ClientResult>(&frame, limit).expect("a re-encoded response decodes");
    assert_eq!(again, result, "decode → encode → decode changed the response");
    assert!(tail.is_empty());
    // The CLI prints errors: formatting any decoded error must not panic.
    if let Err(e) = &result {
        let _ = e.to_string();
    }
});
