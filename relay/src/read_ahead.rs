//! Large socket reads without a large buffer per connection.
//!
//! tungstenite reads into its own per-connection buffer, at most `read_buffer_size` bytes per
//! call, and keeps that buffer for the connection's life. A big buffer costs every idle
//! connection its size in memory; a small one costs a busy connection a system call per few
//! frames. `ReadAhead` sits between the two: it reads from the socket into a buffer shared by
//! every connection on the same worker thread (one call takes whatever the kernel has, up to
//! `SCRATCH_BYTES`), hands tungstenite what it asked for, and keeps the rest in a buffer of
//! its own that is freed as soon as it is consumed. An idle connection holds nothing here; a
//! busy one makes one system call per `SCRATCH_BYTES` at most.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one socket read may take (per worker thread, shared by its connections).
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read from the socket and not yet handed on; `pending[consumed..]` is what is left.
    pending: Vec<u8>,
    consumed: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> ReadAhead<S> {
        ReadAhead {
            inner,
            pending: Vec::new(),
            consumed: 0,
        }
    }

    /// Puts bytes back in front of whatever is pending: read too early (the HTTP request
    /// head was read in chunks), they are handed on first.
    pub fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let rest = self.pending.get(self.consumed..).unwrap_or_default();
        let mut pending = Vec::with_capacity(bytes.len() + rest.len());
        pending.extend_from_slice(bytes);
        pending.extend_from_slice(rest);
        self.pending = pending;
        self.consumed = 0;
    }

    /// Copies what is pending into `buf`; false if nothing was.
    fn hand_on_pending(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let rest = self.pending.get(self.consumed..).unwrap_or_default();
        if rest.is_empty() {
            return false;
        }
        let n = rest.len().min(buf.remaining());
        let (now, _) = rest.split_at(n);
        buf.put_slice(now);
        self.consumed += n;
        if self.consumed >= self.pending.len() {
            // Drained: give the memory back rather than keep it for an idle connection.
            self.pending = Vec::new();
            self.consumed = 0;
        }
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 || this.hand_on_pending(buf) {
            return Poll::Ready(Ok(()));
        }
        SCRATCH.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                // Only a nested read on this thread could hold it; read directly instead.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            };
            let mut read = ReadBuf::new(scratch.as_mut());
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let got = read.filled();
            let (now, later) = got.split_at(got.len().min(buf.remaining()));
            buf.put_slice(now);
            if !later.is_empty() {
                this.pending = later.to_vec();
                this.consumed = 0;
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_the_rest_is_freed() {
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&data).await.unwrap();
        drop(tx);
        let mut rx = ReadAhead::new(rx);
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        loop {
            let n = rx.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(rx.pending.capacity(), 0);
    }
}
