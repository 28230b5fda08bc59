//! The part of a Kubernetes Pod edged acts on, read from the object metamanager stores (the JSON
//! the cloud sent). Fields edged does not implement are ignored here and listed in the README.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// A pod as edged runs it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Pod {
    /// `metadata`.
    pub metadata: Metadata,
    /// `spec`.
    pub spec: PodSpec,
}

/// `metadata` of a pod.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Metadata {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// The uid: the pod's identity at the runtime (a pod recreated under the same name is
    /// another pod).
    pub uid: String,
    /// Set when the pod is being deleted (graceful deletion).
    pub deletion_timestamp: Option<String>,
    /// The grace period of a deletion in progress.
    pub deletion_grace_period_seconds: Option<i64>,
}

/// `spec` of a pod.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    /// The node it is bound to.
    pub node_name: String,
    /// `Always` (default), `OnFailure` or `Never`.
    pub restart_policy: Option<String>,
    /// Whether the pod shares the node's network namespace.
    pub host_network: bool,
    /// Seconds between SIGTERM and SIGKILL (default 30).
    pub termination_grace_period_seconds: Option<i64>,
    /// Run in order to completion before the containers.
    pub init_containers: Vec<Container>,
    /// The pod's containers.
    pub containers: Vec<Container>,
    /// Volumes (configMap, secret, emptyDir are materialised).
    pub volumes: Vec<Volume>,
    /// The sandbox's host name (default: the pod's name).
    pub hostname: Option<String>,
}

/// A container of the spec.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Container {
    /// Name, unique in the pod.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Replaces the image's entrypoint.
    pub command: Vec<String>,
    /// Replaces the image's cmd.
    pub args: Vec<String>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// Environment variables.
    pub env: Vec<EnvVar>,
    /// Whole configmaps or secrets as environment variables.
    pub env_from: Vec<EnvFromSource>,
    /// Limits and requests.
    pub resources: Resources,
    /// Volumes mounted.
    pub volume_mounts: Vec<VolumeMount>,
    /// `Always`, `IfNotPresent`, `Never`.
    pub image_pull_policy: Option<String>,
    /// Liveness probe.
    pub liveness_probe: Option<Probe>,
    /// Readiness probe.
    pub readiness_probe: Option<Probe>,
}

/// A probe (exec only for now).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Probe {
    /// `exec.command`.
    pub exec: Option<ExecAction>,
    /// Seconds after start before the first probe.
    pub initial_delay_seconds: u64,
    /// Seconds between probes (default 10).
    pub period_seconds: Option<u64>,
    /// Seconds a probe may take (default 1).
    pub timeout_seconds: Option<i64>,
    /// Failures in a row that count (default 3).
    pub failure_threshold: Option<u32>,
}

/// `exec` of a probe.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ExecAction {
    /// The command run in the container.
    pub command: Vec<String>,
}

/// One environment variable.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EnvVar {
    /// Name.
    pub name: String,
    /// A literal value.
    pub value: Option<String>,
    /// A value from a configmap or secret key.
    pub value_from: Option<EnvVarSource>,
}

/// `valueFrom` of an environment variable.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EnvVarSource {
    /// A configmap's key.
    pub config_map_key_ref: Option<KeyRef>,
    /// A secret's key.
    pub secret_key_ref: Option<KeyRef>,
}

/// A key of a configmap or secret.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct KeyRef {
    /// The object's name.
    pub name: String,
    /// The key.
    pub key: String,
    /// Whether a missing object or key is fine.
    pub optional: Option<bool>,
}

/// `envFrom` item.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EnvFromSource {
    /// Prepended to every key.
    pub prefix: Option<String>,
    /// A whole configmap.
    pub config_map_ref: Option<NameRef>,
    /// A whole secret.
    pub secret_ref: Option<NameRef>,
}

/// A reference by name.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct NameRef {
    /// The object's name.
    pub name: String,
    /// Whether a missing object is fine.
    pub optional: Option<bool>,
}

/// `resources` of a container.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// `cpu`, `memory` limits (Kubernetes quantities).
    pub limits: BTreeMap<String, Value>,
    /// `cpu` request (CPU shares).
    pub requests: BTreeMap<String, Value>,
}

/// A volume mount.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VolumeMount {
    /// The volume's name.
    pub name: String,
    /// Where in the container.
    pub mount_path: String,
    /// Read-only.
    pub read_only: bool,
}

/// A volume of the pod.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Volume {
    /// Name.
    pub name: String,
    /// A configmap's keys as files.
    pub config_map: Option<ObjectVolume>,
    /// A secret's keys as files (`secretName`).
    pub secret: Option<ObjectVolume>,
    /// A directory that lives as long as the pod.
    pub empty_dir: Option<Value>,
}

/// `configMap` / `secret` volume source.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ObjectVolume {
    /// The configmap's name.
    pub name: Option<String>,
    /// The secret's name.
    pub secret_name: Option<String>,
    /// Whether a missing object is fine.
    pub optional: Option<bool>,
}

impl ObjectVolume {
    /// The referenced object's name.
    pub fn object_name(&self) -> &str {
        self.name
            .as_deref()
            .or(self.secret_name.as_deref())
            .unwrap_or_default()
    }
}

/// How a pod's containers restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Always (the default).
    Always,
    /// After a non-zero exit.
    OnFailure,
    /// Never.
    Never,
}

impl Pod {
    /// Reads a stored pod; an error names what is wrong.
    pub fn from_json(json: &str) -> Result<Self, String> {
        let pod: Self = serde_json::from_str(json).map_err(|e| format!("not a pod: {e}"))?;
        if pod.metadata.uid.is_empty() || pod.metadata.name.is_empty() {
            return Err("a pod without metadata.name or metadata.uid".into());
        }
        if pod.spec.containers.is_empty() {
            return Err("a pod without containers".into());
        }
        Ok(pod)
    }

    /// Its restart policy.
    pub fn restart_policy(&self) -> RestartPolicy {
        match self.spec.restart_policy.as_deref() {
            Some("OnFailure") => RestartPolicy::OnFailure,
            Some("Never") => RestartPolicy::Never,
            _ => RestartPolicy::Always,
        }
    }

    /// Seconds its containers get between SIGTERM and SIGKILL.
    pub fn grace_seconds(&self) -> i64 {
        self.metadata
            .deletion_grace_period_seconds
            .or(self.spec.termination_grace_period_seconds)
            .unwrap_or(30)
            .max(0)
    }

    /// Whether the pod is being deleted.
    pub fn deleting(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }
}

/// A Kubernetes quantity as a number of milli-units (`100m` → 100, `2` → 2000, `64Mi` →
/// 64 Mi × 1000); `None` when it is not one.
pub fn quantity_millis(q: &Value) -> Option<u128> {
    let text = match q {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    let frac3: String = frac.chars().chain("000".chars()).take(3).collect();
    let millis: u128 = whole.parse::<u128>().unwrap_or(0) * 1000 + frac3.parse::<u128>().ok()?;
    let factor: u128 = match suffix {
        "" => 1000,
        "m" => return (frac.is_empty()).then_some(whole.parse().ok()?),
        "k" => 1000 * 1000,
        "M" => 1000 * 1_000_000,
        "G" => 1000 * 1_000_000_000,
        "T" => 1000 * 1_000_000_000_000,
        "Ki" => 1000 * 1024,
        "Mi" => 1000 * 1024 * 1024,
        "Gi" => 1000 * 1024 * 1024 * 1024,
        "Ti" => 1000 * 1024 * 1024 * 1024 * 1024,
        _ => return None,
    };
    Some(millis * factor / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities() {
        assert_eq!(quantity_millis(&json!("100m")), Some(100));
        assert_eq!(quantity_millis(&json!("2")), Some(2000));
        assert_eq!(quantity_millis(&json!(1)), Some(1000));
        assert_eq!(quantity_millis(&json!("0.5")), Some(500));
        assert_eq!(
            quantity_millis(&json!("64Mi")),
            Some(64 * 1024 * 1024 * 1000)
        );
        assert_eq!(quantity_millis(&json!("1G")), Some(1_000_000_000_000));
        assert_eq!(quantity_millis(&json!("lots")), None);
        assert_eq!(quantity_millis(&json!("5x")), None);
    }

    #[test]
    fn a_pod_and_what_is_wrong_with_others() {
        let pod = Pod::from_json(
            &json!({"metadata": {"name": "p", "namespace": "default", "uid": "u1"},
                    "spec": {"restartPolicy": "OnFailure", "containers": [
                        {"name": "c", "image": "busybox", "command": ["sh", "-c", "echo hi"]}]}})
            .to_string(),
        )
        .unwrap();
        assert_eq!(pod.restart_policy(), RestartPolicy::OnFailure);
        assert_eq!(pod.grace_seconds(), 30);
        assert_eq!(pod.spec.containers[0].command, ["sh", "-c", "echo hi"]);
        assert!(Pod::from_json("7").unwrap_err().contains("not a pod"));
        assert!(
            Pod::from_json(r#"{"metadata": {"name": "p", "uid": "u"}}"#)
                .unwrap_err()
                .contains("without containers")
        );
    }
}
