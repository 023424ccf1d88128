//! The original system's client flow (seed 003), frame by frame: a client written for the Go
//! relay must work against parley-relay unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::{Pair, TestRelay};
use parley_relay::RelayConfig;
use serde_json::json;

fn compat() -> RelayConfig {
    RelayConfig {
        allow_tokenless_reattach: true,
        ..RelayConfig::default()
    }
}

#[tokio::test]
async fn original_client_flow_works_unchanged() {
    let relay = TestRelay::with_config(compat()).await;
    let mut alice = relay.client().await;
    let mut bob = relay.client().await;

    // Phase A: session and invite. The original client ignores the extra data fields.
    let (sid, _token) = alice.create_session().await;
    let code = alice.invite(&sid).await;
    // Its second INVITE_CREATE carries the DH parameters: stored, and answered with nothing.
    let params =
        json!({"prime": "ff".repeat(256), "generator": "02", "publicKey": "a1".repeat(256)});
    alice
        .send(json!({"t": "INVITE_CREATE", "sid": sid, "data": params}))
        .await;
    alice.expect_nothing_pending().await;

    // Phase B: the handshake.
    bob.send(json!({"t": "JOIN", "data": {"code": code, "publicKey": "b2b2"}}))
        .await;
    let request = alice.expect("JOIN_REQUEST").await;
    assert_eq!(request["sid"], sid.as_str());
    assert_eq!(request["data"]["publicKey"], "b2b2");
    assert!(request["data"].get("code").is_none());
    let client_id = request["data"]["clientID"].as_str().unwrap().to_string();
    assert_eq!(client_id.len(), 16);

    let joined = bob.expect("JOINED").await;
    assert_eq!(joined["sid"], sid.as_str());
    for field in ["prime", "generator", "publicKey"] {
        assert_eq!(
            joined["data"][field], params[field],
            "{field} from INVITE_CREATE reaches the joiner"
        );
    }

    alice.send(json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": client_id, "publicKey": "a1a1"}})).await;
    let mut accepted = bob.expect("JOINED").await;
    // The original client reads `publicKey`; the member's token beside it is Parley's.
    let token = accepted["data"]
        .as_object_mut()
        .unwrap()
        .remove("resumeToken");
    assert!(token.is_some_and(|t| t.as_str().is_some_and(|t| t.len() == 64)));
    assert_eq!(
        accepted,
        json!({"t": "JOINED", "sid": sid, "data": {"publicKey": "a1a1"}})
    );

    // Phase C: messages both ways, byte for byte, with DELIVERED; MSG_READ is forwarded.
    alice.assert_delivers(&mut bob, &sid, "m1").await;
    bob.assert_delivers(&mut alice, &sid, "m2").await;
    let read = format!(r#"{{"t":"MSG_READ","sid":"{sid}","data":{{"msgID":"m1"}}}}"#);
    bob.send_text(&read).await;
    assert_eq!(alice.recv_text().await, read);
    bob.expect_nothing_pending().await;

    // Bob restarts: Alice sees him go and come back; REATTACH needs no token in compat mode.
    drop(bob);
    alice.expect("PEER_OFFLINE").await;
    let mut bob = relay.client().await;
    bob.send(json!({"t": "REATTACH", "sid": sid})).await;
    assert_eq!(alice.expect("PEER_ONLINE").await["sid"], sid.as_str());
    bob.expect("PEER_ONLINE").await;
    alice.assert_delivers(&mut bob, &sid, "m3").await;
    bob.assert_delivers(&mut alice, &sid, "m4").await;
    relay.shutdown().await;
}

#[tokio::test]
async fn join_deny_reaches_the_joiner_as_join_denied() {
    let relay = TestRelay::start().await;
    let mut host = relay.client().await;
    let mut guest = relay.client().await;
    let (sid, _) = host.create_session().await;
    let code = host.invite(&sid).await;
    guest
        .send(json!({"t": "JOIN", "data": {"code": code, "publicKey": "bb"}}))
        .await;
    let client_id = host.expect("JOIN_REQUEST").await["data"]["clientID"].clone();
    guest.expect("JOINED").await;
    host.send(
        json!({"t": "JOIN_DENY", "sid": sid, "data": {"clientID": client_id, "reason": "not you"}}),
    )
    .await;
    assert_eq!(
        guest.expect("JOIN_DENIED").await["data"],
        json!({"reason": "not you"})
    );
    // The denied joiner lost its seat; the host may invite someone else.
    guest
        .send(json!({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": "x"}}))
        .await;
    guest.expect_error("not_member").await;
    let again = host.invite(&sid).await;
    let next = relay.client().await;
    let mut pair = Pair::complete(host, next, sid, String::new(), &again).await;
    pair.exchange("after-deny").await;
}

#[tokio::test]
async fn relay_pings_and_drops_silent_connections() {
    let config = RelayConfig {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(400),
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut pair = relay.pair().await;

    // The host answers the relay's PINGs with PONG for well past the idle timeout...
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1200);
    while tokio::time::Instant::now() < deadline {
        let frame = tokio::time::timeout(Duration::from_millis(300), pair.host.recv_raw()).await;
        if let Ok(text) = frame {
            if text == r#"{"t":"PING"}"# {
                pings += 1;
                pair.host.send(json!({"t": "PONG"})).await;
            } else {
                // ...while the guest, which never said anything, has been dropped.
                assert_eq!(
                    serde_json::from_str::<serde_json::Value>(&text).unwrap()["t"],
                    "PEER_OFFLINE"
                );
                break;
            }
        }
    }
    assert!(pings >= 2, "relay sent {pings} PINGs");
    assert!(
        pair.guest.expect_closed().await.is_some(),
        "silent client gets a close frame"
    );
    // The host, which kept answering, is still served.
    pair.host.expect_nothing_pending().await;
}
