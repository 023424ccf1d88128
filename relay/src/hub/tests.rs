//! The hub driven frame by frame, without sockets.

use super::*;
use crate::config::RateLimit;
use crate::outbox::ConnId;
use crate::outbox::OutboxReceiver;
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
            let text = encode(kind, Some(&sid), Some(&data));
            let c = &mut clients[who];
            let flow = hub.handle(&mut c.state, &Utf8Bytes::from(text));
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
