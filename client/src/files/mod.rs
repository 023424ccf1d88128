//! Files sent inside a paired session (protocol.md 3.10), sans-IO: safe names ([`names`]),
//! the messages that travel through the ratchet ([`offer`]), sealed chunks and
//! acknowledgements ([`chunk`]), and the two ends of a transfer ([`send`], [`receive`]).
//!
//! Nothing here touches a socket, a clock or (but through [`receive::PartFile`], which its
//! caller implements) a file: the caller feeds what happened in and carries out what comes out,
//! as it does for `crate::conversation`.

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

pub mod chunk;
pub mod names;
pub mod offer;
pub mod receive;
pub mod send;
pub mod store;
#[cfg(test)]
mod tests_transfer;
#[cfg(test)]
mod tests_vectors;

/// The largest chunk (bytes of file data) a sender may use and a receiver accepts: the largest
/// multiple of 4 KiB whose DATA frame (protocol.md 3.10, "The wire") stays under the relay's
/// 64 KiB frame limit: 61,440 + 62 bytes of header, kind and tag (a test checks it).
pub const MAX_CHUNK_BYTES: u32 = 61_440;

/// Chunks a sender may have sent beyond what the receiver has acknowledged as received.
/// Eight frames of at most 61,502 bytes are 492,016 bytes: under half the relay's queue per
/// connection (1 MiB) and 8 of its 256 frames, so that chunks never make the relay drop the
/// receiver as a slow consumer, and chat, receipts and pings keep the other half.
pub const WINDOW_CHUNKS: u64 = 8;

/// A receiver acknowledges what it received at least every this many chunks (a quarter of
/// the window), so that a sender keeping its window full never waits for a whole window.
pub const ACK_EVERY_CHUNKS: u64 = 2;

/// A receiver makes its `.part` durable (`fdatasync`, off the event loop) and records that
/// each time this many chunks (7.5 MiB) have been written since the last time, and at the
/// end: often enough that little is sent again after a restart, seldom enough that syncing
/// does not bound the rate.
pub const SYNC_EVERY_CHUNKS: u64 = 128;

/// Chunks a sender may have sent beyond what the receiver has acknowledged as durable
/// (15 MiB): what a receiver's restart can make it send again. Twice the sync interval, so
/// that the sender does not wait while a sync runs.
pub const DURABLE_WINDOW_CHUNKS: u64 = 2 * SYNC_EVERY_CHUNKS;

/// Sizes travel as JSON numbers; this is the largest integer every JSON reader holds exactly
/// (I-JSON, RFC 7493), and far beyond any file.
pub const MAX_FILE_BYTES: u64 = (1 << 53) - 1;

/// HKDF labels, each key its own (protocol.md 3.10).
pub const LABEL_CHUNK_KEY: &[u8] = b"parley/v1/file/chunk-key";
pub const LABEL_ACK_KEY: &[u8] = b"parley/v1/file/ack-key";

/// A file id: 128 random bits, fresh for every file offered.
pub type FileId = [u8; 16];

/// Why a file failed or was declined: stable codes, the same on the wire (`file_failed`,
/// `file_decline`) and in the client's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum FailCode {
    /// The receiver (or its person) said no.
    #[error("the receiver declined the file")]
    Declined,
    /// Larger than the receiver takes.
    #[error("the file is larger than the receiver accepts")]
    TooLarge,
    /// The name reduces to nothing safe (protocol.md 3.10 "Names").
    #[error("the file's name cannot be made safe")]
    BadName,
    /// An offer with a field out of range (chunk size, size, hash, key).
    #[error("the offer is malformed")]
    BadOffer,
    /// A chunk failed authentication: altered, or from another file or pass.
    #[error("a chunk failed authentication (altered, or not from this file)")]
    ChunkCorrupt,
    /// A chunk came again inside one pass (replayed).
    #[error("a chunk arrived twice in one pass (replayed)")]
    ChunkReplayed,
    /// A chunk came ahead of one missing inside one pass (dropped or reordered).
    #[error("a chunk is missing or out of order (dropped or reordered)")]
    ChunkMissing,
    /// Every chunk arrived but the whole file's SHA-256 is not the offer's.
    #[error("the received file's SHA-256 does not match the offer")]
    HashMismatch,
    /// The receiver could not write (a full disk, say).
    #[error("the receiver could not write the file")]
    WriteFailed,
    /// The sender could not read its file, or it changed under it.
    #[error("the sender could not read the file, or it changed")]
    ReadFailed,
    /// Either side gave up on it.
    #[error("the transfer was cancelled")]
    Cancelled,
    /// The sender used up its pass numbers (2^32 restarts of one file).
    #[error("the transfer restarted too often")]
    Exhausted,
    /// A code from a newer version.
    #[serde(other)]
    #[error("the transfer failed (a reason this version does not know)")]
    Other,
}

/// A file's own key: 256 random bits from the sender, carried in the offer. Zeroized on drop;
/// `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct FileKey([u8; 32]);

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKey(..)")
    }
}

impl FileKey {
    pub fn from_bytes(bytes: [u8; 32]) -> FileKey {
        FileKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key chunks are sealed with, and the key acknowledgements are made with: each from
    /// the file key under its own label, so neither can stand in for the other.
    pub fn derive(&self, label: &[u8]) -> FileKey {
        let mut out = [0u8; 32];
        // HKDF-Expand of 32 bytes from SHA-256 cannot fail (the bound is 255 * 32).
        let _ = Hkdf::<Sha256>::new(None, &self.0).expand(label, &mut out);
        FileKey(out)
    }
}

impl Serialize for FileKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&zeroize::Zeroizing::new(hex::encode(self.0)))
    }
}

impl<'de> Deserialize<'de> for FileKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FileKey, D::Error> {
        let text = zeroize::Zeroizing::new(String::deserialize(d)?);
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.as_str(), &mut bytes)
            .map_err(|_| serde::de::Error::custom("a file key is 64 hex digits"))?;
        Ok(FileKey(bytes))
    }
}

/// How many chunks a file of `size` bytes has: at least one, so that even an empty file ends
/// with an authenticated last chunk.
pub fn chunk_count(size: u64, chunk: u32) -> u64 {
    if chunk == 0 {
        return 0;
    }
    size.div_ceil(u64::from(chunk)).max(1)
}

/// Reads 16 bytes of hex (a file id).
pub fn parse_id(text: &str) -> Option<FileId> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(text, &mut id).ok()?;
    Some(id)
}

/// Serde for a [`FileId`] as 32 lowercase hex digits.
pub mod id_hex {
    use super::FileId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &FileId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(id))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FileId, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_id(&text).ok_or_else(|| serde::de::Error::custom("a file id is 32 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_counts() {
        assert_eq!(chunk_count(0, 10), 1);
        assert_eq!(chunk_count(10, 10), 1);
        assert_eq!(chunk_count(11, 10), 2);
        assert_eq!(
            chunk_count(MAX_FILE_BYTES, MAX_CHUNK_BYTES),
            MAX_FILE_BYTES.div_ceil(61_440)
        );
        assert_eq!(chunk_count(5, 0), 0);
    }

    #[test]
    fn each_key_has_its_own_label_and_debug_hides_it() {
        let key = FileKey::from_bytes([7; 32]);
        assert_ne!(key.derive(LABEL_CHUNK_KEY), key.derive(LABEL_ACK_KEY));
        assert_ne!(key.derive(LABEL_CHUNK_KEY), key);
        assert_eq!(format!("{key:?}"), "FileKey(..)");
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(serde_json::from_str::<FileKey>(&json).unwrap(), key);
        assert!(serde_json::from_str::<FileKey>("\"00\"").is_err());
    }

    #[test]
    fn fail_codes_are_stable_snake_case() {
        assert_eq!(
            serde_json::to_string(&FailCode::ChunkCorrupt).unwrap(),
            "\"chunk_corrupt\""
        );
        assert_eq!(
            serde_json::to_string(&FailCode::TooLarge).unwrap(),
            "\"too_large\""
        );
        assert_eq!(
            serde_json::from_str::<FailCode>("\"new_thing\"").unwrap(),
            FailCode::Other
        );
    }
}
