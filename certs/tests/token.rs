//! The bootstrap token: KubeEdge's exact format, verified against the right CA only, until it
//! expires; every kind of bad token gets its own error.

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

use causeway_certs::token::{self, TokenError};
use common::{ca, now};

#[test]
fn token_has_kubeedge_format() {
    let ca = ca();
    let t = token::create(&ca, token::DEFAULT_TTL, now());
    let parts: Vec<_> = t.split('.').collect();
    assert_eq!(parts.len(), 4, "{t}");
    assert_eq!(parts[0], token::ca_hash(ca.cert_der()));
    assert_eq!(parts[0].len(), 64);
    assert!(
        parts[0]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(
        URL_SAFE_NO_PAD.decode(parts[1]).unwrap(),
        br#"{"alg":"HS256","typ":"JWT"}"#
    );
    let exp = now().unix_timestamp() + 86_400;
    assert_eq!(
        URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
        format!(r#"{{"exp":{exp}}}"#).as_bytes()
    );
    // HS256 keyed with the CA key's SEC1 DER, as KubeEdge does.
    let sec1 = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateSec1KeyDer::from_pem_slice(ca.key_pem().as_bytes()).unwrap()
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, sec1.secret_sec1_der());
    let tag = hmac::sign(&key, format!("{}.{}", parts[1], parts[2]).as_bytes());
    assert_eq!(URL_SAFE_NO_PAD.decode(parts[3]).unwrap(), tag.as_ref());
}

#[test]
fn good_token_verifies_until_it_expires() {
    let ca = ca();
    let t = token::create(&ca, Duration::from_secs(3600), now());
    let claims = token::verify(&t, &ca, now()).unwrap();
    assert_eq!(claims.expires_at, now() + time::Duration::hours(1));
    token::verify(&t, &ca, now() + time::Duration::seconds(3599)).unwrap();
    assert_eq!(
        token::verify(&t, &ca, now() + time::Duration::hours(1)),
        Err(TokenError::Expired {
            expired_at: now() + time::Duration::hours(1)
        })
    );
    // Surrounding whitespace (a pasted token) is tolerated.
    token::verify(&format!(" {t}\n"), &ca, now()).unwrap();
}

#[test]
fn jwt_alone_verifies_as_the_bootstrap_endpoint_sees_it() {
    let ca = ca();
    let t = token::create(&ca, token::DEFAULT_TTL, now());
    let (hash, jwt) = token::split(&t).unwrap();
    assert_eq!(hash, token::ca_hash(ca.cert_der()));
    token::verify_jwt(jwt, &ca, now()).unwrap();
}

#[test]
fn token_for_another_ca_is_refused() {
    let (ca1, ca2) = (ca(), ca());
    let t = token::create(&ca1, token::DEFAULT_TTL, now());
    assert_eq!(
        token::verify(&t, &ca2, now()),
        Err(TokenError::CaHashMismatch)
    );
    // With the hash swapped to ca2's, the signature (ca1's key) still fails.
    let (_, jwt) = token::split(&t).unwrap();
    let forged = format!("{}.{jwt}", token::ca_hash(ca2.cert_der()));
    assert_eq!(
        token::verify(&forged, &ca2, now()),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn tampered_tokens_are_refused() {
    let ca = ca();
    let t = token::create(&ca, token::DEFAULT_TTL, now());
    let parts: Vec<_> = t.split('.').collect();

    // Extend exp by a year, keep the old signature.
    let later = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"exp":{}}}"#,
        now().unix_timestamp() + 31_536_000
    ));
    let extended = format!("{}.{}.{later}.{}", parts[0], parts[1], parts[3]);
    assert_eq!(
        token::verify(&extended, &ca, now()),
        Err(TokenError::BadSignature)
    );

    // Flip one bit of the signature.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[3]).unwrap();
    sig[0] ^= 1;
    let flipped = format!(
        "{}.{}.{}.{}",
        parts[0],
        parts[1],
        parts[2],
        URL_SAFE_NO_PAD.encode(&sig)
    );
    assert_eq!(
        token::verify(&flipped, &ca, now()),
        Err(TokenError::BadSignature)
    );

    // Truncated signature.
    let short = format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], &parts[3][..8]);
    assert_eq!(
        token::verify(&short, &ca, now()),
        Err(TokenError::BadSignature)
    );

    // alg none.
    let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{}.{none}.{}.", parts[0], parts[2]);
    assert_eq!(
        token::verify(&unsigned, &ca, now()),
        Err(TokenError::UnsupportedAlgorithm { alg: "none".into() })
    );
}

/// Signs arbitrary claims with the CA's MAC key, to probe claim handling behind a valid MAC.
fn signed_with(ca: &causeway_certs::CertificateAuthority, claims: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    let sec1 =
        rustls_pki_types::PrivateSec1KeyDer::from_pem_slice(ca.key_pem().as_bytes()).unwrap();
    let key = hmac::Key::new(hmac::HMAC_SHA256, sec1.secret_sec1_der());
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let tag = hmac::sign(&key, input.as_bytes());
    format!(
        "{}.{input}.{}",
        token::ca_hash(ca.cert_der()),
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    )
}

#[test]
fn claims_are_checked_behind_a_valid_mac() {
    let ca = ca();
    let soon = now().unix_timestamp() + 60;
    assert!(matches!(
        token::verify(&signed_with(&ca, "{}"), &ca, now()),
        Err(TokenError::Malformed { .. })
    ));
    assert!(matches!(
        token::verify(&signed_with(&ca, "[1]"), &ca, now()),
        Err(TokenError::Malformed { .. })
    ));
    assert!(matches!(
        token::verify(&signed_with(&ca, r#"{"exp":"soon"}"#), &ca, now()),
        Err(TokenError::Malformed { .. })
    ));
    let future_nbf = format!(r#"{{"exp":{soon},"nbf":{soon}}}"#);
    assert!(matches!(
        token::verify(&signed_with(&ca, &future_nbf), &ca, now()),
        Err(TokenError::NotYetValid { .. })
    ));
    // Unknown claims are ignored, as Go's jwt library does.
    let extra = format!(r#"{{"exp":{soon},"sub":"x"}}"#);
    token::verify(&signed_with(&ca, &extra), &ca, now()).unwrap();
}

#[test]
fn malformed_tokens_are_refused_as_malformed() {
    let ca = ca();
    let t = token::create(&ca, token::DEFAULT_TTL, now());
    let hash = token::ca_hash(ca.cert_der());
    for (label, bad) in [
        ("empty", String::new()),
        ("no dot", "abc".into()),
        (
            "short hash",
            format!("{}.{}", &hash[..10], t.split_once('.').unwrap().1),
        ),
        ("non-hex hash", format!("{}.a.b.c", "z".repeat(64))),
        ("two-part jwt", format!("{hash}.a.b")),
        ("five parts", format!("{t}.x")),
        ("header not base64", format!("{hash}.!!!.b.c")),
        (
            "header not json",
            format!("{hash}.{}.b.c", URL_SAFE_NO_PAD.encode("nope")),
        ),
        ("signature not base64", {
            let p: Vec<_> = t.split('.').collect();
            format!("{}.{}.{}.***", p[0], p[1], p[2])
        }),
    ] {
        let err = token::verify(&bad, &ca, now()).unwrap_err();
        assert!(
            matches!(err, TokenError::Malformed { .. }),
            "{label}: {err:?}"
        );
    }
}

#[test]
fn ca_hash_matches_checks_the_downloaded_ca() {
    let (ca1, ca2) = (ca(), ca());
    let t = token::create(&ca1, token::DEFAULT_TTL, now());
    assert!(token::ca_hash_matches(&t, ca1.cert_der()));
    assert!(!token::ca_hash_matches(&t, ca2.cert_der()));
    assert!(!token::ca_hash_matches("garbage", ca1.cert_der()));
    assert!(!token::ca_hash_matches(&t, b""));
}
