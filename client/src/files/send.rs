//! The sending end of one file (protocol.md 3.10), sans-IO. The caller seals the offer (and
//! every other file message) through the session, reads the file, moves frames and keeps the
//! clock; this decides which chunk goes when, and what must be saved first.
//!
//! Inputs: the peer's answers (`handle_accept`, `handle_decline`, `handle_done`,
//! `handle_failed`), acknowledgements (`handle_ack`), the link (`handle_link`), the clock
//! (`handle_timeout`). Outputs, drained with [`Sender::poll_output`] in order: a record to save
//! before going on, a chunk to read, seal ([`Sender::seal`]) and send, or something to tell the
//! user. [`Sender::poll_timeout`] says when to call `handle_timeout`.
//!
//! A pass is one run through the chunks from the receiver's acknowledged position; each new
//! connection (or a silence) starts the next. Its number is saved before its first chunk is
//! sealed, so a nonce (pass, index) is never used for two sealings.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::TryRngCore;
use serde::{Deserialize, Serialize};

use super::chunk::{self, FileKeys, Layout};
use super::offer::{FileAccept, FileDecline, FileOffer};
use super::{DURABLE_WINDOW_CHUNKS, FailCode, FileId, FileKey, MAX_CHUNK_BYTES, WINDOW_CHUNKS};

/// With the peer online and no acknowledgement moving for this long, a new pass starts from
/// the acknowledged position (a frame lost with a connection the sender did not see drop).
pub const RESEND_AFTER: Duration = Duration::from_secs(10);

/// Where a sent file stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "s")]
pub enum SendStatus {
    /// Offered; no answer yet.
    Offered,
    /// Accepted: chunks go while the peer is online.
    Sending,
    /// Every chunk acknowledged; waiting for the receiver's `file_done`.
    Verifying,
    /// The receiver has it, verified. Final.
    Done,
    /// Declined or failed. Final.
    Failed { code: FailCode },
}

/// What the sender stores durably (protocol.md 3.10 "What each side stores"): the offer (with
/// its key), the last pass number used, and the acknowledged position as last saved (a lower
/// bound: the receiver's acknowledgement after a restart gives the real one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRecord {
    pub offer: FileOffer,
    pub pass: u32,
    pub acked: u64,
    pub status: SendStatus,
}

/// Read `len` bytes at `offset` of the file, then [`Sender::seal`] them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRequest {
    pub pass: u32,
    pub index: u64,
    pub offset: u64,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendEvent {
    /// The receiver has durably written `bytes`.
    Progress { bytes: u64 },
    /// The receiver has the file, verified (its `file_done`).
    Sent,
    /// Declined, or failed (by either side).
    Failed { code: FailCode },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutput {
    /// Store this record before any later output (a pass number is about to be used).
    Save(SendRecord),
    /// A chunk to read, seal and send.
    Chunk(ChunkRequest),
    Event(SendEvent),
}

pub struct Sender {
    offer: FileOffer,
    layout: Layout,
    keys: FileKeys,
    sid: [u8; 16],
    status: SendStatus,
    pass: u32,
    /// Chunks the receiver has acknowledged as durable (all below this index).
    acked: u64,
    /// Chunks the receiver has acknowledged as received (written, perhaps not yet durable):
    /// the window counts from here.
    received: u64,
    /// The next chunk of the current pass.
    next: u64,
    /// The highest chunk count sent in this run (an acknowledgement cannot exceed it).
    sent_high: u64,
    /// After a restart: send nothing until the receiver says where it is.
    awaiting_position: bool,
    /// The relay link is up and the peer is online: chunks may go.
    online: bool,
    /// A pass is running (started since the link last came up).
    in_pass: bool,
    last_progress: Option<Instant>,
    outputs: VecDeque<SendOutput>,
}

/// A fresh offer for a file: a random 128-bit id and a random 256-bit key from the OS.
pub fn new_offer(name: String, size: u64, sha256: &[u8; 32]) -> Result<FileOffer, FailCode> {
    let mut id = [0u8; 16];
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    let mut rng = rand::rngs::OsRng;
    rng.try_fill_bytes(&mut id)
        .map_err(|_| FailCode::ReadFailed)?;
    rng.try_fill_bytes(key.as_mut())
        .map_err(|_| FailCode::ReadFailed)?;
    Ok(FileOffer {
        id,
        name,
        size,
        sha256: hex::encode(sha256),
        chunk: MAX_CHUNK_BYTES,
        key: FileKey::from_bytes(*key),
    })
}

impl Sender {
    /// A sender for an offer about to be sealed: save [`Sender::record`] in the same write as
    /// the sealed offer.
    pub fn new(offer: FileOffer, sid: &str) -> Sender {
        let record = SendRecord {
            offer,
            pass: 0,
            acked: 0,
            status: SendStatus::Offered,
        };
        let mut sender = Sender::from_record(&record, sid);
        sender.awaiting_position = false;
        sender
    }

    /// A sender from its stored record (after a restart). It sends nothing until the
    /// receiver's acknowledgement says where to go on from (or [`RESEND_AFTER`] passes).
    pub fn from_record(record: &SendRecord, sid: &str) -> Sender {
        let offer = record.offer.clone();
        let layout = Layout {
            id: offer.id,
            size: offer.size,
            chunk: offer.chunk,
        };
        let acked = record.acked.min(layout.chunks());
        Sender {
            keys: FileKeys::new(&offer.key),
            layout,
            offer,
            sid: parley_protocol::data::sid_bytes(sid).unwrap_or_default(),
            status: record.status,
            pass: record.pass,
            acked,
            received: acked,
            next: acked,
            sent_high: acked,
            awaiting_position: true,
            online: false,
            in_pass: false,
            last_progress: None,
            outputs: VecDeque::new(),
        }
    }

    pub fn record(&self) -> SendRecord {
        SendRecord {
            offer: self.offer.clone(),
            pass: self.pass,
            acked: self.acked,
            status: self.status,
        }
    }

    pub fn id(&self) -> &FileId {
        &self.offer.id
    }

    pub fn status(&self) -> SendStatus {
        self.status
    }

    /// Bytes the receiver has durably written.
    pub fn acked_bytes(&self) -> u64 {
        self.layout
            .offset(self.acked)
            .unwrap_or(self.layout.size)
            .min(self.layout.size)
    }

    // -------------------------------------------------------------------------------------
    // Inputs

    /// The receiver took the file and wants chunks from `offset`.
    pub fn handle_accept(&mut self, now: Instant, accept: &FileAccept) {
        if self.status != SendStatus::Offered || accept.id != self.offer.id {
            return;
        }
        let chunk = u64::from(self.layout.chunk);
        // An offset must be a chunk boundary inside the file (or its end).
        if accept.offset > self.layout.size || !accept.offset.is_multiple_of(chunk) {
            self.fail(FailCode::BadOffer);
            return;
        }
        self.acked = accept
            .offset
            .checked_div(chunk)
            .unwrap_or(0)
            .min(self.layout.chunks());
        self.received = self.acked;
        self.next = self.acked;
        self.sent_high = self.acked;
        self.awaiting_position = false;
        self.status = SendStatus::Sending;
        self.outputs.push_back(SendOutput::Save(self.record()));
        self.start_pass(now);
    }

    pub fn handle_decline(&mut self, decline: &FileDecline) {
        if decline.id == self.offer.id && self.status == SendStatus::Offered {
            self.fail(decline.reason);
        }
    }

    /// The receiver's `file_done`: it has the file, verified.
    pub fn handle_done(&mut self) {
        if matches!(self.status, SendStatus::Sending | SendStatus::Verifying) {
            self.status = SendStatus::Done;
            self.acked = self.layout.chunks();
            self.received = self.acked;
            self.outputs.push_back(SendOutput::Save(self.record()));
            self.outputs.push_back(SendOutput::Event(SendEvent::Sent));
        }
    }

    /// The receiver's `file_failed`.
    pub fn handle_failed(&mut self, code: FailCode) {
        if !self.is_final() {
            self.fail(code);
        }
    }

    /// Gives the file up (the caller also sends `file_failed` with [`FailCode::Cancelled`], or
    /// the code of a read failure).
    pub fn cancel(&mut self, code: FailCode) {
        if !self.is_final() {
            self.fail(code);
        }
    }

    /// An acknowledgement for this file (its bytes, from a DATA body). Only an authentic one
    /// counts, and never for more than was sent: a relay cannot make the sender skip data.
    /// One that says less was received than before, but no less than is durable, means the
    /// receiver lost what it had not synced (it restarted): a new pass starts there.
    pub fn handle_ack(&mut self, now: Instant, bytes: &[u8]) {
        let Some((received, durable)) = chunk::verify_ack(&self.keys, &self.offer.id, bytes) else {
            return;
        };
        if !matches!(self.status, SendStatus::Sending | SendStatus::Verifying) {
            return;
        }
        let chunks = self.layout.chunks();
        // After a restart the receiver's word is the position (it acknowledges only what it
        // has); otherwise it cannot exceed what this run sent.
        let bound = if self.awaiting_position {
            chunks
        } else {
            self.sent_high
        };
        let received = self.index_of(received).min(bound);
        let durable = self.index_of(durable).min(received);
        let was_awaiting = std::mem::take(&mut self.awaiting_position);
        if was_awaiting {
            // The receiver's word after a link reset (or our restart) is where it is, even
            // below what it said before: it restarted, and what it had not made durable (or
            // more, if its record was lost) is gone. At worst, sent again.
            self.received = received;
            self.acked = durable;
            self.sent_high = self.sent_high.max(received);
        } else {
            // Otherwise acknowledgements only add up: a lower one is old (or replayed).
            self.received = self.received.max(received);
            self.acked = self.acked.max(durable);
        }
        self.received = self.received.max(self.acked);
        // The receiver has more than this pass has sent (chunks of an earlier pass arrived
        // after it began): a new pass from there, never a jump inside this one (the receiver
        // takes a pass's chunks one after another).
        let ahead = self.in_pass && self.received > self.next;
        self.last_progress = Some(now);
        self.outputs
            .push_back(SendOutput::Event(SendEvent::Progress {
                bytes: self.received_bytes(),
            }));
        if self.acked >= chunks && self.status == SendStatus::Sending {
            self.status = SendStatus::Verifying;
            self.outputs.push_back(SendOutput::Save(self.record()));
        } else if was_awaiting || ahead {
            self.in_pass = false;
            self.start_pass(now);
        }
    }

    /// The chunk index a byte count from an acknowledgement stands for: the file's end, or
    /// the chunk boundary at or below it.
    fn index_of(&self, bytes: u64) -> u64 {
        if bytes >= self.layout.size {
            self.layout.chunks()
        } else {
            bytes.checked_div(u64::from(self.layout.chunk)).unwrap_or(0)
        }
    }

    fn received_bytes(&self) -> u64 {
        self.layout
            .offset(self.received)
            .unwrap_or(self.layout.size)
            .min(self.layout.size)
    }

    /// The relay link and the peer: chunks go only while we are attached and the peer is
    /// online (never into a mailbox). Each time both become true a new pass starts from the
    /// acknowledged position: whatever was in flight may be lost.
    pub fn handle_link(&mut self, now: Instant, attached: bool, peer_online: bool) {
        let online = attached && peer_online;
        let was = std::mem::replace(&mut self.online, online);
        if !online {
            self.in_pass = false;
        } else if !was {
            // Whatever was in flight may be lost, and the receiver may have restarted (then
            // it has less than it acknowledged): wait for its word, which it sends when the
            // link comes back, and start the pass there. (`last_progress` is also the clock
            // for giving up on that word.)
            self.last_progress = Some(now);
            if self.status == SendStatus::Sending {
                self.awaiting_position = true;
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(at) = self.poll_timeout()
            && now >= at
        {
            // Silence: whatever is in flight may be gone; go again from what the receiver
            // acknowledged (it keeps that unless it restarts, and then it says so when it is
            // back). With no word at all since the link came back, from what it made durable.
            if std::mem::take(&mut self.awaiting_position) {
                self.received = self.acked;
            }
            self.in_pass = false;
            self.start_pass(now);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.status == SendStatus::Sending && self.online {
            self.last_progress.map(|at| at + RESEND_AFTER)
        } else {
            None
        }
    }

    // -------------------------------------------------------------------------------------
    // Outputs

    /// The next output: queued ones first, then the next chunk the window allows.
    pub fn poll_output(&mut self) -> Option<SendOutput> {
        if let Some(out) = self.outputs.pop_front() {
            return Some(out);
        }
        if self.status != SendStatus::Sending || !self.in_pass || self.awaiting_position {
            return None;
        }
        let window_end = self
            .received
            .saturating_add(WINDOW_CHUNKS)
            .min(self.acked.saturating_add(DURABLE_WINDOW_CHUNKS))
            .min(self.layout.chunks());
        if self.next >= window_end {
            return None;
        }
        let index = self.next;
        let request = ChunkRequest {
            pass: self.pass,
            index,
            offset: self.layout.offset(index)?,
            len: self.layout.len(index)?,
        };
        self.next = index.saturating_add(1);
        self.sent_high = self.sent_high.max(self.next);
        Some(SendOutput::Chunk(request))
    }

    /// The DATA frame of a requested chunk, from the file's bytes at its offset. Bytes of
    /// the wrong length (the file shrank) fail the file: [`FailCode::ReadFailed`].
    pub fn seal(&mut self, request: &ChunkRequest, data: &[u8]) -> Result<Vec<u8>, FailCode> {
        let (pass, index) = (request.pass, request.index);
        match chunk::chunk_frame(&self.keys, &self.layout, &self.sid, pass, index, data) {
            Ok(frame) => Ok(frame),
            Err(_) => {
                self.fail(FailCode::ReadFailed);
                Err(FailCode::ReadFailed)
            }
        }
    }

    // -------------------------------------------------------------------------------------

    fn is_final(&self) -> bool {
        matches!(self.status, SendStatus::Done | SendStatus::Failed { .. })
    }

    fn fail(&mut self, code: FailCode) {
        self.status = SendStatus::Failed { code };
        self.outputs.push_back(SendOutput::Save(self.record()));
        self.outputs
            .push_back(SendOutput::Event(SendEvent::Failed { code }));
    }

    fn start_pass(&mut self, now: Instant) {
        if self.status != SendStatus::Sending || !self.online || self.awaiting_position {
            return;
        }
        let Some(pass) = self.pass.checked_add(1) else {
            self.fail(FailCode::Exhausted);
            return;
        };
        self.pass = pass;
        self.next = self.received;
        self.in_pass = true;
        self.last_progress = Some(now);
        // Saved before the pass's first chunk leaves (the conversation saves before it sends):
        // no (pass, index) is ever sent under two contents.
        self.outputs.push_back(SendOutput::Save(self.record()));
    }
}
