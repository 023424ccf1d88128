//! A relay that answers `REATTACH` with junk is a relay problem (exit 3, saying what was
//! wrong), not an internal error of the client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use parley_e2e::fake_relay::{FakeRelay, frame_type, text};
use parley_e2e::{TempDir, fabricate_session, run_client};

#[test]
fn junk_in_answer_to_reattach_is_a_relay_problem() {
    for junk in [
        "this is not json",
        r#"{"t":"PEER_ONLINE""#,
        "[1,2,3]",
        r#"{"t":"NO_SUCH_TYPE"}"#,
    ] {
        let relay = FakeRelay::start(Arc::new(move |_, frame| {
            match frame_type(frame).as_deref() {
                Some("REATTACH") => vec![text(junk)],
                _ => vec![],
            }
        }));
        let dir = TempDir::new("alice");
        fabricate_session(dir.path(), "alice", relay.url(), "bob");
        let (code, events) = run_client(
            "ws://unused.invalid:1",
            dir.path(),
            "alice",
            &["--timeout", "20", "resume"],
        );
        assert_eq!(code, Some(3), "{junk}: {events:?}");
        let last = events.last().unwrap();
        assert_eq!(last["event"], "error", "{junk}: {events:?}");
        assert_eq!(last["code"], "relay_protocol", "{junk}: {events:?}");
        let message = last["message"].as_str().unwrap();
        assert!(
            message.contains("REATTACH") && message.contains("unreadable"),
            "{junk}: {message}"
        );
    }
}
