//! Identifiers the relay hands out. All come from the thread-local CSPRNG (`rand::rng()`, seeded
//! from the OS), never from a counter, so none can be predicted from another.

use std::fmt;

use rand::Rng;
use subtle::ConstantTimeEq;

/// 128 random bits, 32 lowercase hex digits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId([u8; 16]);

impl SessionId {
    pub fn random() -> Self {
        SessionId(rand::rng().random())
    }

    /// Parses the wire form; anything else is simply not a session this relay knows.
    pub fn parse(s: &str) -> Option<Self> {
        // The wire form is lowercase; one spelling per id.
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(s, &mut bytes).ok()?;
        Some(SessionId(bytes))
    }

    /// The first 8 hex digits, for logs: enough to follow one session, useless for `REATTACH`.
    pub fn tag(&self) -> String {
        hex::encode(self.0.get(..4).unwrap_or_default())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// 256 random bits, 64 hex digits: a member's proof of its seat for `REATTACH`.
pub struct ResumeToken([u8; 32]);

impl ResumeToken {
    pub fn random() -> Self {
        ResumeToken(rand::rng().random())
    }

    pub fn to_wire(&self) -> String {
        hex::encode(self.0)
    }

    /// A token presented to restore a session the relay forgot.
    pub fn from_wire(s: &str) -> Option<ResumeToken> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).ok()?;
        Some(ResumeToken(bytes))
    }

    /// Constant-time check of a presented token (the time taken reveals nothing about how much
    /// of it matched).
    pub fn matches(&self, presented: &str) -> bool {
        let mut bytes = [0u8; 32];
        if hex::decode_to_slice(presented, &mut bytes).is_err() {
            return false;
        }
        self.0.ct_eq(&bytes).into()
    }
}

impl fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeToken(..)")
    }
}

/// 64 random bits, 16 hex digits: names the joiner in `JOIN_REQUEST`/`JOIN_ACCEPT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientId(u64);

impl ClientId {
    pub fn random() -> Self {
        ClientId(rand::rng().random())
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The relay part of an invite code: `INVITE_CODE_DIGITS` decimal digits, leading zeros kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct InviteCode(u32);

const INVITE_CODE_SPACE: u32 = 1_000_000;

impl InviteCode {
    pub fn random() -> Self {
        InviteCode(rand::rng().random_range(0..INVITE_CODE_SPACE))
    }

    /// Exactly six ASCII digits.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != parley_protocol::limits::INVITE_CODE_DIGITS
            || !s.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        s.parse().ok().map(InviteCode)
    }
}

impl fmt::Display for InviteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06}", self.0)
    }
}

/// Never print a live code, even in debug output.
impl fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InviteCode(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_round_trip_and_reject_garbage() {
        let sid = SessionId::random();
        assert_eq!(SessionId::parse(&sid.to_string()), Some(sid));
        assert_eq!(sid.to_string().len(), 32);
        assert_eq!(SessionId::parse("zz"), None);
        assert_eq!(SessionId::parse(&"0".repeat(34)), None);
    }

    #[test]
    fn tokens_match_only_themselves() {
        let token = ResumeToken::random();
        assert!(token.matches(&token.to_wire()));
        assert!(!token.matches(&ResumeToken::random().to_wire()));
        assert!(!token.matches(""));
        assert!(!token.matches("not hex"));
    }

    #[test]
    fn invite_codes_are_six_digits() {
        assert_eq!(
            InviteCode::parse("000042").map(|c| c.to_string()),
            Some("000042".into())
        );
        for bad in [
            "12345",
            "1234567",
            "12345a",
            "+12345",
            " 12345",
            "１２３４５６",
        ] {
            assert!(InviteCode::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(InviteCode::random().to_string().len(), 6);
    }
}
