//! Resource strings as KubeEdge puts them on the wire (MODULES.md §1.1, §2.2): `{ns}/{type}/{name}`
//! for one object (`null` as the namespace of cluster-scoped ones: `null/node/edge-1`) and
//! `{ns}/{type}` for a list in a query. The whole three-segment string is the object's key in the
//! `meta` table; the type is its second segment.
//!
//! [`KINDS`] names the object types the edge knows: their Kubernetes plural, kind and API version
//! (what MetaServer serves, and what a query may ask for).

use std::fmt;

/// The namespace segment of cluster-scoped objects.
pub const CLUSTER_SCOPE: &str = "null";

/// The longest namespace or name segment accepted (a Kubernetes DNS subdomain).
const MAX_SEGMENT: usize = 253;

/// An object type the edge knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// The type segment of resource strings (lower-case singular): `configmap`.
    pub name: &'static str,
    /// The Kubernetes plural in URL paths: `configmaps`.
    pub plural: &'static str,
    /// The Kubernetes `kind`: `ConfigMap`.
    pub kind: &'static str,
    /// The Kubernetes `apiVersion`: `v1`.
    pub api_version: &'static str,
    /// Whether objects live in a namespace (`false`: the namespace segment is `null`).
    pub namespaced: bool,
    /// Whether a local miss is asked of the cloud while connected (KubeEdge's remote-query list,
    /// MODULES.md §1.5, restricted to what a Causeway cloud answers).
    pub remote: bool,
}

/// The object types the edge stores and serves.
pub const KINDS: &[Kind] = &[
    kind("pod", "pods", "Pod", "v1", true, false),
    kind("configmap", "configmaps", "ConfigMap", "v1", true, true),
    kind("secret", "secrets", "Secret", "v1", true, true),
    kind("service", "services", "Service", "v1", true, false),
    kind("endpoints", "endpoints", "Endpoints", "v1", true, false),
    kind("node", "nodes", "Node", "v1", false, false),
    kind("namespace", "namespaces", "Namespace", "v1", false, false),
    kind(
        "persistentvolume",
        "persistentvolumes",
        "PersistentVolume",
        "v1",
        false,
        false,
    ),
    kind(
        "persistentvolumeclaim",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        "v1",
        true,
        false,
    ),
    kind(
        "lease",
        "leases",
        "Lease",
        "coordination.k8s.io/v1",
        true,
        false,
    ),
    kind(
        "device",
        "devices",
        "Device",
        "devices.kubeedge.io/v1beta1",
        true,
        false,
    ),
    kind(
        "devicemodel",
        "devicemodels",
        "DeviceModel",
        "devices.kubeedge.io/v1beta1",
        true,
        false,
    ),
];

const fn kind(
    name: &'static str,
    plural: &'static str,
    kind: &'static str,
    api_version: &'static str,
    namespaced: bool,
    remote: bool,
) -> Kind {
    Kind {
        name,
        plural,
        kind,
        api_version,
        namespaced,
        remote,
    }
}

/// The known type named `name` (the resource string's type segment).
pub fn kind_named(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// The known type whose plural is `plural` (a URL path segment).
pub fn kind_of_plural(plural: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.plural == plural)
}

/// A parsed resource string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The namespace segment (`null` for cluster-scoped objects).
    pub namespace: String,
    /// The type segment: `pod`, `configmap`.
    pub kind: String,
    /// The name segment; `None` in a list query (`default/pod`).
    pub name: Option<String>,
}

/// Why a resource string was refused. The sender's fault: the message is answered with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResourceError {
    /// Not `{ns}/{type}/{name}` (or `{ns}/{type}` where a list is allowed).
    #[error("bad resource {resource:?}: expected {expected}")]
    Shape {
        /// The string received.
        resource: String,
        /// What was expected there.
        expected: &'static str,
    },
    /// A segment is empty, too long, or holds whitespace or control characters.
    #[error("bad resource {resource:?}: {what} segment {segment:?} is {why}")]
    Segment {
        /// The string received.
        resource: String,
        /// Which segment (`namespace`, `type`, `name`).
        what: &'static str,
        /// The segment.
        segment: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

impl Resource {
    /// Parses `{ns}/{type}/{name}`, one object.
    pub fn object(resource: &str) -> Result<Self, ResourceError> {
        let parsed = Self::parse(resource, "{namespace}/{type}/{name}")?;
        if parsed.name.is_none() {
            return Err(ResourceError::Shape {
                resource: resource.to_owned(),
                expected: "{namespace}/{type}/{name}",
            });
        }
        Ok(parsed)
    }

    /// Parses `{ns}/{type}/{name}` or `{ns}/{type}` (a list), as a query may ask.
    pub fn query(resource: &str) -> Result<Self, ResourceError> {
        Self::parse(resource, "{namespace}/{type} or {namespace}/{type}/{name}")
    }

    /// The known type of this resource, if it is one.
    pub fn known_kind(&self) -> Option<&'static Kind> {
        kind_named(&self.kind)
    }

    /// The `meta` key of one object: the resource string itself.
    pub fn key(&self) -> String {
        match &self.name {
            Some(name) => format!("{}/{}/{}", self.namespace, self.kind, name),
            None => format!("{}/{}", self.namespace, self.kind),
        }
    }

    fn parse(resource: &str, expected: &'static str) -> Result<Self, ResourceError> {
        let shape = || ResourceError::Shape {
            resource: resource.to_owned(),
            expected,
        };
        let mut parts = resource.split('/');
        let (Some(namespace), Some(kind)) = (parts.next(), parts.next()) else {
            return Err(shape());
        };
        let name = parts.next();
        if parts.next().is_some() {
            return Err(shape());
        }
        let check = |what: &'static str, segment: &str| -> Result<(), ResourceError> {
            let why = if segment.is_empty() {
                Some("empty")
            } else if segment.len() > MAX_SEGMENT {
                Some("longer than 253 bytes")
            } else if segment.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Some("holding whitespace or control characters")
            } else if what == "type" && !segment.bytes().all(|b| b.is_ascii_lowercase()) {
                Some("not a lower-case word")
            } else {
                None
            };
            match why {
                Some(why) => Err(ResourceError::Segment {
                    resource: resource.to_owned(),
                    what,
                    segment: segment.to_owned(),
                    why,
                }),
                None => Ok(()),
            }
        };
        check("namespace", namespace)?;
        check("type", kind)?;
        if let Some(name) = name {
            check("name", name)?;
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            kind: kind.to_owned(),
            name: name.map(str::to_owned),
        })
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_and_lists() {
        let r = Resource::object("default/configmap/cm1").unwrap();
        assert_eq!(
            (r.namespace.as_str(), r.kind.as_str(), r.name.as_deref()),
            ("default", "configmap", Some("cm1"))
        );
        assert_eq!(r.key(), "default/configmap/cm1");
        assert_eq!(r.known_kind().unwrap().plural, "configmaps");
        let node = Resource::object("null/node/edge-1").unwrap();
        assert!(!node.known_kind().unwrap().namespaced);
        let list = Resource::query("default/pod").unwrap();
        assert_eq!(list.name, None);
        assert_eq!(list.key(), "default/pod");
    }

    #[test]
    fn bad_strings_are_refused_with_what_is_wrong() {
        for (resource, needle) in [
            ("default/pod", "expected {namespace}/{type}/{name}"),
            ("pod", "expected"),
            ("a/b/c/d", "expected"),
            ("default//x", "type segment \"\" is empty"),
            ("default/Pod/x", "not a lower-case word"),
            ("default/pod/a b", "whitespace"),
            ("/pod/x", "namespace segment"),
        ] {
            let e = Resource::object(resource).unwrap_err().to_string();
            assert!(e.contains(needle), "{resource}: {e}");
        }
        assert!(Resource::query("default/pod/").is_err());
        assert!(Resource::query("").is_err());
    }

    #[test]
    fn kinds_are_unique() {
        for (i, k) in KINDS.iter().enumerate() {
            assert!(
                KINDS[i + 1..]
                    .iter()
                    .all(|o| o.name != k.name && o.plural != k.plural)
            );
            assert_eq!(kind_of_plural(k.plural), Some(k));
        }
    }
}
