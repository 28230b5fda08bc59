//! `causeway apply`, `causeway get` and `causeway delete`: clients of the cloud API's object
//! endpoints (`cloudhub/src/api/objects.rs`), kubectl-like. The API owns every rule (validation,
//! versions, conflicts); these only find the path for an object and print the answer.

use anyhow::Context as _;
use cloudhub::objects::{KINDS, ObjectKind};
use serde_json::Value;

use super::BadInput;
use super::api::{ApiArgs, get_json, response_json, runtime};

/// `causeway apply -f FILE`: create or replace the objects of a YAML or JSON file.
#[derive(Debug, clap::Args)]
pub(crate) struct ApplyArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The file (YAML, several documents separated by `---`, or JSON); `-` for stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: String,
    /// Namespace of objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
}

/// `causeway get RESOURCE [NAME]`: list objects, or show one.
#[derive(Debug, clap::Args)]
pub(crate) struct GetArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// `pods`, `configmaps`, `secrets`, `services`, `endpoints`, `nodes`, `namespaces` (or the
    /// singular, or the kind).
    resource: String,
    /// One object's name: print it as JSON.
    name: Option<String>,
    /// Namespace (namespaced resources).
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Label selector: `a=b,c!=d,e,!f`.
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// Print the list as the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `causeway delete RESOURCE NAME`: delete an object.
#[derive(Debug, clap::Args)]
pub(crate) struct DeleteArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The resource (as for `get`).
    resource: String,
    /// The object's name.
    name: String,
    /// Namespace (namespaced resources).
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
}

/// The kind a user names by plural, singular or kind, in any case.
fn kind_named(name: &str) -> anyhow::Result<&'static ObjectKind> {
    let lower = name.to_ascii_lowercase();
    KINDS
        .iter()
        .find(|k| k.resource == lower || k.wire == lower || k.kind.eq_ignore_ascii_case(&lower))
        .with_context(|| {
            let known: Vec<&str> = KINDS.iter().map(|k| k.resource).collect();
            format!("unknown resource {name:?}; known are {}", known.join(", "))
        })
}

/// The API path of the collection of `kind` (in `namespace` if namespaced).
fn collection(base: &str, kind: &ObjectKind, namespace: &str) -> String {
    if kind.namespaced {
        format!("{base}/v1/namespaces/{namespace}/{}", kind.resource)
    } else {
        format!("{base}/v1/cluster/{}", kind.resource)
    }
}

/// Splits a YAML stream into its documents (JSON is one YAML document).
fn documents(source: &str, text: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    let mut offset = 0usize;
    for part in split_documents(text) {
        let at = offset;
        offset += part.len();
        if part.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
        }) {
            continue;
        }
        let value: Value = serde_saphyr::from_str(part).map_err(|e| BadInput {
            source: source.to_owned(),
            offset: at,
            reason: format!("not a YAML object: {e}"),
        })?;
        match value {
            Value::Object(_) => docs.push(value),
            Value::Null => {}
            other => {
                return Err(BadInput {
                    source: source.to_owned(),
                    offset: at,
                    reason: format!("a document is not an object: {other}"),
                }
                .into());
            }
        }
    }
    if docs.is_empty() {
        return Err(BadInput {
            source: source.to_owned(),
            offset: 0,
            reason: "no object in the file".into(),
        }
        .into());
    }
    Ok(docs)
}

/// The documents of a YAML stream, each with its lines (a line `---` starts a new one).
fn split_documents(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            parts.push(&text[start..pos]);
            start = pos;
        }
        pos += line.len();
    }
    parts.push(&text[start..]);
    parts
}

pub(crate) fn run_apply(args: ApplyArgs) -> anyhow::Result<()> {
    let text = if args.file == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file))?
    };
    let source = if args.file == "-" {
        "stdin"
    } else {
        &args.file
    };
    let docs = documents(source, &text)?;
    // Check every document before writing any.
    let mut writes = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let bad = |reason: String| BadInput {
            source: source.to_owned(),
            offset: 0,
            reason: format!("document {}: {reason}", i + 1),
        };
        let Some(kind_name) = doc["kind"].as_str() else {
            return Err(bad("it has no kind".into()).into());
        };
        let kind = kind_named(kind_name).map_err(|e| bad(e.to_string()))?;
        let Some(name) = doc["metadata"]["name"].as_str().filter(|n| !n.is_empty()) else {
            return Err(bad("it has no metadata.name".into()).into());
        };
        let namespace = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or(&args.namespace)
            .to_owned();
        writes.push((kind, namespace, name.to_owned(), doc));
    }
    runtime()?.block_on(async {
        let client = args.api.client()?;
        let base = args.api.base();
        for (kind, namespace, name, doc) in writes {
            let url = format!("{}/{name}", collection(base, kind, &namespace));
            let resp = client
                .put(&url)
                .json(&doc)
                .send()
                .await
                .with_context(|| format!("PUT {url}"))?;
            let created = resp.status() == reqwest::StatusCode::CREATED;
            let body = response_json(resp, &url).await?;
            let rv = body["metadata"]["resourceVersion"].as_str().unwrap_or("");
            let what = if created { "created" } else { "configured" };
            println!("{}/{name} {what} (resourceVersion {rv})", kind.wire);
        }
        Ok(())
    })
}

pub(crate) fn run_get(args: GetArgs) -> anyhow::Result<()> {
    let kind = kind_named(&args.resource)?;
    runtime()?.block_on(async {
        let client = args.api.client()?;
        let base = collection(args.api.base(), kind, &args.namespace);
        if let Some(name) = &args.name {
            let body = get_json(&client, &format!("{base}/{name}")).await?;
            println!("{}", serde_json::to_string_pretty(&body)?);
            return Ok(());
        }
        let mut url = reqwest::Url::parse(&base).with_context(|| format!("bad API URL {base}"))?;
        if let Some(sel) = &args.selector {
            url.query_pairs_mut().append_pair("labelSelector", sel);
        }
        let body = get_json(&client, url.as_str()).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&body)?);
            return Ok(());
        }
        if kind.resource == "devices" {
            // A device's reported state lives in its DeviceStatus (same namespace and name).
            let statuses = collection(
                args.api.base(),
                kind_named("devicestatuses")?,
                &args.namespace,
            );
            let statuses = get_json(&client, &statuses).await?;
            print_devices(&body, &statuses);
            return Ok(());
        }
        println!(
            "{:<20} {:<40} {:>16}  STATUS",
            "NAMESPACE", "NAME", "RESOURCEVERSION"
        );
        for item in body["items"].as_array().into_iter().flatten() {
            let meta = &item["metadata"];
            println!(
                "{:<20} {:<40} {:>16}  {}",
                meta["namespace"].as_str().unwrap_or("-"),
                meta["name"].as_str().unwrap_or("-"),
                meta["resourceVersion"].as_str().unwrap_or("-"),
                status_column(item),
            );
        }
        Ok(())
    })
}

/// `causeway get devices`: each device's node, state and reported twins (`name=value`).
fn print_devices(devices: &Value, statuses: &Value) {
    println!(
        "{:<16} {:<28} {:<16} {:<10} REPORTED",
        "NAMESPACE", "NAME", "NODE", "STATE"
    );
    let items = |v: &Value| v["items"].as_array().cloned().unwrap_or_default();
    let statuses = items(statuses);
    for d in items(devices) {
        let (ns, name) = (&d["metadata"]["namespace"], &d["metadata"]["name"]);
        let status = statuses
            .iter()
            .find(|s| &s["metadata"]["namespace"] == ns && &s["metadata"]["name"] == name)
            .map(|s| s["status"].clone())
            .unwrap_or(Value::Null);
        let reported: Vec<String> = status["twins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| {
                Some(format!(
                    "{}={}",
                    t["propertyName"].as_str()?,
                    t["reported"]["value"].as_str()?
                ))
            })
            .collect();
        let text = |v: &Value| {
            v.as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("-")
                .to_owned()
        };
        println!(
            "{:<16} {:<28} {:<16} {:<10} {}",
            text(ns),
            text(name),
            text(&d["spec"]["nodeName"]),
            text(&status["state"]),
            if reported.is_empty() {
                "-".to_owned()
            } else {
                reported.join(",")
            }
        );
    }
}

pub(crate) fn run_delete(args: DeleteArgs) -> anyhow::Result<()> {
    let kind = kind_named(&args.resource)?;
    runtime()?.block_on(async {
        let client = args.api.client()?;
        let url = format!(
            "{}/{}",
            collection(args.api.base(), kind, &args.namespace),
            args.name
        );
        let resp = client
            .delete(&url)
            .send()
            .await
            .with_context(|| format!("DELETE {url}"))?;
        let body = response_json(resp, &url).await?;
        let rv = body["metadata"]["resourceVersion"].as_str().unwrap_or("");
        println!("{}/{} deleted (resourceVersion {rv})", kind.wire, args.name);
        Ok(())
    })
}

/// What `get`'s STATUS column shows: a node's Ready condition (`Ready`, `NotReady`, `Unknown`), a
/// pod's phase, else `-`.
fn status_column(item: &Value) -> String {
    let status = &item["status"];
    let ready = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["status"].as_str());
    match (item["kind"].as_str(), ready) {
        (Some("Node"), Some("True")) => "Ready".to_owned(),
        (Some("Node"), Some("False")) => "NotReady".to_owned(),
        (Some("Node"), Some(other)) => other.to_owned(),
        _ => status["phase"].as_str().unwrap_or("-").to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_found_by_any_name() {
        assert_eq!(kind_named("configmaps").unwrap().kind, "ConfigMap");
        assert_eq!(kind_named("configmap").unwrap().kind, "ConfigMap");
        assert_eq!(kind_named("ConfigMap").unwrap().kind, "ConfigMap");
        assert!(kind_named("widgets").is_err());
    }

    #[test]
    fn yaml_streams_split_into_objects() {
        let text = "# two objects\n---\nkind: ConfigMap\nmetadata:\n  name: a\n---\nkind: Secret\nmetadata: {name: b}\n";
        let docs = documents("f.yaml", text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["metadata"]["name"], "b");
        assert!(documents("f.yaml", "- 1\n- 2\n").is_err());
        assert!(documents("f.yaml", "# nothing\n").is_err());
        let json = documents(
            "f.json",
            "{\"kind\": \"Pod\", \"metadata\": {\"name\": \"p\"}}",
        )
        .unwrap();
        assert_eq!(json[0]["kind"], "Pod");
    }
}
