//! The certificate bootstrap server over real HTTPS with a real client: KubeEdge's `/ca.crt` and
//! `/edge.crt` flows, and the places where Causeway is stricter (CSR subject, renewal only for
//! one's own name).

extern crate causeway_cloudhub as cloudhub;

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use certs::{Identity, NodeId};
use cloudhub::bootstrap::{self, BootstrapConfig};
use common::Pki;
use reqwest::StatusCode;
use tokio::sync::oneshot;

struct Server {
    addr: SocketAddr,
    pki: Pki,
    _stop: oneshot::Sender<()>,
}

async fn start() -> Server {
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = BootstrapConfig::new(Arc::clone(&pki.ca), pki.server.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        bootstrap::serve(listener, config, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    Server {
        addr,
        pki,
        _stop: stop,
    }
}

/// A client trusting the CA, presenting `identity` if given.
fn client(pki: &Pki, identity: Option<&Identity>) -> reqwest::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der().clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let tls = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .expect("client")
}

fn url(server: &Server, path: &str) -> String {
    // The server certificate names 127.0.0.1.
    format!("https://127.0.0.1:{}{path}", server.addr.port())
}

fn csr(node: &str) -> Vec<u8> {
    certs::generate_node_csr(&NodeId::new(node).expect("id"))
        .expect("csr")
        .0
}

fn jwt(pki: &Pki) -> String {
    let token = certs::token::create(
        &pki.ca,
        certs::token::DEFAULT_TTL,
        time::OffsetDateTime::now_utc(),
    );
    certs::token::split(&token).expect("split").1.to_owned()
}

#[tokio::test]
async fn ca_is_served_as_der() {
    let server = start().await;
    let resp = client(&server.pki, None)
        .get(url(&server, "/ca.crt"))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.bytes().await.expect("body");
    assert_eq!(&body[..], server.pki.ca.cert_der().as_ref());
    // The edge checks it against the token's hash.
    let token = certs::token::create(
        &server.pki.ca,
        certs::token::DEFAULT_TTL,
        time::OffsetDateTime::now_utc(),
    );
    assert!(certs::token::ca_hash_matches(&token, &body));
}

#[tokio::test]
async fn a_token_holder_gets_a_certificate_for_its_node() {
    let server = start().await;
    let resp = client(&server.pki, None)
        .get(url(&server, "/edge.crt"))
        .header("NodeName", "edge-1")
        .header("Authorization", format!("Bearer {}", jwt(&server.pki)))
        .body(csr("edge-1"))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::OK);
    let der = resp.bytes().await.expect("body");
    let node = certs::node_id_from_cert(&der).expect("a node certificate");
    assert_eq!(node.as_str(), "edge-1");
}

#[tokio::test]
async fn bad_or_missing_tokens_get_401_with_a_reason() {
    let server = start().await;
    let c = client(&server.pki, None);
    let other = Pki::new();
    for auth in [
        None,
        Some("Bearer not.a.jwt".to_owned()),
        Some(format!("Bearer {}", jwt(&other))),
        Some(format!("Basic {}", jwt(&server.pki))),
        Some(format!("Bearer {} extra", jwt(&server.pki))),
    ] {
        let mut req = c
            .get(url(&server, "/edge.crt"))
            .header("NodeName", "edge-1")
            .body(csr("edge-1"));
        if let Some(auth) = &auth {
            req = req.header("Authorization", auth);
        }
        let resp = req.send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        let text = resp.text().await.expect("text");
        assert!(!text.is_empty(), "a reason is given");
    }
}

#[tokio::test]
async fn the_csr_must_name_the_requested_node() {
    let server = start().await;
    let resp = client(&server.pki, None)
        .get(url(&server, "/edge.crt"))
        .header("NodeName", "edge-2")
        .header("Authorization", format!("Bearer {}", jwt(&server.pki)))
        .body(csr("edge-1"))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = client(&server.pki, None)
        .get(url(&server, "/edge.crt"))
        .header("NodeName", "edge-1")
        .header("Authorization", format!("Bearer {}", jwt(&server.pki)))
        .body(b"not a csr".to_vec())
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = client(&server.pki, None)
        .get(url(&server, "/edge.crt"))
        .header("Authorization", format!("Bearer {}", jwt(&server.pki)))
        .body(csr("edge-1"))
        .send()
        .await
        .expect("get");
    assert_eq!(
        resp.status(),
        StatusCode::BAD_REQUEST,
        "NodeName is required"
    );
}

#[tokio::test]
async fn a_node_may_renew_only_its_own_certificate() {
    let server = start().await;
    let current = server.pki.node("edge-1");
    let c = client(&server.pki, Some(&current));
    let resp = c
        .get(url(&server, "/edge.crt"))
        .header("NodeName", "edge-1")
        .body(csr("edge-1"))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::OK, "renewal needs no token");
    let resp = c
        .get(url(&server, "/edge.crt"))
        .header("NodeName", "edge-2")
        .header("Authorization", format!("Bearer {}", jwt(&server.pki)))
        .body(csr("edge-2"))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let text = resp.text().await.expect("text");
    assert!(text.contains("edge-1"), "{text}");
}

#[tokio::test]
async fn csr_bodies_over_one_mebibyte_are_refused() {
    let server = start().await;
    let resp = client(&server.pki, None)
        .get(url(&server, "/edge.crt"))
        .header("NodeName", "edge-1")
        .header("Authorization", format!("Bearer {}", jwt(&server.pki)))
        .body(vec![0u8; bootstrap::MAX_CSR_BYTES + 1])
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
}
