//! A bound on the connections an HTTP server holds open: each accepted connection carries a
//! semaphore permit until it closes; at the bound, accepting stops and further connections wait
//! in the kernel's accept queue (back-pressure instead of memory). Used by the cloud API and the
//! certificate bootstrap server.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A connection holding its slot (if the listener is bounded) until it is dropped.
#[derive(Debug)]
pub struct Counted<Io> {
    io: Io,
    _slot: Option<OwnedSemaphorePermit>,
}

impl<Io> Counted<Io> {
    /// `io` holding `slot`.
    pub fn new(io: Io, slot: Option<OwnedSemaphorePermit>) -> Self {
        Self { io, _slot: slot }
    }

    /// The connection.
    pub fn get_ref(&self) -> &Io {
        &self.io
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Counted<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Counted<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A listener that accepts only while fewer than its bound of connections are open.
#[derive(Debug)]
pub struct ConnLimit<L> {
    inner: L,
    slots: Arc<Semaphore>,
}

impl<L> ConnLimit<L> {
    /// `inner`, holding at most `max` connections open.
    pub fn new(inner: L, max: usize) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(max.max(1))),
        }
    }
}

impl<L: Listener> Listener for ConnLimit<L>
where
    L::Io: Unpin,
{
    type Io = Counted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so this waits for a slot rather than failing.
        let slot = Arc::clone(&self.slots).acquire_owned().await.ok();
        let (io, addr) = self.inner.accept().await;
        (Counted::new(io, slot), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
