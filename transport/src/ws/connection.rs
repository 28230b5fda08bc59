//! An established WebSocket link: [`WsConnection`] and the two tasks that drive its socket.
//!
//! ```text
//!  send() ─► byte-bounded queue ─► writer task ─► SplitSink ─┐
//!                    control acks ─┘   (batches frames,      ├─ WebSocketStream<TLS<TCP>>
//!                    (ping/pong/config)  one flush per batch;│
//!                                        pings when idle)    │
//!  recv() ◄─ byte-bounded queue ◄─ reader task ◄─ SplitStream┘ (read deadline, JSON decode)
//! ```
//!
//! Two tasks, not one, so that a blocked write (peer not reading) never stops us reading, and the
//! reverse: a single task would deadlock two peers that both write faster than they read. Both
//! queues are bounded in bytes, so a slow peer or a slow caller makes `send` wait (back-pressure to
//! the caller) or stops the reader (back-pressure to the peer through TCP), never grows memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use proto::Message;
use proto::close::SessionCloseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_rustls::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use crate::config::LinkConfig;
use crate::queue::{ByteReceiver, ByteSender, byte_channel};
use crate::{
    BoxFuture, CloseError, CloseReason, Connection, PeerIdentity, RecvError, SendError,
    is_control_operation,
};

/// The WebSocket over TLS over TCP, either role.
pub(crate) type WsStream = WebSocketStream<TlsStream<TcpStream>>;

/// Control replies waiting for the writer; more pending than this means the peer floods control
/// operations without reading our answers.
const CONTROL_QUEUE: usize = 64;
/// Frames written between two flushes at most; bounds latency of the first frame of a burst.
const MAX_BATCH: usize = 256;
/// Longest a failing connection spends telling the peer why before dropping the socket.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// A message for the writer, in send order.
#[derive(Debug)]
enum Outbound {
    /// A data frame (one JSON message).
    Frame(WsMessage),
    /// Graceful close: everything queued before has been written; send the close frame.
    Close {
        code: CloseCode,
        reason: String,
        done: oneshot::Sender<()>,
    },
}

/// Out-of-band work for the writer, ahead of queued data.
#[derive(Debug)]
enum Control {
    /// An `ack` answer to a `ping`/`pong`/`config` operation.
    Reply(WsMessage),
    /// The reader failed: say why in a close frame, then close. The reader hands over its half
    /// so the writer can linger: read and discard until the peer closes, since closing a socket
    /// with unread data would reset the connection and could destroy the close frame in transit.
    Fail(CloseCode, String, SplitStream<WsStream>),
    /// The peer closed and tungstenite has answered its close frame: end TLS and TCP now, not when
    /// the handle is dropped or the next keep-alive ping fails (RFC 6455 §7.1.1: after the closing
    /// handshake the server closes TCP first). Carries the reader's half, as `Fail` does.
    Finish(SplitStream<WsStream>),
}

/// State both tasks and the handle share.
#[derive(Debug, Default)]
struct Shared {
    /// Why the connection ended; the first reason recorded wins.
    reason: OnceLock<CloseReason>,
    /// `close` was called: further sends are refused.
    closing: AtomicBool,
    /// The reason given to `close`, recorded when the closing handshake ends.
    local_reason: OnceLock<String>,
    /// Task handles, to stop the other task when one fails and everything on drop.
    tasks: StdMutex<Vec<AbortHandle>>,
}

impl Shared {
    /// Records `reason` unless one is already recorded; returns the one in force.
    fn end(&self, reason: CloseReason) -> &CloseReason {
        let _ = self.reason.set(reason);
        self.reason
            .get()
            .unwrap_or_else(|| unreachable!("set above"))
    }

    fn abort_tasks(&self) {
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
    }
}

/// An established WebSocket connection (either side).
#[derive(Debug)]
pub struct WsConnection {
    peer: PeerIdentity,
    shared: Arc<Shared>,
    outbound: ByteSender<Outbound>,
    inbound: tokio::sync::Mutex<ByteReceiver<Box<Message>>>,
    /// Flips to `true` when the reader has stopped (peer's close seen or the link failed).
    reader_done: watch::Receiver<bool>,
    write_deadline: Duration,
    max_message_size: usize,
}

impl WsConnection {
    /// Starts the reader and writer tasks over an upgraded stream.
    pub(crate) fn spawn(stream: WsStream, peer: PeerIdentity, link: &LinkConfig) -> Self {
        let (sink, stream) = stream.split();
        let shared = Arc::new(Shared::default());
        let (outbound_tx, outbound_rx) = byte_channel(link.send_buffer);
        let (inbound_tx, inbound_rx) = byte_channel(link.recv_buffer);
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (done_tx, done_rx) = watch::channel(false);
        let writer = tokio::spawn(writer(
            sink,
            outbound_rx,
            control_rx,
            shared.clone(),
            done_rx.clone(),
            link.write_deadline,
            link.effective_keep_alive(),
        ));
        let reader = tokio::spawn(reader(
            stream,
            inbound_tx,
            control_tx,
            shared.clone(),
            link.read_deadline,
            done_tx,
        ));
        if let Ok(mut tasks) = shared.tasks.lock() {
            tasks.push(writer.abort_handle());
            tasks.push(reader.abort_handle());
        }
        Self {
            peer,
            shared,
            outbound: outbound_tx,
            inbound: tokio::sync::Mutex::new(inbound_rx),
            reader_done: done_rx,
            write_deadline: link.write_deadline,
            max_message_size: link.max_message_size,
        }
    }

    async fn send_impl(&self, msg: Message) -> Result<(), SendError> {
        if let Some(reason) = self.shared.reason.get() {
            return Err(send_error(reason));
        }
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(SendError::Closed {
                reason: CloseReason::Local {
                    reason: "close() was called".to_owned(),
                },
            });
        }
        let text = proto::json::to_ws_text(&msg);
        let len = text.len();
        if len > self.max_message_size {
            return Err(SendError::TooLarge {
                len,
                max: self.max_message_size,
            });
        }
        let frame = Outbound::Frame(WsMessage::Text(text.into()));
        match timeout(self.write_deadline, self.outbound.send(frame, len)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_closed)) => Err(send_error(self.closed_reason())),
            Err(_elapsed) => {
                let reason = self.shared.end(CloseReason::WriteTimeout {
                    after: self.write_deadline,
                });
                let err = send_error(reason);
                self.shared.abort_tasks();
                Err(err)
            }
        }
    }

    async fn recv_impl(&self) -> Result<Option<Message>, RecvError> {
        let mut inbound = self.inbound.lock().await;
        match inbound.recv().await {
            Some(msg) => Ok(Some(*msg)),
            None => match RecvError::from_close(self.closed_reason().clone()) {
                Some(err) => Err(err),
                None => Ok(None),
            },
        }
    }

    async fn close_impl(
        &self,
        code: Option<SessionCloseCode>,
        reason: &str,
    ) -> Result<(), CloseError> {
        if let Some(ended) = self.shared.reason.get() {
            return match ended {
                CloseReason::Local { .. } => Ok(()),
                other => Err(CloseError::AlreadyClosed {
                    reason: other.clone(),
                }),
            };
        }
        let deadline = self.write_deadline;
        let graceful = async {
            if !self.shared.closing.swap(true, Ordering::AcqRel) {
                let _ = self.shared.local_reason.set(reason.to_owned());
                let (done_tx, done_rx) = oneshot::channel();
                let close = Outbound::Close {
                    code: code.map_or(CloseCode::Normal, |c| CloseCode::from(c.code())),
                    reason: reason.to_owned(),
                    done: done_tx,
                };
                if self.outbound.send(close, 1).await.is_err() || done_rx.await.is_err() {
                    return Err(self.closed_reason().clone());
                }
            }
            // Wait for the peer's close frame: it has then read everything before ours.
            let mut done = self.reader_done.clone();
            let _ = done.wait_for(|d| *d).await;
            Ok(())
        };
        let result = timeout(deadline, graceful).await;
        let local = CloseReason::Local {
            reason: reason.to_owned(),
        };
        match result {
            Ok(Ok(())) => {
                self.shared.end(local);
                Ok(())
            }
            Ok(Err(ended)) => {
                self.shared.abort_tasks();
                Err(CloseError::AlreadyClosed { reason: ended })
            }
            Err(_elapsed) => {
                self.shared.end(local);
                self.shared.abort_tasks();
                Err(CloseError::Timeout { after: deadline })
            }
        }
    }

    /// The recorded end reason (a generic one if a task vanished without recording any).
    fn closed_reason(&self) -> &CloseReason {
        self.shared.end(CloseReason::Io {
            kind: std::io::ErrorKind::BrokenPipe,
            detail: "connection task stopped".to_owned(),
        })
    }
}

impl Drop for WsConnection {
    fn drop(&mut self) {
        // An open connection dropped without `close` is aborted. One that already ended is left
        // to its tasks, which finish on their own within the farewell bounds (a failing one is
        // still telling the peer why).
        if self.shared.reason.get().is_none() {
            self.shared.abort_tasks();
        }
    }
}

impl Connection for WsConnection {
    fn send(&self, msg: Message) -> BoxFuture<'_, Result<(), SendError>> {
        Box::pin(self.send_impl(msg))
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
        Box::pin(async move { self.close_impl(code, &reason).await })
    }

    fn peer(&self) -> &PeerIdentity {
        &self.peer
    }
}

fn send_error(reason: &CloseReason) -> SendError {
    match reason {
        CloseReason::WriteTimeout { after } => SendError::Timeout { after: *after },
        other => SendError::Closed {
            reason: other.clone(),
        },
    }
}

/// A close frame; the reason is cut to the 123 bytes a control frame can carry.
fn close_frame(code: CloseCode, reason: &str) -> WsMessage {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: reason[..end].into(),
    }))
}

/// Why the writer stopped writing.
#[derive(Debug)]
enum WriteFailure {
    /// The closing handshake is under way (tungstenite refuses to send after the peer's close
    /// frame was read): the reader records why the connection ended, not the writer.
    Closing,
    /// The link failed while writing.
    Failed(CloseReason),
}

impl From<tungstenite::Error> for WriteFailure {
    fn from(err: tungstenite::Error) -> Self {
        use tungstenite::error::ProtocolError;
        match err {
            tungstenite::Error::Protocol(ProtocolError::SendAfterClosing)
            | tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed => Self::Closing,
            other => Self::Failed(reason_from_ws_error(other)),
        }
    }
}

/// Feeds one frame, bounded by the write deadline.
async fn feed(
    sink: &mut SplitSink<WsStream, WsMessage>,
    frame: WsMessage,
    deadline: Duration,
) -> Result<(), WriteFailure> {
    bounded(deadline, sink.feed(frame)).await
}

async fn flush(
    sink: &mut SplitSink<WsStream, WsMessage>,
    deadline: Duration,
) -> Result<(), WriteFailure> {
    bounded(deadline, sink.flush()).await
}

/// One sink operation within the write deadline.
async fn bounded(
    deadline: Duration,
    op: impl Future<Output = Result<(), tungstenite::Error>>,
) -> Result<(), WriteFailure> {
    match timeout(deadline, op).await {
        Ok(result) => result.map_err(WriteFailure::from),
        Err(_) => Err(WriteFailure::Failed(CloseReason::WriteTimeout {
            after: deadline,
        })),
    }
}

/// The writer task: queued frames in order (batched, one flush per batch), control replies first,
/// a ping whenever the keep-alive interval passes, the close frame last.
async fn writer(
    mut sink: SplitSink<WsStream, WsMessage>,
    mut outbound: ByteReceiver<Outbound>,
    mut control: mpsc::Receiver<Control>,
    shared: Arc<Shared>,
    mut reader_done: watch::Receiver<bool>,
    deadline: Duration,
    keep_alive: Duration,
) {
    let mut ping = tokio::time::interval_at(Instant::now() + keep_alive, keep_alive);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut control_open = true;
    let outcome: Result<Option<SplitStream<WsStream>>, WriteFailure> = async {
        loop {
            tokio::select! {
                biased;
                ctrl = control.recv(), if control_open => match ctrl {
                    Some(Control::Reply(frame)) => {
                        feed(&mut sink, frame, deadline).await?;
                        flush(&mut sink, deadline).await?;
                    }
                    Some(Control::Finish(stream)) => return Ok(Some(stream)),
                    Some(Control::Fail(code, reason, stream)) => {
                        let farewell = async {
                            let _ = sink.send(close_frame(code, &reason)).await;
                        };
                        let _ = timeout(FAREWELL_TIMEOUT, farewell).await;
                        return Ok(Some(stream));
                    }
                    None => control_open = false,
                },
                item = outbound.recv() => {
                    let Some(mut item) = item else { return Ok(None) };
                    let mut batched = 0;
                    loop {
                        match item {
                            Outbound::Frame(frame) => feed(&mut sink, frame, deadline).await?,
                            Outbound::Close { code, reason, done } => {
                                feed(&mut sink, close_frame(code, &reason), deadline).await?;
                                flush(&mut sink, deadline).await?;
                                let _ = done.send(());
                                return Ok(None);
                            }
                        }
                        batched += 1;
                        match outbound.try_recv() {
                            Some(next) if batched < MAX_BATCH => item = next,
                            Some(next) => {
                                flush(&mut sink, deadline).await?;
                                batched = 0;
                                item = next;
                            }
                            None => break,
                        }
                    }
                    flush(&mut sink, deadline).await?;
                }
                _ = ping.tick() => {
                    feed(&mut sink, WsMessage::Ping(Default::default()), deadline).await?;
                    flush(&mut sink, deadline).await?;
                }
            }
        }
    }
    .await;
    match outcome {
        Err(WriteFailure::Failed(reason)) => {
            shared.end(reason);
            shared.abort_tasks();
        }
        Err(WriteFailure::Closing) => {
            // The peer's close frame is in: let the reader record it (and its code) rather
            // than a "sending after closing" error that would hide why the peer closed.
            let _ = timeout(FAREWELL_TIMEOUT, reader_done.wait_for(|d| *d)).await;
            shared.end(CloseReason::Io {
                kind: std::io::ErrorKind::NotConnected,
                detail: "WebSocket already closed".to_owned(),
            });
            shared.abort_tasks();
        }
        Ok(Some(stream)) => linger(sink, stream).await,
        Ok(None) => {}
    }
}

/// After a failure: end TLS (close_notify, FIN), then read and discard until the peer closes,
/// for at most [`FAREWELL_TIMEOUT`].
async fn linger(sink: SplitSink<WsStream, WsMessage>, stream: SplitStream<WsStream>) {
    let Ok(mut ws) = sink.reunite(stream) else {
        return;
    };
    let tls = ws.get_mut();
    let drain = async {
        let _ = tls.shutdown().await;
        let mut buf = [0u8; 4096];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = timeout(FAREWELL_TIMEOUT, drain).await;
}

/// The reader task: frames in, decoded messages out, control operations answered, the read
/// deadline enforced while waiting for the peer.
async fn reader(
    mut stream: SplitStream<WsStream>,
    inbound: ByteSender<Box<Message>>,
    control: mpsc::Sender<Control>,
    shared: Arc<Shared>,
    read_deadline: Duration,
    done: watch::Sender<bool>,
) {
    let mut peer_close: Option<CloseReason> = None;
    // Set when the stream ended after the peer's close frame, on a connection we did not close.
    let mut peer_finished = false;
    let failure: Option<(CloseReason, CloseCode)> = loop {
        let Ok(next) = timeout(read_deadline, stream.next()).await else {
            let reason = CloseReason::ReadTimeout {
                after: read_deadline,
            };
            break Some((reason, CloseCode::Away));
        };
        let payload = match next {
            None => {
                peer_finished = peer_close.is_some() && !shared.closing.load(Ordering::Acquire);
                break end_of_stream(&shared, peer_close.take());
            }
            Some(Err(e)) => {
                if peer_close.is_some() || shared.closing.load(Ordering::Acquire) {
                    // The peer may drop TCP right after the closing handshake.
                    peer_finished = peer_close.is_some() && !shared.closing.load(Ordering::Acquire);
                    break end_of_stream(&shared, peer_close.take());
                }
                let reason = reason_from_ws_error(e);
                let code = close_code_for(&reason);
                break Some((reason, code));
            }
            Some(Ok(WsMessage::Text(text))) => bytes::Bytes::from(text),
            Some(Ok(WsMessage::Binary(bytes))) => bytes,
            Some(Ok(WsMessage::Close(frame))) => {
                let reason = peer_close_reason(frame.as_ref());
                if !shared.closing.load(Ordering::Acquire) {
                    // Recorded now, not when the stream ends: a write racing the closing
                    // handshake must not stand as the reason and hide the peer's close code.
                    shared.end(reason.clone());
                }
                peer_close = Some(reason);
                continue;
            }
            // Pings (answered by tungstenite) and pongs only prove the peer is alive.
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => continue,
        };
        let msg = match proto::json::from_slice(&payload) {
            Ok(msg) => msg,
            Err(e) => {
                break Some((
                    CloseReason::Malformed {
                        detail: e.to_string(),
                    },
                    CloseCode::Invalid,
                ));
            }
        };
        if is_control_operation(&msg.route.operation) {
            let ack = WsMessage::Text(
                proto::json::to_ws_text(&Message::response_to(&msg, proto::Content::text("ack")))
                    .into(),
            );
            if control.try_send(Control::Reply(ack)).is_err() {
                break Some((
                    CloseReason::PeerMisbehaved {
                        detail: "control operations sent faster than their acks are read"
                            .to_owned(),
                    },
                    CloseCode::Policy,
                ));
            }
            continue;
        }
        if inbound.send(Box::new(msg), payload.len()).await.is_err() {
            // Every handle is gone; nobody will read.
            break None;
        }
    };
    if let Some((reason, code)) = failure {
        let text = reason.to_string();
        shared.end(reason);
        if control.try_send(Control::Fail(code, text, stream)).is_err() {
            shared.abort_tasks();
        }
    } else if peer_finished && control.try_send(Control::Finish(stream)).is_err() {
        shared.abort_tasks();
    }
    drop(inbound);
    let _ = done.send(true);
}

/// The stream ended: cleanly if a closing handshake happened, otherwise the link was cut.
fn end_of_stream(
    shared: &Shared,
    peer_close: Option<CloseReason>,
) -> Option<(CloseReason, CloseCode)> {
    if shared.closing.load(Ordering::Acquire) {
        // Our close: the peer's close frame (if any) is its answer.
        let reason = shared.local_reason.get().cloned().unwrap_or_default();
        shared.end(CloseReason::Local { reason });
        return None;
    }
    match peer_close {
        Some(reason) => {
            shared.end(reason);
        }
        None => {
            shared.end(CloseReason::Io {
                kind: std::io::ErrorKind::UnexpectedEof,
                detail: "peer closed the connection without a close frame".to_owned(),
            });
        }
    }
    None
}

fn peer_close_reason(frame: Option<&CloseFrame>) -> CloseReason {
    match frame {
        None => CloseReason::Peer {
            reason: String::new(),
        },
        Some(f) if matches!(f.code, CloseCode::Normal | CloseCode::Away) => CloseReason::Peer {
            reason: f.reason.to_string(),
        },
        Some(f) => CloseReason::PeerAborted {
            code: u64::from(u16::from(f.code)),
            reason: f.reason.to_string(),
        },
    }
}

fn close_code_for(reason: &CloseReason) -> CloseCode {
    match reason {
        CloseReason::TooLarge { .. } => CloseCode::Size,
        CloseReason::Malformed { .. } => CloseCode::Invalid,
        CloseReason::PeerMisbehaved { .. } => CloseCode::Protocol,
        _ => CloseCode::Away,
    }
}

/// Classifies a tungstenite error by who is at fault.
pub(crate) fn reason_from_ws_error(err: tungstenite::Error) -> CloseReason {
    use tungstenite::error::{CapacityError, ProtocolError};
    match err {
        tungstenite::Error::Io(e) => CloseReason::from_io(&e),
        tungstenite::Error::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            CloseReason::TooLarge {
                len: size as u64,
                max: max_size,
            }
        }
        tungstenite::Error::Utf8(detail) => CloseReason::Malformed {
            detail: format!("text frame is not UTF-8: {detail}"),
        },
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            CloseReason::Io {
                kind: std::io::ErrorKind::ConnectionReset,
                detail: "peer closed the connection without a close frame".to_owned(),
            }
        }
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            CloseReason::Io {
                kind: std::io::ErrorKind::NotConnected,
                detail: "WebSocket already closed".to_owned(),
            }
        }
        other => CloseReason::PeerMisbehaved {
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use tungstenite::error::{CapacityError, ProtocolError};

    use super::*;

    #[test]
    fn tungstenite_errors_are_classified_by_fault() {
        assert_eq!(
            reason_from_ws_error(tungstenite::Error::Capacity(
                CapacityError::MessageTooLong {
                    size: 10,
                    max_size: 5
                }
            )),
            CloseReason::TooLarge { len: 10, max: 5 }
        );
        assert!(matches!(
            reason_from_ws_error(tungstenite::Error::Utf8("bad".into())),
            CloseReason::Malformed { .. }
        ));
        assert!(matches!(
            reason_from_ws_error(tungstenite::Error::Protocol(
                ProtocolError::ResetWithoutClosingHandshake
            )),
            CloseReason::Io { .. }
        ));
        assert!(matches!(
            reason_from_ws_error(tungstenite::Error::Protocol(
                ProtocolError::UnmaskedFrameFromClient
            )),
            CloseReason::PeerMisbehaved { .. }
        ));
    }

    #[test]
    fn close_frames_map_to_reasons_and_back() {
        let normal = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        assert_eq!(
            peer_close_reason(Some(&normal)),
            CloseReason::Peer {
                reason: "bye".into()
            }
        );
        let size = CloseFrame {
            code: CloseCode::Size,
            reason: "big".into(),
        };
        assert_eq!(
            peer_close_reason(Some(&size)),
            CloseReason::PeerAborted {
                code: 1009,
                reason: "big".into()
            }
        );
        assert_eq!(
            close_code_for(&CloseReason::TooLarge { len: 1, max: 0 }),
            CloseCode::Size
        );
    }

    #[test]
    fn close_frame_reason_fits_a_control_frame() {
        let WsMessage::Close(Some(frame)) = close_frame(CloseCode::Normal, &"ü".repeat(100))
        else {
            panic!("not a close frame");
        };
        assert!(frame.reason.len() <= 123);
    }
}
