//! The `data` of the frames the relay reads or writes itself. Everything else under `data` is
//! end-to-end and opaque to the relay; [`OpaqueData`] carries it through untouched.
//!
//! Fields the relay requires are `Option` here so that a missing one is reported by name
//! (`missing_field`) rather than as a generic shape error.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

use crate::FrameError;

/// A `data` object whose member values are kept as raw JSON text, so that carrying them on
/// changes nothing, not even the precision of a large number. Members are re-encoded in key
/// order. Used for `JOIN` (minus `code`), `JOIN_ACCEPT`/`JOIN_DENY` (minus `clientID`) and the
/// parameters stored by `INVITE_CREATE`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpaqueData(BTreeMap<String, Box<RawValue>>);

impl OpaqueData {
    /// Removes `key` and returns it as a string; a non-string value is `invalid_field`.
    pub fn take_string(&mut self, key: &str) -> Result<Option<String>, FrameError> {
        let Some(raw) = self.0.remove(key) else {
            return Ok(None);
        };
        serde_json::from_str::<String>(raw.get())
            .map(Some)
            .map_err(|_| FrameError::invalid(&format!("data.{key}"), "must be a string"))
    }

    /// Sets `key` to a string value (replacing any value the sender put there).
    pub fn set_string(&mut self, key: &str, value: &str) {
        let raw = serde_json::value::to_raw_value(value).ok();
        if let Some(raw) = raw {
            self.0.insert(key.to_string(), raw);
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.0.remove(key);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.get(key).map(AsRef::as_ref)
    }
}

/// `MSG {sid, data: {payload, msgID, ...}}`. The relay checks these two exist, forwards the
/// frame byte for byte, and echoes `msgID` (raw, whatever its JSON type) in `DELIVERED`.
#[derive(Debug, Deserialize)]
pub struct MsgData<'a> {
    #[serde(rename = "msgID", borrow, default)]
    pub msg_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub payload: Option<&'a RawValue>,
}

impl<'a> MsgData<'a> {
    /// Checks the fields the relay relies on; returns the raw `msgID`.
    pub fn validate(&self) -> Result<&'a RawValue, FrameError> {
        let msg_id = self
            .msg_id
            .ok_or_else(|| FrameError::missing("data.msgID"))?;
        if !is_scalar_id(msg_id.get()) {
            return Err(FrameError::invalid(
                "data.msgID",
                "must be a string or a number",
            ));
        }
        let payload = self
            .payload
            .ok_or_else(|| FrameError::missing("data.payload"))?;
        if !payload.get().starts_with('"') {
            return Err(FrameError::invalid("data.payload", "must be a string"));
        }
        Ok(msg_id)
    }
}

impl<'a> MsgData<'a> {
    /// The `msgID` to echo in an `ERROR`, if it is one that can be echoed.
    pub fn echoable_id(&self) -> Option<&'a RawValue> {
        self.msg_id.filter(|id| is_scalar_id(id.get()))
    }
}

fn is_scalar_id(raw: &str) -> bool {
    raw.starts_with('"') || raw.starts_with('-') || raw.starts_with(|c: char| c.is_ascii_digit())
}

/// `REATTACH {sid, data: {resumeToken}}`. The relay reads it; the client writes it (borrowing
/// its token, so that no copy of the secret is left behind). `None` is written as an absent
/// member (a token-less `REATTACH`, 2.2).
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ReattachData<'a> {
    #[serde(rename = "resumeToken", skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<Cow<'a, str>>,
}

/// `RESTORE {sid, data: {role, resumeToken, proof}}`: re-creates a session the relay forgot
/// (it restarted), or takes a seat in one being restored. The relay reads it; the client
/// writes it, members in this order. `None` is written as an absent member.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct RestoreData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Cow<'a, str>>,
    #[serde(rename = "resumeToken", skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof: Option<Cow<'a, str>>,
}

/// `SESSION_CREATED {sid, data: {resumeToken}}` and the relay's part of the first `JOINED`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeTokenData {
    #[serde(rename = "resumeToken")]
    pub resume_token: String,
}

/// `INVITE_CODE {sid, data: {code, expiresIn}}`; `expiresIn` is in seconds. A reader takes an
/// absent `expiresIn` (a relay that does not send it) as the default lifetime,
/// [`limits::INVITE_TTL`](crate::limits::INVITE_TTL).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InviteCodeData {
    pub code: String,
    #[serde(rename = "expiresIn", default = "default_invite_ttl")]
    pub expires_in: u64,
}

fn default_invite_ttl() -> u64 {
    crate::limits::INVITE_TTL.as_secs()
}

/// `DELIVERED {sid, data: {msgID}}`, `msgID` echoed exactly as the sender wrote it.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeliveredData<'a> {
    #[serde(rename = "msgID", borrow)]
    pub msg_id: &'a RawValue,
}

/// `ERROR {sid?, data: {code, message, msgID?}}`: `msgID` is set when the failed frame was a
/// `MSG`, so a client knows which message was not relayed. The relay always writes `code` and
/// `message`; a reader takes an absent one as empty (and puts a stand-in of its own there).
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorData<'a> {
    #[serde(default)]
    pub code: Cow<'a, str>,
    #[serde(default)]
    pub message: Cow<'a, str>,
    #[serde(
        rename = "msgID",
        borrow,
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub msg_id: Option<&'a RawValue>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, FrameType, encode};

    /// The `data` of protocol.md's example frames of type `t`, as written there, in document
    /// order: the golden texts the shapes below must write and read.
    fn examples(t: &str) -> Vec<&'static str> {
        const DOCUMENT: &str = include_str!("../../protocol.md");
        let start = format!(r#"{{"t":"{t}""#);
        DOCUMENT
            .lines()
            .map(str::trim)
            .filter(|line| line.starts_with(&start))
            .filter_map(|line| Envelope::parse(line).ok()?.raw_data().map(RawValue::get))
            .collect()
    }

    fn example(t: &str) -> &'static str {
        examples(t)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("protocol.md has no {t} example with data"))
    }

    #[test]
    fn golden_reattach() {
        let golden = example("REATTACH");
        assert_eq!(golden, r#"{"resumeToken":"5e0b…64 hex digits…"}"#);
        let data = ReattachData {
            resume_token: Some("5e0b…64 hex digits…".into()),
        };
        assert_eq!(serde_json::to_string(&data).unwrap(), golden);
        let read: ReattachData = serde_json::from_str(golden).unwrap();
        assert_eq!(read.resume_token.as_deref(), Some("5e0b…64 hex digits…"));
        // Token-less (the compatibility option): the member is absent, not null.
        assert_eq!(
            serde_json::to_string(&ReattachData::default()).unwrap(),
            "{}"
        );
    }

    #[test]
    fn golden_restore() {
        let golden = example("RESTORE");
        assert_eq!(golden, r#"{"role":"guest","resumeToken":"0c9d…"}"#);
        let data = RestoreData {
            role: Some("guest".into()),
            resume_token: Some("0c9d…".into()),
            proof: None,
        };
        assert_eq!(serde_json::to_string(&data).unwrap(), golden);
        // Parley's client also sends the proof (3.7), last.
        let with_proof = RestoreData {
            proof: Some("6c53".into()),
            ..data
        };
        let text = r#"{"role":"guest","resumeToken":"0c9d…","proof":"6c53"}"#;
        assert_eq!(serde_json::to_string(&with_proof).unwrap(), text);
        let read: RestoreData = serde_json::from_str(text).unwrap();
        assert_eq!(read.role.as_deref(), Some("guest"));
        assert_eq!(read.resume_token.as_deref(), Some("0c9d…"));
        assert_eq!(read.proof.as_deref(), Some("6c53"));
    }

    #[test]
    fn golden_session_created() {
        let golden = example("SESSION_CREATED");
        assert_eq!(golden, r#"{"resumeToken":"5e0b…"}"#);
        let data = ResumeTokenData {
            resume_token: "5e0b…".into(),
        };
        assert_eq!(serde_json::to_string(&data).unwrap(), golden);
        let read: ResumeTokenData = serde_json::from_str(golden).unwrap();
        assert_eq!(read.resume_token, "5e0b…");
        assert!(serde_json::from_str::<ResumeTokenData>("{}").is_err());
    }

    #[test]
    fn golden_invite_code() {
        for golden in examples("INVITE_CODE") {
            assert_eq!(golden, r#"{"code":"042917","expiresIn":600}"#);
            let data = InviteCodeData {
                code: "042917".into(),
                expires_in: 600,
            };
            assert_eq!(serde_json::to_string(&data).unwrap(), golden);
            let read: InviteCodeData = serde_json::from_str(golden).unwrap();
            assert_eq!((read.code.as_str(), read.expires_in), ("042917", 600));
        }
        // Without `expiresIn`: the default lifetime.
        let read: InviteCodeData = serde_json::from_str(r#"{"code":"042917"}"#).unwrap();
        assert_eq!(read.expires_in, crate::limits::INVITE_TTL.as_secs());
        // A lifetime too large for a clock is still read (the client treats it as "never").
        let read: InviteCodeData =
            serde_json::from_str(r#"{"code":"042917","expiresIn":18446744073709551615}"#).unwrap();
        assert_eq!(read.expires_in, u64::MAX);
    }

    #[test]
    fn golden_delivered() {
        // A string `msgID` (2.3) and a chat message's number (3.2), echoed as written.
        let goldens = examples("DELIVERED");
        assert_eq!(goldens, [r#"{"msgID":"17"}"#, r#"{"msgID":1}"#]);
        for golden in goldens {
            let read: DeliveredData = serde_json::from_str(golden).unwrap();
            assert_eq!(serde_json::to_string(&read).unwrap(), golden);
            let frame = encode(FrameType::Delivered, Some("s"), Some(&read));
            assert_eq!(
                frame,
                format!(r#"{{"t":"DELIVERED","sid":"s","data":{golden}}}"#)
            );
        }
    }

    #[test]
    fn golden_error() {
        let golden = example("ERROR");
        assert_eq!(
            golden,
            r#"{"code":"peer_offline","message":"your peer is offline","msgID":"17"}"#
        );
        let msg_id = serde_json::value::to_raw_value("17").unwrap();
        let data = ErrorData {
            code: "peer_offline".into(),
            message: "your peer is offline".into(),
            msg_id: Some(&msg_id),
        };
        assert_eq!(serde_json::to_string(&data).unwrap(), golden);
        let read: ErrorData = serde_json::from_str(golden).unwrap();
        assert_eq!(read.code, "peer_offline");
        assert_eq!(read.message, "your peer is offline");
        assert_eq!(read.msg_id.map(RawValue::get), Some(r#""17""#));
        // Without `msgID`: absent, not null.
        let data = ErrorData {
            msg_id: None,
            ..read
        };
        assert_eq!(
            serde_json::to_string(&data).unwrap(),
            r#"{"code":"peer_offline","message":"your peer is offline"}"#
        );
        // A reader of a malformed ERROR still gets what is there.
        let read: ErrorData = serde_json::from_str(r#"{"msgID":3}"#).unwrap();
        assert_eq!((read.code.as_ref(), read.message.as_ref()), ("", ""));
        assert_eq!(read.msg_id.map(RawValue::get), Some("3"));
    }

    #[test]
    fn golden_msg_as_the_relay_reads_it() {
        for golden in examples("MSG") {
            let read: MsgData = serde_json::from_str(golden).unwrap();
            assert!(read.validate().is_ok(), "{golden}");
        }
    }

    #[test]
    fn opaque_data_keeps_values_exactly() {
        let text =
            r#"{"n":123456789012345678901234567890,"s":"\ud800","f":1.0e-400,"code":"042917"}"#;
        let mut data: OpaqueData = serde_json::from_str(text).unwrap();
        assert_eq!(data.take_string("code").unwrap().as_deref(), Some("042917"));
        data.set_string("clientID", "ab");
        let out = serde_json::to_string(&data).unwrap();
        assert_eq!(
            out,
            r#"{"clientID":"ab","f":1.0e-400,"n":123456789012345678901234567890,"s":"\ud800"}"#
        );
    }

    #[test]
    fn take_string_refuses_other_types() {
        let mut data: OpaqueData = serde_json::from_str(r#"{"code":123456}"#).unwrap();
        assert_eq!(
            data.take_string("code").unwrap_err().code,
            crate::ErrorCode::InvalidField
        );
    }
}
