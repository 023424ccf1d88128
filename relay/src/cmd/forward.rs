//! `MSG` and `MSG_READ`: the frame, byte for byte, to the other member of the session, or to
//! its mailbox while it is away. A `MSG`'s sender then gets `DELIVERED` with its `msgID`.

use parley_protocol::payload::{DeliveredData, MsgData};
use parley_protocol::{Envelope, ErrorCode, FrameError, FrameType, encode};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::budget::Budget;
use crate::hub::{Change, ConnState, Connections, Flow, Hub, Role, Session};
use crate::ids::SessionId;
use crate::journal::Journal;
use crate::limiter::AddressKey;
use crate::mailbox::MailboxLimits;
use crate::outbox::Outbox;

pub fn handle_msg(hub: &Hub, conn: &mut ConnState, env: &Envelope<'_>, frame: &Utf8Bytes) -> Flow {
    let data = match env.data::<MsgData>() {
        Ok(data) => data,
        Err(e) => {
            conn.send_error(env.sid(), &e, None);
            return Flow::default();
        }
    };
    let msg_id = match data.validate() {
        Ok(id) => id,
        Err(e) => {
            conn.send_error(env.sid(), &e, data.echoable_id());
            return Flow::default();
        }
    };
    match forward(hub, conn, env, frame) {
        Ok((flow, kept)) => {
            let data = DeliveredData { msg_id };
            let delivered = encode(FrameType::Delivered, env.sid(), Some(&data));
            match hub.journal().filter(|_| kept) {
                // Promised only once the kept frame is written where it outlives this node.
                Some(journal) => journal.when_durable(conn.outbox.clone(), delivered.into()),
                None => conn.send(delivered),
            }
            flow
        }
        Err(e) => {
            conn.send_error(env.sid(), &e, Some(msg_id));
            Flow::default()
        }
    }
}

pub fn handle(
    hub: &Hub,
    conn: &mut ConnState,
    env: &Envelope<'_>,
    frame: &Utf8Bytes,
) -> Result<Flow, FrameError> {
    forward(hub, conn, env, frame).map(|(flow, _)| flow)
}

/// Forwards or keeps the frame; whether it was kept in the mailbox.
fn forward(
    hub: &Hub,
    conn: &mut ConnState,
    env: &Envelope<'_>,
    frame: &Utf8Bytes,
) -> Result<(Flow, bool), FrameError> {
    let address = conn.address;
    let (_, delivery) = hub.member_update(conn, env, |session, role, sid| {
        if session.seat(role.other()).is_none() {
            return Err(FrameError::new(
                ErrorCode::NotPaired,
                "nobody has joined this session yet",
            ));
        }
        Ok(Forward {
            frame,
            sid,
            journal: hub.journal(),
            to: role.other(),
            from: address,
            budget: &hub.budget,
            limits: &hub.config.mailbox,
            queue: (
                hub.config.outbound_queue_frames,
                hub.config.outbound_queue_bytes,
            ),
        })
    })?;
    match delivery {
        Delivery::Sent { congested } => Ok((
            Flow {
                wait_for: congested,
                hand_over_pending: false,
                wait_until: None,
            },
            false,
        )),
        Delivery::Kept { wait_for } => Ok((
            Flow {
                wait_for,
                hand_over_pending: false,
                wait_until: None,
            },
            true,
        )),
        Delivery::StoreUnavailable => Err(FrameError::new(
            ErrorCode::StoreUnavailable,
            "your peer is offline and the relay cannot write to its shared store; keep the message and send it again shortly",
        )),
        Delivery::MailboxFull => Err(FrameError::new(
            ErrorCode::MailboxFull,
            "your peer is offline and its mailbox is full; keep the message and send it again when the peer is back",
        )),
    }
}

struct Forward<'a> {
    frame: &'a Utf8Bytes,
    sid: SessionId,
    /// In a cluster, where a kept frame is also written.
    journal: Option<&'a dyn Journal>,
    to: Role,
    /// The sender's address, which the mailboxed frame is charged to.
    from: AddressKey,
    budget: &'a std::sync::Arc<Budget>,
    limits: &'a MailboxLimits,
    /// The outbound queue's bounds (frames, bytes).
    queue: (usize, usize),
}

enum Delivery {
    /// On the peer's queue; `congested` if that queue is filling up (backpressure).
    Sent { congested: Option<Outbox> },
    /// In the peer's mailbox; if the peer is online (its mailbox is being handed over), the
    /// sender waits for the peer's queue to drain (backpressure).
    Kept { wait_for: Option<Outbox> },
    /// Neither: nothing changed.
    MailboxFull,
    /// It would have been kept, but the journal cannot take it now: nothing changed.
    StoreUnavailable,
}

impl Change for Forward<'_> {
    type Output = Delivery;

    fn apply(self, session: &mut Session, conns: &Connections) -> Delivery {
        let Some(peer) = session.seat_mut(self.to) else {
            return Delivery::MailboxFull; // ruled out by the decision
        };
        let online = peer.conn.and_then(|id| conns.get(id));
        // Straight to the peer, unless what waited for it is still being handed over: then
        // behind that, in order.
        if peer.mailbox.is_empty()
            && let Some(outbox) = &online
            && outbox.push(self.frame.clone()).is_ok()
        {
            let congested = outbox.is_congested().then(|| outbox.clone());
            return Delivery::Sent { congested };
        }
        // Offline, or being dropped as a slow consumer: keep it for the peer's return. An
        // online peer whose mailbox is still being handed over may hold a queue's worth more:
        // `mailbox_full` means "offline and full", and the sender is slowed down instead.
        let limits = match &online {
            Some(_) => MailboxLimits {
                max_frames: self.limits.max_frames.saturating_add(self.queue.0),
                max_bytes: self.limits.max_bytes.saturating_add(self.queue.1),
                ..*self.limits
            },
            None => *self.limits,
        };
        if !peer.mailbox.has_room(self.frame.len(), &limits) {
            return Delivery::MailboxFull;
        }
        if self.journal.is_some_and(|j| !j.has_room()) {
            return Delivery::StoreUnavailable;
        }
        let Some(charge) = self.budget.charge(self.from, self.frame.len()) else {
            return Delivery::MailboxFull;
        };
        match peer
            .mailbox
            .push(self.frame.clone(), charge, Instant::now(), &limits)
        {
            Ok(()) => {
                if let Some(journal) = self.journal {
                    journal.appended(self.sid, self.to, self.frame);
                }
                Delivery::Kept { wait_for: online }
            }
            Err(_) => Delivery::MailboxFull,
        }
    }
}
