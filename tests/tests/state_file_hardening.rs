//! The state file holds keys: the client reads only a regular file, never without a bound,
//! never waiting on a FIFO, and says so when others can read or write it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use parley_e2e::{Client, TempDir, fabricate_session, run_client, run_human};

#[test]
fn a_fifo_as_state_file_is_refused_at_once_not_waited_on() {
    let dir = TempDir::new("alice");
    let path = dir.path().join("state-alice.json");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    // Even --timeout could not end the wait: the open blocked the runtime's only thread.
    let mut alice = Client::spawn(
        "ws://127.0.0.1:1",
        dir.path(),
        "alice",
        &["--timeout", "3", "resume"],
    );
    let Some((status, events)) = alice.wait_up_to(Duration::from_secs(10)) else {
        panic!("parley hangs on a FIFO state file: {:?}", alice.seen);
    };
    assert_eq!(status.code(), Some(5), "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(last["code"], "state", "{events:?}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains("not a regular file") && message.contains("state-alice.json"),
        "{message}"
    );
}

#[test]
fn a_state_file_others_can_read_is_used_with_a_warning() {
    let dir = TempDir::new("alice");
    fabricate_session(dir.path(), "alice", "ws://127.0.0.1:1", "bob");
    let path = dir.path().join("state-alice.json");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

    let (code, events) = run_client("ws://127.0.0.1:1", dir.path(), "alice", &["sessions"]);
    assert_eq!(code, Some(0), "{events:?}");
    let warning = events
        .iter()
        .find(|e| e["event"] == "warning")
        .expect("a warning event");
    assert_eq!(warning["code"], "state_permissions", "{warning}");
    let message = warning["message"].as_str().unwrap();
    assert!(
        message.contains("state-alice.json") && message.contains("0644"),
        "{message}"
    );
    assert!(
        events.iter().any(|e| e["event"] == "session"),
        "still listed: {events:?}"
    );

    let run = run_human("ws://127.0.0.1:1", dir.path(), "alice", &["sessions"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "one line on stderr: {:?}", run.stderr);
    assert!(!run.stdout.contains("warning"), "{:?}", run.stdout);

    // A private file: no warning.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_, events) = run_client("ws://127.0.0.1:1", dir.path(), "alice", &["sessions"]);
    assert!(events.iter().all(|e| e["event"] != "warning"), "{events:?}");
}

#[test]
fn a_damaged_session_record_is_reported_with_the_file_it_is_in() {
    let dir = TempDir::new("alice");
    fabricate_session(dir.path(), "alice", "ws://127.0.0.1:1", "bob");
    let path = dir.path().join("state-alice.json");
    // Valid JSON of the right shape, but an outbox entry beyond what was ever sent.
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state["sessions"][0]["outbox"] = serde_json::json!([{"seq": 99, "frame": "{}"}]);
    std::fs::write(&path, state.to_string()).unwrap();
    let (code, events) = run_client("ws://127.0.0.1:1", dir.path(), "alice", &["resume"]);
    assert_eq!(code, Some(5), "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(last["code"], "state", "{events:?}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains(&*path.to_string_lossy()) && message.contains("outbox"),
        "{message}"
    );
}
