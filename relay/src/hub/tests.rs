//! The hub driven frame by frame, without sockets.

use super::*;
use crate::config::RateLimit;
use crate::outbox::ConnId;
use crate::outbox::{Frame, OutboxReceiver};
use parley_protocol::payload::OpaqueData;
use proptest::prelude::*;
use serde_json::Value;
use std::time::Duration;

struct Client {
    state: ConnState,
    rx: OutboxReceiver,
}

fn client(hub: &Hub, id: ConnId) -> Client {
    let (outbox, rx) = Outbox::new(id, 1024, 1 << 24);
    Client {
        state: hub.attach(outbox, IpAddr::from([127, 0, 0, 1])),
        rx,
    }
}

/// What the relay has told the clients so far, so that later frames can use real values.
#[derive(Default)]
struct Learned {
    sids: Vec<String>,
    codes: Vec<String>,
    tokens: Vec<String>,
    client_ids: Vec<String>,
}

fn pick(pool: &[String], i: usize) -> String {
    // One pick in eight is unknown (well-formed as a session id, so RESTORE re-creates
    // forgotten sessions too; garbage as anything else).
    if pool.is_empty() || i % 8 == 7 {
        format!("{i:032x}")
    } else {
        pool[i % pool.len()].clone()
    }
}

/// Everything the relay queued for a client parses as a frame only the relay sends (or a
/// forwarded MSG/MSG_READ), and never carries an invite code's digits in a JOIN_REQUEST.
fn drain_and_check(c: &mut Client, learned: &mut Learned) {
    while let Some(frame) = c.rx.try_recv() {
        if let Frame::Binary(data) = &frame {
            // Only a member's DATA frame, forwarded as it came.
            assert!(
                parley_protocol::data::data_sid(data).is_some(),
                "relay sent a binary message that is not a DATA frame: {data:?}"
            );
            continue;
        }
        let env = Envelope::parse(frame.as_str())
            .unwrap_or_else(|e| panic!("relay sent garbage {frame:?}: {e}"));
        assert!(
            !env.kind.is_client_sent()
                || matches!(
                    env.kind,
                    FrameType::Msg | FrameType::MsgRead | FrameType::Ping | FrameType::Pong
                ),
            "relay sent a client-only frame: {frame:?}"
        );
        if env.kind == FrameType::JoinRequest {
            let data: OpaqueData = env.data().unwrap();
            assert!(data.get("code").is_none(), "code forwarded: {frame:?}");
        }
        let value: Value = serde_json::from_str(frame.as_str()).unwrap();
        if let Some(sid) = value.get("sid").and_then(Value::as_str) {
            learned.sids.push(sid.to_string());
        }
        // (ERROR's `data.code` is an error code, not an invite code.)
        let data = value
            .get("data")
            .and_then(Value::as_object)
            .filter(|_| env.kind != FrameType::Error);
        for (key, pool) in [
            ("code", &mut learned.codes),
            ("resumeToken", &mut learned.tokens),
            ("clientID", &mut learned.client_ids),
        ] {
            if let Some(s) = data.and_then(|d| d.get(key)).and_then(Value::as_str) {
                pool.push(s.to_string());
            }
        }
    }
}

/// (client, frame type, sid pick, value pick, data shape); mostly the types clients send,
/// so that sequences get past pairing.
fn frame_strategy() -> impl Strategy<Value = (usize, FrameType, usize, usize, usize)> {
    let client_sent: Vec<FrameType> = FrameType::ALL
        .into_iter()
        .filter(|t| t.is_client_sent())
        .collect();
    let kind = prop_oneof![
        9 => prop::sample::select(client_sent),
        1 => prop::sample::select(FrameType::ALL.to_vec()),
    ];
    (0..3usize, kind, 0..64usize, 0..64usize, 0..8usize)
}

fn natural_shape(kind: FrameType) -> usize {
    match kind {
        FrameType::Join => 0,
        FrameType::Reattach => 1,
        FrameType::JoinAccept | FrameType::JoinDeny => 2,
        FrameType::Msg | FrameType::MsgRead => 3,
        FrameType::InviteCreate => 5,
        FrameType::Restore => 7,
        _ => 4,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    // Any sequence of frames from three clients, built from the relay's own answers (real
    // sids, codes, tokens), leaves the relay consistent: no panic, only well-formed output.
    #[test]
    fn arbitrary_frame_sequences_never_break_the_hub(ops in prop::collection::vec(frame_strategy(), 1..60)) {
        // Random JOINs mostly fail; with the default limits the rest would be rate-limited.
        let lenient = RateLimit { burst: u32::MAX, refill: Duration::from_secs(1) };
        // Caps small enough that sequences reach them (a refused RESTORE or CREATE_SESSION
        // must leave nothing behind).
        let hub = Hub::new(RelayConfig {
            join_failures_per_connection: lenient,
            join_failures_per_address: lenient,
            max_sessions_per_connection: 2,
            max_sessions: 6,
            ..RelayConfig::default()
        });
        let mut clients: Vec<Client> = (0..3).map(|i| client(&hub, i)).collect();
        let mut learned = Learned::default();
        for (who, kind, pick_sid, pick_value, shape) in ops {
            let sid = pick(&learned.sids, pick_sid);
            // Mostly the data the frame type expects, sometimes another type's or junk.
            let shape = if shape < 4 { natural_shape(kind) } else { shape };
            let data = match shape {
                0 => serde_json::json!({"code": pick(&learned.codes, pick_value), "publicKey": "aa"}),
                1 => serde_json::json!({"resumeToken": pick(&learned.tokens, pick_value)}),
                2 => serde_json::json!({"clientID": pick(&learned.client_ids, pick_value), "publicKey": "bb"}),
                3 => serde_json::json!({"payload": "00", "msgID": pick_value}),
                4 => Value::Null,
                5 => serde_json::json!({"prime": "ff", "generator": "02"}),
                7 => serde_json::json!({
                    "role": if pick_value % 2 == 0 { "host" } else { "guest" },
                    "resumeToken": pick(&learned.tokens, pick_value),
                    "proof": "p",
                }),
                _ => serde_json::json!([pick_value]),
            };
            let c = &mut clients[who];
            // One frame in eight is binary: a DATA frame for the sid (short ones included).
            let flow = if shape == 6 && SessionId::parse(&sid).is_some() {
                let mut frame = vec![0x01];
                frame.extend(hex::decode(&sid).unwrap());
                frame.extend(std::iter::repeat_n(0xd0, pick_value % 3));
                hub.handle_data(&mut c.state, &Bytes::from(frame))
            } else {
                let text = encode(kind, Some(&sid), Some(&data));
                hub.handle(&mut c.state, &Utf8Bytes::from(text))
            };
            if flow.hand_over_pending {
                let _ = hub.hand_over(&c.state);
            }
            for c in &mut clients {
                drain_and_check(c, &mut learned);
            }
            prop_assert!(hub.stats().sessions <= 6);
            // The state counts follow every change.
            for state in [SessionState::Unpaired, SessionState::Paired, SessionState::AwaitingMember] {
                prop_assert_eq!(hub.sessions.count(state), hub.sessions.count_by_walking(state));
            }
        }
        for c in &clients {
            hub.disconnect(&c.state);
        }
        for c in &mut clients {
            drain_and_check(c, &mut learned);
        }
        hub.sweep(Instant::now() + Duration::from_secs(48 * 3600));
        prop_assert_eq!(hub.stats().sessions, 0);
        prop_assert_eq!(hub.stats().invites, 0);
        prop_assert_eq!(hub.stats().mailbox_bytes, 0, "every charge was given back");
        let states = hub.session_states();
        prop_assert_eq!(states.unpaired + states.paired + states.awaiting_member, 0);
    }
}

impl Client {
    fn send(&mut self, hub: &Hub, frame: Value) -> Flow {
        hub.handle(&mut self.state, &Utf8Bytes::from(frame.to_string()))
    }

    fn take(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.rx.try_recv())
            .map(|f| serde_json::from_str(f.as_str()).unwrap())
            .collect()
    }
}

/// A paired host and guest, their sid and the guest's member token.
fn paired(hub: &Hub) -> (Client, Client, String, String) {
    let (mut host, mut guest) = (client(hub, 1), client(hub, 2));
    let _ = host.send(hub, serde_json::json!({"t": "CREATE_SESSION"}));
    let sid = host.take()[0]["sid"].as_str().unwrap().to_string();
    let _ = host.send(hub, serde_json::json!({"t": "INVITE_CREATE", "sid": sid}));
    let code = host.take()[0]["data"]["code"].clone();
    let _ = guest.send(
        hub,
        serde_json::json!({"t": "JOIN", "data": {"code": code}}),
    );
    let client_id = host.take()[0]["data"]["clientID"].clone();
    guest.take();
    let _ = host.send(
        hub,
        serde_json::json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": client_id}}),
    );
    let token = guest.take()[0]["data"]["resumeToken"]
        .as_str()
        .unwrap()
        .to_string();
    (host, guest, sid, token)
}

#[test]
fn a_member_back_online_is_not_refused_as_offline_while_its_mailbox_drains() {
    let mut config = RelayConfig::default();
    config.mailbox.max_frames = 10;
    let hub = Hub::new(config);
    let (mut host, guest, sid, token) = paired(&hub);
    hub.disconnect(&guest.state);
    drop(guest);
    let msg = |i: usize| serde_json::json!({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": i}});
    for i in 0..10 {
        let _ = host.send(&hub, msg(i));
    }
    assert!(host.take().iter().all(|f| f["t"] != "ERROR"));

    // Back, on a connection whose queue takes 8 frames: half of it is handed over at once.
    let (outbox, rx) = Outbox::new(3, 8, 1 << 20);
    let mut guest = Client {
        state: hub.attach(outbox, IpAddr::from([127, 0, 0, 1])),
        rx,
    };
    let flow = guest.send(
        &hub,
        serde_json::json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": token}}),
    );
    assert!(flow.hand_over_pending);
    let first = guest.take();
    assert_eq!(first.len(), 4, "{first:?}");
    // The host goes on sending: kept behind what waits, never refused as "offline".
    for i in 10..16 {
        let _ = host.send(&hub, msg(i));
    }
    let answers = host.take();
    assert!(answers.iter().all(|f| f["t"] != "ERROR"), "{answers:?}");
    // As the guest's queue drains, the rest follows, in order.
    let mut got: Vec<Value> = first.into_iter().skip(1).collect();
    for _ in 0..10 {
        let _ = hub.hand_over(&guest.state);
        got.extend(guest.take());
    }
    let ids: Vec<u64> = got
        .iter()
        .filter(|f| f["t"] == "MSG")
        .map(|f| f["data"]["msgID"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (0..16).collect::<Vec<u64>>());
}

#[test]
fn an_accept_that_reaches_no_joiner_changes_nothing() {
    let hub = Hub::new(RelayConfig::default());
    let (mut host, mut guest) = (client(&hub, 1), client(&hub, 2));
    let _ = host.send(&hub, serde_json::json!({"t": "CREATE_SESSION"}));
    let created = host.take();
    let sid = created[0]["sid"].as_str().unwrap().to_string();
    let host_token = created[0]["data"]["resumeToken"].clone();
    let _ = host.send(&hub, serde_json::json!({"t": "INVITE_CREATE", "sid": sid}));
    let code = host.take()[0]["data"]["code"].clone();
    let _ = guest.send(
        &hub,
        serde_json::json!({"t": "JOIN", "data": {"code": code}}),
    );
    let request = host.take().remove(0);
    // The joiner's connection goes before the host answers.
    hub.disconnect(&guest.state);
    let accept = serde_json::json!({"t": "JOIN_ACCEPT", "sid": sid, "data": {"clientID": request["data"]["clientID"]}});
    let _ = host.send(&hub, accept);
    let refused = host.take();
    assert_eq!(
        refused.last().unwrap()["data"]["code"],
        "peer_offline",
        "{refused:?}"
    );
    // The request is still pending: a host coming back is given it again.
    hub.disconnect(&host.state);
    let mut back = client(&hub, 3);
    let _ = back.send(
        &hub,
        serde_json::json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": host_token}}),
    );
    let frames = back.take();
    assert!(
        frames.iter().any(|f| f["t"] == "JOIN_REQUEST"),
        "{frames:?}"
    );
}

/// A `DATA` frame for `sid` (its hex) with `body`.
fn data_frame(sid: &str, body: &[u8]) -> Bytes {
    let mut frame = vec![0x01];
    frame.extend(hex::decode(sid).unwrap());
    frame.extend_from_slice(body);
    Bytes::from(frame)
}

impl Client {
    /// Everything queued, as queued.
    fn take_frames(&mut self) -> Vec<Frame> {
        std::iter::from_fn(|| self.rx.try_recv()).collect()
    }

    fn send_data(&mut self, hub: &Hub, frame: &Bytes) -> Flow {
        hub.handle_data(&mut self.state, frame)
    }
}

fn json(frame: &Frame) -> Value {
    serde_json::from_str(frame.as_str()).unwrap()
}

#[test]
fn data_reaches_the_attached_peer_as_sent_in_order_with_msgs() {
    let hub = Hub::new(RelayConfig::default());
    let (mut host, mut guest, sid, _) = paired(&hub);
    let chunk = data_frame(&sid, &[7; 61_500]);
    let ack = data_frame(&sid, b"\x00ack");
    let msg = serde_json::json!({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": "m"}});
    let _ = host.send_data(&hub, &chunk);
    let _ = host.send(&hub, msg.clone());
    let _ = guest.send_data(&hub, &ack);

    let got = guest.take_frames();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], Frame::Binary(chunk.clone()));
    assert_eq!(json(&got[1]), msg);
    // The same buffer, not a copy.
    match &got[0] {
        Frame::Binary(bytes) => assert_eq!(bytes.as_ptr(), chunk.as_ptr()),
        Frame::Text(_) => unreachable!(),
    }
    // DATA gets no answer: the host has its DELIVERED, then the guest's DATA.
    let host_got = host.take_frames();
    assert_eq!(host_got.len(), 2, "{host_got:?}");
    assert_eq!(json(&host_got[0])["t"], "DELIVERED");
    assert_eq!(host_got[1], Frame::Binary(ack.clone()));

    let m = hub.metrics();
    assert_eq!(
        m.data_forwarded_for_tests(),
        (2, (chunk.len() + ack.len()) as u64, 0)
    );
}

#[test]
fn data_for_an_absent_peer_is_dropped_and_counted_never_kept() {
    let hub = Hub::new(RelayConfig::default());
    let (mut host, guest, sid, token) = paired(&hub);
    hub.disconnect(&guest.state);
    drop(guest);
    host.take_frames();
    let _ = host.send_data(&hub, &data_frame(&sid, b"lost"));
    assert!(host.take_frames().is_empty(), "no answer, no error");
    assert_eq!(hub.stats().mailbox_bytes, 0, "nothing kept");
    assert_eq!(hub.metrics().data_forwarded_for_tests(), (0, 0, 1));

    // A MSG is kept as ever; the guest, back, gets it and no DATA.
    let msg = serde_json::json!({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": "m"}});
    let _ = host.send(&hub, msg.clone());
    let mut back = client(&hub, 3);
    let _ = back.send(
        &hub,
        serde_json::json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": token}}),
    );
    let got = back.take_frames();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(json(&got[0])["t"], "PEER_ONLINE");
    assert_eq!(json(&got[1]), msg);
}

#[test]
fn data_is_dropped_while_a_mailbox_is_still_handed_over() {
    // Queued now, DATA would overtake the MSGs that waited: it is dropped instead.
    let hub = Hub::new(RelayConfig::default());
    let (mut host, guest, sid, token) = paired(&hub);
    hub.disconnect(&guest.state);
    drop(guest);
    for i in 0..10 {
        let _ = host.send(
            &hub,
            serde_json::json!({"t": "MSG", "sid": sid, "data": {"payload": "00", "msgID": i}}),
        );
    }
    let (outbox, rx) = Outbox::new(3, 8, 1 << 20);
    let mut back = Client {
        state: hub.attach(outbox, IpAddr::from([127, 0, 0, 1])),
        rx,
    };
    let flow = back.send(
        &hub,
        serde_json::json!({"t": "REATTACH", "sid": sid, "data": {"resumeToken": token}}),
    );
    assert!(flow.hand_over_pending);
    let _ = host.send_data(&hub, &data_frame(&sid, b"early"));
    let mut got = back.take_frames();
    for _ in 0..10 {
        let _ = hub.hand_over(&back.state);
        got.extend(back.take_frames());
    }
    assert!(got.iter().all(|f| matches!(f, Frame::Text(_))), "{got:?}");
    assert_eq!(got.len(), 11, "PEER_ONLINE and the ten MSGs");
    assert_eq!(hub.metrics().data_forwarded_for_tests(), (0, 0, 1));
    // Handed over: live again.
    let late = data_frame(&sid, b"late");
    let _ = host.send_data(&hub, &late);
    assert_eq!(back.take_frames(), [Frame::Binary(late)]);
}

#[test]
fn data_from_a_non_member_is_refused() {
    let hub = Hub::new(RelayConfig::default());
    let (_host, mut guest, sid, _) = paired(&hub);
    let mut stranger = client(&hub, 9);
    let unknown = format!("{:032x}", 1);
    for sid in [&sid, &unknown] {
        let _ = stranger.send_data(&hub, &data_frame(sid, b"x"));
        let got = stranger.take_frames();
        assert_eq!(got.len(), 1, "{got:?}");
        let error = json(&got[0]);
        assert_eq!(error["t"], "ERROR");
        assert_eq!(error["sid"], sid.as_str());
        assert_eq!(error["data"]["code"], "not_member");
        assert!(error["data"].get("msgID").is_none(), "{error}");
    }
    assert!(guest.take_frames().is_empty());
    assert_eq!(hub.metrics().data_forwarded_for_tests(), (0, 0, 0));
}

#[test]
fn a_data_frame_too_short_is_refused_and_the_connection_serves_on() {
    let hub = Hub::new(RelayConfig::default());
    let (mut host, mut guest, sid, _) = paired(&hub);
    let empty = data_frame(&sid, b"");
    for short in [&empty[..], &empty[..5], &[0x01][..]] {
        let _ = host.send_data(&hub, &Bytes::copy_from_slice(short));
        let got = host.take_frames();
        assert_eq!(got.len(), 1, "{got:?}");
        let error = json(&got[0]);
        assert_eq!(error["data"]["code"], "malformed_data", "{error}");
        assert!(error.get("sid").is_none(), "{error}");
    }
    assert!(guest.take_frames().is_empty());
    let one = data_frame(&sid, b"1");
    let _ = host.send_data(&hub, &one);
    assert_eq!(guest.take_frames(), [Frame::Binary(one)]);
}
