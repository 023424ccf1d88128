//! A relay restarted while both members are stopped: whichever comes back first, the session
//! resumes with no new code, and a message from one reaches the other.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use parley_e2e::{Client, RelayProcess, TempDir, texts};

fn restart_while_both_are_away(first: &str, second: &str) {
    let relay = RelayProcess::start(&[]);
    let dirs = [
        ("alice", TempDir::new("alice")),
        ("bob", TempDir::new("bob")),
    ];
    let dir = |name: &str| dirs.iter().find(|(n, _)| *n == name).unwrap().1.path();

    let mut alice = Client::spawn(relay.url(), dir("alice"), "alice", &["host"]);
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(relay.url(), dir("bob"), "bob", &["join", &code]);
    alice.expect("paired");
    bob.expect("paired");
    alice.close_stdin();
    bob.close_stdin();
    for client in [alice, bob] {
        let (status, events) = client.wait();
        assert!(status.success(), "{status}: {events:?}");
    }

    // Both are stopped; the relay restarts (same secret, empty memory).
    let relay = relay.kill().start_again(&[]);

    let mut early = Client::spawn(
        relay.url(),
        dir(first),
        first,
        &["--timeout", "60", "resume"],
    );
    let resumed = early.expect("resumed");
    assert_eq!(resumed["peer_online"], false, "{resumed}");
    early.send_line(&format!("{first} is back"));
    early.close_stdin();

    let mut late = Client::spawn(
        relay.url(),
        dir(second),
        second,
        &["--timeout", "60", "--exit-after", "1", "resume"],
    );
    late.close_stdin();
    let (status, events) = late.wait();
    assert!(status.success(), "{second}: {status}: {events:?}");
    assert_eq!(texts(&events), [format!("{first} is back")]);
    let (status, events) = early.wait();
    assert!(status.success(), "{first}: {status}: {events:?}");
}

#[test]
fn host_first_after_a_relay_restart_with_both_away() {
    restart_while_both_are_away("alice", "bob");
}

#[test]
fn guest_first_after_a_relay_restart_with_both_away() {
    restart_while_both_are_away("bob", "alice");
}
