//! `CREATE_SESSION` -> `SESSION_CREATED {sid, data: {resumeToken}}`: a new session with the
//! sender in the host's seat.

use parley_protocol::payload::ResumeTokenData;
use parley_protocol::{FrameError, FrameType, encode};

use crate::hub::{Change, ConnState, Connections, Flow, Hub, Role, Seat, Session};
use crate::ids::{Stage, TokenNonce};

pub fn handle(hub: &Hub, conn: &mut ConnState) -> Result<Flow, FrameError> {
    hub.prune_memberships(conn);
    hub.check_membership_room(conn)?;
    hub.check_session_room(conn)?;

    let session = Session {
        host: Seat::new(None, Some(conn.outbox.id())),
        guest: None,
        invite: None,
        invite_params: None,
        pending_join: None,
        idle_since: None,
    };
    let (sid, token) = hub.sessions.insert_new(session, &hub.conns, |sid| {
        IssueHostToken(hub.config.secret.issue(sid, Role::Host, Stage::Member))
    });
    hub.charge_session_created(conn.address);
    conn.memberships.push((sid, Role::Host));
    tracing::info!(session = %sid.tag(), "session created");
    let data = ResumeTokenData {
        resume_token: token.to_wire(),
    };
    conn.send(encode(
        FrameType::SessionCreated,
        Some(&sid.to_string()),
        Some(&data),
    ));
    Ok(Flow::default())
}

/// The host's seat belongs to the token issued for it (whose nonce depends on the sid, known
/// only once the session has one).
struct IssueHostToken(crate::ids::ResumeToken);

impl Change for IssueHostToken {
    type Output = crate::ids::ResumeToken;

    fn apply(self, session: &mut Session, _: &Connections) -> Self::Output {
        let nonce: TokenNonce = self.0.nonce();
        session.host.token_nonce = Some(nonce);
        self.0
    }
}
