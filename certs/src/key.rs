//! ECDSA P-256 private keys in their two PEM forms, SEC1 (`EC PRIVATE KEY`, what KubeEdge writes)
//! and PKCS#8 (`PRIVATE KEY`, what ring and rcgen take), plus PEM text encoding. Conversions go
//! through `(d, Q)` so the SEC1 bytes we emit are exactly Go's `x509.MarshalECPrivateKey` output,
//! which matters because KubeEdge uses those bytes as the token HMAC key (B§9.2).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::CertError;

/// OID 1.2.840.10045.2.1 (id-ecPublicKey), DER-encoded with tag and length.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// OID 1.2.840.10045.3.1.7 (prime256v1 / P-256), DER-encoded with tag and length.
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_CONTEXT_0: u8 = 0xa0;
const TAG_CONTEXT_1: u8 = 0xa1;

/// A P-256 private key as its scalar and uncompressed public point.
pub(crate) struct P256Key {
    /// The private scalar, big-endian, left-padded to 32 bytes.
    d: [u8; 32],
    /// The uncompressed public point `04 || X || Y`.
    public: [u8; 65],
}

impl P256Key {
    /// Reads a P-256 key from PKCS#8 or SEC1 DER.
    pub(crate) fn from_key_der(key: &PrivateKeyDer<'_>) -> Result<Self, CertError> {
        match key {
            PrivateKeyDer::Pkcs8(k) => Self::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Sec1(k) => Self::from_sec1(k.secret_sec1_der()),
            _ => Err(CertError::UnsupportedKey {
                reason: "RSA keys are not supported; Causeway uses ECDSA P-256".into(),
            }),
        }
    }

    /// Reads the first private key block of a PEM text (SEC1 or PKCS#8).
    pub(crate) fn from_pem(pem: &str) -> Result<Self, CertError> {
        Self::from_key_der(&parse_key_pem(pem)?)
    }

    fn from_pkcs8(der: &[u8]) -> Result<Self, CertError> {
        let bad = |what: &str| CertError::InvalidKey {
            reason: format!("PKCS#8: {what}"),
        };
        let (info, rest) = read_tlv(der, TAG_SEQUENCE).ok_or_else(|| bad("not a SEQUENCE"))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let (_version, info) = read_tlv(info, TAG_INTEGER).ok_or_else(|| bad("no version"))?;
        let (alg, info) = read_tlv(info, TAG_SEQUENCE).ok_or_else(|| bad("no algorithm"))?;
        let Some(curve) = alg.strip_prefix(OID_EC_PUBLIC_KEY) else {
            return Err(CertError::UnsupportedKey {
                reason: "not an EC key".into(),
            });
        };
        if curve != OID_P256 {
            return Err(CertError::UnsupportedKey {
                reason: "EC key not on P-256".into(),
            });
        }
        let (inner, _attributes) =
            read_tlv(info, TAG_OCTET_STRING).ok_or_else(|| bad("no private key"))?;
        Self::from_sec1(inner)
    }

    fn from_sec1(der: &[u8]) -> Result<Self, CertError> {
        let bad = |what: &str| CertError::InvalidKey {
            reason: format!("EC private key: {what}"),
        };
        let (body, rest) = read_tlv(der, TAG_SEQUENCE).ok_or_else(|| bad("not a SEQUENCE"))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let (version, body) = read_tlv(body, TAG_INTEGER).ok_or_else(|| bad("no version"))?;
        if version != [1] {
            return Err(bad("version is not 1"));
        }
        let (scalar, mut body) =
            read_tlv(body, TAG_OCTET_STRING).ok_or_else(|| bad("no private scalar"))?;
        if scalar.is_empty() || scalar.len() > 32 {
            return Err(CertError::UnsupportedKey {
                reason: "EC key not on P-256".into(),
            });
        }
        let mut d = [0u8; 32];
        d[32 - scalar.len()..].copy_from_slice(scalar);

        if let Some((params, rest)) = read_tlv(body, TAG_CONTEXT_0) {
            if params != OID_P256 {
                return Err(CertError::UnsupportedKey {
                    reason: "EC key not on P-256".into(),
                });
            }
            body = rest;
        }
        let (public_field, _) = read_tlv(body, TAG_CONTEXT_1)
            .ok_or_else(|| bad("no public key (RFC 5915 makes it optional; we need it)"))?;
        let (bits, _) = read_tlv(public_field, TAG_BIT_STRING)
            .ok_or_else(|| bad("public key not a BIT STRING"))?;
        // BIT STRING content: one "unused bits" byte (0), then the point.
        let Some((0, point)) = bits.split_first() else {
            return Err(bad("public key BIT STRING has unused bits"));
        };
        let public: [u8; 65] = point
            .try_into()
            .ok()
            .filter(|p: &[u8; 65]| p[0] == 0x04)
            .ok_or_else(|| bad("public key is not an uncompressed P-256 point"))?;
        Ok(Self { d, public })
    }

    /// The uncompressed public point `04 || X || Y`, as found in a certificate's SPKI.
    pub(crate) fn public_point(&self) -> &[u8] {
        &self.public
    }

    /// SEC1 DER exactly as Go's `x509.MarshalECPrivateKey` writes it: version 1, 32-byte scalar,
    /// `[0]` named curve, `[1]` public point.
    pub(crate) fn sec1_der(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(119);
        body.extend_from_slice(&[TAG_INTEGER, 1, 1]);
        push_tlv(&mut body, TAG_OCTET_STRING, &self.d);
        push_tlv(&mut body, TAG_CONTEXT_0, OID_P256);
        let mut bits = Vec::with_capacity(66);
        bits.push(0);
        bits.extend_from_slice(&self.public);
        let mut bit_string = Vec::with_capacity(68);
        push_tlv(&mut bit_string, TAG_BIT_STRING, &bits);
        push_tlv(&mut body, TAG_CONTEXT_1, &bit_string);
        let mut out = Vec::with_capacity(body.len() + 2);
        push_tlv(&mut out, TAG_SEQUENCE, &body);
        out
    }

    /// PKCS#8 v1 DER in the layout ring generates (no curve inside the inner ECPrivateKey).
    pub(crate) fn pkcs8_der(&self) -> Vec<u8> {
        let mut inner_body = Vec::with_capacity(107);
        inner_body.extend_from_slice(&[TAG_INTEGER, 1, 1]);
        push_tlv(&mut inner_body, TAG_OCTET_STRING, &self.d);
        let mut bits = Vec::with_capacity(66);
        bits.push(0);
        bits.extend_from_slice(&self.public);
        let mut bit_string = Vec::with_capacity(68);
        push_tlv(&mut bit_string, TAG_BIT_STRING, &bits);
        push_tlv(&mut inner_body, TAG_CONTEXT_1, &bit_string);
        let mut inner = Vec::with_capacity(inner_body.len() + 2);
        push_tlv(&mut inner, TAG_SEQUENCE, &inner_body);

        let mut alg = Vec::with_capacity(19);
        alg.extend_from_slice(OID_EC_PUBLIC_KEY);
        alg.extend_from_slice(OID_P256);
        let mut body = Vec::with_capacity(140);
        body.extend_from_slice(&[TAG_INTEGER, 1, 0]);
        push_tlv(&mut body, TAG_SEQUENCE, &alg);
        push_tlv(&mut body, TAG_OCTET_STRING, &inner);
        let mut out = Vec::with_capacity(body.len() + 3);
        push_tlv(&mut out, TAG_SEQUENCE, &body);
        out
    }

    /// The key as an rcgen key pair, for signing.
    pub(crate) fn to_rcgen(&self) -> Result<rcgen::KeyPair, CertError> {
        let der = PrivatePkcs8KeyDer::from(self.pkcs8_der());
        rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ECDSA_P256_SHA256).map_err(
            |e| CertError::InvalidKey {
                reason: e.to_string(),
            },
        )
    }

    /// The key as `EC PRIVATE KEY` PEM (SEC1), the form KubeEdge writes.
    pub(crate) fn sec1_pem(&self) -> String {
        pem_encode("EC PRIVATE KEY", &self.sec1_der())
    }
}

/// Parses the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM text.
pub(crate) fn parse_key_pem(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::MissingPem {
            what: "private key",
        },
        other => CertError::InvalidPem {
            what: "private key",
            reason: other.to_string(),
        },
    })
}

/// Generates a fresh P-256 key pair.
pub(crate) fn generate() -> Result<(rcgen::KeyPair, P256Key), CertError> {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(CertError::Generate)?;
    let key = P256Key::from_pkcs8(pair.serialized_der())?;
    Ok((pair, key))
}

/// PEM-encodes `der` under `label`, 64 characters per line, LF line endings.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // base64 output is ASCII, so splitting at any byte index is a char boundary.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Reads one DER TLV with the expected `tag` from the front of `input`, returning its value and the
/// remaining input, or `None` if the tag differs or the length is malformed or overruns the input.
fn read_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&actual, rest) = input.split_first()?;
    if actual != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => {
            let (&b, rest) = rest.split_first()?;
            (usize::from(b), rest)
        }
        0x82 => {
            let (bytes, rest) = rest.split_at_checked(2)?;
            (usize::from(u16::from_be_bytes([bytes[0], bytes[1]])), rest)
        }
        _ => return None,
    };
    rest.split_at_checked(len)
}

/// Appends a DER TLV; lengths up to 65535 (all this module needs).
fn push_tlv(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.push(0x82);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs8_from_ring_round_trips_and_sec1_matches_go_layout() {
        let (pair, key) = generate().unwrap();
        // Our PKCS#8 layout is byte-identical to ring's.
        assert_eq!(key.pkcs8_der(), pair.serialized_der());
        let sec1 = key.sec1_der();
        // Go: 30 77 02 01 01 04 20 <d> a0 0a <oid> a1 44 03 42 00 04 <X Y>
        assert_eq!(sec1.len(), 121);
        assert_eq!(&sec1[..7], &[0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20]);
        assert_eq!(&sec1[39..41], &[0xa0, 0x0a]);
        assert_eq!(&sec1[51..56], &[0xa1, 0x44, 0x03, 0x42, 0x00]);
        let back = P256Key::from_sec1(&sec1).unwrap();
        assert_eq!(back.d, key.d);
        assert_eq!(back.public, key.public);
        back.to_rcgen().unwrap();
    }

    #[test]
    fn pem_round_trip_both_forms() {
        let (pair, key) = generate().unwrap();
        let from_sec1 = P256Key::from_pem(&key.sec1_pem()).unwrap();
        let from_pkcs8 = P256Key::from_pem(&pair.serialize_pem()).unwrap();
        assert_eq!(from_sec1.public_point(), from_pkcs8.public_point());
        assert!(
            key.sec1_pem()
                .starts_with("-----BEGIN EC PRIVATE KEY-----\n")
        );
    }

    #[test]
    fn rejects_garbage_keys() {
        assert!(matches!(
            P256Key::from_pem(""),
            Err(CertError::MissingPem { .. })
        ));
        let garbage = pem_encode("EC PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x01]);
        assert!(matches!(
            P256Key::from_pem(&garbage),
            Err(CertError::InvalidKey { .. })
        ));
        let truncated = pem_encode("PRIVATE KEY", &[0x30, 0x82, 0xff]);
        assert!(matches!(
            P256Key::from_pem(&truncated),
            Err(CertError::InvalidKey { .. })
        ));
    }
}
