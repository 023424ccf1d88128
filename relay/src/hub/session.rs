//! A session record: what the relay knows of one two-party session. Plain data, with no
//! connection in it (a seat names its connection by id; the outboxes are the node's own, in
//! [`Connections`](super::store::Connections)), so that a record can live in a shared store.

use parley_protocol::payload::OpaqueData;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::budget::Charge;
use crate::ids::{ClientId, InviteCode, TokenNonce};
use crate::mailbox::Mailbox;
use crate::outbox::ConnId;

/// A member's place in a two-party session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Host,
    Guest,
}

impl Role {
    pub fn other(self) -> Role {
        match self {
            Role::Host => Role::Guest,
            Role::Guest => Role::Host,
        }
    }

    /// The role's byte in a resume token's MAC input.
    pub fn wire_byte(self) -> u8 {
        match self {
            Role::Host => 1,
            Role::Guest => 2,
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "host" => Some(Role::Host),
            "guest" => Some(Role::Guest),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct Seat {
    /// The nonce of the token this seat belongs to. `None` only in a session re-created from
    /// the other member's token, until this seat's owner comes back with its own.
    pub token_nonce: Option<TokenNonce>,
    pub client_id: ClientId,
    /// The connection sitting in this seat, if any.
    pub conn: Option<ConnId>,
    /// Frames for this seat's member while it is offline, or not yet handed over.
    pub mailbox: Mailbox,
}

impl Seat {
    pub fn new(token_nonce: Option<TokenNonce>, conn: Option<ConnId>) -> Seat {
        Seat {
            token_nonce,
            client_id: ClientId::random(),
            conn,
            mailbox: Mailbox::default(),
        }
    }

    pub fn held_by(&self, id: ConnId) -> bool {
        self.conn == Some(id)
    }

    /// Whether a verified token with this nonce is this seat's.
    pub fn accepts(&self, nonce: TokenNonce) -> bool {
        self.token_nonce.is_none_or(|n| n == nonce)
    }
}

/// A `JOIN_REQUEST` the host has not answered yet, charged to the joiner's address.
#[derive(Debug)]
pub struct PendingJoin {
    pub frame: Utf8Bytes,
    pub _charge: Charge,
}

#[derive(Debug)]
pub struct Session {
    pub host: Seat,
    pub guest: Option<Seat>,
    /// The invite most recently issued for this session (it may since have expired).
    pub invite: Option<InviteCode>,
    /// What the host stored with `INVITE_CREATE`, handed to the joiner in the first `JOINED`.
    pub invite_params: Option<OpaqueData>,
    /// Pushed to the host at `JOIN`, and again on each host re-attach until answered, so a
    /// host whose connection was silently dead still gets it.
    pub pending_join: Option<PendingJoin>,
    /// Since when no member has been connected.
    pub idle_since: Option<Instant>,
}

impl Session {
    pub fn seat(&self, role: Role) -> Option<&Seat> {
        match role {
            Role::Host => Some(&self.host),
            Role::Guest => self.guest.as_ref(),
        }
    }

    pub fn seat_mut(&mut self, role: Role) -> Option<&mut Seat> {
        match role {
            Role::Host => Some(&mut self.host),
            Role::Guest => self.guest.as_mut(),
        }
    }

    pub fn anyone_connected(&self) -> bool {
        self.host.conn.is_some() || self.guest.as_ref().is_some_and(|g| g.conn.is_some())
    }

    /// Paired, with both members' tokens known. An unpaired session, or a re-created one whose
    /// other seat still awaits its owner, is not worth keeping long when idle.
    pub fn is_established(&self) -> bool {
        self.state() == SessionState::Paired
    }

    pub fn state(&self) -> SessionState {
        match &self.guest {
            None => SessionState::Unpaired,
            Some(guest) if self.host.token_nonce.is_some() && guest.token_nonce.is_some() => {
                SessionState::Paired
            }
            Some(_) => SessionState::AwaitingMember,
        }
    }
}

/// Where a session is in its life, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Nobody has joined yet.
    Unpaired = 0,
    Paired = 1,
    /// Re-created from one member's token; the other has not come back yet.
    AwaitingMember = 2,
}

pub struct Invite {
    pub sid: crate::ids::SessionId,
    pub expires_at: Instant,
    pub used: bool,
}
