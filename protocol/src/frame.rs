//! The envelope every frame shares, and the frame types.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ErrorCode;

/// Every frame type on the wire, in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    CreateSession,
    SessionCreated,
    InviteCreate,
    InviteCode,
    Join,
    JoinRequest,
    JoinAccept,
    Joined,
    JoinDeny,
    JoinDenied,
    Msg,
    Delivered,
    MsgRead,
    Reattach,
    Restore,
    PeerOnline,
    PeerOffline,
    Ping,
    Pong,
    Error,
}

impl FrameType {
    pub const ALL: [FrameType; 20] = [
        FrameType::CreateSession,
        FrameType::SessionCreated,
        FrameType::InviteCreate,
        FrameType::InviteCode,
        FrameType::Join,
        FrameType::JoinRequest,
        FrameType::JoinAccept,
        FrameType::Joined,
        FrameType::JoinDeny,
        FrameType::JoinDenied,
        FrameType::Msg,
        FrameType::Delivered,
        FrameType::MsgRead,
        FrameType::Reattach,
        FrameType::Restore,
        FrameType::PeerOnline,
        FrameType::PeerOffline,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Error,
    ];

    /// The value of `t` on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameType::CreateSession => "CREATE_SESSION",
            FrameType::SessionCreated => "SESSION_CREATED",
            FrameType::InviteCreate => "INVITE_CREATE",
            FrameType::InviteCode => "INVITE_CODE",
            FrameType::Join => "JOIN",
            FrameType::JoinRequest => "JOIN_REQUEST",
            FrameType::JoinAccept => "JOIN_ACCEPT",
            FrameType::Joined => "JOINED",
            FrameType::JoinDeny => "JOIN_DENY",
            FrameType::JoinDenied => "JOIN_DENIED",
            FrameType::Msg => "MSG",
            FrameType::Delivered => "DELIVERED",
            FrameType::MsgRead => "MSG_READ",
            FrameType::Reattach => "REATTACH",
            FrameType::Restore => "RESTORE",
            FrameType::PeerOnline => "PEER_ONLINE",
            FrameType::PeerOffline => "PEER_OFFLINE",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::Error => "ERROR",
        }
    }

    pub fn from_wire(s: &str) -> Option<FrameType> {
        FrameType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether a client may send this type to the relay. The rest only flow relay -> client.
    pub fn is_client_sent(self) -> bool {
        matches!(
            self,
            FrameType::CreateSession
                | FrameType::InviteCreate
                | FrameType::Join
                | FrameType::JoinAccept
                | FrameType::JoinDeny
                | FrameType::Msg
                | FrameType::MsgRead
                | FrameType::Reattach
                | FrameType::Restore
                | FrameType::Ping
                | FrameType::Pong
        )
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a frame could not be read. Each maps to one stable [`ErrorCode`]; the message is meant
/// for a person and never echoes more than a short, sanitised part of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError {
            code,
            message: message.into(),
        }
    }

    pub fn missing(field: &str) -> Self {
        FrameError::new(
            ErrorCode::MissingField,
            format!("missing required field `{field}`"),
        )
    }

    pub fn invalid(field: &str, why: &str) -> Self {
        FrameError::new(ErrorCode::InvalidField, format!("field `{field}` {why}"))
    }

    fn from_json(err: &serde_json::Error) -> Self {
        match err.classify() {
            // Right JSON, wrong shape: e.g. `"t": 5` or `"sid": {}`.
            serde_json::error::Category::Data => FrameError::new(
                ErrorCode::InvalidField,
                format!("frame has a field of the wrong type: {err}"),
            ),
            _ => FrameError::new(
                ErrorCode::MalformedJson,
                format!("frame is not valid JSON: {err}"),
            ),
        }
    }
}

/// The envelope as received, borrowing from the frame text: `data` stays raw JSON so that a
/// relay can forward it without re-serialising, and only the frames it owns are parsed further.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub kind: FrameType,
    sid: Option<Cow<'a, str>>,
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default)]
    t: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    sid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Longest frame type name echoed back in an `unknown_type` error.
const MAX_ECHOED_TYPE: usize = 32;

impl<'a> Envelope<'a> {
    /// Reads the envelope of one frame. Unknown top-level fields are ignored; duplicate
    /// `t`/`sid`/`data` keys are refused so that two parsers can never read one frame two ways.
    pub fn parse(text: &'a str) -> Result<Self, FrameError> {
        // serde would also accept a JSON array for a struct; the protocol says object.
        if !text.trim_start().starts_with('{') {
            return Err(FrameError::new(
                ErrorCode::MalformedJson,
                "frame must be a JSON object",
            ));
        }
        let raw: RawEnvelope<'a> =
            serde_json::from_str(text).map_err(|e| FrameError::from_json(&e))?;
        let t = raw.t.ok_or_else(|| FrameError::missing("t"))?;
        let kind = FrameType::from_wire(&t).ok_or_else(|| {
            let shown: String = t
                .chars()
                .take(MAX_ECHOED_TYPE)
                .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                .collect();
            FrameError::new(
                ErrorCode::UnknownType,
                format!("unknown frame type `{shown}`"),
            )
        })?;
        let data = raw.data.filter(|d| d.get() != "null");
        Ok(Envelope {
            kind,
            sid: raw.sid,
            data,
        })
    }

    /// `sid`, when the frame names one.
    pub fn sid(&self) -> Option<&str> {
        self.sid.as_deref()
    }

    /// `sid`, for frame types that require it.
    pub fn require_sid(&self) -> Result<&str, FrameError> {
        self.sid().ok_or_else(|| FrameError::missing("sid"))
    }

    /// `data` as raw JSON text, if present and not `null`.
    pub fn raw_data(&self) -> Option<&'a RawValue> {
        self.data
    }

    /// `data` parsed into `T`; an absent `data` reads as `{}`, so that `T`'s own checks report
    /// exactly which field is missing.
    pub fn data<T: Deserialize<'a>>(&self) -> Result<T, FrameError> {
        let text = self.data.map_or("{}", RawValue::get);
        if !text.starts_with('{') {
            return Err(FrameError::invalid("data", "must be a JSON object"));
        }
        serde_json::from_str(text).map_err(|e| {
            FrameError::new(
                ErrorCode::InvalidField,
                format!("field `data` has a field of the wrong type: {e}"),
            )
        })
    }
}

#[derive(Serialize)]
struct OutEnvelope<'a, T: Serialize> {
    t: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a T>,
}

/// Writes one frame as JSON text. Keys appear in the order `t`, `sid`, `data`.
pub fn encode<T: Serialize>(kind: FrameType, sid: Option<&str>, data: Option<&T>) -> String {
    let frame = OutEnvelope {
        t: kind.as_str(),
        sid,
        data,
    };
    // Serialising these plain structs cannot fail: every map key is a string.
    serde_json::to_string(&frame).unwrap_or_else(|_| format!("{{\"t\":\"{}\"}}", kind.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{MsgData, OpaqueData};
    use proptest::prelude::*;

    fn parse_err(text: &str) -> ErrorCode {
        match Envelope::parse(text) {
            Ok(env) => panic!("expected an error, parsed {:?}", env.kind),
            Err(e) => e.code,
        }
    }

    #[test]
    fn reads_type_sid_and_raw_data() {
        let text = r#"{"t":"MSG","sid":"ab","data":{"payload":"00ff","msgID":"7"}}"#;
        let env = Envelope::parse(text).unwrap();
        assert_eq!(env.kind, FrameType::Msg);
        assert_eq!(env.sid(), Some("ab"));
        assert_eq!(
            env.raw_data().unwrap().get(),
            r#"{"payload":"00ff","msgID":"7"}"#
        );
        let msg: MsgData = env.data().unwrap();
        assert_eq!(msg.msg_id.unwrap().get(), r#""7""#);
    }

    #[test]
    fn bad_frames_get_the_right_code() {
        assert_eq!(parse_err("not json"), ErrorCode::MalformedJson);
        assert_eq!(parse_err(r#"["MSG"]"#), ErrorCode::MalformedJson);
        assert_eq!(parse_err(r#"{"t":"MSG""#), ErrorCode::MalformedJson);
        assert_eq!(parse_err(r#"{"sid":"x"}"#), ErrorCode::MissingField);
        assert_eq!(parse_err(r#"{"t":5}"#), ErrorCode::InvalidField);
        assert_eq!(
            parse_err(r#"{"t":"MSG","t":"PING"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(parse_err(r#"{"t":"NOPE"}"#), ErrorCode::UnknownType);
    }

    #[test]
    fn unknown_type_echo_is_short_and_printable() {
        let long = format!(r#"{{"t":"{}\u0007"}}"#, "A".repeat(1000));
        let err = Envelope::parse(&long).unwrap_err();
        assert!(err.message.len() < 80, "{}", err.message);
    }

    #[test]
    fn data_must_be_an_object() {
        let env = Envelope::parse(r#"{"t":"JOIN","data":[1]}"#).unwrap();
        assert_eq!(
            env.data::<OpaqueData>().unwrap_err().code,
            ErrorCode::InvalidField
        );
        let env = Envelope::parse(r#"{"t":"JOIN","data":null}"#).unwrap();
        assert!(env.data::<OpaqueData>().unwrap().is_empty());
    }

    #[test]
    fn encode_writes_keys_in_order_and_skips_absent_ones() {
        let data = serde_json::json!({"msgID": "1"});
        assert_eq!(
            encode(FrameType::Delivered, Some("s"), Some(&data)),
            r#"{"t":"DELIVERED","sid":"s","data":{"msgID":"1"}}"#
        );
        assert_eq!(encode::<()>(FrameType::Ping, None, None), r#"{"t":"PING"}"#);
    }

    #[test]
    fn every_type_round_trips() {
        for t in FrameType::ALL {
            assert_eq!(FrameType::from_wire(t.as_str()), Some(t));
            let text = encode::<()>(t, Some("x"), None);
            assert_eq!(Envelope::parse(&text).unwrap().kind, t);
        }
    }

    proptest! {
        // The parser sees raw bytes from the network: whatever arrives, it returns, never panics.
        #[test]
        fn parse_never_panics_on_arbitrary_text(text in ".{0,256}") {
            let _ = Envelope::parse(&text).map(|env| {
                let _ = env.data::<OpaqueData>();
                let _ = env.data::<MsgData>();
            });
        }

        // Near-miss JSON exercises deeper paths than random text does.
        #[test]
        fn parse_never_panics_on_json_shaped_text(
            t in prop::sample::select(vec!["MSG", "JOIN", "REATTACH", "X", ""]),
            sid in prop::option::of("[0-9a-f\"\\\\]{0,40}"),
            data in "[{}\\[\\]\":,a-zA-Z0-9 ]{0,80}",
        ) {
            let sid = sid.map(|s| format!(",\"sid\":\"{s}\"")).unwrap_or_default();
            let text = format!("{{\"t\":\"{t}\"{sid},\"data\":{data}}}");
            let _ = Envelope::parse(&text).map(|env| {
                let _ = env.data::<OpaqueData>();
                let _ = env.data::<MsgData>();
            });
        }

        // What a sender encodes, a receiver reads back unchanged.
        #[test]
        fn encode_then_parse_round_trips(
            i in 0..FrameType::ALL.len(),
            sid in prop::option::of("\\PC{0,40}"),
            payload in "\\PC{0,64}",
        ) {
            let kind = FrameType::ALL[i];
            let data = serde_json::json!({"payload": payload, "msgID": 1});
            let text = encode(kind, sid.as_deref(), Some(&data));
            let env = Envelope::parse(&text).unwrap();
            prop_assert_eq!(env.kind, kind);
            prop_assert_eq!(env.sid(), sid.as_deref());
            let back: serde_json::Value = serde_json::from_str(env.raw_data().unwrap().get()).unwrap();
            prop_assert_eq!(back, data);
        }
    }
}
