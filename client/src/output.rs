//! What the client tells its user: human lines, or NDJSON events for scripts (`--json`).
//!
//! Every event is one JSON object on one line of stdout with an `event` field; see README.md
//! ("Scripting") for the list. Human output goes through the line editor's printer when one is
//! active, so that an incoming message never garbles the line being typed.

use std::io::Write;

use serde_json::{Value, json};

use crate::conversation::Event;
use crate::session::{MAX_OUTBOX, MAX_OUTBOX_BYTES, Session};
use crate::transfers::FileEvent;

/// Prints above the line being edited (rustyline's external printer).
pub type LinePrinter = Box<dyn rustyline::ExternalPrinter + Send>;

pub struct Output {
    json: bool,
    printer: Option<LinePrinter>,
}

impl Output {
    pub fn new(json: bool) -> Output {
        Output {
            json,
            printer: None,
        }
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
        if self.json {
            self.write_line(event.to_string());
        } else if event.get("event").and_then(Value::as_str) == Some("warning") {
            // Warnings are not part of the conversation: one line on stderr.
            eprintln!("parley: warning: {}", text(&event, "message"));
        } else if let Some(line) = human(&event) {
            self.write_line(line);
        }
    }

    fn write_line(&mut self, line: String) {
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
        "waiting" | "outbox_full" | "outbox_ready" => format!("* {}", text(event, "message")),
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
        // Plain lines until part B's prompts and progress bars; the peer's names sanitised.
        "file_offer" => format!(
            "* {} offers {} ({} bytes)",
            peer(),
            text(event, "name"),
            event.get("size").and_then(Value::as_u64).unwrap_or(0)
        ),
        "file_received" => format!(
            "* received {} -> {} (SHA-256 {})",
            text(event, "name"),
            text(event, "path"),
            text(event, "sha256")
        ),
        "file_sent" => format!("* sent {}, verified by {}", text(event, "name"), peer()),
        "file_failed" => format!("! file {}: {}", text(event, "id"), text(event, "message")),
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
        Event::File(file) => file_event(file, sid),
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
fn file_event(event: &FileEvent, sid: &str) -> Value {
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
            json!({"event": "file_question", "sid": sid, "id": id, "name": name, "size": size})
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
}
