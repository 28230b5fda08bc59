//! What edgecontroller makes of the edge's messages (pure, no I/O): which are its own (remote
//! queries, node and pod status; MODULES.md §1.3, §1.5) and the answers' shapes (KubeEdge's
//! StatusError for a query it cannot answer, the node's Ready condition from the link).

use serde_json::{Value, json};

use cloudhub::objects::{ObjectKind, model};

/// An edge message as edgecontroller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream<'a> {
    /// `query` of `{ns}/{type}/{name}` for a type the object store keeps: answered from it.
    Query {
        /// The kind asked for.
        kind: &'static ObjectKind,
        /// Namespace (empty for a cluster-scoped kind).
        namespace: &'a str,
        /// Name.
        name: &'a str,
    },
    /// A `query` that cannot be answered: the resource is malformed or names an unknown type.
    /// Answered with a StatusError (BadRequest), nothing looked up or stored.
    BadQuery(String),
    /// `update` of `{ns}/podstatus/{pod}`: a legacy PodStatusRequest.
    PodStatus {
        /// Namespace.
        namespace: &'a str,
        /// Pod name.
        name: &'a str,
    },
    /// `insert` / `update` of `{ns}/nodestatus/{node}`: a legacy NodeStatusRequest (update) or
    /// a Node (insert).
    NodeStatus {
        /// Node name.
        name: &'a str,
    },
    /// Not edgecontroller's: passed on to the application path.
    PassOn,
}

/// What `op` on the edge's `resource` is to edgecontroller.
pub fn classify<'a>(op: &str, resource: &'a str) -> Upstream<'a> {
    let parts: Vec<&str> = resource.split('/').collect();
    let three = match parts.as_slice() {
        [ns, ty, name] if !ns.is_empty() && !ty.is_empty() && !name.is_empty() => {
            Some((*ns, *ty, *name))
        }
        _ => None,
    };
    match (op, three) {
        ("query", Some((ns, ty, name))) => match model::kind_by_wire(ty) {
            Some(kind) if kind.namespaced && ns == "null" => Upstream::BadQuery(format!(
                "{} are namespaced: the resource {resource:?} names no namespace",
                kind.resource
            )),
            Some(kind) => Upstream::Query {
                kind,
                namespace: if kind.namespaced { ns } else { "" },
                name,
            },
            None => Upstream::BadQuery(format!(
                "unknown resource type {ty:?} in {resource:?}: known are {}",
                model::KINDS
                    .iter()
                    .map(|k| k.wire)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
        ("query", None) => Upstream::BadQuery(format!(
            "malformed resource {resource:?}: a query names {{namespace}}/{{type}}/{{name}}"
        )),
        ("update", Some((ns, "podstatus", name))) if ns != "null" => Upstream::PodStatus {
            namespace: ns,
            name,
        },
        ("insert" | "update", Some((_, "nodestatus", name))) => Upstream::NodeStatus { name },
        _ => Upstream::PassOn,
    }
}

/// KubeEdge's StatusError as JSON (`{"ErrStatus": {...}}`, what the edge receives for a query
/// it cannot be answered), e.g. reason `NotFound` code 404.
pub fn status_error(reason: &str, code: u16, message: &str, kind: &str, name: &str) -> Value {
    json!({"ErrStatus": {
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "kind": kind},
        "code": code,
    }})
}

/// `status` with its `Ready` condition set from the link: `True` while connected, `Unknown`
/// otherwise (Kubernetes' node lifecycle controller says Unknown when the kubelet stops
/// reporting). `lastTransitionTime` changes only when the status does; `lastHeartbeatTime` is
/// `heartbeat`.
pub fn with_ready(mut status: Value, connected: bool, now: &str, heartbeat: &str) -> Value {
    if !status.is_object() {
        status = json!({});
    }
    let (value, reason, message) = if connected {
        (
            "True",
            "EdgeConnected",
            "the edge node's session with the cloud is up",
        )
    } else {
        (
            "Unknown",
            "EdgeDisconnected",
            "the edge node's session with the cloud is down",
        )
    };
    let mut conditions: Vec<Value> = status["conditions"].as_array().cloned().unwrap_or_default();
    let old = conditions.iter().position(|c| c["type"] == "Ready");
    let transition = match old.map(|i| &conditions[i]) {
        Some(c) if c["status"] == value => c["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    let ready = json!({
        "type": "Ready",
        "status": value,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": heartbeat,
        "lastTransitionTime": transition,
    });
    match old {
        Some(i) => conditions[i] = ready,
        None => conditions.push(ready),
    }
    status["conditions"] = Value::Array(conditions);
    status
}

/// The Ready condition's status in `status` (`True`, `Unknown`, ...), if any.
pub fn ready_of(status: &Value) -> Option<&str> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?["status"]
        .as_str()
}

/// The object without what a status write changes (`status`, `metadata.resourceVersion`): two
/// versions equal under it differ only in status, which the edge needs no message for.
pub fn without_status(body: &Value) -> Value {
    let mut body = body.clone();
    if let Some(o) = body.as_object_mut() {
        o.remove("status");
    }
    if let Some(m) = body["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_classified_and_bad_ones_named() {
        match classify("query", "default/configmap/cfg") {
            Upstream::Query {
                kind,
                namespace,
                name,
            } => assert_eq!(
                (kind.resource, namespace, name),
                ("configmaps", "default", "cfg")
            ),
            other => panic!("{other:?}"),
        }
        match classify("query", "null/node/edge-1") {
            Upstream::Query {
                kind, namespace, ..
            } => {
                assert_eq!((kind.resource, namespace), ("nodes", ""));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "default/widget/x",
            "default/configmap",
            "a/b/c/d",
            "//x",
            "null/configmap/x",
        ] {
            assert!(
                matches!(classify("query", bad), Upstream::BadQuery(_)),
                "{bad}"
            );
        }
        assert_eq!(
            classify("update", "default/podstatus/p"),
            Upstream::PodStatus {
                namespace: "default",
                name: "p"
            }
        );
        assert_eq!(
            classify("update", "null/nodestatus/edge-1"),
            Upstream::NodeStatus { name: "edge-1" }
        );
        assert_eq!(classify("update", "default/pod/p"), Upstream::PassOn);
        assert_eq!(classify("upload", "x"), Upstream::PassOn);
    }

    #[test]
    fn ready_follows_the_link_and_keeps_its_transition_time() {
        let up = with_ready(json!({"addresses": []}), true, "t1", "t1");
        assert_eq!(ready_of(&up), Some("True"));
        assert_eq!(up["addresses"], json!([]), "the rest of the status kept");
        let still = with_ready(up.clone(), true, "t2", "t2");
        assert_eq!(still["conditions"][0]["lastTransitionTime"], "t1");
        assert_eq!(still["conditions"][0]["lastHeartbeatTime"], "t2");
        let down = with_ready(still, false, "t3", "t2");
        assert_eq!(ready_of(&down), Some("Unknown"));
        assert_eq!(down["conditions"][0]["lastTransitionTime"], "t3");
        assert_eq!(down["conditions"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn status_only_changes_compare_equal() {
        let a = json!({"metadata": {"name": "p", "resourceVersion": "1"}, "spec": {"x": 1}});
        let mut b = a.clone();
        b["status"] = json!({"phase": "Running"});
        b["metadata"]["resourceVersion"] = json!("2");
        assert_eq!(without_status(&a), without_status(&b));
        b["spec"]["x"] = json!(2);
        assert_ne!(without_status(&a), without_status(&b));
    }
}
