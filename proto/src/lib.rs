//! The Causeway wire model: KubeEdge's beehive message (header, route, content), its two wire forms
//! and the viaduct packer frame. Byte-compatible with KubeEdge (see `PROTOCOL.md` and the golden
//! vectors in `conformance/vectors/`).
//!
//! This crate performs **no I/O**: it depends on no runtime, socket or TLS crate. Codecs work on
//! byte buffers; ids and clocks can be injected.
//!
//! Layout:
//! - [`message`]: [`Message`], [`Header`], [`Route`], [`Content`] and KubeEdge's constructors.
//! - [`json`]: the WebSocket form, byte-identical to Go's `encoding/json`.
//! - [`pb`]: the QUIC form, viaduct's protobuf (and Causeway's extension fields).
//! - [`frame`]: the 10-byte packer header, a sans-IO decoder with a 32 MiB cap.
//! - [`http`]: servicebus's `HTTPRequest` / `HTTPResponse` contents and message shapes.
//! - [`close`]: [`close::SessionCloseCode`], why a session was ended on purpose (one code for
//!   both transports).
//! - [`error`]: [`DecodeError`] and [`FrameError`], what a peer's bad bytes produce.
//! - [`fault`]: [`Fault`] and [`FaultClass`], whose fault a failure is (for every layer's errors).
//! - [`rate`]: a token bucket with time passed in, for both session state machines' pacing.
//! - [`row`]: a message as a database row (content kind, bytes, header and route columns), the one
//!   encoding of every store; pure, the stores do the SQL.
//!
//! ```text
//!  WebSocket text frame            QUIC message stream
//!  json::to_ws_text / from_slice   "msg" | frame::encode_message / FrameDecoder::decode_message
//!            \                                  |  10-byte header + pb::encode / pb::decode
//!             +--------------- Message ---------+
//! ```

pub mod close;
pub mod error;
pub mod fault;
pub mod frame;
pub mod http;
pub mod json;
pub mod message;
pub mod pb;
pub mod rate;
pub mod row;

pub use error::{DecodeError, FrameError};
pub use fault::{Fault, FaultClass};
pub use message::{Content, Header, Message, Route, new_id, now_millis};
