//! Frames kept for a member who is offline, delivered in order when it re-attaches.
//!
//! Bounded per seat by frames, bytes and age, and relay-wide by bytes. A frame that does not fit
//! is refused to its sender (`mailbox_full`), never dropped silently; a frame that ages out is
//! dropped, which the end-to-end layer covers: the sender keeps every message until the peer
//! acknowledges it, and sends it again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::config::later;

#[derive(Debug, Clone, Copy)]
pub struct MailboxLimits {
    pub max_frames: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
    /// All mailboxes of the relay together.
    pub total_bytes: usize,
}

#[derive(Debug)]
pub struct MailboxFull;

pub struct Mailbox {
    frames: VecDeque<(Utf8Bytes, Instant)>,
    bytes: usize,
    /// The relay-wide byte count, shared by every mailbox.
    total: Arc<AtomicUsize>,
}

impl Mailbox {
    pub fn new(total: Arc<AtomicUsize>) -> Mailbox {
        Mailbox {
            frames: VecDeque::new(),
            bytes: 0,
            total,
        }
    }

    pub fn push(
        &mut self,
        frame: Utf8Bytes,
        now: Instant,
        limits: &MailboxLimits,
    ) -> Result<(), MailboxFull> {
        let len = frame.len();
        if self.frames.len() >= limits.max_frames || self.bytes + len > limits.max_bytes {
            return Err(MailboxFull);
        }
        let before = self.total.fetch_add(len, Ordering::AcqRel);
        if before + len > limits.total_bytes {
            self.total.fetch_sub(len, Ordering::AcqRel);
            return Err(MailboxFull);
        }
        self.bytes += len;
        self.frames.push_back((frame, now));
        Ok(())
    }

    /// Everything kept, oldest first; the mailbox is empty afterwards.
    pub fn take_all(&mut self) -> Vec<Utf8Bytes> {
        self.total.fetch_sub(self.bytes, Ordering::AcqRel);
        self.bytes = 0;
        self.frames.drain(..).map(|(frame, _)| frame).collect()
    }

    /// Drops frames older than `max_age`.
    pub fn expire(&mut self, now: Instant, max_age: Duration) {
        while let Some((frame, at)) = self.frames.front() {
            if later(*at, max_age) > now {
                break;
            }
            let len = frame.len();
            self.bytes -= len;
            self.total.fetch_sub(len, Ordering::AcqRel);
            self.frames.pop_front();
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MailboxLimits = MailboxLimits {
        max_frames: 3,
        max_bytes: 10,
        max_age: Duration::from_secs(60),
        total_bytes: 15,
    };

    #[test]
    fn bounds_by_frames_bytes_and_relay_total_and_keeps_order() {
        let total = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let mut a = Mailbox::new(total.clone());
        assert!(a.push("1234".into(), now, &LIMITS).is_ok());
        assert!(a.push("5678".into(), now, &LIMITS).is_ok());
        assert!(a.push("abc".into(), now, &LIMITS).is_err(), "11 bytes > 10");
        assert!(a.push("ab".into(), now, &LIMITS).is_ok());
        assert!(a.push("c".into(), now, &LIMITS).is_err(), "4 frames > 3");
        let mut b = Mailbox::new(total.clone());
        assert!(b.push("12345".into(), now, &LIMITS).is_ok());
        assert!(
            b.push("6".into(), now, &LIMITS).is_err(),
            "16 bytes relay-wide > 15"
        );
        assert_eq!(
            a.take_all(),
            vec![Utf8Bytes::from("1234"), "5678".into(), "ab".into()]
        );
        assert_eq!(total.load(Ordering::Acquire), 5);
        drop(b);
        assert_eq!(total.load(Ordering::Acquire), 0);
    }

    #[test]
    fn old_frames_expire() {
        let total = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut m = Mailbox::new(total.clone());
        m.push("old".into(), start, &LIMITS).ok();
        m.push("new".into(), start + Duration::from_secs(30), &LIMITS)
            .ok();
        m.expire(start + Duration::from_secs(61), LIMITS.max_age);
        assert_eq!(m.take_all(), vec![Utf8Bytes::from("new")]);
        assert_eq!(total.load(Ordering::Acquire), 0);
    }
}
