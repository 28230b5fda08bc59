//! Reading the node id out of a certificate, and signing node CSRs: only `system:node:<id>` with
//! O `system:nodes` is a node, and a CSR gets the node identity it was submitted for or nothing.

mod common;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use causeway_certs::{CertError, Identity, NodeId, generate_node_csr, node_id_from_cert};
use common::{ca, now, verify_chain, year};

fn node(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

/// A self-signed certificate with the given subject, to probe `node_id_from_cert` (which only
/// reads the subject; chain verification is TLS's job).
fn cert_with_subject(parts: &[(DnType, &str)]) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for (ty, v) in parts {
        dn.push(ty.clone(), *v);
    }
    params.distinguished_name = dn;
    params.self_signed(&key).unwrap().der().to_vec()
}

fn csr_with(parts: &[(DnType, &str)], customise: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for (ty, v) in parts {
        dn.push(ty.clone(), *v);
    }
    params.distinguished_name = dn;
    customise(&mut params);
    params.serialize_request(&key).unwrap().der().to_vec()
}

#[test]
fn node_id_from_good_cert() {
    let der = cert_with_subject(&[
        (DnType::OrganizationName, "system:nodes"),
        (DnType::CommonName, "system:node:edge-9"),
    ]);
    assert_eq!(node_id_from_cert(&der).unwrap(), node("edge-9"));
}

#[test]
fn node_id_refuses_non_node_subjects() {
    let cases: &[(&str, &[(DnType, &str)])] = &[
        (
            "wrong prefix",
            &[
                (DnType::OrganizationName, "system:nodes"),
                (DnType::CommonName, "edge-9"),
            ],
        ),
        (
            "user prefix",
            &[
                (DnType::OrganizationName, "system:nodes"),
                (DnType::CommonName, "system:nodes:edge-9"),
            ],
        ),
        ("missing CN", &[(DnType::OrganizationName, "system:nodes")]),
        (
            "empty id",
            &[
                (DnType::OrganizationName, "system:nodes"),
                (DnType::CommonName, "system:node:"),
            ],
        ),
        (
            "invalid id",
            &[
                (DnType::OrganizationName, "system:nodes"),
                (DnType::CommonName, "system:node:Edge_9"),
            ],
        ),
        (
            "path in id",
            &[
                (DnType::OrganizationName, "system:nodes"),
                (DnType::CommonName, "system:node:../x"),
            ],
        ),
        ("missing O", &[(DnType::CommonName, "system:node:edge-9")]),
        (
            "wrong O",
            &[
                (DnType::OrganizationName, "KubeEdge"),
                (DnType::CommonName, "system:node:edge-9"),
            ],
        ),
    ];
    for (label, subject) in cases {
        let der = cert_with_subject(subject);
        let err = node_id_from_cert(&der).unwrap_err();
        assert!(
            matches!(err, CertError::NotNodeCertificate { .. }),
            "{label}: {err:?}"
        );
    }
}

#[test]
fn node_id_refuses_extra_groups_and_two_cns() {
    // rcgen keeps one value per DnType; a custom type with the same OID adds a second O / CN.
    let o = DnType::CustomDnType(vec![2, 5, 4, 10]);
    let cn = DnType::CustomDnType(vec![2, 5, 4, 3]);
    let extra_group = cert_with_subject(&[
        (DnType::OrganizationName, "system:nodes"),
        (o, "system:masters"),
        (DnType::CommonName, "system:node:edge-9"),
    ]);
    let two_cns = cert_with_subject(&[
        (DnType::OrganizationName, "system:nodes"),
        (DnType::CommonName, "system:node:edge-9"),
        (cn, "system:node:edge-8"),
    ]);
    for (label, der) in [("extra group", extra_group), ("two CNs", two_cns)] {
        let err = node_id_from_cert(&der).unwrap_err();
        assert!(
            matches!(err, CertError::NotNodeCertificate { .. }),
            "{label}: {err:?}"
        );
    }
    // The CA and server certificates are not node certificates.
    let ca = ca();
    let server = ca
        .issue_server(
            &[],
            &[std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
            year(),
        )
        .unwrap();
    for der in [ca.cert_der().to_vec(), server.identity.chain[0].to_vec()] {
        assert!(matches!(
            node_id_from_cert(&der),
            Err(CertError::NotNodeCertificate { .. })
        ));
    }
}

#[test]
fn node_id_from_garbage() {
    for bad in [&[][..], &[0x30, 0x03, 0x01], b"not a certificate"] {
        assert!(matches!(
            node_id_from_cert(bad),
            Err(CertError::InvalidCertificate { .. })
        ));
    }
}

#[test]
fn generated_csr_has_kubeedge_subject() {
    let (csr, key_pem) = generate_node_csr(&node("edge-1")).unwrap();
    let (rest, parsed) = X509CertificationRequest::from_der(&csr).unwrap();
    assert!(rest.is_empty());
    parsed.verify_signature().unwrap();
    let subject = parsed.certification_request_info.subject.to_string();
    assert_eq!(
        subject,
        "C=CN, O=system:nodes, L=Hangzhou, ST=Zhejiang, CN=system:node:edge-1"
    );
    assert!(
        parsed
            .requested_extensions()
            .is_none_or(|mut e| e.next().is_none()),
        "no SANs"
    );
    assert!(key_pem.starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
}

#[test]
fn signed_csr_is_a_node_cert_for_the_csr_key() {
    let ca = ca();
    let id = node("edge-1");
    let (csr, key_pem) = generate_node_csr(&id).unwrap();
    let cert = ca.sign_node_csr(&csr, &id, year()).unwrap();
    verify_chain(&cert, ca.cert_der(), webpki::KeyUsage::client_auth(), now()).unwrap();
    assert!(verify_chain(&cert, ca.cert_der(), webpki::KeyUsage::server_auth(), now()).is_err());
    assert_eq!(node_id_from_cert(&cert).unwrap(), id);
    // The edge's own key goes with the signed certificate.
    let cert_pem = pem_cert(&cert);
    Identity::from_pem(&cert_pem, &key_pem).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
    assert_eq!(
        parsed.subject().to_string(),
        "O=system:nodes, CN=system:node:edge-1"
    );
    assert_eq!(
        parsed.validity().not_after.timestamp(),
        year().not_after.unix_timestamp()
    );
}

#[test]
fn csr_for_another_node_is_refused() {
    let ca = ca();
    let (csr, _) = generate_node_csr(&node("edge-2")).unwrap();
    match ca.sign_node_csr(&csr, &node("edge-1"), year()) {
        Err(CertError::CsrSubjectMismatch { expected, found }) => {
            assert_eq!(expected, "system:node:edge-1");
            assert_eq!(found.as_deref(), Some("system:node:edge-2"));
        }
        other => panic!("expected CsrSubjectMismatch, got {other:?}"),
    }
    let no_cn = csr_with(&[(DnType::OrganizationName, "system:nodes")], |_| {});
    assert!(matches!(
        ca.sign_node_csr(&no_cn, &node("edge-1"), year()),
        Err(CertError::CsrSubjectMismatch { found: None, .. })
    ));
}

#[test]
fn csr_extras_are_not_copied() {
    let ca = ca();
    let csr = csr_with(
        &[
            (DnType::OrganizationName, "system:masters"),
            (DnType::CommonName, "system:node:edge-1"),
        ],
        |p| {
            p.subject_alt_names
                .push(SanType::DnsName("cloud.example.com".try_into().unwrap()));
            p.extended_key_usages
                .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        },
    );
    let cert = ca.sign_node_csr(&csr, &node("edge-1"), year()).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
    assert_eq!(
        parsed.subject().to_string(),
        "O=system:nodes, CN=system:node:edge-1"
    );
    assert!(parsed.subject_alternative_name().unwrap().is_none());
    let eku = parsed.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(verify_chain(&cert, ca.cert_der(), webpki::KeyUsage::server_auth(), now()).is_err());
}

#[test]
fn garbage_tampered_and_foreign_key_csrs_are_refused() {
    let ca = ca();
    let id = node("edge-1");
    let (csr, _) = generate_node_csr(&id).unwrap();

    let mut tampered = csr.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01; // inside the signature
    let mut tampered_subject = csr.clone();
    let pos = tampered_subject
        .windows(6)
        .position(|w| w == b"edge-1")
        .unwrap();
    tampered_subject[pos + 5] = b'2'; // edge-2 under edge-1's signature

    let p384 = {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "system:node:edge-1");
        params.serialize_request(&key).unwrap().der().to_vec()
    };
    let mut trailing = csr.clone();
    trailing.push(0);

    for (label, bad) in [
        ("empty", Vec::new()),
        ("garbage", b"definitely not DER".to_vec()),
        ("truncated", csr[..csr.len() / 2].to_vec()),
        ("tampered signature", tampered),
        ("tampered subject", tampered_subject),
        ("P-384 key", p384),
        ("trailing byte", trailing),
    ] {
        let err = ca.sign_node_csr(&bad, &id, year()).unwrap_err();
        assert!(
            matches!(err, CertError::InvalidCsr { .. }),
            "{label}: {err:?}"
        );
    }
}

fn pem_cert(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<_> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}
