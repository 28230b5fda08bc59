//! `causeway token`: create and verify KubeEdge-format bootstrap tokens for the CA in a
//! certificate directory. A token lets its holder obtain a node certificate until it expires:
//! treat it as a secret.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::duration;
use ::certs::files::CertDir;
use ::certs::token;

/// `causeway token` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a new bootstrap token (`<CA sha256>.<HS256 JWT>`, as `keadm gettoken` prints).
    #[command(after_help = "\
Example:
  causeway token create --dir /etc/causeway/pki --ttl 24h

The token is a secret: until it expires, anyone holding it can obtain a node certificate.
Keep the TTL short. Durations: 90s, 30m, 24h, 7d, 1h30m.")]
    Create(CreateArgs),
    /// Check a token against the CA in DIR (exit 0 if valid, 1 if not).
    #[command(after_help = "\
Example:
  causeway token verify --dir /etc/causeway/pki \"$TOKEN\"")]
    Verify(VerifyArgs),
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Certificate directory holding ca.crt and ca.key.
    #[arg(long)]
    dir: PathBuf,
    /// How long the token is valid (s, m, h, d; e.g. 24h).
    #[arg(long, default_value = "24h", value_parser = duration::parse)]
    ttl: Duration,
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    /// Certificate directory holding ca.crt and ca.key.
    #[arg(long)]
    dir: PathBuf,
    /// The token to check.
    token: String,
}

/// Runs `causeway token`.
pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Create(a) => {
            let ca = CertDir::new(&a.dir).load_ca().context("loading the CA")?;
            println!("{}", token::create(&ca, a.ttl, OffsetDateTime::now_utc()));
            Ok(())
        }
        Command::Verify(a) => {
            let ca = CertDir::new(&a.dir).load_ca().context("loading the CA")?;
            let claims = token::verify(&a.token, &ca, OffsetDateTime::now_utc())
                .context("token is not valid")?;
            let expires = claims
                .expires_at
                .format(&Rfc3339)
                .unwrap_or_else(|_| claims.expires_at.unix_timestamp().to_string());
            println!("valid until {expires}");
            Ok(())
        }
    }
}
