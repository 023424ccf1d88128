//! A connection's bounded outbound queue.
//!
//! Frames for a connection (replies, forwards from its peer, pings) are pushed without waiting:
//! the pusher may be another connection's task holding a session lock, and must never block on
//! a slow socket. The queue is bounded by frames and by bytes; a push that would overflow it
//! marks the connection as a slow consumer and asks its task to drop it, so a reader that
//! never reads costs at most the bound, never more.
//!
//! It is a plain locked `VecDeque` and one waker rather than a channel: the connection's task
//! takes everything queued in one lock and writes it as one batch, a pusher wakes the task
//! only when the queue goes from empty to non-empty (so a burst of forwards costs one wake-up),
//! and an idle connection holds one small allocation (a channel preallocates a block of slots).
//!
//! Backpressure: a queue a quarter full is *congested*. A connection whose forward found its
//! peer congested stops reading (see `connection`) until the peer's task has written its
//! queue out, for a while at most: a peer that makes no progress meanwhile is marked
//! *stalled*, is not waited for again, and overflows its queue as before. A fast sender is thus
//! slowed to its reader's pace instead of getting its reader dropped, while a reader that has
//! stopped reading is still dropped, a little later.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};

/// Identifies one accepted connection for the relay's lifetime.
pub type ConnId = u64;

/// One frame for a connection: a JSON text frame, or a binary `DATA` frame (protocol.md 2.2),
/// written as a WebSocket text or binary message. Both share a reference-counted buffer, so
/// a clone (a forward) copies no bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Frame {
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(text) => text.len(),
            Frame::Binary(bytes) => bytes.len(),
        }
    }

    pub fn into_message(self) -> Message {
        match self {
            Frame::Text(text) => Message::Text(text),
            Frame::Binary(bytes) => Message::Binary(bytes),
        }
    }

    /// The text of a text frame (tests read what the hub queued as JSON).
    #[cfg(test)]
    pub fn as_str(&self) -> &str {
        match self {
            Frame::Text(text) => text.as_str(),
            Frame::Binary(_) => "<binary frame>",
        }
    }
}

impl From<Utf8Bytes> for Frame {
    fn from(text: Utf8Bytes) -> Frame {
        Frame::Text(text)
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame::Text(text.into())
    }
}

impl From<&str> for Frame {
    fn from(text: &str) -> Frame {
        Frame::Text(text.into())
    }
}

struct Shared {
    id: ConnId,
    frames: Mutex<VecDeque<Frame>>,
    /// Bytes pushed and not yet handed to the socket (queued, or in the batch being written).
    queued_bytes: AtomicUsize,
    max_frames: usize,
    max_bytes: usize,
    killed: AtomicBool,
    /// A sender waited for this queue to drain and it did not: nobody waits for it again
    /// until it makes progress.
    stalled: AtomicBool,
    /// Wakes senders waiting for this queue to drain (each time a batch has been written).
    drain: Notify,
    /// The connection's task, waiting for frames or for being killed.
    waker: AtomicWaker,
}

impl Shared {
    /// The queue, even if a pusher panicked while holding it: a `VecDeque` push or swap leaves
    /// it consistent, and the relay must not cascade one panic into every peer.
    fn frames(&self) -> MutexGuard<'_, VecDeque<Frame>> {
        self.frames
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.waker.wake();
        self.drain.notify_waiters();
    }

    fn congested(&self) -> bool {
        self.queued_bytes.load(Ordering::Acquire) >= self.max_bytes / 4
            || self.frames().len() >= self.max_frames / 4
    }
}

/// The sending side, cloned into every session seat the connection holds.
#[derive(Clone)]
pub struct Outbox(Arc<Shared>);

/// The push did not fit: the connection is being dropped as a slow consumer.
#[derive(Debug)]
pub struct Overflow;

/// How long a connection stops reading while its peer's queue is congested, before it deems
/// the peer stalled and carries on, so that a peer that has stopped reading is dropped as a
/// slow consumer rather than holding its sender forever. (A cluster node waits as long for a
/// peer on another node.)
pub const PEER_DRAIN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// The connection overflowed its queue and must be dropped.
#[derive(Debug)]
pub struct Killed;

impl Outbox {
    pub fn new(id: ConnId, max_frames: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
        let shared = Arc::new(Shared {
            id,
            frames: Mutex::new(VecDeque::new()),
            queued_bytes: AtomicUsize::new(0),
            max_frames: max_frames.max(1),
            max_bytes,
            killed: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            drain: Notify::new(),
            waker: AtomicWaker::new(),
        });
        let receiver = OutboxReceiver {
            shared: shared.clone(),
        };
        (Outbox(shared), receiver)
    }

    pub fn id(&self) -> ConnId {
        self.0.id
    }

    /// Drops the connection as if it had overflowed: its task closes it. (A cluster node whose
    /// peer node has gone closes the clients whose sessions lived there, so they come back.)
    pub fn kill(&self) {
        self.0.kill();
    }

    pub fn push(&self, frame: impl Into<Frame>) -> Result<(), Overflow> {
        let shared = &*self.0;
        // A connection already being dropped takes nothing more: its peer must hear
        // `peer_offline`, not `DELIVERED` for a frame that will never be written.
        if shared.killed.load(Ordering::Acquire) {
            return Err(Overflow);
        }
        let frame = frame.into();
        let len = frame.len();
        let before = shared.queued_bytes.fetch_add(len, Ordering::AcqRel);
        let was_empty = {
            let mut frames = shared.frames();
            if before + len > shared.max_bytes || frames.len() >= shared.max_frames {
                None
            } else {
                frames.push_back(frame);
                Some(frames.len() == 1)
            }
        };
        match was_empty {
            None => {
                shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                shared.kill();
                Err(Overflow)
            }
            // The task takes the whole queue each time it is woken, so a non-empty queue means
            // a wake-up is already on its way.
            Some(true) => {
                shared.waker.wake();
                Ok(())
            }
            Some(false) => Ok(()),
        }
    }

    /// Whether a frame of `len` bytes may be queued now by someone who can also wait (a
    /// mailbox hand-over, the batch read loop): the queue stays at most half full, by frames
    /// and by bytes, so replies, pings and the peer's traffic always fit in the other half.
    pub fn has_room_for(&self, len: usize) -> bool {
        let shared = &*self.0;
        !shared.killed.load(Ordering::Acquire)
            && shared.frames().len() < shared.max_frames / 2
            && shared
                .queued_bytes
                .load(Ordering::Acquire)
                .saturating_add(len)
                <= shared.max_bytes / 2
    }

    /// Whether a sender should wait for this queue to drain before reading more (see the
    /// module's documentation).
    pub fn is_congested(&self) -> bool {
        let shared = &*self.0;
        !shared.killed.load(Ordering::Acquire)
            && !shared.stalled.load(Ordering::Acquire)
            && shared.congested()
    }

    /// Resolves once this queue is no longer congested, or its connection is gone; marks it
    /// stalled if that takes longer than `patience`.
    pub async fn drained(&self, patience: std::time::Duration) {
        let shared = &*self.0;
        let wait = async {
            loop {
                let notified = shared.drain.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if shared.killed.load(Ordering::Acquire) || !shared.congested() {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(patience, wait).await.is_err() {
            shared.stalled.store(true, Ordering::Release);
        }
    }

    /// Resolves once the connection must be dropped (its queue overflowed).
    pub async fn killed(&self) {
        poll_fn(|cx| {
            if self.0.killed.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.0.waker.register(cx.waker());
            if self.0.killed.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
}

/// The receiving side, owned by the connection's task.
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

impl OutboxReceiver {
    /// Waits for frames, then moves every queued frame into `batch` (which must be empty: it
    /// is swapped with the queue, so both keep their capacity and no frame is copied).
    /// Errs once the connection has been killed. The frames' bytes stay counted against the
    /// bound until [`written`](Self::written) is called for them.
    pub async fn next_batch(&mut self, batch: &mut VecDeque<Frame>) -> Result<(), Killed> {
        let shared = &*self.shared;
        poll_fn(|cx| {
            if shared.killed.load(Ordering::Acquire) {
                return Poll::Ready(Err(Killed));
            }
            if take_all(shared, batch) {
                return Poll::Ready(Ok(()));
            }
            // Registered before the second look: a push after it sees an empty queue and wakes us.
            shared.waker.register(cx.waker());
            if shared.killed.load(Ordering::Acquire) {
                Poll::Ready(Err(Killed))
            } else if take_all(shared, batch) {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// [`Self::next_batch`], but at most `max` frames (at least one): the rest stay queued,
    /// and count against the bound. (A cluster node's proxy limits what is in flight to the
    /// client's own node this way.)
    pub async fn next_batch_up_to(
        &mut self,
        batch: &mut VecDeque<Frame>,
        max: usize,
    ) -> Result<(), Killed> {
        let shared = &*self.shared;
        let max = max.max(1);
        let take = |batch: &mut VecDeque<Frame>| {
            let mut frames = shared.frames();
            let n = frames.len().min(max);
            batch.extend(frames.drain(..n));
            n > 0
        };
        poll_fn(|cx| {
            if shared.killed.load(Ordering::Acquire) {
                return Poll::Ready(Err(Killed));
            }
            if take(batch) {
                return Poll::Ready(Ok(()));
            }
            shared.waker.register(cx.waker());
            if shared.killed.load(Ordering::Acquire) {
                Poll::Ready(Err(Killed))
            } else if take(batch) {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Takes one queued frame, if any (tests look at what the hub queued, frame by frame).
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.shared.frames().pop_front()?;
        self.written(frame.len());
        Some(frame)
    }

    /// Frees `bytes` of the bound: frames of that size have been handed to the socket.
    pub fn written(&self, bytes: usize) {
        let shared = &*self.shared;
        shared.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        shared.stalled.store(false, Ordering::Release);
        shared.drain.notify_waiters();
    }
}

impl Drop for OutboxReceiver {
    /// The connection's task is gone: nothing will be written any more, so pushes fail and
    /// nobody waits for a drain.
    fn drop(&mut self) {
        self.shared.kill();
    }
}

fn take_all(shared: &Shared, batch: &mut VecDeque<Frame>) -> bool {
    let mut frames = shared.frames();
    if frames.is_empty() {
        return false;
    }
    if batch.is_empty() {
        std::mem::swap(&mut *frames, batch);
    } else {
        batch.extend(frames.drain(..));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(rx: &mut OutboxReceiver) -> Vec<String> {
        let mut batch = VecDeque::new();
        take_all(&rx.shared, &mut batch);
        let bytes: usize = batch.iter().map(|f| f.len()).sum();
        rx.written(bytes);
        batch.iter().map(|f| f.as_str().to_string()).collect()
    }

    #[test]
    fn overflow_by_frames_or_bytes_kills_the_connection() {
        let (outbox, mut rx) = Outbox::new(1, 2, 1000);
        assert!(outbox.push("a").is_ok());
        assert!(outbox.push("b").is_ok());
        assert!(outbox.push("c").is_err());
        assert!(outbox.0.killed.load(Ordering::Acquire));

        let (outbox, _rx2) = Outbox::new(2, 100, 10);
        assert!(outbox.push("12345").is_ok());
        assert!(outbox.push("123456").is_err());
        assert!(outbox.0.killed.load(Ordering::Acquire));

        assert_eq!(take(&mut rx), ["a", "b"]);
    }

    #[test]
    fn draining_frees_the_byte_budget_once_written() {
        let (outbox, rx) = Outbox::new(1, 100, 10);
        assert!(outbox.push("1234567890").is_ok());
        let mut batch = VecDeque::new();
        assert!(take_all(&rx.shared, &mut batch));
        // Taken but not yet written: still counted.
        assert!(outbox.push("1").is_err());
        let (outbox, mut rx) = Outbox::new(1, 100, 10);
        assert!(outbox.push("1234567890").is_ok());
        assert_eq!(take(&mut rx), ["1234567890"]);
        assert!(outbox.push("1234567890").is_ok());
        assert!(!outbox.0.killed.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_push_wakes_the_waiting_task_and_order_is_kept() {
        let (outbox, mut rx) = Outbox::new(1, 100, 1000);
        let pusher = outbox.clone();
        let task = tokio::spawn(async move {
            let mut batch = VecDeque::new();
            let mut got = Vec::new();
            while got.len() < 3 {
                rx.next_batch(&mut batch).await.unwrap();
                got.extend(batch.drain(..).map(|f| f.as_str().to_string()));
            }
            got
        });
        tokio::task::yield_now().await;
        for f in ["1", "2", "3"] {
            pusher.push(f).unwrap();
        }
        assert_eq!(task.await.unwrap(), ["1", "2", "3"]);
    }
}
