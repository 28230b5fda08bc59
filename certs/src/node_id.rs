//! `NodeId`: the validated name of an edge node. Parsing is validation, so every `NodeId` in the
//! program is known to be a legal Kubernetes-style DNS subdomain and can be put in a certificate CN,
//! a URL path segment or a file name (`nodes/<id>.crt`) without further checks.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest node id accepted: the Kubernetes limit for a DNS subdomain (node names are one).
pub const MAX_NODE_ID_LEN: usize = 253;

/// The name of an edge node, e.g. `edge-1`.
///
/// Rules (those of a Kubernetes node name): 1..=253 characters, only `a-z`, `0-9`, `.` and `-`, and
/// it starts and ends with `a-z` or `0-9`. These rules keep a node id safe to use as a path segment
/// and a file name (no `/`, no `..` component) and unambiguous inside `system:node:<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

/// Why a string is not a valid [`NodeId`]. The string came from whoever supplied it (a config file,
/// a command line, a peer's certificate or header): the fix is to supply a valid name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidNodeId {
    /// The name is the empty string.
    #[error("node id is empty")]
    Empty,
    /// The name is longer than [`MAX_NODE_ID_LEN`] bytes.
    #[error("node id is {len} characters long; the maximum is {MAX_NODE_ID_LEN}")]
    TooLong {
        /// Length of the rejected name in bytes.
        len: usize,
    },
    /// The name contains a character outside `a-z`, `0-9`, `.`, `-`.
    #[error(
        "node id has {character:?} at position {index}; only a-z, 0-9, '.' and '-' are allowed"
    )]
    InvalidCharacter {
        /// The offending character.
        character: char,
        /// Its byte position in the name.
        index: usize,
    },
    /// The name starts or ends with `.` or `-`.
    #[error("node id must start and end with a-z or 0-9")]
    BadEdge,
}

impl NodeId {
    /// Validates `s` as a node id.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidNodeId> {
        let s = s.into();
        validate(&s)?;
        Ok(Self(s))
    }

    /// The node id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Consumes the id, returning the inner string.
    pub fn into_string(self) -> String {
        self.0
    }
}

fn validate(s: &str) -> Result<(), InvalidNodeId> {
    if s.is_empty() {
        return Err(InvalidNodeId::Empty);
    }
    if s.len() > MAX_NODE_ID_LEN {
        return Err(InvalidNodeId::TooLong { len: s.len() });
    }
    for (index, character) in s.char_indices() {
        if !matches!(character, 'a'..='z' | '0'..='9' | '.' | '-') {
            return Err(InvalidNodeId::InvalidCharacter { character, index });
        }
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    // Non-empty and all ASCII (checked above), so first/last exist.
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) if alnum(first) && alnum(last) => Ok(()),
        _ => Err(InvalidNodeId::BadEdge),
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = InvalidNodeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for NodeId {
    type Error = InvalidNodeId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for NodeId {
    type Error = InvalidNodeId;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> Self {
        id.0
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_node_names() {
        for name in [
            "edge-1",
            "a",
            "0",
            "node.example.com",
            "a-b.c-d",
            &"x".repeat(253),
        ] {
            assert_eq!(NodeId::new(name).unwrap().as_str(), name, "{name}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(NodeId::new(""), Err(InvalidNodeId::Empty));
        assert_eq!(
            NodeId::new("x".repeat(254)),
            Err(InvalidNodeId::TooLong { len: 254 })
        );
        assert_eq!(
            NodeId::new("Edge"),
            Err(InvalidNodeId::InvalidCharacter {
                character: 'E',
                index: 0
            })
        );
        assert_eq!(
            NodeId::new("a/b"),
            Err(InvalidNodeId::InvalidCharacter {
                character: '/',
                index: 1
            })
        );
        assert_eq!(
            NodeId::new("a_b"),
            Err(InvalidNodeId::InvalidCharacter {
                character: '_',
                index: 1
            })
        );
        assert!(matches!(
            NodeId::new("é"),
            Err(InvalidNodeId::InvalidCharacter {
                character: 'é',
                index: 0
            })
        ));
        for bad in ["-a", "a-", ".a", "a.", "-", "."] {
            assert_eq!(NodeId::new(bad), Err(InvalidNodeId::BadEdge), "{bad}");
        }
    }

    #[test]
    fn serde_round_trip_validates() {
        let id = NodeId::new("edge-1").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"edge-1\"");
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        let err = serde_json::from_str::<NodeId>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("node id"), "{err}");
    }

    #[test]
    fn parses_and_displays() {
        let id: NodeId = "edge-7".parse().unwrap();
        assert_eq!(id.to_string(), "edge-7");
        assert_eq!(NodeId::try_from(String::from("edge-7")).unwrap(), id);
        assert!("a..b".parse::<NodeId>().is_ok(), "dots inside are allowed");
    }
}
