//! Liveness of one relay connection, sans-IO (protocol.md 3.7, "Liveness").
//!
//! A relay PINGs every 10 s, so silence means a dead relay or network path, which TCP alone
//! may not notice for hours. After half of the bound without anything arriving we send a
//! `PING` of our own (the relay answers `PONG`); after the whole bound the connection is
//! declared lost. Time is an input: the caller says when something arrived and when its timer
//! fired, and asks when to wake next.

use std::time::{Duration, Instant};

use parley_protocol::{Envelope, FrameType, encode};

use crate::error::ClientError;

/// What a silence calls for.
#[derive(Debug)]
pub enum Alarm {
    /// Half the bound passed: send this `PING`.
    Ping(String),
    /// The whole bound passed: the connection is dead.
    Dead(ClientError),
}

#[derive(Debug, Clone)]
pub struct Liveness {
    idle: Duration,
    last_heard: Instant,
    pinged: bool,
}

impl Liveness {
    /// A connection that was just opened (or just heard from) at `now`.
    pub fn new(now: Instant, idle: Duration) -> Liveness {
        Liveness {
            idle,
            last_heard: now,
            pinged: false,
        }
    }

    /// Something arrived (any WebSocket message, control frames too).
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        self.pinged = false;
    }

    /// When to call [`Liveness::handle_timeout`]; `None` for a bound too large for the clock
    /// (no liveness check).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.pinged {
            self.last_heard.checked_add(self.idle)
        } else {
            self.last_heard.checked_add(self.idle / 2)
        }
    }

    /// The timer fired: what the silence so far calls for, if anything yet.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Alarm> {
        if self.poll_timeout().is_none_or(|at| now < at) {
            return None;
        }
        if self.pinged {
            return Some(Alarm::Dead(ClientError::ConnectionLost(format!(
                "no sign of life from the relay for {:.1} s",
                self.idle.as_secs_f64()
            ))));
        }
        self.pinged = true;
        Some(Alarm::Ping(encode::<()>(FrameType::Ping, None, None)))
    }
}

/// The answer to a relay's `PING` (any frame whose envelope has `t` = `PING`), if `text` is one.
pub fn pong_for(text: &str) -> Option<String> {
    Envelope::parse(text)
        .is_ok_and(|env| env.kind == FrameType::Ping)
        .then(|| encode::<()>(FrameType::Pong, None, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_gets_a_ping_at_half_the_bound_then_is_dead_at_the_bound() {
        let start = Instant::now();
        let idle = Duration::from_secs(35);
        let mut live = Liveness::new(start, idle);
        let half = start + Duration::from_millis(17_500);
        assert_eq!(live.poll_timeout(), Some(half));
        assert!(
            live.handle_timeout(half - Duration::from_millis(1))
                .is_none()
        );
        assert!(
            matches!(live.handle_timeout(half), Some(Alarm::Ping(f)) if f == r#"{"t":"PING"}"#)
        );
        assert_eq!(live.poll_timeout(), Some(start + idle));
        assert!(
            live.handle_timeout(start + idle - Duration::from_millis(1))
                .is_none()
        );
        assert!(matches!(
            live.handle_timeout(start + idle),
            Some(Alarm::Dead(ClientError::ConnectionLost(m))) if m.contains("35.0 s")
        ));
        // Anything heard starts the count again, PING or not.
        live.heard(start + idle);
        assert_eq!(live.poll_timeout(), Some(start + idle + idle / 2));
    }

    #[test]
    fn a_bound_too_large_for_the_clock_means_no_check() {
        let mut live = Liveness::new(Instant::now(), Duration::MAX);
        assert_eq!(live.poll_timeout(), None);
        assert!(live.handle_timeout(Instant::now()).is_none());
    }

    #[test]
    fn any_ping_envelope_is_answered_and_nothing_else() {
        assert_eq!(
            pong_for(r#"{ "sid": null, "t" : "PING" }"#).as_deref(),
            Some(r#"{"t":"PONG"}"#)
        );
        assert_eq!(pong_for(r#"{"t":"PONG"}"#), None);
        assert_eq!(pong_for("not json"), None);
    }
}
