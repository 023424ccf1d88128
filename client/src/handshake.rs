//! The pairing handshake as two sans-IO state machines, [`Host`] and [`Guest`]: each is fed
//! the relay's frames (text) and answers with [`Step`]s (frames to send, the code to show, the
//! paired session). No sockets, no clock: the driver adds timeouts.
//!
//! ```text
//! host                               relay                              guest
//! CREATE_SESSION            ──▶
//!                           ◀──  SESSION_CREATED {sid, resumeToken}
//! INVITE_CREATE {v,dh,pake} ──▶  (stored)
//!                           ◀──  INVITE_CODE {code}           code-secret read out ──▶
//!                                                        ◀──  JOIN {code, v, dh, pake}
//!                           ◀──  JOIN_REQUEST {v,dh,pake,clientID}
//!                                JOINED {v,dh,pake,resumeToken} ──▶
//! JOIN_ACCEPT {clientID, confirm: host} ──▶  JOINED {confirm} ──▶  checks host confirm
//!                           ◀──  MSG {kind: confirm, payload: guest confirm}
//! checks guest confirm: paired
//! MSG seq 1 Hello{name}     ──▶                              ──▶  decrypts: paired
//! ```
//! A failed check on either side sends `MSG {kind: abort}` so the other side stops waiting.

use parley_protocol::{Envelope, FrameType, encode};
use parley_state::{Role, Secret};
use spake2::{Ed25519Group, Identity, Password, Spake2};

use crate::code::InviteCode;
use crate::dh::{DhError, DhKeyPair};
use crate::keys::{self, SessionKeys, Transcript};
use crate::ratchet::Ratchet;
use crate::session::{NewSession, Plain, Session};
use crate::wire::{
    AcceptedData, ErrorData, HandshakeMsgData, InviteCodeData, JoinAcceptData, JoinData,
    JoinDeniedData, JoinDenyData, JoinRequestData, JoinedData, Offer, ResumeTokenData,
};
pub use crate::wire::{DENY_HANDSHAKE_FAILED, KIND_ABORT, KIND_CONFIRM};

pub const SPAKE2_ID_HOST: &[u8] = b"parley/v1/host";
pub const SPAKE2_ID_GUEST: &[u8] = b"parley/v1/guest";

/// What the driver must do next.
pub enum Step {
    /// Send this frame to the relay.
    Send(String),
    /// Host only: show this invite code to the person; it expires in `expires_in` seconds.
    Invite { code: InviteCode, expires_in: u64 },
    /// Pairing is complete and confirmed both ways.
    Paired(Box<Session>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    #[error("the relay refused: {message} ({code})")]
    Relay { code: String, message: String },
    #[error(
        "pairing failed: key confirmation did not match. Either the code was mistyped, or the relay altered the handshake. Nothing was stored; start again with a new code"
    )]
    ConfirmationFailed,
    #[error(
        "pairing failed: the other side could not confirm the keys (wrong code, or the relay altered the handshake). Nothing was stored; start again with a new code"
    )]
    PeerAborted,
    #[error(
        "pairing failed: the other side's public key is invalid ({0}); the relay may have altered it"
    )]
    InvalidPeerKey(DhError),
    #[error("pairing failed: the host refused this join")]
    Denied,
    #[error(
        "pairing failed: the invite code expired before anyone joined; run `host` again for a new one"
    )]
    InviteExpired,
    #[error("pairing failed: the other side left before pairing completed")]
    PeerLeft,
    #[error("pairing failed: the other side speaks protocol version {0}, this client speaks {v}", v = keys::PROTOCOL_VERSION)]
    Incompatible(String),
    #[error("pairing failed: unexpected or malformed handshake frame ({0})")]
    Protocol(&'static str),
    #[error("pairing failed: the operating system's random source failed")]
    Random,
}

/// What the driver needs from either side of the handshake.
pub trait Pairing {
    /// Feeds one frame from the relay; returns what to do next.
    fn handle(&mut self, text: &str) -> Result<Vec<Step>, PairingError>;
    /// After a failure: a last frame that tells the other side to stop waiting, if any.
    fn take_farewell(&mut self) -> Option<String>;
    /// Where the handshake is; the driver gives each stage its own deadline.
    fn stage(&self) -> &'static str;
    /// Waiting for someone to join: bounded by the code's lifetime, not by a step deadline.
    fn waiting_for_joiner(&self) -> bool {
        false
    }
}

impl Pairing for Host {
    fn handle(&mut self, text: &str) -> Result<Vec<Step>, PairingError> {
        Host::handle(self, text)
    }
    fn take_farewell(&mut self) -> Option<String> {
        Host::take_farewell(self)
    }
    fn stage(&self) -> &'static str {
        Host::stage(self)
    }
    fn waiting_for_joiner(&self) -> bool {
        Host::waiting_for_joiner(self)
    }
}

impl Pairing for Guest {
    fn handle(&mut self, text: &str) -> Result<Vec<Step>, PairingError> {
        Guest::handle(self, text)
    }
    fn take_farewell(&mut self) -> Option<String> {
        Guest::take_farewell(self)
    }
    fn stage(&self) -> &'static str {
        Guest::stage(self)
    }
}

impl Offer {
    /// Checks the version and decodes the DH public key and SPAKE2 message.
    fn decode(self) -> Result<(Vec<u8>, Vec<u8>), PairingError> {
        match self.v {
            Some(keys::PROTOCOL_VERSION) => {}
            Some(other) => return Err(PairingError::Incompatible(other.to_string())),
            None => {
                return Err(PairingError::Incompatible(
                    "none (not a parley client)".into(),
                ));
            }
        }
        let dh = self
            .dh
            .and_then(|h| hex::decode(h).ok())
            .ok_or(PairingError::Protocol("dh"))?;
        let pake = self
            .pake
            .and_then(|h| hex::decode(h).ok())
            .ok_or(PairingError::Protocol("pake"))?;
        Ok((dh, pake))
    }
}

fn parse_sid(sid: Option<&str>) -> Result<(String, [u8; 16]), PairingError> {
    let sid = sid.ok_or(PairingError::Protocol("sid"))?;
    let mut bytes = [0u8; 16];
    hex::decode_to_slice(sid, &mut bytes).map_err(|_| PairingError::Protocol("sid"))?;
    Ok((sid.to_string(), bytes))
}

fn abort_frame(sid: &str) -> String {
    encode(FrameType::Msg, Some(sid), Some(&HandshakeMsgData::abort()))
}

/// `ERROR` during pairing is fatal; `PING`s are for the driver; the rest is checked by state.
fn relay_error(env: &Envelope<'_>) -> PairingError {
    let (code, message) = error_fields(env);
    PairingError::Relay { code, message }
}

/// `code` and `message` of a relay `ERROR`, with stand-ins for a malformed one.
pub(crate) fn error_fields(env: &Envelope<'_>) -> (String, String) {
    let (code, message) = env
        .data::<ErrorData>()
        .map(|data| (data.code.into_owned(), data.message.into_owned()))
        .unwrap_or_default();
    let or = |field: String, stand_in: &str| {
        if field.is_empty() {
            stand_in.to_string()
        } else {
            field
        }
    };
    (or(code, "unknown"), or(message, "no reason given"))
}

/// What both sides do with a frame before their state machine sees it: ignore the relay's
/// chatter, fail on a refusal, pass the rest on.
fn triage(text: &str) -> Result<Option<Envelope<'_>>, PairingError> {
    let env = Envelope::parse(text).map_err(|_| PairingError::Protocol("unparsable frame"))?;
    match env.kind {
        FrameType::Ping | FrameType::Pong | FrameType::Delivered | FrameType::PeerOnline => {
            Ok(None)
        }
        FrameType::Error => Err(relay_error(&env)),
        FrameType::JoinDenied => {
            let reason = env.data::<JoinDeniedData>().ok().and_then(|d| d.reason);
            Err(match reason.as_deref() {
                Some(DENY_HANDSHAKE_FAILED) => PairingError::PeerAborted,
                _ => PairingError::Denied,
            })
        }
        _ => Ok(Some(env)),
    }
}

/// `data.kind` of a `MSG`, if any.
pub(crate) fn msg_kind(env: &Envelope<'_>) -> Option<String> {
    env.data::<HandshakeMsgData>().ok().and_then(|k| k.kind)
}

/// Computes the session keys once both offers are known.
fn agree(
    own_dh: &DhKeyPair,
    pake: Spake2<Ed25519Group>,
    peer_dh: &[u8],
    peer_pake: &[u8],
    transcript: &Transcript<'_>,
) -> Result<SessionKeys, PairingError> {
    let dh_secret = own_dh
        .shared_secret(peer_dh)
        .map_err(PairingError::InvalidPeerKey)?;
    // A malformed SPAKE2 message cannot lead to agreement; report it like a mismatch.
    let pake_key = zeroize::Zeroizing::new(
        pake.finish(peer_pake)
            .map_err(|_| PairingError::ConfirmationFailed)?,
    );
    Ok(keys::derive(
        dh_secret.as_ref(),
        &pake_key,
        &transcript.hash(),
    ))
}

struct Common {
    relay_url: String,
    dh: DhKeyPair,
    pake: Option<Spake2<Ed25519Group>>,
    pake_msg: Vec<u8>,
}

impl Common {
    /// The session the agreed keys make, for `role`. The guest's handshake key pair is its
    /// first ratchet key pair (Signal's Bob); the host (Alice) starts its ratchet with a fresh
    /// key pair against it (`peer_dh`, already validated).
    fn session(
        &self,
        role: Role,
        sid: String,
        sid_bytes: [u8; 16],
        resume_token: Secret,
        keys: &SessionKeys,
        peer_dh: &[u8],
    ) -> Result<Session, PairingError> {
        let root = keys.ratchet_root.clone();
        let ratchet = match role {
            Role::Host => {
                let own = DhKeyPair::generate().map_err(|_| PairingError::Random)?;
                Ratchet::initiator(root, own, peer_dh)
                    .map_err(|_| PairingError::Protocol("ratchet start"))?
            }
            Role::Guest => Ratchet::responder(root, self.dh.clone()),
        };
        Ok(Session::new(NewSession {
            sid,
            sid_bytes,
            role,
            relay_url: self.relay_url.clone(),
            resume_token,
            ratchet,
            safety_number: keys.safety_number.clone(),
            restore_proof: Secret::new(keys.restore_proof.clone()),
            now: now_secs(),
        }))
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------

enum HostState {
    AwaitSession,
    AwaitCode {
        sid: String,
        sid_bytes: [u8; 16],
        token: Secret,
    },
    AwaitJoin {
        sid: String,
        sid_bytes: [u8; 16],
        token: Secret,
    },
    AwaitConfirm {
        session: Box<Session>,
        guest_confirm: keys::Confirmation,
    },
    /// The host has sent its Hello; the guest's Hello proves the guest accepted the host's.
    AwaitHello {
        session: Box<Session>,
    },
    Done,
}

impl HostState {
    fn sid(&self) -> Option<&str> {
        match self {
            HostState::AwaitCode { sid, .. } | HostState::AwaitJoin { sid, .. } => Some(sid),
            HostState::AwaitConfirm { session, .. } | HostState::AwaitHello { session } => {
                Some(session.sid())
            }
            HostState::AwaitSession | HostState::Done => None,
        }
    }
}

pub struct Host {
    common: Common,
    name: String,
    secret: InviteCode,
    state: HostState,
    farewell: Option<String>,
}

impl Host {
    /// Starts pairing as host: draws the code's secret, the DH key and the SPAKE2 message.
    pub fn start(relay_url: &str, name: &str) -> Result<(Host, Vec<Step>), PairingError> {
        // The secret is chosen before the relay code is known; the placeholder relay part is
        // replaced when INVITE_CODE arrives.
        let secret =
            InviteCode::with_new_secret("000000").map_err(|_| PairingError::Protocol("code"))?;
        let dh = DhKeyPair::generate().map_err(|_| PairingError::Random)?;
        let (pake, pake_msg) = Spake2::<Ed25519Group>::start_a(
            &Password::new(secret.secret().as_bytes()),
            &Identity::new(SPAKE2_ID_HOST),
            &Identity::new(SPAKE2_ID_GUEST),
        );
        let common = Common {
            relay_url: relay_url.into(),
            dh,
            pake: Some(pake),
            pake_msg,
        };
        let first = encode::<()>(FrameType::CreateSession, None, None);
        Ok((
            Host {
                common,
                name: name.to_string(),
                secret,
                state: HostState::AwaitSession,
                farewell: None,
            },
            vec![Step::Send(first)],
        ))
    }

    /// Whether the host is waiting for someone to join (no time limit but the code's), as
    /// opposed to waiting for an answer that should come promptly.
    pub fn waiting_for_joiner(&self) -> bool {
        matches!(self.state, HostState::AwaitJoin { .. })
    }

    pub fn handle(&mut self, text: &str) -> Result<Vec<Step>, PairingError> {
        let Some(env) = triage(text)? else {
            return Ok(vec![]);
        };
        let sid = self.state.sid().map(str::to_string);
        let state = std::mem::replace(&mut self.state, HostState::Done);
        match self.step(state, &env) {
            Ok((next, steps)) => {
                self.state = next;
                Ok(steps)
            }
            Err(e) => Err(self.failed(e, sid)),
        }
    }

    /// Where the handshake is, for the driver's per-step deadline.
    pub fn stage(&self) -> &'static str {
        match self.state {
            HostState::AwaitSession => "session",
            HostState::AwaitCode { .. } => "code",
            HostState::AwaitJoin { .. } => "join",
            HostState::AwaitConfirm { .. } => "confirm",
            HostState::AwaitHello { .. } => "hello",
            HostState::Done => "done",
        }
    }

    fn step(
        &mut self,
        state: HostState,
        env: &Envelope<'_>,
    ) -> Result<(HostState, Vec<Step>), PairingError> {
        match (state, env.kind) {
            (HostState::AwaitSession, FrameType::SessionCreated) => {
                let (sid, sid_bytes) = parse_sid(env.sid())?;
                let created: ResumeTokenData = env
                    .data()
                    .map_err(|_| PairingError::Protocol("resumeToken"))?;
                let token = Secret::new(created.resume_token);
                let data = Offer::new(self.common.dh.public(), &self.common.pake_msg);
                let invite = encode(FrameType::InviteCreate, Some(&sid), Some(&data));
                Ok((
                    HostState::AwaitCode {
                        sid,
                        sid_bytes,
                        token,
                    },
                    vec![Step::Send(invite)],
                ))
            }
            (
                HostState::AwaitCode {
                    sid,
                    sid_bytes,
                    token,
                },
                FrameType::InviteCode,
            ) => {
                // (Without `expiresIn`, the default lifetime.)
                let code: InviteCodeData = env
                    .data()
                    .map_err(|_| PairingError::Protocol("INVITE_CODE"))?;
                let full = self
                    .secret
                    .with_relay_code(&code.code)
                    .map_err(|_| PairingError::Protocol("relay code is not 6 digits"))?;
                let expires_in = code.expires_in;
                Ok((
                    HostState::AwaitJoin {
                        sid,
                        sid_bytes,
                        token,
                    },
                    vec![Step::Invite {
                        code: full,
                        expires_in,
                    }],
                ))
            }
            (
                HostState::AwaitJoin {
                    sid,
                    sid_bytes,
                    token,
                },
                FrameType::JoinRequest,
            ) => {
                let request: JoinRequestData = env
                    .data()
                    .map_err(|_| PairingError::Protocol("JOIN_REQUEST"))?;
                let client_id = request
                    .client_id
                    .ok_or(PairingError::Protocol("clientID"))?;
                let deny = encode(
                    FrameType::JoinDeny,
                    Some(&sid),
                    Some(&JoinDenyData::handshake_failed(&client_id)),
                );
                let pake = self
                    .common
                    .pake
                    .take()
                    .ok_or(PairingError::Protocol("second join"))?;
                let agreed = request.offer.decode().and_then(|(guest_dh, guest_pake)| {
                    let transcript = Transcript {
                        sid: &sid_bytes,
                        host_dh: self.common.dh.public(),
                        guest_dh: &guest_dh,
                        host_pake: &self.common.pake_msg,
                        guest_pake: &guest_pake,
                    };
                    let keys = agree(&self.common.dh, pake, &guest_dh, &guest_pake, &transcript)?;
                    Ok((keys, guest_dh))
                });
                let (keys, guest_dh) = match agreed {
                    Ok(agreed) => agreed,
                    // Tell the joiner, so it does not wait; the pairing is over either way.
                    Err(e) => return Err(self.fail_with(e, deny)),
                };
                let accept = encode(
                    FrameType::JoinAccept,
                    Some(&sid),
                    Some(&JoinAcceptData {
                        client_id,
                        confirm: keys.host_confirm.to_hex(),
                    }),
                );
                let session =
                    self.common
                        .session(Role::Host, sid, sid_bytes, token, &keys, &guest_dh)?;
                let guest_confirm = keys.guest_confirm.clone();
                Ok((
                    HostState::AwaitConfirm {
                        session: Box::new(session),
                        guest_confirm,
                    },
                    vec![Step::Send(accept)],
                ))
            }
            (
                HostState::AwaitConfirm {
                    session,
                    guest_confirm,
                },
                FrameType::Msg,
            ) => {
                let msg: HandshakeMsgData =
                    env.data().map_err(|_| PairingError::Protocol("MSG"))?;
                match msg.kind.as_deref() {
                    Some(KIND_CONFIRM) => {}
                    Some(KIND_ABORT) => return Err(PairingError::PeerAborted),
                    _ => {
                        return Err(PairingError::Protocol(
                            "chat message before key confirmation",
                        ));
                    }
                }
                if !guest_confirm.matches_hex(msg.payload.as_deref().unwrap_or_default()) {
                    return Err(PairingError::ConfirmationFailed);
                }
                // Confirmed: the first message says who we are. Nothing is stored until the
                // guest's own Hello shows it accepted ours.
                let mut session = session;
                let hello = seal_hello(&mut session, &self.name)?;
                Ok((HostState::AwaitHello { session }, vec![Step::Send(hello)]))
            }
            (HostState::AwaitHello { mut session }, FrameType::Msg) => {
                open_hello(&mut session, env)?;
                Ok((HostState::Done, vec![Step::Paired(session)]))
            }
            (
                HostState::AwaitJoin { .. }
                | HostState::AwaitConfirm { .. }
                | HostState::AwaitHello { .. },
                FrameType::PeerOffline,
            ) => Err(PairingError::PeerLeft),
            _ => Err(PairingError::Protocol("frame out of order")),
        }
    }

    /// After a failure: a last frame that tells the other side to stop waiting, if any.
    pub fn take_farewell(&mut self) -> Option<String> {
        self.farewell.take()
    }

    fn fail_with(&mut self, error: PairingError, farewell: String) -> PairingError {
        self.state = HostState::Done;
        self.farewell = Some(farewell);
        error
    }

    /// Any failure once the session exists tells the other side (unless a more specific
    /// farewell, such as `JOIN_DENY`, was already chosen).
    fn failed(&mut self, error: PairingError, sid: Option<String>) -> PairingError {
        self.state = HostState::Done;
        if self.farewell.is_none()
            && let Some(sid) = sid
        {
            self.farewell = Some(abort_frame(&sid));
        }
        error
    }
}

// ---------------------------------------------------------------------------------------------

enum GuestState {
    AwaitJoined,
    AwaitAccept {
        session: Box<Session>,
        host_confirm: keys::Confirmation,
        guest_confirm: keys::Confirmation,
    },
    AwaitHello {
        session: Box<Session>,
    },
    Done,
}

impl GuestState {
    fn sid(&self) -> Option<&str> {
        match self {
            GuestState::AwaitAccept { session, .. } | GuestState::AwaitHello { session } => {
                Some(session.sid())
            }
            GuestState::AwaitJoined | GuestState::Done => None,
        }
    }
}

pub struct Guest {
    common: Common,
    name: String,
    state: GuestState,
    farewell: Option<String>,
}

impl Guest {
    /// Starts pairing as guest with the code the host read out.
    pub fn start(
        code: &InviteCode,
        relay_url: &str,
        name: &str,
    ) -> Result<(Guest, Vec<Step>), PairingError> {
        let dh = DhKeyPair::generate().map_err(|_| PairingError::Random)?;
        let (pake, pake_msg) = Spake2::<Ed25519Group>::start_b(
            &Password::new(code.secret().as_bytes()),
            &Identity::new(SPAKE2_ID_HOST),
            &Identity::new(SPAKE2_ID_GUEST),
        );
        let data = JoinData {
            code: code.relay_code().to_string(),
            offer: Offer::new(dh.public(), &pake_msg),
        };
        let join = encode(FrameType::Join, None, Some(&data));
        let common = Common {
            relay_url: relay_url.into(),
            dh,
            pake: Some(pake),
            pake_msg,
        };
        let guest = Guest {
            common,
            name: name.to_string(),
            state: GuestState::AwaitJoined,
            farewell: None,
        };
        Ok((guest, vec![Step::Send(join)]))
    }

    pub fn handle(&mut self, text: &str) -> Result<Vec<Step>, PairingError> {
        let Some(env) = triage(text)? else {
            return Ok(vec![]);
        };
        // Once the relay has named the session, any failure is told to the host.
        let sid = self
            .state
            .sid()
            .or(env.sid().filter(|_| env.kind == FrameType::Joined))
            .map(str::to_string);
        let state = std::mem::replace(&mut self.state, GuestState::Done);
        match self.step(state, &env) {
            Ok((next, steps)) => {
                self.state = next;
                Ok(steps)
            }
            Err(e) => {
                self.farewell = sid.map(|sid| abort_frame(&sid));
                Err(e)
            }
        }
    }

    /// Where the handshake is, for the driver's per-step deadline.
    pub fn stage(&self) -> &'static str {
        match self.state {
            GuestState::AwaitJoined => "joined",
            GuestState::AwaitAccept { .. } => "accept",
            GuestState::AwaitHello { .. } => "hello",
            GuestState::Done => "done",
        }
    }

    fn step(
        &mut self,
        state: GuestState,
        env: &Envelope<'_>,
    ) -> Result<(GuestState, Vec<Step>), PairingError> {
        match (state, env.kind) {
            (GuestState::AwaitJoined, FrameType::Joined) => {
                let (sid, sid_bytes) = parse_sid(env.sid())?;
                let joined: JoinedData =
                    env.data().map_err(|_| PairingError::Protocol("JOINED"))?;
                let token = Secret::new(
                    joined
                        .resume_token
                        .ok_or(PairingError::Protocol("resumeToken"))?,
                );
                let (host_dh, host_pake) = joined.offer.decode()?;
                let pake = self
                    .common
                    .pake
                    .take()
                    .ok_or(PairingError::Protocol("second JOINED"))?;
                let transcript = Transcript {
                    sid: &sid_bytes,
                    host_dh: &host_dh,
                    guest_dh: self.common.dh.public(),
                    host_pake: &host_pake,
                    guest_pake: &self.common.pake_msg,
                };
                let keys = agree(&self.common.dh, pake, &host_dh, &host_pake, &transcript)?;
                let session =
                    self.common
                        .session(Role::Guest, sid, sid_bytes, token, &keys, &host_dh)?;
                let state = GuestState::AwaitAccept {
                    session: Box::new(session),
                    host_confirm: keys.host_confirm.clone(),
                    guest_confirm: keys.guest_confirm.clone(),
                };
                Ok((state, vec![]))
            }
            (
                GuestState::AwaitAccept {
                    session,
                    host_confirm,
                    guest_confirm,
                },
                FrameType::Joined,
            ) => {
                // With the member's token (protocol.md 2.2): it replaces the joiner's, and
                // only it lets a relay that forgot the session re-create it.
                let accepted: AcceptedData =
                    env.data().map_err(|_| PairingError::Protocol("JOINED"))?;
                if !host_confirm.matches_hex(accepted.confirm.as_deref().unwrap_or_default()) {
                    return Err(PairingError::ConfirmationFailed);
                }
                let mut session = session;
                if let Some(token) = accepted.resume_token {
                    session.replace_resume_token(Secret::new(token));
                }
                let data = HandshakeMsgData::confirm(guest_confirm.to_hex());
                let confirm = encode(FrameType::Msg, Some(session.sid()), Some(&data));
                Ok((
                    GuestState::AwaitHello { session },
                    vec![Step::Send(confirm)],
                ))
            }
            (GuestState::AwaitHello { mut session }, FrameType::Msg) => {
                // The host's Hello decrypting proves it accepted our confirmation; ours
                // tells it we are done too.
                open_hello(&mut session, env)?;
                let hello = seal_hello(&mut session, &self.name)?;
                Ok((
                    GuestState::Done,
                    vec![Step::Send(hello), Step::Paired(session)],
                ))
            }
            (
                GuestState::AwaitAccept { .. } | GuestState::AwaitHello { .. },
                FrameType::PeerOffline,
            ) => Err(PairingError::PeerLeft),
            _ => Err(PairingError::Protocol("frame out of order")),
        }
    }

    /// After a failure: a last frame that tells the other side to stop waiting, if any.
    pub fn take_farewell(&mut self) -> Option<String> {
        self.farewell.take()
    }
}

/// The first encrypted message: who we are.
fn seal_hello(session: &mut Session, name: &str) -> Result<String, PairingError> {
    let hello = Plain::Hello {
        name: name.to_string(),
    };
    let (_, frame) = session
        .seal(&hello)
        .map_err(|_| PairingError::Protocol("cannot encrypt the hello"))?;
    Ok(frame)
}

/// Reads the peer's Hello (or its abort) and records its name.
fn open_hello(session: &mut Session, env: &Envelope<'_>) -> Result<(), PairingError> {
    match msg_kind(env).as_deref() {
        Some(KIND_ABORT) => return Err(PairingError::PeerAborted),
        Some(_) => return Err(PairingError::Protocol("unexpected handshake message")),
        None => {}
    }
    let incoming = session
        .open(env)
        .map_err(|_| PairingError::ConfirmationFailed)?;
    match incoming.plain {
        Plain::Hello { name } => {
            session.set_peer_name(name);
            Ok(())
        }
        Plain::Text { .. }
        | Plain::Unknown
        | Plain::BadOffer { .. }
        | Plain::FileOffer(_)
        | Plain::FileAccept(_)
        | Plain::FileDecline(_)
        | Plain::FileDone(_)
        | Plain::FileFailed(_) => Err(PairingError::Protocol("chat message before the hello")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const SID: &str = "00112233445566778899aabbccddeeff";

    /// The frames to send. Each one's `data` is written as protocol.md 3.2 shows Parley's
    /// frames: compact, members sorted by key (as the relay's re-encoding leaves them).
    fn sends(steps: Vec<Step>) -> Vec<String> {
        let frames: Vec<String> = steps
            .into_iter()
            .filter_map(|s| if let Step::Send(f) = s { Some(f) } else { None })
            .collect();
        for frame in &frames {
            if let Some(data) = Envelope::parse(frame).unwrap().raw_data() {
                let sorted = serde_json::from_str::<Value>(data.get()).unwrap();
                assert_eq!(data.get(), sorted.to_string(), "{frame}");
            }
        }
        frames
    }

    fn only_send(steps: Vec<Step>) -> Value {
        let frames = sends(steps);
        assert_eq!(frames.len(), 1);
        serde_json::from_str(&frames[0]).unwrap()
    }

    fn frame(t: &str, data: Value) -> String {
        json!({"t": t, "sid": SID, "data": data}).to_string()
    }

    /// Where a test relay may interfere with the handshake.
    #[derive(Clone, Copy)]
    enum Tamper {
        None,
        WrongSecret,
        SwapGuestDh,
        SwapHostDh,
        AlterGuestPake,
        AlterHostConfirm,
        AlterGuestConfirm,
        AlterHostHello,
    }

    struct Outcome {
        host: Result<Box<Session>, PairingError>,
        guest: Result<Box<Session>, PairingError>,
    }

    fn paired(steps: Vec<Step>) -> Option<Box<Session>> {
        steps.into_iter().find_map(|s| {
            if let Step::Paired(session) = s {
                Some(session)
            } else {
                None
            }
        })
    }

    /// Runs both sides against a scripted relay that behaves like parley-relay, except where
    /// `tamper` says otherwise.
    fn run(tamper: Tamper) -> Outcome {
        let (mut host, steps) = Host::start("ws://relay", "alice").unwrap();
        assert_eq!(only_send(steps)["t"], "CREATE_SESSION");
        let invite = only_send(
            host.handle(&frame("SESSION_CREATED", json!({"resumeToken": "aa"})))
                .unwrap(),
        );
        assert_eq!(invite["t"], "INVITE_CREATE");
        let stored = invite["data"].clone();
        let steps = host
            .handle(&frame(
                "INVITE_CODE",
                json!({"code": "123456", "expiresIn": 600}),
            ))
            .unwrap();
        let Some(Step::Invite { code, .. }) = steps.into_iter().next() else {
            panic!("no invite")
        };
        assert_eq!(code.relay_code(), "123456");
        let code = match tamper {
            Tamper::WrongSecret => {
                let wrong = if code.secret() == "000000" {
                    "000001"
                } else {
                    "000000"
                };
                format!("123456-{wrong}").parse().unwrap()
            }
            _ => code,
        };

        let (mut guest, steps) = Guest::start(&code, "ws://relay", "bob").unwrap();
        let join = only_send(steps);
        assert_eq!(join["data"]["code"], "123456");
        let mut request = join["data"].clone();
        request.as_object_mut().unwrap().remove("code");
        request["clientID"] = json!("c1");
        let mut joined = stored.clone();
        joined["resumeToken"] = json!("bb");
        let other_dh = hex::encode(DhKeyPair::generate().unwrap().public());
        match tamper {
            Tamper::SwapGuestDh => request["dh"] = json!(other_dh),
            Tamper::SwapHostDh => joined["dh"] = json!(other_dh),
            Tamper::AlterGuestPake => {
                let (_, other) = Spake2::<Ed25519Group>::start_b(
                    &Password::new(b"999999"),
                    &Identity::new(SPAKE2_ID_HOST),
                    &Identity::new(SPAKE2_ID_GUEST),
                );
                request["pake"] = json!(hex::encode(other));
            }
            _ => {}
        }

        let host_result = host.handle(&frame("JOIN_REQUEST", request));
        assert!(guest.handle(&frame("JOINED", joined)).unwrap().is_empty());
        let mut accept = match host_result {
            Ok(steps) => only_send(steps),
            Err(e) => {
                let farewell: Value = serde_json::from_str(&host.take_farewell().unwrap()).unwrap();
                assert_eq!(farewell["t"], "JOIN_DENY");
                let guest = guest
                    .handle(&frame("JOIN_DENIED", json!({})))
                    .map(|_| unreachable!());
                return Outcome {
                    host: Err(e),
                    guest,
                };
            }
        };
        assert_eq!(accept["t"], "JOIN_ACCEPT");
        if let Tamper::AlterHostConfirm = tamper {
            accept["data"]["confirm"] = json!("00".repeat(32));
        }
        let mut second = accept["data"].clone();
        second.as_object_mut().unwrap().remove("clientID");
        // The relay gives the accepted guest its member's token.
        second["resumeToken"] = json!("member");
        let confirm = match guest.handle(&frame("JOINED", second)) {
            Ok(steps) => sends(steps).remove(0),
            Err(e) => {
                let abort = guest.take_farewell().unwrap();
                let host = host.handle(&abort).map(|_| unreachable!());
                return Outcome {
                    host,
                    guest: Err(e),
                };
            }
        };
        let mut confirm: Value = serde_json::from_str(&confirm).unwrap();
        if let Tamper::AlterGuestConfirm = tamper {
            confirm["data"]["payload"] = json!("00".repeat(32));
        }
        let mut host_hello: Value = match host.handle(&confirm.to_string()) {
            Ok(steps) => only_send(steps),
            Err(e) => {
                let abort = host.take_farewell().unwrap();
                let guest = guest.handle(&abort).map(|_| unreachable!());
                return Outcome {
                    host: Err(e),
                    guest,
                };
            }
        };
        if let Tamper::AlterHostHello = tamper {
            let payload = host_hello["data"]["payload"].as_str().unwrap().to_string();
            let flipped = if payload.ends_with('0') { "1" } else { "0" };
            host_hello["data"]["payload"] =
                json!(format!("{}{flipped}", &payload[..payload.len() - 1]));
        }
        let steps = match guest.handle(&host_hello.to_string()) {
            Ok(steps) => steps,
            Err(e) => {
                let abort = guest.take_farewell().unwrap();
                let host = host.handle(&abort).map(|_| unreachable!());
                return Outcome {
                    host,
                    guest: Err(e),
                };
            }
        };
        let guest_hello = sends(
            steps
                .iter()
                .filter_map(|s| match s {
                    Step::Send(f) => Some(Step::Send(f.clone())),
                    _ => None,
                })
                .collect(),
        )
        .remove(0);
        let guest_session = paired(steps).unwrap();
        let host_session = paired(host.handle(&guest_hello).unwrap()).unwrap();
        Outcome {
            host: Ok(host_session),
            guest: Ok(guest_session),
        }
    }

    #[test]
    fn honest_relay_pairs_with_equal_keys() {
        let Outcome { host, guest } = run(Tamper::None);
        let (mut host, mut guest) = (host.unwrap(), guest.unwrap());
        assert_eq!(host.safety_number(), guest.safety_number());
        assert_eq!(
            guest.resume_token().expose(),
            "member",
            "the member's token from the second JOINED replaced the joiner's"
        );
        assert_eq!(guest.peer_name(), Some("alice"));
        assert_eq!(host.peer_name(), Some("bob"));
        let (_, frame) = guest.seal(&Plain::Text { text: "hi".into() }).unwrap();
        let got = host.open(&Envelope::parse(&frame).unwrap()).unwrap();
        assert_eq!(got.plain, Plain::Text { text: "hi".into() });
    }

    #[test]
    fn wrong_code_fails_on_both_sides() {
        let Outcome { host, guest } = run(Tamper::WrongSecret);
        assert_eq!(guest.err(), Some(PairingError::ConfirmationFailed));
        assert_eq!(host.err(), Some(PairingError::PeerAborted));
    }

    #[test]
    fn any_tampering_fails_on_both_sides() {
        for tamper in [
            Tamper::SwapGuestDh,
            Tamper::SwapHostDh,
            Tamper::AlterGuestPake,
            Tamper::AlterHostConfirm,
            Tamper::AlterGuestConfirm,
            Tamper::AlterHostHello,
        ] {
            // Neither side may end up paired (and so store a session) while the other fails.
            let Outcome { host, guest } = run(tamper);
            assert!(
                host.is_err() && guest.is_err(),
                "pairing survived tampering"
            );
        }
    }

    #[test]
    fn invalid_dh_key_aborts_and_denies() {
        let (mut host, _) = Host::start("ws://relay", "alice").unwrap();
        host.handle(&frame("SESSION_CREATED", json!({"resumeToken": "aa"})))
            .unwrap();
        host.handle(&frame("INVITE_CODE", json!({"code": "123456"})))
            .unwrap();
        let (_, pake) = Spake2::<Ed25519Group>::start_b(
            &Password::new(b"1"),
            &Identity::new(SPAKE2_ID_HOST),
            &Identity::new(SPAKE2_ID_GUEST),
        );
        let mut one = [0u8; 256];
        one[255] = 1;
        let request =
            json!({"v": 1, "dh": hex::encode(one), "pake": hex::encode(pake), "clientID": "c"});
        assert!(matches!(
            host.handle(&frame("JOIN_REQUEST", request)),
            Err(PairingError::InvalidPeerKey(_))
        ));
        assert!(host.take_farewell().unwrap().contains("JOIN_DENY"));
    }

    #[test]
    fn relay_errors_and_version_mismatch_are_reported() {
        let code: InviteCode = "123456-654321".parse().unwrap();
        let (mut guest, _) = Guest::start(&code, "ws://relay", "bob").unwrap();
        let err = guest
            .handle(&frame(
                "ERROR",
                json!({"code": "invite_used", "message": "used"}),
            ))
            .err();
        assert_eq!(
            err,
            Some(PairingError::Relay {
                code: "invite_used".into(),
                message: "used".into()
            })
        );
        let (mut guest, _) = Guest::start(&code, "ws://relay", "bob").unwrap();
        let joined = json!({"v": 2, "dh": "00", "pake": "00", "resumeToken": "t"});
        assert!(matches!(
            guest.handle(&frame("JOINED", joined)),
            Err(PairingError::Incompatible(_))
        ));
    }
}

#[cfg(test)]
mod abort_tests {
    use super::*;
    use serde_json::json;

    const DOCUMENT: &str = include_str!("../../protocol.md");

    /// protocol.md 3.2 shows Parley's own frames: each is a frame, and the abort is exactly
    /// what this code sends (msgID included: the relay requires one).
    #[test]
    fn protocol_md_shows_the_frames_parley_sends() {
        let block: Vec<&str> = DOCUMENT
            .split("Parley's frames, in the order of a successful pairing")
            .nth(1)
            .and_then(|rest| rest.split("```json\n").nth(1))
            .and_then(|rest| rest.split("```").next())
            .unwrap()
            .lines()
            .collect();
        assert!(block.len() >= 15, "{block:?}");
        for line in &block {
            Envelope::parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
        let abort = abort_frame("7f1c0d2e9a4b3c5d6e7f8091a2b3c4d5");
        assert!(block.contains(&abort.as_str()), "{abort}");
    }

    #[test]
    fn a_guest_failing_after_joined_tells_the_host() {
        let code: InviteCode = "123456-654321".parse().unwrap();
        let (mut guest, _) = Guest::start(&code, "ws://relay", "bob").unwrap();
        let sid = "00112233445566778899aabbccddeeff";
        let joined = json!({"t": "JOINED", "sid": sid, "data": {"v": 2, "dh": "00", "pake": "00", "resumeToken": "t"}});
        assert!(guest.handle(&joined.to_string()).is_err());
        let farewell = guest.take_farewell().expect("an abort for the host");
        assert!(farewell.contains("\"kind\":\"abort\"") && farewell.contains(sid));
    }
}
