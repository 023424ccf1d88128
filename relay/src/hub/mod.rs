//! The relay's shared state and the connection-facing entry points: admit a connection, apply
//! one of its frames (each frame kind in its own module under `cmd`), hand over mailboxes as
//! its queue drains, forget it when it closes, and the periodic sweep.
//!
//! Everything here is synchronous: a frame is applied to the store and the resulting frames
//! are pushed onto connections' bounded outboxes, without awaiting anything. The async code in
//! `connection` only moves bytes between sockets and these calls, and acts on the [`Flow`]
//! each call returns.

mod session;
mod store;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use parley_protocol::payload::ErrorData;
use parley_protocol::{Envelope, ErrorCode, FrameError, FrameType, encode};
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Bytes, Utf8Bytes};

pub use session::Role;
pub(crate) use session::{PendingJoin, Seat, Session, SessionState};
pub(crate) use store::{Change, Connections, Sessions};

use crate::budget::Budget;
use crate::cluster::CodePool;
use crate::cmd;
use crate::config::{RelayConfig, later};
use crate::ids::{InviteCode, SessionId};
use crate::journal::{Journal, Recovered};
use crate::limiter::{
    AddressCounts, AddressKey, AddressLimiter, SharedLimit, SharedLimits, TokenBucket,
};
use crate::metrics::Metrics;
use crate::outbox::ConnId;
use crate::outbox::{Frame, Outbox};

/// Per-connection state, owned by the connection's task and passed to every call.
pub struct ConnState {
    pub(crate) outbox: Outbox,
    pub(crate) ip: IpAddr,
    pub(crate) address: AddressKey,
    /// Sessions this connection sits in. A cache: the seat's `conn` is the truth (another
    /// connection may have taken the seat over with the token), checked on every use.
    pub(crate) memberships: Vec<(SessionId, Role)>,
    pub(crate) join_failures: TokenBucket,
    pub(crate) metrics: Arc<Metrics>,
    /// In a cluster: an invite code reserved in the shared store for this connection's next
    /// `INVITE_CREATE` (taken before the frame is applied, so no other connection can take
    /// it meanwhile; kept for the next one if this one issues none).
    pub(crate) reserved_code: Option<InviteCode>,
}

impl ConnState {
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Queues a frame for this connection. On overflow the connection is already marked for
    /// dropping, so there is nobody left to tell.
    pub(crate) fn send(&self, frame: impl Into<Frame>) {
        let _ = self.outbox.push(frame);
    }

    pub(crate) fn send_error(&self, sid: Option<&str>, e: &FrameError, msg_id: Option<&RawValue>) {
        self.metrics.error_sent(e.code);
        self.send(error_frame(sid, e, msg_id));
    }

    pub(crate) fn role_in(&self, sid: SessionId) -> Option<Role> {
        self.memberships
            .iter()
            .find(|(s, _)| *s == sid)
            .map(|(_, r)| *r)
    }

    pub(crate) fn forget(&mut self, sid: SessionId) {
        self.memberships.retain(|(s, _)| *s != sid);
    }
}

/// What the connection's task should do about flow after a call, decided by the hub and
/// acted on by the task (which owns the socket and the timers).
#[derive(Default)]
#[must_use]
pub struct Flow {
    /// A peer's queue is congested: read nothing more until it has drained (backpressure).
    pub wait_for: Option<Outbox>,
    /// Mailboxed frames are still waiting to be handed to this connection: call
    /// [`Hub::hand_over`] again once its queue has room.
    pub hand_over_pending: bool,
    /// Read nothing more until this resolves (a cluster node whose peer is on another node:
    /// that node asked it to wait, see `cluster`).
    pub wait_until: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Flow {
    pub fn and(self, other: Flow) -> Flow {
        Flow {
            wait_for: self.wait_for.or(other.wait_for),
            hand_over_pending: self.hand_over_pending || other.hand_over_pending,
            wait_until: self.wait_until.or(other.wait_until),
        }
    }
}

/// Counts for tests and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub connections: usize,
    pub sessions: usize,
    pub invites: usize,
    pub rate_limited_addresses: usize,
    /// Bytes held in all mailboxes and pending join requests.
    pub mailbox_bytes: usize,
}

pub struct Hub {
    pub(crate) config: RelayConfig,
    pub(crate) sessions: Sessions,
    pub(crate) conns: Connections,
    /// Failed `JOIN`s per address.
    pub(crate) join_limiter: AddressLimiter,
    /// Sessions created (or re-created) per address.
    pub(crate) create_limiter: AddressLimiter,
    pub(crate) budget: Arc<Budget>,
    pub(crate) metrics: Arc<Metrics>,
    connections: AtomicUsize,
    /// The last connection id given out (connections and, in a cluster, proxies).
    last_conn_id: AtomicU64,
    connections_per_address: AddressCounts,
    /// Connections per address that have not finished their upgrade yet.
    openings_per_address: AddressCounts,
    /// Set on shutdown: health checks answer 503 and new connections are refused.
    draining: AtomicBool,
    /// In a cluster, where mailbox changes are mirrored (set once the node has joined).
    journal: OnceLock<Arc<dyn Journal>>,
    /// In a cluster, where the limiters' charges are counted across nodes too.
    shared_limits: OnceLock<Arc<dyn SharedLimits>>,
    /// In a cluster, the sessions the other nodes hold (from their heartbeats).
    others_sessions: AtomicUsize,
    /// Mailboxes read back from the journal for a session this node is about to re-create,
    /// taken by the re-creation (see `cmd::reattach`).
    recovered: DashMap<SessionId, Recovered>,
}

/// Sessions by state, for the metrics.
pub struct SessionStates {
    /// Nobody has joined yet.
    pub unpaired: usize,
    pub paired: usize,
    /// Re-created from one member's token; the other has not come back yet.
    pub awaiting_member: usize,
}

/// One admitted connection; dropping it frees its place.
pub struct ConnectionSlot {
    hub: Arc<Hub>,
    /// The address charged: `None` while the connection comes from a trusted proxy and has not
    /// said whom for yet.
    address: Option<AddressKey>,
    /// Charged as an opening (not upgraded yet) to this address, until [`Self::upgraded`].
    opening: Option<AddressKey>,
}

impl ConnectionSlot {
    /// Charges the connection to the client a trusted proxy named (or to the proxy itself),
    /// within that address's allowance; `false` if it has none left. A slot already charged
    /// to an address stays with it.
    pub fn assign(&mut self, ip: IpAddr) -> bool {
        if self.address.is_some() {
            return true;
        }
        let address = AddressKey::from(ip);
        if !self.hub.connections_per_address.try_add(address) {
            return false;
        }
        self.address = Some(address);
        true
    }

    /// The connection is a WebSocket now: it no longer counts as an opening.
    pub fn upgraded(&mut self) {
        if let Some(address) = self.opening.take() {
            self.hub.openings_per_address.remove(address);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.upgraded();
        self.hub.connections.fetch_sub(1, Ordering::AcqRel);
        if let Some(address) = self.address {
            self.hub.connections_per_address.remove(address);
        }
    }
}

impl Hub {
    pub fn new(mut config: RelayConfig) -> Hub {
        // A mailbox is handed over as its member's queue drains, so it need not fit that queue
        // at once; but one frame always must.
        config.mailbox.max_bytes = config.mailbox.max_bytes.max(config.max_frame_bytes);
        let codes = config
            .cluster
            .is_some()
            .then(|| Arc::new(CodePool::new(config.invite_ttl)));
        Hub {
            join_limiter: AddressLimiter::new(config.join_failures_per_address),
            create_limiter: AddressLimiter::new(config.sessions_created_per_address),
            budget: Budget::new(config.mailbox.total_bytes, config.mailbox_bytes_per_address),
            connections_per_address: AddressCounts::new(config.max_connections_per_address),
            openings_per_address: AddressCounts::new(config.max_pending_per_address),
            config,
            sessions: Sessions::new(codes),
            conns: Connections::default(),
            metrics: Arc::default(),
            connections: AtomicUsize::new(0),
            last_conn_id: AtomicU64::new(0),
            journal: OnceLock::new(),
            shared_limits: OnceLock::new(),
            others_sessions: AtomicUsize::new(0),
            recovered: DashMap::new(),
            draining: AtomicBool::new(false),
        }
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// A new connection id, never given out before by this process.
    pub fn next_conn_id(&self) -> ConnId {
        self.last_conn_id
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
    }

    /// Whether this node holds the session (in a cluster: it is at home here).
    pub fn holds_session(&self, sid: SessionId) -> bool {
        self.sessions.contains(sid)
    }

    /// Whether this node issued the invite code and still knows it.
    pub fn holds_invite(&self, code: InviteCode) -> bool {
        self.sessions.invite(code, |_| ()).is_some()
    }

    /// Whether a failed `JOIN` from this connection's address would still be allowed.
    pub fn join_allowed(&self, conn: &ConnState) -> bool {
        self.join_limiter.allows(conn.address, Instant::now())
    }

    /// Forgets one session without telling anyone (a cluster node that may not keep it); the
    /// connections that held its seats here.
    pub fn forget_session(&self, sid: SessionId) -> Vec<ConnId> {
        let Some(session) = self.sessions.remove(sid) else {
            return Vec::new();
        };
        let mut held: Vec<ConnId> = session.host.conn.into_iter().collect();
        held.extend(session.guest.as_ref().and_then(|g| g.conn));
        held
    }

    /// Forgets every session and invite at once, without telling anyone (not even the
    /// journal): a cluster node that must start afresh, see `cluster`.
    pub fn forget_all_sessions(&self) {
        self.sessions.retain(|_, _| false);
        self.sessions.retain_invites(|_| false);
    }

    /// The ids of the sessions held here.
    pub fn session_ids(&self) -> Vec<SessionId> {
        self.sessions.ids()
    }

    /// Mirrors every mailbox change to `journal` from now on (a cluster node, once joined).
    pub fn set_journal(&self, journal: Arc<dyn Journal>) {
        let _ = self.journal.set(journal);
    }

    /// Counts the limiters' charges across the cluster too, from now on.
    pub fn set_shared_limits(&self, shared: Arc<dyn SharedLimits>) {
        let _ = self.shared_limits.set(shared);
    }

    /// What the other nodes of the cluster hold: sessions, and mailbox bytes.
    pub fn set_others(&self, sessions: usize, mailbox_bytes: usize) {
        self.others_sessions.store(sessions, Ordering::Relaxed);
        self.budget.set_others(mailbox_bytes);
    }

    /// A `JOIN` guessed wrong: charged to its address (across the cluster too).
    pub(crate) fn charge_join_failure(&self, address: AddressKey) {
        self.join_limiter.charge(address, Instant::now());
        if let Some(shared) = self.shared_limits.get() {
            shared.charged(SharedLimit::JoinFailures, address);
        }
    }

    /// A session was created (or re-created) for this address (across the cluster too).
    pub(crate) fn charge_session_created(&self, address: AddressKey) {
        self.create_limiter.charge(address, Instant::now());
        if let Some(shared) = self.shared_limits.get() {
            shared.charged(SharedLimit::SessionsCreated, address);
        }
    }

    pub fn journal(&self) -> Option<&dyn Journal> {
        self.journal.get().map(|j| &**j)
    }

    /// Keeps a session's journaled mailboxes for its re-creation by the next frame applied.
    pub fn stash_recovered(&self, sid: SessionId, recovered: Recovered) {
        self.recovered.insert(sid, recovered);
    }

    /// What [`Self::stash_recovered`] kept for `sid`, if it is still there.
    pub fn take_recovered(&self, sid: SessionId) -> Option<Recovered> {
        self.recovered.remove(&sid).map(|(_, r)| r)
    }

    /// In a cluster, the invite codes reserved for this node.
    pub fn code_pool(&self) -> Option<Arc<CodePool>> {
        self.sessions.code_pool()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn session_states(&self) -> SessionStates {
        SessionStates {
            unpaired: self.sessions.count(SessionState::Unpaired),
            paired: self.sessions.count(SessionState::Paired),
            awaiting_member: self.sessions.count(SessionState::AwaitingMember),
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            connections: self.connections.load(Ordering::Relaxed),
            sessions: self.sessions.len(),
            invites: self.sessions.invite_count(),
            rate_limited_addresses: self.join_limiter.len(),
            mailbox_bytes: self.budget.total(),
        }
    }

    /// Counts a new connection in, unless the relay is at `max_connections` or its address at
    /// `max_connections_per_address`. A connection from a trusted proxy is charged to an
    /// address only once it has said whom it is for ([`ConnectionSlot::assign`]). The counts
    /// go down when the slot is dropped.
    ///
    /// An address (not a trusted proxy) may also hold only `max_pending_per_address`
    /// connections that have not finished their upgrade: slow openings cost little each but
    /// hold their slot for the handshake time limit.
    pub fn admit_connection(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let from_proxy = crate::http::trusted(&self.config.trusted_proxies, ip);
        let max = self.config.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        // From here on, a refused slot gives back what it holds as it drops.
        let mut slot = ConnectionSlot {
            hub: self.clone(),
            address: None,
            opening: None,
        };
        if from_proxy {
            return Some(slot);
        }
        let address = AddressKey::from(ip);
        if !self.openings_per_address.try_add(address) {
            return None;
        }
        slot.opening = Some(address);
        slot.assign(ip).then_some(slot)
    }

    /// The state for a connection that has finished its upgrade; its outbox is reachable by
    /// id from now until [`disconnect`](Self::disconnect).
    pub fn attach(&self, outbox: Outbox, ip: IpAddr) -> ConnState {
        self.conns.add(outbox.clone());
        ConnState {
            outbox,
            ip,
            address: AddressKey::from(ip),
            memberships: Vec::new(),
            join_failures: TokenBucket::full(
                self.config.join_failures_per_connection,
                Instant::now(),
            ),
            metrics: self.metrics.clone(),
            reserved_code: None,
        }
    }

    /// Applies one text frame from a connection. Never fails: a refused frame gets an `ERROR`
    /// back on the same connection, which stays usable.
    pub fn handle(&self, conn: &mut ConnState, frame: &Utf8Bytes) -> Flow {
        match Envelope::parse(frame.as_str()) {
            Ok(env) => self.handle_parsed(conn, &env, frame),
            Err(e) => {
                self.metrics.frame_received(None, frame.len());
                conn.send_error(None, &e, None);
                Flow::default()
            }
        }
    }

    /// [`Self::handle`] for a frame already parsed as `env` (a cluster node parses it first,
    /// to see where it goes).
    pub fn handle_parsed(
        &self,
        conn: &mut ConnState,
        env: &Envelope<'_>,
        frame: &Utf8Bytes,
    ) -> Flow {
        self.metrics.frame_received(Some(env.kind), frame.len());
        let result = match env.kind {
            FrameType::CreateSession => cmd::create_session::handle(self, conn),
            FrameType::InviteCreate => cmd::invite_create::handle(self, conn, env),
            FrameType::Join => cmd::join::handle(self, conn, env),
            FrameType::JoinAccept | FrameType::JoinDeny => {
                cmd::join_answer::handle(self, conn, env)
            }
            FrameType::Msg => return cmd::forward::handle_msg(self, conn, env, frame),
            FrameType::MsgRead => cmd::forward::handle(self, conn, env, frame),
            FrameType::Reattach | FrameType::Restore => cmd::reattach::handle(self, conn, env),
            FrameType::Ping => {
                conn.send(encode::<()>(FrameType::Pong, None, None));
                Ok(Flow::default())
            }
            FrameType::Pong => Ok(Flow::default()),
            relay_only => Err(FrameError::new(
                ErrorCode::UnknownType,
                format!("{relay_only} is sent only by the relay"),
            )),
        };
        result.unwrap_or_else(|e| {
            tracing::debug!(frame = %env.kind, code = %e.code, "frame refused");
            conn.send_error(env.sid(), &e, None);
            Flow::default()
        })
    }

    /// Applies one binary `DATA` frame (a binary message whose first byte is 0x01) from a
    /// connection: forwarded live to the other member, or dropped; never kept. A refused
    /// frame gets an `ERROR` back.
    pub fn handle_data(&self, conn: &mut ConnState, frame: &Bytes) -> Flow {
        cmd::data::handle(self, conn, frame)
    }

    /// Moves mailboxed frames to this connection's queue while it has room (half of it, so
    /// replies and pings always fit), for every seat it holds. Pending if any are left.
    pub fn hand_over(&self, conn: &ConnState) -> Flow {
        let mut flow = Flow::default();
        for &(sid, role) in &conn.memberships {
            let pending =
                self.sessions
                    .update(sid, &self.conns, |session| match session.seat(role) {
                        Some(seat)
                            if seat.held_by(conn.outbox.id()) && !seat.mailbox.is_empty() =>
                        {
                            Ok(cmd::reattach::HandOver {
                                sid,
                                role,
                                outbox: &conn.outbox,
                                journal: self.journal(),
                            })
                        }
                        _ => Err(FrameError::new(
                            ErrorCode::NotMember,
                            "nothing to hand over",
                        )),
                    });
            if let Some(Ok(true)) = pending {
                flow.hand_over_pending = true;
            }
        }
        flow
    }

    /// The connection closed: free its seats and tell the peers.
    pub fn disconnect(&self, conn: &ConnState) {
        let now = Instant::now();
        let id = conn.outbox.id();
        for &(sid, role) in &conn.memberships {
            let _ = self.sessions.update(sid, &self.conns, |session| {
                match session.seat(role) {
                    Some(seat) if seat.held_by(id) => Ok(cmd::reattach::Leave { sid, role, now }),
                    // Taken over by another connection meanwhile.
                    _ => Err(FrameError::new(ErrorCode::NotMember, "seat not held")),
                }
            });
        }
        self.conns.remove(id);
    }

    /// Forgets expired invites, idle sessions and refilled rate-limit buckets.
    pub fn sweep(&self, now: Instant) {
        // A used or expired code is kept as a tombstone for one more TTL, so a late joiner hears
        // "used" or "expired" rather than "unknown", and the number is not handed out again
        // while people may still be reading it out.
        let ttl = self.config.invite_ttl;
        self.sessions
            .retain_invites(|invite| later(invite.expires_at, ttl) > now);
        let journal = self.journal();
        self.sessions.retain(|sid, session| {
            // A session with both members known is kept long; one that nobody joined, or that
            // was re-created and whose other member never came back, only while it could
            // still be completed.
            let ttl = if session.is_established() {
                self.config.session_idle_ttl
            } else {
                self.config.unpaired_session_ttl
            };
            let keep = session
                .idle_since
                .is_none_or(|since| later(since, ttl) > now);
            if keep {
                let max_age = self.config.mailbox.max_age;
                let expired = session.host.mailbox.expire(now, max_age);
                if let Some(journal) = journal.filter(|_| expired > 0) {
                    journal.removed(sid, Role::Host, expired);
                }
                if let Some(guest) = &mut session.guest {
                    let expired = guest.mailbox.expire(now, max_age);
                    if let Some(journal) = journal.filter(|_| expired > 0) {
                        journal.removed(sid, Role::Guest, expired);
                    }
                }
            } else if let Some(journal) = journal {
                journal.forgotten(sid);
            }
            keep
        });
        self.join_limiter.sweep(now);
        self.create_limiter.sweep(now);
    }

    /// Drops memberships whose seat this connection no longer holds (taken over, or denied),
    /// so they neither count against the cap nor look like a seat held.
    pub(crate) fn prune_memberships(&self, conn: &mut ConnState) {
        let id = conn.outbox.id();
        conn.memberships.retain(|(sid, role)| {
            self.sessions
                .read(*sid, |s| s.seat(*role).is_some_and(|seat| seat.held_by(id)))
                .unwrap_or(false)
        });
    }

    pub(crate) fn check_membership_room(&self, conn: &ConnState) -> Result<(), FrameError> {
        if conn.memberships.len() >= self.config.max_sessions_per_connection {
            return Err(FrameError::new(
                ErrorCode::TooManySessions,
                "this connection is in too many sessions; use another connection",
            ));
        }
        Ok(())
    }

    /// Whether a new session may be created for this connection (by `CREATE_SESSION`, or
    /// re-created from a token): within the relay's cap and the address's allowance. Only
    /// checks: the caller charges the allowance once the session exists.
    pub(crate) fn check_session_room(&self, conn: &ConnState) -> Result<(), FrameError> {
        let cluster_wide = self
            .sessions
            .len()
            .saturating_add(self.others_sessions.load(Ordering::Relaxed));
        if cluster_wide >= self.config.max_sessions {
            return Err(FrameError::new(
                ErrorCode::RelayFull,
                "the relay holds its maximum number of sessions; try again later",
            ));
        }
        if !self.create_limiter.allows(conn.address, Instant::now()) {
            return Err(FrameError::new(
                ErrorCode::RateLimited,
                "too many sessions created from this address; wait a minute and try again",
            ));
        }
        Ok(())
    }

    /// Decides on and changes a session this connection is a member of, under one lock:
    /// the session `sid` names, if this connection still holds its seat there (a seat taken
    /// over by another connection is dropped from this connection's memberships here).
    pub(crate) fn member_update<C: Change>(
        &self,
        conn: &mut ConnState,
        env: &Envelope<'_>,
        decide: impl FnOnce(&Session, Role, SessionId) -> Result<C, FrameError>,
    ) -> Result<(SessionId, C::Output), FrameError> {
        let sid = SessionId::parse(env.require_sid()?).ok_or_else(not_member)?;
        self.member_update_sid(conn, sid, decide)
            .map(|output| (sid, output))
    }

    /// [`Self::member_update`] for the session `sid`.
    pub(crate) fn member_update_sid<C: Change>(
        &self,
        conn: &mut ConnState,
        sid: SessionId,
        decide: impl FnOnce(&Session, Role, SessionId) -> Result<C, FrameError>,
    ) -> Result<C::Output, FrameError> {
        let role = conn.role_in(sid).ok_or_else(not_member)?;
        let id = conn.outbox.id();
        let mut held = true;
        let result = self.sessions.update(sid, &self.conns, |session| {
            held = session.seat(role).is_some_and(|seat| seat.held_by(id));
            if !held {
                return Err(not_member());
            }
            decide(session, role, sid)
        });
        match result {
            Some(Ok(output)) => Ok(output),
            Some(Err(e)) if held => Err(e),
            _ => {
                conn.forget(sid);
                Err(not_member())
            }
        }
    }
}

pub(crate) fn not_member() -> FrameError {
    FrameError::new(
        ErrorCode::NotMember,
        "you are not a member of this session; send REATTACH with your resume token first",
    )
}

pub(crate) fn error_frame(sid: Option<&str>, e: &FrameError, msg_id: Option<&RawValue>) -> String {
    // Echo the sid only when it has a session id's form: never reflect arbitrary input.
    let sid = sid.filter(|s| SessionId::parse(s).is_some());
    let data = ErrorData {
        code: e.code.as_str().into(),
        message: e.message.as_str().into(),
        msg_id,
    };
    encode(FrameType::Error, sid, Some(&data))
}

#[cfg(test)]
mod tests;
