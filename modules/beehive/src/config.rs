//! What both daemons' configuration files share: [`from_yaml`] / [`load_yaml`], which parse any
//! config type with serde-saphyr and name the key path of an error (`edgehub.controller.heartbeat:
//! ...`, `cloudhub.node-limit: ...`), [`ConfigError`], and the [`Seconds`] value type.
//!
//! Why here: beehive is the one crate below both hubs (and every module) that is about running a
//! daemon rather than about the link, and it already holds shutdown and error reporting. The
//! hubs' own sections (`edgehub/src/config.rs`, `cloudhub/src/config.rs`) use these, so
//! dependencies still point one way (proto ← transport, beehive ← hubs ← binaries) with no
//! crate of its own for forty lines.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a configuration could not be loaded. Always the operator's to fix: the message names the
/// file and the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown key, lacks a required key or holds an invalid value.
    #[error("{origin}: {key}: {source}")]
    Invalid {
        /// The file (or `<input>`).
        origin: String,
        /// The key path, e.g. `edgehub.controller.heartbeat` (`(document)` for the whole file).
        key: String,
        /// The parser's message, with line, column and a snippet.
        source: Box<serde_saphyr::Error>,
    },
    /// Settings that each parse but cannot go together.
    #[error("{0}")]
    Inconsistent(String),
}

impl ConfigError {
    /// The key path of an [`ConfigError::Invalid`] error.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } => Some(key),
            Self::Read { .. } | Self::Inconsistent(_) => None,
        }
    }
}

/// Parses `text` (from `origin`, named in errors) as YAML into `T`, naming the key path of any
/// error.
pub fn from_yaml<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let mut key = None;
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
            key = Some(e.path().to_string());
            e.into_inner()
        })
    })
    .map_err(|source| ConfigError::Invalid {
        origin: origin.to_owned(),
        key: match key.as_deref() {
            None | Some(".") => "(document)".to_owned(),
            Some(path) => path.to_owned(),
        },
        source: Box::new(source),
    })
}

/// Reads and parses a YAML file.
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_yaml(&text, &path.display().to_string())
}

/// A configuration value out of range: the message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

/// A whole number of seconds, at least 1 (KubeEdge's configs count durations in seconds). In
/// YAML a plain integer; 0 is refused with a message that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(NonZeroU32);

impl Seconds {
    /// `secs` seconds; zero is refused.
    pub fn new(secs: u32) -> Result<Self, InvalidValue> {
        NonZeroU32::new(secs)
            .map(Self)
            .ok_or_else(|| InvalidValue("must be at least 1 (seconds)".into()))
    }

    /// `secs` seconds, 0 read as 1: for defaults written as constants.
    pub const fn at_least_one(secs: u32) -> Self {
        match NonZeroU32::new(secs) {
            Some(n) => Self(n),
            None => Self(NonZeroU32::MIN),
        }
    }

    /// As a duration.
    pub fn duration(self) -> Duration {
        Duration::from_secs(u64::from(self.0.get()))
    }

    /// The number of seconds.
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(u32::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct File {
        #[allow(dead_code)]
        section: Section,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Section {
        #[allow(dead_code)]
        wait: Seconds,
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let err = from_yaml::<File>("section:\n  wait: 0\n", "x.yaml").unwrap_err();
        assert_eq!(err.key(), Some("section.wait"));
        let text = err.to_string();
        assert!(text.starts_with("x.yaml: section.wait: "), "{text}");
        assert!(text.contains("must be at least 1 (seconds)"), "{text}");
        let err = from_yaml::<File>("- a\n", "x.yaml").unwrap_err();
        assert_eq!(err.key(), Some("(document)"));
        let err = load_yaml::<File>(Path::new("/nonexistent/x.yaml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert_eq!(err.key(), None);
    }

    #[test]
    fn seconds_read_and_write_as_integers() {
        assert_eq!(Seconds::new(2).unwrap().duration(), Duration::from_secs(2));
        assert_eq!(Seconds::at_least_one(0).get(), 1);
        assert!(Seconds::new(0).is_err());
        let parsed: Section = from_yaml("wait: 15\n", "x").unwrap();
        assert_eq!(parsed.wait.get(), 15);
    }
}
