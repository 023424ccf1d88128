//! Nothing lost, nothing twice: N messages each way while the network, the relay and the
//! processes fail. Each receiver must end with exactly 1..N, once each, in order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parley_e2e::proxy::{Proxy, honest};
use parley_e2e::{Client, RelayProcess, TempDir, texts};
use serde_json::Value;

const N: usize = 500;
/// How long a whole scenario may take before the test fails.
const SCENARIO: Duration = Duration::from_secs(90);

/// A small deterministic generator; the seed is printed so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn seeded() -> Lcg {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("seed {seed}");
        Lcg(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// One person: a name, a state directory, and the client process of the moment, which may
/// be killed and resumed; every message event of every incarnation is kept.
struct Side {
    name: &'static str,
    dir: TempDir,
    client: Option<Client>,
    events: Vec<Value>,
    kills: usize,
}

impl Side {
    fn new(name: &'static str) -> Side {
        Side {
            name,
            dir: TempDir::new(name),
            client: None,
            events: Vec::new(),
            kills: 0,
        }
    }

    fn received(&self) -> usize {
        shown_once(&self.events).0.len()
    }

    fn kill(&mut self) {
        if let Some(client) = self.client.take() {
            self.events.extend(client.kill_and_collect());
            self.kills += 1;
        }
    }

    /// `resume`, expecting what is still to come.
    /// `resume`, expecting what is still to come (a message the last run recorded but may not
    /// have shown is shown again and not counted, so it never exits early).
    fn resume(&mut self, relay_url: &str) {
        let left = (N - self.received()).to_string();
        let mut client = Client::spawn(
            relay_url,
            self.dir.path(),
            self.name,
            &["--exit-after", &left, "resume"],
        );
        client.close_stdin();
        self.client = Some(client);
    }

    /// Sequence number of the last message sealed into the outbox (from the state file).
    fn queued(&self) -> u64 {
        let path = self.dir.path().join(format!("state-{}.json", self.name));
        let Ok(text) = std::fs::read_to_string(path) else {
            return 0;
        };
        let state: Value = serde_json::from_str(&text).unwrap_or_default();
        state["sessions"][0]["send_seq"].as_u64().unwrap_or(0)
    }
}

/// The chat lines shown, each sequence number once: a crash between recording and showing
/// makes the next run show that message again, with the same `seq` (never a gap). Checks that
/// a repeat is the same message and that numbers only go up; returns the texts and the number
/// of repeats.
fn shown_once(events: &[Value]) -> (Vec<String>, usize) {
    let mut last = 1; // number 1 is each side's Hello, not a chat line
    let mut repeats = 0;
    let mut out = Vec::new();
    for e in events.iter().filter(|e| e["event"] == "message") {
        let seq = e["seq"].as_u64().unwrap();
        if seq <= last {
            repeats += 1;
            continue;
        }
        assert_eq!(seq, last + 1, "gap before seq {seq}");
        last = seq;
        out.push(e["text"].as_str().unwrap().to_string());
    }
    (out, repeats)
}

fn lines(prefix: &str) -> Vec<String> {
    (1..=N).map(|i| format!("{prefix}{i}")).collect()
}

/// Pairs alice (host) and bob through `url`, types N lines on each side and waits until every
/// line is in its sender's outbox (so killing a process from now on loses no input).
fn start(url: &str) -> (Side, Side) {
    let (mut alice, mut bob) = (Side::new("alice"), Side::new("bob"));
    let n = N.to_string();
    let mut a = Client::spawn(
        url,
        alice.dir.path(),
        "alice",
        &["--exit-after", &n, "host"],
    );
    let code = a.expect("invite")["code"].as_str().unwrap().to_string();
    let mut b = Client::spawn(
        url,
        bob.dir.path(),
        "bob",
        &["--exit-after", &n, "join", &code],
    );
    a.expect("paired");
    b.expect("paired");
    for line in lines("a") {
        a.send_line(&line);
    }
    for line in lines("b") {
        b.send_line(&line);
    }
    a.close_stdin();
    b.close_stdin();
    alice.client = Some(a);
    bob.client = Some(b);
    let deadline = Instant::now() + SCENARIO;
    // The Hello is number 1, so N lines end at N + 1.
    while alice.queued() < N as u64 + 1 || bob.queued() < N as u64 + 1 {
        assert!(Instant::now() < deadline, "input was not taken");
        for side in [&mut alice, &mut bob] {
            if let Some(client) = &mut side.client {
                let _ = client.wait_up_to(Duration::from_millis(10));
            }
        }
    }
    (alice, bob)
}

impl Side {
    /// Moves what the running client printed so far into `events` (it keeps running).
    fn drain(&mut self) {
        if let Some(client) = &mut self.client {
            if let Some((status, rest)) = client.wait_up_to(Duration::from_millis(10)) {
                assert!(status.success(), "{} exited with {status}", self.name);
                self.events.extend(rest);
                self.client = None;
            } else {
                self.events.append(&mut client.seen);
            }
        }
    }

    fn shown(&self) -> usize {
        self.received()
    }

    /// For a failure message: is it running, and what did it last say besides messages.
    fn describe(&self) -> String {
        let other: Vec<String> = self
            .events
            .iter()
            .chain(self.client.iter().flat_map(|c| c.seen.iter()))
            .filter(|e| !matches!(e["event"].as_str(), Some("message" | "sent" | "delivered")))
            .map(|e| e.to_string())
            .collect();
        let tail = other.len().saturating_sub(6);
        let got: std::collections::HashSet<String> = texts(&self.events)
            .into_iter()
            .chain(self.client.iter().flat_map(|c| texts(&c.seen)))
            .collect();
        let prefix = if self.name == "alice" { "b" } else { "a" };
        let missing: Vec<usize> = (1..=N)
            .filter(|i| !got.contains(&format!("{prefix}{i}")))
            .collect();
        let shown: Vec<u64> = self
            .events
            .iter()
            .filter(|e| e["event"] == "message")
            .filter_map(|e| e["seq"].as_u64())
            .collect();
        format!(
            "{} missing {missing:?} (seq jumps {:?}) received {}, running: {}, last events: {:?}",
            self.name,
            shown
                .windows(2)
                .filter(|w| w[1] != w[0] + 1)
                .collect::<Vec<_>>(),
            self.received() + self.client.as_ref().map_or(0, |c| texts(&c.seen).len()),
            self.client.is_some(),
            &other[tail..]
        )
    }
}

/// Runs until both sides have shown N messages, then stops them and checks what was shown.
/// (It does not wait for both to exit by themselves: the last receipt of a conversation can be
/// lost with a cut connection after its sender has left, and the other side then rightly waits
/// for it until that peer's next resume; see protocol.md 3.7.)
fn finish_and_check(mut alice: Side, mut bob: Side) {
    let deadline = Instant::now() + SCENARIO;
    loop {
        for side in [&mut alice, &mut bob] {
            side.drain();
        }
        if alice.shown() >= N && bob.shown() >= N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not done in time:\n{}\n{}",
            alice.describe(),
            bob.describe()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    alice.kill();
    bob.kill();
    for (side, prefix) in [(&alice, "b"), (&bob, "a")] {
        let (shown, repeats) = shown_once(&side.events);
        assert_eq!(
            shown,
            lines(prefix),
            "{} must have {prefix}1..{prefix}N, in order",
            side.name
        );
        // Only a process killed between recording and printing repeats one (same seq).
        assert!(
            repeats <= side.kills,
            "{}: {repeats} repeats for {} kills",
            side.name,
            side.kills
        );
    }
}

#[test]
fn connections_cut_at_random_points_lose_nothing() {
    let relay = RelayProcess::start(&[]);
    let armed = Arc::new(AtomicBool::new(false));
    let rng = Arc::new(AtomicU64::new(Lcg::seeded().0));
    let (armed2, rng2) = (armed.clone(), rng.clone());
    // Once armed, each frame has a 1 in 150 chance of cutting its connection (some dozens of
    // cuts over the run, at arbitrary points: mid-window, mid-receipt, mid-resend).
    let cut = Arc::new(move || {
        let x = rng2
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
        armed2.load(Ordering::Relaxed) && (x >> 40) % 150 == 0
    });
    let proxy = Proxy::start_cutting(relay.url(), honest(), cut);
    let (alice, bob) = start(proxy.url());
    armed.store(true, Ordering::Relaxed);
    finish_and_check(alice, bob);
}

#[test]
fn sigkill_and_offline_peers_lose_nothing() {
    let relay = RelayProcess::start(&[]);
    let (mut alice, mut bob) = start(relay.url());
    let mut rng = Lcg::seeded();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
        let victim = if rng.below(2) == 0 {
            &mut alice
        } else {
            &mut bob
        };
        if victim.received() >= N && victim.client.is_none() {
            continue;
        }
        victim.kill();
        // Offline for a while: its peer goes on sending into the relay's mailbox.
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        victim.resume(relay.url());
    }
    finish_and_check(alice, bob);
}

#[test]
fn a_relay_restart_mid_stream_loses_nothing() {
    let relay = RelayProcess::start(&[]);
    let (alice, bob) = start(relay.url());
    std::thread::sleep(Duration::from_millis(200));
    let stopped = relay.kill();
    std::thread::sleep(Duration::from_millis(300));
    // The same address and secret, an empty memory: the clients' tokens re-create the
    // session, and they resend what the lost mailboxes held.
    let _relay = stopped.start_again(&[]);
    finish_and_check(alice, bob);
}

#[test]
fn a_full_mailbox_is_reported_and_nothing_is_lost() {
    let relay = RelayProcess::start(&["--mailbox-frames", "5"]);
    let (mut alice, mut bob) = (Side::new("alice"), Side::new("bob"));
    let mut a = Client::spawn(relay.url(), alice.dir.path(), "alice", &["host"]);
    let code = a.expect("invite")["code"].as_str().unwrap().to_string();
    let mut b = Client::spawn(relay.url(), bob.dir.path(), "bob", &["join", &code]);
    a.expect("paired");
    b.expect("paired");
    drop(b);
    a.expect("peer_offline");
    for i in 1..=30 {
        a.send_line(&format!("m{i}"));
    }
    a.close_stdin();
    let full = a.expect("error");
    assert_eq!(full["code"], "mailbox_full", "{full}");
    alice.client = Some(a);

    let mut b = Client::spawn(
        relay.url(),
        bob.dir.path(),
        "bob",
        &["--exit-after", "30", "resume"],
    );
    b.close_stdin();
    bob.client = Some(b);
    let deadline = Instant::now() + SCENARIO;
    loop {
        bob.drain();
        if bob.received() >= 30 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", bob.describe());
        std::thread::sleep(Duration::from_millis(20));
    }
    alice.kill();
    bob.kill();
    let expected: Vec<String> = (1..=30).map(|i| format!("m{i}")).collect();
    assert_eq!(shown_once(&bob.events), (expected, 0));
}
