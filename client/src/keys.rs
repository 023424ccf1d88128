//! The key schedule: from the DH secret, the SPAKE2 key and the handshake transcript to the
//! session's keys. protocol.md ("Key schedule") is the normative description, with vectors.
//!
//! ```text
//! T   = SHA-256( field("parley/v1/transcript") || field(version as u32 BE)
//!              || field(sid, 16 bytes) || field(host DH public) || field(guest DH public)
//!              || field(host SPAKE2 message) || field(guest SPAKE2 message) )
//!       where field(x) = u32 BE length of x || x
//! PRK = HKDF-Extract(salt = T, IKM = DH secret (256 bytes) || SPAKE2 key (32 bytes))
//! each key = HKDF-Expand(PRK, info = its own label, length)
//! ```
//! Both DH and SPAKE2 feed the key: an attacker must break both the DH (to read) and guess the
//! code's secret (to impersonate). Salting with T binds every handshake field and both roles,
//! so a relay that alters or swaps any of them leaves the two sides with different keys, which
//! key confirmation then catches.

use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub const PROTOCOL_VERSION: u32 = 1;

pub const LABEL_TRANSCRIPT: &[u8] = b"parley/v1/transcript";
pub const LABEL_CONFIRM_HOST: &[u8] = b"parley/v1/confirm/host";
pub const LABEL_CONFIRM_GUEST: &[u8] = b"parley/v1/confirm/guest";
pub const LABEL_RATCHET_ROOT: &[u8] = b"parley/v1/ratchet/initial-root";
pub const LABEL_SAFETY_NUMBER: &[u8] = b"parley/v1/safety-number";
pub const LABEL_RESTORE_PROOF: &[u8] = b"parley/v1/relay-restore-proof";

/// Everything both sides saw during the handshake, in a fixed order (host first).
pub struct Transcript<'a> {
    pub sid: &'a [u8; 16],
    pub host_dh: &'a [u8],
    pub guest_dh: &'a [u8],
    pub host_pake: &'a [u8],
    pub guest_pake: &'a [u8],
}

impl Transcript<'_> {
    pub fn hash(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        let version = PROTOCOL_VERSION.to_be_bytes();
        for field in [
            LABEL_TRANSCRIPT,
            &version[..],
            &self.sid[..],
            self.host_dh,
            self.guest_dh,
            self.host_pake,
            self.guest_pake,
        ] {
            // Every field here is far below 4 GiB; a length prefix makes the encoding injective.
            hasher.update(u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
            hasher.update(field);
        }
        hasher.finalize().into()
    }
}

/// A 256-bit symmetric key (root, chain, message or receipt key). Zeroized on drop; `Debug`
/// prints nothing of it.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub fn from_bytes(bytes: [u8; 32]) -> SecretKey {
        SecretKey(bytes)
    }

    pub fn from_hex(hex_key: &str) -> Option<SecretKey> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut bytes).ok()?;
        Some(SecretKey(bytes))
    }

    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// A key-confirmation value: revealing it reveals nothing about the other keys (each HKDF
/// output is independent), and only a side holding the same PRK can produce it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Confirmation([u8; 32]);

impl Confirmation {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Constant-time comparison with what the peer sent (hex).
    pub fn matches_hex(&self, presented: &str) -> bool {
        let mut bytes = [0u8; 32];
        if hex::decode_to_slice(presented, &mut bytes).is_err() {
            return false;
        }
        self.0.ct_eq(&bytes).into()
    }
}

/// All keys of one session.
pub struct SessionKeys {
    /// The Double Ratchet's first root key (protocol.md 3.6).
    pub ratchet_root: SecretKey,
    pub host_confirm: Confirmation,
    pub guest_confirm: Confirmation,
    /// 12 digits in three groups; equal on both sides iff they hold the same keys.
    pub safety_number: String,
    /// What both members present to a restarted relay to re-create the session (hex). It
    /// reveals nothing about the other keys.
    pub restore_proof: String,
}

pub fn derive(dh_secret: &[u8], pake_key: &[u8], transcript_hash: &[u8; 32]) -> SessionKeys {
    let mut ikm = Zeroizing::new(Vec::with_capacity(dh_secret.len() + pake_key.len()));
    ikm.extend_from_slice(dh_secret);
    ikm.extend_from_slice(pake_key);
    let hkdf = Hkdf::<Sha256>::new(Some(transcript_hash), &ikm);
    let expand32 = |label: &[u8]| {
        let mut out = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit: expand cannot fail.
        let _ = hkdf.expand(label, &mut out);
        out
    };
    let mut safety = [0u8; 8];
    let _ = hkdf.expand(LABEL_SAFETY_NUMBER, &mut safety);
    SessionKeys {
        ratchet_root: SecretKey(expand32(LABEL_RATCHET_ROOT)),
        host_confirm: Confirmation(expand32(LABEL_CONFIRM_HOST)),
        guest_confirm: Confirmation(expand32(LABEL_CONFIRM_GUEST)),
        safety_number: safety_number(u64::from_be_bytes(safety)),
        restore_proof: hex::encode(expand32(LABEL_RESTORE_PROOF)),
    }
}

fn safety_number(n: u64) -> String {
    let digits = format!("{:012}", n % 1_000_000_000_000);
    let (a, rest) = digits.split_at(4);
    let (b, c) = rest.split_at(4);
    format!("{a} {b} {c}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_changes_the_keys() {
        let sid = [7u8; 16];
        let base = Transcript {
            sid: &sid,
            host_dh: &[1; 256],
            guest_dh: &[2; 256],
            host_pake: &[3; 33],
            guest_pake: &[4; 33],
        };
        let reference = derive(&[5; 256], &[6; 32], &base.hash());
        let other_sid = [8u8; 16];
        let variants = [
            Transcript {
                sid: &other_sid,
                ..base
            },
            Transcript {
                host_dh: &[2; 256],
                guest_dh: &[1; 256],
                ..base
            }, // roles swapped
            Transcript {
                host_pake: &[4; 33],
                guest_pake: &[3; 33],
                ..base
            },
        ];
        for t in variants {
            let keys = derive(&[5; 256], &[6; 32], &t.hash());
            assert!(keys.ratchet_root != reference.ratchet_root);
        }
        assert!(derive(&[9; 256], &[6; 32], &base.hash()).ratchet_root != reference.ratchet_root);
        assert!(derive(&[5; 256], &[9; 32], &base.hash()).ratchet_root != reference.ratchet_root);
    }

    #[test]
    fn safety_numbers_are_twelve_digits_in_three_groups() {
        assert_eq!(safety_number(42), "0000 0000 0042");
        assert_eq!(safety_number(u64::MAX), "0737 0955 1615");
    }

    #[test]
    fn confirmation_matches_only_itself() {
        let c = Confirmation([3; 32]);
        assert!(c.matches_hex(&c.to_hex()));
        assert!(!c.matches_hex(&"03".repeat(31)));
        assert!(!c.matches_hex("zz"));
        assert!(!c.matches_hex(&Confirmation([4; 32]).to_hex()));
    }
}
