//! A relay (or a network path) that goes quiet must not hang the client: after a while
//! without any frame the client PINGs, and if still nothing arrives it declares the
//! connection dead and reconnects as after any cut. And the relay's PING is a frame like any
//! other: recognised in any valid spelling, answered with PONG.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_e2e::fake_relay::{FakeRelay, frame_type, text};
use parley_e2e::{Client, TempDir, fabricate_session};
use serde_json::json;

const SID: &str = "0123456789abcdef0123456789abcdef";

/// The liveness bound, shortened for the test (hidden option; 35 s by default).
const IDLE: (&str, &str) = ("PARLEY_IDLE_TIMEOUT_MS", "1500");

#[test]
fn a_relay_that_goes_silent_after_peer_online_is_pinged_then_declared_dead() {
    // The first connection answers REATTACH, then says nothing ever again (not even to a
    // PING); later ones behave.
    let relay = FakeRelay::start(Arc::new(|connection, frame| {
        match frame_type(frame).as_deref() {
            Some("REATTACH") => vec![text(json!({"t": "PEER_ONLINE", "sid": SID}).to_string())],
            Some("PING") if connection > 0 => vec![text(r#"{"t":"PONG"}"#)],
            _ => vec![],
        }
    }));
    let dir = TempDir::new("alice");
    fabricate_session(dir.path(), "alice", relay.url(), "bob");
    let started = Instant::now();
    let mut alice = Client::spawn_with_env(
        relay.url(),
        dir.path(),
        "alice",
        &["--timeout", "20", "resume"],
        &[IDLE],
    );
    assert_eq!(alice.expect("resumed")["peer_online"], true);
    let offline = alice.expect("relay_offline");
    assert!(
        offline["message"]
            .as_str()
            .unwrap()
            .contains("no sign of life"),
        "{offline}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    alice.expect("relay_online");
    let pinged = relay.received().iter().any(|(connection, frame)| {
        *connection == 0 && frame_type(frame).as_deref() == Some("PING")
    });
    assert!(
        pinged,
        "the client pings a quiet relay before giving up: {:?}",
        relay.received()
    );
}

#[test]
fn a_relay_ping_in_any_valid_spelling_is_answered_with_pong() {
    let relay = FakeRelay::start(Arc::new(|_, frame| match frame_type(frame).as_deref() {
        Some("REATTACH") => vec![
            text(json!({"t": "PEER_ONLINE", "sid": SID}).to_string()),
            text(" { \"data\" : null ,\n \"t\" : \"PING\" } "),
        ],
        _ => vec![],
    }));
    let dir = TempDir::new("alice");
    fabricate_session(dir.path(), "alice", relay.url(), "bob");
    let mut alice = Client::spawn(
        relay.url(),
        dir.path(),
        "alice",
        &["--timeout", "20", "resume"],
    );
    alice.expect("resumed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let ponged = loop {
        let ponged = relay
            .received()
            .iter()
            .any(|(_, frame)| frame_type(frame).as_deref() == Some("PONG"));
        if ponged || Instant::now() > deadline {
            break ponged;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(ponged, "no PONG: {:?}", relay.received());
}
