//! Message streams: which stream a message goes on ([`stream_index`]), and reading packer frames off
//! a stream ([`FrameReader`]).
//!
//! Stream model (PROTOCOL.md Part A item 3): each end opens its own message streams lazily, up to
//! `quic_streams` (default 8), and sends every message on stream `stream_index(route.resource, n)`.
//! Messages with the same resource therefore stay in order, while a lost packet delays only the
//! resources mapped to its stream. The hash is FNV-1a (64-bit) of the resource's UTF-8 bytes, fixed
//! so that both ends and every build agree on it.

use bytes::BytesMut;
use proto::Message;
use proto::error::FrameError;
use proto::frame::{FrameDecoder, MESSAGE_STREAM_PREFIX};

use crate::CloseReason;

/// The message stream (0-based, `< streams`) that carries messages about `resource`.
pub(crate) fn stream_index(resource: &str, streams: usize) -> usize {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = resource.bytes().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    // `streams` is at most MAX_QUIC_STREAMS, so both conversions are exact.
    (hash % streams.max(1) as u64) as usize
}

/// How reading a stream ended, other than with a message.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// The peer finished the stream cleanly between two frames.
    Eof,
    /// The connection is gone; its reason is recorded by whoever watches the connection.
    ConnectionLost,
    /// The stream carried something it must not: the connection must be closed for this reason.
    Failed(CloseReason),
}

/// Reads packer frames off one receive stream, enforcing the size cap on each frame's header.
#[derive(Debug)]
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    decoder: FrameDecoder,
    /// Largest read asked of quinn at once.
    chunk: usize,
}

/// Largest chunk taken from quinn per read; bounds the buffer growth between two decodes.
const READ_CHUNK: usize = 64 * 1024;

impl FrameReader {
    /// A reader capping payloads at `max_payload_len`.
    pub(crate) fn new(recv: quinn::RecvStream, max_payload_len: usize) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(max_payload_len),
            chunk: READ_CHUNK,
        }
    }

    /// Reads the 3-byte use type that opens a message stream and checks it is `msg` (viaduct's
    /// `str` raw-data streams have no consumer; anything else is not the protocol).
    pub(crate) async fn read_prefix(&mut self) -> Result<(), ReadEnd> {
        while self.buf.len() < MESSAGE_STREAM_PREFIX.len() {
            if !self.fill().await? {
                // A stream finished before its prefix carried nothing: harmless.
                return Err(ReadEnd::Eof);
            }
        }
        let prefix = self.buf.split_to(MESSAGE_STREAM_PREFIX.len());
        if &prefix[..] != MESSAGE_STREAM_PREFIX {
            return Err(ReadEnd::Failed(CloseReason::PeerMisbehaved {
                detail: format!(
                    "stream opened with use type {:?}; only \"msg\" is served",
                    String::from_utf8_lossy(&prefix)
                ),
            }));
        }
        Ok(())
    }

    /// The next message and its payload length.
    pub(crate) async fn next(&mut self) -> Result<(Message, usize), ReadEnd> {
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    let len = frame.payload.len();
                    return match frame.to_message() {
                        Ok(msg) => Ok((msg, len)),
                        Err(e) => Err(ReadEnd::Failed(CloseReason::Malformed {
                            detail: e.to_string(),
                        })),
                    };
                }
                Ok(None) => {}
                Err(e) => return Err(ReadEnd::Failed(frame_error(e))),
            }
            if !self.fill().await? {
                return match self.decoder.decode_eof(&mut self.buf) {
                    Ok(_) => Err(ReadEnd::Eof),
                    Err(e) => Err(ReadEnd::Failed(frame_error(e))),
                };
            }
        }
    }

    /// Appends the next chunk of the stream; `false` at the end of the stream.
    async fn fill(&mut self) -> Result<bool, ReadEnd> {
        match self.recv.read_chunk(self.chunk, true).await {
            Ok(Some(chunk)) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(quinn::ReadError::ConnectionLost(_)) => Err(ReadEnd::ConnectionLost),
            Err(quinn::ReadError::Reset(code)) => Err(ReadEnd::Failed(CloseReason::PeerAborted {
                code: code.into_inner(),
                reason: "peer reset a message stream; messages on it may be lost".to_owned(),
            })),
            Err(other) => Err(ReadEnd::Failed(CloseReason::PeerMisbehaved {
                detail: other.to_string(),
            })),
        }
    }
}

fn frame_error(err: FrameError) -> CloseReason {
    match err {
        FrameError::TooLarge { len, max } => CloseReason::TooLarge { len, max },
        other => CloseReason::Malformed {
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_resource_same_stream_and_in_range() {
        for n in 1..=64 {
            for r in ["", "node", "default/pod/nginx", "ns/configmap/x", "ü/ß"] {
                let i = stream_index(r, n);
                assert!(i < n);
                assert_eq!(i, stream_index(r, n));
            }
        }
        assert_eq!(stream_index("anything", 1), 0);
        assert_eq!(stream_index("anything", 0), 0);
    }

    #[test]
    fn mapping_is_fixed_fnv1a() {
        // FNV-1a 64 of "" is the offset basis; of "a" a known constant.
        assert_eq!(
            stream_index("", usize::MAX),
            (0xcbf2_9ce4_8422_2325u64 % usize::MAX as u64) as usize
        );
        assert_eq!(
            stream_index("a", usize::MAX),
            (0xaf63_dc4c_8601_ec8cu64 % usize::MAX as u64) as usize
        );
    }

    #[test]
    fn resources_spread_over_streams() {
        let n = 8;
        let mut used = vec![0usize; n];
        for i in 0..1000 {
            used[stream_index(&format!("default/pod/p{i}"), n)] += 1;
        }
        // Every stream gets a share, none more than twice the fair share.
        for count in used {
            assert!(count > 0 && count < 250, "{count}");
        }
    }
}
