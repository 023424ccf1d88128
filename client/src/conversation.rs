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
use crate::handshake::{error_fields, msg_kind};
use crate::liveness::{Alarm, Liveness, pong_for};
use crate::ratchet::RatchetError;
use crate::session::{Plain, Receipt, ReceiveError, SendError, Session};
use crate::wire::{DeliveredData, ErrorData, ReattachData, RestoreData};

/// The relay must answer `REATTACH` (and `RESTORE`) within this.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// How often unacknowledged messages are sent again while the peer is online and no receipt
/// has moved (a frame can be lost with a connection that dies).
pub const RETRANSMIT_EVERY: Duration = Duration::from_secs(2);

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

enum Step {
    /// A frame, and whether a failure to write it ends the run (the window sent when the
    /// chat begins, like the attaching before it).
    Transmit(String, bool),
    Event(Event),
    /// (Boxed: a record is large beside the other steps.)
    Save(Box<Save>),
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
    pub fn handle_line(&mut self, _now: Instant, line: String) {
        if self.end.is_some() {
            return;
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

    /// Something other than a text frame arrived (a WebSocket ping or pong, say): the
    /// connection is alive.
    pub fn handle_traffic(&mut self, now: Instant) {
        if let Phase::Online { liveness } | Phase::Attaching { liveness, .. } = &mut self.phase {
            liveness.heard(now);
        }
    }

    /// The connection asked for with [`LinkAction::Dial`] is open: attach.
    pub fn handle_connected(&mut self, now: Instant) {
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
        self.flush_sealed();
        if self.end.is_some() {
            return;
        }
        match self.phase {
            Phase::Online { .. } if self.fatal_write => {
                // Nothing decided after that write happens (it would not have before either).
                self.steps.clear();
                self.finish(Err(why));
            }
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
    pub fn poll_transmit(&mut self) -> Option<String> {
        self.flush_sealed();
        if let Some(Step::Transmit(..)) = self.steps.front()
            && let Some(Step::Transmit(frame, fatal)) = self.steps.pop_front()
        {
            self.fatal_write = fatal;
            return Some(frame);
        }
        self.fatal_write = false;
        None
    }

    /// The next event to tell, if the next output is one.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.flush_sealed();
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
        if let Some(Step::Save(_)) = self.steps.front()
            && let Some(Step::Save(save)) = self.steps.pop_front()
        {
            return Some(*save);
        }
        None
    }

    /// What to do with the connection, if the next output is that.
    pub fn poll_link(&mut self) -> Option<LinkAction> {
        self.flush_sealed();
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
        [phase, retransmit, self.config.deadline.map(|(at, _)| at)]
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
                if let Some(seq) = msg_seq(&env)
                    && self.session.unacked().any(|(s, _)| s == seq)
                    && self.accepted.insert(seq)
                    && seq != HELLO_SEQ
                {
                    self.event(Event::Sent { seq });
                }
            }
            FrameType::PeerOnline => {
                self.peer_online = true;
                self.told_waiting = false;
                self.event(Event::PeerOnline);
                // What the peer's last connection had not yet written may be lost.
                self.resend_window();
            }
            FrameType::PeerOffline => {
                self.peer_online = false;
                self.event(Event::PeerOffline);
            }
            FrameType::Error => self.relay_error(now, &env),
            _ => {}
        }
    }

    /// An `ERROR` during the chat (protocol.md 3.7, "Other frames during a chat").
    fn relay_error(&mut self, now: Instant, env: &Envelope<'_>) {
        let (code, message) = error_fields(env);
        match (msg_seq(env), code.as_str()) {
            // Not kept by the relay: it goes again when the peer is back.
            (Some(seq), "mailbox_full" | "peer_offline" | "not_paired") => {
                self.accepted.remove(&seq);
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
        if !self.input_open
            && self.config.exit_after.is_none_or(|n| self.shown >= n)
            && everything_out
        {
            self.finish(Ok(()));
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
        self.steps.push_back(Step::Transmit(frame, false));
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
        self.steps.push_back(Step::Save(Box::new(Save {
            record: self.session.record(),
            durability,
        })));
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

