//! Which downstream (cloud → edge) messages need an ACK from the edge: KubeEdge's classification
//! (`noAckRequired` in cloudhub's message dispatcher, PROTOCOL.md B§8.4), as a pure function so the
//! cloud API, the session and the tests agree on it. The API may override it per message.

use proto::Message;
use proto::message::OP_RESPONSE;

/// Resource substrings whose messages KubeEdge sends without an ACK (lists, tokens, CA, twin
/// cloud updates, memberships): the edge asks again if one is lost.
const NO_ACK_RESOURCE_PARTS: [&str; 5] = [
    "podlist",
    "membership",
    "twin/cloud_updated",
    "serviceaccounttoken",
    "k8s/ca.crt",
];

/// CSI volume operations (KubeEdge `CSIOperationType*`); answered synchronously, never acked.
const VOLUME_OPERATIONS: [&str; 4] = [
    "createvolume",
    "deletevolume",
    "controllerpublishvolume",
    "controllerunpublishvolume",
];

/// Resource types whose `edgecontroller` messages carry no ACK: status-like objects the cloud
/// re-sends anyway. (`node` too, except for `update`: PROTOCOL.md B§8.4.)
const EDGECONTROLLER_NO_ACK_TYPES: [&str; 5] = [
    "lease",
    "nodepatch",
    "podpatch",
    "podstatus",
    "certificatesigningrequest",
];

/// Whether the edge must acknowledge `msg` (op `response`, parent id = its id) before the cloud
/// forgets it. `false` means KubeEdge's NO-ACK mode: sent once, removed after the write.
///
/// The resource may carry the cloud-internal `node/<id>/` prefix or not; both classify alike.
pub fn needs_ack(msg: &Message) -> bool {
    let route = &msg.route;
    let resource = route.resource.as_str();
    if NO_ACK_RESOURCE_PARTS
        .iter()
        .any(|part| resource.contains(part))
    {
        return false;
    }
    if VOLUME_OPERATIONS.contains(&route.operation.as_str()) {
        return false;
    }
    if route.operation == "applicationResponse" || route.group == "user" {
        return false;
    }
    if route.source == "taskmanager" || route.source == "nodeupgradejobcontroller" {
        return false;
    }
    // KubeEdge tests the Go content for the string "OK" or an `error` value; an error crosses
    // the wire as its text, so only "OK" can be recognised here.
    if route.operation == OP_RESPONSE && msg.content.as_text() == Some("OK") {
        return false;
    }
    if route.source == "edgecontroller" {
        let kind = resource_type(resource);
        if EDGECONTROLLER_NO_ACK_TYPES.contains(&kind)
            || (kind == "node" && route.operation != "update")
            || (kind == "pod" && route.operation == OP_RESPONSE)
        {
            return false;
        }
    }
    true
}

/// The resource type of `<namespace>/<type>/<name>`, after dropping a leading `node/<id>/`
/// (KubeEdge's `GetResourceType` reads index 3 of the prefixed form). Empty when absent.
fn resource_type(resource: &str) -> &str {
    let mut parts = resource.split('/');
    if parts.next() == Some("node") {
        // `node/<id>/<namespace>/<type>/...`; `node/<id>` alone has no type.
        return parts.nth(2).unwrap_or("");
    }
    // Without the prefix the type is the second segment.
    parts.next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(source: &str, group: &str, resource: &str, op: &str) -> Message {
        Message::with_header("id", "", 0).route(source, group, resource, op)
    }

    #[test]
    fn resource_updates_need_ack() {
        assert!(needs_ack(&msg(
            "edgecontroller",
            "resource",
            "default/pod/nginx",
            "update"
        )));
        assert!(needs_ack(&msg(
            "edgecontroller",
            "resource",
            "node/edge-1/default/configmap/cfg",
            "insert"
        )));
        assert!(needs_ack(&msg("app", "meta", "", "insert")));
    }

    #[test]
    fn kubeedge_no_ack_classes() {
        // (source, group, resource, operation) of each class KubeEdge never ACKs.
        let classes = [
            ("metamanager", "meta", "default/podlist/x", "response"),
            ("x", "twin", "membership/detail", "get"),
            ("x", "twin", "device/twin/cloud_updated", "update"),
            ("x", "resource", "default/serviceaccounttoken/t", "get"),
            ("cloudhub", "resource", "node/e/k8s/ca.crt", "response"),
            ("x", "resource", "default/volume/v", "createvolume"),
            ("metaserver", "meta", "", "applicationResponse"),
            ("router", "user", "a/b", "publish"),
            ("taskmanager", "taskmanager", "task/x", "upgrade"),
            ("nodeupgradejobcontroller", "x", "y", "upgrade"),
        ];
        for (source, group, resource, op) in classes {
            let m = msg(source, group, resource, op);
            assert!(!needs_ack(&m), "{source} {group} {resource} {op}");
        }
    }

    #[test]
    fn ok_response_needs_no_ack_but_other_responses_do() {
        let ok = msg("metamanager", "meta", "default/pod/p", OP_RESPONSE)
            .content(proto::Content::text("OK"));
        assert!(!needs_ack(&ok));
        let data = msg("metamanager", "meta", "default/configmap/c", OP_RESPONSE)
            .content(proto::Content::text("{}"));
        assert!(needs_ack(&data));
    }

    #[test]
    fn edgecontroller_status_types_need_no_ack() {
        for kind in EDGECONTROLLER_NO_ACK_TYPES {
            let resource = format!("node/edge-1/default/{kind}/n");
            assert!(
                !needs_ack(&msg("edgecontroller", "resource", &resource, "update")),
                "{kind}"
            );
            let bare = format!("default/{kind}/n");
            assert!(
                !needs_ack(&msg("edgecontroller", "resource", &bare, "update")),
                "{kind}"
            );
        }
        assert!(!needs_ack(&msg(
            "edgecontroller",
            "resource",
            "default/pod/p",
            OP_RESPONSE
        )));
        assert!(!needs_ack(&msg(
            "edgecontroller",
            "resource",
            "default/node/n",
            "insert"
        )));
        assert!(needs_ack(&msg(
            "edgecontroller",
            "resource",
            "default/node/n",
            "update"
        )));
        // The same types from another source keep their ACK.
        assert!(needs_ack(&msg(
            "synccontroller",
            "resource",
            "default/podstatus/p",
            "update"
        )));
    }

    #[test]
    fn resource_type_handles_both_forms() {
        assert_eq!(resource_type("node/e/default/pod/p"), "pod");
        assert_eq!(resource_type("default/pod/p"), "pod");
        assert_eq!(resource_type("node/e"), "");
        assert_eq!(resource_type("x"), "");
        assert_eq!(resource_type(""), "");
    }
}
