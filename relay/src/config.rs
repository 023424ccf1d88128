//! Everything an operator can tune. Defaults live in `parley_protocol::limits` so that the
//! document and both ends agree on them.

use std::time::Duration;

use parley_protocol::limits;

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
    pub session_idle_ttl: Duration,
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
            allow_tokenless_reattach: false,
            sweep_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}
