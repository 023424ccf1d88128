//! The file messages that travel through the ratchet (protocol.md 3.10 "Messages"), as `Plain`
//! kinds beside `hello` and `text`: exactly once, in order, through the session's outbox. What
//! they carry is checked here, before either side acts on it.

use serde::{Deserialize, Serialize};

use super::names::{NameError, SafeName, safe_name};
use super::{FailCode, FileId, FileKey, MAX_CHUNK_BYTES, MAX_FILE_BYTES, id_hex};

/// `{"k":"file_offer","id","name","size","sha256","chunk","key"}`: the sender offers a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffer {
    /// 128 random bits, fresh for this file (32 hex digits).
    #[serde(with = "id_hex")]
    pub id: FileId,
    /// A relative path with `/` between components (a folder's files keep their paths).
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// The whole file's SHA-256 (64 hex digits).
    pub sha256: String,
    /// Bytes of file data per chunk (the last may be shorter).
    pub chunk: u32,
    /// The file's own key: 256 random bits (64 hex digits).
    pub key: FileKey,
}

/// `{"k":"file_accept","id","offset"}`: the receiver takes the file and wants chunks from
/// `offset` (a multiple of the chunk size, 0 for a new file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileAccept {
    #[serde(with = "id_hex")]
    pub id: FileId,
    pub offset: u64,
}

/// `{"k":"file_decline","id","reason"}`: the receiver refuses the offer; nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDecline {
    #[serde(with = "id_hex")]
    pub id: FileId,
    pub reason: FailCode,
}

/// `{"k":"file_done","id"}`: the receiver has every byte, its SHA-256 matched the offer's, and
/// the file is in place: the transfer is over for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDone {
    #[serde(with = "id_hex")]
    pub id: FileId,
}

/// `{"k":"file_failed","id","code"}`: either side gives the file up (its `.part` is removed);
/// the other stops too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFailed {
    #[serde(with = "id_hex")]
    pub id: FileId,
    pub code: FailCode,
}

/// An offer whose every field is in range, with its name made safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedOffer {
    pub offer: FileOffer,
    pub safe_name: SafeName,
    pub sha256: [u8; 32],
}

impl FileOffer {
    /// Checks an offer as a receiver must before accepting it (protocol.md 3.10): a chunk
    /// size in 1..=[`MAX_CHUNK_BYTES`], a size at most `max_bytes` (the receiver's own bound,
    /// itself under [`MAX_FILE_BYTES`]), a SHA-256 of 64 hex digits, a name that reduces to
    /// something safe. The error is the decline reason.
    pub fn check(self, max_bytes: u64) -> Result<CheckedOffer, FailCode> {
        if self.chunk == 0 || self.chunk > MAX_CHUNK_BYTES || self.size > MAX_FILE_BYTES {
            return Err(FailCode::BadOffer);
        }
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(&self.sha256, &mut sha256).map_err(|_| FailCode::BadOffer)?;
        if self.size > max_bytes {
            return Err(FailCode::TooLarge);
        }
        let safe_name = safe_name(&self.name).map_err(|_: NameError| FailCode::BadName)?;
        Ok(CheckedOffer {
            offer: self,
            safe_name,
            sha256,
        })
    }
}
