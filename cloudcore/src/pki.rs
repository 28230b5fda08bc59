//! The cloud's key material: loads the CA and the server certificate from the configured files,
//! creating what is missing on first start (a CA, and a server certificate for the configured
//! advertise addresses and DNS names), in the layout `causeway certs init` writes.

use std::path::Path;

use anyhow::Context as _;
use certs::{CertificateAuthority, Identity, Validity};
use cloudhub::config::CloudHubConfig;

/// Lifetime of a CA or server certificate created here, in days (as `causeway certs init`).
const LONG_LIVED_DAYS: u32 = 3650;

/// The CA (it signs node certificates and keys bootstrap tokens) and the server identity.
pub(crate) struct Pki {
    pub(crate) ca: CertificateAuthority,
    pub(crate) server: Identity,
}

/// Loads the key material, creating the missing parts.
pub(crate) fn ensure(config: &CloudHubConfig) -> anyhow::Result<Pki> {
    let tls = &config.tls;
    let (ca_cert, ca_key) = (tls.ca_cert_path(), tls.ca_key_path());
    let now = time::OffsetDateTime::now_utc();
    let ca = if ca_cert.exists() || ca_key.exists() {
        CertificateAuthority::from_pem(&read(&ca_cert)?, &read(&ca_key)?)
            .with_context(|| format!("loading the CA from {}", ca_cert.display()))?
    } else {
        let ca = CertificateAuthority::generate(Validity::days_from(now, LONG_LIVED_DAYS))?;
        certs::files::write_key(&ca_key, &ca.key_pem())?;
        certs::files::write_cert(&ca_cert, &ca.cert_pem())?;
        tracing::info!(cert = %ca_cert.display(), key = %ca_key.display(), "created a new CA");
        ca
    };
    let (server_cert, server_key) = (tls.server_cert_path(), tls.server_key_path());
    let server = if server_cert.exists() || server_key.exists() {
        Identity::load(&server_cert, &server_key)
            .with_context(|| format!("loading the server certificate {}", server_cert.display()))?
    } else {
        let issued = ca.issue_server(
            &config.dns_names,
            &config.advertise_address,
            Validity::days_from(now, LONG_LIVED_DAYS),
        )?;
        certs::files::write_key(&server_key, &issued.key_pem)?;
        certs::files::write_cert(&server_cert, &issued.cert_pem)?;
        tracing::info!(cert = %server_cert.display(), dns = ?config.dns_names,
            ips = ?config.advertise_address, "created a server certificate");
        // Served as a restart will load it, byte for byte: the QUIC stateless-reset and
        // connection-id keys derive from the key's bytes, and must survive the restart.
        drop(issued);
        Identity::load(&server_cert, &server_key).with_context(|| {
            format!(
                "loading the new server certificate {}",
                server_cert.display()
            )
        })?
    };
    Ok(Pki { ca, server })
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
