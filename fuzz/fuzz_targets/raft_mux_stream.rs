//! A `raft-mux` stream as the receiving node reads it: requests of `id | shard | frame`, one
//! after another, until the stream ends or a message cannot be delimited. The stream reader
//! and the in-memory splitter agree message by message and on the error that stops them; every
//! request read re-encodes to exactly the bytes it came from; nothing over the limit is read.
#![no_main]

use aspen::transport::mux::{read_request, split_request, Incoming};
use aspen_fuzz::{poll_ready, split_limit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((limit, input)) = split_limit(data) else { return };
    let mut stream = input;
    let mut rest = input;
    loop {
        let streamed = poll_ready(read_request(&mut stream, limit));
        let pure = split_request(rest, limit);
        match (streamed, pure) {
            (Ok(Incoming::End), Ok(None)) => {
                assert!(rest.is_empty(), "the end of the stream is the end of the input");
                return;
            }
            (Ok(Incoming::Request { id, shard, envelope }), Ok(Some((id2, shard2, env2, after)))) => {
                assert_eq!((id, shard, envelope.as_slice()), (id2, shard2, env2), "reader and splitter disagree");
                assert!(envelope.len() <= limit, "an envelope over the limit was read");
                let mut again = id.to_be_bytes().to_vec();
                again.extend_from_slice(&shard.to_be_bytes());
                again.extend_from_slice(&(envelope.len() as u32).to_be_bytes());
                again.extend_from_slice(&envelope);
                assert_eq!(again, rest[..rest.len() - after.len()], "a request does not re-encode to its bytes");
                assert_eq!(stream.len(), after.len(), "reader and splitter stopped at different offsets");
                rest = after;
            }
            (Err(a), Err(b)) => {
                assert_eq!(a, b, "reader and splitter fail differently");
                return;
            }
            (a, b) => panic!("stream reader says {a:?}, splitter says {b:?}"),
        }
    }
});
