//! The async driver: moves frames between the relay socket and the sans-IO handshake and
//! conversation, lines from stdin into the conversation, its events to stdout and its records
//! to the state file, and wakes it when it asks. All protocol decisions are made in
//! `handshake`, `conversation` and `session`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_protocol::limits::MAX_FRAME_BYTES;
use parley_state::{StateFile, Store};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};

use crate::code::InviteCode;
use crate::conversation::{Config, Conversation, Durability, Event, Frame, LinkAction};
use crate::disk_files::DiskFiles;
use crate::error::ClientError;
use crate::handshake::{Guest, Host, Pairing, PairingError, Step};
use crate::liveness::{Alarm, Liveness, pong_for};
use crate::output::{Output, chat_event, error_event, human_size, printable};
use crate::session::Session;
use crate::transfers::{FileConfig, FileEvent, LocalFile, SyncDone, Transfers};
use crate::transport::{Dialer, RelaySocket};

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
    /// Files: how offers are answered, where they land, how large they may be.
    pub files: FileConfig,
    /// Exit once this many files have been received and verified.
    pub exit_after_files: Option<u64>,
    /// Opens relay connections: `ws://` or `wss://`, the certificates to trust, and the
    /// liveness bound (a connection that delivers no frame at all for that long is dead; we
    /// PING it half-way through the silence first, see [`crate::liveness`]).
    pub dialer: Dialer,
}

/// The default liveness bound of [`Dialer::new`]: the relay's own idle limit. A live relay PINGs
/// every 10 s (protocol.md 2.6), so a healthy connection is never silent that long.
pub const IDLE_TIMEOUT: Duration = parley_protocol::limits::IDLE_TIMEOUT;

pub enum Command {
    Host,
    Join(InviteCode),
    Resume(Option<String>),
    /// Resume (the only stored session, or the one named), send these files and folders,
    /// exit once the peer has every one, verified.
    Send {
        sid: Option<String>,
        /// `--as`: the name to offer the one file under.
        as_name: Option<String>,
        paths: Vec<PathBuf>,
    },
    Sessions,
}

pub async fn run(command: Command, opts: Options) -> Result<(), ClientError> {
    let mut output = Output::new(opts.json);
    // A timeout too long for the clock (`--timeout` is any u64) means none.
    let deadline = opts.timeout.and_then(|t| Instant::now().checked_add(t));
    let result = within(
        deadline,
        opts.timeout,
        run_command(command, &opts, deadline, &mut output),
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
    deadline: Option<Instant>,
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
            let interactive = is_interactive(output);
            let config = conversation_config(opts, deadline, &state, &session, interactive);
            let mut conversation =
                Conversation::paired(session, relay.liveness.clone(), now(), config);
            let sid = conversation.session().sid().to_owned();
            let mut files = Transfers::new(
                Box::new(DiskFiles::default()),
                opts.files.clone(),
                &sid,
                &[],
                &[],
            );
            ask_about_files(&mut files, output, interactive, opts);
            conversation.set_files(files);
            let link = Some(relay);
            chat(
                conversation,
                link,
                interactive,
                &store,
                &mut state,
                opts,
                output,
            )
            .await
        }
        Command::Resume(_) | Command::Send { .. } => {
            let (sid, to_send) = match command {
                Command::Send {
                    sid,
                    as_name,
                    paths,
                } => (sid, Some(files_to_send(&paths, as_name)?)),
                Command::Resume(sid) => (sid, None),
                _ => (None, None),
            };
            let (store, mut state) = open_state(opts, true, output)?;
            let record = pick_session(&state, sid.as_deref())?;
            let session = Session::from_record(record).map_err(|record| ClientError::Damaged {
                path: store.path().to_path_buf(),
                record,
            })?;
            let mut files = Transfers::new(
                Box::new(DiskFiles::default()),
                opts.files.clone(),
                session.sid(),
                &record.files_out,
                &record.files_in,
            );
            // `send` reads no lines: its input is the files.
            let interactive = to_send.is_none() && is_interactive(output);
            ask_about_files(&mut files, output, interactive, opts);
            let config = conversation_config(opts, deadline, &state, &session, interactive);
            let mut conversation = Conversation::resume(session, now(), config);
            if let Some(to_send) = to_send {
                files.send(to_send);
                conversation.handle_input_closed(now());
            }
            conversation.set_files(files);
            chat(
                conversation,
                None,
                interactive,
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
    /// Liveness while pairing ([`RelayLink::recv`]); a chat's conversation keeps its own.
    liveness: Liveness,
    idle: Duration,
}

/// What one read from the relay connection brought.
enum Arrived {
    Text(String),
    /// A binary message: a DATA frame (protocol.md 2.2), or something the conversation
    /// ignores.
    Data(tokio_tungstenite::tungstenite::Bytes),
    /// A WebSocket control frame: a sign of life, nothing more.
    Other,
}

/// A write that makes no progress for the liveness bound (the socket's buffers are full: the
/// relay or the path stopped reading) means the connection is dead, like silence does
/// (protocol.md 3.7, "Liveness").
async fn within_idle(
    idle: Duration,
    write: impl std::future::Future<Output = Result<(), WsError>>,
) -> Result<(), ClientError> {
    match tokio::time::timeout(idle, write).await {
        Ok(written) => written.map_err(|e| ClientError::ConnectionLost(e.to_string())),
        Err(_) => Err(ClientError::ConnectionLost(format!(
            "the relay took no data for {:.1} s",
            idle.as_secs_f64()
        ))),
    }
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
            liveness: Liveness::new(now(), dialer.idle()),
            idle: dialer.idle(),
        })
    }

    /// Sends one frame now (protocol.md 3.7, "Liveness", bounds the write).
    async fn send(&mut self, frame: impl Into<Frame>) -> Result<(), ClientError> {
        self.feed(frame).await?;
        self.flush().await
    }

    /// Queues one frame for the next [`RelayLink::flush`] (writing out what no longer fits).
    async fn feed(&mut self, frame: impl Into<Frame>) -> Result<(), ClientError> {
        let message = match frame.into() {
            Frame::Text(text) => Message::Text(text.into()),
            Frame::Data(bytes) => Message::Binary(bytes.into()),
        };
        let idle = self.idle;
        within_idle(idle, self.ws.feed(message)).await
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        let idle = self.idle;
        within_idle(idle, self.ws.flush()).await
    }

    /// The next message from the relay, as it comes. Cancel-safe.
    async fn next(&mut self) -> Result<Arrived, ClientError> {
        match self.ws.next().await {
            Some(Ok(Message::Text(text))) => Ok(Arrived::Text(text.to_string())),
            Some(Ok(Message::Binary(bytes))) => Ok(Arrived::Data(bytes)),
            Some(Ok(Message::Close(frame))) => {
                let why = frame
                    .map(|f| f.reason.to_string())
                    .unwrap_or_else(|| "closed".into());
                Err(ClientError::ConnectionLost(format!(
                    "the relay closed the connection ({why})"
                )))
            }
            Some(Ok(_)) => Ok(Arrived::Other),
            // The rest of that frame is still on the socket: the connection cannot go on.
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                Err(ClientError::RelayProtocol(format!(
                    "it sent a frame larger than the protocol's limit of {MAX_FRAME_BYTES} bytes"
                )))
            }
            Some(Err(e)) => Err(ClientError::ConnectionLost(e.to_string())),
            None => Err(ClientError::ConnectionLost(
                "the relay closed the connection".into(),
            )),
        }
    }

    /// The next text frame, while pairing. The relay's `PING`s are answered here and not
    /// returned; silence is checked as [`Liveness`] says (a chat's conversation does both
    /// itself). Cancel-safe: the liveness state lives in `self`, not in this future.
    async fn recv(&mut self) -> Result<String, ClientError> {
        loop {
            let next = match self.liveness.poll_timeout() {
                Some(at) => match tokio::time::timeout_at(at.into(), self.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        match self.liveness.handle_timeout(now()) {
                            Some(Alarm::Ping(frame)) => self.send(frame).await?,
                            Some(Alarm::Dead(e)) => return Err(e),
                            None => {}
                        }
                        continue;
                    }
                },
                // A bound too large for the clock: no liveness check.
                None => self.next().await,
            };
            self.liveness.heard(now());
            if let Arrived::Text(text) = next? {
                match pong_for(&text) {
                    Some(pong) => self.send(pong).await?,
                    None => return Ok(text),
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

// ---------------------------------------------------------------------------------------------
// Chatting

/// Whether a person types and reads: stdin and stdout are a terminal, and no `--json`.
fn is_interactive(output: &Output) -> bool {
    !output.is_json() && std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// Offers are asked about when a person reads and types here (and `--accept-files` does not
/// take them anyway): otherwise they are declined.
fn ask_about_files(files: &mut Transfers, output: &mut Output, interactive: bool, opts: &Options) {
    files.ask_person(interactive);
    output.set_asking(interactive && !opts.files.accept);
}

/// Lines from stdin, read on a thread of their own (blocking reads, or the line editor on a
/// terminal). The channel closes at end of input. On a terminal, after each line the editor
/// waits for the prompt of the next (sent on the second channel once the line is handled):
/// a question about a file is the prompt while it is open.
fn spawn_input(
    output: &mut Output,
    interactive: bool,
    first_prompt: String,
) -> (
    mpsc::Receiver<String>,
    Option<std::sync::mpsc::Sender<String>>,
) {
    let (tx, rx) = mpsc::channel(64);
    let (prompt_tx, prompt_rx) = std::sync::mpsc::channel::<String>();
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
                let mut prompt = first_prompt;
                // Ctrl-D or Ctrl-C end the input, like end of file.
                while let Ok(line) = editor.readline(&prompt) {
                    if tx.blocking_send(line).is_err() {
                        break;
                    }
                    match prompt_rx.recv() {
                        Ok(next) => prompt = next,
                        Err(_) => break,
                    }
                }
            });
            return (rx, Some(prompt_tx));
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
    (rx, None)
}

/// The line editor's prompt when no question is open.
const CHAT_PROMPT: &str = "> ";

/// The prompt for the next line: the question about a file while one is open.
fn next_prompt(conversation: &Conversation) -> String {
    match conversation.files().and_then(Transfers::question) {
        Some((_, name, size)) => format!(
            "accept {} ({})? [y/N] ",
            crate::output::cut_to_width(&printable(&name), 40),
            human_size(size)
        ),
        None => CHAT_PROMPT.to_string(),
    }
}

/// A line typed in the chat: the answer to a question, a command (on a terminal: `/send
/// PATH`; `//` starts a line that begins with `/`), or a message. True when it started
/// reading a `/send`'s files (they come back on `hashed`).
fn take_line(
    conversation: &mut Conversation,
    line: String,
    interactive: bool,
    output: &mut Output,
    hashed: &mpsc::UnboundedSender<Hashed>,
) -> bool {
    let asked = conversation.files().and_then(Transfers::question).is_some();
    if !interactive || asked || !line.starts_with('/') {
        conversation.handle_line(now(), line);
        return false;
    }
    if let Some(text) = line.strip_prefix("//") {
        conversation.handle_line(now(), format!("/{text}"));
        return false;
    }
    let (command, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
    match command {
        "/send" if !rest.trim().is_empty() => {
            // Read and hashed on a blocking thread (a large file takes seconds: the chat,
            // and the answers to the relay's pings, go on meanwhile); offered when done.
            let path = chat_path(rest);
            let hashed = hashed.clone();
            tokio::task::spawn_blocking(move || {
                let files = local_files(std::slice::from_ref(&path));
                let _ = hashed.send(Hashed { path, files });
            });
            true
        }
        _ => {
            output.emit(error_event(
                "unknown_command",
                "not sent: commands are /send PATH (a file or a folder); start a line with // to send one that begins with /",
            ));
            false
        }
    }
}

/// Files a `/send` read and hashed, or why it could not.
struct Hashed {
    path: PathBuf,
    files: Result<Vec<LocalFile>, ClientError>,
}

/// Offers what a `/send` hashed.
fn offer_hashed(conversation: &mut Conversation, hashed: Hashed, output: &mut Output) {
    let Hashed { path, files } = hashed;
    match files {
        Ok(files) if files.is_empty() => output.emit(error_event(
            "nothing_to_send",
            &format!("{} holds no file to send", path.display()),
        )),
        Ok(files) => {
            let size = files.iter().fold(0u64, |n, f| n.saturating_add(f.size));
            let what = match files.as_slice() {
                [one] => one.name.clone(),
                many => format!("{} files", many.len()),
            };
            output.emit(json!({"event": "notice", "message": format!(
                "offering {what} ({}); it goes once your peer accepts",
                human_size(size)
            )}));
            conversation.send_files(now(), files);
        }
        Err(e) => output.emit(error_event("unreadable_path", &e.to_string())),
    }
}

/// A path as typed after `/send`: spaces are part of it, quotes around it are dropped, and a
/// leading `~` is the home folder.
fn chat_path(typed: &str) -> PathBuf {
    let typed = typed.trim();
    let unquoted = ['"', '\'']
        .iter()
        .find_map(|q| typed.strip_prefix(*q).and_then(|t| t.strip_suffix(*q)))
        .unwrap_or(typed);
    let home = std::env::var_os("HOME").map(PathBuf::from);
    match (unquoted.strip_prefix('~'), home) {
        (Some(""), Some(home)) => home,
        (Some(rest), Some(home)) if rest.starts_with('/') => {
            home.join(rest.trim_start_matches('/'))
        }
        _ => PathBuf::from(unquoted),
    }
}

/// The clock, as the conversation takes it.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// What a conversation needs to know about this run.
fn conversation_config(
    opts: &Options,
    deadline: Option<Instant>,
    state: &StateFile,
    session: &Session,
    interactive: bool,
) -> Config {
    Config {
        interactive,
        exit_after: opts.exit_after,
        exit_after_files: opts.exit_after_files,
        deadline: deadline.map(|at| (at.into_std(), opts.timeout.map_or(0, |t| t.as_secs()))),
        idle: opts.dialer.idle(),
        // The other sessions stored here keep their outboxes (no other process writes this
        // file while we hold its lock): this one gets what the file's budget leaves.
        others_outbox_bytes: others_outbox_bytes(state, session.sid()),
        unix_now: now_secs(),
    }
}

/// Runs a conversation: moves frames between it and the relay, lines from stdin into it, its
/// events to the output and its records to the state file, and wakes it when it asks. Every
/// decision is the conversation's.
async fn chat(
    mut conversation: Conversation,
    mut link: Option<RelayLink>,
    interactive: bool,
    store: &Store,
    state: &mut StateFile,
    opts: &Options,
    output: &mut Output,
) -> Result<(), ClientError> {
    // Started once the chat has begun and wants lines (after "paired" or "resumed").
    let mut input: Option<mpsc::Receiver<String>> = None;
    // The line editor waits for the next prompt after each line (a terminal only).
    let mut prompt: Option<std::sync::mpsc::Sender<String>> = None;
    let mut prompt_due = false;
    // `.part`s are synced on blocking threads (a sync may take milliseconds); their results
    // come back here.
    let (synced_tx, mut synced) = mpsc::unbounded_channel();
    // Files a `/send` hashed on a blocking thread. Meanwhile no further line is read: what
    // follows it (Ctrl-D, say) is taken once its files are offered, as typed.
    let (hashed_tx, mut hashed) = mpsc::unbounded_channel();
    let mut hashing = false;
    loop {
        drain(
            &mut conversation,
            &mut link,
            &synced_tx,
            store,
            state,
            opts,
            output,
        )
        .await?;
        if std::mem::take(&mut prompt_due)
            && let Some(prompt) = &prompt
        {
            let _ = prompt.send(next_prompt(&conversation));
        }
        if let Some(end) = conversation.poll_end() {
            if end.is_ok()
                && let Some(relay) = link.take()
            {
                relay.close().await;
            }
            return end;
        }
        let reading = conversation.wants_input() && !hashing;
        if reading && input.is_none() {
            let (lines, prompts) = spawn_input(output, interactive, next_prompt(&conversation));
            input = Some(lines);
            prompt = prompts;
        }
        let wake = conversation.poll_timeout();
        tokio::select! {
            // A sync's end first (rare, and what a sender's window may wait for). Then what
            // has arrived, before a timer fires (a liveness check must not count as silence a
            // frame that is already waiting), and before new input.
            biased;
            Some(done) = synced.recv() => conversation.handle_synced(now(), done),
            Some(files) = hashed.recv() => {
                hashing = false;
                offer_hashed(&mut conversation, files, output);
            }
            arrived = next_arrival(&mut link) => {
                match arrived {
                    Ok(Arrived::Text(text)) => conversation.handle_frame(now(), &text),
                    Ok(Arrived::Data(bytes)) => conversation.handle_data(now(), &bytes),
                    Ok(Arrived::Other) => conversation.handle_traffic(now()),
                    Err(e) => {
                        link = None;
                        conversation.handle_disconnected(now(), e);
                    }
                }
                // A steady stream of frames (a file arriving) keeps this branch ready: timers
                // that are due, and lines typed meanwhile, are taken here too, so that they
                // never wait for the stream to pause.
                if wake.is_some_and(|at| at <= now()) {
                    conversation.handle_timeout(now());
                }
                if !hashing {
                    prompt_due |= take_waiting_lines(
                        &mut conversation,
                        &mut input,
                        interactive,
                        output,
                        (&hashed_tx, &mut hashing),
                    );
                }
            }
            () = sleep_until(wake) => conversation.handle_timeout(now()),
            line = next_line(&mut input), if reading => match line {
                Some(line) => {
                    prompt_due = true;
                    hashing = take_line(&mut conversation, line, interactive, output, &hashed_tx);
                    if !hashing {
                        take_waiting_lines(
                            &mut conversation,
                            &mut input,
                            interactive,
                            output,
                            (&hashed_tx, &mut hashing),
                        );
                    }
                }
                None => conversation.handle_input_closed(now()),
            },
        }
    }
}

/// Lines already typed go in the same batch (one save), as many as the outbox has room for,
/// up to a `/send` (whose files are read first). Whether any was taken.
fn take_waiting_lines(
    conversation: &mut Conversation,
    input: &mut Option<mpsc::Receiver<String>>,
    interactive: bool,
    output: &mut Output,
    (hashed, hashing): (&mpsc::UnboundedSender<Hashed>, &mut bool),
) -> bool {
    let mut taken = false;
    while conversation.wants_input()
        && !*hashing
        && let Some(waiting) = input
    {
        match waiting.try_recv() {
            Ok(line) => {
                taken = true;
                *hashing = take_line(conversation, line, interactive, output, hashed);
            }
            Err(mpsc::error::TryRecvError::Disconnected) => {
                conversation.handle_input_closed(now());
                break;
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
        }
    }
    taken
}

/// Carries out what the conversation decided, in its order: frames, events, saves, dialing.
/// A failed save ends the run there (nothing after it may happen).
async fn drain(
    conversation: &mut Conversation,
    link: &mut Option<RelayLink>,
    synced: &mpsc::UnboundedSender<SyncDone>,
    store: &Store,
    state: &mut StateFile,
    opts: &Options,
    output: &mut Output,
) -> Result<(), ClientError> {
    // Frames written one after another go out in one flush (a window of file chunks is a
    // few hundred KB): flushed as soon as no frame is next.
    let mut unflushed = false;
    loop {
        if let Some(frame) = conversation.poll_transmit() {
            if let Some(relay) = link {
                let written = if conversation.write_is_fatal() {
                    relay.send(frame).await
                } else {
                    unflushed = true;
                    relay.feed(frame).await
                };
                if let Err(e) = written {
                    *link = None;
                    conversation.handle_disconnected(now(), e);
                }
            }
        } else if std::mem::take(&mut unflushed) {
            if let Some(relay) = link
                && let Err(e) = relay.flush().await
            {
                *link = None;
                conversation.handle_disconnected(now(), e);
            }
        } else if let Some(event) = conversation.poll_event() {
            if let Event::File(file) = &event
                && let Some(files) = conversation.files()
            {
                note_file(output, files, file);
            }
            output.emit(chat_event(&event, conversation.session()));
        } else if let Some(save) = conversation.poll_save() {
            state.upsert(save.record);
            match save.durability {
                Durability::Durable => store.save(state)?,
                Durability::Visible => store.save_visible(state)?,
            }
        } else if let Some(job) = conversation.poll_sync() {
            let synced = synced.clone();
            tokio::task::spawn_blocking(move || synced.send(job.run()));
        } else if let Some(action) = conversation.poll_link() {
            *link = None;
            if action == LinkAction::Dial {
                let url = conversation.session().relay_url().to_owned();
                match RelayLink::connect(&opts.dialer, &url, output).await {
                    Ok(relay) => {
                        *link = Some(relay);
                        conversation.handle_connected(now());
                    }
                    Err(e) => conversation.handle_disconnected(now(), e),
                }
            }
        } else {
            return Ok(());
        }
    }
}

/// Tells the output a file's name and size before its event, for its human lines.
fn note_file(output: &mut Output, files: &Transfers, event: &FileEvent) {
    let id = match event {
        FileEvent::Progress { id, .. }
        | FileEvent::Sent { id, .. }
        | FileEvent::Received { id, .. }
        | FileEvent::Failed { id, .. } => id,
        FileEvent::Offer { .. } | FileEvent::Question { .. } => return,
    };
    if let Some((name, size)) = files.describe(id) {
        output.note_file(id, &name, size);
    }
}

/// The next input line, or never when input is not read.
async fn next_line(input: &mut Option<mpsc::Receiver<String>>) -> Option<String> {
    match input {
        Some(lines) => lines.recv().await,
        None => std::future::pending().await,
    }
}

/// The next message from the relay, or never when there is no connection.
async fn next_arrival(link: &mut Option<RelayLink>) -> Result<Arrived, ClientError> {
    match link {
        Some(relay) => relay.next().await,
        None => std::future::pending().await,
    }
}

/// Until `at`, or for ever.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------------
// Files

/// [`local_files`], the one file renamed if `--as` says so.
fn files_to_send(
    paths: &[PathBuf],
    as_name: Option<String>,
) -> Result<Vec<LocalFile>, ClientError> {
    let mut files = local_files(paths)?;
    if let Some(name) = as_name {
        match files.as_mut_slice() {
            [one] if paths.len() == 1 && paths.first() == Some(&one.path) => one.name = name,
            _ => {
                return Err(ClientError::Usage(
                    "--as names one file: give exactly one PATH, a file".into(),
                ));
            }
        }
    }
    Ok(files)
}

/// The files to send: each file as its name, each folder as its files (not following links)
/// named by their paths relative to it, `/` between components. Each is hashed here, before
/// it is offered (the offer carries its SHA-256).
fn local_files(paths: &[PathBuf]) -> Result<Vec<LocalFile>, ClientError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| unreadable(path, &e))?;
        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut Vec::new(), &mut found)?;
            found.sort();
            for (relative, file) in found {
                files.push(local_file(format!("{base}/{relative}"), file)?);
            }
        } else {
            files.push(local_file(base, path.clone())?);
        }
    }
    Ok(files)
}

/// The regular files below `dir`, with their paths relative to where the walk began.
fn walk(
    dir: &Path,
    prefix: &mut Vec<String>,
    found: &mut Vec<(String, PathBuf)>,
) -> Result<(), ClientError> {
    let entries = std::fs::read_dir(dir).map_err(|e| unreadable(dir, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| unreadable(dir, &e))?;
        let kind = entry
            .file_type()
            .map_err(|e| unreadable(&entry.path(), &e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        prefix.push(name);
        if kind.is_dir() {
            walk(&entry.path(), prefix, found)?;
        } else if kind.is_file() {
            found.push((prefix.join("/"), entry.path()));
        }
        prefix.pop();
    }
    Ok(())
}

fn local_file(name: String, path: PathBuf) -> Result<LocalFile, ClientError> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(&path).map_err(|e| unreadable(&path, &e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| unreadable(&path, &e))?;
        let Some(read) = buf.get(..n).filter(|_| n > 0) else {
            break;
        };
        hasher.update(read);
        size = size.saturating_add(n as u64);
    }
    Ok(LocalFile {
        name,
        path,
        size,
        sha256: hasher.finalize().into(),
    })
}

fn unreadable(path: &Path, e: &std::io::Error) -> ClientError {
    ClientError::Usage(format!("cannot read {}: {e}", path.display()))
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

    /// `/send PATH`: spaces belong to the path, quotes around it go, `~/` is home.
    #[test]
    fn a_path_typed_after_send_is_taken_whole() {
        assert_eq!(chat_path(" my file.pdf "), PathBuf::from("my file.pdf"));
        assert_eq!(chat_path("\"/a b/c d\""), PathBuf::from("/a b/c d"));
        assert_eq!(chat_path("'x y'"), PathBuf::from("x y"));
        assert_eq!(chat_path("~user/x"), PathBuf::from("~user/x"));
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(
                chat_path("~/in box/f"),
                PathBuf::from(&home).join("in box/f")
            );
            assert_eq!(chat_path("~"), PathBuf::from(home));
        }
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
