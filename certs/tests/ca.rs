//! Issuing: the CA, server and node certificates chain to the CA for the right usage only, carry
//! KubeEdge's subjects, survive a PEM round trip of the CA, and expire when they should.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use rustls_pki_types::ServerName;
use x509_parser::extensions::GeneralName;

use causeway_certs::{
    CertError, CertificateAuthority, Identity, NodeId, TrustAnchors, Validity, node_id_from_cert,
};
use common::{ca, now, verify_chain, year};

fn parse(der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn cn(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    cert.subject()
        .iter_common_name()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

fn orgs(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    cert.subject()
        .iter_organization()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn ca_is_a_self_signed_p256_ca() {
    let ca = ca();
    let cert = parse(ca.cert_der());
    assert!(cert.is_ca());
    assert_eq!(cn(&cert), ["Causeway CA"]);
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert_eq!(bc.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.digital_signature());
    cert.verify_signature(None)
        .expect("self-signature verifies");
    assert_eq!(
        cert.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    assert!(ca.key_pem().starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
    assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert_eq!(ca.trust_anchors().roots, vec![ca.cert_der().clone()]);
}

#[test]
fn serials_are_random() {
    let ca = ca();
    let node = NodeId::new("edge-1").unwrap();
    let a = ca.issue_node(&node, year()).unwrap();
    let b = ca.issue_node(&node, year()).unwrap();
    let serial = |i: &causeway_certs::IssuedCert| parse(&i.identity.chain[0]).raw_serial().to_vec();
    assert_ne!(serial(&a), serial(&b));
    assert_eq!(serial(&a).len(), 16);
}

#[test]
fn server_cert_has_kubeedge_subject_sans_and_server_auth_only() {
    let ca = ca();
    let ip = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10));
    let issued = ca
        .issue_server(&["cloud.example.com".into()], &[ip], year())
        .unwrap();
    let leaf = &issued.identity.chain[0];
    assert_eq!(issued.identity.chain.len(), 1, "leaf only");
    let cert = parse(leaf);
    assert_eq!(cn(&cert), ["KubeEdge"]);
    assert_eq!(orgs(&cert), ["KubeEdge"]);
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert!(sans.contains(&GeneralName::DNSName("cloud.example.com")));
    assert!(sans.contains(&GeneralName::IPAddress(&[192, 168, 1, 10])));

    verify_chain(leaf, ca.cert_der(), webpki::KeyUsage::server_auth(), now()).unwrap();
    assert!(verify_chain(leaf, ca.cert_der(), webpki::KeyUsage::client_auth(), now()).is_err());
    let ee = webpki::EndEntityCert::try_from(leaf).unwrap();
    ee.verify_is_valid_for_subject_name(&ServerName::from(ip))
        .unwrap();
    ee.verify_is_valid_for_subject_name(&ServerName::try_from("cloud.example.com").unwrap())
        .unwrap();
    assert!(
        ee.verify_is_valid_for_subject_name(&ServerName::try_from("evil.example").unwrap())
            .is_err()
    );
    // The PEM pair parses back into the same identity.
    let again = Identity::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
    assert_eq!(again.chain, issued.identity.chain);
}

#[test]
fn server_cert_needs_a_san_and_a_valid_dns_name() {
    let ca = ca();
    assert!(matches!(
        ca.issue_server(&[], &[], year()),
        Err(CertError::NoSubjectAltNames)
    ));
    assert!(matches!(
        ca.issue_server(&["bad\u{e9}name".into()], &[], year()),
        Err(CertError::InvalidDnsName { .. })
    ));
}

#[test]
fn node_cert_has_node_subject_and_client_auth_only() {
    let ca = ca();
    let node = NodeId::new("edge-1").unwrap();
    let issued = ca.issue_node(&node, year()).unwrap();
    let leaf = &issued.identity.chain[0];
    let cert = parse(leaf);
    assert_eq!(cn(&cert), ["system:node:edge-1"]);
    assert_eq!(orgs(&cert), ["system:nodes"]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(cert.subject_alternative_name().unwrap().is_none());
    verify_chain(leaf, ca.cert_der(), webpki::KeyUsage::client_auth(), now()).unwrap();
    assert!(verify_chain(leaf, ca.cert_der(), webpki::KeyUsage::server_auth(), now()).is_err());
    assert_eq!(node_id_from_cert(leaf).unwrap(), node);
}

#[test]
fn node_cert_from_another_ca_does_not_chain() {
    let (ca1, ca2) = (ca(), ca());
    let issued = ca1
        .issue_node(&NodeId::new("edge-1").unwrap(), year())
        .unwrap();
    let err = verify_chain(
        &issued.identity.chain[0],
        ca2.cert_der(),
        webpki::KeyUsage::client_auth(),
        now(),
    );
    // Both CAs are named "Causeway CA", so the verifier tries ca2 and its signature check fails.
    assert!(
        matches!(
            err,
            Err(webpki::Error::InvalidSignatureForPublicKey | webpki::Error::UnknownIssuer)
        ),
        "{err:?}"
    );
}

#[test]
fn expired_and_not_yet_valid_certs_are_rejected_by_the_verifier() {
    let ca = ca();
    let past = Validity {
        not_before: now() - time::Duration::days(30),
        not_after: now() - time::Duration::days(1),
    };
    let issued = ca
        .issue_node(&NodeId::new("edge-1").unwrap(), past)
        .unwrap();
    let leaf = &issued.identity.chain[0];
    let err = verify_chain(leaf, ca.cert_der(), webpki::KeyUsage::client_auth(), now());
    assert!(
        matches!(err, Err(webpki::Error::CertExpired { .. })),
        "{err:?}"
    );
    // Within its window it was fine: the failure is the time, nothing else.
    verify_chain(
        leaf,
        ca.cert_der(),
        webpki::KeyUsage::client_auth(),
        now() - time::Duration::days(10),
    )
    .unwrap();
    let err = verify_chain(
        leaf,
        ca.cert_der(),
        webpki::KeyUsage::client_auth(),
        now() - time::Duration::days(31),
    );
    assert!(
        matches!(err, Err(webpki::Error::CertNotValidYet { .. })),
        "{err:?}"
    );
}

#[test]
fn empty_validity_is_refused() {
    let ca = ca();
    let backwards = Validity {
        not_before: now(),
        not_after: now() - time::Duration::seconds(1),
    };
    assert!(matches!(
        CertificateAuthority::generate(backwards),
        Err(CertError::InvalidValidity)
    ));
    assert!(matches!(
        ca.issue_node(
            &NodeId::new("a").unwrap(),
            Validity {
                not_before: now(),
                not_after: now()
            }
        ),
        Err(CertError::InvalidValidity)
    ));
}

#[test]
fn ca_reloaded_from_pem_issues_certs_that_chain_to_the_original() {
    let ca = ca();
    let reloaded = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
    assert_eq!(reloaded.cert_der(), ca.cert_der());
    assert_eq!(reloaded.key_pem(), ca.key_pem());
    let issued = reloaded
        .issue_node(&NodeId::new("edge-2").unwrap(), year())
        .unwrap();
    verify_chain(
        &issued.identity.chain[0],
        ca.cert_der(),
        webpki::KeyUsage::client_auth(),
        now(),
    )
    .unwrap();
}

#[test]
fn ca_loads_from_a_pkcs8_key() {
    let ca = ca();
    // Re-wrap the SEC1 key as PKCS#8 through rcgen/ring to get the other PEM form.
    let pkcs8_pem = pkcs8_pem_of(&ca.key_pem());
    assert!(pkcs8_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let reloaded = CertificateAuthority::from_pem(&ca.cert_pem(), &pkcs8_pem).unwrap();
    assert_eq!(
        reloaded.key_pem(),
        ca.key_pem(),
        "same key, same SEC1 output"
    );
}

/// Converts a SEC1 PEM key into PKCS#8 PEM via an Identity round trip through rcgen.
fn pkcs8_pem_of(sec1_pem: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivateSec1KeyDer::from_pem_slice(sec1_pem.as_bytes()).unwrap();
    // SEC1 -> PKCS#8: wrap the ECPrivateKey in a PrivateKeyInfo for id-ecPublicKey/P-256.
    let inner = der.secret_sec1_der();
    let alg: &[u8] = &[
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(alg);
    body.push(0x04);
    body.push(inner.len() as u8);
    body.extend_from_slice(inner);
    let mut der = vec![0x30, 0x81, body.len() as u8];
    der.extend_from_slice(&body);
    let pair = rcgen::KeyPair::try_from(der.as_slice()).expect("ring accepts the PKCS#8");
    pair.serialize_pem()
}

#[test]
fn ca_from_pem_refuses_a_leaf_or_a_foreign_key() {
    let ca = ca();
    let other = common::ca();
    let server = ca
        .issue_server(&[], &[IpAddr::V4(Ipv4Addr::LOCALHOST)], year())
        .unwrap();
    assert!(matches!(
        CertificateAuthority::from_pem(&server.cert_pem, &server.key_pem),
        Err(CertError::NotCa)
    ));
    assert!(matches!(
        CertificateAuthority::from_pem(&ca.cert_pem(), &other.key_pem()),
        Err(CertError::KeyMismatch)
    ));
    assert!(matches!(
        CertificateAuthority::from_pem("", &ca.key_pem()),
        Err(CertError::MissingPem {
            what: "certificate"
        })
    ));
    assert!(matches!(
        CertificateAuthority::from_pem(&ca.cert_pem(), ""),
        Err(CertError::MissingPem {
            what: "private key"
        })
    ));
}

#[test]
fn identity_checks_key_against_leaf() {
    let ca = ca();
    let a = ca.issue_node(&NodeId::new("a").unwrap(), year()).unwrap();
    let b = ca.issue_node(&NodeId::new("b").unwrap(), year()).unwrap();
    assert!(matches!(
        Identity::from_pem(&a.cert_pem, &b.key_pem),
        Err(CertError::KeyMismatch)
    ));
    // A chain file (leaf + CA) keeps its order.
    let chain = format!("{}{}", a.cert_pem, ca.cert_pem());
    let id = Identity::from_pem(&chain, &a.key_pem).unwrap();
    assert_eq!(id.chain.len(), 2);
    assert_eq!(&id.chain[1], ca.cert_der());
    let cloned = id.clone();
    assert_eq!(cloned.key.secret_der(), id.key.secret_der());
    assert!(
        !format!("{id:?}").contains("BEGIN"),
        "Debug never prints key material"
    );
}

#[test]
fn trust_anchors_parse_and_reject_garbage() {
    let ca = ca();
    assert_eq!(
        TrustAnchors::from_pem(&ca.cert_pem()).unwrap().roots[0],
        *ca.cert_der()
    );
    assert!(matches!(
        TrustAnchors::from_pem("hello"),
        Err(CertError::MissingPem { .. })
    ));
    let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    assert!(matches!(
        TrustAnchors::from_pem(junk),
        Err(CertError::InvalidCertificate { .. })
    ));
}

#[test]
fn a_kubeedge_style_ca_loads_and_issues_certs_that_chain() {
    // What KubeEdge's PrepareAllCerts makes (B§9.1): CN "KubeEdge" as a PrintableString (Go's
    // choice), serial 1024, KU keyEncipherment/digitalSignature/certSign, EKU server+client,
    // CA:TRUE without a path length. The issuer name we write must match it byte for byte.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        rcgen::DnValue::PrintableString("KubeEdge".try_into().unwrap()),
    );
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x04, 0x00]));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyEncipherment,
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyCertSign,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now() - time::Duration::days(1);
    params.not_after = now() + time::Duration::days(36_400);
    let cert = params.self_signed(&key).unwrap();

    let ca = CertificateAuthority::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
    let issued = ca
        .issue_node(&NodeId::new("edge-1").unwrap(), year())
        .unwrap();
    let leaf = parse(&issued.identity.chain[0]);
    assert_eq!(leaf.issuer().as_raw(), parse(cert.der()).subject().as_raw());
    verify_chain(
        &issued.identity.chain[0],
        cert.der(),
        webpki::KeyUsage::client_auth(),
        now(),
    )
    .unwrap();
}
