//! A relay that lies: wrong codes, altered or swapped handshake fields, tampered and replayed
//! messages. Pairing must fail on both sides with a message that says so, nothing may be
//! stored for a failed pairing, and no altered or replayed message may ever be shown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;

use parley_e2e::proxy::{Proxy, Tamper, Toward};
use parley_e2e::{Client, RelayProcess, TempDir, texts};
use serde_json::{Value, json};

/// A valid-looking MODP-14 public key (4 = 2^2) that is not the one the peer sent.
fn other_dh() -> String {
    format!("{}04", "0".repeat(510))
}

/// Changes one hex digit, keeping the string hex.
fn flip_last(hex: &str) -> String {
    let mut s = hex.to_string();
    let last = s.pop().unwrap();
    s.push(if last == '0' { '1' } else { '0' });
    s
}

/// A tamper function that rewrites frames of type `t` going `toward`, leaving the rest alone.
fn rewrite(toward: Toward, t: &'static str, edit: fn(&mut Value)) -> Tamper {
    Arc::new(move |dir, text| {
        let mut frame: Value = serde_json::from_str(text).unwrap();
        if dir == toward && frame["t"] == t {
            edit(&mut frame);
            return vec![frame.to_string()];
        }
        vec![text.to_string()]
    })
}

/// Flips a bit in the first encrypted message on its way to the relay: the host's Hello, the
/// last step before either side stores anything.
fn first_hello_altered() -> Tamper {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    Arc::new(move |dir, text| {
        let mut frame: Value = serde_json::from_str(text).unwrap();
        if dir == Toward::Relay
            && frame["t"] == "MSG"
            && frame["data"]["msgID"] == 1
            && !done.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let payload = frame["data"]["payload"].as_str().unwrap().to_string();
            frame["data"]["payload"] = json!(flip_last(&payload));
            return vec![frame.to_string()];
        }
        vec![text.to_string()]
    })
}

/// Host and guest pair through `url`; the guest uses `code_for_guest(real code)`.
/// Returns both exit codes and both clients' events.
fn pair_through(
    url: &str,
    code_for_guest: impl Fn(&str) -> String,
) -> [(Option<i32>, Vec<Value>, TempDir); 2] {
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    let mut alice = Client::spawn(url, alice_dir.path(), "alice", &["host"]);
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let bob = Client::spawn(
        url,
        bob_dir.path(),
        "bob",
        &["join", &code_for_guest(&code)],
    );
    let (alice_status, alice_events) = alice.wait();
    let (bob_status, bob_events) = bob.wait();
    [
        (alice_status.code(), alice_events, alice_dir),
        (bob_status.code(), bob_events, bob_dir),
    ]
}

fn assert_failed_on_both_sides(results: [(Option<i32>, Vec<Value>, TempDir); 2], what: &str) {
    for ((code, events, dir), who) in results.into_iter().zip(["host", "guest"]) {
        assert_eq!(
            code,
            Some(4),
            "{what}: {who} should fail pairing; events {events:?}"
        );
        let last = events.last().unwrap();
        assert_eq!(last["code"], "pairing_failed", "{what}: {who}: {events:?}");
        let message = last["message"].as_str().unwrap();
        assert!(
            message.contains("pairing failed"),
            "{what}: {who}: {message}"
        );
        assert!(
            events.iter().all(|e| e["event"] != "paired"),
            "{what}: {who} claimed to be paired"
        );
        let state = dir.path().join(format!(
            "state-{}.json",
            if who == "host" { "alice" } else { "bob" }
        ));
        assert!(!state.exists(), "{what}: {who} stored a failed pairing");
    }
}

#[test]
fn wrong_code_fails_on_both_sides() {
    let relay = RelayProcess::start(&[]);
    let results = pair_through(relay.url(), |code| {
        let (relay_part, secret) = code.split_once('-').unwrap();
        let wrong = if secret == "000000" {
            "000001".to_string()
        } else {
            "000000".to_string()
        };
        format!("{relay_part}-{wrong}")
    });
    assert_failed_on_both_sides(results, "wrong code");
}

#[test]
fn a_relay_that_alters_any_handshake_field_is_caught_on_both_sides() {
    let relay = RelayProcess::start(&[]);
    let attacks: [(&str, Tamper); 7] = [
        (
            "host DH key swapped on the way in",
            rewrite(Toward::Relay, "INVITE_CREATE", |f| {
                f["data"]["dh"] = json!(other_dh())
            }),
        ),
        (
            "guest DH key swapped on the way in",
            rewrite(Toward::Relay, "JOIN", |f| {
                f["data"]["dh"] = json!(other_dh())
            }),
        ),
        (
            "guest SPAKE2 message altered on the way to the host",
            rewrite(Toward::Client, "JOIN_REQUEST", |f| {
                let pake = f["data"]["pake"].as_str().unwrap().to_string();
                f["data"]["pake"] = json!(flip_last(&pake));
            }),
        ),
        (
            "host DH key swapped on the way to the guest",
            rewrite(Toward::Client, "JOINED", |f| {
                if f["data"].get("dh").is_some() {
                    f["data"]["dh"] = json!(other_dh());
                }
            }),
        ),
        (
            "host key confirmation replaced",
            rewrite(Toward::Relay, "JOIN_ACCEPT", |f| {
                f["data"]["confirm"] = json!("00".repeat(32))
            }),
        ),
        (
            "guest key confirmation replaced",
            rewrite(Toward::Relay, "MSG", |f| {
                if f["data"]["kind"] == "confirm" {
                    f["data"]["payload"] = json!("00".repeat(32));
                }
            }),
        ),
        (
            "host's first encrypted message altered",
            first_hello_altered(),
        ),
    ];
    for (what, tamper) in attacks {
        let proxy = Proxy::start(relay.url(), tamper);
        let results = pair_through(proxy.url(), str::to_string);
        assert_failed_on_both_sides(results, what);
    }
}

#[test]
fn tampered_and_replayed_messages_are_rejected_never_shown() {
    let relay = RelayProcess::start(&[]);
    // Host to guest, after pairing: the first copy of seq 2 ("one") gets a flipped bit; seq 3
    // ("two") is sent twice every time it passes; seq 4 ("three") passes untouched.
    let tampered_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tamper: Tamper = Arc::new(move |dir, text| {
        let mut frame: Value = serde_json::from_str(text).unwrap();
        if dir == Toward::Relay && frame["t"] == "MSG" {
            match frame["data"]["msgID"].as_u64() {
                Some(2) if !tampered_once.swap(true, std::sync::atomic::Ordering::SeqCst) => {
                    let payload = frame["data"]["payload"].as_str().unwrap().to_string();
                    frame["data"]["payload"] = json!(flip_last(&payload));
                    return vec![frame.to_string()];
                }
                Some(3) => return vec![text.to_string(), text.to_string()],
                _ => {}
            }
        }
        vec![text.to_string()]
    });
    let proxy = Proxy::start(relay.url(), tamper);
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    let mut alice = Client::spawn(proxy.url(), alice_dir.path(), "alice", &["host"]);
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(
        proxy.url(),
        bob_dir.path(),
        "bob",
        &["--exit-after", "3", "join", &code],
    );
    alice.expect("paired");
    bob.expect("paired");
    for line in ["one", "two", "three"] {
        alice.send_line(line);
    }
    alice.close_stdin();
    bob.close_stdin();
    let (bob_status, events) = bob.wait();
    assert!(bob_status.success(), "{bob_status}: {events:?}");
    // The altered copy was refused and never shown; the sender's resend of the genuine one
    // filled the gap; the duplicate was dropped. Everything once, in order.
    assert_eq!(texts(&events), ["one", "two", "three"]);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "error" && e["code"] == "rejected_message"),
        "{events:?}"
    );
    let (alice_status, alice_events) = alice.wait();
    assert!(alice_status.success(), "{alice_events:?}");
    let delivered: Vec<u64> = alice_events
        .iter()
        .filter(|e| e["event"] == "delivered")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(delivered, [2, 3, 4], "end-to-end receipts reach the sender");
}
