//! Where a relay that shares its sessions with others (a cluster node) mirrors its mailboxes,
//! so that frames kept for an offline member outlive the node that keeps them.
//!
//! The hub stays synchronous: it tells the journal what changed as it changes it, and the
//! journal writes it out in the same order, later. What the relay promises a sender (`DELIVERED`
//! for a kept frame) waits until the frame is written: [`Journal::when_durable`]. A relay alone
//! has no journal; its mailboxes live and die with it.

use std::time::Duration;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::Role;
use crate::ids::SessionId;
use crate::outbox::Outbox;

pub trait Journal: Send + Sync {
    /// Whether more can be written now; if not, a frame that would be kept is refused
    /// (`store_unavailable`) rather than kept in memory only.
    fn has_room(&self) -> bool;
    /// `frame` was added to the end of the seat's mailbox.
    fn appended(&self, sid: SessionId, role: Role, frame: &Utf8Bytes);
    /// The first `n` frames of the seat's mailbox left it (handed over, or too old).
    fn removed(&self, sid: SessionId, role: Role, n: usize);
    /// The session is forgotten, mailboxes and all.
    fn forgotten(&self, sid: SessionId);
    /// The seat's mailbox is now exactly `frames` (a session just taken in: what the
    /// journal held, less what was too old or over the bounds).
    fn rewritten(&self, sid: SessionId, role: Role, frames: &[(Instant, Utf8Bytes)]);
    /// Queues `frame` on `outbox` once everything journaled before this call is written.
    fn when_durable(&self, outbox: Outbox, frame: Utf8Bytes);
}

/// A session's mailboxes as the journal had them, for a node that takes the session in.
#[derive(Debug, Default)]
pub struct Recovered {
    pub host: Vec<(Instant, Utf8Bytes)>,
    pub guest: Vec<(Instant, Utf8Bytes)>,
}

impl Recovered {
    pub fn frames(&mut self, role: Role) -> Vec<(Instant, Utf8Bytes)> {
        std::mem::take(match role {
            Role::Host => &mut self.host,
            Role::Guest => &mut self.guest,
        })
    }
}

/// A journal entry: when the frame was kept (Unix milliseconds), then the frame.
pub fn entry(kept_at_unix_ms: u64, frame: &Utf8Bytes) -> String {
    format!("{kept_at_unix_ms}|{}", frame.as_str())
}

/// Reads an entry back, with its time as an `Instant` of this process (`now` is the same
/// moment as `now_unix_ms`); `None` for a damaged entry.
pub fn parse_entry(text: &str, now: Instant, now_unix_ms: u64) -> Option<(Instant, Utf8Bytes)> {
    let (at, frame) = text.split_once('|')?;
    let at: u64 = at.parse().ok()?;
    let age = Duration::from_millis(now_unix_ms.saturating_sub(at));
    let at = now.checked_sub(age).unwrap_or(now);
    Some((at, Utf8Bytes::from(frame)))
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_with_their_age() {
        let now = Instant::now();
        let frame = Utf8Bytes::from(r#"{"t":"MSG","data":{"x":"a|b"}}"#);
        let text = entry(1_000_000, &frame);
        let (at, back) = parse_entry(&text, now, 1_000_000 + 1500).unwrap();
        assert_eq!(back, frame);
        assert_eq!(now - at, Duration::from_millis(1500));
        // From the future (another node's clock ahead of ours): counted as new, not refused.
        let (at, _) = parse_entry(&text, now, 999_000).unwrap();
        assert_eq!(at, now);
        for damaged in ["", "12", "x|{}", "-1|{}"] {
            assert!(parse_entry(damaged, now, 0).is_none(), "{damaged:?}");
        }
    }
}
