//! What metamanager does with a message, decided without I/O: [`inspect`] reads a cloud message
//! into a [`CloudChange`] (or refuses it), [`decide`] compares it with the stored row's state and
//! returns a [`Plan`]; the store executes the plan inside one transaction and the module ACKs
//! after the commit. [`classify_answer`] reads the cloud's answer to a remote query.
//!
//! The rules (MODULES.md §1.2, §2.3, §2.4, M2, M4, and the contract with the cloud half):
//! - `insert` and `update` are both upserts (an `update` of an unknown key inserts);
//! - an older `resourceversion` than the stored one is not applied, and is still ACKed (the edge
//!   has something at least as new); the same version is not rewritten;
//! - a `delete` removes the object unless the stored one is newer or has another `uid` (a later
//!   incarnation of the same name); it leaves a tombstone with the version, so a late, older
//!   upsert cannot bring the object back;
//! - a `response` carrying an object (a remote query's answer) is stored like an upsert; one
//!   carrying a Kubernetes error (`{"ErrStatus": ...}`, or an `ObjectResp` whose `Err` is set) is
//!   never stored as the object (KubeEdge's M2), and is still ACKed; `"OK"` is nothing to store;
//! - anything else (a bad resource string, another operation, a resource version that is not a
//!   decimal number, content that is not UTF-8) is refused: answered with op `error`, never ACKed.

use serde_json::Value;

use proto::message::OP_RESPONSE;
use proto::{Content, Message};

use crate::resource::{Resource, ResourceError};

/// Operation `insert`.
pub const OP_INSERT: &str = "insert";
/// Operation `update`.
pub const OP_UPDATE: &str = "update";
/// Operation `delete`.
pub const OP_DELETE: &str = "delete";
/// Operation `query`.
pub const OP_QUERY: &str = "query";

/// What the store holds for a key, as far as a decision needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredState {
    /// Its resource version, when known.
    pub resource_version: Option<u64>,
    /// Its `metadata.uid`, when known.
    pub uid: Option<String>,
    /// Whether the row is a tombstone (the object was deleted).
    pub deleted: bool,
}

/// A cloud message read for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudChange {
    /// The object's key (its resource string) and its parts.
    pub resource: Resource,
    /// What it asks for.
    pub action: Action,
    /// Its resource version: the `resourceversion` header, else the object's
    /// `metadata.resourceVersion`.
    pub resource_version: Option<u64>,
    /// The object's `metadata.uid`, when it has one.
    pub uid: Option<String>,
    /// Whether the cloud waits for an ACK (everything but a `"OK"` answer).
    pub ack: bool,
}

/// What a cloud message asks of the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Store this value (the object's JSON text) under the key.
    Upsert(String),
    /// Remove the object.
    Delete,
    /// A `"OK"` answer: nothing to store.
    Nothing,
    /// The cloud answered a query with this error: nothing to store (M2).
    CloudError(String),
}

/// What the store does for one [`CloudChange`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Write the row: a new object (`created`) or a new version of a live one.
    Upsert {
        /// No live row existed (a watch sees ADDED rather than MODIFIED).
        created: bool,
    },
    /// Turn the live row into a tombstone.
    Delete,
    /// Write nothing, for this reason; the message is still ACKed.
    Keep(Kept),
}

/// Why nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// The stored version is newer.
    Older {
        /// The stored version.
        stored: u64,
        /// The message's version.
        incoming: u64,
    },
    /// The stored version is this one.
    SameVersion,
    /// A delete of an object the store does not hold.
    NotStored,
    /// A delete of another incarnation (its uid is not the stored object's).
    OtherUid {
        /// The stored object's uid.
        stored: String,
        /// The delete's uid.
        incoming: String,
    },
    /// An answer with nothing to store (`"OK"`, or an error).
    NothingToStore,
}

/// Why a cloud message is refused (answered with op `error`, never ACKed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The resource string is not an object's.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// An operation metamanager does not apply from the cloud.
    #[error(
        "metamanager does not handle operation {operation:?} from the cloud (insert, update, \
         delete and response are applied)"
    )]
    Operation {
        /// The operation received.
        operation: String,
    },
    /// A `func` message (KubeEdge's CSI volume calls), which no Causeway edge module serves.
    #[error("no edge module serves group {group:?} operation {operation:?}")]
    Group {
        /// The route group.
        group: String,
        /// The operation.
        operation: String,
    },
    /// The resource version is not a decimal number.
    #[error("resourceversion {0:?} is not a decimal number")]
    ResourceVersion(String),
    /// The content is bytes that are not UTF-8 text.
    #[error("content of {0} bytes is not UTF-8 text")]
    Content(usize),
}

/// Reads a message the cloud sent to metamanager (route group `resource` or `func`).
pub fn inspect(msg: &Message) -> Result<CloudChange, Refusal> {
    let route = &msg.route;
    if route.group != session::edge::route::GROUP_RESOURCE {
        return Err(Refusal::Group {
            group: route.group.clone(),
            operation: route.operation.clone(),
        });
    }
    let (action, object, ack) = match route.operation.as_str() {
        OP_INSERT | OP_UPDATE => {
            let text = content_text(&msg.content)?;
            (Action::Upsert(text), json_of(&msg.content), true)
        }
        OP_DELETE => (Action::Delete, json_of(&msg.content), true),
        OP_RESPONSE => match classify_answer(&msg.content) {
            Answer::Ok => (Action::Nothing, None, false),
            Answer::Error(text) => (Action::CloudError(text), None, true),
            Answer::Object(object) => {
                let text = proto::json::value_to_vec(&object);
                let text =
                    String::from_utf8(text).map_err(|e| Refusal::Content(e.as_bytes().len()))?;
                (Action::Upsert(text), Some(object), true)
            }
            Answer::Text(text) => (Action::Upsert(text), None, true),
        },
        other => {
            return Err(Refusal::Operation {
                operation: other.to_owned(),
            });
        }
    };
    let resource = Resource::object(&route.resource)?;
    let header_rv = msg.header.resource_version.trim();
    let rv_text = if header_rv.is_empty() {
        object
            .as_ref()
            .and_then(|o| o.pointer("/metadata/resourceVersion"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    } else {
        Some(header_rv.to_owned())
    };
    let resource_version = match rv_text {
        Some(text) if !text.is_empty() => Some(
            text.parse::<u64>()
                .map_err(|_| Refusal::ResourceVersion(text.clone()))?,
        ),
        _ => None,
    };
    let uid = object
        .as_ref()
        .and_then(|o| o.pointer("/metadata/uid"))
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .map(str::to_owned);
    Ok(CloudChange {
        resource,
        action,
        resource_version,
        uid,
        ack,
    })
}

/// Decides what the store does with `change`, given what it holds under the key.
pub fn decide(change: &CloudChange, stored: Option<&StoredState>) -> Plan {
    let live = stored.filter(|s| !s.deleted);
    match &change.action {
        Action::Nothing | Action::CloudError(_) => Plan::Keep(Kept::NothingToStore),
        Action::Upsert(_) => {
            let Some(stored) = stored else {
                return Plan::Upsert { created: true };
            };
            if let (Some(s), Some(i)) = (stored.resource_version, change.resource_version) {
                if i < s || (i == s && stored.deleted) {
                    return Plan::Keep(Kept::Older {
                        stored: s,
                        incoming: i,
                    });
                }
                if i == s {
                    return Plan::Keep(Kept::SameVersion);
                }
            }
            Plan::Upsert {
                created: live.is_none(),
            }
        }
        Action::Delete => {
            let Some(stored) = live else {
                return Plan::Keep(Kept::NotStored);
            };
            if let (Some(s), Some(i)) = (&stored.uid, &change.uid)
                && s != i
            {
                return Plan::Keep(Kept::OtherUid {
                    stored: s.clone(),
                    incoming: i.clone(),
                });
            }
            if let (Some(s), Some(i)) = (stored.resource_version, change.resource_version)
                && i < s
            {
                return Plan::Keep(Kept::Older {
                    stored: s,
                    incoming: i,
                });
            }
            Plan::Delete
        }
    }
}

/// What the cloud's answer to a query (or a `response` it sends) holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `"OK"`.
    Ok,
    /// A Kubernetes error: the `StatusError`'s message (`configmaps "x" not found`).
    Error(String),
    /// An object (a bare one, or the `Object` of an `ObjectResp` without error).
    Object(Value),
    /// Text that is not JSON: stored as it is, as KubeEdge does.
    Text(String),
}

/// Reads an answer's content (MODULES.md §1.5 item 4, without M2 and M3): `"OK"`; a
/// `{"ErrStatus": ...}` StatusError; an `ObjectResp` `{"Object", "Err"}` whose `Err` is set, or
/// whose `Object` is null, is an error; anything else JSON is the object.
pub fn classify_answer(content: &Content) -> Answer {
    let value = match content {
        Content::Json(v) => v.clone(),
        Content::Bytes(b) => match serde_json::from_slice(b) {
            Ok(v) => v,
            Err(_) => {
                return match std::str::from_utf8(b) {
                    Ok("OK") => Answer::Ok,
                    Ok(text) => Answer::Text(text.to_owned()),
                    Err(_) => Answer::Error(format!("answer of {} bytes is not UTF-8", b.len())),
                };
            }
        },
    };
    match value {
        Value::String(s) if s == "OK" => Answer::Ok,
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            // A JSON document sent as a string (KubeEdge's content from bytes).
            Ok(v @ Value::Object(_)) => classify_answer(&Content::Json(v)),
            _ => Answer::Text(s),
        },
        Value::Object(map) if map.contains_key("ErrStatus") => {
            Answer::Error(status_message(&Value::Object(map)))
        }
        Value::Object(map) if map.contains_key("Object") && map.contains_key("Err") => {
            let err = &map["Err"];
            let failed = match err {
                Value::Null => false,
                Value::Object(e) => !e.is_empty(),
                _ => true,
            };
            if failed {
                Answer::Error(status_message(err))
            } else if map["Object"].is_null() {
                // KubeEdge's M3: an error that marshalled as `{}`; never success without object.
                Answer::Error("the cloud answered without an object and without an error".into())
            } else {
                Answer::Object(map["Object"].clone())
            }
        }
        Value::Null => Answer::Error("the cloud answered with no content".into()),
        other => Answer::Object(other),
    }
}

/// The text of a StatusError (`{"ErrStatus": {"message": ...}}`), or its JSON.
fn status_message(err: &Value) -> String {
    err.pointer("/ErrStatus/message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| err.to_string())
}

/// Content as stored in `meta.value`: KubeEdge stores the content re-serialised as JSON bytes,
/// strings as their UTF-8 bytes.
fn content_text(content: &Content) -> Result<String, Refusal> {
    let bytes = content.to_bytes();
    String::from_utf8(bytes.into_owned()).map_err(|e| Refusal::Content(e.as_bytes().len()))
}

/// The content as a JSON value, when it is one (bytes holding JSON included).
fn json_of(content: &Content) -> Option<Value> {
    match content {
        Content::Json(Value::String(s)) => serde_json::from_str(s).ok(),
        Content::Json(v) => Some(v.clone()),
        Content::Bytes(b) => serde_json::from_slice(b).ok(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn msg(op: &str, resource: &str, rv: &str, content: Value) -> Message {
        let mut m = Message::with_header("id", "", 0)
            .route("edgecontroller", "resource", resource, op)
            .content(Content::Json(content));
        m.header.resource_version = rv.to_owned();
        m
    }

    fn cm(rv: &str, uid: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"namespace": "default", "name": "c", "uid": uid, "resourceVersion": rv}})
    }

    fn stored(rv: u64, uid: &str, deleted: bool) -> StoredState {
        StoredState {
            resource_version: Some(rv),
            uid: Some(uid.to_owned()),
            deleted,
        }
    }

    fn plan(m: &Message, s: Option<&StoredState>) -> Plan {
        decide(&inspect(m).unwrap(), s)
    }

    #[test]
    fn upserts_apply_in_version_order() {
        let up = |rv: &str| msg(OP_UPDATE, "default/configmap/c", rv, cm(rv, "u1"));
        assert_eq!(plan(&up("5"), None), Plan::Upsert { created: true });
        // update of an unknown key inserts; insert of a known one replaces
        let ins = msg(OP_INSERT, "default/configmap/c", "7", cm("7", "u1"));
        assert_eq!(
            plan(&ins, Some(&stored(5, "u1", false))),
            Plan::Upsert { created: false }
        );
        assert_eq!(
            plan(&up("4"), Some(&stored(5, "u1", false))),
            Plan::Keep(Kept::Older {
                stored: 5,
                incoming: 4
            })
        );
        assert_eq!(
            plan(&up("5"), Some(&stored(5, "u1", false))),
            Plan::Keep(Kept::SameVersion)
        );
        // numeric, not lexical: 10 > 9
        assert_eq!(
            plan(&up("10"), Some(&stored(9, "u1", false))),
            Plan::Upsert { created: false }
        );
        // a tombstone keeps an older or equal version out, a newer one comes back as new
        assert!(matches!(
            plan(&up("5"), Some(&stored(5, "u1", true))),
            Plan::Keep(Kept::Older { .. })
        ));
        assert_eq!(
            plan(&up("6"), Some(&stored(5, "u1", true))),
            Plan::Upsert { created: true }
        );
    }

    #[test]
    fn versions_come_from_the_header_else_the_object_else_none() {
        let m = msg(OP_UPDATE, "default/configmap/c", "", cm("12", "u"));
        assert_eq!(inspect(&m).unwrap().resource_version, Some(12));
        let m = msg(OP_UPDATE, "default/configmap/c", "13", cm("12", "u"));
        assert_eq!(inspect(&m).unwrap().resource_version, Some(13));
        let bare = msg(OP_UPDATE, "default/configmap/c", "", json!({"n": 1}));
        let change = inspect(&bare).unwrap();
        assert_eq!(change.resource_version, None);
        // without versions, the last one received wins (KubeEdge's behaviour)
        assert_eq!(
            decide(&change, Some(&stored(5, "u", false))),
            Plan::Upsert { created: false }
        );
        let bad = msg(OP_UPDATE, "default/configmap/c", "12a", json!({}));
        assert_eq!(
            inspect(&bad).unwrap_err(),
            Refusal::ResourceVersion("12a".into())
        );
    }

    #[test]
    fn deletes_check_version_and_uid() {
        let del = |rv: &str, uid: &str| msg(OP_DELETE, "default/pod/p", rv, cm(rv, uid));
        assert_eq!(
            plan(&del("5", "u1"), Some(&stored(5, "u1", false))),
            Plan::Delete
        );
        assert_eq!(plan(&del("5", "u1"), None), Plan::Keep(Kept::NotStored));
        assert_eq!(
            plan(&del("5", "u1"), Some(&stored(5, "u1", true))),
            Plan::Keep(Kept::NotStored)
        );
        assert_eq!(
            plan(&del("9", "old"), Some(&stored(8, "new", false))),
            Plan::Keep(Kept::OtherUid {
                stored: "new".into(),
                incoming: "old".into()
            })
        );
        assert!(matches!(
            plan(&del("4", "u1"), Some(&stored(5, "u1", false))),
            Plan::Keep(Kept::Older { .. })
        ));
        // KubeEdge's node delete: no content, no version
        let bare = msg(OP_DELETE, "null/node/e", "", Value::Null);
        assert_eq!(plan(&bare, Some(&stored(5, "u1", false))), Plan::Delete);
    }

    #[test]
    fn answers_error_objects_and_ok() {
        let err = json!({"ErrStatus": {"status": "Failure", "reason": "NotFound", "code": 404,
                                       "message": "configmaps \"x\" not found"}});
        assert_eq!(
            classify_answer(&Content::Json(err.clone())),
            Answer::Error("configmaps \"x\" not found".into())
        );
        // the same sent as bytes (QUIC) or as a JSON string
        assert_eq!(
            classify_answer(&Content::Bytes(err.to_string().into_bytes().into())),
            Answer::Error("configmaps \"x\" not found".into())
        );
        assert_eq!(
            classify_answer(&Content::text(err.to_string())),
            Answer::Error("configmaps \"x\" not found".into())
        );
        let obj = cm("3", "u");
        assert_eq!(
            classify_answer(&Content::Json(json!({"Object": obj, "Err": null}))),
            Answer::Object(obj.clone())
        );
        assert_eq!(
            classify_answer(&Content::Json(json!({"Object": obj, "Err": {}}))),
            Answer::Object(obj.clone())
        );
        assert!(matches!(
            classify_answer(&Content::Json(json!({"Object": null, "Err": {}}))),
            Answer::Error(_)
        ));
        assert!(matches!(
            classify_answer(&Content::Json(json!({"Object": obj, "Err": err}))),
            Answer::Error(_)
        ));
        assert_eq!(classify_answer(&Content::text("OK")), Answer::Ok);
        assert_eq!(
            classify_answer(&Content::Json(obj.clone())),
            Answer::Object(obj)
        );
    }

    #[test]
    fn error_answers_are_acked_and_never_stored() {
        let err = json!({"ErrStatus": {"message": "configmaps \"x\" not found", "code": 404}});
        let m = msg(OP_RESPONSE, "default/configmap/x", "", err);
        let change = inspect(&m).unwrap();
        assert!(change.ack);
        assert!(matches!(change.action, Action::CloudError(_)));
        assert_eq!(decide(&change, None), Plan::Keep(Kept::NothingToStore));
        let ok = msg(OP_RESPONSE, "default/podstatus/p", "", json!("OK"));
        let change = inspect(&ok).unwrap();
        assert!(!change.ack);
        assert_eq!(decide(&change, None), Plan::Keep(Kept::NothingToStore));
        let answer = msg(OP_RESPONSE, "default/configmap/x", "4", cm("4", "u"));
        assert_eq!(plan(&answer, None), Plan::Upsert { created: true });
    }

    #[test]
    fn refusals_say_why() {
        let m = msg(OP_UPDATE, "default/configmap", "", json!({}));
        assert!(matches!(inspect(&m), Err(Refusal::Resource(_))));
        let m = msg("patch", "default/configmap/c", "", json!({}));
        assert!(inspect(&m).unwrap_err().to_string().contains("\"patch\""));
        let mut m = msg(OP_UPDATE, "default/configmap/c", "", json!({}));
        m.route.group = "func".into();
        assert!(matches!(inspect(&m), Err(Refusal::Group { .. })));
        let m = Message::with_header("id", "", 0)
            .route(
                "edgecontroller",
                "resource",
                "default/configmap/c",
                OP_UPDATE,
            )
            .content(Content::Bytes(vec![0xff, 0xfe].into()));
        assert_eq!(inspect(&m).unwrap_err(), Refusal::Content(2));
    }
}
