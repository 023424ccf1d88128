//! The `data` of the frames the relay reads or writes itself. Everything else under `data` is
//! end-to-end and opaque to the relay; the `rest` maps below carry it through untouched.
//!
//! Fields the relay requires are `Option` here so that a missing one is reported by name
//! (`missing_field`) rather than as a generic shape error.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::FrameError;

/// `JOIN {data: {code, ...}}`: `code` is the relay part of the invite code (6 digits). Every
/// other field goes to the host in `JOIN_REQUEST`; the code itself never does.
#[derive(Debug, Deserialize)]
pub struct JoinData {
    pub code: Option<String>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `JOIN_ACCEPT`/`JOIN_DENY {sid, data: {clientID, ...}}`: `clientID` routes the answer to the
/// joiner and is removed; the rest is forwarded untouched in `JOINED`/`JOIN_DENIED`.
#[derive(Debug, Deserialize)]
pub struct JoinAnswerData {
    #[serde(rename = "clientID")]
    pub client_id: Option<String>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
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

fn is_scalar_id(raw: &str) -> bool {
    raw.starts_with('"') || raw.starts_with('-') || raw.starts_with(|c: char| c.is_ascii_digit())
}

/// `REATTACH {sid, data: {resumeToken}}`.
#[derive(Debug, Default, Deserialize)]
pub struct ReattachData {
    #[serde(rename = "resumeToken")]
    pub resume_token: Option<String>,
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
