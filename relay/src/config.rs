//! Everything an operator can tune. Defaults live in `parley_protocol::limits` so that the
//! document and both ends agree on them.

use std::time::Duration;

use parley_protocol::limits;
use tokio::time::Instant;

/// `at + after`, or a time so far ahead it never comes when that would overflow: an operator
/// may configure "never" as a huge duration, and that must not panic.
pub(crate) fn later(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .or_else(|| at.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(at)
}

/// A token bucket's shape: `burst` events at once, then one more every `refill`.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub burst: u32,
    pub refill: Duration,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub max_frame_bytes: usize,
    pub invite_ttl: Duration,
    /// A paired session none of whose members is connected is forgotten after this long.
    pub session_idle_ttl: Duration,
    /// An unpaired session (nobody joined) whose host is gone is forgotten after this long.
    pub unpaired_session_ttl: Duration,
    pub max_sessions_per_connection: usize,
    pub max_sessions: usize,
    pub max_connections: usize,
    pub outbound_queue_frames: usize,
    pub outbound_queue_bytes: usize,
    pub write_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub join_failures_per_connection: RateLimit,
    pub join_failures_per_address: RateLimit,
    /// `CREATE_SESSION`s per address, so that one address cannot fill the invite-code space.
    pub sessions_created_per_address: RateLimit,
    /// A client that has not finished the WebSocket upgrade by then is dropped.
    pub handshake_timeout: Duration,
    /// Frames kept for an offline member (see `mailbox`).
    pub mailbox: crate::mailbox::MailboxLimits,
    /// Accept `REATTACH` without a resume token (the original client never had one). Anyone who
    /// learns a session id can then take an empty seat in it, so this is off by default.
    pub allow_tokenless_reattach: bool,
    /// How often expired invites, idle sessions and full rate-limit buckets are swept.
    pub sweep_interval: Duration,
    /// On shutdown, how long connections get to receive their close frame.
    pub shutdown_grace: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            max_frame_bytes: limits::MAX_FRAME_BYTES,
            invite_ttl: limits::INVITE_TTL,
            session_idle_ttl: limits::SESSION_IDLE_TTL,
            unpaired_session_ttl: limits::UNPAIRED_SESSION_TTL,
            max_sessions_per_connection: limits::MAX_SESSIONS_PER_CONNECTION,
            max_sessions: limits::MAX_SESSIONS,
            max_connections: limits::MAX_CONNECTIONS,
            outbound_queue_frames: limits::OUTBOUND_QUEUE_FRAMES,
            outbound_queue_bytes: limits::OUTBOUND_QUEUE_BYTES,
            write_timeout: limits::WRITE_TIMEOUT,
            ping_interval: limits::PING_INTERVAL,
            idle_timeout: limits::IDLE_TIMEOUT,
            join_failures_per_connection: RateLimit {
                burst: limits::JOIN_FAILURES_PER_CONNECTION_BURST,
                refill: limits::JOIN_FAILURES_PER_CONNECTION_REFILL,
            },
            join_failures_per_address: RateLimit {
                burst: limits::JOIN_FAILURES_PER_ADDRESS_BURST,
                refill: limits::JOIN_FAILURES_PER_ADDRESS_REFILL,
            },
            sessions_created_per_address: RateLimit {
                burst: limits::SESSIONS_CREATED_PER_ADDRESS_BURST,
                refill: limits::SESSIONS_CREATED_PER_ADDRESS_REFILL,
            },
            handshake_timeout: limits::HANDSHAKE_TIMEOUT,
            mailbox: crate::mailbox::MailboxLimits {
                max_frames: limits::MAILBOX_FRAMES,
                max_bytes: limits::MAILBOX_BYTES,
                max_age: limits::MAILBOX_AGE,
                total_bytes: limits::MAILBOX_TOTAL_BYTES,
            },
            allow_tokenless_reattach: false,
            sweep_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}
