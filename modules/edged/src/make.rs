//! What a pod's spec becomes at the runtime: the sandbox's and containers' CRI configs,
//! environment variables resolved from the node's configmaps and secrets, and configmap / secret
//! volumes written as files under `root-dir/pods/<uid>/volumes/<name>`. Objects come from
//! metamanager's store (through [`Objects`]), so this works offline.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::Value;

use crate::cri::{LABEL_CONTAINER_NAME, LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID, api};
use crate::pod::{Container, Pod, quantity_millis};

/// The node's configmaps and secrets by metamanager key (`{ns}/configmap/{name}`).
pub trait Objects {
    /// The object stored under `key`, if any.
    fn object(&self, key: &str) -> Option<Value>;
}

impl Objects for metamanager::store::MetaStore {
    fn object(&self, key: &str) -> Option<Value> {
        self.get(key)
            .ok()
            .flatten()
            .and_then(|o| serde_json::from_str(&o.value).ok())
    }
}

impl Objects for BTreeMap<String, Value> {
    fn object(&self, key: &str) -> Option<Value> {
        self.get(key).cloned()
    }
}

/// A configmap's or secret's data as text (a secret's values base64-decoded).
fn data_of(
    objects: &dyn Objects,
    namespace: &str,
    kind: &str,
    name: &str,
) -> Option<BTreeMap<String, Vec<u8>>> {
    let object = objects.object(&format!("{namespace}/{kind}/{name}"))?;
    let mut data = BTreeMap::new();
    if let Some(map) = object["data"].as_object() {
        for (k, v) in map {
            let text = v.as_str().unwrap_or_default();
            let bytes = if kind == "secret" {
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .unwrap_or_else(|_| text.as_bytes().to_vec())
            } else {
                text.as_bytes().to_vec()
            };
            data.insert(k.clone(), bytes);
        }
    }
    if let Some(map) = object["stringData"].as_object() {
        for (k, v) in map {
            data.insert(
                k.clone(),
                v.as_str().unwrap_or_default().as_bytes().to_vec(),
            );
        }
    }
    Some(data)
}

/// The container's environment: `envFrom` first, then `env` (later wins, as in Kubernetes).
/// A missing object or key that is not optional is an error naming it.
pub fn environment(
    pod: &Pod,
    c: &Container,
    objects: &dyn Objects,
) -> Result<Vec<(String, String)>, String> {
    let ns = &pod.metadata.namespace;
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |k: String, v: String, env: &mut Vec<(String, String)>| {
        env.retain(|(name, _)| *name != k);
        env.push((k, v));
    };
    for from in &c.env_from {
        let (kind, r) = match (&from.config_map_ref, &from.secret_ref) {
            (Some(r), _) => ("configmap", r),
            (None, Some(r)) => ("secret", r),
            (None, None) => continue,
        };
        match data_of(objects, ns, kind, &r.name) {
            Some(data) => {
                for (k, v) in data {
                    let key = format!("{}{k}", from.prefix.as_deref().unwrap_or_default());
                    set(key, String::from_utf8_lossy(&v).into_owned(), &mut env);
                }
            }
            None if r.optional == Some(true) => {}
            None => return Err(format!("{kind} {ns:?}/{:?} not found", r.name)),
        }
    }
    for var in &c.env {
        if let Some(value) = &var.value {
            set(var.name.clone(), value.clone(), &mut env);
            continue;
        }
        let Some(from) = &var.value_from else {
            set(var.name.clone(), String::new(), &mut env);
            continue;
        };
        let (kind, r) = match (&from.config_map_key_ref, &from.secret_key_ref) {
            (Some(r), _) => ("configmap", r),
            (None, Some(r)) => ("secret", r),
            (None, None) => continue,
        };
        match data_of(objects, ns, kind, &r.name).and_then(|d| d.get(&r.key).cloned()) {
            Some(v) => set(
                var.name.clone(),
                String::from_utf8_lossy(&v).into_owned(),
                &mut env,
            ),
            None if r.optional == Some(true) => {}
            None => {
                return Err(format!(
                    "key {:?} of {kind} {ns:?}/{:?} not found (env {})",
                    r.key, r.name, var.name
                ));
            }
        }
    }
    Ok(env)
}

/// The pod's directory under the root.
pub fn pod_dir(root: &Path, uid: &str) -> PathBuf {
    root.join("pods").join(uid)
}

/// Writes the pod's configmap and secret volumes as files (one per key; rewritten only when
/// changed, so a configmap update reaches running containers) and creates emptyDirs. Returns
/// each volume's host directory.
pub fn volumes(
    pod: &Pod,
    root: &Path,
    objects: &dyn Objects,
) -> Result<BTreeMap<String, PathBuf>, String> {
    let base = pod_dir(root, &pod.metadata.uid).join("volumes");
    let mut dirs = BTreeMap::new();
    for v in &pod.spec.volumes {
        let dir = base.join(&v.name);
        let source = match (&v.config_map, &v.secret) {
            (Some(s), _) => Some(("configmap", s)),
            (None, Some(s)) => Some(("secret", s)),
            (None, None) => None,
        };
        if source.is_none() && v.empty_dir.is_none() {
            continue;
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("volume {:?}: {e}", v.name))?;
        if let Some((kind, s)) = source {
            let data = match data_of(objects, &pod.metadata.namespace, kind, s.object_name()) {
                Some(d) => d,
                None if s.optional == Some(true) => BTreeMap::new(),
                None => {
                    return Err(format!(
                        "volume {:?}: {kind} {:?}/{:?} not found",
                        v.name,
                        pod.metadata.namespace,
                        s.object_name()
                    ));
                }
            };
            write_files(&dir, &data).map_err(|e| format!("volume {:?}: {e}", v.name))?;
        }
        dirs.insert(v.name.clone(), dir);
    }
    Ok(dirs)
}

/// `dir` holds exactly `data`'s keys as files; each changed file replaced atomically.
fn write_files(dir: &Path, data: &BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
    for (key, bytes) in data {
        if key.contains('/') || key.starts_with('.') || key.is_empty() {
            continue;
        }
        let path = dir.join(key);
        if std::fs::read(&path).is_ok_and(|old| old == *bytes) {
            continue;
        }
        let tmp = dir.join(format!(".{key}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)?;
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !data.contains_key(&name) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn labels(pod: &Pod) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_POD_UID.to_owned(), pod.metadata.uid.clone()),
        (LABEL_POD_NAME.to_owned(), pod.metadata.name.clone()),
        (
            LABEL_POD_NAMESPACE.to_owned(),
            pod.metadata.namespace.clone(),
        ),
    ])
}

/// The sandbox's config.
pub fn sandbox_config(pod: &Pod, attempt: u32, root: &Path) -> api::PodSandboxConfig {
    let network = if pod.spec.host_network {
        api::NamespaceMode::Node
    } else {
        api::NamespaceMode::Pod
    };
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            namespace: pod.metadata.namespace.clone(),
            attempt,
        }),
        hostname: if pod.spec.host_network {
            String::new()
        } else {
            pod.spec
                .hostname
                .clone()
                .unwrap_or_else(|| pod.metadata.name.clone())
        },
        log_directory: pod_dir(root, &pod.metadata.uid)
            .join("logs")
            .to_string_lossy()
            .into_owned(),
        labels: labels(pod),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: network as i32,
                    pid: api::NamespaceMode::Container as i32,
                    ipc: api::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The log file of container `name`'s instance `attempt`, relative to the sandbox's log
/// directory (kubelet's layout).
pub fn log_path(name: &str, attempt: u32) -> String {
    format!("{name}/{attempt}.log")
}

/// A container's config; an error when its environment or mounts cannot be made.
pub fn container_config(
    pod: &Pod,
    c: &Container,
    attempt: u32,
    objects: &dyn Objects,
    volume_dirs: &BTreeMap<String, PathBuf>,
) -> Result<api::ContainerConfig, String> {
    let envs = environment(pod, c, objects)?
        .into_iter()
        .map(|(key, value)| api::KeyValue {
            key,
            value: value.into(),
        })
        .collect();
    let mut mounts = Vec::new();
    for m in &c.volume_mounts {
        let Some(host) = volume_dirs.get(&m.name) else {
            return Err(format!(
                "volume {:?} is not a configMap, secret or emptyDir of the pod",
                m.name
            ));
        };
        mounts.push(api::Mount {
            container_path: m.mount_path.clone(),
            host_path: host.to_string_lossy().into_owned(),
            readonly: m.read_only,
            ..Default::default()
        });
    }
    let mut resources = api::LinuxContainerResources::default();
    if let Some(cpu) = c.resources.limits.get("cpu").and_then(quantity_millis) {
        resources.cpu_period = 100_000;
        resources.cpu_quota = i64::try_from(cpu * 100).unwrap_or(i64::MAX).max(1000);
    }
    if let Some(cpu) = c.resources.requests.get("cpu").and_then(quantity_millis) {
        resources.cpu_shares = i64::try_from(cpu * 1024 / 1000).unwrap_or(i64::MAX).max(2);
    }
    if let Some(mem) = c.resources.limits.get("memory").and_then(quantity_millis) {
        resources.memory_limit_in_bytes = i64::try_from(mem / 1000).unwrap_or(i64::MAX);
    }
    let mut labels = labels(pod);
    labels.insert(LABEL_CONTAINER_NAME.to_owned(), c.name.clone());
    Ok(api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: c.name.clone(),
            attempt,
        }),
        image: Some(api::ImageSpec {
            image: c.image.clone(),
            ..Default::default()
        }),
        command: c.command.clone(),
        args: c.args.clone(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs,
        mounts,
        labels,
        log_path: log_path(&c.name, attempt),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(resources),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> BTreeMap<String, Value> {
        BTreeMap::from([
            (
                "default/configmap/cfg".to_owned(),
                json!({"data": {"greeting": "hello", "mode": "fast"}}),
            ),
            (
                "default/secret/pw".to_owned(),
                json!({"data": {"password": "c2VjcmV0"}}),
            ),
        ])
    }

    fn pod(container: Value, volumes: Value) -> Pod {
        Pod::from_json(
            &json!({"metadata": {"name": "p", "namespace": "default", "uid": "u1"},
                    "spec": {"containers": [container], "volumes": volumes}})
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn environment_from_configmaps_and_secrets() {
        let p = pod(
            json!({"name": "c", "image": "i",
                   "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                   "env": [{"name": "A", "value": "1"},
                           {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "pw", "key": "password"}}},
                           {"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
                           {"name": "O", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}}]}),
            json!([]),
        );
        let env = environment(&p, &p.spec.containers[0], &store()).unwrap();
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(env["CFG_greeting"], "hello");
        assert_eq!(env["CFG_mode"], "fast");
        assert_eq!(env["A"], "1");
        assert_eq!(env["PW"], "secret");
        assert_eq!(env["G"], "hello");
        assert!(!env.contains_key("O"));
        let missing = pod(
            json!({"name": "c", "image": "i",
                   "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nokey"}}}]}),
            json!([]),
        );
        let e = environment(&missing, &missing.spec.containers[0], &store()).unwrap_err();
        assert!(e.contains("nokey") && e.contains("cfg"), "{e}");
    }

    #[test]
    fn volumes_are_files_rewritten_on_change() {
        let root = tempfile::tempdir().unwrap();
        let p = pod(
            json!({"name": "c", "image": "i", "volumeMounts": [{"name": "conf", "mountPath": "/etc/conf"}],
                   "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}}}),
            json!([{"name": "conf", "configMap": {"name": "cfg"}},
                   {"name": "pw", "secret": {"secretName": "pw"}},
                   {"name": "scratch", "emptyDir": {}}]),
        );
        let mut objects = store();
        let dirs = volumes(&p, root.path(), &objects).unwrap();
        assert_eq!(
            std::fs::read_to_string(dirs["conf"].join("greeting")).unwrap(),
            "hello"
        );
        assert_eq!(
            std::fs::read_to_string(dirs["pw"].join("password")).unwrap(),
            "secret"
        );
        assert!(dirs["scratch"].is_dir());
        objects.insert(
            "default/configmap/cfg".into(),
            json!({"data": {"greeting": "bye"}}),
        );
        volumes(&p, root.path(), &objects).unwrap();
        assert_eq!(
            std::fs::read_to_string(dirs["conf"].join("greeting")).unwrap(),
            "bye"
        );
        assert!(!dirs["conf"].join("mode").exists());
        let config = container_config(&p, &p.spec.containers[0], 2, &objects, &dirs).unwrap();
        assert_eq!(config.mounts[0].container_path, "/etc/conf");
        assert_eq!(config.log_path, "c/2.log");
        let r = config.linux.unwrap().resources.unwrap();
        assert_eq!((r.cpu_period, r.cpu_quota), (100_000, 50_000));
        assert_eq!(r.memory_limit_in_bytes, 64 * 1024 * 1024);
        objects.remove("default/secret/pw");
        assert!(
            volumes(&p, root.path(), &objects)
                .unwrap_err()
                .contains("not found")
        );
    }
}
