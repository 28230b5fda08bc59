//! The WebSocket form of a message: the JSON that Go's `encoding/json` writes for KubeEdge's
//! `model.Message`, byte for byte (PROTOCOL.md B§1.1, B§4.4), and a decoder as tolerant as Go's.
//!
//! The writer is hand-made rather than serde_json's formatter because three Go habits decide the
//! bytes: HTML characters and U+2028/U+2029 are escaped, object keys are sorted, and every number is
//! a `float64`. Go decodes any JSON number in the content into a `float64`, so a KubeEdge peer only
//! ever re-sends numbers as Go formats a `float64`; we write them the same way so that re-encoding a
//! received message gives the received bytes. The consequence: an integer beyond 2^53 in the content
//! is written rounded to the nearest `f64` (9007199254740993 goes out as 9007199254740992), exactly
//! as it would come out of any KubeEdge hop. The decoder keeps what it parsed (serde_json keeps
//! integers exact), so only the bytes written are rounded.
//!
//! Decoding follows Go's `json.Unmarshal` into `model.Message`: keys in any order and matched
//! case-insensitively, unknown keys ignored, missing keys and `null` leave the field as it was, a
//! repeated `header` or `route` object is merged into the first, trailing whitespace accepted. A
//! value of the wrong type is an error ([`DecodeError::JsonType`]). Where we are stricter than Go:
//! strings we keep must be valid UTF-8 without lone surrogate escapes (Go substitutes U+FFFD; Go
//! never writes either), nesting is limited to 128 levels (Go: 10 000), a timestamp written `-0` is
//! refused, and non-whitespace after the document is refused (gorilla ignores it).

use std::cell::Cell;
use std::fmt::{self, Write as _};

use base64::Engine as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use crate::error::DecodeError;
use crate::message::{Content, Header, Message, Route};

/// The JSON document Go's `json.Marshal(model.Message)` writes, without a trailing newline.
pub fn to_vec(msg: &Message) -> Vec<u8> {
    to_string(msg).into_bytes()
}

/// The payload of the WebSocket text frame viaduct sends: [`to_vec`] and one `\n`, as Go's
/// `json.Encoder` (gorilla's `WriteJSON`) writes it.
pub fn to_ws_text(msg: &Message) -> String {
    let mut out = to_string(msg);
    out.push('\n');
    out
}

/// A JSON value as Go's `json.Marshal` writes it after decoding it into an `interface{}`: keys
/// sorted, Go's escaping, numbers as `float64`. This is the protobuf content of non-string JSON.
pub fn value_to_vec(v: &Value) -> Vec<u8> {
    let mut out = String::new();
    write_value(&mut out, v);
    out.into_bytes()
}

/// Decodes one JSON message as Go's `json.Unmarshal` into `model.Message` would (see the module
/// doc for where we are stricter). Content decodes to [`Content::Json`]: a base64 string stays a
/// string, as in Go, since JSON cannot tell bytes from text.
pub fn from_slice(bytes: &[u8]) -> Result<Message, DecodeError> {
    // The field being decoded, so that a type error can name it: serde's errors cannot carry it.
    let field = Cell::new("message");
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut msg = Message::default();
    ObjectSeed {
        target: &mut msg,
        field: &field,
    }
    .deserialize(&mut de)
    .map_err(|e| decode_error(&e, bytes, field.get()))?;
    de.end().map_err(|e| DecodeError::JsonTrailing {
        offset: offset_of(bytes, e.line(), e.column()).saturating_sub(1),
    })?;
    Ok(msg)
}

fn to_string(msg: &Message) -> String {
    let h = &msg.header;
    let r = &msg.route;
    let mut out = String::with_capacity(capacity_for(msg));
    out.push_str(r#"{"header":{"msg_id":"#);
    write_str(&mut out, &h.id);
    if !h.parent_id.is_empty() {
        out.push_str(r#","parent_msg_id":"#);
        write_str(&mut out, &h.parent_id);
    }
    out.push_str(r#","timestamp":"#);
    let _ = write!(out, "{}", h.timestamp); // fmt::Write on String cannot fail
    if !h.resource_version.is_empty() {
        out.push_str(r#","resourceversion":"#);
        write_str(&mut out, &h.resource_version);
    }
    if h.sync {
        out.push_str(r#","sync":true"#);
    }
    if !h.message_type.is_empty() {
        out.push_str(r#","type":"#);
        write_str(&mut out, &h.message_type);
    }
    out.push_str(r#"},"route":{"#);
    let route_fields = [
        ("source", &r.source),
        ("destination", &r.destination),
        ("group", &r.group),
        ("operation", &r.operation),
        ("resource", &r.resource),
    ];
    let mut first = true;
    for (key, value) in route_fields {
        if value.is_empty() {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        out.push('"');
        out.push_str(key);
        out.push_str("\":");
        write_str(&mut out, value);
    }
    out.push_str(r#"},"content":"#);
    match &msg.content {
        Content::Bytes(b) => {
            out.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(b, &mut out);
            out.push('"');
        }
        Content::Json(v) => write_value(&mut out, v),
    }
    out.push('}');
    out
}

/// Room for the keys and punctuation (210 bytes with every field and the WebSocket's newline),
/// the timestamp's digits and the values unescaped: a message is written without growing its
/// buffer unless something needs escaping or its content is a JSON value other than a string.
fn capacity_for(msg: &Message) -> usize {
    let (h, r) = (&msg.header, &msg.route);
    let values = [&h.id, &h.parent_id, &h.resource_version, &h.message_type]
        .into_iter()
        .chain([
            &r.source,
            &r.destination,
            &r.group,
            &r.operation,
            &r.resource,
        ])
        .map(String::len)
        .sum::<usize>();
    210 + 20 + values + content_size_hint(&msg.content)
}

fn content_size_hint(content: &Content) -> usize {
    match content {
        // Base64 with padding, and its quotes.
        Content::Bytes(b) => b.len().div_ceil(3) * 4 + 2,
        Content::Json(Value::String(s)) => s.len() + 2,
        Content::Json(_) => 64,
    }
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Go sorts map keys bytewise. serde_json's map is sorted already unless some crate in
            // the build enables `preserve_order`, so sort only when needed.
            out.push('{');
            if map.keys().is_sorted() {
                write_members(out, map.iter());
            } else {
                let mut members: Vec<_> = map.iter().collect();
                members.sort_unstable_by(|a, b| a.0.cmp(b.0));
                write_members(out, members.into_iter());
            }
            out.push('}');
        }
    }
}

fn write_members<'a>(out: &mut String, members: impl Iterator<Item = (&'a String, &'a Value)>) {
    for (i, (key, value)) in members.enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, key);
        out.push(':');
        write_value(out, value);
    }
}

/// A number as Go's `encoding/json` writes a `float64`: shortest round-trip digits, plain
/// notation for 1e-6 <= |x| < 1e21, otherwise exponent notation with a signed, unpadded exponent
/// (`1e+21`, `1e-7`).
fn write_number(out: &mut String, n: &serde_json::Number) {
    let Some(f) = n.as_f64().filter(|f| f.is_finite()) else {
        // Only reachable if another crate enables serde_json's `arbitrary_precision` and the
        // value does not fit an f64; Go could not have decoded it at all. Keep its text.
        out.push_str(&n.to_string());
        return;
    };
    write_go_float(out, f);
}

fn write_go_float(out: &mut String, f: f64) {
    let abs = f.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        // Rust's `{:e}` gives the same shortest digits; Go adds a `+` to positive exponents.
        let start = out.len();
        let _ = write!(out, "{f:e}");
        if let Some(e) = out[start..].find('e') {
            let exp_at = start + e + 1;
            if !out[exp_at..].starts_with('-') {
                out.insert(exp_at, '+');
            }
        }
    } else {
        let _ = write!(out, "{f}");
    }
}

/// The bytes [`write_str`] must look at: those Go escapes (controls, `"`, `\\`, and `<`, `>`, `&`
/// with HTML escaping on), and 0xE2, which starts U+2028 and U+2029.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table[b'<' as usize] = true;
    table[b'>' as usize] = true;
    table[b'&' as usize] = true;
    table[0xe2] = true;
    table
};

/// A string as Go's `encoding/json` writes it with HTML escaping on (Go 1.22 and later).
fn write_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let bytes = s.as_bytes();
    // Ids, routes and most content need no escape: one table lookup a byte, one copy.
    if !bytes.iter().any(|&b| NEEDS_ESCAPE[usize::from(b)]) {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let escape: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x08 => Some("\\b"),
            0x0c => Some("\\f"),
            b'<' => Some("\\u003c"),
            b'>' => Some("\\u003e"),
            b'&' => Some("\\u0026"),
            0x00..0x20 => None,
            // U+2028 and U+2029 are E2 80 A8 and E2 80 A9.
            0xe2 if bytes.get(i + 1) == Some(&0x80)
                && matches!(bytes.get(i + 2), Some(0xa8 | 0xa9)) =>
            {
                out.push_str(&s[start..i]);
                out.push_str(if bytes[i + 2] == 0xa8 {
                    "\\u2028"
                } else {
                    "\\u2029"
                });
                i += 3;
                start = i;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        };
        out.push_str(&s[start..i]);
        match escape {
            Some(e) => out.push_str(e),
            None => {
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        i += 1;
        start = i;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn decode_error(e: &serde_json::Error, input: &[u8], field: &'static str) -> DecodeError {
    let offset = offset_of(input, e.line(), e.column());
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let detail = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    match e.classify() {
        serde_json::error::Category::Data => DecodeError::JsonType {
            field,
            offset,
            detail,
        },
        _ => DecodeError::JsonSyntax { offset, detail },
    }
}

/// serde_json reports a (line, column) pair whose column counts bytes from the line start; turn
/// it back into the byte index it came from.
fn offset_of(input: &[u8], line: usize, column: usize) -> usize {
    let mut line_start = 0;
    if line > 1 {
        let mut seen = 1;
        for (i, &b) in input.iter().enumerate() {
            if b == b'\n' {
                seen += 1;
                if seen == line {
                    line_start = i + 1;
                    break;
                }
            }
        }
    }
    (line_start + column).min(input.len())
}

/// Whether a JSON key names a field, as Go matches struct fields: exactly or case-insensitively
/// under Unicode simple folding. Our names are lowercase ASCII, and the only non-ASCII characters
/// that fold onto ASCII letters are U+017F (ſ, onto s) and U+212A (Kelvin sign, onto k).
fn go_fold_eq(key: &str, name: &str) -> bool {
    let mut expected = name.bytes();
    for c in key.chars() {
        let folded = match c {
            '\u{17f}' => b's',
            '\u{212a}' => b'k',
            c if c.is_ascii() => (c as u8).to_ascii_lowercase(),
            _ => return false,
        };
        if expected.next() != Some(folded) {
            return false;
        }
    }
    expected.next().is_none()
}

/// A struct decoded field by field from a JSON object, as Go's decoder fills a struct in place.
trait Fields {
    /// The JSON names of the fields, lowercase.
    const NAMES: &'static [&'static str];
    /// Where each field stands in a message, for errors (`header.msg_id`); set by
    /// [`ObjectSeed`] before [`Fields::fill`] decodes the field.
    const PATHS: &'static [&'static str];
    /// Decodes the value of field `index` from `map` into `self` (`field` names it already).
    fn fill<'de, A: MapAccess<'de>>(
        &mut self,
        index: usize,
        map: &mut A,
        field: &Cell<&'static str>,
    ) -> Result<(), A::Error>;
}

impl Fields for Message {
    const NAMES: &'static [&'static str] = &["header", "route", "content"];
    const PATHS: &'static [&'static str] = Self::NAMES;

    fn fill<'de, A: MapAccess<'de>>(
        &mut self,
        index: usize,
        map: &mut A,
        field: &Cell<&'static str>,
    ) -> Result<(), A::Error> {
        match index {
            0 => map.next_value_seed(ObjectSeed {
                target: &mut self.header,
                field,
            }),
            1 => map.next_value_seed(ObjectSeed {
                target: &mut self.route,
                field,
            }),
            _ => {
                self.content = Content::Json(map.next_value()?);
                Ok(())
            }
        }
    }
}

impl Fields for Header {
    const NAMES: &'static [&'static str] = &[
        "msg_id",
        "parent_msg_id",
        "timestamp",
        "resourceversion",
        "sync",
        "type",
    ];

    fn fill<'de, A: MapAccess<'de>>(
        &mut self,
        index: usize,
        map: &mut A,
        _: &Cell<&'static str>,
    ) -> Result<(), A::Error> {
        match index {
            0 => set_string(map, &mut self.id),
            1 => set_string(map, &mut self.parent_id),
            2 => {
                if let Some(t) = map.next_value::<Option<i64>>()? {
                    self.timestamp = t;
                }
                Ok(())
            }
            3 => set_string(map, &mut self.resource_version),
            4 => {
                if let Some(s) = map.next_value::<Option<bool>>()? {
                    self.sync = s;
                }
                Ok(())
            }
            _ => set_string(map, &mut self.message_type),
        }
    }

    const PATHS: &'static [&'static str] = &[
        "header.msg_id",
        "header.parent_msg_id",
        "header.timestamp",
        "header.resourceversion",
        "header.sync",
        "header.type",
    ];
}

impl Fields for Route {
    const NAMES: &'static [&'static str] =
        &["source", "destination", "group", "operation", "resource"];

    fn fill<'de, A: MapAccess<'de>>(
        &mut self,
        index: usize,
        map: &mut A,
        _: &Cell<&'static str>,
    ) -> Result<(), A::Error> {
        let target = match index {
            0 => &mut self.source,
            1 => &mut self.destination,
            2 => &mut self.group,
            3 => &mut self.operation,
            _ => &mut self.resource,
        };
        set_string(map, target)
    }

    const PATHS: &'static [&'static str] = &[
        "route.source",
        "route.destination",
        "route.group",
        "route.operation",
        "route.resource",
    ];
}

/// A string field: `null` leaves it as it was, as in Go.
fn set_string<'de, A: MapAccess<'de>>(map: &mut A, target: &mut String) -> Result<(), A::Error> {
    if let Some(s) = map.next_value::<Option<String>>()? {
        *target = s;
    }
    Ok(())
}

/// Decodes a JSON object (or `null`, which changes nothing) into an existing struct.
struct ObjectSeed<'a, T> {
    target: &'a mut T,
    field: &'a Cell<&'static str>,
}

impl<'de, T: Fields> DeserializeSeed<'de> for ObjectSeed<'_, T> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Fields> Visitor<'de> for ObjectSeed<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(index) = map.next_key_seed(KeySeed(T::NAMES))? {
            match index {
                Some(i) => {
                    self.field.set(T::PATHS[i]);
                    self.target.fill(i, &mut map, self.field)?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Maps an object key to the index of the field it names, if any, without allocating.
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|name| go_fold_eq(key, name)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn go_float(f: f64) -> String {
        let mut s = String::new();
        write_go_float(&mut s, f);
        s
    }

    fn go_str(s: &str) -> String {
        let mut out = String::new();
        write_str(&mut out, s);
        out
    }

    #[test]
    fn floats_are_written_as_go_writes_float64() {
        // Expected strings are Go's `json.Marshal(float64(x))`.
        let cases: [(f64, &str); 16] = [
            (42.0, "42"),
            (-2.5, "-2.5"),
            (0.0, "0"),
            (-0.0, "-0"),
            (0.1, "0.1"),
            (1e20, "100000000000000000000"),
            (1e21, "1e+21"),
            (1.5e300, "1.5e+300"),
            (1e-6, "0.000001"),
            (1e-7, "1e-7"),
            (-1.25e-10, "-1.25e-10"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (9_007_199_254_740_993_u64 as f64, "9007199254740992"),
            (
                18_446_744_073_709_551_615_u64 as f64,
                "18446744073709552000",
            ),
            (123_456.789, "123456.789"),
        ];
        for (f, want) in cases {
            assert_eq!(go_float(f), want, "{f:?}");
        }
    }

    #[test]
    fn a_message_is_written_without_growing_its_buffer() {
        let mut full = Message::with_header("3f2a".repeat(9), "parent-1", -1)
            .route("edgecontroller", "resource", "ns/configmap/c", "update")
            .content(Content::Bytes(vec![7; 64].into()));
        full.route.destination = "edge-1".into();
        full.header.resource_version = "123456".into();
        full.header.sync = true;
        full.header.message_type = "channel".into();
        full.header.timestamp = i64::MIN;
        let text = Message::new("a").content(Content::text("x".repeat(100)));
        for msg in [full, text, Message::default()] {
            let written = to_ws_text(&msg);
            assert!(written.len() <= capacity_for(&msg), "{written}");
            assert_eq!(written.capacity(), capacity_for(&msg), "{written}");
        }
    }

    #[test]
    fn strings_are_escaped_as_go_does() {
        assert_eq!(go_str("a<b>&c"), r#""a\u003cb\u003e\u0026c""#);
        assert_eq!(go_str("q\"b\\"), r#""q\"b\\""#);
        assert_eq!(go_str("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
        assert_eq!(go_str("\u{0}\u{1f}\u{7f}"), "\"\\u0000\\u001f\u{7f}\"");
        assert_eq!(
            go_str("x\u{2028}y\u{2029}z\u{2027}"),
            "\"x\\u2028y\\u2029z\u{2027}\""
        );
        assert_eq!(go_str("héllo ✓ 🚀"), "\"héllo ✓ 🚀\"");
        assert_eq!(go_str(""), "\"\"");
    }

    #[test]
    fn object_keys_are_sorted_and_numbers_are_float64() {
        let v = json!({"b": [1, 2.5, null, true], "a": {"z": "<", "m": 1e21}, "": -0.0});
        assert_eq!(
            String::from_utf8(value_to_vec(&v)).unwrap(),
            r#"{"":-0,"a":{"m":1e+21,"z":"\u003c"},"b":[1,2.5,null,true]}"#
        );
    }

    #[test]
    fn keys_match_case_insensitively_as_in_go() {
        assert!(go_fold_eq("msg_id", "msg_id"));
        assert!(go_fold_eq("MSG_ID", "msg_id"));
        assert!(go_fold_eq("\u{17f}ync", "sync"));
        assert!(!go_fold_eq("sync2", "sync"));
        assert!(!go_fold_eq("syn", "sync"));
        assert!(!go_fold_eq("sÿnc", "sync"));
        let msg = from_slice(br#"{"HEADER":{"Msg_Id":"x","TimeStamp":7},"Route":{"SOURCE":"s"}}"#)
            .unwrap();
        assert_eq!(msg.header.id, "x");
        assert_eq!(msg.header.timestamp, 7);
        assert_eq!(msg.route.source, "s");
    }

    #[test]
    fn decoding_is_tolerant_like_go() {
        // Any order, unknown keys, missing route, null fields, trailing whitespace.
        let msg = from_slice(
            b"{\"content\":null,\"extra\":[1,{\"x\":2}],\"header\":{\"timestamp\":5,\
              \"msg_id\":null,\"sync\":true}} \r\n\t",
        )
        .unwrap();
        assert_eq!(msg.header.timestamp, 5);
        assert!(msg.header.sync);
        assert_eq!(msg.header.id, "");
        assert_eq!(msg.route, Route::default());
        assert_eq!(msg.content, Content::Json(Value::Null));
        // A repeated object merges into the first, as Go decodes into the same struct.
        let msg = from_slice(br#"{"header":{"msg_id":"a"},"header":{"timestamp":3}}"#).unwrap();
        assert_eq!((msg.header.id.as_str(), msg.header.timestamp), ("a", 3));
        // Top-level null is Go's no-op decode.
        assert_eq!(from_slice(b"null").unwrap(), Message::default());
        // Base64 content stays a string.
        let msg = from_slice(br#"{"content":"AAE="}"#).unwrap();
        assert_eq!(msg.content, Content::text("AAE="));
    }

    #[test]
    fn wrong_types_are_typed_errors() {
        let cases: [(&[u8], &str); 9] = [
            (br#"{"header":{"timestamp":"1"}}"#, "header.timestamp"),
            (br#"{"header":{"timestamp":1.5}}"#, "header.timestamp"),
            (br#"{"header":{"timestamp":1e3}}"#, "header.timestamp"),
            (
                br#"{"header":{"timestamp":9223372036854775808}}"#,
                "header.timestamp",
            ),
            (br#"{"header":{"sync":"true"}}"#, "header.sync"),
            (br#"{"header":{"msg_id":5}}"#, "header.msg_id"),
            (br#"{"header":[]}"#, "header"),
            (br#"{"route":{"resource":{}}}"#, "route.resource"),
            (br#"[1]"#, "message"),
        ];
        for (input, want) in cases {
            match from_slice(input) {
                Err(DecodeError::JsonType { field, .. }) => assert_eq!(field, want),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(input)),
            }
        }
        let min = from_slice(br#"{"header":{"timestamp":-9223372036854775808}}"#).unwrap();
        assert_eq!(min.header.timestamp, i64::MIN);
    }

    #[test]
    fn syntax_errors_give_an_offset() {
        match from_slice(br#"{"header":{"msg_id":"a"x}}"#) {
            Err(DecodeError::JsonSyntax { offset, .. }) => assert_eq!(offset, 24),
            other => panic!("{other:?}"),
        }
        match from_slice(b"{\"route\":\n{\"source\":\"s\"}} x") {
            Err(DecodeError::JsonTrailing { offset }) => assert_eq!(offset, 26),
            other => panic!("{other:?}"),
        }
        let bad_utf8 = b"{\"header\":{\"msg_id\":\"\xff\"}}";
        let lone_surrogate = br#"{"content":"\ud800"}"#;
        for bad in [
            &b""[..],
            b"{",
            b"{\"header\"",
            bad_utf8,
            lone_surrogate,
            b"{\"content\":1e400}",
        ] {
            assert!(
                matches!(from_slice(bad), Err(DecodeError::JsonSyntax { .. })),
                "{bad:?}"
            );
        }
        // Like Go, a value under an unknown key is checked for syntax only.
        assert!(from_slice(b"{\"other\":\"\xff\"}").is_ok());
        let deep = format!("{{\"content\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(matches!(
            from_slice(deep.as_bytes()),
            Err(DecodeError::JsonSyntax { .. })
        ));
    }

    #[test]
    fn numbers_are_parsed_exactly() {
        // serde_json's `float_roundtrip` feature makes parsing agree with a correct strtod, as
        // Go's ParseFloat is; without it long mantissas can be off by one unit in the last place.
        for text in [
            "0.1",
            "2.2250738585072011e-308",
            "9007199254740993",
            "123456789012345678901234567890",
            "0.30000000000000004441",
            "1.00000000000000011102230246251565404236316680908203125",
            "7.038531e-26",
        ] {
            let input = format!("{{\"content\":{text}}}");
            let msg = from_slice(input.as_bytes()).unwrap();
            let Content::Json(Value::Number(n)) = msg.content else {
                panic!("{text}")
            };
            assert_eq!(n.as_f64(), text.parse::<f64>().ok(), "{text}");
        }
    }

    #[test]
    fn every_strict_prefix_is_an_error() {
        let msg = Message::with_header("a", "b", 12)
            .route("s", "g", "r", "o")
            .content(json!({"k": [1.5, "\u{2028}", null, {"x": false}]}));
        let bytes = to_vec(&msg);
        for cut in 0..bytes.len() {
            assert!(from_slice(&bytes[..cut]).is_err(), "cut {cut}");
        }
        assert_eq!(from_slice(&bytes).unwrap(), msg);
    }

    #[test]
    fn written_json_decodes_to_the_same_message() {
        let msg = Message::with_header("id<1>", "p&", -7)
            .route("s\u{2028}", "g", "r\"", "o\\")
            .content(json!({"k": ["\u{1}", 3]}));
        let mut msg = msg;
        msg.header.sync = true;
        msg.header.resource_version = "9".into();
        msg.header.message_type = "unixpacket".into();
        msg.route.destination = "edged".into();
        let text = to_ws_text(&msg);
        assert!(text.ends_with("}\n"));
        assert_eq!(from_slice(text.as_bytes()).unwrap(), msg);
    }
}
