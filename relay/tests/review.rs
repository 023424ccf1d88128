//! Regression tests for the defects an outside review of the relay found (issue 11). Each one
//! failed on the relay as it was before.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::{STEP, TestRelay};
use parley_relay::{Relay, RelayConfig};
use serde_json::json;

fn msg(sid: &str, id: u64) -> String {
    format!(r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"00","msgID":{id}}}}}"#)
}

/// A relay "restarted": a new one with the same configuration (and so the same secret),
/// which has never heard of any session.
async fn restarted(old: TestRelay, config: &RelayConfig) -> TestRelay {
    old.shutdown().await;
    TestRelay::with_config(config.clone()).await
}

/// A host and a guest paired, both gone, and the relay restarted: the new relay, the sid and
/// the host's and guest's tokens.
async fn paired_then_restarted(config: &RelayConfig) -> (TestRelay, String, String, String) {
    let old = TestRelay::with_config(config.clone()).await;
    let pair = old.pair().await;
    let (sid, host_token, guest_token) = (
        pair.sid.clone(),
        pair.host_token.clone(),
        pair.guest_token.clone(),
    );
    drop(pair);
    (restarted(old, config).await, sid, host_token, guest_token)
}

// Defect 1: a RESTORE the relay refuses must not leave a session behind.
#[tokio::test]
async fn refused_restores_leave_no_session_behind() {
    let relay = TestRelay::with_config(RelayConfig {
        max_sessions: 6,
        max_sessions_per_connection: 2,
        ..RelayConfig::default()
    })
    .await;
    let mut greedy = relay.client().await;
    greedy.create_session().await;
    greedy.create_session().await;
    for i in 0..8u8 {
        let sid = format!("{:032x}", u128::from(i) + 1000);
        greedy
            .send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "host", "resumeToken": "ab".repeat(32), "proof": "p"}}))
            .await;
        let refused = greedy.expect("ERROR").await;
        assert_ne!(refused["data"]["code"], "relay_full");
    }
    assert_eq!(relay.handle.stats().sessions, 2);
    drop(greedy);
    let mut fresh = relay.client().await;
    fresh.create_session().await;
}

// Defect 2: a refused RESTORE writes nothing, so it cannot lock a seat's owner out.
#[tokio::test]
async fn a_refused_restore_does_not_lock_the_seat_owner_out() {
    let (relay, sid, host_token, guest_token) =
        paired_then_restarted(&RelayConfig::default()).await;
    let proof = "c0ffee".repeat(10);

    let mut host = relay.client().await;
    host.send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "host", "resumeToken": host_token, "proof": proof}}))
        .await;
    host.expect("PEER_OFFLINE").await;
    // The host's connection asks for the guest's seat with its own token: refused...
    host.send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "guest", "resumeToken": host_token, "proof": proof}}))
        .await;
    host.expect("ERROR").await;
    // ...and the real guest still gets its seat.
    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "guest", "resumeToken": guest_token, "proof": proof}}))
        .await;
    guest.expect("PEER_ONLINE").await;
    host.expect("PEER_ONLINE").await;
    host.assert_delivers(&mut guest, &sid, "after").await;
}

// Defect 3: handing several full mailboxes to one connection at once loses nothing and does
// not get that connection dropped as a slow consumer. The mailboxes are full by bytes: two of
// them together are more than a connection's queue holds.
#[tokio::test]
async fn several_full_mailboxes_handed_over_in_one_read_lose_nothing() {
    const SESSIONS: usize = 3;
    let relay = TestRelay::start().await;
    let pad = "ab".repeat(30_000);
    let big = |sid: &str, id: usize| {
        format!(r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"{pad}","msgID":{id}}}}}"#)
    };
    let mut hosts = Vec::new();
    let mut seats = Vec::new();
    let mut kept = Vec::new();
    for _ in 0..SESSIONS {
        let pair = relay.pair().await;
        let mut host = pair.host;
        drop(pair.guest);
        host.expect("PEER_OFFLINE").await;
        // Fill the guest's mailbox until the relay refuses.
        let mut n = 0;
        loop {
            host.send_text(&big(&pair.sid, n)).await;
            let answer = host.recv().await;
            if answer["t"] == "ERROR" {
                assert_eq!(answer["data"]["code"], "mailbox_full", "{answer}");
                break;
            }
            assert_eq!(answer["t"], "DELIVERED");
            n += 1;
            assert!(n < 1000);
        }
        kept.push(n);
        seats.push((pair.sid, pair.guest_token));
        hosts.push(host);
    }
    // One connection takes back every guest seat, in one write.
    let mut guest = relay.client().await;
    let reattaches: Vec<String> = seats
        .iter()
        .map(|(sid, token)| {
            json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": token}}).to_string()
        })
        .collect();
    guest.send_batch(&reattaches).await;
    let mut next = vec![0usize; SESSIONS];
    let mut answered = [false; SESSIONS];
    while next != kept || answered.iter().any(|a| !a) {
        let frame = guest.recv().await;
        let sid = frame["sid"].as_str().unwrap();
        let s = seats.iter().position(|(x, _)| x == sid).unwrap();
        match frame["t"].as_str().unwrap() {
            "PEER_ONLINE" => {
                assert_eq!(next[s], 0, "the answer comes before what waited");
                answered[s] = true;
            }
            "MSG" => {
                assert!(answered[s]);
                assert_eq!(frame["data"]["msgID"], next[s], "in order, none lost");
                next[s] += 1;
            }
            other => panic!("unexpected {other}: {frame}"),
        }
    }
    // Still connected and in every session.
    for (s, host) in hosts.iter_mut().enumerate() {
        let sid = seats[s].0.clone();
        host.expect("PEER_ONLINE").await;
        host.assert_delivers(&mut guest, &sid, "after").await;
    }
}

// Defect 4: a JOIN's data is capped like invite parameters and counted in the relay's budget.
#[tokio::test]
async fn a_join_request_is_capped_and_counted() {
    let relay = TestRelay::start().await;
    let mut host = relay.client().await;
    let (sid, _) = host.create_session().await;
    let code = host.invite(&sid).await;
    let mut guest = relay.client().await;
    let huge = "a".repeat(parley_protocol::limits::MAX_INVITE_PARAMS_BYTES + 1);
    guest
        .send(json!({"t": "JOIN", "data": {"code": code, "publicKey": huge}}))
        .await;
    guest.expect_error("invalid_field").await;
    // The code was not spent by the refused JOIN.
    assert_eq!(relay.handle.stats().mailbox_bytes, 0);
    guest
        .send(json!({"t": "JOIN", "data": {"code": code, "publicKey": "bb"}}))
        .await;
    guest.expect("JOINED").await;
    host.expect("JOIN_REQUEST").await;
    assert!(
        relay.handle.stats().mailbox_bytes > 0,
        "the pending JOIN_REQUEST is counted"
    );
}

// Defect 4: a restored session nobody comes back to lives as long as an unpaired one.
#[tokio::test]
async fn a_restored_session_nobody_rejoins_is_forgotten_like_an_unpaired_one() {
    let config = RelayConfig {
        unpaired_session_ttl: Duration::from_millis(300),
        sweep_interval: Duration::from_millis(100),
        ..RelayConfig::default()
    };
    let (relay, sid, host_token, _) = paired_then_restarted(&config).await;
    let mut host = relay.client().await;
    host.send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": host_token}}))
        .await;
    host.expect("PEER_OFFLINE").await;
    assert_eq!(relay.handle.stats().sessions, 1);
    drop(host);
    let deadline = tokio::time::Instant::now() + STEP;
    while relay.handle.stats().sessions != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restored session was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Defect 5: after a restart, a party that knows only the sid can neither take nor block a seat,
// and one member's RESTORE does not give away the other's seat.
#[tokio::test]
async fn after_a_restart_only_members_get_their_seats() {
    let (relay, sid, host_token, guest_token) =
        paired_then_restarted(&RelayConfig::default()).await;
    let proof = "c0ffee".repeat(10);

    // The squatter knows the sid (it travels in every frame) and nothing else.
    let mut squatter = relay.client().await;
    for role in ["host", "guest"] {
        squatter
            .send(json!({"t": "RESTORE", "sid": sid, "data": {"role": role, "resumeToken": "11".repeat(32), "proof": proof}}))
            .await;
        squatter.expect_error("restore_refused").await;
    }
    assert_eq!(relay.handle.stats().sessions, 0);

    // The host comes back; someone who saw its RESTORE frame replays it for the guest's seat.
    let mut host = relay.client().await;
    host.send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "host", "resumeToken": host_token, "proof": proof}}))
        .await;
    host.expect("PEER_OFFLINE").await;
    squatter
        .send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "guest", "resumeToken": "11".repeat(32), "proof": proof}}))
        .await;
    squatter.expect_error("restore_refused").await;

    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": guest_token}}))
        .await;
    guest.expect("PEER_ONLINE").await;
    host.expect("PEER_ONLINE").await;
    guest.assert_delivers(&mut host, &sid, "back").await;
}

// Defect 6: one address cannot take every connection slot.
#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let relay = TestRelay::with_config(RelayConfig {
        max_connections: 50,
        max_connections_per_address: 3,
        ..RelayConfig::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = relay.client_from([127, 0, 0, 7]).await;
        c.expect_nothing_pending().await;
        held.push(c);
    }
    assert!(
        relay.try_client_from([127, 0, 0, 7]).await.is_err(),
        "a fourth connection from one address is refused"
    );
    let mut other = relay.client_from([127, 0, 0, 8]).await;
    other.expect_nothing_pending().await;
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + STEP;
    while relay.handle.stats().connections > 3 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut again = relay.client_from([127, 0, 0, 7]).await;
    again.expect_nothing_pending().await;
}

// Defect 6: one address cannot fill everyone's mailboxes.
#[tokio::test]
async fn one_address_cannot_fill_every_mailbox() {
    let mut config = RelayConfig {
        mailbox_bytes_per_address: 2_000,
        ..RelayConfig::default()
    };
    config.mailbox.total_bytes = 1 << 20;
    let relay = TestRelay::with_config(config).await;
    let pair_from = |ip: [u8; 4]| {
        let relay = &relay;
        async move {
            let mut host = relay.client_from(ip).await;
            let guest = relay.client().await;
            let (sid, token) = host.create_session().await;
            let code = host.invite(&sid).await;
            common::Pair::complete(host, guest, sid, token, &code).await
        }
    };
    let mut flooder = pair_from([127, 0, 0, 9]).await;
    drop(flooder.guest);
    flooder.host.expect("PEER_OFFLINE").await;
    let mut refused = false;
    for i in 0..100 {
        flooder.host.send_text(&msg(&flooder.sid, i)).await;
        let answer = flooder.host.recv().await;
        if answer["t"] == "ERROR" {
            assert_eq!(answer["data"]["code"], "mailbox_full");
            refused = true;
            break;
        }
    }
    assert!(refused, "the address's mailbox budget held");
    // Someone else's offline peer still gets its messages kept.
    let mut other = pair_from([127, 0, 0, 10]).await;
    drop(other.guest);
    other.host.expect("PEER_OFFLINE").await;
    for i in 0..20 {
        other.host.send_text(&msg(&other.sid, i)).await;
        other.host.expect("DELIVERED").await;
    }
}

// Defect 7: an oversize frame's ERROR and close 1009 reach the client, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_is_always_answered() {
    let relay = TestRelay::start().await;
    let url = relay.url();
    let mut tasks = Vec::new();
    for attempt in 0..40 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let oversize = format!(
                r#"{{"t":"PING","pad":"{}"}}"#,
                "x".repeat(100_000 + attempt * 10_000)
            );
            let mut c = common::TestClient::connect(&url).await;
            let _ = c.try_send_text(&oversize).await;
            let frame = c
                .try_recv()
                .await
                .map_err(|e| format!("attempt {attempt}: {e}"))?;
            let v: serde_json::Value = serde_json::from_str(&frame).map_err(|e| e.to_string())?;
            if v["data"]["code"] != "frame_too_large" {
                return Err(format!("attempt {attempt}: {frame}"));
            }
            match c.expect_closed().await {
                Some(f) if u16::from(f.code) == 1009 => Ok(()),
                other => Err(format!("attempt {attempt}: closed with {other:?}")),
            }
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 40 lost: {failures:?}",
        failures.len()
    );
    let mut c = relay.client().await;
    c.expect_nothing_pending().await;
}

// Defect 8: a configuration that would panic later is refused when the relay is bound.
#[tokio::test]
async fn a_config_that_cannot_work_is_refused_at_bind() {
    for config in [
        RelayConfig {
            ping_interval: Duration::ZERO,
            ..RelayConfig::default()
        },
        RelayConfig {
            sweep_interval: Duration::ZERO,
            ..RelayConfig::default()
        },
    ] {
        let err = Relay::bind("127.0.0.1:0", config)
            .await
            .err()
            .expect("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("interval"), "{err}");
    }
    // "Huge" means never: a grace period too large to add to the clock still shuts down.
    let relay = TestRelay::with_config(RelayConfig {
        shutdown_grace: Duration::MAX,
        ..RelayConfig::default()
    })
    .await;
    let mut c = relay.client().await;
    c.expect_nothing_pending().await;
    drop(c);
    relay.shutdown().await;
}

// Found in review of the reshape: a token-less REATTACH (compatibility option) from a
// connection that holds one seat must not take the other one too.
#[tokio::test]
async fn a_tokenless_reattach_cannot_take_a_second_seat() {
    let relay = TestRelay::with_config(RelayConfig {
        allow_tokenless_reattach: true,
        ..RelayConfig::default()
    })
    .await;
    let mut pair = relay.pair().await;
    drop(pair.guest);
    pair.host.expect("PEER_OFFLINE").await;
    let sid = pair.sid.clone();
    pair.host
        .send(json!({"t": "REATTACH", "sid": sid, "data": {}}))
        .await;
    pair.host.expect_error("already_member").await;
    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": pair.guest_token}}))
        .await;
    guest.expect("PEER_ONLINE").await;
}

// Found in review: the token a joiner gets at JOIN, before the host answers, neither
// re-creates a forgotten session nor takes a seat awaiting its owner; the member's token
// from the second JOINED does.
#[tokio::test]
async fn a_joiners_token_is_not_a_members() {
    let config = RelayConfig::default();
    let old = TestRelay::with_config(config.clone()).await;
    let mut host = old.client().await;
    let (sid, host_token) = host.create_session().await;
    let code = host.invite(&sid).await;
    let mut joiner = old.client().await;
    joiner
        .send(json!({"t": "JOIN", "data": {"code": code}}))
        .await;
    let joiner_token = joiner.expect("JOINED").await["data"]["resumeToken"]
        .as_str()
        .unwrap()
        .to_string();
    // While the relay holds the session, the joiner's token takes its own seat back.
    drop(joiner);
    let mut joiner = old.client().await;
    joiner
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": joiner_token}}))
        .await;
    joiner.expect("PEER_ONLINE").await;
    drop((host, joiner));
    let relay = restarted(old, &config).await;

    // After a restart it re-creates nothing...
    let mut joiner = relay.client().await;
    joiner
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": joiner_token}}))
        .await;
    joiner.expect_error("session_unknown").await;
    // ...and does not take the guest seat the host's token left awaiting its owner.
    let mut host = relay.client().await;
    host.send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": host_token}}))
        .await;
    host.expect("PEER_OFFLINE").await;
    joiner
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": joiner_token}}))
        .await;
    joiner.expect_error("token_invalid").await;
    host.expect_nothing_pending().await;
}

// (A member back online whose mailbox is still being handed over is not refused as offline:
// hub::tests::a_member_back_online_is_not_refused_as_offline_while_its_mailbox_drains, where
// the queue can be held still.)

#[tokio::test]
async fn a_queue_too_small_for_a_hand_over_is_refused_at_bind() {
    let config = RelayConfig {
        outbound_queue_frames: 1,
        ..RelayConfig::default()
    };
    let err = Relay::bind("127.0.0.1:0", config)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("2 frames"), "{err}");
}

// Found in review of the front door: connections that never finish their opening (a TLS
// handshake or an HTTP request trickled slowly) are capped per address, far below its
// connection cap, so a few addresses cannot hold every slot of the relay.
#[tokio::test]
async fn slow_openings_are_capped_per_address() {
    let relay = TestRelay::with_config(RelayConfig {
        max_pending_per_address: 2,
        ..RelayConfig::default()
    })
    .await;
    let silent = |ip: [u8; 4]| {
        let addr = relay.addr;
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(std::net::SocketAddr::new(std::net::IpAddr::from(ip), 0))
                .unwrap();
            socket.connect(addr).await.unwrap()
        }
    };
    let held = [silent([127, 0, 0, 11]).await, silent([127, 0, 0, 11]).await];
    let deadline = tokio::time::Instant::now() + STEP;
    while relay.handle.stats().connections < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        relay.try_client_from([127, 0, 0, 11]).await.is_err(),
        "a third opening from the address is refused"
    );
    let mut other = relay.client_from([127, 0, 0, 12]).await;
    other.expect_nothing_pending().await;
    drop(held);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Ok(mut c) = relay.try_client_from([127, 0, 0, 11]).await {
            c.expect_nothing_pending().await;
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never admitted again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
