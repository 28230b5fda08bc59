//! What objects the store keeps and what a written object must look like: the resource table
//! (path resource ↔ kind ↔ KubeEdge wire type), validation of a `PUT` body against its path
//! (no I/O), and Kubernetes label selectors.

use serde_json::{Map, Value};

use super::ObjectError;

/// One kind of object the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectKind {
    /// The path resource, plural and lower case (`configmaps`).
    pub resource: &'static str,
    /// `kind` (`ConfigMap`).
    pub kind: &'static str,
    /// The KubeEdge wire type, singular and lower case (`configmap`): the middle of
    /// `{ns}/{type}/{name}`.
    pub wire: &'static str,
    /// `apiVersion` filled in when the body has none.
    pub api_version: &'static str,
    /// Namespaced (`/v1/namespaces/{ns}/...`) or cluster-scoped (`/v1/cluster/...`).
    pub namespaced: bool,
}

/// The kinds the store keeps: those edgecontroller syncs (pods, configmaps, secrets, nodes,
/// devices and their models), the ones edge applications commonly read (services, endpoints,
/// namespaces), and the devices' reported state (devicestatuses: KubeEdge v1.23's DeviceStatus,
/// written by devicecontroller, never sent to a node).
pub const KINDS: &[ObjectKind] = &[
    kind("pods", "Pod", "pod", true),
    kind("configmaps", "ConfigMap", "configmap", true),
    kind("secrets", "Secret", "secret", true),
    kind("services", "Service", "service", true),
    kind("endpoints", "Endpoints", "endpoints", true),
    kind("nodes", "Node", "node", false),
    kind("namespaces", "Namespace", "namespace", false),
    device_kind("devices", "Device", "device"),
    device_kind("devicemodels", "DeviceModel", "devicemodel"),
    device_kind("devicestatuses", "DeviceStatus", "devicestatus"),
];

/// The API group and version of KubeEdge's device objects.
pub const DEVICES_API_VERSION: &str = "devices.kubeedge.io/v1beta1";

const fn device_kind(resource: &'static str, kind: &'static str, wire: &'static str) -> ObjectKind {
    ObjectKind {
        resource,
        kind,
        wire,
        api_version: DEVICES_API_VERSION,
        namespaced: true,
    }
}

const fn kind(
    resource: &'static str,
    kind: &'static str,
    wire: &'static str,
    namespaced: bool,
) -> ObjectKind {
    ObjectKind {
        resource,
        kind,
        wire,
        api_version: "v1",
        namespaced,
    }
}

/// The kind whose path resource is `resource`.
pub fn kind_by_resource(resource: &str) -> Option<&'static ObjectKind> {
    KINDS.iter().find(|k| k.resource == resource)
}

/// The kind whose wire type is `wire` (`configmap`).
pub fn kind_by_wire(wire: &str) -> Option<&'static ObjectKind> {
    KINDS.iter().find(|k| k.wire == wire)
}

/// The path resources, for error messages.
pub(crate) fn known_resources() -> String {
    KINDS
        .iter()
        .map(|k| k.resource)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a name as Kubernetes does for most objects (a DNS-1123 subdomain): 1 to 253
/// characters of `a-z`, `0-9`, `-` and `.`, starting and ending with a letter or digit.
pub fn check_name(what: &str, name: &str) -> Result<(), ObjectError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ObjectError::Invalid(format!(
            "{what} {name:?} is not a valid name: 1 to 253 characters of a-z, 0-9, '-' and '.', \
             starting and ending with a letter or digit"
        )))
    }
}

/// A written object, checked against its path and ready to store (metadata completed except
/// the fields the store assigns: uid, resourceVersion, creationTimestamp).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The object JSON.
    pub body: Value,
    /// `metadata.resourceVersion` the writer expects the stored object to have (a conditional
    /// update), if it gave one.
    pub expected_rv: Option<u64>,
}

/// Checks `body` written to `{namespace}/{kind}/{name}`: it must be a JSON object whose
/// `kind` (if given) is the path's, whose `metadata.name` / `metadata.namespace` (if given)
/// are the path's, with string labels and a decimal resourceVersion if any. Fills in `kind`,
/// `apiVersion`, `metadata.name` and `metadata.namespace`.
pub fn prepare(
    kind: &ObjectKind,
    namespace: &str,
    name: &str,
    body: Value,
) -> Result<Prepared, ObjectError> {
    check_name("name", name)?;
    if kind.namespaced {
        check_name("namespace", namespace)?;
    }
    let Value::Object(mut obj) = body else {
        return Err(ObjectError::Invalid(format!(
            "the body must be a JSON object (a {}), not {}",
            kind.kind,
            type_name(&body)
        )));
    };
    match obj.get("kind") {
        None | Some(Value::Null) => {
            obj.insert("kind".into(), kind.kind.into());
        }
        Some(Value::String(k)) if k == kind.kind => {}
        Some(other) => {
            return Err(ObjectError::Mismatch {
                code: "kind_mismatch",
                what: format!(
                    "kind {other} does not match the path: {} holds kind {:?}",
                    kind.resource, kind.kind
                ),
            });
        }
    }
    match obj.get("apiVersion") {
        None | Some(Value::Null) => {
            obj.insert("apiVersion".into(), kind.api_version.into());
        }
        Some(Value::String(_)) => {}
        Some(other) => {
            return Err(ObjectError::Invalid(format!(
                "apiVersion must be a string, not {}",
                type_name(other)
            )));
        }
    }
    check_kind_fields(kind, &obj)?;
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if meta.is_null() {
        *meta = Value::Object(Map::new());
    }
    let Value::Object(meta) = meta else {
        return Err(ObjectError::Invalid(
            "metadata must be a JSON object".into(),
        ));
    };
    match meta.get("name") {
        None | Some(Value::Null) => {
            meta.insert("name".into(), name.into());
        }
        Some(Value::String(n)) if n == name => {}
        Some(other) => {
            return Err(ObjectError::Mismatch {
                code: "name_mismatch",
                what: format!("metadata.name {other} does not match the path's name {name:?}"),
            });
        }
    }
    match (meta.get("namespace"), kind.namespaced) {
        (None | Some(Value::Null), true) => {
            meta.insert("namespace".into(), namespace.into());
        }
        (Some(Value::String(n)), true) if n == namespace => {}
        (None | Some(Value::Null), false) => {}
        (Some(Value::String(n)), false) if n.is_empty() => {
            meta.remove("namespace");
        }
        (Some(other), true) => {
            return Err(ObjectError::Mismatch {
                code: "name_mismatch",
                what: format!(
                    "metadata.namespace {other} does not match the path's namespace {namespace:?}"
                ),
            });
        }
        (Some(other), false) => {
            return Err(ObjectError::Mismatch {
                code: "name_mismatch",
                what: format!(
                    "{} are cluster-scoped: metadata.namespace {other} must be absent",
                    kind.resource
                ),
            });
        }
    }
    match meta.get("labels") {
        None | Some(Value::Null) => {}
        Some(Value::Object(labels)) => {
            if let Some((k, v)) = labels.iter().find(|(_, v)| !v.is_string()) {
                return Err(ObjectError::Invalid(format!(
                    "label {k:?} must have a string value, not {}",
                    type_name(v)
                )));
            }
            if let Some(k) = labels.keys().find(|k| k.is_empty() || k.len() > 316) {
                return Err(ObjectError::Invalid(format!("bad label key {k:?}")));
            }
        }
        Some(other) => {
            return Err(ObjectError::Invalid(format!(
                "metadata.labels must be an object of strings, not {}",
                type_name(other)
            )));
        }
    }
    let expected_rv = match meta.get("resourceVersion") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.parse::<u64>().map_err(|_| {
            ObjectError::Invalid(format!(
                "metadata.resourceVersion {s:?} is not a version this store gave (a decimal number)"
            ))
        })?),
        Some(other) => {
            return Err(ObjectError::Invalid(format!(
                "metadata.resourceVersion must be a string, not {}",
                type_name(other)
            )));
        }
    };
    Ok(Prepared {
        body: Value::Object(obj),
        expected_rv,
    })
}

/// Checks the fields of the kinds whose content this store understands: a Device names a model
/// (`spec.deviceModelRef.name`), may name a node (`spec.nodeName`) and declares properties with
/// unique twin names and string desired values; a DeviceModel declares properties with unique
/// names and a known type. Names and values follow devicetwin's rules (MODULES.md §5.4), so a
/// twin the cloud accepts is one the edge accepts.
fn check_kind_fields(kind: &ObjectKind, obj: &Map<String, Value>) -> Result<(), ObjectError> {
    let spec = obj.get("spec").unwrap_or(&Value::Null);
    match kind.resource {
        "devices" => {
            match &spec["deviceModelRef"]["name"] {
                Value::String(m) => check_name("spec.deviceModelRef.name", m)?,
                _ => {
                    return Err(ObjectError::Invalid(
                        "spec.deviceModelRef.name is required: the device's DeviceModel".into(),
                    ));
                }
            }
            match &spec["nodeName"] {
                Value::Null => {}
                Value::String(n) if n.is_empty() => {}
                Value::String(n) => check_name("spec.nodeName", n)?,
                other => {
                    return Err(ObjectError::Invalid(format!(
                        "spec.nodeName must be a string, not {}",
                        type_name(other)
                    )));
                }
            }
            let mut seen = std::collections::BTreeSet::new();
            for (i, p) in properties(spec)?.iter().enumerate() {
                let name = property_name(i, p)?;
                if !seen.insert(name) {
                    return Err(ObjectError::Invalid(format!(
                        "spec.properties[{i}]: property {name:?} is declared twice"
                    )));
                }
                match &p["desired"]["value"] {
                    Value::Null => {}
                    Value::String(v) if v.is_empty() || twin_value_ok(v) => {}
                    Value::String(v) => {
                        return Err(ObjectError::Invalid(format!(
                            "spec.properties[{i}].desired.value {v:?} is not a twin value: 1 to                              512 characters of a-z, A-Z, 0-9 and -_.,:/@#"
                        )));
                    }
                    other => {
                        return Err(ObjectError::Invalid(format!(
                            "spec.properties[{i}].desired.value must be a string, not {}",
                            type_name(other)
                        )));
                    }
                }
            }
        }
        "devicemodels" => {
            let mut seen = std::collections::BTreeSet::new();
            for (i, p) in properties(spec)?.iter().enumerate() {
                let name = property_name(i, p)?;
                if !seen.insert(name) {
                    return Err(ObjectError::Invalid(format!(
                        "spec.properties[{i}]: property {name:?} is declared twice"
                    )));
                }
                match &p["type"] {
                    Value::Null => {}
                    Value::String(t) if PROPERTY_TYPES.contains(&t.as_str()) => {}
                    other => {
                        return Err(ObjectError::Invalid(format!(
                            "spec.properties[{i}].type {other} is not one of {}",
                            PROPERTY_TYPES.join(", ")
                        )));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// DeviceModel property types (KubeEdge v1beta1).
const PROPERTY_TYPES: [&str; 7] = [
    "INT", "FLOAT", "DOUBLE", "STRING", "BOOLEAN", "BYTES", "STREAM",
];

fn properties(spec: &Value) -> Result<&[Value], ObjectError> {
    match &spec["properties"] {
        Value::Null => Ok(&[]),
        Value::Array(a) => Ok(a),
        other => Err(ObjectError::Invalid(format!(
            "spec.properties must be an array, not {}",
            type_name(other)
        ))),
    }
}

fn property_name(i: usize, p: &Value) -> Result<&str, ObjectError> {
    match &p["name"] {
        Value::String(n) if twin_key_ok(n) => Ok(n),
        other => Err(ObjectError::Invalid(format!(
            "spec.properties[{i}].name {other} is not a property name: 1 to 128 characters of \
             a-z, A-Z, 0-9 and -_.,:/@#"
        ))),
    }
}

/// devicetwin's key rule: `^[a-zA-Z0-9-_.,:/@#]{1,128}$`.
pub fn twin_key_ok(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(twin_byte)
}

/// devicetwin's value rule: `^[a-zA-Z0-9-_.,:/@#]{1,512}$`.
pub fn twin_value_ok(s: &str) -> bool {
    (1..=512).contains(&s.len()) && s.bytes().all(twin_byte)
}

fn twin_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.,:/@#".contains(&b)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A Kubernetes equality-based label selector: `a=b`, `a==b`, `a!=b`, `a` (has the label),
/// `!a` (lacks it), joined by commas; every term must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    terms: Vec<Term>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

impl Selector {
    /// Parses a selector; the empty string selects everything.
    pub fn parse(text: &str) -> Result<Self, ObjectError> {
        let mut terms = Vec::new();
        for raw in text.split(',') {
            let t = raw.trim();
            if t.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(ObjectError::BadSelector(format!("empty term in {text:?}")));
            }
            let key = |k: &str| -> Result<String, ObjectError> {
                let k = k.trim();
                if k.is_empty() || k.contains(|c: char| c.is_whitespace() || "=!(),".contains(c)) {
                    Err(ObjectError::BadSelector(format!("bad key in {t:?}")))
                } else {
                    Ok(k.to_owned())
                }
            };
            let term = if let Some((k, v)) = t.split_once("!=") {
                Term::Ne(key(k)?, v.trim().to_owned())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                if v.contains('=') {
                    return Err(ObjectError::BadSelector(format!("bad term {t:?}")));
                }
                Term::Eq(key(k)?, v.trim().to_owned())
            } else if let Some(k) = t.strip_prefix('!') {
                Term::Absent(key(k)?)
            } else {
                Term::Exists(key(t)?)
            };
            terms.push(term);
        }
        Ok(Self { terms })
    }

    /// Whether an object with `labels` is selected.
    pub fn matches<'a>(&self, labels: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> bool {
        let get = |key: &str| labels.clone().find(|(k, _)| *k == key).map(|(_, v)| v);
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => get(k) == Some(v.as_str()),
            Term::Ne(k, v) => get(k) != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::Absent(k) => get(k).is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cm() -> &'static ObjectKind {
        kind_by_resource("configmaps").unwrap()
    }

    #[test]
    fn a_bare_object_gets_kind_and_metadata() {
        let p = prepare(cm(), "default", "demo", json!({"data": {"k": "v"}})).unwrap();
        assert_eq!(p.body["kind"], "ConfigMap");
        assert_eq!(p.body["apiVersion"], "v1");
        assert_eq!(p.body["metadata"]["name"], "demo");
        assert_eq!(p.body["metadata"]["namespace"], "default");
        assert_eq!(p.expected_rv, None);
    }

    #[test]
    fn devices_name_a_model_and_valid_twins() {
        let dev = kind_by_resource("devices").unwrap();
        let ok = prepare(
            dev,
            "default",
            "thermo-1",
            json!({"spec": {"deviceModelRef": {"name": "thermo"}, "nodeName": "edge-1",
                "properties": [{"name": "temperature", "desired": {"value": "25"}}]}}),
        )
        .unwrap();
        assert_eq!(ok.body["apiVersion"], DEVICES_API_VERSION);
        assert_eq!(ok.body["kind"], "Device");
        let refused = |body: Value| {
            let e = prepare(dev, "default", "d", body).unwrap_err();
            assert_eq!(e.status_code(), (400, "invalid_object"), "{e}");
            e.to_string()
        };
        assert!(refused(json!({"spec": {}})).contains("deviceModelRef"));
        let with = |extra: Value| {
            let mut spec = json!({"deviceModelRef": {"name": "m"}});
            for (k, v) in extra.as_object().unwrap() {
                spec[k] = v.clone();
            }
            json!({ "spec": spec })
        };
        assert!(refused(with(json!({"nodeName": "Edge_1"}))).contains("spec.nodeName"));
        assert!(refused(with(json!({"nodeName": 3}))).contains("spec.nodeName"));
        assert!(refused(with(json!({"properties": [{"name": "a b"}]}))).contains("property name"));
        assert!(
            refused(with(json!({"properties": [{"name": "a"}, {"name": "a"}]}))).contains("twice")
        );
        assert!(
            refused(with(
                json!({"properties": [{"name": "a", "desired": {"value": "x y"}}]})
            ))
            .contains("twin value")
        );
        let model = kind_by_resource("devicemodels").unwrap();
        assert!(
            prepare(
                model,
                "default",
                "m",
                json!({"spec": {"properties": [{"name": "t", "type": "INT"}]}})
            )
            .is_ok()
        );
        let e = prepare(
            model,
            "default",
            "m",
            json!({"spec": {"properties": [{"name": "t", "type": "int"}]}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("INT, FLOAT"), "{e}");
    }

    #[test]
    fn bad_objects_are_refused() {
        let code = |r: Result<Prepared, ObjectError>| r.unwrap_err().status_code();
        assert_eq!(
            code(prepare(cm(), "default", "demo", json!([1]))),
            (400, "invalid_object")
        );
        assert_eq!(
            code(prepare(cm(), "default", "demo", json!({"kind": "Secret"}))),
            (400, "kind_mismatch")
        );
        assert_eq!(
            code(prepare(
                cm(),
                "default",
                "demo",
                json!({"metadata": {"name": "other"}})
            )),
            (400, "name_mismatch")
        );
        assert_eq!(
            code(prepare(cm(), "default", "Bad_Name", json!({}))),
            (400, "invalid_object")
        );
        assert_eq!(
            code(prepare(
                cm(),
                "default",
                "demo",
                json!({"metadata": {"labels": {"a": 1}}})
            )),
            (400, "invalid_object")
        );
        assert_eq!(
            code(prepare(
                cm(),
                "default",
                "demo",
                json!({"metadata": {"resourceVersion": "x"}})
            )),
            (400, "invalid_object")
        );
        let node = kind_by_resource("nodes").unwrap();
        assert_eq!(
            code(prepare(
                node,
                "",
                "edge-1",
                json!({"metadata": {"namespace": "default"}})
            )),
            (400, "name_mismatch")
        );
    }

    #[test]
    fn a_conditional_update_names_its_version() {
        let p = prepare(
            cm(),
            "default",
            "demo",
            json!({"metadata": {"resourceVersion": "12"}}),
        )
        .unwrap();
        assert_eq!(p.expected_rv, Some(12));
    }

    #[test]
    fn selectors_select() {
        let labels = [("app", "web"), ("tier", "front")];
        let sel = |s: &str| Selector::parse(s).unwrap().matches(labels.iter().copied());
        assert!(sel(""));
        assert!(sel("app=web"));
        assert!(sel("app==web,tier"));
        assert!(sel("app!=db,!missing"));
        assert!(!sel("app=db"));
        assert!(!sel("missing"));
        assert!(!sel("!app"));
        assert!(Selector::parse("a=b=c").is_err());
        assert!(Selector::parse("a,,b").is_err());
        assert!(Selector::parse("=x").is_err());
    }
}
