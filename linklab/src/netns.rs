//! Network namespaces as RAII guards (`ip netns add` on creation, `ip netns del` on drop, so a
//! panicking test leaves nothing behind), a way to run code with sockets inside one (a thread
//! that entered it with setns(2)), and a command line that starts a process inside one.

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

use crate::LabError;

/// Prefix of every namespace this crate creates: `cwl-<pid>-<n>-<role>`.
const PREFIX: &str = "cwl-";

/// A network namespace, deleted (with every interface in it) when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// Creates a fresh namespace named for this process and `role`, with its loopback up.
    /// Namespaces of earlier runs whose process is gone (killed before its guards ran) are
    /// deleted first.
    pub fn create(role: &str) -> Result<Self, LabError> {
        remove_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name (for `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` started inside the namespace (`ip netns exec <name> <program>`; `ip` execs the
    /// program, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread that entered the namespace: sockets it opens live there (the
    /// namespace of a socket is fixed when it is created, so a stream opened here may be used
    /// from any thread afterwards).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter()
                        .unwrap_or_else(|e| panic!("entering namespace {}: {e}", self.name));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Moves the calling thread into the namespace. Only for threads made for it: the thread
    /// never comes back to the host's namespace.
    pub fn enter(&self) -> Result<(), LabError> {
        self.entry().enter()
    }

    /// A handle that moves threads into the namespace, for threads started later: a tokio
    /// runtime whose `on_thread_start` calls it opens every socket of its tasks inside.
    pub fn entry(&self) -> NetnsEntry {
        NetnsEntry {
            path: format!("/run/netns/{}", self.name),
        }
    }
}

/// What [`Netns::entry`] returns: the namespace's path, cheap to clone into a thread hook. It
/// does not keep the namespace alive.
#[derive(Clone, Debug)]
pub struct NetnsEntry {
    path: String,
}

impl NetnsEntry {
    /// Moves the calling thread into the namespace (see [`Netns::enter`]).
    pub fn enter(&self) -> Result<(), LabError> {
        let path = &self.path;
        let file = File::open(path).map_err(|e| LabError::Setup(format!("{path}: {e}")))?;
        setns(&file, CloneFlags::CLONE_NEWNET)
            .map_err(|e| LabError::Setup(format!("setns {path}: {e}")))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("linklab: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// Runs `ip` with `args`; its stderr is the error.
pub(crate) fn ip(args: &[&str]) -> Result<(), LabError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| LabError::Unsupported(format!("running `ip`: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Setup(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Deletes `cwl-<pid>-…` namespaces whose process no longer runs.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
