//! `causeway`: the Causeway admin CLI. Command groups live in `cmd/`, one module each: `certs`
//! (CA, server and node certificates), `token` (bootstrap tokens), `frame` (decode and encode
//! KubeEdge wire messages), `api` (`nodes`, `send`, `tail`: clients of the cloud API). To add a group, add a module with an `Args` struct and a `run`
//! function, and a variant to [`Command`].
//!
//! Exit codes: 0 success; 1 failure (I/O, refused operation, invalid token); 2 bad input or usage
//! (the one-line error names the byte offset for undecodable input).

mod cmd;
mod duration;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Causeway admin CLI: certificates, bootstrap tokens, and KubeEdge wire messages.
#[derive(Debug, Parser)]
#[command(name = "causeway", version, about, propagate_version = true)]
#[command(after_help = "\
Examples:
  causeway certs init --dir /etc/causeway/pki --advertise-address 192.168.1.10
  causeway certs node --dir /etc/causeway/pki --node-id edge-1
  causeway token create --dir /etc/causeway/pki --ttl 24h
  causeway frame decode capture.frame

Exit codes: 0 success, 1 failure, 2 bad input or usage.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Top-level command groups; each variant's arguments and behaviour live in `cmd::<group>`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Create the CA, the cloud server certificate and node certificates.
    #[command(after_help = "\
Examples:
  causeway certs init --dir /etc/causeway/pki --advertise-address 192.168.1.10
  causeway certs node --dir /etc/causeway/pki --node-id edge-1")]
    Certs(cmd::certs::Args),
    /// Create and check KubeEdge-format bootstrap tokens.
    #[command(after_help = "\
Examples:
  TOKEN=$(causeway token create --dir /etc/causeway/pki --ttl 24h)
  causeway token verify --dir /etc/causeway/pki \"$TOKEN\"")]
    Token(cmd::token::Args),
    /// Decode and encode messages in KubeEdge's wire forms (packer frame, protobuf, JSON).
    #[command(after_help = "\
Examples:
  causeway frame decode conformance/vectors/keepalive.frame
  causeway frame encode --format frame < msg.json > msg.frame")]
    Frame(cmd::frame::Args),
    /// List the nodes the cloud knows, with their link state and queue depths.
    #[command(after_help = "\
Examples:
  causeway nodes
  causeway nodes edge-1
  CAUSEWAY_API=https://cloud.example:10003 CAUSEWAY_API_CA=/etc/causeway/pki/ca.crt \\
      CAUSEWAY_API_TOKEN=cwapi_... causeway nodes --json")]
    Nodes(cmd::api::NodesArgs),
    /// Queue a message for a node (durably), optionally waiting for the edge's ACK.
    #[command(after_help = "\
Examples:
  causeway send edge-1 --group resource --resource default/configmap/demo --op update \\
      --content '{\"k\":\"v\"}' --wait-ack
  causeway send edge-1 --group user --resource app/cmd --op publish --content @cmd.json")]
    Send(cmd::api::SendArgs),
    /// Cancel a queued or in-flight message for a node: it leaves the queue and is never resent.
    #[command(after_help = "\
Examples:
  causeway cancel edge-1 cm-demo-1

Exit codes: 0 cancelled (or already cancelled), 1 unknown, already acknowledged or failed.")]
    Cancel(cmd::api::CancelArgs),
    /// Print upstream (edge to cloud) messages as they arrive, one JSON line each.
    #[command(after_help = "\
Examples:
  causeway tail
  causeway tail --node edge-1 --group resource
  causeway tail --node edge-1 --count 1 --timeout 30s")]
    Tail(cmd::api::TailArgs),
    /// Create or replace objects (desired state) from a YAML or JSON file.
    #[command(after_help = "\
Examples:
  causeway apply -f demo-configmap.yaml
  causeway apply -f pods.yaml -n edge-apps")]
    Apply(cmd::objects::ApplyArgs),
    /// List objects, or show one as JSON.
    #[command(after_help = "\
Examples:
  causeway get configmaps
  causeway get pods -n default -l app=web
  causeway get nodes edge-1")]
    Get(cmd::objects::GetArgs),
    /// Delete an object; the nodes that hold it are told.
    #[command(after_help = "\
Examples:
  causeway delete configmap demo -n default")]
    Delete(cmd::objects::DeleteArgs),
    /// Create, list and revoke the cloud API's bearer tokens (offline with --dir, or via the API).
    #[command(name = "api-token")]
    ApiToken(cmd::api_token::Args),
    /// Check another edge or cloud against PROTOCOL.md Part A: PASS / FAIL per case.
    #[command(after_help = "\
Examples:
  causeway conformance --role edge --protocol quic --server 10.0.0.5:10001 \\
      --ca ca.crt --cert node.crt --key node.key --api http://10.0.0.5:10003
  causeway conformance --role cloud --protocol websocket --listen 0.0.0.0:10000 \\
      --ca ca.crt --cert server.crt --key server.key --heartbeat 15s

Exit codes: 0 every case passed or was skipped, 1 a case failed, 2 bad usage.")]
    Conformance(cmd::conformance::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(args) => cmd::certs::run(args),
        Command::Token(args) => cmd::token::run(args),
        Command::Frame(args) => cmd::frame::run(args),
        Command::Nodes(args) => cmd::api::run_nodes(args),
        Command::Send(args) => cmd::api::run_send(args),
        Command::Cancel(args) => cmd::api::run_cancel(args),
        Command::Tail(args) => cmd::api::run_tail(args),
        Command::Apply(args) => cmd::objects::run_apply(args),
        Command::Get(args) => cmd::objects::run_get(args),
        Command::Delete(args) => cmd::objects::run_delete(args),
        Command::ApiToken(args) => cmd::api_token::run(args),
        Command::Conformance(args) => cmd::conformance::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(bad) = err.downcast_ref::<cmd::BadInput>() {
                eprintln!("causeway: {bad}");
                ExitCode::from(2)
            } else {
                eprintln!("causeway: error: {err:#}");
                ExitCode::FAILURE
            }
        }
    }
}
