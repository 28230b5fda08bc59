//! The OpenAPI document cannot drift: `docs/openapi.json` is byte for byte what the code
//! generates (regenerate with `CAUSEWAY_BLESS=1 cargo test -p causeway-cloudhub --test openapi`),
//! every documented operation is routed (a real request does not reach the fallback), the router
//! has no route added outside the documented list, `/v1/openapi.json` serves the document, and
//! real answers carry the fields their schemas name.

extern crate causeway_cloudhub as cloudhub;

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use cloudhub::HubConfig;
use common::Cloud;
use serde_json::Value;
use tower::ServiceExt as _;

fn committed_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
}

#[test]
fn the_committed_document_is_the_generated_one() {
    let generated = cloudhub::api::openapi_json();
    let path = committed_path();
    if std::env::var_os("CAUSEWAY_BLESS").is_some() {
        std::fs::write(&path, generated).expect("write docs/openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json differs from the document the code generates; regenerate it with \
         `CAUSEWAY_BLESS=1 cargo test -p causeway-cloudhub --test openapi` and commit it"
    );
    let doc: Value = serde_json::from_str(generated).expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");
}

/// Every (method, path) of the document, with `{param}`s filled in.
fn operations() -> Vec<(Method, String, String)> {
    let doc: Value = serde_json::from_str(cloudhub::api::openapi_json()).expect("JSON");
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("item").keys() {
            let concrete = path
                .replace("{id}", "edge-x")
                .replace("{msg_id}", "m-1")
                .replace("{name}", "nobody")
                .replace("{port}", "8080")
                .replace("{path}", "a/b");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            out.push((m, path.clone(), concrete));
        }
    }
    out
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_nothing_else() {
    let cloud = Cloud::start(HubConfig::default()).await;
    let router = cloudhub::api::router(cloud.hub.clone());
    let ops = operations();
    let paths: BTreeSet<&str> = ops.iter().map(|(_, p, _)| p.as_str()).collect();
    assert!(paths.len() >= 10, "{paths:?}");
    for (method, path, concrete) in &ops {
        if path == "/v1/messages" {
            continue; // A stream that never ends; routed if the others are (same list).
        }
        let body = if *method == Method::POST { "{}" } else { "" };
        let resp = router
            .clone()
            .oneshot(
                Request::builder()
                    .method(method.clone())
                    .uri(concrete.as_str())
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .expect("request"),
            )
            .await
            .expect("answer");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&bytes);
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !text.contains("no such endpoint"),
            "{method} {path} is documented but not routed"
        );
    }
    // The router has no route but the documented list: api.rs adds none by hand.
    let source = include_str!("../src/api.rs");
    assert!(
        !source.contains(".route(\"") && !source.contains(".nest("),
        "a route added outside documented_routes() would be missing from the OpenAPI document"
    );
    // An undocumented path reaches the fallback.
    let resp = router
        .oneshot(Request::get("/v1/nope").body(Body::empty()).expect("req"))
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    cloud.stop();
}

#[tokio::test]
async fn the_document_is_served_and_real_answers_match_their_schemas() {
    let cloud = Cloud::start(HubConfig::default()).await;
    let router = cloudhub::api::router(cloud.hub.clone());
    let get = |uri: &'static str| {
        let router = router.clone();
        async move {
            let resp = router
                .oneshot(Request::get(uri).body(Body::empty()).expect("req"))
                .await
                .expect("answer");
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
                .await
                .expect("body");
            (
                status,
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            )
        }
    };
    let (status, served) = get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let doc: Value = serde_json::from_str(cloudhub::api::openapi_json()).expect("JSON");
    assert_eq!(served, doc);

    // An error's keys are ErrorBody's properties.
    let (status, err) = get("/v1/nodes/nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let props = |schema: &str| -> BTreeSet<String> {
        doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {schema}"))
            .keys()
            .cloned()
            .collect()
    };
    let keys: BTreeSet<String> = err.as_object().expect("object").keys().cloned().collect();
    assert_eq!(keys, props("ErrorBody"));
    cloud.stop();
}
