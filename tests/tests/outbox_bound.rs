//! The outbox is bounded (protocol.md 3.7): a script that pipes text while its peer is away
//! does not grow the state file without limit. Once the outbox is full the client stops
//! reading stdin (the pipe blocks) and says so (`outbox_full`); the state file stays small and
//! loadable, and everything it accepted arrives later, exactly once and in order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

use parley_e2e::{Client, RelayProcess, TempDir};
use serde_json::Value;

/// Lines the script offers: far more than any outbox may hold.
const OFFERED: u64 = 100_000;
/// What the host's state file may weigh with a full outbox of these short lines: the outbox
/// holds at most 1,000 messages (under 1 KiB each as frames here) and nothing else in the
/// file grows with the conversation. (The loader refuses files over 64 MiB.)
const STATE_FILE_LIMIT: u64 = 2 * 1024 * 1024;

fn state_size(dir: &TempDir, name: &str) -> u64 {
    std::fs::metadata(dir.path().join(format!("state-{name}.json")))
        .unwrap()
        .len()
}

#[test]
fn a_script_feeding_an_absent_peer_is_paused_at_the_outbox_bound_and_nothing_is_lost() {
    let relay = RelayProcess::start(&[]);
    let (host_dir, guest_dir) = (TempDir::new("host"), TempDir::new("guest"));

    // Pair, then the guest leaves (once its Hello is acknowledged).
    let mut host = Client::spawn(relay.url(), host_dir.path(), "host", &["host"]);
    let code = host.expect("invite")["code"].as_str().unwrap().to_string();
    let mut guest = Client::spawn(relay.url(), guest_dir.path(), "guest", &["join", &code]);
    host.expect("paired");
    guest.expect("paired");
    guest.close_stdin();
    let (status, _) = guest.wait();
    assert_eq!(status.code(), Some(0));
    host.expect("peer_offline");

    // A script pipes far more lines than the outbox may hold, from a thread: its writes block
    // once the client stops reading, which is the point.
    let mut stdin = host.take_stdin().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut written = 0u64;
        for i in 1..=OFFERED {
            if writeln!(stdin, "line {i}").is_err() {
                break;
            }
            written = i;
        }
        let _ = done_tx.send(written);
    });

    let full = host.expect("outbox_full");
    let accepted_upto = full["last_seq"].as_u64().expect("outbox_full has last_seq");
    let pending = full["pending"].as_u64().expect("outbox_full has pending");
    assert!(
        full["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{full}"
    );
    // Number 1 is the host's Hello (in the outbox until the guest's receipt for it arrives);
    // chat lines are 2..=last_seq.
    let accepted = accepted_upto - 1;
    assert!(pending == accepted || pending == accepted + 1, "{full}");
    assert!(
        (100..OFFERED).contains(&accepted),
        "the outbox took {accepted} of {OFFERED} lines"
    );

    // Reading stays paused: nothing more is sealed, and the file does not grow.
    let size = state_size(&host_dir, "host");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        state_size(&host_dir, "host"),
        size,
        "the state file grew while paused"
    );
    assert!(
        size < STATE_FILE_LIMIT,
        "state file is {size} bytes with a full outbox"
    );
    assert!(
        done_rx.try_recv().is_err(),
        "the writer got all {OFFERED} lines in: the client did not stop reading"
    );

    // Killed while paused: the writer's pipe breaks and it ends (bounded wait).
    host.kill();
    let written = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the writer thread did not end after the client was killed");
    assert!(written < OFFERED);

    // Both resume: the state file loads, and the guest gets exactly the accepted lines, once
    // each, in order; the host exits 0 once they are all acknowledged.
    let n = accepted.to_string();
    let mut guest = Client::spawn(
        relay.url(),
        guest_dir.path(),
        "guest",
        &["--exit-after", &n, "--timeout", "50", "resume"],
    );
    guest.close_stdin();
    let mut host = Client::spawn(
        relay.url(),
        host_dir.path(),
        "host",
        &["--timeout", "50", "resume"],
    );
    host.close_stdin();
    let resumed = host.expect("resumed");
    assert_eq!(resumed["event"], "resumed");

    let (status, events) = guest
        .wait_up_to(Duration::from_secs(55))
        .unwrap_or_else(|| panic!("the guest did not receive all {accepted} messages in time"));
    let errors: Vec<&Value> = events.iter().filter(|e| e["event"] == "error").collect();
    assert_eq!(status.code(), Some(0), "guest: {errors:?}");
    let got: Vec<(u64, String)> = events
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = (1..=accepted)
        .map(|i| (i + 1, format!("line {i}")))
        .collect();
    assert_eq!(
        got.len(),
        want.len(),
        "exactly the accepted lines, once each"
    );
    assert!(got == want, "the accepted lines, in order");

    let (status, events) = host
        .wait_up_to(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the host did not see its messages acknowledged in time"));
    assert!(!events.iter().any(|e| e["event"] == "error"), "{events:?}");
    assert_eq!(status.code(), Some(0));
}
