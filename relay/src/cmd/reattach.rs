//! `REATTACH {sid, data: {resumeToken}}` and `RESTORE {sid, data: {role, resumeToken}}`: a
//! member takes its seat back on a new connection. The token says which seat: it is a MAC
//! under the relay's secret (see `ids`), so a relay that forgot the session (it restarted, or
//! the session expired) re-creates it from the first member's token, and the other seat then
//! belongs to whoever presents a member's token the relay issued for it (a joiner's token,
//! from before the host's accept, only takes back its own seat in a session the relay holds).
//! Nobody without a member's token can take or block a seat.
//!
//! Also here: what a seat does when its connection leaves, and the mailbox hand-over.

use parley_protocol::payload::{ReattachData, RestoreData};
use parley_protocol::{Envelope, ErrorCode, FrameError, FrameType, encode, limits};
use tokio::time::Instant;

use crate::hub::{Change, ConnState, Connections, Flow, Hub, Role, Seat, Session, error_frame};
use crate::ids::{SessionId, Stage, TokenNonce, Verified};
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// What the frame asks for.
struct Request {
    sid: SessionId,
    /// `None`: a token-less `REATTACH` (compatibility option).
    token: Option<Verified>,
    restore: bool,
}

pub fn handle(hub: &Hub, conn: &mut ConnState, env: &Envelope<'_>) -> Result<Flow, FrameError> {
    let Request {
        sid,
        token,
        restore,
    } = parse(hub, env)?;
    let refused = |e: FrameError| {
        if restore {
            FrameError::new(
                ErrorCode::RestoreRefused,
                "the relay did not issue this token for this seat; the session cannot be resumed here",
            )
        } else {
            e
        }
    };
    hub.prune_memberships(conn);
    // One connection, one seat per session.
    let held = conn.role_in(sid);
    if let Some(held) = held
        && token.is_none_or(|t| t.role != held)
    {
        return Err(FrameError::new(
            ErrorCode::AlreadyMember,
            "this connection already holds a seat in this session",
        ));
    }
    if held.is_none() {
        hub.check_membership_room(conn)?;
    }

    let take = |role: Role, nonce: Option<TokenNonce>| TakeSeat {
        sid,
        role,
        nonce,
        outbox: &conn.outbox,
        metrics: &hub.metrics,
        journal: hub.journal(),
    };
    let decide = |session: &Session| {
        let (role, nonce) = match token {
            Some(t) => {
                let seat = session.seat(t.role);
                let mine = match t.stage {
                    Stage::Member => seat.is_some_and(|s| s.accepts(t.nonce)),
                    // Not accepted yet: only the very seat it was issued for.
                    Stage::Joiner => seat.is_some_and(|s| s.token_nonce == Some(t.nonce)),
                };
                if !mine {
                    return Err(refused(FrameError::new(
                        ErrorCode::TokenInvalid,
                        "this token's seat has been given to someone else",
                    )));
                }
                (t.role, Some(t.nonce))
            }
            None => {
                let empty = [Role::Host, Role::Guest].into_iter().find(|r| {
                    session
                        .seat(*r)
                        .is_some_and(|s| s.conn.is_none() && s.token_nonce.is_some())
                });
                let role = empty.ok_or_else(|| {
                    FrameError::new(
                        ErrorCode::SessionFull,
                        "both seats of this session are taken",
                    )
                })?;
                (role, None)
            }
        };
        Ok(take(role, nonce))
    };
    let (role, pending) = match hub.sessions.update(sid, &hub.conns, decide) {
        Some(result) => result?,
        None => {
            // The relay does not hold the session: re-create it from a member's token.
            let member = token.filter(|t| t.stage == Stage::Member);
            let Some(Verified { role, nonce, .. }) = member else {
                return Err(refused(session_unknown()));
            };
            hub.check_session_room(conn)?;
            let mut session = Session {
                host: Seat::new((role == Role::Host).then_some(nonce), None),
                guest: Some(Seat::new((role == Role::Guest).then_some(nonce), None)),
                invite: None,
                invite_params: None,
                pending_join: None,
                idle_since: None,
            };
            // A cluster node taking the session in finds what waited in the journal.
            if let Some(mut recovered) = hub.take_recovered(sid) {
                for role in [Role::Host, Role::Guest] {
                    if let Some(seat) = session.seat_mut(role) {
                        seat.mailbox.recover(
                            recovered.frames(role),
                            &hub.budget,
                            &hub.config.mailbox,
                        );
                        // What the journal holds must be what memory holds, frame for frame.
                        if let Some(journal) = hub.journal() {
                            journal.rewritten(sid, role, &seat.mailbox.entries());
                        }
                    }
                }
            }
            match hub
                .sessions
                .insert(sid, session, &hub.conns, take(role, Some(nonce)))
            {
                Ok(taken) => {
                    hub.charge_session_created(conn.address);
                    tracing::info!(session = %sid.tag(), ?role, "session re-created from a token");
                    taken
                }
                // The other member re-created it meanwhile: join it like any held session.
                Err(_) => hub
                    .sessions
                    .update(sid, &hub.conns, decide)
                    .ok_or_else(|| refused(session_unknown()))??,
            }
        }
    };
    conn.forget(sid);
    conn.memberships.push((sid, role));
    tracing::info!(session = %sid.tag(), ?role, "member reattached");
    Ok(Flow {
        wait_for: None,
        hand_over_pending: pending,
        wait_until: None,
    })
}

fn parse(hub: &Hub, env: &Envelope<'_>) -> Result<Request, FrameError> {
    let secret = &hub.config.secret;
    if env.kind == FrameType::Restore {
        let sid = SessionId::parse(env.require_sid()?)
            .ok_or_else(|| FrameError::invalid("sid", "must be 32 lowercase hex digits"))?;
        let RestoreData {
            role,
            resume_token,
            proof,
        } = env.data()?;
        let role = role.ok_or_else(|| FrameError::missing("data.role"))?;
        let role = Role::parse(&role)
            .ok_or_else(|| FrameError::invalid("data.role", "must be \"host\" or \"guest\""))?;
        let token = resume_token.ok_or_else(|| FrameError::missing("data.resumeToken"))?;
        if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FrameError::invalid(
                "data.resumeToken",
                "must be 64 hex digits",
            ));
        }
        // Ignored (older clients send it), but still bounded.
        if proof.is_some_and(|p| p.len() > limits::MAX_RESTORE_PROOF_CHARS) {
            return Err(FrameError::invalid(
                "data.proof",
                "must be at most 128 characters",
            ));
        }
        let token = secret
            .verify(sid, &token)
            .filter(|t| t.role == role)
            .ok_or_else(|| {
                FrameError::new(
                    ErrorCode::RestoreRefused,
                    "the relay did not issue this token for this seat; the session cannot be resumed here",
                )
            })?;
        return Ok(Request {
            sid,
            token: Some(token),
            restore: true,
        });
    }
    let sid = SessionId::parse(env.require_sid()?).ok_or_else(session_unknown)?;
    let ReattachData { resume_token } = env.data()?;
    let token = match resume_token {
        Some(token) => Some(secret.verify(sid, &token).ok_or_else(|| {
            if hub.sessions.contains(sid) {
                FrameError::new(
                    ErrorCode::TokenInvalid,
                    "wrong resume token for this session",
                )
            } else {
                session_unknown()
            }
        })?),
        None if hub.config.allow_tokenless_reattach => None,
        None => {
            return Err(FrameError::new(
                ErrorCode::TokenInvalid,
                "REATTACH needs data.resumeToken",
            ));
        }
    };
    Ok(Request {
        sid,
        token,
        restore: false,
    })
}

fn session_unknown() -> FrameError {
    FrameError::new(
        ErrorCode::SessionUnknown,
        "the relay does not know this session and did not issue this token (it lost its secret, or the session was never here); pair again",
    )
}

/// Puts a connection in a seat (the decision checked its right to it): takes the seat over
/// from an older connection, tells both sides who is online, and hands over what waited.
struct TakeSeat<'a> {
    sid: SessionId,
    role: Role,
    /// The token's nonce; `None` for a token-less `REATTACH`.
    nonce: Option<TokenNonce>,
    outbox: &'a Outbox,
    metrics: &'a Metrics,
    journal: Option<&'a dyn Journal>,
}

impl Change for TakeSeat<'_> {
    /// The role taken, and whether mailboxed frames are still to be handed over.
    type Output = (Role, bool);

    fn apply(self, session: &mut Session, conns: &Connections) -> Self::Output {
        let sid = self.sid.to_string();
        let id = self.outbox.id();
        let peer = session.seat(self.role.other()).and_then(|s| s.conn);
        let Some(seat) = session.seat_mut(self.role) else {
            return (self.role, false); // ruled out by the decision
        };
        if seat.token_nonce.is_none() {
            seat.token_nonce = self.nonce;
        }
        if let Some(old) = seat.conn.replace(id).filter(|old| *old != id) {
            let e = FrameError::new(
                ErrorCode::Replaced,
                "another connection resumed this seat with its token",
            );
            self.metrics.error_sent(e.code);
            let _ = conns.push(old, error_frame(Some(&sid), &e, None));
        }
        session.idle_since = None;
        let status = match peer {
            Some(peer) => {
                let _ = conns.push(peer, encode::<()>(FrameType::PeerOnline, Some(&sid), None));
                FrameType::PeerOnline
            }
            None => FrameType::PeerOffline,
        };
        // The answer first, then what waited, in order, as far as the queue has room.
        let _ = self.outbox.push(encode::<()>(status, Some(&sid), None));
        let pending = HandOver {
            sid: self.sid,
            role: self.role,
            outbox: self.outbox,
            journal: self.journal,
        }
        .apply(session, conns);
        if self.role == Role::Host
            && let Some(request) = &session.pending_join
        {
            let _ = self.outbox.push(request.frame.clone());
        }
        (self.role, pending)
    }
}

/// Moves a seat's mailboxed frames to its connection's queue while that has room.
pub struct HandOver<'a> {
    pub sid: SessionId,
    pub role: Role,
    pub outbox: &'a Outbox,
    pub journal: Option<&'a dyn Journal>,
}

impl Change for HandOver<'_> {
    /// Whether frames are left for later.
    type Output = bool;

    fn apply(self, session: &mut Session, _: &Connections) -> bool {
        let Some(seat) = session.seat_mut(self.role) else {
            return false;
        };
        let mut moved = 0usize;
        while let Some(frame) = seat.mailbox.pop_if(|f| self.outbox.has_room_for(f.len())) {
            let _ = self.outbox.push(frame);
            moved = moved.saturating_add(1);
        }
        if let Some(journal) = self.journal.filter(|_| moved > 0) {
            journal.removed(self.sid, self.role, moved);
        }
        !seat.mailbox.is_empty()
    }
}

/// A seat's connection has gone: the peer hears `PEER_OFFLINE`.
pub struct Leave {
    pub sid: SessionId,
    pub role: Role,
    pub now: Instant,
}

impl Change for Leave {
    type Output = ();

    fn apply(self, session: &mut Session, conns: &Connections) {
        if let Some(seat) = session.seat_mut(self.role) {
            seat.conn = None;
        }
        if let Some(peer) = session.seat(self.role.other()).and_then(|s| s.conn) {
            let sid = self.sid.to_string();
            let _ = conns.push(peer, encode::<()>(FrameType::PeerOffline, Some(&sid), None));
        }
        if !session.anyone_connected() {
            session.idle_since = Some(self.now);
        }
    }
}

/// Whether `env` is a `REATTACH` or `RESTORE` whose member token this relay issued: what may
/// re-create the session if nobody holds it. (A cluster node claims a session's home only for
/// such a frame, so nobody can make it claim sessions that do not exist.)
pub fn could_recreate(hub: &Hub, env: &Envelope<'_>) -> bool {
    parse(hub, env).is_ok_and(|r| r.token.is_some_and(|t| t.stage == Stage::Member))
}
