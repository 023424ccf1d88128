//! `INVITE_CREATE {sid, data?}` -> `INVITE_CODE {sid, data: {code, expiresIn}}`. The original
//! client sends it a second time with its DH parameters once it has the code: that one only
//! stores them, and gets no answer (or the client loops).

use std::cell::Cell;

use parley_protocol::payload::{InviteCodeData, OpaqueData};
use parley_protocol::{Envelope, ErrorCode, FrameError, FrameType, encode, limits};
use tokio::time::Instant;

use crate::config::later;
use crate::hub::{Change, ConnState, Connections, Flow, Hub, Role, Session, Sessions};
use crate::ids::{InviteCode, SessionId};

pub fn handle(hub: &Hub, conn: &mut ConnState, env: &Envelope<'_>) -> Result<Flow, FrameError> {
    let params = invite_params(env)?;
    let now = Instant::now();
    let ttl = hub.config.invite_ttl;
    let sessions = &hub.sessions;
    // (Given back to the connection if this frame issues no code.)
    let reserved = Cell::new(conn.reserved_code.take());
    let updated = hub.member_update(conn, env, |session, role, sid| {
        if role != Role::Host {
            return Err(FrameError::new(
                ErrorCode::HostOnly,
                "only the session's host can create an invite",
            ));
        }
        if session.guest.is_some() {
            return Err(FrameError::new(
                ErrorCode::SessionFull,
                "someone has already joined this session",
            ));
        }
        let live = session.invite.and_then(|code| {
            sessions
                .invite(code, |i| {
                    (!i.used && i.expires_at > now).then_some((code, i.expires_at))
                })
                .flatten()
        });
        Ok(match (live, params) {
            (Some(_), Some(params)) => Invite::StoreParams(params),
            (Some((code, expires_at)), None) => {
                Invite::Repeat(code, expires_at.saturating_duration_since(now).as_secs())
            }
            (None, params) => Invite::Issue {
                sessions,
                reserved: &reserved,
                sid,
                expires_at: later(now, ttl),
                expires_in: ttl.as_secs(),
                params,
            },
        })
    });
    conn.reserved_code = reserved.take();
    let (sid, answer) = updated?;
    if let Some((code, expires_in)) = answer? {
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
    Ok(Flow::default())
}

enum Invite<'a> {
    /// The original client's second `INVITE_CREATE`: store its parameters, answer nothing.
    StoreParams(OpaqueData),
    /// The live code again.
    Repeat(InviteCode, u64),
    /// A new code (the store's invite map is locked after the session's, never before).
    Issue {
        sessions: &'a Sessions,
        /// A code reserved for this connection (a cluster's), used first.
        reserved: &'a Cell<Option<InviteCode>>,
        sid: SessionId,
        expires_at: Instant,
        expires_in: u64,
        params: Option<OpaqueData>,
    },
}

impl Change for Invite<'_> {
    /// The code to send, if any; `relay_full` when the code space is exhausted (and then
    /// nothing has changed).
    type Output = Result<Option<(InviteCode, u64)>, FrameError>;

    fn apply(self, session: &mut Session, _: &Connections) -> Self::Output {
        match self {
            Invite::StoreParams(params) => {
                session.invite_params = Some(params);
                Ok(None)
            }
            Invite::Repeat(code, expires_in) => Ok(Some((code, expires_in))),
            Invite::Issue {
                sessions,
                reserved,
                sid,
                expires_at,
                expires_in,
                params,
            } => {
                let code = sessions.new_invite(sid, expires_at, reserved).ok_or_else(|| {
                    if sessions.code_pool().is_some() {
                        // A cluster node issues only codes reserved in the shared store.
                        FrameError::new(
                            ErrorCode::StoreUnavailable,
                            "the relay cannot reach its shared store to reserve a code; try again shortly",
                        )
                    } else {
                        FrameError::new(
                            ErrorCode::RelayFull,
                            "the relay has too many live invite codes; try again later",
                        )
                    }
                })?;
                session.invite = Some(code);
                if params.is_some() {
                    session.invite_params = params;
                }
                tracing::info!(session = %sid.tag(), "invite created");
                Ok(Some((code, expires_in)))
            }
        }
    }
}

/// `INVITE_CREATE`'s `data`, if it carries anything worth storing, within the storage limit.
fn invite_params(env: &Envelope<'_>) -> Result<Option<OpaqueData>, FrameError> {
    let Some(raw) = env.raw_data() else {
        return Ok(None);
    };
    if raw.get().len() > limits::MAX_INVITE_PARAMS_BYTES {
        return Err(FrameError::invalid(
            "data",
            &format!(
                "is too large to store (at most {} bytes)",
                limits::MAX_INVITE_PARAMS_BYTES
            ),
        ));
    }
    let params: OpaqueData = env.data()?;
    Ok((!params.is_empty()).then_some(params))
}
