//! `causeway certs`: create the CA and the cloud's server certificate (`init`) and node client
//! certificates (`node`) in a [`CertDir`] (`ca.crt`, `ca.key`, `server.crt`, `server.key`,
//! `nodes/<id>.crt`, `nodes/<id>.key`; keys mode 0600).

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use time::OffsetDateTime;

use ::certs::files::CertDir;
use ::certs::{CertificateAuthority, NodeId, Validity, token};

/// `causeway certs` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create a new CA and the cloud server certificate.
    #[command(after_help = "\
Example:
  causeway certs init --dir /etc/causeway/pki --advertise-address 192.168.1.10,10.0.0.5 \\
      --dns cloud.example.com

Writes DIR/ca.crt, DIR/ca.key, DIR/server.crt, DIR/server.key (keys mode 0600). Edges dial
the cloud by these addresses and names, so list every one they use. Refuses to replace an
existing CA unless --force is given: replacing it invalidates every certificate it issued.")]
    Init(InitArgs),
    /// Issue a client certificate for a node, signed by the CA in DIR.
    #[command(after_help = "\
Example:
  causeway certs node --dir /etc/causeway/pki --node-id edge-1 --days 365

Writes DIR/nodes/<id>.crt and DIR/nodes/<id>.key (mode 0600), CN system:node:<id>,
O system:nodes, EKU clientAuth. Copy them with DIR/ca.crt to the edge.")]
    Node(NodeArgs),
    /// Issue a client certificate for an application of the cloud API (an alternative to an
    /// API token on the API's HTTPS listener).
    #[command(
        name = "api-client",
        after_help = "\
Example:
  causeway certs api-client --dir /etc/causeway/pki --name dashboard --scope read
  causeway nodes --api https://cloud:10003 --api-ca /etc/causeway/pki/ca.crt \\
      --api-cert /etc/causeway/pki/api-clients/dashboard.crt \\
      --api-key /etc/causeway/pki/api-clients/dashboard.key

Writes DIR/api-clients/<name>.crt and DIR/api-clients/<name>.key (mode 0600), CN
causeway-api:<scope>:<name>, O causeway:api-clients, EKU clientAuth. Scopes: read, send, admin.
It cannot be revoked before it expires (short --days, or API tokens, if that matters)."
    )]
    ApiClient(ApiClientArgs),
}

#[derive(Debug, clap::Args)]
struct ApiClientArgs {
    /// Certificate directory holding ca.crt and ca.key.
    #[arg(long)]
    dir: PathBuf,
    /// The client's name (A-Z a-z 0-9 . _ -), shown in the cloud's log.
    #[arg(long)]
    name: String,
    /// read, send or admin.
    #[arg(long)]
    scope: String,
    /// Validity in days.
    #[arg(long, default_value_t = 90)]
    days: u32,
    /// Replace an existing certificate of this name.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Certificate directory (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// IP addresses edges use to reach the cloud (comma-separated or repeated); server cert SANs.
    #[arg(long, value_delimiter = ',', required_unless_present = "dns")]
    advertise_address: Vec<IpAddr>,
    /// DNS names edges use to reach the cloud (repeatable); server cert SANs.
    #[arg(long)]
    dns: Vec<String>,
    /// Validity of the CA, in days.
    #[arg(long, default_value_t = 3650)]
    ca_days: u32,
    /// Validity of the server certificate, in days.
    #[arg(long, default_value_t = 3650)]
    days: u32,
    /// Replace an existing CA (every certificate it issued stops being trusted).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// Certificate directory holding ca.crt and ca.key.
    #[arg(long)]
    dir: PathBuf,
    /// The node's id: a-z, 0-9, '.', '-', starting and ending with a letter or digit.
    #[arg(long)]
    node_id: NodeId,
    /// Validity in days (KubeEdge's default is 365; edges rotate before expiry).
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Replace an existing certificate for this node.
    #[arg(long)]
    force: bool,
}

/// Runs `causeway certs`.
pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Init(a) => init(a),
        Command::Node(a) => node(a),
        Command::ApiClient(a) => api_client(a),
    }
}

fn api_client(args: ApiClientArgs) -> anyhow::Result<()> {
    let scope: cloudhub::auth::Scope = args.scope.parse()?;
    cloudhub::auth::check_name(&args.name)?;
    let dir = CertDir::new(&args.dir);
    let ca = dir
        .load_ca()
        .context("loading the CA (run `causeway certs init` first)")?;
    let out = args.dir.join("api-clients");
    let (cert_path, key_path) = (
        out.join(format!("{}.crt", args.name)),
        out.join(format!("{}.key", args.name)),
    );
    if (cert_path.exists() || key_path.exists()) && !args.force {
        bail!(
            "{} already exists; pass --force to replace it",
            cert_path.display()
        );
    }
    let cn = format!("{}{scope}:{}", cloudhub::auth::CERT_CN_PREFIX, args.name);
    let validity = Validity::days_from(OffsetDateTime::now_utc(), args.days);
    let issued = ca
        .issue_api_client(&cn, validity)
        .context("issuing the API client certificate")?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    ::certs::files::write_key(&key_path, &issued.key_pem)?;
    ::certs::files::write_cert(&cert_path, &issued.cert_pem)?;
    println!("wrote {}", cert_path.display());
    println!("wrote {} (mode 0600)", key_path.display());
    println!("CN {cn}, valid for {} days", args.days);
    Ok(())
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let dir = CertDir::new(&args.dir);
    if dir.has_ca() && !args.force {
        bail!(
            "a CA already exists in {}; pass --force to replace it (this invalidates every \
             certificate it issued)",
            args.dir.display()
        );
    }
    let now = OffsetDateTime::now_utc();
    let ca = CertificateAuthority::generate(Validity::days_from(now, args.ca_days))
        .context("generating the CA")?;
    let server = ca
        .issue_server(
            &args.dns,
            &args.advertise_address,
            Validity::days_from(now, args.days),
        )
        .context("issuing the server certificate")?;
    dir.write_ca(&ca)?;
    dir.write_server(&server)?;
    println!("wrote {}", dir.ca_cert().display());
    println!("wrote {} (mode 0600, keep secret)", dir.ca_key().display());
    println!("wrote {}", dir.server_cert().display());
    println!("wrote {} (mode 0600)", dir.server_key().display());
    println!("CA sha256: {}", token::ca_hash(ca.cert_der()));
    if args.force && dir.nodes_dir().exists() {
        eprintln!(
            "warning: certificates in {} were issued by the replaced CA; reissue them",
            dir.nodes_dir().display()
        );
    }
    Ok(())
}

fn node(args: NodeArgs) -> anyhow::Result<()> {
    let dir = CertDir::new(&args.dir);
    let ca = dir
        .load_ca()
        .context("loading the CA (run `causeway certs init` first)")?;
    let (cert_path, key_path) = (dir.node_cert(&args.node_id), dir.node_key(&args.node_id));
    if (cert_path.exists() || key_path.exists()) && !args.force {
        bail!(
            "{} already exists; pass --force to replace it",
            cert_path.display()
        );
    }
    let validity = Validity::days_from(OffsetDateTime::now_utc(), args.days);
    let issued = ca
        .issue_node(&args.node_id, validity)
        .context("issuing the node certificate")?;
    dir.write_node(&args.node_id, &issued)?;
    println!("wrote {}", cert_path.display());
    println!("wrote {} (mode 0600)", key_path.display());
    println!(
        "CN system:node:{}, valid for {} days",
        args.node_id, args.days
    );
    Ok(())
}
