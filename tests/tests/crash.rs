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
    // Bob stays for the whole test and receives everything that gets out.
    let mut bob = Client::spawn(relay.url(), bob_dir.path(), "bob", &["join", &code]);
    let sid = alice.expect("paired")["sid"].as_str().unwrap().to_string();
    bob.expect("paired");
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
    }

    // The session still resumes (the lock died with the killed process), and what is sent now
    // arrives: no sequence number was used twice, or bob would refuse it as a replay.
    let mut alice = Client::spawn(relay.url(), alice_dir.path(), "alice", &["resume"]);
    assert_eq!(alice.expect("resumed")["sid"], sid.as_str());
    alice.send_line("after the crashes");
    loop {
        let message = bob.expect("message");
        if message["text"] == "after the crashes" {
            break;
        }
    }
    let refused: Vec<_> = bob.seen.iter().filter(|e| e["event"] == "error").collect();
    assert!(
        refused.is_empty(),
        "seed {seed}: bob refused messages: {refused:?}"
    );
    let (status, _) = alice.wait();
    assert!(status.success());

    // Taking the lock cleared whatever temporary files the killed saves left.
    let tmp: Vec<_> = std::fs::read_dir(alice_dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}
