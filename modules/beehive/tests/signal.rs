//! The daemon path end to end, in child processes: each child (this same test binary, re-run with
//! an environment variable) installs the termination signals, starts a hive, says "ready", and
//! runs until a signal; the parent sends SIGINT, SIGTERM, SIGHUP or SIGQUIT and expects a clean
//! shutdown (cleanup ran) and exit status 0. A child never signalled gives up after a minute, so
//! a broken signal path fails the test instead of hanging it. Runs without libtest's harness
//! (`harness = false`) because signals must not reach a shared test process.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use causeway_beehive::{Beehive, TerminationSignals};
use common::{Behaviour, Tracked};

/// Set in a child's environment: run as the child.
const CHILD: &str = "CAUSEWAY_BEEHIVE_SIGNAL_CHILD";

fn main() -> ExitCode {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    for signal in ["INT", "TERM", "HUP", "QUIT"] {
        parent(signal);
        println!("signal: SIG{signal} shuts the hive down cleanly ... ok");
    }
    ExitCode::SUCCESS
}

fn parent(signal: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().expect("child output").expect("utf-8");
    assert_eq!(first, "ready", "child did not start");

    let kill = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -{signal} failed");

    let rest: Vec<String> = lines.map(|l| l.expect("utf-8")).collect();
    let status = child.wait().expect("child exits");
    assert!(
        status.success(),
        "SIG{signal}: child exited with {status}; said {rest:?}"
    );
    assert_eq!(rest, ["clean 1"], "SIG{signal}: unexpected child report");
}

#[tokio::main(flavor = "current_thread")]
async fn child() -> ExitCode {
    let signals = match TerminationSignals::install() {
        Ok(signals) => signals,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(2);
        }
    };
    let module = Tracked::new("m", "g", Behaviour::Serve);
    let mut beehive = Beehive::new();
    if beehive.register_arc(module.clone(), true).is_err() {
        return ExitCode::from(2);
    }
    let hive = beehive.start();
    println!("ready");
    let report = tokio::select! {
        report = hive.run_until_signal(signals) => report,
        () = tokio::time::sleep(Duration::from_secs(60)) => {
            eprintln!("no signal arrived");
            return ExitCode::from(3);
        }
    };
    println!(
        "{} {}",
        if report.is_clean() {
            "clean"
        } else {
            "unclean"
        },
        module.cleanups()
    );
    ExitCode::SUCCESS
}
