//! devicetwin's decisions, without I/O (MODULES.md §5.3–§5.5): the device and twin model, the
//! validation of what applications and mappers publish, the merge of an update into a device,
//! and every payload devicetwin publishes or syncs, in KubeEdge's JSON shapes.
//!
//! Departures from KubeEdge, each a fix: JSON keys are matched case-insensitively (`State` and
//! `state`, M15) and emitted lower case; a twin whose `expected` or `actual` lacks a `value`, or
//! whose metadata is not an object, is refused with 400 instead of being dereferenced (M19); an
//! update is validated whole before anything is applied.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// A twin's version counters (`{"cloud":N,"edge":M}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Version {
    /// Changes made by the cloud.
    pub cloud: u64,
    /// Changes made on the edge.
    pub edge: u64,
}

impl Version {
    /// `{"cloud":N,"edge":M}`.
    pub fn to_json(self) -> Value {
        json!({"cloud": self.cloud, "edge": self.edge})
    }

    /// Reads `{"cloud":N,"edge":M}` (missing counters are 0).
    pub fn from_json(v: &Value) -> Self {
        Self {
            cloud: field(v, "cloud").and_then(Value::as_u64).unwrap_or(0),
            edge: field(v, "edge").and_then(Value::as_u64).unwrap_or(0),
        }
    }
}

/// A value with the time it was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamped {
    /// The value (a string, as KubeEdge keeps every twin value).
    pub value: String,
    /// When it was set, ms since the epoch.
    pub timestamp: i64,
}

impl Stamped {
    fn to_json(&self) -> Value {
        json!({"value": self.value, "metadata": {"timestamp": self.timestamp}})
    }
}

/// One twin of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Twin {
    /// The desired value.
    pub expected: Option<Stamped>,
    /// The reported value.
    pub actual: Option<Stamped>,
    /// Versions of `expected`.
    pub expected_version: Version,
    /// Versions of `actual`.
    pub actual_version: Version,
    /// Whether an update may delete it.
    pub optional: bool,
    /// Its value type (`string`, `int`, `integer`, `float`, `boolean`).
    pub value_type: String,
}

impl Twin {
    fn new(value_type: &str) -> Self {
        Self {
            expected: None,
            actual: None,
            expected_version: Version::default(),
            actual_version: Version::default(),
            optional: true,
            value_type: value_type.to_owned(),
        }
    }

    /// The twin as results, documents and `get` show it (no versions).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(e) = &self.expected {
            m.insert("expected".into(), e.to_json());
        }
        if let Some(a) = &self.actual {
            m.insert("actual".into(), a.to_json());
        }
        m.insert("optional".into(), self.optional.into());
        m.insert("metadata".into(), json!({"type": self.value_type}));
        Value::Object(m)
    }

    /// The twin as it is synced to the cloud (with the versions of the sides it has).
    pub fn to_sync_json(&self) -> Value {
        let mut v = self.to_json();
        if self.expected.is_some() {
            v["expected_version"] = self.expected_version.to_json();
        }
        if self.actual.is_some() {
            v["actual_version"] = self.actual_version.to_json();
        }
        v
    }
}

/// A device the node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `<ns>/<name>`.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Its state (`online`, `offline`, ...; empty until reported).
    pub state: String,
    /// When it was last seen online (RFC 3339), or empty.
    pub last_online: String,
    /// Its twins by property name.
    pub twins: BTreeMap<String, Twin>,
}

impl Device {
    /// A new device without state or twins.
    pub fn new(id: &str, name: &str, description: &str) -> Self {
        Self {
            id: id.to_owned(),
            name: name.to_owned(),
            description: description.to_owned(),
            state: String::new(),
            last_online: String::new(),
            twins: BTreeMap::new(),
        }
    }
}

/// A refusal published on a result topic: `{"event_id","timestamp","code","reason"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// 400 for a bad request, 404 for an unknown device, 500 when it could not be stored.
    pub code: u16,
    /// Why.
    pub reason: String,
}

impl Failure {
    /// 400 with `reason`.
    pub fn bad(reason: impl Into<String>) -> Self {
        Self {
            code: 400,
            reason: reason.into(),
        }
    }

    /// The result payload.
    pub fn to_json(&self, event_id: &str, now: i64) -> Value {
        json!({"event_id": event_id, "timestamp": now, "code": self.code, "reason": self.reason})
    }
}

/// One twin of a parsed update: `None` deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinPatch {
    /// A new desired value.
    pub expected: Option<String>,
    /// A new reported value.
    pub actual: Option<String>,
    /// `optional`, if given.
    pub optional: Option<bool>,
    /// `metadata.type`, if given.
    pub value_type: Option<String>,
}

/// A parsed `twin/update` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinUpdate {
    /// The request's event id (echoed in the result).
    pub event_id: String,
    /// The twins named, in name order; `None` deletes.
    pub twins: BTreeMap<String, Option<TwinPatch>>,
}

/// What an applied update publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateOutcome {
    /// `twin/update/result`.
    pub result: Value,
    /// `twin/update/document`.
    pub document: Value,
    /// `twin/update/delta`, when some desired value differs from the reported one.
    pub delta: Option<Value>,
    /// The `edge_updated` content to sync to the cloud, when a twin changed.
    pub sync: Option<Value>,
}

/// Looks a key up exactly, then ignoring ASCII case (Go's JSON decoding does; M15).
pub fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    let obj = v.as_object()?;
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// The payload as a JSON object, or a 400.
pub fn payload_object(payload: &[u8]) -> Result<Value, Failure> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(Failure::bad("the payload is not a JSON object")),
        Err(e) => Err(Failure::bad(format!("the payload is not JSON: {e}"))),
    }
}

/// The `event_id` of a payload (empty when absent or unreadable).
pub fn event_id(payload: &[u8]) -> String {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| {
            field(&v, "event_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// Whether `key` is a valid twin name (`^[a-zA-Z0-9-_.,:/@#]{1,128}$`).
pub fn key_ok(key: &str) -> bool {
    (1..=128).contains(&key.len()) && key.bytes().all(allowed_byte)
}

/// Whether `value` is a valid twin value (`^[a-zA-Z0-9-_.,:/@#]{1,512}$`, or empty).
pub fn value_ok(value: &str) -> bool {
    value.len() <= 512 && value.bytes().all(allowed_byte)
}

fn allowed_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.,:/@#".contains(&b)
}

/// Checks that `value` parses as `value_type`.
pub fn check_type(value_type: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    let ok = match value_type {
        "string" => true,
        "int" | "integer" => value.parse::<i64>().is_ok(),
        "float" => value.parse::<f64>().is_ok(),
        "boolean" => value == "true" || value == "false",
        other => return Err(format!("the type {other:?} is not supported")),
    };
    if ok {
        Ok(())
    } else {
        Err(match value_type {
            "int" | "integer" => "the value is not int or integer".to_owned(),
            "float" => "the value is not float".to_owned(),
            _ => "the value is not boolean".to_owned(),
        })
    }
}

/// Parses and validates a `twin/update` payload.
pub fn parse_update(payload: &[u8]) -> Result<TwinUpdate, Failure> {
    let v = payload_object(payload)?;
    let event_id = field(&v, "event_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let twins = match field(&v, "twin") {
        Some(Value::Object(t)) => t,
        Some(Value::Null) | None => return Err(Failure::bad("the update has no twin")),
        Some(_) => return Err(Failure::bad("twin must be a JSON object")),
    };
    let mut out = BTreeMap::new();
    for (name, t) in twins {
        if !key_ok(name) {
            return Err(Failure::bad(format!(
                "the twin key {name:?} is not 1 to 128 characters of a-z, A-Z, 0-9 and -_.,:/@#"
            )));
        }
        if t.is_null() {
            out.insert(name.clone(), None);
            continue;
        }
        if !t.is_object() {
            return Err(Failure::bad(format!("twin {name:?} must be a JSON object")));
        }
        let value_type = match field(t, "metadata") {
            None | Some(Value::Null) => None,
            Some(m @ Value::Object(_)) => match field(m, "type") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.to_ascii_lowercase()),
                Some(_) => {
                    return Err(Failure::bad(format!(
                        "twin {name:?}: metadata.type must be a string"
                    )));
                }
            },
            Some(_) => {
                return Err(Failure::bad(format!(
                    "twin {name:?}: metadata must be a JSON object"
                )));
            }
        };
        let side = |key: &str| -> Result<Option<String>, Failure> {
            match field(t, key) {
                None | Some(Value::Null) => Ok(None),
                Some(s @ Value::Object(_)) => match field(s, "value") {
                    Some(Value::String(v)) if value_ok(v) => Ok(Some(v.clone())),
                    Some(Value::String(_)) => Err(Failure::bad(format!(
                        "twin {name:?}: the {key} value is not up to 512 characters of a-z, \
                         A-Z, 0-9 and -_.,:/@#"
                    ))),
                    None | Some(Value::Null) => {
                        Err(Failure::bad(format!("twin {name:?}: {key} has no value")))
                    }
                    Some(_) => Err(Failure::bad(format!(
                        "twin {name:?}: the {key} value must be a string"
                    ))),
                },
                Some(_) => Err(Failure::bad(format!(
                    "twin {name:?}: {key} must be a JSON object"
                ))),
            }
        };
        let optional = match field(t, "optional") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                return Err(Failure::bad(format!(
                    "twin {name:?}: optional must be a boolean"
                )));
            }
        };
        out.insert(
            name.clone(),
            Some(TwinPatch {
                expected: side("expected")?,
                actual: side("actual")?,
                optional,
                value_type,
            }),
        );
    }
    Ok(TwinUpdate {
        event_id,
        twins: out,
    })
}

/// Applies an edge-originated update to `device` (all or nothing): every value present is
/// written with a new timestamp and its edge version + 1; a new twin starts at
/// `{"cloud":0,"edge":1}`, optional, type `string` unless given; `null` deletes an optional twin.
pub fn apply_update(
    device: &mut Device,
    update: &TwinUpdate,
    now: i64,
    new_event_id: &str,
) -> Result<UpdateOutcome, Failure> {
    // Validate everything against the current state first.
    for (name, patch) in &update.twins {
        let current = device.twins.get(name);
        match patch {
            None => {
                if current.is_some_and(|t| !t.optional) {
                    return Err(Failure::bad(format!(
                        "twin {name:?} is not optional and cannot be deleted"
                    )));
                }
            }
            Some(p) => {
                let ty = p
                    .value_type
                    .as_deref()
                    .or(current.map(|t| t.value_type.as_str()))
                    .unwrap_or("string");
                for v in [&p.expected, &p.actual].into_iter().flatten() {
                    check_type(ty, v)
                        .map_err(|reason| Failure::bad(format!("{name}: {reason}")))?;
                }
            }
        }
    }
    let mut result = Map::new();
    let mut document = Map::new();
    let mut sync = Map::new();
    for (name, patch) in &update.twins {
        let last = device.twins.get(name).cloned();
        match patch {
            None => {
                if let Some(last) = device.twins.remove(name) {
                    document.insert(
                        name.clone(),
                        json!({"last": last.to_json(), "current": null}),
                    );
                }
                result.insert(name.clone(), Value::Null);
            }
            Some(p) => {
                let twin = device
                    .twins
                    .entry(name.clone())
                    .or_insert_with(|| Twin::new(p.value_type.as_deref().unwrap_or("string")));
                if let Some(ty) = &p.value_type {
                    twin.value_type.clone_from(ty);
                }
                if let Some(o) = p.optional {
                    twin.optional = o;
                }
                if let Some(v) = &p.expected {
                    twin.expected = Some(Stamped {
                        value: v.clone(),
                        timestamp: now,
                    });
                    twin.expected_version.edge += 1;
                }
                if let Some(v) = &p.actual {
                    twin.actual = Some(Stamped {
                        value: v.clone(),
                        timestamp: now,
                    });
                    twin.actual_version.edge += 1;
                }
                result.insert(name.clone(), twin.to_json());
                document.insert(
                    name.clone(),
                    json!({"last": last.as_ref().map(Twin::to_json), "current": twin.to_json()}),
                );
                sync.insert(name.clone(), twin.to_sync_json());
            }
        }
    }
    Ok(UpdateOutcome {
        result: json!({"event_id": update.event_id, "timestamp": now, "twin": result}),
        document: json!({"event_id": update.event_id, "timestamp": now, "twin": document}),
        delta: delta(device, now, new_event_id),
        sync: (!sync.is_empty())
            .then(|| json!({"event_id": new_event_id, "timestamp": now, "twin": sync})),
    })
}

/// Sets the desired values the cloud's Device spec gives (`property → (value, type)`) as the
/// twins' expected values; a change bumps the cloud version. Whether anything changed.
pub fn apply_desired(
    device: &mut Device,
    desired: &BTreeMap<String, (String, Option<String>)>,
    now: i64,
) -> bool {
    let mut changed = false;
    for (name, (value, ty)) in desired {
        let twin = device
            .twins
            .entry(name.clone())
            .or_insert_with(|| Twin::new(ty.as_deref().unwrap_or("string")));
        if twin.expected.as_ref().is_some_and(|e| &e.value == value) {
            continue;
        }
        twin.expected = Some(Stamped {
            value: value.clone(),
            timestamp: now,
        });
        twin.expected_version.cloud += 1;
        changed = true;
    }
    changed
}

/// `twin/update/document` for what [`apply_desired`] changed (`before` → `after`): each changed
/// twin's `last` (null when new) and `current`, as KubeEdge publishes it for a cloud-side twin
/// change before the delta. `None` when nothing changed.
pub fn document(before: &Device, after: &Device, now: i64, event_id: &str) -> Option<Value> {
    let mut twins = Map::new();
    for (name, current) in &after.twins {
        let last = before.twins.get(name);
        if last == Some(current) {
            continue;
        }
        twins.insert(
            name.clone(),
            json!({"last": last.map(Twin::to_json), "current": current.to_json()}),
        );
    }
    (!twins.is_empty()).then(|| json!({"event_id": event_id, "timestamp": now, "twin": twins}))
}

/// The desired values of a Device object (`spec.properties[].desired`): property → (value,
/// `desired.metadata.type`). Properties without a non-empty valid value are left out.
pub fn desired_of(device_object: &Value) -> BTreeMap<String, (String, Option<String>)> {
    let mut out = BTreeMap::new();
    let props = field(device_object, "spec")
        .and_then(|s| field(s, "properties"))
        .and_then(Value::as_array);
    for p in props.into_iter().flatten() {
        let Some(name) = field(p, "name").and_then(Value::as_str) else {
            continue;
        };
        let desired = field(p, "desired");
        let Some(value) = desired
            .and_then(|d| field(d, "value"))
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty() && value_ok(v))
        else {
            continue;
        };
        let ty = desired
            .and_then(|d| field(d, "metadata"))
            .and_then(|m| field(m, "type"))
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .filter(|t| ["string", "int", "integer", "float", "boolean"].contains(&t.as_str()));
        if key_ok(name) {
            out.insert(name.to_owned(), (value.to_owned(), ty));
        }
    }
    out
}

/// `twin/update/delta`: every twin with a desired value, and the ones whose reported value
/// differs; `None` when none differs.
pub fn delta(device: &Device, now: i64, event_id: &str) -> Option<Value> {
    let mut twins = Map::new();
    let mut deltas = Map::new();
    for (name, t) in &device.twins {
        let Some(e) = t.expected.as_ref().filter(|e| !e.value.is_empty()) else {
            continue;
        };
        twins.insert(name.clone(), t.to_json());
        if t.actual.as_ref().is_none_or(|a| a.value != e.value) {
            deltas.insert(name.clone(), Value::String(e.value.clone()));
        }
    }
    (!deltas.is_empty())
        .then(|| json!({"event_id": event_id, "timestamp": now, "twin": twins, "delta": deltas}))
}

/// `twin/get/result`: every twin, or a 404 for an unknown device.
pub fn get_result(device: Option<&Device>, id: &str, event_id: &str, now: i64) -> Value {
    match device {
        Some(d) => {
            let twins: Map<String, Value> = d
                .twins
                .iter()
                .map(|(k, t)| (k.clone(), t.to_json()))
                .collect();
            json!({"event_id": event_id, "timestamp": now, "twin": twins})
        }
        None => Failure {
            code: 404,
            reason: format!("Device {id} not found while getting twin"),
        }
        .to_json(event_id, now),
    }
}

/// The device states KubeEdge accepts (lower case).
pub const STATES: [&str; 5] = ["online", "offline", "ok", "unknown", "unhealthy"];

/// Parses a `state/update` payload: the state, lower case, if it is one of [`STATES`]
/// (`Ok(None)` for another state: ignored, as KubeEdge does).
pub fn parse_state(payload: &[u8]) -> Result<Option<String>, Failure> {
    let v = payload_object(payload)?;
    match field(&v, "state") {
        Some(Value::String(s)) => {
            let s = s.to_ascii_lowercase();
            Ok(STATES.contains(&s.as_str()).then_some(s))
        }
        _ => Err(Failure::bad("the state update has no state string")),
    }
}

/// Sets a device's state: `last_online` becomes `now_rfc3339` for online/ok and is cleared
/// otherwise. Returns the `/state/update/result` payload (also what is synced to the cloud).
pub fn apply_state(
    device: &mut Device,
    state: &str,
    now: i64,
    now_rfc3339: &str,
    event_id: &str,
) -> Value {
    device.state = state.to_owned();
    device.last_online = if state == "online" || state == "ok" {
        now_rfc3339.to_owned()
    } else {
        String::new()
    };
    json!({"event_id": event_id, "timestamp": now, "device": {
        "name": device.name, "state": device.state, "lastOnlineTime": device.last_online}})
}

/// `membership/get/result`: the node's devices (no twins).
pub fn membership_result<'a>(
    devices: impl IntoIterator<Item = &'a Device>,
    event_id: &str,
    now: i64,
) -> Value {
    let list: Vec<Value> = devices
        .into_iter()
        .map(|d| {
            json!({"id": d.id, "name": d.name, "description": d.description,
                        "state": d.state, "last_online": d.last_online})
        })
        .collect();
    json!({"event_id": event_id, "timestamp": now, "devices": list})
}

/// One device of a membership message (`{"id","name","description"}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// `<ns>/<name>`.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
}

impl Member {
    /// `{"id","name","description"}`.
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "name": self.name, "description": self.description})
    }
}

/// A membership message from the cloud: an `update` (`added_devices`, `removed_devices`) or a
/// `detail` answer (`devices`: the whole set).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    /// Devices added (update).
    pub added: Vec<Member>,
    /// Devices removed (update).
    pub removed: Vec<Member>,
    /// The whole set (detail), when given.
    pub all: Option<Vec<Member>>,
}

/// Parses a membership message's content.
pub fn parse_membership(content: &[u8]) -> Result<Membership, String> {
    let v: Value = serde_json::from_slice(content).map_err(|e| format!("not JSON: {e}"))?;
    // A detail answer may come as a JSON string holding the object.
    let v = match v {
        Value::String(s) => serde_json::from_str(&s).map_err(|e| format!("not JSON: {e}"))?,
        v => v,
    };
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    let members = |key: &str| -> Result<Option<Vec<Member>>, String> {
        match field(&v, key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|m| {
                    let id = field(m, "id").and_then(Value::as_str).unwrap_or_default();
                    let mut parts = id.split('/');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(ns), Some(name), None) if !ns.is_empty() && !name.is_empty() => {
                            Ok(Member {
                                id: id.to_owned(),
                                name: field(m, "name")
                                    .and_then(Value::as_str)
                                    .unwrap_or(name)
                                    .to_owned(),
                                description: field(m, "description")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned(),
                            })
                        }
                        _ => Err(format!("{key}: device id {id:?} is not <namespace>/<name>")),
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(format!("{key} must be an array")),
        }
    };
    Ok(Membership {
        added: members("added_devices")?.unwrap_or_default(),
        removed: members("removed_devices")?.unwrap_or_default(),
        all: members("devices")?,
    })
}

/// `membership/updated` as published on the node topic.
pub fn membership_updated(added: &[Member], removed: &[Member], event_id: &str, now: i64) -> Value {
    let list = |m: &[Member]| {
        if m.is_empty() {
            Value::Null
        } else {
            Value::Array(m.iter().map(Member::to_json).collect())
        }
    };
    json!({"event_id": event_id, "timestamp": now,
           "added_devices": list(added), "removed_devices": list(removed)})
}

/// The `membership/detail` request content sent to the cloud on every connect (a JSON string in
/// KubeEdge; the JSON text here).
pub fn detail_request(node: &str, event_id: &str, now: i64) -> String {
    json!({"event_type": "group_membership_event", "event_id": event_id, "group_id": node,
           "operation": "detail", "timestamp": now})
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        Device::new("default/thermo-1", "thermo-1", "")
    }

    #[test]
    fn a_report_creates_a_twin_and_answers_in_kubeedge_shapes() {
        let mut d = device();
        let upd = parse_update(
            br#"{"event_id":"e-42","timestamp":1,"twin":{"temperature":{"actual":{"value":"24"},"metadata":{"type":"int"}}}}"#,
        )
        .unwrap();
        let out = apply_update(&mut d, &upd, 100, "n-1").unwrap();
        assert_eq!(
            out.result,
            json!({"event_id":"e-42","timestamp":100,"twin":{"temperature":{
                "actual":{"value":"24","metadata":{"timestamp":100}},"optional":true,
                "metadata":{"type":"int"}}}})
        );
        assert_eq!(out.document["twin"]["temperature"]["last"], Value::Null);
        assert_eq!(
            out.document["twin"]["temperature"]["current"]["actual"]["value"],
            "24"
        );
        assert_eq!(out.delta, None);
        let sync = out.sync.unwrap();
        assert_eq!(
            sync["twin"]["temperature"]["actual_version"],
            json!({"cloud":0,"edge":1})
        );
        assert_eq!(sync["event_id"], "n-1");
        // Again: an identical report still counts (edge version 2), and last is the old one.
        let out = apply_update(&mut d, &upd, 200, "n-2").unwrap();
        assert_eq!(
            out.sync.unwrap()["twin"]["temperature"]["actual_version"]["edge"],
            2
        );
        assert_eq!(
            out.document["twin"]["temperature"]["last"]["actual"]["metadata"]["timestamp"],
            100
        );
    }

    #[test]
    fn desired_from_the_cloud_makes_a_delta_until_reported() {
        let mut d = device();
        let obj = json!({"spec":{"properties":[
            {"name":"setpoint","desired":{"value":"25","metadata":{"type":"int"}}},
            {"name":"empty","desired":{"value":""}}]}});
        let desired = desired_of(&obj);
        assert_eq!(desired.len(), 1);
        let before = d.clone();
        assert!(apply_desired(&mut d, &desired, 10));
        let doc = document(&before, &d, 10, "doc").unwrap();
        assert_eq!(doc["twin"]["setpoint"]["last"], Value::Null, "a new twin");
        assert_eq!(
            doc["twin"]["setpoint"]["current"]["expected"]["value"],
            "25"
        );
        assert_eq!(document(&d, &d, 10, "none"), None, "nothing changed");
        assert!(
            !apply_desired(&mut d, &desired, 11),
            "same value: no change"
        );
        assert_eq!(d.twins["setpoint"].expected_version.cloud, 1);
        assert_eq!(d.twins["setpoint"].value_type, "int");
        let delta = delta(&d, 12, "x").unwrap();
        assert_eq!(delta["delta"], json!({"setpoint":"25"}));
        assert_eq!(delta["twin"]["setpoint"]["expected"]["value"], "25");
        let upd =
            parse_update(br#"{"event_id":"r","twin":{"setpoint":{"actual":{"value":"25"}}}}"#)
                .unwrap();
        let out = apply_update(&mut d, &upd, 13, "y").unwrap();
        assert_eq!(out.delta, None, "reported equals desired");
    }

    #[test]
    fn bad_updates_are_refused_whole() {
        let mut d = device();
        let refuse = |d: &mut Device, p: &str| {
            let r = parse_update(p.as_bytes()).and_then(|u| apply_update(d, &u, 1, "n"));
            r.unwrap_err()
        };
        assert_eq!(refuse(&mut d, "not json").code, 400);
        assert_eq!(refuse(&mut d, "[1]").code, 400);
        assert_eq!(refuse(&mut d, r#"{"twin":{"a b":{}}}"#).code, 400);
        // M19: no value in actual.
        let f = refuse(&mut d, r#"{"twin":{"t":{"actual":{}}}}"#);
        assert!(f.reason.contains("has no value"), "{f:?}");
        assert_eq!(
            refuse(&mut d, r#"{"twin":{"t":{"actual":{"value":"x y"}}}}"#).code,
            400
        );
        let f = refuse(
            &mut d,
            r#"{"twin":{"ok":{"actual":{"value":"1"}},"t":{"actual":{"value":"x"},"metadata":{"type":"int"}}}}"#,
        );
        assert!(f.reason.contains("not int or integer"), "{f:?}");
        assert!(d.twins.is_empty(), "nothing applied");
        let f = refuse(
            &mut d,
            r#"{"twin":{"t":{"actual":{"value":"1.5"},"metadata":{"type":"double"}}}}"#,
        );
        assert!(f.reason.contains("not supported"), "{f:?}");
    }

    #[test]
    fn keys_match_in_any_case_and_states_are_checked() {
        assert_eq!(
            parse_state(br#"{"State":"Online"}"#).unwrap(),
            Some("online".into())
        );
        assert_eq!(parse_state(br#"{"state":"dancing"}"#).unwrap(), None);
        assert_eq!(parse_state(br#"{"event_id":"x"}"#).unwrap_err().code, 400);
        let upd =
            parse_update(br#"{"Event_ID":"e","Twin":{"t":{"Actual":{"Value":"1"}}}}"#).unwrap();
        assert_eq!(upd.event_id, "e");
        assert_eq!(
            upd.twins["t"].as_ref().unwrap().actual.as_deref(),
            Some("1")
        );
        let mut d = device();
        let r = apply_state(&mut d, "online", 5, "2026-01-01T00:00:00Z", "s");
        assert_eq!(
            r,
            json!({"event_id":"s","timestamp":5,"device":{"name":"thermo-1","state":"online",
                "lastOnlineTime":"2026-01-01T00:00:00Z"}})
        );
        apply_state(&mut d, "offline", 6, "2026-01-01T00:00:01Z", "s");
        assert_eq!(d.last_online, "");
    }

    #[test]
    fn deletes_need_optional_twins() {
        let mut d = device();
        let mut t = Twin::new("string");
        t.optional = false;
        d.twins.insert("fixed".into(), t);
        d.twins.insert("loose".into(), Twin::new("string"));
        let del = |name: &str| {
            parse_update(format!(r#"{{"twin":{{"{name}":null}}}}"#).as_bytes()).unwrap()
        };
        assert_eq!(
            apply_update(&mut d, &del("fixed"), 1, "n")
                .unwrap_err()
                .code,
            400
        );
        let out = apply_update(&mut d, &del("loose"), 1, "n").unwrap();
        assert_eq!(out.document["twin"]["loose"]["current"], Value::Null);
        assert!(!d.twins.contains_key("loose"));
    }

    #[test]
    fn get_and_membership_payloads() {
        let mut d = device();
        d.twins.insert("t".into(), Twin::new("string"));
        let r = get_result(Some(&d), &d.id, "g", 1);
        assert_eq!(
            r["twin"]["t"],
            json!({"optional":true,"metadata":{"type":"string"}})
        );
        let r = get_result(None, "default/x", "g", 1);
        assert_eq!(r["code"], 404);
        assert_eq!(r["reason"], "Device default/x not found while getting twin");
        let m = parse_membership(
            br#"{"event_id":"1","timestamp":1,"added_devices":[{"id":"default/a","name":"a","description":"d"}],"removed_devices":null}"#,
        )
        .unwrap();
        assert_eq!(m.added[0].description, "d");
        assert!(m.removed.is_empty() && m.all.is_none());
        let detail = serde_json::to_vec(&Value::String(
            r#"{"event_id":"1","devices":[{"id":"ns/b"}]}"#.into(),
        ))
        .unwrap();
        assert_eq!(parse_membership(&detail).unwrap().all.unwrap()[0].name, "b");
        assert!(parse_membership(br#"{"added_devices":[{"id":"nope"}]}"#).is_err());
        let u = membership_updated(&m.added, &[], "e", 2);
        assert_eq!(u["removed_devices"], Value::Null);
        assert_eq!(u["added_devices"][0]["id"], "default/a");
    }
}
