//! The receiving end of one file (protocol.md 3.10), sans-IO but for the `.part` file, which
//! its caller implements as a [`PartFile`]. This decides what is written where, when the data
//! is made durable and acknowledged, and whether the file is good; the caller moves frames,
//! seals file messages through the session, saves records, and finally moves the `.part` into
//! place (`names::unique_target`) or removes it.
//!
//! Inputs: the person's (or `--accept-files`') answer ([`Receiver::accept`],
//! [`Receiver::decline`]), sealed chunks ([`Receiver::handle_chunk`]), the link
//! ([`Receiver::handle_link_reset`]), the move into place ([`Receiver::handle_placed`]), the
//! sender's `file_failed` ([`Receiver::handle_failed`]). Outputs, in order, with
//! [`Receiver::poll_output`].
//!
//! Rules for a chunk (3.10 "Receiving chunks"), after it authenticates: a chunk of an older
//! pass, or of the current one after the link was reset, is stale (dropped, acknowledged
//! again); a newer pass starts at most at the next chunk wanted; inside a pass, chunks come
//! one after another, and anything else is a replay or a gap, and fails the file. Nothing is
//! written that did not authenticate and come in order, and a file is placed only once its
//! SHA-256 matches the offer's: a failed file never looks complete.

use std::collections::VecDeque;
use std::io;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::chunk::{self, FileKeys, Layout};
use super::names::SafeName;
use super::offer::{CheckedOffer, FileAccept, FileDecline, FileDone, FileFailed, FileOffer};
use super::{ACK_EVERY_CHUNKS, FailCode, FileId, SYNC_EVERY_CHUNKS};
use crate::session::Plain;

/// The `.part` file, as the receiver's caller opens it.
pub trait PartFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Fills `buf` from `offset` (re-hashing what is on disk after a restart).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Cuts the file to `len` (what was written but not made durable before a restart).
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// The durable position (in chunks) the last sync recorded beside the `.part`, if any
    /// (see [`ReceiveOutput::Sync`]).
    fn durable_mark(&mut self) -> Option<u64>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "s")]
pub enum ReceiveStatus {
    /// Offered; the person has not answered.
    Offered,
    /// Accepted: chunks are written to the `.part`.
    Receiving,
    /// Every byte written and the SHA-256 matched: the caller moves the `.part` into place.
    Verified,
    /// In place and `file_done` sent. Final.
    Done,
    /// Declined or failed; the `.part` is removed. Final.
    Failed { code: FailCode },
}

/// What the receiver stores durably (protocol.md 3.10 "What each side stores"): the offer
/// (with its key), the current pass, the durable position, where the file ends up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveRecord {
    pub offer: FileOffer,
    /// Chunks below this index are written and synced: where a resume starts.
    pub durable: u64,
    pub pass: u32,
    pub status: ReceiveStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiveEvent {
    /// `bytes` are durably written.
    Progress {
        bytes: u64,
    },
    Failed {
        code: FailCode,
    },
    /// In place, verified.
    Received,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiveOutput {
    /// Store this record before any later output.
    Save(ReceiveRecord),
    /// Seal this through the session (it travels in the ratchet) and send it.
    Message(Plain),
    /// Send this DATA frame as it is (an acknowledgement, outside the ratchet).
    Transmit(Vec<u8>),
    /// Make the `.part` durable (`fdatasync`) as it stands, then record `upto` durably as
    /// its durable mark ([`PartFile::durable_mark`]), then call [`Receiver::handle_synced`]
    /// with `upto` (or [`Receiver::handle_sync_failed`]). Chunks go on being written
    /// meanwhile: the sync may be slow, and only `upto` is claimed. (The mark, not a save of
    /// the whole state, is what a restart goes on from: the event loop never waits for it.)
    Sync {
        upto: u64,
    },
    /// The `.part` is complete and verified: move it, without replacing anything, to a
    /// unique name for `name` (`names::unique_target`), then call
    /// [`Receiver::handle_placed`].
    Place {
        name: SafeName,
    },
    /// The file failed: remove the `.part`.
    RemovePart,
    Event(ReceiveEvent),
}

pub struct Receiver {
    offer: FileOffer,
    name: SafeName,
    sha256: [u8; 32],
    layout: Layout,
    keys: FileKeys,
    sid: [u8; 16],
    status: ReceiveStatus,
    /// The current pass, and the index its next chunk must have.
    pass: u32,
    pass_next: u64,
    /// A pass must start anew (after a restart or a link reset): chunks of `pass` are stale.
    awaiting_pass: bool,
    /// Chunks written (not necessarily synced), and synced.
    written: u64,
    durable: u64,
    /// `written` when we last acknowledged.
    acked: u64,
    /// A sync asked for and not yet answered: what it will make durable.
    syncing: Option<u64>,
    hasher: Sha256,
    outputs: VecDeque<ReceiveOutput>,
}

impl Receiver {
    /// A new offer. One that is malformed, too large (over `max_bytes`) or unnamable is
    /// declined at once: the `Err` is the decline to seal and send.
    pub fn offered(offer: FileOffer, max_bytes: u64, sid: &str) -> Result<Receiver, Plain> {
        let id = offer.id;
        match offer.check(max_bytes) {
            Ok(checked) => Ok(Receiver::new(checked, sid, ReceiveStatus::Offered, 0, 0)),
            Err(reason) => Err(Plain::FileDecline(FileDecline { id, reason })),
        }
    }

    fn new(
        checked: CheckedOffer,
        sid: &str,
        status: ReceiveStatus,
        pass: u32,
        durable: u64,
    ) -> Receiver {
        let CheckedOffer {
            offer,
            safe_name,
            sha256,
        } = checked;
        let layout = Layout {
            id: offer.id,
            size: offer.size,
            chunk: offer.chunk,
        };
        Receiver {
            keys: FileKeys::new(&offer.key),
            offer,
            name: safe_name,
            sha256,
            layout,
            sid: parley_protocol::data::sid_bytes(sid).unwrap_or_default(),
            status,
            pass,
            pass_next: durable,
            awaiting_pass: true,
            written: durable,
            durable,
            acked: durable,
            syncing: None,
            hasher: Sha256::new(),
            outputs: VecDeque::new(),
        }
    }

    /// A receiver from its stored record, after a restart: the `.part` is cut back to the
    /// durable position (anything after it was not synced) and re-hashed up to it.
    pub fn from_record(
        record: &ReceiveRecord,
        sid: &str,
        part: &mut dyn PartFile,
    ) -> Result<Receiver, FailCode> {
        let checked = record.offer.clone().check(u64::MAX)?;
        // The mark is at least as recent as the record: each sync writes it, and the record
        // is saved only now and then.
        let mark = part.durable_mark().unwrap_or(0);
        let durable = record.durable.max(mark).min(chunk_count_of(&record.offer));
        let mut receiver = Receiver::new(checked, sid, record.status, record.pass, durable);
        match receiver.status {
            ReceiveStatus::Receiving => match receiver.rehash(part) {
                // Every chunk was durable (the mark says so) but the check had not been
                // recorded: it is made now.
                Ok(()) if receiver.durable >= receiver.layout.chunks() => receiver.verify(),
                Ok(()) => {}
                Err(code) => receiver.fail(code),
            },
            // Verified but perhaps not yet in place: the caller places it again (if its
            // `.part` is gone, the move had happened: it calls `handle_placed` at once).
            ReceiveStatus::Verified => receiver.outputs.push_back(ReceiveOutput::Place {
                name: receiver.name.clone(),
            }),
            _ => {}
        }
        Ok(receiver)
    }

    /// Hashes the `.part` again up to the durable position, chunk by chunk, and cuts off what
    /// lies beyond (written, not made durable: it may be damaged). A `.part` shorter than
    /// its record says (deleted, or cut short) is taken for what it holds: the rest comes
    /// again, rather than be padded with zeros to fail the hash at the end.
    fn rehash(&mut self, part: &mut dyn PartFile) -> Result<(), FailCode> {
        let mut buf = vec![0u8; self.layout.chunk as usize];
        let mut have = 0u64;
        while have < self.durable {
            let Some(len) = self.layout.len(have) else {
                break;
            };
            let slice = buf.get_mut(..len).ok_or(FailCode::WriteFailed)?;
            if part.read_at(self.bytes_at(have), slice).is_err() {
                break;
            }
            self.hasher.update(&*slice);
            have = have.saturating_add(1);
        }
        self.durable = have;
        self.written = have;
        self.acked = have;
        self.pass_next = have;
        part.truncate(self.bytes_at(have))
            .map_err(|_| FailCode::WriteFailed)
    }

    pub fn record(&self) -> ReceiveRecord {
        ReceiveRecord {
            offer: self.offer.clone(),
            durable: self.durable,
            pass: self.pass,
            status: self.status,
        }
    }

    pub fn id(&self) -> &FileId {
        &self.offer.id
    }

    pub fn name(&self) -> &SafeName {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.offer.size
    }

    pub fn status(&self) -> ReceiveStatus {
        self.status
    }

    fn bytes_at(&self, chunks: u64) -> u64 {
        self.layout
            .offset(chunks)
            .unwrap_or(self.layout.size)
            .min(self.layout.size)
    }

    // -------------------------------------------------------------------------------------
    // Inputs

    /// The person (or `--accept-files`) takes the file: save the record, then seal and send
    /// the accept (the two go in one save with the sealed message).
    pub fn accept(&mut self) {
        if self.status != ReceiveStatus::Offered {
            return;
        }
        let accept = Plain::FileAccept(FileAccept {
            id: self.offer.id,
            offset: self.bytes_at(self.durable),
        });
        self.settle(ReceiveStatus::Receiving, Some(accept));
    }

    /// The person says no.
    pub fn decline(&mut self) {
        if self.status != ReceiveStatus::Offered {
            return;
        }
        let decline = Plain::FileDecline(FileDecline {
            id: self.offer.id,
            reason: FailCode::Declined,
        });
        self.settle(
            ReceiveStatus::Failed {
                code: FailCode::Declined,
            },
            Some(decline),
        );
    }

    /// The sender gave the file up (its `file_failed`).
    pub fn handle_failed(&mut self, code: FailCode) {
        if matches!(
            self.status,
            ReceiveStatus::Offered | ReceiveStatus::Receiving
        ) {
            self.settle(ReceiveStatus::Failed { code }, None);
            self.outputs.push_back(ReceiveOutput::RemovePart);
            self.outputs
                .push_back(ReceiveOutput::Event(ReceiveEvent::Failed { code }));
        }
    }

    /// Our link came back, or the peer came online: whatever was in flight may be lost, so
    /// the current pass is over. Tells the sender where we are.
    pub fn handle_link_reset(&mut self) {
        if self.status == ReceiveStatus::Receiving {
            self.awaiting_pass = true;
            self.acknowledge();
        }
    }

    /// A sealed chunk of this file (from [`chunk::chunk_in`], routed by [`chunk::peek`]).
    pub fn handle_chunk(&mut self, sealed: &[u8], part: &mut dyn PartFile) {
        if self.status != ReceiveStatus::Receiving {
            return;
        }
        let (header, data) = match chunk::open(&self.keys, &self.layout, sealed) {
            Ok(opened) => opened,
            Err(_) => return self.fail(FailCode::ChunkCorrupt),
        };
        if header.pass < self.pass || (header.pass == self.pass && self.awaiting_pass) {
            // Left over from a pass that is over (in a mailbox, say): harmless, not written.
            self.acknowledge();
            return;
        }
        if header.pass > self.pass {
            // A new pass starts where the sender's acknowledged position is: never beyond
            // what we have written. Right after a restart or a link reset, though, one that
            // seems to is the tail of a pass from before, sent before the sender heard of it
            // (its number may be newer than the one recorded): dropped, not a failure.
            if header.index > self.written {
                if self.awaiting_pass {
                    return;
                }
                return self.fail(FailCode::ChunkMissing);
            }
            self.pass = header.pass;
            self.pass_next = header.index;
            self.awaiting_pass = false;
        }
        if header.index < self.pass_next {
            return self.fail(FailCode::ChunkReplayed);
        }
        if header.index > self.pass_next {
            return self.fail(FailCode::ChunkMissing);
        }
        self.pass_next = self.pass_next.saturating_add(1);
        if header.index < self.written {
            // Sent again from an older position: already written. Said so, or a sender
            // whose window lies wholly below what we have would wait for ever.
            self.acknowledge();
            return;
        }
        let Some(offset) = self.layout.offset(header.index) else {
            return self.fail(FailCode::ChunkCorrupt);
        };
        if part.write_at(offset, &data).is_err() {
            return self.fail(FailCode::WriteFailed);
        }
        self.hasher.update(&data);
        self.written = self.written.saturating_add(1);
        if self.written >= self.layout.chunks()
            || self.written.saturating_sub(self.durable) >= SYNC_EVERY_CHUNKS
        {
            self.sync();
        }
        if self.written.saturating_sub(self.acked) >= ACK_EVERY_CHUNKS {
            self.acknowledge();
            self.outputs
                .push_back(ReceiveOutput::Event(ReceiveEvent::Progress {
                    bytes: self.bytes_at(self.written),
                }));
        }
    }

    /// The sync asked for with [`ReceiveOutput::Sync`] is done: what it covered is durable,
    /// recorded, and only then acknowledged as such. At the end, the file is verified.
    pub fn handle_synced(&mut self, upto: u64) {
        if self.syncing != Some(upto) {
            return;
        }
        self.syncing = None;
        if self.status != ReceiveStatus::Receiving {
            return;
        }
        self.durable = self.durable.max(upto.min(self.written));
        if self.durable >= self.layout.chunks() {
            return self.verify();
        }
        // (Recorded by the sync's mark; the state file's record catches up at its next save.)
        self.acknowledge();
        if self.written >= self.layout.chunks()
            || self.written.saturating_sub(self.durable) >= SYNC_EVERY_CHUNKS
        {
            self.sync();
        }
    }

    /// The sync failed (a full disk, say): the file fails.
    pub fn handle_sync_failed(&mut self) {
        if self.syncing.take().is_some() && self.status == ReceiveStatus::Receiving {
            self.fail(FailCode::WriteFailed);
        }
    }

    /// The `.part` is in place (at a name the caller chose with `names::unique_target`).
    pub fn handle_placed(&mut self) {
        if self.status != ReceiveStatus::Verified {
            return;
        }
        let done = Plain::FileDone(FileDone { id: self.offer.id });
        self.settle(ReceiveStatus::Done, Some(done));
        self.outputs
            .push_back(ReceiveOutput::Event(ReceiveEvent::Received));
    }

    /// The `.part` could not even be opened: the file fails as a failed write would.
    pub fn fail_write(&mut self) {
        if self.status == ReceiveStatus::Receiving {
            self.fail(FailCode::WriteFailed);
        }
    }

    /// Moving the `.part` into place failed (no unique name left, a full disk).
    pub fn handle_place_failed(&mut self) {
        if self.status == ReceiveStatus::Verified {
            self.fail(FailCode::WriteFailed);
        }
    }

    pub fn poll_output(&mut self) -> Option<ReceiveOutput> {
        self.outputs.pop_front()
    }

    // -------------------------------------------------------------------------------------

    fn verify(&mut self) {
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        if digest != self.sha256 {
            return self.fail(FailCode::HashMismatch);
        }
        self.settle(ReceiveStatus::Verified, None);
        self.acknowledge();
        self.outputs.push_back(ReceiveOutput::Place {
            name: self.name.clone(),
        });
    }

    /// Asks for a sync of what is written, unless one is under way (when it ends, the next
    /// is asked for if still due).
    fn sync(&mut self) {
        if self.syncing.is_none() && self.written > self.durable {
            self.syncing = Some(self.written);
            self.outputs
                .push_back(ReceiveOutput::Sync { upto: self.written });
        }
    }

    fn acknowledge(&mut self) {
        self.acked = self.written;
        let ack = chunk::ack(
            &self.keys,
            &self.offer.id,
            self.bytes_at(self.written),
            self.bytes_at(self.durable),
        );
        self.outputs
            .push_back(ReceiveOutput::Transmit(chunk::ack_frame(&self.sid, &ack)));
    }

    /// Moves to `status`: saved first, then the message (if any) to seal and send, so that
    /// what the peer hears is never ahead of what is on disk.
    fn settle(&mut self, status: ReceiveStatus, message: Option<Plain>) {
        self.status = status;
        self.outputs.push_back(ReceiveOutput::Save(self.record()));
        if let Some(message) = message {
            self.outputs.push_back(ReceiveOutput::Message(message));
        }
    }

    fn fail(&mut self, code: FailCode) {
        let failed = Plain::FileFailed(FileFailed {
            id: self.offer.id,
            code,
        });
        self.settle(ReceiveStatus::Failed { code }, Some(failed));
        self.outputs.push_back(ReceiveOutput::RemovePart);
        self.outputs
            .push_back(ReceiveOutput::Event(ReceiveEvent::Failed { code }));
    }
}

fn chunk_count_of(offer: &FileOffer) -> u64 {
    super::chunk_count(offer.size, offer.chunk)
}
