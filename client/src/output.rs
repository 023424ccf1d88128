//! What the client tells its user: human lines, or NDJSON events for scripts (`--json`).
//!
//! Every event is one JSON object on one line of stdout with an `event` field; see README.md
//! ("Scripting") for the list. Human output goes through the line editor's printer when one is
//! active, so that an incoming message never garbles the line being typed.

use std::io::Write;

use serde_json::{Value, json};

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
/// (newlines and escape sequences that could fake a line or rewrite the screen) and bidi
/// overrides become U+FFFD. JSON output needs none of this: serde escapes control characters.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
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
        "waiting" => format!("* {}", text(event, "message")),
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
            event.get("peer").and_then(Value::as_str).unwrap_or("?"),
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
}
