//! Test modules shared by the integration tests: real modules on a real bus, observed through
//! channels the test holds. Nothing here is a mock; each is a small module doing one thing.

#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use causeway_beehive::{BoxFuture, Module, ModuleContext, ModuleError, SimpleModule};
use proto::{Content, Message};
use tokio::sync::{Notify, mpsc};

/// A request with a known id.
pub fn msg(id: &str) -> Message {
    Message::with_header(id, "", 0).route("test", "test", "res", "update")
}

/// Polls a future once without a runtime waker: shows whether it is pending at this instant.
pub fn poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

/// A module forwarding every message it receives to the returned channel.
pub fn recorder(name: &str, group: &str) -> (impl Module, mpsc::UnboundedReceiver<Message>) {
    let (out, rx) = mpsc::unbounded_channel();
    let module = SimpleModule::new(name, group, move |mut ctx: ModuleContext| {
        let out = out.clone();
        async move {
            while let Some(m) = ctx.recv().await {
                let _ = out.send(m);
            }
            Ok(())
        }
    });
    (module, rx)
}

/// A module answering every request with the text "OK".
pub fn echo(name: &str, group: &str) -> impl Module {
    SimpleModule::new(name, group, |mut ctx: ModuleContext| async move {
        while let Some(req) = ctx.recv().await {
            let _ = ctx
                .bus()
                .send_resp(Message::response_to(&req, Content::text("OK")));
        }
        Ok(())
    })
}

/// A module that takes one message from its inbox per permit the test sends, forwarding it.
/// Lets a test hold an inbox full, then drain it step by step.
pub struct Gated {
    name: String,
    permits: Mutex<Option<mpsc::UnboundedReceiver<usize>>>,
    out: mpsc::UnboundedSender<Message>,
}

impl Gated {
    /// The module, the permit sender (n = take n messages), and the channel of taken messages.
    pub fn new(
        name: &str,
    ) -> (
        Self,
        mpsc::UnboundedSender<usize>,
        mpsc::UnboundedReceiver<Message>,
    ) {
        let (permit_tx, permit_rx) = mpsc::unbounded_channel();
        let (out, out_rx) = mpsc::unbounded_channel();
        let module = Self {
            name: name.to_owned(),
            permits: Mutex::new(Some(permit_rx)),
            out,
        };
        (module, permit_tx, out_rx)
    }
}

impl Module for Gated {
    fn name(&self) -> &str {
        &self.name
    }

    fn group(&self) -> &str {
        "gated"
    }

    fn start(
        self: Arc<Self>,
        mut ctx: ModuleContext,
    ) -> BoxFuture<'static, Result<(), ModuleError>> {
        Box::pin(async move {
            let taken = self.permits.lock().expect("not poisoned").take();
            let mut permits = taken.ok_or_else(|| ModuleError::msg("started twice"))?;
            loop {
                let n = tokio::select! {
                    n = permits.recv() => n,
                    () = ctx.shutdown() => return Ok(()),
                };
                let Some(n) = n else { return Ok(()) };
                for _ in 0..n {
                    let Some(m) = ctx.recv().await else {
                        return Ok(());
                    };
                    let _ = self.out.send(m);
                }
            }
        })
    }
}

/// What a [`Tracked`] module does once started.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Reads its inbox until shutdown, then returns `Ok`.
    Serve,
    /// Returns an error at once.
    Fail,
    /// Panics at once.
    Panic,
    /// Never returns, ignoring shutdown.
    IgnoreShutdown,
    /// Triggers the hive's shutdown itself, then returns `Ok`.
    StopHive,
}

/// A module that counts its starts and cleanups, so a test can check the lifecycle.
pub struct Tracked {
    name: String,
    group: String,
    behaviour: Behaviour,
    pub starts: AtomicUsize,
    pub cleanups: AtomicUsize,
    /// Notified by cleanup (stores a permit, so waiting afterwards works too).
    pub cleaned: Notify,
}

impl Tracked {
    pub fn new(name: &str, group: &str, behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            group: group.to_owned(),
            behaviour,
            starts: AtomicUsize::new(0),
            cleanups: AtomicUsize::new(0),
            cleaned: Notify::new(),
        })
    }

    pub fn starts(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }

    pub fn cleanups(&self) -> usize {
        self.cleanups.load(Ordering::SeqCst)
    }
}

impl Module for Tracked {
    fn name(&self) -> &str {
        &self.name
    }

    fn group(&self) -> &str {
        &self.group
    }

    fn start(
        self: Arc<Self>,
        mut ctx: ModuleContext,
    ) -> BoxFuture<'static, Result<(), ModuleError>> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            match self.behaviour {
                Behaviour::Serve => {
                    while ctx.recv().await.is_some() {}
                    Ok(())
                }
                Behaviour::Fail => Err(ModuleError::msg("cannot go on")),
                Behaviour::Panic => panic!("module bug"),
                Behaviour::IgnoreShutdown => {
                    std::future::pending::<()>().await;
                    Ok(())
                }
                Behaviour::StopHive => {
                    ctx.shutdown_signal().trigger();
                    Ok(())
                }
            }
        })
    }

    fn cleanup(&self) {
        self.cleanups.fetch_add(1, Ordering::SeqCst);
        self.cleaned.notify_one();
    }
}
