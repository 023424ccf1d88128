//! A paired session's delivery, sans-IO: the send window, resends, receipts, reconnecting
//! (`REATTACH`, then `RESTORE`), reactions to the relay's errors, liveness, and the order in
//! which state must be saved (protocol.md 3.7, 3.8). quinn-proto's `Connection` is the model.
//!
//! The caller owns the relay connection, the input, the state file and the clock. It feeds in
//! what happened with the `handle_*` methods, each given the current instant, and then drains
//! what the conversation decided, in the order it decided it:
//!
//! - [`Conversation::poll_transmit`]: a frame to write on the connection;
//! - [`Conversation::poll_event`]: something to tell the user;
//! - [`Conversation::poll_save`]: a session record to store before going on;
//! - [`Conversation::poll_link`]: open a connection to the session's relay, or drop it.
//!
//! Each returns the next output only if it is of its kind: the outputs form one sequence, and
//! the caller calls all four until none returns anything. That sequence is what makes delivery
//! exactly-once across a crash: a sealed message is saved before it is sent, a received one is
//! saved before it is shown and acknowledged, a receipt is saved before the window moves on.
//! A save that fails ends the caller (nothing after it may happen). Then
//! [`Conversation::poll_end`] says whether the run is over and how, and
//! [`Conversation::poll_timeout`] when to call [`Conversation::handle_timeout`].
//!
//! Nothing here reads a clock, a socket or a file: the tests below drive it through cuts,
//! relay restarts and silences in microseconds.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use parley_protocol::{Envelope, FrameType, encode};
use parley_state::SessionRecord;

use crate::error::ClientError;
#[cfg(test)]
use crate::files::FailCode;
use crate::files::chunk::{FileData, data_in};
use crate::handshake::{error_fields, msg_kind};
use crate::liveness::{Alarm, Liveness, pong_for};
use crate::ratchet::RatchetError;
use crate::session::{Plain, Receipt, ReceiveError, SendError, Session};
use crate::transfers::{FileEvent, FileStep, LocalFile, SyncDone, SyncJob, Transfers};
use crate::wire::{DeliveredData, ErrorData, ReattachData, RestoreData};

/// The relay must answer `REATTACH` (and `RESTORE`) within this.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// How often unacknowledged messages are sent again while the peer is online and no receipt
/// has moved (a frame can be lost with a connection that dies).
pub const RETRANSMIT_EVERY: Duration = Duration::from_secs(2);
/// After `store_unavailable` (protocol.md 2.4), the window goes again after this, doubling up
/// to [`STORE_RETRY_MAX`] while the relay keeps answering so.
const STORE_RETRY_FIRST: Duration = Duration::from_secs(1);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// Each side's first message is its Hello (part of pairing): not reported as chat.
const HELLO_SEQ: u64 = 1;

/// What the conversation needs to know about the run around it.
#[derive(Debug, Clone)]
pub struct Config {
    /// A person types and reads (stdin and stdout are a terminal): `read` receipts are sent,
    /// and quitting waits only until the relay holds our messages, not for the peer's
    /// receipts (the outbox is saved and goes again on the next resume).
    pub interactive: bool,
    /// End once this many chat messages were shown (and ours are out).
    pub exit_after: Option<u64>,
    /// `--exit-after-files`: end once this many files were received and verified.
    pub exit_after_files: Option<u64>,
    /// `--timeout`: give up at this instant, reporting this many seconds.
    pub deadline: Option<(Instant, u64)>,
    /// The liveness bound of a relay connection ([`Liveness`]).
    pub idle: Duration,
    /// The bytes of frames in the outboxes of the other sessions stored in the same state
    /// file: this session's outbox gets what the file's budget leaves beside them.
    pub others_outbox_bytes: usize,
    /// The wall clock (seconds since the epoch) at the instant the conversation is made: the
    /// session's "last used" is counted on from it.
    pub unix_now: u64,
}

/// Something to tell the user. Rendered by `output::chat_event`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The chat begins after pairing (the session is stored).
    Paired,
    /// The chat begins again after `resume`: the relay took us back.
    Resumed {
        peer_online: bool,
    },
    /// A chat line from the peer, recorded before it is shown.
    Message {
        seq: u64,
        text: String,
    },
    /// The relay holds our message (`DELIVERED`).
    Sent {
        seq: u64,
    },
    /// The peer recorded our message (its `delivered` receipt).
    Delivered {
        seq: u64,
    },
    /// The peer's person saw everything up to `upto`.
    Read {
        upto: u64,
    },
    PeerOnline,
    PeerOffline,
    /// The connection to the relay is gone; reconnecting follows.
    RelayOffline {
        why: String,
    },
    /// Reconnected and attached again.
    RelayOnline {
        peer_online: bool,
    },
    /// Input ended, and our messages wait for a peer or relay that is not there.
    Waiting {
        undelivered: usize,
    },
    /// Input is no longer read: the outbox is full (protocol.md 3.7).
    OutboxFull {
        pending: usize,
        last_seq: u64,
        budget_shared: bool,
    },
    /// Input is read again: receipts made room.
    OutboxReady {
        pending: usize,
    },
    /// A file offered, moving, received, sent or failed.
    File(FileEvent),
    /// A problem that does not end the run (an `error` event).
    Problem {
        code: String,
        message: String,
        seq: Option<u64>,
    },
}

/// How far a save must go before the conversation may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Committed and synced to disk.
    Durable,
    /// Committed, so that any later process reads it, but perhaps not yet synced: enough to
    /// print what it records (a durable save follows at once).
    Visible,
}

/// The session record to store now, before any later output.
#[derive(Debug, Clone)]
pub struct Save {
    pub record: SessionRecord,
    pub durability: Durability,
}

/// What to do with the relay connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkAction {
    /// Open a connection to the session's relay; report the outcome with
    /// [`Conversation::handle_connected`] or [`Conversation::handle_disconnected`].
    Dial,
    /// Drop the connection (the conversation gave up on it; reconnecting follows).
    Drop,
}

/// A frame to write: JSON text, or a binary DATA frame (protocol.md 2.2; file chunks and
/// acknowledgements, 3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Data(Vec<u8>),
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame::Text(text)
    }
}

enum Step {
    /// A frame, and whether a failure to write it ends the run (the window sent when the
    /// chat begins, like the attaching before it).
    Transmit(Frame, bool),
    Event(Event),
    /// (Boxed: a record is large beside the other steps.)
    Save(Box<Save>),
    Sync(SyncJob),
    Link(LinkAction),
}

enum Phase {
    /// The driver was asked to dial.
    Dialing,
    /// Connected; `REATTACH` (or `RESTORE`) sent, waiting for the relay's answer.
    Attaching {
        asked: FrameType,
        deadline: Instant,
        liveness: Liveness,
    },
    /// Attached: the chat runs.
    Online { liveness: Liveness },
    /// No connection; dial again at `reconnect_at`.
    Offline { reconnect_at: Instant },
}

/// Backoff between reconnection attempts: doubling from 100 ms to 5 s, with jitter so that
/// many clients cut off at once do not all come back at the same instant.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Backoff {
        Backoff {
            next: Backoff::FIRST,
        }
    }

    fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = self.next.saturating_mul(2).min(Backoff::MAX);
        let jitter = rand::Rng::random_range(&mut rand::rng(), 0.8..1.2);
        base.mul_f64(jitter)
    }

    fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }
}

pub struct Conversation {
    session: Session,
    config: Config,
    /// The instant `config.unix_now` was read.
    made: Instant,
    phase: Phase,
    /// The chat has begun (`Paired` or `Resumed` told): until then every failure ends the run.
    begun: bool,
    steps: VecDeque<Step>,
    end: Option<Result<(), ClientError>>,
    /// The last frame polled was one whose failed write ends the run.
    fatal_write: bool,
    peer_online: bool,
    input_open: bool,
    /// Input is not read until receipts make room (`OutboxFull` told).
    reading_paused: bool,
    /// Lines sealed and not yet saved: saved together, then sent, at the next output.
    sealed_unsaved: bool,
    /// Chat messages shown in this run (for `--exit-after`).
    shown: u64,
    /// Our messages the relay said it holds (`DELIVERED`) on this connection.
    accepted: BTreeSet<u64>,
    /// The window was written up to here on this connection (0: nothing yet).
    sent_upto: u64,
    told_waiting: bool,
    backoff: Backoff,
    next_retransmit: Instant,
    oldest_at_last_tick: Option<u64>,
    /// A cluster node answered `store_unavailable` to a message: when to send the window
    /// again (peer online or not: the relay could not take it), and the wait after that.
    store_retry: Option<Instant>,
    store_backoff: Duration,
    /// File transfers (none: file messages are reported as unsupported, as before).
    files: Option<Transfers>,
    /// The last instant handed in (outputs are polled without one).
    last_now: Instant,
    /// A transfer asked for a save: made before its next frame or event, or together with
    /// the message it seals next (the accept and its record in one write, protocol.md 3.10).
    files_save_pending: bool,
}

impl Conversation {
    fn new(session: Session, phase: Phase, now: Instant, config: Config) -> Conversation {
        let mut session = session;
        session.share_outbox_budget(config.others_outbox_bytes);
        Conversation {
            session,
            config,
            made: now,
            phase,
            begun: false,
            steps: VecDeque::new(),
            end: None,
            fatal_write: false,
            peer_online: false,
            input_open: true,
            reading_paused: false,
            sealed_unsaved: false,
            shown: 0,
            accepted: BTreeSet::new(),
            sent_upto: 0,
            told_waiting: false,
            backoff: Backoff::new(),
            next_retransmit: now,
            oldest_at_last_tick: None,
            store_retry: None,
            store_backoff: STORE_RETRY_FIRST,
            files: None,
            last_now: now,
            files_save_pending: false,
        }
    }

    /// Takes part in file transfers (protocol.md 3.10) through `files`.
    pub fn set_files(&mut self, files: Transfers) {
        self.files = Some(files);
    }

    pub fn files(&self) -> Option<&Transfers> {
        self.files.as_ref()
    }

    #[cfg(test)]
    pub fn files_mut(&mut self) -> Option<&mut Transfers> {
        self.files.as_mut()
    }

    /// Files the person asked to send during the chat (`/send`): offered one after another.
    pub fn send_files(&mut self, now: Instant, files: Vec<LocalFile>) {
        self.last_now = now;
        if let Some(transfers) = &mut self.files {
            transfers.send_now(now, files);
        }
    }

    /// A session just paired on a connection that is still open (its liveness so far given):
    /// the chat begins at once.
    pub fn paired(
        session: Session,
        liveness: Liveness,
        now: Instant,
        config: Config,
    ) -> Conversation {
        let mut conversation = Conversation::new(session, Phase::Online { liveness }, now, config);
        conversation.peer_online = true;
        conversation.begin(now, None);
        conversation
    }

    /// A stored session to resume: the first output asks to dial its relay. Until the relay
    /// takes us back every failure ends the run (no `RESTORE` either: that is for a relay
    /// that forgot us during a chat).
    pub fn resume(session: Session, now: Instant, config: Config) -> Conversation {
        let mut conversation = Conversation::new(session, Phase::Dialing, now, config);
        conversation.steps.push_back(Step::Link(LinkAction::Dial));
        conversation
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    // -----------------------------------------------------------------------------------------
    // Inputs

    /// Whether the caller should read and hand in input lines now: the chat has begun, input
    /// has not ended, the outbox has room, and we are not in the middle of attaching.
    pub fn wants_input(&self) -> bool {
        self.begun
            && self.end.is_none()
            && self.input_open
            && self.session.outbox_has_room()
            && !matches!(self.phase, Phase::Dialing | Phase::Attaching { .. })
    }

    /// A line to send. Lines handed in one after another (while [`Conversation::wants_input`])
    /// before the next output is polled are sealed together and saved once: a script writing
    /// fast costs one save per batch, not one per line.
    ///
    /// While a file offer is being asked about (protocol.md 3.10), the line is the person's
    /// answer instead: `y` or `yes` (any case) accepts, anything else declines.
    pub fn handle_line(&mut self, _now: Instant, line: String) {
        if self.end.is_some() {
            return;
        }
        // Only an answer answers: a line typed while the question was not yet on the screen
        // (or a chat line meanwhile) must not be lost, nor say yes to a file by chance. So
        // y/yes accepts, n/no or an empty line declines, anything else is a chat message and
        // the question stays.
        if let Some(files) = &mut self.files
            && let Some((id, _, _)) = files.question()
        {
            match line.trim().to_lowercase().as_str() {
                "y" | "yes" => return files.answer(&id, true),
                "" | "n" | "no" => return files.answer(&id, false),
                _ => {}
            }
        }
        match self.session.seal(&Plain::Text { text: line }) {
            Ok(_) => self.sealed_unsaved = true,
            Err(e @ SendError::TooLong { .. }) => self.problem("message_too_long", e.to_string()),
            Err(e) => {
                // Those sealed before it are saved, to go out on the next resume.
                self.save_sealed();
                self.finish(Err(ClientError::Internal(e.to_string())));
            }
        }
    }

    /// Input ended: once everything is out, the run ends.
    pub fn handle_input_closed(&mut self, _now: Instant) {
        self.flush_sealed();
        self.input_open = false;
        self.settle();
    }

    /// A text frame from the relay.
    pub fn handle_frame(&mut self, now: Instant, text: &str) {
        self.last_now = now;
        self.flush_sealed();
        if self.end.is_some() {
            return;
        }
        let liveness = match &mut self.phase {
            Phase::Online { liveness } | Phase::Attaching { liveness, .. } => liveness,
            // A frame from a connection already given up on.
            Phase::Dialing | Phase::Offline { .. } => return,
        };
        liveness.heard(now);
        if let Some(pong) = pong_for(text) {
            self.transmit(pong);
        } else if matches!(self.phase, Phase::Online { .. }) {
            self.chat_frame(now, text);
        } else {
            self.attach_frame(now, text);
        }
        self.settle();
    }

    /// A binary DATA frame arrived (protocol.md 2.2): a file chunk or an acknowledgement
    /// (3.10), outside the ratchet. One for another session, or of a kind this version does
    /// not know, is ignored; it still shows the connection is alive.
    pub fn handle_data(&mut self, now: Instant, message: &[u8]) {
        self.last_now = now;
        self.handle_traffic(now);
        if self.end.is_some() || !matches!(self.phase, Phase::Online { .. }) {
            return;
        }
        let Some((sid, body)) = parley_protocol::data::parse(message) else {
            return;
        };
        if &sid != self.session.sid_bytes() {
            return;
        }
        if let Some(files) = &mut self.files {
            match data_in(body) {
                Some(FileData::Chunk(sealed)) => files.handle_chunk(sealed),
                Some(FileData::Ack(ack)) => files.handle_ack(now, ack),
                None => {}
            }
        }
        self.settle();
    }

    /// Something other than a text frame arrived (a WebSocket ping or pong, say): the
    /// connection is alive.
    pub fn handle_traffic(&mut self, now: Instant) {
        if let Phase::Online { liveness } | Phase::Attaching { liveness, .. } = &mut self.phase {
            liveness.heard(now);
        }
    }

    /// The connection asked for with [`LinkAction::Dial`] is open: attach.
    pub fn handle_connected(&mut self, now: Instant) {
        self.last_now = now;
        self.flush_sealed();
        if self.end.is_some() || !matches!(self.phase, Phase::Dialing) {
            return;
        }
        self.phase = Phase::Attaching {
            asked: FrameType::Reattach,
            deadline: later(now, ATTACH_TIMEOUT),
            liveness: Liveness::new(now, self.config.idle),
        };
        let data = ReattachData {
            resume_token: Some(self.session.resume_token().expose().into()),
        };
        let frame = encode(FrameType::Reattach, Some(self.session.sid()), Some(&data));
        self.transmit(frame);
    }

    /// The connection failed: dialing it, reading from it or writing to it (the caller has
    /// dropped it).
    pub fn handle_disconnected(&mut self, now: Instant, why: ClientError) {
        self.last_now = now;
        if self.end.is_none() && self.fatal_write && matches!(self.phase, Phase::Online { .. }) {
            // Nothing decided after that write happens (it would not have before either); but
            // lines already sealed are still saved, or their numbers would be used again.
            self.steps.clear();
            self.flush_sealed();
            return self.finish(Err(why));
        }
        self.flush_sealed();
        if self.end.is_some() {
            return;
        }
        match self.phase {
            Phase::Online { .. } => {
                // A relay that broke the protocol (an oversize frame) is handled like a cut:
                // the stream cannot be resynchronised, the outboxes resend whatever was lost.
                // But it is likely to do it again right after the next attach (which resets
                // the backoff): wait the longest step.
                let wait = match why {
                    ClientError::RelayProtocol(_) => Backoff::MAX,
                    _ => self.backoff.step(),
                };
                self.lose_link(now, &why, wait);
            }
            Phase::Dialing | Phase::Attaching { .. } => self.attach_failed(now, why),
            Phase::Offline { .. } => {}
        }
        self.settle();
    }

    /// The instant from [`Conversation::poll_timeout`] came (or went).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        self.flush_sealed();
        if self.end.is_some() {
            return;
        }
        if let Some((deadline, secs)) = self.config.deadline
            && now >= deadline
        {
            return self.finish(Err(ClientError::Timeout(secs)));
        }
        match &mut self.phase {
            Phase::Online { liveness } => match liveness.handle_timeout(now) {
                Some(Alarm::Ping(frame)) => self.transmit(frame),
                Some(Alarm::Dead(why)) => {
                    let wait = self.backoff.step();
                    self.lose_link(now, &why, wait);
                }
                None => {}
            },
            Phase::Attaching {
                deadline, liveness, ..
            } => {
                let late = now >= *deadline;
                match liveness.handle_timeout(now) {
                    Some(Alarm::Ping(frame)) => self.transmit(frame),
                    Some(Alarm::Dead(why)) => return self.attach_failed(now, why),
                    None => {}
                }
                if late {
                    return self.attach_failed(
                        now,
                        ClientError::ConnectionLost("the relay did not answer in time".into()),
                    );
                }
            }
            Phase::Offline { reconnect_at } if now >= *reconnect_at => {
                self.phase = Phase::Dialing;
                self.steps.push_back(Step::Link(LinkAction::Dial));
            }
            Phase::Offline { .. } | Phase::Dialing => {}
        }
        if self.store_retry.is_some_and(|at| now >= at)
            && matches!(self.phase, Phase::Online { .. })
        {
            self.store_retry = None;
            self.resend_window();
        }
        if let Some(files) = &mut self.files {
            files.handle_timeout(now);
        }
        if self.retransmitting() && now >= self.next_retransmit {
            let oldest = self.session.unacked().next().map(|(seq, _)| seq);
            if oldest == self.oldest_at_last_tick {
                self.resend_window();
            }
            self.oldest_at_last_tick = oldest;
            self.next_retransmit = later(now, RETRANSMIT_EVERY);
        }
        self.settle();
    }

    // -----------------------------------------------------------------------------------------
    // Outputs

    /// The next frame to write, if the next output is one.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.flush_sealed();
        self.pull_files();
        if let Some(Step::Transmit(..)) = self.steps.front()
            && let Some(Step::Transmit(frame, fatal)) = self.steps.pop_front()
        {
            self.fatal_write = fatal;
            return Some(frame);
        }
        self.fatal_write = false;
        None
    }

    /// Whether a failure to write the frame [`Conversation::poll_transmit`] just gave ends the
    /// run (the window sent when the chat begins): the driver writes such a frame out at once
    /// rather than batch it, so that a failure is reported while this still says so.
    pub fn write_is_fatal(&self) -> bool {
        self.fatal_write
    }

    /// The next event to tell, if the next output is one.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.flush_sealed();
        self.pull_files();
        if let Some(Step::Event(_)) = self.steps.front()
            && let Some(Step::Event(event)) = self.steps.pop_front()
        {
            return Some(event);
        }
        None
    }

    /// The record to store before anything else happens, if the next output is one.
    pub fn poll_save(&mut self) -> Option<Save> {
        self.flush_sealed();
        self.pull_files();
        if let Some(Step::Save(_)) = self.steps.front()
            && let Some(Step::Save(save)) = self.steps.pop_front()
        {
            return Some(*save);
        }
        None
    }

    /// A `.part` to make durable off the event loop, if the next output is that: run the job
    /// (it may take a while) and report with [`Conversation::handle_synced`]. Nothing waits
    /// for it meanwhile.
    pub fn poll_sync(&mut self) -> Option<SyncJob> {
        self.flush_sealed();
        self.pull_files();
        if let Some(Step::Sync(_)) = self.steps.front()
            && let Some(Step::Sync(job)) = self.steps.pop_front()
        {
            return Some(job);
        }
        None
    }

    /// A sync from [`Conversation::poll_sync`] ended.
    pub fn handle_synced(&mut self, now: Instant, done: SyncDone) {
        self.last_now = now;
        if let Some(files) = &mut self.files {
            files.handle_synced(done);
        }
        self.settle();
    }

    /// What to do with the connection, if the next output is that.
    pub fn poll_link(&mut self) -> Option<LinkAction> {
        self.flush_sealed();
        self.pull_files();
        if let Some(Step::Link(action)) = self.steps.front() {
            let action = *action;
            self.steps.pop_front();
            return Some(action);
        }
        None
    }

    /// The run is over, once every output before that is drained: `Ok` (close the connection
    /// gracefully, exit 0) or the error to exit with.
    pub fn poll_end(&mut self) -> Option<Result<(), ClientError>> {
        self.pull_files();
        if self.steps.is_empty() {
            self.end.take()
        } else {
            None
        }
    }

    /// When to call [`Conversation::handle_timeout`] next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.end.is_some() {
            return None;
        }
        let phase = match &self.phase {
            Phase::Online { liveness } => liveness.poll_timeout(),
            Phase::Attaching {
                deadline, liveness, ..
            } => Some(
                liveness
                    .poll_timeout()
                    .map_or(*deadline, |l| l.min(*deadline)),
            ),
            Phase::Offline { reconnect_at } => Some(*reconnect_at),
            Phase::Dialing => None,
        };
        let retransmit = self.retransmitting().then_some(self.next_retransmit);
        let files = self.files.as_ref().and_then(Transfers::poll_timeout);
        let store_retry = self
            .store_retry
            .filter(|_| matches!(self.phase, Phase::Online { .. }));
        [
            phase,
            retransmit,
            store_retry,
            files,
            self.config.deadline.map(|(at, _)| at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // -----------------------------------------------------------------------------------------
    // Chatting

    /// The chat begins (attached, after pairing or resuming).
    fn begin(&mut self, now: Instant, resumed: Option<bool>) {
        self.begun = true;
        self.session.touch(self.unix(now));
        // What the last run recorded but may not have shown (it stopped in between): shown
        // below, before the state forgets it.
        let unshown = self.session.take_unshown();
        if unshown.is_empty() {
            // Saved before anything is announced: "paired" means the session is stored.
            self.save(Durability::Durable);
        }
        self.event(match resumed {
            None => Event::Paired,
            Some(peer_online) => Event::Resumed { peer_online },
        });
        // (Not counted for --exit-after: the last run may have shown them already.)
        let had_unshown = !unshown.is_empty();
        for (seq, text) in unshown {
            self.event(Event::Message { seq, text });
        }
        if had_unshown {
            self.save(Durability::Durable);
        }
        // Whatever was unacknowledged when we last stopped goes out again first; on this
        // connection, which attached a moment ago, a failure ends the run as attaching does.
        self.sent_upto = 0;
        let fatal_from = self.steps.len();
        self.pump();
        for step in self.steps.iter_mut().skip(fatal_from) {
            if let Step::Transmit(_, fatal) = step {
                *fatal = true;
            }
        }
        self.oldest_at_last_tick = self.session.unacked().next().map(|(seq, _)| seq);
        // The first resend check is due at once (as a fresh interval's first tick is).
        self.next_retransmit = now;
        self.files_link(now);
        self.settle();
    }

    fn chat_frame(&mut self, now: Instant, text: &str) {
        let Ok(env) = Envelope::parse(text) else {
            return;
        };
        match env.kind {
            FrameType::Msg => {
                let shown = self.receive(now, &env);
                self.shown = self.shown.saturating_add(shown);
                let upto = self.session.received_upto();
                let mut receipts = vec![Receipt::Delivered { upto }];
                if self.config.interactive && shown > 0 {
                    receipts.push(Receipt::Read { upto });
                }
                for receipt in receipts {
                    // (None before the peer's first message gives us a receiving chain.)
                    if let Ok(frame) = self.session.receipt(receipt) {
                        self.transmit(frame);
                    }
                }
            }
            FrameType::MsgRead => match self.session.take_receipt(&env) {
                Ok(Some((Receipt::Delivered { .. }, newly))) if !newly.is_empty() => {
                    self.save(Durability::Durable);
                    // Receipts open the window: send what it now allows.
                    self.pump();
                    for seq in newly {
                        self.accepted.remove(&seq);
                        if seq != HELLO_SEQ {
                            self.event(Event::Delivered { seq });
                        }
                    }
                }
                Ok(Some((Receipt::Read { upto }, _))) => self.event(Event::Read { upto }),
                Ok(_) => {}
                Err(e) => self.problem("rejected_receipt", format!("a receipt was rejected: {e}")),
            },
            FrameType::Delivered => {
                // The relay takes messages again: the next store trouble starts from the
                // shortest wait.
                self.store_retry = None;
                self.store_backoff = STORE_RETRY_FIRST;
                if let Some(seq) = msg_seq(&env)
                    && self.session.unacked().any(|(s, _)| s == seq)
                    && self.accepted.insert(seq)
                    && seq != HELLO_SEQ
                {
                    self.event(Event::Sent { seq });
                }
            }
            FrameType::PeerOnline => {
                // (Also when the peer seemed online: it re-attached before the relay saw its
                // old connection go, and no `PEER_OFFLINE` came. Either way its link is new:
                // the transfers see it go and come back.)
                self.peer_online = false;
                self.files_link(now);
                self.peer_online = true;
                self.told_waiting = false;
                self.event(Event::PeerOnline);
                // What the peer's last connection had not yet written may be lost.
                self.resend_window();
                self.files_link(now);
            }
            FrameType::PeerOffline => {
                self.peer_online = false;
                self.event(Event::PeerOffline);
                self.files_link(now);
            }
            FrameType::Error => self.relay_error(now, &env),
            _ => {}
        }
    }

    /// An `ERROR` during the chat (protocol.md 3.7, "Other frames during a chat").
    fn relay_error(&mut self, now: Instant, env: &Envelope<'_>) {
        let (code, message) = error_fields(env);
        match (msg_seq(env), code.as_str()) {
            // Not kept by the relay: it goes again when the peer is back (or, for a cluster
            // node that cannot reach its store, with the next resend: protocol.md 2.7).
            (Some(seq), "mailbox_full" | "peer_offline" | "not_paired" | "store_unavailable") => {
                self.accepted.remove(&seq);
                if code == "store_unavailable" && self.store_retry.is_none() {
                    // Not the peer's absence: the relay could not look. Again after a short
                    // wait, backing off (protocol.md 2.4), whether the peer is online or not.
                    self.store_retry = Some(later(now, self.store_backoff));
                    self.store_backoff = self.store_backoff.saturating_mul(2).min(STORE_RETRY_MAX);
                }
                if code == "mailbox_full" {
                    self.event(Event::Problem {
                        code,
                        message: format!(
                            "message {seq} is not at the relay yet (the offline peer's mailbox is full); it is kept and sent when the peer is back"
                        ),
                        seq: Some(seq),
                    });
                }
            }
            (Some(seq), _) => self.problem(
                "refused_message",
                format!("message {seq} was refused by the relay: {message} ({code})"),
            ),
            (None, "replaced") => self.finish(Err(ClientError::SessionTakenOver)),
            // The relay lost our seat (e.g. it restarted under us): attach again, at once.
            (None, "not_member") => self.lose_link(
                now,
                &ClientError::ConnectionLost(
                    "the relay no longer counts this client in the session".into(),
                ),
                Duration::ZERO,
            ),
            (None, _) => self.problem(&code, message),
        }
    }

    /// Handles a received `MSG`: records what is now due, then shows it. Returns how many
    /// chat lines were shown.
    fn receive(&mut self, now: Instant, env: &Envelope<'_>) -> u64 {
        // Late handshake notices (a repeated confirmation) carry a `kind`; they are not chat.
        if msg_kind(env).is_some() {
            return 0;
        }
        let received = match self.session.receive(env) {
            Ok(received) => received,
            Err(e) => {
                let code = match e {
                    ReceiveError::Replayed { .. }
                    | ReceiveError::Ratchet(RatchetError::KeyGone) => "replayed_message",
                    ReceiveError::Ratchet(RatchetError::TooFarAhead { .. }) => {
                        "message_too_far_ahead"
                    }
                    ReceiveError::Crypto(_) | ReceiveError::Ratchet(_) => "rejected_message",
                    ReceiveError::Malformed | ReceiveError::Content => "malformed_message",
                };
                self.problem(code, format!("a message was rejected and not shown: {e}"));
                return 0;
            }
        };
        if received.held {
            // Decrypted ahead of a gap: its key is gone, so it must be on disk before
            // anything else happens.
            self.save(Durability::Durable);
        }
        if received.due.is_empty() {
            return 0;
        }
        self.session.touch(self.unix(now));
        let mut lines = Vec::new();
        for incoming in received.due {
            match incoming.plain {
                Plain::Hello { name } => self.session.set_peer_name(name),
                Plain::Text { text } => lines.push((incoming.seq, text)),
                plain @ (Plain::FileOffer(_)
                | Plain::FileAccept(_)
                | Plain::FileDecline(_)
                | Plain::FileDone(_)
                | Plain::FileFailed(_)
                | Plain::BadOffer { .. })
                    if self.files.is_some() =>
                {
                    if let Some(files) = &mut self.files {
                        files.handle_message(now, plain);
                    }
                }
                // A conversation that takes no part in transfers (no `Transfers` given)
                // counts a file message and reports it.
                Plain::FileOffer(_)
                | Plain::FileAccept(_)
                | Plain::FileDecline(_)
                | Plain::FileDone(_)
                | Plain::FileFailed(_)
                | Plain::BadOffer { .. } => self.problem(
                    "unsupported_file",
                    format!(
                        "message {} is a file transfer message; this version cannot take part in file transfers yet",
                        incoming.seq
                    ),
                ),
                Plain::Unknown => self.problem(
                    "unknown_message",
                    format!(
                        "message {} authenticated but is not understood (a kind from a newer version, or malformed content); it was received but cannot be shown",
                        incoming.seq
                    ),
                ),
            }
        }
        // Recorded, together with the lines themselves as not yet shown, before they are
        // shown; then recorded as shown. A crash in between shows them at the next start (the
        // same `seq` again, at worst, never a gap).
        self.session.set_unshown(lines.clone());
        self.save(Durability::Visible);
        let count = lines.len() as u64;
        for (seq, text) in lines {
            self.event(Event::Message { seq, text });
        }
        self.session.set_unshown(Vec::new());
        self.save(Durability::Durable);
        count
    }

    /// The window, all of it, again (on a new connection, when the peer is back, and when
    /// receipts stall).
    fn resend_window(&mut self) {
        self.sent_upto = 0;
        self.pump();
    }

    /// Sends what the send window allows beyond `sent_upto`, in order (nothing while
    /// detached: attaching sends it all).
    fn pump(&mut self) {
        if !matches!(self.phase, Phase::Online { .. }) {
            return;
        }
        for (seq, frame) in self.session.window_after(self.sent_upto) {
            self.transmit(frame);
            self.sent_upto = seq;
        }
    }

    fn retransmitting(&self) -> bool {
        matches!(self.phase, Phase::Online { .. }) && self.peer_online && self.session.has_unacked()
    }

    /// Lines sealed since the last output: saved (in the outbox) before they are sent, so a
    /// sequence number is never used twice and the message survives a crash.
    fn flush_sealed(&mut self) {
        if self.save_sealed() {
            self.pump();
            self.settle();
        }
    }

    fn save_sealed(&mut self) -> bool {
        let sealed = std::mem::take(&mut self.sealed_unsaved);
        if sealed {
            self.save(Durability::Durable);
        }
        sealed
    }

    /// After every input: input paused or resumed for the outbox, the end of the run, and
    /// the "waiting" notice.
    fn settle(&mut self) {
        // While attaching, nothing changes here: it is decided once attached (or not).
        if !self.begun
            || self.end.is_some()
            || matches!(self.phase, Phase::Dialing | Phase::Attaching { .. })
        {
            return;
        }
        let room = self.session.outbox_has_room();
        if self.input_open && !room && !self.reading_paused {
            self.reading_paused = true;
            self.event(Event::OutboxFull {
                pending: self.session.outbox_len(),
                last_seq: self.session.last_sealed(),
                budget_shared: self.session.outbox_budget_shared(),
            });
        } else if self.reading_paused && room {
            self.reading_paused = false;
            if self.input_open {
                self.event(Event::OutboxReady {
                    pending: self.session.outbox_len(),
                });
            }
        }
        let everything_out = if self.config.interactive {
            self.session
                .unacked()
                .all(|(seq, _)| self.accepted.contains(&seq))
        } else {
            !self.session.has_unacked()
        };
        let online = matches!(self.phase, Phase::Online { .. });
        let files_over = self.files.as_ref().is_none_or(|f| {
            f.idle()
                && self
                    .config
                    .exit_after_files
                    .is_none_or(|n| f.received() >= n)
        });
        if !self.input_open
            && self.config.exit_after.is_none_or(|n| self.shown >= n)
            && everything_out
            && files_over
        {
            let failed = self.files.as_ref().map_or(0, Transfers::send_failed);
            self.finish(if failed == 0 {
                Ok(())
            } else {
                Err(ClientError::FilesFailed(failed))
            });
        } else if !self.input_open
            && !everything_out
            && (!self.peer_online || !online)
            && !self.told_waiting
        {
            self.told_waiting = true;
            self.event(Event::Waiting {
                undelivered: self.session.unacked().count(),
            });
        }
    }

    // -----------------------------------------------------------------------------------------
    // Attaching

    /// A frame while waiting for the answer to `REATTACH` or `RESTORE`: `PEER_ONLINE` or
    /// `PEER_OFFLINE` (whether the peer is online), or the relay's refusal.
    fn attach_frame(&mut self, now: Instant, text: &str) {
        let Phase::Attaching { asked, .. } = &self.phase else {
            return;
        };
        let asked = *asked;
        let env = match Envelope::parse(text) {
            Ok(env) => env,
            Err(e) => {
                return self.attach_failed(
                    now,
                    ClientError::RelayProtocol(format!(
                        "it answered {asked} with an unreadable frame ({e})"
                    )),
                );
            }
        };
        match env.kind {
            FrameType::PeerOnline => self.attached(now, true),
            FrameType::PeerOffline => self.attached(now, false),
            FrameType::Error => {
                let (code, message) = error_fields(&env);
                // Forgotten (the relay restarted), or re-created by the peer's RESTORE with
                // our seat awaiting us: RESTORE with the proof, once.
                if self.begun
                    && asked == FrameType::Reattach
                    && (code == "session_unknown" || code == "token_invalid")
                {
                    self.restore(now);
                } else if code == "store_unavailable" {
                    // Not a refusal: the relay (a cluster node) could not look; try again.
                    self.attach_failed(
                        now,
                        ClientError::ConnectionLost(format!(
                            "the relay answered {asked}: {message}"
                        )),
                    );
                } else {
                    self.attach_failed(now, ClientError::ResumeRefused { code, message });
                }
            }
            _ => {}
        }
    }

    fn restore(&mut self, now: Instant) {
        let Phase::Attaching {
            asked, deadline, ..
        } = &mut self.phase
        else {
            return;
        };
        *asked = FrameType::Restore;
        *deadline = later(now, ATTACH_TIMEOUT);
        let data = RestoreData {
            role: Some(self.session.role().to_string().into()),
            resume_token: Some(self.session.resume_token().expose().into()),
            proof: Some(self.session.restore_proof().expose().into()),
        };
        let frame = encode(FrameType::Restore, Some(self.session.sid()), Some(&data));
        self.transmit(frame);
    }

    fn attached(&mut self, now: Instant, peer_online: bool) {
        let Phase::Attaching { liveness, .. } = &self.phase else {
            return;
        };
        self.phase = Phase::Online {
            liveness: liveness.clone(),
        };
        self.peer_online = peer_online;
        if !self.begun {
            return self.begin(now, Some(peer_online));
        }
        self.backoff.reset();
        self.told_waiting = false;
        self.event(Event::RelayOnline { peer_online });
        self.resend_window();
        self.files_link(now);
    }

    /// Dialing or attaching failed. Before the chat began, that ends the run; after, only a
    /// refusal does (the relay answered: trying again will not help), or a certificate this
    /// client refuses (renewed from another CA, or someone in between: retrying in silence
    /// would hide it). Anything else is tried again.
    fn attach_failed(&mut self, now: Instant, why: ClientError) {
        self.purge_transmits();
        if !self.begun
            || matches!(
                why,
                ClientError::ResumeRefused { .. } | ClientError::RelayCertificate { .. }
            )
        {
            return self.finish(Err(why));
        }
        self.steps.push_back(Step::Link(LinkAction::Drop));
        self.phase = Phase::Offline {
            reconnect_at: later(now, self.backoff.step()),
        };
        self.files_link(now);
        self.settle();
    }

    /// The connection to the relay is gone: say so, and reconnect after `wait`.
    fn lose_link(&mut self, now: Instant, why: &ClientError, wait: Duration) {
        self.purge_transmits();
        self.steps.push_back(Step::Link(LinkAction::Drop));
        self.accepted.clear();
        self.event(Event::RelayOffline {
            why: why.to_string(),
        });
        self.phase = Phase::Offline {
            reconnect_at: later(now, wait),
        };
        self.files_link(now);
    }

    // -----------------------------------------------------------------------------------------
    // Helpers

    fn finish(&mut self, result: Result<(), ClientError>) {
        if self.end.is_none() {
            self.end = Some(result);
        }
    }

    /// Frames not yet written were for a connection that is gone.
    fn purge_transmits(&mut self) {
        self.steps
            .retain(|step| !matches!(step, Step::Transmit(..)));
    }

    fn transmit(&mut self, frame: String) {
        self.steps
            .push_back(Step::Transmit(Frame::Text(frame), false));
    }

    fn event(&mut self, event: Event) {
        self.steps.push_back(Step::Event(event));
    }

    fn problem(&mut self, code: &str, message: String) {
        self.event(Event::Problem {
            code: code.into(),
            message,
            seq: None,
        });
    }

    fn save(&mut self, durability: Durability) {
        let mut record = self.session.record();
        if let Some(files) = &self.files {
            (record.files_out, record.files_in) = files.records();
        }
        self.steps
            .push_back(Step::Save(Box::new(Save { record, durability })));
    }

    /// Tells the transfers where the link and the peer stand.
    fn files_link(&mut self, now: Instant) {
        let attached = matches!(self.phase, Phase::Online { .. });
        let peer_online = self.peer_online;
        if let Some(files) = &mut self.files {
            files.handle_link(now, attached, peer_online);
        }
    }

    /// When nothing else is queued, the transfers' next steps: chat, receipts and saves go
    /// first, file data after (protocol.md 3.10: chat goes ahead of chunks).
    fn pull_files(&mut self) {
        // (Also after the end is decided: what the transfers still have to say, their last
        // events, is told before the run ends.)
        if !self.steps.is_empty() || !self.begun {
            return;
        }
        let now = self.last_now;
        let online = matches!(self.phase, Phase::Online { .. });
        let mut pulled = false;
        while self.steps.is_empty() {
            let Some(step) = self.files.as_mut().and_then(|f| f.poll_step(now)) else {
                break;
            };
            pulled = true;
            match step {
                FileStep::Save => self.files_save_pending = true,
                FileStep::Message(plain) => {
                    self.files_save_pending = false;
                    match self.session.seal(&plain) {
                        // Saved (with the transfer's record) before it is sent.
                        Ok(_) => {
                            self.save(Durability::Durable);
                            self.pump();
                        }
                        Err(e) => self.problem("file_message_not_sent", e.to_string()),
                    }
                }
                FileStep::Transmit(frame) => {
                    self.flush_files_save();
                    // Chunks and acknowledgements are never queued for a link that is not
                    // there: the next pass, or the next link reset, sends what is needed.
                    if online {
                        self.steps
                            .push_back(Step::Transmit(Frame::Data(frame), false));
                    }
                }
                FileStep::Sync(job) => {
                    self.flush_files_save();
                    self.steps.push_back(Step::Sync(job));
                }
                FileStep::Event(event) => {
                    self.flush_files_save();
                    self.event(Event::File(event));
                }
            }
        }
        if self.steps.is_empty() {
            self.flush_files_save();
        }
        if pulled {
            self.settle();
        }
    }

    fn flush_files_save(&mut self) {
        if std::mem::take(&mut self.files_save_pending) {
            self.save(Durability::Durable);
        }
    }

    /// The wall clock at `now`, counted on from the one given at the start.
    fn unix(&self, now: Instant) -> u64 {
        self.config
            .unix_now
            .saturating_add(now.saturating_duration_since(self.made).as_secs())
    }
}

/// `now + wait`, or `now` for a wait too long for the clock.
fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait).unwrap_or(now)
}

/// The sequence number of our chat message that a `DELIVERED` or an `ERROR` names, if it
/// names one (a handshake notice's `msgID` is a string).
fn msg_seq(env: &Envelope<'_>) -> Option<u64> {
    let msg_id = match env.kind {
        FrameType::Delivered => env.data::<DeliveredData>().ok().map(|d| d.msg_id),
        _ => env.data::<ErrorData>().ok().and_then(|d| d.msg_id),
    }?;
    serde_json::from_str(msg_id.get()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::exit;
    use crate::session::tests::pair;

    const SID: &str = "00112233445566778899aabbccddeeff";

    /// One output, in the order the conversation gave it.
    #[derive(Debug)]
    enum Out {
        Frame(String),
        Event(Event),
        Save(Durability),
        Link(LinkAction),
    }

    /// A frame as text: itself, or for a DATA frame `DATA <kind> <hex of the frame>`, kind
    /// `file_chunk` or `file_ack` (what the tests look for).
    pub(super) fn describe(frame: Frame) -> String {
        match frame {
            Frame::Text(text) => text,
            Frame::Data(bytes) => {
                let (_, body) = parley_protocol::data::parse(&bytes).unwrap();
                let kind = match data_in(body) {
                    Some(FileData::Chunk(_)) => "file_chunk",
                    Some(FileData::Ack(_)) => "file_ack",
                    None => "unknown",
                };
                format!("DATA {kind} {}", hex::encode(bytes))
            }
        }
    }

    /// Hands `c` a frame as [`describe`] wrote it.
    pub(super) fn deliver(c: &mut Conversation, now: Instant, frame: &str) {
        match frame.strip_prefix("DATA ") {
            Some(data) => {
                let hex = data.rsplit(' ').next().unwrap();
                c.handle_data(now, &hex::decode(hex).unwrap());
            }
            None => c.handle_frame(now, frame),
        }
    }

    /// Runs a sync at once, as the driver would on another thread.
    pub(super) fn sync_now(c: &mut Conversation) -> bool {
        let Some(job) = c.poll_sync() else {
            return false;
        };
        let now = c.last_now;
        c.handle_synced(now, job.run());
        true
    }

    /// Everything the conversation wants done now, in order (as the driver drains it).
    fn drain(c: &mut Conversation) -> Vec<Out> {
        let mut out = Vec::new();
        loop {
            if let Some(frame) = c.poll_transmit() {
                out.push(Out::Frame(describe(frame)));
            } else if sync_now(c) {
            } else if let Some(event) = c.poll_event() {
                out.push(Out::Event(event));
            } else if let Some(save) = c.poll_save() {
                out.push(Out::Save(save.durability));
            } else if let Some(action) = c.poll_link() {
                out.push(Out::Link(action));
            } else {
                return out;
            }
        }
    }

    fn frames(out: &[Out]) -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Out::Frame(f) => Some(f.clone()),
                _ => None,
            })
            .collect()
    }

    fn events(out: &[Out]) -> Vec<Event> {
        out.iter()
            .filter_map(|o| match o {
                Out::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    fn kind(frame: &str) -> FrameType {
        Envelope::parse(frame).unwrap().kind
    }

    /// The sequence numbers of the `MSG` frames among `out`.
    fn msg_seqs(out: &[Out]) -> Vec<u64> {
        frames(out)
            .iter()
            .filter(|f| kind(f) == FrameType::Msg)
            .map(|f| {
                Envelope::parse(f)
                    .unwrap()
                    .data::<crate::wire::ChatMsgData>()
                    .unwrap()
                    .msg_id
            })
            .collect()
    }

    fn receipts(out: &[Out]) -> Vec<String> {
        frames(out)
            .into_iter()
            .filter(|f| kind(f) == FrameType::MsgRead)
            .collect()
    }

    pub(super) fn config() -> Config {
        Config {
            interactive: false,
            exit_after: None,
            exit_after_files: None,
            deadline: None,
            idle: Duration::from_secs(35),
            others_outbox_bytes: 0,
            unix_now: 1_000_000,
        }
    }

    /// Two sessions as pairing leaves them: the host's Hello (seq 1) sealed and received,
    /// not yet acknowledged.
    fn sessions() -> (Session, Session) {
        let (mut host, mut guest) = pair();
        let (_, hello) = host
            .seal(&Plain::Hello {
                name: "alice".into(),
            })
            .unwrap();
        guest.receive(&Envelope::parse(&hello).unwrap()).unwrap();
        (host, guest)
    }

    fn with(change: impl FnOnce(&mut Config)) -> Config {
        let mut config = config();
        change(&mut config);
        config
    }

    fn paired(session: Session, now: Instant, config: Config) -> (Conversation, Vec<Out>) {
        let mut c = Conversation::paired(session, Liveness::new(now, config.idle), now, config);
        let out = drain(&mut c);
        (c, out)
    }

    fn relay(t: &str) -> String {
        format!(r#"{{"t":"{t}","sid":"{SID}"}}"#)
    }

    fn error(code: &str, msg_id: Option<u64>) -> String {
        let id = msg_id.map_or(String::new(), |n| format!(r#","msgID":{n}"#));
        format!(r#"{{"t":"ERROR","sid":"{SID}","data":{{"code":"{code}","message":"m"{id}}}}}"#)
    }

    fn frame_in(c: &mut Conversation, now: Instant, text: &str) -> Vec<Out> {
        c.handle_frame(now, text);
        drain(c)
    }

    fn lines(c: &mut Conversation, now: Instant, texts: &[&str]) -> Vec<Out> {
        for text in texts {
            assert!(c.wants_input());
            c.handle_line(now, (*text).into());
        }
        drain(c)
    }

    /// Reconnects after a cut (or the conversation's own decision): waits for the backoff,
    /// dials, reattaches; returns what attaching sent after `PEER_ONLINE`.
    fn reconnect(c: &mut Conversation, now: &mut Instant) -> Vec<Out> {
        let at = c.poll_timeout().unwrap();
        *now = at;
        c.handle_timeout(at);
        assert!(matches!(drain(c)[..], [Out::Link(LinkAction::Dial)]));
        c.handle_connected(*now);
        let out = drain(c);
        assert_eq!(frames(&out).len(), 1);
        assert_eq!(kind(&frames(&out)[0]), FrameType::Reattach);
        frame_in(c, *now, &relay("PEER_ONLINE"))
    }

    fn ended(c: &mut Conversation) -> Result<(), ClientError> {
        drain(c);
        c.poll_end().expect("the conversation should have ended")
    }

    fn exit_code(e: &ClientError) -> String {
        format!("{:?}", e.exit_code())
    }

    fn code(n: u8) -> String {
        format!("{:?}", std::process::ExitCode::from(n))
    }

    /// A sealed message is saved before it is sent; a received one is saved (visibly) before
    /// it is shown, then saved as shown, and only then acknowledged. This order is what makes
    /// delivery exactly-once across a crash at any point.
    #[test]
    fn saves_come_before_the_frames_and_the_lines_they_protect() {
        let t0 = Instant::now();
        let (host, guest) = sessions();
        let (mut host, out) = paired(host, t0, config());
        assert!(matches!(
            &out[..],
            [
                Out::Save(Durability::Durable),
                Out::Event(Event::Paired),
                Out::Frame(_)
            ]
        ));
        let (mut guest, out) = paired(guest, t0, config());
        assert!(matches!(
            &out[..],
            [Out::Save(Durability::Durable), Out::Event(Event::Paired)]
        ));
        // The initial resend check is due at once: the Hello goes again (byte-identical).
        let hello = frames(&out_of(&mut host, t0))[0].clone();

        let out = lines(&mut host, t0, &["one", "two"]);
        assert!(matches!(
            &out[..],
            [Out::Save(Durability::Durable), Out::Frame(_), Out::Frame(_)]
        ));
        assert_eq!(msg_seqs(&out), [2, 3]);

        let sent = frames(&out);
        let got = frame_in(&mut guest, t0, &hello);
        assert!(matches!(&got[..], [Out::Frame(f)] if kind(f) == FrameType::MsgRead));
        let got = frame_in(&mut guest, t0, &sent[0]);
        assert!(
            matches!(&got[..], [
                Out::Save(Durability::Visible),
                Out::Event(Event::Message { seq: 2, text }),
                Out::Save(Durability::Durable),
                Out::Frame(receipt),
            ] if text == "one" && kind(receipt) == FrameType::MsgRead),
            "{got:?}"
        );
        // The receipt is saved before the window moves on; then it is told.
        let got = frame_in(&mut host, t0, &frames(&got)[0]);
        assert!(
            matches!(
                &got[..],
                [
                    Out::Save(Durability::Durable),
                    Out::Event(Event::Delivered { seq: 2 }),
                ]
            ),
            "{got:?}"
        );
    }

    /// Drives the timer once (at the instant asked for) and returns the outputs.
    fn out_of(c: &mut Conversation, now: Instant) -> Vec<Out> {
        c.handle_timeout(now);
        drain(c)
    }

    /// A message ahead of a gap is decrypted (its key is gone): saved before anything else,
    /// not shown, acknowledged only up to the gap.
    #[test]
    fn a_message_ahead_of_a_gap_is_saved_and_held() {
        let t0 = Instant::now();
        let (host, guest) = sessions();
        let (mut host, _) = paired(host, t0, config());
        let (mut guest, _) = paired(guest, t0, config());
        let sent = frames(&lines(&mut host, t0, &["one", "two"]));
        let got = frame_in(&mut guest, t0, &sent[1]);
        assert!(
            matches!(&got[..], [Out::Save(Durability::Durable), Out::Frame(r)] if kind(r) == FrameType::MsgRead),
            "{got:?}"
        );
        let got = frame_in(&mut guest, t0, &sent[0]);
        let shown: Vec<_> = events(&got)
            .into_iter()
            .map(|e| match e {
                Event::Message { seq, .. } => seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(shown, [2, 3]);
    }

    /// After a cut the whole unacknowledged window goes again, byte-identical, in order; the
    /// peer shows each message once and acknowledges the duplicates again.
    #[test]
    fn a_cut_resends_the_window_and_the_peer_drops_the_duplicates() {
        let mut now = Instant::now();
        let (host, guest) = sessions();
        let (mut host, first) = paired(host, now, config());
        let (mut guest, _) = paired(guest, now, config());
        let hello = frames(&first);
        let sent = frames(&lines(&mut host, now, &["one", "two"]));
        // Only "one" gets through before the cut.
        frame_in(&mut guest, now, &hello[0]);
        frame_in(&mut guest, now, &sent[0]);

        host.handle_disconnected(now, ClientError::ConnectionLost("cut".into()));
        let out = drain(&mut host);
        assert!(
            matches!(&out[..], [Out::Link(LinkAction::Drop), Out::Event(Event::RelayOffline { why })] if why.contains("cut")),
            "{out:?}"
        );
        // The first retry comes after 100 ms ± 20 %.
        let wait = host.poll_timeout().unwrap() - now;
        assert!((80..=120).contains(&wait.as_millis()), "{wait:?}");
        // Lines typed while offline are sealed and saved, not sent.
        let out = lines(&mut host, now, &["three"]);
        assert!(
            matches!(&out[..], [Out::Save(Durability::Durable)]),
            "{out:?}"
        );

        let out = reconnect(&mut host, &mut now);
        assert_eq!(events(&out), [Event::RelayOnline { peer_online: true }]);
        assert_eq!(msg_seqs(&out), [1, 2, 3, 4]);
        let resent = frames(&out);
        assert_eq!(
            resent[..3],
            [hello[0].clone(), sent[0].clone(), sent[1].clone()]
        );

        let mut shown = Vec::new();
        let mut last_receipt = None;
        for frame in &resent {
            let got = frame_in(&mut guest, now, frame);
            for event in events(&got) {
                if let Event::Message { seq, .. } = event {
                    shown.push(seq);
                }
            }
            // Every MSG, a duplicate too, is acknowledged.
            let r = receipts(&got);
            assert_eq!(r.len(), 1, "{got:?}");
            last_receipt = r.into_iter().next();
        }
        assert_eq!(shown, [3, 4], "each message is shown once");

        let got = frame_in(&mut host, now, &last_receipt.unwrap());
        assert_eq!(
            events(&got),
            [
                Event::Delivered { seq: 2 },
                Event::Delivered { seq: 3 },
                Event::Delivered { seq: 4 }
            ]
        );
        assert!(!host.session().has_unacked());
    }

    /// At most 64 messages are in flight: the rest wait in the outbox, and receipts let them
    /// out, in order.
    #[test]
    fn the_send_window_holds_64_and_receipts_open_it() {
        let t0 = Instant::now();
        let (host, guest) = sessions();
        let (mut host, _) = paired(host, t0, config());
        let (mut guest, _) = paired(guest, t0, config());
        let texts: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let out = lines(&mut host, t0, &texts);
        // One save for the batch, then what the window allows beyond the Hello (sent when
        // the chat began): 63 lines.
        assert!(matches!(out[0], Out::Save(Durability::Durable)));
        assert_eq!(out.iter().filter(|o| matches!(o, Out::Save(_))).count(), 1);
        let window = msg_seqs(&out);
        assert_eq!(window, (2..=64).collect::<Vec<_>>());

        // The peer records the first ten; its receipt for them moves the window by ten.
        let mut receipt = None;
        for frame in frames(&out).iter().take(10) {
            receipt = receipts(&frame_in(&mut guest, t0, frame)).pop();
        }
        let out = frame_in(&mut host, t0, &receipt.unwrap());
        assert!(matches!(out[0], Out::Save(Durability::Durable)));
        assert_eq!(msg_seqs(&out), (65..=75).collect::<Vec<_>>());
        assert_eq!(events(&out).len(), 10);
        assert_eq!(host.session().outbox_len(), 101 - 11);
    }

    /// A full outbox stops the input (`outbox_full`) until receipts make room
    /// (`outbox_ready`); the budget shared with sibling sessions says so.
    #[test]
    fn a_full_outbox_pauses_input_until_receipts_make_room() {
        let t0 = Instant::now();
        let (host, guest) = sessions();
        // Siblings hold nearly the whole file's budget: this one keeps two frames' worth.
        let squeezed = with(|c| {
            c.others_outbox_bytes = crate::session::MAX_STATE_OUTBOX_BYTES
                - 2 * parley_protocol::limits::MAX_FRAME_BYTES;
        });
        let (mut host, _) = paired(host, t0, squeezed);
        let (mut guest, _) = paired(guest, t0, config());
        let long = "x".repeat(20_000);
        let mut sent = Vec::new();
        let mut full = None;
        while host.wants_input() {
            host.handle_line(t0, long.clone());
            let out = drain(&mut host);
            sent.extend(frames(&out));
            full = events(&out)
                .into_iter()
                .find(|e| matches!(e, Event::OutboxFull { .. }));
        }
        let Some(Event::OutboxFull {
            pending,
            budget_shared: true,
            ..
        }) = full
        else {
            panic!("no outbox_full: {full:?}");
        };
        assert_eq!(pending, host.session().outbox_len());
        assert!(!host.wants_input());
        // Told once, however often it is looked at.
        assert!(
            events(&out_of(&mut host, t0))
                .iter()
                .all(|e| !matches!(e, Event::OutboxFull { .. }))
        );

        let mut receipt = None;
        for frame in &sent {
            receipt = receipts(&frame_in(&mut guest, t0, frame)).pop();
        }
        let out = frame_in(&mut host, t0, &receipt.unwrap());
        assert!(
            events(&out).contains(&Event::OutboxReady { pending: 0 }),
            "{out:?}"
        );
        assert!(host.wants_input());
    }

    /// Liveness with time as the only input: silence gets a PING at half the bound, the
    /// connection is given up at the bound, and reconnecting backs off from 100 ms to 5 s;
    /// an attach resets the backoff.
    #[test]
    fn silence_pings_then_reconnects_with_backoff() {
        let t0 = Instant::now();
        // No Hello in flight: no resend timer, only liveness.
        let (host, _) = pair();
        let (mut c, _) = paired(host, t0, config());
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_millis(17_500)));
        // A relay PING is answered, and counts as a sign of life.
        let t1 = t0 + Duration::from_secs(10);
        let out = frame_in(&mut c, t1, r#"{"t":"PING"}"#);
        assert_eq!(frames(&out), [r#"{"t":"PONG"}"#]);
        let half = t1 + Duration::from_millis(17_500);
        assert_eq!(c.poll_timeout(), Some(half));
        assert!(out_of(&mut c, half - Duration::from_millis(1)).is_empty());
        assert_eq!(frames(&out_of(&mut c, half)), [r#"{"t":"PING"}"#]);
        let dead = t1 + Duration::from_secs(35);
        assert_eq!(c.poll_timeout(), Some(dead));
        let out = out_of(&mut c, dead);
        assert!(
            matches!(&out[..], [Out::Link(LinkAction::Drop), Out::Event(Event::RelayOffline { why })]
                if why.contains("no sign of life")),
            "{out:?}"
        );
        // Each failed attempt waits about twice as long, up to 5 s.
        let mut now = dead;
        for expected in [100u128, 200, 400, 800, 1600, 3200, 5000, 5000] {
            let at = c.poll_timeout().unwrap();
            let wait = (at - now).as_millis();
            assert!(
                (expected * 8 / 10..=expected * 12 / 10).contains(&wait),
                "{wait} ms, expected about {expected}"
            );
            now = at;
            assert!(matches!(
                out_of(&mut c, now)[..],
                [Out::Link(LinkAction::Dial)]
            ));
            c.handle_disconnected(
                now,
                ClientError::RelayUnreachable {
                    url: "ws://x".into(),
                    reason: "refused".into(),
                },
            );
            // A failed dial is not another "relay_offline".
            assert!(events(&drain(&mut c)).is_empty());
        }
        reconnect(&mut c, &mut now);
        c.handle_disconnected(now, ClientError::ConnectionLost("cut".into()));
        drain(&mut c);
        let wait = (c.poll_timeout().unwrap() - now).as_millis();
        assert!(
            (80..=120).contains(&wait),
            "the backoff starts again: {wait}"
        );
    }

    /// A relay that sends an oversize frame is waited for the longest step before the next
    /// attempt: it is likely to do it again.
    #[test]
    fn a_relay_that_broke_the_protocol_waits_the_longest_step() {
        let t0 = Instant::now();
        let (host, _) = pair();
        let (mut c, _) = paired(host, t0, config());
        c.handle_disconnected(t0, ClientError::RelayProtocol("too big".into()));
        drain(&mut c);
        assert_eq!(c.poll_timeout(), Some(t0 + Backoff::MAX));
    }

    /// The relay answers `session_unknown` (it restarted and forgot us) or `token_invalid`
    /// (the peer restored the session first; our seat awaits us): `RESTORE` with the proof,
    /// once. A refused `RESTORE` ends the run with exit 7.
    #[test]
    fn a_forgotten_session_is_restored_once() {
        for refusal in ["session_unknown", "token_invalid"] {
            let mut now = Instant::now();
            let (host, _) = sessions();
            let (mut c, _) = paired(host, now, config());
            let out = frame_in(&mut c, now, &error("not_member", None));
            assert!(matches!(
                &out[..],
                [
                    Out::Link(LinkAction::Drop),
                    Out::Event(Event::RelayOffline { .. })
                ]
            ));
            // (not_member: attach again at once, no backoff.)
            assert_eq!(c.poll_timeout(), Some(now));
            assert!(matches!(
                out_of(&mut c, now)[..],
                [Out::Link(LinkAction::Dial)]
            ));
            c.handle_connected(now);
            let reattach = frames(&drain(&mut c));
            assert_eq!(
                reattach,
                [format!(
                    r#"{{"t":"REATTACH","sid":"{SID}","data":{{"resumeToken":"t"}}}}"#
                )]
            );
            let out = frame_in(&mut c, now, &error(refusal, None));
            assert_eq!(
                frames(&out),
                [format!(
                    r#"{{"t":"RESTORE","sid":"{SID}","data":{{"role":"host","resumeToken":"t","proof":"p"}}}}"#
                )]
            );
            let out = frame_in(&mut c, now, &relay("PEER_OFFLINE"));
            assert_eq!(events(&out), [Event::RelayOnline { peer_online: false }]);
            assert_eq!(msg_seqs(&out), [1], "the window follows every attach");

            // Next time the relay refuses both: over at this relay.
            c.handle_disconnected(now, ClientError::ConnectionLost("cut".into()));
            drain(&mut c);
            now = c.poll_timeout().unwrap();
            out_of(&mut c, now);
            c.handle_connected(now);
            drain(&mut c);
            frame_in(&mut c, now, &error(refusal, None));
            let out = frame_in(&mut c, now, &error("restore_refused", None));
            assert!(frames(&out).is_empty());
            let Err(e) = ended(&mut c) else { panic!() };
            assert!(
                matches!(&e, ClientError::ResumeRefused { code, .. } if code == "restore_refused")
            );
            assert_eq!(exit_code(&e), code(exit::RESUME_REFUSED));
        }
    }

    /// `resume`: the stored session reattaches, then the chat begins (`resumed`, saved
    /// first), and the outbox goes out. A refusal at that point ends the run (exit 7)
    /// without a `RESTORE`, as does a relay that cannot be reached (exit 3).
    #[test]
    fn resume_attaches_first_and_fails_on_any_refusal() {
        let now = Instant::now();
        let (host, _) = sessions();
        let mut c = Conversation::resume(host, now, config());
        assert!(!c.wants_input());
        assert!(matches!(drain(&mut c)[..], [Out::Link(LinkAction::Dial)]));
        c.handle_connected(now);
        assert_eq!(kind(&frames(&drain(&mut c))[0]), FrameType::Reattach);
        c.handle_frame(now, &relay("PEER_ONLINE"));
        assert!(matches!(
            c.poll_save(),
            Some(Save {
                durability: Durability::Durable,
                ..
            })
        ));
        assert_eq!(c.poll_event(), Some(Event::Resumed { peer_online: true }));
        assert!(c.wants_input());
        // A failed write of the window the chat began with ends the run (exit 3), as a
        // failure while attaching does; a later one is a cut like any other.
        assert_eq!(
            c.poll_transmit().map(|f| kind(&describe(f))),
            Some(FrameType::Msg)
        );
        c.handle_disconnected(now, ClientError::ConnectionLost("gone".into()));
        let e = ended(&mut c).unwrap_err();
        assert_eq!(exit_code(&e), code(exit::RELAY_UNREACHABLE));

        for refusal in ["token_invalid", "session_unknown"] {
            let mut c = resuming(now);
            let out = frame_in(&mut c, now, &error(refusal, None));
            assert!(frames(&out).is_empty(), "no RESTORE on resume: {out:?}");
            let e = ended(&mut c).unwrap_err();
            assert_eq!(exit_code(&e), code(exit::RESUME_REFUSED));
        }

        let (host, _) = sessions();
        let mut c = Conversation::resume(host, now, config());
        drain(&mut c);
        c.handle_disconnected(
            now,
            ClientError::RelayUnreachable {
                url: "ws://x".into(),
                reason: "refused".into(),
            },
        );
        let e = ended(&mut c).unwrap_err();
        assert_eq!(exit_code(&e), code(exit::RELAY_UNREACHABLE));

        // A relay that does not answer the REATTACH in 30 s: exit 3 too.
        let mut c = resuming(now);
        assert_eq!(c.poll_timeout(), Some(now + Duration::from_millis(17_500)));
        out_of(&mut c, now + Duration::from_millis(17_500));
        frame_in(&mut c, now + Duration::from_secs(20), &relay("PONG"));
        let late = c.poll_timeout().unwrap();
        assert_eq!(late, now + ATTACH_TIMEOUT);
        out_of(&mut c, late);
        let e = ended(&mut c).unwrap_err();
        assert!(e.to_string().contains("did not answer in time"), "{e}");
        assert_eq!(exit_code(&e), code(exit::RELAY_UNREACHABLE));
    }

    /// A cluster node that cannot reach its store (protocol.md 2.7) refused nothing for good:
    /// a message it answered `store_unavailable` goes again, and an attach it answered so is
    /// tried again after a backoff (during a chat) or fails like an unreachable relay (exit 3,
    /// on `resume`), never as a refusal of the session (exit 7).
    #[test]
    fn a_store_unavailable_is_a_passing_trouble() {
        let now = Instant::now();
        let (host, _) = sessions();
        let (mut c, first) = paired(host, now, config());
        assert_eq!(msg_seqs(&first), [1]);
        // The peer is away (so the stalled-window timer is off): only the store retry can
        // send the message again.
        frame_in(&mut c, now, &relay("PEER_OFFLINE"));
        let out = frame_in(&mut c, now, &error("store_unavailable", Some(1)));
        assert!(
            events(&out)
                .iter()
                .all(|e| !matches!(e, Event::Problem { code, .. } if code == "refused_message")),
            "{out:?}"
        );
        let at = c.poll_timeout().unwrap();
        assert_eq!(at, now + Duration::from_secs(1), "one second first");
        assert!(out_of(&mut c, at - Duration::from_millis(1)).is_empty());
        assert_eq!(msg_seqs(&out_of(&mut c, at)), [1]);
        // Refused again: the wait doubles.
        frame_in(&mut c, at, &error("store_unavailable", Some(1)));
        let again = c.poll_timeout().unwrap();
        assert_eq!(again, at + Duration::from_secs(2));
        assert_eq!(msg_seqs(&out_of(&mut c, again)), [1]);
        let at = again;

        // While re-attaching: another try, later.
        c.handle_disconnected(at, ClientError::ConnectionLost("cut".into()));
        drain(&mut c);
        let again = c.poll_timeout().unwrap();
        out_of(&mut c, again);
        c.handle_connected(again);
        drain(&mut c);
        let out = frame_in(&mut c, again, &error("store_unavailable", None));
        assert!(frames(&out).is_empty(), "no RESTORE: {out:?}");
        assert!(c.poll_end().is_none());
        let retry = c.poll_timeout().unwrap();
        assert!(retry > again, "backs off before trying again");
        assert!(matches!(
            out_of(&mut c, retry)[..],
            [Out::Link(LinkAction::Dial)]
        ));

        // On resume: exit 3, like a relay that cannot be reached.
        let mut c = resuming(now);
        frame_in(&mut c, now, &error("store_unavailable", None));
        let e = ended(&mut c).unwrap_err();
        assert_eq!(exit_code(&e), code(exit::RELAY_UNREACHABLE));
    }

    /// `resume` of the host's session, connected, its `REATTACH` sent.
    fn resuming(now: Instant) -> Conversation {
        let (host, _) = sessions();
        let mut c = Conversation::resume(host, now, config());
        drain(&mut c);
        c.handle_connected(now);
        drain(&mut c);
        c
    }

    /// A certificate the client refuses while reconnecting is reported, not retried.
    #[test]
    fn a_refused_certificate_while_reconnecting_ends_the_run() {
        let now = Instant::now();
        let (host, _) = pair();
        let (mut c, _) = paired(host, now, config());
        c.handle_disconnected(now, ClientError::ConnectionLost("cut".into()));
        drain(&mut c);
        let at = c.poll_timeout().unwrap();
        out_of(&mut c, at);
        c.handle_disconnected(
            at,
            ClientError::RelayCertificate {
                url: "wss://x".into(),
                reason: "unknown issuer".into(),
            },
        );
        let e = ended(&mut c).unwrap_err();
        assert_eq!(e.code(), "relay_certificate");
        assert_eq!(exit_code(&e), code(exit::RELAY_UNREACHABLE));
    }

    /// The relay's `ERROR`s during a chat (protocol.md 3.7): a message the relay did not
    /// keep goes again later; another refusal is reported; `replaced` ends the run (exit 7).
    #[test]
    fn relay_errors_during_a_chat() {
        let now = Instant::now();
        let (host, _) = sessions();
        // A person: quitting waits only for the relay to hold our messages.
        let (mut c, _) = paired(host, now, with(|c| c.interactive = true));
        lines(&mut c, now, &["one"]);
        c.handle_input_closed(now);
        assert!(matches!(&events(&drain(&mut c))[..], []));
        let out = frame_in(
            &mut c,
            now,
            &format!(r#"{{"t":"DELIVERED","sid":"{SID}","data":{{"msgID":2}}}}"#),
        );
        assert_eq!(events(&out), [Event::Sent { seq: 2 }]);
        frame_in(
            &mut c,
            now,
            &format!(r#"{{"t":"DELIVERED","sid":"{SID}","data":{{"msgID":1}}}}"#),
        );
        // Everything is at the relay: a person may go.
        assert!(ended(&mut c).is_ok());

        let (host, _) = sessions();
        let (mut c, _) = paired(host, now, with(|c| c.interactive = true));
        lines(&mut c, now, &["one"]);
        frame_in(
            &mut c,
            now,
            &format!(r#"{{"t":"DELIVERED","sid":"{SID}","data":{{"msgID":2}}}}"#),
        );
        let out = frame_in(&mut c, now, &error("mailbox_full", Some(2)));
        assert!(
            matches!(&events(&out)[..], [Event::Problem { code, seq: Some(2), .. }] if code == "mailbox_full"),
            "{out:?}"
        );
        // Not at the relay after all: not "everything out" any more.
        frame_in(
            &mut c,
            now,
            &format!(r#"{{"t":"DELIVERED","sid":"{SID}","data":{{"msgID":1}}}}"#),
        );
        c.handle_input_closed(now);
        drain(&mut c);
        assert!(c.poll_end().is_none());
        // peer_offline / not_paired are silent; another code is reported.
        assert!(events(&frame_in(&mut c, now, &error("peer_offline", Some(2)))).is_empty());
        let out = frame_in(&mut c, now, &error("rate_limited", Some(2)));
        assert!(
            matches!(&events(&out)[..], [Event::Problem { code, .. }] if code == "refused_message")
        );
        let out = frame_in(&mut c, now, &error("odd", None));
        assert!(
            matches!(&events(&out)[..], [Event::Problem { code, seq: None, .. }] if code == "odd")
        );
        assert!(c.poll_end().is_none());
        frame_in(&mut c, now, &error("replaced", None));
        let e = ended(&mut c).unwrap_err();
        assert!(matches!(e, ClientError::SessionTakenOver));
        assert_eq!(exit_code(&e), code(exit::RESUME_REFUSED));
    }

    /// A script's run ends when input is closed, `--exit-after` messages were shown and the
    /// peer acknowledged ours; `--timeout` ends it with exit 6 whatever it waits for.
    #[test]
    fn exit_after_and_timeout() {
        let now = Instant::now();
        let (host, guest) = sessions();
        let (mut host, first) = paired(host, now, config());
        let (mut guest, _) = paired(guest, now, with(|c| c.exit_after = Some(1)));
        guest.handle_input_closed(now);
        drain(&mut guest);
        assert!(guest.poll_end().is_none(), "one message to wait for");
        frame_in(&mut guest, now, &frames(&first)[0]);
        assert!(
            guest.poll_end().is_none(),
            "the Hello is not a chat message"
        );
        let sent = frames(&lines(&mut host, now, &["hi"]));
        let got = frame_in(&mut guest, now, &sent[0]);
        assert!(matches!(&events(&got)[..], [Event::Message { seq: 2, .. }]));
        assert!(ended(&mut guest).is_ok());

        // The host waits for its receipt; input closed with the peer gone: "waiting".
        host.handle_input_closed(now);
        assert!(drain(&mut host).is_empty());
        let out = frame_in(&mut host, now, &relay("PEER_OFFLINE"));
        assert_eq!(
            events(&out),
            [Event::PeerOffline, Event::Waiting { undelivered: 2 }]
        );
        assert!(host.poll_end().is_none());

        let deadline = now + Duration::from_secs(5);
        let (session, _) = sessions();
        let (mut c, _) = paired(session, now, with(|c| c.deadline = Some((deadline, 5))));
        c.handle_frame(now, &relay("PEER_OFFLINE"));
        drain(&mut c);
        assert_eq!(c.poll_timeout(), Some(deadline));
        assert!(out_of(&mut c, deadline - Duration::from_millis(1)).is_empty());
        out_of(&mut c, deadline);
        let e = ended(&mut c).unwrap_err();
        assert!(matches!(e, ClientError::Timeout(5)));
        assert_eq!(exit_code(&e), code(exit::TIMEOUT));
    }

    /// While the peer is online and no receipt moves, the window goes again every 2 s; not
    /// while the peer is away, and at once when it is back.
    #[test]
    fn a_stalled_window_is_resent_every_two_seconds() {
        let t0 = Instant::now();
        let (host, _) = sessions();
        let (mut c, first) = paired(host, t0, config());
        assert_eq!(msg_seqs(&first), [1]);
        // (The first check is at once, like a fresh interval's first tick.)
        assert_eq!(c.poll_timeout(), Some(t0));
        assert_eq!(msg_seqs(&out_of(&mut c, t0)), [1]);
        let t1 = t0 + RETRANSMIT_EVERY;
        assert_eq!(c.poll_timeout(), Some(t1));
        assert_eq!(msg_seqs(&out_of(&mut c, t1)), [1]);
        // The peer is away: no resends (it gets the window when it is back).
        frame_in(&mut c, t1, &relay("PEER_OFFLINE"));
        assert_eq!(c.poll_timeout(), Some(t1 + Duration::from_millis(17_500)));
        let out = frame_in(&mut c, t1, &relay("PEER_ONLINE"));
        assert_eq!(events(&out), [Event::PeerOnline]);
        assert_eq!(msg_seqs(&out), [1]);
    }

    /// The human rendering of a message names the peer from its Hello, and every event the
    /// conversation gives renders to the JSON scripts read.
    #[test]
    fn events_render_as_before() {
        let (host, _) = sessions();
        let s = &host;
        let json = |e: Event| crate::output::chat_event(&e, s);
        assert_eq!(
            json(Event::Delivered { seq: 3 }),
            serde_json::json!({"event": "delivered", "sid": SID, "seq": 3})
        );
        assert_eq!(
            json(Event::RelayOffline { why: "x".into() }),
            serde_json::json!({"event": "relay_offline", "message": "x"})
        );
        assert_eq!(
            json(Event::Problem {
                code: "mailbox_full".into(),
                message: "m".into(),
                seq: Some(4)
            }),
            serde_json::json!({"event": "error", "code": "mailbox_full", "seq": 4, "message": "m"})
        );
        assert_eq!(
            json(Event::Problem {
                code: "odd".into(),
                message: "m".into(),
                seq: None
            }),
            serde_json::json!({"event": "error", "code": "odd", "message": "m"})
        );
        assert_eq!(
            json(Event::Waiting { undelivered: 2 })["message"],
            "waiting for your peer to receive 2 message(s); Ctrl-C stops (they are kept and sent on the next resume)"
        );
    }
}

/// File transfers wired into the conversation: two conversations, a relay that forwards what
/// one writes to the other, files in memory.
#[cfg(test)]
mod file_tests {
    use std::collections::HashMap;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    use sha2::{Digest, Sha256};

    use super::tests::{config, deliver, describe, sync_now};
    use super::*;
    use crate::files::receive::PartFile;
    use crate::session::tests::pair;
    use crate::transfers::{FileConfig, FileSystem, LocalFile};

    #[derive(Default)]
    struct MemFile(Vec<u8>);

    impl PartFile for MemFile {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            let at = offset as usize;
            if self.0.len() < at + data.len() {
                self.0.resize(at + data.len(), 0);
            }
            self.0[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let at = offset as usize;
            buf.copy_from_slice(
                self.0
                    .get(at..at + buf.len())
                    .ok_or(io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.0.truncate(len as usize);
            Ok(())
        }
        fn durable_mark(&mut self) -> Option<u64> {
            None
        }
    }

    /// Where each file was placed, with its bytes.
    type Placed = Vec<(PathBuf, Vec<u8>)>;

    /// Files in memory; what is placed is also logged where the test can see it.
    #[derive(Default)]
    struct MemFs {
        files: HashMap<PathBuf, MemFile>,
        placed: Arc<Mutex<Placed>>,
        /// Taken by someone else between the look and the move (a race with another
        /// program): a file appears there as the move is tried.
        taken_at_move: Option<PathBuf>,
    }

    impl FileSystem for MemFs {
        fn read_at(&mut self, path: &Path, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.files
                .get_mut(path)
                .ok_or(io::ErrorKind::NotFound)?
                .read_at(offset, buf)
        }
        fn part(&mut self, _: &Path, path: &Path) -> io::Result<&mut dyn PartFile> {
            Ok(self.files.entry(path.to_path_buf()).or_default())
        }
        fn remove_part(&mut self, path: &Path) -> io::Result<()> {
            self.files.remove(path);
            Ok(())
        }
        fn exists(&self, path: &Path) -> bool {
            self.files.contains_key(path)
        }
        fn sync_job(&mut self, _: &Path, _: u64) -> io::Result<crate::transfers::SyncFn> {
            Ok(Box::new(|| Ok(())))
        }
        fn place(&mut self, _: &Path, part: &Path, target: &Path) -> io::Result<()> {
            if self.taken_at_move.as_deref() == Some(target) {
                self.files.insert(target.to_path_buf(), MemFile::default());
            }
            if self.files.contains_key(target) {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            let file = self.files.remove(part).ok_or(io::ErrorKind::NotFound)?;
            self.placed
                .lock()
                .unwrap()
                .push((target.to_path_buf(), file.0.clone()));
            self.files.insert(target.to_path_buf(), file);
            Ok(())
        }
    }

    fn transfers(sid: &str, fs: MemFs, accept: bool, max_bytes: u64) -> Transfers {
        let config = FileConfig {
            accept,
            download_dir: PathBuf::from("/dl"),
            max_bytes,
        };
        Transfers::new(Box::new(fs), config, sid, &[], &[])
    }

    /// Every output of `c`: frames to forward, and events.
    fn drain(c: &mut Conversation) -> (Vec<String>, Vec<Event>) {
        let (mut frames, mut events) = (Vec::new(), Vec::new());
        loop {
            if let Some(frame) = c.poll_transmit() {
                frames.push(describe(frame));
            } else if let Some(event) = c.poll_event() {
                events.push(event);
            } else if sync_now(c) || c.poll_save().is_some() || c.poll_link().is_some() {
            } else {
                return (frames, events);
            }
        }
    }

    fn forwarded(frames: &[String]) -> Vec<String> {
        frames
            .iter()
            .filter(|f| {
                f.starts_with("DATA ")
                    || matches!(
                        Envelope::parse(f).unwrap().kind,
                        FrameType::Msg | FrameType::MsgRead
                    )
            })
            .cloned()
            .collect()
    }

    struct Run {
        host_events: Vec<Event>,
        guest_events: Vec<Event>,
        /// Every frame the guest wrote.
        guest_frames: Vec<String>,
        placed: Placed,
    }

    /// A host about to send `file` to a guest that accepts (or not) up to `max_bytes`, and
    /// where the guest's files are placed.
    fn setup(
        now: Instant,
        file: &[u8],
        accept: bool,
        max_bytes: u64,
    ) -> (Conversation, Conversation, Arc<Mutex<Placed>>) {
        setup_with(now, file, accept, max_bytes, MemFs::default())
    }

    fn setup_with(
        now: Instant,
        file: &[u8],
        accept: bool,
        max_bytes: u64,
        guest_fs: MemFs,
    ) -> (Conversation, Conversation, Arc<Mutex<Placed>>) {
        let (mut h, mut g) = pair();
        let (_, hello) = h
            .seal(&Plain::Hello {
                name: "alice".into(),
            })
            .unwrap();
        g.receive(&Envelope::parse(&hello).unwrap()).unwrap();
        let sid = h.sid().to_string();
        let mut host_fs = MemFs::default();
        host_fs
            .files
            .insert(PathBuf::from("/src/a.bin"), MemFile(file.to_vec()));
        let placed = guest_fs.placed.clone();
        let mut host = Conversation::paired(h, Liveness::new(now, config().idle), now, config());
        let mut guest = Conversation::paired(g, Liveness::new(now, config().idle), now, config());
        let mut host_files = transfers(&sid, host_fs, false, 0);
        host_files.send(vec![LocalFile {
            name: "dir/a.bin".into(),
            path: PathBuf::from("/src/a.bin"),
            size: file.len() as u64,
            sha256: Sha256::digest(file).into(),
        }]);
        host.set_files(host_files);
        guest.set_files(transfers(&sid, guest_fs, accept, max_bytes));
        // (Set after pairing: the link is told again, as attaching would.)
        host.files_link(now);
        guest.files_link(now);
        (host, guest, placed)
    }

    /// Host sends `file` to a guest that accepts (or not) up to `max_bytes`; `line` is typed
    /// on the host once the first chunk is out.
    fn run(file: &[u8], accept: bool, max_bytes: u64, line: Option<&str>) -> (Run, Vec<String>) {
        run_with(file, accept, max_bytes, line, MemFs::default())
    }

    fn run_with(
        file: &[u8],
        accept: bool,
        max_bytes: u64,
        line: Option<&str>,
        guest_fs: MemFs,
    ) -> (Run, Vec<String>) {
        let now = Instant::now();
        let (mut host, mut guest, placed) = setup_with(now, file, accept, max_bytes, guest_fs);
        let mut result = Run {
            host_events: Vec::new(),
            guest_events: Vec::new(),
            guest_frames: Vec::new(),
            placed: Vec::new(),
        };
        let mut host_order = Vec::new();
        let mut line = line;
        for _ in 0..10_000 {
            let (hf, he) = drain(&mut host);
            if let Some(text) = line.filter(|_| hf.iter().any(|f| f.contains("file_chunk"))) {
                host.handle_line(now, text.into());
                line = None;
            }
            host_order.extend(hf.iter().cloned());
            let (gf, ge) = drain(&mut guest);
            result.host_events.extend(he);
            result.guest_events.extend(ge);
            result.guest_frames.extend(gf.iter().cloned());
            if hf.is_empty() && gf.is_empty() && line.is_none() {
                break;
            }
            for f in forwarded(&hf) {
                deliver(&mut guest, now, &f);
            }
            for f in forwarded(&gf) {
                deliver(&mut host, now, &f);
            }
        }
        result.placed = placed.lock().unwrap().clone();
        (result, host_order)
    }

    fn file_events(events: &[Event]) -> Vec<FileEvent> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::File(f) => Some(f.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_file_moves_between_two_conversations_and_is_no_chat() {
        let file: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sha = hex::encode(Sha256::digest(&file));
        let (run, host_order) = run(&file, true, u64::MAX, Some("hello during the transfer"));
        assert_eq!(
            run.placed,
            vec![(PathBuf::from("/dl/dir/a.bin"), file.clone())]
        );
        let guest = file_events(&run.guest_events);
        assert!(
            matches!(&guest[0], FileEvent::Offer { name, size: 200_000, .. } if name == "dir/a.bin")
        );
        assert!(
            guest.iter().any(|e| matches!(e, FileEvent::Received { sha256, path, .. } if *sha256 == sha && path == Path::new("/dl/dir/a.bin")))
        );
        assert!(
            file_events(&run.host_events)
                .iter()
                .any(|e| matches!(e, FileEvent::Sent { sha256, .. } if *sha256 == sha))
        );
        // The chat line arrived and was shown; nothing of the file was shown as chat, and
        // chunks drew no receipts (every guest MSG_READ is either a receipt of a sealed
        // message or an acknowledgement).
        let shown: Vec<_> = run
            .guest_events
            .iter()
            .filter_map(|e| match e {
                Event::Message { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(shown, vec!["hello during the transfer".to_string()]);
        assert!(
            !run.guest_events
                .iter()
                .any(|e| matches!(e, Event::Problem { .. }))
        );
        let receipts = run
            .guest_frames
            .iter()
            .filter(|f| f.contains("MSG_READ") && !f.contains("file_ack"))
            .count();
        let acks = run
            .guest_frames
            .iter()
            .filter(|f| f.contains("file_ack"))
            .count();
        assert!(acks >= 2, "{acks}");
        assert!(
            receipts < 10,
            "{receipts} receipts: chunks must not draw receipts"
        );
        // The line went out ahead of the chunks still to send.
        let line_at = host_order
            .iter()
            .position(|f| {
                f.contains("\"MSG\"") && !f.contains("file_chunk") && !f.contains("MSG_READ")
            })
            .unwrap();
        assert!(
            host_order[line_at + 1..]
                .iter()
                .any(|f| f.contains("file_chunk"))
        );
    }

    /// The peer goes away mid-transfer (the relay drops DATA frames for an absent member):
    /// the sender stops; when the peer is back it waits for the receiver's word and goes on
    /// from there.
    #[test]
    fn chunks_stop_while_the_peer_is_away_and_go_on_from_its_word() {
        let now = Instant::now();
        let file = vec![5u8; 2_000_000];
        let (mut host, mut guest, _) = setup(now, &file, true, u64::MAX);
        let chunks = |frames: &[String]| frames.iter().filter(|f| f.contains("file_chunk")).count();
        // Offer, accept: the first window goes, and reaches the guest.
        let (offer, _) = drain(&mut host);
        for f in forwarded(&offer) {
            deliver(&mut guest, now, &f);
        }
        let (answer, _) = drain(&mut guest);
        for f in forwarded(&answer) {
            deliver(&mut host, now, &f);
        }
        let (window, _) = drain(&mut host);
        assert_eq!(chunks(&window) as u64, crate::files::WINDOW_CHUNKS);
        for f in forwarded(&window) {
            deliver(&mut guest, now, &f);
        }
        let sid = host.session().sid().to_string();
        let peer = |t: &str| format!(r#"{{"t":"{t}","sid":"{sid}"}}"#);
        host.handle_frame(now, &peer("PEER_OFFLINE"));
        // The guest's acknowledgements arrive: nothing more goes while the peer is away.
        let (acks, _) = drain(&mut guest);
        for f in forwarded(&acks) {
            deliver(&mut host, now, &f);
        }
        let (away, _) = drain(&mut host);
        assert_eq!(chunks(&away), 0);
        // Back: nothing until the guest's word (it sends it when the peer comes online).
        host.handle_frame(now, &peer("PEER_ONLINE"));
        let (waiting, _) = drain(&mut host);
        assert_eq!(chunks(&waiting), 0);
        guest.handle_frame(now, &peer("PEER_OFFLINE"));
        guest.handle_frame(now, &peer("PEER_ONLINE"));
        let (word, _) = drain(&mut guest);
        assert!(word.iter().any(|f| f.contains("file_ack")));
        for f in forwarded(&word) {
            deliver(&mut host, now, &f);
        }
        let (again, _) = drain(&mut host);
        assert_eq!(chunks(&again) as u64, crate::files::WINDOW_CHUNKS);
        // It goes on from what the guest has: the first chunk of the new pass is the next one
        // the guest wants, so the guest takes it without failing.
        for f in forwarded(&again) {
            deliver(&mut guest, now, &f);
        }
        let (_, events) = drain(&mut guest);
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::File(FileEvent::Failed { .. }))),
            "{events:?}"
        );
    }

    /// The sender re-attached before the relay saw its old connection go: the receiver gets
    /// `PEER_ONLINE` with no `PEER_OFFLINE` before it. Its link is new all the same, so the
    /// receiver says where it is (without that word the sender waits for ever).
    #[test]
    fn peer_online_without_peer_offline_is_a_link_reset_for_files() {
        let now = Instant::now();
        let file = vec![5u8; 2_000_000];
        let (mut host, mut guest, _) = setup(now, &file, true, u64::MAX);
        let (offer, _) = drain(&mut host);
        for f in forwarded(&offer) {
            deliver(&mut guest, now, &f);
        }
        let (answer, _) = drain(&mut guest);
        for f in forwarded(&answer) {
            deliver(&mut host, now, &f);
        }
        let (window, _) = drain(&mut host);
        for f in forwarded(&window) {
            deliver(&mut guest, now, &f);
        }
        let _ = drain(&mut guest);
        let sid = guest.session().sid().to_string();
        guest.handle_frame(now, &format!(r#"{{"t":"PEER_ONLINE","sid":"{sid}"}}"#));
        let (word, _) = drain(&mut guest);
        assert!(word.iter().any(|f| f.contains("file_ack")), "{word:?}");
    }

    /// The name chosen for a file is taken by someone else just before the move: the file
    /// goes to the next free name rather than failing.
    #[test]
    fn a_name_taken_at_the_last_moment_gives_the_next_one() {
        let file = vec![3u8; 70_000];
        let fs = MemFs {
            taken_at_move: Some(PathBuf::from("/dl/dir/a.bin")),
            ..MemFs::default()
        };
        let (run, _) = run_with(&file, true, u64::MAX, None, fs);
        assert_eq!(
            run.placed,
            vec![(PathBuf::from("/dl/dir/a (1).bin"), file.clone())]
        );
        assert!(
            file_events(&run.guest_events)
                .iter()
                .any(|e| matches!(e, FileEvent::Received { path, .. } if path == Path::new("/dl/dir/a (1).bin")))
        );
    }

    #[test]
    fn declined_and_too_large_offers_fail_on_both_sides_and_write_nothing() {
        for (accept, max, code) in [
            (false, u64::MAX, FailCode::Declined),
            (true, 10, FailCode::TooLarge),
        ] {
            let (run, _) = run(&[1; 100], accept, max, None);
            assert!(run.placed.is_empty());
            for events in [&run.guest_events, &run.host_events] {
                assert!(
                    file_events(events)
                        .iter()
                        .any(|e| matches!(e, FileEvent::Failed { code: c, .. } if *c == code)),
                    "{events:?}"
                );
            }
        }
    }

    /// Frames between the two until both are quiet: events of each, and the statuses of
    /// the guest's stored incoming files at each of its saves.
    fn exchange(
        host: &mut Conversation,
        guest: &mut Conversation,
        now: Instant,
    ) -> (Vec<Event>, Vec<Event>, Vec<String>) {
        let (mut he, mut ge, mut stored) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..10_000 {
            let (hf, h) = drain(host);
            let mut gf = Vec::new();
            loop {
                if let Some(frame) = guest.poll_transmit() {
                    gf.push(describe(frame));
                } else if let Some(event) = guest.poll_event() {
                    ge.push(event);
                } else if let Some(save) = guest.poll_save() {
                    stored.extend(save.record.files_in.iter().map(|f| f.status.s.clone()));
                } else if !sync_now(guest) && guest.poll_link().is_none() {
                    break;
                }
            }
            he.extend(h);
            if hf.is_empty() && gf.is_empty() {
                break;
            }
            for f in forwarded(&hf) {
                deliver(guest, now, &f);
            }
            for f in forwarded(&gf) {
                deliver(host, now, &f);
            }
        }
        (he, ge, stored)
    }

    /// On a terminal the guest is asked: the offer is stored unanswered and nothing moves
    /// until the person's next line, which is the answer, not a chat message: `y` takes the
    /// file, anything else declines it (`declined` on both sides).
    #[test]
    fn the_next_line_answers_the_question_about_an_offer() {
        for (answer, taken) in [("y", true), (" YES ", true), ("", false), ("No", false)] {
            let now = Instant::now();
            let file = vec![9u8; 70_000];
            let (mut host, mut guest, placed) = setup(now, &file, false, u64::MAX);
            guest.files_mut().unwrap().ask_person(true);
            let (host_events, guest_events, stored) = exchange(&mut host, &mut guest, now);
            assert!(
                file_events(&guest_events)
                    .iter()
                    .any(|e| matches!(e, FileEvent::Question { name, size: 70_000, .. } if name == "dir/a.bin")),
                "{guest_events:?}"
            );
            assert!(stored.iter().any(|s| s == "offered"), "{stored:?}");
            assert!(file_events(&host_events).is_empty(), "{host_events:?}");
            assert!(guest.files().unwrap().question().is_some());

            guest.handle_line(now, answer.into());
            let (host_events, guest_events, _) = exchange(&mut host, &mut guest, now);
            // The answer was no chat message.
            assert!(
                !guest_events
                    .iter()
                    .chain(&host_events)
                    .any(|e| matches!(e, Event::Message { .. })),
                "{answer:?}"
            );
            let placed = placed.lock().unwrap().clone();
            if taken {
                assert_eq!(placed, vec![(PathBuf::from("/dl/dir/a.bin"), file.clone())]);
                assert!(
                    file_events(&host_events)
                        .iter()
                        .any(|e| matches!(e, FileEvent::Sent { .. }))
                );
            } else {
                assert!(placed.is_empty(), "{answer:?}");
                for events in [&host_events, &guest_events] {
                    assert!(
                        file_events(events).iter().any(|e| matches!(
                            e,
                            FileEvent::Failed {
                                code: FailCode::Declined,
                                ..
                            }
                        )),
                        "{answer:?}: {events:?}"
                    );
                }
            }
            // The question is over: the next line is chat again.
            assert!(guest.files().unwrap().question().is_none());
            guest.handle_line(now, "thanks".into());
            let (host_events, _, _) = exchange(&mut host, &mut guest, now);
            assert!(
                host_events
                    .iter()
                    .any(|e| matches!(e, Event::Message { text, .. } if text == "thanks"))
            );
        }
    }

    /// A line that is no answer (typed before the question showed, say) goes as chat, and
    /// the question stays: nothing typed is lost, and nothing is accepted by chance.
    #[test]
    fn a_line_that_is_no_answer_goes_as_chat_and_the_question_stays() {
        let now = Instant::now();
        let (mut host, mut guest, placed) = setup(now, &[9u8; 1000], false, u64::MAX);
        guest.files_mut().unwrap().ask_person(true);
        exchange(&mut host, &mut guest, now);
        assert!(guest.files().unwrap().question().is_some());
        guest.handle_line(now, "sure, send it".into());
        let (host_events, _, _) = exchange(&mut host, &mut guest, now);
        assert!(
            host_events
                .iter()
                .any(|e| matches!(e, Event::Message { text, .. } if text == "sure, send it"))
        );
        assert!(guest.files().unwrap().question().is_some(), "still asked");
        assert!(placed.lock().unwrap().is_empty());
        guest.handle_line(now, "y".into());
        exchange(&mut host, &mut guest, now);
        assert_eq!(placed.lock().unwrap().len(), 1);
    }

    /// `/send` during a chat: files handed in while the link is up are offered at once.
    #[test]
    fn files_sent_during_a_chat_are_offered_at_once() {
        let now = Instant::now();
        let file = vec![3u8; 1000];
        let (mut host, mut guest, placed) = setup(now, &file, true, u64::MAX);
        exchange(&mut host, &mut guest, now);
        assert_eq!(placed.lock().unwrap().len(), 1);
        host.send_files(
            now,
            vec![LocalFile {
                name: "again.bin".into(),
                path: PathBuf::from("/src/a.bin"),
                size: file.len() as u64,
                sha256: Sha256::digest(&file).into(),
            }],
        );
        exchange(&mut host, &mut guest, now);
        let placed = placed.lock().unwrap().clone();
        assert_eq!(placed.len(), 2);
        assert_eq!(placed[1], (PathBuf::from("/dl/again.bin"), file));
    }
}
