//! The relay's shared state and what each client frame does to it.
//!
//! Everything here is synchronous: a frame is applied to the session maps and the resulting
//! frames are pushed onto connections' bounded outboxes, without awaiting anything. The async
//! code in `connection` only moves bytes between sockets and these calls.
//!
//! Locking: `sessions` and `invites` are sharded maps. A thread never holds an entry of one map
//! while locking an entry of the other (so no lock-order cycle exists), and never holds one
//! across an `.await` (there are none in this module).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use dashmap::mapref::one::RefMut;
use parley_protocol::payload::{
    DeliveredData, ErrorData, InviteCodeData, MsgData, OpaqueData, ReattachData, RestoreData,
    ResumeTokenData,
};
use parley_protocol::{Envelope, ErrorCode, FrameError, FrameType, encode};
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::config::{RelayConfig, later};
use crate::ids::{ClientId, InviteCode, ResumeToken, SessionId};
use crate::limiter::{AddressKey, AddressLimiter, TokenBucket};
use crate::mailbox::Mailbox;
use crate::outbox::{ConnId, Outbox};

/// A member's place in a two-party session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Host,
    Guest,
}

impl Role {
    fn other(self) -> Role {
        match self {
            Role::Host => Role::Guest,
            Role::Guest => Role::Host,
        }
    }
}

struct Seat {
    /// `None` only in a restored session, until the member who owns the seat comes back with
    /// its token (see `restore`).
    token: Option<ResumeToken>,
    client_id: ClientId,
    /// The connection sitting in this seat, if any.
    conn: Option<Outbox>,
    /// Frames for this seat's member while it is offline.
    mailbox: Mailbox,
}

impl Seat {
    fn new(conn: &Outbox, mailbox: Mailbox) -> Seat {
        Seat {
            token: Some(ResumeToken::random()),
            client_id: ClientId::random(),
            conn: Some(conn.clone()),
            mailbox,
        }
    }

    fn held_by(&self, id: ConnId) -> bool {
        self.conn.as_ref().is_some_and(|c| c.id() == id)
    }

    fn token_matches(&self, presented: &str) -> bool {
        self.token.as_ref().is_some_and(|t| t.matches(presented))
    }

    /// The issued token, for the frame that hands it to the member.
    fn token_wire(&self) -> String {
        self.token
            .as_ref()
            .map(ResumeToken::to_wire)
            .unwrap_or_default()
    }
}

struct Session {
    host: Seat,
    guest: Option<Seat>,
    /// The invite most recently issued for this session (it may since have expired).
    invite: Option<InviteCode>,
    /// What the host stored with `INVITE_CREATE`, handed to the joiner in the first `JOINED`.
    invite_params: Option<OpaqueData>,
    /// The `JOIN_REQUEST` until the host answers it: pushed to the host at `JOIN`, and again
    /// on each host `REATTACH`, so a host whose connection was silently dead still gets it.
    pending_join_request: Option<Utf8Bytes>,
    /// Since when no member has been connected.
    idle_since: Option<Instant>,
    /// Set when the session was re-created by `RESTORE` after the relay forgot it: what the
    /// other member must present to take its seat.
    restore_proof: Option<String>,
}

impl Session {
    fn seat(&self, role: Role) -> Option<&Seat> {
        match role {
            Role::Host => Some(&self.host),
            Role::Guest => self.guest.as_ref(),
        }
    }

    fn seat_mut(&mut self, role: Role) -> Option<&mut Seat> {
        match role {
            Role::Host => Some(&mut self.host),
            Role::Guest => self.guest.as_mut(),
        }
    }

    fn anyone_connected(&self) -> bool {
        self.host.conn.is_some() || self.guest.as_ref().is_some_and(|g| g.conn.is_some())
    }
}

struct Invite {
    sid: SessionId,
    expires_at: Instant,
    used: bool,
}

/// Per-connection state, owned by the connection's task and passed to every call.
pub struct ConnState {
    outbox: Outbox,
    address: AddressKey,
    /// Sessions this connection sits in. A cache: the seat's `conn` is the truth (another
    /// connection may have taken the seat over with the token), checked on every use.
    memberships: Vec<(SessionId, Role)>,
    join_failures: TokenBucket,
    /// A peer whose queue a forward found congested: the connection reads nothing more until
    /// it has drained (backpressure, see `outbox`).
    congested_peer: Option<Outbox>,
}

impl ConnState {
    pub fn new(outbox: Outbox, ip: IpAddr, config: &RelayConfig) -> ConnState {
        ConnState {
            outbox,
            address: AddressKey::from(ip),
            memberships: Vec::new(),
            join_failures: TokenBucket::full(config.join_failures_per_connection, Instant::now()),
            congested_peer: None,
        }
    }

    pub fn has_congested_peer(&self) -> bool {
        self.congested_peer.is_some()
    }

    pub fn take_congested_peer(&mut self) -> Option<Outbox> {
        self.congested_peer.take()
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Queues a frame for this connection. On overflow the connection is already marked for
    /// dropping, so there is nobody left to tell.
    fn send(&self, frame: String) {
        let _ = self.outbox.push(frame);
    }

    fn role_in(&self, sid: SessionId) -> Option<Role> {
        self.memberships
            .iter()
            .find(|(s, _)| *s == sid)
            .map(|(_, r)| *r)
    }

    fn forget(&mut self, sid: SessionId) {
        self.memberships.retain(|(s, _)| *s != sid);
    }
}

/// Counts for tests and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub connections: usize,
    pub sessions: usize,
    pub invites: usize,
    pub rate_limited_addresses: usize,
    /// Bytes held in all mailboxes.
    pub mailbox_bytes: usize,
}

pub struct Hub {
    config: RelayConfig,
    sessions: DashMap<SessionId, Session>,
    invites: DashMap<InviteCode, Invite>,
    /// Failed `JOIN`s per address.
    address_limiter: AddressLimiter,
    /// `CREATE_SESSION`s per address.
    create_limiter: AddressLimiter,
    connections: AtomicUsize,
    /// Bytes in all mailboxes, shared with each of them.
    mailbox_bytes: Arc<AtomicUsize>,
}

/// One admitted connection; dropping it frees the place.
pub struct ConnectionSlot(Arc<Hub>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

type Refusal = FrameError;

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    FrameError::new(code, message)
}

fn not_member() -> Refusal {
    refuse(
        ErrorCode::NotMember,
        "you are not a member of this session; send REATTACH with your resume token first",
    )
}

/// How many random codes to try before calling the code space full.
const INVITE_CODE_ATTEMPTS: usize = 16;

impl Hub {
    pub fn new(mut config: RelayConfig) -> Hub {
        // A full mailbox must fit into the queue of the connection that re-attaches (with room
        // for the answer and the peer's traffic), or handing it over would drop that connection.
        let mailbox = &mut config.mailbox;
        mailbox.max_frames = mailbox
            .max_frames
            .min(config.outbound_queue_frames.saturating_sub(16));
        mailbox.max_bytes = mailbox.max_bytes.min(
            config
                .outbound_queue_bytes
                .saturating_sub(2 * config.max_frame_bytes),
        );
        Hub {
            address_limiter: AddressLimiter::new(config.join_failures_per_address),
            create_limiter: AddressLimiter::new(config.sessions_created_per_address),
            config,
            sessions: DashMap::new(),
            invites: DashMap::new(),
            connections: AtomicUsize::new(0),
            mailbox_bytes: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    pub fn stats(&self) -> Stats {
        Stats {
            connections: self.connections.load(Ordering::Relaxed),
            sessions: self.sessions.len(),
            invites: self.invites.len(),
            rate_limited_addresses: self.address_limiter.len(),
            mailbox_bytes: self.mailbox_bytes.load(Ordering::Relaxed),
        }
    }

    /// Counts a new connection in, unless the relay is at `max_connections`. The count goes
    /// down when the returned slot is dropped.
    pub fn admit_connection(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let max = self.config.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.clone()))
    }

    /// Applies one text frame from a connection. Never fails: a refused frame gets an `ERROR`
    /// back on the same connection, which stays usable.
    pub fn handle(&self, conn: &mut ConnState, frame: &Utf8Bytes) {
        let env = match Envelope::parse(frame.as_str()) {
            Ok(env) => env,
            Err(e) => return send_error(conn, None, &e, None),
        };
        let result = match env.kind {
            FrameType::CreateSession => self.create_session(conn),
            FrameType::InviteCreate => self.invite_create(conn, &env),
            FrameType::Join => self.join(conn, &env),
            FrameType::JoinAccept => self.answer_join(conn, &env, FrameType::Joined),
            FrameType::JoinDeny => self.answer_join(conn, &env, FrameType::JoinDenied),
            FrameType::Msg => return self.msg(conn, &env, frame),
            FrameType::MsgRead => self.forward_to_peer(conn, &env, frame),
            FrameType::Reattach => self.reattach(conn, &env),
            FrameType::Restore => self.restore(conn, &env),
            FrameType::Ping => {
                conn.send(encode::<()>(FrameType::Pong, None, None));
                Ok(())
            }
            FrameType::Pong => Ok(()),
            relay_only => Err(refuse(
                ErrorCode::UnknownType,
                format!("{relay_only} is sent only by the relay"),
            )),
        };
        if let Err(e) = result {
            tracing::debug!(frame = %env.kind, code = %e.code, "frame refused");
            send_error(conn, env.sid(), &e, None);
        }
    }

    fn create_session(&self, conn: &mut ConnState) -> Result<(), Refusal> {
        self.prune_memberships(conn);
        self.check_membership_room(conn)?;
        self.admit_new_session(conn, self.sessions.len() >= self.config.max_sessions)?;
        let host = Seat::new(&conn.outbox, self.mailbox());
        let token = host.token_wire();
        let session = Session {
            host,
            guest: None,
            invite: None,
            invite_params: None,
            pending_join_request: None,
            idle_since: None,
            restore_proof: None,
        };
        let sid = loop {
            // 128 random bits: a collision is astronomically unlikely, but cheap to rule out.
            let sid = SessionId::random();
            if let Entry::Vacant(slot) = self.sessions.entry(sid) {
                slot.insert(session);
                break sid;
            }
        };
        conn.memberships.push((sid, Role::Host));
        tracing::info!(session = %sid.tag(), "session created");
        let data = ResumeTokenData {
            resume_token: token,
        };
        conn.send(encode(
            FrameType::SessionCreated,
            Some(&sid.to_string()),
            Some(&data),
        ));
        Ok(())
    }

    fn invite_create(&self, conn: &mut ConnState, env: &Envelope<'_>) -> Result<(), Refusal> {
        let params = invite_params(env)?;
        let now = Instant::now();

        // Read what the session has, then let go of it before touching `invites`.
        let (sid, current) = {
            let (sid, role, session) = self.member_session(conn, env)?;
            if role != Role::Host {
                return Err(refuse(
                    ErrorCode::HostOnly,
                    "only the session's host can create an invite",
                ));
            }
            if session.guest.is_some() {
                return Err(refuse(
                    ErrorCode::SessionFull,
                    "someone has already joined this session",
                ));
            }
            (sid, session.invite)
        };
        let live = current.and_then(|code| {
            let invite = self.invites.get(&code)?;
            (invite.sid == sid && !invite.used && invite.expires_at > now)
                .then(|| (code, invite.expires_at))
        });

        match (live, params) {
            // The original client's second INVITE_CREATE: store its parameters, answer nothing.
            (Some(_), Some(params)) => {
                let mut session = self.sessions.get_mut(&sid).ok_or_else(not_member)?;
                session.invite_params = Some(params);
                Ok(())
            }
            (Some((code, expires_at)), None) => {
                send_invite_code(
                    conn,
                    sid,
                    code,
                    expires_at.saturating_duration_since(now).as_secs(),
                );
                Ok(())
            }
            (None, params) => {
                let expires_at = later(now, self.config.invite_ttl);
                let code = self.new_invite(sid, expires_at)?;
                // Someone may have joined (with an older code) while no lock was held.
                let joined_meanwhile = match self.sessions.get_mut(&sid) {
                    Some(mut session) if session.guest.is_none() => {
                        session.invite = Some(code);
                        if params.is_some() {
                            session.invite_params = params;
                        }
                        false
                    }
                    _ => true,
                };
                if joined_meanwhile {
                    self.invites.remove(&code);
                    return Err(refuse(
                        ErrorCode::SessionFull,
                        "someone has already joined this session",
                    ));
                }
                tracing::info!(session = %sid.tag(), "invite created");
                send_invite_code(conn, sid, code, self.config.invite_ttl.as_secs());
                Ok(())
            }
        }
    }

    fn new_invite(&self, sid: SessionId, expires_at: Instant) -> Result<InviteCode, Refusal> {
        for _ in 0..INVITE_CODE_ATTEMPTS {
            let code = InviteCode::random();
            if let Entry::Vacant(slot) = self.invites.entry(code) {
                slot.insert(Invite {
                    sid,
                    expires_at,
                    used: false,
                });
                return Ok(code);
            }
        }
        Err(refuse(
            ErrorCode::RelayFull,
            "the relay has too many live invite codes; try again later",
        ))
    }

    fn join(&self, conn: &mut ConnState, env: &Envelope<'_>) -> Result<(), Refusal> {
        let now = Instant::now();
        // Checked first, before the code is even read, so a limited guesser learns nothing,
        // even when the guess is right.
        let limit = self.config.join_failures_per_connection;
        if !conn.join_failures.allows(limit, now) || !self.address_limiter.allows(conn.address, now)
        {
            return Err(refuse(
                ErrorCode::RateLimited,
                "too many failed join attempts from this connection or address; wait a minute and try again",
            ));
        }
        let mut rest: OpaqueData = env.data()?;
        let code = rest
            .take_string("code")?
            .ok_or_else(|| FrameError::missing("data.code"))?;
        let code = InviteCode::parse(&code).ok_or_else(|| {
            FrameError::invalid(
                "data.code",
                "must be the 6 digits before the dash in the invite code",
            )
        })?;
        self.prune_memberships(conn);
        self.check_membership_room(conn)?;

        let sid = match self.claim_invite(code, now, conn) {
            Ok(sid) => sid,
            Err(refusal) => {
                // Only guesses count: a wrong, spent or stale code.
                if matches!(
                    refusal.code,
                    ErrorCode::InviteUnknown | ErrorCode::InviteUsed | ErrorCode::InviteExpired
                ) {
                    conn.join_failures.charge(limit, now);
                    self.address_limiter.charge(conn.address, now);
                }
                return Err(refusal);
            }
        };

        let mut session = self.sessions.get_mut(&sid).ok_or_else(|| {
            refuse(
                ErrorCode::InviteUnknown,
                "this invite's session has ended; ask for a new code",
            )
        })?;
        if session.guest.is_some() {
            return Err(refuse(
                ErrorCode::SessionFull,
                "this session already has two members",
            ));
        }
        let guest = Seat::new(&conn.outbox, self.mailbox());
        let client_id = guest.client_id;
        let token = guest.token_wire();
        session.guest = Some(guest);
        session.invite = None;
        session.idle_since = None;

        // To the host: everything the joiner sent except the code, plus who it is.
        rest.set_string("clientID", &client_id.to_string());
        let join_request: Utf8Bytes =
            encode(FrameType::JoinRequest, Some(&sid.to_string()), Some(&rest)).into();
        if let Some(host) = &session.host.conn {
            let _ = host.push(join_request.clone());
        }
        session.pending_join_request = Some(join_request);

        // To the joiner: the host's stored parameters, plus its own resume token.
        let mut joined = session.invite_params.take().unwrap_or_default();
        joined.set_string("resumeToken", &token);
        drop(session);
        conn.memberships.push((sid, Role::Guest));
        tracing::info!(session = %sid.tag(), "guest joined");
        conn.send(encode(
            FrameType::Joined,
            Some(&sid.to_string()),
            Some(&joined),
        ));
        Ok(())
    }

    /// Marks a live invite used and returns its session, or says why it cannot be used.
    fn claim_invite(
        &self,
        code: InviteCode,
        now: Instant,
        conn: &ConnState,
    ) -> Result<SessionId, Refusal> {
        let mut invite = self.invites.get_mut(&code).ok_or_else(|| {
            refuse(
                ErrorCode::InviteUnknown,
                "no session has this invite code; check the digits before the dash",
            )
        })?;
        if invite.used {
            return Err(refuse(
                ErrorCode::InviteUsed,
                "this invite code has already been used; ask for a new one",
            ));
        }
        if invite.expires_at <= now {
            return Err(refuse(
                ErrorCode::InviteExpired,
                "this invite code has expired; ask for a new one",
            ));
        }
        // Checked before the code is spent. (After a take-over the membership cache may be stale;
        // then this refuses a join that could have worked, which costs nothing.)
        if conn.role_in(invite.sid).is_some() {
            return Err(already_member());
        }
        invite.used = true;
        Ok(invite.sid)
    }

    /// `JOIN_ACCEPT` -> `JOINED`, `JOIN_DENY` -> `JOIN_DENIED` (and the joiner loses its seat).
    fn answer_join(
        &self,
        conn: &mut ConnState,
        env: &Envelope<'_>,
        answer: FrameType,
    ) -> Result<(), Refusal> {
        let mut rest: OpaqueData = env.data()?;
        let (sid, role, mut session) = self.member_session(conn, env)?;
        if role != Role::Host {
            return Err(refuse(
                ErrorCode::HostOnly,
                format!("only the session's host can send {}", env.kind),
            ));
        }
        let client_id = rest
            .take_string("clientID")?
            .ok_or_else(|| FrameError::missing("data.clientID"))?;
        // Only the relay hands out resume tokens: never let one through from the host.
        rest.remove("resumeToken");
        let guest = session
            .guest
            .as_ref()
            .filter(|g| g.client_id.to_string() == client_id)
            .ok_or_else(|| {
                refuse(
                    ErrorCode::UnknownClient,
                    "no joiner with this clientID is in the session",
                )
            })?;
        let frame = encode(answer, Some(&sid.to_string()), Some(&rest));
        let delivered = guest.conn.as_ref().is_some_and(|g| g.push(frame).is_ok());
        session.pending_join_request = None;
        if answer == FrameType::JoinDenied {
            session.guest = None;
            tracing::info!(session = %sid.tag(), "joiner denied");
        }
        if !delivered && answer == FrameType::Joined {
            return Err(refuse(
                ErrorCode::PeerOffline,
                "the joiner is not connected; it was not told",
            ));
        }
        Ok(())
    }

    fn msg(&self, conn: &mut ConnState, env: &Envelope<'_>, frame: &Utf8Bytes) {
        let data = match env.data::<MsgData>() {
            Ok(data) => data,
            Err(e) => return send_error(conn, env.sid(), &e, None),
        };
        let msg_id = match data.validate() {
            Ok(id) => id,
            Err(e) => return send_error(conn, env.sid(), &e, data.echoable_id()),
        };
        match self.forward_to_peer(conn, env, frame) {
            Ok(()) => {
                let data = DeliveredData { msg_id };
                conn.send(encode(FrameType::Delivered, env.sid(), Some(&data)));
            }
            Err(e) => send_error(conn, env.sid(), &e, Some(msg_id)),
        }
    }

    /// Sends the frame, byte for byte, to the other member of the session.
    fn forward_to_peer(
        &self,
        conn: &mut ConnState,
        env: &Envelope<'_>,
        frame: &Utf8Bytes,
    ) -> Result<(), Refusal> {
        let (_, role, mut session) = self.member_session(conn, env)?;
        let peer = session
            .seat_mut(role.other())
            .ok_or_else(|| refuse(ErrorCode::NotPaired, "nobody has joined this session yet"))?;
        if let Some(online) = &peer.conn
            && online.push(frame.clone()).is_ok()
        {
            if online.is_congested() {
                conn.congested_peer = Some(online.clone());
            }
            return Ok(());
        }
        // Offline, or being dropped as a slow consumer: keep it for the peer's return.
        peer.mailbox
            .push(frame.clone(), Instant::now(), &self.config.mailbox)
            .map_err(|_| {
                refuse(
                    ErrorCode::MailboxFull,
                    "your peer is offline and its mailbox is full; keep the message and send it again when the peer is back",
                )
            })
    }

    fn mailbox(&self) -> Mailbox {
        Mailbox::new(self.mailbox_bytes.clone())
    }

    fn reattach(&self, conn: &mut ConnState, env: &Envelope<'_>) -> Result<(), Refusal> {
        let sid_text = env.require_sid()?;
        let unknown = || {
            refuse(
                ErrorCode::SessionUnknown,
                "the relay does not know this session (it expired or the relay restarted)",
            )
        };
        let sid = SessionId::parse(sid_text).ok_or_else(unknown)?;
        let ReattachData { resume_token } = env.data()?;
        self.prune_memberships(conn);

        let mut session = self.sessions.get_mut(&sid).ok_or_else(unknown)?;
        let role = match resume_token {
            Some(token) => [Role::Host, Role::Guest]
                .into_iter()
                .find(|r| session.seat(*r).is_some_and(|s| s.token_matches(&token)))
                .ok_or_else(|| {
                    refuse(
                        ErrorCode::TokenInvalid,
                        "wrong resume token for this session",
                    )
                })?,
            None if self.config.allow_tokenless_reattach => [Role::Host, Role::Guest]
                .into_iter()
                .find(|r| session.seat(*r).is_some_and(|s| s.conn.is_none()))
                .ok_or_else(|| {
                    refuse(
                        ErrorCode::SessionFull,
                        "both seats of this session are taken",
                    )
                })?,
            None => {
                return Err(refuse(
                    ErrorCode::TokenInvalid,
                    "REATTACH needs data.resumeToken",
                ));
            }
        };
        self.take_seat(conn, &mut session, sid, role)?;
        drop(session);
        tracing::info!(session = %sid.tag(), ?role, "member reattached");
        Ok(())
    }

    /// `RESTORE`: the relay forgot the session (it restarted, or the session expired). The
    /// first member back re-creates it with its own token and a proof both members derived at
    /// pairing; the other member takes its seat by presenting the same proof with its token.
    fn restore(&self, conn: &mut ConnState, env: &Envelope<'_>) -> Result<(), Refusal> {
        let sid = SessionId::parse(env.require_sid()?)
            .ok_or_else(|| FrameError::invalid("sid", "must be 32 lowercase hex digits"))?;
        let RestoreData {
            role,
            resume_token,
            proof,
        } = env.data()?;
        let role = match role.as_deref() {
            Some("host") => Role::Host,
            Some("guest") => Role::Guest,
            Some(_) => {
                return Err(FrameError::invalid(
                    "data.role",
                    "must be \"host\" or \"guest\"",
                ));
            }
            None => return Err(FrameError::missing("data.role")),
        };
        let token_text = resume_token.ok_or_else(|| FrameError::missing("data.resumeToken"))?;
        if ResumeToken::from_wire(&token_text).is_none() {
            return Err(FrameError::invalid(
                "data.resumeToken",
                "must be 64 hex digits",
            ));
        }
        let proof = proof.ok_or_else(|| FrameError::missing("data.proof"))?;
        if proof.is_empty() || proof.len() > parley_protocol::limits::MAX_RESTORE_PROOF_CHARS {
            return Err(FrameError::invalid(
                "data.proof",
                "must be 1 to 128 characters",
            ));
        }
        self.prune_memberships(conn);
        let refused = || {
            refuse(
                ErrorCode::RestoreRefused,
                "the relay holds this session with other credentials; it cannot be restored with these",
            )
        };

        // Counted before the entry is locked: `len` visits every shard, this one included.
        let relay_full = self.sessions.len() >= self.config.max_sessions;
        let mut session = match self.sessions.entry(sid) {
            Entry::Occupied(entry) => {
                let mut session = entry.into_ref();
                let proof_matches = session.restore_proof.as_deref() == Some(proof.as_str());
                let seat = session.seat_mut(role).ok_or_else(refused)?;
                match &seat.token {
                    // The seat awaits its owner: the shared proof vouches for it.
                    None if proof_matches => seat.token = ResumeToken::from_wire(&token_text),
                    Some(_) if seat.token_matches(&token_text) => {}
                    _ => return Err(refused()),
                }
                session
            }
            Entry::Vacant(slot) => {
                self.admit_new_session(conn, relay_full)?;
                // Our seat gets the presented token; the other waits for its owner.
                let seat = |owner: bool| Seat {
                    token: if owner {
                        ResumeToken::from_wire(&token_text)
                    } else {
                        None
                    },
                    client_id: ClientId::random(),
                    conn: None,
                    mailbox: self.mailbox(),
                };
                let session = Session {
                    host: seat(role == Role::Host),
                    guest: Some(seat(role == Role::Guest)),
                    invite: None,
                    invite_params: None,
                    pending_join_request: None,
                    idle_since: None,
                    restore_proof: Some(proof),
                };
                tracing::info!(session = %sid.tag(), ?role, "session restored");
                slot.insert(session)
            }
        };
        self.take_seat(conn, &mut session, sid, role)?;
        Ok(())
    }

    /// Puts this connection in `role`'s seat (the caller checked its right to it): takes the
    /// seat over from an older connection, tells both sides who is online, and hands over what
    /// waited in the seat's mailbox.
    fn take_seat(
        &self,
        conn: &mut ConnState,
        session: &mut Session,
        sid: SessionId,
        role: Role,
    ) -> Result<(), Refusal> {
        // One connection, one seat per session; a stale cache entry (seat taken over) is not one.
        let held = conn.role_in(sid).filter(|r| {
            session
                .seat(*r)
                .is_some_and(|s| s.held_by(conn.outbox.id()))
        });
        if held.is_some_and(|r| r != role) {
            return Err(already_member());
        }
        if held.is_none() {
            if conn.memberships.len() >= self.config.max_sessions_per_connection {
                return Err(too_many_sessions());
            }
            conn.forget(sid);
            conn.memberships.push((sid, role));
        }

        let sid_wire = sid.to_string();
        let seat = session.seat_mut(role).ok_or_else(not_member)?;
        let previous = seat.conn.replace(conn.outbox.clone());
        if let Some(old) = previous.filter(|old| old.id() != conn.outbox.id()) {
            let e = refuse(
                ErrorCode::Replaced,
                "another connection resumed this seat with its token",
            );
            let _ = old.push(error_frame(Some(&sid_wire), &e, None));
        }
        let waiting = seat.mailbox.take_all();
        session.idle_since = None;
        let peer_online = session.seat(role.other()).and_then(|s| s.conn.as_ref());
        let status = match peer_online {
            Some(peer) => {
                let _ = peer.push(encode::<()>(FrameType::PeerOnline, Some(&sid_wire), None));
                FrameType::PeerOnline
            }
            None => FrameType::PeerOffline,
        };
        // The answer first, then what waited, in order. (A full mailbox fits in a fresh
        // connection's queue: its limits are below the queue's.)
        conn.send(encode::<()>(status, Some(&sid_wire), None));
        for frame in waiting {
            let _ = conn.outbox.push(frame);
        }
        if role == Role::Host
            && let Some(request) = &session.pending_join_request
        {
            let _ = conn.outbox.push(request.clone());
        }
        Ok(())
    }

    /// The connection closed: free its seats and tell the peers.
    pub fn disconnect(&self, conn: &ConnState) {
        let now = Instant::now();
        for (sid, role) in &conn.memberships {
            let Some(mut session) = self.sessions.get_mut(sid) else {
                continue;
            };
            let Some(seat) = session.seat_mut(*role) else {
                continue;
            };
            if !seat.held_by(conn.outbox.id()) {
                continue; // taken over by another connection meanwhile
            }
            seat.conn = None;
            if let Some(peer) = session.seat(role.other()).and_then(|s| s.conn.as_ref()) {
                let _ = peer.push(encode::<()>(
                    FrameType::PeerOffline,
                    Some(&sid.to_string()),
                    None,
                ));
            }
            if !session.anyone_connected() {
                session.idle_since = Some(now);
            }
        }
    }

    /// Forgets expired invites, idle sessions and refilled rate-limit buckets.
    pub fn sweep(&self, now: Instant) {
        // A used or expired code is kept as a tombstone for one more TTL, so a late joiner hears
        // "used" or "expired" rather than "unknown", and the number is not handed out again
        // while people may still be reading it out.
        let ttl = self.config.invite_ttl;
        self.invites
            .retain(|_, invite| later(invite.expires_at, ttl) > now);
        self.sessions.retain(|_, session| {
            // An unpaired session is worth keeping only while its invite could be used.
            let ttl = if session.guest.is_some() {
                self.config.session_idle_ttl
            } else {
                self.config.unpaired_session_ttl
            };
            let keep = session
                .idle_since
                .is_none_or(|since| later(since, ttl) > now);
            if keep {
                let max_age = self.config.mailbox.max_age;
                session.host.mailbox.expire(now, max_age);
                if let Some(guest) = &mut session.guest {
                    guest.mailbox.expire(now, max_age);
                }
            }
            keep
        });
        self.address_limiter.sweep(now);
        self.create_limiter.sweep(now);
    }

    /// The session a frame's `sid` names, locked, and this connection's role in it, if the
    /// connection still holds that seat. A seat taken over by another connection is dropped
    /// from this connection's memberships here.
    fn member_session(
        &self,
        conn: &mut ConnState,
        env: &Envelope<'_>,
    ) -> Result<(SessionId, Role, RefMut<'_, SessionId, Session>), Refusal> {
        let sid = SessionId::parse(env.require_sid()?).ok_or_else(not_member)?;
        let role = conn.role_in(sid).ok_or_else(not_member)?;
        match self.sessions.get_mut(&sid) {
            Some(session)
                if session
                    .seat(role)
                    .is_some_and(|s| s.held_by(conn.outbox.id())) =>
            {
                Ok((sid, role, session))
            }
            _ => {
                conn.forget(sid);
                Err(not_member())
            }
        }
    }

    /// Whether a new session may be created for this connection (by `CREATE_SESSION` or
    /// `RESTORE`): within the relay's cap, and within the address's allowance, which it
    /// charges. Each session may soon hold a live invite code: one address may not fill the
    /// code space. (`relay_full` is computed by the caller, before it locks any entry: `len`
    /// visits every shard.)
    fn admit_new_session(&self, conn: &ConnState, relay_full: bool) -> Result<(), Refusal> {
        if relay_full {
            return Err(refuse(
                ErrorCode::RelayFull,
                "the relay holds its maximum number of sessions; try again later",
            ));
        }
        let now = Instant::now();
        if !self.create_limiter.allows(conn.address, now) {
            return Err(refuse(
                ErrorCode::RateLimited,
                "too many sessions created from this address; wait a minute and try again",
            ));
        }
        self.create_limiter.charge(conn.address, now);
        Ok(())
    }

    /// Drops memberships whose seat this connection no longer holds (taken over, or denied),
    /// so they neither count against the cap nor look like a seat held. Locks one session at a
    /// time and no invite.
    fn prune_memberships(&self, conn: &mut ConnState) {
        let id = conn.outbox.id();
        conn.memberships.retain(|(sid, role)| {
            self.sessions
                .get(sid)
                .is_some_and(|s| s.seat(*role).is_some_and(|seat| seat.held_by(id)))
        });
    }

    fn check_membership_room(&self, conn: &ConnState) -> Result<(), Refusal> {
        if conn.memberships.len() >= self.config.max_sessions_per_connection {
            return Err(too_many_sessions());
        }
        Ok(())
    }
}

fn already_member() -> Refusal {
    refuse(
        ErrorCode::AlreadyMember,
        "this connection already holds a seat in this session",
    )
}

fn too_many_sessions() -> Refusal {
    refuse(
        ErrorCode::TooManySessions,
        "this connection is in too many sessions; use another connection",
    )
}

/// `INVITE_CREATE`'s `data`, if it carries anything worth storing, within the storage limit.
fn invite_params(env: &Envelope<'_>) -> Result<Option<OpaqueData>, Refusal> {
    let Some(raw) = env.raw_data() else {
        return Ok(None);
    };
    if raw.get().len() > parley_protocol::limits::MAX_INVITE_PARAMS_BYTES {
        return Err(FrameError::invalid(
            "data",
            &format!(
                "is too large to store (at most {} bytes)",
                parley_protocol::limits::MAX_INVITE_PARAMS_BYTES
            ),
        ));
    }
    let params: OpaqueData = env.data()?;
    Ok((!params.is_empty()).then_some(params))
}

fn send_invite_code(conn: &ConnState, sid: SessionId, code: InviteCode, expires_in: u64) {
    let data = InviteCodeData {
        code: code.to_string(),
        expires_in,
    };
    conn.send(encode(
        FrameType::InviteCode,
        Some(&sid.to_string()),
        Some(&data),
    ));
}

fn error_frame(sid: Option<&str>, e: &FrameError, msg_id: Option<&RawValue>) -> String {
    // Echo the sid only when it has a session id's form: never reflect arbitrary input.
    let sid = sid.filter(|s| SessionId::parse(s).is_some());
    let data = ErrorData {
        code: e.code.as_str().into(),
        message: e.message.as_str().into(),
        msg_id,
    };
    encode(FrameType::Error, sid, Some(&data))
}

fn send_error(conn: &ConnState, sid: Option<&str>, e: &FrameError, msg_id: Option<&RawValue>) {
    conn.send(error_frame(sid, e, msg_id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;
    use crate::outbox::OutboxReceiver;
    use proptest::prelude::*;
    use serde_json::Value;
    use std::time::Duration;

    struct Client {
        state: ConnState,
        rx: OutboxReceiver,
    }

    fn client(hub: &Hub, id: ConnId) -> Client {
        let (outbox, rx) = Outbox::new(id, 1024, 1 << 24);
        Client {
            state: ConnState::new(outbox, IpAddr::from([127, 0, 0, 1]), &hub.config),
            rx,
        }
    }

    /// Everything the relay queued for a client parses as a frame only the relay sends (or a
    /// forwarded MSG/MSG_READ), and never carries an invite code's digits in a JOIN_REQUEST.
    /// What the relay has told the clients so far, so that later frames can use real values.
    #[derive(Default)]
    struct Learned {
        sids: Vec<String>,
        codes: Vec<String>,
        tokens: Vec<String>,
        client_ids: Vec<String>,
    }

    fn pick(pool: &[String], i: usize) -> String {
        // One pick in eight is unknown (well-formed as a session id, so RESTORE re-creates
        // forgotten sessions too; garbage as anything else).
        if pool.is_empty() || i % 8 == 7 {
            format!("{i:032x}")
        } else {
            pool[i % pool.len()].clone()
        }
    }

    fn drain_and_check(c: &mut Client, learned: &mut Learned) {
        while let Some(frame) = c.rx.try_recv() {
            let env = Envelope::parse(frame.as_str())
                .unwrap_or_else(|e| panic!("relay sent garbage {frame}: {e}"));
            assert!(
                !env.kind.is_client_sent()
                    || matches!(
                        env.kind,
                        FrameType::Msg | FrameType::MsgRead | FrameType::Ping | FrameType::Pong
                    ),
                "relay sent a client-only frame: {frame}"
            );
            if env.kind == FrameType::JoinRequest {
                let data: OpaqueData = env.data().unwrap();
                assert!(data.get("code").is_none(), "code forwarded: {frame}");
            }
            let value: Value = serde_json::from_str(frame.as_str()).unwrap();
            if let Some(sid) = value.get("sid").and_then(Value::as_str) {
                learned.sids.push(sid.to_string());
            }
            // (ERROR's `data.code` is an error code, not an invite code.)
            let data = value
                .get("data")
                .and_then(Value::as_object)
                .filter(|_| env.kind != FrameType::Error);
            for (key, pool) in [
                ("code", &mut learned.codes),
                ("resumeToken", &mut learned.tokens),
                ("clientID", &mut learned.client_ids),
            ] {
                if let Some(s) = data.and_then(|d| d.get(key)).and_then(Value::as_str) {
                    pool.push(s.to_string());
                }
            }
        }
    }

    /// (client, frame type, sid pick, value pick, data shape); mostly the types clients send,
    /// so that sequences get past pairing.
    fn frame_strategy() -> impl Strategy<Value = (usize, FrameType, usize, usize, usize)> {
        let client_sent: Vec<FrameType> = FrameType::ALL
            .into_iter()
            .filter(|t| t.is_client_sent())
            .collect();
        let kind = prop_oneof![
            9 => prop::sample::select(client_sent),
            1 => prop::sample::select(FrameType::ALL.to_vec()),
        ];
        (0..3usize, kind, 0..64usize, 0..64usize, 0..8usize)
    }

    fn natural_shape(kind: FrameType) -> usize {
        match kind {
            FrameType::Join => 0,
            FrameType::Reattach => 1,
            FrameType::JoinAccept | FrameType::JoinDeny => 2,
            FrameType::Msg | FrameType::MsgRead => 3,
            FrameType::InviteCreate => 5,
            FrameType::Restore => 7,
            _ => 4,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        // Any sequence of frames from three clients, built from the relay's own answers (real
        // sids, codes, tokens), leaves the relay consistent: no panic, only well-formed output.
        #[test]
        fn arbitrary_frame_sequences_never_break_the_hub(ops in prop::collection::vec(frame_strategy(), 1..60)) {
            // Random JOINs mostly fail; with the default limits the rest would be rate-limited.
            let lenient = RateLimit { burst: u32::MAX, refill: Duration::from_secs(1) };
            let hub = Hub::new(RelayConfig {
                join_failures_per_connection: lenient,
                join_failures_per_address: lenient,
                ..RelayConfig::default()
            });
            let mut clients: Vec<Client> = (0..3).map(|i| client(&hub, i)).collect();
            let mut learned = Learned::default();
            for (who, kind, pick_sid, pick_value, shape) in ops {
                let sid = pick(&learned.sids, pick_sid);
                // Mostly the data the frame type expects, sometimes another type's or junk.
                let shape = if shape < 4 { natural_shape(kind) } else { shape };
                let data = match shape {
                    0 => serde_json::json!({"code": pick(&learned.codes, pick_value), "publicKey": "aa"}),
                    1 => serde_json::json!({"resumeToken": pick(&learned.tokens, pick_value)}),
                    2 => serde_json::json!({"clientID": pick(&learned.client_ids, pick_value), "publicKey": "bb"}),
                    3 => serde_json::json!({"payload": "00", "msgID": pick_value}),
                    4 => Value::Null,
                    5 => serde_json::json!({"prime": "ff", "generator": "02"}),
                    7 => serde_json::json!({
                        "role": if pick_value % 2 == 0 { "host" } else { "guest" },
                        "resumeToken": pick(&learned.tokens, pick_value),
                        "proof": "p",
                    }),
                    _ => serde_json::json!([pick_value]),
                };
                let text = encode(kind, Some(&sid), Some(&data));
                let c = &mut clients[who];
                hub.handle(&mut c.state, &Utf8Bytes::from(text));
                for c in &mut clients {
                    drain_and_check(c, &mut learned);
                }
            }
            for c in &clients {
                hub.disconnect(&c.state);
            }
            for c in &mut clients {
                drain_and_check(c, &mut learned);
            }
            hub.sweep(Instant::now() + Duration::from_secs(48 * 3600));
            prop_assert_eq!(hub.stats().sessions, 0);
            prop_assert_eq!(hub.stats().invites, 0);
        }
    }
}
