//! The kit as an **edge**, testing a cloud: it dials the cloud under test with a node
//! certificate and checks the cloud side of each Part A behaviour.

use std::sync::Arc;
use std::time::Duration;

use certs::{CertificateAuthority, Identity, NodeId, TrustAnchors, Validity};
use proto::close::SessionCloseCode;
use proto::message::{GROUP_CAUSEWAY, OP_ACK, OP_KEEPALIVE, OP_RESPONSE};
use proto::{Content, Message};
use tokio::time::Instant;
use transport::{Capabilities, ConnectError, Connection, DialConfig, Protocol};

use crate::link::{Ended, Link};
use crate::{Outcome, Report, http, ms};

/// What the kit needs to test a cloud.
#[derive(Debug)]
pub struct EdgeRoleConfig {
    /// The protocol to speak.
    pub protocol: Protocol,
    /// The cloud's `host:port` for that protocol.
    pub server: String,
    /// The node certificate and key the kit presents.
    pub identity: Identity,
    /// The node id the certificate is for.
    pub node_id: NodeId,
    /// The CA the cloud's server certificate chains to.
    pub trust_anchors: TrustAnchors,
    /// The cloud's keepalive interval (`cloudhub.keepalive-interval`, default 30 s).
    pub keepalive_interval: Duration,
    /// How long the cloud may take to resend an unanswered downstream message (its first ACK
    /// timeout plus slack; Causeway's default ACK timeout is 5 s).
    pub resend_within: Duration,
    /// Bound on everything that should be prompt (an ACK, a close).
    pub patience: Duration,
    /// The cloud API (`http://host:port`), for the cases where the cloud must send something
    /// (downstream ACK, resend) or the delivery count is checked. Without it those are skipped.
    pub api: Option<String>,
    /// The CA that may issue node certificates, with the cloud's node limit: the node-limit case
    /// connects up to `limit + 1` fresh nodes. Without it the case is skipped.
    pub node_limit: Option<(CertificateAuthority, usize)>,
    /// Run the shutdown case last: the kit prints a line asking for the cloud to be stopped and
    /// expects close code 4004.
    pub expect_shutdown: bool,
}

/// Runs every edge-role case against the cloud; verdicts go to `report` as they are known.
pub async fn run(config: &EdgeRoleConfig, report: &mut Report<'_>, mut say: impl FnMut(&str)) {
    let c = config;
    report.check("session-opening", session_opening(c).await);
    report.check("capability-negotiation", capability_negotiation(c).await);
    report.check("upstream-ack", upstream_ack(c).await);
    report.check("upstream-dedup", upstream_dedup(c).await);
    match &c.api {
        Some(api) => {
            report.check("downstream-ack", downstream_ack(c, api).await);
            report.check("downstream-resend", downstream_resend(c, api).await);
        }
        None => {
            let why = "needs --api (the cloud API) to make the cloud send a message";
            report.record("downstream-ack", Outcome::Skip(why.into()));
            report.record("downstream-resend", Outcome::Skip(why.into()));
        }
    }
    report.check("keepalive", keepalive(c).await);
    report.check("close-keepalive-timeout", keepalive_timeout(c).await);
    report.check("close-takeover", takeover(c).await);
    report.check("close-identity-refused", identity_refused(c).await);
    match &c.node_limit {
        Some((ca, limit)) => report.check("close-node-limit", node_limit(c, ca, *limit).await),
        None => report.record(
            "close-node-limit",
            Outcome::Skip("needs --ca-key and --node-limit to connect limit + 1 nodes".into()),
        ),
    }
    if c.expect_shutdown {
        report.check("close-shutdown", shutdown(c, &mut say).await);
    } else {
        report.record(
            "close-shutdown",
            Outcome::Skip("needs --expect-shutdown (the cloud is stopped during the run)".into()),
        );
    }
}

fn dial_config(c: &EdgeRoleConfig, caps: Capabilities) -> DialConfig {
    let mut config = DialConfig::new(
        c.server.clone(),
        c.node_id.clone(),
        c.identity.clone(),
        c.trust_anchors.clone(),
    );
    config.capabilities = caps;
    config
}

async fn connect(c: &EdgeRoleConfig, caps: Capabilities) -> Result<Link, String> {
    let config = dial_config(c, caps);
    let conn = tokio::time::timeout(c.patience, transport::connect(c.protocol, &config))
        .await
        .map_err(|_| format!("connect did not complete within {} ms", ms(c.patience)))?
        .map_err(|e| format!("connect failed: {e}"))?;
    Ok(Link::new(conn))
}

/// KubeEdge's keepalive (vector 08's route).
fn keepalive_message() -> Message {
    Message::new("")
        .route("websocket", "resource", "node", OP_KEEPALIVE)
        .content(Content::text("ping"))
}

/// An upstream data message of the kit's own.
fn data_message(n: u64) -> Message {
    Message::new("")
        .route("conformance", "user", "conformance/upstream", "publish")
        .content(Content::Json(serde_json::json!({ "n": n })))
}

fn is_ack_of(msg: &Message, id: &str) -> bool {
    msg.route.group == GROUP_CAUSEWAY && msg.route.operation == OP_ACK && msg.header.parent_id == id
}

/// Sends `msg` and waits for the cloud's upstream acknowledgement of it.
async fn send_acked(link: &mut Link, msg: Message, patience: Duration) -> Result<Message, String> {
    let id = msg.header.id.clone();
    link.send(msg).await?;
    link.wait_for(
        &format!("causeway/ack of {id}"),
        patience,
        |m| is_ack_of(m, &id),
        |_| {},
    )
    .await
}

/// A session opens as KubeEdge's does (no capability offered) and serves a keepalive.
async fn session_opening(c: &EdgeRoleConfig) -> Result<String, String> {
    let link = connect(c, Capabilities::NONE).await?;
    let caps = link.conn.peer().capabilities;
    link.send(keepalive_message()).await?;
    link.close(None, "conformance: session-opening done").await;
    if caps != Capabilities::NONE {
        return Err(format!(
            "a client that offered nothing was granted {caps:?}"
        ));
    }
    Ok(format!(
        "{} session opened as {} and took a keepalive",
        c.protocol,
        c.node_id.as_str()
    ))
}

/// `upstream-ack` offered is accepted.
async fn capability_negotiation(c: &EdgeRoleConfig) -> Result<String, String> {
    let link = connect(c, Capabilities::ALL).await?;
    let caps = link.conn.peer().capabilities;
    link.close(None, "conformance: capability-negotiation done")
        .await;
    if caps.upstream_ack {
        Ok("upstream-ack offered and accepted".into())
    } else {
        Err("upstream-ack offered but not accepted (a stock KubeEdge cloud?)".into())
    }
}

/// A data message is acknowledged (`causeway`/`ack`, parent id = its id, nil content); an answer
/// (op `response` with a parent id) never is.
async fn upstream_ack(c: &EdgeRoleConfig) -> Result<String, String> {
    let mut link = connect(c, Capabilities::ALL).await?;
    link.send(keepalive_message()).await?;
    let answer = Message::new(proto::new_id())
        .route("conformance", "resource", "conformance/answer", OP_RESPONSE)
        .content(Content::text("OK"));
    let answer_id = answer.header.id.clone();
    link.send(answer).await?;
    let data = data_message(1);
    let id = data.header.id.clone();
    link.send(data).await?;
    let mut acked_answer = false;
    let ack = link
        .wait_for(
            &format!("causeway/ack of {id}"),
            c.patience,
            |m| is_ack_of(m, &id),
            |m| acked_answer |= is_ack_of(m, &answer_id),
        )
        .await;
    link.close(None, "conformance: upstream-ack done").await;
    let ack = ack?;
    if acked_answer {
        return Err("the cloud acknowledged an answer (op response with a parent id)".into());
    }
    if !ack.content.is_empty() || !ack.route.resource.is_empty() {
        return Err(format!("the ack has content or a resource: {ack:?}"));
    }
    Ok(format!(
        "data message {id} acknowledged; the answer sent before it was not"
    ))
}

/// A data message resent under the same id on a new connection is acknowledged again and, when
/// the cloud API is given, delivered to applications once.
async fn upstream_dedup(c: &EdgeRoleConfig) -> Result<String, String> {
    let data = data_message(2);
    let id = data.header.id.clone();
    let mut first = connect(c, Capabilities::ALL).await?;
    first.send(keepalive_message()).await?;
    send_acked(&mut first, data.clone(), c.patience).await?;
    first.close(None, "conformance: reconnecting").await;
    let mut second = connect(c, Capabilities::ALL).await?;
    second.send(keepalive_message()).await?;
    let again = send_acked(&mut second, data, c.patience).await;
    // A marker after the duplicate: once it is in the stream, the duplicate would be too.
    let marker = data_message(3);
    let marker_id = marker.header.id.clone();
    let marker_acked = send_acked(&mut second, marker, c.patience).await;
    second.close(None, "conformance: upstream-dedup done").await;
    again.map_err(|e| format!("the resend was not acknowledged again: {e}"))?;
    marker_acked?;
    let Some(api) = &c.api else {
        return Ok(format!(
            "{id} acknowledged again after a reconnect (delivery count not checked: no --api)"
        ));
    };
    let path = format!("/v1/messages?node={}&since=0", c.node_id.as_str());
    let count = count_in_event_stream(api, &path, &id, &marker_id, c.patience).await?;
    if count == 1 {
        Ok(format!(
            "{id} acknowledged again after a reconnect and delivered once"
        ))
    } else {
        Err(format!(
            "{id} was delivered {count} times to the cloud's applications"
        ))
    }
}

/// Reads the SSE stream at `path` until `marker` appears; how often `id` appeared before it.
async fn count_in_event_stream(
    api: &str,
    path: &str,
    id: &str,
    marker: &str,
    within: Duration,
) -> Result<usize, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = api.trim_start_matches("http://").trim_end_matches('/');
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| format!("connecting to the API {host}: {e}"))?;
        let head =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        let mut buf = vec![0u8; 16384];
        loop {
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the event stream ended".to_owned());
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.contains(marker) {
                return Ok(text.matches(id).count());
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| format!("{marker} did not appear in {path} within {} ms", ms(within)))?
}

/// Queues a message for the kit's node through the cloud API; its id.
async fn post_downstream(c: &EdgeRoleConfig, api: &str, query: &str) -> Result<String, String> {
    let id = proto::new_id();
    let body = serde_json::json!({
        "header": {"msg_id": id, "timestamp": proto::now_millis()},
        "route": {"source": "conformance", "group": "resource", "operation": "update",
                  "resource": "default/configmap/conformance"},
        "content": {"data": {"k": id}}
    });
    let path = format!("/v1/nodes/{}/messages?{query}", c.node_id.as_str());
    let (status, answer) =
        http::request(api, "POST", &path, Some(&body.to_string()), c.patience).await?;
    if status / 100 != 2 {
        return Err(format!(
            "the cloud API refused the message: {status} {answer}"
        ));
    }
    Ok(id)
}

/// A message queued for the node arrives; the cloud takes the node's answer as its ACK.
async fn downstream_ack(c: &EdgeRoleConfig, api: &str) -> Result<String, String> {
    let mut link = connect(c, Capabilities::ALL).await?;
    link.send(keepalive_message()).await?;
    let id = post_downstream(c, api, "ack=true").await?;
    let got = link
        .wait_for(
            &format!("downstream message {id}"),
            c.patience,
            |m| m.header.id == id,
            |_| {},
        )
        .await?;
    link.send(Message::response_to(&got, Content::text("OK")))
        .await?;
    let state = wait_acked(c, api, &id).await;
    link.close(None, "conformance: downstream-ack done").await;
    state?;
    Ok(format!("{id} delivered and its answer recorded as the ACK"))
}

/// Polls the API until the message is acked.
async fn wait_acked(c: &EdgeRoleConfig, api: &str, id: &str) -> Result<(), String> {
    let path = format!("/v1/nodes/{}/messages/{id}", c.node_id.as_str());
    let deadline = Instant::now() + c.patience;
    loop {
        let (status, body) = http::request(api, "GET", &path, None, c.patience).await?;
        if status == 200 && http::json(&body)?["state"] == "acked" {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{id} not recorded as acked: {status} {body}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An unanswered message is resent under the same id; answering the resend ends it.
async fn downstream_resend(c: &EdgeRoleConfig, api: &str) -> Result<String, String> {
    let mut link = connect(c, Capabilities::ALL).await?;
    link.send(keepalive_message()).await?;
    let id = post_downstream(c, api, "ack=true").await?;
    let outcome = async {
        link.wait_for(
            &format!("downstream message {id}"),
            c.patience,
            |m| m.header.id == id,
            |_| {},
        )
        .await?;
        let first = Instant::now();
        // Keepalives meanwhile, so only the missing answer can be the reason for a resend.
        let conn = Arc::clone(&link.conn);
        let what = format!("a resend of {id}");
        let resend = tokio::select! {
            r = link.wait_for(&what, c.resend_within, |m| m.header.id == id, |_| {}) => r?,
            () = keep_alive_forever(conn, c.keepalive_interval) => unreachable!(),
        };
        let after = first.elapsed();
        link.send(Message::response_to(&resend, Content::text("OK")))
            .await?;
        wait_acked(c, api, &id).await?;
        Ok::<_, String>(format!(
            "{id} resent under the same id after {} ms; answered, then acked",
            ms(after)
        ))
    }
    .await;
    link.close(None, "conformance: downstream-resend done")
        .await;
    outcome
}

/// Sends a keepalive every third of the cloud's keepalive interval, forever.
async fn keep_alive_forever(conn: Arc<dyn Connection>, interval: Duration) {
    loop {
        tokio::time::sleep(interval / 3).await;
        let _ = conn.send(keepalive_message()).await;
    }
}

/// Keepalives keep a session alive past the keepalive interval.
async fn keepalive(c: &EdgeRoleConfig) -> Result<String, String> {
    let mut link = connect(c, Capabilities::ALL).await?;
    link.send(keepalive_message()).await?;
    let span = c.keepalive_interval + c.keepalive_interval / 2;
    let conn = Arc::clone(&link.conn);
    let outcome = tokio::select! {
        end = link.wait_end(span) => match end {
            Ok((ended, _)) => Err(format!("closed although keepalives were sent: {ended}")),
            Err(_still_open) => Ok(()),
        },
        () = keep_alive_forever(conn, c.keepalive_interval) => unreachable!(),
    };
    let alive = match outcome {
        Ok(()) => send_acked(&mut link, data_message(4), c.patience)
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    link.close(None, "conformance: keepalive done").await;
    alive?;
    Ok(format!("session alive after {} ms of keepalives", ms(span)))
}

/// Data without keepalives does not keep a session: the cloud closes it with 4000.
async fn keepalive_timeout(c: &EdgeRoleConfig) -> Result<String, String> {
    let mut link = connect(c, Capabilities::ALL).await?;
    let started = Instant::now();
    let conn = Arc::clone(&link.conn);
    let feed = async move {
        let mut n = 10;
        loop {
            let _ = conn.send(data_message(n)).await;
            n += 1;
            tokio::time::sleep(c.keepalive_interval / 4).await;
        }
    };
    let bound = c.keepalive_interval * 2 + c.patience;
    let end = tokio::select! {
        end = link.wait_end(bound) => end,
        () = feed => unreachable!(),
    };
    let (ended, _) = end.map_err(|e| format!("no keepalive, data only: {e}"))?;
    match ended {
        Ended::Session(SessionCloseCode::KeepaliveTimeout) => Ok(format!(
            "closed with 4000 after {} ms without keepalive",
            ms(started.elapsed())
        )),
        other => Err(format!("expected close code 4000, got {other}")),
    }
}

/// A second connection of the node takes over: the first is closed with 4001, the second works.
async fn takeover(c: &EdgeRoleConfig) -> Result<String, String> {
    let mut old = connect(c, Capabilities::ALL).await?;
    old.send(keepalive_message()).await?;
    send_acked(&mut old, data_message(20), c.patience).await?;
    let mut new = connect(c, Capabilities::ALL).await?;
    new.send(keepalive_message()).await?;
    let ended = old.wait_end(c.patience).await;
    let works = send_acked(&mut new, data_message(21), c.patience).await;
    new.close(None, "conformance: takeover done").await;
    let (ended, _) = ended.map_err(|e| format!("the old connection after a takeover: {e}"))?;
    if ended != Ended::Session(SessionCloseCode::Replaced) {
        return Err(format!(
            "the old connection: expected close code 4001, got {ended}"
        ));
    }
    works.map_err(|e| format!("the new connection after the takeover: {e}"))?;
    Ok("old connection closed with 4001; the new one serves".into())
}

/// Claiming another node id than the certificate's is refused.
async fn identity_refused(c: &EdgeRoleConfig) -> Result<String, String> {
    let mut config = dial_config(c, Capabilities::ALL);
    let claimed = format!("{}-impostor", c.node_id.as_str());
    config.node_id = NodeId::new(claimed.clone()).map_err(|e| e.to_string())?;
    let outcome = tokio::time::timeout(c.patience, transport::connect(c.protocol, &config))
        .await
        .map_err(|_| "connect neither completed nor failed in time".to_owned())?;
    match outcome {
        Err(ConnectError::Rejected { status, reason }) => {
            let expected = match c.protocol {
                Protocol::WebSocket => 403,
                Protocol::Quic => 0x10,
            };
            if status == Some(expected)
                || status == Some(u64::from(SessionCloseCode::IdentityRefused.code()))
            {
                Ok(format!(
                    "claiming {claimed:?} refused with {status:?}: {reason}"
                ))
            } else {
                Err(format!(
                    "refused with {status:?}, expected {expected} or 4003: {reason}"
                ))
            }
        }
        Err(other) => Err(format!("refused, but not with a code: {other}")),
        Ok(conn) => {
            let mut link = Link::new(conn);
            match link.wait_end(c.patience).await {
                Ok((Ended::Session(SessionCloseCode::IdentityRefused), _)) => {
                    Ok(format!("claiming {claimed:?} closed with 4003"))
                }
                Ok((ended, _)) => Err(format!("expected 403/0x10 or 4003, got {ended}")),
                Err(e) => Err(format!("an impostor was served: {e}")),
            }
        }
    }
}

/// Fresh nodes beyond the node limit are closed with 4002; admitted ones stay.
async fn node_limit(
    c: &EdgeRoleConfig,
    ca: &CertificateAuthority,
    limit: usize,
) -> Result<String, String> {
    let validity = Validity::days_from(
        time::OffsetDateTime::now_utc() - time::Duration::hours(1),
        1,
    );
    let mut admitted = Vec::new();
    let mut result = Err(format!(
        "{} fresh nodes were all admitted; the limit is {limit}",
        limit + 1
    ));
    // The earlier cases' sessions may still count while the cloud tears them down: a node
    // below the limit refused with 4002 is retried until the patience runs out.
    let deadline = Instant::now() + c.patience;
    let node_limit = u64::from(SessionCloseCode::NodeLimit.code());
    for i in 0..=limit {
        let node = NodeId::new(format!("conformance-limit-{i}")).map_err(|e| e.to_string())?;
        let issued = ca.issue_node(&node, validity).map_err(|e| e.to_string())?;
        let mut config = dial_config(c, Capabilities::ALL);
        config.node_id = node.clone();
        config.identity = issued.identity;
        let conn = loop {
            match transport::connect(c.protocol, &config).await {
                Ok(conn) => break Ok(conn),
                // Refused at the door (before the session) is as good as a 4002 close.
                Err(ConnectError::Rejected {
                    status: Some(status),
                    ..
                }) if status == node_limit && i == limit => {
                    break Err(Ok(format!(
                        "node {} of at most {} refused with 4002 when it connected",
                        i + 1,
                        limit + 1
                    )));
                }
                Err(ConnectError::Rejected {
                    status: Some(status),
                    ..
                }) if status == node_limit && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => break Err(Err(format!("node {i}: connect failed: {e}"))),
            }
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(outcome) => {
                result = outcome;
                break;
            }
        };
        let mut link = Link::new(conn);
        let _ = link.send(keepalive_message()).await;
        match send_acked(&mut link, data_message(30), c.patience).await {
            Ok(_) => admitted.push(link),
            Err(_) => {
                result = match link.wait_end(c.patience).await {
                    Ok((Ended::Session(SessionCloseCode::NodeLimit), _)) => Ok(format!(
                        "node {} of at most {} refused with 4002",
                        i + 1,
                        limit + 1
                    )),
                    Ok((ended, _)) => Err(format!("node {i}: expected 4002, got {ended}")),
                    Err(e) => Err(format!("node {i}: neither served nor closed: {e}")),
                };
                break;
            }
        }
    }
    for link in &admitted {
        link.close(None, "conformance: node-limit done").await;
    }
    result
}

/// Stopping the cloud closes the session with 4004.
async fn shutdown(c: &EdgeRoleConfig, say: &mut impl FnMut(&str)) -> Result<String, String> {
    // The node-limit case's nodes may still count while the cloud tears their sessions down:
    // a refusal with 4002 is retried until the patience runs out.
    let deadline = Instant::now() + c.patience;
    let mut link = loop {
        let mut link = connect(c, Capabilities::ALL).await?;
        // The refusal may come as soon as the first message is written.
        let sent = match link.send(keepalive_message()).await {
            Ok(()) => send_acked(&mut link, data_message(40), c.patience).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(_) => break link,
            Err(e) if Instant::now() < deadline => match link.wait_end(c.patience).await {
                Ok((Ended::Session(SessionCloseCode::NodeLimit), _)) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        }
    };
    say("ACTION: stop the cloud now (close-shutdown waits for its close)");
    let bound = c.patience * 2;
    let conn = Arc::clone(&link.conn);
    let end = tokio::select! {
        end = link.wait_end(bound) => end,
        () = keep_alive_forever(conn, c.keepalive_interval) => unreachable!(),
    };
    match end
        .map_err(|e| format!("waiting for the cloud to stop: {e}"))?
        .0
    {
        Ended::Session(SessionCloseCode::Shutdown) => {
            Ok("closed with 4004 when the cloud stopped".into())
        }
        other => Err(format!("expected close code 4004, got {other}")),
    }
}
