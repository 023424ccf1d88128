//! Everything an operator can tune. Defaults live in `parley_protocol::limits` so that the
//! document and both ends agree on them.

use std::io;
use std::time::Duration;

use parley_protocol::limits;
use tokio::time::Instant;

use crate::ids::RelaySecret;
use crate::tls::Tls;

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
    /// Connections from one address (IPv4, or IPv6 /64), counted from accept.
    pub max_connections_per_address: usize,
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
    /// What frames from one address may hold of all mailboxes and pending join requests.
    pub mailbox_bytes_per_address: usize,
    /// Resume tokens are MACs under this secret: keep it across restarts and the relay takes
    /// its sessions back from their members' tokens (see `ids`). A clone shares the secret,
    /// so a relay started again with a clone of the configuration is the same relay.
    pub secret: RelaySecret,
    /// Accept `REATTACH` without a resume token (the original client never had one). Anyone who
    /// learns a session id can then take an empty seat in it, so this is off by default.
    pub allow_tokenless_reattach: bool,
    /// Share sessions with other relays through Redis (`--redis`); `None`: this relay alone.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// How often expired invites, idle sessions and full rate-limit buckets are swept.
    pub sweep_interval: Duration,
    /// On shutdown, how long connections get to receive their close frame.
    pub shutdown_grace: Duration,
    /// On shutdown, how long the relay goes on serving (health checks answering 503, so that
    /// a load balancer stops sending new clients) before it closes connections.
    pub drain_time: Duration,
    /// Serve `wss://` with this certificate (reloadable: [`crate::RelayHandle::reload_tls`]).
    pub tls: Option<std::sync::Arc<Tls>>,
    /// Connections from these networks are reverse proxies: the client address (for limits
    /// and logs) is the one their `Forwarded`/`X-Forwarded-For` header names.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header those proxies write the client's address in (the other is ignored).
    pub forwarded_header: crate::http::ForwardedHeader,
    /// Connections from one address (not a trusted proxy) that have not finished their
    /// upgrade yet: a slow or silent opening holds a slot for the handshake time limit, so
    /// this is kept far below `max_connections_per_address`.
    pub max_pending_per_address: usize,
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
            max_connections_per_address: limits::MAX_CONNECTIONS_PER_ADDRESS,
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
            mailbox_bytes_per_address: limits::MAILBOX_BYTES_PER_ADDRESS,
            secret: RelaySecret::random(),
            allow_tokenless_reattach: false,
            cluster: None,
            sweep_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(2),
            drain_time: Duration::ZERO,
            tls: None,
            trusted_proxies: Vec::new(),
            forwarded_header: crate::http::ForwardedHeader::XForwardedFor,
            max_pending_per_address: limits::MAX_PENDING_PER_ADDRESS,
        }
    }
}

impl RelayConfig {
    /// Refuses what cannot work (a zero interval would make a timer panic, zero queues or
    /// frames refuse everything); durations too large to add to the clock mean "never" and
    /// are accepted (see [`later`]). Checked once, when the relay is bound.
    pub fn validate(&self) -> io::Result<()> {
        let invalid = |what: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                what.to_string(),
            ))
        };
        for (name, value) in [
            ("ping interval", self.ping_interval),
            ("sweep interval", self.sweep_interval),
            ("idle timeout", self.idle_timeout),
            ("write timeout", self.write_timeout),
            ("handshake timeout", self.handshake_timeout),
        ] {
            if value.is_zero() {
                return invalid(&format!("the {name} must be more than zero"));
            }
        }
        for (name, value) in [
            ("frame size", self.max_frame_bytes),
            ("outbound queue (frames)", self.outbound_queue_frames),
            ("outbound queue (bytes)", self.outbound_queue_bytes),
            ("connections per relay", self.max_connections),
            ("connections per address", self.max_connections_per_address),
            (
                "opening connections per address",
                self.max_pending_per_address,
            ),
            ("sessions per connection", self.max_sessions_per_connection),
        ] {
            if value == 0 {
                return invalid(&format!("the {name} limit must be more than zero"));
            }
        }
        // Half a queue is what a mailbox hand-over may fill: a frame at least.
        if self.outbound_queue_frames < 2 {
            return invalid("the outbound queue must hold at least 2 frames");
        }
        if self.outbound_queue_bytes < self.max_frame_bytes.saturating_mul(2) {
            return invalid("the outbound queue must hold at least two frames of the largest size");
        }
        Ok(())
    }
}
