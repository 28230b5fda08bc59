//! `cloudcore`: the Causeway cloud daemon. It loads `cloudcore.yaml` (or the defaults), makes
//! sure a CA and a server certificate exist (creating them on first start, in the
//! `causeway certs init` layout), opens the durable message store, binds the edge listeners
//! (WebSocket, QUIC), the certificate bootstrap server and the cloud API, and runs the CloudHub
//! beehive module until SIGINT or SIGTERM, then shuts down gracefully and exits 0.
//!
//! Once bound it logs one line `cloudcore listening` with the bound addresses (useful with port
//! 0) and how to create a bootstrap token for edges.

mod pki;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use beehive::{Beehive, TerminationSignals};
use clap::Parser;
use cloudhub::Hub;
use cloudhub::api::ApiOptions;
use cloudhub::auth::TokenStore;
use cloudhub::bootstrap::BootstrapConfig;
use cloudhub::config::{CloudcoreConfig, DEFAULT_YAML};
use cloudhub::module::{ApiServing, Bound, CloudHubModule};
use cloudhub::objects::sqlite::SqliteObjects;
use cloudhub::store::MessageStore;
use cloudhub::store::jetstream::JetStreamStore;
use cloudhub::store::sqlite::SqliteStore;
use devicecontroller::DeviceController;
use edgecontroller::EdgeController;
use transport::ListenConfig;

/// The Causeway cloud daemon: serves edge nodes (WebSocket, QUIC), certificate bootstrap and
/// the cloud API.
#[derive(Debug, Parser)]
#[command(name = "cloudcore", version, about)]
struct Args {
    /// Configuration file (YAML, see --defaultconfig); without it every default applies.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the complete, commented default configuration and exit.
    #[arg(long)]
    defaultconfig: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    beehive::daemon::main_or_defaults("cloudcore", args.defaultconfig, DEFAULT_YAML, || run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => CloudcoreConfig::load(path)?,
        None => CloudcoreConfig::default(),
    };
    let hub_config = &config.cloudhub;
    // Checked before anything is created or bound: an exposed API without TLS is refused.
    let api_tls = hub_config.api_uses_tls()?;
    let pki = pki::ensure(hub_config)?;
    let store: Arc<dyn MessageStore> = match hub_config.jetstream_config()? {
        Some(js) => {
            let url = js.url.clone();
            Arc::new(
                JetStreamStore::open(js)
                    .await
                    .with_context(|| format!("opening the message store on JetStream {url}"))?,
            )
        }
        None => Arc::new(
            SqliteStore::open(hub_config.store_config()).with_context(|| {
                format!(
                    "opening the message store {}",
                    hub_config.queue.path.display()
                )
            })?,
        ),
    };
    let hub = Hub::new(hub_config.hub_config(), store);
    let objects_path = hub_config.objects_path();
    let objects = Arc::new(
        SqliteObjects::open(&objects_path)
            .with_context(|| format!("opening the object store {}", objects_path.display()))?,
    );
    // Installed before anything runs, so a signal during start-up is not lost.
    let signals = TerminationSignals::install()?;
    let bound = Bound::bind(hub_config)
        .await
        .context("binding the listeners")?;
    let [ws, quic, https, api] = bound
        .addrs()
        .map(|a| a.map(|a| a.to_string()).unwrap_or_default());
    tracing::info!(websocket = %ws, quic = %quic, https = %https, api = %api, "cloudcore listening");
    tracing::info!(
        "create a bootstrap token for edges with: causeway token create --dir {} --ttl {}h",
        hub_config.tls.cert_dir.display(),
        hub_config.token_ttl().as_secs() / 3600
    );
    let mut listen = ListenConfig::new(pki.server.clone(), pki.ca.trust_anchors());
    listen.link = hub_config.link_config();
    let api = if hub_config.api.enable {
        let token_path = hub_config.api_token_path();
        let tokens = TokenStore::open(&token_path)?;
        tracing::info!(file = %token_path.display(), tokens_exist = tokens.any()?,
            "cloud API token file");
        ApiServing {
            options: ApiOptions {
                tokens: Some(Arc::new(tokens)),
                objects: Some(Arc::clone(&objects)),
                ..hub_config.api_options()
            },
            tls: if api_tls {
                Some(transport::tls::api_server_config(
                    &pki.server,
                    &pki.ca.trust_anchors(),
                )?)
            } else {
                None
            },
        }
    } else {
        ApiServing::default()
    };
    let bootstrap = BootstrapConfig {
        edge_cert_days: hub_config.edge_cert_signing_duration.get(),
        ..BootstrapConfig::new(Arc::new(pki.ca), pki.server)
    };
    let controller = EdgeController::new(
        hub.clone(),
        Arc::clone(&objects) as Arc<dyn cloudhub::objects::ObjectSource>,
        hub_config.object_sync_path(),
    );
    let devices = DeviceController::new(
        hub.clone(),
        Arc::clone(&objects) as Arc<dyn cloudhub::objects::ObjectSource>,
        hub_config
            .object_sync_path()
            .with_file_name("devicecontroller.db"),
    );
    let module = CloudHubModule::new(hub, bound, listen, Some(bootstrap)).with_api(api);
    let mut beehive = Beehive::new();
    beehive.register(module, true)?;
    beehive.register(controller, true)?;
    beehive.register(devices, true)?;
    let report = beehive.start().run_until_signal(signals).await;
    beehive::daemon::outcome("cloudcore", &report)?;
    Ok(())
}
