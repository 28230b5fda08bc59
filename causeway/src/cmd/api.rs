//! `causeway nodes`, `causeway send`, `causeway cancel` and `causeway tail`: thin clients of cloudcore's cloud API
//! (`cloudhub/src/api.rs`). They print what the API answers; the API owns every rule (queueing,
//! ACK classification, waiting), so the CLI and applications cannot disagree.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::duration::parse as parse_duration;

/// Default cloud API address (cloudcore's default `api` endpoint); `CAUSEWAY_API` overrides it.
const DEFAULT_API: &str = "http://127.0.0.1:10003";

/// Where the cloud API is, and how to authenticate to it.
#[derive(Debug, clap::Args)]
pub(crate) struct ApiArgs {
    /// Base URL of cloudcore's cloud API (`https://...` when it is not on loopback).
    #[arg(long, env = "CAUSEWAY_API", default_value = DEFAULT_API, value_name = "URL")]
    pub(crate) api: String,
    /// API token (`causeway api-token create`); prefer the environment variable, which other
    /// users cannot see in the process list.
    #[arg(
        long,
        env = "CAUSEWAY_API_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// CA certificate (PEM) that signed the API's server certificate, for https URLs: the
    /// cloud's `ca.crt`.
    #[arg(long, env = "CAUSEWAY_API_CA", value_name = "FILE")]
    api_ca: Option<PathBuf>,
    /// API client certificate (PEM, `causeway certs api-client`) for https, instead of a token.
    #[arg(
        long,
        env = "CAUSEWAY_API_CERT",
        value_name = "FILE",
        requires = "api_key"
    )]
    api_cert: Option<PathBuf>,
    /// The key of `--api-cert`.
    #[arg(
        long,
        env = "CAUSEWAY_API_KEY",
        value_name = "FILE",
        requires = "api_cert"
    )]
    api_key: Option<PathBuf>,
}

impl ApiArgs {
    /// The base URL without a trailing slash.
    pub(crate) fn base(&self) -> &str {
        self.api.trim_end_matches('/')
    }

    /// An HTTP client for the API: trusts `--api-ca` for https, sends `--token`.
    pub(crate) fn client(&self) -> anyhow::Result<reqwest::Client> {
        // reqwest is built without a provider of its own (ring is the workspace's only one);
        // it fails if none is installed. An earlier install in this process is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if let Some(ca) = &self.api_ca {
            let anchors = ::certs::TrustAnchors::load(ca)
                .with_context(|| format!("loading the API's CA from {}", ca.display()))?;
            let identity = match (&self.api_cert, &self.api_key) {
                (Some(cert), Some(key)) => Some(
                    ::certs::Identity::load(cert, key)
                        .with_context(|| format!("loading {}", cert.display()))?,
                ),
                _ => None,
            };
            let tls = transport::tls::api_client_config(&anchors, identity.as_ref())
                .context("building the API's TLS configuration")?;
            builder = builder.use_preconfigured_tls(tls);
        } else if self.base().starts_with("https:") {
            bail!("an https API URL needs --api-ca (or CAUSEWAY_API_CA): the cloud's ca.crt");
        }
        if let Some(token) = &self.token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| anyhow::anyhow!("the API token holds characters a header cannot"))?;
            value.set_sensitive(true);
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::AUTHORIZATION, value);
            builder = builder.default_headers(headers);
        }
        builder.build().context("building the HTTP client")
    }
}

/// `causeway nodes`: list nodes, or show one.
#[derive(Debug, clap::Args)]
pub(crate) struct NodesArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Show only this node, in full.
    node: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `causeway send`: queue a message for a node.
#[derive(Debug, clap::Args)]
pub(crate) struct SendArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The node to send to.
    node: String,
    /// Route group (e.g. `resource`, `twin`, `user`).
    #[arg(long)]
    group: String,
    /// Route resource (e.g. `default/configmap/demo`).
    #[arg(long)]
    resource: String,
    /// Route operation (e.g. `insert`, `update`, `delete`).
    #[arg(long)]
    op: String,
    /// Route source (the sending module's name).
    #[arg(long, default_value = "causeway")]
    source: String,
    /// Content: JSON text, or `@FILE` to read it from a file. A value that is not JSON is sent as
    /// a JSON string.
    #[arg(long)]
    content: Option<String>,
    /// Wait until the edge acknowledges the message.
    #[arg(long)]
    wait_ack: bool,
    /// How long `--wait-ack` waits.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

/// `causeway cancel`: cancel a queued message (one the edge never acknowledges).
#[derive(Debug, clap::Args)]
pub(crate) struct CancelArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The node the message was queued for.
    node: String,
    /// The message id (`id` of `causeway send`'s answer).
    msg_id: String,
}

/// `causeway tail`: print upstream (edge → cloud) messages as they arrive.
#[derive(Debug, clap::Args)]
pub(crate) struct TailArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Only this node's messages.
    #[arg(long)]
    node: Option<String>,
    /// Only messages of this route group.
    #[arg(long)]
    group: Option<String>,
    /// Replay the retained log from the start before following.
    #[arg(long)]
    from_start: bool,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Stop (with exit code 1) if the count is not reached within this time.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
}

pub(crate) fn run_nodes(args: NodesArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let client = args.api.client()?;
        let base = args.api.base();
        let url = match &args.node {
            Some(node) => format!("{base}/v1/nodes/{node}"),
            None => format!("{base}/v1/nodes"),
        };
        let body = get_json(&client, &url).await?;
        if args.json || args.node.is_some() {
            println!("{}", serde_json::to_string_pretty(&body)?);
            return Ok(());
        }
        print_node_table(&body);
        Ok(())
    })
}

pub(crate) fn run_send(args: SendArgs) -> anyhow::Result<()> {
    let content = match &args.content {
        None => Value::Null,
        Some(text) => parse_content(text)?,
    };
    let message = json!({
        "route": {
            "source": args.source,
            "group": args.group,
            "operation": args.op,
            "resource": args.resource,
        },
        "content": content,
    });
    runtime()?.block_on(async {
        let client = args.api.client()?;
        let base = args.api.base();
        let mut url = format!("{base}/v1/nodes/{}/messages", args.node);
        if args.wait_ack {
            url.push_str(&format!("?wait=ack&timeout={}ms", args.timeout.as_millis()));
        }
        let resp = client
            .post(&url)
            .json(&message)
            // The API holds the request for the ACK wait; give it a margin on top.
            .timeout(args.timeout + Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let body = response_json(resp, &url).await?;
        println!("{}", serde_json::to_string(&body)?);
        if args.wait_ack && body["failed"] == Value::Bool(true) {
            bail!(
                "the edge could not deliver message {}: {}; it failed and is not resent",
                body["id"],
                body["error"].as_str().unwrap_or("no reason given")
            );
        }
        if args.wait_ack && body["acked"] != Value::Bool(true) {
            bail!(
                "message {} was queued but not acknowledged within {:?}; it stays queued",
                body["id"],
                args.timeout
            );
        }
        Ok(())
    })
}

pub(crate) fn run_cancel(args: CancelArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let client = args.api.client()?;
        let base = args.api.base();
        let url = format!("{base}/v1/nodes/{}/messages/{}", args.node, args.msg_id);
        let resp = client
            .delete(&url)
            .send()
            .await
            .with_context(|| format!("DELETE {url}"))?;
        let body = response_json(resp, &url).await?;
        println!("{}", serde_json::to_string(&body)?);
        Ok(())
    })
}

pub(crate) fn run_tail(args: TailArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let follow = tail(&args);
        match args.timeout {
            None => follow.await,
            Some(limit) => match tokio::time::timeout(limit, follow).await {
                Ok(result) => result,
                Err(_) => bail!("no more messages within {limit:?}"),
            },
        }
    })
}

async fn tail(args: &TailArgs) -> anyhow::Result<()> {
    let client = args.api.client()?;
    let base = args.api.base();
    let mut query = Vec::new();
    if let Some(node) = &args.node {
        query.push(("node", node.clone()));
    }
    if let Some(group) = &args.group {
        query.push(("group", group.clone()));
    }
    if args.from_start {
        query.push(("since", "0".to_owned()));
    }
    let url = reqwest::Url::parse_with_params(&format!("{base}/v1/messages"), &query)
        .with_context(|| format!("bad API URL {base:?}"))?;
    let resp = client
        .get(url.clone())
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !resp.status().is_success() {
        response_json(resp, url.as_str()).await?;
        bail!("GET {url} failed");
    }
    let mut resp = resp;
    let mut events = SseParser::default();
    let mut seen = 0u64;
    let mut stdout = std::io::stdout().lock();
    while let Some(chunk) = resp.chunk().await.context("reading the message stream")? {
        for data in events.push(&chunk) {
            writeln!(stdout, "{data}")?;
            stdout.flush()?;
            seen += 1;
            if args.count.is_some_and(|n| seen >= n) {
                return Ok(());
            }
        }
    }
    bail!("the cloud API closed the stream")
}

/// Splits a Server-Sent Events byte stream into the `data` of each event.
#[derive(Debug, Default)]
struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    /// Feeds bytes; returns the data of every event they complete.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut done = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    done.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                self.data
                    .push(value.strip_prefix(' ').unwrap_or(value).to_owned());
            }
            // `id:`, `event:` and `:` keep-alive comments carry nothing to print.
        }
        done
    }
}

fn parse_content(text: &str) -> anyhow::Result<Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => text.to_owned(),
    };
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn print_node_table(body: &Value) {
    println!(
        "{:<24} {:<10} {:<10} {:<22} {:>8} {:>9}",
        "NODE", "CONNECTED", "PROTOCOL", "REMOTE", "PENDING", "IN-FLIGHT"
    );
    for node in body.as_array().into_iter().flatten() {
        let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
        println!(
            "{:<24} {:<10} {:<10} {:<22} {:>8} {:>9}",
            text(&node["id"]),
            node["connected"].as_bool().unwrap_or(false),
            text(&node["protocol"]),
            text(&node["remote_addr"]),
            node["queue"]["pending"].as_u64().unwrap_or(0),
            node["queue"]["in_flight"].as_u64().unwrap_or(0),
        );
    }
}

pub(crate) async fn get_json(client: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    response_json(resp, url).await
}

/// The body as JSON; an error status becomes an error carrying the API's message.
pub(crate) async fn response_json(resp: reqwest::Response, url: &str) -> anyhow::Result<Value> {
    let status = resp.status();
    let text = resp
        .text()
        .await
        .with_context(|| format!("reading {url}"))?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let reason = body["error"]
            .as_str()
            .map_or_else(|| body.to_string(), str::to_owned);
        bail!("{url}: {status}: {reason}");
    }
    Ok(body)
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_splits_events_across_chunks() {
        let mut p = SseParser::default();
        assert!(
            p.push(b": keep-alive\n\nid: 1\nevent: message\ndata: {\"a\"")
                .is_empty()
        );
        assert_eq!(
            p.push(b":1}\n\nid: 2\ndata: x\r\n\r\n"),
            vec!["{\"a\":1}", "x"]
        );
    }

    #[test]
    fn content_is_json_or_a_string() {
        assert_eq!(parse_content("{\"k\":1}").unwrap(), json!({"k": 1}));
        assert_eq!(parse_content("plain").unwrap(), json!("plain"));
    }
}
