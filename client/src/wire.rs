//! The `data` of every frame the client writes or reads, one named type per shape, spelled
//! exactly as on the wire (protocol.md 2, 3.2, 3.6, 3.7).
//!
//! The relay-level shapes, which the relay itself reads or writes (`REATTACH`, `RESTORE`,
//! `SESSION_CREATED`, `INVITE_CODE`, `DELIVERED`, `ERROR`), live in
//! [`parley_protocol::payload`] and are re-exported here; the types defined here are the
//! end-to-end shapes, opaque to the relay: the pairing fields (`v`, `dh`, `pake`, `confirm`,
//! `reason`, `kind`), a chat message's `msgID` and `payload`, and receipts.
//!
//! How Parley writes them (and the tests below pin it):
//! - members in key order, as the relay's re-encoding of opaque `data` also leaves them
//!   (protocol.md 1): the fields of each shape the client writes are declared in that order;
//! - an `Option` that is `None` is left out, never written as `null`;
//! - `v` and a chat message's `msgID` are JSON numbers; everything else is a string (keys,
//!   confirmations and ciphertext as lowercase hex).
//!
//! Fields the client must check when it reads a shape are `Option`, so that a missing one is
//! reported by name rather than as a generic shape error. What is *inside* a chat message's or
//! a receipt's encryption is [`crate::session::Plain`] and [`crate::session::Receipt`].

use serde::{Deserialize, Serialize};

pub use parley_protocol::payload::{
    DeliveredData, ErrorData, InviteCodeData, ReattachData, RestoreData, ResumeTokenData,
};

use crate::keys::PROTOCOL_VERSION;

/// `data.kind` of the guest's key confirmation (a `MSG`, 3.2).
pub const KIND_CONFIRM: &str = "confirm";
/// `data.kind` of an abort notice (a `MSG`, 3.2): pairing failed, stop waiting.
pub const KIND_ABORT: &str = "abort";
/// `data.reason` of the host's `JOIN_DENY` when its side of the handshake failed.
pub const DENY_HANDSHAKE_FAILED: &str = "handshake_failed";

/// The handshake fields one side publishes (3.2): `v`, the protocol version (the number 1);
/// `dh`, its MODP-14 public key (hex, 512 digits); `pake`, its SPAKE2 message (hex, 66 digits).
///
/// The whole `data` of the host's `INVITE_CREATE`; part of the guest's `JOIN`
/// ([`JoinData`]), and of what the relay hands on: `JOIN_REQUEST` ([`JoinRequestData`]) and
/// the first `JOINED` ([`JoinedData`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dh: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pake: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
}

impl Offer {
    /// This client's offer: its protocol version, DH public key and SPAKE2 message.
    pub fn new(dh_public: &[u8], pake_msg: &[u8]) -> Offer {
        Offer {
            dh: Some(hex::encode(dh_public)),
            pake: Some(hex::encode(pake_msg)),
            v: Some(PROTOCOL_VERSION),
        }
    }
}

/// `JOIN {data: {code, dh, pake, v}}`: the guest's join. `code` is the relay's part of the
/// invite code (6 digits, read and removed by the relay); the rest is the guest's [`Offer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinData {
    pub code: String,
    #[serde(flatten)]
    pub offer: Offer,
}

/// `JOIN_REQUEST {sid, data: {clientID, dh, pake, v}}`: the guest's [`Offer`] as the host
/// gets it, with the `clientID` the relay added to name the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequestData {
    #[serde(rename = "clientID", skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(flatten)]
    pub offer: Offer,
}

/// The first `JOINED {sid, data: {dh, pake, resumeToken, v}}`: the host's [`Offer`] (stored
/// by its `INVITE_CREATE`) as the guest gets it, with the guest's joiner token from the
/// relay. (Written by the relay, members sorted; the flattened offer comes last here.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinedData {
    #[serde(rename = "resumeToken", skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<String>,
    #[serde(flatten)]
    pub offer: Offer,
}

/// `JOIN_ACCEPT {sid, data: {clientID, confirm}}`: the host accepts the guest named by
/// `clientID` (the relay's, removed before forwarding) and proves its keys with
/// `confirm_host` (hex, 3.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAcceptData {
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub confirm: String,
}

/// The second `JOINED {sid, data: {confirm, resumeToken}}`: the host's `JOIN_ACCEPT` fields
/// as the guest gets them, with the guest's member token from the relay (it replaces the
/// joiner's token, and only it lets a relay that forgot the session re-create it, 2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirm: Option<String>,
    #[serde(rename = "resumeToken", skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<String>,
}

/// `JOIN_DENY {sid, data: {clientID, reason}}`: the host refuses the guest named by
/// `clientID`; Parley sends it only when its side of the handshake failed, with
/// `reason` [`DENY_HANDSHAKE_FAILED`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinDenyData {
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub reason: String,
}

impl JoinDenyData {
    /// The host's side of the handshake failed.
    pub fn handshake_failed(client_id: &str) -> JoinDenyData {
        JoinDenyData {
            client_id: client_id.to_string(),
            reason: DENY_HANDSHAKE_FAILED.to_string(),
        }
    }
}

/// `JOIN_DENIED {sid, data: {reason?}}`: the host's `JOIN_DENY` fields as the guest gets them.
/// `reason` [`DENY_HANDSHAKE_FAILED`]: the host's handshake failed; none: the host refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinDeniedData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `MSG {sid, data: {kind, msgID, payload}}`: a handshake notice, not a chat message (3.2):
/// the guest's key confirmation ([`KIND_CONFIRM`], `payload` = `confirm_guest` hex) or an
/// abort ([`KIND_ABORT`], `payload` = `""`). A `MSG` without `kind` is a chat message
/// ([`ChatMsgData`]).
///
/// `msgID` is only for the relay (which requires one and echoes it in `DELIVERED`): a notice
/// writes its `kind` there, a string that never collides with a chat message's number. It is
/// not read back (a reader goes by `kind`, whatever the `msgID`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeMsgData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(
        rename = "msgID",
        skip_deserializing,
        skip_serializing_if = "Option::is_none"
    )]
    pub msg_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

impl HandshakeMsgData {
    /// A notice of `kind`, with its `msgID`.
    fn notice(kind: &str, payload: String) -> HandshakeMsgData {
        HandshakeMsgData {
            kind: Some(kind.to_string()),
            msg_id: Some(kind.to_string()),
            payload: Some(payload),
        }
    }

    /// The guest's key confirmation: `confirm_guest`, hex.
    pub fn confirm(confirm_guest_hex: String) -> HandshakeMsgData {
        HandshakeMsgData::notice(KIND_CONFIRM, confirm_guest_hex)
    }

    /// Pairing failed: the other side should stop waiting.
    pub fn abort() -> HandshakeMsgData {
        HandshakeMsgData::notice(KIND_ABORT, String::new())
    }
}

/// `MSG {sid, data: {msgID, payload}}`: a chat message (3.6). `msgID` is the sender's
/// sequence number `N` (a JSON number, from 1); `payload` is
/// hex(HEADER ‖ IV ‖ ciphertext ‖ tag). The relay reads the same frame as
/// [`parley_protocol::payload::MsgData`], which takes any `msgID`. `payload` borrows from the
/// frame: a payload with JSON escapes in it is not one Parley wrote, and is not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMsgData<'a> {
    #[serde(rename = "msgID")]
    pub msg_id: u64,
    pub payload: &'a str,
}

/// `MSG_READ {sid, data: {receipt}}`: an end-to-end receipt (3.7), hex(IV ‖ tag ‖
/// ciphertext) of a [`crate::session::Receipt`]. A `MSG_READ` without it (the original
/// client's `{msgID}`) does not read as this shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptData {
    pub receipt: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_protocol::{Envelope, FrameType, encode};
    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    const SID: &str = "7f1c0d2e9a4b3c5d6e7f8091a2b3c4d5";

    /// The `data` of protocol.md's example frames of type `t` (in document order) that
    /// contain `marker`: the golden texts. Parley's own frames are those of 3.2.
    fn example(t: &str, marker: &str) -> &'static str {
        const DOCUMENT: &str = include_str!("../../protocol.md");
        let start = format!(r#"{{"t":"{t}""#);
        DOCUMENT
            .lines()
            .map(str::trim)
            .filter(|line| line.starts_with(&start) && line.contains(marker))
            .find_map(|line| Some(Envelope::parse(line).ok()?.raw_data()?.get()))
            .unwrap_or_else(|| panic!("protocol.md has no {t} example with {marker}"))
    }

    /// `value` is written as exactly `golden` (also inside a frame), and `golden` reads back
    /// as `value`.
    fn pins<T>(t: FrameType, value: &T, golden: &str)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        assert_eq!(serde_json::to_string(value).unwrap(), golden);
        assert_eq!(
            encode(t, Some(SID), Some(value)),
            format!(r#"{{"t":"{t}","sid":"{SID}","data":{golden}}}"#)
        );
        assert_eq!(&serde_json::from_str::<T>(golden).unwrap(), value);
    }

    /// `golden` (written by the relay, so compared as JSON) reads as `value`, which writes
    /// the same members.
    fn reads<T>(value: &T, golden: &str)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        assert_eq!(&serde_json::from_str::<T>(golden).unwrap(), value);
        assert_eq!(
            serde_json::to_value(value).unwrap(),
            serde_json::from_str::<Value>(golden).unwrap()
        );
    }

    fn offer(dh: &str, pake: &str) -> Offer {
        Offer {
            dh: Some(dh.into()),
            pake: Some(pake.into()),
            v: Some(1),
        }
    }

    #[test]
    fn golden_invite_create_offer() {
        let golden = example("INVITE_CREATE", r#""v":1"#);
        assert_eq!(
            golden,
            r#"{"dh":"9d04…512 hex digits…","pake":"41a1…66 hex digits…","v":1}"#
        );
        pins(
            FrameType::InviteCreate,
            &offer("9d04…512 hex digits…", "41a1…66 hex digits…"),
            golden,
        );
        // What `new` makes: the version as a number, keys as lowercase hex.
        let made = Offer::new(&[0x9d, 0x04], &[0x41, 0xA1]);
        assert_eq!(
            serde_json::to_string(&made).unwrap(),
            r#"{"dh":"9d04","pake":"41a1","v":1}"#
        );
        // Read: each field may be missing (reported by name), `v` may be another number.
        assert_eq!(
            serde_json::from_str::<Offer>("{}").unwrap(),
            Offer::default()
        );
        let other: Offer = serde_json::from_str(r#"{"v":2,"dh":"00","pake":"00"}"#).unwrap();
        assert_eq!(other.v, Some(2));
        assert!(serde_json::from_str::<Offer>(r#"{"v":"1"}"#).is_err());
    }

    #[test]
    fn golden_join() {
        let golden = example("JOIN", r#""v":1"#);
        assert_eq!(
            golden,
            r#"{"code":"042917","dh":"3c7e…512 hex digits…","pake":"4248…66 hex digits…","v":1}"#
        );
        let join = JoinData {
            code: "042917".into(),
            offer: offer("3c7e…512 hex digits…", "4248…66 hex digits…"),
        };
        // JOIN has no sid.
        assert_eq!(serde_json::to_string(&join).unwrap(), golden);
        assert_eq!(
            encode(FrameType::Join, None, Some(&join)),
            format!(r#"{{"t":"JOIN","data":{golden}}}"#)
        );
        assert_eq!(serde_json::from_str::<JoinData>(golden).unwrap(), join);
    }

    #[test]
    fn golden_join_request() {
        let golden = example("JOIN_REQUEST", r#""v":1"#);
        assert_eq!(
            golden,
            r#"{"clientID":"9c0e4b1a77d2f310","dh":"3c7e…","pake":"4248…","v":1}"#
        );
        let request = JoinRequestData {
            client_id: Some("9c0e4b1a77d2f310".into()),
            offer: offer("3c7e…", "4248…"),
        };
        pins(FrameType::JoinRequest, &request, golden);
        // A joiner that sent no offer (not a Parley client): each field reads as missing.
        let bare: JoinRequestData =
            serde_json::from_str(r#"{"clientID":"c","publicKey":"c3d4"}"#).unwrap();
        assert_eq!(bare.client_id.as_deref(), Some("c"));
        assert_eq!(bare.offer, Offer::default());
    }

    #[test]
    fn golden_first_joined() {
        let golden = example("JOINED", r#""v":1"#);
        assert_eq!(
            golden,
            r#"{"dh":"9d04…","pake":"41a1…","resumeToken":"0c9d…64 hex digits…","v":1}"#
        );
        let joined = JoinedData {
            resume_token: Some("0c9d…64 hex digits…".into()),
            offer: offer("9d04…", "41a1…"),
        };
        reads(&joined, golden);
    }

    #[test]
    fn golden_join_accept() {
        let golden = example("JOIN_ACCEPT", "confirm");
        assert_eq!(
            golden,
            r#"{"clientID":"9c0e4b1a77d2f310","confirm":"f357…64 hex digits…"}"#
        );
        let accept = JoinAcceptData {
            client_id: "9c0e4b1a77d2f310".into(),
            confirm: "f357…64 hex digits…".into(),
        };
        pins(FrameType::JoinAccept, &accept, golden);
    }

    #[test]
    fn golden_second_joined() {
        let golden = example("JOINED", "confirm");
        assert_eq!(golden, r#"{"confirm":"f357…"}"#);
        let accepted = AcceptedData {
            confirm: Some("f357…".into()),
            resume_token: None,
        };
        pins(FrameType::Joined, &accepted, golden);
        // As a relay of this version sends it: with the guest's member token.
        let with_token = r#"{"confirm":"f357…","resumeToken":"5e0b"}"#;
        let accepted = AcceptedData {
            resume_token: Some("5e0b".into()),
            ..accepted
        };
        pins(FrameType::Joined, &accepted, with_token);
    }

    #[test]
    fn golden_join_deny() {
        let golden = example("JOIN_DENY", "reason");
        assert_eq!(
            golden,
            r#"{"clientID":"9c0e4b1a77d2f310","reason":"handshake_failed"}"#
        );
        pins(
            FrameType::JoinDeny,
            &JoinDenyData::handshake_failed("9c0e4b1a77d2f310"),
            golden,
        );
    }

    #[test]
    fn golden_join_denied() {
        let golden = example("JOIN_DENIED", "reason");
        assert_eq!(golden, r#"{"reason":"handshake_failed"}"#);
        let denied = JoinDeniedData {
            reason: Some(DENY_HANDSHAKE_FAILED.into()),
        };
        pins(FrameType::JoinDenied, &denied, golden);
        // The host refused (2.3's example): no reason.
        pins(FrameType::JoinDenied, &JoinDeniedData::default(), "{}");
        assert_eq!(example("JOIN_DENIED", "{}"), "{}");
    }

    #[test]
    fn golden_handshake_msgs() {
        for (golden, notice, payload) in [
            (
                r#"{"kind":"confirm","msgID":"confirm","payload":"fa86…64 hex digits…"}"#,
                HandshakeMsgData::confirm("fa86…64 hex digits…".into()),
                "fa86…64 hex digits…",
            ),
            (
                r#"{"kind":"abort","msgID":"abort","payload":""}"#,
                HandshakeMsgData::abort(),
                "",
            ),
        ] {
            let kind = notice.kind.clone().unwrap();
            assert_eq!(example("MSG", &format!(r#""kind":"{kind}""#)), golden);
            assert_eq!(serde_json::to_string(&notice).unwrap(), golden);
            assert_eq!(
                encode(FrameType::Msg, Some(SID), Some(&notice)),
                format!(r#"{{"t":"MSG","sid":"{SID}","data":{golden}}}"#)
            );
            // Read back: `kind` and `payload`; `msgID` is the relay's.
            let read: HandshakeMsgData = serde_json::from_str(golden).unwrap();
            assert_eq!(read.kind.as_deref(), Some(kind.as_str()));
            assert_eq!(read.payload.as_deref(), Some(payload));
            assert_eq!(read.msg_id, None);
        }
        // A chat message reads as a MSG without a kind, whatever its msgID.
        let chat: HandshakeMsgData =
            serde_json::from_str(r#"{"msgID":1,"payload":"19ac"}"#).unwrap();
        assert_eq!(chat.kind, None);
        let odd: HandshakeMsgData =
            serde_json::from_str(r#"{"kind":"abort","msgID":-1.5,"payload":""}"#).unwrap();
        assert_eq!(odd.kind.as_deref(), Some(KIND_ABORT));
    }

    #[test]
    fn golden_chat_msg() {
        let golden = example("MSG", r#""msgID":1,"#);
        assert_eq!(
            golden,
            r#"{"msgID":1,"payload":"19ac…hex(HEADER ‖ IV ‖ ciphertext ‖ tag), 3.6…"}"#
        );
        let msg = ChatMsgData {
            msg_id: 1,
            payload: "19ac…hex(HEADER ‖ IV ‖ ciphertext ‖ tag), 3.6…",
        };
        assert_eq!(serde_json::to_string(&msg).unwrap(), golden);
        assert_eq!(
            encode(FrameType::Msg, Some(SID), Some(&msg)),
            format!(r#"{{"t":"MSG","sid":"{SID}","data":{golden}}}"#)
        );
        assert_eq!(serde_json::from_str::<ChatMsgData>(golden).unwrap(), msg);
        // The relay accepts it, and echoes the number.
        let relay: parley_protocol::payload::MsgData = serde_json::from_str(golden).unwrap();
        assert_eq!(relay.validate().unwrap().get(), "1");
        // Not a chat message: a string msgID (a handshake notice, 2.3's example), no
        // payload, or a payload written with escapes.
        for other in [
            example("MSG", r#""msgID":"17""#),
            r#"{"msgID":1}"#,
            r#"{"msgID":1,"payload":"\u0030\u0030"}"#,
            r#"{"msgID":-1,"payload":"00"}"#,
        ] {
            assert!(
                serde_json::from_str::<ChatMsgData>(other).is_err(),
                "{other}"
            );
        }
    }

    #[test]
    fn golden_receipt() {
        let golden = example("MSG_READ", "receipt");
        assert_eq!(
            golden,
            r#"{"receipt":"a3f0…hex(IV ‖ tag ‖ ciphertext), 3.7…"}"#
        );
        let receipt = ReceiptData {
            receipt: "a3f0…hex(IV ‖ tag ‖ ciphertext), 3.7…".into(),
        };
        pins(FrameType::MsgRead, &receipt, golden);
        // The original client's MSG_READ (2.2) carries no receipt.
        let original = example("MSG_READ", "msgID");
        assert_eq!(original, r#"{"msgID":"17"}"#);
        assert!(serde_json::from_str::<ReceiptData>(original).is_err());
    }

    /// What the client writes for the relay-level shapes it shares with the relay.
    #[test]
    fn golden_relay_level_shapes_as_the_client_writes_them() {
        let reattach = ReattachData {
            resume_token: Some("5e0b…64 hex digits…".into()),
        };
        assert_eq!(
            serde_json::to_string(&reattach).unwrap(),
            example("REATTACH", "resumeToken")
        );
        let restore = RestoreData {
            role: Some("guest".into()),
            resume_token: Some("0c9d…".into()),
            proof: Some("6c53".into()),
        };
        assert_eq!(
            serde_json::to_value(&restore).unwrap(),
            json!({"role": "guest", "resumeToken": "0c9d…", "proof": "6c53"})
        );
    }
}
