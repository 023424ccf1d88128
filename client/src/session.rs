//! A paired session: its keys and counters, and turning plaintexts into `MSG` frames and back.
//! Sans-IO: the caller persists the session (via [`Session::record`]) and moves the frames.

use parley_protocol::{Envelope, FrameType, encode};
use parley_state::{Role, Secret, SessionRecord};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::keys::MessageKey;
use crate::message::{self, Direction, MessageError};

/// What travels inside the encryption. `k` names the kind; receivers ignore unknown fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
pub enum Plain {
    /// The first message each side sends after pairing: who it is.
    Hello { name: String },
    /// A chat line.
    Text { text: String },
}

/// A decrypted message with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub seq: u64,
    pub plain: Plain,
}

/// How many sequence numbers below the highest one received are still accepted if not yet
/// seen (they may arrive late, e.g. resent after the peer was offline).
pub const REPLAY_WINDOW: u64 = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error(
        "message too long to send: a frame may be at most {max} bytes (about {} bytes of text)",
        max / 2 - 64
    )]
    TooLong { max: usize },
    #[error("this session has used up its sequence numbers; pair again")]
    Exhausted,
    #[error(transparent)]
    Crypto(#[from] MessageError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    #[error("MSG without a numeric msgID or a payload")]
    Malformed,
    #[error("message {seq} was already received (replayed), or is too old to tell; dropped")]
    Replayed { seq: u64 },
    #[error(transparent)]
    Crypto(#[from] MessageError),
    #[error("message decrypted but its content is not understood")]
    Content,
}

pub struct Session {
    sid: String,
    sid_bytes: [u8; 16],
    role: Role,
    relay_url: String,
    resume_token: Secret,
    send_key: MessageKey,
    recv_key: MessageKey,
    send_seq: u64,
    recv_seq: u64,
    /// Bit i set: `recv_seq - 1 - i` was received.
    recv_window: u64,
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
    pub send_key: MessageKey,
    pub recv_key: MessageKey,
    pub safety_number: String,
    pub now: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored session {sid} is damaged ({what}); it cannot be resumed")]
pub struct DamagedRecord {
    pub sid: String,
    pub what: &'static str,
}

#[derive(Deserialize)]
struct MsgData<'a> {
    #[serde(rename = "msgID")]
    msg_id: Option<u64>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

impl Session {
    pub fn new(parts: NewSession) -> Session {
        Session {
            sid: parts.sid,
            sid_bytes: parts.sid_bytes,
            role: parts.role,
            relay_url: parts.relay_url,
            resume_token: parts.resume_token,
            send_key: parts.send_key,
            recv_key: parts.recv_key,
            send_seq: 0,
            recv_seq: 0,
            recv_window: 0,
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
        Ok(Session {
            sid: record.sid.clone(),
            sid_bytes,
            role: record.role,
            relay_url: record.relay_url.clone(),
            resume_token: record.resume_token.clone(),
            send_key: MessageKey::from_hex(record.send_key.expose())
                .ok_or_else(|| damaged("send key"))?,
            recv_key: MessageKey::from_hex(record.recv_key.expose())
                .ok_or_else(|| damaged("receive key"))?,
            send_seq: record.send_seq,
            recv_seq: record.recv_seq,
            recv_window: record.recv_window,
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
            send_key: Secret::new(self.send_key.to_hex().to_string()),
            recv_key: Secret::new(self.recv_key.to_hex().to_string()),
            send_seq: self.send_seq,
            recv_seq: self.recv_seq,
            recv_window: self.recv_window,
            created: self.created,
            last_used: self.last_used,
        }
    }

    pub fn sid(&self) -> &str {
        &self.sid
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

    fn directions(&self) -> (Direction, Direction) {
        match self.role {
            Role::Host => (Direction::HostToGuest, Direction::GuestToHost),
            Role::Guest => (Direction::GuestToHost, Direction::HostToGuest),
        }
    }

    /// Encrypts the next message: returns its sequence number and the `MSG` frame. The caller
    /// persists the session before sending, so a sequence number is never used twice.
    pub fn seal(&mut self, plain: &Plain) -> Result<(u64, String), SendError> {
        let seq = self.send_seq.checked_add(1).ok_or(SendError::Exhausted)?;
        let frame = self.frame_for(seq, plain)?;
        let max = parley_protocol::limits::MAX_FRAME_BYTES;
        if frame.len() > max {
            return Err(SendError::TooLong { max });
        }
        self.send_seq = seq;
        Ok((seq, frame))
    }

    /// The `MSG` frame for `plain` at a given sequence number (fresh IV each call).
    fn frame_for(&self, seq: u64, plain: &Plain) -> Result<String, MessageError> {
        let plaintext = zeroize::Zeroizing::new(serde_json::to_vec(plain).unwrap_or_default());
        let aad = message::associated_data(&self.sid_bytes, self.directions().0, seq);
        let payload = message::seal(&self.send_key, &aad, &plaintext)?;
        let data = serde_json::json!({"msgID": seq, "payload": payload});
        Ok(encode(FrameType::Msg, Some(&self.sid), Some(&data)))
    }

    /// Authenticates and decrypts a received `MSG`. Only a message that passes every check
    /// moves the receive counter.
    pub fn open(&mut self, env: &Envelope<'_>) -> Result<Incoming, ReceiveError> {
        let data: MsgData = env.data().map_err(|_| ReceiveError::Malformed)?;
        let seq = data.msg_id.ok_or(ReceiveError::Malformed)?;
        let payload: &str = data
            .payload
            .and_then(|raw| serde_json::from_str::<&str>(raw.get()).ok())
            .ok_or(ReceiveError::Malformed)?;
        if self.seen(seq) {
            return Err(ReceiveError::Replayed { seq });
        }
        let aad = message::associated_data(&self.sid_bytes, self.directions().1, seq);
        let plaintext = zeroize::Zeroizing::new(message::open(&self.recv_key, &aad, payload)?);
        let plain: Plain = serde_json::from_slice(&plaintext).map_err(|_| ReceiveError::Content)?;
        self.mark_seen(seq);
        Ok(Incoming { seq, plain })
    }

    /// Whether `seq` was received already, or is too far below the highest to tell.
    fn seen(&self, seq: u64) -> bool {
        if seq == 0 {
            return true;
        }
        if seq > self.recv_seq {
            return false;
        }
        let offset = self.recv_seq - seq;
        offset == 0 || offset > REPLAY_WINDOW || self.recv_window & (1 << (offset - 1)) != 0
    }

    fn mark_seen(&mut self, seq: u64) {
        if seq > self.recv_seq {
            let shift = seq - self.recv_seq;
            let moved = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.recv_window << shift
            };
            // The old highest becomes offset `shift`, i.e. bit `shift - 1`.
            let old_highest = if self.recv_seq > 0 && shift <= REPLAY_WINDOW {
                1 << (shift - 1)
            } else {
                0
            };
            self.recv_window = moved | old_highest;
            self.recv_seq = seq;
        } else {
            let offset = self.recv_seq - seq;
            self.recv_window |= 1 << (offset - 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn pair() -> (Session, Session) {
        let k1 = [1u8; 32];
        let k2 = [2u8; 32];
        let make = |role, send: [u8; 32], recv: [u8; 32]| {
            Session::new(NewSession {
                sid: "00112233445566778899aabbccddeeff".into(),
                sid_bytes: [
                    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc,
                    0xdd, 0xee, 0xff,
                ],
                role,
                relay_url: "ws://x".into(),
                resume_token: Secret::new("t".into()),
                send_key: MessageKey::from_bytes(send),
                recv_key: MessageKey::from_bytes(recv),
                safety_number: "0000 0000 0000".into(),
                now: 0,
            })
        };
        (make(Role::Host, k1, k2), make(Role::Guest, k2, k1))
    }

    fn deliver(to: &mut Session, frame: &str) -> Result<Incoming, ReceiveError> {
        to.open(&Envelope::parse(frame).unwrap())
    }

    #[test]
    fn messages_flow_both_ways_in_sequence() {
        let (mut host, mut guest) = pair();
        let (seq, frame) = host.seal(&Plain::Text { text: "hi".into() }).unwrap();
        assert_eq!(seq, 1);
        assert_eq!(
            deliver(&mut guest, &frame).unwrap(),
            Incoming {
                seq: 1,
                plain: Plain::Text { text: "hi".into() }
            }
        );
        let (_, back) = guest.seal(&Plain::Hello { name: "g".into() }).unwrap();
        assert_eq!(
            deliver(&mut host, &back).unwrap().plain,
            Plain::Hello { name: "g".into() }
        );
    }

    #[test]
    fn replayed_reflected_and_tampered_messages_are_rejected() {
        let (mut host, mut guest) = pair();
        let (_, frame) = host
            .seal(&Plain::Text {
                text: "once".into(),
            })
            .unwrap();
        deliver(&mut guest, &frame).unwrap();
        assert_eq!(
            deliver(&mut guest, &frame),
            Err(ReceiveError::Replayed { seq: 1 })
        );
        // Reflected back to its sender: wrong key and direction.
        let (_, frame2) = host.seal(&Plain::Text { text: "two".into() }).unwrap();
        assert!(matches!(
            deliver(&mut host, &frame2),
            Err(ReceiveError::Crypto(_))
        ));
        // Moved to another sequence number.
        let moved = frame2.replace("\"msgID\":2", "\"msgID\":7");
        assert!(matches!(
            deliver(&mut guest, &moved),
            Err(ReceiveError::Crypto(MessageError::Authentication))
        ));
        // The rejected attempts did not move the counter: the real one still arrives.
        assert_eq!(deliver(&mut guest, &frame2).unwrap().seq, 2);
        assert_eq!(
            deliver(
                &mut guest,
                r#"{"t":"MSG","sid":"x","data":{"msgID":"a","payload":"00"}}"#
            ),
            Err(ReceiveError::Malformed)
        );
    }

    #[test]
    fn late_messages_are_accepted_once_within_the_window() {
        let (mut host, mut guest) = pair();
        let frames: Vec<String> = (0..70)
            .map(|i| {
                host.seal(&Plain::Text {
                    text: format!("{i}"),
                })
                .unwrap()
                .1
            })
            .collect();
        // 2 arrives after 3 (it was held while the peer was away): accepted, once.
        assert_eq!(deliver(&mut guest, &frames[0]).unwrap().seq, 1);
        assert_eq!(deliver(&mut guest, &frames[2]).unwrap().seq, 3);
        assert_eq!(deliver(&mut guest, &frames[1]).unwrap().seq, 2);
        assert_eq!(
            deliver(&mut guest, &frames[1]),
            Err(ReceiveError::Replayed { seq: 2 })
        );
        assert_eq!(
            deliver(&mut guest, &frames[2]),
            Err(ReceiveError::Replayed { seq: 3 })
        );
        // Far ahead: what is more than REPLAY_WINDOW behind can no longer be told apart.
        assert_eq!(deliver(&mut guest, &frames[69]).unwrap().seq, 70);
        assert_eq!(
            deliver(&mut guest, &frames[3]),
            Err(ReceiveError::Replayed { seq: 4 })
        );
        assert_eq!(deliver(&mut guest, &frames[10]).unwrap().seq, 11);
        assert_eq!(
            deliver(&mut guest, &frames[10]),
            Err(ReceiveError::Replayed { seq: 11 })
        );
        // The window survives a save and load.
        let mut reloaded = Session::from_record(&guest.record()).unwrap();
        assert_eq!(
            deliver(&mut reloaded, &frames[10]),
            Err(ReceiveError::Replayed { seq: 11 })
        );
        assert_eq!(deliver(&mut reloaded, &frames[20]).unwrap().seq, 21);
    }

    #[test]
    fn oversized_and_exhausted_sends_are_refused_without_using_a_number() {
        let (mut host, _) = pair();
        let long = "x".repeat(40_000);
        assert!(matches!(
            host.seal(&Plain::Text { text: long }),
            Err(SendError::TooLong { .. })
        ));
        assert_eq!(host.seal(&Plain::Text { text: "ok".into() }).unwrap().0, 1);
        let mut record = host.record();
        record.send_seq = u64::MAX;
        let mut exhausted = Session::from_record(&record).unwrap();
        assert_eq!(
            exhausted.seal(&Plain::Text { text: "x".into() }),
            Err(SendError::Exhausted)
        );
    }

    #[test]
    fn record_round_trip_keeps_keys_and_counters() {
        let (mut host, mut guest) = pair();
        let (_, f) = host.seal(&Plain::Text { text: "a".into() }).unwrap();
        deliver(&mut guest, &f).unwrap();
        let mut host2 = Session::from_record(&host.record()).unwrap();
        let mut guest2 = Session::from_record(&guest.record()).unwrap();
        let (seq, f2) = host2.seal(&Plain::Text { text: "b".into() }).unwrap();
        assert_eq!(seq, 2);
        assert_eq!(deliver(&mut guest2, &f2).unwrap().seq, 2);
        assert_eq!(
            deliver(&mut guest2, &f),
            Err(ReceiveError::Replayed { seq: 1 })
        );
    }
}
