//! KubeEdge's bootstrap token (B§9.2): `hex(sha256(CA DER))` + `.` + an HS256 JWT whose only claim
//! is `exp`. An edge holding it can check the CA it downloads from `/ca.crt` (the hash) and prove
//! to the cloud it may get a node certificate (the JWT, sent as `Authorization: Bearer <jwt>`).
//!
//! Compatibility: the HMAC key is the CA private key's SEC1 DER, exactly as KubeEdge, so tokens
//! from `keadm gettoken` work against a Causeway cloud sharing the CA and vice versa.
//!
//! **The token is a secret.** It lets its holder obtain a node certificate until it expires.
//! KubeEdge's design has weaknesses we keep for compatibility (W14): the MAC key is the CA key
//! itself (a side channel on the MAC is a side channel on the CA key), and a KubeEdge cloud signs
//! *any* node name for a token holder. Causeway's signer ties the CSR's CN to the requested node
//! ([`crate::CertificateAuthority::sign_node_csr`]), but any node name can still be requested, so
//! keep TTLs short (the default is KubeEdge's 24 h) and distribute tokens like passwords.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{digest, hmac};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::CertificateAuthority;

/// KubeEdge's token lifetime: twice its 12 h refresh period (B§9.2).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// What a valid token asserts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    /// When the token stops being valid (second precision, the JWT `exp` claim).
    pub expires_at: OffsetDateTime,
}

/// Why a token was refused. All variants are the presenter's fault (a wrong, stale or forged
/// token); the remedy is a fresh token from `causeway token create`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is not `<64 hex>.<header>.<claims>.<signature>`, or a part does not decode.
    #[error("malformed token: {reason}")]
    Malformed {
        /// Which part is wrong and how.
        reason: String,
    },
    /// The token was made for a different CA (its hash part does not match this CA).
    #[error("token was issued for a different CA")]
    CaHashMismatch,
    /// The JWT header names an algorithm other than HS256 (e.g. `none`); refused outright.
    #[error("unsupported JWT algorithm {alg:?}; only HS256 is accepted")]
    UnsupportedAlgorithm {
        /// The algorithm the header named.
        alg: String,
    },
    /// The HMAC does not verify: forged, tampered, or signed with another CA key.
    #[error("token signature does not verify")]
    BadSignature,
    /// The token's `exp` is at or before the verification time.
    #[error("token expired at {expired_at}")]
    Expired {
        /// The token's `exp`.
        expired_at: OffsetDateTime,
    },
    /// The token's `nbf` (not set by KubeEdge or us, but honoured if present) is in the future.
    #[error("token not valid before {not_before}")]
    NotYetValid {
        /// The token's `nbf`.
        not_before: OffsetDateTime,
    },
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: Option<String>,
}

#[derive(Serialize)]
struct OutClaims {
    exp: i64,
}

#[derive(Deserialize)]
struct InClaims {
    exp: Option<i64>,
    nbf: Option<i64>,
}

/// Creates a token for `ca` expiring `ttl` after `now`. Byte-compatible with KubeEdge's: header
/// `{"alg":"HS256","typ":"JWT"}`, claims `{"exp":<unix s>}`.
pub fn create(ca: &CertificateAuthority, ttl: Duration, now: OffsetDateTime) -> String {
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let exp = now.unix_timestamp().saturating_add(ttl_secs);
    let header = r#"{"alg":"HS256","typ":"JWT"}"#;
    // Serialising a struct of one i64 cannot fail.
    let claims = serde_json::to_string(&OutClaims { exp }).unwrap_or_default();
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let tag = hmac::sign(&mac_key(ca), signing_input.as_bytes());
    format!(
        "{}.{signing_input}.{}",
        ca_hash(ca.cert_der()),
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    )
}

/// Verifies a whole token: its CA hash matches `ca`, and its JWT verifies (see [`verify_jwt`]).
pub fn verify(
    token: &str,
    ca: &CertificateAuthority,
    now: OffsetDateTime,
) -> Result<TokenClaims, TokenError> {
    let (hash, jwt) = split(token)?;
    if !hash.eq_ignore_ascii_case(&ca_hash(ca.cert_der())) {
        return Err(TokenError::CaHashMismatch);
    }
    verify_jwt(jwt, ca, now)
}

/// Verifies the JWT part alone, as the cloud's `/edge.crt` handler receives it in
/// `Authorization: Bearer <jwt>`: HS256 only, signature checked in constant time, then `exp`
/// (required, must be after `now`) and `nbf` (if present, must not be after `now`).
pub fn verify_jwt(
    jwt: &str,
    ca: &CertificateAuthority,
    now: OffsetDateTime,
) -> Result<TokenClaims, TokenError> {
    let malformed = |reason: &str| TokenError::Malformed {
        reason: reason.to_owned(),
    };
    let mut parts = jwt.split('.');
    let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("JWT must have three dot-separated parts"));
    };
    let header: Header = decode_json(header_b64).map_err(|e| malformed(&format!("header: {e}")))?;
    if header.alg != "HS256" {
        return Err(TokenError::UnsupportedAlgorithm { alg: header.alg });
    }
    let signature = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| malformed("signature is not base64url"))?;
    let signing_input = &jwt[..header_b64.len() + 1 + claims_b64.len()];
    hmac::verify(&mac_key(ca), signing_input.as_bytes(), &signature)
        .map_err(|_| TokenError::BadSignature)?;

    let claims: InClaims =
        decode_json(claims_b64).map_err(|e| malformed(&format!("claims: {e}")))?;
    let exp = claims.exp.ok_or_else(|| malformed("claims have no exp"))?;
    let expires_at =
        OffsetDateTime::from_unix_timestamp(exp).map_err(|_| malformed("exp out of range"))?;
    if now >= expires_at {
        return Err(TokenError::Expired {
            expired_at: expires_at,
        });
    }
    if let Some(nbf) = claims.nbf {
        let not_before =
            OffsetDateTime::from_unix_timestamp(nbf).map_err(|_| malformed("nbf out of range"))?;
        if now < not_before {
            return Err(TokenError::NotYetValid { not_before });
        }
    }
    Ok(TokenClaims { expires_at })
}

/// Splits a token into its CA hash (64 hex digits) and JWT parts.
pub fn split(token: &str) -> Result<(&str, &str), TokenError> {
    let token = token.trim();
    let (hash, jwt) = token.split_once('.').ok_or_else(|| TokenError::Malformed {
        reason: "no '.' separating the CA hash from the JWT".into(),
    })?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TokenError::Malformed {
            reason: "CA hash is not 64 hex digits".into(),
        });
    }
    Ok((hash, jwt))
}

/// What an edge checks after fetching `/ca.crt` with an unverified connection: is this the CA the
/// token was made for? False for a malformed token.
pub fn ca_hash_matches(token: &str, ca_der: &[u8]) -> bool {
    match split(token) {
        Ok((hash, _)) => {
            let expected = ca_hash(ca_der);
            // Both are public values (the hash of a public certificate); a plain compare is fine.
            hash.eq_ignore_ascii_case(&expected)
        }
        Err(_) => false,
    }
}

/// `hex(sha256(der))`, lowercase: the token's first part.
pub fn ca_hash(ca_der: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, ca_der))
}

fn mac_key(ca: &CertificateAuthority) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, &ca.key_sec1_der())
}

fn decode_json<T: serde::de::DeserializeOwned>(b64: &str) -> Result<T, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| "not base64url".to_owned())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}
