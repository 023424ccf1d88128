//! The async driver: moves frames between the relay socket, the sans-IO handshake and session,
//! stdin and stdout. All protocol decisions are made in `handshake` and `session`.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_protocol::limits::MAX_FRAME_BYTES;
use parley_protocol::{Envelope, FrameType, encode};
use parley_state::{StateFile, Store};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};

use crate::code::InviteCode;
use crate::error::ClientError;
use crate::handshake::{Guest, Host, Pairing, PairingError, Step, error_fields, msg_kind};
use crate::output::{Output, error_event};
use crate::ratchet::RatchetError;
use crate::session::{
    MAX_OUTBOX, MAX_OUTBOX_BYTES, Plain, Receipt, ReceiveError, SendError, Session,
};
use crate::transport::{Dialer, RelaySocket};
use crate::wire::{DeliveredData, ErrorData, ReattachData, RestoreData};

/// Each stage of the handshake (once a joiner is there) must complete within this.
const HANDSHAKE_STEP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Options {
    pub relay_url: String,
    pub state_dir: PathBuf,
    pub name: String,
    pub json: bool,
    /// Exit once this many chat messages have been received (and ours are delivered).
    pub exit_after: Option<u64>,
    /// Give up (exit code 6) if not done by then.
    pub timeout: Option<Duration>,
    /// Opens relay connections: `ws://` or `wss://`, the certificates to trust, and the
    /// liveness bound (a connection that delivers no frame at all for that long is dead; we
    /// PING it half-way through the silence first, see [`RelayLink::recv`]).
    pub dialer: Dialer,
}

/// The default liveness bound of [`Dialer::new`]: the relay's own idle limit. A live relay PINGs
/// every 10 s (protocol.md 2.6), so a healthy connection is never silent that long.
pub const IDLE_TIMEOUT: Duration = parley_protocol::limits::IDLE_TIMEOUT;

pub enum Command {
    Host,
    Join(InviteCode),
    Resume(Option<String>),
    Sessions,
}

pub async fn run(command: Command, opts: Options) -> Result<(), ClientError> {
    let mut output = Output::new(opts.json);
    // A timeout too long for the clock (`--timeout` is any u64) means none.
    let deadline = opts.timeout.and_then(|t| Instant::now().checked_add(t));
    let result = within(
        deadline,
        opts.timeout,
        run_command(command, &opts, &mut output),
    )
    .await;
    if let Err(e) = &result {
        output.emit(error_event(e.code(), &e.to_string()));
    }
    result
}

async fn run_command(
    command: Command,
    opts: &Options,
    output: &mut Output,
) -> Result<(), ClientError> {
    match command {
        Command::Sessions => list_sessions(opts, output),
        Command::Host | Command::Join(_) => {
            let (store, mut state) = open_state(opts, false, output)?;
            let mut relay = RelayLink::connect(&opts.dialer, &opts.relay_url, output).await?;
            let session = match &command {
                Command::Join(code) => pair_guest(&mut relay, code, opts, output).await?,
                _ => pair_host(&mut relay, opts, output).await?,
            };
            chat(
                relay,
                session,
                Paired::Fresh,
                &store,
                &mut state,
                opts,
                output,
            )
            .await
        }
        Command::Resume(sid) => {
            let (store, mut state) = open_state(opts, true, output)?;
            let session =
                Session::from_record(pick_session(&state, sid.as_deref())?).map_err(|record| {
                    ClientError::Damaged {
                        path: store.path().to_path_buf(),
                        record,
                    }
                })?;
            let mut relay = RelayLink::connect(&opts.dialer, session.relay_url(), output).await?;
            let peer_online = reattach(&mut relay, &session).await?;
            chat(
                relay,
                session,
                Paired::Resumed { peer_online },
                &store,
                &mut state,
                opts,
                output,
            )
            .await
        }
    }
}

/// Runs `work`, failing with `Timeout` at the deadline.
async fn within<T>(
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    work: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at, work)
            .await
            .unwrap_or_else(|_| Err(ClientError::Timeout(timeout.map_or(0, |t| t.as_secs())))),
        None => work.await,
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// State

fn open_state(
    opts: &Options,
    must_exist: bool,
    output: &mut Output,
) -> Result<(Store, StateFile), ClientError> {
    let store = Store::open(&opts.state_dir, &opts.name)?;
    let (loaded, warnings) = store.load_with_warnings()?;
    warn(output, &warnings);
    let state = match loaded {
        Some(state) => state,
        None if must_exist => {
            return Err(parley_state::StateError::Missing {
                name: opts.name.clone(),
                dir: opts.state_dir.clone(),
            }
            .into());
        }
        None => StateFile::new(&opts.name),
    };
    Ok((store, state))
}

fn warn(output: &mut Output, warnings: &[parley_state::StateWarning]) {
    for w in warnings {
        output.emit(json!({"event": "warning", "code": w.code, "message": w.message}));
    }
}

fn persist(store: &Store, state: &mut StateFile, session: &Session) -> Result<(), ClientError> {
    state.upsert(session.record());
    store.save(state)?;
    Ok(())
}

/// The stored session named by `sid` (a unique prefix is enough), or the only one.
fn pick_session<'a>(
    state: &'a StateFile,
    sid: Option<&str>,
) -> Result<&'a parley_state::SessionRecord, ClientError> {
    let matching: Vec<_> = state
        .sessions
        .iter()
        .filter(|s| sid.is_none_or(|p| s.sid.starts_with(p)))
        .collect();
    match (matching.as_slice(), sid) {
        ([one], _) => Ok(one),
        ([], Some(sid)) => Err(ClientError::Usage(format!("no stored session starts with `{sid}`; see `parley sessions`"))),
        ([], None) => Err(ClientError::Usage("no stored sessions; pair first with `host` or `join`".into())),
        (_, _) => Err(ClientError::Usage(
            "several stored sessions match; name one with `parley resume SID` (see `parley sessions`)".into(),
        )),
    }
}

fn list_sessions(opts: &Options, output: &mut Output) -> Result<(), ClientError> {
    let (state, warnings) = parley_state::read_snapshot_with_warnings(&opts.state_dir, &opts.name)?;
    warn(output, &warnings);
    if state.sessions.is_empty() && !output.is_json() {
        output.emit(error_event("no_sessions", "no stored sessions"));
    }
    for s in &state.sessions {
        output.emit(json!({
            "event": "session",
            "sid": s.sid,
            "peer": s.peer_name,
            "role": s.role.to_string(),
            "relay": s.relay_url,
            "created": format_time(s.created),
            "last_used": format_time(s.last_used),
            "safety_number": s.safety_number,
        }));
    }
    Ok(())
}

fn format_time(unix: u64) -> String {
    chrono::DateTime::from_timestamp(i64::try_from(unix).unwrap_or(0), 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The relay connection

struct RelayLink {
    ws: RelaySocket,
    /// Liveness: when the last frame of any kind arrived, whether we have PINGed since, and
    /// how long a silence means the connection is dead.
    last_heard: Instant,
    pinged: bool,
    idle: Duration,
}

impl RelayLink {
    /// Connects to `url`. A `ws://` URL that leaves this machine gets its warning first
    /// (once per process), before any traffic.
    async fn connect(
        dialer: &Dialer,
        url: &str,
        output: &mut Output,
    ) -> Result<RelayLink, ClientError> {
        if let Some(warning) = dialer.plaintext_warning(url) {
            output.emit(warning);
        }
        let ws = dialer.open(url).await?;
        Ok(RelayLink {
            ws,
            last_heard: Instant::now(),
            pinged: false,
            idle: dialer.idle(),
        })
    }

    /// Sends one frame. A write that makes no progress for the liveness bound (the socket's
    /// buffers are full: the relay or the path stopped reading) means the connection is dead,
    /// like silence does in [`RelayLink::recv`].
    async fn send(&mut self, frame: String) -> Result<(), ClientError> {
        match tokio::time::timeout(self.idle, self.ws.send(Message::Text(frame.into()))).await {
            Ok(sent) => sent.map_err(|e| ClientError::ConnectionLost(e.to_string())),
            Err(_) => Err(ClientError::ConnectionLost(format!(
                "the relay took no data for {:.1} s",
                self.idle.as_secs_f64()
            ))),
        }
    }

    /// The next text frame. The relay's `PING`s (any frame with `t` = `PING`) are answered
    /// here and not returned.
    ///
    /// Liveness: a relay PINGs every 10 s, so silence means a dead relay or network path,
    /// which TCP alone may not notice for hours. After half of `idle` without any frame we
    /// send a `PING` of our own (the relay answers `PONG`); after `idle` without any frame
    /// the connection is declared lost, and the caller reconnects as after any cut.
    /// Cancel-safe: the liveness state lives in `self`, not in this future.
    async fn recv(&mut self) -> Result<String, ClientError> {
        loop {
            let wake = if self.pinged {
                self.last_heard.checked_add(self.idle)
            } else {
                self.last_heard.checked_add(self.idle / 2)
            };
            let next = match wake {
                Some(at) => match tokio::time::timeout_at(at, self.ws.next()).await {
                    Ok(next) => next,
                    Err(_) if self.pinged => {
                        return Err(ClientError::ConnectionLost(format!(
                            "no sign of life from the relay for {:.1} s",
                            self.idle.as_secs_f64()
                        )));
                    }
                    Err(_) => {
                        self.pinged = true;
                        self.send(encode::<()>(FrameType::Ping, None, None)).await?;
                        continue;
                    }
                },
                // A bound too large for the clock: no liveness check.
                None => self.ws.next().await,
            };
            if let Some(Ok(_)) = &next {
                self.last_heard = Instant::now();
                self.pinged = false;
            }
            match next {
                Some(Ok(Message::Text(text))) => {
                    if Envelope::parse(text.as_str()).is_ok_and(|env| env.kind == FrameType::Ping) {
                        self.send(encode::<()>(FrameType::Pong, None, None)).await?;
                        continue;
                    }
                    return Ok(text.to_string());
                }
                Some(Ok(Message::Close(frame))) => {
                    let why = frame
                        .map(|f| f.reason.to_string())
                        .unwrap_or_else(|| "closed".into());
                    return Err(ClientError::ConnectionLost(format!(
                        "the relay closed the connection ({why})"
                    )));
                }
                Some(Ok(_)) => {}
                // The rest of that frame is still on the socket: the connection cannot go on.
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                    return Err(ClientError::RelayProtocol(format!(
                        "it sent a frame larger than the protocol's limit of {MAX_FRAME_BYTES} bytes"
                    )));
                }
                Some(Err(e)) => return Err(ClientError::ConnectionLost(e.to_string())),
                None => {
                    return Err(ClientError::ConnectionLost(
                        "the relay closed the connection".into(),
                    ));
                }
            }
        }
    }

    /// The closing handshake, both halves: our Close, then whatever the relay still sends
    /// until its Close (discarded). Leaving before the reply would leave those frames unread,
    /// and the kernel would answer them with a reset that can cost the relay our own last
    /// frames (a final receipt) still in its receive buffer.
    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            if self.ws.close(None).await.is_ok() {
                while let Some(Ok(_)) = self.ws.next().await {}
            }
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Pairing

async fn pair_host(
    relay: &mut RelayLink,
    opts: &Options,
    output: &mut Output,
) -> Result<Session, ClientError> {
    let (host, steps) = Host::start(&opts.relay_url, &opts.name)?;
    pair(relay, host, steps, output).await
}

async fn pair_guest(
    relay: &mut RelayLink,
    code: &InviteCode,
    opts: &Options,
    output: &mut Output,
) -> Result<Session, ClientError> {
    let (guest, steps) = Guest::start(code, &opts.relay_url, &opts.name)?;
    pair(relay, guest, steps, output).await
}

/// Runs either side of the handshake to completion. Each stage gets `HANDSHAKE_STEP_TIMEOUT`
/// (frames that do not move it on, such as PINGs, do not extend it); waiting for a joiner
/// lasts as long as the invite code.
async fn pair(
    relay: &mut RelayLink,
    mut machine: impl Pairing,
    first: Vec<Step>,
    output: &mut Output,
) -> Result<Session, ClientError> {
    let mut steps = first;
    let mut stage = machine.stage();
    let mut deadline = Instant::now() + HANDSHAKE_STEP_TIMEOUT;
    // While waiting for a joiner: until the code expires, or (None) for as long as it takes.
    let mut invite_deadline: Option<Option<Instant>> = None;
    loop {
        for step in steps.drain(..) {
            match step {
                Step::Send(frame) => relay.send(frame).await?,
                Step::Invite { code, expires_in } => {
                    // A little grace: the relay's clock and ours started a moment apart. The
                    // lifetime is the relay's number: one too large for the clock means the
                    // code does not expire (the relay is the one that enforces it anyway).
                    invite_deadline = Some(
                        Instant::now()
                            .checked_add(Duration::from_secs(expires_in.saturating_add(2))),
                    );
                    output.emit(
                        json!({"event": "invite", "code": code.reveal(), "expires_in": expires_in}),
                    );
                }
                Step::Paired(session) => return Ok(*session),
            }
        }
        let (wait_until, on_timeout) =
            match invite_deadline.filter(|_| machine.waiting_for_joiner()) {
                Some(at) => (at, PairingError::InviteExpired),
                None => (
                    Some(deadline),
                    PairingError::Protocol("the other side stopped answering during pairing"),
                ),
            };
        let received = match wait_until {
            Some(at) => tokio::time::timeout_at(at, relay.recv()).await,
            None => Ok(relay.recv().await),
        };
        let frame = match received {
            Ok(frame) => frame?,
            Err(_) => return Err(fail_pairing(relay, machine.take_farewell(), on_timeout).await),
        };
        match machine.handle(&frame) {
            Ok(next) => steps = next,
            Err(e) => return Err(fail_pairing(relay, machine.take_farewell(), e).await),
        }
        if machine.stage() != stage {
            stage = machine.stage();
            deadline = Instant::now() + HANDSHAKE_STEP_TIMEOUT;
        }
    }
}

/// Tells the other side (if there is a farewell frame) and returns the error to report.
async fn fail_pairing(
    relay: &mut RelayLink,
    farewell: Option<String>,
    error: PairingError,
) -> ClientError {
    if let Some(frame) = farewell {
        let _ = relay.send(frame).await;
    }
    ClientError::Pairing(error)
}

/// `REATTACH`; returns whether the peer is online.
async fn reattach(relay: &mut RelayLink, session: &Session) -> Result<bool, ClientError> {
    let data = ReattachData {
        resume_token: Some(session.resume_token().expose().into()),
    };
    relay
        .send(encode(
            FrameType::Reattach,
            Some(session.sid()),
            Some(&data),
        ))
        .await?;
    await_status(relay, FrameType::Reattach).await
}

/// The answer to `REATTACH` or `RESTORE`: `PEER_ONLINE` or `PEER_OFFLINE` (whether the peer is
/// online), or the relay's refusal.
async fn await_status(relay: &mut RelayLink, asked: FrameType) -> Result<bool, ClientError> {
    let deadline = Instant::now() + HANDSHAKE_STEP_TIMEOUT;
    loop {
        let frame = tokio::time::timeout_at(deadline, relay.recv())
            .await
            .map_err(|_| {
                ClientError::ConnectionLost("the relay did not answer in time".into())
            })??;
        let env = Envelope::parse(&frame).map_err(|e| {
            ClientError::RelayProtocol(format!(
                "it answered {asked} with an unreadable frame ({e})"
            ))
        })?;
        match env.kind {
            FrameType::PeerOnline => return Ok(true),
            FrameType::PeerOffline => return Ok(false),
            FrameType::Error => {
                let (code, message) = error_fields(&env);
                return Err(ClientError::ResumeRefused { code, message });
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chatting

enum Paired {
    Fresh,
    Resumed { peer_online: bool },
}

/// Lines from stdin, read on a thread of their own (blocking reads, or the line editor on a
/// terminal). The channel closes at end of input. Also says whether a person is typing.
fn spawn_input(output: &mut Output) -> (mpsc::Receiver<String>, bool) {
    let (tx, rx) = mpsc::channel(64);
    let interactive =
        !output.is_json() && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let editor = if interactive {
        rustyline::DefaultEditor::new().ok()
    } else {
        None
    };
    match editor {
        Some(mut editor) => {
            if let Ok(printer) = editor.create_external_printer() {
                output.set_printer(Box::new(printer));
            }
            std::thread::spawn(move || {
                // Ctrl-D or Ctrl-C end the input, like end of file.
                while let Ok(line) = editor.readline("> ") {
                    if tx.blocking_send(line).is_err() {
                        break;
                    }
                }
            });
        }
        None => {
            std::thread::spawn(move || {
                for line in std::io::stdin().lines() {
                    let Ok(line) = line else { break };
                    if tx.blocking_send(line).is_err() {
                        break;
                    }
                }
            });
        }
    }
    (rx, interactive)
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
        self.next = (self.next * 2).min(Backoff::MAX);
        let jitter = rand::Rng::random_range(&mut rand::rng(), 0.8..1.2);
        base.mul_f64(jitter)
    }

    fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }
}

/// Each side's first message is its Hello (part of pairing): not reported as chat.
const HELLO_SEQ: u64 = 1;

/// How often unacknowledged messages are sent again while the peer is online and no receipt
/// has moved (a frame can be lost with a connection that dies).
const RETRANSMIT_EVERY: Duration = Duration::from_secs(2);

/// The next frame from the relay, or never when there is no connection.
async fn next_frame(link: &mut Option<RelayLink>) -> Result<String, ClientError> {
    match link {
        Some(relay) => relay.recv().await,
        None => std::future::pending().await,
    }
}

/// Connects to the session's relay and takes our seat back: `REATTACH`, or `RESTORE` when
/// the relay has forgotten the session (it restarted) or holds it restored by the peer.
/// Returns whether the peer is online.
async fn attach(
    session: &Session,
    dialer: &Dialer,
    output: &mut Output,
) -> Result<(RelayLink, bool), ClientError> {
    let mut relay = RelayLink::connect(dialer, session.relay_url(), output).await?;
    match reattach(&mut relay, session).await {
        // Forgotten (the relay restarted), or re-created by the peer's RESTORE with our seat
        // awaiting us: RESTORE with the proof.
        Err(ClientError::ResumeRefused { code, .. })
            if code == "session_unknown" || code == "token_invalid" =>
        {
            let data = RestoreData {
                role: Some(session.role().to_string().into()),
                resume_token: Some(session.resume_token().expose().into()),
                proof: Some(session.restore_proof().expose().into()),
            };
            relay
                .send(encode(FrameType::Restore, Some(session.sid()), Some(&data)))
                .await?;
            let online = await_status(&mut relay, FrameType::Restore).await?;
            Ok((relay, online))
        }
        Ok(online) => Ok((relay, online)),
        Err(e) => Err(e),
    }
}

/// Sends what the send window allows beyond `sent_upto` (0: the whole window again), in
/// order. An error means the connection is gone.
async fn pump(
    link: &mut Option<RelayLink>,
    session: &Session,
    sent_upto: &mut u64,
) -> Result<(), ClientError> {
    let Some(relay) = link else { return Ok(()) };
    for (seq, frame) in session.window_after(*sent_upto) {
        relay.send(frame).await?;
        *sent_upto = seq;
    }
    Ok(())
}

async fn chat(
    relay: RelayLink,
    mut session: Session,
    how: Paired,
    store: &Store,
    state: &mut StateFile,
    opts: &Options,
    output: &mut Output,
) -> Result<(), ClientError> {
    session.touch(now_secs());
    // What the last run recorded but may not have shown (it stopped in between): shown below,
    // before the state forgets it.
    let unshown = session.take_unshown();
    let had_unshown = !unshown.is_empty();
    if !had_unshown {
        // Saved before anything is announced: "paired" means the session is stored.
        persist(store, state, &session)?;
    }
    let mut link = Some(relay);
    let mut peer_online = match how {
        Paired::Fresh => {
            output.emit(paired_event(&session));
            true
        }
        Paired::Resumed { peer_online } => {
            output.emit(json!({
                "event": "resumed",
                "sid": session.sid(),
                "peer": session.peer_name(),
                "peer_online": peer_online,
                "safety_number": session.safety_number(),
            }));
            peer_online
        }
    };
    // (Not counted for --exit-after: the last run may have shown them already.)
    let mut received: u64 = 0;
    for (seq, text) in unshown {
        output.emit(message_event(&session, seq, &text));
    }
    if had_unshown {
        persist(store, state, &session)?;
    }
    // Whatever was unacknowledged when we last stopped goes out again first.
    let mut sent_upto = 0;
    pump(&mut link, &session, &mut sent_upto).await?;

    let (mut input, interactive) = spawn_input(output);
    // A person may quit once the relay holds everything (the outbox is saved and is sent
    // again on the next resume); a script waits for the peer's receipts.
    let wait_for_receipts = !interactive;
    let mut input_open = true;
    let mut accepted: BTreeSet<u64> = BTreeSet::new();
    let mut told_waiting = false;
    let mut backoff = Backoff::new();
    let mut reconnect_at = Instant::now();
    let mut retransmit = tokio::time::interval(RETRANSMIT_EVERY);
    retransmit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acked_at_last_tick = session.unacked().next().map(|(seq, _)| seq);
    // The outbox is bounded (protocol.md 3.7): while it is full, input is not read (a pipe
    // feeding us blocks) until receipts make room; everything else goes on.
    let mut reading_paused = false;
    // The other sessions stored here keep their outboxes (no other process writes this file
    // while we hold its lock): this one gets what the file's budget leaves beside them.
    session.share_outbox_budget(others_outbox_bytes(state, session.sid()));

    loop {
        let room = session.outbox_has_room();
        if input_open && !room && !reading_paused {
            reading_paused = true;
            output.emit(outbox_full_event(&session));
        } else if reading_paused && room {
            reading_paused = false;
            if input_open {
                output.emit(outbox_ready_event(&session));
            }
        }
        let everything_out = if wait_for_receipts {
            !session.has_unacked()
        } else {
            session.unacked().all(|(seq, _)| accepted.contains(&seq))
        };
        if !input_open && opts.exit_after.is_none_or(|n| received >= n) && everything_out {
            if let Some(relay) = link.take() {
                relay.close().await;
            }
            return Ok(());
        }
        if !input_open && !everything_out && (!peer_online || link.is_none()) && !told_waiting {
            told_waiting = true;
            let waiting = session.unacked().count();
            output.emit(json!({"event": "waiting", "sid": session.sid(), "undelivered": waiting,
                "message": format!("waiting for {} to receive {waiting} message(s); Ctrl-C stops (they are kept and sent on the next resume)",
                    session.peer_name().unwrap_or("your peer"))}));
        }
        tokio::select! {
            line = input.recv(), if input_open && room => match line {
                Some(text) => {
                    // Lines already waiting are sealed together, as many as the outbox has room
                    // for, and saved once: a script writing fast costs one save per batch, not
                    // one per line.
                    let mut next = Some(text);
                    let mut sealed = false;
                    let mut failed = None;
                    while let Some(text) = next.take() {
                        match session.seal(&Plain::Text { text }) {
                            Ok(_) => sealed = true,
                            Err(SendError::TooLong { max }) => {
                                output.emit(error_event("message_too_long", &SendError::TooLong { max }.to_string()));
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                        if session.outbox_has_room() {
                            match input.try_recv() {
                                Ok(line) => next = Some(line),
                                Err(mpsc::error::TryRecvError::Disconnected) => input_open = false,
                                Err(mpsc::error::TryRecvError::Empty) => {}
                            }
                        }
                    }
                    // Saved (in the outbox) before it is sent: a sequence number is never used
                    // twice, and the message survives a crash. (Those sealed before a failure
                    // too: they go out on the next resume.)
                    if sealed {
                        persist(store, state, &session)?;
                    }
                    if let Some(e) = failed {
                        return Err(ClientError::Internal(e.to_string()));
                    }
                    if !sealed {
                        continue;
                    }
                    if let Err(e) = pump(&mut link, &session, &mut sent_upto).await {
                        lost_relay(&mut link, &mut accepted, output, &e);
                        reconnect_at = Instant::now() + backoff.step();
                    }
                }
                None => input_open = false,
            },
            frame = next_frame(&mut link) => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => {
                        lost_relay(&mut link, &mut accepted, output, &e);
                        // A relay that broke the protocol (an oversize frame) is handled like
                        // a cut: the stream cannot be resynchronised, the outboxes resend
                        // whatever was lost. But it is likely to do it again right after the
                        // next attach (which resets the backoff): wait the longest step.
                        let wait = match e {
                            ClientError::RelayProtocol(_) => Backoff::MAX,
                            _ => backoff.step(),
                        };
                        reconnect_at = Instant::now() + wait;
                        continue;
                    }
                };
                let Ok(env) = Envelope::parse(&frame) else { continue };
                match env.kind {
                    FrameType::Msg => {
                        let shown = receive(&mut session, &env, store, state, output)?;
                        received = received.saturating_add(shown);
                        if let Some(relay) = &mut link {
                            let mut receipts = vec![Receipt::Delivered { upto: session.received_upto() }];
                            if interactive && shown > 0 {
                                receipts.push(Receipt::Read { upto: session.received_upto() });
                            }
                            for receipt in receipts {
                                if let Ok(frame) = session.receipt(receipt) {
                                    let _ = relay.send(frame).await;
                                }
                            }
                        }
                    }
                    FrameType::MsgRead => match session.take_receipt(&env) {
                        Ok(Some((Receipt::Delivered { .. }, newly))) => {
                            if !newly.is_empty() {
                                persist(store, state, &session)?;
                                // Receipts open the window: send what it now allows.
                                if let Err(e) = pump(&mut link, &session, &mut sent_upto).await {
                                    lost_relay(&mut link, &mut accepted, output, &e);
                                    reconnect_at = Instant::now() + backoff.step();
                                }
                                for seq in newly {
                                    accepted.remove(&seq);
                                    if seq != HELLO_SEQ {
                                        output.emit(json!({"event": "delivered", "sid": session.sid(), "seq": seq}));
                                    }
                                }
                            }
                        }
                        Ok(Some((Receipt::Read { upto }, _))) => {
                            output.emit(json!({"event": "read", "sid": session.sid(), "upto": upto}));
                        }
                        Ok(None) => {}
                        Err(e) => output.emit(error_event("rejected_receipt", &format!("a receipt was rejected: {e}"))),
                    },
                    FrameType::Delivered => {
                        if let Some(seq) = msg_seq(&env)
                            && session.unacked().any(|(s, _)| s == seq)
                            && accepted.insert(seq)
                            && seq != HELLO_SEQ
                        {
                            output.emit(json!({"event": "sent", "sid": session.sid(), "seq": seq}));
                        }
                    }
                    FrameType::PeerOnline => {
                        peer_online = true;
                        told_waiting = false;
                        output.emit(json!({"event": "peer_online", "sid": session.sid(), "peer": session.peer_name()}));
                        // What the peer's last connection had not yet written may be lost.
                        sent_upto = 0;
                        if let Err(e) = pump(&mut link, &session, &mut sent_upto).await {
                            lost_relay(&mut link, &mut accepted, output, &e);
                            reconnect_at = Instant::now() + backoff.step();
                        }
                    }
                    FrameType::PeerOffline => {
                        peer_online = false;
                        output.emit(json!({"event": "peer_offline", "sid": session.sid(), "peer": session.peer_name()}));
                    }
                    FrameType::Error => {
                        let (code, message) = error_fields(&env);
                        match (msg_seq(&env), code.as_str()) {
                            // Not kept by the relay: it goes again when the peer is back.
                            (Some(seq), "mailbox_full" | "peer_offline" | "not_paired") => {
                                accepted.remove(&seq);
                                if code == "mailbox_full" {
                                    output.emit(json!({"event": "error", "code": "mailbox_full", "seq": seq,
                                        "message": format!("message {seq} is not at the relay yet (the offline peer's mailbox is full); it is kept and sent when the peer is back")}));
                                }
                            }
                            (Some(seq), _) => output.emit(error_event("refused_message",
                                &format!("message {seq} was refused by the relay: {message} ({code})"))),
                            (None, "replaced") => return Err(ClientError::SessionTakenOver),
                            (None, "not_member") => {
                                // The relay lost our seat (e.g. it restarted under us): attach again.
                                lost_relay(&mut link, &mut accepted, output,
                                    &ClientError::ConnectionLost("the relay no longer counts this client in the session".into()));
                                reconnect_at = Instant::now();
                            }
                            (None, _) => output.emit(error_event(&code, &message)),
                        }
                    }
                    _ => {}
                }
            }
            () = tokio::time::sleep_until(reconnect_at), if link.is_none() => {
                match attach(&session, &opts.dialer, output).await {
                    Ok((relay, online)) => {
                        backoff.reset();
                        peer_online = online;
                        told_waiting = false;
                        output.emit(json!({"event": "relay_online", "sid": session.sid(), "peer_online": online}));
                        link = Some(relay);
                        sent_upto = 0;
                        if let Err(e) = pump(&mut link, &session, &mut sent_upto).await {
                            lost_relay(&mut link, &mut accepted, output, &e);
                            reconnect_at = Instant::now() + backoff.step();
                        }
                    }
                    // The relay answered and refused: trying again will not help. Nor does it
                    // for a certificate this client refuses (renewed from another CA, or
                    // someone in between): retrying in silence would hide it.
                    Err(e @ (ClientError::ResumeRefused { .. } | ClientError::RelayCertificate { .. })) => return Err(e),
                    Err(_) => reconnect_at = Instant::now() + backoff.step(),
                }
            }
            _ = retransmit.tick(), if link.is_some() && peer_online && session.has_unacked() => {
                let oldest = session.unacked().next().map(|(seq, _)| seq);
                if oldest == acked_at_last_tick {
                    sent_upto = 0;
                    if let Err(e) = pump(&mut link, &session, &mut sent_upto).await {
                        lost_relay(&mut link, &mut accepted, output, &e);
                        reconnect_at = Instant::now() + backoff.step();
                    }
                }
                acked_at_last_tick = oldest;
            }
        }
    }
}

/// The connection to the relay is gone: say so; the loop reconnects.
fn lost_relay(
    link: &mut Option<RelayLink>,
    accepted: &mut BTreeSet<u64>,
    output: &mut Output,
    why: &ClientError,
) {
    *link = None;
    accepted.clear();
    output.emit(json!({"event": "relay_offline", "message": why.to_string()}));
}

/// Handles a received `MSG`: records what is now due, then shows it. Returns how many chat
/// lines were shown.
fn receive(
    session: &mut Session,
    env: &Envelope<'_>,
    store: &Store,
    state: &mut StateFile,
    output: &mut Output,
) -> Result<u64, ClientError> {
    // Late handshake notices (a repeated confirmation) carry a `kind`; they are not chat.
    if msg_kind(env).is_some() {
        return Ok(0);
    }
    let received = match session.receive(env) {
        Ok(received) => received,
        Err(e) => {
            let code = match e {
                ReceiveError::Replayed { .. } | ReceiveError::Ratchet(RatchetError::KeyGone) => {
                    "replayed_message"
                }
                ReceiveError::Ratchet(RatchetError::TooFarAhead { .. }) => "message_too_far_ahead",
                ReceiveError::Crypto(_) | ReceiveError::Ratchet(_) => "rejected_message",
                ReceiveError::Malformed | ReceiveError::Content => "malformed_message",
            };
            output.emit(error_event(
                code,
                &format!("a message was rejected and not shown: {e}"),
            ));
            return Ok(0);
        }
    };
    if received.held {
        // Decrypted ahead of a gap: its key is gone, so it must be on disk before anything
        // else happens.
        persist(store, state, session)?;
    }
    if received.due.is_empty() {
        return Ok(0);
    }
    session.touch(now_secs());
    let mut lines = Vec::new();
    for incoming in received.due {
        match incoming.plain {
            Plain::Hello { name } => session.set_peer_name(name),
            Plain::Text { text } => lines.push((incoming.seq, text)),
            Plain::Unknown => output.emit(error_event(
                "unknown_message",
                &format!(
                    "message {} authenticated but is not understood (a kind from a newer version, or malformed content); it was received but cannot be shown",
                    incoming.seq
                ),
            )),
        }
    }
    // Recorded, together with the lines themselves as not yet shown, before they are shown;
    // then recorded as shown. A crash in between shows them at the next start (the same `seq`
    // again, at worst, never a gap).
    session.set_unshown(lines.clone());
    state.upsert(session.record());
    store.save_visible(state)?;
    for (seq, text) in &lines {
        output.emit(message_event(session, *seq, text));
    }
    session.set_unshown(Vec::new());
    persist(store, state, session)?;
    Ok(lines.len() as u64)
}

/// The bytes of frames in the outboxes of the sessions stored in `state` other than `sid`.
fn others_outbox_bytes(state: &StateFile, sid: &str) -> usize {
    state
        .sessions
        .iter()
        .filter(|s| s.sid != sid)
        .flat_map(|s| &s.outbox)
        .fold(0usize, |sum, entry| sum.saturating_add(entry.frame.len()))
}

/// Reading input stops: the outbox holds as much as it may (protocol.md 3.7).
fn outbox_full_event(session: &Session) -> serde_json::Value {
    let pending = session.outbox_len();
    json!({
        "event": "outbox_full",
        "sid": session.sid(),
        "pending": pending,
        "last_seq": session.last_sealed(),
        "message": format!(
            "{pending} message(s) wait for your peer's receipts, as many as are kept (at most {MAX_OUTBOX} messages or {} MiB{}); reading input is paused until some are delivered (further lines wait, unread)",
            MAX_OUTBOX_BYTES / (1024 * 1024),
            if session.outbox_budget_shared() {
                ", less here because other sessions stored under this name hold unacknowledged messages too: resuming them frees room"
            } else {
                ""
            }
        ),
    })
}

/// Reading input goes on: receipts made room in the outbox.
fn outbox_ready_event(session: &Session) -> serde_json::Value {
    let pending = session.outbox_len();
    json!({
        "event": "outbox_ready",
        "sid": session.sid(),
        "pending": pending,
        "message": format!("receipts made room in the outbox ({pending} message(s) still wait); reading input again"),
    })
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

fn paired_event(session: &Session) -> serde_json::Value {
    json!({
        "event": "paired",
        "sid": session.sid(),
        "role": session.role().to_string(),
        "peer": session.peer_name(),
        "safety_number": session.safety_number(),
    })
}

fn message_event(session: &Session, seq: u64, text: &str) -> serde_json::Value {
    let now = chrono::Local::now();
    json!({
        "event": "message",
        "sid": session.sid(),
        "seq": seq,
        "from": session.peer_name().unwrap_or("peer"),
        "text": text,
        "time": now.to_utc().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "local_time": now.format("%H:%M:%S").to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay (or path) that stops reading: writes block once the socket buffers are full.
    /// They must fail within the liveness bound, not wait for ever (the chat loop would hang
    /// in the middle of a resend).
    #[tokio::test]
    async fn a_relay_that_stops_reading_is_given_up_on_not_waited_for() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let _ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            std::future::pending::<()>().await;
        });
        let dialer = Dialer::new(Duration::from_millis(500), None).unwrap();
        let mut output = Output::new(true);
        let mut link = RelayLink::connect(&dialer, &format!("ws://{addr}"), &mut output)
            .await
            .unwrap();
        let frame = "x".repeat(60_000);
        let failed = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Err(e) = link.send(frame.clone()).await {
                    return e;
                }
            }
        })
        .await
        .expect("a write to a relay that stopped reading blocked for ever");
        assert!(
            matches!(&failed, ClientError::ConnectionLost(m) if m.contains("took no data")),
            "{failed}"
        );
    }

    /// The file's outbox budget is shared: a session counts its siblings' outboxes, not its
    /// own (its own is in the session).
    #[test]
    fn the_outbox_budget_counts_the_other_sessions_of_the_file() {
        let record = |sid: &str, lens: &[usize]| {
            let ratchet = crate::ratchet::Ratchet::responder(
                crate::keys::SecretKey::from_bytes([1; 32]),
                crate::dh::DhKeyPair::generate().unwrap(),
            );
            let mut record = Session::new(crate::session::NewSession {
                sid: sid.into(),
                sid_bytes: [0; 16],
                role: parley_state::Role::Host,
                relay_url: "ws://x".into(),
                resume_token: parley_state::Secret::new("t".into()),
                restore_proof: parley_state::Secret::new("p".into()),
                ratchet,
                safety_number: "0".into(),
                now: 0,
            })
            .record();
            record.outbox = lens
                .iter()
                .zip(1..)
                .map(|(len, seq)| parley_state::OutboxEntry {
                    seq,
                    frame: "x".repeat(*len),
                })
                .collect();
            record
        };
        let mut state = StateFile::new("alice");
        assert_eq!(others_outbox_bytes(&state, "a"), 0);
        state.upsert(record("a", &[100, 50]));
        state.upsert(record("b", &[1000]));
        assert_eq!(others_outbox_bytes(&state, "a"), 1000);
        assert_eq!(others_outbox_bytes(&state, "b"), 150);
        assert_eq!(others_outbox_bytes(&state, "c"), 1150);
    }

    /// protocol.md 3.7 ("Liveness") gives the client's bounds.
    #[test]
    fn protocol_md_states_the_liveness_bounds() {
        const DOCUMENT: &str = include_str!("../../protocol.md");
        let ping = format!(
            "after {} s of\nsilence the client sends a `PING`",
            (IDLE_TIMEOUT / 2).as_secs_f64()
        );
        let dead = format!(
            "after {} s (the relay's own idle limit)",
            IDLE_TIMEOUT.as_secs()
        );
        for stated in [ping, dead] {
            assert!(
                DOCUMENT.contains(&stated),
                "protocol.md must say `{stated}`"
            );
        }
    }
}
