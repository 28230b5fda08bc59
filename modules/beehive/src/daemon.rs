//! Start-up and exit of a daemon (`edgecore`, `cloudcore`): log to stderr (`RUST_LOG`, default
//! `info`, colour only on a terminal), build the runtime, run, and turn the result into the exit
//! status, saying a failure once ([`crate::error::report`]). A module that failed fails the
//! process ([`outcome`]), so a supervisor restarts it and the reason is said.
//!
//! Why here: beehive already owns the rest of a daemon's life (the [`crate::Shutdown`] latch,
//! [`crate::TerminationSignals`], [`crate::ShutdownReport`]), and both binaries depend on it;
//! the hubs and transport know nothing of processes.

use std::future::Future;
use std::io::IsTerminal as _;
use std::process::ExitCode;

use crate::ShutdownReport;

/// Runs a daemon's `run` future on a multi-threaded runtime with logging set up, and says why it
/// failed, if it did, as one line `name: error: cause...` on stderr.
pub fn main<F, E>(name: &str, run: impl FnOnce() -> F) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, on stderr (where the log goes too), each cause once.
            eprintln!("{name}: {}", crate::error::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// A daemon's `main`: with `--defaultconfig` (`print_defaults`) prints `defaults`, its complete
/// commented default configuration, and exits; otherwise runs it as [`main`] does.
pub fn main_or_defaults<F, E>(
    name: &str,
    print_defaults: bool,
    defaults: &str,
    run: impl FnOnce() -> F,
) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    if print_defaults {
        print!("{defaults}");
        return ExitCode::SUCCESS;
    }
    main(name, run)
}

/// Modules that failed or overran the shutdown grace: their problems, joined by `; `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModulesFailed(pub String);

/// Logs how the hive stopped and fails if a module did.
pub fn outcome(name: &str, report: &ShutdownReport) -> Result<(), ModulesFailed> {
    if !report.is_clean() {
        tracing::warn!(?report, "{name} stopped uncleanly");
    }
    tracing::info!("{name} stopped");
    let problems = report.problems();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ModulesFailed(problems.join("; ")))
    }
}
