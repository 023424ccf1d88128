//! Frames kept for a member who is offline, delivered in order when it re-attaches.
//!
//! Bounded per seat by frames, bytes and age, and by the relay's [`Budget`] (relay-wide and per
//! sending address). A frame that does not fit is refused to its sender (`mailbox_full`), never
//! dropped silently; a frame that ages out is dropped, which the end-to-end layer covers: the
//! sender keeps every message until the peer acknowledges it, and sends it again.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::budget::Charge;
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

#[derive(Debug, Default)]
pub struct Mailbox {
    frames: VecDeque<Kept>,
    bytes: usize,
}

#[derive(Debug)]
struct Kept {
    frame: Utf8Bytes,
    at: Instant,
    /// Held against the budget until the frame leaves the mailbox.
    _charge: Charge,
}

impl Mailbox {
    /// Whether a frame of `len` bytes fits this seat's bounds (the budget is checked by whoever
    /// takes the charge).
    pub fn has_room(&self, len: usize, limits: &MailboxLimits) -> bool {
        self.frames.len() < limits.max_frames
            && self
                .bytes
                .checked_add(len)
                .is_some_and(|b| b <= limits.max_bytes)
    }

    /// Keeps `frame`, already charged to the budget; refused if the seat's bounds are reached.
    pub fn push(
        &mut self,
        frame: Utf8Bytes,
        charge: Charge,
        now: Instant,
        limits: &MailboxLimits,
    ) -> Result<(), MailboxFull> {
        let len = frame.len();
        if !self.has_room(len, limits) {
            return Err(MailboxFull);
        }
        self.bytes = self.bytes.saturating_add(len);
        self.frames.push_back(Kept {
            frame,
            at: now,
            _charge: charge,
        });
        Ok(())
    }

    /// Takes back frames a journal kept (oldest first), as far as the bounds and the relay's
    /// budget allow; frames too old or beyond them are dropped (the senders still hold them
    /// until acknowledged end to end, protocol.md 3.7).
    pub fn recover(
        &mut self,
        frames: Vec<(Instant, Utf8Bytes)>,
        budget: &std::sync::Arc<crate::budget::Budget>,
        limits: &MailboxLimits,
    ) {
        let now = Instant::now();
        let total = frames.len();
        let mut kept = 0usize;
        for (at, frame) in frames {
            if later(at, limits.max_age) <= now {
                continue;
            }
            let Some(charge) = budget.charge_shared(frame.len()) else {
                break;
            };
            if self.push(frame, charge, at, limits).is_err() {
                break;
            }
            kept = kept.saturating_add(1);
        }
        if kept < total {
            tracing::warn!(kept, total, "some journaled frames could not be taken back");
        }
    }

    /// Every frame kept, oldest first, with when it was kept.
    pub fn entries(&self) -> Vec<(Instant, Utf8Bytes)> {
        self.frames
            .iter()
            .map(|kept| (kept.at, kept.frame.clone()))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The oldest frame, if `fits` says it may go now; it leaves the mailbox (and the budget).
    pub fn pop_if(&mut self, fits: impl FnOnce(&Utf8Bytes) -> bool) -> Option<Utf8Bytes> {
        if !fits(&self.frames.front()?.frame) {
            return None;
        }
        let kept = self.frames.pop_front()?;
        self.bytes = self.bytes.saturating_sub(kept.frame.len());
        Some(kept.frame)
    }

    /// Drops frames older than `max_age`; how many.
    pub fn expire(&mut self, now: Instant, max_age: Duration) -> usize {
        let mut dropped = 0usize;
        while let Some(kept) = self.frames.front() {
            if later(kept.at, max_age) > now {
                break;
            }
            self.bytes = self.bytes.saturating_sub(kept.frame.len());
            self.frames.pop_front();
            dropped = dropped.saturating_add(1);
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;
    use crate::limiter::AddressKey;
    use std::net::IpAddr;

    const LIMITS: MailboxLimits = MailboxLimits {
        max_frames: 3,
        max_bytes: 10,
        max_age: Duration::from_secs(60),
        total_bytes: 15,
    };

    fn drain(m: &mut Mailbox) -> Vec<Utf8Bytes> {
        std::iter::from_fn(|| m.pop_if(|_| true)).collect()
    }

    #[test]
    fn bounds_by_frames_and_bytes_keeps_order_and_frees_the_budget() {
        let budget = Budget::new(15, 15);
        let address = AddressKey::from(IpAddr::from([127, 0, 0, 1]));
        let now = Instant::now();
        let mut a = Mailbox::default();
        let push = |m: &mut Mailbox, f: &'static str| {
            let charge = budget.charge(address, f.len()).ok_or(MailboxFull)?;
            m.push(f.into(), charge, now, &LIMITS)
        };
        assert!(push(&mut a, "1234").is_ok());
        assert!(push(&mut a, "5678").is_ok());
        assert!(push(&mut a, "abc").is_err(), "11 bytes > 10");
        assert!(push(&mut a, "ab").is_ok());
        assert!(push(&mut a, "c").is_err(), "4 frames > 3");
        assert_eq!(budget.total(), 10, "refused frames gave their charge back");
        // Only what `fits` allows leaves.
        assert_eq!(a.pop_if(|f| f.len() < 4), None);
        assert_eq!(
            drain(&mut a),
            vec![Utf8Bytes::from("1234"), "5678".into(), "ab".into()]
        );
        assert!(a.is_empty());
        assert_eq!(budget.total(), 0);
    }

    #[test]
    fn old_frames_expire() {
        let budget = Budget::new(100, 100);
        let address = AddressKey::from(IpAddr::from([127, 0, 0, 1]));
        let start = Instant::now();
        let mut m = Mailbox::default();
        for (f, at) in [("old", start), ("new", start + Duration::from_secs(30))] {
            let charge = budget.charge(address, 3).unwrap();
            m.push(f.into(), charge, at, &LIMITS).unwrap();
        }
        m.expire(start + Duration::from_secs(61), LIMITS.max_age);
        assert_eq!(budget.total(), 3);
        assert_eq!(drain(&mut m), vec![Utf8Bytes::from("new")]);
    }
}
