//! Nothing lost at the relay: mailboxes for offline members (ordered, bounded, aged) and
//! RESTORE of sessions a restarted relay forgot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::TestRelay;
use parley_relay::{MailboxLimits, RelayConfig};
use serde_json::json;

fn msg(sid: &str, id: u64) -> String {
    format!(r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"ab{id:04}","msgID":{id}}}}}"#)
}

#[tokio::test]
async fn messages_for_an_offline_member_wait_and_arrive_in_order() {
    let relay = TestRelay::start().await;
    let pair = relay.pair().await;
    let (sid, token) = (pair.sid.clone(), pair.guest_token.clone());
    let mut host = pair.host;
    drop(pair.guest);
    host.expect("PEER_OFFLINE").await;
    for id in 1..=5 {
        host.send_text(&msg(&sid, id)).await;
        assert_eq!(host.expect("DELIVERED").await["data"]["msgID"], id);
    }
    // MSG_READ (the client's end-to-end acknowledgements) waits too.
    let read = format!(r#"{{"t":"MSG_READ","sid":"{sid}","data":{{"ack":"x"}}}}"#);
    host.send_text(&read).await;
    host.expect_nothing_pending().await;
    assert!(relay.handle.stats().mailbox_bytes > 0);

    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": token}}))
        .await;
    guest.expect("PEER_ONLINE").await;
    for id in 1..=5 {
        assert_eq!(guest.recv_text().await, msg(&sid, id));
    }
    assert_eq!(guest.recv_text().await, read);
    assert_eq!(relay.handle.stats().mailbox_bytes, 0);
    host.expect("PEER_ONLINE").await;
    host.assert_delivers(&mut guest, &sid, "live").await;
}

#[tokio::test]
async fn a_full_mailbox_refuses_with_the_message_id_and_recovers() {
    let config = RelayConfig {
        mailbox: MailboxLimits {
            max_frames: 3,
            ..RelayConfig::default().mailbox
        },
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let pair = relay.pair().await;
    let (sid, token) = (pair.sid.clone(), pair.guest_token.clone());
    let mut host = pair.host;
    drop(pair.guest);
    host.expect("PEER_OFFLINE").await;
    for id in 1..=3 {
        host.send_text(&msg(&sid, id)).await;
        host.expect("DELIVERED").await;
    }
    host.send_text(&msg(&sid, 4)).await;
    let full = host.expect_error("mailbox_full").await;
    assert_eq!(
        full["data"]["msgID"], 4,
        "the sender learns which message was not kept"
    );

    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": token}}))
        .await;
    guest.expect("PEER_ONLINE").await;
    for id in 1..=3 {
        assert_eq!(guest.recv_text().await, msg(&sid, id));
    }
    host.expect("PEER_ONLINE").await;
    // The sender sends the refused one again now that the peer is back.
    host.send_text(&msg(&sid, 4)).await;
    assert_eq!(guest.recv_text().await, msg(&sid, 4));
    host.expect("DELIVERED").await;
}

#[tokio::test]
async fn mailboxed_frames_age_out() {
    let config = RelayConfig {
        mailbox: MailboxLimits {
            max_age: Duration::from_millis(100),
            ..RelayConfig::default().mailbox
        },
        sweep_interval: Duration::from_millis(20),
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let pair = relay.pair().await;
    let (sid, token) = (pair.sid.clone(), pair.guest_token.clone());
    let mut host = pair.host;
    drop(pair.guest);
    host.expect("PEER_OFFLINE").await;
    host.send_text(&msg(&sid, 1)).await;
    host.expect("DELIVERED").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.handle.stats().mailbox_bytes, 0);
    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": token}}))
        .await;
    guest.expect("PEER_ONLINE").await;
    guest.expect_nothing_pending().await;
}

#[tokio::test]
async fn a_restarted_relay_takes_the_session_back_from_its_members() {
    let config = RelayConfig::default();
    let old = TestRelay::with_config(config.clone()).await;
    let pair = old.pair().await;
    let (sid, host_token, guest_token) = (
        pair.sid.clone(),
        pair.host_token.clone(),
        pair.guest_token.clone(),
    );
    drop(pair);
    old.shutdown().await;

    // The relay comes back with its secret but no sessions: the host's token re-creates it.
    let relay = TestRelay::with_config(config).await;
    assert_eq!(relay.handle.stats().sessions, 0);
    let mut host = relay.client().await;
    host.send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": host_token}}))
        .await;
    host.expect("PEER_OFFLINE").await;
    // Messages for the guest wait for it, as in any session.
    host.send_text(&msg(&sid, 7)).await;
    host.expect("DELIVERED").await;

    // Nobody else gets the guest's seat, nor the host's.
    let mut intruder = relay.client().await;
    let bogus = "11".repeat(32);
    intruder
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": bogus}}))
        .await;
    intruder.expect_error("token_invalid").await;
    intruder
        .send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "guest", "resumeToken": host_token}}))
        .await;
    intruder.expect_error("restore_refused").await;

    // The guest's own token (RESTORE, as older clients send it, works like REATTACH).
    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "guest", "resumeToken": guest_token, "proof": "ignored"}}))
        .await;
    guest.expect("PEER_ONLINE").await;
    assert_eq!(guest.recv_text().await, msg(&sid, 7));
    host.expect("PEER_ONLINE").await;
    host.assert_delivers(&mut guest, &sid, "restored").await;
    guest
        .assert_delivers(&mut host, &sid, "restored-back")
        .await;
}

#[tokio::test]
async fn a_relay_that_lost_its_secret_says_so() {
    let old = TestRelay::start().await;
    let pair = old.pair().await;
    let (sid, host_token) = (pair.sid.clone(), pair.host_token.clone());
    drop(pair);
    old.shutdown().await;

    let relay = TestRelay::start().await;
    let mut host = relay.client().await;
    host.send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": host_token}}))
        .await;
    host.expect_error("session_unknown").await;
    host.send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "host", "resumeToken": host_token, "proof": "p"}}))
        .await;
    host.expect_error("restore_refused").await;
    assert_eq!(relay.handle.stats().sessions, 0);
}

#[tokio::test]
async fn restore_of_a_known_session_needs_the_seat_token_and_checks_its_fields() {
    let relay = TestRelay::start().await;
    let pair = relay.pair().await;
    let sid = pair.sid.clone();
    let mut other = relay.client().await;
    other
        .send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "guest", "resumeToken": "22".repeat(32), "proof": "p"}}))
        .await;
    other.expect_error("restore_refused").await;
    for (data, code) in [
        (
            json!({"resumeToken": "22".repeat(32), "proof": "p"}),
            "missing_field",
        ),
        (
            json!({"role": "admin", "resumeToken": "22".repeat(32), "proof": "p"}),
            "invalid_field",
        ),
        (
            json!({"role": "host", "resumeToken": "short", "proof": "p"}),
            "invalid_field",
        ),
        (
            json!({"role": "host", "resumeToken": "22".repeat(32), "proof": "p".repeat(200)}),
            "invalid_field",
        ),
    ] {
        other
            .send(json!({"t": "RESTORE", "sid": sid, "data": data}))
            .await;
        other.expect_error(code).await;
    }
    // With the right token it is a REATTACH: the old connection is told it was replaced.
    let mut guest2 = relay.client().await;
    guest2
        .send(json!({"t": "RESTORE", "sid": sid, "data": {"role": "guest", "resumeToken": pair.guest_token, "proof": "p"}}))
        .await;
    guest2.expect("PEER_ONLINE").await;
}
