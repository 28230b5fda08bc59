//! `causeway conformance`: the conformance kit (`causeway-conformance`) on the command line. It
//! plays the cloud (`--role cloud`, to test an edge) or the edge (`--role edge`, to test a cloud)
//! of each behaviour of PROTOCOL.md Part A against an address given here, prints one line per
//! case (`PASS` / `FAIL` / `SKIP` with a reason) and exits 1 if any case failed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use certs::{CertificateAuthority, Identity, NodeId, TrustAnchors};
use clap::ValueEnum;
use conformance::Report;
use conformance::cloud_role::CloudRoleConfig;
use conformance::edge_role::EdgeRoleConfig;
use transport::Protocol;

/// Which side the kit plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Role {
    /// Play the cloud: listen on --listen and test the edge that dials it.
    Cloud,
    /// Play an edge: dial --server and test the cloud there.
    Edge,
}

/// Arguments of `causeway conformance`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The side the kit plays: `cloud` tests an edge, `edge` tests a cloud.
    #[arg(long, value_enum)]
    role: Role,
    /// The wire protocol: `websocket` or `quic`.
    #[arg(long, default_value = "quic")]
    protocol: Protocol,
    /// CA certificate (PEM) the peer's certificate must chain to.
    #[arg(long)]
    ca: PathBuf,
    /// The kit's certificate (PEM): a node certificate with --role edge, a server certificate
    /// (with the SAN the edge dials) with --role cloud.
    #[arg(long)]
    cert: PathBuf,
    /// The key of --cert (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Bound on anything that should be prompt (connect, an answer, a close).
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse)]
    patience: Duration,

    /// --role edge: the cloud's host:port for --protocol.
    #[arg(long, required_if_eq("role", "edge"))]
    server: Option<String>,
    /// --role edge: the node id to claim (default: the one in --cert).
    #[arg(long)]
    node_id: Option<String>,
    /// --role edge: the cloud's keepalive interval (cloudhub.keepalive-interval).
    #[arg(long, default_value = "30s", value_parser = crate::duration::parse)]
    keepalive_interval: Duration,
    /// --role edge: how soon the cloud must resend an unanswered message (ACK timeout + slack).
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse)]
    resend_within: Duration,
    /// --role edge: the cloud API (http://host:port), to make the cloud send downstream
    /// messages and to count deliveries; without it those cases are skipped.
    #[arg(long)]
    api: Option<String>,
    /// --role edge: the CA key (PEM), to issue certificates for the node-limit case.
    #[arg(long, requires = "node_limit")]
    ca_key: Option<PathBuf>,
    /// --role edge: the cloud's node limit (cloudhub.node-limit); the case connects up to this
    /// many + 1 fresh nodes.
    #[arg(long, requires = "ca_key")]
    node_limit: Option<usize>,
    /// --role edge: run the shutdown case last; it prints "ACTION: stop the cloud now" and
    /// expects close code 4004.
    #[arg(long)]
    expect_shutdown: bool,

    /// --role cloud: where to listen for the edge under test.
    #[arg(long, required_if_eq("role", "cloud"))]
    listen: Option<SocketAddr>,
    /// --role cloud: the edge's heartbeat (edgehub.controller.heartbeat).
    #[arg(long, default_value = "15s", value_parser = crate::duration::parse)]
    heartbeat: Duration,
    /// --role cloud: the edge's local endpoint (http://host:port, edgecore's local API), to
    /// make the edge send upstream data and to count what it stored.
    #[arg(long)]
    edge_api: Option<String>,
}

/// Runs the kit; an error if any case failed.
pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let identity = Identity::load(&args.cert, &args.key)
        .with_context(|| format!("loading {} and {}", args.cert.display(), args.key.display()))?;
    let anchors =
        TrustAnchors::load(&args.ca).with_context(|| format!("loading {}", args.ca.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut report = Report::new(|result| println!("{result}"));
    let say = |line: &str| println!("{line}");
    match args.role {
        Role::Edge => {
            let node_id = match &args.node_id {
                Some(id) => NodeId::new(id.clone()).context("--node-id")?,
                None => certs::node_id_from_cert(&identity.chain[0])
                    .context("--cert is not a node certificate (give --node-id?)")?,
            };
            let node_limit = match (&args.ca_key, args.node_limit) {
                (Some(key), Some(limit)) => {
                    let ca = CertificateAuthority::from_pem(
                        &std::fs::read_to_string(&args.ca).context("reading --ca")?,
                        &std::fs::read_to_string(key).context("reading --ca-key")?,
                    )
                    .context("loading the CA")?;
                    Some((ca, limit))
                }
                _ => None,
            };
            let config = EdgeRoleConfig {
                protocol: args.protocol,
                server: args.server.clone().unwrap_or_default(),
                identity,
                node_id,
                trust_anchors: anchors,
                keepalive_interval: args.keepalive_interval,
                resend_within: args.resend_within,
                patience: args.patience,
                api: args.api.clone(),
                node_limit,
                expect_shutdown: args.expect_shutdown,
            };
            runtime.block_on(conformance::edge_role::run(&config, &mut report, say));
        }
        Role::Cloud => {
            let config = CloudRoleConfig {
                protocol: args.protocol,
                listen: args.listen.context("--listen")?,
                identity,
                trust_anchors: anchors,
                heartbeat: args.heartbeat,
                patience: args.patience,
                edge_api: args.edge_api.clone(),
            };
            runtime.block_on(conformance::cloud_role::run(&config, &mut report, say));
        }
    }
    let results = report.into_results();
    let failed = results.iter().filter(|r| r.failed()).count();
    let passed = results
        .iter()
        .filter(|r| matches!(r.outcome, conformance::Outcome::Pass(_)))
        .count();
    println!(
        "{} role over {}: {passed} passed, {failed} failed, {} skipped",
        match args.role {
            Role::Cloud => "cloud",
            Role::Edge => "edge",
        },
        args.protocol,
        results.len() - passed - failed
    );
    if failed > 0 {
        bail!("{failed} conformance case(s) failed");
    }
    Ok(())
}
