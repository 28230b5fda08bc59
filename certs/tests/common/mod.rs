//! Shared test helpers: a fixed clock and chain verification with rustls-webpki, the verifier
//! rustls itself uses, so "chains" here means "a rustls peer would accept it".

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

use causeway_certs::{CertificateAuthority, CertificateDer, Validity};

/// A fixed "now" (2026-01-01T00:00:00Z) so tests do not depend on the wall clock.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap()
}

pub fn year() -> Validity {
    Validity::days_from(now(), 365)
}

pub fn ca() -> CertificateAuthority {
    CertificateAuthority::generate(Validity::days_from(now(), 3650)).unwrap()
}

/// Verifies `leaf` chains directly to `root` for `usage` at time `at`.
pub fn verify_chain(
    leaf: &CertificateDer<'_>,
    root: &CertificateDer<'_>,
    usage: webpki::KeyUsage,
    at: OffsetDateTime,
) -> Result<(), webpki::Error> {
    let anchor = webpki::anchor_from_trusted_cert(root)?;
    let ee = webpki::EndEntityCert::try_from(leaf)?;
    let time = UnixTime::since_unix_epoch(Duration::from_secs(at.unix_timestamp() as u64));
    ee.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &[anchor],
        &[],
        time,
        usage,
        None,
        None,
    )
    .map(|_| ())
}
