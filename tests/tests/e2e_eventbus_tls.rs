//! End to end: eventbus as a client of a mosquitto with TLS and a password file, with the real
//! `cloudcore` and `edgecore`. The test makes the certificates (the project's `certs` crate: a
//! CA and a server certificate for 127.0.0.1, and a second, unrelated CA) and the password file
//! (`mosquitto_passwd`, installed with mosquitto), and starts mosquitto with a TLS listener for
//! eventbus and a plain one for the device, both requiring the password. Skipped, with the
//! reason printed, where mosquitto is not installed (CI installs it).
//!
//! - Right CA and password: eventbus connects over TLS; a device's publish reaches the cloud.
//! - Wrong password, then a CA that did not sign the broker's certificate: eventbus reports the
//!   refusal in `/v1/status` (`last_error`) and one warning log line, retries with backoff (its
//!   failure counter grows) and edgecore keeps serving (the cloud link, the local API).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use causeway_tests::daemon::{CloudCore as Cloud, EdgeConfig, EdgeCore as Edge, Sse, wait_until};
use causeway_tests::mqtt::{
    Device, Mode, Mosquitto, eventbus_module, free_port, mosquitto_or_skip, wait_broker,
};

const PATIENCE: Duration = Duration::from_secs(60);
const NODE: &str = "edge-mqtt-tls";
const USER: &str = "eventbus";
const PASSWORD: &str = "s3cret-pw";

/// Writes `<dir>/ca.crt`, `<dir>/server.crt`, `<dir>/server.key` (127.0.0.1) and
/// `<dir>/other-ca.crt` (a CA that signed nothing here).
fn make_certs(dir: &Path) {
    let validity = certs::Validity::days_from(time::OffsetDateTime::now_utc(), 1);
    let ca = certs::CertificateAuthority::generate(validity).expect("CA");
    let server = ca
        .issue_server(
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
            validity,
        )
        .expect("server certificate");
    let other = certs::CertificateAuthority::generate(validity).expect("other CA");
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("server.crt"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), &server.key_pem).unwrap();
    std::fs::write(dir.join("other-ca.crt"), other.cert_pem()).unwrap();
}

/// An edge config whose eventbus dials the TLS listener with `password`, trusting `ca_file`.
fn write_config(root: &Path, cloud: &Cloud, tls_port: u16, password: &str, ca_file: &str) {
    let keys = format!(
        ", username: {USER}, password: '{password}', \
         tls: {{ enable: true, ca-file: {}/{ca_file} }}",
        root.display()
    );
    EdgeConfig::for_cloud(root, "websocket", NODE, cloud)
        .deadlines(2)
        .modules(&eventbus_module(
            &root.join("edge"),
            Mode::External,
            tls_port,
            &keys,
        ))
        .write_in(root);
}

/// Starts edgecore with a config whose broker settings are wrong: it serves, reports `why`
/// (a text `last_error` must contain) once in its log, and keeps retrying.
fn refused(root: &Path, why: &str) {
    let mut edge = Edge::start(&root.join("edgecore.yaml"), PATIENCE);
    edge.wait_connected();
    let status = wait_until("eventbus retrying after refusals", PATIENCE, || {
        let s = edge.status();
        let failures = s["eventbus"]["connect_failures"].as_u64().unwrap_or(0);
        let error = s["eventbus"]["last_error"].as_str().unwrap_or_default();
        if s["eventbus"]["broker"] == "connecting" && failures >= 3 && error.contains(why) {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    let line = edge
        .daemon
        .logged("eventbus not connected to the MQTT broker");
    assert!(line.contains(why), "{line}");
    assert_eq!(
        edge.daemon
            .count_logged("eventbus not connected to the MQTT broker"),
        1,
        "one line for repeated identical failures"
    );
    // Still serving: the cloud link is up and the local API answers.
    assert_eq!(status["cloud"], "connected", "{status}");
    println!(
        "refused ({why}): {} failed attempts, last error {}",
        status["eventbus"]["connect_failures"], status["eventbus"]["last_error"]
    );
    assert_eq!(edge.daemon.stop(), Some(0));
}

#[test]
fn tls_and_password() {
    if !mosquitto_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    make_certs(root);
    let passwords = root.join("passwords");
    let ok = Command::new("mosquitto_passwd")
        .arg("-b")
        .arg("-c")
        .arg(&passwords)
        .args([USER, PASSWORD])
        .status()
        .expect("mosquitto_passwd (installed with mosquitto)");
    assert!(ok.success());
    let (tls_port, plain_port) = (free_port(), free_port());
    let d = root.display();
    // Running as root, mosquitto would switch to its own user, which cannot read the test's files.
    let user = if Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
    {
        "user root\n"
    } else {
        ""
    };
    let _broker = Mosquitto::start_with(
        root,
        tls_port,
        &format!(
            "{user}per_listener_settings false\nallow_anonymous false\n\
             password_file {}\n\
             listener {tls_port} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/server.crt\n\
             keyfile {d}/server.key\n\
             listener {plain_port} 127.0.0.1\n",
            passwords.display()
        ),
    );
    let cloud = Cloud::start(root, [0; 4], 5, PATIENCE);

    // Right CA and password: a device's publish on the plain listener reaches the cloud.
    write_config(root, &cloud, tls_port, PASSWORD, "ca.crt");
    let edge = Edge::start(&root.join("edgecore.yaml"), PATIENCE);
    edge.wait_connected();
    wait_broker(&edge);
    let dev = Device::connect_as(plain_port, "dev-tls", Some((USER, PASSWORD)));
    let mut sse = Sse::open(cloud.api, PATIENCE, &format!("node={NODE}&since=0"));
    // The broker's subscription for eventbus is made on its own schedule: publish until bridged.
    let mut n = 0;
    wait_until("a device's publish bridged over TLS", PATIENCE, || {
        n += 1;
        dev.publish("default/user/tls", &format!("t-{n}"));
        sse.read_for(Duration::from_millis(300));
        if sse
            .messages()
            .iter()
            .any(|m| m["route"]["resource"] == "default/user/tls")
        {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(edge.daemon.stop(), Some(0));

    write_config(root, &cloud, tls_port, "wrong-password", "ca.crt");
    refused(root, "refused");
    write_config(root, &cloud, tls_port, PASSWORD, "other-ca.crt");
    refused(root, "invalid peer certificate");
    assert_eq!(cloud.daemon.stop(), Some(0));
}
