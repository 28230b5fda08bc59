//! The kit as a **cloud**, testing an edge: it listens with a server certificate, the edge under
//! test dials it, and the kit checks the edge side of each Part A behaviour, including how the
//! edge comes back after each session close code.

use std::net::SocketAddr;
use std::time::Duration;

use certs::{Identity, TrustAnchors};
use proto::close::SessionCloseCode;
use proto::message::{GROUP_CAUSEWAY, OP_ACK, OP_KEEPALIVE, OP_RESPONSE, UpstreamClass};
use proto::{Content, Message};
use tokio::time::Instant;
use transport::{ListenConfig, ListenSocket, Listener, Protocol};

use crate::link::Link;
use crate::{Outcome, Report, http, ms};

/// What the kit needs to test an edge.
#[derive(Debug, Clone)]
pub struct CloudRoleConfig {
    /// The protocol to serve.
    pub protocol: Protocol,
    /// Where to listen (the edge under test dials it).
    pub listen: SocketAddr,
    /// The server certificate and key (with the SAN the edge dials).
    pub identity: Identity,
    /// The CA node certificates chain to.
    pub trust_anchors: TrustAnchors,
    /// The edge's heartbeat (`edgehub.controller.heartbeat`, default 15 s): keepalive and
    /// reconnect verdicts scale with it.
    pub heartbeat: Duration,
    /// Bound on everything that should be prompt (first connection, an answer).
    pub patience: Duration,
    /// The edge's local endpoint (`http://host:port`, edgecore's `POST /v1/upstream`), to make
    /// the edge send upstream data and to count deliveries. Without it the kit waits for data
    /// the edge sends on its own, and skips what needs it. `-`: read it from standard input
    /// once the edge has connected.
    pub edge_api: Option<String>,
}

/// Serves the edge and runs every cloud-role case; verdicts go to `report` as they are known.
pub async fn run(config: &CloudRoleConfig, report: &mut Report<'_>, mut say: impl FnMut(&str)) {
    let c = config;
    let mut server = match Server::start(c).await {
        Ok(server) => server,
        Err(e) => {
            report.record("session-opening", Outcome::Fail(e));
            return;
        }
    };
    say(&format!(
        "listening for the edge ({}) on {}",
        c.protocol,
        server.listener.local_addr()
    ));
    let mut link = match server.next(c.patience).await {
        Ok(link) => link,
        Err(e) => {
            report.record("session-opening", Outcome::Fail(e));
            return;
        }
    };
    let resolved;
    let c = if c.edge_api.as_deref() == Some("-") {
        let url = read_line_from_stdin(c.patience).await;
        if let Err(e) = &url {
            say(&format!("no edge API on standard input: {e}"));
        }
        resolved = CloudRoleConfig {
            edge_api: url.ok(),
            ..c.clone()
        };
        &resolved
    } else {
        c
    };
    let peer = link.conn.peer().clone();
    let node = peer
        .node_id
        .as_ref()
        .map(|n| n.as_str().to_owned())
        .unwrap_or_default();
    report.record(
        "session-opening",
        Outcome::Pass(format!(
            "node {node:?} connected over {} with a verified certificate",
            c.protocol
        )),
    );
    report.check(
        "capability-negotiation",
        if peer.capabilities.upstream_ack {
            Ok("the edge offered upstream-ack".into())
        } else {
            Err("the edge offered no upstream-ack: its outbox cannot be acknowledged".into())
        },
    );
    report.check("keepalive", keepalive(c, &mut link).await);
    report.check("downstream-ack", downstream_ack(c, &mut link).await);
    let mut pending_upstream = None;
    match upstream_resend(c, &mut server, link).await {
        Ok((why, id, next)) => {
            report.record("upstream-resend-until-ack", Outcome::Pass(why));
            pending_upstream = Some(id);
            link = next;
        }
        Err(Step::Skip(why, next)) => {
            report.record("upstream-resend-until-ack", Outcome::Skip(why));
            link = next;
        }
        Err(Step::Fail(why, next)) => {
            report.record("upstream-resend-until-ack", Outcome::Fail(why));
            match next {
                Some(next) => link = next,
                None => return,
            }
        }
    }
    // Each close code, with the reconnect it should (or should not) be followed by.
    let usual = c.heartbeat * 3 + c.patience;
    for (name, code) in [
        (
            "close-keepalive-timeout",
            SessionCloseCode::KeepaliveTimeout,
        ),
        ("close-node-limit", SessionCloseCode::NodeLimit),
    ] {
        match reconnects_after(&mut server, link, code, usual).await {
            Ok((why, mut next)) => {
                let why = match pending_upstream.take() {
                    Some(id) => match not_resent(c, &mut next, &id).await {
                        Ok(()) => format!("{why}; the acknowledged {id} was not resent"),
                        Err(e) => {
                            report.record(name, Outcome::Fail(e));
                            link = next;
                            continue;
                        }
                    },
                    None => why,
                };
                report.record(name, Outcome::Pass(why));
                link = next;
            }
            Err(why) => {
                report.record(name, Outcome::Fail(why));
                return;
            }
        }
    }
    // Identity refused and takeover: no reconnect within three heartbeats.
    let quiet = c.heartbeat * 3;
    link.close(
        Some(SessionCloseCode::IdentityRefused),
        "conformance: identity refused",
    )
    .await;
    let outcome = stays_away(&mut server, quiet, "4003", "").await;
    report.record("close-identity-refused", outcome);
    // It comes back eventually (Causeway: after the longest backoff, eight heartbeats).
    let link = match server.next(c.heartbeat * 10 + c.patience).await {
        Ok(link) => link,
        Err(e) => {
            report.record(
                "close-takeover",
                Outcome::Skip(format!("the edge did not come back after 4003: {e}")),
            );
            return;
        }
    };
    link.close(
        Some(SessionCloseCode::Replaced),
        "conformance: replaced by a newer connection",
    )
    .await;
    let outcome = stays_away(
        &mut server,
        quiet,
        "4001",
        ": it would fight the newer session",
    )
    .await;
    report.record("close-takeover", outcome);
}

/// One line of standard input (`--edge-api -`: the edge's endpoint is known only once it runs).
/// Passes when the edge does not reconnect within `quiet` (three heartbeats) after the close
/// `code`; `why` says what a reconnect would mean.
async fn stays_away(server: &mut Server, quiet: Duration, code: &str, why: &str) -> Outcome {
    match server.next(quiet).await {
        Ok(_) => Outcome::Fail(format!(
            "the edge reconnected within {} ms after {code}{why}",
            ms(quiet)
        )),
        Err(_) => Outcome::Pass(format!(
            "no reconnect within {} ms (three heartbeats) after {code}",
            ms(quiet)
        )),
    }
}

async fn read_line_from_stdin(within: Duration) -> Result<String, String> {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    match tokio::time::timeout(within, stdin.read_line(&mut line)).await {
        Err(_) => Err(format!("nothing within {} ms", ms(within))),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) if line.trim().is_empty() => Err("an empty line".into()),
        Ok(Ok(_)) => Ok(line.trim().to_owned()),
    }
}

/// Why a multi-connection case did not pass; a failure hands back the connection to go on with.
enum Step {
    Skip(String, Link),
    Fail(String, Option<Link>),
}

/// The kit's listener.
struct Server {
    listener: Box<dyn Listener>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    async fn start(c: &CloudRoleConfig) -> Result<Self, String> {
        let socket = ListenSocket::bind(c.protocol, c.listen)
            .await
            .map_err(|e| format!("cannot bind {}: {e}", c.listen))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let config = ListenConfig::new(c.identity.clone(), c.trust_anchors.clone());
        let listener = transport::listen(c.protocol, socket, config, shutdown)
            .map_err(|e| format!("cannot listen: {e}"))?;
        Ok(Self {
            listener,
            _stop: stop,
        })
    }

    /// The next edge connection within `within` (refused attempts are skipped).
    async fn next(&mut self, within: Duration) -> Result<Link, String> {
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.listener.accept()).await {
                Err(_) => return Err(format!("no connection within {} ms", ms(within))),
                Ok(None) => return Err("the listener stopped".into()),
                Ok(Some(Ok(conn))) => return Ok(Link::new(conn)),
                Ok(Some(Err(_refused))) => {}
            }
        }
    }
}

fn is_keepalive(m: &Message) -> bool {
    m.route.operation == OP_KEEPALIVE
}

/// A keepalive within a heartbeat of the session's start, and the next within another.
async fn keepalive(c: &CloudRoleConfig, link: &mut Link) -> Result<String, String> {
    let within = c.heartbeat + c.heartbeat / 2 + Duration::from_secs(1);
    link.wait_for("a first keepalive", within, is_keepalive, |_| {})
        .await?;
    let first = Instant::now();
    link.wait_for("a second keepalive", within, is_keepalive, |_| {})
        .await?;
    Ok(format!(
        "first keepalive {} ms after the session opened, the next {} ms later",
        ms(first.duration_since(link.since)),
        ms(first.elapsed())
    ))
}

/// A downstream message is answered (op `response`, parent id = its id); its resend under the
/// same id is answered again and, with the edge API, not delivered twice.
async fn downstream_ack(c: &CloudRoleConfig, link: &mut Link) -> Result<String, String> {
    let id = proto::new_id();
    let msg = Message::with_header(id.clone(), "", proto::now_millis())
        .route(
            "edgecontroller",
            "resource",
            "default/configmap/conformance",
            "update",
        )
        .content(Content::Json(serde_json::json!({"data": {"k": id}})));
    let answered = |m: &Message| m.route.operation == OP_RESPONSE && m.header.parent_id == id;
    link.send(msg.clone()).await?;
    link.wait_for(&format!("the answer to {id}"), c.patience, answered, |_| {})
        .await?;
    link.send(msg).await?;
    link.wait_for(
        &format!("the answer to the resend of {id}"),
        c.patience,
        answered,
        |_| {},
    )
    .await
    .map_err(|e| format!("a resend (same id) must be answered again: {e}"))?;
    let Some(api) = &c.edge_api else {
        return Ok(format!("{id} answered, and its resend answered again"));
    };
    let (status, body) = http::request(
        api,
        "GET",
        "/v1/messages?after=0&limit=1000",
        None,
        c.patience,
    )
    .await?;
    if status != 200 {
        return Err(format!("the edge API answered {status}: {body}"));
    }
    let count = body.matches(&format!("\"msg_id\":\"{id}\"")).count();
    if count == 1 {
        Ok(format!("{id} answered twice and stored once at the edge"))
    } else {
        Err(format!("{id} is stored {count} times at the edge"))
    }
}

/// Waits for an upstream data message the edge sends (asking the edge API for one when given).
async fn next_data(c: &CloudRoleConfig, link: &mut Link) -> Result<Message, String> {
    next_data_seen(c, link, |_| {}).await
}

/// [`next_data`], handing every message before it to `seen`.
async fn next_data_seen(
    c: &CloudRoleConfig,
    link: &mut Link,
    seen: impl FnMut(&Message),
) -> Result<Message, String> {
    let mut wanted_id = None;
    if let Some(api) = &c.edge_api {
        let id = proto::new_id();
        let body = serde_json::json!({"group": "user", "resource": "conformance/upstream",
            "operation": "publish", "content": {"conformance": true}, "id": id});
        let (status, answer) = http::request(
            api,
            "POST",
            "/v1/upstream",
            Some(&body.to_string()),
            c.patience,
        )
        .await?;
        if status / 100 != 2 {
            return Err(format!(
                "the edge API refused the upstream message: {status} {answer}"
            ));
        }
        wanted_id = Some(id);
    }
    let within = if wanted_id.is_some() {
        c.patience
    } else {
        c.patience * 2
    };
    link.wait_for(
        "an upstream data message",
        within,
        |m| {
            m.upstream_class() == UpstreamClass::Data
                && wanted_id.as_ref().is_none_or(|id| &m.header.id == id)
        },
        seen,
    )
    .await
}

/// An upstream data message left unacknowledged is sent again, under the same id, after the
/// session is closed (here with 4004) and the edge reconnects; then the kit acknowledges it.
async fn upstream_resend(
    c: &CloudRoleConfig,
    server: &mut Server,
    mut link: Link,
) -> Result<(String, String, Link), Step> {
    let data = match next_data(c, &mut link).await {
        Ok(data) => data,
        Err(e) if c.edge_api.is_none() => {
            return Err(Step::Skip(
                format!("the edge sent no data and no --edge-api was given: {e}"),
                link,
            ));
        }
        Err(e) => return Err(Step::Fail(e, Some(link))),
    };
    let id = data.header.id.clone();
    let usual = c.heartbeat * 3 + c.patience;
    let (why, mut next) = reconnects_after(server, link, SessionCloseCode::Shutdown, usual)
        .await
        .map_err(|e| Step::Fail(e, None))?;
    let resent = next
        .wait_for(
            &format!("the resend of {id}"),
            c.patience,
            |m| m.header.id == id,
            |_| {},
        )
        .await;
    if let Err(e) = resent {
        return Err(Step::Fail(format!("{why}, but {e}"), Some(next)));
    }
    let ack = Message::new(id.clone()).route("cloudhub", GROUP_CAUSEWAY, "", OP_ACK);
    if let Err(e) = next.send(ack).await {
        return Err(Step::Fail(e, Some(next)));
    }
    Ok((
        format!("{id} unacknowledged, resent under the same id after a reconnect ({why})"),
        id,
        next,
    ))
}

/// Closes with `code`; the edge must come back within `within`. The verdict text and the new
/// connection.
async fn reconnects_after(
    server: &mut Server,
    link: Link,
    code: SessionCloseCode,
    within: Duration,
) -> Result<(String, Link), String> {
    link.close(Some(code), &format!("conformance: {}", code.label()))
        .await;
    let closed = Instant::now();
    let next = server
        .next(within)
        .await
        .map_err(|e| format!("after close code {code}: {e}"))?;
    let after = closed.elapsed();
    if after < Duration::from_millis(500) {
        return Err(format!(
            "reconnected {} ms after close code {code}: a tight loop",
            ms(after)
        ));
    }
    Ok((
        format!("reconnected {} ms after close code {code}", ms(after)),
        next,
    ))
}

/// The acknowledged message `id` is not sent again on the new connection: the next data the
/// edge sends (asked for through the edge API) comes first.
async fn not_resent(c: &CloudRoleConfig, link: &mut Link, id: &str) -> Result<(), String> {
    if c.edge_api.is_none() {
        return Ok(());
    }
    let mut resent = false;
    let marker = next_data_seen(c, link, |m| resent |= m.header.id == id).await?;
    // Acknowledged like any stored message, so the edge's outbox does not keep it.
    let ack = Message::new(marker.header.id.clone()).route("cloudhub", GROUP_CAUSEWAY, "", OP_ACK);
    link.send(ack).await?;
    if resent {
        Err(format!(
            "{id} was acknowledged, yet sent again before {}",
            marker.header.id
        ))
    } else {
        Ok(())
    }
}
