//! `causeway api-token`: create, list and revoke the cloud API's bearer tokens.
//!
//! Two ways, one store: with `--dir` (the cloud's certificate directory) or `--token-file`, the
//! command works offline on the token file itself (how the first admin token is made; safe
//! while cloudcore runs, which sees the change at its next request); without, it goes through
//! the API (`/v1/api-tokens`, an admin token in `--token` / `CAUSEWAY_API_TOKEN`).

use std::path::PathBuf;

use anyhow::Context as _;
use cloudhub::auth::{Scope, TokenInfo, TokenStore};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::api::{ApiArgs, get_json, response_json, runtime};

/// `causeway api-token` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create a token and print it (once: only its hash is kept).
    #[command(after_help = "\
Examples:
  # The first admin token, offline, on the cloud host:
  causeway api-token create --dir /etc/causeway/pki --name ops --scope admin
  # Later ones through the API, with an admin token:
  CAUSEWAY_API_TOKEN=cwapi_... causeway api-token create --name dashboard --scope read

Scopes: read (GET endpoints, the message stream, metrics), send (read + queue messages),
admin (everything, including tokens). The token goes to stdout alone; keep it secret.")]
    Create(CreateArgs),
    /// List the tokens (names, scopes, times; never the tokens).
    List(Where),
    /// Revoke a token by name: refused from the next request on.
    Revoke(RevokeArgs),
}

/// Where the tokens are: a local file (offline) or the API.
#[derive(Debug, clap::Args)]
struct Where {
    /// Work offline on the token file in this certificate directory (`api-tokens.db`).
    #[arg(long, conflicts_with = "token_file")]
    dir: Option<PathBuf>,
    /// Work offline on this token file (cloudcore's `api-server.token-file`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    api: ApiArgs,
}

impl Where {
    fn offline(&self) -> anyhow::Result<Option<TokenStore>> {
        let path = match (&self.dir, &self.token_file) {
            (Some(dir), _) => TokenStore::default_path(dir),
            (None, Some(file)) => file.clone(),
            (None, None) => return Ok(None),
        };
        Ok(Some(TokenStore::open(&path)?))
    }
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// The token's name (unique among live tokens; A-Z a-z 0-9 . _ -).
    #[arg(long)]
    name: String,
    /// read, send or admin.
    #[arg(long, value_parser = parse_scope)]
    scope: Scope,
    #[command(flatten)]
    at: Where,
}

#[derive(Debug, clap::Args)]
struct RevokeArgs {
    /// The token's name.
    name: String,
    #[command(flatten)]
    at: Where,
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    s.parse()
        .map_err(|e: cloudhub::auth::AuthStoreError| e.to_string())
}

/// Runs `causeway api-token`.
pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Create(args) => create(args),
        Command::List(at) => list(&at),
        Command::Revoke(args) => revoke(args),
    }
}

fn create(args: CreateArgs) -> anyhow::Result<()> {
    let (token, info) = match args.at.offline()? {
        Some(store) => store.create(&args.name, args.scope)?,
        None => runtime()?.block_on(async {
            let client = args.at.api.client()?;
            let url = format!("{}/v1/api-tokens", args.at.api.base());
            let resp = client
                .post(&url)
                .json(&json!({ "name": args.name, "scope": args.scope }))
                .send()
                .await
                .with_context(|| format!("POST {url}"))?;
            let body = response_json(resp, &url).await?;
            let token = body["token"]
                .as_str()
                .context("the API's answer holds no token")?
                .to_owned();
            let info: TokenInfo = serde_json::from_value(body).context("the API's answer")?;
            anyhow::Ok((token, info))
        })?,
    };
    eprintln!(
        "created API token {:?} (scope {}); it is shown only now:",
        info.name, info.scope
    );
    println!("{token}");
    Ok(())
}

fn list(at: &Where) -> anyhow::Result<()> {
    let tokens: Vec<TokenInfo> = match at.offline()? {
        Some(store) => store.list()?,
        None => runtime()?.block_on(async {
            let client = at.api.client()?;
            let url = format!("{}/v1/api-tokens", at.api.base());
            let body = get_json(&client, &url).await?;
            serde_json::from_value(body).context("the API's answer")
        })?,
    };
    println!("{:<24} {:<6} {:<21} REVOKED", "NAME", "SCOPE", "CREATED");
    for t in tokens {
        println!(
            "{:<24} {:<6} {:<21} {}",
            t.name,
            t.scope,
            when(t.created_ms),
            t.revoked_ms.map_or_else(|| "-".to_owned(), when)
        );
    }
    Ok(())
}

fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let info = match args.at.offline()? {
        Some(store) => store.revoke(&args.name)?,
        None => runtime()?.block_on(async {
            let client = args.at.api.client()?;
            let url = format!("{}/v1/api-tokens/{}", args.at.api.base(), args.name);
            let resp = client
                .delete(&url)
                .send()
                .await
                .with_context(|| format!("DELETE {url}"))?;
            let body = response_json(resp, &url).await?;
            serde_json::from_value::<TokenInfo>(body).context("the API's answer")
        })?,
    };
    eprintln!("revoked API token {:?} (scope {})", info.name, info.scope);
    Ok(())
}

/// Unix milliseconds as RFC 3339 (UTC, seconds).
fn when(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}
