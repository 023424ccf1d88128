//! AES-256-GCM with a random IV, payload `hex(IV(12) || tag(16) || ciphertext)` as in the
//! original system: what receipts are sealed with (under their chain's receipt key, which seals
//! many receipts, hence the random IV). Chat messages are sealed by the ratchet
//! (`crate::ratchet`), whose keys each seal one message.
//!
//! The associated data binds the session, the direction and (for messages) the sequence
//! number, so a frame replayed into another session, reflected back to its sender, or moved to
//! another place in the stream fails authentication.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::TryRngCore;

use crate::keys::SecretKey;

pub const IV_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;
pub const AAD_LABEL: &[u8] = b"parley/v1/message";

/// Which way a message goes; part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    HostToGuest = 1,
    GuestToHost = 2,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("payload is not hex, or shorter than IV and tag")]
    Malformed,
    #[error(
        "message failed authentication (tampered, replayed into another place, or not for this session)"
    )]
    Authentication,
    #[error("the operating system's random source failed")]
    Random,
}

/// `AAD_LABEL || sid (16) || direction (1) || seq (u64 BE)`.
pub fn associated_data(sid: &[u8; 16], direction: Direction, seq: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_LABEL.len() + 16 + 1 + 8);
    aad.extend_from_slice(AAD_LABEL);
    aad.extend_from_slice(sid);
    aad.push(direction as u8);
    aad.extend_from_slice(&seq.to_be_bytes());
    aad
}

/// Encrypts with a fresh random IV.
pub fn seal(key: &SecretKey, aad: &[u8], plaintext: &[u8]) -> Result<String, MessageError> {
    let mut iv = [0u8; IV_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut iv)
        .map_err(|_| MessageError::Random)?;
    Ok(seal_with_iv(key, &iv, aad, plaintext))
}

/// Encrypts with the given IV (test vectors only need this to be public).
pub fn seal_with_iv(key: &SecretKey, iv: &[u8; IV_BYTES], aad: &[u8], plaintext: &[u8]) -> String {
    let cipher = Aes256Gcm::new(key.as_bytes().into());
    let mut out = vec![0u8; IV_BYTES + TAG_BYTES + plaintext.len()];
    let (head, body) = out.split_at_mut(IV_BYTES + TAG_BYTES);
    body.copy_from_slice(plaintext);
    let nonce = Nonce::from(*iv);
    // Only fails for plaintexts over 64 GiB, far beyond any frame.
    let tag = cipher
        .encrypt_inout_detached(&nonce, aad, body.into())
        .unwrap_or_default();
    let (iv_part, tag_part) = head.split_at_mut(IV_BYTES);
    iv_part.copy_from_slice(iv);
    tag_part.copy_from_slice(&tag);
    hex::encode(out)
}

/// Decrypts and authenticates a payload.
pub fn open(key: &SecretKey, aad: &[u8], payload_hex: &str) -> Result<Vec<u8>, MessageError> {
    let mut bytes = hex::decode(payload_hex).map_err(|_| MessageError::Malformed)?;
    if bytes.len() < IV_BYTES + TAG_BYTES {
        return Err(MessageError::Malformed);
    }
    let mut body = bytes.split_off(IV_BYTES + TAG_BYTES);
    let (iv, tag) = bytes.split_at(IV_BYTES);
    let nonce = Nonce::try_from(iv).map_err(|_| MessageError::Malformed)?;
    let tag = Tag::try_from(tag).map_err(|_| MessageError::Malformed)?;
    let cipher = Aes256Gcm::new(key.as_bytes().into());
    cipher
        .decrypt_inout_detached(&nonce, aad, body.as_mut_slice().into(), &tag)
        .map_err(|_| MessageError::Authentication)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; 32])
    }

    #[test]
    fn round_trips_and_rejects_any_change() {
        let sid = [1u8; 16];
        let aad = associated_data(&sid, Direction::HostToGuest, 5);
        let payload = seal(&key(9), &aad, b"hello").unwrap();
        assert_eq!(open(&key(9), &aad, &payload).unwrap(), b"hello");

        // Wrong key, wrong direction (reflection), wrong seq, wrong session.
        assert_eq!(
            open(&key(8), &aad, &payload),
            Err(MessageError::Authentication)
        );
        for other in [
            associated_data(&sid, Direction::GuestToHost, 5),
            associated_data(&sid, Direction::HostToGuest, 6),
            associated_data(&[2u8; 16], Direction::HostToGuest, 5),
        ] {
            assert_eq!(
                open(&key(9), &other, &payload),
                Err(MessageError::Authentication)
            );
        }
        // Every single bit flip is caught.
        let bytes = hex::decode(&payload).unwrap();
        for i in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 1;
            assert!(
                open(&key(9), &aad, &hex::encode(&tampered)).is_err(),
                "flip at {i} accepted"
            );
        }
        assert_eq!(open(&key(9), &aad, "zz"), Err(MessageError::Malformed));
        assert_eq!(
            open(&key(9), &aad, &"00".repeat(27)),
            Err(MessageError::Malformed)
        );
    }

    #[test]
    fn ivs_are_fresh() {
        let aad = associated_data(&[0; 16], Direction::GuestToHost, 1);
        assert_ne!(
            seal(&key(1), &aad, b"x").unwrap(),
            seal(&key(1), &aad, b"x").unwrap()
        );
    }
}
