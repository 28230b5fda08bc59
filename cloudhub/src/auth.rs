//! Credentials of the cloud API: bearer tokens, and client certificates from the cloud CA.
//!
//! **Tokens** are `cwapi_` followed by 43 base64url characters (32 random bytes from ring's
//! `SystemRandom`, 256 bits). A token is shown once, when it is created; only its SHA-256 is kept,
//! with a name (unique among live tokens), a [`Scope`], its creation time and, once revoked, its
//! revocation time. A presented token is hashed and compared with every stored hash in constant
//! time.
//!
//! The tokens live in a small SQLite file, by default `api-tokens.db` in the cloud's certificate
//! directory (`cloudhub.api-auth.token-file`), created 0600:
//! - beside `ca.key`, the cloud's other secret, under the same protection and backup policy;
//! - apart from the message store, which may be moved aside after a fault or replaced by another
//!   engine (`store::MessageStore`): doing so must never silently open the API;
//! - SQLite makes `causeway api-token create --dir` (offline, e.g. the first admin token) and a
//!   running cloudcore safe to use together; the daemon notices another process's change by
//!   SQLite's `data_version` before each check, so an offline revocation takes effect at once.
//!
//! **Client certificates** (on the API's TLS listener) signed by the cloud CA whose CN is
//! `causeway-api:<scope>:<name>` authenticate as `<name>` with that scope; any other certificate
//! (a node's `system:node:…`) grants nothing.
//!
//! When credentials are required: as soon as the token file holds any token (live or revoked: a
//! revoked last token leaves the API closed, not open), and always when the API listens on a
//! non-loopback address. Otherwise (loopback, no token ever created) the API is open, as before.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use base64::Engine as _;
use ring::digest;
use ring::rand::{SecureRandom as _, SystemRandom};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

/// The prefix of every API token (recognisable by secret scanners and by eye).
pub const TOKEN_PREFIX: &str = "cwapi_";
/// The token file's name in the certificate directory.
pub const TOKEN_FILE_NAME: &str = "api-tokens.db";
/// The CN prefix of an API client certificate: `causeway-api:<scope>:<name>`.
pub const CERT_CN_PREFIX: &str = "causeway-api:";
/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;
/// Longest token name.
const MAX_NAME_LEN: usize = 64;

/// What a credential may do. Each scope includes the ones before it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `GET` endpoints, the SSE stream and metrics.
    Read,
    /// `read`, and queueing messages for nodes (`POST /v1/nodes/{id}/messages`).
    Send,
    /// Everything, including managing API tokens.
    Admin,
}

impl Scope {
    /// Whether a credential of this scope may do what `needed` guards.
    pub fn allows(self, needed: Self) -> bool {
        self >= needed
    }

    /// The scope's name as written in files, certificates and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Send => "send",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = AuthStoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Self::Read),
            "send" => Ok(Self::Send),
            "admin" => Ok(Self::Admin),
            other => Err(AuthStoreError::BadScope(other.to_owned())),
        }
    }
}

/// A stored token's public description (never the token or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Unique among live tokens.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// Creation time, Unix milliseconds.
    pub created_ms: i64,
    /// Revocation time, Unix milliseconds; `None` while it is live.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub revoked_ms: Option<i64>,
}

/// Who a request authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name or the certificate's `<name>`.
    pub name: String,
    /// Its scope.
    pub scope: Scope,
    /// How it authenticated.
    pub via: Via,
}

/// The kind of credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A bearer token.
    Token,
    /// A client certificate.
    Certificate,
}

/// The verdict on a presented token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenVerdict {
    /// A live token.
    Valid(Principal),
    /// Not a token of this cloud (or malformed).
    Unknown,
    /// A token that was revoked (named, for the log).
    Revoked(String),
}

/// Why the token file could not be used, or an operation on it was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthStoreError {
    /// The database failed (I/O, locked, not a database).
    #[error("API token file {path}: {source}")]
    Database {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The file could not be created with owner-only permissions.
    #[error("API token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A scope other than read, send, admin.
    #[error("unknown scope {0:?} (expected read, send or admin)")]
    BadScope(String),
    /// A name that is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid token name {0:?}: 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// A live token already has this name.
    #[error("a live API token named {0:?} exists; revoke it first or choose another name")]
    NameTaken(String),
    /// No live token has this name.
    #[error("no live API token named {0:?}")]
    NoSuchToken(String),
    /// The system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Checks a token name: 1 to 64 characters from `[A-Za-z0-9._-]`.
pub fn check_name(name: &str) -> Result<(), AuthStoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AuthStoreError::BadName(name.to_owned()))
    }
}

/// SHA-256 of a token.
fn hash(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Equality of two hashes without an early exit.
fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn now_ms() -> i64 {
    proto::now_millis()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS api_tokens (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    sha256 BLOB NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS api_tokens_live_name ON api_tokens(name) WHERE revoked_ms IS NULL;
";

/// A stored token as cached for verification.
#[derive(Debug)]
struct Cached {
    sha256: [u8; 32],
    name: String,
    scope: Scope,
    revoked: bool,
}

#[derive(Debug)]
struct Inner {
    conn: Connection,
    /// `PRAGMA data_version` when `tokens` was loaded; another process's commit changes it.
    version: Option<i64>,
    tokens: Vec<Cached>,
}

/// The token file (see the module docs). Operations are short synchronous SQLite calls.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl TokenStore {
    /// The default token file of a certificate directory.
    pub fn default_path(cert_dir: &Path) -> PathBuf {
        cert_dir.join(TOKEN_FILE_NAME)
    }

    /// Opens the token file, creating it (owner-only) if absent.
    pub fn open(path: &Path) -> Result<Self, AuthStoreError> {
        let io = |source| AuthStoreError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            // Created 0600 before SQLite sees it; its journal inherits the mode.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
        }
        let db = |source| AuthStoreError::Database {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        let store = Self {
            path: path.to_owned(),
            inner: Mutex::new(Inner {
                conn,
                version: None,
                tokens: Vec::new(),
            }),
        };
        store.with_fresh(|_| Ok(()))?;
        Ok(store)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, source: rusqlite::Error) -> AuthStoreError {
        AuthStoreError::Database {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `f` on the cache, reloaded first if the file changed.
    fn with_fresh<T>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, AuthStoreError>,
    ) -> Result<T, AuthStoreError> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let version: i64 = inner
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.db_err(e))?;
        if inner.version != Some(version) {
            inner.tokens = load(&inner.conn).map_err(|e| self.db_err(e))?;
            inner.version = Some(version);
        }
        f(&inner)
    }

    /// Whether any token was ever created (live or revoked): then credentials are required.
    pub fn any(&self) -> Result<bool, AuthStoreError> {
        self.with_fresh(|inner| Ok(!inner.tokens.is_empty()))
    }

    /// Checks a presented token.
    pub fn verify(&self, presented: &str) -> Result<TokenVerdict, AuthStoreError> {
        let presented = hash(presented);
        self.with_fresh(|inner| {
            let mut found = None;
            // Every hash is compared, so the time does not depend on which one matches.
            for t in &inner.tokens {
                if same_hash(&t.sha256, &presented) {
                    found = Some(t);
                }
            }
            Ok(match found {
                None => TokenVerdict::Unknown,
                Some(t) if t.revoked => TokenVerdict::Revoked(t.name.clone()),
                Some(t) => TokenVerdict::Valid(Principal {
                    name: t.name.clone(),
                    scope: t.scope,
                    via: Via::Token,
                }),
            })
        })
    }

    /// Creates a token named `name` with `scope`; returns the token (shown once) and its record.
    pub fn create(&self, name: &str, scope: Scope) -> Result<(String, TokenInfo), AuthStoreError> {
        check_name(name)?;
        let mut raw = [0u8; TOKEN_BYTES];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| AuthStoreError::Random)?;
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let created_ms = now_ms();
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = inner.conn.execute(
            "INSERT INTO api_tokens (name, scope, sha256, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, scope.as_str(), &hash(&token)[..], created_ms],
        );
        match result {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(AuthStoreError::NameTaken(name.to_owned()));
            }
            Err(e) => return Err(self.db_err(e)),
        }
        // Our own commit does not change data_version: reload at the next check.
        inner.version = None;
        Ok((
            token,
            TokenInfo {
                name: name.to_owned(),
                scope,
                created_ms,
                revoked_ms: None,
            },
        ))
    }

    /// Every token, live and revoked, oldest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>, AuthStoreError> {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut stmt = inner
            .conn
            .prepare("SELECT name, scope, created_ms, revoked_ms FROM api_tokens ORDER BY id")
            .map_err(|e| self.db_err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })
            .map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, scope, created_ms, revoked_ms) = row.map_err(|e| self.db_err(e))?;
            out.push(TokenInfo {
                name,
                scope: scope.parse()?,
                created_ms,
                revoked_ms,
            });
        }
        Ok(out)
    }

    /// Revokes the live token named `name`: it is refused from now on (in every process using
    /// the file) and stays listed as revoked.
    pub fn revoke(&self, name: &str) -> Result<TokenInfo, AuthStoreError> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = now_ms();
        let row = inner
            .conn
            .query_row(
                "UPDATE api_tokens SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL \
                 RETURNING scope, created_ms",
                params![name, now],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()
            .map_err(|e| self.db_err(e))?;
        inner.version = None;
        let Some((scope, created_ms)) = row else {
            return Err(AuthStoreError::NoSuchToken(name.to_owned()));
        };
        Ok(TokenInfo {
            name: name.to_owned(),
            scope: scope.parse()?,
            created_ms,
            revoked_ms: Some(now),
        })
    }
}

fn load(conn: &Connection) -> Result<Vec<Cached>, rusqlite::Error> {
    let mut stmt = conn.prepare("SELECT sha256, name, scope, revoked_ms FROM api_tokens")?;
    let rows = stmt.query_map([], |r| {
        let blob: Vec<u8> = r.get(0)?;
        let scope: String = r.get(2)?;
        Ok((
            blob,
            r.get::<_, String>(1)?,
            scope,
            r.get::<_, Option<i64>>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (blob, name, scope, revoked) = row?;
        // A row this version cannot read grants nothing but still counts as a credential.
        let sha256 = <[u8; 32]>::try_from(blob.as_slice()).unwrap_or([0; 32]);
        out.push(Cached {
            sha256,
            name,
            scope: scope.parse().unwrap_or(Scope::Read),
            revoked: revoked.is_some(),
        });
    }
    Ok(out)
}

/// The principal of an API client certificate (already verified against the CA by TLS):
/// CN `causeway-api:<scope>:<name>`. `Err` says why the certificate grants nothing.
pub fn principal_from_cert(cert_der: &[u8]) -> Result<Principal, String> {
    let cn = certs::common_name(cert_der).map_err(|e| e.to_string())?;
    let rest = cn.strip_prefix(CERT_CN_PREFIX).ok_or_else(|| {
        format!(
            "client certificate CN {cn:?} is not an API client's ({CERT_CN_PREFIX}<scope>:<name>)"
        )
    })?;
    let (scope, name) = rest
        .split_once(':')
        .ok_or_else(|| format!("client certificate CN {cn:?} lacks <scope>:<name>"))?;
    let scope = scope.parse::<Scope>().map_err(|e| e.to_string())?;
    check_name(name).map_err(|e| e.to_string())?;
    Ok(Principal {
        name: name.to_owned(),
        scope,
        via: Via::Certificate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_created_verified_and_revoked() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(TOKEN_FILE_NAME);
        let store = TokenStore::open(&path).expect("open");
        assert!(!store.any().expect("any"));
        let (token, info) = store.create("ops", Scope::Admin).expect("create");
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(token.len(), TOKEN_PREFIX.len() + 43);
        assert_eq!(info.scope, Scope::Admin);
        assert!(store.any().expect("any"));
        let Ok(TokenVerdict::Valid(p)) = store.verify(&token) else {
            panic!("valid")
        };
        assert_eq!((p.name.as_str(), p.scope), ("ops", Scope::Admin));
        assert_eq!(
            store.verify("cwapi_nope").expect("verify"),
            TokenVerdict::Unknown
        );
        assert!(matches!(
            store.create("ops", Scope::Read),
            Err(AuthStoreError::NameTaken(_))
        ));
        assert!(matches!(
            store.create("bad name", Scope::Read),
            Err(AuthStoreError::BadName(_))
        ));

        // Another process (another connection) revokes: this one sees it at the next check.
        let other = TokenStore::open(&path).expect("second opener");
        other.revoke("ops").expect("revoke");
        assert_eq!(
            store.verify(&token).expect("verify"),
            TokenVerdict::Revoked("ops".into())
        );
        assert!(store.any().expect("revoked tokens still close the API"));
        assert!(matches!(
            other.revoke("ops"),
            Err(AuthStoreError::NoSuchToken(_))
        ));
        // The name is free again; the list keeps the revoked one.
        store.create("ops", Scope::Read).expect("re-create");
        let list = store.list().expect("list");
        assert_eq!(list.len(), 2);
        assert!(list[0].revoked_ms.is_some() && list[1].revoked_ms.is_none());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn scopes_nest() {
        assert!(Scope::Admin.allows(Scope::Send) && Scope::Send.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Send) && !Scope::Send.allows(Scope::Admin));
        assert!("write".parse::<Scope>().is_err());
    }

    #[test]
    fn hashes_compare() {
        assert!(same_hash(&hash("a"), &hash("a")));
        assert!(!same_hash(&hash("a"), &hash("b")));
    }
}
