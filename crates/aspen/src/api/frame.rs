//! Wire framing shared by every Aspen ALPN: a `u32` big-endian length, then that many bytes of
//! postcard. Readers enforce a size limit *before* allocating, so a hostile length can cost the
//! peer its stream but never this node's memory.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Upper bound for any frame on any ALPN (a Raft AppendEntries batch is capped well below it).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("stream ended before a complete frame arrived")]
    Truncated,
    #[error("malformed frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Serializes `value` into one frame (length prefix included).
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = postcard::to_extend(value, vec![0u8; 4])?;
    let size = buf.len() - 4;
    if size > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { size, limit: MAX_FRAME_BYTES });
    }
    let len = size as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

/// Writes `value` as one frame.
pub async fn write_frame<W, T>(w: &mut W, value: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let buf = encode_frame(value)?;
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame's payload, refusing frames larger than `limit`, on a stream that carries
/// one frame: an end of stream that arrived with it is read too (see [`see_end_if_arrived`]).
pub async fn read_frame_bytes<R>(r: &mut R, limit: usize) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let size = read_frame_len(r, limit).await?;
    read_single_payload(r, size).await
}

/// Reads one frame's payload, refusing frames larger than `limit`, on a stream that carries
/// several frames: nothing after the frame is touched.
pub async fn read_one_of_many<R>(r: &mut R, limit: usize) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let size = read_frame_len(r, limit).await?;
    read_frame_payload(r, size).await
}

/// Reads a frame's length prefix, refusing lengths above `limit`: the first half of
/// [`read_one_of_many`], for a reader that reserves memory for the payload before reading it.
pub async fn read_frame_len<R>(r: &mut R, limit: usize) -> Result<usize, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    read_exact_or_truncated(r, &mut len).await?;
    let size = u32::from_be_bytes(len) as usize;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    Ok(size)
}

/// Reads a payload of `size` bytes (after [`read_frame_len`]).
pub async fn read_frame_payload<R>(r: &mut R, size: usize) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin,
{
    // Grow the buffer as bytes arrive: a length prefix alone (say 60 MiB on a Raft stream, then
    // silence) must not make this node hold the claimed size for every such stream. It doubles,
    // but never past `size` (plain doubling would hold up to twice the frame).
    let mut buf = Vec::with_capacity(size.min(INITIAL_READ_CAPACITY));
    while buf.len() < size {
        if buf.len() == buf.capacity() {
            buf.reserve_exact(buf.capacity().max(INITIAL_READ_CAPACITY).min(size - buf.len()));
        }
        let room = (buf.capacity() - buf.len()).min(size - buf.len());
        if (&mut *r).take(room as u64).read_buf(&mut buf).await? == 0 {
            return Err(FrameError::Truncated);
        }
    }
    Ok(buf)
}

/// [`read_frame_payload`] on a stream that carries one frame (see [`read_frame_bytes`]).
pub async fn read_single_payload<R>(r: &mut R, size: usize) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let buf = read_frame_payload(r, size).await?;
    see_end_if_arrived(r).await;
    Ok(buf)
}

/// Reads the end of the stream after a frame if it has arrived already (a sender finishes its
/// stream right after the frame, so the end usually comes in the frame's last packet), without
/// waiting for it. Why: a QUIC stream dropped before its reader saw the end makes the reader's
/// side send STOP_SENDING, and the sender's side answer with RESET_STREAM — measured at two
/// extra control frames and about one extra UDP datagram per request. A stream carries one
/// frame; of bytes a peer sends after it, at most one is read here and dropped.
async fn see_end_if_arrived<R: AsyncRead + Unpin>(r: &mut R) {
    let mut probe = [0u8; 1];
    let _ = futures::FutureExt::now_or_never(r.read(&mut probe));
}

/// After answering a request: reads the request stream to its end, waiting at most `wait` (the
/// end, sent right after the frame, may still be in flight when the frame was read) and reading
/// at most a few KiB of unexpected bytes, so that the stream ends cleanly instead of being
/// stopped (see [`see_end_if_arrived`]). The answer has gone out already: this only holds the
/// stream a little longer. Gives up silently.
pub async fn drain_to_end<R: AsyncRead + Unpin>(r: &mut R, wait: std::time::Duration) {
    let _ = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 512];
        let mut left = 8 * buf.len();
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) if n >= left => return,
                Ok(n) => left -= n,
            }
        }
    })
    .await;
}

/// How long a server waits for the end of a request stream after answering (see
/// [`drain_to_end`]).
pub const REQUEST_END_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Most a reader reserves before the bytes of a frame arrive.
const INITIAL_READ_CAPACITY: usize = 64 * 1024;

/// Splits one frame off the front of `buf`: its payload and the bytes after it, refusing frames
/// larger than `limit`. The in-memory twin of [`read_frame_bytes`] (same errors for the same bytes).
pub fn split_frame(buf: &[u8], limit: usize) -> Result<(&[u8], &[u8]), FrameError> {
    let (len, rest) = buf.split_first_chunk::<4>().ok_or(FrameError::Truncated)?;
    let size = u32::from_be_bytes(*len) as usize;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    if rest.len() < size {
        return Err(FrameError::Truncated);
    }
    Ok(rest.split_at(size))
}

/// Decodes the frame at the front of `buf` (see [`split_frame`]) and returns the bytes after it.
/// The in-memory twin of [`read_frame`].
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8], limit: usize) -> Result<(T, &[u8]), FrameError> {
    let (payload, rest) = split_frame(buf, limit)?;
    Ok((decode(payload)?, rest))
}

/// Reads and decodes one frame, refusing frames larger than `limit`.
pub async fn read_frame<R, T>(r: &mut R, limit: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let buf = read_frame_bytes(r, limit).await?;
    decode(&buf)
}

/// Decodes a complete payload; trailing bytes are an error (a frame holds exactly one value).
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes(buf)?;
    if !rest.is_empty() {
        return Err(FrameError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(value)
}

async fn read_exact_or_truncated<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// Writes all bytes and flushes (used where a frame is followed by `finish`).
pub async fn write_raw<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), FrameError> {
    w.write_all(bytes).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClientEnvelope, ClientRequest, ReadConsistency, CLIENT_PROTOCOL_VERSION};

    #[tokio::test]
    async fn round_trip_and_limits() {
        let env = ClientEnvelope {
            version: CLIENT_PROTOCOL_VERSION,
            hops: 0,
            request: ClientRequest::Get { key: b"k".to_vec(), consistency: ReadConsistency::Stale },
            token: None,
        };
        let bytes = encode_frame(&env).unwrap();
        let back: ClientEnvelope = read_frame(&mut bytes.as_slice(), 1024).await.unwrap();
        assert_eq!(back, env);

        let err = read_frame::<_, ClientEnvelope>(&mut bytes.as_slice(), 2).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");

        let truncated = &bytes[..bytes.len() - 1];
        let err = read_frame::<_, ClientEnvelope>(&mut &truncated[..], 1024).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");

        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = read_frame::<_, ClientEnvelope>(&mut garbage.as_slice(), 1024).await.unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }

    #[test]
    fn split_frame_matches_the_stream_reader() {
        let env = ClientEnvelope { version: 1, hops: 2, request: ClientRequest::ClusterStatus, token: None };
        let mut two = encode_frame(&env).unwrap();
        let first_len = two.len();
        two.extend_from_slice(&encode_frame(&env).unwrap());
        let (back, rest) = decode_frame::<ClientEnvelope>(&two, 1024).unwrap();
        assert_eq!(back, env);
        assert_eq!(rest, &two[first_len..]);
        let (back, rest) = decode_frame::<ClientEnvelope>(rest, 1024).unwrap();
        assert_eq!((back, rest.len()), (env, 0));

        for short in [&[][..], &[0, 0], &[0, 0, 0, 5, 1]] {
            assert!(matches!(split_frame(short, 1024), Err(FrameError::Truncated)), "{short:?}");
        }
        assert!(matches!(split_frame(&[0, 0, 4, 1], 1024), Err(FrameError::TooLarge { size: 1025, limit: 1024 })));
        assert_eq!(split_frame(&[0, 0, 0, 0], 0).unwrap(), (&[][..], &[][..]));
    }

    /// A length prefix near the limit followed by nothing costs a truncated-frame error, not
    /// the claimed size in memory.
    #[tokio::test]
    async fn claimed_length_is_not_allocated_up_front() {
        let mut bytes = (48u32 << 20).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[7; 10]);
        let err = read_frame_bytes(&mut bytes.as_slice(), MAX_FRAME_BYTES).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
    }
}
