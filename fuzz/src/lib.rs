//! Shared pieces of Aspen's fuzz targets: the frame-size limit taken from the input, a poll for
//! the stream readers (which must finish in one poll on an in-memory slice), the fixed cluster
//! and membership the gossip target verifies against, and the seed inputs of every target.
//!
//! Every frame target checks the same properties: the in-memory decoder and the stream reader
//! the node really uses agree on every input (same value, same error); a frame is refused as too
//! large exactly when its length prefix exceeds the limit; anything that decodes re-encodes to
//! a message no longer than the one received (so it fits the same limit) that decodes to the
//! same value.

use std::{
    future::Future,
    pin::pin,
    task::{Context, Poll, Waker},
};

use aspen::api::{frame::FrameError, Id128, NodeId};
use iroh::SecretKey;
use serde::Serialize;

/// Splits the first two bytes off as the frame-size limit, so that small inputs exercise the limit
/// check as well as the decoder.
pub fn split_limit(data: &[u8]) -> Option<(usize, &[u8])> {
    let (limit, rest) = data.split_first_chunk::<2>()?;
    Some((u16::from_be_bytes(*limit) as usize, rest))
}

/// Runs a future that reads from a byte slice: it must be ready at the first poll.
pub fn poll_ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("reading from an in-memory slice never waits"),
    }
}

/// Canonical bytes of a value (for types without `PartialEq`, such as openraft's messages).
pub fn canonical<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("a decoded value re-encodes")
}

/// What a frame error says, for comparing the in-memory and stream readers.
pub fn error_kind(e: &FrameError) -> String {
    match e {
        FrameError::Io(e) => panic!("an in-memory read failed with an i/o error: {e}"),
        other => other.to_string(),
    }
}

/// Checks the length-prefix contract of a frame at the front of `input` under `limit`.
pub fn check_limit<T>(input: &[u8], limit: usize, result: &Result<T, FrameError>) {
    let declared = input.first_chunk::<4>().map(|l| u32::from_be_bytes(*l) as usize);
    match (declared, result) {
        (None, r) => assert!(matches!(r, Err(FrameError::Truncated)), "a frame needs a 4-byte length"),
        (Some(size), Err(FrameError::TooLarge { size: s, limit: l })) => {
            assert_eq!((*s, *l), (size, limit), "TooLarge reports the declared size and the limit");
            assert!(size > limit, "a frame within the limit was refused as too large");
        }
        (Some(size), r) => {
            assert!(size <= limit, "a frame over the limit was not refused as too large");
            if input.len() - 4 < size {
                assert!(matches!(r, Err(FrameError::Truncated)), "a short frame must be reported truncated");
            }
        }
    }
}

/// The cluster the gossip target verifies against.
pub const GOSSIP_CLUSTER: Id128 = Id128([7; 16]);

/// The node key of member `node` (1 and 2) in the gossip target's fixed membership.
pub fn member_key(node: NodeId) -> Option<SecretKey> {
    matches!(node, 1 | 2).then(|| SecretKey::from_bytes(&[node as u8; 32]))
}

/// The endpoint id the fixed membership records for `node`.
pub fn member_endpoint(node: NodeId) -> Option<[u8; 32]> {
    member_key(node).map(|k| *k.public().as_bytes())
}

pub mod seeds;
