//! Which node gets which object, as KubeEdge's edgecontroller decides (pure, no I/O): a pod goes
//! to `spec.nodeName`; the configmaps and secrets a node's pods reference (volumes, projected
//! volume sources, `env[].valueFrom`, `envFrom`, and `imagePullSecrets` for secrets) go to that
//! node, in the pod's namespace; a node object goes to its node; a device (KubeEdge's
//! `devices.kubeedge.io` Device) goes to its `spec.nodeName` with its DeviceModel (same
//! namespace), so a model reaches exactly the nodes that hold a device using it (MODULES.md §6.2;
//! DeviceStatus objects stay in the cloud). Unlike KubeEdge's location cache,
//! which never shrinks, the placement is computed from the live objects each time, so an object no
//! pod on a node references any more is no longer placed there (and the sync deletes it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cloudhub::objects::StoredObject;
use serde_json::Value;

/// Per node, the objects it should hold, by wire resource (`default/configmap/demo`).
pub type Placement = BTreeMap<String, BTreeMap<String, Arc<StoredObject>>>;

/// Places `objects` (live ones; tombstones are ignored) on nodes.
pub fn place<'a>(objects: impl IntoIterator<Item = &'a Arc<StoredObject>>) -> Placement {
    let mut by_key: BTreeMap<(String, String, String), &Arc<StoredObject>> = BTreeMap::new();
    let mut pods = Vec::new();
    let mut devices = Vec::new();
    let mut placement = Placement::new();
    for o in objects {
        if o.deleted {
            continue;
        }
        by_key.insert((o.resource.clone(), o.namespace.clone(), o.name.clone()), o);
        match o.resource.as_str() {
            "pods" => pods.push(o),
            "devices" => devices.push(o),
            "nodes" => {
                placement
                    .entry(o.name.clone())
                    .or_default()
                    .insert(o.wire_resource(), Arc::clone(o));
            }
            _ => {}
        }
    }
    for pod in pods {
        let Some(node) = pod.body["spec"]["nodeName"]
            .as_str()
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        let held = placement.entry(node.to_owned()).or_default();
        held.insert(pod.wire_resource(), Arc::clone(pod));
        let (configmaps, secrets) = references(&pod.body["spec"]);
        for (resource, names) in [("configmaps", configmaps), ("secrets", secrets)] {
            for name in names {
                let key = (resource.to_owned(), pod.namespace.clone(), name);
                if let Some(o) = by_key.get(&key) {
                    held.insert(o.wire_resource(), Arc::clone(o));
                }
            }
        }
    }
    for device in devices {
        let Some(node) = device.body["spec"]["nodeName"]
            .as_str()
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        let held = placement.entry(node.to_owned()).or_default();
        held.insert(device.wire_resource(), Arc::clone(device));
        if let Some(model) = device.body["spec"]["deviceModelRef"]["name"].as_str() {
            let key = (
                "devicemodels".to_owned(),
                device.namespace.clone(),
                model.to_owned(),
            );
            if let Some(o) = by_key.get(&key) {
                held.insert(o.wire_resource(), Arc::clone(o));
            }
        }
    }
    placement
}

/// The configmaps and secrets a pod spec references.
pub fn references(spec: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut cms = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    let add = |set: &mut BTreeSet<String>, v: &Value| {
        if let Some(n) = v.as_str().filter(|n| !n.is_empty()) {
            set.insert(n.to_owned());
        }
    };
    for vol in spec["volumes"].as_array().into_iter().flatten() {
        add(&mut cms, &vol["configMap"]["name"]);
        add(&mut secrets, &vol["secret"]["secretName"]);
        for src in vol["projected"]["sources"].as_array().into_iter().flatten() {
            add(&mut cms, &src["configMap"]["name"]);
            add(&mut secrets, &src["secret"]["name"]);
        }
    }
    let containers = ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten());
    for c in containers {
        for env in c["env"].as_array().into_iter().flatten() {
            add(&mut cms, &env["valueFrom"]["configMapKeyRef"]["name"]);
            add(&mut secrets, &env["valueFrom"]["secretKeyRef"]["name"]);
        }
        for from in c["envFrom"].as_array().into_iter().flatten() {
            add(&mut cms, &from["configMapRef"]["name"]);
            add(&mut secrets, &from["secretRef"]["name"]);
        }
    }
    for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
        add(&mut secrets, &s["name"]);
    }
    (cms, secrets)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(resource: &str, ns: &str, name: &str, body: Value) -> Arc<StoredObject> {
        Arc::new(StoredObject {
            resource: resource.into(),
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            rv: 1,
            created_rv: 1,
            deleted: false,
            body,
        })
    }

    #[test]
    fn pods_take_what_they_reference_to_their_node() {
        let pod = obj(
            "pods",
            "default",
            "web",
            json!({"spec": {
                "nodeName": "edge-1",
                "volumes": [
                    {"configMap": {"name": "vol-cm"}},
                    {"secret": {"secretName": "vol-secret"}},
                    {"projected": {"sources": [{"configMap": {"name": "proj-cm"}}, {"secret": {"name": "proj-secret"}}]}}
                ],
                "containers": [{"env": [
                    {"valueFrom": {"configMapKeyRef": {"name": "env-cm"}}},
                    {"valueFrom": {"secretKeyRef": {"name": "env-secret"}}}
                ], "envFrom": [{"configMapRef": {"name": "from-cm"}}, {"secretRef": {"name": "from-secret"}}]}],
                "imagePullSecrets": [{"name": "pull"}]
            }}),
        );
        let mut all = vec![pod];
        for n in ["vol-cm", "proj-cm", "env-cm", "from-cm", "unused"] {
            all.push(obj("configmaps", "default", n, json!({})));
        }
        for n in [
            "vol-secret",
            "proj-secret",
            "env-secret",
            "from-secret",
            "pull",
        ] {
            all.push(obj("secrets", "default", n, json!({})));
        }
        // Same name, other namespace: not referenced.
        all.push(obj("configmaps", "other", "vol-cm", json!({})));
        all.push(obj("nodes", "", "edge-1", json!({})));
        all.push(obj("nodes", "", "edge-2", json!({})));
        let placed = place(&all);
        let edge1: Vec<&str> = placed["edge-1"].keys().map(String::as_str).collect();
        assert_eq!(
            edge1,
            [
                "default/configmap/env-cm",
                "default/configmap/from-cm",
                "default/configmap/proj-cm",
                "default/configmap/vol-cm",
                "default/pod/web",
                "default/secret/env-secret",
                "default/secret/from-secret",
                "default/secret/proj-secret",
                "default/secret/pull",
                "default/secret/vol-secret",
                "null/node/edge-1",
            ]
        );
        let edge2: Vec<&str> = placed["edge-2"].keys().map(String::as_str).collect();
        assert_eq!(edge2, ["null/node/edge-2"]);
    }

    #[test]
    fn devices_take_their_model_to_their_node() {
        let dev = |name: &str, node: &str, model: &str| {
            obj(
                "devices",
                "default",
                name,
                json!({"spec": {"nodeName": node, "deviceModelRef": {"name": model}}}),
            )
        };
        let all = vec![
            dev("a", "edge-1", "thermo"),
            dev("b", "edge-1", "thermo"),
            dev("c", "edge-2", "lamp"),
            dev("unplaced", "", "thermo"),
            obj("devicemodels", "default", "thermo", json!({})),
            obj("devicemodels", "default", "lamp", json!({})),
            obj("devicemodels", "default", "unused", json!({})),
            obj("devicestatuses", "default", "a", json!({})),
        ];
        let placed = place(&all);
        let keys = |n: &str| placed[n].keys().map(String::as_str).collect::<Vec<_>>();
        assert_eq!(
            keys("edge-1"),
            [
                "default/device/a",
                "default/device/b",
                "default/devicemodel/thermo"
            ]
        );
        assert_eq!(
            keys("edge-2"),
            ["default/device/c", "default/devicemodel/lamp"]
        );
        assert_eq!(placed.len(), 2);
    }

    #[test]
    fn an_unreferenced_or_deleted_object_is_placed_nowhere() {
        let pod = obj(
            "pods",
            "default",
            "p",
            json!({"spec": {"nodeName": "e", "volumes": [{"configMap": {"name": "c"}}]}}),
        );
        let mut cm = (*obj("configmaps", "default", "c", json!({}))).clone();
        cm.deleted = true;
        let placed = place(&[pod, Arc::new(cm)]);
        assert_eq!(placed["e"].keys().collect::<Vec<_>>(), ["default/pod/p"]);
        let unscheduled = obj("pods", "default", "q", json!({"spec": {}}));
        assert!(place(&[unscheduled]).is_empty());
    }
}
