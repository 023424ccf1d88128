//! Sealing and opening file chunks, and making and checking acknowledgements (protocol.md
//! 3.10 "Chunks", "Acknowledgements"). Chunks do not go through the ratchet: each is sealed
//! under the file's chunk key with AES-256-GCM, its nonce made of the pass and the index (each
//! pair is sealed once: a pass number is saved before it is used), and its associated data
//! binding the file, the place and the end, so that no chunk can be moved, repeated, cut off or
//! carried into another file without failing.

use hmac::{Hmac, Mac};
use parley_protocol::data;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use sha2::Sha256;

use super::{FileId, FileKey, LABEL_ACK_KEY, LABEL_CHUNK_KEY, chunk_count};

pub const CHUNK_AAD_LABEL: &[u8] = b"parley/v1/file/chunk";
pub const ACK_LABEL: &[u8] = b"parley/v1/file/ack";
/// `file id (16) || u32_be(pass) || u64_be(index)`, in clear before the ciphertext.
pub const HEADER_BYTES: usize = 16 + 4 + 8;
pub const TAG_BYTES: usize = 16;
/// `file id (16) || u64_be(received) || u64_be(durable) || HMAC-SHA256 (32)`.
pub const ACK_BYTES: usize = 16 + 8 + 8 + 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("not a chunk: malformed payload")]
    Malformed,
    #[error("chunk failed authentication")]
    Authentication,
    #[error("chunk index is beyond the file's end")]
    BeyondEnd,
}

/// The keys of one file, derived from its key (each under its own label), and the chunk
/// key ready for AES-256-GCM (ring's: on this project's reference machine it seals and opens
/// several times faster than the `aes-gcm` crate, and chunks are most of a transfer's work).
#[derive(Debug, Clone)]
pub struct FileKeys {
    chunk: FileKey,
    ack: FileKey,
    cipher: Option<LessSafeKey>,
}

impl FileKeys {
    pub fn new(file_key: &FileKey) -> FileKeys {
        let chunk = file_key.derive(LABEL_CHUNK_KEY);
        // (A 32-byte key is always right for AES-256: `None` cannot happen.)
        let cipher = UnboundKey::new(&AES_256_GCM, chunk.as_bytes())
            .ok()
            .map(LessSafeKey::new);
        FileKeys {
            chunk,
            ack: file_key.derive(LABEL_ACK_KEY),
            cipher,
        }
    }

    pub fn chunk_key(&self) -> &FileKey {
        &self.chunk
    }

    pub fn ack_key(&self) -> &FileKey {
        &self.ack
    }
}

/// What a file's chunks are sealed against: fixed by its offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub id: FileId,
    pub size: u64,
    pub chunk: u32,
}

impl Layout {
    pub fn chunks(&self) -> u64 {
        chunk_count(self.size, self.chunk)
    }

    /// Where chunk `index` starts in the file.
    pub fn offset(&self, index: u64) -> Option<u64> {
        index.checked_mul(u64::from(self.chunk))
    }

    /// How many bytes chunk `index` holds: the chunk size, less for the last, `None` beyond it.
    pub fn len(&self, index: u64) -> Option<usize> {
        if index >= self.chunks() {
            return None;
        }
        let start = self.offset(index)?;
        let len = self.size.saturating_sub(start).min(u64::from(self.chunk));
        usize::try_from(len).ok()
    }

    pub fn is_last(&self, index: u64) -> bool {
        index.checked_add(1) == Some(self.chunks())
    }
}

/// The clear header of a sealed chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub id: FileId,
    pub pass: u32,
    pub index: u64,
}

/// `label || file id (16) || u64_be(size) || u64_be(index) || u8(last) || u32_be(pass)`.
pub fn associated_data(layout: &Layout, index: u64, pass: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(CHUNK_AAD_LABEL.len() + 16 + 8 + 8 + 1 + 4);
    aad.extend_from_slice(CHUNK_AAD_LABEL);
    aad.extend_from_slice(&layout.id);
    aad.extend_from_slice(&layout.size.to_be_bytes());
    aad.extend_from_slice(&index.to_be_bytes());
    aad.push(u8::from(layout.is_last(index)));
    aad.extend_from_slice(&pass.to_be_bytes());
    aad
}

/// `u32_be(pass) || u64_be(index)`: unique under a file's key as long as a pass number is
/// never used for two passes (the sender saves it before the pass starts).
pub fn nonce(pass: u32, index: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    let (p, i) = nonce.split_at_mut(4);
    p.copy_from_slice(&pass.to_be_bytes());
    i.copy_from_slice(&index.to_be_bytes());
    nonce
}

/// Seals chunk `index` of pass `pass`: `header || ciphertext || tag`. `data` must be the
/// chunk's bytes (its length is checked).
pub fn seal(
    keys: &FileKeys,
    layout: &Layout,
    pass: u32,
    index: u64,
    data: &[u8],
) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::with_capacity(HEADER_BYTES + data.len() + TAG_BYTES);
    seal_into(&mut out, keys, layout, pass, index, data)?;
    Ok(out)
}

/// [`seal`], appended to `out` (which may hold a frame's header already).
fn seal_into(
    out: &mut Vec<u8>,
    keys: &FileKeys,
    layout: &Layout,
    pass: u32,
    index: u64,
    data: &[u8],
) -> Result<(), ChunkError> {
    if layout.len(index) != Some(data.len()) {
        return Err(ChunkError::BeyondEnd);
    }
    let cipher = keys.cipher.as_ref().ok_or(ChunkError::Malformed)?;
    out.extend_from_slice(&layout.id);
    out.extend_from_slice(&pass.to_be_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    let start = out.len();
    out.extend_from_slice(data);
    let body = out.get_mut(start..).ok_or(ChunkError::Malformed)?;
    let tag = cipher
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce(pass, index)),
            Aad::from(associated_data(layout, index, pass)),
            body,
        )
        .map_err(|_| ChunkError::Malformed)?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Reads a sealed chunk's clear header (to route it to its file; nothing in it is trusted
/// until [`open`] authenticates it).
pub fn peek(sealed: &[u8]) -> Option<ChunkHeader> {
    let id = sealed.get(..16)?.try_into().ok()?;
    let pass = u32::from_be_bytes(sealed.get(16..20)?.try_into().ok()?);
    let index = u64::from_be_bytes(sealed.get(20..HEADER_BYTES)?.try_into().ok()?);
    Some(ChunkHeader { id, pass, index })
}

/// Authenticates and decrypts a sealed chunk of the file `layout` describes. Whatever was
/// changed (a byte, the index, the pass, the file id, the length), it fails.
pub fn open(
    keys: &FileKeys,
    layout: &Layout,
    sealed: &[u8],
) -> Result<(ChunkHeader, Vec<u8>), ChunkError> {
    let header = peek(sealed).ok_or(ChunkError::Malformed)?;
    if header.id != layout.id {
        return Err(ChunkError::Authentication);
    }
    let len = layout.len(header.index).ok_or(ChunkError::BeyondEnd)?;
    let body_end = HEADER_BYTES.checked_add(len).ok_or(ChunkError::Malformed)?;
    if sealed.len()
        != body_end
            .checked_add(TAG_BYTES)
            .ok_or(ChunkError::Malformed)?
    {
        return Err(ChunkError::Authentication);
    }
    let mut body = sealed
        .get(HEADER_BYTES..body_end)
        .ok_or(ChunkError::Malformed)?
        .to_vec();
    let tag = Tag::try_from(sealed.get(body_end..).ok_or(ChunkError::Malformed)?)
        .map_err(|_| ChunkError::Malformed)?;
    let cipher = keys.cipher.as_ref().ok_or(ChunkError::Malformed)?;
    cipher
        .open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce(header.pass, header.index)),
            Aad::from(associated_data(layout, header.index, header.pass)),
            tag,
            &mut body,
            0..,
        )
        .map_err(|_| ChunkError::Authentication)?;
    Ok((header, body))
}

/// The first byte of a file's DATA body (protocol.md 3.10, "The wire"): what follows.
pub const BODY_CHUNK: u8 = 0x01;
pub const BODY_ACK: u8 = 0x02;

/// Bytes of a DATA frame around the sealed chunk: the relay's header and the body's kind.
pub const FRAME_OVERHEAD: usize = data::DATA_HEADER_BYTES + 1;

/// What a DATA body from the peer holds (not yet authenticated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileData<'a> {
    Chunk(&'a [u8]),
    Ack(&'a [u8]),
}

/// Reads a DATA body; `None` for a kind this version does not know (ignored).
pub fn data_in(body: &[u8]) -> Option<FileData<'_>> {
    let (kind, rest) = body.split_first()?;
    match *kind {
        BODY_CHUNK => Some(FileData::Chunk(rest)),
        BODY_ACK => Some(FileData::Ack(rest)),
        _ => None,
    }
}

/// Chunk `index` of pass `pass` sealed straight into its DATA frame for session `sid`: one
/// buffer, the data copied in once and encrypted in place.
pub fn chunk_frame(
    keys: &FileKeys,
    layout: &Layout,
    sid: &[u8; 16],
    pass: u32,
    index: u64,
    data: &[u8],
) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::with_capacity(FRAME_OVERHEAD + HEADER_BYTES + data.len() + TAG_BYTES);
    out.extend_from_slice(&data::data_header(*sid));
    out.push(BODY_CHUNK);
    seal_into(&mut out, keys, layout, pass, index, data)?;
    Ok(out)
}

fn ack_mac(keys: &FileKeys, id: &FileId, received: u64, durable: u64) -> Option<Hmac<Sha256>> {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(keys.ack.as_bytes()).ok()?;
    mac.update(ACK_LABEL);
    mac.update(id);
    mac.update(&received.to_be_bytes());
    mac.update(&durable.to_be_bytes());
    Some(mac)
}

/// An acknowledgement: `file id || u64_be(received) || u64_be(durable) || HMAC-SHA256(ack
/// key, label || file id || u64_be(received) || u64_be(durable))`.
pub fn ack(keys: &FileKeys, id: &FileId, received: u64, durable: u64) -> Vec<u8> {
    let tag = ack_mac(keys, id, received, durable)
        .map(|mac| mac.finalize().into_bytes().to_vec())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(ACK_BYTES);
    out.extend_from_slice(id);
    out.extend_from_slice(&received.to_be_bytes());
    out.extend_from_slice(&durable.to_be_bytes());
    out.extend_from_slice(&tag);
    out
}

/// The file id an acknowledgement names (to route it; not yet trusted).
pub fn ack_id(bytes: &[u8]) -> Option<FileId> {
    bytes.get(..16)?.try_into().ok()
}

/// What an authentic acknowledgement for file `id` says: bytes received in order, and of
/// those, bytes durable. `None` for anything else, or if it claims more durable than received.
pub fn verify_ack(keys: &FileKeys, id: &FileId, bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() != ACK_BYTES || bytes.get(..16)? != id {
        return None;
    }
    let received = u64::from_be_bytes(bytes.get(16..24)?.try_into().ok()?);
    let durable = u64::from_be_bytes(bytes.get(24..32)?.try_into().ok()?);
    ack_mac(keys, id, received, durable)?
        .verify_slice(bytes.get(32..)?)
        .ok()?;
    (durable <= received).then_some((received, durable))
}

/// The DATA frame that carries an acknowledgement.
pub fn ack_frame(sid: &[u8; 16], ack: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(1 + ack.len());
    body.push(BODY_ACK);
    body.extend_from_slice(ack);
    data::frame(sid, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_protocol::limits::MAX_FRAME_BYTES;

    const SID: &str = "7f1c0d2e9a4b3c5d6e7f8091a2b3c4d5";

    fn keys(b: u8) -> FileKeys {
        FileKeys::new(&FileKey::from_bytes([b; 32]))
    }

    fn layout(id: u8, size: u64, chunk: u32) -> Layout {
        Layout {
            id: [id; 16],
            size,
            chunk,
        }
    }

    /// The largest chunk, in its DATA frame, stays under the relay's frame limit; one 4 KiB
    /// step more would not.
    #[test]
    fn the_largest_chunk_frame_fits_the_relay_limit() {
        let max = super::super::MAX_CHUNK_BYTES;
        let l = layout(1, u64::from(max) * 3, max);
        let data = vec![0xffu8; max as usize];
        let sid = data::sid_bytes(SID).unwrap();
        let frame = chunk_frame(&keys(1), &l, &sid, u32::MAX, 1, &data).unwrap();
        assert_eq!(frame.len(), max as usize + 62);
        assert!(frame.len() <= MAX_FRAME_BYTES, "{}", frame.len());
        assert!(frame.len() + 4096 > MAX_FRAME_BYTES);
        let (to, body) = data::parse(&frame).unwrap();
        assert_eq!(to, sid);
        let Some(FileData::Chunk(sealed)) = data_in(body) else {
            panic!("not a chunk");
        };
        assert_eq!(sealed, &seal(&keys(1), &l, u32::MAX, 1, &data).unwrap()[..]);
    }

    #[test]
    fn chunks_round_trip_and_every_change_fails() {
        let k = keys(2);
        let l = layout(3, 25, 10);
        let sealed = seal(&k, &l, 1, 1, &[7u8; 10]).unwrap();
        let (h, data) = open(&k, &l, &sealed).unwrap();
        assert_eq!((h.pass, h.index, data), (1, 1, vec![7u8; 10]));
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert!(open(&k, &l, &t).is_err(), "flip at {i} accepted");
        }
        // Another file (same key, other id or size), another key, cut short.
        assert!(open(&k, &layout(4, 25, 10), &sealed).is_err());
        assert!(open(&k, &layout(3, 26, 10), &sealed).is_err());
        assert!(open(&keys(9), &l, &sealed).is_err());
        assert!(open(&k, &l, &sealed[..sealed.len() - 1]).is_err());
        // The last chunk is bound as the last: a file cut after chunk 1 (size 20) rejects it.
        let last = seal(&k, &l, 1, 2, &[1u8; 5]).unwrap();
        assert!(open(&k, &l, &last).is_ok());
        assert!(open(&k, &layout(3, 20, 10), &last).is_err());
        assert_eq!(seal(&k, &l, 1, 3, &[]), Err(ChunkError::BeyondEnd));
        assert_eq!(seal(&k, &l, 1, 0, &[1u8; 9]), Err(ChunkError::BeyondEnd));
    }

    #[test]
    fn acks_are_authenticated_and_bound_to_their_file() {
        let k = keys(5);
        let a = ack(&k, &[1; 16], 40, 30);
        assert_eq!(verify_ack(&k, &[1; 16], &a), Some((40, 30)));
        assert_eq!(verify_ack(&k, &[2; 16], &a), None);
        assert_eq!(verify_ack(&keys(6), &[1; 16], &a), None);
        for at in [23, 31, 40] {
            let mut changed = a.clone();
            changed[at] ^= 0xff;
            assert_eq!(verify_ack(&k, &[1; 16], &changed), None, "{at}");
        }
        // More durable than received is no acknowledgement.
        assert_eq!(verify_ack(&k, &[1; 16], &ack(&k, &[1; 16], 30, 40)), None);
        let sid = data::sid_bytes(SID).unwrap();
        let frame = ack_frame(&sid, &a);
        let (_, body) = data::parse(&frame).unwrap();
        assert_eq!(data_in(body), Some(FileData::Ack(&a[..])));
        assert_eq!(data_in(&[9, 1, 2]), None, "an unknown kind");
        // Chunk keys and ack keys differ: an ack key cannot open chunks.
        assert_ne!(k.chunk_key(), k.ack_key());
    }
}
