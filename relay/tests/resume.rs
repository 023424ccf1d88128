//! Resume tokens: a seat in a session is re-taken only with that seat's own token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::TestRelay;
use serde_json::json;

#[tokio::test]
async fn both_members_resume_with_their_tokens() {
    let relay = TestRelay::start().await;
    let mut pair = relay.pair().await;
    assert_ne!(pair.host_token, pair.guest_token);
    pair.exchange("before").await;

    // The guest goes away; a MSG meanwhile waits in its mailbox, and arrives when it is back.
    drop(pair.guest);
    pair.host.expect("PEER_OFFLINE").await;
    let sid = pair.sid.clone();
    let waiting = format!(r#"{{"t":"MSG","sid":"{sid}","data":{{"payload":"00","msgID":41}}}}"#);
    pair.host.send_text(&waiting).await;
    assert_eq!(pair.host.expect("DELIVERED").await["data"]["msgID"], 41);

    // It comes back with its token: it learns the host is online, then gets what waited.
    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": pair.guest_token}}))
        .await;
    guest.expect("PEER_ONLINE").await;
    assert_eq!(guest.recv_text().await, waiting);
    pair.host.expect("PEER_ONLINE").await;
    pair.guest = guest;
    pair.exchange("guest-back").await;

    // Then the host restarts, while the guest stays.
    drop(pair.host);
    pair.guest.expect("PEER_OFFLINE").await;
    let mut host = relay.client().await;
    host.send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": pair.host_token}}))
        .await;
    host.expect("PEER_ONLINE").await;
    pair.guest.expect("PEER_ONLINE").await;
    pair.host = host;
    pair.exchange("host-back").await;
}

#[tokio::test]
async fn reattach_tells_who_is_offline_and_both_can_return() {
    let relay = TestRelay::start().await;
    let pair = relay.pair().await;
    let (sid, host_token, guest_token) = (
        pair.sid.clone(),
        pair.host_token.clone(),
        pair.guest_token.clone(),
    );
    drop(pair);

    let mut host = relay.client().await;
    host.send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": host_token}}))
        .await;
    host.expect("PEER_OFFLINE").await;
    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": guest_token}}))
        .await;
    guest.expect("PEER_ONLINE").await;
    host.expect("PEER_ONLINE").await;
    host.assert_delivers(&mut guest, &sid, "x").await;
}

#[tokio::test]
async fn wrong_missing_or_foreign_tokens_are_refused() {
    let relay = TestRelay::start().await;
    let mut pair = relay.pair().await;
    let other = relay.pair().await;
    let sid = pair.sid.clone();
    let mut intruder = relay.client().await;

    intruder.send(json!({"t": "REATTACH", "sid": sid})).await;
    intruder.expect_error("token_invalid").await;
    intruder
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": "00".repeat(32)}}))
        .await;
    intruder.expect_error("token_invalid").await;
    intruder
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": "not hex"}}))
        .await;
    intruder.expect_error("token_invalid").await;
    // A real token, but of another session.
    intruder
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": other.host_token}}))
        .await;
    intruder.expect_error("token_invalid").await;
    intruder.send(json!({"t": "REATTACH", "sid": "00".repeat(16), "data": {"resumeToken": other.host_token}})).await;
    intruder.expect_error("session_unknown").await;
    intruder
        .send(json!({"t": "REATTACH", "data": {"resumeToken": other.host_token}}))
        .await;
    intruder.expect_error("missing_field").await;

    // None of that disturbed the session.
    pair.host.expect_nothing_pending().await;
    pair.exchange("still").await;
}

#[tokio::test]
async fn reattaching_a_live_seat_takes_it_over() {
    let relay = TestRelay::start().await;
    let mut pair = relay.pair().await;
    let sid = pair.sid.clone();

    // A second device of the guest (or the same one after a half-open TCP) resumes the seat.
    let mut new_guest = relay.client().await;
    new_guest
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": pair.guest_token}}))
        .await;
    new_guest.expect("PEER_ONLINE").await;
    pair.host.expect("PEER_ONLINE").await;
    let replaced = pair.guest.expect_error("replaced").await;
    assert_eq!(replaced["sid"], sid.as_str());

    // The old connection is out; closing it does not mark the seat offline.
    pair.guest
        .send(json!({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": "old"}}))
        .await;
    pair.guest.expect_error("not_member").await;
    drop(pair.guest);
    pair.host.assert_delivers(&mut new_guest, &sid, "new").await;
    pair.host.expect_nothing_pending().await;
}

#[tokio::test]
async fn join_request_waits_for_an_offline_host() {
    let relay = TestRelay::start().await;
    let mut host = relay.client().await;
    let (sid, host_token) = host.create_session().await;
    let code = host.invite(&sid).await;
    drop(host);

    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "JOIN", "data": {"code": code, "publicKey": "bb"}}))
        .await;
    guest.expect("JOINED").await;

    let mut host = relay.client().await;
    host.send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": host_token}}))
        .await;
    host.expect("PEER_ONLINE").await;
    let request = host.expect("JOIN_REQUEST").await;
    assert_eq!(request["data"]["publicKey"], "bb");
    guest.expect("PEER_ONLINE").await;
}

#[tokio::test]
async fn tokenless_reattach_is_refused_unless_enabled() {
    let relay = TestRelay::start().await;
    let pair = relay.pair().await;
    let sid = pair.sid.clone();
    drop(pair.guest);
    let mut host = pair.host;
    host.expect("PEER_OFFLINE").await;
    let mut old_client = relay.client().await;
    old_client.send(json!({"t": "REATTACH", "sid": sid})).await;
    old_client.expect_error("token_invalid").await;
    host.expect_nothing_pending().await;
}
