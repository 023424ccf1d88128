//! `JOIN {data: {code, ...}}` (no sid): the sender takes the guest's seat of the session whose
//! live invite has this code. The host gets `JOIN_REQUEST` with the joiner's other fields and a
//! `clientID`; the joiner gets the first `JOINED` with the host's stored parameters and its
//! resume token.

use parley_protocol::payload::OpaqueData;
use parley_protocol::{Envelope, ErrorCode, FrameError, FrameType, encode, limits};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::budget::Charge;
use crate::hub::{
    Change, ConnState, Connections, Flow, Hub, PendingJoin, Role, Seat, Session, Sessions,
};
use crate::ids::{InviteCode, SessionId, Stage};

pub fn handle(hub: &Hub, conn: &mut ConnState, env: &Envelope<'_>) -> Result<Flow, FrameError> {
    let now = Instant::now();
    // Checked first, before the code is even read, so a limited guesser learns nothing,
    // even when the guess is right.
    let limit = hub.config.join_failures_per_connection;
    if !conn.join_failures.allows(limit, now) || !hub.join_limiter.allows(conn.address, now) {
        return Err(FrameError::new(
            ErrorCode::RateLimited,
            "too many failed join attempts from this connection or address; wait a minute and try again",
        ));
    }
    // Kept until the host answers: bounded like invite parameters.
    if env
        .raw_data()
        .is_some_and(|raw| raw.get().len() > limits::MAX_JOIN_DATA_BYTES)
    {
        return Err(FrameError::invalid(
            "data",
            &format!(
                "is too large (at most {} bytes)",
                limits::MAX_JOIN_DATA_BYTES
            ),
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
    hub.prune_memberships(conn);
    hub.check_membership_room(conn)?;

    let sid = match live_invite(&hub.sessions, code, now) {
        Ok(sid) => sid,
        Err(refusal) => {
            // Only guesses count: a wrong, spent or stale code.
            conn.join_failures.charge(limit, now);
            hub.charge_join_failure(conn.address);
            return Err(refusal);
        }
    };
    // (After a take-over the membership cache may be stale; then this refuses a join that
    // could have worked, which costs nothing.)
    if conn.role_in(sid).is_some() {
        return Err(FrameError::new(
            ErrorCode::AlreadyMember,
            "this connection already holds a seat in this session",
        ));
    }

    // A joiner's token until the host accepts (see `ids::Stage`).
    let token = hub.config.secret.issue(sid, Role::Guest, Stage::Joiner);
    let guest = Seat::new(Some(token.nonce()), Some(conn.outbox.id()));
    // To the host: everything the joiner sent except the code, plus who it is.
    rest.set_string("clientID", &guest.client_id.to_string());
    let request: Utf8Bytes =
        encode(FrameType::JoinRequest, Some(&sid.to_string()), Some(&rest)).into();
    let charge = hub
        .budget
        .charge(conn.address, request.len())
        .ok_or_else(|| {
            FrameError::new(
                ErrorCode::RelayFull,
                "the relay holds too much for your address; try again later",
            )
        })?;

    let join = Join {
        sessions: &hub.sessions,
        code,
        guest,
        request,
        charge,
    };
    let joined = hub
        .sessions
        .update(sid, &hub.conns, |session| {
            if session.guest.is_some() {
                return Err(FrameError::new(
                    ErrorCode::SessionFull,
                    "this session already has two members",
                ));
            }
            // Spent or expired since it was looked at: only possible in a race with another
            // joiner, who won.
            if session.invite != Some(code) || live_invite(&hub.sessions, code, now).is_err() {
                return Err(FrameError::new(
                    ErrorCode::InviteUsed,
                    "this invite code has already been used; ask for a new one",
                ));
            }
            Ok(join)
        })
        .ok_or_else(|| {
            FrameError::new(
                ErrorCode::InviteUnknown,
                "this invite's session has ended; ask for a new code",
            )
        })??;

    conn.memberships.push((sid, Role::Guest));
    tracing::info!(session = %sid.tag(), "guest joined");
    // To the joiner: the host's stored parameters, plus its own resume token.
    let mut joined = joined.unwrap_or_default();
    joined.set_string("resumeToken", &token.to_wire());
    conn.send(encode(
        FrameType::Joined,
        Some(&sid.to_string()),
        Some(&joined),
    ));
    Ok(Flow::default())
}

/// The session a code is live for, or why it cannot be used.
fn live_invite(
    sessions: &Sessions,
    code: InviteCode,
    now: Instant,
) -> Result<SessionId, FrameError> {
    let (sid, used, expires_at) = sessions
        .invite(code, |i| (i.sid, i.used, i.expires_at))
        .ok_or_else(|| {
            FrameError::new(
                ErrorCode::InviteUnknown,
                "no session has this invite code; check the digits before the dash",
            )
        })?;
    if used {
        return Err(FrameError::new(
            ErrorCode::InviteUsed,
            "this invite code has already been used; ask for a new one",
        ));
    }
    if expires_at <= now {
        return Err(FrameError::new(
            ErrorCode::InviteExpired,
            "this invite code has expired; ask for a new one",
        ));
    }
    Ok(sid)
}

struct Join<'a> {
    sessions: &'a Sessions,
    code: InviteCode,
    guest: Seat,
    request: Utf8Bytes,
    charge: Charge,
}

impl Change for Join<'_> {
    /// The host's stored parameters, for the joiner.
    type Output = Option<OpaqueData>;

    fn apply(self, session: &mut Session, conns: &Connections) -> Self::Output {
        // Cannot fail: the decision saw it live under the session's lock, and only a JOIN
        // holding that lock spends a session's code.
        let _ = self.sessions.claim_invite(self.code, Instant::now());
        session.guest = Some(self.guest);
        session.invite = None;
        session.idle_since = None;
        if let Some(host) = session.host.conn {
            let _ = conns.push(host, self.request.clone());
        }
        session.pending_join = Some(PendingJoin {
            frame: self.request,
            _charge: self.charge,
        });
        session.invite_params.take()
    }
}
