//! Two real clients pair through a real relay, chat, quit, resume, and chat again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use parley_e2e::{Client, RelayProcess, TempDir, run_client, texts};

#[test]
fn pair_chat_quit_resume_and_chat_again() {
    let relay = RelayProcess::start(&[]);
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));

    let mut alice = Client::spawn(
        relay.url(),
        alice_dir.path(),
        "alice",
        &["--exit-after", "1", "host"],
    );
    let invite = alice.expect("invite");
    let code = invite["code"].as_str().unwrap().to_string();
    assert_eq!(code.len(), 13, "code is <6 digits>-<6 digits>: {code}");
    let mut bob = Client::spawn(
        relay.url(),
        bob_dir.path(),
        "bob",
        &["--exit-after", "1", "join", &code],
    );

    let a = alice.expect("paired");
    let b = bob.expect("paired");
    assert_eq!(a["peer"], "bob");
    assert_eq!(b["peer"], "alice");
    assert_eq!(a["safety_number"], b["safety_number"]);
    assert_eq!(a["sid"], b["sid"]);
    let sid = a["sid"].as_str().unwrap().to_string();

    alice.send_line("hi bob");
    bob.send_line("hi alice");
    assert_eq!(bob.expect("message")["text"], "hi bob");
    assert_eq!(alice.expect("message")["text"], "hi alice");
    let (alice_status, _) = alice.wait();
    let (bob_status, _) = bob.wait();
    assert!(
        alice_status.success() && bob_status.success(),
        "{alice_status} {bob_status}"
    );

    // Both come back later: no code, no flags but the name; the relay URL is in the state.
    let mut alice = Client::spawn(
        "ws://unused.invalid:1",
        alice_dir.path(),
        "alice",
        &["--exit-after", "1", "resume"],
    );
    let resumed = alice.expect("resumed");
    assert_eq!(resumed["sid"], sid.as_str());
    assert_eq!(resumed["peer"], "bob");
    // Typed while bob is still away: held, then sent when he is back.
    alice.send_line("welcome back");
    let mut bob = Client::spawn(
        relay.url(),
        bob_dir.path(),
        "bob",
        &["--exit-after", "1", "resume", &sid[..8]],
    );
    assert_eq!(bob.expect("resumed")["peer_online"], true);
    alice.expect("peer_online");
    bob.send_line("glad to be back");
    assert_eq!(bob.expect("message")["text"], "welcome back");
    assert_eq!(alice.expect("message")["text"], "glad to be back");
    let (alice_status, alice_rest) = alice.wait();
    let (bob_status, bob_rest) = bob.wait();
    assert!(
        alice_status.success() && bob_status.success(),
        "{alice_status} {bob_status}"
    );
    assert!(
        texts(&alice_rest).is_empty() && texts(&bob_rest).is_empty(),
        "no message shown twice"
    );

    // `sessions` lists it, with the peer and the safety number.
    let (code, events) = run_client(relay.url(), alice_dir.path(), "alice", &["sessions"]);
    assert_eq!(code, Some(0));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["sid"], sid.as_str());
    assert_eq!(events[0]["peer"], "bob");
    assert_eq!(events[0]["role"], "host");
    assert_eq!(events[0]["safety_number"], a["safety_number"]);
}

#[test]
fn stdin_eof_sends_everything_typed_then_exits() {
    let relay = RelayProcess::start(&[]);
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    let mut alice = Client::spawn(relay.url(), alice_dir.path(), "alice", &["host"]);
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    // Typed before pairing is even complete; the client must send all of it, then exit 0.
    for i in 0..20 {
        alice.send_line(&format!("line {i}"));
    }
    alice.close_stdin();
    let mut bob = Client::spawn(
        relay.url(),
        bob_dir.path(),
        "bob",
        &["--exit-after", "20", "join", &code],
    );
    bob.close_stdin();
    let (alice_status, alice_events) = alice.wait();
    assert!(alice_status.success(), "{alice_status}: {alice_events:?}");
    let sent = alice_events.iter().filter(|e| e["event"] == "sent").count();
    assert_eq!(sent, 20);
    let (bob_status, bob_events) = bob.wait();
    assert!(bob_status.success(), "{bob_status}");
    let expected: Vec<String> = (0..20).map(|i| format!("line {i}")).collect();
    assert_eq!(texts(&bob_events), expected);
}

#[test]
fn exit_codes_tell_scripts_what_went_wrong() {
    let dir = TempDir::new("codes");
    // Nobody listens on this port (bound, then closed, by the test).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, events) = run_client(
        &format!("ws://127.0.0.1:{port}"),
        dir.path(),
        "x",
        &["host"],
    );
    assert_eq!(code, Some(3));
    assert_eq!(events.last().unwrap()["code"], "relay_unreachable");

    let (code, _) = run_client("ws://127.0.0.1:1", dir.path(), "x", &["resume"]);
    assert_eq!(code, Some(5), "no state yet");

    let relay = RelayProcess::start(&[]);
    let (code, events) = run_client(relay.url(), dir.path(), "x", &["join", "123456-123456"]);
    assert_eq!(code, Some(4));
    assert!(
        events.last().unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("invite_unknown")
    );

    let (code, events) = run_client(relay.url(), dir.path(), "x", &["--timeout", "1", "host"]);
    assert_eq!(code, Some(6));
    assert_eq!(events.last().unwrap()["code"], "timeout");

    let (code, _) = run_client(relay.url(), dir.path(), "x", &["join", "12-34"]);
    assert_eq!(code, Some(2), "malformed code is a usage error");

    // A corrupt state file is reported and left alone.
    std::fs::write(dir.path().join("state-x.json"), "{ not json").unwrap();
    let (code, events) = run_client(relay.url(), dir.path(), "x", &["sessions"]);
    assert_eq!(code, Some(5));
    assert!(
        events.last().unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("corrupt")
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state-x.json")).unwrap(),
        "{ not json"
    );
}
