//! SIGKILL at random points while the client is saving its state: the state file must always
//! load afterwards, and the session must still resume.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use parley_e2e::{Client, RelayProcess, TempDir, run_client};

/// A small deterministic generator, so a failing run can be replayed from its printed seed.
struct Lcg(u64);

impl Lcg {
    fn next_below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn state_file_survives_sigkill_during_saves() {
    let relay = RelayProcess::start(&[]);
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    let mut alice = Client::spawn(relay.url(), alice_dir.path(), "alice", &["host"]);
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(relay.url(), bob_dir.path(), "bob", &["join", &code]);
    let sid = alice.expect("paired")["sid"].as_str().unwrap().to_string();
    bob.expect("paired");
    drop(bob);
    alice.kill();

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    for round in 0..6 {
        // Every line typed is a save (the send counter moves before the message leaves).
        let mut alice = Client::spawn(relay.url(), alice_dir.path(), "alice", &["resume"]);
        alice.expect("resumed");
        for i in 0..200 {
            alice.send_line(&format!("round {round} line {i}"));
        }
        std::thread::sleep(Duration::from_millis(rng.next_below(40)));
        alice.kill();

        let (code, events) = run_client(relay.url(), alice_dir.path(), "alice", &["sessions"]);
        assert_eq!(
            code,
            Some(0),
            "round {round} (seed {seed}): state unreadable after SIGKILL: {events:?}"
        );
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["sid"], sid.as_str());
        let leftovers: Vec<String> = std::fs::read_dir(alice_dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json") && n != "state-alice.json")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    // And the session still resumes (the lock died with the killed process).
    let mut alice = Client::spawn(relay.url(), alice_dir.path(), "alice", &["resume"]);
    assert_eq!(alice.expect("resumed")["sid"], sid.as_str());
    // Taking the lock cleared whatever temporary files the killed saves left.
    let tmp: Vec<_> = std::fs::read_dir(alice_dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}
