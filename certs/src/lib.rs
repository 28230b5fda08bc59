//! Certificates for Causeway: the CA, the cloud server certificate, node client certificates, CSR
//! signing, the node id carried in a certificate, and KubeEdge's bootstrap token. It opens no
//! sockets and builds no TLS configuration (`transport::tls` does, from [`Identity`] and
//! [`TrustAnchors`]); time is always a parameter.
//!
//! Layout:
//! - [`NodeId`] (`node_id.rs`): the validated node name.
//! - [`Identity`], [`TrustAnchors`], [`Validity`] (`material.rs`): typed material for TLS.
//! - [`CertificateAuthority`], [`node_id_from_cert`], [`generate_node_csr`] (`ca.rs`): issuing.
//! - [`token`]: the bootstrap token (`<ca hash>.<jwt>`).
//! - [`files`]: the on-disk layout ([`files::CertDir`]) and permission-aware writes.
//! - [`CertError`] (`error.rs`).
//!
//! All keys are ECDSA P-256. Key files are written as SEC1 PEM (`EC PRIVATE KEY`, as KubeEdge
//! writes them); SEC1 and PKCS#8 are both accepted on load.

mod ca;
mod error;
pub mod files;
mod key;
mod material;
mod node_id;
pub mod token;

pub use ca::{
    API_CLIENT_ORGANIZATION, CA_COMMON_NAME, CertificateAuthority, IssuedCert, NODE_CN_PREFIX,
    NODE_ORGANIZATION, SERVER_SUBJECT, common_name, generate_node_csr, node_id_from_cert,
};
pub use error::CertError;
pub use material::{Identity, TrustAnchors, Validity};
pub use node_id::{InvalidNodeId, MAX_NODE_ID_LEN, NodeId};
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};
pub use token::{TokenClaims, TokenError};
