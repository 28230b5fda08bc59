//! `causeway frame`: decode and encode messages in KubeEdge's three wire forms, for inspecting
//! captures and producing test input. `decode` prints each message as KubeEdge's Go marshals it
//! (the vectors' `NAME.decoded.json`); `encode` reads KubeEdge JSON and writes what KubeEdge would
//! put on the wire (`NAME.fromjson.frame`, the protobuf payload, or the WebSocket text).
//!
//! Undecodable input is reported as one line naming the byte offset (exit code 2). Nothing here
//! panics on any input: lengths are checked against the 32 MiB cap before anything is allocated.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;

use bytes::BytesMut;

use super::BadInput;
use proto::frame::{FrameDecoder, HEADER_LEN};
use proto::{DecodeError, FrameError, Message};

/// `causeway frame` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print the messages in FILE (or stdin) as KubeEdge JSON, one per line.
    #[command(after_help = "\
Examples:
  causeway frame decode conformance/vectors/keepalive.frame
  causeway frame decode --format pb keepalive.pb
  cat capture.bin | causeway frame decode -

`frame` input may hold several frames back to back (a QUIC stream capture without its 3-byte
`msg` prefix); `json` input may hold several documents. Content decoded from a frame or protobuf
is bytes, so it prints as base64, exactly as KubeEdge marshals it. Bad input gives one line on
stderr with the byte offset, and exit code 2.")]
    Decode(DecodeArgs),
    /// Read KubeEdge JSON from FILE (or stdin) and write it in a wire form to stdout.
    #[command(after_help = "\
Examples:
  echo '{\"header\":{\"msg_id\":\"a\",\"timestamp\":1},\"route\":{\"source\":\"s\",\"group\":\"g\",\
\"operation\":\"o\",\"resource\":\"r\"},\"content\":\"c\"}' | causeway frame encode --format frame > m.frame
  causeway frame encode --format pb msg.json > msg.pb

Writes what KubeEdge writes: `frame` = 10-byte packer header + viaduct protobuf (one frame per
input document), `pb` = the protobuf payload alone (one document only), `json` = the WebSocket
text payload (JSON + newline).")]
    Encode(EncodeArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// Packer frames (10-byte header + protobuf), as on a QUIC message stream.
    Frame,
    /// A bare protobuf `message.Message` payload.
    Pb,
    /// KubeEdge JSON, as on WebSocket.
    Json,
}

#[derive(Debug, clap::Args)]
struct DecodeArgs {
    /// Input form.
    #[arg(long, value_enum, default_value_t = Format::Frame)]
    format: Format,
    /// Input file, or `-` for stdin.
    #[arg(default_value = "-")]
    input: PathBuf,
}

#[derive(Debug, clap::Args)]
struct EncodeArgs {
    /// Output form.
    #[arg(long, value_enum, default_value_t = Format::Frame)]
    format: Format,
    /// Write Causeway's protobuf (adds resource version, destination and type as extension
    /// fields KubeEdge ignores) instead of exactly viaduct's.
    #[arg(long)]
    causeway: bool,
    /// Input file of KubeEdge JSON, or `-` for stdin.
    #[arg(default_value = "-")]
    input: PathBuf,
}

/// Runs `causeway frame`.
pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Decode(a) => decode(a),
        Command::Encode(a) => encode(a),
    }
}

fn decode(args: DecodeArgs) -> anyhow::Result<()> {
    let (source, input) = read_input(&args.input)?;
    let mut out = std::io::stdout().lock();
    let mut emit = |msg: &Message| -> std::io::Result<()> {
        out.write_all(&proto::json::to_vec(msg))?;
        out.write_all(b"\n")
    };
    let result = match args.format {
        Format::Frame => decode_frames(&input, &mut emit),
        Format::Pb => match proto::pb::decode(&input) {
            Ok(msg) => Ok(emit(&msg)),
            Err(e) => Err(Bad {
                offset: 0,
                reason: decode_reason(&e),
            }),
        },
        Format::Json => json_documents(&input, |_, msg| Ok(emit(&msg))),
    };
    finish(result, source)
}

fn encode(args: EncodeArgs) -> anyhow::Result<()> {
    let (source, input) = read_input(&args.input)?;
    let pb = |msg: &Message| {
        if args.causeway {
            proto::pb::encode(msg)
        } else {
            proto::pb::encode_kubeedge(msg)
        }
    };
    let mut out = std::io::stdout().lock();
    let mut count = 0usize;
    let result = json_documents(&input, |offset, msg| {
        count += 1;
        let bytes = match args.format {
            Format::Frame => {
                let mut buf = BytesMut::new();
                proto::frame::encode(&pb(&msg), &mut buf).map_err(|e| Bad {
                    offset,
                    reason: format!("message cannot be framed: {e}"),
                })?;
                buf.to_vec()
            }
            Format::Pb if count > 1 => {
                return Err(Bad {
                    offset,
                    reason: "a protobuf payload holds one message; use --format frame for several"
                        .into(),
                });
            }
            Format::Pb => pb(&msg),
            Format::Json => proto::json::to_ws_text(&msg).into_bytes(),
        };
        Ok(out.write_all(&bytes))
    });
    finish(result, source)
}

/// Where and why input could not be decoded, relative to the whole input.
struct Bad {
    offset: usize,
    reason: String,
}

/// Decoding continues while each message's output succeeds; the inner `io::Result` is the
/// output's, kept apart from the input's errors.
type Step = Result<std::io::Result<()>, Bad>;

fn finish(result: Step, source: String) -> anyhow::Result<()> {
    match result {
        Ok(Ok(())) => Ok(()),
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("writing to stdout")),
        Err(bad) => Err(BadInput {
            source,
            offset: bad.offset,
            reason: bad.reason,
        }
        .into()),
    }
}

/// Decodes back-to-back packer frames, calling `emit` for each message.
fn decode_frames(input: &[u8], emit: &mut impl FnMut(&Message) -> std::io::Result<()>) -> Step {
    if input.is_empty() {
        return Err(Bad {
            offset: 0,
            reason: "empty input: no frame".into(),
        });
    }
    let mut buf = BytesMut::from(input);
    let mut decoder = FrameDecoder::default();
    let mut start = 0usize;
    loop {
        let frame = match decoder.decode_eof(&mut buf) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(Ok(())),
            Err(FrameError::TooLarge { len, max }) => {
                return Err(Bad {
                    offset: start + 6,
                    reason: format!("frame length {len} exceeds the maximum of {max} bytes"),
                });
            }
            Err(FrameError::Truncated { have, need }) => {
                return Err(Bad {
                    offset: input.len(),
                    reason: format!(
                        "input ends inside the frame starting at byte {start}: \
                         {have} of {need} bytes"
                    ),
                });
            }
            Err(other) => {
                return Err(Bad {
                    offset: start,
                    reason: other.to_string(),
                });
            }
        };
        let payload_at = start + HEADER_LEN;
        let msg = frame.to_message().map_err(|e| Bad {
            offset: payload_at,
            reason: format!(
                "payload of the frame at byte {start}: {}",
                decode_reason(&e)
            ),
        })?;
        if let Err(e) = emit(&msg) {
            return Ok(Err(e));
        }
        start = payload_at + frame.payload.len();
    }
}

/// Splits `input` into JSON documents (whitespace between them is skipped) and decodes each as a
/// KubeEdge message, calling `each(offset_of_document, message)`.
fn json_documents(input: &[u8], mut each: impl FnMut(usize, Message) -> Step) -> Step {
    let mut pos = 0usize;
    let mut seen = false;
    loop {
        pos += input[pos..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        if pos == input.len() {
            if !seen {
                return Err(Bad {
                    offset: pos,
                    reason: "empty input: no JSON document".into(),
                });
            }
            return Ok(Ok(()));
        }
        let rest = &input[pos..];
        // Find where this document ends; on a syntax error, let the message decoder report it
        // with its byte offset.
        let mut docs =
            serde_json::Deserializer::from_slice(rest).into_iter::<serde::de::IgnoredAny>();
        let end = match docs.next() {
            Some(Ok(_)) => docs.byte_offset(),
            _ => rest.len(),
        };
        let msg = proto::json::from_slice(&rest[..end]).map_err(|e| Bad {
            offset: pos + decode_offset(&e).unwrap_or(0),
            reason: decode_reason(&e),
        })?;
        seen = true;
        match each(pos, msg)? {
            Ok(()) => {}
            Err(e) => return Ok(Err(e)),
        }
        pos += end;
    }
}

fn decode_offset(e: &DecodeError) -> Option<usize> {
    match e {
        DecodeError::JsonSyntax { offset, .. }
        | DecodeError::JsonType { offset, .. }
        | DecodeError::JsonTrailing { offset } => Some(*offset),
        _ => None,
    }
}

/// The error's text without its own "at byte N" (the caller prints the absolute offset).
fn decode_reason(e: &DecodeError) -> String {
    match e {
        DecodeError::JsonSyntax { detail, .. } => format!("malformed JSON: {detail}"),
        DecodeError::JsonType { field, detail, .. } => {
            format!("JSON field `{field}` has the wrong type: {detail}")
        }
        DecodeError::JsonTrailing { .. } => "unexpected data after the JSON document".into(),
        other => other.to_string(),
    }
}

fn read_input(path: &std::path::Path) -> anyhow::Result<(String, Vec<u8>)> {
    let mut input = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .read_to_end(&mut input)
            .map_err(|e| anyhow::anyhow!("reading stdin: {e}"))?;
        Ok(("stdin".into(), input))
    } else {
        let input = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok((path.display().to_string(), input))
    }
}
