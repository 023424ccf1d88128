//! Identifiers the relay hands out. All come from the thread-local CSPRNG (`rand::rng()`, seeded
//! from the OS), never from a counter, so none can be predicted from another.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::hub::Role;

/// 128 random bits, 32 lowercase hex digits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub(crate) [u8; 16]);

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

/// The relay's own secret: resume tokens are MACs under it, so the relay stores none and can
/// check any token it ever issued, even after a restart that forgot the session (as long as
/// the secret is kept: `parley-relay --secret-file`). Zeroized on drop, never printed.
#[derive(Clone)]
pub struct RelaySecret(Zeroizing<[u8; 32]>);

const TOKEN_LABEL: &[u8] = b"parley/v1/relay/resume-token";
/// The label of [`RelaySecret::address_tag`]'s MAC, distinct from every other use of the secret.
const ADDRESS_LABEL: &[u8] = b"parley/v1/relay/address-tag";
/// The label of [`RelaySecret::inbox_key`].
const INBOX_LABEL: &[u8] = b"parley/v1/relay/cluster-inbox";

impl RelaySecret {
    pub fn random() -> Self {
        RelaySecret(Zeroizing::new(rand::rng().random()))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        RelaySecret(Zeroizing::new(bytes))
    }

    /// `HMAC-SHA256(secret, label ‖ sid ‖ role ‖ stage ‖ nonce)`, first 24 bytes.
    fn mac(&self, sid: SessionId, role: Role, stage: Stage, nonce: &TokenNonce) -> [u8; 24] {
        // HMAC takes keys of any length: this cannot fail.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.0.as_slice()) else {
            return [0u8; 24];
        };
        mac.update(TOKEN_LABEL);
        mac.update(&sid.0);
        mac.update(&[role.wire_byte(), stage as u8]);
        mac.update(&nonce.0);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 24];
        out.copy_from_slice(full.get(..24).unwrap_or(&[0u8; 24]));
        out
    }

    /// A name for a client address that does not reveal it, the same on every relay sharing
    /// this secret: `HMAC-SHA256(secret, label ‖ address)`, first 12 bytes, in hex. A cluster
    /// keys its shared rate limits by it, so no address is written to Redis.
    pub fn address_tag(&self, address: &[u8]) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.0.as_slice()) else {
            return String::new();
        };
        mac.update(ADDRESS_LABEL);
        mac.update(address);
        hex::encode(mac.finalize().into_bytes().get(..12).unwrap_or_default())
    }

    /// The key that seals what cluster nodes write to each other's inboxes:
    /// `HKDF-SHA256(ikm = secret, info = label)`. Only nodes with the secret file can read or
    /// forge an entry, so Redis (and its append-only file) never holds a readable token.
    pub fn inbox_key(&self) -> Zeroizing<[u8; 32]> {
        let hkdf = hkdf::Hkdf::<Sha256>::new(None, self.0.as_slice());
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's limit: expand cannot fail.
        let _ = hkdf.expand(INBOX_LABEL, key.as_mut());
        key
    }

    /// A new token for `role`'s seat in `sid`: a fresh nonce (the seat remembers it, so a
    /// seat given to someone else later gets a token the earlier holder's does not match).
    pub fn issue(&self, sid: SessionId, role: Role, stage: Stage) -> ResumeToken {
        let nonce = TokenNonce(rand::rng().random());
        ResumeToken {
            mac: self.mac(sid, role, stage, &nonce),
            nonce,
        }
    }

    /// Which seat of `sid` a presented token was issued for, at which stage, with its nonce;
    /// `None` for anything this secret did not issue. Every kind is checked in constant time.
    pub fn verify(&self, sid: SessionId, presented: &str) -> Option<Verified> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(presented, &mut bytes).ok()?;
        let (nonce, mac) = bytes.split_at(8);
        let nonce = TokenNonce(nonce.try_into().ok()?);
        let mut found = None;
        for (role, stage) in [
            (Role::Host, Stage::Member),
            (Role::Guest, Stage::Member),
            (Role::Guest, Stage::Joiner),
        ] {
            if bool::from(self.mac(sid, role, stage, &nonce).ct_eq(mac)) {
                found = Some(Verified { role, stage, nonce });
            }
        }
        found
    }
}

impl fmt::Debug for RelaySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RelaySecret(..)")
    }
}

/// How far its holder has come: a joiner's token (issued at `JOIN`, before the host answered)
/// only takes back the seat it was issued for while the relay holds the session; a member's
/// (the host's, or the guest's from `JOIN_ACCEPT` on) also re-creates a forgotten session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Member = 1,
    Joiner = 2,
}

/// What a presented token proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub role: Role,
    pub stage: Stage,
    pub nonce: TokenNonce,
}

/// Tells tokens for the same seat apart (not secret: it travels in the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenNonce([u8; 8]);

/// 256 bits, 64 hex digits: a member's proof of its seat for `REATTACH`.
pub struct ResumeToken {
    nonce: TokenNonce,
    mac: [u8; 24],
}

impl ResumeToken {
    pub fn nonce(&self) -> TokenNonce {
        self.nonce
    }

    pub fn to_wire(&self) -> String {
        let mut bytes = [0u8; 32];
        let (nonce, mac) = bytes.split_at_mut(8);
        nonce.copy_from_slice(&self.nonce.0);
        mac.copy_from_slice(&self.mac);
        hex::encode(bytes)
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
    fn tokens_verify_for_their_seat_only() {
        let secret = RelaySecret::random();
        let sid = SessionId::random();
        let host = secret.issue(sid, Role::Host, Stage::Member);
        let guest = secret.issue(sid, Role::Guest, Stage::Member);
        let joiner = secret.issue(sid, Role::Guest, Stage::Joiner);
        assert_eq!(host.to_wire().len(), 64);
        let verified = |role, stage, nonce| Some(Verified { role, stage, nonce });
        assert_eq!(
            secret.verify(sid, &host.to_wire()),
            verified(Role::Host, Stage::Member, host.nonce())
        );
        assert_eq!(
            secret.verify(sid, &guest.to_wire()),
            verified(Role::Guest, Stage::Member, guest.nonce())
        );
        assert_eq!(
            secret.verify(sid, &joiner.to_wire()),
            verified(Role::Guest, Stage::Joiner, joiner.nonce())
        );
        // Not for another session, not under another secret, not garbage.
        assert_eq!(secret.verify(SessionId::random(), &host.to_wire()), None);
        assert_eq!(RelaySecret::random().verify(sid, &host.to_wire()), None);
        let mut flipped = host.to_wire().into_bytes();
        flipped[63] = if flipped[63] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            secret.verify(sid, &String::from_utf8(flipped).unwrap()),
            None
        );
        for junk in ["", "not hex", &"0".repeat(64), &"0".repeat(66)] {
            assert_eq!(secret.verify(sid, junk), None);
        }
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
