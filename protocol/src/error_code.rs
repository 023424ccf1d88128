use std::fmt;

/// Stable, machine-readable error codes carried in `ERROR {data: {code, message}}`.
///
/// The string forms are part of the wire protocol (protocol.md, "Error codes"): clients match
/// on them, so a variant's string never changes once released. New variants may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The text is not JSON, or its top level is not an object.
    MalformedJson,
    /// A binary message starts as a `DATA` frame (byte 0x01) but is too short to be one.
    MalformedData,
    /// `t` names no frame type this relay accepts from a client.
    UnknownType,
    /// A field the frame type requires is absent.
    MissingField,
    /// A field is present but has the wrong JSON type or an invalid value.
    InvalidField,
    /// The message exceeded the relay's frame size limit; the connection is then closed.
    FrameTooLarge,
    /// The sender is not (or no longer) a member of the session named by `sid`.
    NotMember,
    /// Only the session's host may send this frame.
    HostOnly,
    /// No live or recently used invite has this code.
    InviteUnknown,
    /// The invite code was valid but has expired.
    InviteExpired,
    /// The invite code was already used by someone.
    InviteUsed,
    /// Too many failed `JOIN` attempts from this connection or address; wait and retry.
    RateLimited,
    /// The session already has two members; a third is refused.
    SessionFull,
    /// `REATTACH` named a session the relay does not know (expired, or the relay restarted).
    SessionUnknown,
    /// `REATTACH` carried a missing or wrong resume token.
    TokenInvalid,
    /// The other member is not connected, so the frame was not delivered.
    PeerOffline,
    /// Nobody has joined the session yet, so there is no peer to deliver to.
    NotPaired,
    /// `JOIN_ACCEPT`/`JOIN_DENY` named a `clientID` that is not the session's joiner.
    UnknownClient,
    /// This connection already holds the maximum number of sessions.
    TooManySessions,
    /// The relay is at its global capacity for sessions.
    RelayFull,
    /// The peer is offline and its mailbox is full; the frame was not kept.
    MailboxFull,
    /// `RESTORE` could not re-create or re-join the session (wrong proof, or the seat is held
    /// by another token).
    RestoreRefused,
    /// The connection already holds a seat in this session (one connection, one seat).
    AlreadyMember,
    /// Another connection re-attached to this seat with its resume token; this one was detached.
    Replaced,
    /// A relay of a cluster cannot reach the store its nodes share; nothing was done.
    StoreUnavailable,
}

impl ErrorCode {
    /// Every code, in protocol.md order (used by tests to keep the document and the code in step).
    pub const ALL: [ErrorCode; 25] = [
        ErrorCode::MalformedJson,
        ErrorCode::MalformedData,
        ErrorCode::UnknownType,
        ErrorCode::MissingField,
        ErrorCode::InvalidField,
        ErrorCode::FrameTooLarge,
        ErrorCode::NotMember,
        ErrorCode::HostOnly,
        ErrorCode::InviteUnknown,
        ErrorCode::InviteExpired,
        ErrorCode::InviteUsed,
        ErrorCode::RateLimited,
        ErrorCode::SessionFull,
        ErrorCode::SessionUnknown,
        ErrorCode::TokenInvalid,
        ErrorCode::PeerOffline,
        ErrorCode::NotPaired,
        ErrorCode::UnknownClient,
        ErrorCode::TooManySessions,
        ErrorCode::RelayFull,
        ErrorCode::AlreadyMember,
        ErrorCode::Replaced,
        ErrorCode::MailboxFull,
        ErrorCode::RestoreRefused,
        ErrorCode::StoreUnavailable,
    ];

    /// The code's wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedJson => "malformed_json",
            ErrorCode::MalformedData => "malformed_data",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NotMember => "not_member",
            ErrorCode::HostOnly => "host_only",
            ErrorCode::InviteUnknown => "invite_unknown",
            ErrorCode::InviteExpired => "invite_expired",
            ErrorCode::InviteUsed => "invite_used",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::SessionFull => "session_full",
            ErrorCode::SessionUnknown => "session_unknown",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::PeerOffline => "peer_offline",
            ErrorCode::NotPaired => "not_paired",
            ErrorCode::UnknownClient => "unknown_client",
            ErrorCode::TooManySessions => "too_many_sessions",
            ErrorCode::RelayFull => "relay_full",
            ErrorCode::AlreadyMember => "already_member",
            ErrorCode::MailboxFull => "mailbox_full",
            ErrorCode::RestoreRefused => "restore_refused",
            ErrorCode::Replaced => "replaced",
            ErrorCode::StoreUnavailable => "store_unavailable",
        }
    }

    /// Parses a wire string back into a code (for clients); `None` for codes this build does not know.
    pub fn from_wire(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate wire string {code}");
            assert_eq!(ErrorCode::from_wire(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_wire("no_such_code"), None);
    }
}
