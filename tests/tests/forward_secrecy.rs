//! Forward secrecy, end to end: every ciphertext the clients send is recorded on its way to the
//! relay (as a compromised relay would record it); after the messages are exchanged and shown,
//! copies of both state files decrypt none of them. A copy taken *before* a message was
//! received does decrypt it: the attempt itself works, and it is the ratchet that closes it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use parley::dh::DhKeyPair;
use parley::message::{self, Direction};
use parley::ratchet::Ratchet;
use parley_e2e::proxy::{Proxy, Toward};
use parley_e2e::{Client, RelayProcess, TempDir};
use parley_state::{Role, SessionRecord};
use serde_json::Value;

/// A recorded chat message: sequence number and payload bytes.
struct Recorded {
    seq: u64,
    payload: Vec<u8>,
}

fn recorder(log: Arc<Mutex<Vec<Recorded>>>) -> parley_e2e::proxy::Tamper {
    Arc::new(move |toward, text| {
        if toward == Toward::Relay
            && let Ok(frame) = serde_json::from_str::<Value>(text)
            && frame["t"] == "MSG"
            && frame["data"]["kind"].is_null()
        {
            log.lock().unwrap().push(Recorded {
                seq: frame["data"]["msgID"].as_u64().unwrap(),
                payload: hex::decode(frame["data"]["payload"].as_str().unwrap()).unwrap(),
            });
        }
        vec![text.to_string()]
    })
}

fn record(dir: &Path, name: &str) -> SessionRecord {
    let state = parley_state::read_snapshot(dir, name).unwrap();
    assert_eq!(state.sessions.len(), 1);
    state.sessions[0].clone()
}

/// Everything the stored ratchet can do with a recorded message, in either direction: the
/// plaintext if it decrypts.
fn try_decrypt(stored: &SessionRecord, message: &Recorded) -> Option<String> {
    let mut sid = [0u8; 16];
    hex::decode_to_slice(&stored.sid, &mut sid).unwrap();
    [Direction::HostToGuest, Direction::GuestToHost]
        .into_iter()
        .find_map(|direction| {
            let mut ratchet = Ratchet::from_record(&stored.ratchet).unwrap();
            let ad = message::associated_data(&sid, direction, message.seq);
            ratchet
                .decrypt(&message.payload, &ad, &mut DhKeyPair::generate)
                .ok()
                .map(|p| String::from_utf8_lossy(&p).into_owned())
        })
}

#[test]
fn state_files_copied_after_the_fact_decrypt_nothing_recorded() {
    let relay = RelayProcess::start(&[]);
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let proxy = Proxy::start(relay.url(), recorder(recorded.clone()));
    let (alice_dir, bob_dir) = (TempDir::new("fs-alice"), TempDir::new("fs-bob"));

    // A conversation with turns both ways (several DH ratchet steps).
    let mut alice = Client::spawn(
        proxy.url(),
        alice_dir.path(),
        "alice",
        &["--exit-after", "2", "host"],
    );
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(
        proxy.url(),
        bob_dir.path(),
        "bob",
        &["--exit-after", "2", "join", &code],
    );
    alice.expect("paired");
    bob.expect("paired");
    alice.send_line("a1 secret");
    assert_eq!(bob.expect("message")["text"], "a1 secret");
    bob.send_line("b1 secret");
    assert_eq!(alice.expect("message")["text"], "b1 secret");
    alice.send_line("a2 secret");
    bob.send_line("b2 secret");
    assert_eq!(bob.expect("message")["text"], "a2 secret");
    assert_eq!(alice.expect("message")["text"], "b2 secret");
    alice.close_stdin();
    bob.close_stdin();
    assert!(alice.wait().0.success());
    assert!(bob.wait().0.success());

    // Bob is away; his state as it is now is the "before" copy. Alice writes once more.
    let bob_before = record(bob_dir.path(), "bob");
    assert_eq!(bob_before.role, Role::Guest);
    let mut alice = Client::spawn(proxy.url(), alice_dir.path(), "alice", &["resume"]);
    alice.expect("resumed");
    alice.send_line("a3 while you were away");
    alice.close_stdin();
    let mut bob = Client::spawn(
        proxy.url(),
        bob_dir.path(),
        "bob",
        &["--exit-after", "1", "resume"],
    );
    assert_eq!(bob.expect("message")["text"], "a3 while you were away");
    bob.close_stdin();
    assert!(bob.wait().0.success());
    assert!(alice.wait().0.success());

    let recorded = recorded.lock().unwrap();
    // Two hellos and five chat lines; resends may add byte-identical copies.
    assert!(recorded.len() >= 7, "{} recorded", recorded.len());
    let last = recorded
        .iter()
        .rfind(|m| m.seq == 4)
        .expect("a3 was recorded");
    assert!(
        try_decrypt(&bob_before, last)
            .unwrap()
            .contains("a3 while you were away"),
        "the copy taken before a3 arrived decrypts it"
    );

    let (alice_after, bob_after) = (
        record(alice_dir.path(), "alice"),
        record(bob_dir.path(), "bob"),
    );
    for message in recorded.iter() {
        for stolen in [&alice_after, &bob_after] {
            assert_eq!(
                try_decrypt(stolen, message),
                None,
                "message {} decrypted from a state copied after it was read",
                message.seq
            );
        }
    }
    // And the files hold no plaintext either.
    for dir in [alice_dir.path(), bob_dir.path()] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let content = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
            assert!(!content.contains("secret") && !content.contains("away"));
        }
    }
}
