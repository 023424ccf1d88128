//! What the client tells its user: human lines, or NDJSON events for scripts (`--json`).
//!
//! Every event is one JSON object on one line of stdout with an `event` field; see README.md
//! ("Scripting") for the list. Human output goes through the line editor's printer when one is
//! active, so that an incoming message never garbles the line being typed.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use unicode_width::UnicodeWidthChar;

use crate::conversation::Event;
use crate::session::{MAX_OUTBOX, MAX_OUTBOX_BYTES, Session};
use crate::transfers::FileEvent;

/// Prints above the line being edited (rustyline's external printer).
pub type LinePrinter = Box<dyn rustyline::ExternalPrinter + Send>;

pub struct Output {
    json: bool,
    printer: Option<LinePrinter>,
    /// Stdout is a terminal: progress is drawn (one line, redrawn in place).
    terminal: bool,
    /// Offers are asked about: the question tells of the offer, so the offer line is left out.
    asking: bool,
    /// What is known of each file shown: its name and size, and where its progress began.
    files: HashMap<String, Shown>,
    /// The last line printed is a progress line: the next progress (or the file's last line)
    /// replaces it.
    progress_shown: bool,
    last_progress: Option<Instant>,
    /// The peer's name, from `paired` or `resumed` (file events do not carry it).
    peer: Option<String>,
}

/// A file as the person sees it.
struct Shown {
    name: String,
    size: u64,
    /// The first progress seen: when, and how many bytes then (the rate counts from there).
    first: Option<(Instant, u64)>,
}

/// Progress is redrawn at most this often (4 times a second), whatever the number of files.
const REDRAW_EVERY: Duration = Duration::from_millis(250);

/// A progress line is kept within this many columns, so that it never wraps on a common
/// terminal (a wrapped line could not be replaced in place).
const PROGRESS_COLUMNS: usize = 78;

impl Output {
    pub fn new(json: bool) -> Output {
        Output {
            json,
            printer: None,
            terminal: !json && std::io::stdout().is_terminal(),
            asking: false,
            files: HashMap::new(),
            progress_shown: false,
            last_progress: None,
            peer: None,
        }
    }

    /// Offers are asked about on this terminal (see [`Output::emit`]).
    pub fn set_asking(&mut self, asking: bool) {
        self.asking = asking;
    }

    /// The name and size of a file (by its id), for its human lines: the driver tells them
    /// from the transfers before it emits the file's events.
    pub fn note_file(&mut self, id: &str, name: &str, size: u64) {
        self.files.entry(id.to_string()).or_insert_with(|| Shown {
            name: name.to_string(),
            size,
            first: None,
        });
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    pub fn set_printer(&mut self, printer: LinePrinter) {
        self.printer = Some(printer);
    }

    /// Emits an event: the JSON object as is, or its human rendering (none for events a person
    /// does not need to see).
    pub fn emit(&mut self, event: Value) {
        if let Some(peer) = event.get("peer").and_then(Value::as_str) {
            self.peer = Some(peer.to_string());
        }
        if self.json {
            self.write_line(event.to_string());
        } else if event.get("event").and_then(Value::as_str) == Some("warning") {
            // Warnings are not part of the conversation: one line on stderr.
            eprintln!("parley: warning: {}", text(&event, "message"));
        } else if let Some(kind) = event
            .get("event")
            .and_then(Value::as_str)
            .filter(|k| k.starts_with("file_"))
        {
            self.file_line(kind, &event, Instant::now());
        } else if let Some(line) = human(&event) {
            self.write_line(line);
        }
    }

    /// A file's event, for a person: the question, progress drawn in place (on a terminal),
    /// and a last line when it is over.
    fn file_line(&mut self, kind: &str, event: &Value, now: Instant) {
        let id = event.get("id").and_then(Value::as_str).unwrap_or_default();
        let number = |key: &str| event.get(key).and_then(Value::as_u64).unwrap_or(0);
        if kind == "file_offer" || kind == "file_question" {
            self.note_file(id, &text(event, "name"), number("size"));
        }
        let (name, size) = match self.files.get(id) {
            Some(shown) => (printable(&shown.name), shown.size),
            None => (format!("file {}", id.get(..8).unwrap_or(id)), 0),
        };
        let peer = printable(self.peer.as_deref().unwrap_or("your peer"));
        let line = match kind {
            "file_offer" if self.asking => return,
            "file_offer" => format!("* {peer} offers {name}, {}", human_size(size)),
            "file_question" => format!("{peer} offers {name}, {}: accept? [y/N]", human_size(size)),
            "file_progress" => {
                let bytes = number("bytes");
                if !self.terminal
                    || self
                        .last_progress
                        .is_some_and(|at| now.saturating_duration_since(at) < REDRAW_EVERY)
                {
                    return;
                }
                let Some(shown) = self.files.get_mut(id) else {
                    return;
                };
                let (since, from) = *shown.first.get_or_insert((now, bytes));
                let line = progress_line(
                    &printable(&shown.name),
                    shown.size,
                    bytes,
                    bytes.saturating_sub(from),
                    now.saturating_duration_since(since),
                );
                self.last_progress = Some(now);
                self.write_progress(line);
                return;
            }
            "file_received" => format!(
                "* received {name} ({}) \u{2192} {}",
                human_size(number("size")),
                text(event, "path")
            ),
            "file_sent" => format!("* sent {name} ({})", human_size(number("size"))),
            "file_failed" => format!(
                "! {name}: {} ({})",
                text(event, "message"),
                text(event, "code")
            ),
            _ => return,
        };
        if matches!(kind, "file_received" | "file_sent" | "file_failed") {
            self.files.remove(id);
            self.write_over(line);
        } else {
            self.write_line(line);
        }
    }

    /// A progress line: it replaces the one printed just before, if that was one too.
    fn write_progress(&mut self, line: String) {
        self.write_over(line);
        self.progress_shown = true;
    }

    /// A line that takes the place of the progress line just above it, if the last line
    /// printed is one: the cursor moves onto it and clears it first. The line editor's
    /// printer clears its own rows (prompt and typed text), prints this, and repaints them
    /// below it, so they stay whole; only the progress line above is touched.
    fn write_over(&mut self, line: String) {
        if self.progress_shown {
            self.write_line(format!("\x1b[1A\x1b[2K{line}"));
        } else {
            self.write_line(line);
        }
    }

    fn write_line(&mut self, line: String) {
        self.progress_shown = false;
        if let Some(printer) = &mut self.printer
            && printer.print(format!("{line}\n")).is_ok()
        {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn text(event: &Value, key: &str) -> String {
    printable(event.get(key).and_then(Value::as_str).unwrap_or_default())
}

/// A size for people: bytes up to 999, then kB, MB, GB, TB (powers of 1000) with one
/// decimal below 100: `2.3 MB`.
pub fn human_size(bytes: u64) -> String {
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for next in ["kB", "MB", "GB", "TB", "PB", "EB"] {
        if value < 999.95 {
            break;
        }
        value /= 1000.0;
        unit = next;
    }
    if value < 99.95 {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.0} {unit}")
    }
}

/// A duration for people: `45s`, `3m 05s`, `2h 07m`.
fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// One file's progress: name, bytes done of its size, percent, rate and time left (once a
/// rate is known). `moved` bytes moved in `elapsed` give the rate. Kept within
/// [`PROGRESS_COLUMNS`]: the name is cut (with `…`) to make room.
pub fn progress_line(name: &str, size: u64, bytes: u64, moved: u64, elapsed: Duration) -> String {
    let percent = if size == 0 {
        100
    } else {
        u128::from(bytes.min(size)) * 100 / u128::from(size)
    };
    let mut rest = format!(
        "  {} / {}  {percent:>3}%",
        human_size(bytes),
        human_size(size)
    );
    let secs = elapsed.as_secs_f64();
    if moved > 0 && secs >= 0.2 {
        let rate = moved as f64 / secs;
        rest.push_str(&format!("  {}/s", human_size(rate as u64)));
        let left = (size.saturating_sub(bytes) as f64 / rate).ceil();
        if left.is_finite() && left < 1e9 {
            rest.push_str(&format!(
                "  {} left",
                human_duration(Duration::from_secs_f64(left.max(0.0)))
            ));
        }
    }
    let room = PROGRESS_COLUMNS.saturating_sub(rest.chars().count() + 2);
    format!("~ {}{rest}", cut_to_width(name, room.max(8)))
}

/// `s` cut to at most `columns` terminal columns, `…` marking a cut.
pub fn cut_to_width(s: &str, columns: usize) -> String {
    let width = |c: char| c.width().unwrap_or(1);
    if s.chars().map(width).sum::<usize>() <= columns {
        return s.to_string();
    }
    let mut out = String::new();
    let mut used = 1; // the `…`
    for c in s.chars() {
        used += width(c);
        if used > columns {
            break;
        }
        out.push(c);
    }
    out.push('\u{2026}');
    out
}

/// Text from the peer or the relay, made safe to print on a terminal: control characters
/// (C0 including ESC, DEL, and C1 including CSI: newlines and escape sequences that could
/// fake a line or rewrite the screen), Unicode line and paragraph separators, and bidi
/// overrides, isolates and marks become U+FFFD. JSON output needs none of this: serde escapes
/// control characters.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
                | '\u{200E}' | '\u{200F}' | '\u{061C}');
            let separator = matches!(c, '\u{2028}' | '\u{2029}');
            if c.is_control() || bidi || separator {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect()
}

fn human(event: &Value) -> Option<String> {
    let peer = || {
        let name = text(event, "peer");
        if name.is_empty() {
            "your peer".to_string()
        } else {
            name
        }
    };
    Some(match event.get("event").and_then(Value::as_str)? {
        // ("notice": a line for the person only, never emitted with `--json`.)
        "waiting" | "outbox_full" | "outbox_ready" | "notice" => {
            format!("* {}", text(event, "message"))
        }
        "invite" => format!(
            "Invite code: {code}\nRead it to your peer; they run: parley --name THEIR_NAME join {code}\n(it expires in {} minutes)",
            event.get("expires_in").and_then(Value::as_u64).unwrap_or(0) / 60,
            code = text(event, "code"),
        ),
        "paired" => format!(
            "Paired with {}. Safety number: {}\n(the same number on both screens means nobody is in between)\nType a message and press Enter; Ctrl-D to quit.",
            peer(),
            text(event, "safety_number")
        ),
        "resumed" => format!(
            "Resumed session with {} ({}). Safety number: {}.",
            peer(),
            if event.get("peer_online").and_then(Value::as_bool) == Some(true) {
                "online"
            } else {
                "offline"
            },
            text(event, "safety_number")
        ),
        "message" => format!(
            "[{}] {}: {}",
            text(event, "local_time"),
            text(event, "from"),
            text(event, "text")
        ),
        "peer_online" => format!("* {} is online", peer()),
        "peer_offline" => format!("* {} is offline; messages wait until they are back", peer()),
        "error" => format!("! {}", text(event, "message")),
        "session" => format!(
            "{}  {:<5}  peer {:<12}  created {}  last used {}  safety {}",
            text(event, "sid"),
            text(event, "role"),
            // The peer's self-chosen name: sanitised like every peer-controlled string.
            event
                .get("peer")
                .and_then(Value::as_str)
                .map_or_else(|| "?".to_string(), printable),
            text(event, "created"),
            text(event, "last_used"),
            text(event, "safety_number"),
        ),
        _ => return None,
    })
}

/// An `error` event for a problem that does not end the program.
pub fn error_event(code: &str, message: &str) -> Value {
    json!({"event": "error", "code": code, "message": message})
}

/// The event a conversation's [`Event`] is told as, for `session`.
pub fn chat_event(event: &Event, session: &Session) -> Value {
    let sid = session.sid();
    let peer = session.peer_name();
    match event {
        Event::Paired => json!({
            "event": "paired",
            "sid": sid,
            "role": session.role().to_string(),
            "peer": peer,
            "safety_number": session.safety_number(),
        }),
        Event::Resumed { peer_online } => json!({
            "event": "resumed",
            "sid": sid,
            "peer": peer,
            "peer_online": peer_online,
            "safety_number": session.safety_number(),
        }),
        Event::Message { seq, text } => {
            let now = chrono::Local::now();
            json!({
                "event": "message",
                "sid": sid,
                "seq": seq,
                "from": peer.unwrap_or("peer"),
                "text": text,
                "time": now.to_utc().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "local_time": now.format("%H:%M:%S").to_string(),
            })
        }
        Event::Sent { seq } => json!({"event": "sent", "sid": sid, "seq": seq}),
        Event::Delivered { seq } => json!({"event": "delivered", "sid": sid, "seq": seq}),
        Event::Read { upto } => json!({"event": "read", "sid": sid, "upto": upto}),
        Event::PeerOnline => json!({"event": "peer_online", "sid": sid, "peer": peer}),
        Event::PeerOffline => json!({"event": "peer_offline", "sid": sid, "peer": peer}),
        Event::RelayOffline { why } => json!({"event": "relay_offline", "message": why}),
        Event::RelayOnline { peer_online } => {
            json!({"event": "relay_online", "sid": sid, "peer_online": peer_online})
        }
        Event::Waiting { undelivered } => json!({
            "event": "waiting",
            "sid": sid,
            "undelivered": undelivered,
            "message": format!(
                "waiting for {} to receive {undelivered} message(s); Ctrl-C stops (they are kept and sent on the next resume)",
                peer.unwrap_or("your peer")
            ),
        }),
        // Reading input stops: the outbox holds as much as it may (protocol.md 3.7).
        Event::OutboxFull {
            pending,
            last_seq,
            budget_shared,
        } => json!({
            "event": "outbox_full",
            "sid": sid,
            "pending": pending,
            "last_seq": last_seq,
            "message": format!(
                "{pending} message(s) wait for your peer's receipts, as many as are kept (at most {MAX_OUTBOX} messages or {} MiB{}); reading input is paused until some are delivered (further lines wait, unread)",
                MAX_OUTBOX_BYTES / (1024 * 1024),
                if *budget_shared {
                    ", less here because other sessions stored under this name hold unacknowledged messages too: resuming them frees room"
                } else {
                    ""
                }
            ),
        }),
        // Reading input goes on: receipts made room in the outbox.
        Event::OutboxReady { pending } => json!({
            "event": "outbox_ready",
            "sid": sid,
            "pending": pending,
            "message": format!("receipts made room in the outbox ({pending} message(s) still wait); reading input again"),
        }),
        Event::File(file) => file_event(file, sid, peer),
        Event::Problem {
            code,
            message,
            seq: Some(seq),
        } => json!({"event": "error", "code": code, "seq": seq, "message": message}),
        Event::Problem {
            code,
            message,
            seq: None,
        } => error_event(code, message),
    }
}

/// A transfer's event (README "Events"): the peer's names are data, never markup.
fn file_event(event: &FileEvent, sid: &str, peer: Option<&str>) -> Value {
    match event {
        FileEvent::Offer { id, name, size } => {
            json!({"event": "file_offer", "sid": sid, "id": id, "name": name, "size": size})
        }
        FileEvent::Progress { id, bytes } => {
            json!({"event": "file_progress", "sid": sid, "id": id, "bytes": bytes})
        }
        FileEvent::Received {
            id,
            name,
            path,
            size,
            sha256,
        } => json!({
            "event": "file_received",
            "sid": sid,
            "id": id,
            "name": name,
            "path": path.to_string_lossy(),
            "size": size,
            "sha256": sha256,
        }),
        FileEvent::Sent {
            id,
            name,
            size,
            sha256,
        } => json!({
            "event": "file_sent",
            "sid": sid,
            "id": id,
            "name": name,
            "size": size,
            "sha256": sha256,
        }),
        // Only asked on a terminal (never with `--json`).
        FileEvent::Question { id, name, size } => {
            json!({"event": "file_question", "sid": sid, "id": id, "name": name, "size": size, "peer": peer})
        }
        FileEvent::Failed { id, code, message } => json!({
            "event": "file_failed",
            "sid": sid,
            "id": id,
            "code": code,
            "message": message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_cannot_fake_lines_or_move_the_cursor() {
        let event = json!({"event": "message", "local_time": "12:00:00", "from": "bob\u{1b}[2J",
            "text": "hi\n[12:00:01] alice: send the file\u{202E}"});
        let line = human(&event).unwrap();
        assert!(
            !line.contains('\n') && !line.contains('\u{1b}') && !line.contains('\u{202E}'),
            "{line:?}"
        );
        let error = json!({"event": "error", "message": "bad\r\nfake"});
        assert_eq!(human(&error).unwrap(), "! bad\u{FFFD}\u{FFFD}fake");
    }

    /// Every event a person sees, with every string field hostile: nothing but the lines the
    /// template itself breaks may come out, and no control or bidi character at all.
    #[test]
    fn no_human_rendering_prints_a_peer_or_relay_controlled_string_raw() {
        const EVIL: &str =
            "x\u{1b}[2J\u{1b}]0;t\u{7}\u{9b}31m\u{85}\r\n\u{202e}\u{2028}\u{2029}\u{200f}y";
        let fields = [
            "sid",
            "peer",
            "role",
            "relay",
            "created",
            "last_used",
            "safety_number",
            "code",
            "message",
            "from",
            "text",
            "local_time",
            "time",
        ];
        let event = |kind: &str, value: &str| {
            let mut event = serde_json::Map::new();
            event.insert("event".into(), json!(kind));
            for field in fields {
                event.insert(field.into(), json!(value));
            }
            event.insert("expires_in".into(), json!(600));
            event.insert("peer_online".into(), json!(true));
            Value::Object(event)
        };
        let kinds = [
            "invite",
            "paired",
            "resumed",
            "message",
            "sent",
            "delivered",
            "read",
            "relay_offline",
            "relay_online",
            "peer_online",
            "peer_offline",
            "waiting",
            "outbox_full",
            "outbox_ready",
            "error",
            "warning",
            "session",
        ];
        for kind in kinds {
            let benign = human(&event(kind, "x"));
            let hostile = human(&event(kind, EVIL));
            assert_eq!(benign.is_some(), hostile.is_some(), "{kind}");
            let (Some(benign), Some(hostile)) = (benign, hostile) else {
                continue;
            };
            for c in hostile.chars() {
                let unsafe_char = (c.is_control() && c != '\n')
                    || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
                        | '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{2028}' | '\u{2029}');
                assert!(!unsafe_char, "{kind}: U+{:04X} in {hostile:?}", c as u32);
            }
            assert_eq!(
                hostile.matches('\n').count(),
                benign.matches('\n').count(),
                "{kind}: {hostile:?}"
            );
        }
    }

    /// Collects what would be printed above the line being edited.
    #[derive(Clone, Default)]
    struct Collect(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl rustyline::ExternalPrinter for Collect {
        fn print(&mut self, msg: String) -> rustyline::Result<()> {
            self.0.lock().unwrap().push(msg);
            Ok(())
        }
    }

    fn terminal() -> (Output, Collect) {
        let mut output = Output::new(false);
        output.terminal = true;
        let printed = Collect::default();
        output.set_printer(Box::new(printed.clone()));
        (output, printed)
    }

    const EVIL: &str = "x\u{1b}[2J\u{9b}31m\r\n\u{202e}y";

    fn is_clean(line: &str) -> bool {
        !line.trim_end_matches('\n').chars().any(|c| {
            c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
        })
    }

    #[test]
    fn sizes_and_durations_read_as_people_write_them() {
        for (bytes, shown) in [
            (0, "0 B"),
            (999, "999 B"),
            (1000, "1.0 kB"),
            (2_300_000, "2.3 MB"),
            (99_949_999, "99.9 MB"),
            (123_456_789, "123 MB"),
            (u64::MAX, "18.4 EB"),
        ] {
            assert_eq!(human_size(bytes), shown);
        }
        assert_eq!(human_duration(Duration::from_secs(45)), "45s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3m 05s");
        assert_eq!(human_duration(Duration::from_secs(7620)), "2h 07m");
    }

    /// The question names the peer and the file, both sanitised, with the size; the offer
    /// line is left out when a question follows.
    #[test]
    fn the_question_is_one_clean_line() {
        let (mut output, printed) = terminal();
        output.set_asking(true);
        output.emit(json!({"event": "resumed", "peer": format!("alice{EVIL}")}));
        output.emit(json!({"event": "file_offer", "id": "ab".repeat(16), "name": format!("report{EVIL}.pdf"), "size": 2_300_000}));
        output.emit(json!({"event": "file_question", "id": "ab".repeat(16), "name": format!("report{EVIL}.pdf"), "size": 2_300_000}));
        let lines = printed.0.lock().unwrap().clone();
        let question = lines.last().unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(question.starts_with("alice"), "{question:?}");
        assert!(question.contains("report"), "{question:?}");
        assert!(
            question.ends_with(", 2.3 MB: accept? [y/N]\n"),
            "{question:?}"
        );
        assert!(is_clean(question), "{question:?}");
    }

    /// Progress is one line redrawn in place (the line above the prompt is replaced, never
    /// the prompt), at most 4 times a second; the file's last line takes its place; any
    /// other line goes below it.
    #[test]
    fn progress_is_redrawn_in_place_and_ends_with_a_last_line() {
        let (mut output, printed) = terminal();
        let id = "cd".repeat(16);
        let t = Instant::now();
        let event = |kind: &str, extra: Value| {
            let mut event = json!({"event": kind, "id": id, "name": format!("big{EVIL}.bin"), "size": 10_000_000u64, "path": format!("/dl/big{EVIL}.bin"), "code": "declined", "message": "declined"});
            for (k, v) in extra.as_object().unwrap() {
                event[k] = v.clone();
            }
            event
        };
        output.note_file(&id, &format!("big{EVIL}.bin"), 10_000_000);
        output.file_line(
            "file_progress",
            &event("file_progress", json!({"bytes": 0})),
            t,
        );
        output.file_line(
            "file_progress",
            &event("file_progress", json!({"bytes": 1_000_000})),
            t + Duration::from_millis(100),
        );
        output.file_line(
            "file_progress",
            &event("file_progress", json!({"bytes": 2_000_000})),
            t + Duration::from_secs(1),
        );
        output.emit(
            json!({"event": "message", "local_time": "12:00:00", "from": "bob", "text": "hi"}),
        );
        output.file_line(
            "file_progress",
            &event("file_progress", json!({"bytes": 4_000_000})),
            t + Duration::from_secs(2),
        );
        output.file_line(
            "file_received",
            &event("file_received", json!({})),
            t + Duration::from_secs(3),
        );
        let lines = printed.0.lock().unwrap().clone();
        const UP: &str = "\x1b[1A\x1b[2K";
        assert_eq!(lines.len(), 5, "one redraw too soon is skipped: {lines:?}");
        assert!(
            !lines[0].starts_with(UP) && lines[0].contains("0 B / 10.0 MB"),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with(UP) && lines[1].contains("2.0 MB / 10.0 MB   20%"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("2.0 MB/s") && lines[1].contains("4s left"),
            "{lines:?}"
        );
        // The chat line goes below the progress line, which stays.
        assert_eq!(
            lines[2], "[12:00:00] bob: hi\n",
            "a chat line replaced progress"
        );
        assert!(
            !lines[3].starts_with(UP),
            "progress replaced a chat line: {lines:?}"
        );
        assert!(lines[4].starts_with(UP), "{lines:?}");
        assert!(
            lines[4].contains("received big") && lines[4].contains("(10.0 MB) \u{2192} /dl/big"),
            "{lines:?}"
        );
        for line in &lines {
            assert!(is_clean(line.trim_start_matches(UP)), "{line:?}");
        }
        // Without a terminal, no progress at all; last lines still.
        let mut plain = Output::new(false);
        let printed = Collect::default();
        plain.set_printer(Box::new(printed.clone()));
        plain.note_file(&id, "a", 10);
        plain.file_line(
            "file_progress",
            &event("file_progress", json!({"bytes": 5})),
            t,
        );
        plain.file_line("file_failed", &event("file_failed", json!({})), t);
        let lines = printed.0.lock().unwrap().clone();
        assert_eq!(lines, vec!["! a: declined (declined)\n".to_string()]);
    }

    #[test]
    fn a_progress_line_never_wraps_a_common_terminal() {
        let name = "\u{4e2d}".repeat(200);
        let line = progress_line(&name, 1 << 40, 1 << 38, 1 << 30, Duration::from_secs(1));
        let width: usize = line.chars().map(|c| c.width().unwrap_or(1)).sum();
        assert!(width <= PROGRESS_COLUMNS, "{width}: {line}");
        assert!(line.contains('\u{2026}') && line.contains("left"), "{line}");
        assert_eq!(
            progress_line("a", 0, 0, 0, Duration::ZERO),
            "~ a  0 B / 0 B  100%"
        );
    }
}
