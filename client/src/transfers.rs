//! A conversation's file transfers (protocol.md 3.10), sans-IO: the [`Sender`]s and
//! [`Receiver`]s of one session, the files still to offer, the answer to offers
//! (`--accept-files`), and the records the state file keeps of them.
//!
//! The conversation owns this and routes to it: file messages (`Plain::File*`), chunks (`MSG`
//! with `kind:"file_chunk"`), acknowledgements (`MSG_READ` with `kind:"file_ack"`), the link.
//! What comes out is turned into the conversation's own outputs (messages to seal, frames,
//! saves, events). The file system is reached only through [`FileSystem`], which the driver
//! implements on the disk and the tests in memory: a receiver writes its `.part` as a chunk
//! authenticates (it must know at once whether the write failed), so these calls are made
//! synchronously rather than queued as outputs.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parley_state::{FileReceiveState, FileSendState, MAX_FILE_RECORDS};

use crate::files::names::{part_name, placed_target, unique_target};
use crate::files::offer::{FileDecline, FileFailed, FileOffer};
use crate::files::receive::{PartFile, ReceiveEvent, ReceiveOutput, ReceiveStatus, Receiver};
use crate::files::send::{SendEvent, SendOutput, SendStatus, Sender, new_offer};
use crate::files::{FailCode, FileId, chunk, store};
use crate::session::Plain;

/// Names tried when each one looked free but was taken by the time of the move.
const PLACE_ATTEMPTS: usize = 16;

/// At most this often a transfer reports progress (`file_progress`, at most 4 per second).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What the conversation needs from the file system. The driver's implementation is the
/// disk; nothing here decides anything.
pub trait FileSystem {
    /// Fills `buf` from the sender's file at `path`, from `offset`.
    fn read_at(&mut self, path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The `.part` at `path`, created (with its folders) if it is not there. `path` lies
    /// inside the download directory `base`; nothing is created or opened through a link
    /// below `base` (one someone left there must not lead a peer's names out of it).
    fn part(&mut self, base: &Path, path: &Path) -> io::Result<&mut dyn PartFile>;
    /// Removes the `.part` (a failed file); one already gone is no error.
    fn remove_part(&mut self, path: &Path) -> io::Result<()>;
    /// Whether anything exists at `path` (to choose a name that replaces nothing).
    fn exists(&self, path: &Path) -> bool;
    /// Moves the `.part` to `target`, inside `base`, without replacing anything (its folders
    /// created first, as for [`FileSystem::part`]). Fails with `AlreadyExists` if something
    /// is at `target`.
    fn place(&mut self, base: &Path, part: &Path, target: &Path) -> io::Result<()>;
    /// A job that makes the `.part` at `path` durable (`fdatasync`) as it stands when the job
    /// runs, then records `upto` durably as its durable mark: the driver runs it off the event
    /// loop, while writing goes on.
    fn sync_job(&mut self, path: &Path, upto: u64) -> io::Result<SyncFn>;
}

/// Makes a `.part` durable; may block for a while.
pub type SyncFn = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// A sync the receiving side of a file asked for (protocol.md 3.10 "Receiving chunks").
pub struct SyncJob {
    pub id: FileId,
    /// What the sync covers: chunks below this index were written before it was asked for.
    pub upto: u64,
    pub run: SyncFn,
}

impl std::fmt::Debug for SyncJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SyncJob({}, {})", hex::encode(self.id), self.upto)
    }
}

impl SyncJob {
    /// Runs it (blocking) and says how it went.
    pub fn run(self) -> SyncDone {
        let ok = (self.run)().is_ok();
        SyncDone {
            id: self.id,
            upto: self.upto,
            ok,
        }
    }
}

/// How a [`SyncJob`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncDone {
    pub id: FileId,
    pub upto: u64,
    pub ok: bool,
}

/// How this side answers offers and where files land.
#[derive(Debug, Clone)]
pub struct FileConfig {
    /// `--accept-files`: take offers without asking. Otherwise the person is asked (see
    /// [`Transfers::ask_person`]), or, with nobody to ask, they are declined.
    pub accept: bool,
    pub download_dir: PathBuf,
    /// `--max-file-bytes`.
    pub max_bytes: u64,
}

/// A file the person asked to send: its name for the peer (a relative path), where it is
/// here, its size and SHA-256 (read by the driver beforehand).
#[derive(Debug, Clone)]
pub struct LocalFile {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Something to tell the user about a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileEvent {
    Offer {
        id: String,
        name: String,
        size: u64,
    },
    Progress {
        id: String,
        bytes: u64,
    },
    Received {
        id: String,
        name: String,
        path: PathBuf,
        size: u64,
        sha256: String,
    },
    Sent {
        id: String,
        name: String,
        size: u64,
        sha256: String,
    },
    Failed {
        id: String,
        code: FailCode,
        message: String,
    },
    /// Ask the person whether to take this offer: [`Transfers::answer`] gets the answer.
    /// Questions come one at a time, in the order of the offers.
    Question {
        id: String,
        name: String,
        size: u64,
    },
}

/// What the transfers want the conversation to do, in order.
#[derive(Debug)]
pub enum FileStep {
    /// Seal this through the session (it travels in the ratchet), then save.
    Message(Plain),
    /// Save the session record (with these transfers' records) before going on.
    Save,
    /// Write this DATA frame as it is (a chunk or an acknowledgement, outside the ratchet).
    Transmit(Vec<u8>),
    /// Run this sync off the event loop; report it with [`Transfers::handle_synced`].
    Sync(SyncJob),
    Event(FileEvent),
}

struct Outgoing {
    sender: Sender,
    path: PathBuf,
    name: String,
    size: u64,
    sha256: String,
    last_progress: Option<Instant>,
}

struct Incoming {
    receiver: Receiver,
    dir: PathBuf,
    part: PathBuf,
    /// Where it was placed.
    target: Option<PathBuf>,
    last_progress: Option<Instant>,
}

pub struct Transfers {
    fs: Box<dyn FileSystem + Send>,
    config: FileConfig,
    sid: String,
    outgoing: Vec<Outgoing>,
    incoming: Vec<Incoming>,
    /// Files still to offer: one is offered at a time, so that one file's chunks use the
    /// window (protocol.md 3.10 "Window" is per connection in effect) and few records wait.
    to_offer: VecDeque<LocalFile>,
    steps: VecDeque<FileStep>,
    attached: bool,
    peer_online: bool,
    /// Files received and verified in this run.
    received: u64,
    /// Files that could not even be offered.
    unoffered: u64,
    /// Offers waiting for the person's answer, in order; the first is the one asked.
    questions: VecDeque<FileId>,
    /// A person can be asked (an interactive terminal): see [`Transfers::ask_person`].
    asking: bool,
    /// Offers stored unanswered by an earlier run: answered (asked again) once the chat runs.
    unanswered: Vec<FileId>,
}

impl Transfers {
    /// Transfers for session `sid`, resuming those in its stored record.
    pub fn new(
        fs: Box<dyn FileSystem + Send>,
        config: FileConfig,
        sid: &str,
        files_out: &[FileSendState],
        files_in: &[FileReceiveState],
    ) -> Transfers {
        let mut transfers = Transfers {
            fs,
            config,
            sid: sid.to_string(),
            outgoing: Vec::new(),
            incoming: Vec::new(),
            to_offer: VecDeque::new(),
            steps: VecDeque::new(),
            attached: false,
            peer_online: false,
            received: 0,
            unoffered: 0,
            questions: VecDeque::new(),
            asking: false,
            unanswered: Vec::new(),
        };
        for stored in files_out {
            let Some((record, path)) = store::send_from_state(stored) else {
                continue;
            };
            let sender = Sender::from_record(&record, sid);
            transfers.outgoing.push(Outgoing {
                path,
                name: record.offer.name.clone(),
                size: record.offer.size,
                sha256: record.offer.sha256.clone(),
                sender,
                last_progress: None,
            });
        }
        for stored in files_in {
            let Some((record, dir)) = store::receive_from_state(stored) else {
                continue;
            };
            let Ok(checked) = record.offer.clone().check(u64::MAX) else {
                continue;
            };
            let part = dir.join(part_name(&checked.safe_name, &record.offer.id));
            let restored = match record.status {
                // Never answered: nothing was created for it, and nothing is until it is.
                // Verified: the `.part` is complete, or gone because it was moved into place
                // (whether it is there decides which); opening it would create it.
                ReceiveStatus::Offered | ReceiveStatus::Verified => {
                    Receiver::from_record(&record, sid, &mut NoPart)
                }
                _ => match transfers.fs.part(&dir, &part) {
                    Ok(file) => Receiver::from_record(&record, sid, file),
                    Err(_) => Err(FailCode::WriteFailed),
                },
            };
            match restored {
                Ok(receiver) => {
                    if record.status == ReceiveStatus::Offered {
                        transfers.unanswered.push(record.offer.id);
                    }
                    transfers.incoming.push(Incoming {
                        receiver,
                        dir,
                        part,
                        target: None,
                        last_progress: None,
                    });
                }
                // Its `.part` cannot be opened: the file fails, and the sender is told (it
                // would otherwise wait for it for ever). Nothing stored is kept of it.
                Err(code) => {
                    transfers
                        .steps
                        .push_back(FileStep::Message(Plain::FileFailed(FileFailed {
                            id: record.offer.id,
                            code,
                        })));
                    transfers
                        .steps
                        .push_back(FileStep::Event(FileEvent::Failed {
                            id: hex::encode(record.offer.id),
                            code,
                            message: code.to_string(),
                        }));
                }
            }
        }
        transfers
    }

    /// Files to send, offered one after another once the chat has begun. A file already
    /// being sent (stored by a run that stopped: same path, same SHA-256) is not offered
    /// again: that transfer goes on from where the receiver is.
    pub fn send(&mut self, files: Vec<LocalFile>) {
        for file in files {
            let sha256 = hex::encode(file.sha256);
            let going = self.outgoing.iter().any(|o| {
                o.path == file.path && o.sha256 == sha256 && !is_final_send(o.sender.status())
            });
            if !going {
                self.to_offer.push_back(file);
            }
        }
    }

    /// Nothing is waiting to be offered or moving: every file sent or received is done or
    /// failed. An offer waiting for the person's answer is not moving: a run that ends (the
    /// person quits) leaves it stored, to be asked again on the next (protocol.md 3.10).
    pub fn idle(&self) -> bool {
        self.to_offer.is_empty()
            && self
                .outgoing
                .iter()
                .all(|o| is_final_send(o.sender.status()))
            && self.incoming.iter().all(|i| {
                is_final_receive(i.receiver.status())
                    || (i.receiver.status() == ReceiveStatus::Offered
                        && (self.questions.contains(i.receiver.id())
                            || self.unanswered.contains(i.receiver.id())))
            })
    }

    // -------------------------------------------------------------------------------------
    // The person

    /// Whether a person can be asked about offers (a terminal, not `--json`): then an offer
    /// (without `--accept-files`) is a [`FileEvent::Question`] and waits for
    /// [`Transfers::answer`]; otherwise it is declined.
    pub fn ask_person(&mut self, yes: bool) {
        self.asking = yes;
    }

    /// The offer being asked about, if any: its id, name (as the peer gave it) and size.
    pub fn question(&self) -> Option<(FileId, String, u64)> {
        let id = self.questions.front()?;
        let i = self.incoming.iter().find(|i| i.receiver.id() == id)?;
        Some((*id, i.receiver.record().offer.name, i.receiver.size()))
    }

    /// The person's answer to the question about `id` (only the one asked is answered): yes
    /// accepts it (`file_accept` goes), no declines it (`declined`). The next is asked then.
    pub fn answer(&mut self, id: &FileId, yes: bool) {
        if self.questions.front() != Some(id) {
            return;
        }
        self.questions.pop_front();
        if let Some(i) = self.incoming.iter_mut().find(|i| i.receiver.id() == id)
            && i.receiver.status() == ReceiveStatus::Offered
        {
            if yes {
                i.receiver.accept();
            } else {
                decline_offer(&mut i.receiver, &mut self.steps);
            }
        }
        self.ask_first();
    }

    /// The name and size of a file of ours or the peer's, by its id (hex), to show it.
    pub fn describe(&self, id: &str) -> Option<(String, u64)> {
        let incoming = self
            .incoming
            .iter()
            .find(|i| hex::encode(i.receiver.id()) == id);
        if let Some(i) = incoming {
            return Some((i.receiver.record().offer.name, i.receiver.size()));
        }
        self.outgoing
            .iter()
            .find(|o| hex::encode(o.sender.id()) == id)
            .map(|o| (o.name.clone(), o.size))
    }

    /// Files to send during a chat (`/send`): offered at once if nothing of ours is moving.
    pub fn send_now(&mut self, now: Instant, files: Vec<LocalFile>) {
        self.send(files);
        self.offer_next(now);
    }

    /// An offer just taken in (or stored unanswered by an earlier run): accepted with
    /// `--accept-files`, asked about when a person is there, declined otherwise.
    fn settle_offer(&mut self, id: FileId) {
        let Some(i) = self.incoming.iter_mut().find(|i| i.receiver.id() == &id) else {
            return;
        };
        if self.config.accept {
            i.receiver.accept();
        } else if self.asking {
            if !self.questions.contains(&id) {
                self.questions.push_back(id);
                if self.questions.len() == 1 {
                    self.ask_first();
                }
            }
        } else {
            // Nobody to ask: no means no.
            decline_offer(&mut i.receiver, &mut self.steps);
        }
    }

    /// Asks the first question (dropping those the sender gave up meanwhile).
    fn ask_first(&mut self) {
        while let Some(id) = self.questions.front() {
            let asked = self
                .incoming
                .iter()
                .find(|i| i.receiver.id() == id)
                .filter(|i| i.receiver.status() == ReceiveStatus::Offered);
            match asked {
                Some(i) => {
                    let question = FileEvent::Question {
                        id: hex::encode(id),
                        name: i.receiver.record().offer.name,
                        size: i.receiver.size(),
                    };
                    self.steps.push_back(FileStep::Event(question));
                    return;
                }
                None => {
                    self.questions.pop_front();
                }
            }
        }
    }

    /// Offers stored unanswered by an earlier run are offered again, as new ones would be.
    fn settle_unanswered(&mut self) {
        for id in std::mem::take(&mut self.unanswered) {
            if let Some(i) = self.incoming.iter().find(|i| i.receiver.id() == &id) {
                let offer = FileEvent::Offer {
                    id: hex::encode(id),
                    name: i.receiver.record().offer.name,
                    size: i.receiver.size(),
                };
                self.steps.push_back(FileStep::Event(offer));
                self.settle_offer(id);
            }
        }
    }

    /// Files received and verified in this run.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Our files that failed or were declined (read from their status, so that it is right
    /// as soon as the answer came, before its event is told).
    pub fn send_failed(&self) -> u64 {
        self.outgoing
            .iter()
            .filter(|o| matches!(o.sender.status(), SendStatus::Failed { .. }))
            .count() as u64
            + self.unoffered
    }

    /// The records the state file keeps: transfers still going (finished ones are forgotten,
    /// so the lists stay short).
    pub fn records(&self) -> (Vec<FileSendState>, Vec<FileReceiveState>) {
        let out = self
            .outgoing
            .iter()
            .filter(|o| !is_final_send(o.sender.status()))
            .filter_map(|o| store::send_state(&o.sender.record(), &o.path))
            .take(MAX_FILE_RECORDS)
            .collect();
        let inc = self
            .incoming
            .iter()
            .filter(|i| !is_final_receive(i.receiver.status()))
            .filter_map(|i| store::receive_state(&i.receiver.record(), &i.dir))
            .take(MAX_FILE_RECORDS)
            .collect();
        (out, inc)
    }

    // -------------------------------------------------------------------------------------
    // Inputs

    /// The relay link and the peer (attached after `REATTACH`, `PEER_ONLINE`/`PEER_OFFLINE`,
    /// a lost connection). Each time both come up, senders start a new pass and receivers
    /// tell where they are.
    pub fn handle_link(&mut self, now: Instant, attached: bool, peer_online: bool) {
        let was = self.attached && self.peer_online;
        self.attached = attached;
        self.peer_online = peer_online;
        for o in &mut self.outgoing {
            o.sender.handle_link(now, attached, peer_online);
        }
        if attached && peer_online && !was {
            for i in &mut self.incoming {
                i.receiver.handle_link_reset();
            }
        }
        if attached {
            self.offer_next(now);
        }
    }

    /// A file message from the peer.
    pub fn handle_message(&mut self, now: Instant, plain: Plain) {
        match plain {
            Plain::FileOffer(offer) => self.handle_offer(offer),
            Plain::BadOffer { id } => {
                if self.incoming.iter().all(|i| i.receiver.id() != &id) {
                    self.decline(id, FailCode::BadOffer);
                }
            }
            Plain::FileAccept(accept) => {
                if let Some(o) = self.outgoing_mut(&accept.id) {
                    o.sender.handle_accept(now, &accept);
                }
            }
            Plain::FileDecline(decline) => {
                if let Some(o) = self.outgoing_mut(&decline.id) {
                    o.sender.handle_decline(&decline);
                }
            }
            Plain::FileDone(done) => {
                if let Some(o) = self.outgoing_mut(&done.id) {
                    o.sender.handle_done();
                }
            }
            Plain::FileFailed(failed) => {
                if let Some(o) = self.outgoing_mut(&failed.id) {
                    o.sender.handle_failed(failed.code);
                } else if let Some(i) = self
                    .incoming
                    .iter_mut()
                    .find(|i| i.receiver.id() == &failed.id)
                {
                    i.receiver.handle_failed(failed.code);
                }
            }
            Plain::Hello { .. } | Plain::Text { .. } | Plain::Unknown => {}
        }
    }

    /// A sealed chunk (from a DATA frame). One naming no file being received is ignored.
    pub fn handle_chunk(&mut self, sealed: &[u8]) {
        let Some(header) = chunk::peek(sealed) else {
            return;
        };
        let Some(i) = self
            .incoming
            .iter_mut()
            .find(|i| i.receiver.id() == &header.id)
        else {
            return;
        };
        // A file that failed (or is not accepted yet) gets no `.part` again: chunks still in
        // flight after the failure must not re-create what was removed.
        if i.receiver.status() != ReceiveStatus::Receiving {
            return;
        }
        match self.fs.part(&i.dir, &i.part) {
            Ok(file) => i.receiver.handle_chunk(sealed, file),
            // Could not even open it: as a failed write.
            Err(_) => i.receiver.fail_write(),
        }
    }

    /// An acknowledgement (from a DATA frame).
    pub fn handle_ack(&mut self, now: Instant, bytes: &[u8]) {
        let Some(id) = chunk::ack_id(bytes) else {
            return;
        };
        if let Some(o) = self.outgoing_mut(&id) {
            o.sender.handle_ack(now, bytes);
        }
    }

    /// A sync asked for with [`FileStep::Sync`] ended (the file may be gone by now).
    pub fn handle_synced(&mut self, done: SyncDone) {
        if let Some(i) = self
            .incoming
            .iter_mut()
            .find(|i| i.receiver.id() == &done.id)
        {
            if done.ok {
                i.receiver.handle_synced(done.upto);
            } else {
                i.receiver.handle_sync_failed();
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for o in &mut self.outgoing {
            o.sender.handle_timeout(now);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.outgoing
            .iter()
            .filter_map(|o| o.sender.poll_timeout())
            .min()
    }

    // -------------------------------------------------------------------------------------
    // Outputs

    /// The next step: queued ones first, then what the senders and receivers have (chunks
    /// last, and only when asked: the conversation asks once its own steps are done, so chat
    /// goes ahead of file data).
    pub fn poll_step(&mut self, now: Instant) -> Option<FileStep> {
        if !self.unanswered.is_empty() {
            self.settle_unanswered();
        }
        loop {
            if let Some(step) = self.steps.pop_front() {
                return Some(step);
            }
            if !self.pull(now) {
                return None;
            }
        }
    }

    /// Moves one output of a sender or receiver into `steps`; false when none has any.
    fn pull(&mut self, now: Instant) -> bool {
        for index in 0..self.incoming.len() {
            if let Some(out) = self
                .incoming
                .get_mut(index)
                .and_then(|i| i.receiver.poll_output())
            {
                self.receive_output(now, index, out);
                return true;
            }
        }
        for index in 0..self.outgoing.len() {
            if let Some(out) = self
                .outgoing
                .get_mut(index)
                .and_then(|o| o.sender.poll_output())
            {
                self.send_output(now, index, out);
                return true;
            }
        }
        false
    }

    fn receive_output(&mut self, now: Instant, index: usize, out: ReceiveOutput) {
        let Some(i) = self.incoming.get_mut(index) else {
            return;
        };
        let id = hex::encode(i.receiver.id());
        match out {
            ReceiveOutput::Save(_) => self.steps.push_back(FileStep::Save),
            ReceiveOutput::Message(plain) => self.steps.push_back(FileStep::Message(plain)),
            ReceiveOutput::Transmit(frame) => self.steps.push_back(FileStep::Transmit(frame)),
            ReceiveOutput::Sync { upto } => match self.fs.sync_job(&i.part, upto) {
                Ok(run) => self.steps.push_back(FileStep::Sync(SyncJob {
                    id: *i.receiver.id(),
                    upto,
                    run,
                })),
                Err(_) => i.receiver.handle_sync_failed(),
            },
            ReceiveOutput::Place { name } if !self.fs.exists(&i.part) => {
                // Verified before a restart and its `.part` gone: the move had happened. Where
                // to was not recorded: the last name taken before the first free one, if it
                // holds the file (else the path stays unknown, and is reported empty).
                let fs = &mut self.fs;
                let offer = i.receiver.record().offer;
                i.target = placed_target(&i.dir, &name, |p| fs.exists(p))
                    .filter(|found| holds(fs.as_mut(), found, offer.size, &offer.sha256));
                i.receiver.handle_placed();
            }
            ReceiveOutput::Place { name } => {
                let fs = &mut self.fs;
                // A name free when looked at may be taken by the time of the move (another
                // program writing there): then the next free one.
                let mut placed = None;
                for _ in 0..PLACE_ATTEMPTS {
                    let Some(target) = unique_target(&i.dir, &name, |p| fs.exists(p)) else {
                        break;
                    };
                    match fs.place(&i.dir, &i.part, &target) {
                        Ok(()) => {
                            placed = Some(target);
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                        Err(_) => break,
                    }
                }
                match placed {
                    Some(target) => {
                        i.target = Some(target);
                        i.receiver.handle_placed();
                    }
                    // No free name, a full disk: the file fails (its `.part` removed).
                    None => i.receiver.handle_place_failed(),
                }
            }
            ReceiveOutput::RemovePart => {
                let _ = self.fs.remove_part(&i.part);
            }
            ReceiveOutput::Event(ReceiveEvent::Progress { bytes }) => {
                if due(&mut i.last_progress, now) {
                    self.steps
                        .push_back(FileStep::Event(FileEvent::Progress { id, bytes }));
                }
            }
            ReceiveOutput::Event(ReceiveEvent::Received) => {
                self.received = self.received.saturating_add(1);
                let offer = i.receiver.record().offer;
                let event = FileEvent::Received {
                    id,
                    name: i.receiver.name().to_string(),
                    path: i.target.clone().unwrap_or_default(),
                    size: offer.size,
                    sha256: offer.sha256,
                };
                self.steps.push_back(FileStep::Event(event));
            }
            ReceiveOutput::Event(ReceiveEvent::Failed { code }) => {
                self.steps.push_back(FileStep::Event(FileEvent::Failed {
                    id,
                    code,
                    message: code.to_string(),
                }));
            }
        }
    }

    fn send_output(&mut self, now: Instant, index: usize, out: SendOutput) {
        let Some(o) = self.outgoing.get_mut(index) else {
            return;
        };
        let id = hex::encode(o.sender.id());
        match out {
            SendOutput::Save(_) => self.steps.push_back(FileStep::Save),
            SendOutput::Chunk(request) => {
                let mut data = vec![0u8; request.len];
                let read = self.fs.read_at(&o.path, request.offset, &mut data);
                let sealed = match read {
                    Ok(()) => o.sender.seal(&request, &data),
                    Err(_) => {
                        o.sender.cancel(FailCode::ReadFailed);
                        Err(FailCode::ReadFailed)
                    }
                };
                match sealed {
                    Ok(frame) => self.steps.push_back(FileStep::Transmit(frame)),
                    // The sender failed the file: tell the receiver too.
                    Err(code) => {
                        self.steps
                            .push_back(FileStep::Message(Plain::FileFailed(FileFailed {
                                id: *o.sender.id(),
                                code,
                            })))
                    }
                }
            }
            SendOutput::Event(SendEvent::Progress { bytes }) => {
                if due(&mut o.last_progress, now) {
                    self.steps
                        .push_back(FileStep::Event(FileEvent::Progress { id, bytes }));
                }
            }
            SendOutput::Event(SendEvent::Sent) => {
                self.steps.push_back(FileStep::Event(FileEvent::Sent {
                    id,
                    name: o.name.clone(),
                    size: o.size,
                    sha256: o.sha256.clone(),
                }));
                self.offer_next(now);
            }
            SendOutput::Event(SendEvent::Failed { code }) => {
                self.steps.push_back(FileStep::Event(FileEvent::Failed {
                    id,
                    code,
                    message: code.to_string(),
                }));
                self.offer_next(now);
            }
        }
    }

    // -------------------------------------------------------------------------------------

    fn outgoing_mut(&mut self, id: &FileId) -> Option<&mut Outgoing> {
        self.outgoing.iter_mut().find(|o| o.sender.id() == id)
    }

    /// Offers the next file once none of ours is moving (one at a time).
    fn offer_next(&mut self, now: Instant) {
        if !self.attached
            || self
                .outgoing
                .iter()
                .any(|o| !is_final_send(o.sender.status()))
        {
            return;
        }
        let Some(file) = self.to_offer.pop_front() else {
            return;
        };
        match new_offer(file.name.clone(), file.size, &file.sha256) {
            Ok(offer) => {
                let mut sender = Sender::new(offer.clone(), &self.sid);
                // Chunks go once it is accepted, if the link is up then.
                sender.handle_link(now, self.attached, self.peer_online);
                self.outgoing.push(Outgoing {
                    sender,
                    path: file.path,
                    name: file.name,
                    size: file.size,
                    sha256: offer.sha256.clone(),
                    last_progress: None,
                });
                // Sealed and saved in one write with the sender's record (the conversation
                // saves after sealing).
                self.steps
                    .push_back(FileStep::Message(Plain::FileOffer(offer)));
            }
            Err(code) => {
                self.unoffered = self.unoffered.saturating_add(1);
                self.steps.push_back(FileStep::Event(FileEvent::Failed {
                    id: String::new(),
                    code,
                    message: format!("cannot offer {}: no randomness", file.name),
                }));
            }
        }
    }

    /// Declines an offer nothing was created for, and says so.
    fn decline(&mut self, id: FileId, reason: FailCode) {
        self.steps
            .push_back(FileStep::Message(Plain::FileDecline(FileDecline {
                id,
                reason,
            })));
        self.steps.push_back(FileStep::Event(FileEvent::Failed {
            id: hex::encode(id),
            code: reason,
            message: reason.to_string(),
        }));
    }

    fn handle_offer(&mut self, offer: FileOffer) {
        let id = offer.id;
        if self.incoming.iter().any(|i| i.receiver.id() == &id) {
            // Messages come exactly once; a second offer of one id is ignored.
            return;
        }
        self.steps.push_back(FileStep::Event(FileEvent::Offer {
            id: hex::encode(id),
            name: offer.name.clone(),
            size: offer.size,
        }));
        let moving = self
            .incoming
            .iter()
            .filter(|i| !is_final_receive(i.receiver.status()))
            .count();
        if moving >= MAX_FILE_RECORDS {
            // More at once than the state file keeps: a peer that floods offers.
            return self.decline(id, FailCode::Cancelled);
        }
        let receiver = match Receiver::offered(offer, self.config.max_bytes, &self.sid) {
            Ok(receiver) => receiver,
            Err(Plain::FileDecline(d)) => return self.decline(id, d.reason),
            Err(_) => return self.decline(id, FailCode::BadOffer),
        };
        let dir = self.config.download_dir.clone();
        let part = dir.join(part_name(receiver.name(), &id));
        // Finished ones are reported already; forget them.
        self.incoming
            .retain(|i| !is_final_receive(i.receiver.status()));
        self.incoming.push(Incoming {
            receiver,
            dir,
            part,
            target: None,
            last_progress: None,
        });
        self.settle_offer(id);
    }
}

/// Declines an offer (`declined`) and tells the user.
fn decline_offer(receiver: &mut Receiver, steps: &mut VecDeque<FileStep>) {
    receiver.decline();
    steps.push_back(FileStep::Event(FileEvent::Failed {
        id: hex::encode(receiver.id()),
        code: FailCode::Declined,
        message: FailCode::Declined.to_string(),
    }));
}

/// The `.part` of an offer never answered: nothing is read or written for it.
struct NoPart;

impl PartFile for NoPart {
    fn write_at(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn read_at(&mut self, _: u64, _: &mut [u8]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn truncate(&mut self, _: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn durable_mark(&mut self) -> Option<u64> {
        None
    }
}

/// Whether the file at `path` is `size` bytes with the SHA-256 `sha256` (hex).
fn holds(fs: &mut dyn FileSystem, path: &Path, size: u64, sha256: &str) -> bool {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0u64;
    while at < size {
        let n = usize::try_from(size.saturating_sub(at).min(1 << 16)).unwrap_or(1 << 16);
        let Some(slice) = buf.get_mut(..n) else {
            return false;
        };
        if fs.read_at(path, at, slice).is_err() {
            return false;
        }
        hasher.update(&*slice);
        at = at.saturating_add(n as u64);
    }
    // One byte more would mean a larger file.
    fs.read_at(path, size, &mut [0u8; 1]).is_err() && hex::encode(hasher.finalize()) == sha256
}

fn due(last: &mut Option<Instant>, now: Instant) -> bool {
    if last.is_some_and(|at| now.saturating_duration_since(at) < PROGRESS_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

fn is_final_send(status: SendStatus) -> bool {
    matches!(status, SendStatus::Done | SendStatus::Failed { .. })
}

fn is_final_receive(status: ReceiveStatus) -> bool {
    matches!(status, ReceiveStatus::Done | ReceiveStatus::Failed { .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::receive::ReceiveRecord;

    /// A disk that refuses everything.
    struct Refusing;

    impl FileSystem for Refusing {
        fn read_at(&mut self, _: &Path, _: u64, _: &mut [u8]) -> io::Result<()> {
            Err(io::ErrorKind::PermissionDenied.into())
        }
        fn part(&mut self, _: &Path, _: &Path) -> io::Result<&mut dyn PartFile> {
            Err(io::ErrorKind::PermissionDenied.into())
        }
        fn remove_part(&mut self, _: &Path) -> io::Result<()> {
            Ok(())
        }
        fn exists(&self, _: &Path) -> bool {
            false
        }
        fn sync_job(&mut self, _: &Path, _: u64) -> io::Result<SyncFn> {
            Err(io::ErrorKind::PermissionDenied.into())
        }
        fn place(&mut self, _: &Path, _: &Path, _: &Path) -> io::Result<()> {
            Err(io::ErrorKind::PermissionDenied.into())
        }
    }

    /// A stored transfer whose `.part` cannot be opened after a restart fails, and the sender
    /// hears it (`file_failed`), rather than waiting for ever.
    #[test]
    fn a_stored_receive_whose_part_cannot_be_opened_fails_and_tells_the_sender() {
        let record = ReceiveRecord {
            offer: crate::files::store::tests::offer(),
            durable: 1,
            pass: 1,
            status: ReceiveStatus::Receiving,
        };
        let stored = store::receive_state(&record, Path::new("/dl")).unwrap();
        let config = FileConfig {
            accept: true,
            download_dir: PathBuf::from("/dl"),
            max_bytes: u64::MAX,
        };
        let mut transfers = Transfers::new(Box::new(Refusing), config, "s", &[], &[stored]);
        let now = Instant::now();
        assert!(matches!(
            transfers.poll_step(now),
            Some(FileStep::Message(Plain::FileFailed(FileFailed {
                id,
                code: FailCode::WriteFailed
            }))) if id == [0xa0; 16]
        ));
        assert!(matches!(
            transfers.poll_step(now),
            Some(FileStep::Event(FileEvent::Failed {
                code: FailCode::WriteFailed,
                ..
            }))
        ));
        assert!(transfers.poll_step(now).is_none());
        assert!(transfers.idle());
        assert_eq!(transfers.records(), (Vec::new(), Vec::new()));
    }

    /// A disk that records every call: an offer asked about must not touch it.
    #[derive(Default, Clone)]
    struct Counting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl Counting {
        fn calls(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn count(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl FileSystem for Counting {
        fn read_at(&mut self, _: &Path, _: u64, _: &mut [u8]) -> io::Result<()> {
            self.count();
            Err(io::ErrorKind::PermissionDenied.into())
        }
        fn part(&mut self, _: &Path, _: &Path) -> io::Result<&mut dyn PartFile> {
            self.count();
            Err(io::ErrorKind::PermissionDenied.into())
        }
        fn remove_part(&mut self, _: &Path) -> io::Result<()> {
            self.count();
            Ok(())
        }
        fn exists(&self, _: &Path) -> bool {
            self.count();
            false
        }
        fn place(&mut self, _: &Path, _: &Path, _: &Path) -> io::Result<()> {
            self.count();
            Err(io::ErrorKind::PermissionDenied.into())
        }
        fn sync_job(&mut self, _: &Path, _: u64) -> io::Result<SyncFn> {
            self.count();
            Err(io::ErrorKind::PermissionDenied.into())
        }
    }

    fn asking(fs: Counting, files_in: &[FileReceiveState]) -> Transfers {
        let config = FileConfig {
            accept: false,
            download_dir: PathBuf::from("/dl"),
            max_bytes: u64::MAX,
        };
        let mut transfers = Transfers::new(Box::new(fs), config, "s", &[], files_in);
        transfers.ask_person(true);
        transfers
    }

    fn offer(n: u8, name: &str) -> FileOffer {
        let mut offer = crate::files::store::tests::offer();
        offer.id = [n; 16];
        offer.name = name.into();
        offer
    }

    fn steps(transfers: &mut Transfers, now: Instant) -> Vec<FileStep> {
        std::iter::from_fn(|| transfers.poll_step(now)).collect()
    }

    fn questions(steps: &[FileStep]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|s| match s {
                FileStep::Event(FileEvent::Question { name, .. }) => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    fn answers(steps: &[FileStep]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|s| match s {
                FileStep::Message(Plain::FileAccept(a)) => Some(format!("accept {}", a.id[0])),
                FileStep::Message(Plain::FileDecline(d)) => {
                    Some(format!("decline {} {:?}", d.id[0], d.reason))
                }
                _ => None,
            })
            .collect()
    }

    /// With a person to ask, an offer is a question: nothing is answered to the sender and
    /// nothing touches the disk until the person answers; yes sends `file_accept`.
    #[test]
    fn an_offer_is_asked_and_waits_for_the_answer_then_yes_accepts() {
        let now = Instant::now();
        let fs = Counting::default();
        let mut transfers = asking(fs.clone(), &[]);
        transfers.handle_message(now, Plain::FileOffer(offer(1, "report.pdf")));
        let asked = steps(&mut transfers, now);
        assert!(matches!(
            &asked[0],
            FileStep::Event(FileEvent::Offer { .. })
        ));
        assert_eq!(questions(&asked), ["report.pdf"]);
        assert!(answers(&asked).is_empty(), "answered before the person did");
        assert_eq!(fs.calls(), 0, "the disk was touched before the answer");
        let (id, name, size) = transfers.question().unwrap();
        assert_eq!((id, name.as_str(), size), ([1; 16], "report.pdf", 11));
        // Still offered, and stored as such.
        let (_, stored) = transfers.records();
        assert_eq!(stored.len(), 1);
        // A question open does not keep a run from ending.
        assert!(transfers.idle());

        transfers.answer(&[1; 16], true);
        let answered = steps(&mut transfers, now);
        assert_eq!(answers(&answered), ["accept 1"]);
        assert!(transfers.question().is_none());
        assert!(!transfers.idle());
    }

    #[test]
    fn no_declines_with_declined_on_both_sides() {
        let now = Instant::now();
        let fs = Counting::default();
        let mut transfers = asking(fs.clone(), &[]);
        transfers.handle_message(now, Plain::FileOffer(offer(1, "report.pdf")));
        steps(&mut transfers, now);
        transfers.answer(&[1; 16], false);
        let answered = steps(&mut transfers, now);
        assert_eq!(answers(&answered), ["decline 1 Declined"]);
        assert!(answered.iter().any(|s| matches!(
            s,
            FileStep::Event(FileEvent::Failed {
                code: FailCode::Declined,
                ..
            })
        )));
        assert_eq!(fs.calls(), 0);
        assert!(transfers.idle());
        assert_eq!(transfers.records(), (Vec::new(), Vec::new()));
    }

    /// A folder's files are asked about one at a time, in the order offered; an answer
    /// for one not asked (yet) is ignored.
    #[test]
    fn a_folders_offers_are_asked_in_order_one_at_a_time() {
        let now = Instant::now();
        let mut transfers = asking(Counting::default(), &[]);
        for (n, name) in [(1, "tree/a"), (2, "tree/b"), (3, "tree/c")] {
            transfers.handle_message(now, Plain::FileOffer(offer(n, name)));
        }
        assert_eq!(questions(&steps(&mut transfers, now)), ["tree/a"]);
        transfers.answer(&[2; 16], true);
        assert!(answers(&steps(&mut transfers, now)).is_empty());
        transfers.answer(&[1; 16], true);
        let next = steps(&mut transfers, now);
        assert_eq!(answers(&next), ["accept 1"]);
        assert_eq!(questions(&next), ["tree/b"]);
        transfers.answer(&[2; 16], false);
        let next = steps(&mut transfers, now);
        assert_eq!(answers(&next), ["decline 2 Declined"]);
        assert_eq!(questions(&next), ["tree/c"]);
        transfers.answer(&[3; 16], true);
        let last = steps(&mut transfers, now);
        assert_eq!(answers(&last), ["accept 3"]);
        assert!(questions(&last).is_empty());
        assert!(transfers.question().is_none());
    }

    /// The sender gives up a file while it is asked about: the question goes, the next is
    /// asked.
    #[test]
    fn an_offer_cancelled_while_asked_is_no_longer_asked() {
        let now = Instant::now();
        let mut transfers = asking(Counting::default(), &[]);
        transfers.handle_message(now, Plain::FileOffer(offer(1, "a")));
        transfers.handle_message(now, Plain::FileOffer(offer(2, "b")));
        steps(&mut transfers, now);
        transfers.handle_message(
            now,
            Plain::FileFailed(FileFailed {
                id: [1; 16],
                code: FailCode::Cancelled,
            }),
        );
        transfers.answer(&[1; 16], true);
        let after = steps(&mut transfers, now);
        assert!(answers(&after).is_empty(), "{:?}", answers(&after));
        assert_eq!(questions(&after), ["b"]);
    }

    /// An offer left unanswered when the run ends stays stored and is asked again on the
    /// next run, creating nothing; with nobody to ask then, it is declined.
    #[test]
    fn an_unanswered_offer_is_asked_again_on_the_next_run() {
        let now = Instant::now();
        let mut first = asking(Counting::default(), &[]);
        first.handle_message(now, Plain::FileOffer(offer(1, "report.pdf")));
        steps(&mut first, now);
        let (_, stored) = first.records();

        let fs = Counting::default();
        let mut again = asking(fs.clone(), &stored);
        let asked = steps(&mut again, now);
        assert!(
            matches!(&asked[0], FileStep::Event(FileEvent::Offer { name, .. }) if name == "report.pdf")
        );
        assert_eq!(questions(&asked), ["report.pdf"]);
        assert_eq!(fs.calls(), 0);
        again.answer(&[1; 16], true);
        assert_eq!(answers(&steps(&mut again, now)), ["accept 1"]);

        let config = FileConfig {
            accept: false,
            download_dir: PathBuf::from("/dl"),
            max_bytes: u64::MAX,
        };
        let mut nobody = Transfers::new(Box::new(Counting::default()), config, "s", &[], &stored);
        assert_eq!(answers(&steps(&mut nobody, now)), ["decline 1 Declined"]);
    }

    /// An offer that does not read (a malformed key, say) is declined `bad_offer` rather
    /// than left unanswered, and nothing is asked or touched.
    #[test]
    fn an_offer_that_does_not_read_is_declined_as_bad() {
        let now = Instant::now();
        let fs = Counting::default();
        let mut transfers = asking(fs.clone(), &[]);
        transfers.handle_message(now, Plain::BadOffer { id: [3; 16] });
        let out = steps(&mut transfers, now);
        assert_eq!(answers(&out), ["decline 3 BadOffer"]);
        assert!(questions(&out).is_empty());
        assert_eq!(fs.calls(), 0);
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;
    use crate::disk_files::DiskFiles;
    use crate::files::receive::ReceiveRecord;

    /// A receiver stopped after it verified a file: if the `.part` is gone the move had
    /// happened (nothing is placed again, and nothing empty is created); if it is there, it is
    /// placed. (The first case once re-created an empty `.part` and placed that.)
    #[test]
    fn a_verified_file_is_placed_once_after_a_restart() {
        let root = std::env::temp_dir().join(format!("parley-verified-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let content = b"hello, file";
        let mut offer = crate::files::store::tests::offer();
        offer.size = content.len() as u64;
        offer.sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content));
        let record = ReceiveRecord {
            offer: offer.clone(),
            durable: 3,
            pass: 1,
            status: ReceiveStatus::Verified,
        };
        let stored = store::receive_state(&record, &root).unwrap();
        let config = FileConfig {
            accept: true,
            download_dir: root.clone(),
            max_bytes: u64::MAX,
        };
        let checked = offer.check(u64::MAX).unwrap();
        let part = root.join(part_name(&checked.safe_name, &record.offer.id));
        let target = root.join(checked.safe_name.to_string());
        let now = Instant::now();
        let received = |t: &mut Transfers| {
            std::iter::from_fn(|| t.poll_step(now))
                .filter_map(|s| match s {
                    FileStep::Event(FileEvent::Received { path, .. }) => Some(path),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let sid = "00112233445566778899aabbccddeeff";
        let restart = |config: &FileConfig| {
            Transfers::new(
                Box::new(DiskFiles::default()),
                config.clone(),
                sid,
                &[],
                std::slice::from_ref(&stored),
            )
        };
        // Moved already (to a second name: the first was taken): reported received, where
        // it went, and nothing created.
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, b"someone else's").unwrap();
        let second = target.with_file_name("hello (1).txt");
        std::fs::write(&second, content).unwrap();
        assert_eq!(received(&mut restart(&config)), vec![second.clone()]);
        assert!(!part.exists(), "nothing created");
        // Somewhere that holds something else: received, the path unknown (empty).
        std::fs::write(&second, b"changed").unwrap();
        assert_eq!(received(&mut restart(&config)), [PathBuf::new()]);
        std::fs::remove_file(&second).unwrap();
        std::fs::remove_file(&target).unwrap();
        // Not moved yet: placed now.
        std::fs::create_dir_all(part.parent().unwrap()).unwrap();
        std::fs::write(&part, content).unwrap();
        assert_eq!(received(&mut restart(&config)), vec![target.clone()]);
        assert_eq!(std::fs::read(&target).unwrap(), content);
        assert!(!part.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
