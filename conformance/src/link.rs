//! One connection as the kit sees it: a reader task collects everything the peer sends, and the
//! cases wait for the message (or the close) they expect, with a deadline, never on timing alone.

use std::sync::Arc;
use std::time::Duration;

use proto::Message;
use proto::close::SessionCloseCode;
use tokio::sync::mpsc;
use tokio::time::Instant;
use transport::Connection;

/// How a connection ended, as the kit reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// A session close code of Part A item 9.
    Session(SessionCloseCode),
    /// Anything else (a plain close, a transport failure), with its text.
    Other(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Session(code) => write!(f, "session close code {code}"),
            Self::Other(text) => f.write_str(text),
        }
    }
}

/// A connection with its reader.
pub(crate) struct Link {
    pub(crate) conn: Arc<dyn Connection>,
    rx: mpsc::UnboundedReceiver<Result<Message, Ended>>,
    ended: Option<Ended>,
    /// When the connection was established (for timing verdicts).
    pub(crate) since: Instant,
}

impl Link {
    pub(crate) fn new(conn: Box<dyn Connection>) -> Self {
        let conn: Arc<dyn Connection> = Arc::from(conn);
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = Arc::clone(&conn);
        tokio::spawn(async move {
            loop {
                let item = match reader.recv().await {
                    Ok(Some(msg)) => Ok(msg),
                    Ok(None) => Err(Ended::Other("closed cleanly (no session code)".into())),
                    Err(e) => Err(match e.session_code() {
                        Some(code) => Ended::Session(code),
                        None => Ended::Other(e.to_string()),
                    }),
                };
                let last = item.is_err();
                if tx.send(item).is_err() || last {
                    return;
                }
            }
        });
        Self {
            conn,
            rx,
            ended: None,
            since: Instant::now(),
        }
    }

    /// Sends `msg`; the error text if the connection refused it.
    pub(crate) async fn send(&self, msg: Message) -> Result<(), String> {
        self.conn
            .send(msg)
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    /// The next message matching `wanted` within `within`; the others are passed to `other`.
    pub(crate) async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        mut wanted: impl FnMut(&Message) -> bool,
        mut other: impl FnMut(&Message),
    ) -> Result<Message, String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(ended) = &self.ended {
                return Err(format!("connection ended before {what}: {ended}"));
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Err(format!("no {what} within {} ms", within.as_millis())),
                Ok(None) => self.ended = Some(Ended::Other("reader stopped".into())),
                Ok(Some(Err(ended))) => self.ended = Some(ended),
                Ok(Some(Ok(msg))) if wanted(&msg) => return Ok(msg),
                Ok(Some(Ok(msg))) => other(&msg),
            }
        }
    }

    /// Reads until the connection ends (within `within`); how it ended, and the messages that
    /// arrived meanwhile.
    pub(crate) async fn wait_end(
        &mut self,
        within: Duration,
    ) -> Result<(Ended, Vec<Message>), String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            if let Some(ended) = &self.ended {
                return Ok((ended.clone(), seen));
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => {
                    return Err(format!(
                        "the connection was still open after {} ms",
                        within.as_millis()
                    ));
                }
                Ok(None) => self.ended = Some(Ended::Other("reader stopped".into())),
                Ok(Some(Err(ended))) => self.ended = Some(ended),
                Ok(Some(Ok(msg))) => seen.push(msg),
            }
        }
    }

    /// Closes with `code` (bounded), ignoring the outcome: the peer's reaction is what is tested.
    pub(crate) async fn close(&self, code: Option<SessionCloseCode>, reason: &str) {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), self.conn.close_with(code, reason)).await;
    }
}
