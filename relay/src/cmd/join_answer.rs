//! `JOIN_ACCEPT` -> `JOINED` (second), `JOIN_DENY` -> `JOIN_DENIED` (and the joiner loses its
//! seat): the host's answer to a `JOIN_REQUEST`, carried to the joiner named by `clientID`.
//! An accepted joiner is a member: the second `JOINED` carries its member's token, which
//! replaces the joiner's token it got at `JOIN`.

use parley_protocol::payload::OpaqueData;
use parley_protocol::{Envelope, ErrorCode, FrameError, FrameType, encode};

use crate::hub::{Change, ConnState, Connections, Flow, Hub, Role, Session};
use crate::ids::{Stage, TokenNonce};

pub fn handle(hub: &Hub, conn: &mut ConnState, env: &Envelope<'_>) -> Result<Flow, FrameError> {
    let accept = env.kind == FrameType::JoinAccept;
    let mut rest: OpaqueData = env.data()?;
    let client_id = rest
        .take_string("clientID")?
        .ok_or_else(|| FrameError::missing("data.clientID"))?;
    // Only the relay hands out resume tokens: never let one through from the host.
    rest.remove("resumeToken");
    let answer = if accept {
        FrameType::Joined
    } else {
        FrameType::JoinDenied
    };
    let secret = &hub.config.secret;
    let (sid, delivered) = hub.member_update(conn, env, |session, role, sid| {
        if role != Role::Host {
            return Err(FrameError::new(
                ErrorCode::HostOnly,
                format!("only the session's host can send {}", env.kind),
            ));
        }
        let guest = session
            .guest
            .as_ref()
            .filter(|g| g.client_id.to_string() == client_id)
            .ok_or_else(|| {
                FrameError::new(
                    ErrorCode::UnknownClient,
                    "no joiner with this clientID is in the session",
                )
            })?;
        if accept && guest.conn.is_none() {
            return Err(peer_offline());
        }
        let token = accept.then(|| secret.issue(sid, Role::Guest, Stage::Member));
        let mut rest = rest.clone();
        if let Some(token) = &token {
            rest.set_string("resumeToken", &token.to_wire());
        }
        Ok(Answer {
            member_nonce: token.map(|t| t.nonce()),
            frame: encode(answer, Some(&sid.to_string()), Some(&rest)),
        })
    })?;
    if !delivered {
        return Err(peer_offline());
    }
    if !accept {
        tracing::info!(session = %sid.tag(), "joiner denied");
    }
    Ok(Flow::default())
}

fn peer_offline() -> FrameError {
    FrameError::new(
        ErrorCode::PeerOffline,
        "the joiner is not connected; it was not told",
    )
}

struct Answer {
    /// Set for an accept: the nonce of the member's token the joiner is given.
    member_nonce: Option<TokenNonce>,
    frame: String,
}

impl Change for Answer {
    /// Whether the joiner got it; an accept that did not reach it changes nothing.
    type Output = bool;

    fn apply(self, session: &mut Session, conns: &Connections) -> bool {
        let to = session.guest.as_ref().and_then(|g| g.conn);
        let delivered = to.is_some_and(|id| conns.push(id, self.frame).is_ok());
        match (self.member_nonce, delivered) {
            // Not told: nothing changes, the request stays pending.
            (Some(_), false) => return false,
            (Some(nonce), true) => {
                if let Some(guest) = &mut session.guest {
                    guest.token_nonce = Some(nonce);
                }
            }
            (None, _) => session.guest = None,
        }
        session.pending_join = None;
        true
    }
}
