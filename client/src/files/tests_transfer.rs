//! The two ends of a transfer driven against each other through a channel the tests control:
//! a hostile relay (altering, dropping, repeating, swapping, mixing chunks), restarts of
//! either side, a decline, a size bound, the window.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use parley_protocol::data;
use parley_protocol::limits::{MAX_FRAME_BYTES, OUTBOUND_QUEUE_BYTES, OUTBOUND_QUEUE_FRAMES};
use sha2::{Digest, Sha256};

use super::chunk::{self, FileData, data_in};
use super::offer::FileOffer;
use super::receive::{
    PartFile, ReceiveEvent, ReceiveOutput, ReceiveRecord, ReceiveStatus, Receiver,
};
use super::send::{SendEvent, SendOutput, SendRecord, SendStatus, Sender};
use super::{DURABLE_WINDOW_CHUNKS, FailCode, FileKey, WINDOW_CHUNKS};
use crate::session::Plain;

const SID: &str = "00112233445566778899aabbccddeeff";

/// A `.part` in memory. `synced` is what a power cut would keep.
#[derive(Default, Clone)]
struct MemPart {
    data: Vec<u8>,
    synced: usize,
    /// The durable mark the last sync left.
    mark: Option<u64>,
    full_after: Option<usize>,
}

impl PartFile for MemPart {
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let at = offset as usize;
        if self
            .full_after
            .is_some_and(|limit| at + bytes.len() > limit)
        {
            return Err(io::Error::other("disk full"));
        }
        if self.data.len() < at + bytes.len() {
            self.data.resize(at + bytes.len(), 0);
        }
        self.data[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = offset as usize;
        buf.copy_from_slice(
            self.data
                .get(at..at + buf.len())
                .ok_or(io::ErrorKind::UnexpectedEof)?,
        );
        Ok(())
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.data.truncate(len as usize);
        self.synced = self.synced.min(self.data.len());
        Ok(())
    }
    fn durable_mark(&mut self) -> Option<u64> {
        self.mark
    }
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn offer_for(file: &[u8], chunk: u32, id: u8) -> FileOffer {
    FileOffer {
        id: [id; 16],
        name: "dir/report.pdf".into(),
        size: file.len() as u64,
        sha256: hex::encode(Sha256::digest(file)),
        chunk,
        key: FileKey::from_bytes([id.wrapping_add(100); 32]),
    }
}

/// Both ends, the file, the `.part`, and what crossed the wire.
struct Pair {
    file: Vec<u8>,
    sender: Sender,
    receiver: Receiver,
    part: MemPart,
    now: Instant,
    send_record: Option<SendRecord>,
    recv_record: Option<ReceiveRecord>,
    /// Chunk frames sent, over the whole run.
    chunks_sent: u64,
    placed: Option<Vec<u8>>,
    removed: bool,
    send_events: Vec<SendEvent>,
    recv_events: Vec<ReceiveEvent>,
    to_sender: VecDeque<Wire>,
}

/// What the receiver sends back: DATA frames (acknowledgements), and file messages (which
/// travel through the ratchet; here as their plaintext JSON).
enum Wire {
    Data(Vec<u8>),
    Message(String),
}

impl Pair {
    fn new(file: Vec<u8>, chunk: u32) -> Pair {
        let offer = offer_for(&file, chunk, 1);
        let now = Instant::now();
        let sender = Sender::new(offer.clone(), SID);
        let mut receiver = Receiver::offered(offer, u64::MAX, SID).unwrap();
        receiver.accept();
        let mut pair = Pair {
            file,
            sender,
            receiver,
            part: MemPart::default(),
            now,
            send_record: None,
            recv_record: None,
            chunks_sent: 0,
            placed: None,
            removed: false,
            send_events: Vec::new(),
            recv_events: Vec::new(),
            to_sender: VecDeque::new(),
        };
        pair.sender.handle_link(now, true, true);
        pair.drain_receiver();
        pair.deliver_to_sender();
        pair
    }

    /// The chunk frames the sender sends now (the window allowing).
    fn drain_sender(&mut self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while let Some(out) = self.sender.poll_output() {
            match out {
                SendOutput::Save(record) => self.send_record = Some(record),
                SendOutput::Chunk(req) => {
                    let data = &self.file[req.offset as usize..req.offset as usize + req.len];
                    frames.push(self.sender.seal(&req, data).unwrap());
                    self.chunks_sent += 1;
                }
                SendOutput::Event(e) => self.send_events.push(e),
            }
        }
        frames
    }

    fn drain_receiver(&mut self) {
        while let Some(out) = self.receiver.poll_output() {
            match out {
                ReceiveOutput::Save(record) => self.recv_record = Some(record),
                ReceiveOutput::Message(plain) => self
                    .to_sender
                    .push_back(Wire::Message(serde_json::to_string(&plain).unwrap())),
                ReceiveOutput::Transmit(frame) => self.to_sender.push_back(Wire::Data(frame)),
                // Synced at once: what a power cut would keep now.
                ReceiveOutput::Sync { upto } => {
                    self.part.synced = self.part.data.len();
                    self.part.mark = Some(upto);
                    self.receiver.handle_synced(upto);
                }
                ReceiveOutput::Place { .. } => {
                    self.placed = Some(self.part.data.clone());
                    self.receiver.handle_placed();
                }
                ReceiveOutput::RemovePart => self.removed = true,
                ReceiveOutput::Event(e) => self.recv_events.push(e),
            }
        }
    }

    fn deliver_to_sender(&mut self) {
        while let Some(wire) = self.to_sender.pop_front() {
            let text = match wire {
                Wire::Data(frame) => {
                    let (_, body) = data::parse(&frame).unwrap();
                    if let Some(FileData::Ack(ack)) = data_in(body) {
                        self.sender.handle_ack(self.now, ack);
                    }
                    continue;
                }
                Wire::Message(text) => text,
            };
            match serde_json::from_str::<Plain>(&text).unwrap() {
                Plain::FileAccept(a) => self.sender.handle_accept(self.now, &a),
                Plain::FileDecline(d) => self.sender.handle_decline(&d),
                Plain::FileDone(_) => self.sender.handle_done(),
                Plain::FileFailed(f) => self.sender.handle_failed(f.code),
                other => panic!("{other:?}"),
            }
        }
    }

    fn deliver_to_receiver(&mut self, frame: &[u8]) {
        self.receiver.handle_chunk(sealed_in(frame), &mut self.part);
        self.drain_receiver();
    }

    /// Both see the link come back (the sender: `PEER_OFFLINE`, then `PEER_ONLINE`): the
    /// receiver says where it is, and that reaches the sender.
    fn link_comes_back(&mut self) {
        self.sender.handle_link(self.now, true, false);
        self.receiver.handle_link_reset();
        self.drain_receiver();
        self.sender.handle_link(self.now, true, true);
        self.deliver_to_sender();
    }

    /// Rounds of: the sender sends what its window allows, `relay` does what it likes with
    /// the frames, the receiver takes them, its answers reach the sender.
    fn run(&mut self, mut relay: impl FnMut(usize, Vec<Vec<u8>>) -> Vec<Vec<u8>>) {
        for round in 0..10_000 {
            let frames = self.drain_sender();
            if frames.is_empty() && self.to_sender.is_empty() {
                // Nothing moves: a silence, then the sender's timer.
                self.now += Duration::from_secs(30);
                self.sender.handle_timeout(self.now);
                if self.sender.poll_timeout().is_none() && self.is_over() {
                    return;
                }
                if round > 9_000 {
                    return;
                }
            }
            for frame in relay(round, frames) {
                self.deliver_to_receiver(&frame);
            }
            self.deliver_to_sender();
            self.drain_receiver();
            if self.is_over() {
                self.drain_sender();
                return;
            }
        }
    }

    /// Chunks go one by one, answers back, until `n` have reached the receiver: then the
    /// tests crash one side. Returns the sender's first saved record of its pass.
    fn deliver_until(&mut self, n: usize) -> SendRecord {
        let mut delivered = 0;
        let mut first_record = None;
        loop {
            let frames = self.drain_sender();
            if first_record.is_none() {
                first_record = self.send_record.clone();
            }
            for f in &frames {
                self.deliver_to_receiver(f);
                delivered += 1;
                if delivered == n {
                    return first_record.unwrap();
                }
            }
            self.deliver_to_sender();
        }
    }

    fn is_over(&self) -> bool {
        matches!(
            self.sender.status(),
            SendStatus::Done | SendStatus::Failed { .. }
        ) && matches!(
            self.receiver.status(),
            ReceiveStatus::Done | ReceiveStatus::Failed { .. }
        )
    }

    fn failed_with(&self, code: FailCode) {
        assert_eq!(self.receiver.status(), ReceiveStatus::Failed { code });
        assert_eq!(self.sender.status(), SendStatus::Failed { code });
        assert!(self.placed.is_none(), "a failed file must never be placed");
        assert!(self.removed, "its .part is removed");
        assert!(self.recv_events.contains(&ReceiveEvent::Failed { code }));
        assert!(self.send_events.contains(&SendEvent::Failed { code }));
    }
}

const CHUNK: u32 = 1000;

/// The sealed chunk a DATA frame carries.
fn sealed_in(frame: &[u8]) -> &[u8] {
    let (_, body) = data::parse(frame).unwrap();
    match data_in(body) {
        Some(FileData::Chunk(sealed)) => sealed,
        other => panic!("not a chunk: {other:?}"),
    }
}

#[test]
fn a_file_arrives_whole_and_verified() {
    for len in [0usize, 1, 999, 1000, 1001, 10_500] {
        let mut p = Pair::new(content(len, 3), CHUNK);
        p.run(|_, frames| frames);
        assert_eq!(p.placed.as_deref(), Some(&p.file[..]), "{len}");
        assert_eq!(p.sender.status(), SendStatus::Done);
        assert_eq!(p.receiver.status(), ReceiveStatus::Done);
        assert!(p.send_events.contains(&SendEvent::Sent));
        assert!(p.recv_events.contains(&ReceiveEvent::Received));
        // Each chunk went once: nothing was lost, so nothing was sent again.
        assert_eq!(
            p.chunks_sent,
            super::chunk_count(len as u64, CHUNK),
            "{len}"
        );
    }
}

/// The sender never has more than the window beyond the receiver's acknowledgement, and a
/// window of the largest chunks is far inside the relay's bounds.
#[test]
fn the_window_bounds_what_is_in_flight() {
    let mut p = Pair::new(content(20_000, 1), CHUNK);
    // Acknowledgements held back: the sender stops at the window.
    let frames = p.drain_sender();
    assert_eq!(frames.len() as u64, WINDOW_CHUNKS);
    assert!(p.drain_sender().is_empty());
    for f in &frames[..2] {
        p.deliver_to_receiver(f);
    }
    p.deliver_to_sender();
    assert_eq!(
        p.drain_sender().len(),
        2,
        "an ack of two chunks opens two places"
    );
    // Relay bounds with the largest chunk frame.
    let mut big = Pair::new(
        content(super::MAX_CHUNK_BYTES as usize * 10, 2),
        super::MAX_CHUNK_BYTES,
    );
    let frames = big.drain_sender();
    let bytes: usize = frames.iter().map(Vec::len).sum();
    assert_eq!(frames.len() as u64, WINDOW_CHUNKS);
    assert!(frames.iter().all(|f| f.len() <= MAX_FRAME_BYTES));
    assert!(bytes <= OUTBOUND_QUEUE_BYTES / 2, "{bytes}");
    assert!(frames.len() <= OUTBOUND_QUEUE_FRAMES / 32);
}

#[test]
fn an_altered_chunk_fails_the_file() {
    let mut p = Pair::new(content(10_000, 4), CHUNK);
    p.run(|round, mut frames| {
        if round == 1 && !frames.is_empty() {
            // Change one bit of the ciphertext.
            let f = &mut frames[0];
            let at = f.len() - 40;
            f[at] ^= 0x10;
        }
        frames
    });
    p.failed_with(FailCode::ChunkCorrupt);
}

/// A relay that drops, repeats or swaps a chunk inside a pass: each fails the file with its
/// own code.
#[test]
fn dropped_duplicated_or_swapped_chunks_fail_the_file() {
    type Tamper = fn(&mut Vec<Vec<u8>>);
    let cases: [(Tamper, FailCode); 3] = [
        (|frames| drop(frames.remove(0)), FailCode::ChunkMissing),
        (
            |frames| frames.insert(1, frames[0].clone()),
            FailCode::ChunkReplayed,
        ),
        (|frames| frames.swap(0, 1), FailCode::ChunkMissing),
    ];
    for (seed, (tamper, code)) in cases.into_iter().enumerate() {
        let mut p = Pair::new(content(10_000, seed as u8), CHUNK);
        p.run(|round, mut frames| {
            if round == 1 && frames.len() > 1 {
                tamper(&mut frames);
            }
            frames
        });
        p.failed_with(code);
    }
}

/// A chunk of another file, relabelled as this one's (its clear file id rewritten), does not
/// authenticate: the file fails, nothing of the other file is written.
#[test]
fn a_chunk_from_another_file_fails_the_file() {
    let other = content(10_000, 8);
    let mut q = Pair::new(other, CHUNK);
    let foreign = q.drain_sender();
    let mut p = Pair::new(content(10_000, 9), CHUNK);
    p.run(|round, mut frames| {
        if round == 1 {
            let mut body = vec![chunk::BODY_CHUNK];
            body.extend_from_slice(sealed_in(&foreign[0]));
            body[1..17].copy_from_slice(&[1u8; 16]);
            body[17..21].copy_from_slice(&2u32.to_be_bytes());
            frames.insert(0, data::frame(&data::sid_bytes(SID).unwrap(), &body));
        }
        frames
    });
    p.failed_with(FailCode::ChunkCorrupt);
}

/// Truncation: the relay withholds the last chunk. The file is never placed (the sender
/// resends after a silence, and the file completes only once the real last chunk arrives).
#[test]
fn a_withheld_end_never_looks_complete() {
    let mut p = Pair::new(content(5_500, 10), CHUNK);
    let mut withheld = 0;
    p.run(|_, frames| {
        frames
            .into_iter()
            .filter(|f| {
                let last = chunk::peek(sealed_in(f)).unwrap().index == 5;
                if last && withheld < 3 {
                    withheld += 1;
                    return false;
                }
                true
            })
            .collect()
    });
    assert_eq!(withheld, 3);
    assert_eq!(p.placed.as_deref(), Some(&p.file[..]));
}

#[test]
fn a_wrong_hash_fails_the_file_and_nothing_is_placed() {
    let file = content(3_000, 11);
    let mut offer = offer_for(&file, CHUNK, 1);
    offer.sha256 = hex::encode(Sha256::digest(b"something else"));
    let mut p = Pair::new(file, CHUNK);
    p.sender = Sender::new(offer.clone(), SID);
    p.receiver = Receiver::offered(offer, u64::MAX, SID).unwrap();
    p.receiver.accept();
    p.sender.handle_link(p.now, true, true);
    p.drain_receiver();
    p.deliver_to_sender();
    p.run(|_, frames| frames);
    p.failed_with(FailCode::HashMismatch);
}

#[test]
fn a_full_disk_fails_the_file() {
    let mut p = Pair::new(content(10_000, 12), CHUNK);
    p.part.full_after = Some(4_500);
    p.run(|_, frames| frames);
    p.failed_with(FailCode::WriteFailed);
}

#[test]
fn a_declined_offer_fails_for_the_sender_and_writes_nothing() {
    let file = content(100, 13);
    let offer = offer_for(&file, CHUNK, 1);
    let mut sender = Sender::new(offer.clone(), SID);
    let mut receiver = Receiver::offered(offer, u64::MAX, SID).unwrap();
    receiver.decline();
    let outs: Vec<_> = std::iter::from_fn(|| receiver.poll_output()).collect();
    let Some(ReceiveOutput::Message(Plain::FileDecline(d))) = outs.last().cloned() else {
        panic!("{outs:?}");
    };
    assert_eq!(d.reason, FailCode::Declined);
    sender.handle_decline(&d);
    sender.handle_link(Instant::now(), true, true);
    let outs: Vec<_> = std::iter::from_fn(|| sender.poll_output()).collect();
    assert!(outs.contains(&SendOutput::Event(SendEvent::Failed {
        code: FailCode::Declined
    })));
    assert!(!outs.iter().any(|o| matches!(o, SendOutput::Chunk(_))));
}

#[test]
fn offers_over_the_receivers_bound_or_malformed_are_declined() {
    let file = content(5_000, 14);
    let decline = |offer: FileOffer, max| match Receiver::offered(offer, max, SID) {
        Err(Plain::FileDecline(d)) => d.reason,
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(
        decline(offer_for(&file, CHUNK, 1), 4_999),
        FailCode::TooLarge
    );
    assert!(Receiver::offered(offer_for(&file, CHUNK, 1), 5_000, SID).is_ok());
    assert_eq!(
        decline(offer_for(&file, 0, 1), u64::MAX),
        FailCode::BadOffer
    );
    assert_eq!(
        decline(offer_for(&file, super::MAX_CHUNK_BYTES + 1, 1), u64::MAX),
        FailCode::BadOffer
    );
    let mut bad_hash = offer_for(&file, CHUNK, 1);
    bad_hash.sha256 = "zz".into();
    assert_eq!(decline(bad_hash, u64::MAX), FailCode::BadOffer);
    let mut bad_name = offer_for(&file, CHUNK, 1);
    bad_name.name = "../../etc/passwd".into();
    assert_eq!(decline(bad_name, u64::MAX), FailCode::BadName);
    let mut huge = offer_for(&file, CHUNK, 1);
    huge.size = super::MAX_FILE_BYTES + 1;
    assert_eq!(decline(huge, u64::MAX), FailCode::BadOffer);
}

/// The receiver is killed mid-transfer (what it wrote but did not sync is lost with a power
/// cut, too) and comes back from its record: the transfer completes, byte-identical, and what
/// is sent again is at most the durable window (what it had not yet synced).
/// The receiver synced the last chunk (its mark says every chunk is durable) and died before
/// its record said the file was verified: back, it checks the file at once and places it,
/// rather than wait for chunks that will never come again.
#[test]
fn a_receiver_back_with_every_chunk_durable_verifies_at_once() {
    let mut p = Pair::new(content(4_500, 20), CHUNK);
    let accepted = p.recv_record.clone().unwrap();
    assert_eq!(accepted.status, ReceiveStatus::Receiving);
    p.run(|_, frames| frames);
    assert_eq!(p.part.mark, Some(5));
    p.placed = None;
    p.receiver = Receiver::from_record(&accepted, SID, &mut p.part).unwrap();
    assert_eq!(p.receiver.status(), ReceiveStatus::Verified);
    p.drain_receiver();
    assert_eq!(p.placed.as_deref(), Some(&p.file[..]));
    assert_eq!(p.receiver.status(), ReceiveStatus::Done);
}

/// Chunks the sender sent before it heard that the receiver restarted reach the receiver
/// after its restart: their pass is newer than the one it recorded and they lie beyond what
/// it has, yet they are leftovers, not a gap: dropped, and the file completes.
#[test]
fn leftovers_of_a_pass_after_a_receiver_restart_are_dropped_not_a_failure() {
    let mut p = Pair::new(content(600_000, 21), CHUNK);
    let accepted = p.recv_record.clone().unwrap();
    p.deliver_until(150);
    let pass = p.send_record.as_ref().unwrap().pass;
    assert!(pass > accepted.pass);
    p.part.data.truncate(p.part.synced);
    p.to_sender.clear();
    p.receiver = Receiver::from_record(&accepted, SID, &mut p.part).unwrap();
    // Chunk 140 of the pass that was going, as the sender sealed it.
    let keys = chunk::FileKeys::new(&FileKey::from_bytes([101; 32]));
    let layout = chunk::Layout {
        id: [1; 16],
        size: 600_000,
        chunk: CHUNK,
    };
    let sid = data::sid_bytes(SID).unwrap();
    let data = &p.file[140 * CHUNK as usize..141 * CHUNK as usize];
    let leftover = chunk::chunk_frame(&keys, &layout, &sid, pass, 140, data).unwrap();
    p.deliver_to_receiver(&leftover);
    assert_eq!(p.receiver.status(), ReceiveStatus::Receiving);
    p.link_comes_back();
    p.run(|_, frames| frames);
    assert_eq!(p.placed.as_deref(), Some(&p.file[..]));
}

#[test]
fn a_receiver_restart_resends_at_most_the_durable_window() {
    let len = 600_000;
    let mut p = Pair::new(content(len, 15), CHUNK);
    p.run(|_, frames| frames);
    let whole = p.chunks_sent;
    for crash_after in [3usize, 127, 130, 300, 599] {
        let mut p = Pair::new(content(len, 15), CHUNK);
        p.deliver_until(crash_after);
        // The receiver dies: only its last saved record survives, the synced part and the
        // mark its last sync left (ahead of the record, which is saved only now and then).
        let record = p.recv_record.clone().unwrap();
        let durable = record.durable.max(p.part.mark.unwrap_or(0));
        p.part.data.truncate(p.part.synced);
        p.to_sender.clear();
        p.receiver = Receiver::from_record(&record, SID, &mut p.part).unwrap();
        assert_eq!(p.part.data.len() as u64, durable * u64::from(CHUNK));
        p.link_comes_back();
        p.run(|_, frames| frames);
        assert_eq!(
            p.placed.as_deref(),
            Some(&p.file[..]),
            "crash after {crash_after}"
        );
        let again = p.chunks_sent - whole;
        assert!(
            again <= DURABLE_WINDOW_CHUNKS,
            "crash after {crash_after}: {again} sent again"
        );
        // What was not yet durable went again, and what was in flight: no more.
        assert!(
            again <= crash_after as u64 - durable + WINDOW_CHUNKS,
            "crash after {crash_after}: {again} sent again, {durable} durable"
        );
    }
}

/// The sender is killed mid-transfer and comes back from its record (whose acknowledged
/// position may be old): it waits for the receiver's word, then sends at most one window
/// again; the pass number moves on, so no nonce is used twice.
#[test]
fn a_sender_restart_resends_at_most_one_window() {
    let len = 40_000;
    let whole = super::chunk_count(len as u64, CHUNK);
    for crash_after in [2usize, 9, 17] {
        let mut p = Pair::new(content(len, 16), CHUNK);
        let delivered = crash_after;
        // The oldest record the sender saved during its pass (acked = 0): the worst case.
        let record = p.deliver_until(crash_after);
        let old_pass = p.send_record.as_ref().unwrap().pass;
        p.to_sender.clear();
        let mut stale = record;
        stale.pass = old_pass;
        p.sender = Sender::from_record(&stale, SID);
        p.sender.handle_link(p.now, true, true);
        assert!(
            p.drain_sender().is_empty(),
            "it waits for the receiver's position"
        );
        p.receiver.handle_link_reset();
        p.drain_receiver();
        p.deliver_to_sender();
        let before = p.chunks_sent;
        p.run(|_, frames| frames);
        assert_eq!(
            p.placed.as_deref(),
            Some(&p.file[..]),
            "crash after {crash_after}"
        );
        let total = p.chunks_sent - before + delivered as u64;
        assert!(
            total - whole <= WINDOW_CHUNKS,
            "crash after {crash_after}: {} again",
            total - whole
        );
        assert!(p.send_record.as_ref().unwrap().pass > old_pass);
    }
}

/// Chunks of a pass that is over (left in a mailbox when the link dropped) arrive after the
/// link came back: they are dropped without failing the file.
#[test]
fn stale_chunks_after_a_reconnection_are_harmless() {
    let mut p = Pair::new(content(10_000, 17), CHUNK);
    let first = p.drain_sender();
    p.deliver_to_receiver(&first[0]);
    // The link drops; the rest of the window waits in the mailbox.
    p.sender.handle_link(p.now, true, false);
    p.receiver.handle_link_reset();
    p.drain_receiver();
    for f in &first[1..] {
        p.deliver_to_receiver(f);
    }
    assert_eq!(p.receiver.status(), ReceiveStatus::Receiving);
    p.deliver_to_sender();
    p.sender.handle_link(p.now, true, true);
    p.run(|_, frames| frames);
    assert_eq!(p.placed.as_deref(), Some(&p.file[..]));
}

/// Acknowledgements: a forged one (no key), one for more than was sent, or an old one
/// replayed cannot make the sender skip data or go back.
#[test]
fn acknowledgements_cannot_make_the_sender_skip() {
    let mut p = Pair::new(content(10_000, 18), CHUNK);
    let frames = p.drain_sender();
    assert_eq!(frames.len() as u64, WINDOW_CHUNKS);
    // Forged: wrong key.
    let forged = chunk::ack(
        &chunk::FileKeys::new(&FileKey::from_bytes([0; 32])),
        &[1; 16],
        10_000,
        10_000,
    );
    p.sender.handle_ack(p.now, &forged);
    assert_eq!(p.sender.acked_bytes(), 0);
    let keys = chunk::FileKeys::new(&FileKey::from_bytes([101; 32]));
    // More durable than received: malformed, ignored.
    p.sender
        .handle_ack(p.now, &chunk::ack(&keys, &[1; 16], 1_000, 2_000));
    assert_eq!(p.sender.acked_bytes(), 0);
    assert!(p.drain_sender().is_empty(), "the window did not move");
    // Authentic but for more than was sent (a receiver cannot have it): capped at what was.
    p.sender
        .handle_ack(p.now, &chunk::ack(&keys, &[1; 16], 10_000, 10_000));
    assert_eq!(p.sender.acked_bytes(), WINDOW_CHUNKS * u64::from(CHUNK));
    assert_eq!(p.sender.status(), SendStatus::Sending);
    // An old one replayed: no step back, nothing sent again.
    let next = p.drain_sender();
    p.sender
        .handle_ack(p.now, &chunk::ack(&keys, &[1; 16], 1_000, 1_000));
    assert_eq!(p.sender.acked_bytes(), WINDOW_CHUNKS * u64::from(CHUNK));
    assert!(p.drain_sender().is_empty());
    assert_eq!(next.len() as u64, 2, "the rest of the file");
}

/// A receiver that lost what it had not synced says so when it is back (less received than
/// before): the sender, told by the link that the peer came back, takes its word, starts a
/// new pass there, and the file completes. Outside a link reset a lower acknowledgement is
/// old, and changes nothing.
#[test]
fn a_receiver_that_lost_unsynced_data_gets_it_again() {
    let mut p = Pair::new(content(20_000, 19), CHUNK);
    for f in p.drain_sender() {
        p.deliver_to_receiver(&f);
    }
    p.deliver_to_sender();
    let pass = p.send_record.as_ref().unwrap().pass;
    let keys = chunk::FileKeys::new(&FileKey::from_bytes([101; 32]));
    // (A receiver restarted with nothing durable: it has nothing.)
    p.receiver = Receiver::from_record(p.recv_record.as_ref().unwrap(), SID, &mut p.part).unwrap();
    p.part.data.clear();
    p.receiver.handle_link_reset();
    p.to_sender.clear();
    let old = chunk::ack(&keys, &[1; 16], 0, 0);
    p.sender.handle_ack(p.now, &old);
    let on = p.drain_sender();
    assert_eq!(
        p.send_record.as_ref().unwrap().pass,
        pass,
        "no new pass for an old one"
    );
    assert!(
        on.iter()
            .all(|f| chunk::peek(sealed_in(f)).unwrap().index >= WINDOW_CHUNKS)
    );
    p.sender.handle_link(p.now, true, false);
    p.sender.handle_link(p.now, true, true);
    p.sender.handle_ack(p.now, &old);
    let again = p.drain_sender();
    assert_eq!(again.len() as u64, WINDOW_CHUNKS);
    assert!(p.send_record.as_ref().unwrap().pass > pass, "a new pass");
    assert_eq!(chunk::peek(sealed_in(&again[0])).unwrap().index, 0);
    for f in &again {
        p.deliver_to_receiver(f);
    }
    p.deliver_to_sender();
    p.run(|_, frames| frames);
    assert_eq!(p.placed.as_deref(), Some(&p.file[..]));
}

/// The receiver stalls longer than the sender's resend timer (Ctrl-Z, a slow disk), with an
/// honest relay: the sender's new pass starts below what the receiver has; the receiver says
/// where it is, the sender starts again from there, and the file completes (it once waited
/// for ever, or failed with `chunk_missing` after jumping inside a pass).
#[test]
fn a_receiver_stalled_past_the_resend_timer_completes() {
    let mut p = Pair::new(content(200_000, 7), CHUNK);
    let mut delivered = 0;
    while delivered < 96 {
        let frames = p.drain_sender();
        for f in &frames {
            p.deliver_to_receiver(f);
        }
        delivered += frames.len();
        p.deliver_to_sender();
    }
    // In flight while the receiver is stalled.
    let held = p.drain_sender();
    assert_eq!(held.len() as u64, WINDOW_CHUNKS);
    p.now += Duration::from_secs(11);
    p.sender.handle_timeout(p.now);
    let pass2 = p.drain_sender();
    for f in held.iter().chain(pass2.iter()) {
        p.deliver_to_receiver(f);
    }
    p.deliver_to_sender();
    p.run(|_, frames| frames);
    assert_eq!(p.receiver.status(), ReceiveStatus::Done);
    assert_eq!(p.placed.as_deref(), Some(&p.file[..]));
}

/// The receiver comes back with less durable than it had said (its mark lost in a power cut,
/// say): after the link reset the sender takes its word, below its own durable position, and
/// the file completes rather than wait for ever.
#[test]
fn a_receiver_back_with_less_than_it_said_durable_completes() {
    let mut p = Pair::new(content(300_000, 9), CHUNK);
    p.deliver_until(200);
    p.deliver_to_sender();
    assert!(p.sender.acked_bytes() > 0);
    let mut record = p.recv_record.clone().unwrap();
    record.durable = 0;
    p.part = MemPart::default();
    p.receiver = Receiver::from_record(&record, SID, &mut p.part).unwrap();
    p.to_sender.clear();
    p.link_comes_back();
    p.run(|_, frames| frames);
    assert!(p.is_over());
    assert_eq!(p.placed.as_deref(), Some(&p.file[..]));
}

/// The `.part` was deleted (or cut short) while the receiver was stopped: it goes on from
/// what the file holds, not from its record (which once padded the file with zeros and
/// failed the hash at the very end), and the file completes.
#[test]
fn a_receiver_whose_part_was_deleted_starts_again_and_completes() {
    let mut p = Pair::new(content(300_000, 22), CHUNK);
    p.deliver_until(200);
    p.deliver_to_sender();
    let record = p.recv_record.clone().unwrap();
    let durable = record.durable.max(p.part.mark.unwrap_or(0));
    assert!(durable > 0);
    p.part = MemPart {
        mark: Some(durable),
        ..MemPart::default()
    };
    p.receiver = Receiver::from_record(&record, SID, &mut p.part).unwrap();
    assert_eq!(p.receiver.record().durable, 0);
    p.to_sender.clear();
    p.link_comes_back();
    p.run(|_, frames| frames);
    assert_eq!(p.placed.as_deref(), Some(&p.file[..]));
}
