//! Every kind of bad input gets its ERROR (with a stable code and a message a person can act
//! on), and the relay goes on serving: the offender's connection where the issue allows it,
//! and always a healthy pair afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::{Pair, TestRelay};
use parley_relay::{RateLimit, RelayConfig};
use serde_json::json;

#[tokio::test]
async fn malformed_frames_get_errors_and_the_connection_stays_usable() {
    let relay = TestRelay::start().await;
    let mut pair = relay.pair().await;
    let sid = pair.sid.clone();
    let c = &mut pair.host;

    let cases: &[(&str, &str)] = &[
        ("this is not json", "malformed_json"),
        ("[\"MSG\"]", "malformed_json"),
        ("{\"t\":\"MSG\"", "malformed_json"),
        ("{}", "missing_field"),
        ("{\"t\":42}", "invalid_field"),
        ("{\"t\":\"LAUNCH_MISSILES\"}", "unknown_type"),
        // Frames only the relay sends.
        (
            "{\"t\":\"DELIVERED\",\"data\":{\"msgID\":\"1\"}}",
            "unknown_type",
        ),
        ("{\"t\":\"JOINED\"}", "unknown_type"),
        // Missing or wrong fields.
        (
            "{\"t\":\"MSG\",\"data\":{\"payload\":\"00\",\"msgID\":\"1\"}}",
            "missing_field",
        ),
        (
            "{\"t\":\"JOIN\",\"data\":{\"publicKey\":\"aa\"}}",
            "missing_field",
        ),
        (
            "{\"t\":\"JOIN\",\"data\":{\"code\":\"12ab56\"}}",
            "invalid_field",
        ),
        (
            "{\"t\":\"JOIN\",\"data\":{\"code\":123456}}",
            "invalid_field",
        ),
        ("{\"t\":\"JOIN\",\"data\":\"123456\"}", "invalid_field"),
        ("{\"t\":\"INVITE_CREATE\"}", "missing_field"),
        ("{\"t\":\"REATTACH\"}", "missing_field"),
    ];
    for (text, code) in cases {
        c.send_text(text).await;
        let e = c.expect_error(code).await;
        assert!(e.get("sid").is_none(), "{text}: no sid to echo");
    }

    let msg_cases = [
        (json!({"payload": "00"}), "missing_field"),
        (json!({"msgID": "1"}), "missing_field"),
        (json!({"msgID": {"x": 1}, "payload": "00"}), "invalid_field"),
        (json!({"msgID": "1", "payload": 7}), "invalid_field"),
    ];
    for (data, code) in msg_cases {
        c.send(json!({"t": "MSG", "sid": sid, "data": data})).await;
        assert_eq!(c.expect_error(code).await["sid"], sid.as_str());
    }

    // Binary frames are read as text; non-UTF-8 ones are refused.
    c.ws_send_binary(vec![0xff, 0xfe, 0x00]).await;
    c.expect_error("malformed_json").await;

    // Nothing of that reached the peer, and both still talk.
    pair.guest.expect_nothing_pending().await;
    pair.exchange("after-garbage").await;
}

#[tokio::test]
async fn frames_for_other_sessions_are_refused() {
    let relay = TestRelay::start().await;
    let mut a = relay.pair().await;
    let mut b = relay.pair().await;
    let mut stranger = relay.client().await;

    for frame in [
        json!({"t": "MSG", "sid": a.sid, "data": {"payload": "00", "msgID": "1"}}),
        json!({"t": "MSG_READ", "sid": a.sid, "data": {"msgID": "1"}}),
        json!({"t": "INVITE_CREATE", "sid": a.sid}),
        json!({"t": "JOIN_ACCEPT", "sid": a.sid, "data": {"clientID": "00", "publicKey": "aa"}}),
        json!({"t": "MSG", "sid": "not-a-session-id", "data": {"payload": "00", "msgID": "1"}}),
    ] {
        stranger.send(frame.clone()).await;
        stranger.expect_error("not_member").await;
        // A member of one session is a stranger to another.
        b.host.send(frame).await;
        b.host.expect_error("not_member").await;
    }
    // Host-only frames from the guest.
    a.guest
        .send(json!({"t": "INVITE_CREATE", "sid": a.sid}))
        .await;
    a.guest.expect_error("host_only").await;
    a.guest
        .send(json!({"t": "JOIN_ACCEPT", "sid": a.sid, "data": {"clientID": "00"}}))
        .await;
    a.guest.expect_error("host_only").await;
    a.host
        .send(json!({"t": "JOIN_ACCEPT", "sid": a.sid, "data": {"clientID": "0000000000000000"}}))
        .await;
    a.host.expect_error("unknown_client").await;

    a.guest.expect_nothing_pending().await;
    a.exchange("a").await;
    b.exchange("b").await;
}

#[tokio::test]
async fn unknown_used_and_expired_codes_are_refused() {
    let config = RelayConfig {
        invite_ttl: Duration::from_millis(300),
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut joiner = relay.client().await;

    // Unknown: pick a code that is certainly not live.
    let mut host = relay.client().await;
    let (sid, token) = host.create_session().await;
    let live = host.invite(&sid).await;
    let unknown = if live == "000000" { "000001" } else { "000000" };
    joiner
        .send(json!({"t": "JOIN", "data": {"code": unknown}}))
        .await;
    joiner.expect_error("invite_unknown").await;

    // Used: pair with the live code, then a third party tries it.
    let guest = relay.client().await;
    let mut pair = Pair::complete(host, guest, sid, token, &live).await;
    joiner
        .send(json!({"t": "JOIN", "data": {"code": live}}))
        .await;
    joiner.expect_error("invite_used").await;

    // Expired.
    let mut host2 = relay.client().await;
    let (sid2, _) = host2.create_session().await;
    let stale = host2.invite(&sid2).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    joiner
        .send(json!({"t": "JOIN", "data": {"code": stale}}))
        .await;
    joiner.expect_error("invite_expired").await;
    // The host can ask for a fresh code, and it works.
    let fresh = host2.invite(&sid2).await;
    assert_ne!(fresh, stale);
    joiner
        .send(json!({"t": "JOIN", "data": {"code": fresh}}))
        .await;
    joiner.expect("JOINED").await;
    host2.expect("JOIN_REQUEST").await;

    pair.exchange("unaffected").await;
}

#[tokio::test]
async fn invite_code_is_stable_until_used_and_a_third_member_is_refused() {
    let relay = TestRelay::start().await;
    let mut host = relay.client().await;
    let (sid, token) = host.create_session().await;
    let code = host.invite(&sid).await;
    assert_eq!(
        host.invite(&sid).await,
        code,
        "asking again returns the live code"
    );
    // The host cannot take the guest seat of its own session, and trying does not spend the code.
    host.send(json!({"t": "JOIN", "data": {"code": code}}))
        .await;
    host.expect_error("already_member").await;

    let guest = relay.client().await;
    let mut pair = Pair::complete(host, guest, sid.clone(), token, &code).await;

    pair.host
        .send(json!({"t": "INVITE_CREATE", "sid": sid}))
        .await;
    pair.host.expect_error("session_full").await;
    let mut third = relay.client().await;
    third
        .send(json!({"t": "JOIN", "data": {"code": code, "publicKey": "cc"}}))
        .await;
    third.expect_error("invite_used").await;
    third
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": "11".repeat(32)}}))
        .await;
    third.expect_error("token_invalid").await;
    third
        .send(json!({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": "1"}}))
        .await;
    third.expect_error("not_member").await;

    pair.host.expect_nothing_pending().await;
    pair.guest.expect_nothing_pending().await;
    pair.exchange("two-only").await;
}

#[tokio::test]
async fn oversize_frame_gets_an_error_and_a_close_and_is_never_relayed() {
    let config = RelayConfig {
        max_frame_bytes: 4096,
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut pair = relay.pair().await;
    let sid = pair.sid.clone();

    let huge = "ab".repeat(4096);
    pair.host
        .send(json!({"t": "MSG", "sid": sid, "data": {"payload": huge, "msgID": "big"}}))
        .await;
    pair.host.expect_error("frame_too_large").await;
    let close = pair.host.expect_closed().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1009);

    // The peer saw the host go, and never saw the frame.
    pair.guest.expect("PEER_OFFLINE").await;
    let mut host = relay.client().await;
    host.send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": pair.host_token}}))
        .await;
    host.expect("PEER_ONLINE").await;
    pair.guest.expect("PEER_ONLINE").await;
    pair.host = host;
    pair.exchange("after-oversize").await;
}

#[tokio::test]
async fn failed_joins_are_rate_limited_per_connection() {
    let config = RelayConfig {
        join_failures_per_connection: RateLimit {
            burst: 3,
            refill: Duration::from_secs(3600),
        },
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut host = relay.client().await;
    let (sid, token) = host.create_session().await;
    let code = host.invite(&sid).await;
    let wrong = if code == "999999" { "999998" } else { "999999" };

    let mut guesser = relay.client().await;
    for _ in 0..3 {
        guesser
            .send(json!({"t": "JOIN", "data": {"code": wrong}}))
            .await;
        guesser.expect_error("invite_unknown").await;
    }
    // Now even the right code is refused: being limited reveals nothing about a guess.
    guesser
        .send(json!({"t": "JOIN", "data": {"code": code}}))
        .await;
    guesser.expect_error("rate_limited").await;

    // Another connection, same address, is still fine, and the code is still live.
    let guest = relay.client().await;
    let mut pair = Pair::complete(host, guest, sid, token, &code).await;
    pair.exchange("limited-is-not-everyone").await;
}

#[tokio::test]
async fn failed_joins_are_rate_limited_per_address() {
    let config = RelayConfig {
        join_failures_per_address: RateLimit {
            burst: 4,
            refill: Duration::from_secs(3600),
        },
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut host = relay.client().await;
    let (sid, token) = host.create_session().await;
    let code = host.invite(&sid).await;
    let wrong = if code == "999999" { "999998" } else { "999999" };

    // A fresh connection per guess does not help the guesser.
    for _ in 0..4 {
        let mut guesser = relay.client().await;
        guesser
            .send(json!({"t": "JOIN", "data": {"code": wrong}}))
            .await;
        guesser.expect_error("invite_unknown").await;
    }
    let mut guesser = relay.client().await;
    guesser
        .send(json!({"t": "JOIN", "data": {"code": code}}))
        .await;
    guesser.expect_error("rate_limited").await;
    assert_eq!(relay.handle.stats().rate_limited_addresses, 1);

    // A joiner from another address is served.
    let guest = relay.client_from([127, 0, 0, 2]).await;
    let mut pair = Pair::complete(host, guest, sid, token, &code).await;
    pair.exchange("other-address").await;
}

#[tokio::test]
async fn a_reader_that_never_reads_is_disconnected() {
    let config = RelayConfig {
        outbound_queue_frames: 32,
        outbound_queue_bytes: 256 * 1024,
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut host = relay.client().await;
    let (sid, token) = host.create_session().await;
    let code = host.invite(&sid).await;
    let sleeper = relay.client_with_small_buffer().await;
    let mut pair = Pair::complete(host, sleeper, sid.clone(), token, &code).await;
    let connections_before = relay.handle.stats().connections;

    // The guest stops reading. The host streams 16 KiB messages and reads every answer.
    let payload = "cd".repeat(8 * 1024);
    let mut gone_after = None;
    for i in 0..5_000u64 {
        pair.host
            .send(json!({"t": "MSG", "sid": sid, "data": {"payload": payload, "msgID": i}}))
            .await;
        // Every MSG is answered (DELIVERED: forwarded or kept in the mailbox); PEER_OFFLINE
        // may come in between once the relay drops the reader.
        loop {
            let answer = pair.host.recv().await;
            match answer["t"].as_str() {
                Some("DELIVERED") => {
                    assert_eq!(answer["data"]["msgID"], i);
                    break;
                }
                Some("PEER_OFFLINE") => gone_after = Some(i),
                _ => panic!("unexpected {answer}"),
            }
        }
        if gone_after.is_some() {
            break;
        }
    }
    let sent = gone_after.expect("the relay never gave up on a reader that does not read");
    // Bounded: the relay gave up after at most a few MiB in flight (kernel buffers + queue).
    assert!(sent < 1_000, "gave up only after {sent} messages");
    assert_eq!(relay.handle.stats().connections, connections_before - 1);

    // The host is unharmed and a fresh pair works.
    pair.host.expect_nothing_pending().await;
    relay.pair().await.exchange("healthy").await;
}

#[tokio::test]
async fn a_client_that_floods_without_reading_is_disconnected() {
    let config = RelayConfig {
        write_timeout: Duration::from_millis(500),
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut flooder = relay.client_with_small_buffer().await;
    assert_eq!(relay.handle.stats().connections, 1);

    // Frames whose (refusing) answers are as large as they are, never read: the relay stops
    // reading from a client whose replies do not drain, then drops it when its writes stall.
    let frame = json!({"t": "MSG", "sid": "00".repeat(16), "data": {"payload": "", "msgID": "e".repeat(32 * 1024)}});
    let text = frame.to_string();
    for _ in 0..2_000 {
        if relay.handle.stats().connections == 0 || flooder.try_send_text(&text).await.is_err() {
            break;
        }
    }
    for _ in 0..50 {
        if relay.handle.stats().connections == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        relay.handle.stats().connections,
        0,
        "flooder still connected"
    );
    relay.pair().await.exchange("healthy").await;
}

#[tokio::test]
async fn only_wrong_codes_count_against_the_join_limit() {
    let config = RelayConfig {
        join_failures_per_connection: RateLimit {
            burst: 2,
            refill: Duration::from_secs(3600),
        },
        ..RelayConfig::default()
    };
    let relay = TestRelay::with_config(config).await;
    let mut host = relay.client().await;
    let (sid, token) = host.create_session().await;
    let code = host.invite(&sid).await;
    // Mistakes that are not guesses (joining your own session, a malformed code) cost nothing.
    for _ in 0..5 {
        host.send(json!({"t": "JOIN", "data": {"code": code}}))
            .await;
        host.expect_error("already_member").await;
        host.send(json!({"t": "JOIN", "data": {"code": "12"}}))
            .await;
        host.expect_error("invalid_field").await;
    }
    let guest = relay.client().await;
    Pair::complete(host, guest, sid, token, &code)
        .await
        .exchange("ok")
        .await;
}

#[tokio::test]
async fn a_denied_guest_can_join_again_on_the_same_connection() {
    let relay = TestRelay::start().await;
    let mut host = relay.client().await;
    let (sid, token) = host.create_session().await;
    let code = host.invite(&sid).await;
    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "JOIN", "data": {"code": code}}))
        .await;
    let client_id = host.expect("JOIN_REQUEST").await["data"]["clientID"].clone();
    guest.expect("JOINED").await;
    host.send(json!({"t": "JOIN_DENY", "sid": sid, "data": {"clientID": client_id}}))
        .await;
    guest.expect("JOIN_DENIED").await;

    // The host changes its mind and sends a new code; the same connection joins with it.
    let again = host.invite(&sid).await;
    Pair::complete(host, guest, sid, token, &again)
        .await
        .exchange("second-chance")
        .await;
}

#[tokio::test]
async fn an_unanswered_join_request_is_given_again_on_reattach() {
    let relay = TestRelay::start().await;
    let mut host = relay.client().await;
    let (sid, token) = host.create_session().await;
    let code = host.invite(&sid).await;
    let mut guest = relay.client().await;
    guest
        .send(json!({"t": "JOIN", "data": {"code": code, "publicKey": "bb"}}))
        .await;
    guest.expect("JOINED").await;
    // The host's connection got the request but its app never saw it (it was suspended, say);
    // it resumes from a new connection and must still learn who is waiting.
    let first = host.expect("JOIN_REQUEST").await;
    let mut host2 = relay.client().await;
    host2
        .send(json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": token}}))
        .await;
    host2.expect("PEER_ONLINE").await;
    let again = host2.expect("JOIN_REQUEST").await;
    assert_eq!(again, first);
    host2
        .send(json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": again["data"]["clientID"], "publicKey": "aa"}}))
        .await;
    guest.expect("PEER_ONLINE").await;
    let joined = guest.expect("JOINED").await;
    assert_eq!(joined["data"]["publicKey"], "aa");
    host2
        .assert_delivers(&mut guest, &sid, "after-resume")
        .await;
}

#[tokio::test]
async fn opaque_fields_are_carried_exactly_and_tokens_cannot_be_forged() {
    let relay = TestRelay::start().await;
    let mut host = relay.client().await;
    let (sid, _) = host.create_session().await;
    let code = host.invite(&sid).await;
    let mut guest = relay.client().await;
    guest
        .send_text(&format!(
            r#"{{"t":"JOIN","data":{{"code":"{code}","n":123456789012345678901234567890,"s":"\ud800"}}}}"#
        ))
        .await;
    let request = host.recv_text().await;
    assert!(
        request.contains(r#""n":123456789012345678901234567890"#),
        "{request}"
    );
    assert!(request.contains(r#""s":"\ud800""#), "{request}");
    let joined = guest.expect("JOINED").await;
    let real_token = joined["data"]["resumeToken"].clone();

    // (serde_json::Value cannot hold a lone surrogate, so read the clientID off the text.)
    let at = request.find(r#""clientID":""#).unwrap() + r#""clientID":""#.len();
    let client_id = &request[at..at + 16];
    host.send(json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": client_id, "resumeToken": "forged"}})).await;
    // The second JOINED carries the relay's member token, never the host's.
    let second = guest.expect("JOINED").await;
    let member_token = second["data"]["resumeToken"].as_str().unwrap();
    assert_eq!(member_token.len(), 64, "{second}");
    assert_ne!(json!(member_token), real_token);
    assert_ne!(real_token, json!("forged"));
}

#[tokio::test]
async fn oversize_invite_data_and_bad_payloads_are_refused_with_context() {
    let relay = TestRelay::start().await;
    let mut pair = relay.pair().await;
    let sid = pair.sid.clone();
    let mut host = relay.client().await;
    let (lone, _) = host.create_session().await;
    host.send(json!({"t": "INVITE_CREATE", "sid": lone, "data": {"publicKey": "ab".repeat(4096)}}))
        .await;
    host.expect_error("invalid_field").await;
    host.invite(&lone).await;

    pair.host
        .send(json!({"t": "MSG", "sid": sid, "data": {"msgID": "m9", "payload": 5}}))
        .await;
    let e = pair.host.expect_error("invalid_field").await;
    assert_eq!(e["data"]["msgID"], "m9", "the refused message is named");
    pair.exchange("fine").await;
}

#[tokio::test]
async fn binary_messages_are_data_frames_or_json_text() {
    let relay = TestRelay::start().await;
    let mut pair = relay.pair().await;
    let c = &mut pair.host;
    // JSON text in a binary message is read as before.
    c.ws_send_binary(br#"{"t":"PING"}"#.to_vec()).await;
    c.expect("PONG").await;
    // Starting with 0x01 it is a DATA frame; one too short to carry a body is refused, and
    // the connection serves on.
    let mut short = vec![0x01];
    short.extend(hex::decode(&pair.sid).unwrap());
    c.ws_send_binary(short).await;
    c.expect_error("malformed_data").await;
    c.ws_send_binary(vec![0x01]).await;
    c.expect_error("malformed_data").await;
    // A stranger's DATA for the session.
    let mut stranger = relay.client().await;
    let mut data = vec![0x01];
    data.extend(hex::decode(&pair.sid).unwrap());
    data.push(0);
    stranger.ws_send_binary(data).await;
    assert_eq!(
        stranger.expect_error("not_member").await["sid"],
        pair.sid.as_str()
    );
    pair.guest.expect_nothing_pending().await;
    pair.exchange("after-data").await;
}
