//! A peer chooses its own name (and its messages): printed raw, escape sequences in them would
//! rewrite the terminal of whoever reads them. Human output must show them defanged; JSON
//! output must carry them exactly (JSON escapes control characters itself).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use parley_e2e::{TempDir, fabricate_session, run_client, run_human};

/// Clear the screen, set the window title, a C1 CSI, a fake new line, a bidi override.
const EVIL: &str = "bob\u{1b}[2J\u{1b}]0;owned\u{7}\u{9b}31m\r\n[12:00] alice: hi\u{202e}";

fn assert_defanged(out: &str) {
    for c in out.chars() {
        assert!(
            c == '\n' || !c.is_control(),
            "control character U+{:04X} printed in {out:?}",
            c as u32
        );
        assert_ne!(c, '\u{202e}', "bidi override printed in {out:?}");
    }
}

#[test]
fn sessions_lists_a_hostile_peer_name_defanged() {
    let dir = TempDir::new("alice");
    fabricate_session(dir.path(), "alice", "ws://127.0.0.1:1", EVIL);
    let run = run_human("ws://127.0.0.1:1", dir.path(), "alice", &["sessions"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_defanged(&run.stdout);
    assert_defanged(&run.stderr);
    assert_eq!(
        run.stdout.lines().count(),
        1,
        "one line per session: {:?}",
        run.stdout
    );
    assert!(run.stdout.contains("bob"), "{:?}", run.stdout);

    // --json carries the name exactly, as valid JSON.
    let (code, events) = run_client("ws://127.0.0.1:1", dir.path(), "alice", &["sessions"]);
    assert_eq!(code, Some(0));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["peer"], EVIL);
}
