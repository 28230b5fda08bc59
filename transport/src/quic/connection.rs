//! An established QUIC link: [`QuicConnection`], its send slots (one lazily opened message stream
//! per slot) and the driver task that accepts the peer's streams and reads every stream.
//!
//! ```text
//!  send() ─ stream_index(resource) ─► slot k: Mutex<SendStream> ─► quinn (flow control = back-pressure)
//!  recv() ◄─ byte-bounded queue ◄─ one reader task per stream ◄─ driver: accept_bi + our own streams' recv halves
//!                                   control stream reader (answers ping/pong/config with ack)
//! ```
//!
//! quinn's flow control bounds what a slow peer makes us buffer: `send` pends once the stream and
//! connection windows are spent, and fails after the write deadline. The idle timeout (our read
//! deadline) with keep-alive PINGs notices a silent peer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::Message;
use proto::close::SessionCloseCode;
use quinn::{ConnectionError, VarInt};
use tokio::sync::{Mutex, mpsc};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::timeout;

use super::probe::{QUIET_POLL_INTERVAL, SilenceProbe};
use super::stream::{FrameReader, ReadEnd, stream_index};
use super::{code, control};
use crate::config::LinkConfig;
use crate::queue::{ByteReceiver, ByteSender, byte_channel};
use crate::{
    BoxFuture, CloseError, CloseReason, Connection, PeerIdentity, RecvError, SendError,
    is_control_operation,
};

/// State shared by the handle, the driver and the readers.
#[derive(Debug)]
struct Inner {
    conn: quinn::Connection,
    /// Why the connection ended; the first reason recorded wins.
    reason: OnceLock<CloseReason>,
    /// `close` was called: further sends are refused.
    closing: AtomicBool,
    /// The reason given to `close`.
    local_reason: OnceLock<String>,
    /// One lazily opened message stream per slot; the lock keeps each stream's frames whole and in
    /// call order.
    slots: Box<[Mutex<Option<quinn::SendStream>>]>,
    /// Receive halves of streams we open, handed to the driver for reading.
    own_streams: mpsc::UnboundedSender<quinn::RecvStream>,
    /// Our half of the control stream (acks to control operations).
    control: Mutex<quinn::SendStream>,
    read_deadline: Duration,
    write_deadline: Duration,
    /// How long a peer-opened stream may take to show its `msg` prefix (the handshake timeout).
    prefix_timeout: Duration,
    max_message_size: usize,
}

impl Inner {
    /// Records `reason` and, if it is the first, closes the QUIC connection with the matching
    /// application error code and the reason as text.
    fn fail(&self, reason: CloseReason) {
        if self.reason.set(reason.clone()).is_ok() {
            let text = reason.to_string();
            self.conn.close(code::for_reason(&reason), truncate(&text));
        }
    }

    /// The recorded reason, or the connection's own if none was recorded yet.
    fn end_reason(&self) -> CloseReason {
        if let Some(reason) = self.reason.get() {
            return reason.clone();
        }
        match self.conn.close_reason() {
            Some(err) => {
                let _ = self.reason.set(self.classify(err));
                self.reason.get().cloned().unwrap_or_else(|| unreachable!())
            }
            None => CloseReason::Io {
                kind: std::io::ErrorKind::BrokenPipe,
                detail: "connection task stopped".to_owned(),
            },
        }
    }

    /// Classifies why quinn says the connection ended.
    fn classify(&self, err: ConnectionError) -> CloseReason {
        if self.closing.load(Ordering::Acquire) {
            return CloseReason::Local {
                reason: self.local_reason.get().cloned().unwrap_or_default(),
            };
        }
        reason_from_connection_error(err, self.read_deadline)
    }

    async fn send(&self, msg: Message) -> Result<(), SendError> {
        if let Some(reason) = self.reason.get() {
            return Err(send_error(reason));
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(SendError::Closed {
                reason: CloseReason::Local {
                    reason: "close() was called".to_owned(),
                },
            });
        }
        let payload_len = proto::pb::encoded_len(&msg);
        if payload_len > self.max_message_size {
            return Err(SendError::TooLarge {
                len: payload_len,
                max: self.max_message_size,
            });
        }
        let mut frame = BytesMut::new();
        proto::frame::encode_message(&msg, &mut frame).map_err(|_| SendError::TooLarge {
            len: payload_len,
            max: proto::frame::MAX_PAYLOAD_LEN,
        })?;
        let slot = &self.slots[stream_index(&msg.route.resource, self.slots.len())];
        let deadline = tokio::time::Instant::now() + self.write_deadline;
        match tokio::time::timeout_at(deadline, self.write_on(slot, frame.freeze(), deadline)).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => {
                self.fail(reason);
                Err(send_error(&self.end_reason()))
            }
            Err(_elapsed) => {
                self.fail(CloseReason::WriteTimeout {
                    after: self.write_deadline,
                });
                Err(send_error(&self.end_reason()))
            }
        }
    }

    /// Writes one frame on the slot's stream, opening it (with its `msg` prefix) on first use.
    async fn write_on(
        &self,
        slot: &Mutex<Option<quinn::SendStream>>,
        frame: Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<(), CloseReason> {
        let mut slot = slot.lock().await;
        if slot.is_none() {
            let (mut send, recv) = self.conn.open_bi().await.map_err(|e| self.classify(e))?;
            send.write_all(proto::frame::MESSAGE_STREAM_PREFIX)
                .await
                .map_err(|e| self.write_error(e))?;
            let _ = self.own_streams.send(recv);
            *slot = Some(send);
        }
        let Some(send) = slot.as_mut() else {
            unreachable!("opened above")
        };
        // If this future is dropped mid-write, part of the frame may be on the stream and every
        // later frame would be misread: the guard then closes the connection instead.
        let mut guard = CancelGuard {
            inner: self,
            deadline,
            armed: true,
        };
        let written = send.write_chunk(frame).await;
        guard.armed = false;
        written.map_err(|e| self.write_error(e))
    }

    fn write_error(&self, err: quinn::WriteError) -> CloseReason {
        match err {
            quinn::WriteError::ConnectionLost(e) => self.classify(e),
            quinn::WriteError::Stopped(code) => CloseReason::PeerAborted {
                code: code.into_inner(),
                reason: "peer stopped reading a message stream".to_owned(),
            },
            other => CloseReason::Io {
                kind: std::io::ErrorKind::BrokenPipe,
                detail: other.to_string(),
            },
        }
    }

    /// Answers a control operation on the control stream, as viaduct's control lane does.
    async fn ack_control(&self, msg: &Message) -> Result<(), CloseReason> {
        let frame = control::frame(&control::ack_for(msg));
        let write = async {
            let mut control = self.control.lock().await;
            control
                .write_chunk(frame)
                .await
                .map_err(|e| self.write_error(e))
        };
        timeout(self.write_deadline, write)
            .await
            .unwrap_or(Err(CloseReason::WriteTimeout {
                after: self.write_deadline,
            }))
    }

    /// Graceful close: finish every message stream, wait until the peer has acknowledged all
    /// their data, then close the connection with code 0 (or the session `code`) and `reason`.
    async fn close(&self, code: Option<SessionCloseCode>, reason: &str) -> Result<(), CloseError> {
        if let Some(ended) = self.reason.get() {
            return match ended {
                CloseReason::Local { .. } => Ok(()),
                other => Err(CloseError::AlreadyClosed {
                    reason: other.clone(),
                }),
            };
        }
        let _ = self.local_reason.set(reason.to_owned());
        self.closing.store(true, Ordering::Release);
        let flushed = async {
            let mut stopped = Vec::new();
            for slot in self.slots.iter() {
                // Taking the lock waits for a send in progress on this stream.
                let mut slot = slot.lock().await;
                if let Some(mut send) = slot.take() {
                    if send.finish().is_ok() {
                        stopped.push(send.stopped());
                    }
                }
            }
            for done in stopped {
                done.await?;
            }
            Ok::<(), quinn::StoppedError>(())
        };
        let outcome = timeout(self.write_deadline, flushed).await;
        let local = CloseReason::Local {
            reason: reason.to_owned(),
        };
        let result = match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_stopped_error)) => Err(CloseError::AlreadyClosed {
                reason: self.end_reason(),
            }),
            Err(_) => Err(CloseError::Timeout {
                after: self.write_deadline,
            }),
        };
        if self.reason.set(local).is_ok() {
            // Code 0 promises the peer it has everything; say otherwise if we could not confirm.
            // A session code says why the session ended, which matters more to the peer.
            let code = match code {
                Some(session) => VarInt::from(session.code()),
                None if result.is_ok() => code::NO_ERROR,
                None => code::ABORTED,
            };
            self.conn.close(code, truncate(reason));
        }
        result
    }
}

/// Closes the connection if dropped, i.e. if a send is cancelled while writing a frame.
struct CancelGuard<'a> {
    inner: &'a Inner,
    /// When the write deadline expires: a drop after it is the deadline, not the caller.
    deadline: tokio::time::Instant,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let reason = if tokio::time::Instant::now() >= self.deadline {
            CloseReason::WriteTimeout {
                after: self.inner.write_deadline,
            }
        } else {
            CloseReason::Io {
                kind: std::io::ErrorKind::Interrupted,
                detail: "a send was cancelled while writing a message".to_owned(),
            }
        };
        self.inner.fail(reason);
    }
}

/// A close reason fits in one packet with room to spare.
fn truncate(text: &str) -> &[u8] {
    let mut end = text.len().min(512);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

fn send_error(reason: &CloseReason) -> SendError {
    match reason {
        CloseReason::WriteTimeout { after } => SendError::Timeout { after: *after },
        other => SendError::Closed {
            reason: other.clone(),
        },
    }
}

/// Classifies why quinn ended a connection, by who is at fault.
pub(crate) fn reason_from_connection_error(
    err: ConnectionError,
    read_deadline: Duration,
) -> CloseReason {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    match err {
        ConnectionError::ApplicationClosed(close) if close.error_code == code::NO_ERROR => {
            CloseReason::Peer {
                reason: text(&close.reason),
            }
        }
        ConnectionError::ApplicationClosed(close) => CloseReason::PeerAborted {
            code: close.error_code.into_inner(),
            reason: text(&close.reason),
        },
        ConnectionError::ConnectionClosed(close) => {
            let code = u64::from(close.error_code);
            if (0x100..0x200).contains(&code) {
                CloseReason::Tls {
                    detail: format!(
                        "peer sent TLS alert {}: {}",
                        code - 0x100,
                        text(&close.reason)
                    ),
                }
            } else {
                CloseReason::PeerAborted {
                    code,
                    reason: text(&close.reason),
                }
            }
        }
        ConnectionError::TimedOut => CloseReason::ReadTimeout {
            after: read_deadline,
        },
        ConnectionError::Reset => CloseReason::Io {
            kind: std::io::ErrorKind::ConnectionReset,
            detail: "peer reset the connection (stateless reset)".to_owned(),
        },
        ConnectionError::LocallyClosed => CloseReason::Local {
            reason: String::new(),
        },
        ConnectionError::TransportError(e) => CloseReason::PeerMisbehaved {
            detail: e.to_string(),
        },
        other => CloseReason::PeerMisbehaved {
            detail: other.to_string(),
        },
    }
}

/// An established QUIC connection (either side).
#[derive(Debug)]
pub struct QuicConnection {
    inner: Arc<Inner>,
    peer: PeerIdentity,
    inbound: Mutex<ByteReceiver<Box<Message>>>,
    driver: AbortHandle,
    /// The client's own endpoint: kept alive as long as the connection.
    _endpoint: Option<quinn::Endpoint>,
}

impl QuicConnection {
    /// Starts the driver over a connection whose control stream has been exchanged.
    pub(crate) fn spawn(
        conn: quinn::Connection,
        control_send: quinn::SendStream,
        control_recv: FrameReader,
        peer: PeerIdentity,
        link: &LinkConfig,
        endpoint: Option<quinn::Endpoint>,
    ) -> Self {
        let (own_tx, own_rx) = mpsc::unbounded_channel();
        let (inbound_tx, inbound_rx) = byte_channel(link.recv_buffer);
        let slots = (0..link.effective_quic_streams())
            .map(|_| Mutex::new(None))
            .collect();
        let inner = Arc::new(Inner {
            conn,
            reason: OnceLock::new(),
            closing: AtomicBool::new(false),
            local_reason: OnceLock::new(),
            slots,
            own_streams: own_tx,
            control: Mutex::new(control_send),
            read_deadline: link.read_deadline,
            write_deadline: link.write_deadline,
            prefix_timeout: link.handshake_timeout,
            max_message_size: link.max_message_size,
        });
        let driver = tokio::spawn(drive(inner.clone(), own_rx, control_recv, inbound_tx));
        Self {
            inner,
            peer,
            inbound: Mutex::new(inbound_rx),
            driver: driver.abort_handle(),
            _endpoint: endpoint,
        }
    }

    async fn recv_impl(&self) -> Result<Option<Message>, RecvError> {
        let mut inbound = self.inbound.lock().await;
        match inbound.recv().await {
            Some(msg) => Ok(Some(*msg)),
            None => match RecvError::from_close(self.inner.end_reason()) {
                Some(err) => Err(err),
                None => Ok(None),
            },
        }
    }
}

impl Drop for QuicConnection {
    fn drop(&mut self) {
        let dropped = CloseReason::Local {
            reason: "connection dropped without close()".to_owned(),
        };
        if self.inner.reason.set(dropped).is_ok() {
            self.inner
                .conn
                .close(code::ABORTED, b"connection dropped without close()");
        }
        self.driver.abort();
    }
}

impl Connection for QuicConnection {
    fn send(&self, msg: Message) -> BoxFuture<'_, Result<(), SendError>> {
        Box::pin(self.inner.send(msg))
    }

    fn recv(&self) -> BoxFuture<'_, Result<Option<Message>, RecvError>> {
        Box::pin(self.recv_impl())
    }

    fn close_with(
        &self,
        code: Option<SessionCloseCode>,
        reason: &str,
    ) -> BoxFuture<'_, Result<(), CloseError>> {
        let reason = reason.to_owned();
        Box::pin(async move { self.inner.close(code, &reason).await })
    }

    fn peer(&self) -> &PeerIdentity {
        &self.peer
    }
}

/// The most streams the peer may have open toward us at once (its message streams and the control
/// stream); quinn refuses more, so a peer cannot make us spawn readers without bound.
pub(crate) fn max_peer_streams() -> VarInt {
    VarInt::from_u32(crate::config::MAX_QUIC_STREAMS as u32 + 1)
}

/// The driver: accepts the peer's streams, reads ours, runs one reader per stream, sends a
/// 1-byte DATAGRAM when the link has gone silent under our unacknowledged data ([`SilenceProbe`]),
/// and ends once the connection is gone and every reader has delivered what it had.
async fn drive(
    inner: Arc<Inner>,
    mut own_streams: mpsc::UnboundedReceiver<quinn::RecvStream>,
    control_recv: FrameReader,
    inbound: ByteSender<Box<Message>>,
) {
    let mut readers = JoinSet::new();
    readers.spawn(read_control(inner.clone(), control_recv));
    let mut accepting = true;
    let mut silence = SilenceProbe::new(std::time::Instant::now());
    let probe_poll = tokio::time::sleep(QUIET_POLL_INTERVAL);
    tokio::pin!(probe_poll);
    loop {
        tokio::select! {
            () = &mut probe_poll, if accepting => {
                let stats = inner.conn.stats();
                let (tx, rx) = (stats.udp_tx.datagrams, stats.udp_rx.datagrams);
                if silence.poll(std::time::Instant::now(), tx, rx, inner.conn.rtt()) {
                    // A peer without DATAGRAM support refuses it: then only new data probes.
                    let _ = inner.conn.send_datagram(Bytes::from_static(&[0]));
                }
                probe_poll
                    .as_mut()
                    .reset(tokio::time::Instant::now() + silence.next_poll(tx));
            }
            accepted = inner.conn.accept_bi(), if accepting => match accepted {
                Ok((send, recv)) => {
                    // We send on our own streams; dropping our half finishes it.
                    drop(send);
                    let reader = FrameReader::new(recv, inner.max_message_size);
                    readers.spawn(read_messages(inner.clone(), reader, true, inbound.clone()));
                }
                Err(e) => {
                    // Pending streams are yielded before the error, so none is left unread.
                    accepting = false;
                    let reason = inner.classify(e);
                    let _ = inner.reason.set(reason);
                }
            },
            Some(recv) = own_streams.recv(), if accepting => {
                let reader = FrameReader::new(recv, inner.max_message_size);
                readers.spawn(read_messages(inner.clone(), reader, false, inbound.clone()));
            }
            Some(done) = readers.join_next() => {
                if let Ok(Err(reason)) = done {
                    inner.fail(reason);
                }
            }
        }
        if !accepting && readers.is_empty() {
            break;
        }
    }
}

/// Reads one message stream into the inbound queue; control operations are answered instead.
async fn read_messages(
    inner: Arc<Inner>,
    mut reader: FrameReader,
    peer_opened: bool,
    inbound: ByteSender<Box<Message>>,
) -> Result<(), CloseReason> {
    if peer_opened {
        // Bounded, unlike viaduct's (W15): a stream that never says what it is holds a reader.
        match timeout(inner.prefix_timeout, reader.read_prefix()).await {
            Ok(Ok(())) => {}
            Ok(Err(ReadEnd::Failed(reason))) => return Err(reason),
            Ok(Err(ReadEnd::Eof | ReadEnd::ConnectionLost)) => return Ok(()),
            Err(_) => {
                return Err(CloseReason::PeerMisbehaved {
                    detail: format!(
                        "stream opened without its use type within {:?}",
                        inner.prefix_timeout
                    ),
                });
            }
        }
    }
    loop {
        let (msg, len) = match reader.next().await {
            Ok(next) => next,
            Err(ReadEnd::Failed(reason)) => return Err(reason),
            Err(ReadEnd::Eof | ReadEnd::ConnectionLost) => return Ok(()),
        };
        if is_control_operation(&msg.route.operation) {
            // Answered like any message, so the ack reaches the peer's `recv` as on WebSocket.
            if let Err(e) = inner.send(control::ack_for(&msg)).await {
                return Err(match e {
                    SendError::Closed { reason } => reason,
                    other => CloseReason::Io {
                        kind: std::io::ErrorKind::BrokenPipe,
                        detail: other.to_string(),
                    },
                });
            }
            continue;
        }
        if inbound.send(Box::new(msg), len).await.is_err() {
            return Ok(());
        }
    }
}

/// Reads the control stream after the handshake: control operations are answered with `ack`,
/// anything else is ignored (viaduct's `serveControlLan`).
async fn read_control(inner: Arc<Inner>, mut reader: FrameReader) -> Result<(), CloseReason> {
    loop {
        match reader.next().await {
            Ok((msg, _)) if is_control_operation(&msg.route.operation) => {
                inner.ack_control(&msg).await?;
            }
            Ok(_) => {}
            Err(ReadEnd::Failed(reason)) => return Err(reason),
            Err(ReadEnd::Eof | ReadEnd::ConnectionLost) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_errors_are_classified_by_fault() {
        let deadline = Duration::from_secs(3);
        let app = |code: u32, reason: &'static [u8]| {
            ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: VarInt::from_u32(code),
                reason: Bytes::from_static(reason),
            })
        };
        assert_eq!(
            reason_from_connection_error(app(0, b"bye"), deadline),
            CloseReason::Peer {
                reason: "bye".into()
            }
        );
        assert_eq!(
            reason_from_connection_error(app(0x13, b"big"), deadline),
            CloseReason::PeerAborted {
                code: 0x13,
                reason: "big".into()
            }
        );
        assert_eq!(
            reason_from_connection_error(ConnectionError::TimedOut, deadline),
            CloseReason::ReadTimeout { after: deadline }
        );
        assert!(matches!(
            reason_from_connection_error(ConnectionError::Reset, deadline),
            CloseReason::Io { .. }
        ));
    }

    #[test]
    fn close_codes_follow_the_reason() {
        assert_eq!(
            code::for_reason(&CloseReason::Local {
                reason: String::new()
            }),
            code::NO_ERROR
        );
        assert_eq!(
            code::for_reason(&CloseReason::Malformed {
                detail: String::new()
            }),
            code::MALFORMED
        );
        assert_eq!(
            code::for_reason(&CloseReason::TooLarge { len: 2, max: 1 }),
            code::TOO_LARGE
        );
        assert_eq!(
            code::for_reason(&CloseReason::WriteTimeout {
                after: Duration::ZERO
            }),
            code::WRITE_TIMEOUT
        );
    }

    #[test]
    fn close_reason_text_is_cut_on_a_char_boundary() {
        let long = "é".repeat(400);
        let cut = truncate(&long);
        assert!(cut.len() <= 512);
        assert!(std::str::from_utf8(cut).is_ok());
    }
}
