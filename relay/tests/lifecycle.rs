//! Expiry of idle sessions and invites, and graceful shutdown (in-process and of the binary).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{STEP, TestClient, TestRelay};
use parley_relay::RelayConfig;
use serde_json::json;

/// Polls `check` every 20 ms for up to 5 s.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..250 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn idle_sessions_and_their_invites_expire() {
    let config = RelayConfig {
        invite_ttl: Duration::from_millis(200),
        unpaired_session_ttl: Duration::from_millis(200),
        session_idle_ttl: Duration::from_millis(300),
        sweep_interval: Duration::from_millis(50),
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;

    // A paired session stays while someone is connected...
    let pair = relay.pair().await;
    // ...while unpaired sessions whose host left go, with their invite.
    let mut lonely = relay.client().await;
    lonely.create_session().await;
    let (sid, _) = lonely.create_session().await;
    lonely.invite(&sid).await;
    drop(lonely);
    assert!(
        eventually(|| relay.handle.stats().sessions == 1).await,
        "{:?}",
        relay.handle.stats()
    );
    assert!(
        eventually(|| relay.handle.stats().invites == 0).await,
        "{:?}",
        relay.handle.stats()
    );
    assert_eq!(relay.handle.stats().connections, 2);

    // Once both members are away, the paired session goes too.
    let (sid, token) = (pair.sid.clone(), pair.host_token.clone());
    drop(pair);
    assert!(
        eventually(|| relay.handle.stats().sessions == 0).await,
        "{:?}",
        relay.handle.stats()
    );

    // A member's token still brings it back (re-created, the other seat awaiting its owner),
    // as after a relay restart; a token the relay never issued does not.
    let mut stranger = relay.client().await;
    stranger
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": "ab".repeat(32)}}))
        .await;
    stranger.expect_error("session_unknown").await;
    let mut back = relay.client().await;
    back.send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": token}}))
        .await;
    back.expect("PEER_OFFLINE").await;
    assert_eq!(relay.handle.stats().sessions, 1);
}

#[tokio::test]
async fn huge_durations_mean_never_and_do_not_panic() {
    let config = RelayConfig {
        invite_ttl: Duration::MAX,
        unpaired_session_ttl: Duration::MAX,
        session_idle_ttl: Duration::MAX,
        ping_interval: Duration::MAX,
        idle_timeout: Duration::MAX,
        sweep_interval: Duration::from_millis(10),
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut pair = relay.pair().await;
    drop(relay.pair().await);
    tokio::time::sleep(Duration::from_millis(100)).await; // several sweeps
    pair.exchange("still-here").await;
    assert_eq!(
        relay.handle.stats().sessions,
        2,
        "nothing expires when the TTL is forever"
    );
}

#[tokio::test]
async fn relay_wide_caps_refuse_politely() {
    let config = RelayConfig {
        max_sessions: 2,
        max_connections: 3,
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut a = relay.client().await;
    a.create_session().await;
    a.create_session().await;
    a.send(json!({"t": "CREATE_SESSION"})).await;
    a.expect_error("relay_full").await;
    let _b = relay.client().await;
    let _c = relay.client().await;
    assert!(eventually(|| relay.handle.stats().connections == 3).await);
    // A fourth connection is closed before the WebSocket upgrade; the others are unaffected.
    assert!(tokio_tungstenite::connect_async(relay.url()).await.is_err());
    a.expect_nothing_pending().await;
}

#[tokio::test]
async fn session_creation_is_rate_limited_per_address() {
    let config = RelayConfig {
        sessions_created_per_address: parley_relay::RateLimit {
            burst: 3,
            refill: Duration::from_secs(3600),
        },
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut a = relay.client().await;
    for _ in 0..3 {
        a.create_session().await;
    }
    let mut b = relay.client().await;
    b.send(json!({"t": "CREATE_SESSION"})).await;
    b.expect_error("rate_limited").await;
    let mut other = relay.client_from([127, 0, 0, 3]).await;
    other.create_session().await;
}

#[tokio::test]
async fn sessions_per_connection_are_capped() {
    let config = RelayConfig {
        max_sessions_per_connection: 2,
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut greedy = relay.client().await;
    greedy.create_session().await;
    greedy.create_session().await;
    greedy.send(json!({"t": "CREATE_SESSION"})).await;
    greedy.expect_error("too_many_sessions").await;
    relay.pair().await.exchange("fine").await;
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_going_away() {
    let relay = TestRelay::start().await;
    let mut pair = relay.pair().await;
    let mut idle = relay.client().await;
    relay.shutdown().await;
    for client in [&mut pair.host, &mut pair.guest, &mut idle] {
        let close = client.expect_closed().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1001);
    }
}

#[tokio::test]
async fn a_client_close_is_answered_after_its_last_frames_are_relayed() {
    let relay = TestRelay::start().await;
    let mut pair = relay.pair().await;
    let last = format!(
        r#"{{"t":"MSG","sid":"{}","data":{{"payload":"ab","msgID":7}}}}"#,
        pair.sid
    );
    pair.guest.send_text(&last).await;
    // The frame sent just before the Close is relayed, and the Close is answered with one, so
    // a client that waits for the answer (as the parley client does) leaves cleanly.
    let reply = pair.guest.close_and_read_reply().await;
    assert!(reply.is_ok(), "relay did not answer the close: {reply:?}");
    assert_eq!(pair.host.recv_text().await, last);
    pair.host.expect("PEER_OFFLINE").await;
}

#[tokio::test]
async fn binary_serves_then_exits_cleanly_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_parley-relay"))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();

    let mut host = TestClient::connect(&url).await;
    let guest = TestClient::connect(&url).await;
    let (sid, token) = host.create_session().await;
    let code = host.invite(&sid).await;
    let mut pair = common::Pair::complete(host, guest, sid, token.clone(), &code).await;
    pair.exchange("via-binary").await;

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        u16::from(pair.host.expect_closed().await.expect("close frame").code),
        1001
    );
    let exit = tokio::task::spawn_blocking(move || {
        let output = child.wait_with_output().unwrap();
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    });
    let (status, logs) = tokio::time::timeout(STEP, exit).await.unwrap().unwrap();
    assert!(status.success(), "exit status {status}");
    // Debug logs name sessions by a short tag only: no code, token or payload ever appears.
    assert!(logs.contains("session created"), "{logs}");
    assert!(!logs.contains(&code), "invite code leaked into logs");
    assert!(!logs.contains(&token), "resume token leaked into logs");
    assert!(
        !logs.contains(&pair.sid),
        "full session id leaked into logs"
    );
    assert!(!logs.contains("00aavia-binary"), "payload leaked into logs");
}

#[tokio::test]
async fn binary_help_explains_every_option() {
    let output = Command::new(env!("CARGO_BIN_EXE_parley-relay"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for option in [
        "--listen",
        "PARLEY_LISTEN",
        "--max-frame-bytes",
        "--invite-ttl-secs",
        "--session-idle-ttl-secs",
        "--allow-tokenless-reattach",
        "--join-failures-per-address",
        "RUST_LOG",
    ] {
        assert!(help.contains(option), "--help does not mention {option}");
    }
}
