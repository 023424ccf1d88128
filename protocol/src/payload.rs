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

/// `REATTACH {sid, data: {resumeToken}}`.
#[derive(Debug, Default, Deserialize)]
pub struct ReattachData {
    #[serde(rename = "resumeToken")]
    pub resume_token: Option<String>,
}

/// `RESTORE {sid, data: {role, resumeToken, proof}}`: re-creates a session the relay forgot
/// (it restarted), or takes a seat in one being restored.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct RestoreData {
    pub role: Option<String>,
    #[serde(rename = "resumeToken")]
    pub resume_token: Option<String>,
    pub proof: Option<String>,
}

/// `SESSION_CREATED {sid, data: {resumeToken}}` and the relay's part of the first `JOINED`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeTokenData {
    #[serde(rename = "resumeToken")]
    pub resume_token: String,
}

/// `INVITE_CODE {sid, data: {code, expiresIn}}`; `expiresIn` is in seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InviteCodeData {
    pub code: String,
    #[serde(rename = "expiresIn")]
    pub expires_in: u64,
}

/// `DELIVERED {sid, data: {msgID}}`, `msgID` echoed exactly as the sender wrote it.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeliveredData<'a> {
    #[serde(rename = "msgID", borrow)]
    pub msg_id: &'a RawValue,
}

/// `ERROR {sid?, data: {code, message, msgID?}}`: `msgID` is set when the failed frame was a
/// `MSG`, so a client knows which message was not relayed.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorData<'a> {
    pub code: Cow<'a, str>,
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
