//! `DATA`: a binary frame (`0x01 ‖ sid ‖ body`, protocol.md 2.2) forwarded as it came, the
//! same bytes, to the other member if it is attached, through its ordinary queue (so in
//! order with the sender's text frames, and under the same bounds); otherwise dropped. Never
//! kept in a mailbox or journaled, never answered. The body is not looked at.

use parley_protocol::data::data_sid;
use parley_protocol::{ErrorCode, FrameError};
use tokio_tungstenite::tungstenite::Bytes;

use crate::hub::{Change, ConnState, Connections, Flow, Hub, Role, Session};
use crate::ids::SessionId;
use crate::outbox::{Frame, Outbox};

pub fn handle(hub: &Hub, conn: &mut ConnState, frame: &Bytes) -> Flow {
    hub.metrics.data_received(frame.len());
    let Some(sid) = data_sid(frame).map(SessionId) else {
        let e = FrameError::new(
            ErrorCode::MalformedData,
            "a DATA frame is byte 0x01, the 16 bytes of the session id, then at least one byte",
        );
        conn.send_error(None, &e, None);
        return Flow::default();
    };
    let sent = hub.member_update_sid(conn, sid, |_, role, _| {
        Ok(Forward {
            frame,
            to: role.other(),
        })
    });
    match sent {
        Ok(Some(congested)) => {
            hub.metrics.data_forwarded(frame.len());
            Flow {
                wait_for: congested,
                ..Flow::default()
            }
        }
        Ok(None) => {
            hub.metrics.data_dropped();
            Flow::default()
        }
        Err(e) => {
            conn.send_error(Some(&sid.to_string()), &e, None);
            Flow::default()
        }
    }
}

struct Forward<'a> {
    frame: &'a Bytes,
    to: Role,
}

impl Change for Forward<'_> {
    /// Queued for the peer (`Some`, with its queue if that is congested), or dropped.
    type Output = Option<Option<Outbox>>;

    fn apply(self, session: &mut Session, conns: &Connections) -> Self::Output {
        let peer = session.seat(self.to)?;
        // Frames that waited for the peer are still being handed over: queued now, this one
        // would overtake them.
        if !peer.mailbox.is_empty() {
            return None;
        }
        let outbox = conns.get(peer.conn?)?;
        // Overflow drops the peer as a slow consumer, as for any frame.
        outbox.push(Frame::Binary(self.frame.clone())).ok()?;
        Some(outbox.is_congested().then_some(outbox))
    }
}
