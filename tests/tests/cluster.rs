//! Several real relays on one real Redis, acting as one relay (`--redis`, docs/cluster.md).
//!
//! Each test starts its own redis-server on a free port and two or three `parley-relay`
//! processes that share a secret file; clients reach them directly or through a TCP balancer
//! in the harness.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parley_e2e::balancer::Balancer;
use parley_e2e::raw::{Ws, connect, send};
use parley_e2e::redis::RedisServer;
use parley_e2e::{Client, RelayProcess, STEP, TempDir, texts};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

struct Nodes {
    redis: RedisServer,
    secret: TempDir,
    relays: Vec<RelayProcess>,
}

impl Nodes {
    fn start(n: usize, redis: RedisServer, extra: &[&str]) -> Nodes {
        let secret = TempDir::new("cluster-secret");
        let mut nodes = Nodes {
            redis,
            secret,
            relays: Vec::new(),
        };
        for _ in 0..n {
            nodes.relays.push(nodes.node(extra));
        }
        nodes
    }

    fn secret_file(&self) -> PathBuf {
        self.secret.path().join("secret")
    }

    /// One more relay on the same Redis and secret.
    fn node(&self, extra: &[&str]) -> RelayProcess {
        let url = self.redis.url();
        let mut args = vec!["--redis", url.as_str()];
        args.extend_from_slice(extra);
        RelayProcess::start_with_secret(&self.secret_file(), &args)
    }

    fn addr(&self, i: usize) -> &str {
        self.relays[i].addr()
    }

    /// Waits until Redis counts exactly `n` live nodes: a killed node's heartbeat has lapsed
    /// (5 s) and another node's heartbeat has removed it.
    fn wait_for_nodes(&self, n: usize) {
        self.redis.wait_for(&["ZCARD", "parley:nodes"], |answer| {
            answer.trim() == n.to_string()
        });
    }
}

#[test]
fn pairing_chat_and_resume_across_nodes() {
    // With persistence on, so that what the nodes wrote to each other stays on disk.
    let nodes = Nodes::start(2, RedisServer::start_persistent(), &[]);
    // Each client's own way in, so the test says which node it reaches.
    let to_alice = Balancer::start(&[nodes.addr(0)]);
    let to_bob = Balancer::start(&[nodes.addr(1)]);
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));

    let mut alice = Client::spawn(
        to_alice.url(),
        alice_dir.path(),
        "alice",
        &["--exit-after", "1", "host"],
    );
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(
        to_bob.url(),
        bob_dir.path(),
        "bob",
        &["--exit-after", "1", "join", &code],
    );
    let a = alice.expect("paired");
    let b = bob.expect("paired");
    assert_eq!(a["safety_number"], b["safety_number"]);
    alice.send_line("hi bob, from node 0");
    bob.send_line("hi alice, from node 1");
    assert_eq!(bob.expect("message")["text"], "hi bob, from node 0");
    assert_eq!(alice.expect("message")["text"], "hi alice, from node 1");
    for client in [alice, bob] {
        let (status, events) = client.wait();
        assert!(status.success(), "{status}: {events:?}");
    }

    // Both come back, each through the other node: their seats follow them.
    to_alice.set_backends(&[nodes.addr(1)]);
    to_bob.set_backends(&[nodes.addr(0)]);
    let mut alice = Client::spawn(
        to_alice.url(),
        alice_dir.path(),
        "alice",
        &["--exit-after", "1", "resume"],
    );
    alice.expect("resumed");
    alice.send_line("alice again, now on node 1");
    let mut bob = Client::spawn(
        to_bob.url(),
        bob_dir.path(),
        "bob",
        &["--exit-after", "1", "resume"],
    );
    bob.expect("resumed");
    bob.send_line("bob again, now on node 0");
    let (status, events) = bob.wait();
    assert!(status.success(), "{status}: {events:?}");
    assert_eq!(texts(&events), ["alice again, now on node 1"]);
    let (status, events) = alice.wait();
    assert!(status.success(), "{status}: {events:?}");
    assert_eq!(texts(&events), ["bob again, now on node 0"]);

    // Resume tokens went between the nodes (REATTACH forwarded, JOINED sent back), yet
    // nothing Redis keeps on disk can be read for one.
    let mut on_disk = Vec::new();
    let mut dirs = vec![nodes.redis.dir().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                on_disk.extend(std::fs::read(&path).unwrap());
            }
        }
    }
    assert!(
        on_disk.len() > 1000,
        "the append-only file holds the writes"
    );
    for readable in [&b"resumeToken"[..], b"REATTACH", b"JOINED"] {
        assert!(
            !on_disk.windows(readable.len()).any(|w| w == readable),
            "{} is readable in Redis's files",
            String::from_utf8_lossy(readable)
        );
    }
}

/// The next frame that is not a PING.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("no frame in time")
            .expect("connection closed")
            .unwrap();
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["t"] != "PING" {
                return frame;
            }
        }
    }
}

/// A host on node `at` with a session and a live code: (socket, sid, the code's digits).
async fn host_with_code(addr: &str) -> (Ws, String, String) {
    let mut host = connect(addr).await;
    send(&mut host, json!({"t": "CREATE_SESSION"})).await;
    let created = next(&mut host).await;
    assert_eq!(created["t"], "SESSION_CREATED", "{created}");
    let sid = created["sid"].as_str().unwrap().to_string();
    send(&mut host, json!({"t": "INVITE_CREATE", "sid": sid})).await;
    let invite = next(&mut host).await;
    assert_eq!(invite["t"], "INVITE_CODE", "{invite}");
    let code = invite["data"]["code"].as_str().unwrap().to_string();
    (host, sid, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_redeemed_at_two_nodes_at_once_is_spent_once() {
    let nodes = Nodes::start(3, RedisServer::start(), &[]);
    for round in 0..5 {
        let (mut host, _sid, code) = host_with_code(nodes.addr(round % 3)).await;
        let mut guests = Vec::new();
        for i in 1..3 {
            guests.push(connect(nodes.addr((round + i) % 3)).await);
        }
        let join = json!({"t": "JOIN", "data": {"code": code}});
        let (a, b) = guests.split_at_mut(1);
        let (ra, rb) = tokio::join!(
            async {
                send(&mut a[0], join.clone()).await;
                next(&mut a[0]).await
            },
            async {
                send(&mut b[0], join.clone()).await;
                next(&mut b[0]).await
            }
        );
        let mut answers = [ra["t"].as_str().unwrap(), rb["t"].as_str().unwrap()];
        answers.sort_unstable();
        assert_eq!(answers, ["ERROR", "JOINED"], "round {round}: {ra} {rb}");
        let refused = if ra["t"] == "ERROR" { &ra } else { &rb };
        assert_eq!(refused["data"]["code"], "invite_used", "{refused}");
        // And the host heard of exactly one joiner.
        let request = next(&mut host).await;
        assert_eq!(request["t"], "JOIN_REQUEST", "{request}");
    }
}

#[test]
fn no_code_is_issued_twice_across_nodes() {
    // Every node issues codes from its own reservations in Redis: many codes from three
    // nodes at once never collide. (All from one address: its allowance of sessions, which
    // the cluster shares, is raised for the test.)
    let nodes = Nodes::start(
        3,
        RedisServer::start(),
        &["--sessions-created-per-address", "1000"],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let codes: Vec<String> = runtime.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..3 {
            let addr = nodes.addr(i).to_string();
            tasks.push(tokio::spawn(async move {
                let mut codes = Vec::new();
                for _ in 0..30 {
                    let (_host, _, code) = host_with_code(&addr).await;
                    codes.push(code);
                }
                codes
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all
    });
    let mut unique = codes.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), codes.len(), "a code was issued twice");
    let reserved = nodes.redis.cli(&["--scan", "--pattern", "parley:code:*"]);
    for code in &codes {
        assert!(
            reserved.contains(&format!("parley:code:{code}")),
            "{code} was issued without a reservation"
        );
    }
}

/// Pairs alice (through `to_alice`) and bob (through `to_bob`), then both quit.
fn pair_and_quit(to_alice: &str, to_bob: &str, alice_dir: &TempDir, bob_dir: &TempDir) {
    let mut alice = Client::spawn(to_alice, alice_dir.path(), "alice", &["host"]);
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(to_bob, bob_dir.path(), "bob", &["join", &code]);
    alice.expect("paired");
    bob.expect("paired");
    alice.close_stdin();
    bob.close_stdin();
    for client in [alice, bob] {
        let (status, events) = client.wait();
        assert!(status.success(), "{status}: {events:?}");
    }
}

#[test]
fn a_mailbox_outlives_the_node_that_kept_it() {
    // Bob is away; alice leaves him a message at the session's home and quits for good (her
    // client can no longer send it again). The home is SIGKILLed. Bob comes back through the
    // other node: the session is taken in there, with his mailbox, and no RESTORE.
    let mut nodes = Nodes::start(2, RedisServer::start(), &[]);
    let to_alice = Balancer::start(&[nodes.addr(0)]);
    let to_bob = Balancer::start(&[nodes.addr(0)]);
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    pair_and_quit(to_alice.url(), to_bob.url(), &alice_dir, &bob_dir);

    let mut alice = Client::spawn(to_alice.url(), alice_dir.path(), "alice", &["resume"]);
    alice.expect("resumed");
    alice.send_line("left for you while you were away");
    alice.expect("sent");
    alice.kill();

    nodes.relays.remove(0).kill();
    nodes.wait_for_nodes(1);
    to_bob.set_backends(&[nodes.addr(0)]); // the surviving node
    let mut bob = Client::spawn(
        to_bob.url(),
        bob_dir.path(),
        "bob",
        &["--exit-after", "1", "--timeout", "60", "resume"],
    );
    bob.close_stdin();
    let (status, events) = bob.wait();
    assert!(status.success(), "{status}: {events:?}");
    assert_eq!(texts(&events), ["left for you while you were away"]);
}

#[test]
fn a_relay_restarted_while_both_are_away_keeps_the_mailbox() {
    // One node (a cluster of one) restarts with both members away: the mailbox is in Redis.
    let mut nodes = Nodes::start(1, RedisServer::start(), &[]);
    let to_node = Balancer::start(&[nodes.addr(0)]);
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    pair_and_quit(to_node.url(), to_node.url(), &alice_dir, &bob_dir);
    let mut alice = Client::spawn(to_node.url(), alice_dir.path(), "alice", &["resume"]);
    alice.expect("resumed");
    alice.send_line("one");
    alice.send_line("two");
    alice.expect("sent");
    alice.expect("sent");
    alice.kill();

    let restarted = nodes.relays.remove(0).kill();
    drop(restarted);
    nodes.relays.push(nodes.node(&[]));
    nodes.wait_for_nodes(1);
    to_node.set_backends(&[nodes.addr(0)]);
    let mut bob = Client::spawn(
        to_node.url(),
        bob_dir.path(),
        "bob",
        &["--exit-after", "2", "--timeout", "60", "resume"],
    );
    bob.close_stdin();
    let (status, events) = bob.wait();
    assert!(status.success(), "{status}: {events:?}");
    assert_eq!(texts(&events), ["one", "two"]);
}

/// How long the clients of a disrupted conversation have to finish.
const RECOVERY: Duration = Duration::from_secs(90);

/// Pairs alice (through `to_alice`) and bob (through `to_bob`); both then send `lines` lines,
/// 20 ms apart, `before_line(i)` called before the i-th. Every line must arrive once, in order.
fn converse(to_alice: &str, to_bob: &str, lines: usize, mut before_line: impl FnMut(usize)) {
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    let count = lines.to_string();
    let mut alice = Client::spawn(
        to_alice,
        alice_dir.path(),
        "alice",
        &["--exit-after", &count, "--timeout", "120", "host"],
    );
    let code = alice.expect("invite")["code"].as_str().unwrap().to_string();
    let mut bob = Client::spawn(
        to_bob,
        bob_dir.path(),
        "bob",
        &["--exit-after", &count, "--timeout", "120", "join", &code],
    );
    alice.expect("paired");
    bob.expect("paired");
    for i in 0..lines {
        before_line(i);
        alice.send_line(&format!("a{i}"));
        bob.send_line(&format!("b{i}"));
        std::thread::sleep(Duration::from_millis(20));
    }
    alice.close_stdin();
    bob.close_stdin();
    // Recovering from the disruption takes reconnects with backoff, and on a loaded machine
    // (the whole suite at once) more than the harness's usual step.
    let finished = |client: &mut Client, who: &str| {
        client.wait_up_to(RECOVERY).unwrap_or_else(|| {
            panic!(
                "{who} did not finish within {RECOVERY:?}: {:?}",
                client.seen
            )
        })
    };
    let (status, alice_events) = finished(&mut alice, "alice");
    assert!(status.success(), "alice: {status}: {alice_events:?}");
    let (status, bob_events) = finished(&mut bob, "bob");
    assert!(status.success(), "bob: {status}: {bob_events:?}");
    let expect = |who: &str| (0..lines).map(|i| format!("{who}{i}")).collect::<Vec<_>>();
    assert_eq!(texts(&bob_events), expect("a"));
    assert_eq!(texts(&alice_events), expect("b"));
}

#[test]
fn a_node_killed_mid_conversation_loses_nothing() {
    // Both clients go through one balancer in front of two nodes; one node is SIGKILLed while
    // they talk. They reconnect through the balancer, and every line arrives once, in order.
    let mut nodes = Nodes::start(2, RedisServer::start(), &[]);
    let balancer = Balancer::start(&[nodes.addr(0), nodes.addr(1)]);
    let url = balancer.url().to_string();
    converse(&url, &url, 40, |i| {
        if i == 21 {
            nodes.relays.remove(0).kill();
            balancer.set_backends(&[nodes.addr(0)]);
        }
    });
}

#[test]
fn redis_restarted_mid_conversation() {
    // With Redis persistence on, Redis restarts while two members on different nodes talk:
    // nothing is lost, nothing is shown twice, and the nodes carry on.
    let mut nodes = Nodes::start(2, RedisServer::start_persistent(), &[]);
    let to_alice = Balancer::start(&[nodes.addr(0)]);
    let to_bob = Balancer::start(&[nodes.addr(1)]);
    converse(to_alice.url(), to_bob.url(), 30, |i| {
        if i == 11 {
            nodes.redis.restart();
        }
    });
}

#[test]
fn every_key_expires() {
    let nodes = Nodes::start(2, RedisServer::start(), &[]);
    let to_alice = Balancer::start(&[nodes.addr(0)]);
    let to_bob = Balancer::start(&[nodes.addr(1)]);
    let (alice_dir, bob_dir) = (TempDir::new("alice"), TempDir::new("bob"));
    pair_and_quit(to_alice.url(), to_bob.url(), &alice_dir, &bob_dir);
    // A kept frame, so a mailbox list exists too.
    let mut alice = Client::spawn(to_alice.url(), alice_dir.path(), "alice", &["resume"]);
    alice.expect("resumed");
    alice.send_line("waiting");
    alice.expect("sent");
    alice.kill();

    // A wrong code, so a shared rate-limit bucket exists too.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut guesser = connect(nodes.addr(1)).await;
        send(
            &mut guesser,
            json!({"t": "JOIN", "data": {"code": "000000"}}),
        )
        .await;
        assert_eq!(answer_code(&mut guesser).await, "invite_unknown");
    });
    std::thread::sleep(Duration::from_millis(300)); // the charge reaches Redis

    let keys = nodes.redis.cli(&["--scan", "--pattern", "parley:*"]);
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    for kind in [
        "nodes",
        "load",
        "home:",
        "code:",
        "inbox:",
        "mbox:",
        "wseq:",
        "limit:join:",
        "limit:create:",
    ] {
        assert!(
            keys.iter()
                .any(|k| k.starts_with(&format!("parley:{kind}"))),
            "no {kind} key among {keys:?}"
        );
    }
    for key in keys {
        let ttl: i64 = nodes.redis.cli(&["PTTL", key]).trim().parse().unwrap();
        assert!(ttl > 0, "{key} has no lifetime ({ttl})");
    }
}

/// The next frame's error code (or its type, if it is not an `ERROR`).
async fn answer_code(ws: &mut Ws) -> String {
    let frame = next(ws).await;
    if frame["t"] == "ERROR" {
        frame["data"]["code"].as_str().unwrap().to_string()
    } else {
        frame["t"].as_str().unwrap().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_hold_across_nodes() {
    let nodes = Nodes::start(
        2,
        RedisServer::start(),
        &[
            "--join-failures-per-address",
            "3",
            "--sessions-created-per-address",
            "2",
            "--max-sessions",
            "3",
        ],
    );
    // Failed JOINs: three at node 0 use up the address's allowance at node 1 too.
    let mut guesser = connect(nodes.addr(0)).await;
    for _ in 0..3 {
        send(
            &mut guesser,
            json!({"t": "JOIN", "data": {"code": "000000"}}),
        )
        .await;
        assert_eq!(answer_code(&mut guesser).await, "invite_unknown");
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // the charges reach Redis
    let mut elsewhere = connect(nodes.addr(1)).await;
    send(
        &mut elsewhere,
        json!({"t": "JOIN", "data": {"code": "000000"}}),
    )
    .await;
    assert_eq!(answer_code(&mut elsewhere).await, "rate_limited");

    // Sessions created: two at node 0, then none at node 1.
    let mut hosts = Vec::new();
    for _ in 0..2 {
        let mut host = connect(nodes.addr(0)).await;
        send(&mut host, json!({"t": "CREATE_SESSION"})).await;
        assert_eq!(answer_code(&mut host).await, "SESSION_CREATED");
        hosts.push(host);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut third = connect(nodes.addr(1)).await;
    send(&mut third, json!({"t": "CREATE_SESSION"})).await;
    assert_eq!(answer_code(&mut third).await, "rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cap_is_the_clusters() {
    let nodes = Nodes::start(2, RedisServer::start(), &["--max-sessions", "3"]);
    let mut hosts = Vec::new();
    for node in [0, 0, 1] {
        let mut host = connect(nodes.addr(node)).await;
        send(&mut host, json!({"t": "CREATE_SESSION"})).await;
        assert_eq!(answer_code(&mut host).await, "SESSION_CREATED");
        hosts.push(host);
    }
    // Each node learns what the other holds from its heartbeat (every second).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for node in [0, 1] {
        let mut host = connect(nodes.addr(node)).await;
        send(&mut host, json!({"t": "CREATE_SESSION"})).await;
        assert_eq!(answer_code(&mut host).await, "relay_full", "node {node}");
    }
}

/// Sends `MSG` from one side and checks the other gets it byte for byte and the sender its
/// `DELIVERED`.
async fn delivers(from: &mut Ws, to: &mut Ws, sid: &str, id: &str) {
    let msg = format!(r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"ab01","msgID":"{id}"}}}}"#);
    from.send(Message::text(msg.clone())).await.unwrap();
    let got = next(to).await;
    assert_eq!(got, serde_json::from_str::<Value>(&msg).unwrap());
    let delivered = next(from).await;
    assert_eq!(delivered["t"], "DELIVERED", "{delivered}");
    assert_eq!(delivered["data"]["msgID"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_clients_flow_across_nodes() {
    // The original system's client (seed 003), frame by frame, host on one node and guest on
    // the other: it works unchanged, including its token-less REATTACH, at another node.
    let nodes = Nodes::start(2, RedisServer::start(), &["--allow-tokenless-reattach"]);
    let mut alice = connect(nodes.addr(0)).await;
    send(&mut alice, json!({"t": "CREATE_SESSION"})).await;
    let sid = next(&mut alice).await["sid"].as_str().unwrap().to_string();
    send(&mut alice, json!({"t": "INVITE_CREATE", "sid": sid})).await;
    let code = next(&mut alice).await["data"]["code"]
        .as_str()
        .unwrap()
        .to_string();
    let params =
        json!({"prime": "ff".repeat(256), "generator": "02", "publicKey": "a1".repeat(256)});
    send(
        &mut alice,
        json!({"t": "INVITE_CREATE", "sid": sid, "data": params}),
    )
    .await;

    let mut bob = connect(nodes.addr(1)).await;
    send(
        &mut bob,
        json!({"t": "JOIN", "data": {"code": code, "publicKey": "b2b2"}}),
    )
    .await;
    let request = next(&mut alice).await;
    assert_eq!(request["t"], "JOIN_REQUEST", "{request}");
    assert_eq!(request["data"]["publicKey"], "b2b2");
    let client_id = request["data"]["clientID"].clone();
    let joined = next(&mut bob).await;
    assert_eq!(joined["t"], "JOINED");
    for field in ["prime", "generator", "publicKey"] {
        assert_eq!(joined["data"][field], params[field], "{field}");
    }
    send(
        &mut alice,
        json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": client_id, "publicKey": "a1a1"}}),
    )
    .await;
    let accepted = next(&mut bob).await;
    assert_eq!(accepted["t"], "JOINED");
    assert_eq!(accepted["data"]["publicKey"], "a1a1");

    delivers(&mut alice, &mut bob, &sid, "m1").await;
    delivers(&mut bob, &mut alice, &sid, "m2").await;
    let read = format!(r#"{{"t":"MSG_READ","sid":"{sid}","data":{{"msgID":"m1"}}}}"#);
    bob.send(Message::text(read.clone())).await.unwrap();
    assert_eq!(
        next(&mut alice).await,
        serde_json::from_str::<Value>(&read).unwrap()
    );

    // Bob restarts and comes back at the other node, with the original token-less REATTACH.
    drop(bob);
    assert_eq!(next(&mut alice).await["t"], "PEER_OFFLINE");
    let mut bob = connect(nodes.addr(0)).await;
    send(&mut bob, json!({"t": "REATTACH", "sid": sid})).await;
    assert_eq!(next(&mut alice).await["t"], "PEER_ONLINE");
    assert_eq!(next(&mut bob).await["t"], "PEER_ONLINE");
    delivers(&mut alice, &mut bob, &sid, "m3").await;
    delivers(&mut bob, &mut alice, &sid, "m4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_invites_never_runs_out_of_codes() {
    // Each node reserves codes ahead; a burst larger than its reserve waits for more rather
    // than failing. (All from one address: its session allowance is raised for the test.)
    let nodes = Nodes::start(
        1,
        RedisServer::start(),
        &["--sessions-created-per-address", "1000"],
    );
    let mut hosts = Vec::new();
    for _ in 0..150 {
        let mut host = connect(nodes.addr(0)).await;
        send(&mut host, json!({"t": "CREATE_SESSION"})).await;
        let sid = next(&mut host).await["sid"].as_str().unwrap().to_string();
        hosts.push((host, sid));
    }
    for (host, sid) in &mut hosts {
        send(host, json!({"t": "INVITE_CREATE", "sid": sid})).await;
    }
    for (host, _) in &mut hosts {
        assert_eq!(answer_code(host).await, "INVITE_CODE");
    }
}

/// A paired host (on `host_at`) and guest (on `guest_at`): (host, guest, sid).
async fn paired_sockets(host_at: &str, guest_at: &str) -> (Ws, Ws, String) {
    let (mut host, sid, code) = host_with_code(host_at).await;
    let mut guest = connect(guest_at).await;
    send(&mut guest, json!({"t": "JOIN", "data": {"code": code}})).await;
    let request = next(&mut host).await;
    assert_eq!(request["t"], "JOIN_REQUEST", "{request}");
    assert_eq!(next(&mut guest).await["t"], "JOINED");
    let client_id = request["data"]["clientID"].clone();
    send(
        &mut host,
        json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": client_id}}),
    )
    .await;
    assert_eq!(next(&mut guest).await["t"], "JOINED");
    (host, guest, sid)
}

/// Sends `n` MSGs at once, without waiting, while reading: what it received (payload ids in
/// order) and how many DELIVERED it got, once it has `n` of each or `STEP` passes.
async fn flood(
    ws: &mut Ws,
    sid: &str,
    tag: &str,
    n: usize,
    pause_every: usize,
) -> (Vec<String>, usize) {
    let (mut sink, mut stream) = futures_util::StreamExt::split(ws);
    let sending = async {
        for i in 0..n {
            let frame = format!(
                r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"00","msgID":"{tag}{i}"}}}}"#
            );
            sink.send(Message::text(frame)).await.unwrap();
        }
    };
    let receiving = async {
        let (mut got, mut delivered) = (Vec::new(), 0);
        while got.len() < n || delivered < n {
            let message = stream.next().await.expect("connection closed").unwrap();
            let Message::Text(text) = message else {
                continue;
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            match frame["t"].as_str().unwrap() {
                "MSG" => {
                    got.push(frame["data"]["msgID"].as_str().unwrap().to_string());
                    // A slow reader, now and then.
                    if pause_every > 0 && got.len() % pause_every == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                "DELIVERED" => delivered += 1,
                "PING" | "PEER_ONLINE" => {}
                other => panic!("unexpected {other}: {frame}"),
            }
        }
        (got, delivered)
    };
    let ((), result) = tokio::time::timeout(STEP, async { tokio::join!(sending, receiving) })
        .await
        .expect("the flood did not finish in time");
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_across_nodes_is_slowed_not_dropped() {
    // Small queues, two members on two nodes sending as fast as they can to a reader that
    // dawdles: as on one relay, senders are slowed down; nobody is dropped, nothing is lost.
    let nodes = Nodes::start(
        2,
        RedisServer::start(),
        &[
            "--outbound-queue-frames",
            "32",
            "--outbound-queue-bytes",
            "131072",
        ],
    );
    let (mut host, mut guest, sid) = paired_sockets(nodes.addr(0), nodes.addr(1)).await;
    let n = 3000;
    let (host_side, guest_side) = tokio::join!(
        flood(&mut host, &sid, "h", n, 0),
        flood(&mut guest, &sid, "g", n, 100)
    );
    let expect = |tag: &str| (0..n).map(|i| format!("{tag}{i}")).collect::<Vec<_>>();
    assert_eq!(
        guest_side.0,
        expect("h"),
        "the guest got every host message, in order"
    );
    assert_eq!(
        host_side.0,
        expect("g"),
        "the host got every guest message, in order"
    );
    assert_eq!(
        (host_side.1, guest_side.1),
        (n, n),
        "every MSG was DELIVERED"
    );
}

#[test]
fn redis_away_longer_than_a_heartbeat() {
    // Redis is gone for 7 s, longer than a node's heartbeat lasts: nodes stop acting for
    // their sessions (others could count them dead), then start afresh when it is back;
    // clients re-attach, and every line arrives once, in order.
    let mut nodes = Nodes::start(2, RedisServer::start_persistent(), &[]);
    let to_alice = Balancer::start(&[nodes.addr(0)]);
    let to_bob = Balancer::start(&[nodes.addr(1)]);
    converse(to_alice.url(), to_bob.url(), 20, |i| {
        if i == 10 {
            nodes.redis.kill();
        }
        if i == 11 {
            // Line 10 was sent with Redis gone; it stays gone 7 s in all.
            std::thread::sleep(Duration::from_millis(6980));
            nodes.redis.restart();
        }
    });
    for node in &nodes.relays {
        node.expect_log("starting afresh");
    }
}

/// A `DATA` frame (protocol.md 2.2): 0x01, the sid's 16 bytes, the body.
fn data_frame(sid: &str, body: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x01];
    frame.extend(hex::decode(sid).unwrap());
    frame.extend_from_slice(body);
    frame
}

/// The next text or binary message that is not a `PING`.
async fn next_message(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("no message in time")
            .expect("connection closed")
            .unwrap();
        match &message {
            Message::Text(text) if text.as_str() == r#"{"t":"PING"}"# => {}
            Message::Text(_) | Message::Binary(_) => return message,
            _ => {}
        }
    }
}

/// The next binary message, skipping `PING`s; any other text frame is a failure.
async fn next_binary(ws: &mut Ws) -> Vec<u8> {
    loop {
        let message = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("no message in time")
            .expect("connection closed")
            .unwrap();
        match message {
            Message::Binary(bytes) => return bytes.to_vec(),
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(frame["t"], "PING", "expected a DATA frame: {frame}");
            }
            _ => {}
        }
    }
}

/// Sends `frames` DATA frames of `size` bytes while `to` reads them: all arrive, in order.
async fn data_flood(from: &mut Ws, to: &mut Ws, sid: &str, frames: usize, size: usize) {
    let body = |i: usize| -> Vec<u8> {
        let mut body = vec![(i % 251) as u8; size];
        body[..8].copy_from_slice(&(i as u64).to_be_bytes());
        data_frame(sid, &body)
    };
    let sending = async {
        for i in 0..frames {
            from.send(Message::binary(body(i))).await.unwrap();
        }
    };
    let receiving = async {
        for i in 0..frames {
            let got = next_binary(to).await;
            assert!(got == body(i), "DATA frame {i} differs or is out of order");
        }
    };
    tokio::time::timeout(STEP, async { tokio::join!(sending, receiving) })
        .await
        .expect("the DATA frames did not all arrive in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_frames_cross_nodes_live_and_are_never_kept() {
    // DATA takes the path a MSG takes between nodes (gate, home, gate), byte for byte and
    // in order with MSGs, within the flow control; it is never kept for an absent member.
    let nodes = Nodes::start(3, RedisServer::start(), &[]);
    let mut host = connect(nodes.addr(0)).await;
    send(&mut host, json!({"t": "CREATE_SESSION"})).await;
    let created = next(&mut host).await;
    let sid = created["sid"].as_str().unwrap().to_string();
    let host_token = created["data"]["resumeToken"].clone();
    send(&mut host, json!({"t": "INVITE_CREATE", "sid": sid})).await;
    let code = next(&mut host).await["data"]["code"].clone();
    let mut guest = connect(nodes.addr(1)).await;
    send(&mut guest, json!({"t": "JOIN", "data": {"code": code}})).await;
    let request = next(&mut host).await;
    assert_eq!(next(&mut guest).await["t"], "JOINED");
    send(
        &mut host,
        json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": request["data"]["clientID"]}}),
    )
    .await;
    let joined = next(&mut guest).await;
    let guest_token = joined["data"]["resumeToken"].clone();

    // Home (node 0) to gate (node 1) and back, among MSGs, a full-size chunk included.
    let big = data_frame(&sid, &[0xa5; 61_500]);
    let small = data_frame(&sid, b"\x00|\xff");
    for turn in ["h", "g"] {
        let (from, to) = if turn == "h" {
            (&mut host, &mut guest)
        } else {
            (&mut guest, &mut host)
        };
        let msg =
            format!(r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"00","msgID":"{turn}"}}}}"#);
        from.send(Message::binary(big.clone())).await.unwrap();
        from.send(Message::text(msg.clone())).await.unwrap();
        from.send(Message::binary(small.clone())).await.unwrap();
        assert!(next_binary(to).await == big, "the chunk, first");
        assert_eq!(next_message(to).await, Message::text(msg), "then the MSG");
        assert!(next_binary(to).await == small, "then the small one");
        assert_eq!(
            next(from).await["t"],
            "DELIVERED",
            "and nothing else for the sender"
        );
    }

    // The host moves to node 2: now both members are away from the session's home.
    drop(host);
    assert_eq!(next(&mut guest).await["t"], "PEER_OFFLINE");
    let mut host = connect(nodes.addr(2)).await;
    send(
        &mut host,
        json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": host_token}}),
    )
    .await;
    assert_eq!(next(&mut host).await["t"], "PEER_ONLINE");
    assert_eq!(next(&mut guest).await["t"], "PEER_ONLINE");
    // A stream of chunks, far more than the nodes' windows hold, both ways.
    data_flood(&mut host, &mut guest, &sid, 150, 61_500).await;
    data_flood(&mut guest, &mut host, &sid, 150, 61_500).await;

    // A stranger at a node the session does not live on is refused.
    let mut stranger = connect(nodes.addr(1)).await;
    stranger
        .send(Message::binary(data_frame(&sid, b"x")))
        .await
        .unwrap();
    let refused = next(&mut stranger).await;
    assert_eq!(refused["data"]["code"], "not_member", "{refused}");

    // The guest goes: DATA for it is dropped, a MSG is kept (in Redis too, alone).
    drop(guest);
    assert_eq!(next(&mut host).await["t"], "PEER_OFFLINE");
    host.send(Message::binary(data_frame(&sid, b"lost")))
        .await
        .unwrap();
    let kept = format!(r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"00","msgID":"kept"}}}}"#);
    host.send(Message::text(kept.clone())).await.unwrap();
    assert_eq!(next(&mut host).await["t"], "DELIVERED");
    let held = nodes
        .redis
        .cli(&["LRANGE", &format!("parley:mbox:{sid}:guest"), "0", "-1"]);
    assert_eq!(held.lines().count(), 1, "{held}");
    assert!(held.contains("kept"), "{held}");
    let mut guest = connect(nodes.addr(0)).await;
    send(
        &mut guest,
        json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": guest_token}}),
    )
    .await;
    assert_eq!(next(&mut guest).await["t"], "PEER_ONLINE");
    // The kept MSG, and nothing binary before it.
    assert_eq!(next_message(&mut guest).await, Message::text(kept));
    assert_eq!(next(&mut host).await["t"], "PEER_ONLINE");
    host.send(Message::binary(small.clone())).await.unwrap();
    assert!(next_binary(&mut guest).await == small, "live again");
}
