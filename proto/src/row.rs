//! A [`Message`] as a database row: the one encoding every store uses (EdgeHub's outbox, the edge's
//! local store, the cloud's message store), so a message reads back the same wherever it was kept.
//!
//! Pure: no I/O and no SQLite here. A store binds the plain values of a [`MessageRow`] (or of
//! [`HeadRow`], header and route as one JSON text) to its own statements and hands what it reads
//! back to [`MessageRow::into_message`] / [`HeadRow::into_message`]. The content is kept raw, so
//! bytes stay bytes and JSON stays exact: `content_kind` ([`StoredKind::code`]) says which.
//!
//! History: before this module, EdgeHub's outbox stored JSON as 0 and bytes as 1 (its schema 1),
//! the cloud store the reverse. The codes here are the cloud's; the outbox rewrites its old rows
//! once when it opens a schema-1 file (`edgehub/src/outbox.rs`).

use crate::error::DecodeError;
use crate::message::{Content, Header, Message, Route};

/// What the `content` bytes of a row are, stored in its `content_kind` column. (Not
/// [`crate::pb::ContentKind`], the wire's marker, which also has a string kind and reads unknown
/// numbers as bytes; a store refuses them. The two agree on 0 for bytes and 1 for JSON.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredKind {
    /// Raw bytes ([`Content::Bytes`]), stored as they are.
    Bytes,
    /// A JSON value ([`Content::Json`]), stored as its compact JSON text.
    Json,
}

impl StoredKind {
    /// The integer stored in `content_kind`.
    pub const fn code(self) -> i64 {
        match self {
            Self::Bytes => 0,
            Self::Json => 1,
        }
    }

    /// The kind a stored `content_kind` integer names.
    pub fn from_code(code: i64) -> Result<Self, RowError> {
        match code {
            0 => Ok(Self::Bytes),
            1 => Ok(Self::Json),
            other => Err(RowError::StoredKind(other)),
        }
    }
}

/// A stored row that is not a message: the store's file was damaged or written by something else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RowError {
    /// `content_kind` holds a number no version of Causeway writes.
    #[error("unknown content kind {0}")]
    StoredKind(i64),
    /// `content_kind` says JSON but the bytes are not a JSON value.
    #[error("message content is not JSON: {0}")]
    ContentJson(String),
    /// The header-and-route JSON text is not a KubeEdge message.
    #[error("message header and route: {0}")]
    Head(DecodeError),
}

/// Splits content into its kind and the bytes to store.
pub fn content_to_row(content: &Content) -> (StoredKind, Vec<u8>) {
    match content {
        Content::Bytes(b) => (StoredKind::Bytes, b.to_vec()),
        // Serialising a `Value` cannot fail (its map keys are strings).
        Content::Json(v) => (StoredKind::Json, serde_json::to_vec(v).unwrap_or_default()),
    }
}

/// Content from a stored kind and bytes.
pub fn content_from_row(kind: i64, bytes: Vec<u8>) -> Result<Content, RowError> {
    Ok(match StoredKind::from_code(kind)? {
        StoredKind::Bytes => Content::Bytes(bytes.into()),
        StoredKind::Json => Content::Json(
            serde_json::from_slice(&bytes).map_err(|e| RowError::ContentJson(e.to_string()))?,
        ),
    })
}

/// A message as one flat row: a column per header and route field, then the content. Column
/// names are the store's choice; the fields are in the order the cloud store's tables keep them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageRow {
    /// `header.id`.
    pub id: String,
    /// `header.parent_id`.
    pub parent_id: String,
    /// `header.timestamp`.
    pub timestamp: i64,
    /// `header.resource_version`.
    pub resource_version: String,
    /// `header.sync`.
    pub sync: bool,
    /// `header.message_type`.
    pub message_type: String,
    /// `route.source`.
    pub source: String,
    /// `route.destination`.
    pub destination: String,
    /// `route.group`.
    pub group: String,
    /// `route.operation`.
    pub operation: String,
    /// `route.resource`.
    pub resource: String,
    /// [`StoredKind::code`] of the content.
    pub content_kind: i64,
    /// The content's bytes ([`content_to_row`]).
    pub content: Vec<u8>,
}

impl MessageRow {
    /// The row a message is stored as.
    pub fn from_message(msg: &Message) -> Self {
        let (kind, content) = content_to_row(&msg.content);
        Self {
            id: msg.header.id.clone(),
            parent_id: msg.header.parent_id.clone(),
            timestamp: msg.header.timestamp,
            resource_version: msg.header.resource_version.clone(),
            sync: msg.header.sync,
            message_type: msg.header.message_type.clone(),
            source: msg.route.source.clone(),
            destination: msg.route.destination.clone(),
            group: msg.route.group.clone(),
            operation: msg.route.operation.clone(),
            resource: msg.route.resource.clone(),
            content_kind: kind.code(),
            content,
        }
    }

    /// The message a row holds.
    pub fn into_message(self) -> Result<Message, RowError> {
        Ok(Message {
            header: Header {
                id: self.id,
                parent_id: self.parent_id,
                timestamp: self.timestamp,
                resource_version: self.resource_version,
                sync: self.sync,
                message_type: self.message_type,
            },
            route: Route {
                source: self.source,
                destination: self.destination,
                group: self.group,
                operation: self.operation,
                resource: self.resource,
            },
            content: content_from_row(self.content_kind, self.content)?,
        })
    }
}

/// A message as three columns: header and route as KubeEdge JSON with null content (one text
/// column a person can read with the `sqlite3` shell), then the content as in [`MessageRow`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeadRow {
    /// `{"header":…,"route":…,"content":null}`, as [`crate::json::to_vec`] writes it.
    pub head: String,
    /// [`StoredKind::code`] of the content.
    pub content_kind: i64,
    /// The content's bytes ([`content_to_row`]).
    pub content: Vec<u8>,
}

impl HeadRow {
    /// The row a message is stored as.
    pub fn from_message(msg: &Message) -> Self {
        let (kind, content) = content_to_row(&msg.content);
        let head = Message {
            header: msg.header.clone(),
            route: msg.route.clone(),
            ..Message::default()
        };
        // The JSON form is always UTF-8.
        let head = String::from_utf8(crate::json::to_vec(&head)).unwrap_or_default();
        Self {
            head,
            content_kind: kind.code(),
            content,
        }
    }

    /// The message a row holds.
    pub fn into_message(self) -> Result<Message, RowError> {
        let mut msg = crate::json::from_slice(self.head.as_bytes()).map_err(RowError::Head)?;
        msg.content = content_from_row(self.content_kind, self.content)?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(content: Content) -> Message {
        let mut msg = Message::with_header("id-1", "parent-1", 1_700_000_000_123)
            .route("edgehub", "resource", "default/pod/a", "update")
            .content(content);
        msg.header.sync = true;
        msg.header.resource_version = "42".into();
        msg.header.message_type = "channel".into();
        msg.route.destination = "meta".into();
        msg
    }

    fn contents() -> Vec<Content> {
        vec![
            Content::Bytes(b"\x00\xffraw".to_vec().into()),
            Content::Bytes(Vec::new().into()),
            Content::Json(json!({"a": [1, 2.5, "x"], "b": null})),
            Content::Json(serde_json::Value::Null),
            Content::text("OK"),
        ]
    }

    #[test]
    fn both_row_forms_round_trip_every_content() {
        for content in contents() {
            let msg = sample(content);
            assert_eq!(MessageRow::from_message(&msg).into_message().unwrap(), msg);
            assert_eq!(HeadRow::from_message(&msg).into_message().unwrap(), msg);
        }
    }

    #[test]
    fn kind_codes_are_the_stored_ones() {
        // Stored in files: these numbers never change.
        assert_eq!(StoredKind::Bytes.code(), 0);
        assert_eq!(StoredKind::Json.code(), 1);
        let row = MessageRow::from_message(&sample(Content::text("OK")));
        assert_eq!(
            (row.content_kind, row.content.as_slice()),
            (1, &b"\"OK\""[..])
        );
        let row = HeadRow::from_message(&sample(Content::Bytes(b"ab".to_vec().into())));
        assert_eq!((row.content_kind, row.content.as_slice()), (0, &b"ab"[..]));
        assert!(row.head.contains("\"content\":null"), "{}", row.head);
    }

    #[test]
    fn damaged_rows_are_errors_not_panics() {
        let mut row = MessageRow::from_message(&sample(Content::text("x")));
        row.content_kind = 7;
        assert_eq!(row.clone().into_message(), Err(RowError::StoredKind(7)));
        row.content_kind = StoredKind::Json.code();
        row.content = b"{not json".to_vec();
        assert!(matches!(row.into_message(), Err(RowError::ContentJson(_))));
        let head = HeadRow {
            head: "{not json".into(),
            content_kind: 0,
            content: Vec::new(),
        };
        assert!(matches!(head.into_message(), Err(RowError::Head(_))));
    }
}
