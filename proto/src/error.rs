//! Errors of the codecs, one enum per operation and all of them the peer's fault: the bytes it sent
//! cannot be turned into a message ([`DecodeError`]) or into a frame ([`FrameError`]). None of them
//! is ever a panic, whatever the input (PROTOCOL.md W1). The one error of ours, a message too big to
//! frame, is [`FrameError::TooLarge`] from the encoders.

/// The peer sent bytes that are not a message: malformed JSON (WebSocket) or protobuf (QUIC).
///
/// The remedy is always the same: drop the message, log the variant, and close the stream or
/// connection it came on (PROTOCOL.md Part A §5), since the peer is broken or hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not one well-formed JSON document: a syntax error, an invalid escape or
    /// UTF-8 sequence, a number out of `f64` range, nesting deeper than 128 levels, or an
    /// early end. `offset` is just past the byte where the parser gave up.
    #[error("malformed JSON at byte {offset}: {detail}")]
    JsonSyntax {
        /// Byte offset in the input just past where the parser gave up.
        offset: usize,
        /// The parser's description.
        detail: String,
    },
    /// Well-formed JSON, but a message field holds a value of the wrong type (for example a
    /// string `timestamp`, a fractional timestamp, or an array `header`): Go's
    /// `UnmarshalTypeError`.
    #[error("JSON field `{field}` has the wrong type at byte {offset}: {detail}")]
    JsonType {
        /// Dotted path of the field, such as `header.timestamp`.
        field: &'static str,
        /// Byte offset in the input just after the offending value.
        offset: usize,
        /// What was expected and what was found.
        detail: String,
    },
    /// The JSON document is followed by bytes other than whitespace. (gorilla's `ReadJSON`
    /// ignores what follows the first value; Causeway refuses it so that one frame is one
    /// message.)
    #[error("unexpected data after the JSON document at byte {offset}")]
    JsonTrailing {
        /// Byte offset of the first byte after the document that is not whitespace.
        offset: usize,
    },
    /// The payload is not a valid protobuf `message.Message`: a bad varint, a wrong wire type
    /// for a known field, a length running past the end, or a string that is not UTF-8.
    #[error("malformed protobuf: {detail}")]
    Protobuf {
        /// prost's description, naming the field where it knows it.
        detail: String,
    },
    /// The protobuf content does not match the kind the sender marked it with (Causeway's
    /// `content_kind`, PROTOCOL.md Part A item 3): JSON that does not parse, a string that is
    /// not UTF-8.
    #[error("protobuf content does not match its kind: {detail}")]
    ContentKind {
        /// What is wrong.
        detail: String,
    },
    /// The protobuf has no header sub-message (field 1), as in a 0-byte payload. KubeEdge's own
    /// decoder crashes on this (W1); ours refuses it.
    #[error("protobuf message has no header (field 1)")]
    MissingHeader,
    /// The protobuf has no router sub-message (field 2). KubeEdge's decoder crashes on this too.
    #[error("protobuf message has no router (field 2)")]
    MissingRouter,
}

/// The peer sent a frame that cannot be read, or a frame cannot be written.
///
/// On decode every variant means the stream is unusable (the decoder cannot resynchronise):
/// close that stream (KubeEdge frees it with application error code 1) and keep the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length field exceeds the cap. On decode this is the peer's fault and is detected from
    /// the 10-byte header alone, before any buffer grows (fixes W2). On encode it is ours: the
    /// message is bigger than any peer accepts (32 MiB), so split or refuse it.
    #[error("payload length {len} exceeds maximum {max}")]
    TooLarge {
        /// The length announced (decode) or needed (encode), in bytes.
        len: u64,
        /// The cap in force.
        max: usize,
    },
    /// The stream ended inside a frame: in its 10-byte header or before its payload was
    /// complete. Only [`crate::frame::FrameDecoder::decode_eof`] reports this.
    #[error("stream ended inside a frame: {have} of {need} bytes")]
    Truncated {
        /// Bytes of the frame that arrived.
        have: usize,
        /// Bytes the frame needed (10 while the header itself is incomplete).
        need: usize,
    },
    /// A complete frame whose payload is not a message.
    #[error("frame payload: {0}")]
    Message(#[from] DecodeError),
}
