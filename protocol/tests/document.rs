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
        let named = format!("`{}`", t.as_str());
        let heading = format!("#### {}", t.as_str());
        assert!(
            DOCUMENT.contains(&named) || DOCUMENT.contains(&heading),
            "protocol.md does not describe {t}"
        );
    }
}

#[test]
fn documented_limits_match_the_code() {
    use parley_protocol::limits;
    for (what, value) in [
        (
            "frame size",
            format!("{} bytes", group(limits::MAX_FRAME_BYTES)),
        ),
        (
            "stored `INVITE_CREATE` data",
            format!("{} bytes", group(limits::MAX_INVITE_PARAMS_BYTES)),
        ),
        (
            "invite lifetime",
            format!("{} s", limits::INVITE_TTL.as_secs()),
        ),
        (
            "paired session with no member connected",
            format!("{} s", group(limits::SESSION_IDLE_TTL.as_secs() as usize)),
        ),
        (
            "sessions per connection",
            limits::MAX_SESSIONS_PER_CONNECTION.to_string(),
        ),
        ("sessions per relay", group(limits::MAX_SESSIONS)),
        ("connections per relay", group(limits::MAX_CONNECTIONS)),
    ] {
        let row = format!("| {what} | {value} |");
        assert!(
            DOCUMENT.contains(&row),
            "protocol.md limit row differs from the code: expected `{row}`"
        );
    }
}

/// 65536 -> "65,536".
fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
