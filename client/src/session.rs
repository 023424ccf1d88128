//! A paired session: its ratchet and counters, and the delivery rules that make every message
//! arrive exactly once and in order (protocol.md 3.6, 3.7). Sans-IO: the caller persists the
//! session (via [`Session::record`]) at the points each method documents, and moves the frames.
//!
//! Sending: every message is sealed once with the next sequence number and kept in the
//! outbox, as the exact frame, until the peer's end-to-end receipt covers it; the caller sends
//! (and re-sends) [`Session::unacked`] in order. Receiving: messages are shown strictly in
//! sequence order; one that arrives early is decrypted (its key, like every key, is used once)
//! and waits, recorded, for the gap to fill; one that arrives again is dropped unread.
//! Receipts are cumulative ("everything up to N"), so a lost or
//! replayed receipt does no harm.

use std::collections::BTreeMap;

use parley_protocol::{Envelope, FrameType, encode};
use parley_state::{OutboxEntry, Role, Secret, SessionRecord, Unshown};
use serde::{Deserialize, Serialize};

use crate::dh::DhKeyPair;
use crate::files::offer::{FileAccept, FileDecline, FileDone, FileFailed, FileOffer};
use crate::message::{self, Direction, MessageError};
use crate::ratchet::{Ratchet, RatchetError};
use crate::wire::{ChatMsgData, ReceiptData};

/// What travels inside a `MSG`'s encryption. `k` names the kind; receivers ignore unknown fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
pub enum Plain {
    /// The first message each side sends after pairing: who it is.
    Hello { name: String },
    /// A chat line.
    Text { text: String },
    /// File transfer messages (protocol.md 3.10; `crate::files`).
    #[serde(rename = "file_offer")]
    FileOffer(FileOffer),
    #[serde(rename = "file_accept")]
    FileAccept(FileAccept),
    #[serde(rename = "file_decline")]
    FileDecline(FileDecline),
    #[serde(rename = "file_done")]
    FileDone(FileDone),
    #[serde(rename = "file_failed")]
    FileFailed(FileFailed),
    /// A `file_offer` whose members do not all read (a key that is not 64 hex digits, a
    /// size beyond u64, ...), with the file id it names: declined `bad_offer` (protocol.md
    /// 3.10), or its sender would wait for an answer for ever. Never sent.
    #[serde(skip)]
    BadOffer { id: crate::files::FileId },
    /// A kind this version does not know (from a newer peer): received and counted, so the
    /// stream goes on, but not shown.
    #[serde(other)]
    Unknown,
}

impl Plain {
    /// A decrypted plaintext: what it says; a `file_offer` that does not read, as
    /// [`Plain::BadOffer`] if its id does; anything else not understood, [`Plain::Unknown`].
    pub fn read(plaintext: &[u8]) -> Plain {
        #[derive(Deserialize)]
        struct Named {
            k: String,
            id: Option<String>,
        }
        serde_json::from_slice(plaintext).unwrap_or_else(|_| {
            match serde_json::from_slice::<Named>(plaintext) {
                Ok(Named { k, id: Some(id) }) if k == "file_offer" => {
                    crate::files::parse_id(&id).map_or(Plain::Unknown, |id| Plain::BadOffer { id })
                }
                _ => Plain::Unknown,
            }
        })
    }
}

/// What travels inside a receipt (`MSG_READ`): everything up to `upto` was delivered (recorded
/// by the peer) or read (shown on a person's terminal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
pub enum Receipt {
    Delivered { upto: u64 },
    Read { upto: u64 },
}

/// A decrypted message with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub seq: u64,
    pub plain: Plain,
}

/// How many unacknowledged messages may be on their way at once; the rest wait for receipts,
/// so that a burst (a resend after reconnecting, say) never overflows the relay's queue.
pub const SEND_WINDOW: usize = 64;

/// The most messages that may wait unacknowledged in the outbox (protocol.md 3.7). With
/// [`MAX_OUTBOX_BYTES`] it bounds the state file, which every message rewrites: a save costs
/// the same however long the conversation has been.
pub const MAX_OUTBOX: usize = 1000;

/// The most bytes of frames the outbox may hold: 64 maximum-length frames, a few MiB of state
/// file, far under the loader's limit (`parley_state::MAX_STATE_BYTES`).
pub const MAX_OUTBOX_BYTES: usize = 4 * 1024 * 1024;

/// The most bytes of frames the outboxes of all the sessions in one state file may hold
/// together: a file holds one record per pairing, and their outboxes add up. A session's own
/// bound is what is left of this beside the others' ([`Session::share_outbox_budget`]).
pub const MAX_STATE_OUTBOX_BYTES: usize = 16 * 1024 * 1024;

/// Messages that arrived ahead of a gap wait for it (recorded) if they are at most this far
/// ahead; further ones are dropped unread, to come again. Twice the window: a conforming
/// sender never gets further ahead than the window.
pub const MAX_EARLY: u64 = 2 * SEND_WINDOW as u64;
/// AAD label of receipts (messages use `message::AAD_LABEL`).
pub const RECEIPT_AAD_LABEL: &[u8] = b"parley/v1/receipt";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error(
        "message too long to send: a frame may be at most {max} bytes (about {} bytes of text)",
        max / 2 - 64
    )]
    TooLong { max: usize },
    #[error("this session has used up its sequence numbers; pair again")]
    Exhausted,
    #[error(
        "the outbox is full ({MAX_OUTBOX} messages or {MAX_OUTBOX_BYTES} bytes wait for the peer's receipts); wait for them to be delivered"
    )]
    OutboxFull,
    #[error(transparent)]
    Crypto(#[from] MessageError),
    #[error(transparent)]
    Ratchet(#[from] RatchetError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    #[error("MSG without a numeric msgID or a payload")]
    Malformed,
    #[error("message {seq} was already received (replayed); dropped")]
    Replayed { seq: u64 },
    #[error(transparent)]
    Crypto(#[from] MessageError),
    #[error(transparent)]
    Ratchet(#[from] RatchetError),
    #[error("receipt decrypted but its content is not understood")]
    Content,
}

/// What [`Session::receive`] made of a `MSG`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Messages now due, in order (possibly several, when this one filled a gap).
    pub due: Vec<Incoming>,
    /// It had been received before (a resend): nothing to show, but acknowledge again.
    pub duplicate: bool,
    /// It arrived ahead of a gap and now waits for it: nothing to show, but persist (its key
    /// is used up).
    pub held: bool,
}

pub struct Session {
    sid: String,
    sid_bytes: [u8; 16],
    role: Role,
    relay_url: String,
    resume_token: Secret,
    restore_proof: Secret,
    ratchet: Ratchet,
    send_seq: u64,
    recv_seq: u64,
    outbox: BTreeMap<u64, String>,
    /// The bytes of frames this outbox may hold (not stored): [`MAX_OUTBOX_BYTES`], or less
    /// when other sessions in the state file hold unacknowledged messages too.
    outbox_budget: usize,
    peer_acked: u64,
    /// Decrypted ahead of a gap, waiting for it (recorded).
    early: BTreeMap<u64, Plain>,
    /// Recorded but perhaps not shown yet (see [`Session::take_unshown`]).
    unshown: Vec<(u64, String)>,
    safety_number: String,
    peer_name: Option<String>,
    created: u64,
    last_used: u64,
}

/// What a new session is made of (from the handshake).
pub struct NewSession {
    pub sid: String,
    pub sid_bytes: [u8; 16],
    pub role: Role,
    pub relay_url: String,
    pub resume_token: Secret,
    pub restore_proof: Secret,
    pub ratchet: Ratchet,
    pub safety_number: String,
    pub now: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored session {sid} is damaged ({what}); it cannot be resumed")]
pub struct DamagedRecord {
    pub sid: String,
    pub what: &'static str,
}

impl Session {
    pub fn new(parts: NewSession) -> Session {
        Session {
            sid: parts.sid,
            sid_bytes: parts.sid_bytes,
            role: parts.role,
            relay_url: parts.relay_url,
            resume_token: parts.resume_token,
            restore_proof: parts.restore_proof,
            ratchet: parts.ratchet,
            send_seq: 0,
            recv_seq: 0,
            outbox: BTreeMap::new(),
            outbox_budget: MAX_OUTBOX_BYTES,
            peer_acked: 0,
            early: BTreeMap::new(),
            unshown: Vec::new(),
            safety_number: parts.safety_number,
            peer_name: None,
            created: parts.now,
            last_used: parts.now,
        }
    }

    pub fn from_record(record: &SessionRecord) -> Result<Session, DamagedRecord> {
        let damaged = |what| DamagedRecord {
            sid: record.sid.clone(),
            what,
        };
        let mut sid_bytes = [0u8; 16];
        hex::decode_to_slice(&record.sid, &mut sid_bytes).map_err(|_| damaged("session id"))?;
        let outbox: BTreeMap<u64, String> = record
            .outbox
            .iter()
            .map(|e| (e.seq, e.frame.clone()))
            .collect();
        // Exactly the messages sent and not acknowledged: a record that claims more (a
        // damaged or crafted `send_seq`) would have a receipt walk a range of any length.
        let unacked = record.send_seq.checked_sub(record.peer_acked);
        let exact = unacked.is_some_and(|n| n == outbox.len() as u64)
            && outbox
                .keys()
                .next()
                .is_none_or(|first| Some(*first) == record.peer_acked.checked_add(1))
            && outbox
                .keys()
                .next_back()
                .is_none_or(|last| *last == record.send_seq);
        if !exact {
            return Err(damaged("outbox"));
        }
        let mut early = BTreeMap::new();
        for held in &record.early {
            let plain: Plain =
                serde_json::from_str(held.text.expose()).map_err(|_| damaged("early messages"))?;
            if held.seq <= record.recv_seq {
                return Err(damaged("early messages"));
            }
            early.insert(held.seq, plain);
        }
        Ok(Session {
            sid: record.sid.clone(),
            sid_bytes,
            role: record.role,
            relay_url: record.relay_url.clone(),
            resume_token: record.resume_token.clone(),
            restore_proof: record.restore_proof.clone(),
            ratchet: Ratchet::from_record(&record.ratchet).map_err(damaged)?,
            send_seq: record.send_seq,
            recv_seq: record.recv_seq,
            outbox,
            outbox_budget: MAX_OUTBOX_BYTES,
            peer_acked: record.peer_acked,
            early,
            unshown: record
                .unshown
                .iter()
                .map(|u| (u.seq, u.text.expose().to_string()))
                .collect(),
            safety_number: record.safety_number.clone(),
            peer_name: record.peer_name.clone(),
            created: record.created,
            last_used: record.last_used,
        })
    }

    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            sid: self.sid.clone(),
            relay_url: self.relay_url.clone(),
            role: self.role,
            resume_token: self.resume_token.clone(),
            peer_name: self.peer_name.clone(),
            safety_number: self.safety_number.clone(),
            ratchet: self.ratchet.record(),
            send_seq: self.send_seq,
            recv_seq: self.recv_seq,
            outbox: self
                .outbox
                .iter()
                .map(|(seq, frame)| OutboxEntry {
                    seq: *seq,
                    frame: frame.clone(),
                })
                .collect(),
            peer_acked: self.peer_acked,
            unshown: self
                .unshown
                .iter()
                .map(|(seq, text)| Unshown {
                    seq: *seq,
                    text: Secret::new(text.clone()),
                })
                .collect(),
            early: self
                .early
                .iter()
                .map(|(seq, plain)| Unshown {
                    seq: *seq,
                    text: Secret::new(serde_json::to_string(plain).unwrap_or_default()),
                })
                .collect(),
            restore_proof: self.restore_proof.clone(),
            created: self.created,
            last_used: self.last_used,
            // The conversation's transfers add theirs (`crate::transfers`).
            files_out: Vec::new(),
            files_in: Vec::new(),
        }
    }

    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// The session id's 16 bytes (as a DATA frame names it, protocol.md 2.2).
    pub fn sid_bytes(&self) -> &[u8; 16] {
        &self.sid_bytes
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn relay_url(&self) -> &str {
        &self.relay_url
    }

    pub fn resume_token(&self) -> &Secret {
        &self.resume_token
    }

    /// The relay's member token, given when the host accepted us (it replaces the joiner's
    /// token from `JOIN`).
    pub fn replace_resume_token(&mut self, token: Secret) {
        self.resume_token = token;
    }

    pub fn restore_proof(&self) -> &Secret {
        &self.restore_proof
    }

    pub fn safety_number(&self) -> &str {
        &self.safety_number
    }

    pub fn peer_name(&self) -> Option<&str> {
        self.peer_name.as_deref()
    }

    pub fn set_peer_name(&mut self, name: String) {
        self.peer_name = Some(name);
    }

    pub fn touch(&mut self, now: u64) {
        self.last_used = now;
    }

    /// Marks chat lines as recorded-but-not-yet-shown: saved with the next record, so that a
    /// crash between recording and showing shows them at the next start instead of losing them.
    pub fn set_unshown(&mut self, lines: Vec<(u64, String)>) {
        self.unshown = lines;
    }

    /// What a previous run recorded but may not have shown; cleared (persist afterwards).
    pub fn take_unshown(&mut self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.unshown)
    }

    /// The highest sequence number received and recorded.
    pub fn received_upto(&self) -> u64 {
        self.recv_seq
    }

    fn directions(&self) -> (Direction, Direction) {
        match self.role {
            Role::Host => (Direction::HostToGuest, Direction::GuestToHost),
            Role::Guest => (Direction::GuestToHost, Direction::HostToGuest),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Sending

    /// Encrypts the next message with the next ratchet key and keeps it in the outbox.
    /// Persist before sending the returned frame: a key and a sequence number are then never
    /// used twice, and the message survives a crash to be sent again, byte for byte.
    /// Refused with [`SendError::OutboxFull`] (nothing used up) when the outbox has no room
    /// (see [`Session::outbox_has_room`]).
    pub fn seal(&mut self, plain: &Plain) -> Result<(u64, String), SendError> {
        if !self.outbox_has_room() {
            return Err(SendError::OutboxFull);
        }
        let seq = self.send_seq.checked_add(1).ok_or(SendError::Exhausted)?;
        let plaintext = zeroize::Zeroizing::new(serde_json::to_vec(plain).unwrap_or_default());
        let aad = message::associated_data(&self.sid_bytes, self.directions().0, seq);
        // On a copy: a message refused below must not use up a key (the peer would skip it).
        let mut ratchet = self.ratchet.clone();
        let payload = hex::encode(ratchet.encrypt(&plaintext, &aad)?);
        let data = ChatMsgData {
            msg_id: seq,
            payload: &payload,
        };
        let frame = encode(FrameType::Msg, Some(&self.sid), Some(&data));
        let max = parley_protocol::limits::MAX_FRAME_BYTES;
        if frame.len() > max {
            return Err(SendError::TooLong { max });
        }
        self.ratchet = ratchet;
        self.send_seq = seq;
        self.outbox.insert(seq, frame.clone());
        Ok((seq, frame))
    }

    /// Our messages the peer has not acknowledged, oldest first: what to (re)send.
    pub fn unacked(&self) -> impl Iterator<Item = (u64, &str)> {
        self.outbox
            .iter()
            .map(|(seq, frame)| (*seq, frame.as_str()))
    }

    /// The unacknowledged messages inside the send window numbered above `after`, in order.
    pub fn window_after(&self, after: u64) -> Vec<(u64, String)> {
        self.outbox
            .iter()
            .take(SEND_WINDOW)
            .filter(|(seq, _)| **seq > after)
            .map(|(seq, frame)| (*seq, frame.clone()))
            .collect()
    }

    pub fn has_unacked(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// The sequence number of the last message sealed (0 before the first).
    pub fn last_sealed(&self) -> u64 {
        self.send_seq
    }

    /// How many messages wait in the outbox for the peer's receipt.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// The bytes of the frames waiting in the outbox.
    pub fn outbox_bytes(&self) -> usize {
        self.outbox
            .values()
            .fold(0usize, |sum, frame| sum.saturating_add(frame.len()))
    }

    /// Whether the outbox can take one more message of any length (protocol.md 3.7): fewer
    /// than [`MAX_OUTBOX`] messages, and room for a maximum-length frame under its byte
    /// budget ([`MAX_OUTBOX_BYTES`], or less: [`Session::share_outbox_budget`]). When it
    /// cannot, the caller stops taking input until receipts ([`Session::take_receipt`]) make
    /// room.
    pub fn outbox_has_room(&self) -> bool {
        self.outbox.len() < MAX_OUTBOX
            && self
                .outbox_bytes()
                .saturating_add(parley_protocol::limits::MAX_FRAME_BYTES)
                <= self.outbox_budget
    }

    /// The other sessions stored in the same state file hold `others` bytes of frames in their
    /// outboxes: this one may hold at most what [`MAX_STATE_OUTBOX_BYTES`] leaves beside them
    /// (and never more than [`MAX_OUTBOX_BYTES`]), so the file stays bounded however many
    /// sessions it holds. Never less than one maximum-length frame, though: siblings whose
    /// peers never come back must not stop this session for good (an empty outbox always
    /// takes a message, and the pause then always ends with a receipt).
    pub fn share_outbox_budget(&mut self, others: usize) {
        self.outbox_budget = MAX_STATE_OUTBOX_BYTES
            .saturating_sub(others)
            .clamp(parley_protocol::limits::MAX_FRAME_BYTES, MAX_OUTBOX_BYTES);
    }

    /// Whether other sessions' outboxes leave this one less than [`MAX_OUTBOX_BYTES`].
    pub fn outbox_budget_shared(&self) -> bool {
        self.outbox_budget < MAX_OUTBOX_BYTES
    }

    // -----------------------------------------------------------------------------------------
    // Receiving

    /// Authenticates and decrypts a `MSG` that must be the next in sequence (the handshake's
    /// Hello). Only a message that passes every check moves the ratchet and the counter.
    pub fn open(&mut self, env: &Envelope<'_>) -> Result<Incoming, ReceiveError> {
        let (seq, payload) = parse_msg(env)?;
        if Some(seq) != self.recv_seq.checked_add(1) {
            return Err(ReceiveError::Replayed { seq });
        }
        let plain = self.decrypt(seq, &payload)?;
        self.recv_seq = seq;
        Ok(Incoming { seq, plain })
    }

    /// Takes a received `MSG`: returns the messages now due in order. Persist before showing
    /// them (a crash then never shows one twice or skips one), or when `held`; then send
    /// [`Self::receipt`].
    pub fn receive(&mut self, env: &Envelope<'_>) -> Result<Received, ReceiveError> {
        let (seq, payload) = parse_msg(env)?;
        if seq <= self.recv_seq || self.early.contains_key(&seq) {
            // Its key is gone: not even an attempt to decrypt.
            return Ok(Received {
                duplicate: true,
                ..Received::default()
            });
        }
        if seq - self.recv_seq > MAX_EARLY {
            return Ok(Received::default());
        }
        let plain = self.decrypt(seq, &payload)?;
        // (`seq > recv_seq` here, so the difference cannot underflow.)
        if seq - self.recv_seq > 1 {
            self.early.insert(seq, plain);
            return Ok(Received {
                held: true,
                ..Received::default()
            });
        }
        self.recv_seq = seq;
        let mut due = vec![Incoming { seq, plain }];
        while let Some(next) = self.recv_seq.checked_add(1)
            && let Some(plain) = self.early.remove(&next)
        {
            self.recv_seq = next;
            due.push(Incoming { seq: next, plain });
        }
        Ok(Received {
            due,
            ..Received::default()
        })
    }

    /// Moves the ratchet: only an authentic message does.
    fn decrypt(&mut self, seq: u64, payload: &[u8]) -> Result<Plain, ReceiveError> {
        let aad = message::associated_data(&self.sid_bytes, self.directions().1, seq);
        let plaintext = self
            .ratchet
            .decrypt(payload, &aad, &mut DhKeyPair::generate)?;
        // Authentic but not understood: counted (its key is gone), not shown.
        Ok(Plain::read(&plaintext))
    }

    // -----------------------------------------------------------------------------------------
    // Receipts

    /// A `MSG_READ` frame carrying a receipt, sealed under the receipt key of the peer's
    /// current chain (it uses up no message key, so it need not be persisted first).
    pub fn receipt(&self, receipt: Receipt) -> Result<String, SendError> {
        let key = self
            .ratchet
            .receipt_key_to_send()
            .ok_or(SendError::Ratchet(RatchetError::NotReady))?;
        let plaintext = serde_json::to_vec(&receipt).unwrap_or_default();
        let aad = receipt_aad(&self.sid_bytes, self.directions().0);
        let sealed = message::seal(&key, &aad, &plaintext)?;
        Ok(encode(
            FrameType::MsgRead,
            Some(&self.sid),
            Some(&ReceiptData { receipt: sealed }),
        ))
    }

    /// Takes a received `MSG_READ`. A `delivered` receipt empties the outbox up to it and
    /// returns the sequence numbers newly acknowledged (persist afterwards); `None` for a
    /// `MSG_READ` that carries no receipt of ours (e.g. the original client's).
    pub fn take_receipt(
        &mut self,
        env: &Envelope<'_>,
    ) -> Result<Option<(Receipt, Vec<u64>)>, ReceiveError> {
        // (The original client's `MSG_READ` carries no receipt.)
        let Ok(ReceiptData { receipt: sealed }) = env.data::<ReceiptData>() else {
            return Ok(None);
        };
        let aad = receipt_aad(&self.sid_bytes, self.directions().1);
        let plaintext = self
            .ratchet
            .receipt_keys_to_accept()
            .iter()
            .find_map(|key| message::open(key, &aad, &sealed).ok())
            .ok_or(ReceiveError::Crypto(MessageError::Authentication))?;
        let receipt: Receipt =
            serde_json::from_slice(&plaintext).map_err(|_| ReceiveError::Content)?;
        let mut newly = Vec::new();
        if let Receipt::Delivered { upto } = receipt {
            // A peer cannot acknowledge what was never sent.
            let upto = upto.min(self.send_seq);
            if upto > self.peer_acked {
                newly = (self.peer_acked + 1..=upto).collect();
                self.peer_acked = upto;
                self.outbox.retain(|seq, _| *seq > upto);
            }
        }
        Ok(Some((receipt, newly)))
    }
}

/// A `MSG`'s sequence number and decoded payload.
fn parse_msg(env: &Envelope<'_>) -> Result<(u64, Vec<u8>), ReceiveError> {
    let data: ChatMsgData = env.data().map_err(|_| ReceiveError::Malformed)?;
    let seq = data.msg_id;
    let payload = hex::decode(data.payload).map_err(|_| ReceiveError::Malformed)?;
    if seq == 0 {
        return Err(ReceiveError::Malformed);
    }
    Ok((seq, payload))
}

fn receipt_aad(sid: &[u8; 16], direction: Direction) -> Vec<u8> {
    let mut aad = Vec::with_capacity(RECEIPT_AAD_LABEL.len() + 17);
    aad.extend_from_slice(RECEIPT_AAD_LABEL);
    aad.extend_from_slice(sid);
    aad.push(direction as u8);
    aad
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pair() -> (Session, Session) {
        let root = crate::keys::SecretKey::from_bytes([1; 32]);
        let guest_key = DhKeyPair::generate().unwrap();
        let host_ratchet = Ratchet::initiator(
            root.clone(),
            DhKeyPair::generate().unwrap(),
            guest_key.public(),
        )
        .unwrap();
        let guest_ratchet = Ratchet::responder(root, guest_key);
        let make = |role, ratchet| {
            Session::new(NewSession {
                sid: "00112233445566778899aabbccddeeff".into(),
                sid_bytes: [
                    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc,
                    0xdd, 0xee, 0xff,
                ],
                role,
                relay_url: "ws://x".into(),
                resume_token: Secret::new("t".into()),
                restore_proof: Secret::new("p".into()),
                ratchet,
                safety_number: "0000 0000 0000".into(),
                now: 0,
            })
        };
        (
            make(Role::Host, host_ratchet),
            make(Role::Guest, guest_ratchet),
        )
    }

    fn text(t: &str) -> Plain {
        Plain::Text { text: t.into() }
    }

    fn deliver(to: &mut Session, frame: &str) -> Result<Received, ReceiveError> {
        to.receive(&Envelope::parse(frame).unwrap())
    }

    fn shown(r: Received) -> Vec<u64> {
        r.due.iter().map(|m| m.seq).collect()
    }

    /// The numbers protocol.md 3.7 gives a stranger writing a client are this code's.
    #[test]
    fn protocol_md_states_the_window_and_the_early_bound() {
        const DOCUMENT: &str = include_str!("../../protocol.md");
        for stated in [
            format!("at most {SEND_WINDOW} messages are in flight"),
            format!("sends only the {SEND_WINDOW} oldest"),
            format!("`N` > `H` + {MAX_EARLY}: dropped unread"),
            format!(
                "an outbox holds at most {MAX_OUTBOX} messages and at most {} MiB",
                MAX_OUTBOX_BYTES / (1024 * 1024)
            ),
            format!(
                "with maximum-length messages that is about {} of them",
                MAX_OUTBOX_BYTES / parley_protocol::limits::MAX_FRAME_BYTES
            ),
            format!("messages held ahead of a gap to {MAX_EARLY}"),
            format!(
                "together hold at most {} MiB of frames",
                MAX_STATE_OUTBOX_BYTES / (1024 * 1024)
            ),
        ] {
            assert!(
                DOCUMENT.contains(&stated),
                "protocol.md must say `{stated}`"
            );
        }
    }

    /// The outbox is bounded (protocol.md 3.7): once it holds the most messages it may, the
    /// next one is refused without using a number or a key; receipts make room, and sealing
    /// goes on with the next number.
    #[test]
    fn a_full_outbox_refuses_until_receipts_make_room() {
        let (mut host, mut guest) = pair();
        let mut frames = Vec::new();
        for i in 1..=1000u64 {
            let (seq, frame) = host.seal(&text(&format!("m{i}"))).unwrap();
            assert_eq!(seq, i);
            frames.push(frame);
        }
        assert_eq!(MAX_OUTBOX, 1000);
        assert!(!host.outbox_has_room());
        let refused = host.seal(&text("one too many"));
        assert_eq!(
            refused,
            Err(SendError::OutboxFull),
            "a full outbox took another message"
        );
        assert_eq!(host.unacked().count(), MAX_OUTBOX);
        // The peer records the first ten and acknowledges them: room for ten more.
        for frame in &frames[..10] {
            deliver(&mut guest, frame).unwrap();
        }
        let receipt = guest
            .receipt(Receipt::Delivered {
                upto: guest.received_upto(),
            })
            .unwrap();
        host.take_receipt(&Envelope::parse(&receipt).unwrap())
            .unwrap();
        assert!(host.outbox_has_room());
        for i in 1001..=1010u64 {
            let (seq, frame) = host.seal(&text(&format!("m{i}"))).unwrap();
            assert_eq!(seq, i, "no number was used up by the refusal");
            frames.push(frame);
        }
        assert_eq!(host.seal(&text("full again")), Err(SendError::OutboxFull));
        // Nothing was skipped: the peer can read on, in order.
        for frame in &frames[10..] {
            assert_eq!(deliver(&mut guest, frame).unwrap().due.len(), 1);
        }
    }

    /// The longest text whose frame fits the frame limit.
    fn longest_text(host: &Session, fill: char) -> String {
        let mut len = parley_protocol::limits::MAX_FRAME_BYTES / 2;
        loop {
            let candidate: String = std::iter::repeat_n(fill, len).collect();
            let mut probe = Session::from_record(&host.record()).unwrap();
            if probe.seal(&text(&candidate)).is_ok() {
                return candidate;
            }
            len -= 16;
        }
    }

    /// With maximum-length messages the byte bound comes first: the outbox never holds more
    /// than `MAX_OUTBOX_BYTES` of frames.
    #[test]
    fn the_outbox_byte_bound_holds_with_maximum_length_messages() {
        let (mut host, _) = pair();
        let longest = longest_text(&host, 'x');
        let mut sealed = 0;
        while host.outbox_has_room() {
            host.seal(&text(&longest)).unwrap();
            sealed += 1;
        }
        assert_eq!(host.seal(&text("x")), Err(SendError::OutboxFull));
        assert!(host.outbox_bytes() <= MAX_OUTBOX_BYTES);
        // Room is kept for a frame of the limit's full size; real frames are a little shorter.
        let most = MAX_OUTBOX_BYTES / parley_protocol::limits::MAX_FRAME_BYTES;
        assert!((most - 1..=most).contains(&sealed), "{sealed}");
    }

    /// Other sessions in the same state file take their share of the file's outbox budget:
    /// whatever they hold, the outboxes together stay within `MAX_STATE_OUTBOX_BYTES`.
    #[test]
    fn other_sessions_outboxes_share_the_files_budget() {
        let (mut host, _) = pair();
        let longest = longest_text(&host, 'x');
        let others = MAX_STATE_OUTBOX_BYTES - 1024 * 1024;
        host.share_outbox_budget(others);
        assert!(host.outbox_budget_shared());
        while host.outbox_has_room() {
            host.seal(&text(&longest)).unwrap();
        }
        assert!(others + host.outbox_bytes() <= MAX_STATE_OUTBOX_BYTES);
        assert!(host.outbox_len() >= 14, "{}", host.outbox_len());
        // Others holding it all: nothing more is taken, and no number is used up.
        let sealed = host.last_sealed();
        host.share_outbox_budget(MAX_STATE_OUTBOX_BYTES + 1);
        assert_eq!(host.seal(&text("x")), Err(SendError::OutboxFull));
        assert_eq!(host.last_sealed(), sealed);
        // ...but a session with an empty outbox always takes one message, so its pause can
        // always end: siblings whose peers never return cannot stop it for good.
        let (mut starved, _) = pair();
        starved.share_outbox_budget(usize::MAX);
        assert!(starved.outbox_has_room());
        starved.seal(&text(&longest)).unwrap();
        assert!(!starved.outbox_has_room());
        // Alone in its file, a session has its own bound, no more.
        let (mut alone, _) = pair();
        alone.share_outbox_budget(0);
        assert!(!alone.outbox_budget_shared());
    }

    /// protocol.md 3.8 "What bounds the file": a record with every part that may grow at its
    /// bound (a full outbox of maximum-length frames, the most messages held ahead of a gap
    /// with the text that takes most room in the file, the most skipped keys) stays under
    /// 13 MiB, far below the loader's limit: nothing in it grows with the conversation.
    #[test]
    fn a_session_record_at_every_bound_stays_far_under_the_load_limit() {
        let (mut host, _) = pair();
        let longest = longest_text(&host, 'x');
        while host.outbox_has_room() {
            host.seal(&text(&longest)).unwrap();
        }
        let mut record = host.record();
        // Held messages: the file stores their content as JSON inside a JSON string, so a text
        // of backslashes (escaped twice) takes the most room: up to about twice the frame's
        // worth of plaintext.
        let plaintext = parley_protocol::limits::MAX_FRAME_BYTES / 2;
        let held = serde_json::to_string(&text(&"\\".repeat(plaintext / 2))).unwrap();
        record.early = (2..=MAX_EARLY + 1)
            .map(|seq| Unshown {
                seq,
                text: Secret::new(held.clone()),
            })
            .collect();
        record.unshown = vec![Unshown {
            seq: 1,
            text: Secret::new("\\".repeat(plaintext / 2)),
        }];
        let key = Secret::new("ab".repeat(32));
        record.ratchet.skipped = vec![parley_state::SkippedChainRecord {
            peer_public: "cd".repeat(crate::dh::ELEMENT_BYTES),
            step: 0,
            keys: (0..crate::ratchet::MAX_SKIP)
                .map(|n| parley_state::SkippedKeyRecord {
                    n,
                    key: key.clone(),
                })
                .collect(),
        }];
        let mut state = parley_state::StateFile::new("alice");
        state.upsert(record);
        let bytes = serde_json::to_vec_pretty(&state).unwrap().len();
        assert!(bytes < 13 * 1024 * 1024, "{bytes} bytes");
        assert!((bytes as u64) < parley_state::MAX_STATE_BYTES / 4);
    }

    #[test]
    fn messages_flow_both_ways_in_sequence() {
        let (mut host, mut guest) = pair();
        let (seq, frame) = host.seal(&text("hi")).unwrap();
        assert_eq!(seq, 1);
        let got = deliver(&mut guest, &frame).unwrap();
        assert_eq!(
            got.due,
            vec![Incoming {
                seq: 1,
                plain: text("hi")
            }]
        );
        let (_, back) = guest.seal(&Plain::Hello { name: "g".into() }).unwrap();
        assert_eq!(
            deliver(&mut host, &back).unwrap().due[0].plain,
            Plain::Hello { name: "g".into() }
        );
    }

    #[test]
    fn order_is_restored_and_duplicates_dropped() {
        let (mut host, mut guest) = pair();
        let frames: Vec<String> = (1..=5)
            .map(|i| host.seal(&text(&i.to_string())).unwrap().1)
            .collect();
        assert_eq!(shown(deliver(&mut guest, &frames[0]).unwrap()), [1]);
        assert_eq!(
            shown(deliver(&mut guest, &frames[2]).unwrap()),
            Vec::<u64>::new(),
            "3 waits for 2"
        );
        assert_eq!(
            shown(deliver(&mut guest, &frames[3]).unwrap()),
            Vec::<u64>::new()
        );
        assert_eq!(
            shown(deliver(&mut guest, &frames[1]).unwrap()),
            [2, 3, 4],
            "2 releases 3 and 4"
        );
        let again = deliver(&mut guest, &frames[1]).unwrap();
        assert!(again.duplicate && again.due.is_empty());
        assert!(deliver(&mut guest, &frames[3]).unwrap().duplicate);
        assert_eq!(shown(deliver(&mut guest, &frames[4]).unwrap()), [5]);
    }

    #[test]
    fn receipts_empty_the_outbox_and_cannot_be_forged_or_overreach() {
        let (mut host, mut guest) = pair();
        let frames: Vec<String> = (1..=3)
            .map(|i| host.seal(&text(&i.to_string())).unwrap().1)
            .collect();
        assert_eq!(host.unacked().count(), 3);
        deliver(&mut guest, &frames[0]).unwrap();
        deliver(&mut guest, &frames[1]).unwrap();
        let receipt = guest
            .receipt(Receipt::Delivered {
                upto: guest.received_upto(),
            })
            .unwrap();
        let (r, newly) = host
            .take_receipt(&Envelope::parse(&receipt).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(r, Receipt::Delivered { upto: 2 });
        assert_eq!(newly, [1, 2]);
        assert_eq!(host.unacked().map(|(s, _)| s).collect::<Vec<_>>(), [3]);
        // Replayed: no news. Reflected back to the guest: fails authentication.
        assert!(
            host.take_receipt(&Envelope::parse(&receipt).unwrap())
                .unwrap()
                .unwrap()
                .1
                .is_empty()
        );
        assert!(
            guest
                .take_receipt(&Envelope::parse(&receipt).unwrap())
                .is_err()
        );
        // A receipt for more than was sent acknowledges only what was.
        let greedy = guest.receipt(Receipt::Delivered { upto: 99 }).unwrap();
        assert_eq!(
            host.take_receipt(&Envelope::parse(&greedy).unwrap())
                .unwrap()
                .unwrap()
                .1,
            [3]
        );
        // The original client's MSG_READ is not a receipt.
        let plain = r#"{"t":"MSG_READ","sid":"x","data":{"msgID":"1"}}"#;
        assert_eq!(
            host.take_receipt(&Envelope::parse(plain).unwrap()).unwrap(),
            None
        );
    }

    #[test]
    fn tampered_and_reflected_messages_are_rejected() {
        let (mut host, mut guest) = pair();
        let (_, frame) = host.seal(&text("two")).unwrap();
        assert!(
            matches!(
                deliver(&mut host, &frame),
                Err(ReceiveError::Ratchet(RatchetError::Authentication))
            ),
            "reflected"
        );
        let moved = frame.replace("\"msgID\":1", "\"msgID\":7");
        assert!(matches!(
            deliver(&mut guest, &moved),
            Err(ReceiveError::Ratchet(RatchetError::Authentication))
        ));
        assert_eq!(
            shown(deliver(&mut guest, &frame).unwrap()),
            [1],
            "the real one still arrives"
        );
        let bad = r#"{"t":"MSG","sid":"x","data":{"msgID":"a","payload":"00"}}"#;
        assert_eq!(deliver(&mut guest, bad), Err(ReceiveError::Malformed));
    }

    #[test]
    fn oversized_and_exhausted_sends_are_refused_without_using_a_number() {
        let (mut host, _) = pair();
        assert!(matches!(
            host.seal(&text(&"x".repeat(40_000))),
            Err(SendError::TooLong { .. })
        ));
        assert_eq!(host.seal(&text("ok")).unwrap().0, 1);
        let mut record = host.record();
        record.send_seq = u64::MAX;
        record.peer_acked = u64::MAX;
        record.outbox.clear();
        let mut exhausted = Session::from_record(&record).unwrap();
        assert_eq!(exhausted.seal(&text("x")), Err(SendError::Exhausted));
    }

    /// A record whose counters claim more unacknowledged messages than its outbox holds is
    /// damaged: a receipt would otherwise walk a range of any length.
    #[test]
    fn a_record_whose_outbox_does_not_match_its_counters_is_refused() {
        let (mut host, _) = pair();
        host.seal(&text("one")).unwrap();
        host.seal(&text("two")).unwrap();
        let good = host.record();
        assert!(Session::from_record(&good).is_ok());
        for damage in [
            |r: &mut SessionRecord| r.send_seq = u64::MAX,
            |r: &mut SessionRecord| r.peer_acked = r.send_seq,
            |r: &mut SessionRecord| {
                r.outbox.pop();
            },
            |r: &mut SessionRecord| r.peer_acked = r.send_seq.saturating_add(1),
        ] {
            let mut record = good.clone();
            damage(&mut record);
            assert!(matches!(
                Session::from_record(&record),
                Err(DamagedRecord { what: "outbox", .. })
            ));
        }
    }

    /// Sequence numbers come from the peer (and the state file): at the top of the range the
    /// counters must stop cleanly, not overflow.
    #[test]
    fn sequence_numbers_at_the_end_of_the_range_do_not_overflow() {
        let (mut host, guest) = pair();
        let mut record = host.record();
        record.send_seq = u64::MAX - 1;
        record.peer_acked = u64::MAX - 1;
        host = Session::from_record(&record).unwrap();
        let (seq, last) = host.seal(&text("last")).unwrap();
        assert_eq!(seq, u64::MAX);
        let mut record = guest.record();
        record.recv_seq = u64::MAX - 1;
        let mut guest = Session::from_record(&record).unwrap();
        assert_eq!(shown(deliver(&mut guest, &last).unwrap()), [u64::MAX]);
        assert!(deliver(&mut guest, &last).unwrap().duplicate);
        // The handshake's `open` with nothing left to receive.
        let mut record = guest.record();
        record.recv_seq = u64::MAX;
        let mut full = Session::from_record(&record).unwrap();
        assert!(full.open(&Envelope::parse(&last).unwrap()).is_err());
    }

    #[test]
    fn record_round_trip_keeps_keys_counters_and_outbox() {
        let (mut host, mut guest) = pair();
        let (_, f1) = host.seal(&text("a")).unwrap();
        let (_, f2) = host.seal(&text("b")).unwrap();
        deliver(&mut guest, &f1).unwrap();
        let mut host2 = Session::from_record(&host.record()).unwrap();
        let mut guest2 = Session::from_record(&guest.record()).unwrap();
        assert_eq!(
            host2
                .unacked()
                .map(|(_, f)| f.to_string())
                .collect::<Vec<_>>(),
            [f1.clone(), f2.clone()]
        );
        assert!(deliver(&mut guest2, &f1).unwrap().duplicate);
        assert_eq!(shown(deliver(&mut guest2, &f2).unwrap()), [2]);
        assert_eq!(host2.seal(&text("c")).unwrap().0, 3);
        let mut damaged = host.record();
        damaged.outbox[0].seq = 99;
        assert!(Session::from_record(&damaged).is_err());
    }

    /// A lossy, reordering, duplicating channel in both directions: whatever it does, each
    /// side ends up showing exactly 1..=N once, in order, as long as unacknowledged messages
    /// are resent.
    #[test]
    fn exactly_once_in_order_over_a_hostile_channel() {
        let (mut host, mut guest) = pair();
        const N: u64 = 300;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut roll = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for i in 1..=N {
            host.seal(&text(&i.to_string())).unwrap();
        }
        let mut shown_seqs = Vec::new();
        for _round in 0..200 {
            // Resend everything unacknowledged, then let the channel drop, duplicate and shuffle.
            let mut wire: Vec<String> = Vec::new();
            for (_, frame) in host.unacked() {
                match roll(10) {
                    0..=3 => {}                                               // lost
                    4 => wire.extend([frame.to_string(), frame.to_string()]), // duplicated
                    _ => wire.push(frame.to_string()),
                }
            }
            for i in (1..wire.len()).rev() {
                let j = roll(i as u64 + 1) as usize;
                wire.swap(i, j);
            }
            for frame in wire {
                let got = deliver(&mut guest, &frame).unwrap();
                shown_seqs.extend(got.due.iter().map(|m| m.seq));
            }
            if roll(3) != 0 {
                let receipt = guest
                    .receipt(Receipt::Delivered {
                        upto: guest.received_upto(),
                    })
                    .unwrap();
                host.take_receipt(&Envelope::parse(&receipt).unwrap())
                    .unwrap();
            }
            if !host.has_unacked() {
                break;
            }
        }
        assert_eq!(shown_seqs, (1..=N).collect::<Vec<_>>());
        assert!(!host.has_unacked());
    }

    /// What travels inside the encryption, as protocol.md writes it (3.6, 3.7 and the
    /// vectors of 3.9): compact, `k` first, then the members in the order shown.
    #[test]
    fn golden_plaintexts_and_receipts() {
        const DOCUMENT: &str = include_str!("../../protocol.md");
        let plains = [
            (
                Plain::Hello {
                    name: "host".into(),
                },
                r#"{"k":"hello","name":"host"}"#,
            ),
            (
                Plain::Text {
                    text: "hello".into(),
                },
                r#"{"k":"text","text":"hello"}"#,
            ),
        ];
        for (plain, golden) in plains {
            assert!(DOCUMENT.contains(golden), "{golden}");
            assert_eq!(serde_json::to_string(&plain).unwrap(), golden);
            assert_eq!(serde_json::from_str::<Plain>(golden).unwrap(), plain);
        }
        let receipts = [
            (
                Receipt::Delivered { upto: 3 },
                r#"{"k":"delivered","upto":3}"#,
            ),
            (Receipt::Read { upto: 3 }, r#"{"k":"read","upto":3}"#),
        ];
        for (receipt, golden) in receipts {
            assert!(DOCUMENT.contains(&golden.replace('3', "N")), "{golden}");
            assert_eq!(serde_json::to_string(&receipt).unwrap(), golden);
            assert_eq!(serde_json::from_str::<Receipt>(golden).unwrap(), receipt);
        }
        // Receivers accept any JSON, ignore unknown members, and count an unknown kind.
        let spaced: Plain =
            serde_json::from_str(r#"{ "text" : "hi", "x": 1, "k" : "text" }"#).unwrap();
        assert_eq!(spaced, Plain::Text { text: "hi".into() });
        let newer: Plain = serde_json::from_str(r#"{"k":"sticker","id":7}"#).unwrap();
        assert_eq!(newer, Plain::Unknown);
        // An offer that does not read but names its file is a bad offer (to be declined).
        let id = "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";
        let bad_key = format!(
            r#"{{"k":"file_offer","id":"{id}","name":"x","size":1,"sha256":"{}","chunk":4,"key":"zz"}}"#,
            "44".repeat(32)
        );
        assert_eq!(
            Plain::read(bad_key.as_bytes()),
            Plain::BadOffer {
                id: crate::files::parse_id(id).unwrap()
            }
        );
        assert_eq!(
            Plain::read(br#"{"k":"file_offer","id":"nothex"}"#),
            Plain::Unknown
        );
    }
}
