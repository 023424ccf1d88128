//! Numbers from the relay, the peer and the command line that do not fit the clock or a
//! counter: the client must carry on (or refuse cleanly), never panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use parley_e2e::fake_relay::{FakeRelay, frame_type, text};
use parley_e2e::{Client, TempDir, run_client};
use serde_json::json;

const SID: &str = "0123456789abcdef0123456789abcdef";

/// A relay that creates a session and hands out an invite code whose lifetime is
/// `expires_in` (raw JSON number text), then says nothing more.
fn relay_with_invite_lifetime(expires_in: &'static str) -> FakeRelay {
    FakeRelay::start(Arc::new(move |_, frame| {
        match frame_type(frame).as_deref() {
            Some("CREATE_SESSION") => vec![text(
                json!({"t": "SESSION_CREATED", "sid": SID, "data": {"resumeToken": "ab".repeat(32)}})
                    .to_string(),
            )],
            Some("INVITE_CREATE") => vec![text(format!(
                r#"{{"t":"INVITE_CODE","sid":"{SID}","data":{{"code":"123456","expiresIn":{expires_in}}}}}"#
            ))],
            _ => vec![],
        }
    }))
}

#[test]
fn an_invite_lifetime_too_large_for_the_clock_means_no_expiry_not_a_crash() {
    for expires_in in ["10000000000000000000", "18446744073709551615"] {
        let relay = relay_with_invite_lifetime(expires_in);
        let dir = TempDir::new("alice");
        let mut alice = Client::spawn(
            relay.url(),
            dir.path(),
            "alice",
            &["--timeout", "3", "host"],
        );
        let invite = alice.expect("invite");
        assert_eq!(invite["expires_in"].to_string(), expires_in);
        let (status, events) = alice.wait();
        // Still waiting for a joiner when --timeout ends it: the code never expires.
        assert_eq!(
            status.code(),
            Some(6),
            "expiresIn {expires_in}: {status}; {events:?}"
        );
        assert_eq!(events.last().unwrap()["code"], "timeout", "{events:?}");
    }
}

#[test]
fn a_timeout_too_large_for_the_clock_means_no_timeout() {
    let dir = TempDir::new("alice");
    let (code, events) = run_client(
        "ws://127.0.0.1:1",
        dir.path(),
        "alice",
        &["--timeout", &u64::MAX.to_string(), "sessions"],
    );
    // No state yet: the state file error, not a panic (101).
    assert_eq!(code, Some(5), "{events:?}");
    assert_eq!(events.last().unwrap()["code"], "state", "{events:?}");
}
