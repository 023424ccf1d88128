//! The protocol caps a frame at 64 KiB (protocol.md 1, 2.6). A relay that sends more is
//! broken or hostile: the client must not read it (tungstenite would accept 64 MiB by
//! default). During pairing or attaching that ends the run (exit 3); in a chat it is treated
//! like a cut connection: the client reconnects.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use parley_e2e::fake_relay::{FakeRelay, frame_type, text};
use parley_e2e::{Client, TempDir, fabricate_session};
use serde_json::json;

const SID: &str = "0123456789abcdef0123456789abcdef";
const LIMIT: usize = 65_536;

/// `frame` (a JSON object) with a `pad` member that makes it `size` bytes long.
fn padded(mut frame: serde_json::Value, size: usize) -> String {
    frame["pad"] = json!("");
    let pad = size - frame.to_string().len();
    frame["pad"] = json!("x".repeat(pad));
    let text = frame.to_string();
    assert_eq!(text.len(), size);
    text
}

#[test]
fn an_oversize_frame_during_pairing_ends_the_run_as_a_relay_problem() {
    let relay = FakeRelay::start(Arc::new(|_, frame| match frame_type(frame).as_deref() {
        Some("CREATE_SESSION") => vec![text(padded(
            json!({"t": "SESSION_CREATED", "sid": SID, "data": {"resumeToken": "ab".repeat(32)}}),
            LIMIT + 1,
        ))],
        Some("INVITE_CREATE") => vec![text(
            json!({"t": "INVITE_CODE", "sid": SID, "data": {"code": "123456", "expiresIn": 600}})
                .to_string(),
        )],
        _ => vec![],
    }));
    let dir = TempDir::new("alice");
    let alice = Client::spawn(
        relay.url(),
        dir.path(),
        "alice",
        &["--timeout", "10", "host"],
    );
    let (status, events) = alice.wait();
    assert_eq!(status.code(), Some(3), "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(last["code"], "relay_protocol", "{events:?}");
    assert!(
        last["message"].as_str().unwrap().contains("65536"),
        "the message names the limit: {last}"
    );
    assert!(events.iter().all(|e| e["event"] != "invite"), "{events:?}");
}

#[test]
fn a_frame_at_the_limit_is_read() {
    let relay = FakeRelay::start(Arc::new(|_, frame| match frame_type(frame).as_deref() {
        Some("CREATE_SESSION") => vec![text(padded(
            json!({"t": "SESSION_CREATED", "sid": SID, "data": {"resumeToken": "ab".repeat(32)}}),
            LIMIT,
        ))],
        Some("INVITE_CREATE") => vec![text(
            json!({"t": "INVITE_CODE", "sid": SID, "data": {"code": "123456", "expiresIn": 600}})
                .to_string(),
        )],
        _ => vec![],
    }));
    let dir = TempDir::new("alice");
    let mut alice = Client::spawn(
        relay.url(),
        dir.path(),
        "alice",
        &["--timeout", "10", "host"],
    );
    alice.expect("invite");
}

#[test]
fn an_oversize_frame_during_a_chat_is_a_cut_connection_then_a_reconnect() {
    let relay = FakeRelay::start(Arc::new(|connection, frame| {
        match frame_type(frame).as_deref() {
            Some("REATTACH") if connection == 0 => vec![
                text(json!({"t": "PEER_ONLINE", "sid": SID}).to_string()),
                text(padded(json!({"t": "PING"}), LIMIT + 100)),
            ],
            Some("REATTACH") => vec![text(json!({"t": "PEER_ONLINE", "sid": SID}).to_string())],
            _ => vec![],
        }
    }));
    let dir = TempDir::new("alice");
    fabricate_session(dir.path(), "alice", relay.url(), "bob");
    let mut alice = Client::spawn(
        relay.url(),
        dir.path(),
        "alice",
        &["--timeout", "10", "resume"],
    );
    alice.expect("resumed");
    let offline = alice.expect("relay_offline");
    assert!(
        offline["message"].as_str().unwrap().contains("65536"),
        "{offline}"
    );
    alice.expect("relay_online");
    assert!(relay.connections() >= 2);
}
