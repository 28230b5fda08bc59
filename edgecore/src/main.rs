//! `edgecore`: the Causeway edge daemon. It loads `edgecore.yaml`, makes sure the node has a
//! certificate (bootstrapping one with the configured token if needed), then runs EdgeHub (the
//! link to the cloud), metamanager (the node's objects), the local endpoint (MetaServer and
//! upstream sends for local applications), servicebus (the cloud's calls to local HTTP
//! services, when enabled), eventbus (the MQTT bridge for devices, when enabled) and devicetwin
//! (devices' twins, when enabled) on a beehive until SIGINT or SIGTERM, and exits 0 after a
//! graceful
//! shutdown.
//!
//! Logs go to stderr (`RUST_LOG` respected, default `info`): one line per connect, disconnect
//! (with the reason) and reconnect attempt.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use beehive::{Beehive, TerminationSignals};
use clap::Parser;

use edgehub::EdgeHubModule;
use edgehub::bootstrap::{self, BootstrapError, CertStatus};
use edgehub::outbox::Outbox;
use eventbus::EventBus;
use servicebus::ServiceBus;

use causeway_edgecore::config::{DEFAULT_YAML, EdgecoreConfig};
use causeway_edgecore::localapi::LocalApi;
use devicetwin::DeviceTwin;
use edged::Edged;
use metamanager::MetaManager;

/// The Causeway edge daemon: keeps this node's link to the cloud (WebSocket or QUIC) and serves
/// cloud messages to local applications.
#[derive(Debug, Parser)]
#[command(name = "edgecore", version, about)]
struct Args {
    /// Configuration file (YAML; see --defaultconfig).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        required_unless_present = "defaultconfig"
    )]
    config: Option<PathBuf>,
    /// Print the complete, commented default configuration and exit.
    #[arg(long)]
    defaultconfig: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    beehive::daemon::main_or_defaults("edgecore", args.defaultconfig, DEFAULT_YAML, || run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let path = args.config.context("--config FILE is required")?;
    let config = EdgecoreConfig::load(&path)?;
    // Installed before anything runs, so a signal during start-up is not lost.
    let mut signals = TerminationSignals::install()?;
    let hub_enabled = config.modules.edgehub.enable;
    if hub_enabled {
        tokio::select! {
            result = obtain_certificate(&config) => result?,
            signal = signals.recv() => {
                tracing::info!(signal, "stopped before the node had a certificate");
                return Ok(());
            }
        }
    }
    if hub_enabled {
        // Fail at start-up, with the path in the message, rather than in a module later.
        let outbox = config.edgehub.outbox_config();
        drop(Outbox::open(outbox).context("opening the outbox")?);
    }
    let meta_enabled = config.modules.metamanager.enable;
    // Opened here, so a bad path fails the start with the path in the message.
    let meta = if meta_enabled {
        Some(
            MetaManager::open(config.modules.metamanager.clone())
                .context("opening metamanager's store")?,
        )
    } else {
        None
    };
    let hub = EdgeHubModule::new(config.edgehub.clone());
    let reconnect = hub.reconnect_trigger();
    let link = hub.stats_handle();
    // Opened here, so a bad path or CA file fails the start; the broker itself is never waited
    // for (eventbus connects in the background).
    let event_bus = if config.modules.eventbus.enable {
        let receipts = hub_enabled.then(|| link.clone());
        Some(
            EventBus::open(
                config.modules.eventbus.clone(),
                config.edgehub.controller.node_id.as_str(),
                receipts,
            )
            .context("starting eventbus")?,
        )
    } else {
        None
    };
    let mut beehive = Beehive::new();
    beehive.register(hub, hub_enabled)?;
    let mut local_api = LocalApi::new(config.modules.local_api.clone()).with_link(link);
    if let Some(event_bus) = event_bus {
        local_api = local_api.with_eventbus(event_bus.status());
        beehive.register(event_bus, true)?;
    }
    let twin = DeviceTwin::new(
        config.modules.device_twin.clone(),
        config.edgehub.controller.node_id.as_str(),
        meta.as_ref().map(MetaManager::store),
    );
    if config.modules.device_twin.enable {
        local_api = local_api.with_devicetwin(twin.stats());
    }
    beehive.register(twin, config.modules.device_twin.enable)?;
    if config.modules.edged.enable {
        let Some(meta) = meta.as_ref() else {
            anyhow::bail!(
                "modules.edged needs modules.metamanager (the node's pods come from its store)"
            );
        };
        let edged = Edged::new(
            config.modules.edged.clone(),
            config.edgehub.controller.node_id.as_str(),
            meta.store(),
        );
        beehive.register(edged, true)?;
    }
    if let Some(meta) = meta {
        local_api = local_api.with_meta(meta.store(), meta.config().remote_query_timeout());
        beehive.register(meta, true)?;
    }
    beehive.register(local_api, config.modules.local_api.enable)?;
    let service_bus = config.modules.service_bus.clone();
    let service_bus_enabled = service_bus.enable;
    beehive.register(ServiceBus::new(service_bus), service_bus_enabled)?;
    tracing::info!(
        node = %config.edgehub.controller.node_id,
        modules = ?beehive.enabled(),
        disabled = ?beehive.disabled(),
        "edgecore starting"
    );
    let hive = beehive.start();
    if hub_enabled {
        let stop = hive.shutdown_signal();
        tokio::spawn(bootstrap::run_renewal(
            config.edgehub.clone(),
            reconnect,
            async move {
                stop.triggered().await;
            },
        ));
    }
    let report = hive.run_until_signal(signals).await;
    beehive::daemon::outcome("edgecore", &report)?;
    Ok(())
}

/// Keeps a valid certificate or bootstraps one; network trouble is retried with backoff
/// (2 s doubling to 60 s). With an unusable certificate and no token (one that expired while
/// the node was offline) it says once what to do and lets edgecore run; anything else (no
/// certificate and no token, a wrong token or CA) ends the process.
async fn obtain_certificate(config: &EdgecoreConfig) -> anyhow::Result<()> {
    let mut delay = Duration::from_secs(2);
    loop {
        match bootstrap::ensure_certificate(&config.edgehub).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_in_secs = delay.as_secs(), "certificate bootstrap failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
            // Not fatal: the local API and metamanager keep serving and the outbox keeps what applications
            // send, the hub keeps dialling (slowly, with backoff; the cloud's refusal shows on
            // /v1/status) and picks up new certificate files at its next dial. Said once.
            Err(e @ BootstrapError::NoToken { .. })
                if bootstrap::certificate_status(&config.edgehub) == CertStatus::Missing =>
            {
                // Never enrolled: a configuration error.
                return Err(e).context("set edgehub.token or provide edgehub.tls files");
            }
            Err(BootstrapError::NoToken { status }) => {
                let hub = &config.edgehub;
                tracing::error!(
                    node = %hub.controller.node_id,
                    certificate = status,
                    "no usable node certificate and no bootstrap token: on the cloud run \
                     `causeway token create --dir <cloud cert-dir>` and set edgehub.token to its \
                     output, then restart edgecore; or install a new certificate for this node at \
                     {} and {} (`causeway certs node --dir <cloud cert-dir> --node-id {}`). \
                     Meanwhile edgecore runs and keeps trying the cloud",
                    hub.tls.cert_file.display(),
                    hub.tls.key_file.display(),
                    hub.controller.node_id,
                );
                return Ok(());
            }
            Err(e) => return Err(e).context("certificate bootstrap"),
        }
    }
}
