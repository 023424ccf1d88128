//! protocol.md is normative: every frame type and error code the code knows must be in it.

use parley_protocol::{ErrorCode, FrameType};

const DOCUMENT: &str = include_str!("../../protocol.md");

#[test]
fn every_error_code_is_documented() {
    for code in ErrorCode::ALL {
        let row = format!("| `{}` |", code.as_str());
        assert!(
            DOCUMENT.contains(&row),
            "protocol.md has no error-code row for {code}"
        );
    }
}

#[test]
fn every_frame_type_is_documented() {
    for t in FrameType::ALL {
        // Each type has its own heading (client frames) or table row (relay frames), and an
        // example frame.
        let heading = format!("#### {}", t.as_str());
        let row = format!("| `{}`", t.as_str());
        let example = format!("{{\"t\":\"{}\"", t.as_str());
        assert!(
            DOCUMENT.contains(&heading) || DOCUMENT.contains(&row),
            "protocol.md does not describe {t}"
        );
        assert!(
            DOCUMENT.contains(&example),
            "protocol.md has no example of {t}"
        );
    }
}

#[test]
fn documented_limits_match_the_code() {
    use parley_protocol::limits::*;
    let secs = |d: std::time::Duration| format!("{} s", group(d.as_secs() as usize));
    let bucket = |burst: u32, refill: std::time::Duration| {
        format!("{burst} at once, then 1 per {} s", refill.as_secs())
    };
    for (what, value) in [
        ("frame size", format!("{} bytes", group(MAX_FRAME_BYTES))),
        (
            "stored `INVITE_CREATE` data",
            format!("{} bytes", group(MAX_INVITE_PARAMS_BYTES)),
        ),
        ("invite lifetime", secs(INVITE_TTL)),
        (
            "unpaired session with no member connected",
            secs(UNPAIRED_SESSION_TTL),
        ),
        (
            "paired session with no member connected",
            secs(SESSION_IDLE_TTL),
        ),
        (
            "sessions per connection",
            MAX_SESSIONS_PER_CONNECTION.to_string(),
        ),
        ("sessions per relay", group(MAX_SESSIONS)),
        ("connections per relay", group(MAX_CONNECTIONS)),
        (
            "outbound queue per connection",
            format!(
                "{OUTBOUND_QUEUE_FRAMES} frames or {} MiB",
                OUTBOUND_QUEUE_BYTES >> 20
            ),
        ),
        ("a socket write making no progress", secs(WRITE_TIMEOUT)),
        ("relay `PING` interval", secs(PING_INTERVAL)),
        ("silence before a connection is closed", secs(IDLE_TIMEOUT)),
        (
            "failed `JOIN`s per connection",
            bucket(
                JOIN_FAILURES_PER_CONNECTION_BURST,
                JOIN_FAILURES_PER_CONNECTION_REFILL,
            ),
        ),
        (
            "failed `JOIN`s per address (IPv4 address, IPv6 /64)",
            bucket(
                JOIN_FAILURES_PER_ADDRESS_BURST,
                JOIN_FAILURES_PER_ADDRESS_REFILL,
            ),
        ),
        (
            "`CREATE_SESSION`s per address",
            bucket(
                SESSIONS_CREATED_PER_ADDRESS_BURST,
                SESSIONS_CREATED_PER_ADDRESS_REFILL,
            ),
        ),
        ("WebSocket upgrade", secs(HANDSHAKE_TIMEOUT)),
        (
            "mailbox per seat",
            format!("{MAILBOX_FRAMES} frames or {} KiB", MAILBOX_BYTES >> 10),
        ),
        ("mailbox age", secs(MAILBOX_AGE)),
        (
            "all mailboxes of a relay",
            format!("{} MiB", MAILBOX_TOTAL_BYTES >> 20),
        ),
    ] {
        let row = format!("| {what}* | {value} |");
        let row_fixed = format!("| {what} | {value} |");
        assert!(
            DOCUMENT.contains(&row) || DOCUMENT.contains(&row_fixed),
            "protocol.md limit row differs from the code: expected `{row_fixed}`"
        );
    }
}

/// 65536 -> "65,536".
fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
