//! Config parsing: defaults, the documented `edgecore.yaml` shape, and errors that name the key path.

use std::time::Duration;

use super::*;

/// The file's top level, as edgecore wraps the section.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct File {
    edgehub: EdgeHubConfig,
}

fn parse(yaml: &str) -> Result<EdgeHubConfig, ConfigError> {
    from_yaml::<File>(yaml, "edgecore.yaml").map(|f| f.edgehub)
}

fn err(yaml: &str) -> ConfigError {
    parse(yaml).expect_err("must be refused")
}

const CONTRACT_EXAMPLE: &str = r#"
edgehub:
  controller: { protocol: quic, heartbeat: 15, project-id: e632aba927ea4ac2b575ec1603d56f10, node-id: edge-1, message-qps: 30, message-burst: 60 }
  websocket:  { server: "127.0.0.1:10000", handshake-timeout: 30, read-deadline: 15, write-deadline: 15 }
  quic:       { server: "127.0.0.1:10001", handshake-timeout: 30, read-deadline: 15, write-deadline: 15 }
  tls:        { ca-file: /etc/causeway/ca.crt, cert-file: /etc/causeway/edge.crt, key-file: /etc/causeway/edge.key }
  http-server: "https://127.0.0.1:10002"   # certificate bootstrap
  token: ""                                 # bootstrap token (optional)
  outbox: { path: /var/lib/causeway/outbox.db }
"#;

#[test]
fn only_the_node_id_is_required_and_defaults_are_kubeedges() {
    let config = parse("edgehub:\n  controller:\n    node-id: edge-1\n").unwrap();
    assert_eq!(config, EdgeHubConfig::new(NodeId::new("edge-1").unwrap()));
    assert_eq!(config.controller.protocol, Protocol::WebSocket);
    assert_eq!(config.controller.heartbeat.get(), 15);
    assert_eq!(
        config.controller.project_id.as_str(),
        "e632aba927ea4ac2b575ec1603d56f10"
    );
    assert_eq!(config.controller.message_qps.get(), 30.0);
    assert_eq!(config.controller.message_burst.get(), 60);
    assert_eq!(config.websocket.server.as_str(), "127.0.0.1:10000");
    assert_eq!(config.quic.server.as_str(), "127.0.0.1:10001");
    for endpoint in [&config.websocket, &config.quic] {
        assert_eq!(endpoint.handshake_timeout.get(), 30);
        assert_eq!(endpoint.read_deadline.get(), 15);
        assert_eq!(endpoint.write_deadline.get(), 15);
    }
    assert_eq!(config.http_server.as_str(), "https://127.0.0.1:10002");
    assert_eq!(config.token, None);
    assert_eq!(config.outbox.max_messages.get(), 100_000);
    assert_eq!(config.outbox.durability, Durability::Full);
}

#[test]
fn the_contract_example_parses_and_the_protocol_alone_picks_the_endpoint() {
    let config = parse(CONTRACT_EXAMPLE).unwrap();
    assert_eq!(config.controller.protocol, Protocol::Quic);
    assert_eq!(config.endpoint().server.as_str(), "127.0.0.1:10001");
    assert_eq!(config.tls.key_file, PathBuf::from("/etc/causeway/edge.key"));
    let ws = parse(&CONTRACT_EXAMPLE.replace("protocol: quic", "protocol: websocket")).unwrap();
    assert_eq!(ws.endpoint().server.as_str(), "127.0.0.1:10000");
    assert_eq!(
        ws.link_config(),
        config.link_config(),
        "same timeouts on both"
    );
}

#[test]
fn derived_settings() {
    let yaml = "edgehub:\n  controller: { node-id: n1, heartbeat: 2, message-qps: 0.5, message-burst: 3 }\n  websocket: { server: 'cloud.example:443', handshake-timeout: 7, read-deadline: 4, write-deadline: 5 }\n  outbox: { path: /tmp/x.db, max-messages: 10, max-bytes: 2048, durability: normal, dedup-window: 5 }\n";
    let config = parse(yaml).unwrap();
    let session = config.session_config();
    assert_eq!(session.heartbeat, Duration::from_secs(2));
    assert_eq!(session.reconnect_wait, Duration::from_secs(4));
    assert_eq!(
        session.dead_after, None,
        "liveness is the transport's read deadline"
    );
    assert_eq!((session.message_qps, session.message_burst), (0.5, 3));
    let link = config.link_config();
    assert_eq!(link.handshake_timeout, Duration::from_secs(7));
    assert_eq!(link.read_deadline, Duration::from_secs(4));
    assert_eq!(link.write_deadline, Duration::from_secs(5));
    assert!(link.keep_alive_interval < link.read_deadline / 2);
    let outbox = config.outbox_config();
    assert_eq!(outbox.path, PathBuf::from("/tmp/x.db"));
    assert_eq!(
        (outbox.max_messages, outbox.max_bytes, outbox.dedup_window),
        (10, 2048, 5)
    );
    assert_eq!(outbox.durability, Durability::Normal);
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let e = err("edgehub:\n  controller:\n    node-id: edge-1\n    heartbeats: 15\n");
    assert_eq!(e.key(), Some("edgehub.controller.heartbeats"));
    let text = e.to_string();
    assert!(
        text.starts_with("edgecore.yaml: edgehub.controller.heartbeats: "),
        "{text}"
    );
    assert!(text.contains("unknown field `heartbeats`"), "{text}");
    assert!(text.contains("line 4"), "{text}");

    let e = err("edgehub:\n  controller: { node-id: edge-1 }\n  outbox: { path: /x, size: 3 }\n");
    assert_eq!(e.key(), Some("edgehub.outbox.size"));
    let e = err("edgehub:\n  controller: { node-id: edge-1 }\nmodules: {}\n");
    assert_eq!(e.key(), Some("modules"));
}

#[test]
fn invalid_values_are_refused_with_their_path() {
    let base = "edgehub:\n  controller: { node-id: edge-1 }\n";
    let cases = [
        (
            "edgehub:\n  controller: { node-id: edge-1, heartbeat: 0 }\n",
            "edgehub.controller.heartbeat",
            "at least 1",
        ),
        (
            "edgehub:\n  controller: { node-id: edge-1, heartbeat: soon }\n",
            "edgehub.controller.heartbeat",
            "",
        ),
        (
            "edgehub:\n  controller: { node-id: Edge_1 }\n",
            "edgehub.controller.node-id",
            "node id",
        ),
        (
            "edgehub:\n  controller: { node-id: edge-1, protocol: tcp }\n",
            "edgehub.controller.protocol",
            "tcp",
        ),
        (
            "edgehub:\n  controller: { node-id: edge-1, project-id: 'a/b' }\n",
            "edgehub.controller.project-id",
            "project id",
        ),
        (
            "edgehub:\n  controller: { node-id: edge-1, message-qps: -1 }\n",
            "edgehub.controller.message-qps",
            "positive",
        ),
        (
            "edgehub:\n  controller: { node-id: edge-1, message-burst: 0 }\n",
            "edgehub.controller.message-burst",
            "",
        ),
        (
            "edgehub:\n  controller: { node-id: edge-1, fallback: { enable: true, attempts: 0 } }\n",
            "edgehub.controller.fallback.attempts",
            "",
        ),
        (
            "edgehub:\n  controller: { node-id: edge-1, fallback: { probe-interval: 0 } }\n",
            "edgehub.controller.fallback.probe-interval",
            "at least 1",
        ),
        (
            "edgehub:\n  controller: { node-id: edge-1, fallback: { on: true } }\n",
            "edgehub.controller.fallback.on",
            "",
        ),
        (
            &format!("{base}  quic: {{ server: 'no-port' }}\n"),
            "edgehub.quic.server",
            "host:port",
        ),
        (
            &format!("{base}  websocket: {{ server: 'h:0' }}\n"),
            "edgehub.websocket.server",
            "host:port",
        ),
        (
            &format!("{base}  http-server: 'http://x:1'\n"),
            "edgehub.http-server",
            "https://",
        ),
        (
            &format!("{base}  token: 'not-a-token'\n"),
            "edgehub.token",
            "token",
        ),
        (
            &format!("{base}  outbox: {{ durability: fast }}\n"),
            "edgehub.outbox.durability",
            "fast",
        ),
        (
            &format!("{base}  outbox: {{ max-messages: 0 }}\n"),
            "edgehub.outbox.max-messages",
            "",
        ),
    ];
    for (yaml, key, needle) in cases {
        let e = err(yaml);
        assert_eq!(e.key(), Some(key), "{yaml}\n{e}");
        let text = e.to_string();
        assert!(text.contains(key), "{text}");
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
}

#[test]
fn fallback_is_off_by_default_and_uses_the_other_section() {
    let config = parse("edgehub:\n  controller: { node-id: edge-1, protocol: quic }\n").unwrap();
    assert!(!config.controller.fallback.enable);
    assert_eq!(config.controller.fallback.attempts.get(), 3);
    assert_eq!(config.controller.fallback.probe_interval.get(), 60);
    let choice = config.protocol_choice();
    assert!(!choice.on_fallback());
    let on = parse(
        "edgehub:\n  controller: { node-id: edge-1, protocol: quic, \
         fallback: { enable: true, attempts: 2, probe-interval: 5 } }\n  \
         websocket: { server: 'cloud:10000' }\n",
    )
    .unwrap();
    let mut choice = on.protocol_choice();
    assert_eq!(choice.dial_failed(Protocol::Quic, false), None);
    let switch = choice
        .dial_failed(Protocol::Quic, false)
        .expect("falls back");
    assert_eq!(switch.to, Protocol::WebSocket);
    assert_eq!(on.endpoint_for(switch.to).server.as_str(), "cloud:10000");
    assert_eq!(on.endpoint().server.as_str(), "127.0.0.1:10001");
}

#[test]
fn a_missing_node_id_names_its_section() {
    let e = err("edgehub:\n  controller: { heartbeat: 15 }\n");
    assert_eq!(e.key(), Some("edgehub.controller"));
    assert!(e.to_string().contains("node-id"), "{e}");
}

#[test]
fn malformed_yaml_is_reported_against_the_document() {
    let e = err("edgehub: [unclosed\n");
    assert!(e.key().is_some());
    assert!(e.to_string().starts_with("edgecore.yaml: "), "{e}");
}

#[test]
fn tokens_are_kept_secret_and_empty_means_none() {
    let token = format!("{}.{}", "ab".repeat(32), "eyJh.eyJl.c2ln");
    let config = parse(&format!(
        "edgehub:\n  controller: {{ node-id: e }}\n  token: '{token}'\n"
    ))
    .unwrap();
    let kept = config.token.clone().expect("token");
    assert_eq!(kept.expose(), token);
    assert!(
        !format!("{config:?}").contains(&token),
        "Debug must not print the token"
    );
    let none = parse("edgehub:\n  controller: { node-id: e }\n  token: ''\n").unwrap();
    assert_eq!(none.token, None);
}

#[test]
fn serialises_back_to_an_equal_config() {
    let config = parse(CONTRACT_EXAMPLE).unwrap();
    let yaml = serde_saphyr::to_string(&File {
        edgehub: config.clone(),
    })
    .unwrap();
    assert_eq!(parse(&yaml).unwrap(), config, "{yaml}");
}

#[test]
fn newtypes_validate() {
    assert!(ServerAddr::new("[::1]:10000").is_ok());
    assert!(ServerAddr::new("::1:10000").is_err());
    assert!(ServerAddr::new("cloud.example.com:10000").is_ok());
    assert!(ServerAddr::new("a b:1").is_err());
    assert_eq!(
        HttpsUrl::new("https://10.0.0.1:10002/").unwrap().as_str(),
        "https://10.0.0.1:10002"
    );
    assert!(HttpsUrl::new("https://cloud.example.com").is_ok());
    assert!(HttpsUrl::new("https://[::1]:10002").is_ok());
    assert!(HttpsUrl::new("https://").is_err());
    assert!(Qps::new(f64::NAN).is_err());
    assert!(ProjectId::new("x".repeat(129)).is_err());
    assert_eq!(Seconds::new(2).unwrap().duration(), Duration::from_secs(2));
}

#[test]
fn load_yaml_reports_a_missing_file() {
    let e = load_yaml::<File>(std::path::Path::new("/nonexistent/edgecore.yaml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains("/nonexistent/edgecore.yaml"));
}
