//! What devicecontroller decides, without I/O (MODULES.md §6.2, §6.3): which node each device
//! belongs to, the membership messages' contents, and how an edge's report becomes the
//! device's status.
//!
//! Reported twins are merged into the existing status by property name, writing into the stored
//! element, so a twin reported for the first time is kept (KubeEdge's M13 lost it); only twins
//! whose name is one of the Device's `spec.properties` are taken; desired values are never
//! written from the edge (#4166).

use serde_json::{Map, Value, json};

/// The upstream messages devicecontroller handles, parsed from the resource by segment (M18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// `device/<ns>/<name>/twin/edge_updated`.
    TwinReported {
        /// Namespace.
        namespace: String,
        /// Device name.
        name: String,
    },
    /// `device/<ns>/<name>/state/update`.
    State {
        /// Namespace.
        namespace: String,
        /// Device name.
        name: String,
    },
    /// `membership/detail`: the node asks for its full device list.
    MembershipDetail,
}

/// Parses an upstream resource from devicetwin.
pub fn parse_resource(resource: &str) -> Option<Upstream> {
    if resource == "membership/detail" {
        return Some(Upstream::MembershipDetail);
    }
    let parts: Vec<&str> = resource.split('/').collect();
    match parts.as_slice() {
        ["device", ns, name, "twin", "edge_updated"] if !ns.is_empty() && !name.is_empty() => {
            Some(Upstream::TwinReported {
                namespace: (*ns).to_owned(),
                name: (*name).to_owned(),
            })
        }
        ["device", ns, name, "state", "update"] if !ns.is_empty() && !name.is_empty() => {
            Some(Upstream::State {
                namespace: (*ns).to_owned(),
                name: (*name).to_owned(),
            })
        }
        _ => None,
    }
}

/// The content as a JSON object: an object, or a string or bytes holding one's JSON text.
pub fn content_object(content: &[u8]) -> Option<Value> {
    let v: Value = serde_json::from_slice(content).ok()?;
    let v = match v {
        Value::String(s) => serde_json::from_str(&s).ok()?,
        v => v,
    };
    v.is_object().then_some(v)
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    let o = v.as_object()?;
    o.get(key).or_else(|| {
        o.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// The property names a Device declares.
pub fn property_names(device: &Value) -> Vec<String> {
    device["spec"]["properties"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// Merges an `edge_updated` report into `status` (a DeviceStatus `status`): for each reported
/// twin named in `properties`, `reported` from `actual` and `observedDesired` from `expected`
/// (value, metadata `timestamp` as a decimal string and `type`). Returns the new status and how
/// many twins were taken.
pub fn merge_reported(status: &Value, report: &Value, properties: &[String]) -> (Value, usize) {
    let mut status = match status {
        Value::Object(_) => status.clone(),
        _ => json!({}),
    };
    let mut twins: Vec<Value> = status["twins"].as_array().cloned().unwrap_or_default();
    let mut taken = 0;
    let reported = field(report, "twin").and_then(Value::as_object);
    for (name, twin) in reported.into_iter().flatten() {
        if !properties.iter().any(|p| p == name) {
            continue;
        }
        let ty = field(twin, "metadata")
            .and_then(|m| field(m, "type"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let side = |key: &str| -> Option<Value> {
            let s = field(twin, key)?;
            let value = field(s, "value")?.as_str()?;
            let ts = field(s, "metadata")
                .and_then(|m| field(m, "timestamp"))
                .map(|t| match t {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            Some(json!({"value": value, "metadata": {"timestamp": ts, "type": ty}}))
        };
        let (reported, desired) = (side("actual"), side("expected"));
        if reported.is_none() && desired.is_none() {
            continue;
        }
        let pos = twins
            .iter()
            .position(|t| t["propertyName"].as_str() == Some(name.as_str()));
        let entry = match pos {
            Some(i) => &mut twins[i],
            None => {
                twins.push(json!({"propertyName": name}));
                twins.last_mut().expect("just pushed")
            }
        };
        if let Some(r) = reported {
            entry["reported"] = r;
        }
        if let Some(d) = desired {
            entry["observedDesired"] = d;
        }
        taken += 1;
    }
    status["twins"] = Value::Array(twins);
    (status, taken)
}

/// Sets `state` and `lastOnlineTime` from a `state/update` report (`{"device":{"state",
/// "lastOnlineTime"}}`); `None` when the report has no state.
pub fn merge_state(status: &Value, report: &Value) -> Option<Value> {
    let device = field(report, "device")?;
    let state = field(device, "state")?.as_str()?;
    let mut status = match status {
        Value::Object(_) => status.clone(),
        _ => json!({}),
    };
    status["state"] = json!(state);
    let last = field(device, "lastOnlineTime")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !last.is_empty() {
        status["lastOnlineTime"] = json!(last);
    }
    Some(status)
}

/// One device of a membership message: `{"id":"<ns>/<name>","name","description"}` (the
/// description from the label `description`, as KubeEdge takes it).
pub fn member(namespace: &str, name: &str, device: &Value) -> Value {
    let description = device["metadata"]["labels"]["description"]
        .as_str()
        .unwrap_or_default();
    json!({"id": format!("{namespace}/{name}"), "name": name, "description": description})
}

/// A membership `update`'s content.
pub fn membership_update(
    added: Vec<Value>,
    removed: Vec<Value>,
    event_id: &str,
    now: i64,
) -> Value {
    let list = |v: Vec<Value>| {
        if v.is_empty() {
            Value::Null
        } else {
            Value::Array(v)
        }
    };
    json!({"event_id": event_id, "timestamp": now,
           "added_devices": list(added), "removed_devices": list(removed)})
}

/// The `membership/detail` answer's content: the node's whole device list.
pub fn membership_detail(devices: Vec<Value>, event_id: &str, now: i64) -> Value {
    let mut m = Map::new();
    m.insert("event_id".into(), json!(event_id));
    m.insert("timestamp".into(), json!(now));
    m.insert("devices".into(), Value::Array(devices));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_parse_by_segment() {
        assert_eq!(
            parse_resource("device/default/thermo-1/twin/edge_updated"),
            Some(Upstream::TwinReported {
                namespace: "default".into(),
                name: "thermo-1".into()
            })
        );
        assert_eq!(
            parse_resource("device/twin/state/state/update"),
            Some(Upstream::State {
                namespace: "twin".into(),
                name: "state".into()
            })
        );
        assert_eq!(
            parse_resource("membership/detail"),
            Some(Upstream::MembershipDetail)
        );
        assert_eq!(parse_resource("device/a/twin/edge_updated"), None);
        assert_eq!(parse_resource("default/podstatus/p"), None);
    }

    #[test]
    fn the_first_report_is_kept_and_only_declared_properties_are_taken() {
        let props = vec!["temperature".to_owned(), "setpoint".to_owned()];
        let report = json!({"event_id":"e","timestamp":1,"twin":{
            "temperature":{"actual":{"value":"24","metadata":{"timestamp":1785999600101_i64}},
                           "metadata":{"type":"int"},"actual_version":{"cloud":0,"edge":1}},
            "undeclared":{"actual":{"value":"1"}}}});
        let (status, taken) = merge_reported(&json!({}), &report, &props);
        assert_eq!(taken, 1);
        assert_eq!(
            status["twins"],
            json!([{"propertyName":"temperature",
                    "reported":{"value":"24","metadata":{"timestamp":"1785999600101","type":"int"}}}])
        );
        // A later report updates the same element; another twin is appended.
        let report = json!({"twin":{
            "temperature":{"actual":{"value":"25","metadata":{"timestamp":2}}},
            "setpoint":{"expected":{"value":"26","metadata":{"timestamp":3}},"metadata":{"type":"int"}}}});
        let (status, taken) = merge_reported(&status, &report, &props);
        assert_eq!(taken, 2);
        let twins = status["twins"].as_array().unwrap();
        assert_eq!(twins.len(), 2);
        assert_eq!(twins[0]["reported"]["value"], "25");
        assert_eq!(twins[1]["propertyName"], "setpoint");
        assert_eq!(twins[1]["observedDesired"]["value"], "26");
        assert!(twins[1].get("reported").is_none());
    }

    #[test]
    fn state_reports_set_state_and_last_online() {
        let report = content_object(
            &serde_json::to_vec(&json!(
                r#"{"event_id":"x","timestamp":1,"device":{"name":"d","state":"online","lastOnlineTime":"2026-01-01T00:00:00Z"}}"#
            ))
            .unwrap(),
        )
        .unwrap();
        let s = merge_state(&json!({"twins": []}), &report).unwrap();
        assert_eq!(s["state"], "online");
        assert_eq!(s["lastOnlineTime"], "2026-01-01T00:00:00Z");
        assert_eq!(s["twins"], json!([]));
        assert!(merge_state(&json!({}), &json!({"device": {}})).is_none());
    }
}
