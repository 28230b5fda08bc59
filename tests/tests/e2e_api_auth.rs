//! The cloud API's credentials with the real `cloudcore` and `causeway` binaries: open on
//! loopback until the first token exists (made offline with `causeway api-token create --dir`
//! while cloudcore runs), then 401 without a usable token and 403 for a too-small scope, tokens
//! managed through the API and the CLI, revocation at once, and no token ever in the log. An
//! API that leaves loopback is HTTPS and always needs credentials (a token or an API client
//! certificate), and `tls: never` off loopback is refused at start.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_tests::daemon::{
    CloudCore, Daemon, binary, fields, http, http_with, json_of, parse_response,
};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(60);

/// Runs `causeway args` with `env`; (success, stdout, stderr).
fn causeway(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(binary("causeway"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("CAUSEWAY_API_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run causeway");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `(status, head, JSON body)` of a request with `token` (if any).
fn call(
    api: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String, Value) {
    let auth = token.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let (status, head, body) = http_with(api, method, path, &headers, body);
    let json = if body.trim_start().starts_with(['{', '[']) {
        json_of(&body)
    } else {
        Value::String(body)
    };
    (status, head, json)
}

fn create_offline(pki: &Path, name: &str, scope: &str) -> String {
    let pki = pki.to_str().expect("utf-8 path");
    let (ok, out, err) = causeway(
        &[
            "api-token",
            "create",
            "--dir",
            pki,
            "--name",
            name,
            "--scope",
            scope,
        ],
        &[],
    );
    assert!(ok, "api-token create: {err}");
    assert!(err.contains("shown only now"), "{err}");
    out.trim().to_owned()
}

#[test]
fn tokens_guard_the_api_once_one_exists() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cloud = CloudCore::start(dir.path(), [0; 4], 30, PATIENCE);
    let api = cloud.api;
    let pki = dir.path().join("pki");

    // No token yet, loopback: open, as before.
    assert_eq!(http(api, "GET", "/v1/nodes", "").0, 200);

    // The first admin token, offline, while cloudcore runs.
    let admin = create_offline(&pki, "ops", "admin");
    assert!(
        admin.starts_with("cwapi_") && admin.len() == 6 + 43,
        "{admin}"
    );

    // From now on: 401 without a token, with the JSON error shape and the Bearer challenge.
    let (status, head, body) = call(api, "GET", "/v1/nodes", None, "");
    assert_eq!(status, 401, "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
    assert_eq!(body["code"], "unauthenticated", "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    // /healthz stays public.
    assert_eq!(http(api, "GET", "/healthz", "").0, 200);
    assert_eq!(call(api, "GET", "/v1/nodes", Some(&admin), "").0, 200);

    // A read token made through the API: reads, but neither sends nor manages tokens.
    let (status, _, made) = call(
        api,
        "POST",
        "/v1/api-tokens",
        Some(&admin),
        r#"{"name":"dash","scope":"read"}"#,
    );
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["scope"], "read");
    let read = made["token"].as_str().expect("token").to_owned();
    assert_eq!(call(api, "GET", "/v1/nodes", Some(&read), "").0, 200);
    assert_eq!(call(api, "GET", "/metrics", Some(&read), "").0, 200);
    let msg =
        r#"{"route":{"source":"t","group":"user","operation":"op","resource":"r"},"content":"x"}"#;
    let (status, head, body) = call(api, "POST", "/v1/nodes/edge-x/messages", Some(&read), msg);
    assert_eq!(status, 403, "{body}");
    assert!(
        !head.to_ascii_lowercase().contains("www-authenticate"),
        "{head}"
    );
    assert_eq!(body["code"], "forbidden", "{body}");
    assert_eq!(call(api, "GET", "/v1/api-tokens", Some(&read), "").0, 403);
    // Cancelling a message takes scope send too.
    let (status, _, body) = call(
        api,
        "DELETE",
        "/v1/nodes/edge-x/messages/m-1",
        Some(&read),
        "",
    );
    assert_eq!(
        (status, &body["code"]),
        (403, &Value::from("forbidden")),
        "{body}"
    );

    // A send token made with the CLI through the API (admin token in the environment).
    let url = format!("http://{api}");
    let env = [
        ("CAUSEWAY_API", url.as_str()),
        ("CAUSEWAY_API_TOKEN", admin.as_str()),
    ];
    let (ok, out, err) = causeway(
        &["api-token", "create", "--name", "app", "--scope", "send"],
        &env,
    );
    assert!(ok, "{err}");
    let send = out.trim().to_owned();
    let (status, _, body) = call(api, "POST", "/v1/nodes/edge-x/messages", Some(&send), msg);
    assert_eq!(
        (status, &body["code"]),
        (404, &Value::from("unknown_node")),
        "{body}"
    );
    assert_eq!(call(api, "GET", "/v1/api-tokens", Some(&send), "").0, 403);
    let (status, _, body) = call(
        api,
        "DELETE",
        "/v1/nodes/edge-x/messages/m-1",
        Some(&send),
        "",
    );
    assert_eq!(
        (status, &body["code"]),
        (404, &Value::from("unknown_message")),
        "{body}"
    );

    // A bad token: 401 invalid_token; the log says why, with no token in it.
    let bad = "cwapi_NotAToken0123456789abcdefghijklmnopqrstuvwx";
    let (status, head, body) = call(api, "GET", "/v1/nodes", Some(bad), "");
    assert_eq!(
        (status, &body["code"]),
        (401, &Value::from("invalid_token")),
        "{body}"
    );
    assert!(head.contains("invalid_token"), "{head}");
    let (status, _, _) = http_with(api, "GET", "/v1/nodes", &[("Authorization", bad)], "");
    assert_eq!(status, 401, "a token without the Bearer scheme");
    cloud.daemon.wait_for("unknown API token");

    // The CLI: `nodes` with a token from the environment, and without one.
    let env = [
        ("CAUSEWAY_API", url.as_str()),
        ("CAUSEWAY_API_TOKEN", read.as_str()),
    ];
    let (ok, _, err) = causeway(&["nodes", "--json"], &env);
    assert!(ok, "{err}");
    let (ok, _, err) = causeway(&["nodes", "--api", &url], &[]);
    assert!(!ok && err.contains("401"), "{err}");
    let (ok, out, err) = causeway(
        &["api-token", "list", "--dir", pki.to_str().expect("path")],
        &[],
    );
    assert!(ok, "{err}");
    for name in ["ops", "dash", "app"] {
        assert!(out.contains(name), "{out}");
    }
    assert!(!out.contains("cwapi_"), "a listing shows no token: {out}");

    // Revoked offline: refused at the next request.
    let (ok, _, err) = causeway(
        &[
            "api-token",
            "revoke",
            "dash",
            "--dir",
            pki.to_str().expect("path"),
        ],
        &[],
    );
    assert!(ok, "{err}");
    let (status, _, body) = call(api, "GET", "/v1/nodes", Some(&read), "");
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("revoked"),
        "{body}"
    );
    // Revoked through the API: the same; every token revoked leaves the API closed.
    for name in ["app", "ops"] {
        let (status, _, body) = call(
            api,
            "DELETE",
            &format!("/v1/api-tokens/{name}"),
            Some(&admin),
            "",
        );
        assert_eq!(status, 200, "{body}");
        assert!(body["revoked_ms"].is_i64(), "{body}");
    }
    assert_eq!(call(api, "GET", "/v1/nodes", Some(&admin), "").0, 401);
    assert_eq!(call(api, "GET", "/v1/nodes", None, "").0, 401);

    let log = cloud.daemon.log_so_far();
    for secret in [admin.as_str(), read.as_str(), send.as_str(), bad] {
        assert!(!log.contains(secret), "a token in the log:\n{log}");
    }
    assert!(log.contains("cloud API request refused"), "{log}");
    assert_eq!(cloud.daemon.stop(), Some(0));
    // Refused requests left nothing behind: no message queued or logged, no node recorded.
    let db = rusqlite::Connection::open_with_flags(
        dir.path().join("cloudcore.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("the cloud's store");
    for table in ["downstream", "upstream", "nodes"] {
        let rows: i64 = db
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .expect("count");
        assert_eq!(rows, 0, "rows left in {table}");
    }
}

#[test]
fn an_exposed_api_without_tls_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().display();
    let config = dir.path().join("cloudcore.yaml");
    std::fs::write(
        &config,
        format!(
            "cloudhub:
  websocket: {{ enable: false }}
  quic: {{ enable: false }}
  https: {{ enable: false }}
  api: {{ address: 0.0.0.0, port: 0 }}
  api-server: {{ tls: never }}
  tls: {{ cert-dir: {d}/pki }}
  queue: {{ path: {d}/cloudcore.db }}
"
        ),
    )
    .expect("config");
    let mut child = Command::new(binary("cloudcore"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cloudcore");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cloudcore started with an exposed plain-HTTP API");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(!status.success());
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("not loopback")).collect();
    assert_eq!(lines.len(), 1, "one line says why:\n{err}");
    assert!(lines[0].contains("api-server.tls"), "{err}");
    assert!(
        !dir.path().join("pki").exists(),
        "refused before creating anything"
    );
}

/// One HTTPS/1.1 exchange with `tls` (the cloud CA, maybe a client certificate) to `addr`
/// (the server is dialled as `localhost`); (status, head, body), status 0 if TLS failed.
fn https(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(Arc::clone(tls), name).expect("client");
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         {extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new(), String::new());
    }
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    parse_response(&String::from_utf8_lossy(&out))
}

#[test]
fn an_exposed_api_is_https_and_always_needs_credentials() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().display();
    let config = dir.path().join("cloudcore.yaml");
    std::fs::write(
        &config,
        format!(
            "cloudhub:
  websocket: {{ enable: false }}
  quic: {{ enable: false }}
  https: {{ enable: false }}
  api: {{ address: 0.0.0.0, port: 0 }}
  tls: {{ cert-dir: {d}/pki }}
  queue: {{ path: {d}/cloudcore.db }}
"
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start("cloudcore", &config, PATIENCE);
    let line = daemon.logged("cloudcore listening");
    let port: SocketAddr = fields(&line)["api"].parse().expect("api address");
    let api = SocketAddr::from(([127, 0, 0, 1], port.port()));
    let pki = dir.path().join("pki");
    let cert_dir = certs::files::CertDir::new(&pki);
    let anchors = cert_dir.trust_anchors().expect("the cloud made its CA");
    let plain_tls =
        Arc::new(transport::tls::api_client_config(&anchors, None).expect("client config"));

    // Plain HTTP on the HTTPS port gets no answer from the API.
    let (status, _, _) = http_with(api, "GET", "/healthz", &[], "");
    assert_ne!(status, 200, "plain HTTP is not served");
    // HTTPS, no token exists yet: credentials are required anyway.
    assert_eq!(https(api, &plain_tls, "GET", "/healthz", &[], "").0, 200);
    let (status, head, body) = https(api, &plain_tls, "GET", "/v1/nodes", &[], "");
    assert_eq!(status, 401, "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );

    // A token works over HTTPS, and so does the CLI with --api-ca.
    let token = create_offline(&pki, "ops", "admin");
    let auth = bearer(&token);
    let with_token = [("Authorization", auth.as_str())];
    assert_eq!(
        https(api, &plain_tls, "GET", "/v1/nodes", &with_token, "").0,
        200
    );
    let url = format!("https://localhost:{}", api.port());
    let ca = pki.join("ca.crt");
    let ca = ca.to_str().expect("path");
    let (ok, _, err) = causeway(
        &["nodes", "--api", &url, "--api-ca", ca],
        &[("CAUSEWAY_API_TOKEN", token.as_str())],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = causeway(
        &["nodes", "--api", &url],
        &[("CAUSEWAY_API_TOKEN", token.as_str())],
    );
    assert!(!ok && err.contains("--api-ca"), "{err}");

    // An API client certificate with scope read: reads, cannot send.
    let pki_s = pki.to_str().expect("path");
    let (ok, _, err) = causeway(
        &[
            "certs",
            "api-client",
            "--dir",
            pki_s,
            "--name",
            "dash",
            "--scope",
            "read",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let dash = certs::Identity::load(
        pki.join("api-clients/dash.crt"),
        pki.join("api-clients/dash.key"),
    )
    .expect("identity");
    let dash_tls = Arc::new(transport::tls::api_client_config(&anchors, Some(&dash)).expect("tls"));
    assert_eq!(https(api, &dash_tls, "GET", "/v1/nodes", &[], "").0, 200);
    let msg =
        r#"{"route":{"source":"t","group":"user","operation":"op","resource":"r"},"content":"x"}"#;
    let (status, _, body) = https(
        api,
        &dash_tls,
        "POST",
        "/v1/nodes/edge-x/messages",
        &[],
        msg,
    );
    assert_eq!(status, 403, "{body}");
    let apic = pki.join("api-clients");
    let (ok, _, err) = causeway(
        &[
            "nodes",
            "--api",
            &url,
            "--api-ca",
            ca,
            "--api-cert",
            apic.join("dash.crt").to_str().expect("path"),
            "--api-key",
            apic.join("dash.key").to_str().expect("path"),
        ],
        &[],
    );
    assert!(ok, "{err}");

    // A node's certificate from the same CA grants nothing.
    let node = certs::NodeId::new("edge-1").expect("id");
    let issued = cert_dir
        .load_ca()
        .expect("ca")
        .issue_node(
            &node,
            certs::Validity::days_from(time::OffsetDateTime::now_utc(), 1),
        )
        .expect("node cert");
    let node_tls =
        Arc::new(transport::tls::api_client_config(&anchors, Some(&issued.identity)).expect("tls"));
    let (status, _, body) = https(api, &node_tls, "GET", "/v1/nodes", &[], "");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("not an API client"), "{body}");
    assert!(!daemon.log_so_far().contains(&token), "no token in the log");
    assert_eq!(daemon.stop(), Some(0));
}
