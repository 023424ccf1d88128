//! Default limits. Each is a relay option; protocol.md ("Limits") gives the reasoning.

use std::time::Duration;

/// Largest frame the relay reads (bytes of the WebSocket message).
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Invite codes: `INVITE_CODE_DIGITS` decimal digits, live for `INVITE_TTL`.
pub const INVITE_CODE_DIGITS: usize = 6;
pub const INVITE_TTL: Duration = Duration::from_secs(10 * 60);
/// Largest `INVITE_CREATE` parameter set the relay stores for a joiner (serialized bytes).
pub const MAX_INVITE_PARAMS_BYTES: usize = 4 * 1024;
/// A session none of whose members is connected is forgotten after this long.
pub const SESSION_IDLE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// An unpaired session whose host is gone is forgotten after this long (its invite is dead by
/// then too).
pub const UNPAIRED_SESSION_TTL: Duration = INVITE_TTL;
/// Sessions one connection may be a member of at once.
pub const MAX_SESSIONS_PER_CONNECTION: usize = 16;
/// Relay-wide caps.
pub const MAX_SESSIONS: usize = 1_000_000;
pub const MAX_CONNECTIONS: usize = 50_000;
/// Connections from one address (IPv4, or IPv6 /64) at once, upgraded or not, so that one
/// address cannot take every slot.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 1_024;
/// Of those, connections still in their TLS handshake or HTTP request (a slow opening holds
/// its slot for up to `HANDSHAKE_TIMEOUT`).
pub const MAX_PENDING_PER_ADDRESS: usize = 64;
/// Outbound queue per connection; a connection whose queue overflows is a slow consumer and is
/// disconnected.
pub const OUTBOUND_QUEUE_FRAMES: usize = 256;
pub const OUTBOUND_QUEUE_BYTES: usize = 1024 * 1024;
/// A write to a socket that makes no progress for this long disconnects it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The relay sends `PING` this often; a connection silent for `IDLE_TIMEOUT` is closed.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(35);
/// Failed `JOIN` attempts: a token bucket per connection and one per remote address (IPv4
/// address, or IPv6 /64). `BURST` failures are allowed at once, then one more per `REFILL`.
pub const JOIN_FAILURES_PER_CONNECTION_BURST: u32 = 5;
pub const JOIN_FAILURES_PER_CONNECTION_REFILL: Duration = Duration::from_secs(10);
pub const JOIN_FAILURES_PER_ADDRESS_BURST: u32 = 20;
pub const JOIN_FAILURES_PER_ADDRESS_REFILL: Duration = Duration::from_secs(6);
/// `CREATE_SESSION` per remote address: `BURST` at once, then one more per `REFILL`.
pub const SESSIONS_CREATED_PER_ADDRESS_BURST: u32 = 64;
pub const SESSIONS_CREATED_PER_ADDRESS_REFILL: Duration = Duration::from_secs(10);
/// A client that has not finished the WebSocket upgrade by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Mailbox for an offline member, per seat. Kept below the outbound queue so that a full
/// mailbox always fits into the queue of the connection that re-attaches.
pub const MAILBOX_FRAMES: usize = 200;
pub const MAILBOX_BYTES: usize = 512 * 1024;
pub const MAILBOX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// All mailboxes of a relay together.
pub const MAILBOX_TOTAL_BYTES: usize = 256 * 1024 * 1024;
/// What frames sent from one address (IPv4, or IPv6 /64) may hold of all mailboxes (and of
/// pending `JOIN_REQUEST`s), so that a few addresses cannot fill everyone's.
pub const MAILBOX_BYTES_PER_ADDRESS: usize = 4 * 1024 * 1024;
/// Largest `JOIN` data (serialized bytes) the relay keeps for the host until it answers.
pub const MAX_JOIN_DATA_BYTES: usize = MAX_INVITE_PARAMS_BYTES;
/// Longest restore proof accepted (hex).
pub const MAX_RESTORE_PROOF_CHARS: usize = 128;
