//! A connection's bounded outbound queue.
//!
//! Frames for a connection (replies, forwards from its peer, pings) are pushed without waiting:
//! the pusher may be another connection's task holding a session lock, and must never block on
//! a slow socket. The queue is bounded by frames and by bytes; a push that would overflow it
//! marks the connection as a slow consumer and asks its task to drop it, so a reader that
//! never reads costs at most the bound, never more.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

/// Identifies one accepted connection for the relay's lifetime.
pub type ConnId = u64;

/// The sending side, cloned into every session seat the connection holds.
#[derive(Clone)]
pub struct Outbox {
    id: ConnId,
    tx: mpsc::Sender<Utf8Bytes>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    kill: CancellationToken,
}

/// The push did not fit: the connection is being dropped as a slow consumer.
#[derive(Debug)]
pub struct Overflow;

impl Outbox {
    pub fn new(id: ConnId, max_frames: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
        let (tx, rx) = mpsc::channel(max_frames.max(1));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let outbox = Outbox {
            id,
            tx,
            queued_bytes: queued_bytes.clone(),
            max_bytes,
            kill: CancellationToken::new(),
        };
        (outbox, OutboxReceiver { rx, queued_bytes })
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    pub fn push(&self, frame: impl Into<Utf8Bytes>) -> Result<(), Overflow> {
        // A connection already being dropped takes nothing more: its peer must hear
        // `peer_offline`, not `DELIVERED` for a frame that will never be written.
        if self.kill.is_cancelled() {
            return Err(Overflow);
        }
        let frame = frame.into();
        let len = frame.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > self.max_bytes || self.tx.try_send(frame).is_err() {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.kill.cancel();
            return Err(Overflow);
        }
        Ok(())
    }

    /// Resolves once the connection must be dropped (its queue overflowed).
    pub fn killed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.kill.cancelled()
    }
}

/// The receiving side, owned by the connection's task.
pub struct OutboxReceiver {
    rx: mpsc::Receiver<Utf8Bytes>,
    queued_bytes: Arc<AtomicUsize>,
}

impl OutboxReceiver {
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        let frame = self.rx.recv().await?;
        self.queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
    }

    pub fn try_recv(&mut self) -> Option<Utf8Bytes> {
        let frame = self.rx.try_recv().ok()?;
        self.queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_by_frames_or_bytes_kills_the_connection() {
        let (outbox, mut rx) = Outbox::new(1, 2, 1000);
        assert!(outbox.push("a").is_ok());
        assert!(outbox.push("b").is_ok());
        assert!(outbox.push("c").is_err());
        assert!(outbox.kill.is_cancelled());

        let (outbox, _rx2) = Outbox::new(2, 100, 10);
        assert!(outbox.push("12345").is_ok());
        assert!(outbox.push("123456").is_err());
        assert!(outbox.kill.is_cancelled());

        assert_eq!(rx.try_recv().as_deref(), Some("a"));
    }

    #[test]
    fn draining_frees_the_byte_budget() {
        let (outbox, mut rx) = Outbox::new(1, 100, 10);
        assert!(outbox.push("1234567890").is_ok());
        assert!(rx.try_recv().is_some());
        assert!(outbox.push("1234567890").is_ok());
        assert!(!outbox.kill.is_cancelled());
    }
}
